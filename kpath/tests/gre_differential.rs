//! Differential test of the GRE kernel path: the same inner packets through gre's core
//! (`Tunnel::encapsulate` / `Tunnel::decapsulate`) and through the loaded programs
//! (`BPF_PROG_TEST_RUN`) give the same GRE header and inner bytes; the outer IPv4 header the
//! program writes is the one the TUN path's raw socket sends (DF, TTL 64, protocol 47,
//! checksum verified with etherparse). Whatever the core must judge (SYNs, oversized packets,
//! keepalives, wrong keys and sources, GRE flags, malformed inner packets) passes untouched,
//! and the core's verdict on it is what the TUN path would do. Root only.
// Tunnel::new and decapsulate take `now`; the test picks it.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::Ipv4Addr;
use std::time::Instant;

use common::in_sandbox;
use etherparse::{Ipv4Header, PacketBuilder};
use gre::{DropReason, Encap, HEADROOM, Tunnel, TunnelConfig, Verdict};
use kpath::{GreEgress, GrePath, GreProgram, GreTunnelEntry, LoadOptions, TestRun};

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const ROGUE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const HQ_PC: [u8; 4] = [192, 168, 101, 10];
const BR_PC: [u8; 4] = [192, 168, 102, 10];
const HQ_PC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x10];
const BR_PC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0x10];
const MTU: u16 = 1472;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// An Ethernet frame around `ip`, its EtherType from the IP version (IPv4 when empty).
fn ether(ip: &[u8]) -> Vec<u8> {
    let ethertype: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// An IPv4 TCP segment (ACK, or SYN) with `len` payload bytes.
fn tcp(src: [u8; 4], dst: [u8; 4], len: usize, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(40000, 5001, 7, 501);
    let b = if syn { b.syn() } else { b.ack(99) };
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut v = Vec::new();
    b.write(&mut v, &payload).unwrap();
    v
}

/// An IPv6 TCP segment (ACK, or SYN) with `len` payload bytes.
fn tcp6(len: usize, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv6(HQ_PC6, BR_PC6, 64).tcp(40000, 5001, 7, 501);
    let b = if syn { b.syn() } else { b.ack(99) };
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut v = Vec::new();
    b.write(&mut v, &payload).unwrap();
    v
}

fn udp6(len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv6(HQ_PC6, BR_PC6, 64)
        .udp(5353, 53)
        .write(&mut v, &vec![0xab; len])
        .unwrap();
    v
}

fn udp(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(5353, 53)
        .write(&mut v, &vec![0xab; len])
        .unwrap();
    v
}

/// The outer IPv4 header the TUN path's raw socket would put around `gre` (DF, TTL 64).
fn outer(src: Ipv4Addr, dst: Ipv4Addr, gre: &[u8]) -> Vec<u8> {
    let mut h = Ipv4Header::new(
        u16::try_from(gre.len()).unwrap(),
        64,
        etherparse::IpNumber::GRE,
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    h.dont_fragment = true;
    h.header_checksum = h.calc_header_checksum();
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(gre);
    v
}

struct Harness {
    core: Tunnel,
    now: Instant,
    gp: GrePath,
    ifindex: u32,
}

impl Harness {
    fn new(ifindex: u32, key: Option<u32>) -> Self {
        let now = Instant::now();
        let mut config = TunnelConfig::new("gre-br", LOCAL, REMOTE);
        config.key = key;
        config.mtu = MTU;
        let mut gp = GrePath::load(&LoadOptions::new("gre-differential")).unwrap();
        // The veth stands in for the TUN: it has an Ethernet header, the TUN has none.
        gp.insert(&GreTunnelEntry {
            slot: 5,
            tun_ifindex: ifindex,
            l2: true,
            local: LOCAL,
            remote: REMOTE,
            key,
            mtu: MTU,
            udp: false,
            egress: None,
        })
        .unwrap();
        Harness {
            core: Tunnel::new(now, config),
            now,
            gp,
            ifindex,
        }
    }

    /// The tunnel's entry as `Harness::new` installs it, with `udp` and `egress`.
    fn entry(&self, key: Option<u32>, udp: bool, egress: Option<GreEgress>) -> GreTunnelEntry {
        GreTunnelEntry {
            slot: 5,
            tun_ifindex: self.ifindex,
            l2: true,
            local: LOCAL,
            remote: REMOTE,
            key,
            mtu: MTU,
            udp,
            egress,
        }
    }

    /// Replaces the tunnel's entries with those of a GRE-in-UDP (`udp`) or raw GRE tunnel.
    fn set_udp(&mut self, key: Option<u32>, udp: bool) {
        self.gp.remove(&self.entry(key, !udp, None)).unwrap();
        self.gp.insert(&self.entry(key, udp, None)).unwrap();
    }

    /// Re-installs the tunnel's entry with `egress` (the veth as the recorded underlay).
    fn set_egress(&mut self, key: Option<u32>, egress: Option<GreEgress>) {
        self.gp.insert(&self.entry(key, false, egress)).unwrap();
    }

    fn run(&self, program: GreProgram, frame: &[u8]) -> TestRun {
        self.gp.test_run(program, frame, self.ifindex).unwrap()
    }

    /// The core's verdict on `inner`, and for `ToPeer` the GRE header + inner packet.
    fn core_encap(&mut self, inner: &[u8]) -> (Encap, Vec<u8>) {
        let mut buf = vec![0u8; HEADROOM + inner.len()];
        buf[HEADROOM..].copy_from_slice(inner);
        let end = buf.len();
        let verdict = self.core.encapsulate(&mut buf, HEADROOM..end);
        let bytes = match &verdict {
            Encap::ToPeer(r) => buf[r.clone()].to_vec(),
            _ => Vec::new(),
        };
        (verdict, bytes)
    }

    /// Both paths encapsulate `inner` to the same bytes; the program's IP packet.
    fn same_encap(&mut self, inner: &[u8]) -> Vec<u8> {
        let (verdict, from_core) = self.core_encap(inner);
        assert!(
            matches!(verdict, Encap::ToPeer(_)),
            "the core sends it: {verdict:?}"
        );
        let run = self.run(GreProgram::Encap, &ether(inner));
        assert_eq!(run.action, TestRun::REDIRECT, "encapsulated in the kernel");
        let (h, rest) = Ipv4Header::from_slice(&run.frame[14..]).unwrap();
        assert_eq!(
            rest,
            &from_core[..],
            "same GRE header and inner bytes as the core"
        );
        assert_eq!((h.source, h.destination), (LOCAL.octets(), REMOTE.octets()));
        assert_eq!(h.protocol, etherparse::IpNumber::GRE);
        assert!(h.dont_fragment && !h.more_fragments && h.fragment_offset.value() == 0);
        assert_eq!(h.time_to_live, 64);
        assert_eq!(h.dscp.value(), 0);
        assert_eq!(usize::from(h.total_len), 20 + from_core.len());
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert!(h.options.is_empty());
        run.frame[14..].to_vec()
    }

    /// The core decides `gre` from `source` as the TUN path would.
    fn core_decap(&mut self, source: Ipv4Addr, gre: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = gre.to_vec();
        let v = self.core.decapsulate(self.now, source, &mut buf);
        let inner = match &v {
            Verdict::ToTun(r) => buf[r.clone()].to_vec(),
            _ => Vec::new(),
        };
        (v, inner)
    }

    /// Both paths decapsulate `gre` from the remote to the same inner packet.
    fn same_decap(&mut self, gre: &[u8]) {
        let (v, inner) = self.core_decap(REMOTE, gre);
        assert!(
            matches!(v, Verdict::ToTun(_)),
            "the core delivers it: {v:?}"
        );
        let run = self.run(GreProgram::Decap, &ether(&outer(REMOTE, LOCAL, gre)));
        assert_eq!(run.action, TestRun::REDIRECT, "decapsulated in the kernel");
        assert_eq!(
            run.frame[..14],
            ether(&inner)[..14],
            "the Ethernet header stays, labelled with the inner packet's EtherType"
        );
        assert_eq!(run.frame[14..], inner[..], "same inner packet as the core");
    }

    /// The program leaves `frame` untouched to the TUN path.
    fn passes(&self, program: GreProgram, frame: &[u8]) {
        let run = self.run(program, frame);
        assert_eq!(run.action, TestRun::PASS, "left to the TUN path");
        assert_eq!(run.frame, frame, "untouched");
    }
}

/// A GRE header (flags word, protocol, optional key) followed by `payload`.
fn gre(flags: u16, protocol: u16, key: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&protocol.to_be_bytes());
    if let Some(k) = key {
        v.extend_from_slice(&k.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

#[test]
fn keyed_tunnel_encapsulates_and_decapsulates_as_the_core_does() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex, Some(42));
        let mut carried = 0;
        for inner in [
            tcp(HQ_PC, BR_PC, 0, false),
            tcp(HQ_PC, BR_PC, 1000, false),
            tcp(HQ_PC, BR_PC, usize::from(MTU) - 40, false),
            udp(HQ_PC, BR_PC, 1),
            udp(HQ_PC, BR_PC, usize::from(MTU) - 28),
        ] {
            let wire = h.same_encap(&inner);
            carried += 1;
            // What one end sends, the other end's program takes back to the same packet.
            h.same_decap(&wire[20..]);
            assert_eq!(&wire[20 + 8..], &inner[..]);
        }
        let stats = h.gp.stats(5).unwrap();
        assert_eq!((stats.tx_packets, stats.rx_packets), (carried, carried));
        assert_eq!(stats.tx_bytes, stats.rx_bytes);
        assert_eq!(
            h.core.counters().tx_packets,
            carried,
            "the core saw the same"
        );
        h.gp.unload().unwrap();
    });
}

#[test]
fn keyless_tunnel_encapsulates_and_decapsulates_as_the_core_does() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex, None);
        let wire = h.same_encap(&tcp(HQ_PC, BR_PC, 500, false));
        assert_eq!(&wire[20..24], &[0, 0, 0x08, 0x00], "no flags, IPv4");
        h.same_decap(&wire[20..]);
        h.gp.unload().unwrap();
    });
}

#[test]
fn what_the_core_must_judge_is_left_to_the_tun_path() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex, Some(42));
        // Encapsulation: a SYN (MSS clamp), a DF packet over the MTU (frag-needed), IP
        // options, neither IPv4 nor IPv6.
        let syn = tcp(HQ_PC, BR_PC, 0, true);
        h.passes(GreProgram::Encap, &ether(&syn));
        let big = tcp(HQ_PC, BR_PC, usize::from(MTU) - 39, false);
        h.passes(GreProgram::Encap, &ether(&big));
        assert!(
            matches!(h.core_encap(&big).0, Encap::ToTun(_)),
            "the core answers frag-needed"
        );
        let mut options = tcp(HQ_PC, BR_PC, 10, false);
        options[0] = 0x46;
        options.splice(20..20, [1, 1, 1, 0]);
        let tot = u16::try_from(options.len()).unwrap();
        options[2..4].copy_from_slice(&tot.to_be_bytes());
        h.passes(GreProgram::Encap, &ether(&options));
        let mut arp = ether(&[0; 28]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        h.passes(GreProgram::Encap, &arp);

        // Decapsulation: each case with the core's verdict on it.
        let data = tcp(BR_PC, HQ_PC, 100, false);
        let probe = outer(LOCAL, REMOTE, &gre(0x2000, 0, Some(42), &[]));
        let mut padded = data.clone();
        padded.push(0); // a byte past the total length: the core trims it
        let mut long = data.clone();
        long[3] += 1; // a total length past the packet
        let cases: [(Ipv4Addr, Vec<u8>, Option<DropReason>); 10] = [
            (
                REMOTE,
                gre(0x2000, 0x0800, Some(43), &data),
                Some(DropReason::WrongKey),
            ),
            (
                REMOTE,
                gre(0, 0x0800, None, &data),
                Some(DropReason::WrongKey),
            ),
            (
                ROGUE,
                gre(0x2000, 0x0800, Some(42), &data),
                Some(DropReason::WrongSource),
            ),
            (
                REMOTE,
                gre(0x2000, 0, Some(42), &[0; 8]),
                Some(DropReason::UnexpectedKeepalive),
            ),
            (
                REMOTE,
                gre(0xa000, 0x0800, Some(42), &[0; 4]),
                Some(DropReason::BadChecksum),
            ),
            (REMOTE, gre(0x3000, 0x0800, Some(42), &[0; 4]), None),
            (
                REMOTE,
                gre(0x2000, 0x0800, Some(42), &tcp(BR_PC, HQ_PC, 0, true)),
                None,
            ),
            (REMOTE, gre(0x2000, 0x0800, Some(42), &probe), None),
            (REMOTE, gre(0x2000, 0x0800, Some(42), &padded), None),
            (
                REMOTE,
                gre(0x2000, 0x0800, Some(42), &long),
                Some(DropReason::BadInner),
            ),
        ];
        for (source, packet, dropped) in cases {
            h.passes(GreProgram::Decap, &ether(&outer(source, LOCAL, &packet)));
            let (verdict, _) = h.core_decap(source, &packet);
            if let Some(reason) = dropped {
                assert_eq!(verdict, Verdict::Drop(reason), "{packet:02x?}");
            }
        }
        let pass = h.gp.pass_counters().unwrap();
        assert_eq!(pass.tx_tcp_syn, 1);
        assert_eq!(pass.tx_too_big, 1);
        assert_eq!(pass.tx_unusual, 1);
        assert_eq!(pass.tx_not_ip, 1);
        assert_eq!(pass.rx_no_tunnel, 3, "wrong key, no key, wrong source");
        assert_eq!(pass.rx_not_ip, 1, "keepalive reply");
        assert_eq!(pass.rx_gre_flags, 2, "checksum, sequence");
        assert_eq!(pass.rx_tcp_syn, 1);
        assert_eq!(pass.rx_probe, 1);
        assert_eq!(pass.rx_unusual, 2, "padded, too long");
        let stats = h.gp.stats(5).unwrap();
        assert_eq!((stats.tx_packets, stats.rx_packets), (0, 0));
        assert_eq!((stats.tx_passed, stats.rx_passed), (4, 7));
        h.gp.unload().unwrap();
    });
}

#[test]
fn ipv6_inside_encapsulates_and_decapsulates_as_the_core_does() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex, Some(42));
        let mut carried = 0;
        for inner in [
            tcp6(0, false),
            tcp6(1000, false),
            tcp6(usize::from(MTU) - 60, false),
            udp6(1),
            udp6(usize::from(MTU) - 48),
        ] {
            let wire = h.same_encap(&inner);
            carried += 1;
            assert_eq!(&wire[20 + 2..20 + 4], &[0x86, 0xdd], "IPv6 inside");
            h.same_decap(&wire[20..]);
            assert_eq!(&wire[20 + 8..], &inner[..]);
        }
        // Left to the core: SYNs (MSS clamp) both ways, over the MTU, an extension header
        // (hop-by-hop in place of UDP), a payload length that does not add up.
        let mut hop_by_hop = udp6(8);
        hop_by_hop[6] = 0;
        let mut short = udp6(8);
        short[5] += 1;
        for inner in [
            tcp6(0, true),
            tcp6(usize::from(MTU) - 59, false),
            hop_by_hop.clone(),
            short.clone(),
        ] {
            h.passes(GreProgram::Encap, &ether(&inner));
        }
        for inner in [tcp6(0, true), hop_by_hop, short] {
            let packet = gre(0x2000, 0x86dd, Some(42), &inner);
            h.passes(GreProgram::Decap, &ether(&outer(REMOTE, LOCAL, &packet)));
        }
        let pass = h.gp.pass_counters().unwrap();
        assert_eq!(
            (pass.tx_tcp_syn, pass.tx_too_big, pass.tx_unusual),
            (1, 1, 2)
        );
        assert_eq!((pass.rx_tcp_syn, pass.rx_unusual), (1, 2));
        let stats = h.gp.stats(5).unwrap();
        assert_eq!((stats.tx_packets, stats.rx_packets), (carried, carried));
        h.gp.unload().unwrap();
    });
}

/// GRE-in-UDP: the program puts IPv4 + UDP 4754 -> 4754 (length exact, checksum zero) in
/// front of the core's GRE header and packet; it takes back UDP without a checksum, leaves a
/// checksummed one the device did not verify to the TUN path's kernel, and never touches
/// raw GRE for a UDP tunnel or other UDP.
#[test]
fn gre_in_udp_encapsulates_and_decapsulates_as_the_core_does() {
    in_sandbox(|ifindex| {
        let mut h = Harness::new(ifindex, Some(42));
        h.set_udp(Some(42), true);
        for inner in [tcp(HQ_PC, BR_PC, 1000, false), tcp6(500, false)] {
            let (verdict, from_core) = h.core_encap(&inner);
            assert!(matches!(verdict, Encap::ToPeer(_)), "{verdict:?}");
            let run = h.run(GreProgram::Encap, &ether(&inner));
            assert_eq!(run.action, TestRun::REDIRECT, "encapsulated in the kernel");
            let (ip, rest) = Ipv4Header::from_slice(&run.frame[14..]).unwrap();
            assert_eq!(ip.protocol, etherparse::IpNumber::UDP);
            assert_eq!(ip.header_checksum, ip.calc_header_checksum());
            assert_eq!(usize::from(ip.total_len), 20 + 8 + from_core.len());
            let (udp, gre) = rest.split_at(8);
            assert_eq!(&udp[..4], &[0x12, 0x92, 0x12, 0x92], "4754 -> 4754");
            assert_eq!(
                usize::from(u16::from_be_bytes([udp[4], udp[5]])),
                8 + from_core.len()
            );
            assert_eq!(&udp[6..], &[0, 0], "no UDP checksum");
            assert_eq!(gre, &from_core[..], "the core's GRE header and packet");
            // The same datagram as the remote would send it (addresses swapped, which keeps
            // the header checksum): the decapsulation program gives the inner packet back.
            let mut wire = run.frame[14..].to_vec();
            let (src, dst) = wire[12..20].split_at_mut(4);
            src.swap_with_slice(dst);
            let back = h.run(GreProgram::Decap, &ether(&wire));
            assert_eq!(back.action, TestRun::REDIRECT, "decapsulated in the kernel");
            assert_eq!(back.frame[14..], inner[..]);
            // With a checksum nobody verified: the TUN path's kernel checks it.
            let mut summed = ether(&wire);
            summed[14 + 20 + 6] = 0x5a;
            h.passes(GreProgram::Decap, &summed);
            // Raw GRE for a UDP tunnel is no tunnel of this path.
            h.passes(GreProgram::Decap, &ether(&outer(REMOTE, LOCAL, &from_core)));
        }
        let pass = h.gp.pass_counters().unwrap();
        assert_eq!((pass.rx_udp_checksum, pass.rx_no_tunnel), (2, 2));
        let stats = h.gp.stats(5).unwrap();
        assert_eq!((stats.tx_packets, stats.rx_packets), (2, 2));
        h.gp.unload().unwrap();
    });
}

/// On a host that does not forward, the kernel refuses the program's FIB lookup
/// (`BPF_FIB_LKUP_RET_FWD_DISABLED`): the host's own packets leave by the recorded egress
/// interface, encapsulated as the core would; without one they take the TUN path, and an
/// outer packet over the egress MTU does too.
#[test]
fn a_host_that_does_not_forward_encapsulates_by_the_recorded_egress() {
    in_sandbox(|ifindex| {
        // Writing `all` turns it off on every interface, as `ip_forward=0` does.
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "0").unwrap();
        let mut h = Harness::new(ifindex, Some(42));
        let inner = tcp(HQ_PC, BR_PC, 1000, false);
        h.passes(GreProgram::Encap, &ether(&inner));
        assert_eq!(h.gp.pass_counters().unwrap().tx_no_route, 1);

        h.set_egress(Some(42), Some(GreEgress { ifindex, mtu: 1500 }));
        let wire = h.same_encap(&inner);
        h.same_decap(&wire[20..]);

        // 1,000 payload + 40 + 28 of tunnel headers do not fit an egress MTU of 1,000.
        h.set_egress(Some(42), Some(GreEgress { ifindex, mtu: 1000 }));
        h.passes(GreProgram::Encap, &ether(&inner));
        let pass = h.gp.pass_counters().unwrap();
        assert_eq!((pass.tx_no_route, pass.tx_too_big), (1, 1));
        assert_eq!(h.gp.stats(5).unwrap().tx_packets, 1);
        h.gp.unload().unwrap();
    });
}
