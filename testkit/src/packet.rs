//! IPv4 packets for tests, built with etherparse (TTL 64, checksums valid).
//!
//! TCP segments carry sequence number 1000 and window 64240; one with ACK set acknowledges
//! 1. ICMP echoes carry sequence 7 and the payload `ping`.

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::TimeExceededCode};
use std::net::{Ipv4Addr, SocketAddrV4};

/// The TTL of every built packet.
pub const TTL: u8 = 64;

/// The flags of a built TCP segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK (acknowledging 1).
    pub ack: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
}

impl TcpFlags {
    /// A connection's first segment.
    pub const SYN: Self = Self {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    /// The server's answer to a SYN.
    pub const SYN_ACK: Self = Self {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
    };
    /// An established connection's segment.
    pub const ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    /// A close (FIN with ACK).
    pub const FIN_ACK: Self = Self {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };
    /// A reset without ACK.
    pub const RST: Self = Self {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };
    /// A reset with ACK.
    pub const RST_ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: true,
    };
}

/// An IPv4 TCP segment from `src` to `dst` with `flags` and `payload`.
pub fn ipv4_tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), TTL).tcp(
        src.port(),
        dst.port(),
        1000,
        64240,
    );
    if flags.syn {
        b = b.syn();
    }
    if flags.ack {
        b = b.ack(1);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An IPv4 UDP datagram from `src` to `dst` with `payload`.
pub fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), TTL)
        .udp(src.port(), dst.port())
        .write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An ICMP echo request (or reply, when `request` is false) with identifier `id`.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), TTL);
    let b = if request {
        b.icmpv4_echo_request(id, 7)
    } else {
        b.icmpv4_echo_reply(id, 7)
    };
    let mut v = Vec::new();
    b.write(&mut v, b"ping")
        .expect("writing to a Vec cannot fail");
    v
}

/// An ICMP time-exceeded error from `src` to `dst` quoting the first 28 bytes of `quoted`
/// (its IPv4 header and the first 8 bytes of its transport header, as a router quotes).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4(Icmpv4Type::TimeExceeded(
            TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut v, &quoted[..quoted.len().min(28)])
        .expect("writing to a Vec cannot fail");
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 10), 40_000);
    const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 80);

    fn checksums_verify(packet: &[u8]) -> bool {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
            return false;
        };
        let header = ip.header().to_header();
        let header_ok = header.calc_header_checksum() == header.header_checksum;
        let payload = ip.payload().payload;
        let transport_ok = match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                tcp.to_header()
                    .calc_checksum_ipv4(&header, tcp.payload())
                    .unwrap()
                    == tcp.checksum()
            }
            Some(TransportSlice::Udp(udp)) => {
                udp.to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .unwrap()
                    == udp.checksum()
            }
            Some(TransportSlice::Icmpv4(icmp)) => {
                icmp.header().icmp_type.calc_checksum(icmp.payload()) == icmp.checksum()
            }
            _ => false,
        };
        header_ok && transport_ok && !payload.is_empty()
    }

    #[test]
    fn tcp_carries_the_flags_and_valid_checksums() {
        for flags in [
            TcpFlags::SYN,
            TcpFlags::SYN_ACK,
            TcpFlags::ACK,
            TcpFlags::FIN_ACK,
            TcpFlags::RST,
            TcpFlags::RST_ACK,
        ] {
            let p = ipv4_tcp(A, B, flags, b"data");
            assert!(checksums_verify(&p), "{flags:?}");
            let sliced = SlicedPacket::from_ip(&p).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
                panic!("not TCP");
            };
            assert_eq!(
                (tcp.syn(), tcp.ack(), tcp.fin(), tcp.rst()),
                (flags.syn, flags.ack, flags.fin, flags.rst)
            );
            assert_eq!((tcp.source_port(), tcp.destination_port()), (40_000, 80));
            assert_eq!(tcp.payload(), b"data");
        }
    }

    #[test]
    fn udp_echo_and_error_have_valid_checksums() {
        assert!(checksums_verify(&ipv4_udp(A, B, b"hi")));
        assert!(checksums_verify(&icmp_echo(*A.ip(), *B.ip(), 9, true)));
        assert!(checksums_verify(&icmp_echo(*B.ip(), *A.ip(), 9, false)));
        let quoted = ipv4_udp(A, B, b"a longer payload than a router quotes");
        let error = icmp_error(Ipv4Addr::new(203, 0, 113, 1), *A.ip(), &quoted);
        assert!(checksums_verify(&error));
        assert_eq!(error.len(), 20 + 8 + 28);
        assert_eq!(&error[28..], &quoted[..28]);
    }
}
