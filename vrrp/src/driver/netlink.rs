//! Interface facts and virtual address management over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{AddressMessageBuilder, Handle};

use crate::error::DriverError;
use crate::instance::VirtualAddress;

/// What the driver needs to know about an interface.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub(crate) index: u32,
    pub(crate) mac: [u8; 6],
    /// Administratively up and with carrier.
    pub(crate) up: bool,
}

fn netlink_err(what: &str, e: rtnetlink::Error) -> DriverError {
    DriverError::Netlink(format!("{what}: {e}"))
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

pub(crate) async fn link(handle: &Handle, name: &str) -> Result<LinkInfo, DriverError> {
    let links = handle.link().get().match_name(name.to_owned()).execute();
    // Collect the whole dump: dropping the stream early makes netlink-proto warn about
    // responses it cannot deliver.
    let msg = match links.try_collect::<Vec<_>>().await {
        Ok(v) => v
            .into_iter()
            .next()
            .ok_or_else(|| DriverError::NoInterface(name.to_owned()))?,
        Err(e) if errno(&e) == Some(libc::ENODEV) => {
            return Err(DriverError::NoInterface(name.to_owned()));
        }
        Err(e) => return Err(netlink_err("get link", e)),
    };
    let mut mac = [0u8; 6];
    for a in &msg.attributes {
        if let LinkAttribute::Address(bytes) = a
            && bytes.len() == 6
        {
            mac.copy_from_slice(bytes);
        }
    }
    let flags = msg.header.flags;
    Ok(LinkInfo {
        index: msg.header.index,
        mac,
        up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    })
}

/// The first IPv4 address of the interface that is not one of `exclude` (the VIPs).
pub(crate) async fn primary_address(
    handle: &Handle,
    ifindex: u32,
    exclude: &[Ipv4Addr],
) -> Result<Option<Ipv4Addr>, DriverError> {
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_err("get address", e))?;
    for msg in addrs {
        for a in &msg.attributes {
            if let AddressAttribute::Local(IpAddr::V4(v4))
            | AddressAttribute::Address(IpAddr::V4(v4)) = a
                && !exclude.contains(v4)
            {
                return Ok(Some(*v4));
            }
        }
    }
    Ok(None)
}

/// Adds `vip`; an address that is already there is fine.
pub(crate) async fn add_address(
    handle: &Handle,
    ifindex: u32,
    vip: VirtualAddress,
) -> Result<(), DriverError> {
    match handle
        .address()
        .add(ifindex, IpAddr::V4(vip.address), vip.prefix_len)
        .execute()
        .await
    {
        Err(e) if errno(&e) != Some(libc::EEXIST) => Err(netlink_err("add address", e)),
        _ => Ok(()),
    }
}

/// Removes `vip`; an address that is absent is fine.
pub(crate) async fn remove_address(
    handle: &Handle,
    ifindex: u32,
    vip: VirtualAddress,
) -> Result<(), DriverError> {
    let msg = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(ifindex)
        .address(vip.address, vip.prefix_len)
        .build();
    match handle.address().del(msg).execute().await {
        Err(e)
            if !matches!(
                errno(&e),
                Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            Err(netlink_err("remove address", e))
        }
        _ => Ok(()),
    }
}
