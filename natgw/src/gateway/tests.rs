//! Unit and property tests of the gateway core, on packets built with etherparse.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use testkit::packet::{self, TcpFlags, icmp_echo as echo, icmp_error};
use testkit::{epoch, replay_corpus};

use super::*;
use crate::acl::AclAction;
use crate::config::StaticEntry;
use crate::selector::StaticForward;
use crate::table::Timeouts;
use crate::translate::l4_checksum_ok;

const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const H1: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 10);
const H2: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 11);
const WEB: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 101);
const SRV: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const SRV2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

fn config() -> GatewayConfig {
    GatewayConfig {
        overload: Some(PUBLIC),
        inside_networks: vec!["192.168.101.0/24".parse().unwrap()],
        statics: vec![
            StaticEntry {
                proto: Proto::Tcp,
                public: SocketAddrV4::new(PUBLIC, 8001),
                inside: SocketAddrV4::new(WEB, 80),
            },
            StaticEntry {
                proto: Proto::Udp,
                public: SocketAddrV4::new(PUBLIC, 5353),
                inside: SocketAddrV4::new(WEB, 53),
            },
        ],
        compensate_ttl: false,
        local_addresses: vec![PUBLIC],
        ..GatewayConfig::default()
    }
}

fn gw() -> (Gateway, Instant) {
    let now = epoch();
    (Gateway::new(now, config()).unwrap(), now)
}

/// A TCP segment, in this file's (address, port) argument order.
fn tcp(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    packet::ipv4_tcp(
        SocketAddrV4::new(src, sp),
        SocketAddrV4::new(dst, dp),
        flags,
        payload,
    )
}

/// A UDP datagram, in this file's (address, port) argument order.
fn udp(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, payload: &[u8]) -> Vec<u8> {
    packet::ipv4_udp(
        SocketAddrV4::new(src, sp),
        SocketAddrV4::new(dst, dp),
        payload,
    )
}

fn src(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[12], b[13], b[14], b[15]),
        u16::from_be_bytes([b[20], b[21]]),
    )
}
fn dst(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[16], b[17], b[18], b[19]),
        u16::from_be_bytes([b[22], b[23]]),
    )
}

/// The reply to a packet as its receiver would send it: addresses and ports swapped.
/// (One's-complement sums are commutative, so every checksum stays valid.)
fn swap(b: &mut [u8]) {
    let (a, c) = b.split_at_mut(16);
    a[12..16].swap_with_slice(&mut c[..4]);
    let ihl = usize::from(b[0] & 0xf) * 4;
    if b[9] != 1 {
        let (x, y) = b[ihl..ihl + 4].split_at_mut(2);
        x.swap_with_slice(y);
    }
}

fn ip_ok(b: &[u8]) -> bool {
    let ihl = usize::from(b[0] & 0xf) * 4;
    netutil::checksum::checksum(&b[..ihl]) == 0
}

fn out(g: &mut Gateway, now: Instant, b: &mut [u8]) -> Verdict {
    g.handle_packet(now, Direction::Outbound, b)
}
fn inb(g: &mut Gateway, now: Instant, b: &mut [u8]) -> Verdict {
    g.handle_packet(now, Direction::Inbound, b)
}

#[test]
fn tcp_overload_round_trip_preserves_port() {
    let (mut g, now) = gw();
    let orig = tcp(H1, 40000, SRV, 80, TcpFlags::SYN, b"");
    let mut p = orig.clone();
    assert_eq!(out(&mut g, now, &mut p), Verdict::Forward);
    assert_eq!(src(&p), SocketAddrV4::new(PUBLIC, 40000));
    assert_eq!(dst(&p), SocketAddrV4::new(SRV, 80));
    assert!(ip_ok(&p) && l4_checksum_ok(&p));
    let mut reply = tcp(SRV, 80, PUBLIC, 40000, TcpFlags::SYN_ACK, b"");
    assert_eq!(inb(&mut g, now, &mut reply), Verdict::Forward);
    assert_eq!(dst(&reply), SocketAddrV4::new(H1, 40000));
    assert!(ip_ok(&reply) && l4_checksum_ok(&reply));
    // SYN + SYN-ACK is half-open; the originator's ACK establishes the flow.
    assert!(!g.translations(now)[0].established);
    let mut ack = tcp(H1, 40000, SRV, 80, TcpFlags::ACK, b"");
    assert_eq!(out(&mut g, now, &mut ack), Verdict::Forward);
    let t = g.translations(now);
    assert_eq!(t.len(), 1);
    assert!(t[0].established);
    assert_eq!(t[0].inside, SocketAddrV4::new(H1, 40000));
}

#[test]
fn port_collision_picks_random_port_in_range() {
    let (mut g, now) = gw();
    let mut a = udp(H1, 5000, SRV, 53, b"q");
    let mut b = udp(H2, 5000, SRV, 53, b"q");
    assert_eq!(out(&mut g, now, &mut a), Verdict::Forward);
    assert_eq!(out(&mut g, now, &mut b), Verdict::Forward);
    assert_eq!(src(&a).port(), 5000);
    let pb = src(&b).port();
    assert_ne!(pb, 5000);
    assert!(pb >= 1024);
    assert!(l4_checksum_ok(&b));
    // Low ports are never preserved outside the range (REQ-4: stay out of 0-1023 here).
    let mut c = udp(H2, 123, SRV, 123, b"ntp");
    assert_eq!(out(&mut g, now, &mut c), Verdict::Forward);
    assert!(src(&c).port() >= 1024);
}

#[test]
fn endpoint_independent_mapping() {
    let (mut g, now) = gw();
    let mut a = udp(H1, 6000, SRV, 3478, b"x");
    let mut b = udp(H1, 6000, SRV2, 3478, b"x");
    let _ = out(&mut g, now, &mut a);
    let _ = out(&mut g, now, &mut b);
    assert_eq!(src(&a), src(&b));
    assert_eq!(g.translations(now).len(), 2);
}

#[test]
fn address_dependent_filtering() {
    let (mut g, now) = gw();
    let mut a = udp(H1, 6000, SRV, 3478, b"x");
    let _ = out(&mut g, now, &mut a);
    let public = src(&a);
    // A stranger is filtered.
    let mut stranger = udp(SRV2, 3478, *public.ip(), public.port(), b"y");
    assert_eq!(
        inb(&mut g, now, &mut stranger),
        Verdict::Drop(DropReason::Filtered)
    );
    assert_eq!(g.stats().drops.get(DropReason::Filtered), 1);
    // The contacted address from another port is allowed (address-dependent).
    let mut other_port = udp(SRV, 9999, *public.ip(), public.port(), b"y");
    assert_eq!(inb(&mut g, now, &mut other_port), Verdict::Forward);
    assert_eq!(dst(&other_port), SocketAddrV4::new(H1, 6000));
    // Endpoint-independent filtering lets the stranger in.
    let mut eif = Gateway::new(
        now,
        GatewayConfig {
            filtering: Filtering::EndpointIndependent,
            ..config()
        },
    )
    .unwrap();
    let mut a = udp(H1, 6000, SRV, 3478, b"x");
    let _ = out(&mut eif, now, &mut a);
    let mut stranger = udp(SRV2, 3478, PUBLIC, src(&a).port(), b"y");
    assert_eq!(inb(&mut eif, now, &mut stranger), Verdict::Forward);
}

#[test]
fn unsolicited_inbound_passes_to_gateway_untouched() {
    let (mut g, now) = gw();
    let orig = tcp(SRV, 50000, PUBLIC, 22, TcpFlags::SYN, b"");
    let mut p = orig.clone();
    assert_eq!(inb(&mut g, now, &mut p), Verdict::Forward);
    assert_eq!(p, orig);
    assert_eq!(g.stats().passed_through, 1);
    assert!(g.table().is_empty());
}

#[test]
fn static_forward_both_directions() {
    let (mut g, now) = gw();
    let mut syn = tcp(SRV, 50000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 80));
    assert_eq!(src(&syn), SocketAddrV4::new(SRV, 50000));
    assert!(ip_ok(&syn) && l4_checksum_ok(&syn));
    let mut synack = tcp(WEB, 80, SRV, 50000, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(&mut g, now, &mut synack), Verdict::Forward);
    assert_eq!(src(&synack), SocketAddrV4::new(PUBLIC, 8001));
    assert!(l4_checksum_ok(&synack));
    // A mid-stream ACK to the forward (a connection another gateway of a pair carried) is
    // adopted: the forward has one endpoint; it stays half-open until the server answers.
    let half_open = g.table().half_open();
    let mut stray = tcp(SRV2, 1234, PUBLIC, 8001, TcpFlags::ACK, b"");
    assert_eq!(inb(&mut g, now, &mut stray), Verdict::Forward);
    assert_eq!(dst(&stray), SocketAddrV4::new(WEB, 80));
    assert_eq!(g.stats().flows_adopted, 1);
    assert_eq!(g.table().half_open(), half_open + 1);
    // A RST opens nothing.
    let mut rst = tcp(SRV2, 1235, PUBLIC, 8001, TcpFlags::RST_ACK, b"");
    assert_eq!(
        inb(&mut g, now, &mut rst),
        Verdict::Drop(DropReason::NotSyn)
    );
    // UDP forwards open on any datagram.
    let mut q = udp(SRV2, 999, PUBLIC, 5353, b"dns");
    assert_eq!(inb(&mut g, now, &mut q), Verdict::Forward);
    assert_eq!(dst(&q), SocketAddrV4::new(WEB, 53));
}

#[test]
fn hairpin_uses_external_source() {
    let (mut g, now) = gw();
    let mut syn = tcp(H1, 41000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(g.direction(&syn), Direction::Outbound);
    assert_eq!(out(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 80));
    assert_eq!(src(&syn), SocketAddrV4::new(PUBLIC, 41000));
    assert!(ip_ok(&syn) && l4_checksum_ok(&syn));
    let mut reply = tcp(WEB, 80, PUBLIC, 41000, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(&mut g, now, &mut reply), Verdict::Forward);
    assert_eq!(src(&reply), SocketAddrV4::new(PUBLIC, 8001));
    assert_eq!(dst(&reply), SocketAddrV4::new(H1, 41000));
    assert!(l4_checksum_ok(&reply));
    assert_eq!(g.stats().hairpinned, 2);
    // To the gateway's own address on a port nobody forwards: untouched.
    let orig = tcp(H1, 41001, PUBLIC, 22, TcpFlags::SYN, b"");
    let mut ssh = orig.clone();
    assert_eq!(out(&mut g, now, &mut ssh), Verdict::Forward);
    assert_eq!(ssh, orig);
}

#[test]
fn icmp_echo_query_id() {
    let (mut g, now) = gw();
    let mut a = echo(H1, SRV, 77, true);
    let mut b = echo(H2, SRV, 77, true);
    let _ = out(&mut g, now, &mut a);
    let _ = out(&mut g, now, &mut b);
    let id_a = u16::from_be_bytes([a[24], a[25]]);
    let id_b = u16::from_be_bytes([b[24], b[25]]);
    assert_eq!(id_a, 77);
    assert_ne!(id_b, 77);
    assert!(l4_checksum_ok(&a) && l4_checksum_ok(&b));
    let mut reply = echo(SRV, PUBLIC, id_b, false);
    assert_eq!(inb(&mut g, now, &mut reply), Verdict::Forward);
    assert_eq!(
        Ipv4Addr::from([reply[16], reply[17], reply[18], reply[19]]),
        H2
    );
    assert_eq!(u16::from_be_bytes([reply[24], reply[25]]), 77);
    assert!(l4_checksum_ok(&reply));
    // A ping to the gateway itself passes to the kernel.
    let orig = echo(SRV, PUBLIC, 5, true);
    let mut p = orig.clone();
    assert_eq!(inb(&mut g, now, &mut p), Verdict::Forward);
    assert_eq!(p, orig);
}

#[test]
fn icmp_error_inbound_restores_quoted_packet() {
    let (mut g, now) = gw();
    let mut probe = udp(H2, 5000, SRV, 33434, b"trace");
    let mut first = udp(H1, 5000, SRV, 33434, b"trace");
    let _ = out(&mut g, now, &mut first);
    let _ = out(&mut g, now, &mut probe); // gets a random port
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let mut err = icmp_error(router, PUBLIC, &probe);
    assert_eq!(inb(&mut g, now, &mut err), Verdict::Forward);
    assert_eq!(Ipv4Addr::from([err[16], err[17], err[18], err[19]]), H2);
    assert_eq!(Ipv4Addr::from([err[12], err[13], err[14], err[15]]), router);
    let q = &err[28..];
    assert_eq!(src(q), SocketAddrV4::new(H2, 5000));
    assert_eq!(dst(q), SocketAddrV4::new(SRV, 33434));
    assert!(ip_ok(&err) && ip_ok(q));
    assert_eq!(netutil::checksum::checksum(&err[20..]), 0);
    assert_eq!(g.stats().icmp_errors, 1);
    // An error about nothing we know, quoting a dynamic port: dropped.
    let mut stale = udp(PUBLIC, src(&probe).port(), SRV2, 1, b"x");
    netutil::bytes::put16(&mut stale, 10, 0);
    let c = netutil::checksum::checksum(&stale[..20]);
    netutil::bytes::put16(&mut stale, 10, c);
    let mut err2 = icmp_error(router, PUBLIC, &stale);
    assert_eq!(
        inb(&mut g, now, &mut err2),
        Verdict::Drop(DropReason::NoSession)
    );
    // A corrupted error is dropped (RFC 5508 REQ-3a).
    let mut bad = icmp_error(router, PUBLIC, &probe);
    bad[22] ^= 0xff;
    assert_eq!(
        inb(&mut g, now, &mut bad),
        Verdict::Drop(DropReason::BadIcmpError)
    );
}

#[test]
fn icmp_error_outbound_hides_inside_address() {
    let (mut g, now) = gw();
    let mut q = udp(SRV2, 999, PUBLIC, 5353, b"dns");
    let _ = inb(&mut g, now, &mut q); // now SRV2:999 -> WEB:53
    let mut err = icmp_error(WEB, SRV2, &q);
    assert_eq!(out(&mut g, now, &mut err), Verdict::Forward);
    assert_eq!(Ipv4Addr::from([err[12], err[13], err[14], err[15]]), PUBLIC);
    assert_eq!(dst(&err[28..]), SocketAddrV4::new(PUBLIC, 5353));
    assert_eq!(netutil::checksum::checksum(&err[20..]), 0);
    assert!(ip_ok(&err) && ip_ok(&err[28..]));
}

#[test]
fn table_bound_and_per_host_limit() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_mappings: 10,
            max_per_host: 6,
            ..config()
        },
    )
    .unwrap();
    // Answered flows (assured) are never early-dropped.
    let answered = |g: &mut Gateway, h: Ipv4Addr, port: u16| {
        let mut p = udp(h, port, SRV, 53, b"q");
        assert_eq!(out(g, now, &mut p), Verdict::Forward);
        swap(&mut p);
        assert_eq!(inb(g, now, &mut p), Verdict::Forward);
    };
    for port in 0..6 {
        answered(&mut g, H1, 10000 + port);
    }
    let mut p = udp(H1, 20000, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::HostLimit)
    );
    for port in 0..4 {
        answered(&mut g, H2, 10000 + port);
    }
    let mut p = udp(H2, 20000, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::TableFull)
    );
    let mut syn = tcp(SRV, 1, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(
        inb(&mut g, now, &mut syn),
        Verdict::Drop(DropReason::TableFull)
    );
    // Existing flows keep working.
    let mut p = udp(H1, 10000, SRV, 53, b"again");
    assert_eq!(out(&mut g, now, &mut p), Verdict::Forward);
    assert_eq!(g.table().len(), 10);
    // Refused flows leave no mapping behind.
    assert_eq!(g.table().mappings(), 10 + 2);
}

#[test]
fn expiry_by_timer_wheel() {
    let now = epoch();
    let timeouts = Timeouts {
        udp: Duration::from_secs(30),
        tcp_established: Duration::from_secs(600),
        tcp_transitory: Duration::from_secs(20),
        icmp: Duration::from_secs(10),
    };
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            timeouts,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(g.poll_timeout(), None);
    let mut u = udp(H1, 7000, SRV, 53, b"q");
    let _ = out(&mut g, now, &mut u);
    let mut s = tcp(H1, 7001, SRV, 80, TcpFlags::SYN, b"");
    let _ = out(&mut g, now, &mut s);
    let mut sa = tcp(SRV, 80, PUBLIC, 7001, TcpFlags::SYN_ACK, b"");
    let _ = inb(&mut g, now, &mut sa);
    let mut a = tcp(H1, 7001, SRV, 80, TcpFlags::ACK, b"");
    let _ = out(&mut g, now, &mut a);
    let mut e = echo(H1, SRV, 3, true);
    let _ = out(&mut g, now, &mut e);
    assert_eq!(g.table().len(), 3);
    let step = |g: &mut Gateway, secs: u64| {
        let t = now + Duration::from_secs(secs);
        while let Some(d) = g.poll_timeout() {
            if d > t {
                break;
            }
            g.handle_timeout(t);
        }
    };
    step(&mut g, 12);
    assert_eq!(g.table().len(), 2, "icmp gone after 10 s");
    // Refresh the UDP flow at 25 s: it lives until 55 s.
    let mut u = udp(H1, 7000, SRV, 53, b"q");
    let _ = out(&mut g, now + Duration::from_secs(25), &mut u);
    step(&mut g, 40);
    assert_eq!(g.table().len(), 2);
    step(&mut g, 57);
    assert_eq!(g.table().len(), 1, "udp gone; established tcp stays");
    // FIN both ways: transitory timeout.
    let mut f = tcp(H1, 7001, SRV, 80, TcpFlags::FIN_ACK, b"");
    let _ = out(&mut g, now + Duration::from_secs(60), &mut f);
    let mut f2 = tcp(SRV, 80, PUBLIC, 7001, TcpFlags::FIN_ACK, b"");
    let _ = inb(&mut g, now + Duration::from_secs(60), &mut f2);
    step(&mut g, 79);
    assert_eq!(g.table().len(), 1);
    step(&mut g, 82);
    assert!(g.table().is_empty());
    assert_eq!(g.poll_timeout(), None);
    assert_eq!(g.table().mappings(), 2, "only the static mappings are left");
    assert_eq!(g.stats().flows_removed, 3);
}

#[test]
fn long_timeouts_survive_wheel_laps() {
    let now = epoch();
    let mut g = Gateway::new(now, config()).unwrap();
    let mut s = tcp(H1, 7001, SRV, 80, TcpFlags::SYN, b"");
    let _ = out(&mut g, now, &mut s);
    let mut sa = tcp(SRV, 80, PUBLIC, 7001, TcpFlags::SYN_ACK, b"");
    let _ = inb(&mut g, now, &mut sa);
    let mut a = tcp(H1, 7001, SRV, 80, TcpFlags::ACK, b"");
    let _ = out(&mut g, now, &mut a);
    // 2 h 4 min default; jump in big steps.
    for secs in [3000, 6000, 7000, 7439] {
        g.handle_timeout(now + Duration::from_secs(secs));
        assert_eq!(g.table().len(), 1, "still there at {secs}");
    }
    g.handle_timeout(now + Duration::from_secs(7441));
    assert!(g.table().is_empty());
}

#[test]
fn acl_deny_is_counted() {
    let now = epoch();
    let acl = vec![
        AclRule {
            src: Some("192.168.101.11/32".parse().unwrap()),
            ..AclRule::any(AclAction::Deny)
        },
        AclRule {
            src: Some("198.51.100.66/32".parse().unwrap()),
            ..AclRule::any(AclAction::Deny)
        },
        AclRule {
            src: Some("192.168.101.0/24".parse().unwrap()),
            ..AclRule::any(AclAction::Permit)
        },
    ];
    let inside_networks = vec![
        "192.168.101.0/24".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            acl,
            inside_networks,
            ..config()
        },
    )
    .unwrap();
    let mut p = udp(H2, 1, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::AclDenied)
    );
    let mut p = udp(H1, 1, SRV, 53, b"q");
    assert_eq!(out(&mut g, now, &mut p), Verdict::Forward);
    let mut p = tcp(
        Ipv4Addr::new(198, 51, 100, 66),
        1,
        PUBLIC,
        8001,
        TcpFlags::SYN,
        b"",
    );
    assert_eq!(
        inb(&mut g, now, &mut p),
        Verdict::Drop(DropReason::AclDenied)
    );
    let mut p = udp(Ipv4Addr::new(10, 1, 1, 1), 1, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::AclDenied)
    );
    let hits: Vec<u64> = g.acl_rules().map(|(_, h)| h).collect();
    assert_eq!(hits, vec![1, 1, 1]);
    assert_eq!(g.acl_implicit_denies(), 1);
    assert_eq!(g.stats().drops.get(DropReason::AclDenied), 3);
}

#[test]
fn clear_removes_dynamic_keeps_static() {
    let (mut g, now) = gw();
    let mut p = udp(H1, 1, SRV, 53, b"q");
    let _ = out(&mut g, now, &mut p);
    let mut syn = tcp(SRV, 50000, PUBLIC, 8001, TcpFlags::SYN, b"");
    let _ = inb(&mut g, now, &mut syn);
    assert_eq!(g.clear(now), 2);
    assert!(g.table().is_empty());
    let mut syn = tcp(SRV, 50001, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 80));
}

#[test]
fn ttl_compensation() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            compensate_ttl: true,
            ..config()
        },
    )
    .unwrap();
    let mut p = udp(H1, 1, SRV, 53, b"q");
    let _ = out(&mut g, now, &mut p);
    assert_eq!(p[8], 65);
    assert!(ip_ok(&p));
}

/// A virtual service spreading flows over two backends (round robin).
fn two_backends(listen: SocketAddrV4) -> crate::VirtualService {
    let backend = |last| {
        balance::BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080), 1)
    };
    crate::VirtualService::new(crate::ServiceConfig {
        name: "two".into(),
        listen,
        ports: None,
        pool: balance::PoolConfig {
            scheduler: balance::SchedulerKind::Rr,
            backends: vec![backend(100), backend(101)],
            ..balance::PoolConfig::default()
        },
        health: None,
        forward: crate::Forward::Nat,
        proto: Proto::Tcp,
        one_packet: false,
    })
    .unwrap()
}

#[test]
fn listener_flows_keep_their_backend_and_report_events() {
    let now = epoch();
    let inside_networks = vec!["10.0.0.0/24".parse().unwrap()];
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            inside_networks,
            ..config()
        },
    )
    .unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
    let id = g.add_listener(Proto::Tcp, vip, two_backends(vip)).unwrap();
    assert!(g.public_addresses().contains(vip.ip()));
    let mut c1 = tcp(SRV, 1001, *vip.ip(), 80, TcpFlags::SYN, b"");
    let mut c2 = tcp(SRV, 1002, *vip.ip(), 80, TcpFlags::SYN, b"");
    assert_eq!(g.direction(&c1), Direction::Inbound);
    let _ = inb(&mut g, now, &mut c1);
    let _ = inb(&mut g, now, &mut c2);
    let b1 = dst(&c1);
    let b2 = dst(&c2);
    assert_ne!(b1, b2);
    // Replies from each backend go back as the VIP.
    let mut r1 = tcp(*b1.ip(), 8080, SRV, 1001, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(&mut g, now, &mut r1), Verdict::Forward);
    assert_eq!(src(&r1), vip);
    // Later packets of flow 1 stay on backend 1.
    let mut d1 = tcp(SRV, 1001, *vip.ip(), 80, TcpFlags::ACK, b"data");
    let _ = inb(&mut g, now, &mut d1);
    assert_eq!(dst(&d1), b1);
    assert_eq!(g.listener(id).unwrap().flows_opened, 2);
    let active = |g: &mut Gateway| {
        let svc = g.selector_mut(id).unwrap().as_service_mut().unwrap();
        svc.pool()
            .backend(svc.backend_id(b1).unwrap())
            .unwrap()
            .active()
    };
    assert_eq!(active(&mut g), 1, "the handshake made flow 1 established");
    g.clear(now);
    // The events reached the service: backend 1 saw one connection open, establish and
    // close.
    let svc = g.selector_mut(id).unwrap().as_service_mut().unwrap();
    let b = svc.pool().backend(svc.backend_id(b1).unwrap()).unwrap();
    assert_eq!((b.stats().connections, b.active(), b.inactive()), (1, 0, 0));
}

#[test]
fn reconfigure_keeps_flows() {
    let (mut g, now) = gw();
    let mut p = udp(H1, 1000, SRV, 53, b"q");
    let _ = out(&mut g, now, &mut p);
    let mut cfg = config();
    cfg.acl = vec![AclRule {
        src: Some("192.168.101.11/32".parse().unwrap()),
        ..AclRule::any(AclAction::Deny)
    }];
    cfg.statics.push(StaticEntry {
        proto: Proto::Tcp,
        public: SocketAddrV4::new(PUBLIC, 20022),
        inside: SocketAddrV4::new(WEB, 22),
    });
    assert_eq!(g.reconfigure(now, cfg.clone()), Ok(Reconfigured::Live));
    assert_eq!(g.table().len(), 1);
    let mut p = udp(H2, 1000, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::AclDenied)
    );
    let mut syn = tcp(SRV, 5, PUBLIC, 20022, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 22));
    // Removing a forward is live; moving the overload address needs a restart.
    cfg.statics.remove(0);
    assert_eq!(g.reconfigure(now, cfg), Ok(Reconfigured::Live));
    assert_eq!(g.table().len(), 2, "the other flows stay");
    let moved = GatewayConfig {
        overload: Some(SRV2),
        ..config()
    };
    assert!(matches!(
        g.reconfigure(now, moved),
        Ok(Reconfigured::NeedsRestart(_))
    ));
}

#[test]
fn duplicate_forwards_are_rejected() {
    let now = epoch();
    let mut cfg = config();
    cfg.statics.push(cfg.statics[0]);
    assert!(Gateway::new(now, cfg).is_err());
}

#[test]
fn fragments_and_other_protocols() {
    let (mut g, now) = gw();
    let mut frag = udp(H1, 1, SRV, 53, &[0u8; 64]);
    frag[6] = 0x00;
    frag[7] = 0x10; // offset 128 bytes
    netutil::bytes::put16(&mut frag, 10, 0);
    let c = netutil::checksum::checksum(&frag[..20]);
    netutil::bytes::put16(&mut frag, 10, c);
    assert_eq!(
        out(&mut g, now, &mut frag),
        Verdict::Drop(DropReason::Fragment)
    );
    // A protocol the gateway cannot translate would leave with its private source.
    let mut gre = udp(H1, 1, SRV, 53, b"x");
    gre[9] = 47;
    assert_eq!(
        out(&mut g, now, &mut gre),
        Verdict::Drop(DropReason::Untranslatable)
    );
    // To the host's own address it passes untouched.
    let mut gre = udp(SRV, 1, PUBLIC, 53, b"x");
    gre[9] = 47;
    let orig = gre.clone();
    assert_eq!(inb(&mut g, now, &mut gre), Verdict::Forward);
    assert_eq!(gre, orig);
    let mut short = vec![0x45, 0, 0];
    assert_eq!(
        out(&mut g, now, &mut short),
        Verdict::Drop(DropReason::Malformed)
    );
}

/// Replays the fuzz corpus (fuzz/corpus/nat_gateway) so CI exercises it on stable.
#[test]
fn fuzz_corpus_replays() {
    let n = replay_corpus("nat_gateway", |data| {
        crate::fuzzing::run_gateway(epoch(), data);
    });
    assert!(n > 0, "no nat_gateway seeds");
}

fn arb_packet() -> impl Strategy<Value = (u8, [u8; 4], u16, [u8; 4], u16, Vec<u8>, u8)> {
    (
        0u8..4,
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        0u8..5,
    )
}

proptest! {
    /// Outbound translation followed by the reply's inbound translation gives back exactly the
    /// reply the inside host expects, with valid checksums all along.
    #[test]
    fn translate_then_reverse_is_identity(
        (kind, host, sport, remote, dport, payload, flags) in arb_packet(),
    ) {
        let now = epoch();
        let mut g = Gateway::new(now, GatewayConfig { inside_networks: vec![], ..config() }).unwrap();
        let inside = Ipv4Addr::new(192, 168, 101, host[3]);
        let remote = Ipv4Addr::from(remote);
        prop_assume!(remote != PUBLIC && !remote.is_unspecified());
        let sport = sport.max(1);
        let orig = match kind {
            0 => tcp(inside, sport, remote, dport, [TcpFlags::SYN, TcpFlags::SYN_ACK, TcpFlags::ACK, TcpFlags::FIN_ACK, TcpFlags::RST][usize::from(flags)], &payload),
            1 => udp(inside, sport, remote, dport, &payload),
            2 => { let mut u = udp(inside, sport, remote, dport, &payload); netutil::bytes::put16(&mut u, 26, 0); u }
            _ => echo(inside, remote, sport, true),
        };
        let mut p = orig.clone();
        prop_assert_eq!(out(&mut g, now, &mut p), Verdict::Forward);
        prop_assert!(ip_ok(&p) && l4_checksum_ok(&p));
        prop_assert_eq!(Ipv4Addr::from([p[12], p[13], p[14], p[15]]), PUBLIC);
        let mut reply = p.clone();
        swap(&mut reply);
        if kind == 3 {
            // Echo request -> reply: type 8 -> 0, checksum adjusted.
            reply[20] = 0;
            let c = netutil::checksum::adjust16(netutil::bytes::get16(&reply, 22), 0x0800, 0x0000);
            netutil::bytes::put16(&mut reply, 22, c);
        }
        let v = inb(&mut g, now, &mut reply);
        prop_assert_eq!(v, Verdict::Forward);
        let mut expected = orig.clone();
        swap(&mut expected);
        if kind == 3 {
            expected[20] = 0;
            let c = netutil::checksum::adjust16(netutil::bytes::get16(&expected, 22), 0x0800, 0x0000);
            netutil::bytes::put16(&mut expected, 22, c);
        }
        prop_assert!(ip_ok(&reply) && l4_checksum_ok(&reply));
        // Checksum words may differ only in the 0x0000/0xffff representation.
        let norm = |b: &mut Vec<u8>| {
            let ihl = usize::from(b[0] & 0xf) * 4;
            let at = match b[9] { 6 => ihl + 16, 17 => ihl + 6, _ => ihl + 2 };
            if netutil::bytes::get16(b, at) == 0xffff && b[9] != 17 { netutil::bytes::put16(b, at, 0); }
        };
        let (mut a, mut b) = (reply.clone(), expected.clone());
        norm(&mut a);
        norm(&mut b);
        prop_assert_eq!(a, b);
    }

    /// Arbitrary bytes never panic the gateway, in either direction.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        crate::fuzzing::run_gateway(epoch(), &data);
    }

    /// Near-valid packets (valid IPv4 header, random rest) never panic either.
    #[test]
    fn mutated_packets_never_panic(
        (kind, host, sport, remote, dport, payload, _f) in arb_packet(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        inbound in any::<bool>(),
    ) {
        let now = epoch();
        let mut g = Gateway::new(now, config()).unwrap();
        let mut p = match kind {
            0 => tcp(Ipv4Addr::from(host), sport, Ipv4Addr::from(remote), dport, TcpFlags::SYN, &payload),
            1 => udp(Ipv4Addr::from(host), sport, PUBLIC, dport, &payload),
            2 => icmp_error(Ipv4Addr::from(remote), PUBLIC, &udp(PUBLIC, sport, Ipv4Addr::from(remote), dport, &payload)),
            _ => echo(Ipv4Addr::from(host), Ipv4Addr::from(remote), sport, true),
        };
        for (i, v) in flips {
            let at = i.index(p.len());
            p[at] = v;
        }
        let dir = if inbound { Direction::Inbound } else { Direction::Outbound };
        let _ = g.handle_packet(now, dir, &mut p);
    }

    /// However many flows are attempted, the table never exceeds its bound, and expiry
    /// always brings it back to empty.
    #[test]
    fn table_stays_bounded(
        flows in proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u8>(), any::<u16>()), 1..300),
        max in 1usize..64,
    ) {
        let now = epoch();
        let mut g = Gateway::new(now, GatewayConfig { max_mappings: max, max_per_host: max, ..config() }).unwrap();
        for (h, sp, r, dp) in flows {
            let mut p = udp(Ipv4Addr::new(192, 168, 101, h), sp, Ipv4Addr::new(203, 0, 113, r), dp, b"x");
            let _ = out(&mut g, now, &mut p);
            prop_assert!(g.table().len() <= max);
        }
        g.handle_timeout(now + Duration::from_secs(301));
        prop_assert!(g.table().is_empty());
        prop_assert_eq!(g.table().mappings(), 2);
    }
}

/// Where the transport checksum of a TCP/UDP packet is.
fn l4_csum_at(b: &[u8]) -> usize {
    let ihl = usize::from(b[0] & 0xf) * 4;
    ihl + if b[9] == 6 { 16 } else { 6 }
}

/// The packet as a TUN with offload hands it over with `NEEDS_CSUM`: the transport checksum
/// field holds the folded pseudo-header sum, not complemented (the kernel's CHECKSUM_PARTIAL).
fn to_partial(b: &mut [u8]) {
    let ihl = usize::from(b[0] & 0xf) * 4;
    let len = u16::try_from(b.len() - ihl).unwrap();
    let acc = netutil::checksum::pseudo_header_v4(
        [b[12], b[13], b[14], b[15]],
        [b[16], b[17], b[18], b[19]],
        b[9],
        len,
    );
    let at = l4_csum_at(b);
    netutil::bytes::put16(b, at, netutil::checksum::fold(acc));
}

/// What the kernel does with a partial checksum on the way out.
fn finish(b: &mut [u8]) {
    let ihl = usize::from(b[0] & 0xf) * 4;
    let offset = l4_csum_at(b) - ihl;
    let udp = b[9] == 17;
    assert!(translate::finish_partial_checksum(b, ihl, offset, udp));
}

/// Checksum words may differ only in the representation of zero (0x0000 / 0xffff) for TCP.
fn same_packet(a: &[u8], b: &[u8]) -> bool {
    let norm = |x: &[u8]| {
        let mut x = x.to_vec();
        let at = l4_csum_at(&x);
        if x[9] == 6 && netutil::bytes::get16(&x, at) == 0xffff {
            netutil::bytes::put16(&mut x, at, 0);
        }
        x
    };
    norm(a) == norm(b)
}

fn partial(segments: u32) -> PacketMeta {
    PacketMeta {
        l4_checksum: L4Checksum::Partial,
        segments,
    }
}

#[test]
fn super_packet_with_partial_checksum_round_trip() {
    let (mut g, now) = gw();
    let mut syn = tcp(H1, 40000, SRV, 80, TcpFlags::SYN, b"");
    assert_eq!(out(&mut g, now, &mut syn), Verdict::Forward);
    // A 3-segment super-packet of data from the inside host.
    let orig = tcp(H1, 40000, SRV, 80, TcpFlags::ACK, &[0x5a; 4000]);
    let mut p = orig.clone();
    to_partial(&mut p);
    let v = g.handle_super_packet(now, Direction::Outbound, &mut p, partial(3));
    assert_eq!(v, Verdict::Forward);
    assert!(ip_ok(&p), "the IPv4 header checksum is always complete");
    assert_eq!(src(&p), SocketAddrV4::new(PUBLIC, 40000));
    finish(&mut p);
    assert!(l4_checksum_ok(&p));
    assert_eq!(g.stats().translated_out, 1 + 3, "counted by segments");
    // And the reply's super-packet back in.
    let mut reply = p.clone();
    swap(&mut reply);
    to_partial(&mut reply);
    let v = g.handle_super_packet(now, Direction::Inbound, &mut reply, partial(2));
    assert_eq!(v, Verdict::Forward);
    finish(&mut reply);
    let mut expected = orig.clone();
    swap(&mut expected);
    assert!(ip_ok(&reply) && l4_checksum_ok(&reply));
    assert!(same_packet(&reply, &expected));
    assert_eq!(g.stats().translated_in, 2);
}

#[test]
fn static_forward_super_packet_keeps_partial_checksum() {
    let (mut g, now) = gw();
    let mut syn = tcp(SRV, 5555, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    let mut p = tcp(SRV, 5555, PUBLIC, 8001, TcpFlags::ACK, &[7; 9000]);
    to_partial(&mut p);
    assert_eq!(
        g.handle_super_packet(now, Direction::Inbound, &mut p, partial(7)),
        Verdict::Forward
    );
    assert_eq!(dst(&p), SocketAddrV4::new(WEB, 80));
    finish(&mut p);
    assert!(ip_ok(&p) && l4_checksum_ok(&p));
}

#[test]
fn dropped_super_packet_counts_its_segments() {
    let (mut g, now) = gw();
    // A RST to a forward opens nothing: refused, and all 5 segments count.
    let mut p = tcp(SRV, 5555, PUBLIC, 8001, TcpFlags::RST_ACK, &[1; 6000]);
    to_partial(&mut p);
    let v = g.handle_super_packet(now, Direction::Inbound, &mut p, partial(5));
    assert_eq!(v, Verdict::Drop(DropReason::NotSyn));
    assert_eq!(g.stats().drops.get(DropReason::NotSyn), 5);
}

#[test]
fn fin_on_a_super_packet_moves_the_flow_to_closing() {
    let (mut g, now) = gw();
    // A retransmitted SYN, turned into the server's SYN-ACK.
    let mut syn = tcp(H1, 40001, SRV, 80, TcpFlags::SYN, b"");
    let _ = out(&mut g, now, &mut syn);
    let mut synack = syn.clone();
    swap(&mut synack);
    synack[33] = 0x12;
    let _ = inb(&mut g, now, &mut synack);
    let mut ack = tcp(H1, 40001, SRV, 80, TcpFlags::ACK, b"");
    let _ = out(&mut g, now, &mut ack);
    assert!(g.translations(now).iter().any(|t| t.established));
    // The last run of data carries the FIN (it belongs to its last segment).
    let mut p = tcp(H1, 40001, SRV, 80, TcpFlags::FIN_ACK, &[3; 3000]);
    to_partial(&mut p);
    let _ = g.handle_super_packet(now, Direction::Outbound, &mut p, partial(3));
    let mut fin = tcp(SRV, 80, PUBLIC, 40001, TcpFlags::FIN_ACK, b"");
    let _ = inb(&mut g, now, &mut fin);
    assert!(g.translations(now).iter().all(|t| !t.established));
}

proptest! {
    /// With a partial transport checksum (TUN offload), translating and then finishing the
    /// checksum gives exactly what translating the same packet with a complete checksum gives,
    /// both ways, hairpin included.
    #[test]
    fn partial_checksum_matches_full_recomputation(
        (kind, host, sport, remote, dport, payload, flags) in arb_packet(),
        segments in 1u32..45,
        hairpin in any::<bool>(),
    ) {
        let now = epoch();
        let cfg = GatewayConfig { inside_networks: vec![], ..config() };
        let (mut full, mut part) = (Gateway::new(now, cfg.clone()).unwrap(), Gateway::new(now, cfg).unwrap());
        let inside = Ipv4Addr::new(192, 168, 101, host[3]);
        let remote = Ipv4Addr::from(remote);
        prop_assume!(remote != PUBLIC && !remote.is_unspecified());
        let sport = sport.max(1);
        let (remote, dport) = if hairpin { (PUBLIC, 8001) } else { (remote, dport) };
        let kinds = [TcpFlags::SYN, TcpFlags::ACK, TcpFlags::FIN_ACK, TcpFlags::RST, TcpFlags::SYN_ACK];
        let orig = if kind % 2 == 0 || hairpin {
            let k = if hairpin { TcpFlags::SYN } else { kinds[usize::from(flags)] };
            tcp(inside, sport, remote, dport, k, &payload)
        } else {
            udp(inside, sport, remote, dport, &payload)
        };
        let mut a = orig.clone();
        let va = full.handle_packet(now, Direction::Outbound, &mut a);
        let mut b = orig.clone();
        to_partial(&mut b);
        let vb = part.handle_super_packet(now, Direction::Outbound, &mut b, partial(segments));
        prop_assert_eq!(va, vb);
        if va == Verdict::Forward {
            prop_assert!(ip_ok(&b));
            finish(&mut b);
            prop_assert!(l4_checksum_ok(&b));
            prop_assert!(same_packet(&a, &b));
            if !hairpin {
                // The reply, back in.
                let mut ra = a.clone();
                swap(&mut ra);
                let mut rb = ra.clone();
                to_partial(&mut rb);
                let va = full.handle_packet(now, Direction::Inbound, &mut ra);
                let vb = part.handle_super_packet(now, Direction::Inbound, &mut rb, partial(segments));
                prop_assert_eq!(va, vb);
                if va == Verdict::Forward {
                    finish(&mut rb);
                    prop_assert!(ip_ok(&rb) && l4_checksum_ok(&rb));
                    prop_assert!(same_packet(&ra, &rb));
                }
            }
        }
    }
}

/// A SYN through the TCP forward 8001 → WEB:80 from `port`, answered and acknowledged.
fn open_forward_flow(g: &mut Gateway, now: Instant, port: u16) {
    let mut syn = tcp(SRV, port, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(g, now, &mut syn), Verdict::Forward);
    let mut synack = tcp(WEB, 80, SRV, port, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(g, now, &mut synack), Verdict::Forward);
}

#[test]
fn removing_a_static_forward_is_live_and_closes_only_its_flows() {
    let (mut g, now) = gw();
    open_forward_flow(&mut g, now, 5000);
    // A flow through the UDP forward, and a dynamic one.
    let mut q = udp(SRV, 6000, PUBLIC, 5353, b"q");
    assert_eq!(inb(&mut g, now, &mut q), Verdict::Forward);
    let mut d = udp(H1, 1000, SRV2, 53, b"q");
    assert_eq!(out(&mut g, now, &mut d), Verdict::Forward);
    assert_eq!(g.table().len(), 3);
    let mappings = g.table().mappings();

    let mut cfg = config();
    cfg.statics.retain(|s| s.proto != Proto::Tcp);
    assert_eq!(g.reconfigure(now, cfg), Ok(Reconfigured::Live));

    // The TCP forward's flow and its permanent mapping are gone, nothing else.
    assert_eq!(g.table().len(), 2);
    assert_eq!(g.table().mappings(), mappings - 1);
    assert!(g.translations(now).iter().all(|t| t.public.port() != 8001));
    assert_eq!(g.static_entries().count(), 1);
    assert_eq!(g.stats().flows_removed, 1);
    // Its port no longer answers: a new SYN and the old flow's packets pass to the kernel
    // untouched (nothing owns the port any more).
    let mut syn = tcp(SRV, 5001, PUBLIC, 8001, TcpFlags::SYN, b"");
    let before = syn.clone();
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(syn, before);
    let mut old = tcp(SRV, 5000, PUBLIC, 8001, TcpFlags::ACK, b"data");
    let before = old.clone();
    let _ = inb(&mut g, now, &mut old);
    assert_eq!(old, before);
    // The web host's replies on the old flow are no longer translated to PUBLIC:8001.
    let mut reply = tcp(WEB, 80, SRV, 5000, TcpFlags::ACK, b"late");
    let _ = out(&mut g, now, &mut reply);
    assert_ne!(src(&reply), SocketAddrV4::new(PUBLIC, 8001));
    // The other forward and the dynamic flow keep working, both ways.
    let mut q = udp(SRV, 6000, PUBLIC, 5353, b"again");
    assert_eq!(inb(&mut g, now, &mut q), Verdict::Forward);
    assert_eq!(dst(&q), SocketAddrV4::new(WEB, 53));
    let mut r = udp(SRV2, 53, PUBLIC, src(&d).port(), b"a");
    assert_eq!(inb(&mut g, now, &mut r), Verdict::Forward);
    assert_eq!(dst(&r), SocketAddrV4::new(H1, 1000));
}

#[test]
fn a_removed_forward_can_come_back_and_ids_stay_valid() {
    let (mut g, now) = gw();
    let mut cfg = config();
    let tcp_forward = cfg.statics.remove(0);
    assert_eq!(g.reconfigure(now, cfg.clone()), Ok(Reconfigured::Live));
    // The UDP forward (id 1) still answers after id 0 became a tombstone.
    let mut q = udp(SRV, 6000, PUBLIC, 5353, b"q");
    assert_eq!(inb(&mut g, now, &mut q), Verdict::Forward);
    assert_eq!(dst(&q), SocketAddrV4::new(WEB, 53));
    // Added back (to another inside port), it reuses the free id and answers again.
    let moved = StaticEntry {
        inside: SocketAddrV4::new(WEB, 8080),
        ..tcp_forward
    };
    cfg.statics.push(moved);
    assert_eq!(g.reconfigure(now, cfg.clone()), Ok(Reconfigured::Live));
    assert_eq!(g.listeners().count(), 2);
    assert!(g.listener(ListenerId(0)).is_some());
    let mut syn = tcp(SRV, 5001, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 8080));
    // A changed forward (same public port, new inside) is applied live too.
    cfg.statics.pop();
    cfg.statics.push(tcp_forward);
    assert_eq!(g.reconfigure(now, cfg), Ok(Reconfigured::Live));
    let mut syn = tcp(SRV, 5002, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(dst(&syn), SocketAddrV4::new(WEB, 80));
}

#[test]
fn a_clashing_new_forward_changes_nothing() {
    let (mut g, now) = gw();
    open_forward_flow(&mut g, now, 5000);
    let mut cfg = config();
    // Removes the UDP forward but adds one on the TCP forward's public port: refused whole.
    cfg.statics.truncate(1);
    cfg.statics.push(StaticEntry {
        proto: Proto::Tcp,
        public: SocketAddrV4::new(PUBLIC, 8001),
        inside: SocketAddrV4::new(H2, 80),
    });
    assert!(matches!(
        g.reconfigure(now, cfg),
        Err(NatError::DuplicatePublic { .. })
    ));
    assert_eq!(g.static_entries().count(), 2);
    assert_eq!(g.table().len(), 1);
}

#[test]
fn remove_listener_of_a_service_keeps_static_flows() {
    let (mut g, now) = gw();
    open_forward_flow(&mut g, now, 5000);
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
    let id = g
        .add_listener(
            Proto::Tcp,
            vip,
            StaticForward {
                inside: SocketAddrV4::new(H2, 80),
            },
        )
        .unwrap();
    let mut syn = tcp(SRV, 7000, *vip.ip(), 80, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(g.table().len(), 2);
    assert_eq!(g.remove_listener(id), Some(1));
    assert_eq!(g.remove_listener(id), None);
    assert_eq!(g.table().len(), 1);
    assert!(!g.public_addresses().contains(vip.ip()));
}

/// Cuts an IPv4 packet (20-byte header) into fragments of `size` payload bytes (rounded down
/// to a multiple of 8), with IP id `id`, as a router on a smaller MTU would.
fn fragment(pkt: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    let size = (size / 8).max(1) * 8;
    let payload = &pkt[20..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + size).min(payload.len());
        let mut f = pkt[..20].to_vec();
        f.extend_from_slice(&payload[off..end]);
        let len = u16::try_from(f.len()).unwrap();
        f[2..4].copy_from_slice(&len.to_be_bytes());
        f[4..6].copy_from_slice(&id.to_be_bytes());
        let more = if end < payload.len() { 0x2000 } else { 0 };
        let flags_offset = more | u16::try_from(off / 8).unwrap();
        f[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        f[10..12].copy_from_slice(&[0, 0]);
        let c = netutil::checksum::checksum(&f[..20]);
        f[10..12].copy_from_slice(&c.to_be_bytes());
        out.push(f);
        off = end;
    }
    out
}

/// Puts fragments (in order, 20-byte headers) back together as one unfragmented packet.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut p = frags[0][..20].to_vec();
    for f in frags {
        p.extend_from_slice(&f[20..]);
    }
    let len = u16::try_from(p.len()).unwrap();
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[6..8].copy_from_slice(&[0, 0]);
    p
}

#[test]
fn fragmented_datagrams_are_translated_both_ways() {
    let (mut g, now) = gw();
    let payload: Vec<u8> = (0..3000u32).map(|i| i.to_le_bytes()[0]).collect();
    let mut frags = fragment(&udp(H1, 4000, SRV, 7000, &payload), 1480, 77);
    assert_eq!(frags.len(), 3);
    for f in &mut frags {
        assert_eq!(out(&mut g, now, f), Verdict::Forward);
        assert!(ip_ok(f));
        assert_eq!(&f[12..16], &PUBLIC.octets());
        assert_eq!(&f[16..20], &SRV.octets());
    }
    let whole = reassemble(&frags);
    assert!(
        l4_checksum_ok(&whole),
        "the reassembled datagram's UDP checksum holds"
    );
    assert_eq!(src(&whole), SocketAddrV4::new(PUBLIC, 4000));
    assert_eq!(&whole[28..], &payload[..]);

    // The fragmented reply comes back to the inside host.
    let reply = udp(SRV, 7000, PUBLIC, 4000, &payload);
    let mut frags = fragment(&reply, 1000, 78);
    for f in &mut frags {
        assert_eq!(inb(&mut g, now, f), Verdict::Forward);
        assert!(ip_ok(f));
        assert_eq!(&f[16..20], &H1.octets());
    }
    let whole = reassemble(&frags);
    assert!(l4_checksum_ok(&whole));
    assert_eq!(dst(&whole), SocketAddrV4::new(H1, 4000));

    // A later fragment of a datagram whose first fragment was not seen: dropped, counted.
    let mut orphan = fragment(&udp(H1, 4000, SRV, 7000, &payload), 1480, 79).remove(1);
    assert_eq!(
        out(&mut g, now, &mut orphan),
        Verdict::Drop(DropReason::Fragment)
    );
    // Nor after the first fragment's entry has aged out.
    let mut late = fragment(&udp(H1, 4000, SRV, 7000, &payload), 1480, 80);
    assert_eq!(out(&mut g, now, &mut late[0]), Verdict::Forward);
    assert_eq!(
        out(&mut g, now + Duration::from_secs(31), &mut late[1]),
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(g.stats().drops.get(DropReason::Fragment), 2);
}

#[test]
fn fragments_of_a_denied_datagram_stay_dropped() {
    let mut cfg = config();
    cfg.acl = vec![AclRule {
        src: Some("192.168.101.10/32".parse().unwrap()),
        ..AclRule::any(AclAction::Deny)
    }];
    let now = epoch();
    let mut g = Gateway::new(now, cfg).unwrap();
    let mut frags = fragment(&udp(H1, 4000, SRV, 7000, &[1u8; 2000]), 1000, 5);
    for f in &mut frags {
        assert!(matches!(out(&mut g, now, f), Verdict::Drop(_)));
    }
}

proptest! {
    /// Translating the fragments one by one and reassembling them gives what translating the
    /// whole datagram gives.
    #[test]
    fn fragments_translate_like_the_whole_datagram(
        len in 9usize..4000,
        size in 8usize..1500,
        tcp_proto in any::<bool>(),
        seed in any::<u8>(),
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed).collect();
        let pkt = if tcp_proto {
            tcp(H1, 4000, SRV, 80, TcpFlags::SYN, &payload)
        } else {
            udp(H1, 4000, SRV, 7000, &payload)
        };
        let (mut g1, now) = gw();
        let mut whole = pkt.clone();
        prop_assert_eq!(out(&mut g1, now, &mut whole), Verdict::Forward);
        let (mut g2, _) = gw();
        // The transport header must fit in the first fragment, as routers make sure of.
        let mut frags = fragment(&pkt, size.max(40), 9);
        for f in &mut frags {
            prop_assert_eq!(out(&mut g2, now, f), Verdict::Forward);
            prop_assert!(ip_ok(f));
        }
        let joined = reassemble(&frags);
        prop_assert_eq!(&joined[12..], &whole[12..]);
        prop_assert!(l4_checksum_ok(&joined));
    }
}

#[test]
fn syn_flood_early_drops_half_open_flows_and_legitimate_clients_connect() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_mappings: 64,
            max_half_open_per_source: usize::MAX,
            ..config()
        },
    )
    .unwrap();
    // An established flow through the forward.
    let mut syn = tcp(SRV2, 999, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    let mut sa = tcp(WEB, 80, SRV2, 999, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(&mut g, now, &mut sa), Verdict::Forward);
    let mut ack = tcp(SRV2, 999, PUBLIC, 8001, TcpFlags::ACK, b"");
    assert_eq!(inb(&mut g, now, &mut ack), Verdict::Forward);
    // A flood of spoofed SYNs, each answered by the server (SYN-ACK): all half-open.
    for i in 0..1000u32 {
        let src = Ipv4Addr::from(0x0a00_0000 + i * 256);
        let mut syn = tcp(src, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
        assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
        let mut sa = tcp(WEB, 80, src, 1000, TcpFlags::SYN_ACK, b"");
        assert_eq!(out(&mut g, now, &mut sa), Verdict::Forward);
        assert!(g.table().len() <= 64);
    }
    assert!(g.stats().early_drops >= 1000 - 64);
    assert_eq!(g.stats().drops.get(DropReason::TableFull), 0);
    // The established flow survived; a legitimate client still connects.
    let mut data = tcp(SRV2, 999, PUBLIC, 8001, TcpFlags::ACK, b"x");
    assert_eq!(inb(&mut g, now, &mut data), Verdict::Forward);
    let mut syn = tcp(SRV, 2000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    let established = g.translations(now).iter().filter(|t| t.established).count();
    assert_eq!(established, 1);
}

#[test]
fn half_open_flows_are_bounded_per_source_network() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_half_open_per_source: 3,
            ..config()
        },
    )
    .unwrap();
    for port in 0..3 {
        let mut syn = tcp(
            Ipv4Addr::new(203, 0, 113, port as u8),
            port,
            PUBLIC,
            8001,
            TcpFlags::SYN,
            b"",
        );
        assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    }
    let mut syn = tcp(
        Ipv4Addr::new(203, 0, 113, 77),
        9,
        PUBLIC,
        8001,
        TcpFlags::SYN,
        b"",
    );
    assert_eq!(
        inb(&mut g, now, &mut syn),
        Verdict::Drop(DropReason::HalfOpenSource)
    );
    // Another /24 is not affected.
    let mut syn = tcp(
        Ipv4Addr::new(203, 0, 114, 1),
        9,
        PUBLIC,
        8001,
        TcpFlags::SYN,
        b"",
    );
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
}

#[test]
fn unowned_traffic_to_a_vip_is_answered_or_dropped_never_passed() {
    let (mut g, now) = gw();
    let vip = Ipv4Addr::new(198, 51, 100, 10);
    g.add_listener(
        Proto::Tcp,
        SocketAddrV4::new(vip, 80),
        StaticForward {
            inside: SocketAddrV4::new(WEB, 8080),
        },
    )
    .unwrap();
    let mut ping = echo(SRV, vip, 9, true);
    assert_eq!(inb(&mut g, now, &mut ping), Verdict::Forward);
    assert_eq!(ping[20], 0, "echo reply");
    assert_eq!(src(&ping).ip(), &vip);
    assert_eq!(dst(&ping).ip(), &SRV);
    assert!(ip_ok(&ping) && l4_checksum_ok(&ping));
    let mut syn = tcp(SRV, 4000, vip, 22, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(src(&syn), SocketAddrV4::new(vip, 22));
    assert_eq!(syn[33] & 0x04, 0x04, "RST");
    assert!(ip_ok(&syn) && l4_checksum_ok(&syn));
    let mut rst = tcp(SRV, 4000, vip, 22, TcpFlags::RST, b"");
    assert_eq!(
        inb(&mut g, now, &mut rst),
        Verdict::Drop(DropReason::Unowned)
    );
    let mut u = udp(SRV, 4000, vip, 53, b"q");
    assert_eq!(inb(&mut g, now, &mut u), Verdict::Drop(DropReason::Unowned));
    // Hairpin from the inside too.
    let mut u = udp(H1, 4000, vip, 53, b"q");
    assert_eq!(out(&mut g, now, &mut u), Verdict::Drop(DropReason::Unowned));
    assert_eq!(g.stats().answered_echo, 1);
    assert_eq!(g.stats().answered_rst, 1);
    assert_eq!(g.stats().passed_through, 0);
    // The host's own address still passes.
    let mut ping = echo(SRV, PUBLIC, 9, true);
    let orig = ping.clone();
    assert_eq!(inb(&mut g, now, &mut ping), Verdict::Forward);
    assert_eq!(ping, orig);
}

#[test]
fn spoofed_inside_sources_and_icmp_errors_are_dropped() {
    let (mut g, now) = gw();
    let mut p = udp(Ipv4Addr::new(172, 16, 0, 1), 1, SRV, 53, b"q");
    assert_eq!(
        out(&mut g, now, &mut p),
        Verdict::Drop(DropReason::SpoofedSource)
    );
    // H2 reporting an error about H1's flow.
    let mut u = udp(H1, 5000, SRV, 53, b"q");
    assert_eq!(out(&mut g, now, &mut u), Verdict::Forward);
    let mut reply = udp(SRV, 53, PUBLIC, src(&u).port(), b"r");
    assert_eq!(inb(&mut g, now, &mut reply), Verdict::Forward);
    let mut err = icmp_error(H2, SRV, &udp(SRV, 53, H1, 5000, b"r"));
    assert_eq!(
        out(&mut g, now, &mut err),
        Verdict::Drop(DropReason::IcmpErrorSpoofed)
    );
}

#[test]
fn inbound_to_a_dynamic_mapping_needs_a_syn_and_an_in_window_rst() {
    let (mut g, now) = gw();
    let mut s = tcp(H1, 41000, SRV, 80, TcpFlags::SYN, b"");
    assert_eq!(out(&mut g, now, &mut s), Verdict::Forward);
    let public = src(&s);
    // Another port of the same remote: a non-SYN cannot open a session.
    let mut a = tcp(SRV, 81, *public.ip(), public.port(), TcpFlags::ACK, b"");
    assert_eq!(inb(&mut g, now, &mut a), Verdict::Drop(DropReason::NotSyn));
    let mut sa = tcp(SRV, 80, *public.ip(), public.port(), TcpFlags::SYN_ACK, b"");
    assert_eq!(inb(&mut g, now, &mut sa), Verdict::Forward);
    let mut ack = tcp(H1, 41000, SRV, 80, TcpFlags::ACK, b"");
    assert_eq!(out(&mut g, now, &mut ack), Verdict::Forward);
    // A blind RST far outside the window is refused; the flow stays established.
    let mut rst = tcp(SRV, 80, *public.ip(), public.port(), TcpFlags::RST, b"");
    rst[24..28].copy_from_slice(&0x8000_0000u32.to_be_bytes());
    let c = {
        let mut v = Vec::new();
        let t = etherparse::TcpHeaderSlice::from_slice(&rst[20..])
            .unwrap()
            .to_header();
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&rst)
            .unwrap()
            .to_header();
        v.push(t.calc_checksum_ipv4(&ip, &[]).unwrap());
        v[0]
    };
    rst[36..38].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        inb(&mut g, now, &mut rst),
        Verdict::Drop(DropReason::RstOutOfWindow)
    );
    assert!(g.translations(now)[0].established);
}

/// Found by `nat_sequence` (10M campaign, 2026-12-02): a refused flow's early drop evicted
/// the last session of the very mapping being opened, and releasing that "unused" mapping put
/// its freed slot on the free list a second time; two mappings then shared the slot and a
/// session count went below zero.
#[test]
fn early_drop_that_frees_the_mapping_being_opened_does_not_free_it_twice() {
    let data = include_bytes!(
        "../../../fuzz/corpus/nat_sequence/early_drop_frees_the_mapping_being_opened"
    );
    crate::fuzzing::run_sequence(epoch(), data);
}

#[test]
fn sequence_fuzz_corpus_replays() {
    let n = replay_corpus("nat_sequence", |data| {
        crate::fuzzing::run_sequence(epoch(), data);
    });
    assert!(n > 0, "no nat_sequence seeds");
}

proptest! {
    /// Arbitrary step sequences keep every invariant `run_sequence` asserts.
    #[test]
    fn arbitrary_sequences_keep_the_table_invariants(
        data in proptest::collection::vec(any::<u8>(), 0..400)
    ) {
        crate::fuzzing::run_sequence(epoch(), &data);
    }
}

#[test]
fn translations_where_selects_bounds_and_names_states_as_ipvsadm() {
    let (mut g, now) = gw();
    for port in [40001, 40002, 40003] {
        let mut syn = tcp(H1, port, SRV, 80, TcpFlags::SYN, b"");
        let _ = out(&mut g, now, &mut syn);
    }
    let states = |g: &Gateway| {
        let (flows, matched) = g.translations_where(now, |t| t.inside.port() == 40001, 10);
        assert_eq!((flows.len(), matched), (1, 1));
        flows[0].1
    };
    assert_eq!(states(&g), "SYN_SENT");
    // A retransmitted SYN, turned into the server's SYN-ACK.
    let mut syn = tcp(H1, 40001, SRV, 80, TcpFlags::SYN, b"");
    let _ = out(&mut g, now, &mut syn);
    let mut synack = syn.clone();
    swap(&mut synack);
    synack[33] = 0x12;
    let _ = inb(&mut g, now, &mut synack);
    assert_eq!(states(&g), "SYN_RECV");
    let mut ack = tcp(H1, 40001, SRV, 80, TcpFlags::ACK, b"");
    let _ = out(&mut g, now, &mut ack);
    assert_eq!(states(&g), "ESTABLISHED");
    let mut fin = tcp(H1, 40001, SRV, 80, TcpFlags::FIN_ACK, b"");
    let _ = out(&mut g, now, &mut fin);
    assert_eq!(states(&g), "FIN_WAIT");
    // The limit bounds the list, not the count.
    let (flows, matched) = g.translations_where(now, |_| true, 2);
    assert_eq!((flows.len(), matched), (2, 3));
    let (flows, matched) = g.translations_where(now, |_| false, 2);
    assert_eq!((flows.len(), matched), (0, 0));
}

/// The forward of `config()` as it would be published.
fn published_web(acl_rule: Option<usize>) -> PublishedListener {
    PublishedListener {
        public: SocketAddrV4::new(PUBLIC, 8001),
        inside: SocketAddrV4::new(WEB, 80),
        acl_rule,
    }
}

/// A completed handshake from `client` through the forward of `config()`.
fn connect_web(g: &mut Gateway, now: Instant, client: SocketAddrV4) {
    let (c, cp) = (*client.ip(), client.port());
    let mut syn = tcp(c, cp, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(g, now, &mut syn), Verdict::Forward);
    let mut sa = tcp(WEB, 80, c, cp, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(g, now, &mut sa), Verdict::Forward);
    let mut ack = tcp(c, cp, PUBLIC, 8001, TcpFlags::ACK, b"");
    assert_eq!(inb(g, now, &mut ack), Verdict::Forward);
}

#[test]
fn tcp_static_forwards_are_published_udp_ones_are_not() {
    let (g, _) = gw();
    assert_eq!(g.published_listeners(), vec![published_web(None)]);
}

#[test]
fn a_source_dependent_or_denying_acl_keeps_the_forward_unpublished() {
    let with_acl = |acl: Vec<AclRule>| {
        let now = epoch();
        Gateway::new(now, GatewayConfig { acl, ..config() })
            .unwrap()
            .published_listeners()
    };
    let from_partners = AclRule {
        src: Some("203.0.113.0/24".parse().unwrap()),
        dst_ports: Some(8001..=8001),
        ..AclRule::any(AclAction::Permit)
    };
    assert_eq!(with_acl(vec![from_partners.clone()]), vec![]);
    let deny_forward = AclRule {
        proto: Some(Proto::Tcp),
        dst_ports: Some(8000..=8010),
        ..AclRule::any(AclAction::Deny)
    };
    assert_eq!(with_acl(vec![deny_forward]), vec![]);
    // Rules that cannot match the forward's SYNs do not matter; a permit for any source
    // is carried so that a flow opened elsewhere counts its hit.
    let ssh_only = AclRule {
        dst_ports: Some(22..=22),
        ..from_partners
    };
    let permit_web = AclRule {
        proto: Some(Proto::Tcp),
        dst: Some("198.51.100.0/24".parse().unwrap()),
        ..AclRule::any(AclAction::Permit)
    };
    assert_eq!(
        with_acl(vec![ssh_only, permit_web]),
        vec![published_web(Some(1))]
    );
}

#[test]
fn half_open_pressure_withdraws_the_forward_until_handshakes_complete() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_half_open_per_source: 4,
            ..config()
        },
    )
    .unwrap();
    // One SYN from a /24 is below half of its bound of 4; the second reaches it.
    let mut syn = tcp(SRV2, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(g.published_listeners(), vec![published_web(None)]);
    let mut syn = tcp(SRV2, 1001, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    assert_eq!(g.published_listeners(), vec![]);
    // Their handshakes complete: no longer half-open, published again.
    for port in [1000, 1001] {
        let mut sa = tcp(WEB, 80, SRV2, port, TcpFlags::SYN_ACK, b"");
        assert_eq!(out(&mut g, now, &mut sa), Verdict::Forward);
        let mut ack = tcp(SRV2, port, PUBLIC, 8001, TcpFlags::ACK, b"");
        assert_eq!(inb(&mut g, now, &mut ack), Verdict::Forward);
    }
    assert_eq!(g.table().half_open(), 0);
    assert_eq!(g.published_listeners(), vec![published_web(None)]);
}

#[test]
fn listener_and_table_pressure_withdraw_the_forward() {
    let now = epoch();
    // Half of the listener's half-open bound, from sources in different networks.
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_half_open_per_listener: 6,
            ..config()
        },
    )
    .unwrap();
    for i in 0..3u32 {
        assert_eq!(g.published_listeners(), vec![published_web(None)]);
        let src = Ipv4Addr::from(0x0a00_0000 + i * 256);
        let mut syn = tcp(src, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
        assert_eq!(inb(&mut g, now, &mut syn), Verdict::Forward);
    }
    assert_eq!(g.published_listeners(), vec![]);
    // Seven eighths of the table in established flows.
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_mappings: 16,
            ..config()
        },
    )
    .unwrap();
    for port in 0..14 {
        assert_eq!(g.published_listeners(), vec![published_web(None)]);
        connect_web(&mut g, now, SocketAddrV4::new(SRV2, 2000 + port));
    }
    assert_eq!(g.table().half_open(), 0);
    assert_eq!(g.published_listeners(), vec![]);
}

/// The report of a SYN another data path executed for the forward of `config()`.
fn opened_web(syn: &[u8]) -> OpenedSyn<'_> {
    OpenedSyn {
        client: src(syn),
        public: SocketAddrV4::new(PUBLIC, 8001),
        inside: SocketAddrV4::new(WEB, 80),
        tcp_header: &syn[20..],
    }
}

#[test]
fn a_syn_opened_elsewhere_is_adopted_as_if_it_had_crossed_the_core() {
    let now = epoch();
    let permit_web = AclRule {
        proto: Some(Proto::Tcp),
        dst_ports: Some(8001..=8001),
        ..AclRule::any(AclAction::Permit)
    };
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            // The second rule lets the inside answer (an ACL denies inside traffic no rule
            // permits).
            acl: vec![permit_web, AclRule::any(AclAction::Permit)],
            ..config()
        },
    )
    .unwrap();
    assert_eq!(g.published_listeners(), vec![published_web(Some(0))]);
    let syn = tcp(SRV2, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert!(g.adopt_opened_syn(now, &opened_web(&syn)));
    let s = g.stats();
    assert_eq!(
        (
            s.flows_opened_by_data_path,
            s.flows_created,
            s.translated_in
        ),
        (1, 1, 1)
    );
    assert_eq!(g.table().half_open(), 1, "half-open, as after its SYN");
    assert_eq!(
        g.acl_rules().map(|(_, hits)| hits).collect::<Vec<_>>(),
        vec![1, 0],
        "the permit counted its hit"
    );
    // The handshake continues on the slow path as if the SYN had crossed the core.
    let mut sa = tcp(WEB, 80, SRV2, 1000, TcpFlags::SYN_ACK, b"");
    assert_eq!(out(&mut g, now, &mut sa), Verdict::Forward);
    assert_eq!(src(&sa), SocketAddrV4::new(PUBLIC, 8001));
    let mut ack = tcp(SRV2, 1000, PUBLIC, 8001, TcpFlags::ACK, b"");
    assert_eq!(inb(&mut g, now, &mut ack), Verdict::Forward);
    assert_eq!(g.table().half_open(), 0);
    // Reported again (a retransmitted record): the core's flow, not a second one.
    assert!(g.adopt_opened_syn(now, &opened_web(&syn)));
    assert_eq!(g.stats().flows_created, 1);
}

#[test]
fn an_opening_the_core_would_not_make_is_refused() {
    let now = epoch();
    let mut g = Gateway::new(
        now,
        GatewayConfig {
            max_half_open_per_source: 1,
            ..config()
        },
    )
    .unwrap();
    let first = tcp(SRV2, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert!(g.adopt_opened_syn(now, &opened_web(&first)));
    // Opened elsewhere before the withdrawal reached the data path: the source's bound.
    let second = tcp(SRV2, 1001, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert!(!g.adopt_opened_syn(now, &opened_web(&second)));
    // A report that does not describe the core's translation, or no SYN at all.
    let third = tcp(SRV, 1002, PUBLIC, 8001, TcpFlags::SYN, b"");
    let elsewhere = OpenedSyn {
        inside: SocketAddrV4::new(WEB, 8080),
        ..opened_web(&third)
    };
    assert!(!g.adopt_opened_syn(now, &elsewhere));
    let short = OpenedSyn {
        tcp_header: &third[20..30],
        ..opened_web(&third)
    };
    assert!(!g.adopt_opened_syn(now, &short));
    let wrong_port = OpenedSyn {
        public: SocketAddrV4::new(PUBLIC, 8002),
        ..opened_web(&third)
    };
    assert!(!g.adopt_opened_syn(now, &wrong_port));
    let s = g.stats();
    assert_eq!(
        (s.flows_opened_by_data_path, s.data_path_opens_refused),
        (1, 4)
    );
}

/// The SYN-ACK a data path sent on for a flow it opened: tracked when the core translates
/// it exactly so; unmatched (counted, nothing else) when the core would have translated it
/// otherwise, or for a report that does not describe the segment.
#[test]
fn a_syn_ack_sent_elsewhere_is_tracked_only_as_the_core_translates_it() {
    fn report(segment: &[u8], client: SocketAddrV4, inside_port: u16) -> OpenedSyn<'_> {
        OpenedSyn {
            client,
            public: SocketAddrV4::new(PUBLIC, 8001),
            inside: SocketAddrV4::new(WEB, inside_port),
            tcp_header: &segment[20..],
        }
    }
    let now = epoch();
    let mut g = Gateway::new(now, config()).unwrap();
    let syn = tcp(SRV2, 1000, PUBLIC, 8001, TcpFlags::SYN, b"");
    assert!(g.adopt_opened_syn(now, &opened_web(&syn)));
    let client = SocketAddrV4::new(SRV2, 1000);
    let syn_ack = tcp(WEB, 80, SRV2, 1000, TcpFlags::SYN_ACK, b"");
    // Not the forward's inside endpoint: the core would have sent it from another port.
    let other = tcp(WEB, 8080, SRV2, 1000, TcpFlags::SYN_ACK, b"");
    assert!(!g.follow_opened_syn_ack(now, &report(&other, client, 8080)));
    // Ports that are not the endpoints'.
    assert!(!g.follow_opened_syn_ack(now, &report(&syn_ack, SocketAddrV4::new(SRV2, 1002), 80)));
    assert!(g.follow_opened_syn_ack(now, &report(&syn_ack, client, 80)));
    let s = g.stats();
    assert_eq!(
        (s.syn_acks_by_data_path, s.data_path_syn_acks_unmatched),
        (1, 2)
    );
}
