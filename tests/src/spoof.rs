//! Crafted TCP segments with forged sources, sent through a raw IPv4 socket (`IP_HDRINCL`):
//! what the `spoof` binary uses to attack a gateway from a test namespace.
//!
//! Invariants:
//! - every segment built here carries correct IPv4 and TCP checksums (a receiver drops
//!   nothing for a bad checksum: what the attack costs is the gateway's doing);
//! - [`RawSender::open`] refuses to open a socket outside a namespace made with `ip netns`
//!   (so never in the root one): nothing built here can leave the test namespaces, and the
//!   machine;
//! - [`parse_tcp`] reads a received datagram only after checking its length, and answers
//!   `None` for anything that is not a whole IPv4/TCP header.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use netutil::checksum::{checksum, fold, pseudo_header_v4, sum};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// TCP flag bits (RFC 9293 §3.1).
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

const IPV4_HEADER: usize = 20;
const TCP_HEADER: usize = 20;
/// A SYN carries one option, MSS 1460, as real clients' SYNs do (4 bytes).
const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xb4];
const PROTO_TCP: u8 = 6;

/// One TCP segment to build: addresses, numbers and flags.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// Source endpoint (forged).
    pub src: SocketAddrV4,
    /// Destination endpoint.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (sent as is; meaningful with [`flags::ACK`]).
    pub ack: u32,
    /// Flag bits ([`flags`]).
    pub flags: u8,
    /// Advertised window.
    pub window: u16,
    /// IPv4 identification.
    pub ip_id: u16,
}

impl Segment {
    /// The whole IPv4 datagram: a 20-byte header, the TCP header (with an MSS option on a
    /// SYN), no payload.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let options: &[u8] = if self.flags & flags::SYN != 0 {
            &MSS_OPTION
        } else {
            &[]
        };
        let tcp_len = TCP_HEADER + options.len();
        let total = IPV4_HEADER + tcp_len;
        let mut p = Vec::with_capacity(total);
        // IPv4: version 4, IHL 5; DF; TTL 64.
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&self.ip_id.to_be_bytes());
        p.extend_from_slice(&[0x40, 0, 64, PROTO_TCP, 0, 0]);
        p.extend_from_slice(&self.src.ip().octets());
        p.extend_from_slice(&self.dst.ip().octets());
        let ip_check = checksum(&p);
        p[10..12].copy_from_slice(&ip_check.to_be_bytes());
        // TCP.
        p.extend_from_slice(&self.src.port().to_be_bytes());
        p.extend_from_slice(&self.dst.port().to_be_bytes());
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.ack.to_be_bytes());
        p.push(((tcp_len / 4) as u8) << 4);
        p.push(self.flags);
        p.extend_from_slice(&self.window.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        p.extend_from_slice(options);
        let pseudo = pseudo_header_v4(
            self.src.ip().octets(),
            self.dst.ip().octets(),
            PROTO_TCP,
            tcp_len as u16,
        );
        let tcp_check = !fold(sum(pseudo, &p[IPV4_HEADER..]));
        p[IPV4_HEADER + 16..IPV4_HEADER + 18].copy_from_slice(&tcp_check.to_be_bytes());
        p
    }
}

/// The header fields of a received IPv4/TCP datagram that an attacker reads off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenSegment {
    /// Source endpoint.
    pub src: SocketAddrV4,
    /// Destination endpoint.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flag bits.
    pub flags: u8,
}

/// Parses an IPv4 datagram carrying TCP; `None` if it is anything else or truncated.
#[must_use]
pub fn parse_tcp(datagram: &[u8]) -> Option<SeenSegment> {
    let version_ihl = *datagram.first()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HEADER || datagram.get(9) != Some(&PROTO_TCP) {
        return None;
    }
    let ip = datagram.get(..ihl)?;
    let tcp = datagram.get(ihl..ihl + TCP_HEADER)?;
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Some(SeenSegment {
        src: SocketAddrV4::new(addr(&ip[12..16]), port(&tcp[0..2])),
        dst: SocketAddrV4::new(addr(&ip[16..20]), port(&tcp[2..4])),
        seq: word(&tcp[4..8]),
        ack: word(&tcp[8..12]),
        flags: tcp[13],
    })
}

/// xorshift64*: fast, seedable, good enough to scatter forged sources (not cryptographic).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift never leaves 0).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// A generator seeded from the kernel's randomness.
    ///
    /// # Errors
    /// When `/dev/urandom` cannot be read.
    pub fn from_urandom() -> io::Result<Self> {
        let mut b = [0u8; 8];
        io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
        Ok(Rng::new(u64::from_le_bytes(b)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

/// A random host address of `net`/`prefix` (its network and broadcast addresses avoided when
/// the network has more than two addresses).
pub fn random_host(rng: &mut Rng, net: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let host_bits = 32 - u32::from(prefix.min(32));
    let base = u32::from(net) & u32::MAX.checked_shl(host_bits).unwrap_or(0);
    let size = 1u64 << host_bits;
    let host = if size > 2 {
        1 + rng.next_u64() % (size - 2)
    } else {
        rng.next_u64() % size
    };
    Ipv4Addr::from(base | host as u32)
}

/// The name of the `ip netns` namespace this process runs in (`/run/netns/NAME` is the same
/// namespace as `/proc/self/ns/net`), or `None` outside any named namespace, e.g. in the
/// root one.
///
/// # Errors
/// When `/proc/self/ns/net` cannot be read.
pub fn named_netns() -> io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self/ns/net")?;
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Ok(None);
    };
    Ok(dir.flatten().find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        (m.dev() == me.dev() && m.ino() == me.ino())
            .then(|| e.file_name().to_string_lossy().into_owned())
    }))
}

/// A raw IPv4 socket that sends datagrams whose headers we write (`IPPROTO_RAW` implies
/// `IP_HDRINCL`: the kernel keeps our source address).
pub struct RawSender {
    socket: Socket,
}

impl RawSender {
    /// Opens the socket.
    ///
    /// # Errors
    /// Outside a named network namespace (refused: forged packets stay in test namespaces),
    /// or when the socket cannot be opened (needs CAP_NET_RAW).
    pub fn open() -> io::Result<Self> {
        if named_netns()?.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "refusing to send forged packets outside a test namespace: run me with `ip netns exec`",
            ));
        }
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        socket.set_header_included_v4(true)?;
        Ok(RawSender { socket })
    }

    /// Sends one datagram built by [`Segment::to_bytes`] (routed by its destination).
    ///
    /// # Errors
    /// What `sendto` reports (e.g. `ENOBUFS` under load).
    pub fn send(&self, segment: &Segment) -> io::Result<()> {
        let to = SockAddr::from(SocketAddrV4::new(*segment.dst.ip(), 0));
        self.socket.send_to(&segment.to_bytes(), &to).map(|_| ())
    }
}

/// A raw socket that sees a copy of every TCP datagram this namespace receives.
pub struct TcpSniffer {
    socket: Socket,
}

impl TcpSniffer {
    /// Opens the socket.
    ///
    /// # Errors
    /// When it cannot be opened (needs CAP_NET_RAW).
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        Ok(TcpSniffer { socket })
    }

    /// Waits up to `timeout` for a segment `matches` accepts and returns it.
    ///
    /// # Errors
    /// `TimedOut` when none came in time, or a receive error.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&SeenSegment) -> bool,
    ) -> io::Result<SeenSegment> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no matching TCP segment seen",
                ));
            }
            self.socket.set_read_timeout(Some(left))?;
            // socket2's `Read` for `&Socket`: a plain byte buffer, no uninitialised memory.
            let n = match io::Read::read(&mut &self.socket, &mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let bytes = buf.get(..n).unwrap_or_default();
            if let Some(seen) = parse_tcp(bytes).filter(|s| matches(s)) {
                return Ok(seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Segment {
        Segment {
            src: "203.0.113.7:40001".parse().unwrap(),
            dst: "198.51.100.1:8001".parse().unwrap(),
            seq: 0xdead_beef,
            ack: 0,
            flags: flags::SYN,
            window: 64_240,
            ip_id: 7,
        }
    }

    #[test]
    fn a_built_syn_has_valid_checksums_and_parses_back() {
        let p = syn().to_bytes();
        assert_eq!(p.len(), 44);
        assert_eq!(fold(sum(0, &p[..20])), 0xffff, "IPv4 header checksum");
        let pseudo = pseudo_header_v4([203, 0, 113, 7], [198, 51, 100, 1], 6, 24);
        assert_eq!(fold(sum(pseudo, &p[20..])), 0xffff, "TCP checksum");
        let seen = parse_tcp(&p).unwrap();
        assert_eq!(seen.src, syn().src);
        assert_eq!(seen.dst, syn().dst);
        assert_eq!((seen.seq, seen.flags), (0xdead_beef, flags::SYN));
    }

    #[test]
    fn an_rst_has_no_options() {
        let rst = Segment {
            flags: flags::RST,
            ..syn()
        };
        assert_eq!(rst.to_bytes().len(), 40);
    }

    #[test]
    fn truncated_or_foreign_datagrams_do_not_parse() {
        let p = syn().to_bytes();
        for n in 0..40 {
            assert_eq!(parse_tcp(&p[..n]), None, "{n} bytes");
        }
        let mut udp = p.clone();
        udp[9] = 17;
        assert_eq!(parse_tcp(&udp), None);
        let mut bad_ihl = p;
        bad_ihl[0] = 0x44;
        assert_eq!(parse_tcp(&bad_ihl), None);
    }

    #[test]
    fn random_hosts_stay_in_their_network() {
        let mut rng = Rng::new(1);
        let net = Ipv4Addr::new(203, 0, 0, 0);
        for _ in 0..10_000 {
            let a = random_host(&mut rng, net, 16).octets();
            assert_eq!((a[0], a[1]), (203, 0));
            assert!(
                u16::from_be_bytes([a[2], a[3]]) != 0 && u16::from_be_bytes([a[2], a[3]]) != 0xffff
            );
        }
        assert_eq!(
            random_host(&mut rng, Ipv4Addr::new(10, 1, 2, 3), 32),
            Ipv4Addr::new(10, 1, 2, 3)
        );
    }
}
