//! Virtual services of a [`Gateway`]: each is a TCP or UDP listener whose selector is a
//! [`VirtualService`]. A one-packet UDP service's listener opens no flows: each datagram is
//! scheduled and rewritten on its own ([`Gateway::one_packet_in`]), and a datagram from one
//! of its backends that no flow or mapping claims leaves from the VIP
//! ([`Gateway::one_packet_out`]). Neither keeps state, so a flood costs time, not memory.

use std::net::SocketAddrV4;
use std::time::Instant;

use balance::Pool;
use netutil::Reconfigured;

use super::Gateway;
use crate::error::{DropReason, NatError};
use crate::flow::{ListenerId, Proto};
use crate::service::{ServiceConfig, VirtualService};
use crate::table::PublicOwner;

/// A one-packet service's decisions as a cycle, for a data path that carries its datagrams
/// without the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnePacketSchedule {
    /// The service's VIP endpoint.
    pub vip: SocketAddrV4,
    /// The backend endpoint of each datagram in turn, the cycle starting over after the last.
    pub slots: Vec<SocketAddrV4>,
    /// Every backend endpoint of the service (in any state): their datagrams leave from `vip`.
    pub backends: Vec<SocketAddrV4>,
}

impl Gateway {
    /// Adds a virtual service as a listener on its `listen` endpoint (the VIP becomes one of
    /// the gateway's public addresses).
    ///
    /// # Errors
    /// [`NatError::Service`] for a bad pool or a duplicate name; listener clashes as
    /// [`Gateway::add_listener`].
    pub fn add_service(&mut self, config: ServiceConfig) -> Result<ListenerId, NatError> {
        if self.services().any(|s| s.name() == config.name) {
            return Err(NatError::Service {
                name: config.name,
                reason: "defined twice".into(),
            });
        }
        if let Some(why) = config.unsupported() {
            return Err(NatError::Service {
                name: config.name,
                reason: why.into(),
            });
        }
        let name = config.name.clone();
        let svc = VirtualService::new(config).map_err(|e| NatError::Service {
            name,
            reason: e.to_string(),
        })?;
        self.add_listener(svc.proto(), svc.listen(), svc)
    }

    /// Whether listener `id` is a one-packet service.
    pub(super) fn is_one_packet_listener(&self, id: ListenerId) -> bool {
        self.listener(id)
            .and_then(|l| l.selector.as_service())
            .is_some_and(VirtualService::one_packet)
    }

    /// A datagram of `len` bytes from `client` to one-packet service `id` (`n` datagrams of
    /// one GSO run are scheduled together): its backend, chosen for this datagram alone (no
    /// flow is made), or `NoInsideEndpoint` when no backend takes it.
    pub(super) fn one_packet_in(
        &mut self,
        now: Instant,
        id: ListenerId,
        client: SocketAddrV4,
        len: usize,
        n: u64,
    ) -> Result<SocketAddrV4, DropReason> {
        let svc = self
            .listeners
            .get_mut(usize::from(id.0))
            .and_then(Option::as_mut)
            .and_then(|l| l.selector.as_service_mut())
            .ok_or(DropReason::NoInsideEndpoint)?;
        let inside = svc
            .schedule_datagram(now, client, len)
            .ok_or(DropReason::NoInsideEndpoint)?;
        self.stats.one_packet_in += n;
        Ok(inside)
    }

    /// A UDP datagram of `len` bytes (`n` of them in a GSO run) from `backend` that no
    /// mapping claims: when `backend` (or the sorry server) serves a one-packet service, the
    /// VIP endpoint it leaves from. A backend serves one service per protocol (`vipgate
    /// check` refuses a second use).
    pub(super) fn one_packet_out(
        &mut self,
        backend: SocketAddrV4,
        len: usize,
        n: u64,
    ) -> Option<SocketAddrV4> {
        let svc = self.listeners.iter_mut().find_map(|l| {
            let svc = l.as_mut()?.selector.as_service_mut()?;
            (svc.one_packet() && svc.uses_endpoint(backend)).then_some(svc)
        })?;
        svc.count_traffic(backend, false, n, len as u64);
        self.stats.one_packet_out += n;
        Some(svc.listen())
    }

    /// The schedule of every one-packet service a data path can carry without the core
    /// ([`VirtualService::one_packet_schedule`], at most `max_slots` long), with the backend
    /// endpoints whose answers leave from its VIP. A service missing from the list keeps
    /// every datagram on the slow path. Moves no rotation and counts nothing; the caller
    /// reports what it carried with [`Gateway::one_packet_fast_path_traffic`].
    pub fn one_packet_schedules(
        &mut self,
        now: Instant,
        max_slots: usize,
    ) -> Vec<OnePacketSchedule> {
        self.listeners
            .iter_mut()
            .filter_map(|l| l.as_mut()?.selector.as_service_mut())
            .filter_map(|svc| {
                let slots = svc.one_packet_schedule(now, max_slots)?;
                Some(OnePacketSchedule {
                    vip: svc.listen(),
                    slots,
                    backends: svc.one_packet_endpoints(),
                })
            })
            .collect()
    }

    /// What a data path carried without the core for backend endpoint `backend` of a
    /// one-packet service: `to_backend` datagrams and `to_client` answers (packets, bytes).
    /// They count as if they had crossed the core (`one_packet_in`, `one_packet_out`, the
    /// backend's connections, packets and bytes).
    pub fn one_packet_fast_path_traffic(
        &mut self,
        backend: SocketAddrV4,
        to_backend: (u64, u64),
        to_client: (u64, u64),
    ) {
        let Some(svc) = self.listeners.iter_mut().find_map(|l| {
            let svc = l.as_mut()?.selector.as_service_mut()?;
            (svc.one_packet() && svc.uses_endpoint(backend)).then_some(svc)
        }) else {
            return;
        };
        svc.count_one_packet_traffic(backend, to_backend, to_client);
        self.stats.one_packet_in += to_backend.0;
        self.stats.one_packet_out += to_client.0;
    }

    /// Reply-side adoption: a TCP segment (no SYN, no RST) from `backend` to a client that
    /// no flow of this node matches. When `backend` serves a NAT-mode virtual service, the
    /// connection started on another director (or before a restart) and the segment itself
    /// says which backend holds it, whatever the scheduler: the service's listener and VIP
    /// endpoint, so the caller gives the backend the service's mapping and the reply
    /// leaves from the VIP. A backend serves one service (`vipgate check` refuses a second
    /// use), so the first match is the only one.
    pub(super) fn adoptable_reply(
        &self,
        backend: SocketAddrV4,
    ) -> Option<(ListenerId, SocketAddrV4)> {
        self.listeners.iter().enumerate().find_map(|(i, l)| {
            let l = l.as_ref()?;
            let svc = l.selector.as_service()?;
            (svc.proto() == Proto::Tcp
                && svc.forward() == crate::service::Forward::Nat
                && svc.uses_endpoint(backend))
            .then(|| {
                (
                    ListenerId(u16::try_from(i).unwrap_or(u16::MAX)),
                    svc.vip_endpoint_of(backend),
                )
            })
        })
    }

    /// Every virtual service, in configuration order.
    pub fn services(&self) -> impl Iterator<Item = &VirtualService> {
        self.listeners()
            .filter_map(|(_, l)| l.selector.as_service())
    }

    /// The virtual service called `name`.
    pub fn service_mut(&mut self, name: &str) -> Option<&mut VirtualService> {
        self.listeners
            .iter_mut()
            .filter_map(|l| l.as_mut()?.selector.as_service_mut())
            .find(|s| s.name() == name)
    }

    /// The listener of the service called `name`.
    fn service_listener(&self, name: &str) -> Option<ListenerId> {
        self.listeners()
            .find(|(_, l)| l.selector.as_service().is_some_and(|s| s.name() == name))
            .map(|(id, _)| id)
    }

    /// A reload's multi-port service `c` can take its new ports: each is its own already or
    /// no listener's (a dynamic mapping never holds a VIP's port).
    fn check_ports_free(&self, c: &ServiceConfig) -> Result<(), NatError> {
        let (Some(ports), Some(id)) = (&c.ports, self.service_listener(&c.name)) else {
            return Ok(());
        };
        let Some(idx) = self.table.find_public(*c.listen.ip()) else {
            return Ok(());
        };
        for port in ports.iter() {
            match self.table.public_owner(c.proto, idx, port) {
                Some(PublicOwner::Listener(l)) if l == id => {}
                None => {}
                Some(_) => {
                    return Err(NatError::DuplicatePublic {
                        proto: c.proto,
                        public: SocketAddrV4::new(*c.listen.ip(), port),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether `endpoint` is a backend (or the sorry server) of a virtual service: such an
    /// endpoint gets no dynamic mapping (security review 5.8).
    pub(super) fn is_service_endpoint(&self, proto: Proto, endpoint: SocketAddrV4) -> bool {
        self.services()
            .any(|s| s.proto() == proto && s.uses_endpoint(endpoint))
    }

    /// Applies reloaded service configurations: weights, backends, scheduler, persistence,
    /// sorry server and health checks change in place, established flows stay on their
    /// backends. All or nothing: every configuration is checked before any is applied.
    ///
    /// Returns [`Reconfigured::NeedsRestart`], having changed nothing, when services are
    /// added, removed or moved to another `listen` endpoint: that changes the addresses the
    /// driver routes.
    ///
    /// # Errors
    /// [`NatError::Service`] when a pool is invalid; nothing changes then.
    pub fn reconfigure_services(
        &mut self,
        configs: Vec<ServiceConfig>,
    ) -> Result<Reconfigured, NatError> {
        let restart = |name: &str, what: &str| {
            Reconfigured::restart(format!("service {name}: {what}: restart vipgate to apply"))
        };
        for c in &configs {
            let existing = self.services().find(|s| s.name() == c.name);
            match existing {
                None => return Ok(restart(&c.name, "new service")),
                // A multi-port service's ports move live (below); its address does not.
                Some(s) if s.ports().is_some() != c.ports.is_some() => {
                    return Ok(restart(&c.name, "ports or listen port changed"));
                }
                Some(s) if s.listen() != c.listen && c.ports.is_none() => {
                    return Ok(restart(&c.name, "listen changed"));
                }
                Some(s) if s.listen().ip() != c.listen.ip() => {
                    return Ok(restart(&c.name, "listen changed"));
                }
                // The flow table tracks a direct-routing service's flows one way only.
                Some(s) if s.forward() != c.forward => {
                    return Ok(restart(&c.name, "forward changed"));
                }
                // The listener is the protocol's, and one-packet services open no flows.
                Some(s) if s.proto() != c.proto || s.one_packet() != c.one_packet => {
                    return Ok(restart(&c.name, "protocol or one_packet changed"));
                }
                Some(_) => {}
            }
            if let Some(why) = c.unsupported() {
                return Err(NatError::Service {
                    name: c.name.clone(),
                    reason: why.into(),
                });
            }
            Pool::new(c.pool.clone()).map_err(|e| NatError::Service {
                name: c.name.clone(),
                reason: e.to_string(),
            })?;
            self.check_ports_free(c)?;
        }
        if let Some(gone) = self
            .services()
            .find(|s| !configs.iter().any(|c| c.name == s.name()))
        {
            return Ok(restart(gone.name(), "service removed"));
        }
        for c in configs {
            let name = c.name.clone();
            if let (Some(ports), Some(id)) = (&c.ports, self.service_listener(&name)) {
                // Checked free above: cannot fail.
                self.move_listener_ports(id, ports.iter().collect())?;
            }
            if let Some(s) = self.service_mut(&name) {
                s.reconfigure(c).map_err(|e| NatError::Service {
                    name,
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(Reconfigured::Live)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Instant;

    use balance::{Health, SchedulerKind};
    use netutil::Reconfigured;

    use crate::Gateway;
    use crate::error::NatError;
    use crate::flow::Proto;
    use crate::service::VirtualService;

    use crate::service::tests::{rs, web};
    use testkit::epoch;

    /// Through the real gateway core: SYNs to the VIP spread by weight, replies leave as the
    /// VIP, the flow stays on its backend after a drain, and counters follow the TCP states.
    mod through_gateway {
        use super::*;
        use crate::translate::rewrite_syn_as_rst;
        use crate::{DropReason, Gateway, GatewayConfig, ListenerId, Verdict};
        use etherparse::PacketBuilder;
        use testkit::packet::{TcpFlags, ipv4_tcp};

        const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

        fn endpoints(b: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
            let ip = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
            let port = |o: usize| u16::from_be_bytes([b[20 + o], b[21 + o]]);
            (
                SocketAddrV4::new(ip(12), port(0)),
                SocketAddrV4::new(ip(16), port(2)),
            )
        }

        fn pass(g: &mut Gateway, now: Instant, mut b: Vec<u8>) -> (Verdict, Vec<u8>) {
            let dir = g.direction(&b);
            let v = g.handle_packet(now, dir, &mut b);
            (v, b)
        }

        fn service(g: &mut Gateway, id: ListenerId) -> &mut VirtualService {
            g.selector_mut(id).and_then(|s| s.as_service_mut()).unwrap()
        }

        /// The client's SYN to the VIP, the chosen backend's SYN-ACK and the client's ACK, each
        /// forwarded; the backend the SYN went to.
        fn handshake(
            g: &mut Gateway,
            now: Instant,
            c: SocketAddrV4,
            vip: SocketAddrV4,
        ) -> SocketAddrV4 {
            let (_, syn) = pass(g, now, ipv4_tcp(c, vip, TcpFlags::SYN, &[]));
            let backend = endpoints(&syn).1;
            assert_eq!(
                pass(g, now, ipv4_tcp(backend, c, TcpFlags::SYN_ACK, &[])).0,
                Verdict::Forward
            );
            assert_eq!(
                pass(g, now, ipv4_tcp(c, vip, TcpFlags::ACK, &[])).0,
                Verdict::Forward
            );
            backend
        }

        fn setup(now: Instant) -> (Gateway, ListenerId) {
            setup_with(now, SchedulerKind::Wrr, usize::MAX, 16_384)
        }

        /// A gateway with one service on `VIP:80` (rs 101 weight 1, rs 102 weight 2).
        fn setup_with(
            now: Instant,
            scheduler: SchedulerKind,
            max_half_open_per_source: usize,
            max_half_open_per_listener: usize,
        ) -> (Gateway, ListenerId) {
            let mut g = Gateway::new(
                now,
                GatewayConfig {
                    inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                    compensate_ttl: false,
                    max_half_open_per_source,
                    max_half_open_per_listener,
                    ..GatewayConfig::default()
                },
            )
            .unwrap();
            let mut cfg = web(&[(101, 1), (102, 2)]);
            cfg.listen = SocketAddrV4::new(VIP, 80);
            cfg.pool.scheduler = scheduler;
            let svc = VirtualService::new(cfg).unwrap();
            let id = g.add_listener(Proto::Tcp, svc.listen(), svc).unwrap();
            (g, id)
        }

        /// Client `n`, each in a /24 of its own.
        fn spread_client(n: u32) -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + n * 256 + 7), 40_000)
        }

        fn live_counts(g: &mut Gateway, id: ListenerId) -> (u32, u32) {
            service(g, id)
                .pool()
                .backends()
                .fold((0, 0), |(a, i), (_, b)| (a + b.active(), i + b.inactive()))
        }

        /// Stateless adoption (issue #18): a director that never saw a connection start (a
        /// failover without sync) sends its mid-stream segments to the backend the first
        /// director chose, when the scheduler is a pure function of the flow.
        #[test]
        fn a_mid_stream_flow_is_adopted_on_the_backend_every_director_picks() {
            for kind in [SchedulerKind::Sh, SchedulerKind::Mh, SchedulerKind::Dh] {
                let now = epoch();
                let (mut first, _) = setup_with(now, kind, usize::MAX, 16_384);
                let (mut second, id) = setup_with(now, kind, usize::MAX, 16_384);
                let vip = SocketAddrV4::new(VIP, 80);
                let mut chosen = Vec::new();
                for n in 0..24 {
                    let c = spread_client(n);
                    let backend = handshake(&mut first, now, c, vip);
                    let (v, data) = pass(&mut second, now, ipv4_tcp(c, vip, TcpFlags::ACK, b"x"));
                    assert_eq!(
                        (v, endpoints(&data)),
                        (Verdict::Forward, (c, backend)),
                        "{kind}"
                    );
                    chosen.push(backend);
                }
                if kind != SchedulerKind::Dh {
                    assert!(
                        chosen.contains(&rs(101)) && chosen.contains(&rs(102)),
                        "{kind}"
                    );
                }
                assert_eq!(second.stats().flows_adopted, 24);
                // Unconfirmed: half-open, not established, not for the fast path.
                assert_eq!(second.table().half_open(), 24);
                assert!(second.translations(now).iter().all(|t| !t.established));
                assert_eq!(live_counts(&mut second, id), (0, 24));
                // The backends answer: confirmed, established, and the replies leave as
                // the VIP.
                for (n, backend) in (0..24).zip(&chosen) {
                    let c = spread_client(n);
                    let (v, reply) =
                        pass(&mut second, now, ipv4_tcp(*backend, c, TcpFlags::ACK, b"y"));
                    assert_eq!((v, endpoints(&reply)), (Verdict::Forward, (vip, c)));
                }
                assert_eq!(second.table().half_open(), 0);
                assert!(second.translations(now).iter().all(|t| t.established));
                assert_eq!(live_counts(&mut second, id), (24, 0));
                assert_eq!(second.stats().drops.get(DropReason::NotSyn), 0);
            }
        }

        #[test]
        fn a_stateful_scheduler_still_refuses_a_mid_stream_segment() {
            let now = epoch();
            let vip = SocketAddrV4::new(VIP, 80);
            for kind in [SchedulerKind::Wrr, SchedulerKind::Wlc, SchedulerKind::Rr] {
                let (mut g, _) = setup_with(now, kind, usize::MAX, 16_384);
                let c = spread_client(1);
                let (v, _) = pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::ACK, b"x"));
                assert_eq!(v, Verdict::Drop(DropReason::NotSyn), "{kind}");
                assert_eq!(g.table().len(), 0);
            }
            // With sh, a RST or a SYN-ACK never opens a flow.
            let (mut g, _) = setup_with(now, SchedulerKind::Sh, usize::MAX, 16_384);
            for flags in [TcpFlags::RST_ACK, TcpFlags::SYN_ACK] {
                let (v, _) = pass(&mut g, now, ipv4_tcp(spread_client(1), vip, flags, &[]));
                assert_eq!(v, Verdict::Drop(DropReason::NotSyn));
            }
            assert_eq!(g.table().len(), 0);
        }

        /// A backend's segment says which backend holds the connection, so reply-side
        /// adoption works with any scheduler.
        #[test]
        fn a_backend_reply_for_an_unknown_flow_is_adopted_from_the_vip() {
            let now = epoch();
            let vip = SocketAddrV4::new(VIP, 80);
            for kind in [SchedulerKind::Mh, SchedulerKind::Wrr] {
                let (mut first, _) = setup_with(now, kind, usize::MAX, 256);
                let (mut second, id) = setup_with(now, kind, usize::MAX, 256);
                let clients: Vec<_> = (0..6).map(spread_client).collect();
                let backends: Vec<_> = clients
                    .iter()
                    .map(|c| handshake(&mut first, now, *c, vip))
                    .collect();
                // The backends' data reach the new director first: it leaves as the VIP (the
                // first through a mapping made for it, the others through that one).
                for (c, b) in clients.iter().zip(&backends) {
                    let (v, reply) = pass(&mut second, now, ipv4_tcp(*b, *c, TcpFlags::ACK, b"d"));
                    assert_eq!(
                        (v, endpoints(&reply)),
                        (Verdict::Forward, (vip, *c)),
                        "{kind}"
                    );
                }
                assert_eq!(second.stats().flows_adopted, 6);
                assert_eq!(live_counts(&mut second, id), (0, 6), "unconfirmed");
                // The clients' next segments go to the same backends, and confirm the flows.
                for (c, b) in clients.iter().zip(&backends) {
                    let (_, data) = pass(&mut second, now, ipv4_tcp(*c, vip, TcpFlags::ACK, b"x"));
                    assert_eq!(endpoints(&data), (*c, *b), "{kind}");
                }
                assert_eq!(live_counts(&mut second, id), (6, 0), "{kind}");
                assert!(second.translations(now).iter().all(|t| t.established));
            }
        }

        /// A backend sending stray segments to many addresses holds only half-open flows,
        /// under the listener's bound; a SYN or a RST from it adopts nothing.
        #[test]
        fn a_backends_stray_segments_are_bounded() {
            let now = epoch();
            let (mut g, _) = setup_with(now, SchedulerKind::Wrr, 64, 256);
            for n in 0..2_000 {
                let _ = pass(
                    &mut g,
                    now,
                    ipv4_tcp(rs(101), spread_client(n), TcpFlags::ACK, b"d"),
                );
                assert!(g.table().len() <= 256);
            }
            assert_eq!(g.table().half_open(), g.table().len());
            let before = g.stats().flows_adopted;
            for flags in [TcpFlags::SYN, TcpFlags::RST_ACK] {
                let to = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443);
                let (_, p) = pass(&mut g, now, ipv4_tcp(rs(102), to, flags, &[]));
                assert_eq!(endpoints(&p).0, rs(102), "not translated to the VIP");
            }
            assert_eq!(g.stats().flows_adopted, before);
            g.handle_timeout(now + std::time::Duration::from_secs(62));
            assert_eq!(g.table().len(), 0, "unconfirmed, they expire");
        }

        #[test]
        fn a_flood_of_stray_segments_is_bounded_like_a_syn_flood() {
            let now = epoch();
            let vip = SocketAddrV4::new(VIP, 80);
            let (mut g, _) = setup_with(now, SchedulerKind::Sh, 64, 256);
            // Spoofed ACKs from 5,000 networks: the listener's half-open bound (256) holds,
            // the oldest unconfirmed adoptions making room.
            for n in 0..5_000 {
                let _ = pass(
                    &mut g,
                    now,
                    ipv4_tcp(spread_client(n), vip, TcpFlags::ACK, b"x"),
                );
                assert!(g.table().len() <= 256);
            }
            assert!(g.stats().early_drops >= 5_000 - 256);
            // From one network: at most 64 at a time.
            let one_net = |i: u16| SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 1_000 + i);
            let mut refused = 0;
            for i in 0..200 {
                let (v, _) = pass(&mut g, now, ipv4_tcp(one_net(i), vip, TcpFlags::ACK, b"x"));
                refused += u32::from(v == Verdict::Drop(DropReason::HalfOpenSource));
            }
            assert_eq!(refused, 200 - 64);
            // A real client still connects, and the strays are gone after the SYN-RECV
            // timeout while it stays.
            let c = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 50_000);
            let backend = handshake(&mut g, now, c, vip);
            let later = now + std::time::Duration::from_secs(61);
            let (_, keep) = pass(&mut g, later, ipv4_tcp(c, vip, TcpFlags::ACK, b"k"));
            assert_eq!(endpoints(&keep).1, backend);
            g.handle_timeout(later + std::time::Duration::from_secs(2));
            assert_eq!(g.table().len(), 1);
        }

        /// Security review 5.8: a backend's outbound packet from its service port must not
        /// give that endpoint to a dynamic mapping (every new flow of the service to that
        /// backend would then be dropped as busy).
        #[test]
        fn a_backend_sending_from_its_service_port_keeps_its_service_flows() {
            let now = epoch();
            let mut g = Gateway::new(
                now,
                GatewayConfig {
                    overload: Some(Ipv4Addr::new(198, 51, 100, 1)),
                    inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                    services: vec![web(&[(101, 1)])],
                    ..GatewayConfig::default()
                },
            )
            .unwrap();
            let remote = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 443);
            let (v, _) = pass(&mut g, now, ipv4_tcp(rs(101), remote, TcpFlags::SYN, &[]));
            assert_eq!(v, Verdict::Drop(DropReason::ServiceEndpointReserved));
            assert_eq!(g.stats().drops.get(DropReason::ServiceEndpointReserved), 1);
            assert_eq!(g.table().mappings(), 0);
            // The same backend from another port is translated as before.
            let other_port = SocketAddrV4::new(*rs(101).ip(), 40_000);
            let (v, _) = pass(
                &mut g,
                now,
                ipv4_tcp(other_port, remote, TcpFlags::SYN, &[]),
            );
            assert_eq!(v, Verdict::Forward);
            // A client's SYN to the VIP still reaches the backend.
            let vip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80);
            let c = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 40_000);
            let (v, syn) = pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::SYN, &[]));
            assert_eq!((v, endpoints(&syn)), (Verdict::Forward, (c, rs(101))));
            assert_eq!(g.stats().drops.get(DropReason::InsideEndpointBusy), 0);
        }

        #[test]
        fn syns_spread_by_weight_and_replies_leave_as_the_vip() {
            let now = epoch();
            let (mut g, id) = setup(now);
            let vip = SocketAddrV4::new(VIP, 80);
            let mut seen = std::collections::HashMap::new();
            for n in 0..300 {
                let c =
                    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200 + (n % 3) as u8), 20_000 + n);
                let (v, syn) = pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::SYN, &[]));
                assert_eq!(v, Verdict::Forward);
                let (from, to) = endpoints(&syn);
                assert_eq!(from, c);
                *seen.entry(to).or_insert(0) += 1;
                // The backend answers; the client must see the VIP.
                let (v, reply) = pass(&mut g, now, ipv4_tcp(to, c, TcpFlags::SYN_ACK, &[]));
                assert_eq!(v, Verdict::Forward);
                assert_eq!(endpoints(&reply), (vip, c));
                // Retransmitted SYN of the same flow: same backend.
                let (_, again) = pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::SYN, &[]));
                assert_eq!(endpoints(&again).1, to);
            }
            assert_eq!((seen[&rs(101)], seen[&rs(102)]), (100, 200));
            let pool = service(&mut g, id).pool();
            let total: u32 = pool
                .backends()
                .map(|(_, b)| b.inactive() + b.active())
                .sum();
            assert_eq!(total, 300);
            assert!(
                pool.backends()
                    .all(|(_, b)| b.stats().packets_in == 2 * b.stats().connections)
            );
        }

        #[test]
        fn drained_backend_keeps_its_flow_and_counts_follow_tcp() {
            let now = epoch();
            let (mut g, id) = setup(now);
            let vip = SocketAddrV4::new(VIP, 80);
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 40_000);
            let backend = handshake(&mut g, now, c, vip);
            let b = service(&mut g, id).backend_id(backend).unwrap();
            assert_eq!(service(&mut g, id).pool().backend(b).unwrap().active(), 1);

            service(&mut g, id).set_weight(backend, 0).unwrap();
            let (v, data) = pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::ACK, &[]));
            assert_eq!((v, endpoints(&data).1), (Verdict::Forward, backend));
            for n in 1..20 {
                let other = SocketAddrV4::new(*c.ip(), 40_000 + n);
                let (_, syn) = pass(&mut g, now, ipv4_tcp(other, vip, TcpFlags::SYN, &[]));
                assert_ne!(endpoints(&syn).1, backend);
            }
            // RST from the client: the flow is no longer active.
            assert_eq!(
                pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::RST_ACK, &[])).0,
                Verdict::Forward
            );
            let pool = service(&mut g, id).pool();
            assert_eq!(
                (
                    pool.backend(b).unwrap().active(),
                    pool.backend(b).unwrap().inactive()
                ),
                (0, 1)
            );
        }

        #[test]
        fn a_reused_client_port_after_close_is_scheduled_afresh() {
            let now = epoch();
            let (mut g, id) = setup(now);
            let vip = SocketAddrV4::new(VIP, 80);
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 40_000);
            let mut seen = Vec::new();
            for _ in 0..3 {
                // Handshake, then the client resets: the flow lingers, closed.
                seen.push(handshake(&mut g, now, c, vip));
                assert_eq!(
                    pass(&mut g, now, ipv4_tcp(c, vip, TcpFlags::RST_ACK, &[])).0,
                    Verdict::Forward
                );
            }
            // wrr 1:2 → rs2, rs1, rs2: each reuse of the port was scheduled.
            assert_eq!(seen, [rs(102), rs(101), rs(102)]);
            let pool = service(&mut g, id).pool();
            let conns: u64 = pool.backends().map(|(_, b)| b.stats().connections).sum();
            let live: u32 = pool
                .backends()
                .map(|(_, b)| b.active() + b.inactive())
                .sum();
            assert_eq!(
                (conns, live),
                (3, 1),
                "the replaced flows were closed in the counts"
            );
        }

        #[test]
        fn no_backend_left_refuses_new_flows() {
            let now = epoch();
            let (mut g, id) = setup(now);
            service(&mut g, id)
                .set_health(rs(101), Health::Down)
                .unwrap();
            service(&mut g, id)
                .set_health(rs(102), Health::Down)
                .unwrap();
            let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 40_000);
            let vip = SocketAddrV4::new(VIP, 80);
            let syn = ipv4_tcp(c, vip, TcpFlags::SYN, &[]);
            let (v, rst) = pass(&mut g, now, syn.clone());
            // Answered like a closed port: RST+ACK from the VIP, checksums valid.
            assert_eq!(v, Verdict::Forward);
            assert_eq!(endpoints(&rst), (vip, c));
            let parsed = etherparse::SlicedPacket::from_ip(&rst).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
                panic!()
            };
            let iph = ip.header().to_header();
            assert_eq!(iph.calc_header_checksum(), iph.header_checksum);
            let Some(etherparse::TransportSlice::Tcp(t)) = parsed.transport else {
                panic!()
            };
            assert!(t.rst() && t.ack() && !t.syn());
            assert_eq!(t.acknowledgment_number(), 1001);
            let sum = t.to_header().calc_checksum_ipv4(&iph, t.payload()).unwrap();
            assert_eq!(sum, t.checksum());
            assert_eq!(service(&mut g, id).pool().stats().refused, 1);
            // Anything but a TCP segment is left alone.
            let mut udp = Vec::new();
            PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
                .udp(1, 2)
                .write(&mut udp, &[])
                .unwrap();
            assert!(!rewrite_syn_as_rst(&mut udp));
            assert!(!rewrite_syn_as_rst(&mut syn[..30].to_vec()));
        }

        /// Multi-port services (LVS firewall-mark services): one pool on several ports of
        /// the VIP, port-less backends reached on the client's port or its rport.
        mod multi_port {
            use super::*;
            use crate::ports::{PortRule, ServicePorts};
            use crate::service::ServiceConfig;
            use std::time::Duration;

            fn portless(last: u8) -> SocketAddrV4 {
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 0)
            }

            /// `web` on VIP ports 80, 443 and 8000-8009 (443 → 8443, 8000-8009 → 9000-9009),
            /// rr over rs 101 and 102 without ports, persistence as given.
            fn config(persistence: Option<Duration>) -> ServiceConfig {
                let mut cfg = web(&[]);
                cfg.pool.backends = vec![
                    balance::BackendConfig::new(portless(101), 1),
                    balance::BackendConfig::new(portless(102), 1),
                ];
                cfg.pool.scheduler = SchedulerKind::Rr;
                cfg.pool.persistence = persistence.map(|timeout| balance::Persistence {
                    timeout,
                    netmask: 32,
                });
                cfg.ports = Some(
                    ServicePorts::new(
                        vec![80..=80, 443..=443, 8000..=8009],
                        vec![
                            PortRule {
                                ports: 443..=443,
                                to: 8443,
                            },
                            PortRule {
                                ports: 8000..=8009,
                                to: 9000,
                            },
                        ],
                    )
                    .unwrap(),
                );
                cfg.listen = SocketAddrV4::new(VIP, 80);
                cfg
            }

            fn gateway(now: Instant, cfg: ServiceConfig) -> (Gateway, ListenerId) {
                let mut g = Gateway::new(
                    now,
                    GatewayConfig {
                        inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                        compensate_ttl: false,
                        ..GatewayConfig::default()
                    },
                )
                .unwrap();
                let id = g.add_service(cfg).unwrap();
                (g, id)
            }

            fn vip(port: u16) -> SocketAddrV4 {
                SocketAddrV4::new(VIP, port)
            }

            #[test]
            fn one_clients_ports_reach_one_backend_on_their_rports() {
                let now = epoch();
                let (mut g, id) = gateway(now, config(Some(Duration::from_secs(300))));
                let mut seen = Vec::new();
                for n in 0..4 {
                    let c = spread_client(n);
                    let web = handshake(&mut g, now, c, vip(80));
                    assert_eq!(web.port(), 80);
                    // The same client's HTTPS and 8005 connections: the same real server,
                    // on the rports; its replies leave from the port the client used.
                    let c2 = SocketAddrV4::new(*c.ip(), 40_001);
                    let tls = handshake(&mut g, now, c2, vip(443));
                    assert_eq!(tls, SocketAddrV4::new(*web.ip(), 8443));
                    let c3 = SocketAddrV4::new(*c.ip(), 40_002);
                    let alt = handshake(&mut g, now, c3, vip(8005));
                    assert_eq!(alt, SocketAddrV4::new(*web.ip(), 9005));
                    let (v, reply) = pass(&mut g, now, ipv4_tcp(tls, c2, TcpFlags::ACK, b"y"));
                    assert_eq!((v, endpoints(&reply)), (Verdict::Forward, (vip(443), c2)));
                    let (v, reply) = pass(&mut g, now, ipv4_tcp(alt, c3, TcpFlags::ACK, b"y"));
                    assert_eq!((v, endpoints(&reply)), (Verdict::Forward, (vip(8005), c3)));
                    seen.push(*web.ip());
                }
                // Several clients spread over both servers (rr, a template each).
                assert!(seen.contains(&Ipv4Addr::new(10, 0, 0, 101)), "{seen:?}");
                assert!(seen.contains(&Ipv4Addr::new(10, 0, 0, 102)), "{seen:?}");
                // Every connection counted on the port-less backends: 4 clients × 3.
                assert_eq!(live_counts(&mut g, id), (12, 0));
                let svc = service(&mut g, id);
                assert_eq!(svc.pool().templates(), 4);
                let conns: u64 = svc
                    .pool()
                    .backends()
                    .map(|(_, b)| b.stats().connections)
                    .sum();
                assert_eq!(conns, 12);
            }

            #[test]
            fn without_persistence_each_connection_is_scheduled_and_other_ports_pass() {
                let now = epoch();
                let (mut g, _) = gateway(now, config(None));
                let c = spread_client(1);
                let first = handshake(&mut g, now, c, vip(80));
                let second = handshake(&mut g, now, SocketAddrV4::new(*c.ip(), 40_001), vip(80));
                // rr without a template: the next server.
                assert_ne!(first.ip(), second.ip());
                // A port the service does not list is no listener's: answered as a closed
                // port (a RST from the VIP), no flow made.
                let (v, b) = pass(&mut g, now, ipv4_tcp(c, vip(22), TcpFlags::SYN, &[]));
                assert_eq!((v, endpoints(&b)), (Verdict::Forward, (vip(22), c)));
                assert_eq!(g.table().len(), 2);
            }

            #[test]
            fn backend_endpoints_are_the_services_on_its_ports_only() {
                let svc = VirtualService::new(config(None)).unwrap();
                let at = |port| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), port);
                assert!(svc.uses_endpoint(at(80)));
                assert!(svc.uses_endpoint(at(8443)));
                assert!(svc.uses_endpoint(at(9009)));
                // 443 is mapped to 8443, and 22 is no service port: the server's own.
                assert!(!svc.uses_endpoint(at(443)));
                assert!(!svc.uses_endpoint(at(22)));
                // Checks probe the first port's backend port.
                let targets = svc.health_targets().checks;
                assert_eq!(
                    (targets[0].0.backend, targets[0].1),
                    (portless(101), at(80))
                );
            }

            #[test]
            fn a_backend_with_a_port_or_a_port_clash_is_refused() {
                let now = epoch();
                let mut cfg = config(None);
                cfg.name = "multi".into();
                cfg.pool.backends[0].addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 80);
                let (mut g, _) = gateway(now, web(&[(105, 1)]));
                assert!(
                    matches!(&g.add_service(cfg), Err(NatError::Service { reason, .. }) if reason.contains("have no port"))
                );
                // `web` (VIP:80) is taken by the single-port service: all or nothing.
                let mut other = config(None);
                other.name = "multi".into();
                assert!(matches!(
                    g.add_service(other),
                    Err(NatError::DuplicatePublic { .. })
                ));
                assert_eq!(g.listeners().count(), 1);
                let (v, _) = pass(
                    &mut g,
                    now,
                    ipv4_tcp(spread_client(1), vip(443), TcpFlags::SYN, &[]),
                );
                assert_eq!(g.table().len(), 0, "{v:?}");
            }

            /// Reply-side adoption (a connection that started on another director): a
            /// backend's segment from its 8443 leaves from VIP:443, the port that reaches it.
            #[test]
            fn an_adopted_reply_leaves_from_the_port_that_reaches_the_backend() {
                let now = epoch();
                let (mut g, _) = gateway(now, config(None));
                let c = spread_client(1);
                let rs = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 102), 8443);
                let (v, reply) = pass(&mut g, now, ipv4_tcp(rs, c, TcpFlags::ACK, b"y"));
                assert_eq!((v, endpoints(&reply)), (Verdict::Forward, (vip(443), c)));
                let (v, data) = pass(&mut g, now, ipv4_tcp(c, vip(443), TcpFlags::ACK, b"x"));
                assert_eq!((v, endpoints(&data).1), (Verdict::Forward, rs));
            }

            /// Direct routing of a multi-port service: the packet keeps its port, so each
            /// VIP port reaches the same port of the chosen real server; rports are refused.
            #[test]
            fn direct_routing_keeps_each_ports_number() {
                let now = epoch();
                let mut cfg = config(Some(Duration::from_secs(300)));
                cfg.forward = crate::service::Forward::DirectRoute;
                assert!(cfg.unsupported().is_some(), "rports under direct routing");
                cfg.ports = Some(ServicePorts::new(vec![80..=80, 443..=443], vec![]).unwrap());
                let (mut g, _) = gateway(now, cfg);
                g.set_direct_routing(true);
                let c = spread_client(1);
                let route = |g: &mut Gateway, client: SocketAddrV4, port: u16| match pass(
                    g,
                    now,
                    ipv4_tcp(client, vip(port), TcpFlags::SYN, &[]),
                )
                .0
                {
                    Verdict::DirectRoute(r) => r,
                    other => panic!("{other:?}"),
                };
                let web = route(&mut g, c, 80);
                let tls = route(&mut g, SocketAddrV4::new(*c.ip(), 40_001), 443);
                assert_eq!((web.vip, web.backend.port()), (vip(80), 80));
                assert_eq!(
                    (tls.vip, tls.backend),
                    (vip(443), SocketAddrV4::new(*web.backend.ip(), 443))
                );
            }

            /// Like a firewall-mark rule change under ipvsadm, a reload moves the ports
            /// live: a new port answers, a dropped one takes no new connection while the
            /// connections it has keep going.
            #[test]
            fn a_reload_moves_the_ports_and_keeps_the_flows() {
                let now = epoch();
                let (mut g, id) = gateway(now, config(None));
                let c = spread_client(1);
                let tls = handshake(&mut g, now, c, vip(443));
                let mut cfg = config(None);
                cfg.ports = Some(ServicePorts::new(vec![80..=80, 8080..=8080], vec![]).unwrap());
                assert_eq!(
                    g.reconfigure_services(vec![cfg]).unwrap(),
                    Reconfigured::Live
                );
                assert_eq!(g.listener(id).unwrap().ports, [80, 8080]);
                let c2 = SocketAddrV4::new(*c.ip(), 40_001);
                let (_, syn) = pass(&mut g, now, ipv4_tcp(c2, vip(8080), TcpFlags::SYN, &[]));
                assert_eq!(endpoints(&syn).1.port(), 8080);
                let c3 = SocketAddrV4::new(*c.ip(), 40_002);
                let (_, rst) = pass(&mut g, now, ipv4_tcp(c3, vip(443), TcpFlags::SYN, &[]));
                assert_eq!(
                    endpoints(&rst),
                    (vip(443), c3),
                    "443 is no service port now"
                );
                // The established HTTPS connection still runs, both ways, and is counted.
                let (v, data) = pass(&mut g, now, ipv4_tcp(c, vip(443), TcpFlags::ACK, b"x"));
                assert_eq!((v, endpoints(&data).1), (Verdict::Forward, tls));
                let (v, reply) = pass(&mut g, now, ipv4_tcp(tls, c, TcpFlags::ACK, b"y"));
                assert_eq!((v, endpoints(&reply).0), (Verdict::Forward, vip(443)));
                assert_eq!(live_counts(&mut g, id).0, 1);
                // Moving to a single port, or onto a taken port, is not live.
                let mut single = config(None);
                single.ports = None;
                assert!(matches!(
                    g.reconfigure_services(vec![single]).unwrap(),
                    Reconfigured::NeedsRestart(_)
                ));
            }
        }
    }

    /// Direct routing (LVS-DR): the core schedules as in NAT mode but leaves the packet
    /// alone and says where it goes; the flow is tracked from the client's side alone.
    mod direct_route {
        use super::*;
        use crate::gateway::fast_path::FastPathActivity;
        use crate::service::Forward;
        use crate::{DirectRoute, Direction, DropReason, GatewayConfig, Verdict};
        use testkit::packet::{TcpFlags, ipv4_tcp};

        fn vip() -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80)
        }

        fn client(n: u16) -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 40_000 + n)
        }

        fn dr_gateway(now: Instant) -> Gateway {
            let mut cfg = web(&[(101, 1), (102, 2)]);
            cfg.forward = Forward::DirectRoute;
            Gateway::new(
                now,
                GatewayConfig {
                    inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                    services: vec![cfg],
                    // Every test client is in one /24.
                    max_half_open_per_source: usize::MAX,
                    ..GatewayConfig::default()
                },
            )
            .unwrap()
        }

        fn send(g: &mut Gateway, now: Instant, c: SocketAddrV4, flags: TcpFlags) -> Verdict {
            let mut p = ipv4_tcp(c, vip(), flags, &[]);
            let before = p.clone();
            let v = g.handle_packet(now, Direction::Inbound, &mut p);
            if matches!(v, Verdict::DirectRoute(_)) {
                assert_eq!(p, before, "delivered unchanged");
            }
            v
        }

        fn counts(g: &mut Gateway, backend: SocketAddrV4) -> (u32, u32) {
            let s = g.service_mut("web").unwrap();
            let b = s.pool().backend(s.backend_id(backend).unwrap()).unwrap();
            (b.active(), b.inactive())
        }

        /// A direct-routing director never sees the replies: an adopted flow is confirmed by
        /// the client's second segment.
        #[test]
        fn a_direct_routed_flow_is_adopted_and_confirmed_by_the_clients_next_segment() {
            let now = epoch();
            let sh_gateway = || {
                let mut g = dr_gateway(now);
                let mut cfg = web(&[(101, 1), (102, 2)]);
                cfg.forward = Forward::DirectRoute;
                cfg.pool.scheduler = SchedulerKind::Sh;
                assert_eq!(
                    g.reconfigure_services(vec![cfg]).unwrap(),
                    Reconfigured::Live
                );
                g
            };
            let (mut first, mut second) = (sh_gateway(), sh_gateway());
            let Verdict::DirectRoute(r) = send(&mut first, now, client(1), TcpFlags::SYN) else {
                panic!("not direct-routed");
            };
            let Verdict::DirectRoute(a) = send(&mut second, now, client(1), TcpFlags::ACK) else {
                panic!("not adopted");
            };
            assert_eq!(a, r, "the same real server");
            assert_eq!(counts(&mut second, r.backend), (0, 1));
            assert!(second.translations(now).iter().all(|t| !t.established));
            assert_eq!(
                send(&mut second, now, client(1), TcpFlags::ACK),
                Verdict::DirectRoute(a)
            );
            assert_eq!(counts(&mut second, r.backend), (1, 0), "confirmed");
            assert_eq!(second.table().half_open(), 0);
            assert_eq!(second.stats().flows_adopted, 1);
        }

        #[test]
        fn syns_are_scheduled_by_weight_and_delivered_unchanged() {
            let now = epoch();
            let mut g = dr_gateway(now);
            let mut seen = std::collections::HashMap::new();
            for n in 0..30 {
                let Verdict::DirectRoute(r) = send(&mut g, now, client(n), TcpFlags::SYN) else {
                    panic!("not direct-routed");
                };
                assert_eq!((r.client, r.vip), (client(n), vip()));
                *seen.entry(r.backend).or_insert(0) += 1;
                // The retransmitted SYN goes where the first went.
                assert_eq!(
                    send(&mut g, now, client(n), TcpFlags::SYN),
                    Verdict::DirectRoute(r)
                );
            }
            assert_eq!((seen[&rs(101)], seen[&rs(102)]), (10, 20), "wrr 1:2");
            assert_eq!(g.stats().direct_routed, 60);
            let t = g.translations(now);
            assert!(
                t.iter()
                    .all(|t| g.is_direct_routed(t) && g.fast_path_eligible(t))
            );
        }

        /// Input-only tracking: the client's ACK establishes the flow (whether it crosses the
        /// core or the fast path reports it), its FIN makes it inactive, and no reply is
        /// ever needed to leave the half-open list.
        #[test]
        fn the_clients_side_alone_drives_the_state_and_the_counts() {
            let now = epoch();
            let mut g = dr_gateway(now);
            let Verdict::DirectRoute(DirectRoute { backend, .. }) =
                send(&mut g, now, client(1), TcpFlags::SYN)
            else {
                panic!()
            };
            assert_eq!(counts(&mut g, backend), (0, 1));
            assert_eq!(g.table().half_open(), 1);
            // A blind RST before the handshake completed changes nothing.
            assert!(matches!(
                send(&mut g, now, client(1), TcpFlags::RST_ACK),
                Verdict::DirectRoute(_)
            ));
            assert_eq!(g.translations(now).len(), 1);
            assert_eq!(counts(&mut g, backend), (0, 1));
            // The client's ACK as the fast path reports it.
            assert!(g.fast_path_activity(
                now,
                &FastPathActivity {
                    proto: Proto::Tcp,
                    public: vip(),
                    outside: client(1),
                    direction: Direction::Inbound,
                    packets: 3,
                    bytes: 200,
                    tcp: Some((1001, 1, 502)),
                    tcp_fin_end: None,
                }
            ));
            assert_eq!(counts(&mut g, backend), (1, 0), "active");
            assert_eq!(g.table().half_open(), 0, "assured without a reply");
            assert!(g.translations(now)[0].established);
            // The client's FIN crosses the core and is still delivered.
            assert!(matches!(
                send(&mut g, now, client(1), TcpFlags::FIN_ACK),
                Verdict::DirectRoute(_)
            ));
            assert_eq!(counts(&mut g, backend), (0, 1), "inactive");
            // A second client establishes through the core (no fast path).
            let Verdict::DirectRoute(r) = send(&mut g, now, client(2), TcpFlags::SYN) else {
                panic!()
            };
            assert!(matches!(
                send(&mut g, now, client(2), TcpFlags::ACK),
                Verdict::DirectRoute(_)
            ));
            assert_eq!(counts(&mut g, r.backend).0, 1);
        }

        #[test]
        fn without_a_data_path_that_can_deliver_new_connections_are_refused() {
            let now = epoch();
            let mut g = dr_gateway(now);
            g.set_direct_routing(false);
            assert_eq!(
                send(&mut g, now, client(1), TcpFlags::SYN),
                Verdict::Drop(DropReason::DirectRouteUnavailable)
            );
            assert!(g.translations(now).is_empty());
        }

        #[test]
        fn changing_the_forwarding_method_needs_a_restart() {
            let now = epoch();
            let mut g = dr_gateway(now);
            assert!(matches!(
                g.reconfigure_services(vec![web(&[(101, 1)])]),
                Ok(Reconfigured::NeedsRestart(_))
            ));
        }
    }

    /// UDP services (ipvsadm `-u`) and one-packet scheduling (`-o`) through the gateway core.
    mod udp {
        use super::*;
        use crate::service::{Forward, ServiceConfig};
        use crate::translate::l4_checksum_ok;
        use crate::{DropReason, GatewayConfig, Verdict};
        use std::collections::HashMap;
        use std::time::Duration;
        use testkit::packet::ipv4_udp;

        fn vip() -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 53)
        }

        fn dns(last: u8) -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 53)
        }

        /// `dns` over UDP, wrr 1:2 on rs 101 and 102.
        fn dns_service(one_packet: bool) -> ServiceConfig {
            let mut cfg = web(&[(101, 1), (102, 2)]);
            cfg.name = "dns".into();
            cfg.listen = vip();
            for b in &mut cfg.pool.backends {
                b.addr = SocketAddrV4::new(*b.addr.ip(), 53);
            }
            cfg.proto = Proto::Udp;
            cfg.one_packet = one_packet;
            cfg
        }

        fn gateway(now: Instant, services: Vec<ServiceConfig>) -> Gateway {
            Gateway::new(
                now,
                GatewayConfig {
                    inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                    compensate_ttl: false,
                    services,
                    ..GatewayConfig::default()
                },
            )
            .unwrap()
        }

        fn endpoints(b: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
            let ip = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
            let port = |o: usize| u16::from_be_bytes([b[20 + o], b[21 + o]]);
            (
                SocketAddrV4::new(ip(12), port(0)),
                SocketAddrV4::new(ip(16), port(2)),
            )
        }

        fn send(
            g: &mut Gateway,
            now: Instant,
            from: SocketAddrV4,
            to: SocketAddrV4,
        ) -> (Verdict, Vec<u8>) {
            let mut b = ipv4_udp(from, to, b"query");
            let dir = g.direction(&b);
            let v = g.handle_packet(now, dir, &mut b);
            if v == Verdict::Forward {
                assert!(l4_checksum_ok(&b), "checksum kept valid");
            }
            (v, b)
        }

        fn client(n: u16) -> SocketAddrV4 {
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 40_000 + n)
        }

        fn counts(g: &mut Gateway, backend: SocketAddrV4) -> (u32, u32, u64) {
            let s = g.service_mut("dns").unwrap();
            let b = s.pool().backend(s.backend_id(backend).unwrap()).unwrap();
            (b.active(), b.inactive(), b.stats().connections)
        }

        /// A UDP flow is scheduled on its first datagram and sticks to its backend; the
        /// replies leave as the VIP; the flow is inactive (as LVS counts UDP) and ends
        /// with the gateway's UDP timeout.
        #[test]
        fn udp_flows_are_scheduled_once_and_expire_with_the_udp_timeout() {
            let now = epoch();
            let mut g = gateway(now, vec![dns_service(false)]);
            let mut seen: HashMap<SocketAddrV4, usize> = HashMap::new();
            for n in 0..30 {
                let (v, b) = send(&mut g, now, client(n), vip());
                assert_eq!(v, Verdict::Forward);
                let backend = endpoints(&b).1;
                *seen.entry(backend).or_default() += 1;
                // The client's next datagram goes the same way.
                assert_eq!(endpoints(&send(&mut g, now, client(n), vip()).1).1, backend);
                let (v, reply) = send(&mut g, now, backend, client(n));
                assert_eq!(
                    (v, endpoints(&reply)),
                    (Verdict::Forward, (vip(), client(n)))
                );
            }
            assert_eq!((seen[&dns(101)], seen[&dns(102)]), (10, 20), "wrr 1:2");
            assert_eq!(g.table().len(), 30);
            assert_eq!(counts(&mut g, dns(102)), (0, 20, 20));
            // A TCP segment to the UDP service's port is nobody's.
            let mut syn =
                testkit::packet::ipv4_tcp(client(1), vip(), testkit::packet::TcpFlags::SYN, &[]);
            let dir = g.direction(&syn);
            assert_eq!(
                g.handle_packet(now, dir, &mut syn),
                Verdict::Forward,
                "answered with a RST"
            );
            assert_eq!(g.table().len(), 30);
            let later = now + Duration::from_secs(301);
            g.handle_timeout(later);
            assert_eq!(g.table().len(), 0);
            assert_eq!(counts(&mut g, dns(102)), (0, 0, 20));
        }

        /// One-packet scheduling: datagrams of ONE client socket spread by weight, nothing is
        /// kept, and the backends' answers leave from the VIP all the same.
        #[test]
        fn one_packet_spreads_one_clients_datagrams_and_keeps_nothing() {
            let now = epoch();
            let mut g = gateway(now, vec![dns_service(true)]);
            let mut seen: HashMap<SocketAddrV4, usize> = HashMap::new();
            for _ in 0..30 {
                let (v, b) = send(&mut g, now, client(1), vip());
                assert_eq!(v, Verdict::Forward);
                let backend = endpoints(&b).1;
                *seen.entry(backend).or_default() += 1;
                let (v, reply) = send(&mut g, now, backend, client(1));
                assert_eq!(
                    (v, endpoints(&reply)),
                    (Verdict::Forward, (vip(), client(1)))
                );
            }
            assert_eq!((seen[&dns(101)], seen[&dns(102)]), (10, 20), "wrr 1:2");
            assert_eq!(
                (g.table().len(), g.table().mappings()),
                (0, 0),
                "no flow, no mapping"
            );
            assert_eq!(
                (g.stats().one_packet_in, g.stats().one_packet_out),
                (30, 30)
            );
            let (active, inactive, conns) = counts(&mut g, dns(102));
            assert_eq!((active, inactive, conns), (0, 0, 20));
            let s = g.service_mut("dns").unwrap();
            let b = s.pool().backend(s.backend_id(dns(102)).unwrap()).unwrap();
            assert_eq!((b.stats().packets_in, b.stats().packets_out), (20, 20));
            // No backend left: each datagram is dropped and counted, still without state.
            for last in [101, 102] {
                g.service_mut("dns")
                    .unwrap()
                    .set_health(dns(last), Health::Down)
                    .unwrap();
            }
            for _ in 0..5 {
                assert_eq!(
                    send(&mut g, now, client(1), vip()).0,
                    Verdict::Drop(DropReason::NoInsideEndpoint)
                );
            }
            assert_eq!(g.stats().drops.get(DropReason::NoInsideEndpoint), 5);
            assert_eq!(g.service_mut("dns").unwrap().pool().stats().refused, 5);
            assert_eq!(g.table().len(), 0);
            // A stray datagram from a port no service uses is not translated.
            let other = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 5353);
            let (_, b) = send(&mut g, now, other, client(1));
            assert_eq!(endpoints(&b).0, other);
        }

        /// The schedule the core hands the kernel path is its own scheduler's cycle from its
        /// current position (wrr 1:2: one of 101 and two of 102 per three datagrams, in the
        /// order the core itself would pick), moves nothing, and follows health and weights;
        /// what the kernel carried counts as if it had crossed the core.
        #[test]
        fn one_packet_schedule_is_the_cores_cycle() {
            let now = epoch();
            let mut g = gateway(now, vec![dns_service(true)]);
            assert_eq!(send(&mut g, now, client(1), vip()).0, Verdict::Forward);
            let s = g.one_packet_schedules(now, 1024);
            assert_eq!(s.len(), 1);
            assert_eq!(s[0].vip, vip());
            assert_eq!(s[0].backends, [dns(101), dns(102)]);
            assert_eq!(g.one_packet_schedules(now, 1024), s, "nothing moved");
            let picked: Vec<SocketAddrV4> = (0..6)
                .map(|_| endpoints(&send(&mut g, now, client(1), vip()).1).1)
                .collect();
            let cycle = &s[0].slots;
            assert_eq!(cycle.len(), 3);
            assert_eq!(
                picked,
                [&cycle[..], &cycle[..]].concat(),
                "the core's own order"
            );
            // Weights with a common divisor give the same sequence, a shorter cycle; a cycle
            // longer than the limit stays on the core.
            let dns_svc = g.service_mut("dns").unwrap();
            dns_svc
                .set_weights(&[(dns(101), 100), (dns(102), 200)])
                .unwrap();
            assert_eq!(g.one_packet_schedules(now, 1024)[0].slots.len(), 3);
            g.service_mut("dns")
                .unwrap()
                .set_weights(&[(dns(101), 1000), (dns(102), 999)])
                .unwrap();
            assert!(g.one_packet_schedules(now, 1024).is_empty());
            g.service_mut("dns")
                .unwrap()
                .set_weights(&[(dns(101), 1), (dns(102), 1)])
                .unwrap();
            g.service_mut("dns")
                .unwrap()
                .set_health(dns(102), Health::Down)
                .unwrap();
            assert_eq!(g.one_packet_schedules(now, 1024)[0].slots, [dns(101)]);
            g.service_mut("dns")
                .unwrap()
                .set_health(dns(101), Health::Down)
                .unwrap();
            assert!(
                g.one_packet_schedules(now, 1024).is_empty(),
                "no backend: the core's"
            );
            let stats = |g: &mut Gateway| {
                let s = g.service_mut("dns").unwrap();
                *s.pool()
                    .backend(s.backend_id(dns(102)).unwrap())
                    .unwrap()
                    .stats()
            };
            let (before, b) = (
                (g.stats().one_packet_in, g.stats().one_packet_out),
                stats(&mut g),
            );
            g.one_packet_fast_path_traffic(dns(102), (5, 300), (4, 200));
            let (after, a) = (
                (g.stats().one_packet_in, g.stats().one_packet_out),
                stats(&mut g),
            );
            assert_eq!((after.0 - before.0, after.1 - before.1), (5, 4));
            assert_eq!(
                (
                    a.connections - b.connections,
                    a.packets_in - b.packets_in,
                    a.bytes_in - b.bytes_in,
                    a.packets_out - b.packets_out,
                    a.bytes_out - b.bytes_out
                ),
                (5, 5, 300, 4, 200)
            );
        }

        /// Services whose decisions are no fixed cycle get no schedule.
        #[test]
        fn one_packet_schedule_only_for_rotating_schedulers() {
            let now = epoch();
            let mut flows = dns_service(false);
            flows.name = "flows".into();
            flows.listen = SocketAddrV4::new(*vip().ip(), 5300);
            for b in &mut flows.pool.backends {
                b.addr = SocketAddrV4::new(*b.addr.ip(), 5300);
            }
            let mut sh = dns_service(true);
            sh.pool.scheduler = SchedulerKind::Sh;
            let mut g = gateway(now, vec![sh, flows]);
            assert!(g.one_packet_schedules(now, 1024).is_empty());
        }

        /// DNS on both protocols: a TCP and a one-packet UDP service share VIP:53 and the
        /// backends' port 53, each on its own listener.
        #[test]
        fn a_tcp_and_a_udp_service_share_one_endpoint() {
            let now = epoch();
            let mut tcp = dns_service(false);
            tcp.proto = Proto::Tcp;
            tcp.name = "dns-tcp".into();
            let mut g = gateway(now, vec![tcp, dns_service(true)]);
            assert_eq!(g.listeners().count(), 2);
            let (v, b) = send(&mut g, now, client(1), vip());
            assert_eq!(v, Verdict::Forward);
            assert_eq!(
                g.table().len(),
                0,
                "the datagram went to the one-packet service"
            );
            let mut syn =
                testkit::packet::ipv4_tcp(client(1), vip(), testkit::packet::TcpFlags::SYN, &[]);
            let dir = g.direction(&syn);
            assert_eq!(g.handle_packet(now, dir, &mut syn), Verdict::Forward);
            assert_eq!(g.table().len(), 1, "the SYN opened a TCP flow");
            assert!(matches!(endpoints(&b).1, e if e == dns(101) || e == dns(102)));
        }

        #[test]
        fn combinations_that_cannot_run_are_refused() {
            let now = epoch();
            let mut g = gateway(now, vec![]);
            let mut dr = dns_service(false);
            dr.forward = Forward::DirectRoute;
            let mut ops_tcp = dns_service(true);
            ops_tcp.proto = Proto::Tcp;
            let mut icmp = dns_service(false);
            icmp.proto = Proto::Icmp;
            for cfg in [dr, ops_tcp, icmp] {
                assert!(matches!(g.add_service(cfg), Err(NatError::Service { .. })));
            }
            assert_eq!(g.services().count(), 0);
            // Turning one-packet on or off needs a restart (flows or none).
            g.add_service(dns_service(false)).unwrap();
            assert!(matches!(
                g.reconfigure_services(vec![dns_service(true)]),
                Ok(Reconfigured::NeedsRestart(_))
            ));
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes never make the RST writer panic; when it accepts a buffer, the
        /// result is a RST+ACK of the same length with valid checksums.
        #[test]
        fn refuse_is_total_and_checksums_hold(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            opts in 0usize..4,
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let _ = crate::translate::rewrite_syn_as_rst(&mut bytes);
            let options = [
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                etherparse::TcpOptionElement::WindowScale(7),
                etherparse::TcpOptionElement::Noop,
            ];
            let mut syn = Vec::new();
            etherparse::PacketBuilder::ipv4([198, 51, 100, 200], [198, 51, 100, 10], 64)
                .tcp(40_000, 80, 7, 64240)
                .syn()
                .options(&options[..opts])
                .unwrap()
                .write(&mut syn, &payload)
                .unwrap();
            let len = syn.len();
            proptest::prop_assert!(crate::translate::rewrite_syn_as_rst(&mut syn));
            proptest::prop_assert_eq!(syn.len(), len);
            proptest::prop_assert!(crate::translate::l4_checksum_ok(&syn));
            let p = etherparse::SlicedPacket::from_ip(&syn).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else { panic!() };
            proptest::prop_assert!(t.rst() && t.ack());
            proptest::prop_assert_eq!(t.acknowledgment_number(), 7 + 1 + payload.len() as u32);
        }
    }

    #[test]
    fn services_come_from_the_gateway_config_and_reload_in_place() {
        let now = epoch();
        let mut g = Gateway::new(
            now,
            crate::GatewayConfig {
                services: vec![web(&[(101, 1), (102, 1)])],
                ..crate::GatewayConfig::default()
            },
        )
        .unwrap();
        assert_eq!(g.public_addresses(), [Ipv4Addr::new(198, 51, 100, 10)]);
        assert_eq!(
            g.reconfigure_services(vec![web(&[(101, 5), (103, 1)])]),
            Ok(Reconfigured::Live)
        );
        let s = g.service_mut("web").unwrap();
        assert_eq!(
            s.pool()
                .backend(s.backend_id(rs(101)).unwrap())
                .unwrap()
                .weight(),
            5
        );
        assert!(
            s.backend_id(rs(102)).is_none(),
            "idle removed backend freed at once"
        );
        let mut moved = web(&[(101, 1)]);
        moved.listen = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 11), 80);
        assert!(matches!(
            g.reconfigure_services(vec![moved]),
            Ok(Reconfigured::NeedsRestart(_))
        ));
        assert!(matches!(
            g.reconfigure_services(vec![]),
            Ok(Reconfigured::NeedsRestart(_))
        ));
        let mut dup = web(&[(101, 1)]);
        dup.listen = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 11), 80);
        assert!(matches!(g.add_service(dup), Err(NatError::Service { .. })));
        assert_eq!(g.services().count(), 1);
    }
}
