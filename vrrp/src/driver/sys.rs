//! Sockets: the raw IP protocol 112 socket for adverts and the AF_PACKET socket for ARP.
//!
//! This is the only module with `unsafe`: socket2 has no safe constructor for `sockaddr_ll`.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use crate::arp::{ARP_LEN, ETHERTYPE_ARP};
use crate::wire;

/// Opens the advert socket: bound to `interface`, TTL 255 for unicast and multicast, member of
/// 224.0.0.18 on that interface, own multicast not looped back.
pub(crate) fn vrrp_socket(interface: &str, ifindex: u32, primary: Ipv4Addr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(i32::from(wire::IP_PROTOCOL))),
    )?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.set_ttl_v4(u32::from(wire::TTL))?;
    s.set_multicast_ttl_v4(u32::from(wire::TTL))?;
    s.set_multicast_loop_v4(false)?;
    s.set_multicast_all_v4(false)?;
    s.set_multicast_if_v4(&primary)?;
    s.join_multicast_v4_n(
        &wire::MULTICAST_GROUP,
        &socket2::InterfaceIndexOrAddress::Index(ifindex),
    )?;
    // The reader thread wakes up regularly to notice that the instance stopped.
    s.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    Ok(s)
}

/// Sends one advert to `dst` (224.0.0.18 or a unicast peer); the checksum covers `dst`.
pub(crate) fn send_advert(
    s: &Socket,
    repr: &wire::VrrpRepr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> io::Result<()> {
    let bytes = repr.to_bytes(src, dst);
    s.send_to(&bytes, &SocketAddrV4::new(dst, 0).into())?;
    Ok(())
}

/// An AF_PACKET datagram socket that sends ARP frames to the broadcast address; the kernel
/// adds the Ethernet header with the interface's MAC as source.
pub(crate) struct ArpSocket {
    socket: Socket,
    dest: SockAddr,
}

impl ArpSocket {
    pub(crate) fn open(ifindex: u32) -> io::Result<Self> {
        let proto = ETHERTYPE_ARP.to_be();
        let socket = Socket::new(
            Domain::PACKET,
            Type::DGRAM,
            Some(Protocol::from(i32::from(proto))),
        )?;
        let ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex"))?;
        let mut storage = SockAddrStorage::zeroed();
        let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        #[allow(unsafe_code)]
        // SAFETY: SockAddrStorage is large and aligned enough for any sockaddr, sockaddr_ll
        // included, and every field written is plain data; the length passed to SockAddr::new
        // is exactly the size of the structure initialised.
        let dest = unsafe {
            let ll = storage.view_as::<libc::sockaddr_ll>();
            ll.sll_family = libc::AF_PACKET as libc::sa_family_t;
            ll.sll_protocol = proto;
            ll.sll_ifindex = ifindex;
            ll.sll_halen = 6;
            ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            SockAddr::new(storage, len)
        };
        Ok(Self { socket, dest })
    }

    pub(crate) fn send(&self, frame: &[u8; ARP_LEN]) -> io::Result<()> {
        self.socket.send_to(frame, &self.dest)?;
        Ok(())
    }
}
