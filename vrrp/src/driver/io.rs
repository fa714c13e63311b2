//! The driver's I/O seam: everything [`Driver`](super::Driver) does to the system when it
//! performs the core's actions and polls links goes through [`VrrpIo`], so that loop runs in
//! tests on an in-memory implementation. [`NetIo`] is the real one: per member a raw
//! protocol 112 socket and an AF_PACKET socket, and one shared rtnetlink handle.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::arp::gratuitous_arp;
use crate::error::DriverError;
use crate::instance::VirtualAddress;
use crate::sync_group::MemberId;
use crate::wire::VrrpRepr;

use super::{netlink, sys};

/// What the driver does to the system, per group member.
pub(crate) trait VrrpIo {
    /// Sends one advert from `member`'s socket to `dst` (224.0.0.18 or a unicast peer).
    fn send_advert(
        &self,
        member: MemberId,
        repr: &VrrpRepr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> io::Result<()>;
    /// Adds `vip` to `member`'s interface; an address already there is fine.
    async fn add_address(&self, member: MemberId, vip: VirtualAddress) -> Result<(), DriverError>;
    /// Removes `vip` from `member`'s interface; an absent address is fine.
    async fn remove_address(
        &self,
        member: MemberId,
        vip: VirtualAddress,
    ) -> Result<(), DriverError>;
    /// Sends one gratuitous ARP announcing `address` at `member`'s interface MAC.
    fn send_garp(&self, member: MemberId, address: Ipv4Addr) -> io::Result<()>;
    /// Whether `interface` exists, is up and has carrier.
    async fn link_up(&self, interface: &str) -> bool;
}

/// One member's sockets and interface facts.
pub(crate) struct MemberIo {
    pub(crate) link: netlink::LinkInfo,
    pub(crate) socket: Arc<socket2::Socket>,
    pub(crate) arp: sys::ArpSocket,
}

/// The real [`VrrpIo`]: raw sockets and rtnetlink.
pub(crate) struct NetIo {
    pub(crate) handle: rtnetlink::Handle,
    /// Indexed by [`MemberId`].
    pub(crate) members: Vec<MemberIo>,
}

impl NetIo {
    fn member(&self, member: MemberId) -> io::Result<&MemberIo> {
        self.members
            .get(member.0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such group member"))
    }

    fn ifindex(&self, member: MemberId) -> Result<u32, DriverError> {
        self.members
            .get(member.0)
            .map(|m| m.link.index)
            .ok_or(DriverError::NotRunning)
    }
}

impl VrrpIo for NetIo {
    fn send_advert(
        &self,
        member: MemberId,
        repr: &VrrpRepr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> io::Result<()> {
        sys::send_advert(&self.member(member)?.socket, repr, src, dst)
    }

    async fn add_address(&self, member: MemberId, vip: VirtualAddress) -> Result<(), DriverError> {
        netlink::add_address(&self.handle, self.ifindex(member)?, vip).await
    }

    async fn remove_address(
        &self,
        member: MemberId,
        vip: VirtualAddress,
    ) -> Result<(), DriverError> {
        netlink::remove_address(&self.handle, self.ifindex(member)?, vip).await
    }

    fn send_garp(&self, member: MemberId, address: Ipv4Addr) -> io::Result<()> {
        let m = self.member(member)?;
        m.arp.send(&gratuitous_arp(m.link.mac, address))
    }

    async fn link_up(&self, interface: &str) -> bool {
        netlink::link(&self.handle, interface)
            .await
            .is_ok_and(|l| l.up)
    }
}
