//! Memory per translation entry at N flows (bench/nat.sh runs it): fills a gateway with N
//! outbound flows from distinct inside endpoints, half UDP and half TCP (one overload address
//! has 64,512 ports per protocol), so N mappings with one flow each, and prints the table's
//! own accounting and the process's RSS growth.
#![allow(clippy::disallowed_methods)] // a measurement program: it reads the clock itself

use std::net::Ipv4Addr;
use std::time::Instant;

use natgw::{Direction, Gateway, GatewayConfig};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn packet(tcp: bool, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64);
    let r = if tcp {
        b.tcp(sport, dport, 1, 64240).syn().write(&mut v, b"")
    } else {
        b.udp(sport, dport).write(&mut v, b"x")
    };
    r.expect("building a packet");
    v
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let now = Instant::now();
    let config = GatewayConfig {
        overload: Some(Ipv4Addr::new(198, 51, 100, 1)),
        max_mappings: n,
        max_per_host: n,
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::new(now, config).expect("valid config");
    let before = rss_bytes();
    let start = Instant::now();
    // 100 flows per inside host (50 TCP, 50 UDP), each from its own port: every flow is its
    // own mapping.
    for i in 0..n {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i / 100) as u32);
        let port = 40000 + (i % 100) as u16 / 2;
        let mut p = packet(i % 2 == 0, src, port, Ipv4Addr::new(203, 0, 113, 7), 443);
        let _ = gw.handle_packet(now, Direction::Outbound, &mut p);
    }
    let elapsed = start.elapsed();
    let after = rss_bytes();
    let table = gw.table();
    println!(
        "flows={} mappings={} table_bytes={} bytes_per_flow={:.1} rss_growth_per_flow={:.1} insert_ns={:.0}",
        table.len(),
        table.mappings(),
        table.heap_bytes(),
        table.heap_bytes() as f64 / table.len() as f64,
        after.saturating_sub(before) as f64 / table.len() as f64,
        elapsed.as_nanos() as f64 / n as f64,
    );
}
