//! Route and link queries over rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::DriverError;

/// A netlink connection whose I/O task runs on the current runtime.
pub(crate) fn connect() -> Result<Handle, DriverError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| DriverError::Io {
        what: "open rtnetlink socket",
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

fn route_message(
    route: IpNet,
    ifindex: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, DriverError> {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.addr(), route.prefix_len())
        .map(|b| b.output_interface(ifindex).build())
        .map_err(|e| DriverError::Route {
            route,
            message: e.to_string(),
        })
}

/// Installs (or replaces) `route` via the interface `ifindex`.
pub(crate) async fn add_route(
    handle: &Handle,
    route: IpNet,
    ifindex: u32,
) -> Result<(), DriverError> {
    handle
        .route()
        .add(route_message(route, ifindex)?)
        .replace()
        .execute()
        .await
        .map_err(|e| DriverError::Route {
            route,
            message: e.to_string(),
        })
}

/// Withdraws `route` via `ifindex`; a route that is already gone is not an error.
pub(crate) async fn del_route(
    handle: &Handle,
    route: IpNet,
    ifindex: u32,
) -> Result<(), DriverError> {
    match handle
        .route()
        .del(route_message(route, ifindex)?)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        Err(e) => Err(DriverError::Route {
            route,
            message: e.to_string(),
        }),
    }
}

/// The MTU of the interface that holds `local`.
pub(crate) async fn underlay_mtu(handle: &Handle, local: Ipv4Addr) -> Result<u32, DriverError> {
    let netlink = |source: rtnetlink::Error| DriverError::Netlink {
        what: "query addresses and links",
        message: source.to_string(),
    };
    let mut addresses = handle.address().get().execute();
    let mut index = None;
    while let Some(msg) = addresses.try_next().await.map_err(netlink)? {
        let holds = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == local)
        });
        if holds {
            index = Some(msg.header.index);
        }
    }
    let index = index.ok_or(DriverError::LocalAddressMissing(local))?;
    let mut links = handle.link().get().match_index(index).execute();
    while let Some(msg) = links.try_next().await.map_err(netlink)? {
        if let Some(mtu) = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        }) {
            return Ok(mtu);
        }
    }
    Err(DriverError::LocalAddressMissing(local))
}
