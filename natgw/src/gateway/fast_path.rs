//! Feedback from a second data path (the kernel fast path) that translates a flow's packets
//! without the core seeing them.
//!
//! Invariant: the core stays the only place that decides. A second data path executes the
//! [`Translation`]s the core made ([`Gateway::fast_path_eligible`] says which it may take)
//! and reports back what it moved ([`Gateway::fast_path_activity`]), so that idle timers,
//! the TCP window tracking that judges RSTs, and `show nat` stay as if every packet had
//! crossed the core.

use std::net::SocketAddrV4;
use std::time::Instant;

use super::Gateway;
use crate::flow::{Direction, Proto};
use crate::table::Translation;
use crate::tcp::{ACK, Segment};

/// What a second data path moved of one direction of one flow since its last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathActivity {
    /// Protocol (TCP or UDP).
    pub proto: Proto,
    /// The flow's public endpoint (its [`Translation::public`]).
    pub public: SocketAddrV4,
    /// The flow's remote endpoint (its [`Translation::outside`]).
    pub outside: SocketAddrV4,
    /// Who sent: the inside host (`Outbound`) or the outside one (`Inbound`).
    pub direction: Direction,
    /// Packets moved since the last report (zero: nothing new, nothing to do).
    pub packets: u64,
    /// IP bytes moved since the last report (a virtual service counts them per backend).
    pub bytes: u64,
    /// TCP: the sender's highest sequence number plus payload, its highest acknowledgement and
    /// the window sent with it (unscaled), over everything it sent so far.
    pub tcp: Option<(u32, u32, u16)>,
}

impl Gateway {
    /// Whether a second data path may take `t` over: an established TCP flow or a UDP flow,
    /// whoever placed it (dynamic PAT, a static forward or a virtual service: a service's
    /// per-backend counters are fed from the reports, its active/inactive counts from the
    /// state changes, which the core still sees).
    ///
    /// A direct-routing service's flow is eligible in every state: its packets that do cross
    /// the core (SYN, FIN, RST) are delivered by the data path through the same entry.
    #[must_use]
    pub fn fast_path_eligible(&self, t: &Translation) -> bool {
        if self.is_direct_routed(t) {
            return true;
        }
        match t.proto {
            Proto::Tcp => t.established,
            Proto::Udp => true,
            Proto::Icmp => false,
        }
    }

    /// Whether `t` belongs to a direct-routing service: the data path delivers the client's
    /// packets unchanged to `t.inside`'s address (by MAC) and never sees the replies.
    #[must_use]
    pub fn is_direct_routed(&self, t: &Translation) -> bool {
        self.is_direct_listener(t.listener)
    }

    /// Records what a second data path moved of a flow: its idle deadline restarts at `now`
    /// and, for TCP, the window tracking advances as if one pure ACK carrying the reported
    /// sequence end, acknowledgement and window had crossed the core. Returns false when the
    /// core no longer has the flow (expired or cleared): the data path must forget it.
    pub fn fast_path_activity(&mut self, now: Instant, a: &FastPathActivity) -> bool {
        let Some(idx) = self.table.find_public(*a.public.ip()) else {
            return false;
        };
        let Some(s) = self.table.session(a.proto, idx, a.public.port(), a.outside) else {
            return false;
        };
        if a.packets == 0 {
            return true;
        }
        let view = self.table.mapping(self.table.session_mapping(s));
        let to_inside = a.direction == Direction::Inbound;
        if let Some(l) = view
            .listener
            .and_then(|id| self.listeners.get_mut(usize::from(id.0))?.as_mut())
        {
            l.selector
                .on_traffic(view.inside, to_inside, a.packets, a.bytes);
        }
        let seg = a.tcp.map(|(seq_end, ack, window)| Segment {
            flags: ACK,
            seq: seq_end,
            ack,
            window,
            wscale: None,
            payload: 0,
        });
        // A pure ACK is never refused (only a RST could be). It changes the state of a
        // one-way flow only: the client's first ACK past its SYN establishes it.
        if let Ok(change) =
            self.table
                .touch(now, s, a.direction == Direction::Outbound, seg.as_ref())
        {
            self.notify_change(now, view.listener, view.inside, a.outside, change);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::GatewayConfig;

    const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const H1: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 10);
    const SRV: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

    /// A PAT gateway for the inside network of H1, overloading PUBLIC.
    fn pat_gateway(now: Instant) -> Gateway {
        Gateway::new(
            now,
            GatewayConfig {
                overload: Some(PUBLIC),
                inside_networks: vec!["192.168.101.0/24".parse().unwrap()],
                ..GatewayConfig::default()
            },
        )
        .unwrap()
    }

    fn tcp(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ack: Option<u32>, flag: u8) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
            src.port(),
            dst.port(),
            seq,
            64240,
        );
        let b = if flag == crate::tcp::SYN { b.syn() } else { b };
        let b = if flag == crate::tcp::RST { b.rst() } else { b };
        let b = match ack {
            Some(a) => b.ack(a),
            None => b,
        };
        let mut v = Vec::new();
        b.write(&mut v, b"").unwrap();
        v
    }

    /// A RST far beyond what the core saw is judged against the sequence space the fast
    /// path reported: accepted with the reports, refused without them.
    #[test]
    fn reported_tcp_progress_keeps_the_window_tracking_true() {
        for report in [true, false] {
            let now = testkit::epoch();
            let mut gw = pat_gateway(now);
            let inside = SocketAddrV4::new(H1, 40000);
            let outside = SocketAddrV4::new(SRV, 443);
            let mut syn = tcp(inside, outside, 1000, None, crate::tcp::SYN);
            assert_eq!(
                gw.handle_packet(now, Direction::Outbound, &mut syn),
                crate::Verdict::Forward
            );
            let public = gw.translations(now)[0].public;
            let mut synack = tcp(outside, public, 5000, Some(1001), crate::tcp::SYN);
            assert_eq!(
                gw.handle_packet(now, Direction::Inbound, &mut synack),
                crate::Verdict::Forward
            );
            let mut ack = tcp(inside, outside, 1001, Some(5001), 0);
            assert_eq!(
                gw.handle_packet(now, Direction::Outbound, &mut ack),
                crate::Verdict::Forward
            );
            let t = gw.translations(now).pop().unwrap();
            assert!(t.established && gw.fast_path_eligible(&t));
            let far = 1001 + 10_000_000;
            if report {
                for (direction, progress) in [
                    (Direction::Outbound, (far, 5001, 501)),
                    (Direction::Inbound, (5001, far, 502)),
                ] {
                    assert!(gw.fast_path_activity(
                        now,
                        &FastPathActivity {
                            proto: Proto::Tcp,
                            public,
                            outside,
                            direction,
                            packets: 1000,
                            bytes: 1_000_000,
                            tcp: Some(progress),
                        }
                    ));
                }
            }
            let mut rst = tcp(inside, outside, far, None, crate::tcp::RST);
            let verdict = gw.handle_packet(now, Direction::Outbound, &mut rst);
            if report {
                assert_eq!(verdict, crate::Verdict::Forward);
            } else {
                assert_eq!(
                    verdict,
                    crate::Verdict::Drop(crate::DropReason::RstOutOfWindow)
                );
            }
        }
    }

    #[test]
    fn activity_keeps_a_flow_alive_and_a_gone_flow_is_reported() {
        let now = testkit::epoch();
        let mut gw = pat_gateway(now);
        let inside = SocketAddrV4::new(H1, 5000);
        let outside = SocketAddrV4::new(SRV, 53);
        let mut p = testkit::packet::ipv4_udp(inside, outside, b"x");
        assert_eq!(
            gw.handle_packet(now, Direction::Outbound, &mut p),
            crate::Verdict::Forward
        );
        let t = gw.translations(now).pop().unwrap();
        assert!(gw.fast_path_eligible(&t));
        let idle = t.expires_in;
        let activity = FastPathActivity {
            proto: Proto::Udp,
            public: t.public,
            outside,
            direction: Direction::Outbound,
            packets: 3,
            bytes: 90,
            tcp: None,
        };
        // Kept alive by reports alone, well past its idle timeout.
        let mut at = now;
        for _ in 0..4 {
            at += idle / 2;
            assert!(gw.fast_path_activity(at, &activity));
            gw.handle_timeout(at);
        }
        assert_eq!(gw.translations(at).len(), 1);
        // Without reports it expires, and then the report says so.
        at += idle + Duration::from_secs(2);
        gw.handle_timeout(at);
        assert!(gw.translations(at).is_empty());
        assert!(!gw.fast_path_activity(at, &activity));
    }

    /// A virtual service's established flow is the fast path's too, and what the fast path
    /// moved lands in the backend's counters of `show lb` (packets and bytes, per direction).
    #[test]
    fn a_service_flow_is_eligible_and_its_traffic_counts_per_backend() {
        use testkit::packet::{TcpFlags, ipv4_tcp};
        let now = testkit::epoch();
        let mut gw = Gateway::new(
            now,
            GatewayConfig {
                inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                services: vec![crate::service::tests::web(&[(101, 1)])],
                ..GatewayConfig::default()
            },
        )
        .unwrap();
        let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
        let backend = crate::service::tests::rs(101);
        let client = SocketAddrV4::new(SRV, 40_000);
        for (dir, mut p) in [
            (
                Direction::Inbound,
                ipv4_tcp(client, vip, TcpFlags::SYN, &[]),
            ),
            (
                Direction::Outbound,
                ipv4_tcp(backend, client, TcpFlags::SYN_ACK, &[]),
            ),
            (
                Direction::Inbound,
                ipv4_tcp(client, vip, TcpFlags::ACK, &[]),
            ),
        ] {
            assert_eq!(gw.handle_packet(now, dir, &mut p), crate::Verdict::Forward);
        }
        let t = gw.translations(now).pop().unwrap();
        assert_eq!((t.inside, t.public, t.outside), (backend, vip, client));
        assert!(t.established && gw.fast_path_eligible(&t));
        let stats = |gw: &mut Gateway| {
            let s = gw.service_mut("web").unwrap();
            *s.pool()
                .backend(s.backend_id(backend).unwrap())
                .unwrap()
                .stats()
        };
        let before = stats(&mut gw);
        for (direction, packets, bytes) in [
            (Direction::Inbound, 10, 15_000),
            (Direction::Outbound, 4, 160),
        ] {
            assert!(gw.fast_path_activity(
                now,
                &FastPathActivity {
                    proto: Proto::Tcp,
                    public: vip,
                    outside: client,
                    direction,
                    packets,
                    bytes,
                    tcp: None,
                }
            ));
        }
        let after = stats(&mut gw);
        assert_eq!(
            (
                after.packets_in - before.packets_in,
                after.bytes_in - before.bytes_in,
                after.packets_out - before.packets_out,
                after.bytes_out - before.bytes_out,
            ),
            (10, 15_000, 4, 160)
        );
        let s = gw.service_mut("web").unwrap();
        let b = s.pool().backend(s.backend_id(backend).unwrap()).unwrap();
        assert_eq!((b.active(), b.inactive()), (1, 0));
    }
}
