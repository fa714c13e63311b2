//! Entry points for the fuzz targets in `fuzz/` and the corpus replay tests; not an API.
//!
//! Always compiled (the fuzz crate builds this crate without default features and enables
//! nothing else), hidden from the docs.

use crate::{HEADROOM, Tunnel, TunnelConfig, Underlay};
use netutil::vnet::VnetHdr;
use std::net::Ipv4Addr;
use std::time::Instant;

/// Feeds `data` to a tunnel's decapsulation (and the decapsulated packet back through
/// encapsulation). The first byte picks the tunnel options, the second the outer source.
pub fn decapsulate(now: Instant, data: &[u8]) {
    let [options, source, gre @ ..] = data else {
        return;
    };
    let local = Ipv4Addr::new(198, 51, 100, 1);
    let remote = Ipv4Addr::new(198, 51, 100, 2);
    let mut config = TunnelConfig::new("fuzz", local, remote);
    config.key = (options & 1 != 0).then_some(42);
    config.sequence = options & 2 != 0;
    config.checksum = options & 4 != 0;
    if options & 8 != 0 {
        config.underlay = Underlay::Udp;
    }
    let mut tunnel = Tunnel::new(now, config);
    let from = if source & 1 == 0 {
        remote
    } else {
        Ipv4Addr::new(203, 0, 113, 7)
    };
    let mut buf = vec![0u8; HEADROOM];
    buf.extend_from_slice(gre);
    let verdict = tunnel.decapsulate(now, from, &mut buf[HEADROOM..]);
    if let crate::Verdict::ToTun(r) = verdict {
        let inner = (HEADROOM + r.start)..(HEADROOM + r.end);
        let mut again = vec![0u8; HEADROOM];
        again.extend_from_slice(&buf[inner]);
        let len = again.len();
        let _ = tunnel.encapsulate(&mut again, HEADROOM..len);
    }
    let _ = crate::Demux::new([(remote, Some(42)), (remote, None)]).lookup(from, gre);
}

/// Feeds `data`, cut into packets at each length prefix (two bytes, big-endian), to the
/// receive coalescer the way the driver does; each frame it emits must hold at least
/// one whole input packet's bytes and never exceed a 64 KiB IP packet.
pub fn coalesce(data: &[u8]) {
    let mut packets = Vec::new();
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        packets.push(&tail[..n]);
        rest = &tail[n..];
    }
    let mut gro = crate::gro::TcpCoalescer::with_mtu(1476);
    let check = |frame: &[u8]| {
        assert!(frame.len() >= VnetHdr::LEN);
        assert!(frame.len() - VnetHdr::LEN <= 65_535);
    };
    for p in packets {
        if let Some(frame) = gro.push(p) {
            check(frame);
        }
    }
    if let Some(frame) = gro.finish() {
        check(frame);
    }
}

/// The receive path as the driver's receive loop runs it, over several packets: each
/// record of `data` after the options byte is a two-byte big-endian length and that many
/// bytes of GRE (from the remote), or the length 0xffff alone, which ends a batch (the
/// coalescer is flushed). Decapsulated packets go through one tunnel (state kept across
/// records) into one coalescer, as with `offload = true`.
///
/// Invariants asserted: nothing panics; every frame is at most a 64 KiB IP packet; and
/// the frames resegment to exactly the packets the tunnel accepted, in order: a frame
/// sent alone is the packet itself, a merged frame's payload split at its segment size
/// is the accepted packets' payloads, each with the first one's addresses and ports.
pub fn receive(now: Instant, data: &[u8]) {
    let Some((&options, mut rest)) = data.split_first() else {
        return;
    };
    let local = Ipv4Addr::new(198, 51, 100, 1);
    let remote = Ipv4Addr::new(198, 51, 100, 2);
    let mut config = TunnelConfig::new("fuzz", local, remote);
    config.key = (options & 1 != 0).then_some(42);
    config.sequence = options & 2 != 0;
    config.keepalive = (options & 4 != 0).then(crate::KeepaliveConfig::default);
    let mut tunnel = Tunnel::new(now, config);
    let mut gro = crate::gro::TcpCoalescer::with_mtu(usize::from(tunnel.config().mtu));
    let mut accepted = std::collections::VecDeque::new();
    let mut buf = Vec::new();
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo]));
        if n == 0xffff {
            rest = tail;
            if let Some(frame) = gro.finish() {
                check_frame(frame, &mut accepted);
            }
            continue;
        }
        let n = n.min(tail.len());
        let (gre, after) = tail.split_at(n);
        rest = after;
        buf.clear();
        buf.extend_from_slice(gre);
        if let crate::Verdict::ToTun(r) = tunnel.decapsulate(now, remote, &mut buf) {
            let inner = buf.get(r).expect("ToTun ranges lie inside the buffer");
            accepted.push_back(inner.to_vec());
            if let Some(frame) = gro.push(inner) {
                check_frame(frame, &mut accepted);
            }
        }
    }
    if let Some(frame) = gro.finish() {
        check_frame(frame, &mut accepted);
    }
    assert!(
        accepted.is_empty(),
        "accepted packets missing from the frames"
    );
}

/// Checks one coalescer frame against the oldest accepted packets (see [`receive`]).
fn check_frame(frame: &[u8], accepted: &mut std::collections::VecDeque<Vec<u8>>) {
    let (header, packet) = frame.split_at(VnetHdr::LEN);
    assert!(packet.len() <= 65_535, "a frame over 64 KiB");
    let header = VnetHdr::decode(header).expect("a whole header");
    // A packet sent alone is unchanged, whatever the header asks of the kernel (nothing, or
    // finishing a partial checksum, or segmenting a partial super-packet at the MTU).
    if accepted.front().is_some_and(|want| packet == &want[..]) {
        accepted.pop_front();
        return;
    }
    assert!(header.is_gso(), "a packet sent alone must be unchanged");
    let hdr_len = usize::from(header.hdr_len);
    let seg = usize::from(header.gso_size);
    let ip_len = usize::from(header.csum_start);
    assert!(seg > 0 && ip_len + 20 <= hdr_len && hdr_len < packet.len());
    let (addresses, ports) = if ip_len == 40 {
        (8..40, 40..44)
    } else {
        (12..20, 20..24)
    };
    for chunk in packet[hdr_len..].chunks(seg) {
        let want = accepted
            .pop_front()
            .expect("a segment no packet was accepted for");
        assert_eq!(&want[hdr_len..], chunk, "a merged payload differs");
        assert_eq!(want[addresses.clone()], packet[addresses.clone()]);
        assert_eq!(want[ports.clone()], packet[ports.clone()]);
    }
}

#[cfg(test)]
mod tests {
    //! Replays the cargo-fuzz corpora on stable, so CI runs what the fuzzers found.
    use testkit::replay_corpus;

    #[test]
    fn replay_fuzz_corpus() {
        let count = replay_corpus("gre_decapsulate", |b| {
            super::decapsulate(testkit::epoch(), b);
        });
        assert!(count >= 5, "corpus too small: {count}");
    }

    #[test]
    fn replay_receive_fuzz_corpus() {
        let count = replay_corpus("gre_receive", |b| {
            super::receive(testkit::epoch(), b);
        });
        assert!(count >= 3, "corpus too small: {count}");
    }

    #[test]
    fn replay_gro_fuzz_corpus() {
        let count = replay_corpus("gre_coalesce", super::coalesce);
        assert!(count >= 3, "corpus too small: {count}");
    }
}
