//! Feedback from a second data path (the kernel fast path) that translates a flow's packets
//! without the core seeing them.
//!
//! Invariant: the core stays the only place that decides. A second data path executes the
//! [`Translation`]s the core made ([`Gateway::fast_path_eligible`] says which it may take)
//! and reports back what it moved ([`Gateway::fast_path_activity`]), so that idle timers,
//! the TCP window tracking that judges RSTs, and `show nat` stay as if every packet had
//! crossed the core.
//!
//! A TCP flow becomes eligible when the core sees its handshake complete (the client's ACK
//! of the SYN-ACK, which a blind spoofer cannot send). The data path learns it from the
//! packet that did it ([`Gateway::take_fast_path_ready`], drained after each batch) instead
//! of waiting for its next walk of the table: a short connection's request and response
//! then take the fast path too. The flows handed over are exactly those the walk would
//! find (established ones), so the bounds of the table (per source, per listener, in
//! total) bound them as before.

use std::net::SocketAddrV4;
use std::time::Instant;

use super::Gateway;
use crate::flow::{Direction, ListenerId, Proto};
use crate::table::Translation;
use crate::tcp::{ACK, FIN, Segment};

/// The most flows [`Gateway::take_fast_path_ready`] holds between two takes; beyond it a
/// flow waits for the data path's next walk of the table (which finds every eligible flow).
pub(crate) const FAST_PATH_READY_MAX: usize = 1024;

/// A flow the core has just made eligible for a second data path (see
/// [`Gateway::take_fast_path_ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FastPathFlow {
    /// Protocol (TCP).
    pub proto: Proto,
    /// The inside endpoint (its [`Translation::inside`]).
    pub inside: SocketAddrV4,
    /// The public endpoint (its [`Translation::public`]).
    pub public: SocketAddrV4,
    /// The remote endpoint (its [`Translation::outside`]).
    pub outside: SocketAddrV4,
    /// Whether the data path may carry its FINs ([`Gateway::fast_path_carries_fin`]).
    pub carries_fin: bool,
}

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
    /// TCP: the sequence number after the last FIN the sender sent (its sequence number plus
    /// payload plus one), if the data path carried one.
    pub tcp_fin_end: Option<u32>,
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

    /// Whether a second data path may carry `t`'s FINs and report them afterwards
    /// ([`FastPathActivity::tcp_fin_end`]), or must leave them to the core: a virtual
    /// service's flows are closed by the core, because its schedulers (lc, wlc, ...) count a
    /// connection inactive the moment its close begins and the next connection is scheduled
    /// by those counts; a report up to a sync round later would skew them.
    #[must_use]
    pub fn fast_path_carries_fin(&self, t: &Translation) -> bool {
        !self.is_service_listener(t.listener)
    }

    /// Whether listener `id` is a virtual service.
    fn is_service_listener(&self, id: Option<ListenerId>) -> bool {
        id.and_then(|id| self.listeners.get(usize::from(id.0))?.as_ref())
            .is_some_and(|l| l.selector.as_service().is_some())
    }

    /// Whether `t` belongs to a direct-routing service: the data path delivers the client's
    /// packets unchanged to `t.inside`'s address (by MAC) and never sees the replies.
    #[must_use]
    pub fn is_direct_routed(&self, t: &Translation) -> bool {
        self.is_direct_listener(t.listener)
    }

    /// Asks the core to keep the TCP flows that become established for
    /// [`Gateway::take_fast_path_ready`] (a second data path runs), or to stop (and forget
    /// those kept).
    pub fn set_fast_path_feed(&mut self, on: bool) {
        self.fast_path_ready = on.then(Vec::new);
    }

    /// Called when a packet made a flow established: kept for the data path unless the
    /// flow is direct-routed (its entry was installed on its SYN) or too many wait already.
    pub(super) fn fast_path_established(
        &mut self,
        listener: Option<ListenerId>,
        inside: SocketAddrV4,
        public: SocketAddrV4,
        outside: SocketAddrV4,
    ) {
        if self.is_direct_listener(listener) {
            return;
        }
        let carries_fin = !self.is_service_listener(listener);
        if let Some(ready) = self
            .fast_path_ready
            .as_mut()
            .filter(|r| r.len() < FAST_PATH_READY_MAX)
        {
            ready.push(FastPathFlow {
                proto: Proto::Tcp,
                inside,
                public,
                outside,
                carries_fin,
            });
        }
    }

    /// The TCP flows that became established since the last call and still are (a FIN in
    /// the same batch takes one out again), for the data path to install at once. Empty
    /// unless [`Gateway::set_fast_path_feed`] turned the feed on.
    pub fn take_fast_path_ready(&mut self) -> Vec<FastPathFlow> {
        let Some(ready) = self.fast_path_ready.as_mut() else {
            return Vec::new();
        };
        let mut flows = std::mem::take(ready);
        flows.retain(|f| {
            self.table
                .find_public(*f.public.ip())
                .and_then(|idx| self.table.session(f.proto, idx, f.public.port(), f.outside))
                .is_some_and(|s| self.table.session_established(s))
        });
        flows
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
        let outbound = a.direction == Direction::Outbound;
        let seg = a
            .tcp
            .map(|(seq_end, ack, window)| pure_ack(seq_end, ack, window));
        // A pure ACK is never refused (only a RST could be). It changes the state of a
        // one-way flow only: the client's first ACK past its SYN establishes it.
        if let Ok(change) = self.table.touch(now, s, outbound, seg.as_ref()) {
            self.notify_change(now, view.listener, view.inside, a.outside, change);
        }
        // A FIN the data path carried: judged and tracked as if it had crossed the core (an
        // out-of-window one moves nothing). The close ends the flow's eligibility.
        if let (Some((_, ack, window)), Some(fin_end)) = (a.tcp, a.tcp_fin_end) {
            let fin = Segment {
                flags: ACK | FIN,
                seq: fin_end.wrapping_sub(1),
                ..pure_ack(fin_end, ack, window)
            };
            if let Ok(change) = self.table.touch(now, s, outbound, Some(&fin)) {
                self.notify_change(now, view.listener, view.inside, a.outside, change);
            }
        }
        true
    }

    /// Whether the core has the TCP flow between `public` and `outside` and its close has
    /// begun (a FIN seen either way, or an accepted RST): it will never be eligible
    /// ([`Gateway::fast_path_eligible`]), as an installed flow stops being at its first FIN;
    /// what is left of it crosses the core, which tracks the rest of the close itself. False
    /// when the core does not have it (see [`Gateway::fast_path_activity`]) and for UDP.
    #[must_use]
    pub fn fast_path_flow_closing(
        &self,
        proto: Proto,
        public: SocketAddrV4,
        outside: SocketAddrV4,
    ) -> bool {
        let Some(idx) = self.table.find_public(*public.ip()) else {
            return false;
        };
        self.table
            .session(proto, idx, public.port(), outside)
            .is_some_and(|s| proto == Proto::Tcp && self.table.session_closing(s))
    }

    /// Completes what one round of reports of one flow (`flow`: both directions' activity
    /// from the same read, each already fed to [`Gateway::fast_path_activity`]) says about
    /// its close: a direction whose highest acknowledgement covers the other direction's
    /// FIN, reported in the same round, acknowledged it after that FIN, which the first
    /// feeding could not order. Its acknowledgement is fed again: the last ACK of a close
    /// (LAST_ACK to TIME_WAIT, so that the client may reuse its port at once, as when every
    /// packet crossed the core) or the acknowledgement of the first FIN.
    pub fn fast_path_close(&mut self, now: Instant, flow: &[FastPathActivity]) {
        for a in flow {
            let Some((seq_end, ack, window)) = a.tcp else {
                continue;
            };
            let acks_a_fin = flow.iter().any(|b| {
                b.direction != a.direction
                    && b.tcp_fin_end
                        .is_some_and(|fin_end| (ack.wrapping_sub(fin_end) as i32) >= 0)
            });
            if !acks_a_fin {
                continue;
            }
            let Some(idx) = self.table.find_public(*a.public.ip()) else {
                return;
            };
            let Some(s) = self.table.session(a.proto, idx, a.public.port(), a.outside) else {
                return;
            };
            let view = self.table.mapping(self.table.session_mapping(s));
            let seg = pure_ack(seq_end, ack, window);
            let outbound = a.direction == Direction::Outbound;
            if let Ok(change) = self.table.touch(now, s, outbound, Some(&seg)) {
                self.notify_change(now, view.listener, view.inside, a.outside, change);
            }
        }
    }
}

/// A pure ACK carrying a direction's reported progress.
fn pure_ack(seq_end: u32, ack: u32, window: u16) -> Segment {
    Segment {
        flags: ACK,
        seq: seq_end,
        ack,
        window,
        wscale: None,
        payload: 0,
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
        let b = if flag == FIN { b.fin() } else { b };
        let b = match ack {
            Some(a) => b.ack(a),
            None => b,
        };
        let mut v = Vec::new();
        b.write(&mut v, b"").unwrap();
        v
    }

    /// Opens a TCP flow from `inside` to `outside` through `gw` (SYN, SYN-ACK, ACK, each
    /// forwarded) and returns its public endpoint.
    fn establish(
        gw: &mut Gateway,
        now: Instant,
        inside: SocketAddrV4,
        outside: SocketAddrV4,
    ) -> SocketAddrV4 {
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
        public
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
            let public = establish(&mut gw, now, inside, outside);
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
                            tcp_fin_end: None,
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

    /// A flow is closing for the data path once the core has seen its close begin (here a
    /// FIN), not while it is open, and never when the core does not have it.
    #[test]
    fn a_flow_is_closing_for_the_data_path_once_the_core_saw_a_fin() {
        let now = testkit::epoch();
        let mut gw = pat_gateway(now);
        let inside = SocketAddrV4::new(H1, 40000);
        let outside = SocketAddrV4::new(SRV, 443);
        let stranger = SocketAddrV4::new(SRV, 444);
        let public = establish(&mut gw, now, inside, outside);
        assert!(gw.translations(now)[0].established);
        assert!(!gw.fast_path_flow_closing(Proto::Tcp, public, outside));
        assert!(!gw.fast_path_flow_closing(Proto::Tcp, public, stranger));
        let mut fin = tcp(inside, outside, 1001, Some(5001), FIN);
        assert_eq!(
            gw.handle_packet(now, Direction::Outbound, &mut fin),
            crate::Verdict::Forward
        );
        assert!(gw.fast_path_flow_closing(Proto::Tcp, public, outside));
        assert!(!gw.fast_path_flow_closing(Proto::Udp, public, outside));
    }

    /// The flow made established by the client's final ACK is handed to the data path once,
    /// by that packet, and only while the feed is on; half-open flows (a SYN flood) never
    /// are, and a flow closed again before the take is not handed over.
    #[test]
    fn established_flows_are_ready_at_once_and_half_open_ones_never() {
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
        let handshake = |gw: &mut Gateway, client: SocketAddrV4| {
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
        };
        // Feed off (the TUN path): nothing is kept.
        let c1 = SocketAddrV4::new(SRV, 40_001);
        handshake(&mut gw, c1);
        assert!(gw.take_fast_path_ready().is_empty());

        gw.set_fast_path_feed(true);
        let c2 = SocketAddrV4::new(SRV, 40_002);
        handshake(&mut gw, c2);
        let flow = FastPathFlow {
            proto: Proto::Tcp,
            inside: backend,
            public: vip,
            outside: c2,
            carries_fin: false,
        };
        assert_eq!(gw.take_fast_path_ready(), vec![flow]);
        assert!(gw.take_fast_path_ready().is_empty(), "handed over once");
        let t = gw
            .translations(now)
            .into_iter()
            .find(|t| t.outside == c2)
            .unwrap();
        assert!(gw.fast_path_eligible(&t));

        // Spoofed SYNs (and their SYN-ACKs from the backend) stay half-open: never ready.
        for port in 0..200u16 {
            let spoofed = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 1000 + port);
            let mut syn = ipv4_tcp(spoofed, vip, TcpFlags::SYN, &[]);
            let _ = gw.handle_packet(now, Direction::Inbound, &mut syn);
            let mut synack = ipv4_tcp(backend, spoofed, TcpFlags::SYN_ACK, &[]);
            let _ = gw.handle_packet(now, Direction::Outbound, &mut synack);
        }
        assert!(gw.take_fast_path_ready().is_empty());

        // Established and closed again before the take: not handed over.
        let c3 = SocketAddrV4::new(SRV, 40_003);
        handshake(&mut gw, c3);
        let mut rst = ipv4_tcp(c3, vip, TcpFlags::RST, &[]);
        assert_eq!(
            gw.handle_packet(now, Direction::Inbound, &mut rst),
            crate::Verdict::Forward
        );
        assert!(gw.take_fast_path_ready().is_empty());

        // Off again: what was kept is forgotten.
        handshake(&mut gw, SocketAddrV4::new(SRV, 40_004));
        gw.set_fast_path_feed(false);
        assert!(gw.take_fast_path_ready().is_empty());
    }

    /// A close carried whole by the fast path (server FIN, client FIN, last ACK, all in one
    /// round of reports) ends the flow in the core as if it had crossed it: no longer
    /// eligible, and closed, so the client's next SYN from the same port is a new
    /// connection. A FIN outside the window moves nothing.
    #[test]
    fn fins_reported_by_the_fast_path_close_the_flow() {
        for in_window in [true, false] {
            let now = testkit::epoch();
            let mut gw = pat_gateway(now);
            let inside = SocketAddrV4::new(H1, 40000);
            let outside = SocketAddrV4::new(SRV, 80);
            establish(&mut gw, now, inside, outside);
            let t = gw.translations(now).pop().unwrap();
            assert!(t.established && gw.fast_path_eligible(&t));
            // Request (100 bytes), response (1000 bytes) and the close, server first.
            let (client_fin, server_fin) = (1001 + 100 + 1, 5001 + 1000 + 1);
            let server_fin_reported = if in_window {
                server_fin
            } else {
                server_fin + 2_000_000_000
            };
            let round = [
                FastPathActivity {
                    proto: Proto::Tcp,
                    public: t.public,
                    outside,
                    direction: Direction::Outbound,
                    packets: 4,
                    bytes: 1300,
                    // The client's last ACK acknowledges the server's FIN.
                    tcp: Some((client_fin, server_fin, 500)),
                    tcp_fin_end: Some(client_fin),
                },
                FastPathActivity {
                    proto: Proto::Tcp,
                    public: t.public,
                    outside,
                    direction: Direction::Inbound,
                    packets: 2,
                    bytes: 1080,
                    tcp: Some((server_fin, client_fin, 500)),
                    tcp_fin_end: Some(server_fin_reported),
                },
            ];
            for a in &round {
                assert!(gw.fast_path_activity(now, a));
            }
            gw.fast_path_close(now, &round);
            let t = gw.translations(now).pop().unwrap();
            assert!(!t.established, "closing");
            assert!(!gw.fast_path_eligible(&t));
            let closed = {
                let idx = gw.table.find_public(*t.public.ip()).unwrap();
                let s = gw
                    .table
                    .session(Proto::Tcp, idx, t.public.port(), outside)
                    .unwrap();
                gw.table.session_closed(s)
            };
            // Both FINs and the last ACK: TIME_WAIT. Without the server's FIN (refused) the
            // flow is only half closed.
            assert_eq!(closed, in_window);
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
            tcp_fin_end: None,
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
                    tcp_fin_end: None,
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
