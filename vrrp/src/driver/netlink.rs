//! Interface facts and virtual address management, in VRRP's terms, over netsys's rtnetlink
//! helpers.

use std::net::Ipv4Addr;

use netsys::netlink::{Link, addresses, link_by_name};
use rtnetlink::Handle;

use crate::error::DriverError;
use crate::instance::VirtualAddress;

/// What the driver needs to know about an interface.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub(crate) index: u32,
    /// All zeros for an interface without a 6-byte hardware address.
    pub(crate) mac: [u8; 6],
    /// Administratively up and with carrier.
    pub(crate) up: bool,
}

impl From<Link> for LinkInfo {
    fn from(l: Link) -> Self {
        LinkInfo {
            index: l.index,
            mac: l.mac.unwrap_or_default(),
            up: l.up,
        }
    }
}

pub(crate) async fn link(handle: &Handle, name: &str) -> Result<LinkInfo, DriverError> {
    link_by_name(handle, name)
        .await?
        .map(LinkInfo::from)
        .ok_or_else(|| DriverError::NoInterface(name.to_owned()))
}

/// The first IPv4 address of the interface that is not one of `exclude` (the VIPs).
pub(crate) async fn primary_address(
    handle: &Handle,
    ifindex: u32,
    exclude: &[Ipv4Addr],
) -> Result<Option<Ipv4Addr>, DriverError> {
    Ok(addresses(handle)
        .await?
        .into_iter()
        .filter(|a| a.ifindex == ifindex)
        .map(|a| a.net.addr())
        .find(|a| !exclude.contains(a)))
}

/// Adds `vip`; an address that is already there is fine.
pub(crate) async fn add_address(
    handle: &Handle,
    ifindex: u32,
    vip: VirtualAddress,
) -> Result<(), DriverError> {
    netsys::netlink::add_address_idempotent(handle, ifindex, vip.address, vip.prefix_len).await?;
    Ok(())
}

/// Removes `vip`; an address that is absent is fine.
pub(crate) async fn remove_address(
    handle: &Handle,
    ifindex: u32,
    vip: VirtualAddress,
) -> Result<(), DriverError> {
    netsys::netlink::del_address_idempotent(handle, ifindex, vip.address, vip.prefix_len).await?;
    Ok(())
}
