//! Load-balanced virtual services (LVS-NAT): one public `VIP:port` over a pool of real servers.
//!
//! A [`VirtualService`] is the selector of a gateway listener: for each new inbound flow to
//! its `listen` endpoint it asks its [`balance::Pool`] for a backend (persistence first), and
//! the gateway's flow table pins the flow to that backend for its whole life and rewrites the
//! replies back to the VIP. The flow table reports each flow's life cycle back here, which
//! keeps the pool's active/inactive counts (what `lc`/`wlc` schedule on and what `show lb`
//! prints) exact. Health verdicts and operator weight changes go straight into the pool; they
//! only ever affect *new* flows.
//!
//! Persistence templates expire lazily, on the next new flow of the service: a template that
//! nobody asks for again costs memory but no time, and no gateway timer is needed.
//!
//! Services are TCP, like the config contract's `listen = "VIP:port"`; UDP services and
//! IPv6 are not supported.

use std::fmt;
use std::net::SocketAddrV4;
use std::time::Instant;

use balance::{
    BackendId, ConnState, Decision, Direction as PoolDirection, Health, Pool, PoolConfig, PoolError,
};

use crate::config::Proto;
use crate::error::NatError;
use crate::gateway::{FlowEvent, Gateway, InsideSelector, ListenerId};
use crate::health::HealthConfig;

/// Configuration of one `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name used by `show lb`, `lb weight` and VRRP `track_services`.
    pub name: String,
    /// The virtual address and port (a gateway-owned public address).
    pub listen: SocketAddrV4,
    /// Backends, scheduler, persistence, sorry server.
    pub pool: PoolConfig,
    /// Health checks; `None` trusts every backend.
    pub health: Option<HealthConfig>,
}

/// Names one checked backend of one service (the health checker's target key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub backend: SocketAddrV4,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.backend)
    }
}

/// One virtual service: its pool and what the flow table tells it.
#[derive(Debug, Clone)]
pub struct VirtualService {
    name: String,
    listen: SocketAddrV4,
    pool: Pool,
    health: Option<HealthConfig>,
}

impl VirtualService {
    /// Builds the service; every backend starts up.
    ///
    /// # Errors
    /// When the pool configuration is invalid (see [`PoolError`]).
    pub fn new(config: ServiceConfig) -> Result<Self, PoolError> {
        Ok(Self {
            name: config.name,
            listen: config.listen,
            pool: Pool::new(config.pool)?,
            health: config.health,
        })
    }

    /// Applies a reloaded configuration (same name and `listen`; the caller re-creates the
    /// service when those change). Established flows keep their backends; see
    /// [`Pool::reconfigure`].
    ///
    /// # Errors
    /// When the pool configuration is invalid; nothing changes then.
    pub fn reconfigure(&mut self, config: ServiceConfig) -> Result<(), PoolError> {
        self.pool.reconfigure(config.pool)?;
        self.health = config.health;
        Ok(())
    }

    /// The inside endpoint for a new flow from `client`: a backend, the sorry server, or
    /// `None` to refuse.
    pub fn select(&mut self, now: Instant, client: SocketAddrV4) -> Option<SocketAddrV4> {
        self.pool.handle_timeout(now);
        match self.pool.pick(now, client) {
            Decision::Backend { addr, .. } | Decision::Sorry(addr) => Some(addr),
            Decision::Refuse => None,
        }
    }

    /// The flow table opened a flow from `client` to `inside` (right after [`select`](Self::select)).
    pub fn flow_opened(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(inside) {
            self.pool.opened(now, id, client);
        }
    }

    /// A flow to `inside` reached ESTABLISHED (LVS: active).
    pub fn flow_established(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(inside) {
            self.pool.established(now, id, *client.ip());
        }
    }

    /// A flow to `inside` left ESTABLISHED (FIN or RST: inactive again).
    pub fn flow_closing(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(inside) {
            self.pool.transition(
                now,
                id,
                ConnState::Active,
                ConnState::Inactive,
                *client.ip(),
            );
        }
    }

    /// The flow table forgot a flow from `client` to `inside`.
    pub fn flow_closed(
        &mut self,
        now: Instant,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        was_established: bool,
    ) {
        if let Some(id) = self.pool.find(inside) {
            let state = if was_established {
                ConnState::Active
            } else {
                ConnState::Inactive
            };
            self.pool.closed(now, id, state, *client.ip());
        }
    }

    /// Counts one packet of a flow to `inside`.
    pub fn count_packet(&mut self, inside: SocketAddrV4, to_backend: bool, len: usize) {
        if let Some(id) = self.pool.find(inside) {
            let dir = if to_backend {
                PoolDirection::ToBackend
            } else {
                PoolDirection::ToClient
            };
            self.pool.count_packet(id, dir, len);
        }
    }

    /// `vipgate lb weight`: sets a backend's weight (0 drains it).
    ///
    /// # Errors
    /// Unknown backend or weight out of range.
    pub fn set_weight(&mut self, backend: SocketAddrV4, weight: u32) -> Result<(), PoolError> {
        self.pool.set_weight(backend, weight)
    }

    /// Applies a health verdict; returns whether it changed anything.
    ///
    /// # Errors
    /// [`PoolError::UnknownBackend`] (e.g. a late verdict for a backend removed by a reload).
    pub fn set_health(&mut self, backend: SocketAddrV4, health: Health) -> Result<bool, PoolError> {
        let id = self
            .pool
            .find(backend)
            .ok_or(PoolError::UnknownBackend(backend))?;
        Ok(self.pool.set_health(id, health))
    }

    /// The health checker's targets for this service: every configured backend, with its
    /// current health as the starting point.
    #[must_use]
    pub fn health_targets(&self) -> Vec<(BackendKey, SocketAddrV4, HealthConfig, Health)> {
        let Some(cfg) = &self.health else {
            return Vec::new();
        };
        self.pool
            .backends()
            .filter(|(_, b)| b.state() != balance::BackendState::Removed)
            .map(|(_, b)| {
                let key = BackendKey {
                    service: self.name.clone(),
                    backend: b.addr(),
                };
                (key, b.addr(), cfg.clone(), b.health())
            })
            .collect()
    }

    /// Whether any backend is eligible for new flows (what VRRP `track_services` watches).
    #[must_use]
    pub fn is_available(&self) -> bool {
        self.pool.has_eligible()
    }

    /// Service name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtual endpoint.
    #[must_use]
    pub fn listen(&self) -> SocketAddrV4 {
        self.listen
    }

    /// Health check parameters.
    #[must_use]
    pub fn health(&self) -> Option<&HealthConfig> {
        self.health.as_ref()
    }

    /// The pool, for `show lb`.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A backend's id (stable while it is in the pool).
    #[must_use]
    pub fn backend_id(&self, backend: SocketAddrV4) -> Option<BackendId> {
        self.pool.find(backend)
    }
}

/// Virtual services of a [`Gateway`]: each is a TCP listener whose selector is a
/// [`VirtualService`].
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
        let name = config.name.clone();
        let svc = VirtualService::new(config).map_err(|e| NatError::Service {
            name,
            reason: e.to_string(),
        })?;
        self.add_listener(Proto::Tcp, svc.listen(), Box::new(svc))
    }

    /// Every virtual service, in configuration order.
    pub fn services(&self) -> impl Iterator<Item = &VirtualService> {
        self.listeners()
            .filter_map(|(_, l)| l.selector.as_any().downcast_ref::<VirtualService>())
    }

    /// The virtual service called `name`.
    pub fn service_mut(&mut self, name: &str) -> Option<&mut VirtualService> {
        let (id, _) = self.listeners().find(|(_, l)| {
            l.selector
                .as_any()
                .downcast_ref::<VirtualService>()
                .is_some_and(|s| s.name() == name)
        })?;
        self.selector_mut(id)?
            .as_any_mut()
            .downcast_mut::<VirtualService>()
    }

    /// Applies reloaded service configurations: weights, backends, scheduler, persistence,
    /// sorry server and health checks change in place, established flows stay on their
    /// backends. All or nothing: every configuration is checked before any is applied.
    ///
    /// # Errors
    /// [`NatError::Service`] when a pool is invalid, or when services are added, removed or
    /// moved to another `listen` endpoint: that changes the addresses the driver routes, so
    /// it needs a restart.
    pub fn reconfigure_services(&mut self, configs: Vec<ServiceConfig>) -> Result<(), NatError> {
        let restart = |name: &str, what: &str| NatError::Service {
            name: name.to_owned(),
            reason: format!("{what}: restart vipgate to apply"),
        };
        for c in &configs {
            let existing = self.services().find(|s| s.name() == c.name);
            match existing {
                None => return Err(restart(&c.name, "new service")),
                Some(s) if s.listen() != c.listen => {
                    return Err(restart(&c.name, "listen changed"));
                }
                Some(_) => {}
            }
            Pool::new(c.pool.clone()).map_err(|e| NatError::Service {
                name: c.name.clone(),
                reason: e.to_string(),
            })?;
        }
        if let Some(gone) = self
            .services()
            .find(|s| !configs.iter().any(|c| c.name == s.name()))
        {
            return Err(restart(gone.name(), "service removed"));
        }
        for c in configs {
            let name = c.name.clone();
            if let Some(s) = self.service_mut(&name) {
                s.reconfigure(c).map_err(|e| NatError::Service {
                    name,
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(())
    }
}

/// Turns a TCP segment (IPv4, in `buf`) into the RST a closed port would answer, in place
/// (RFC 9293 §3.10.7.1): addresses and ports swapped; for a segment without ACK (a SYN) a
/// RST+ACK with `ack = seq + segment length`, for one with ACK a RST with `seq = its ack`;
/// options overwritten with NOPs so the length stays the same, both checksums recomputed.
/// Returns false (buffer untouched) if the packet is not a well-formed TCP segment.
///
/// This is how a service with no backend left refuses a connection (as LVS with no real
/// server, and HAProxy with no server up, make the client fail at once instead of retrying
/// its SYN for a minute).
pub(crate) fn refuse_in_place(buf: &mut [u8]) -> bool {
    use netutil::checksum::{checksum, fold, get16, pseudo_header_v4, put16, sum};

    let Some(&vihl) = buf.first() else {
        return false;
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 || buf.len() < ihl + 20 || buf[9] != 6 {
        return false;
    }
    let total = usize::from(get16(buf, 2));
    let doff = usize::from(buf[ihl + 12] >> 4) * 4;
    if total > buf.len() || doff < 20 || ihl + doff > total {
        return false;
    }
    let flags = buf[ihl + 13];
    let seg_len =
        (total - ihl - doff) as u32 + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
    let seq = u32::from_be_bytes([buf[ihl + 4], buf[ihl + 5], buf[ihl + 6], buf[ihl + 7]]);
    let ack = u32::from_be_bytes([buf[ihl + 8], buf[ihl + 9], buf[ihl + 10], buf[ihl + 11]]);

    // IP: swap addresses, fresh TTL, no fragmentation business.
    let (src, dst): ([u8; 4], [u8; 4]) = (
        [buf[12], buf[13], buf[14], buf[15]],
        [buf[16], buf[17], buf[18], buf[19]],
    );
    buf[12..16].copy_from_slice(&dst);
    buf[16..20].copy_from_slice(&src);
    buf[8] = 64;
    put16(buf, 6, 0x4000);
    put16(buf, 10, 0);
    let ip_check = checksum(&buf[..ihl]);
    put16(buf, 10, ip_check);

    // TCP: RST+ACK acknowledging the SYN (RFC 9293 §3.10.7.1, reset for a closed port).
    let t = ihl;
    let (sport, dport) = (get16(buf, t), get16(buf, t + 2));
    put16(buf, t, dport);
    put16(buf, t + 2, sport);
    if flags & 0x10 != 0 {
        buf[t + 4..t + 8].copy_from_slice(&ack.to_be_bytes());
        buf[t + 8..t + 12].copy_from_slice(&0u32.to_be_bytes());
        buf[t + 13] = 0x04; // RST
    } else {
        buf[t + 4..t + 8].copy_from_slice(&0u32.to_be_bytes());
        buf[t + 8..t + 12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        buf[t + 13] = 0x14; // RST | ACK
    }
    put16(buf, t + 14, 0); // window
    put16(buf, t + 16, 0); // checksum, filled below
    put16(buf, t + 18, 0); // urgent pointer
    buf[t + 20..t + doff].fill(1); // NOP options
    let seg = &buf[t..total];
    let acc = pseudo_header_v4(dst, src, 6, seg.len() as u16);
    let check = !fold(sum(acc, seg));
    put16(buf, t + 16, check);
    true
}

impl InsideSelector for VirtualService {
    fn select(&mut self, now: Instant, client: SocketAddrV4) -> Option<SocketAddrV4> {
        VirtualService::select(self, now, client)
    }

    fn on_flow(
        &mut self,
        now: Instant,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        event: FlowEvent,
    ) {
        match event {
            FlowEvent::Opened => self.flow_opened(now, inside, client),
            FlowEvent::Established => self.flow_established(now, inside, client),
            FlowEvent::Closing => self.flow_closing(now, inside, client),
            FlowEvent::Closed { was_established } => {
                self.flow_closed(now, inside, client, was_established);
            }
        }
    }

    fn on_packet(&mut self, inside: SocketAddrV4, to_inside: bool, len: usize) {
        self.count_packet(inside, to_inside, len);
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balance::{BackendConfig, SchedulerKind};
    use std::net::Ipv4Addr;

    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    fn rs(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80)
    }

    fn web(backends: &[(u8, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            listen: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80),
            pool: PoolConfig {
                scheduler: SchedulerKind::Wrr,
                backends: backends
                    .iter()
                    .map(|&(l, weight)| BackendConfig {
                        addr: rs(l),
                        weight,
                    })
                    .collect(),
                ..PoolConfig::default()
            },
            health: Some(HealthConfig::default()),
        }
    }

    fn client(n: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 40_000 + n)
    }

    #[test]
    fn flow_life_cycle_feeds_the_counters() {
        let now = epoch();
        let mut s = VirtualService::new(web(&[(101, 1), (102, 1)])).unwrap();
        let a = s.select(now, client(1)).unwrap();
        // Chosen but not opened (table full): nothing counted.
        assert_eq!(
            s.pool()
                .backend(s.backend_id(a).unwrap())
                .unwrap()
                .inactive(),
            0
        );
        s.flow_opened(now, a, client(1));
        s.flow_established(now, a, client(1));
        s.count_packet(a, true, 60);
        let b = s.pool().backend(s.backend_id(a).unwrap()).unwrap();
        assert_eq!((b.active(), b.inactive(), b.stats().connections), (1, 0, 1));
        s.flow_closing(now, a, client(1));
        s.flow_closed(now, a, client(1), false);
        let b = s.pool().backend(s.backend_id(a).unwrap()).unwrap();
        assert_eq!((b.active(), b.inactive(), b.stats().bytes_in), (0, 0, 60));
    }

    #[test]
    fn health_and_weights_steer_new_flows_only() {
        let now = epoch();
        let mut s = VirtualService::new(web(&[(101, 1), (102, 1)])).unwrap();
        assert_eq!(s.set_health(rs(101), Health::Down), Ok(true));
        for n in 0..10 {
            assert_eq!(s.select(now, client(n)), Some(rs(102)));
        }
        s.set_weight(rs(102), 0).unwrap();
        assert!(!s.is_available());
        assert_eq!(s.select(now, client(99)), None);
        assert_eq!(
            s.set_health(rs(9), Health::Up),
            Err(PoolError::UnknownBackend(rs(9)))
        );
        let keys: Vec<String> = s.health_targets().iter().map(|t| t.0.to_string()).collect();
        assert_eq!(keys, ["web/10.0.0.101:80", "web/10.0.0.102:80"]);
    }

    #[test]
    fn reload_changes_weights_and_keeps_counts() {
        let now = epoch();
        let mut s = VirtualService::new(web(&[(101, 1), (102, 1)])).unwrap();
        let a = s.select(now, client(1)).unwrap();
        s.flow_opened(now, a, client(1));
        s.flow_established(now, a, client(1));
        s.reconfigure(web(&[(101, 3), (102, 1)])).unwrap();
        let picks: Vec<_> = (0..4).map(|n| s.select(now, client(n)).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == rs(101)).count(), 3);
        assert_eq!(
            s.pool().backend(s.backend_id(a).unwrap()).unwrap().active(),
            1
        );
    }

    /// Through the real gateway core: SYNs to the VIP spread by weight, replies leave as the
    /// VIP, the flow stays on its backend after a drain, and counters follow the TCP states.
    mod through_gateway {
        use super::*;
        use crate::{Gateway, GatewayConfig, ListenerId, Verdict};
        use etherparse::PacketBuilder;

        const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

        fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, ack: bool, rst: bool) -> Vec<u8> {
            let b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
                src.port(),
                dst.port(),
                1000,
                64240,
            );
            let b = if syn { b.syn() } else { b };
            let b = if ack { b.ack(1) } else { b };
            let b = if rst { b.rst() } else { b };
            let mut v = Vec::new();
            b.write(&mut v, &[]).unwrap();
            v
        }

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
            g.selector_mut(id)
                .and_then(|s| s.as_any_mut().downcast_mut::<VirtualService>())
                .unwrap()
        }

        fn setup(now: Instant) -> (Gateway, ListenerId) {
            let mut g = Gateway::new(
                now,
                GatewayConfig {
                    inside_networks: vec!["10.0.0.0/24".parse().unwrap()],
                    compensate_ttl: false,
                    // Every test client is in one /24.
                    max_half_open_per_source: usize::MAX,
                    ..GatewayConfig::default()
                },
            )
            .unwrap();
            let mut cfg = web(&[(101, 1), (102, 2)]);
            cfg.listen = SocketAddrV4::new(VIP, 80);
            let svc = VirtualService::new(cfg).unwrap();
            let id = g
                .add_listener(Proto::Tcp, svc.listen(), Box::new(svc))
                .unwrap();
            (g, id)
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
                let (v, syn) = pass(&mut g, now, tcp(c, vip, true, false, false));
                assert_eq!(v, Verdict::Forward);
                let (from, to) = endpoints(&syn);
                assert_eq!(from, c);
                *seen.entry(to).or_insert(0) += 1;
                // The backend answers; the client must see the VIP.
                let (v, reply) = pass(&mut g, now, tcp(to, c, true, true, false));
                assert_eq!(v, Verdict::Forward);
                assert_eq!(endpoints(&reply), (vip, c));
                // Retransmitted SYN of the same flow: same backend.
                let (_, again) = pass(&mut g, now, tcp(c, vip, true, false, false));
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
            let (_, syn) = pass(&mut g, now, tcp(c, vip, true, false, false));
            let backend = endpoints(&syn).1;
            assert_eq!(
                pass(&mut g, now, tcp(backend, c, true, true, false)).0,
                Verdict::Forward
            );
            assert_eq!(
                pass(&mut g, now, tcp(c, vip, false, true, false)).0,
                Verdict::Forward
            );
            let b = service(&mut g, id).backend_id(backend).unwrap();
            assert_eq!(service(&mut g, id).pool().backend(b).unwrap().active(), 1);

            service(&mut g, id).set_weight(backend, 0).unwrap();
            let (v, data) = pass(&mut g, now, tcp(c, vip, false, true, false));
            assert_eq!((v, endpoints(&data).1), (Verdict::Forward, backend));
            for n in 1..20 {
                let other = SocketAddrV4::new(*c.ip(), 40_000 + n);
                let (_, syn) = pass(&mut g, now, tcp(other, vip, true, false, false));
                assert_ne!(endpoints(&syn).1, backend);
            }
            // RST from the client: the flow is no longer active.
            assert_eq!(
                pass(&mut g, now, tcp(c, vip, false, true, true)).0,
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
                let (_, syn) = pass(&mut g, now, tcp(c, vip, true, false, false));
                let backend = endpoints(&syn).1;
                seen.push(backend);
                // Handshake, then the client resets: the flow lingers, closed.
                assert_eq!(
                    pass(&mut g, now, tcp(backend, c, true, true, false)).0,
                    Verdict::Forward
                );
                assert_eq!(
                    pass(&mut g, now, tcp(c, vip, false, true, false)).0,
                    Verdict::Forward
                );
                assert_eq!(
                    pass(&mut g, now, tcp(c, vip, false, true, true)).0,
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
            let syn = tcp(c, vip, true, false, false);
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
            assert!(!refuse_in_place(&mut udp));
            assert!(!refuse_in_place(&mut syn[..30].to_vec()));
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
            let _ = refuse_in_place(&mut bytes);
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
            proptest::prop_assert!(refuse_in_place(&mut syn));
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
        g.reconfigure_services(vec![web(&[(101, 5), (103, 1)])])
            .unwrap();
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
            Err(NatError::Service { .. })
        ));
        assert!(g.reconfigure_services(vec![]).is_err());
        let mut dup = web(&[(101, 1)]);
        dup.listen = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 11), 80);
        assert!(matches!(g.add_service(dup), Err(NatError::Service { .. })));
        assert_eq!(g.services().count(), 1);
    }
}
