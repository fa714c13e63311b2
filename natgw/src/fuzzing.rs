//! Entry points for the cargo-fuzz targets (and the corpus replay test).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use balance::{BackendConfig, PoolConfig, SchedulerKind};

use crate::{
    Direction, Forward, Gateway, GatewayConfig, L4Checksum, PacketMeta, Proto, ServiceConfig,
    StaticEntry, Verdict,
};

/// Feeds `data` (at time `now`) to a gateway with one static forward: the first byte picks
/// the direction and a clock step, the rest is the packet. Then feeds its next fragment, replays it the other way and
/// expires the table.
pub fn run_gateway(now: Instant, data: &[u8]) {
    let Some((&ctl, packet)) = data.split_first() else {
        return;
    };
    let public = Ipv4Addr::new(198, 51, 100, 1);
    let config = GatewayConfig {
        overload: Some(public),
        inside_networks: vec!["192.168.101.0/24".parse().expect("valid prefix")],
        statics: vec![StaticEntry {
            proto: Proto::Tcp,
            public: SocketAddrV4::new(public, 8001),
            inside: SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 101), 80),
        }],
        max_mappings: 16,
        local_addresses: vec![public],
        ..GatewayConfig::default()
    };
    let Ok(mut gw) = Gateway::new(now, config) else {
        return;
    };
    let mut buf = packet.to_vec();
    let dir = if ctl & 1 == 0 {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    let meta = PacketMeta {
        l4_checksum: if ctl & 0x80 == 0 {
            L4Checksum::Full
        } else {
            L4Checksum::Partial
        },
        segments: u32::from(ctl >> 4),
    };
    let _ = gw.handle_super_packet(now, dir, &mut buf, meta);
    // The same datagram's next fragment (offset 8 bytes): when the packet was a first
    // fragment, this one goes through the fragment table.
    if packet.len() >= 20 {
        let mut later = packet.to_vec();
        later[6] &= 0xe0;
        later[7] = 1;
        let _ = gw.handle_packet(now, dir, &mut later);
    }
    let _ = gw.direction(&buf);
    let other = if dir == Direction::Inbound {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    let _ = gw.handle_packet(now, other, &mut buf);
    gw.handle_timeout(now + Duration::from_secs(u64::from(ctl >> 1) * 60));
    let _ = gw.translations(now);
}

/// A virtual service on `listen` alternating (round robin) between two backends, forwarding
/// as `forward` says (a direct-routing backend listens on the VIP's port).
fn two_backends(name: &str, listen: SocketAddrV4, forward: Forward) -> ServiceConfig {
    let port = match forward {
        Forward::Nat => 8080,
        Forward::DirectRoute => listen.port(),
    };
    let backend = |last| {
        BackendConfig::new(
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, last), port),
            1,
        )
    };
    ServiceConfig {
        name: name.into(),
        listen,
        ports: None,
        pool: PoolConfig {
            scheduler: SchedulerKind::Rr,
            backends: vec![backend(120), backend(121)],
            ..PoolConfig::default()
        },
        health: None,
        forward,
        proto: Proto::Tcp,
        one_packet: false,
    }
}

/// Bytes per step of [`run_sequence`].
pub const SEQUENCE_STEP: usize = 10;

/// Stateful NAT fuzzing: a gateway with static forwards, a load-balanced listener and dynamic
/// PAT (a small table, so bounds and early drop are reached) is fed a sequence of packets from
/// both sides with time advancing, decoded from `data` in steps of [`SEQUENCE_STEP`] bytes:
///
/// - `[0]`: bits 0-1 the packet kind (TCP, UDP, ICMP echo, ICMP error), bit 2 the side (inside
///   or outside), bits 3-7 TCP flags (FIN, SYN, RST, PSH, ACK);
/// - `[1]`: bits 0-1 the inside host, bits 2-4 the outside host, bits 5-6 the public endpoint
///   (overload address, static TCP, static UDP, a service VIP: the NAT service's, or with bit 7
///   of `[2]` the direct-routing service's);
/// - `[2..4]`: a port; `[4..8]`: the TCP sequence number (the ACK number is derived);
/// - `[8]`: seconds to advance the clock first; `[9]`: bits 0-5 payload length (0..63), bit 7
///   the packet arrives as a second data path's report instead of crossing the core: a TCP
///   segment from the outside as an executed SYN of the static TCP forward
///   ([`Gateway::adopt_opened_syn`]), one from the inside as an executed SYN-ACK
///   ([`Gateway::follow_opened_syn_ack`]), whatever its flags, ports or payload (the core must
///   refuse what does not describe that), anything else crossing the core as usual.
///
/// After each step: the table is within its bound, created minus removed flows equals the
/// live ones, half-open flows are a subset, every packet the gateway forwards carries valid
/// checksums, and a packet it direct-routes is unchanged and goes to that service's VIP.
pub fn run_sequence(start: Instant, data: &[u8]) {
    let public = Ipv4Addr::new(198, 51, 100, 1);
    let vip = Ipv4Addr::new(198, 51, 100, 10);
    let dr_vip = Ipv4Addr::new(198, 51, 100, 11);
    let config = GatewayConfig {
        overload: Some(public),
        inside_networks: vec!["192.168.101.0/24".parse().expect("valid prefix")],
        local_addresses: vec![public],
        statics: vec![
            StaticEntry {
                proto: Proto::Tcp,
                public: SocketAddrV4::new(public, 8001),
                inside: SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 101), 80),
            },
            StaticEntry {
                proto: Proto::Udp,
                public: SocketAddrV4::new(public, 5353),
                inside: SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 101), 53),
            },
        ],
        max_mappings: 24,
        max_per_host: 12,
        max_half_open_per_listener: 6,
        max_half_open_per_source: 10,
        max_inbound_per_mapping: 4,
        services: vec![
            two_backends("fuzz", SocketAddrV4::new(vip, 80), Forward::Nat),
            two_backends(
                "fuzz-dr",
                SocketAddrV4::new(dr_vip, 80),
                Forward::DirectRoute,
            ),
        ],
        ..GatewayConfig::default()
    };
    let Ok(mut gw) = Gateway::new(start, config) else {
        return;
    };
    let mut now = start;
    for step in data.chunks_exact(SEQUENCE_STEP) {
        now += Duration::from_secs(u64::from(step[8]));
        gw.handle_timeout(now);
        let mut buf = sequence_packet(step, public, vip, dr_vip);
        let sent = buf.clone();
        let dir = gw.direction(&buf);
        if step[9] & 0x80 != 0 && report_as_executed(&mut gw, now, dir, &buf, public) {
            check_bounds(&gw);
            continue;
        }
        let verdict = gw.handle_packet(now, dir, &mut buf);
        if let Verdict::DirectRoute(route) = verdict {
            assert_eq!(
                buf, sent,
                "a direct-routed packet leaves the core unchanged"
            );
            assert_eq!(
                *route.vip.ip(),
                dr_vip,
                "direct routing for the DR service only"
            );
        }
        if verdict == Verdict::Forward {
            let ihl = usize::from(buf.first().map_or(5, |b| b & 0x0f)) * 4;
            assert_eq!(
                netutil::checksum::checksum(buf.get(..ihl).unwrap_or(&[])),
                0,
                "IP checksum of a forwarded packet"
            );
            assert!(
                crate::translate::l4_checksum_ok(&buf),
                "transport checksum of a forwarded packet"
            );
        }
        check_bounds(&gw);
    }
}

/// The table's invariants after a step of [`run_sequence`].
fn check_bounds(gw: &Gateway) {
    let t = gw.table();
    assert!(t.len() <= t.capacity(), "table over its bound");
    assert!(t.half_open() <= t.len(), "half-open flows not in the table");
    let s = gw.stats();
    assert_eq!(
        s.flows_created - s.flows_removed,
        t.len() as u64,
        "created - removed != live"
    );
}

/// Hands a TCP `packet` to the core as a second data path reports what it executed (see
/// [`run_sequence`]); false for a packet that is not TCP with a whole header.
fn report_as_executed(
    gw: &mut Gateway,
    now: Instant,
    dir: Direction,
    packet: &[u8],
    public: Ipv4Addr,
) -> bool {
    let Some(ip) = packet.get(..20) else {
        return false;
    };
    if ip[9] != 6 {
        return false;
    }
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let Some(tcp) = packet.get(20..) else {
        return false;
    };
    let Some(ports) = tcp.get(..4) else {
        return false;
    };
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let forward_public = SocketAddrV4::new(public, 8001);
    let forward_inside = SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 101), 80);
    match dir {
        Direction::Inbound => {
            let report = crate::OpenedSyn {
                client: SocketAddrV4::new(addr(12), sport),
                public: SocketAddrV4::new(addr(16), dport),
                inside: forward_inside,
                tcp_header: tcp,
            };
            let adopted = gw.adopt_opened_syn(now, &report);
            assert!(
                !adopted || report.public == forward_public,
                "adopted a SYN to another endpoint than the forward's"
            );
        }
        Direction::Outbound => {
            let report = crate::OpenedSyn {
                client: SocketAddrV4::new(addr(16), dport),
                public: forward_public,
                inside: SocketAddrV4::new(addr(12), sport),
                tcp_header: tcp,
            };
            gw.follow_opened_syn_ack(now, &report);
        }
    }
    true
}

/// The packet of one [`run_sequence`] step, with valid checksums.
fn sequence_packet(step: &[u8], public: Ipv4Addr, vip: Ipv4Addr, dr_vip: Ipv4Addr) -> Vec<u8> {
    let byte = |i: usize| step.get(i).copied().unwrap_or(0);
    let inside = Ipv4Addr::new(192, 168, 101, [10, 11, 101, 120][usize::from(byte(1) & 3)]);
    let outside = Ipv4Addr::new(203, 0, 113 + ((byte(1) >> 2) & 1), (byte(1) >> 3) & 3);
    let (pub_ip, pub_port) = match (byte(1) >> 5) & 3 {
        0 => (public, u16::from_be_bytes([byte(2), byte(3)])),
        1 => (public, 8001),
        2 => (public, 5353),
        _ if byte(2) & 0x80 != 0 => (dr_vip, 80),
        _ => (vip, 80),
    };
    let port = u16::from_be_bytes([byte(2), byte(3)]) | 1024;
    let outbound = byte(0) & 4 == 0;
    let (src, sport, dst, dport) = if outbound {
        (inside, port, outside, 80)
    } else {
        (outside, port, pub_ip, pub_port)
    };
    let seq = u32::from_be_bytes([byte(4), byte(5), byte(6), byte(7)]);
    let payload = vec![0x5a; usize::from(byte(9) & 63)];
    let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    let mut v = Vec::new();
    let flags = byte(0) >> 3;
    let built = match byte(0) & 3 {
        0 => {
            let mut t = b.tcp(sport, dport, seq, 64240);
            if flags & 1 != 0 {
                t = t.fin();
            }
            if flags & 2 != 0 {
                t = t.syn();
            }
            if flags & 4 != 0 {
                t = t.rst();
            }
            if flags & 8 != 0 {
                t = t.psh();
            }
            if flags & 16 != 0 {
                t = t.ack(seq.rotate_left(16));
            }
            t.write(&mut v, &payload)
        }
        1 => b.udp(sport, dport).write(&mut v, &payload),
        2 => b.icmpv4_echo_request(sport, dport).write(&mut v, &payload),
        _ => {
            // An error quoting a UDP packet between the same two hosts, the other way.
            let mut quoted = Vec::new();
            let q = etherparse::PacketBuilder::ipv4(dst.octets(), src.octets(), 64)
                .udp(dport, sport)
                .write(&mut quoted, &[]);
            if q.is_err() {
                return Vec::new();
            }
            b.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut v, &quoted)
        }
    };
    if built.is_err() {
        return Vec::new();
    }
    v
}

/// Feeds `data` to the HAProxy agent-check reader as an agent's bytes (the first byte says
/// whether the agent closed after them): the line it finds, then the reply parsed from it.
/// A reply that parses must say the same thing once written back out (`show lb` prints it),
/// and must give a weight for any configured weight without overflow.
pub fn run_agent_line(data: &[u8]) {
    use crate::health::{AgentReply, agent::agent_line};
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let Ok(Some(line)) = agent_line(bytes, ctl & 1 == 1) else {
        return;
    };
    let Ok(reply) = AgentReply::parse(line) else {
        return;
    };
    let text = reply.to_string();
    if text != "no change" {
        assert_eq!(
            AgentReply::parse(text.as_bytes()),
            Ok(reply),
            "{text:?} reads back"
        );
    }
    for configured in [0, 1, 100, 256, u32::MAX] {
        let _ = reply.weight(configured);
    }
}
