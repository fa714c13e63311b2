//! Differential test: the same packets through natgw's core (`Gateway::handle_packet`) and
//! through the loaded program (`BPF_PROG_TEST_RUN`, with the map entries the core's
//! `Translation` yields) leave with identical bytes, up to the one TTL the kernel path
//! takes as the router it is (the core runs with `compensate_ttl = false`, so its output is
//! the packet before the forwarding hop). Checksums are verified independently with
//! etherparse. Packets the program must leave to the slow path pass untouched. Root only.
// Gateway::new and handle_packet take `now`; the test picks it.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use common::in_sandbox;
use etherparse::{Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice};
use kpath::{
    Direction, HANDSHAKE_RING_RECORDS, KernelPath, KernelPublished, LoadOptions,
    OPENED_RING_RECORDS, OpenedFlow, OpenedHandshake, OpenedKind, Proto, TestRun, entries,
};
use natgw::{Gateway, GatewayConfig, ServiceConfig, StaticEntry, Verdict};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const H1: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 10);
const WEB: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 101);
const SRV: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const SRV2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// A virtual service's VIP and its one backend.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(WEB, 8080);
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn config() -> GatewayConfig {
    GatewayConfig {
        overload: Some(PUBLIC),
        inside_networks: vec!["192.168.101.0/24".parse().unwrap()],
        statics: vec![StaticEntry {
            proto: natgw::Proto::Tcp,
            public: SocketAddrV4::new(PUBLIC, 8001),
            inside: SocketAddrV4::new(WEB, 80),
        }],
        services: vec![ServiceConfig {
            name: "web".into(),
            listen: VIP,
            ports: None,
            pool: balance::PoolConfig {
                backends: vec![balance::BackendConfig::new(BACKEND, 1)],
                ..balance::PoolConfig::default()
            },
            health: None,
            forward: natgw::Forward::Nat,
            proto: natgw::Proto::Tcp,
            one_packet: false,
        }],
        compensate_ttl: false,
        ..GatewayConfig::default()
    }
}

#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
}

struct Seg {
    seq: u32,
    ack: u32,
    window: u16,
    flags: Flags,
}

fn seg(flags: Flags) -> Seg {
    Seg {
        seq: 1000,
        ack: 1,
        window: 64240,
        flags,
    }
}

fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, s: &Seg, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), s.seq, s.window);
    let b = match s.flags {
        Flags::Syn => b.syn(),
        Flags::SynAck => b.syn().ack(s.ack),
        Flags::Ack => b.ack(s.ack),
        Flags::Fin => b.fin().ack(s.ack),
        Flags::Rst => b.rst(),
    };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut v, payload)
        .unwrap();
    v
}

/// The IPv4 header checksum and the transport checksum of `ip` are right (computed afresh).
fn assert_checksums(ip: &[u8]) {
    let p = SlicedPacket::from_ip(ip).unwrap();
    let net = p.net.unwrap();
    let etherparse::NetSlice::Ipv4(v4) = net else {
        panic!("not IPv4")
    };
    let header = v4.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = v4.payload().payload;
    match p.transport.unwrap() {
        TransportSlice::Tcp(t) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&header, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
        }
        TransportSlice::Udp(u) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&header, u.payload())
                    .unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
        }
        _ => panic!("not TCP/UDP: {payload:?}"),
    }
}

/// `ip` after one forwarding hop: TTL - 1, header checksum recomputed.
fn forwarded(ip: &[u8]) -> Vec<u8> {
    let (mut header, rest) = Ipv4Header::from_slice(ip).unwrap();
    header.time_to_live -= 1;
    header.header_checksum = header.calc_header_checksum();
    let mut out = header.to_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

struct Harness {
    gw: Gateway,
    now: Instant,
    kp: KernelPath,
    ifindex: u32,
}

impl Harness {
    fn new(ifindex: u32) -> Self {
        Harness::with(ifindex, config())
    }

    fn with(ifindex: u32, config: GatewayConfig) -> Self {
        let now = Instant::now();
        Harness {
            gw: Gateway::new(now, config).unwrap(),
            now,
            kp: KernelPath::load(&LoadOptions::new("differential")).unwrap(),
            ifindex,
        }
    }

    /// The core's output for `frame`'s IP packet (which must be forwarded).
    fn core(&mut self, direction: Direction, frame: &[u8]) -> Vec<u8> {
        let dir = match direction {
            Direction::Outbound => natgw::Direction::Outbound,
            Direction::Inbound => natgw::Direction::Inbound,
        };
        let mut ip = frame[14..].to_vec();
        assert_eq!(
            self.gw.handle_packet(self.now, dir, &mut ip),
            Verdict::Forward
        );
        ip
    }

    fn program(&self, direction: Direction, frame: &[u8]) -> TestRun {
        self.kp.test_run(direction, frame, self.ifindex).unwrap()
    }

    /// Installs both directions of every established flow, as the driver does.
    fn install(&mut self) {
        for t in self.gw.translations(self.now) {
            let proto = match t.proto {
                natgw::Proto::Tcp if t.established => Proto::Tcp,
                natgw::Proto::Udp => Proto::Udp,
                _ => continue,
            };
            let mut e = entries(proto, t.inside, t.public, t.outside);
            if !self.gw.fast_path_carries_fin(&t) {
                e = kpath::fins_to_core(e);
            }
            for (key, rewrite) in e {
                self.kp.insert(&key, &rewrite).unwrap();
            }
        }
    }

    /// Both data paths agree on `frame`: the program rewrites and redirects it to exactly
    /// the core's bytes after one forwarding hop, checksums right.
    fn same(&mut self, direction: Direction, frame: &[u8]) -> Vec<u8> {
        let from_core = forwarded(&self.core(direction, frame));
        let run = self.program(direction, frame);
        assert_eq!(run.action, TestRun::REDIRECT, "fast path taken");
        assert_eq!(
            run.frame[..14],
            frame[..14],
            "MACs are left to redirect_neigh"
        );
        assert_eq!(run.frame[14..], from_core[..], "same bytes as the core");
        assert_checksums(&run.frame[14..]);
        assert_ne!(run.frame[14..], frame[14..], "translated");
        run.frame
    }

    /// The program leaves `frame` to the slow path, untouched.
    fn passes(&self, direction: Direction, frame: &[u8]) {
        let run = self.program(direction, frame);
        assert_eq!(run.action, TestRun::PASS, "slow path");
        assert_eq!(run.frame, frame, "untouched");
    }
}

/// The public endpoint the core chose for an outbound packet.
fn public_source(ip: &[u8]) -> SocketAddrV4 {
    let p = SlicedPacket::from_ip(ip).unwrap();
    let Some(etherparse::NetSlice::Ipv4(v4)) = p.net else {
        panic!()
    };
    let port = match p.transport.unwrap() {
        TransportSlice::Tcp(t) => t.source_port(),
        TransportSlice::Udp(u) => u.source_port(),
        _ => panic!(),
    };
    SocketAddrV4::new(v4.header().source_addr(), port)
}

#[test]
fn dynamic_pat_tcp_both_directions() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let inside = SocketAddrV4::new(H1, 40000);
        let outside = SocketAddrV4::new(SRV, 443);
        // The handshake goes through the core (the program has no entry, and SYNs are never
        // fast-pathed anyway).
        let syn = tcp_frame(inside, outside, &seg(Flags::Syn), b"");
        h.passes(Direction::Outbound, &syn);
        let public = public_source(&h.core(Direction::Outbound, &syn));
        let synack = tcp_frame(outside, public, &seg(Flags::SynAck), b"");
        h.core(Direction::Inbound, &synack);
        let ack = tcp_frame(inside, outside, &seg(Flags::Ack), b"");
        h.passes(Direction::Outbound, &ack);
        h.core(Direction::Outbound, &ack);
        h.install();

        for (i, len) in [0usize, 1, 100, 1400].into_iter().enumerate() {
            let payload = vec![u8::try_from(i).unwrap() ^ 0x5a; len];
            let s = Seg {
                seq: 1001 + u32::try_from(i * 2000).unwrap(),
                ack: 5001,
                window: 501,
                flags: Flags::Ack,
            };
            h.same(
                Direction::Outbound,
                &tcp_frame(inside, outside, &s, &payload),
            );
            let reply = Seg {
                seq: 5001,
                ack: 1001 + u32::try_from(i * 2000 + len).unwrap(),
                window: 502,
                flags: Flags::Ack,
            };
            h.same(
                Direction::Inbound,
                &tcp_frame(outside, public, &reply, &payload),
            );
        }

        // What the program reports back: counters and the sequence space each side covered.
        let [(out_key, _), (in_key, _)] = entries(Proto::Tcp, inside, public, outside);
        let out = h.kp.report(&out_key).unwrap().unwrap();
        assert_eq!(out.packets, 4);
        assert_eq!(out.bytes, 4 * 40 + 1 + 100 + 1400);
        assert!(out.last_seen > std::time::Duration::ZERO);
        let tcp = out.tcp.unwrap();
        assert_eq!(tcp.seq_end, 1001 + 3 * 2000 + 1400);
        assert_eq!((tcp.ack, tcp.window), (5001, 501));
        let inb = h.kp.report(&in_key).unwrap().unwrap().tcp.unwrap();
        assert_eq!((inb.ack, inb.window), (1001 + 3 * 2000 + 1400, 502));

        // Openings and resets stay with the core (a FIN is carried: see the next test).
        for flags in [Flags::Rst, Flags::Syn] {
            h.passes(
                Direction::Outbound,
                &tcp_frame(inside, outside, &seg(flags), b""),
            );
            h.passes(
                Direction::Inbound,
                &tcp_frame(outside, public, &seg(flags), b""),
            );
        }
        let c = h.kp.counters().unwrap();
        assert_eq!(c.fast_packets, 8);
        assert_eq!(c.slow_tcp_flags, 1 + 4, "the first SYN and the four above");
        h.kp.unload().unwrap();
    });
}

#[test]
fn static_forward_tcp_both_directions() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let client = SocketAddrV4::new(SRV2, 51000);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let web = SocketAddrV4::new(WEB, 80);
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Syn), b""),
        );
        h.core(
            Direction::Outbound,
            &tcp_frame(web, client, &seg(Flags::SynAck), b""),
        );
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), b""),
        );
        h.install();
        let get = b"GET / HTTP/1.0\r\n\r\n";
        let out = h.same(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), get),
        );
        assert_eq!(
            &out[30..34],
            &WEB.octets(),
            "delivered to the inside server"
        );
        let body = vec![0xa5u8; 1200];
        let back = h.same(
            Direction::Outbound,
            &tcp_frame(web, client, &seg(Flags::Ack), &body),
        );
        assert_eq!(
            &back[26..30],
            &PUBLIC.octets(),
            "leaves from the public address"
        );
        h.kp.unload().unwrap();
    });
}

/// The driver's packet loop installs a flow the moment the core makes it established
/// (`Gateway::take_fast_path_ready`, drained after the batch), before any sync round: the
/// request that follows the final ACK already takes the fast path, byte for byte as the core
/// would have translated it, and so does the response.
#[test]
fn a_flow_handed_over_at_establishment_takes_the_fast_path_at_once() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        h.gw.set_fast_path_feed(true);
        let client = SocketAddrV4::new(SRV2, 51001);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let web = SocketAddrV4::new(WEB, 80);
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Syn), b""),
        );
        h.core(
            Direction::Outbound,
            &tcp_frame(web, client, &seg(Flags::SynAck), b""),
        );
        assert!(h.gw.take_fast_path_ready().is_empty(), "not before the ACK");
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), b""),
        );
        let ready = h.gw.take_fast_path_ready();
        assert_eq!(ready.len(), 1);
        let f = ready[0];
        assert_eq!((f.inside, f.public, f.outside), (web, public, client));
        assert!(
            f.carries_fin,
            "a static forward's close may take the fast path"
        );
        for (key, rewrite) in entries(Proto::Tcp, f.inside, f.public, f.outside) {
            h.kp.insert(&key, &rewrite).unwrap();
        }
        let out = h.same(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), b"GET / HTTP/1.0\r\n\r\n"),
        );
        assert_eq!(
            &out[30..34],
            &WEB.octets(),
            "delivered to the inside server"
        );
        h.same(
            Direction::Outbound,
            &tcp_frame(web, client, &seg(Flags::Ack), &[0x42; 900]),
        );
        assert_eq!(h.kp.counters().unwrap().fast_packets, 2);
        h.kp.unload().unwrap();
    });
}

/// A short connection's close takes the fast path: each FIN is rewritten byte for byte as
/// the core rewrites it, and reported with the sequence number after it (`fin_end`) for the
/// core to judge, as is the last ACK.
#[test]
fn fins_take_the_fast_path_and_are_reported() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let client = SocketAddrV4::new(SRV2, 51002);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let web = SocketAddrV4::new(WEB, 80);
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Syn), b""),
        );
        h.core(
            Direction::Outbound,
            &tcp_frame(web, client, &seg(Flags::SynAck), b""),
        );
        h.core(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), b""),
        );
        h.install();
        // The server answers and closes (its FIN rides on the response), the client closes.
        let response = Seg {
            seq: 7001,
            ack: 1019,
            window: 510,
            flags: Flags::Fin,
        };
        h.same(
            Direction::Outbound,
            &tcp_frame(web, client, &response, &[0x61; 300]),
        );
        let client_fin = Seg {
            seq: 1019,
            ack: 7001 + 300 + 1,
            window: 511,
            flags: Flags::Fin,
        };
        h.same(
            Direction::Inbound,
            &tcp_frame(client, public, &client_fin, b""),
        );
        let last_ack = Seg {
            seq: 7001 + 300 + 1,
            ack: 1020,
            window: 510,
            flags: Flags::Ack,
        };
        h.same(Direction::Outbound, &tcp_frame(web, client, &last_ack, b""));
        let [(out_key, _), (in_key, _)] = entries(Proto::Tcp, web, public, client);
        let out = h.kp.report(&out_key).unwrap().unwrap().tcp.unwrap();
        assert_eq!(out.fin_end, Some(7001 + 300 + 1), "the server's FIN");
        assert_eq!((out.seq_end, out.ack), (7001 + 300 + 1, 1020));
        let inb = h.kp.report(&in_key).unwrap().unwrap().tcp.unwrap();
        assert_eq!(inb.fin_end, Some(1020), "the client's FIN");
        assert_eq!(inb.ack, 7001 + 300 + 1);
        let c = h.kp.counters().unwrap();
        assert_eq!((c.fast_packets, c.slow_tcp_flags), (3, 0));
        h.kp.unload().unwrap();
    });
}

/// A virtual service's connection: the core schedules it on the SYN; once established the
/// program delivers the client's segments to the backend and the backend's to the client
/// from the VIP, byte for byte as the core does.
#[test]
fn virtual_service_tcp_both_directions() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let client = SocketAddrV4::new(SRV2, 52000);
        h.passes(
            Direction::Inbound,
            &tcp_frame(client, VIP, &seg(Flags::Syn), b""),
        );
        h.core(
            Direction::Inbound,
            &tcp_frame(client, VIP, &seg(Flags::Syn), b""),
        );
        h.core(
            Direction::Outbound,
            &tcp_frame(BACKEND, client, &seg(Flags::SynAck), b""),
        );
        h.core(
            Direction::Inbound,
            &tcp_frame(client, VIP, &seg(Flags::Ack), b""),
        );
        h.install();
        let out = h.same(
            Direction::Inbound,
            &tcp_frame(client, VIP, &seg(Flags::Ack), b"GET / HTTP/1.0\r\n\r\n"),
        );
        assert_eq!(&out[30..34], &WEB.octets(), "delivered to the backend");
        assert_eq!(&out[36..38], &8080u16.to_be_bytes(), "at its port");
        let back = h.same(
            Direction::Outbound,
            &tcp_frame(BACKEND, client, &seg(Flags::Ack), &[0x3c; 1300]),
        );
        assert_eq!(&back[26..30], &VIP.ip().octets(), "answered from the VIP");
        assert_eq!(&back[34..36], &80u16.to_be_bytes(), "and its port");
        // A service's close goes to the core, whose schedulers count it at once.
        h.passes(
            Direction::Inbound,
            &tcp_frame(client, VIP, &seg(Flags::Fin), b""),
        );
        h.passes(
            Direction::Outbound,
            &tcp_frame(BACKEND, client, &seg(Flags::Fin), b""),
        );
        assert_eq!(
            h.kp.counters().unwrap().slow_tcp_flags,
            1 + 2,
            "the first SYN and the two FINs"
        );
        h.kp.unload().unwrap();
    });
}

#[test]
fn dynamic_pat_udp_with_and_without_checksum() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let inside = SocketAddrV4::new(H1, 5300);
        let outside = SocketAddrV4::new(SRV, 53);
        let query = udp_frame(inside, outside, b"query");
        h.passes(Direction::Outbound, &query);
        let public = public_source(&h.core(Direction::Outbound, &query));
        h.core(Direction::Inbound, &udp_frame(outside, public, b"answer"));
        h.install();
        h.same(
            Direction::Outbound,
            &udp_frame(inside, outside, b"second query"),
        );
        h.same(
            Direction::Inbound,
            &udp_frame(outside, public, b"second answer"),
        );
        // A zero UDP checksum means "none" and stays zero on both paths.
        let mut unsummed = udp_frame(inside, outside, b"no checksum");
        unsummed[14 + 20 + 6..14 + 20 + 8].fill(0);
        let out = h.same(Direction::Outbound, &unsummed);
        assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
        h.kp.unload().unwrap();
    });
}

#[test]
fn unusual_packets_take_the_slow_path_untouched() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let inside = SocketAddrV4::new(H1, 5301);
        let outside = SocketAddrV4::new(SRV, 53);
        let query = udp_frame(inside, outside, b"query");
        h.core(Direction::Outbound, &query);
        h.install();
        let ip_fix = |f: &mut Vec<u8>| {
            let (mut hdr, _) = Ipv4Header::from_slice(&f[14..]).unwrap();
            hdr.header_checksum = hdr.calc_header_checksum();
            f[14..34].copy_from_slice(&hdr.to_bytes()[..20]);
        };
        // A first fragment (MF set) and a later one (offset set).
        let mut first = udp_frame(inside, outside, b"fragment");
        first[14 + 6] |= 0x20;
        ip_fix(&mut first);
        h.passes(Direction::Outbound, &first);
        let mut later = udp_frame(inside, outside, b"fragment");
        later[14 + 7] = 0x10;
        h.passes(Direction::Outbound, &later);
        // IP options (four NOPs).
        let mut opts = udp_frame(inside, outside, b"options");
        opts.splice(34..34, [1u8, 1, 1, 1]);
        opts[14] = 0x46;
        let tot = u16::from_be_bytes([opts[16], opts[17]]) + 4;
        opts[16..18].copy_from_slice(&tot.to_be_bytes());
        h.passes(Direction::Outbound, &opts);
        // TTL about to expire: the slow path sends the ICMP error.
        let mut dying = udp_frame(inside, outside, b"ttl");
        dying[14 + 8] = 1;
        h.passes(Direction::Outbound, &dying);
        // ICMP (echo) and a flow without entry.
        let mut ping = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(H1.octets(), SRV.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"ping")
            .unwrap();
        h.passes(Direction::Outbound, &ping);
        h.passes(
            Direction::Outbound,
            &udp_frame(SocketAddrV4::new(H1, 5302), outside, b"new flow"),
        );
        // The entry is per direction: the outbound tuple arriving on the outside is no hit.
        h.passes(Direction::Inbound, &query);
        let c = h.kp.counters().unwrap();
        assert_eq!(c.fast_packets, 0);
        assert_eq!(c.slow_ttl, 1);
        assert_eq!(c.slow_no_entry, 2);
        assert_eq!(c.slow_unparsed, 4);
        h.kp.unload().unwrap();
    });
}

#[test]
fn removed_entries_fall_back_to_the_slow_path() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let inside = SocketAddrV4::new(H1, 5303);
        let outside = SocketAddrV4::new(SRV, 53);
        let query = udp_frame(inside, outside, b"query");
        let public = public_source(&h.core(Direction::Outbound, &query));
        h.install();
        h.same(Direction::Outbound, &query);
        for (key, _) in entries(Proto::Udp, inside, public, outside) {
            assert!(h.kp.remove(&key).unwrap());
            assert!(!h.kp.remove(&key).unwrap());
        }
        h.passes(Direction::Outbound, &query);
        assert!(h.kp.keys().unwrap().is_empty());
        h.kp.unload().unwrap();
    });
}

/// Direct routing: the core schedules the client's SYN and leaves it unchanged; with the entry
/// installed, the client's later segments arriving on the outside take the fast path with no
/// rewrite at all (only the router's TTL), redirected to the real server as next hop. The
/// core's own packets (SYN, FIN, RST) stay on the slow path, and a server that is not on a
/// directly connected network is never fast-pathed.
#[test]
fn direct_routing_delivers_unchanged_to_a_server_on_the_segment() {
    in_sandbox(|ifindex| {
        let now = Instant::now();
        let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 12), 80);
        // On kp0's network (10.200.0.0/24): directly connected.
        let server = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 5), 80);
        let mut gw = Gateway::new(
            now,
            GatewayConfig {
                services: vec![ServiceConfig {
                    name: "dr".into(),
                    listen: vip,
                    ports: None,
                    pool: balance::PoolConfig {
                        backends: vec![balance::BackendConfig::new(server, 1)],
                        ..balance::PoolConfig::default()
                    },
                    health: None,
                    forward: natgw::Forward::DirectRoute,
                    proto: natgw::Proto::Tcp,
                    one_packet: false,
                }],
                compensate_ttl: false,
                ..GatewayConfig::default()
            },
        )
        .unwrap();
        let mut kp = KernelPath::load(&LoadOptions::new("differential-dr")).unwrap();
        let client = SocketAddrV4::new(SRV2, 53000);
        let syn = tcp_frame(client, vip, &seg(Flags::Syn), b"");
        let mut ip = syn[14..].to_vec();
        let Verdict::DirectRoute(route) = gw.handle_packet(now, natgw::Direction::Inbound, &mut ip)
        else {
            panic!("not direct-routed");
        };
        assert_eq!(ip, syn[14..], "the core leaves the packet alone");
        assert_eq!(
            (route.client, route.vip, route.backend),
            (client, vip, server)
        );
        let (key, rewrite) = kpath::direct_route_entry(Proto::Tcp, client, vip, *server.ip());
        kp.insert(&key, &rewrite).unwrap();

        let data = tcp_frame(client, vip, &seg(Flags::Ack), &[0x77; 700]);
        let run = kp.test_run(Direction::Inbound, &data, ifindex).unwrap();
        assert_eq!(run.action, TestRun::REDIRECT, "fast path taken");
        assert_eq!(
            run.frame[..14],
            data[..14],
            "MACs are left to redirect_neigh"
        );
        assert_eq!(
            run.frame[14..],
            forwarded(&data[14..])[..],
            "only the TTL changed"
        );
        assert_checksums(&run.frame[14..]);
        let report = kp.report(&key).unwrap().unwrap();
        assert_eq!((report.packets, report.bytes), (1, 40 + 700));

        for flags in [Flags::Syn, Flags::Fin, Flags::Rst] {
            let frame = tcp_frame(client, vip, &seg(flags), b"");
            let run = kp.test_run(Direction::Inbound, &frame, ifindex).unwrap();
            assert_eq!((run.action, run.frame), (TestRun::PASS, frame), "slow path");
        }
        // The same client and VIP seen on an inside interface: not this entry.
        let run = kp.test_run(Direction::Outbound, &data, ifindex).unwrap();
        assert_eq!(run.action, TestRun::PASS);

        // A server behind a gateway (kp0's default route): never delivered by MAC.
        let far = SocketAddrV4::new(SRV2, 53001);
        let (key, rewrite) = kpath::direct_route_entry(Proto::Tcp, far, vip, WEB);
        kp.insert(&key, &rewrite).unwrap();
        let frame = tcp_frame(far, vip, &seg(Flags::Ack), b"x");
        let run = kp.test_run(Direction::Inbound, &frame, ifindex).unwrap();
        assert_eq!((run.action, run.frame), (TestRun::PASS, frame));
        let c = kp.counters().unwrap();
        assert_eq!((c.fast_packets, c.slow_fib, c.slow_tcp_flags), (1, 1, 3));
        kp.unload().unwrap();
    });
}

/// A one-packet UDP service (ipvsadm `-o`) on `DNS_VIP` over `DNS_BACKENDS` with `scheduler`
/// and `weights`.
fn one_packet_config(scheduler: balance::SchedulerKind, weights: &[u32]) -> GatewayConfig {
    GatewayConfig {
        services: vec![ServiceConfig {
            name: "dns".into(),
            listen: DNS_VIP,
            ports: None,
            pool: balance::PoolConfig {
                scheduler,
                backends: DNS_BACKENDS
                    .iter()
                    .zip(weights)
                    .map(|(&b, &w)| balance::BackendConfig::new(b, w))
                    .collect(),
                ..balance::PoolConfig::default()
            },
            health: None,
            forward: natgw::Forward::Nat,
            proto: natgw::Proto::Udp,
            one_packet: true,
        }],
        ..config()
    }
}

const DNS_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 53);
const DNS_BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 101), 53),
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 102), 53),
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 101, 103), 5353),
];

/// The destination endpoint of a rewritten frame.
fn frame_destination(frame: &[u8]) -> SocketAddrV4 {
    let ip: [u8; 4] = frame[30..34].try_into().unwrap();
    SocketAddrV4::new(ip.into(), u16::from_be_bytes([frame[36], frame[37]]))
}

/// Pins the calling thread to one CPU: the program's one-packet cursor is per CPU, and a
/// test comparing sequences must stay on one.
fn pin_to_one_cpu() {
    let mut set = nix::sched::CpuSet::new();
    let cpu = (0..nix::sched::CpuSet::count())
        .find(|&c| {
            nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
                .is_ok_and(|s| s.is_set(c).unwrap_or(false))
        })
        .unwrap();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

impl Harness {
    /// Installs the core's one-packet schedules and backend endpoints, as the driver does.
    fn install_one_packet(&mut self) -> usize {
        let schedules = self
            .gw
            .one_packet_schedules(self.now, kpath::MAX_ONE_PACKET_SLOTS);
        for (cursor, s) in (0u32..).zip(&schedules) {
            self.kp
                .set_one_packet_schedule(s.vip, cursor, &s.slots)
                .unwrap();
            for &b in &s.backends {
                self.kp.set_one_packet_backend(b, s.vip).unwrap();
            }
        }
        schedules.len()
    }
}

/// Datagrams of one client socket to a one-packet service and the backends' answers: the
/// program, walking the schedule the core installed, sends each datagram to the backend the
/// core's own scheduler picks for it, with the core's bytes, and the answers leave from the
/// VIP as from the core; the per-backend counts the core will add are exact.
fn one_packet_same_backends_as_the_core(
    scheduler: balance::SchedulerKind,
    weights: &[u32],
    datagrams: usize,
) -> Vec<SocketAddrV4> {
    let config = one_packet_config(scheduler, weights);
    in_sandbox(move |ifindex| {
        pin_to_one_cpu();
        let mut h = Harness::with(ifindex, config);
        let client = SocketAddrV4::new(SRV2, 40000);
        // A datagram to the core first: its rotation no longer starts at the first backend.
        h.core(Direction::Inbound, &udp_frame(client, DNS_VIP, b"first"));
        assert_eq!(h.install_one_packet(), 1);
        let mut sequence = Vec::new();
        for i in 0..datagrams {
            let query = udp_frame(client, DNS_VIP, format!("query {i}").as_bytes());
            let out = h.same(Direction::Inbound, &query);
            let backend = frame_destination(&out);
            sequence.push(backend);
            let back = h.same(
                Direction::Outbound,
                &udp_frame(backend, client, format!("answer {i}").as_bytes()),
            );
            assert_eq!(
                &back[26..30],
                &DNS_VIP.ip().octets(),
                "answered from the VIP"
            );
            assert_eq!(&back[34..36], &53u16.to_be_bytes(), "and its port");
        }
        let c = h.kp.counters().unwrap();
        assert_eq!(
            (c.one_packet_in, c.one_packet_out),
            (datagrams as u64, datagrams as u64)
        );
        for b in DNS_BACKENDS {
            let n = sequence.iter().filter(|&&s| s == b).count() as u64;
            let counts = h.kp.one_packet_counts(b).unwrap().unwrap();
            assert_eq!((counts.in_packets, counts.out_packets), (n, n), "{b}");
        }
        h.kp.unload().unwrap();
        sequence
    })
}

#[test]
fn one_packet_rr_gives_the_cores_backend_sequence() {
    let seq = one_packet_same_backends_as_the_core(balance::SchedulerKind::Rr, &[1, 1, 1], 9);
    // The core sent "first" to the first backend; the program goes on from the second.
    let want: Vec<_> = (1..=9).map(|i| DNS_BACKENDS[i % 3]).collect();
    assert_eq!(seq, want);
}

#[test]
fn one_packet_wrr_gives_the_cores_smooth_weighted_sequence() {
    // Weights 6:4:2 have the cycle of 3:2:1 (six picks), each backend its share in every one.
    let seq = one_packet_same_backends_as_the_core(balance::SchedulerKind::Wrr, &[6, 4, 2], 12);
    for cycle in seq.chunks(6) {
        let share: Vec<usize> = DNS_BACKENDS
            .iter()
            .map(|b| cycle.iter().filter(|&s| s == b).count())
            .collect();
        assert_eq!(share, [3, 2, 1], "{seq:?}");
    }
}

#[test]
fn one_packet_services_the_core_cannot_state_as_a_cycle_stay_on_the_slow_path() {
    in_sandbox(|ifindex| {
        // Source hashing decides by the client: no schedule, every datagram to the core.
        let mut h = Harness::with(
            ifindex,
            one_packet_config(balance::SchedulerKind::Sh, &[1, 1, 1]),
        );
        assert_eq!(h.install_one_packet(), 0);
        let client = SocketAddrV4::new(SRV2, 40001);
        h.passes(Direction::Inbound, &udp_frame(client, DNS_VIP, b"query"));
        h.passes(
            Direction::Outbound,
            &udp_frame(DNS_BACKENDS[0], client, b"answer"),
        );
        h.kp.unload().unwrap();

        // With a schedule, what the program does not handle still takes the slow path.
        let mut h = Harness::with(
            ifindex,
            one_packet_config(balance::SchedulerKind::Rr, &[1, 1, 1]),
        );
        assert_eq!(h.install_one_packet(), 1);
        let mut fragment = udp_frame(client, DNS_VIP, b"fragment");
        fragment[14 + 7] = 0x10;
        h.passes(Direction::Inbound, &fragment);
        let mut dying = udp_frame(client, DNS_VIP, b"ttl");
        dying[14 + 8] = 1;
        h.passes(Direction::Inbound, &dying);
        // Another port of the VIP, and a backend's datagram from another port.
        h.passes(
            Direction::Inbound,
            &udp_frame(client, SocketAddrV4::new(*DNS_VIP.ip(), 54), b"other"),
        );
        h.passes(
            Direction::Outbound,
            &udp_frame(
                SocketAddrV4::new(*DNS_BACKENDS[0].ip(), 9),
                client,
                b"other",
            ),
        );
        let c = h.kp.counters().unwrap();
        assert_eq!(
            (c.one_packet_in, c.one_packet_out, c.fast_packets),
            (0, 0, 0)
        );
        // A schedule removed: the datagrams cross the core again.
        h.kp.remove_one_packet_schedule(DNS_VIP).unwrap();
        h.kp.remove_one_packet_backend(DNS_BACKENDS[0]).unwrap();
        h.passes(Direction::Inbound, &udp_frame(client, DNS_VIP, b"query"));
        h.passes(
            Direction::Outbound,
            &udp_frame(DNS_BACKENDS[0], client, b"answer"),
        );
        h.kp.unload().unwrap();
    });
}

#[test]
fn one_packet_schedules_out_of_bounds_are_refused() {
    in_sandbox(|_| {
        let mut kp = KernelPath::load(&LoadOptions::new("differential")).unwrap();
        let too_long = vec![DNS_BACKENDS[0]; kpath::MAX_ONE_PACKET_SLOTS + 1];
        assert!(kp.set_one_packet_schedule(DNS_VIP, 0, &too_long).is_err());
        assert!(kp.set_one_packet_schedule(DNS_VIP, 0, &[]).is_err());
        assert!(
            kp.set_one_packet_schedule(DNS_VIP, kpath::MAX_ONE_PACKET_SERVICES, &DNS_BACKENDS)
                .is_err()
        );
        let longest = vec![DNS_BACKENDS[0]; kpath::MAX_ONE_PACKET_SLOTS];
        kp.set_one_packet_schedule(DNS_VIP, 0, &longest).unwrap();
        kp.unload().unwrap();
    });
}

/// Publishes what the core publishes (`Gateway::published_listeners`, listener ids by
/// position, generation 1) and the core's inside networks, as the driver does.
fn publish(h: &mut Harness) -> Vec<KernelPublished> {
    let wanted: Vec<KernelPublished> =
        h.gw.published_listeners()
            .into_iter()
            .enumerate()
            .map(|(i, p)| KernelPublished {
                public: p.public,
                inside: p.inside,
                listener: u32::try_from(i).unwrap(),
                generation: 1,
            })
            .collect();
    assert_eq!(h.kp.set_published(&wanted).unwrap(), wanted.len());
    assert_eq!(
        h.kp.set_published(&wanted).unwrap(),
        0,
        "no change, no update"
    );
    h.kp.set_inside_networks(&[(Ipv4Addr::new(192, 168, 101, 0), 24)])
        .unwrap();
    wanted
}

/// A client's SYN as Linux sends it: MSS, SACK permitted, timestamps, window scale 7
/// (40 bytes of TCP header).
fn syn_with_options(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    use etherparse::TcpOptionElement::{
        MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, Timestamp, WindowScale,
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 64240)
        .syn()
        .options(&[
            MaximumSegmentSize(1460),
            SelectiveAcknowledgementPermitted,
            Timestamp(12345, 0),
            Noop,
            WindowScale(7),
        ])
        .unwrap()
        .write(&mut v, b"")
        .unwrap();
    v
}

/// An outside SYN to a published static forward is executed by the program: the same bytes
/// as the core's translation, both directions' entries installed, the flow reported once.
/// The inside server's SYN-ACK is executed too (the same bytes as the core's), reported after
/// the SYN with its header as it left the server, not counted in the entry (the core counts
/// it from the record). Its retransmission, a SYN-ACK with data and RSTs stay the core's;
/// the client's next segments hit the entries.
#[test]
fn a_published_syn_is_opened_in_the_kernel_as_the_core_would() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let client = SocketAddrV4::new(SRV2, 51000);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let web = SocketAddrV4::new(WEB, 80);
        let wanted = publish(&mut h);
        assert_eq!(
            wanted,
            vec![KernelPublished {
                public,
                inside: web,
                listener: 0,
                generation: 1
            }],
            "the TCP static forward only: not the virtual service"
        );
        let syn_frame = syn_with_options(client, public, 77_000);
        assert_eq!(syn_frame.len(), 14 + 20 + 40);
        let out = h.same(Direction::Inbound, &syn_frame);
        assert_eq!(&out[30..34], &WEB.octets(), "to the inside server");
        assert_eq!(
            h.kp.take_opened(16),
            vec![OpenedFlow {
                client,
                public,
                inside: web,
                listener: 0,
                generation: 1,
                kind: OpenedKind::Syn,
                tcp_header: syn_frame[34..].to_vec(),
            }],
            "the SYN's TCP header as it arrived"
        );
        assert_eq!(h.kp.take_opened(16), vec![], "reported once");
        let [(out_key, out_rewrite), (in_key, in_rewrite)] =
            entries(Proto::Tcp, web, public, client);
        let inb = h.kp.report(&in_key).unwrap().unwrap();
        assert_eq!((inb.packets, inb.bytes), (1, 60), "the SYN, counted");
        let mut installed: Vec<_> =
            h.kp.entries()
                .unwrap()
                .into_iter()
                .map(|(k, r, _)| (k, r))
                .collect();
        installed.sort_by_key(|(k, _)| k.direction == Direction::Inbound);
        assert_eq!(
            installed,
            vec![(out_key, out_rewrite), (in_key, in_rewrite)],
            "both directions, as the driver installs an established flow"
        );

        // The server's SYN-ACK: executed as the core translates it, and reported.
        let syn_ack = Seg {
            ack: 77_001,
            ..seg(Flags::SynAck)
        };
        let syn_ack_frame = tcp_frame(web, client, &syn_ack, b"");
        let out = h.same(Direction::Outbound, &syn_ack_frame);
        assert_eq!(&out[26..30], &PUBLIC.octets(), "from the public endpoint");
        assert_eq!(
            h.kp.take_opened(16),
            vec![OpenedFlow {
                client,
                public,
                inside: web,
                listener: 0,
                generation: 0,
                kind: OpenedKind::SynAck,
                tcp_header: syn_ack_frame[34..].to_vec(),
            }],
            "the SYN-ACK's TCP header as it left the server"
        );
        let outb = h.kp.report(&out_key).unwrap().unwrap();
        assert_eq!(
            outb.packets, 0,
            "the record reports the SYN-ACK, not the entry"
        );

        // The SYN again (a retransmission: the entry exists), a SYN-ACK with data, a RST:
        // the core's.
        h.passes(Direction::Inbound, &syn_frame);
        h.passes(
            Direction::Outbound,
            &tcp_frame(web, client, &syn_ack, b"data"),
        );
        h.passes(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Rst), b""),
        );
        let ack = h.program(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Ack), b""),
        );
        assert_eq!(ack.action, TestRun::REDIRECT, "the entry carries the ACK");
        let c = h.kp.counters().unwrap();
        assert_eq!((c.syn_opened, c.syn_ring_full, c.syn_race), (1, 0, 0));
        assert_eq!((c.syn_acks_sent, c.syn_ack_ring_full), (1, 0));
        assert_eq!(c.slow_tcp_flags, 3);
        h.kp.unload().unwrap();
    });
}

/// What the publication does not cover takes the slow path untouched, with nothing installed
/// or reported: a SYN to an unpublished listener (the virtual service, a withdrawn
/// forward), a SYN from an inside network (a hairpin, the core's), a SYN-ACK, a SYN with data.
#[test]
fn unpublished_hairpin_and_odd_syns_take_the_slow_path() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let outsider = SocketAddrV4::new(SRV2, 52000);
        let wanted = publish(&mut h);
        let syn = |src, dst| tcp_frame(src, dst, &seg(Flags::Syn), b"");
        h.passes(Direction::Inbound, &syn(outsider, VIP));
        h.passes(
            Direction::Inbound,
            &syn(outsider, SocketAddrV4::new(PUBLIC, 8002)),
        );
        h.passes(
            Direction::Inbound,
            &syn(SocketAddrV4::new(H1, 40000), public),
        );
        h.passes(
            Direction::Inbound,
            &tcp_frame(outsider, public, &seg(Flags::SynAck), b""),
        );
        h.passes(
            Direction::Outbound,
            &syn(SocketAddrV4::new(H1, 40001), public),
        );
        // TCP Fast Open: the record would not carry the data the core must see.
        h.passes(
            Direction::Inbound,
            &tcp_frame(
                outsider,
                public,
                &seg(Flags::Syn),
                b"GET / HTTP/1.0\r\n\r\n",
            ),
        );
        // Withdrawn: the next SYN is the core's again.
        assert_eq!(h.kp.set_published(&[]).unwrap(), wanted.len());
        h.passes(Direction::Inbound, &syn(outsider, public));
        assert_eq!(h.kp.take_opened(16), vec![]);
        assert_eq!(h.kp.keys().unwrap(), vec![]);
        let c = h.kp.counters().unwrap();
        assert_eq!(c.syn_opened, 0);
        assert_eq!(c.slow_tcp_flags, 7);
        h.kp.unload().unwrap();
    });
}

/// The ring buffer bounds what the program opens between two reads: with the ring full a
/// published SYN takes the slow path (counted), so no flow exists that was not reported.
#[test]
fn a_full_ring_leaves_published_syns_to_the_slow_path() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        publish(&mut h);
        let records = u16::try_from(OPENED_RING_RECORDS).unwrap();
        for port in 0..=records {
            let client = SocketAddrV4::new(SRV2, 10_000 + port);
            let run = h.program(
                Direction::Inbound,
                &tcp_frame(client, public, &seg(Flags::Syn), b""),
            );
            let want = if port < records {
                TestRun::REDIRECT
            } else {
                TestRun::PASS
            };
            assert_eq!(run.action, want, "SYN {port}");
        }
        let c = h.kp.counters().unwrap();
        assert_eq!((c.syn_opened, c.syn_ring_full), (u64::from(records), 1));
        assert_eq!(h.kp.keys().unwrap().len(), 2 * OPENED_RING_RECORDS);
        let opened = h.kp.take_opened(usize::MAX);
        assert_eq!(opened.len(), OPENED_RING_RECORDS);
        assert_eq!(opened[0].client.port(), 10_000, "oldest first");
        // Drained: the ring takes new flows again.
        let client = SocketAddrV4::new(SRV2, 9_999);
        let run = h.program(
            Direction::Inbound,
            &tcp_frame(client, public, &seg(Flags::Syn), b""),
        );
        assert_eq!(run.action, TestRun::REDIRECT);
        h.kp.unload().unwrap();
    });
}

/// The client's first ACK of a flow the program opened is reported once in the handshake
/// ring, by its inbound entry; the entries' reports it prompts the driver to feed establish
/// the flow in the core, which judged the SYN-ACK itself, without waiting for a sync round.
/// Later segments either way report nothing more.
#[test]
fn an_opened_flows_first_client_ack_is_reported_and_establishes_it_in_the_core() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let client = SocketAddrV4::new(SRV2, 51001);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        let web = SocketAddrV4::new(WEB, 80);
        publish(&mut h);
        let at = |seq, ack, flags| Seg {
            seq,
            ack,
            window: 502,
            flags,
        };
        let syn = tcp_frame(client, public, &at(1000, 0, Flags::Syn), b"");
        assert_eq!(
            h.program(Direction::Inbound, &syn).action,
            TestRun::REDIRECT
        );
        let opened = h.kp.take_opened(16);
        assert_eq!(opened.len(), 1);
        let syn_report = natgw::OpenedSyn {
            client,
            public,
            inside: web,
            tcp_header: &opened[0].tcp_header,
        };
        assert!(h.gw.adopt_opened_syn(h.now, &syn_report), "adopted");
        // The SYN-ACK is executed and reported; the core tracks it from the record.
        let syn_ack = tcp_frame(web, client, &at(5000, 1001, Flags::SynAck), b"");
        assert_eq!(
            h.program(Direction::Outbound, &syn_ack).action,
            TestRun::REDIRECT
        );
        let answered = h.kp.take_opened(16);
        assert_eq!(
            answered.iter().map(|r| r.kind).collect::<Vec<_>>(),
            vec![OpenedKind::SynAck]
        );
        let syn_ack_report = natgw::OpenedSyn {
            client,
            public,
            inside: web,
            tcp_header: &answered[0].tcp_header,
        };
        assert!(
            h.gw.follow_opened_syn_ack(h.now, &syn_ack_report),
            "the core has the flow and translates the SYN-ACK as the program did"
        );
        assert_eq!(h.gw.stats().syn_acks_by_data_path, 1);
        assert_eq!(h.kp.take_handshakes(16), vec![], "no ACK yet");

        let ack = tcp_frame(client, public, &at(1001, 5001, Flags::Ack), b"");
        assert_eq!(
            h.program(Direction::Inbound, &ack).action,
            TestRun::REDIRECT
        );
        assert_eq!(
            h.kp.take_handshakes(16),
            vec![OpenedHandshake {
                client,
                public,
                inside: web
            }]
        );
        let established = |h: &Harness| {
            h.gw.translations(h.now)
                .iter()
                .find(|t| t.outside == client)
                .map(|t| t.established)
        };
        assert_eq!(established(&h), Some(false), "half-open until told");
        let [_, (in_key, _)] = entries(Proto::Tcp, web, public, client);
        let r = h.kp.report(&in_key).unwrap().unwrap();
        assert_eq!((r.packets, r.bytes), (2, 80), "the SYN and the ACK");
        let activity = natgw::FastPathActivity {
            proto: natgw::Proto::Tcp,
            public,
            outside: client,
            direction: natgw::Direction::Inbound,
            packets: 1,
            bytes: 40,
            tcp: r.tcp.map(|t| (t.seq_end, t.ack, t.window)),
            tcp_fin_end: None,
        };
        assert!(h.gw.fast_path_activity(h.now, &activity));
        assert_eq!(established(&h), Some(true), "the core judged the ACK");

        let request = tcp_frame(client, public, &at(1001, 5001, Flags::Ack), b"GET /\r\n");
        assert_eq!(
            h.program(Direction::Inbound, &request).action,
            TestRun::REDIRECT
        );
        let answer = tcp_frame(web, client, &at(5001, 1008, Flags::Ack), b"200\r\n");
        assert_eq!(
            h.program(Direction::Outbound, &answer).action,
            TestRun::REDIRECT
        );
        assert_eq!(h.kp.take_handshakes(16), vec![], "reported once");
        let c = h.kp.counters().unwrap();
        assert_eq!((c.handshakes_reported, c.handshake_ring_full), (1, 0));
        h.kp.unload().unwrap();
    });
}

/// The handshake ring is bounded: an ACK that finds it full is still carried, counted and
/// not reported (its flow waits for the sync round); drained, it takes records again.
#[test]
fn a_full_handshake_ring_leaves_the_handshake_to_the_sync_round() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex);
        let public = SocketAddrV4::new(PUBLIC, 8001);
        publish(&mut h);
        let records = u16::try_from(HANDSHAKE_RING_RECORDS).unwrap();
        let client = |port: u16| SocketAddrV4::new(SRV2, 10_000 + port);
        for port in 0..=records + 1 {
            let syn = tcp_frame(client(port), public, &seg(Flags::Syn), b"");
            assert_eq!(
                h.program(Direction::Inbound, &syn).action,
                TestRun::REDIRECT
            );
        }
        assert_eq!(h.kp.take_opened(usize::MAX).len(), usize::from(records) + 2);
        for port in 0..=records {
            let ack = tcp_frame(client(port), public, &seg(Flags::Ack), b"");
            assert_eq!(
                h.program(Direction::Inbound, &ack).action,
                TestRun::REDIRECT,
                "ACK {port}"
            );
        }
        let c = h.kp.counters().unwrap();
        assert_eq!(
            (c.handshakes_reported, c.handshake_ring_full),
            (u64::from(records), 1)
        );
        let reported = h.kp.take_handshakes(usize::MAX);
        assert_eq!(reported.len(), HANDSHAKE_RING_RECORDS);
        assert_eq!(reported[0].client, client(0), "oldest first");
        // The ACK that found the ring full does not report again.
        let again = tcp_frame(client(records), public, &seg(Flags::Ack), b"");
        assert_eq!(
            h.program(Direction::Inbound, &again).action,
            TestRun::REDIRECT
        );
        assert_eq!(h.kp.take_handshakes(16), vec![]);
        // Drained: the next flow's ACK is reported.
        let ack = tcp_frame(client(records + 1), public, &seg(Flags::Ack), b"");
        assert_eq!(
            h.program(Direction::Inbound, &ack).action,
            TestRun::REDIRECT
        );
        assert_eq!(h.kp.take_handshakes(16).len(), 1);
        h.kp.unload().unwrap();
    });
}
