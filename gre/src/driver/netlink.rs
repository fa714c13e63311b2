//! The one rtnetlink question only the tunnels ask: the MTU of the underlay interface.

use std::net::Ipv4Addr;

use netsys::netlink::{addresses, link_by_index};
use rtnetlink::Handle;

use super::DriverError;

/// The MTU of the interface that holds `local`.
pub(crate) async fn underlay_mtu(handle: &Handle, local: Ipv4Addr) -> Result<u32, DriverError> {
    let holder = addresses(handle)
        .await?
        .into_iter()
        .find(|a| a.net.addr() == local)
        .ok_or(DriverError::LocalAddressMissing(local))?;
    link_by_index(handle, holder.ifindex)
        .await?
        .and_then(|l| l.mtu)
        .ok_or(DriverError::LocalAddressMissing(local))
}
