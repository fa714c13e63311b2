//! rtnetlink requests every driver makes: links, IPv4 addresses, routes and the kernel's
//! route lookup.
//!
//! Invariants: every request that fails returns one [`NetlinkError`] naming what was being
//! done; dumps are read to the end (dropping a dump stream early makes netlink-proto warn
//! about replies it cannot deliver); the `*_idempotent` helpers treat "already there" on
//! add and "already gone" on delete as success, so a restarted daemon adopts or skips what
//! an earlier run left.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
pub use rtnetlink::Handle;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{AddressMessageBuilder, RouteMessageBuilder};

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct NetlinkError {
    /// What was being done ("add route 10.0.0.0/8 via ifindex 5").
    pub op: String,
    /// The kernel's (or the netlink layer's) answer.
    #[source]
    pub source: rtnetlink::Error,
}

impl NetlinkError {
    /// A failure of `op` (for the requests a driver builds itself: rules, neighbours).
    pub fn new(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        NetlinkError {
            op: op.into(),
            source,
        }
    }

    /// The errno the kernel answered with, when it answered with one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        errno(&self.source)
    }
}

/// The errno of a netlink error reply (`ENOENT`, `EEXIST`, ...), if `e` is one.
#[must_use]
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A netlink connection whose I/O task runs on the current tokio runtime until every
/// [`Handle`] clone is dropped.
///
/// # Errors
/// The netlink socket could not be opened.
pub fn connect() -> io::Result<Handle> {
    let (handle, connection) = connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink connection whose I/O task the caller runs (to supervise it, or to end it).
///
/// # Errors
/// The netlink socket could not be opened.
pub fn connection() -> io::Result<(Handle, impl Future<Output = ()> + Send + 'static)> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    Ok((handle, conn))
}

/// What the drivers need to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, for interfaces that have a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up and with carrier.
    pub up: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up)
                && msg.header.flags.contains(LinkFlags::LowerUp),
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(&bytes[..]).ok(),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                _ => {}
            }
        }
        link
    }
}

/// Whether `e` says the link does not exist.
fn no_such_link(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ENODEV | libc::ENOENT))
}

/// The interface named `name`; `None` when there is none.
///
/// # Errors
/// A netlink failure other than "no such device".
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, NetlinkError> {
    let links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_collect::<Vec<_>>().await {
        Ok(v) => Ok(v.first().map(Link::from_message)),
        Err(e) if no_such_link(&e) => Ok(None),
        Err(e) => Err(NetlinkError::new(format!("find interface {name}"), e)),
    }
}

/// The interface with index `index`; `None` when there is none.
///
/// # Errors
/// A netlink failure other than "no such device".
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<Link>, NetlinkError> {
    let links = handle.link().get().match_index(index).execute();
    match links.try_collect::<Vec<_>>().await {
        Ok(v) => Ok(v.first().map(Link::from_message)),
        Err(e) if no_such_link(&e) => Ok(None),
        Err(e) => Err(NetlinkError::new(format!("find interface #{index}"), e)),
    }
}

/// One IPv4 address assigned to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The interface's index.
    pub ifindex: u32,
    /// The address and its prefix length (not truncated: `addr()` is the host's address).
    pub net: Ipv4Net,
}

/// Every IPv4 address of this namespace. The local address (`IFA_LOCAL`) is the one taken:
/// on a point-to-point link `IFA_ADDRESS` is the peer's.
///
/// # Errors
/// A netlink failure.
pub async fn addresses(handle: &Handle) -> Result<Vec<Address>, NetlinkError> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("list addresses", e))?;
    let mut out = Vec::new();
    for msg in msgs {
        let local = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            })
            .or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                })
            });
        if let Some(a) = local
            && let Ok(net) = Ipv4Net::new(a, msg.header.prefix_len)
        {
            out.push(Address {
                ifindex: msg.header.index,
                net,
            });
        }
    }
    Ok(out)
}

/// Adds `addr/prefix_len` to interface `ifindex`; an address already there is fine.
///
/// # Errors
/// A netlink failure other than "exists".
pub async fn add_address_idempotent(
    handle: &Handle,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetlinkError> {
    match handle
        .address()
        .add(ifindex, IpAddr::V4(addr), prefix_len)
        .execute()
        .await
    {
        Err(e) if errno(&e) != Some(libc::EEXIST) => Err(NetlinkError::new(
            format!("add address {addr}/{prefix_len} to ifindex {ifindex}"),
            e,
        )),
        _ => Ok(()),
    }
}

/// Removes `addr/prefix_len` from interface `ifindex`; an address (or interface) already
/// gone is fine.
///
/// # Errors
/// A netlink failure other than "not there".
pub async fn del_address_idempotent(
    handle: &Handle,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetlinkError> {
    let msg = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(ifindex)
        .address(addr, prefix_len)
        .build();
    match handle.address().del(msg).execute().await {
        Err(e)
            if !matches!(
                errno(&e),
                Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            Err(NetlinkError::new(
                format!("remove address {addr}/{prefix_len} from ifindex {ifindex}"),
                e,
            ))
        }
        _ => Ok(()),
    }
}

/// A route to `dest` out of interface `ifindex` in the main table.
#[must_use]
pub fn route_via(dest: IpNet, ifindex: u32) -> RouteMessage {
    match dest {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .output_interface(ifindex)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .output_interface(ifindex)
            .build(),
    }
}

/// `10.0.0.0/8 via ifindex 5 table 4787`, for error messages.
fn describe(route: &RouteMessage) -> String {
    let mut dest = String::from("default");
    let mut via = String::new();
    let mut table = u32::from(route.header.table);
    for a in &route.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                dest = format!("{d}/{}", route.header.destination_prefix_length);
            }
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                dest = format!("{d}/{}", route.header.destination_prefix_length);
            }
            RouteAttribute::Oif(i) => via = format!(" via ifindex {i}"),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table == 254 || table == 0 {
        format!("{dest}{via}")
    } else {
        format!("{dest}{via} table {table}")
    }
}

/// Installs `route`, replacing a route to the same destination (in the same table) that is
/// there already.
///
/// # Errors
/// A netlink failure.
pub async fn add_route_replace(handle: &Handle, route: RouteMessage) -> Result<(), NetlinkError> {
    let op = format!("add route {}", describe(&route));
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(op, e))
}

/// Withdraws `route`; a route already gone (with its interface, or by hand) is fine.
///
/// # Errors
/// A netlink failure other than "no such route".
pub async fn del_route_idempotent(
    handle: &Handle,
    route: RouteMessage,
) -> Result<(), NetlinkError> {
    let op = format!("remove route {}", describe(&route));
    match handle.route().del(route).execute().await {
        Err(e) if errno(&e) != Some(libc::ESRCH) => Err(NetlinkError::new(op, e)),
        _ => Ok(()),
    }
}

/// The interface the kernel routes packets to `ip` out of (what `ip route get` prints after
/// `dev`); `None` for a route without one (unreachable, blackhole).
///
/// # Errors
/// A netlink failure, "network unreachable" included.
pub async fn route_get(handle: &Handle, ip: IpAddr) -> Result<Option<Link>, NetlinkError> {
    let op = format!("route get {ip}");
    let question = match ip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .build(),
    };
    let answers: Vec<RouteMessage> = handle
        .route()
        .get(question)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new(op.clone(), e))?;
    let oif = answers.iter().find_map(|m| {
        m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
    });
    match oif {
        Some(index) => link_by_index(handle, index).await,
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Read-only questions about this namespace's loopback, which every namespace has.

    #[tokio::test]
    async fn loopback_is_found_by_name_and_index_and_a_missing_link_is_none() {
        let handle = connect().expect("a netlink socket");
        let lo = link_by_name(&handle, "lo")
            .await
            .expect("answered")
            .expect("lo exists");
        assert_eq!(lo.name, "lo");
        let again = link_by_index(&handle, lo.index).await.expect("answered");
        assert_eq!(again.map(|l| l.name).as_deref(), Some("lo"));
        let missing = link_by_name(&handle, "no-such-if0")
            .await
            .expect("answered");
        assert_eq!(missing, None);
    }

    #[tokio::test]
    async fn route_get_names_the_interface_as_ip_route_get_does() {
        let handle = connect().expect("a netlink socket");
        let dev = route_get(&handle, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .expect("a local route");
        assert_eq!(dev.map(|l| l.name).as_deref(), Some("lo"));
    }

    #[test]
    fn errors_name_the_route_they_were_about() {
        let dest: IpNet = "10.1.0.0/16".parse().expect("a prefix");
        assert_eq!(describe(&route_via(dest, 7)), "10.1.0.0/16 via ifindex 7");
        let mut other_table = route_via(dest, 7);
        other_table.attributes.push(RouteAttribute::Table(4787));
        assert_eq!(
            describe(&other_table),
            "10.1.0.0/16 via ifindex 7 table 4787"
        );
    }
}
