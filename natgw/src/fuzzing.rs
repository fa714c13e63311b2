//! Entry points for the cargo-fuzz targets (and the corpus replay test).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::{Direction, Gateway, GatewayConfig, L4Checksum, PacketMeta, Proto, StaticEntry};

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
