//! Load-balanced virtual services (LVS-NAT and LVS-DR): one public `VIP:port` over a pool of
//! real servers.
//!
//! A [`VirtualService`] is the selector of a gateway listener: for each new inbound flow to
//! its `listen` endpoint it asks its [`balance::Pool`] for a backend (persistence first), and
//! the gateway's flow table pins the flow to that backend for its whole life and rewrites the
//! replies back to the VIP. The flow table reports each flow's life cycle back here, which
//! keeps the pool's active/inactive counts (what `lc`/`wlc` schedule on and what `show lb`
//! prints) exact. Health verdicts and operator weight changes go straight into the pool; they
//! only ever affect *new* flows.
//!
//! With [`Forward::DirectRoute`] the gateway does not rewrite: it decides the backend the same
//! way and its data path delivers the client's packets unchanged to that backend's MAC; the
//! backend answers the client directly. The flow table then sees the client's side only and
//! tracks it with LVS's input-only state rules (`crate::tcp`).
//!
//! Persistence templates expire lazily, on the next new flow of the service: a template that
//! nobody asks for again costs memory but no time, and no gateway timer is needed.
//!
//! A service is TCP or UDP (ipvsadm `-t` / `-u`). A UDP service's flows are the gateway's
//! UDP flows (keyed by client endpoint, idle timeout `udp`), scheduled on their first
//! datagram like a TCP connection on its SYN. A one-packet UDP service (ipvsadm `-o`) makes
//! no flow at all: the gateway schedules each datagram on its own
//! ([`VirtualService::schedule_datagram`]) and recognises a backend's reply by its source
//! endpoint alone. IPv6 is not supported.
//!
//! A multi-port service ([`ServiceConfig::ports`], LVS's firewall-mark service) listens on
//! several ports of its VIP with one pool: a backend without a port (port 0, as LVS writes
//! it) receives each connection on the client's destination port or its rport
//! ([`ServicePorts::backend_port`]), and the flow events name that endpoint (`RS:443`),
//! which the service counts on the pool's `RS:0`. Persistence templates are the pool's,
//! keyed by client, so one client's connections to every port reach one backend.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use balance::{
    AdminState, BackendId, ConnState, Decision, Direction as PoolDirection, Health, LocalityImage,
    LocalityRefused, Pool, PoolConfig, PoolError, SchedulerKind, TemplateChange, TemplateImage,
    TemplateRefused,
};

use crate::flow::Proto;
use crate::health::agent::AgentHealth;
use crate::health::{AgentFailure, AgentReply, CheckTargets, HealthConfig, ProbeFailure};
use crate::ports::ServicePorts;

/// Configuration of one `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name used by `show lb`, `lb weight` and VRRP `track_services`.
    pub name: String,
    /// The virtual address and port (a gateway-owned public address); with `ports`, its
    /// port is the lowest of them.
    pub listen: SocketAddrV4,
    /// A multi-port service's ports and rports (`None`: the port of `listen` alone). Its
    /// backends and sorry server have no port (0): a backend endpoint serves one service
    /// port, which is how replies find the VIP port they leave from.
    pub ports: Option<ServicePorts>,
    /// Backends, scheduler, persistence, sorry server.
    pub pool: PoolConfig,
    /// Health checks; `None` trusts every backend.
    pub health: Option<HealthConfig>,
    /// How a new connection reaches its backend (ipvsadm `-m` / `-g`).
    pub forward: Forward,
    /// TCP or UDP (ipvsadm `-t` / `-u`); ICMP is refused by [`crate::Gateway::add_service`].
    pub proto: Proto,
    /// UDP only: schedule each datagram on its own, with no flow (ipvsadm `-o`).
    pub one_packet: bool,
}

impl ServiceConfig {
    /// Why this combination of protocol, one-packet scheduling and forwarding cannot run,
    /// if it cannot: ICMP is no service protocol, one-packet scheduling is UDP's, and direct
    /// routing is TCP's (the kernel program delivers TCP flows only).
    #[must_use]
    pub fn unsupported(&self) -> Option<&'static str> {
        if let Some(ports) = &self.ports {
            if ports.first() != self.listen.port() {
                return Some("the listen port of a multi-port service is its lowest port");
            }
            if self.pool.backends.iter().any(|b| b.addr.port() != 0) {
                return Some(
                    "a multi-port service's backends have no port (each connection keeps its port, or its rport)",
                );
            }
            if self.pool.sorry.is_some_and(|s| s.port() != 0) {
                return Some(
                    "a multi-port service's sorry server has no port (each connection keeps its port)",
                );
            }
            if self.one_packet {
                return Some("one-packet scheduling is for single-port services");
            }
            if self.forward == Forward::DirectRoute && !ports.rports().is_empty() {
                return Some("direct routing cannot change ports (rports)");
            }
        }
        match (self.proto, self.one_packet, self.forward) {
            (Proto::Icmp, _, _) => Some("a service is tcp or udp"),
            (Proto::Tcp, true, _) => Some("one-packet scheduling is for udp services"),
            (Proto::Udp, _, Forward::DirectRoute) => {
                Some("direct routing carries tcp services only")
            }
            _ => None,
        }
    }
}

/// How a virtual service forwards a connection to its backend (LVS's forwarding methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forward {
    /// LVS-NAT (`ipvsadm -m`, "Masq"): the destination becomes the backend's endpoint and the
    /// replies, which come back through the gateway, are rewritten back to the VIP.
    #[default]
    Nat,
    /// LVS-DR (`ipvsadm -g`, "Route"): the packet is delivered unchanged to the backend on a
    /// directly connected network (only the frame's MACs change, which the data path does);
    /// the backend holds the VIP itself and answers the client directly, so the gateway sees
    /// one direction only. The backend's port is the VIP's port.
    DirectRoute,
}

impl Forward {
    /// ipvsadm's name of the method, as `ipvsadm -Ln` prints it.
    #[must_use]
    pub const fn ipvsadm_name(self) -> &'static str {
        match self {
            Forward::Nat => "Masq",
            Forward::DirectRoute => "Route",
        }
    }
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

/// What the checks last said about one backend, for `show lb`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckNotes {
    /// Why the last failed probe failed (the reason a down backend is down).
    pub last_failure: Option<ProbeFailure>,
    /// The health check's own verdict (the pool's health also heeds the agent); `None`
    /// until the checker gives one.
    pub check_health: Option<Health>,
    /// The agent's last answer, or why there was none.
    pub agent: Option<Result<AgentReply, AgentFailure>>,
    /// Whether the agent's last health word was down.
    pub agent_down: bool,
    /// The agent's last weight percentage, applied again after a reload.
    pub agent_percent: Option<u32>,
    /// Agent lines that were too long or not agent words.
    pub agent_malformed: u64,
}

/// One virtual service: its pool and what the flow table tells it.
#[derive(Debug, Clone)]
pub struct VirtualService {
    name: String,
    listen: SocketAddrV4,
    ports: Option<ServicePorts>,
    pool: Pool,
    health: Option<HealthConfig>,
    forward: Forward,
    proto: Proto,
    one_packet: bool,
    /// Per backend; entries of backends gone are dropped on reconfigure.
    notes: HashMap<SocketAddrV4, CheckNotes>,
    /// Each backend's configured weight, which agent percentages apply to.
    configured_weights: HashMap<SocketAddrV4, u32>,
}

fn configured_weights(pool: &PoolConfig) -> HashMap<SocketAddrV4, u32> {
    pool.backends.iter().map(|b| (b.addr, b.weight)).collect()
}

impl VirtualService {
    /// Builds the service; every backend starts up.
    ///
    /// # Errors
    /// When the pool configuration is invalid (see [`PoolError`]).
    pub fn new(config: ServiceConfig) -> Result<Self, PoolError> {
        Ok(Self {
            configured_weights: configured_weights(&config.pool),
            name: config.name,
            listen: config.listen,
            ports: config.ports,
            pool: Pool::new(config.pool)?,
            health: config.health,
            forward: config.forward,
            proto: config.proto,
            one_packet: config.one_packet,
            notes: HashMap::new(),
        })
    }

    /// Applies a reloaded configuration (same name and `listen`; the caller re-creates the
    /// service when those change, and moves the listener's ports when `ports` change).
    /// Established flows keep their backends (and ports); see [`Pool::reconfigure`].
    ///
    /// # Errors
    /// When the pool configuration is invalid; nothing changes then.
    pub fn reconfigure(&mut self, config: ServiceConfig) -> Result<(), PoolError> {
        self.configured_weights = configured_weights(&config.pool);
        self.pool.reconfigure(config.pool)?;
        self.health = config.health;
        self.listen = config.listen;
        self.ports = config.ports;
        let pool = &self.pool;
        self.notes.retain(|addr, _| pool.find(*addr).is_some());
        // The file's weights came back: the agents' percentages apply to them again.
        let agent_weights: Vec<(SocketAddrV4, u32)> = self
            .notes
            .iter()
            .filter_map(|(addr, n)| Some((*addr, n.agent_percent?)))
            .collect();
        for (addr, percent) in agent_weights {
            self.apply_agent_weight(addr, percent);
        }
        Ok(())
    }

    /// The inside endpoint for a new flow from `client` to service port `port`: a backend,
    /// the sorry server, or `None` to refuse.
    pub fn select(
        &mut self,
        now: Instant,
        client: SocketAddrV4,
        port: u16,
    ) -> Option<SocketAddrV4> {
        self.pool.handle_timeout(now);
        // A service has one VIP, so dh/lblc/lblcr see one destination (see README).
        match self.pool.pick(now, client, *self.listen.ip()) {
            Decision::Backend { addr, .. } | Decision::Sorry(addr) => {
                Some(self.inside_for(addr, port))
            }
            Decision::Refuse => None,
        }
    }

    /// The endpoint a connection to service port `port` reaches on `real` (a backend or the
    /// sorry server): `real` itself when it has a port, else the port's backend port (LVS's
    /// port 0: the client's destination port, or its rport).
    fn inside_for(&self, real: SocketAddrV4, port: u16) -> SocketAddrV4 {
        if real.port() != 0 {
            return real;
        }
        let port = self.ports.as_ref().map_or(port, |p| p.backend_port(port));
        SocketAddrV4::new(*real.ip(), port)
    }

    /// The pool's address of the backend holding a flow to `inside`: `inside` itself, or the
    /// port-less backend on its address (a flow to `RS:443` of `RS:0`). Flow events only
    /// name endpoints this service chose, so an rport changed by a reload since still finds
    /// its backend.
    fn pool_addr(&self, inside: SocketAddrV4) -> SocketAddrV4 {
        if inside.port() == 0 || self.pool.find(inside).is_some() {
            return inside;
        }
        let portless = SocketAddrV4::new(*inside.ip(), 0);
        if self.pool.find(portless).is_some() {
            portless
        } else {
            inside
        }
    }

    /// Whether a backend endpoint of port `port` is one this service sends connections to
    /// when the backend has no port: a port of the service (after rports).
    fn serves_backend_port(&self, port: u16) -> bool {
        match &self.ports {
            Some(p) => p.service_port_of(port).is_some(),
            None => port == self.listen.port(),
        }
    }

    /// The VIP endpoint whose connections reach backend endpoint `inside` (one of
    /// [`uses_endpoint`](Self::uses_endpoint)'s): `listen`, or for a port-less backend of a
    /// multi-port service the service port that reaches `inside`'s port.
    #[must_use]
    pub fn vip_endpoint_of(&self, inside: SocketAddrV4) -> SocketAddrV4 {
        let port = self
            .ports
            .as_ref()
            .filter(|_| self.pool_addr(inside).port() == 0)
            .and_then(|p| p.service_port_of(inside.port()))
            .unwrap_or(self.listen.port());
        SocketAddrV4::new(*self.listen.ip(), port)
    }

    /// The service's ports (`None`: the single port of `listen`).
    #[must_use]
    pub fn ports(&self) -> Option<&ServicePorts> {
        self.ports.as_ref()
    }

    /// A one-packet service's datagram from `client`: its backend (or the sorry server), or
    /// `None` to drop it. Counted as a connection that opened and closed at once, as LVS
    /// counts a one-packet connection: the backend's connection and traffic counters grow,
    /// its active and inactive counts stay as they were (a persistence template still binds
    /// the client, and expires on its own).
    pub fn schedule_datagram(
        &mut self,
        now: Instant,
        client: SocketAddrV4,
        len: usize,
    ) -> Option<SocketAddrV4> {
        let inside = self.select(now, client, self.listen.port())?;
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
            self.pool.opened(now, id, client);
            self.pool.closed(now, id, ConnState::Inactive, *client.ip());
            self.pool
                .count_traffic(id, PoolDirection::ToBackend, 1, len as u64);
        }
        Some(inside)
    }

    /// A one-packet service's schedule for a data path that carries its datagrams without
    /// the core: the cycle of backend endpoints this service's own scheduler gives from now
    /// on, one per datagram (rr: each available backend in turn; wrr: the smooth weighted
    /// sequence over Σweights, divided by their gcd, picks), at most `max_slots` long.
    /// Computed on a copy of the pool, so nothing counts and the rotation does not move.
    ///
    /// `None` when the decision cannot be a fixed cycle, so every datagram must cross the
    /// core: not one-packet; a scheduler that hashes or weighs loads; persistence;
    /// connection limits or thresholds; a backend in slow start; no available backend (the
    /// sorry server and refusals are the core's); or a cycle longer than `max_slots`.
    pub fn one_packet_schedule(
        &mut self,
        now: Instant,
        max_slots: usize,
    ) -> Option<Vec<SocketAddrV4>> {
        if !self.one_packet {
            return None;
        }
        self.pool.handle_timeout(now);
        let pool = &self.pool;
        let kind = pool.scheduler();
        if !matches!(kind, SchedulerKind::Rr | SchedulerKind::Wrr)
            || pool.persistence().is_some()
            || pool.max_connections() != 0
        {
            return None;
        }
        let mut available = Vec::new();
        for (_, b) in pool.backends() {
            if b.is_ramping() || b.max_connections() != 0 || b.min_connections() != 0 {
                return None;
            }
            if b.is_available() {
                available.push(b.effective_weight());
            }
        }
        let cycle = match kind {
            SchedulerKind::Rr => available.len(),
            _ => {
                let g = available.iter().copied().fold(0, gcd);
                if g == 0 {
                    return None;
                }
                available.iter().map(|w| (w / g) as usize).sum()
            }
        };
        if cycle == 0 || cycle > max_slots {
            return None;
        }
        let mut probe = self.pool.clone();
        let vip = *self.listen.ip();
        let client = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
        (0..cycle)
            .map(|_| match probe.pick(now, client, vip) {
                Decision::Backend { addr, .. } => Some(self.inside_for(addr, self.listen.port())),
                Decision::Sorry(_) | Decision::Refuse => None,
            })
            .collect()
    }

    /// Every backend endpoint this one-packet service sends datagrams to (a backend without
    /// a port: on the service's port), whatever its state: their answers leave from the VIP.
    pub fn one_packet_endpoints(&self) -> Vec<SocketAddrV4> {
        self.pool
            .backends()
            .map(|(_, b)| self.inside_for(b.addr(), self.listen.port()))
            .collect()
    }

    /// Counts what a data path moved for backend endpoint `inside` without the core:
    /// `to_backend` datagrams (packets, bytes), each scheduled as a connection opened and
    /// forgotten at once, and `to_client` answers.
    pub fn count_one_packet_traffic(
        &mut self,
        inside: SocketAddrV4,
        to_backend: (u64, u64),
        to_client: (u64, u64),
    ) {
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
            self.pool.count_datagrams(id, to_backend.0);
            self.pool
                .count_traffic(id, PoolDirection::ToBackend, to_backend.0, to_backend.1);
            self.pool
                .count_traffic(id, PoolDirection::ToClient, to_client.0, to_client.1);
        }
    }

    /// The backend a connection from `client` to service port `port` already under way
    /// started on, as every director computes it ([`Pool::pick_stateless`]); `None` unless
    /// the scheduler is `dh`, `sh` or `mh`.
    pub fn adopt(&mut self, now: Instant, client: SocketAddrV4, port: u16) -> Option<SocketAddrV4> {
        self.pool.handle_timeout(now);
        let (_, addr) = self.pool.pick_stateless(now, client, *self.listen.ip())?;
        Some(self.inside_for(addr, port))
    }

    /// The flow table opened a flow from `client` to `inside` (right after [`select`](Self::select)).
    pub fn flow_opened(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
            self.pool.opened(now, id, client);
        }
    }

    /// A flow to `inside` reached ESTABLISHED (LVS: active).
    pub fn flow_established(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
            self.pool.established(now, id, *client.ip());
        }
    }

    /// A flow to `inside` left ESTABLISHED (FIN or RST: inactive again).
    pub fn flow_closing(&mut self, now: Instant, inside: SocketAddrV4, client: SocketAddrV4) {
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
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
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
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
        self.count_traffic(inside, to_backend, 1, len as u64);
    }

    /// Counts `packets` packets (`bytes` in all) of a flow to `inside` at once: what the
    /// kernel fast path moved since its last report.
    pub fn count_traffic(
        &mut self,
        inside: SocketAddrV4,
        to_backend: bool,
        packets: u64,
        bytes: u64,
    ) {
        if let Some(id) = self.pool.find(self.pool_addr(inside)) {
            let dir = if to_backend {
                PoolDirection::ToBackend
            } else {
                PoolDirection::ToClient
            };
            self.pool.count_traffic(id, dir, packets, bytes);
        }
    }

    /// `vipgate lb weight`: sets a backend's weight (0 drains it).
    ///
    /// # Errors
    /// Unknown backend or weight out of range.
    pub fn set_weight(&mut self, backend: SocketAddrV4, weight: u32) -> Result<(), PoolError> {
        self.pool.set_weight(backend, weight)
    }

    /// `vipgate lb weight --canary`: sets several backends' weights at once (all or none).
    ///
    /// # Errors
    /// Unknown backend or weight out of range; then nothing changed.
    pub fn set_weights(&mut self, weights: &[(SocketAddrV4, u32)]) -> Result<(), PoolError> {
        self.pool.set_weights(weights)
    }

    /// `vipgate lb set state`: the operator's state of a backend (drain, maint, ready);
    /// returns whether it changed. Flows the backend holds keep going.
    ///
    /// # Errors
    /// Unknown backend.
    pub fn set_admin(
        &mut self,
        backend: SocketAddrV4,
        admin: AdminState,
    ) -> Result<bool, PoolError> {
        self.pool.set_admin(backend, admin)
    }

    /// Applies a health verdict; returns whether it changed anything.
    ///
    /// # Errors
    /// [`PoolError::UnknownBackend`] (e.g. a late verdict for a backend removed by a reload).
    pub fn set_health(&mut self, backend: SocketAddrV4, health: Health) -> Result<bool, PoolError> {
        if self.pool.find(backend).is_none() {
            return Err(PoolError::UnknownBackend(backend));
        }
        self.notes.entry(backend).or_default().check_health = Some(health);
        Ok(self.apply_health(backend))
    }

    /// Sets the pool's health of `backend` from its check verdict and its agent: down when
    /// either says down. Returns whether it changed.
    fn apply_health(&mut self, backend: SocketAddrV4) -> bool {
        let (Some(id), Some(notes)) = (self.pool.find(backend), self.notes.get(&backend)) else {
            return false;
        };
        let check = notes.check_health.unwrap_or_else(|| {
            self.pool
                .backend(id)
                .map_or(Health::Up, balance::Backend::health)
        });
        let health = if notes.agent_down {
            Health::Down
        } else {
            check
        };
        self.pool.set_health(id, health)
    }

    /// Applies what `backend`'s agent said (HAProxy's agent check): `down` holds it down
    /// whatever its health check says and `up` lifts that; `ready`, `drain` and `maint` set
    /// its state as `lb set state` does; `NN%` sets its weight to NN % of the configured
    /// one. A malformed line is counted and changes nothing, nor does an agent that cannot
    /// be reached. Returns whether the admin state changed (the checks' targets change with
    /// it: maintenance stops the health checks). A backend no longer configured is ignored.
    pub fn agent_said(
        &mut self,
        backend: SocketAddrV4,
        outcome: Result<AgentReply, AgentFailure>,
    ) -> bool {
        let Some(id) = self.pool.find(backend) else {
            return false;
        };
        let health = self
            .pool
            .backend(id)
            .map_or(Health::Up, balance::Backend::health);
        let notes = self.notes.entry(backend).or_default();
        // Until the agent holds it down, the pool's health is the check's verdict: keep it
        // apart now, so that `up` restores it.
        if !notes.agent_down && notes.check_health.is_none() {
            notes.check_health = Some(health);
        }
        if outcome.is_err_and(AgentFailure::is_malformed) {
            notes.agent_malformed += 1;
        }
        notes.agent = Some(outcome);
        let Ok(reply) = outcome else {
            return false;
        };
        if let Some(h) = reply.health {
            notes.agent_down = h == AgentHealth::Down;
        }
        if let Some(p) = reply.weight_percent {
            notes.agent_percent = Some(p);
            self.apply_agent_weight(backend, p);
        }
        self.apply_health(backend);
        reply
            .admin
            .is_some_and(|a| self.pool.set_admin(backend, a).unwrap_or(false))
    }

    fn apply_agent_weight(&mut self, backend: SocketAddrV4, percent: u32) {
        let configured = self.configured_weights.get(&backend).copied().unwrap_or(0);
        let reply = AgentReply {
            weight_percent: Some(percent),
            ..AgentReply::default()
        };
        let weight = reply
            .weight(configured)
            .unwrap_or(configured)
            .min(balance::MAX_WEIGHT);
        // Cannot fail: the backend is live and the weight capped.
        let _ = self.pool.set_weight(backend, weight);
    }

    /// Counts a failed health check of `backend` and keeps `why` for `show lb` (its
    /// verdicts come through [`VirtualService::set_health`]). A backend no longer configured
    /// is ignored: its probe was already under way when a reload removed it.
    pub fn check_failed(&mut self, backend: SocketAddrV4, why: ProbeFailure) {
        if let Some(id) = self.pool.find(backend) {
            self.pool.check_failed(id);
            self.notes.entry(backend).or_default().last_failure = Some(why);
        }
    }

    /// What the checks last said about `backend`, if anything.
    #[must_use]
    pub fn check_notes(&self, backend: SocketAddrV4) -> Option<&CheckNotes> {
        self.notes.get(&backend)
    }

    /// The health checker's targets for this service: every configured backend but those in
    /// maintenance (HAProxy's `maint` stops the checks too), with its current health as the
    /// starting point, and the address its probes connect to (the check's `port` when set).
    ///
    /// Its agents too: every configured backend's, those in maintenance included (an agent
    /// brings its backend back with `ready`).
    #[must_use]
    pub fn health_targets(&self) -> CheckTargets<BackendKey> {
        let Some(cfg) = &self.health else {
            return CheckTargets::default();
        };
        let key = |b: &balance::Backend| BackendKey {
            service: self.name.clone(),
            backend: b.addr(),
        };
        let agents = cfg
            .agent
            .iter()
            .flat_map(|agent| {
                self.pool
                    .backends()
                    .filter(|(_, b)| b.state() != balance::BackendState::Removed)
                    .map(move |(_, b)| {
                        let addr = SocketAddrV4::new(*b.addr().ip(), agent.port);
                        (key(b), addr, agent.interval, cfg.timeout)
                    })
            })
            .collect::<Vec<(BackendKey, SocketAddrV4, Duration, Duration)>>();
        let checks = self
            .pool
            .backends()
            .filter(|(_, b)| {
                !matches!(
                    b.state(),
                    balance::BackendState::Removed | balance::BackendState::Maint
                )
            })
            .map(|(_, b)| {
                let port = match b.addr().port() {
                    // A port-less backend is probed on its first service port's port.
                    0 => self.inside_for(b.addr(), self.listen.port()).port(),
                    port => port,
                };
                let addr = SocketAddrV4::new(*b.addr().ip(), cfg.port.unwrap_or(port));
                // The checker goes on from the check's own verdict (not the agent's).
                let verdict = self
                    .notes
                    .get(&b.addr())
                    .and_then(|n| n.check_health)
                    .unwrap_or(b.health());
                (key(b), addr, cfg.clone(), verdict)
            })
            .collect();
        CheckTargets { checks, agents }
    }

    /// Whether `endpoint` is one of this service's backends or its sorry server. The gateway
    /// keeps dynamic mappings off such endpoints: a mapping there would leave the service's
    /// flows to that backend nowhere to go.
    #[must_use]
    pub fn uses_endpoint(&self, endpoint: SocketAddrV4) -> bool {
        let portless = SocketAddrV4::new(*endpoint.ip(), 0);
        let real = |a: SocketAddrV4| self.pool.find(a).is_some() || self.pool.sorry() == Some(a);
        real(endpoint) || (self.serves_backend_port(endpoint.port()) && real(portless))
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

    /// How connections reach the backends.
    #[must_use]
    pub fn forward(&self) -> Forward {
        self.forward
    }

    /// TCP or UDP.
    #[must_use]
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Whether each datagram is scheduled on its own (ipvsadm `-o`).
    #[must_use]
    pub fn one_packet(&self) -> bool {
        self.one_packet
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

    /// Turns the journals of the pool's persistence templates and `lblc`/`lblcr` destination
    /// table on or off (flow sync).
    pub fn set_sync_journal(&mut self, on: bool) {
        self.pool.set_sync_journal(on);
    }

    /// The persistence templates changed since the last call (see
    /// [`Pool::take_template_changes`]).
    pub fn take_template_changes(&mut self, now: Instant) -> Vec<TemplateChange> {
        self.pool.take_template_changes(now)
    }

    /// Every persistence template in force (see [`Pool::export_templates`]).
    #[must_use]
    pub fn export_templates(&self, now: Instant) -> Vec<TemplateImage> {
        self.pool.export_templates(now)
    }

    /// Installs a peer's persistence template (see [`Pool::install_template`]).
    ///
    /// # Errors
    /// [`TemplateRefused`] when the pool has no persistence, no backend with the template's
    /// address, or no room.
    pub fn install_template(
        &mut self,
        now: Instant,
        template: &TemplateImage,
    ) -> Result<bool, TemplateRefused> {
        self.pool.install_template(now, template)
    }

    /// The `lblc`/`lblcr` destination entries changed since the last call (see
    /// [`Pool::take_locality_changes`]).
    pub fn take_locality_changes(&mut self, now: Instant) -> Vec<LocalityImage> {
        self.pool.take_locality_changes(now)
    }

    /// The destinations whose `lblc`/`lblcr` entry was removed since the last call (see
    /// [`Pool::take_locality_removals`]).
    pub fn take_locality_removals(&mut self, now: Instant) -> Vec<std::net::Ipv4Addr> {
        self.pool.take_locality_removals(now)
    }

    /// Removes a destination entry its peer removed (see [`Pool::remove_locality`]).
    ///
    /// # Errors
    /// [`LocalityRefused::NotLocality`] when the scheduler keeps no destination table.
    pub fn remove_locality(&mut self, dest: std::net::Ipv4Addr) -> Result<bool, LocalityRefused> {
        self.pool.remove_locality(dest)
    }

    /// Every `lblc`/`lblcr` destination entry in force (see [`Pool::export_locality`]).
    #[must_use]
    pub fn export_locality(&self, now: Instant) -> Vec<LocalityImage> {
        self.pool.export_locality(now)
    }

    /// Installs a peer's destination entry (see [`Pool::install_locality`]).
    ///
    /// # Errors
    /// [`LocalityRefused`] when the scheduler keeps no destination table, a backend is not
    /// in the pool, or the table is full.
    pub fn install_locality(
        &mut self,
        now: Instant,
        entry: &LocalityImage,
    ) -> Result<bool, LocalityRefused> {
        self.pool.install_locality(now, entry)
    }
}

/// Also the fixture of the gateway-level service tests (`gateway/services.rs`).
/// Greatest common divisor (`gcd(0, w) = w`): wrr weights divided by theirs give the same
/// smooth sequence with a shorter cycle.
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use balance::{BackendConfig, SchedulerKind};
    use std::net::Ipv4Addr;
    use testkit::epoch;

    pub(crate) fn rs(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80)
    }

    pub(crate) fn web(backends: &[(u8, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            listen: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80),
            ports: None,
            pool: PoolConfig {
                scheduler: SchedulerKind::Wrr,
                backends: backends
                    .iter()
                    .map(|&(l, weight)| BackendConfig::new(rs(l), weight))
                    .collect(),
                ..PoolConfig::default()
            },
            health: Some(HealthConfig::default()),
            forward: Forward::Nat,
            proto: Proto::Tcp,
            one_packet: false,
        }
    }

    fn client(n: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 200), 40_000 + n)
    }

    #[test]
    fn flow_life_cycle_feeds_the_counters() {
        let now = epoch();
        let mut s = VirtualService::new(web(&[(101, 1), (102, 1)])).unwrap();
        let a = s.select(now, client(1), 80).unwrap();
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
            assert_eq!(s.select(now, client(n), 80), Some(rs(102)));
        }
        s.set_weight(rs(102), 0).unwrap();
        assert!(!s.is_available());
        assert_eq!(s.select(now, client(99), 80), None);
        assert_eq!(
            s.set_health(rs(9), Health::Up),
            Err(PoolError::UnknownBackend(rs(9)))
        );
        // Failed checks count on the backend; one for a backend gone is dropped.
        s.check_failed(rs(101), ProbeFailure::BodyMismatch);
        s.check_failed(rs(9), ProbeFailure::Refused);
        assert_eq!(
            s.check_notes(rs(101)).and_then(|n| n.last_failure),
            Some(ProbeFailure::BodyMismatch)
        );
        assert_eq!(s.check_notes(rs(9)), None);
        let b = s.pool().backend(s.backend_id(rs(101)).unwrap()).unwrap();
        assert_eq!(
            (b.stats().checks_failed, b.stats().down_transitions),
            (1, 1)
        );
        let keys: Vec<String> = s
            .health_targets()
            .checks
            .iter()
            .map(|t| t.0.to_string())
            .collect();
        assert_eq!(keys, ["web/10.0.0.101:80", "web/10.0.0.102:80"]);
    }

    #[test]
    fn a_check_port_moves_the_probes_not_the_backend() {
        let mut cfg = web(&[(101, 1)]);
        cfg.health = Some(HealthConfig {
            port: Some(8080),
            ..HealthConfig::default()
        });
        let s = VirtualService::new(cfg).unwrap();
        let targets = s.health_targets().checks;
        // Keyed by the backend (its verdict applies there), probing its port 8080.
        assert_eq!(
            (targets[0].0.backend, targets[0].1),
            (
                rs(101),
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 8080)
            )
        );
    }

    #[test]
    fn the_agent_weighs_drains_and_holds_down() {
        let now = epoch();
        let mut cfg = web(&[(101, 10), (102, 10)]);
        cfg.health = Some(HealthConfig {
            agent: Some(crate::health::AgentConfig {
                port: 9999,
                interval: Duration::from_secs(2),
            }),
            ..HealthConfig::default()
        });
        let mut s = VirtualService::new(cfg.clone()).unwrap();
        let said = |line: &str| AgentReply::parse(line.as_bytes());
        let backend = |s: &VirtualService, last: u8| {
            s.pool()
                .backend(s.backend_id(rs(last)).unwrap())
                .map(|b| (b.state(), b.weight()))
                .unwrap()
        };
        // 50 %: half the configured weight.
        assert!(!s.agent_said(rs(101), said("50%")));
        assert_eq!(backend(&s, 101), (balance::BackendState::Up, 5));
        // drain: nothing new; ready: back.
        assert!(s.agent_said(rs(101), said("drain")));
        for n in 0..4 {
            assert_eq!(s.select(now, client(n), 80), Some(rs(102)));
        }
        assert!(s.agent_said(rs(101), said("ready")));
        // down holds a backend down although its check passes; up gives the check's verdict
        // back.
        s.agent_said(rs(102), said("down #disk full"));
        s.set_health(rs(102), Health::Up).unwrap();
        assert_eq!(backend(&s, 102).0, balance::BackendState::Down);
        s.agent_said(rs(102), said("up"));
        assert_eq!(backend(&s, 102).0, balance::BackendState::Up);
        s.set_health(rs(102), Health::Down).unwrap();
        s.agent_said(rs(102), said("up"));
        assert_eq!(backend(&s, 102).0, balance::BackendState::Down);
        s.set_health(rs(102), Health::Up).unwrap();
        // Malformed lines are counted and change nothing; an unreachable agent neither.
        s.agent_said(rs(102), Err(AgentFailure::TooLong));
        s.agent_said(rs(102), said("weight please"));
        s.agent_said(rs(102), Err(AgentFailure::Unreachable));
        let notes = s.check_notes(rs(102)).unwrap();
        assert_eq!(
            (notes.agent_malformed, notes.agent),
            (2, Some(Err(AgentFailure::Unreachable)))
        );
        assert_eq!(backend(&s, 102), (balance::BackendState::Up, 10));
        // A reload brings the file's weight, and the agent's percentage applies to it.
        cfg.pool.backends[0].weight = 20;
        s.reconfigure(cfg).unwrap();
        assert_eq!(backend(&s, 101).1, 10);
        // In maintenance the health check stops, the agent goes on (it may say ready).
        s.agent_said(rs(102), said("maint"));
        let targets = s.health_targets();
        assert_eq!(targets.checks.len(), 1);
        let agents: Vec<SocketAddrV4> = targets.agents.iter().map(|a| a.1).collect();
        assert_eq!(
            agents,
            [
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 101), 9999),
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 102), 9999)
            ]
        );
        // A late answer for a backend gone is ignored.
        assert!(!s.agent_said(rs(9), said("drain")));
    }

    #[test]
    fn reload_changes_weights_and_keeps_counts() {
        let now = epoch();
        let mut s = VirtualService::new(web(&[(101, 1), (102, 1)])).unwrap();
        let a = s.select(now, client(1), 80).unwrap();
        s.flow_opened(now, a, client(1));
        s.flow_established(now, a, client(1));
        s.reconfigure(web(&[(101, 3), (102, 1)])).unwrap();
        let picks: Vec<_> = (0..4)
            .map(|n| s.select(now, client(n), 80).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&p| p == rs(101)).count(), 3);
        assert_eq!(
            s.pool().backend(s.backend_id(a).unwrap()).unwrap().active(),
            1
        );
    }
}
