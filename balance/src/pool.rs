//! The pool: backends, the scheduler, persistence and the sorry server of one virtual service.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;
use std::time::Instant;

use crate::backend::{Backend, BackendId, ConnState, Health};
use crate::error::PoolError;
use crate::lc::LeastConn;
use crate::mh::{DEFAULT_TABLE_SIZE, Maglev};
use crate::persist::{PersistTable, Persistence};
use crate::rr::RoundRobin;
use crate::sh::SourceHash;
use crate::wrr::SmoothWrr;

/// Highest weight a backend may have (ipvsadm's range).
pub const MAX_WEIGHT: u32 = 65_535;

/// Most backends one pool holds, counting removed ones that still have connections.
pub const MAX_BACKENDS: usize = 512;

/// Scheduling algorithm, named as ipvsadm `-s` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum SchedulerKind {
    /// Round robin: equal turns, weights ignored except 0.
    Rr,
    /// Smooth weighted round robin (nginx's; exact over each cycle of Σweights picks).
    Wrr,
    /// Least connections: smallest `active * 256 + inactive`.
    Lc,
    /// Weighted least connections: smallest overhead / weight (LVS's default).
    #[default]
    Wlc,
    /// Source hashing: a client address always maps to the same backend while the set is stable.
    Sh,
    /// Maglev hashing: like `sh`, but a backend leaving moves (almost) only its own clients.
    Mh,
}

impl SchedulerKind {
    /// Every kind, in documentation order.
    pub const ALL: [Self; 6] = [Self::Rr, Self::Wrr, Self::Lc, Self::Wlc, Self::Sh, Self::Mh];

    /// The ipvsadm name (`"wrr"`, ...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Sh => "sh",
            Self::Mh => "mh",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scheduler name that is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (expected rr, wrr, lc, wlc, sh or mh)")]
pub struct UnknownScheduler(pub String);

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}

/// One configured backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// Real server address and port.
    pub addr: SocketAddrV4,
    /// Weight, 0..=[`MAX_WEIGHT`]; 0 drains.
    pub weight: u32,
}

/// Everything that configures a pool; [`Pool::reconfigure`] takes the same struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Scheduling algorithm.
    pub scheduler: SchedulerKind,
    /// Client stickiness; `None` schedules every connection afresh.
    pub persistence: Option<Persistence>,
    /// Where new flows go when no backend is eligible; `None` refuses them.
    pub sorry: Option<SocketAddrV4>,
    /// `sh`/`mh` hash the client port too (ipvsadm `sh-port`/`mh-port`), spreading one client's
    /// connections instead of pinning them.
    pub hash_port: bool,
    /// Maglev table size for `mh` (a prime); [`DEFAULT_TABLE_SIZE`] unless there is a reason.
    pub mh_table_size: u32,
    /// The real servers.
    pub backends: Vec<BackendConfig>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerKind::default(),
            persistence: None,
            sorry: None,
            hash_port: false,
            mh_table_size: DEFAULT_TABLE_SIZE,
            backends: Vec::new(),
        }
    }
}

impl PoolConfig {
    fn validate(&self) -> Result<(), PoolError> {
        for (i, b) in self.backends.iter().enumerate() {
            if b.weight > MAX_WEIGHT {
                return Err(PoolError::WeightOutOfRange(b.weight));
            }
            if self.backends[..i].iter().any(|o| o.addr == b.addr) {
                return Err(PoolError::DuplicateBackend(b.addr));
            }
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(PoolError::TooManyBackends { max: MAX_BACKENDS });
        }
        if let Some(p) = &self.persistence {
            p.validate()?;
        }
        Maglev::new(self.mh_table_size)?;
        Ok(())
    }
}

/// Where a new flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// To this backend; the pool has counted the connection as inactive (being opened).
    Backend {
        /// Keep it with the flow for [`Pool::established`] and [`Pool::closed`].
        id: BackendId,
        /// The DNAT target.
        addr: SocketAddrV4,
    },
    /// No backend can take it: to the sorry server (not counted per backend).
    Sorry(SocketAddrV4),
    /// No backend can take it and there is no sorry server: refuse (TCP RST).
    Refuse,
}

/// Pool-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// New flows sent to the sorry server.
    pub sorry: u64,
    /// New flows refused because no backend could take them.
    pub refused: u64,
    /// New flows that followed a persistence template.
    pub persistent_hits: u64,
    /// New flows of a client without a template that got none because the pool already holds
    /// [`MAX_TEMPLATES`](crate::MAX_TEMPLATES) (scheduled, not pinned).
    pub persist_full: u64,
}

/// Direction of a packet of a balanced flow, for the traffic counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → backend.
    ToBackend,
    /// Backend → client.
    ToClient,
}

#[derive(Debug, Clone)]
enum Scheduler {
    Rr(RoundRobin),
    Wrr(SmoothWrr),
    Lc(LeastConn),
    Wlc(LeastConn),
    Sh(SourceHash),
    Mh(Maglev),
}

impl Scheduler {
    fn new(kind: SchedulerKind, mh_table_size: u32) -> Result<Self, PoolError> {
        Ok(match kind {
            SchedulerKind::Rr => Self::Rr(RoundRobin::default()),
            SchedulerKind::Wrr => Self::Wrr(SmoothWrr::default()),
            SchedulerKind::Lc => Self::Lc(LeastConn::default()),
            SchedulerKind::Wlc => Self::Wlc(LeastConn::default()),
            SchedulerKind::Sh => Self::Sh(SourceHash::default()),
            SchedulerKind::Mh => Self::Mh(Maglev::new(mh_table_size)?),
        })
    }

    /// Brings derived state in line after a weight, health or membership change.
    fn rebuild(&mut self, slots: &[Option<Backend>]) {
        match self {
            Self::Wrr(s) => s.reset(slots.len()),
            Self::Sh(s) => s.rebuild(slots),
            Self::Mh(s) => s.rebuild(slots),
            Self::Rr(_) | Self::Lc(_) | Self::Wlc(_) => {}
        }
    }

    fn pick(
        &mut self,
        slots: &[Option<Backend>],
        client: SocketAddrV4,
        hash_port: bool,
    ) -> Option<usize> {
        match self {
            Self::Rr(s) => s.pick(slots),
            Self::Wrr(s) => s.pick(slots),
            Self::Lc(s) => s.pick(slots, false),
            Self::Wlc(s) => s.pick(slots, true),
            Self::Sh(s) => s.pick(client, hash_port),
            Self::Mh(s) => s.pick(client, hash_port),
        }
    }
}

/// The backends of one virtual service and the state that picks among them.
///
/// Call order for a flow: [`schedule`](Self::schedule) (or [`pick`](Self::pick) then
/// [`opened`](Self::opened)) when its first packet arrives, keep the
/// returned [`BackendId`] with the flow, [`established`](Self::established) when TCP reaches
/// ESTABLISHED, [`count_packet`](Self::count_packet) per packet, and [`closed`](Self::closed)
/// exactly once when the flow table forgets the flow. Drive persistence expiry with
/// [`poll_timeout`](Self::poll_timeout) / [`handle_timeout`](Self::handle_timeout).
#[derive(Debug, Clone)]
pub struct Pool {
    kind: SchedulerKind,
    scheduler: Scheduler,
    persist: Option<PersistTable>,
    sorry: Option<SocketAddrV4>,
    hash_port: bool,
    mh_table_size: u32,
    slots: Vec<Option<Backend>>,
    stats: PoolStats,
}

impl Pool {
    /// A pool with every backend up.
    ///
    /// # Errors
    /// [`PoolError`] for duplicate backends, out-of-range weights, a bad persistence netmask or
    /// timeout, or a Maglev table size that is not prime.
    pub fn new(config: PoolConfig) -> Result<Self, PoolError> {
        config.validate()?;
        let mut pool = Self {
            kind: config.scheduler,
            scheduler: Scheduler::new(config.scheduler, config.mh_table_size)?,
            persist: config.persistence.map(PersistTable::new),
            sorry: config.sorry,
            hash_port: config.hash_port,
            mh_table_size: config.mh_table_size,
            slots: config
                .backends
                .iter()
                .map(|b| Some(Backend::new(b.addr, b.weight)))
                .collect(),
            stats: PoolStats::default(),
        };
        pool.scheduler.rebuild(&pool.slots);
        Ok(pool)
    }

    /// Applies a new configuration without disturbing live flows.
    ///
    /// Backends are matched by address: a kept backend keeps its id, health and counters and
    /// takes the new weight; a new one starts up; a dropped one with live connections stays as
    /// [`BackendState::Removed`](crate::BackendState::Removed) (no new flows) until they close. Persistence templates survive
    /// unless the netmask changes. Nothing changes if the configuration is rejected.
    ///
    /// # Errors
    /// As [`Pool::new`], plus [`PoolError::TooManyBackends`] when removed backends still holding
    /// connections leave no room.
    pub fn reconfigure(&mut self, config: PoolConfig) -> Result<(), PoolError> {
        config.validate()?;
        let scheduler =
            if config.scheduler != self.kind || config.mh_table_size != self.mh_table_size {
                Some(Scheduler::new(config.scheduler, config.mh_table_size)?)
            } else {
                None
            };
        let kept = |b: &Backend| config.backends.iter().any(|c| c.addr == b.addr);
        let lingering = self
            .slots
            .iter()
            .flatten()
            .filter(|b| !kept(b) && b.active + b.inactive > 0)
            .count();
        if config.backends.len() + lingering > MAX_BACKENDS {
            return Err(PoolError::TooManyBackends { max: MAX_BACKENDS });
        }

        for i in 0..self.slots.len() {
            let Some(b) = &mut self.slots[i] else {
                continue;
            };
            if kept(b) {
                continue;
            }
            b.removed = true;
            self.free_if_idle(i);
        }
        for c in &config.backends {
            match self.position(c.addr) {
                Some(i) => {
                    if let Some(b) = &mut self.slots[i] {
                        b.weight = c.weight;
                        b.removed = false;
                    }
                }
                None => {
                    let b = Some(Backend::new(c.addr, c.weight));
                    match self.slots.iter().position(Option::is_none) {
                        Some(free) => self.slots[free] = b,
                        None => self.slots.push(b),
                    }
                }
            }
        }
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }

        if let Some(s) = scheduler {
            self.scheduler = s;
            self.kind = config.scheduler;
            self.mh_table_size = config.mh_table_size;
        }
        match (&mut self.persist, config.persistence) {
            (Some(t), Some(p)) => t.set_params(p),
            (slot, p) => *slot = p.map(PersistTable::new),
        }
        self.sorry = config.sorry;
        self.hash_port = config.hash_port;
        self.scheduler.rebuild(&self.slots);
        Ok(())
    }

    /// Picks the backend for a new flow from `client` and counts the connection: exactly
    /// [`pick`](Self::pick) followed by [`opened`](Self::opened) when it names a backend.
    pub fn schedule(&mut self, now: Instant, client: SocketAddrV4) -> Decision {
        let d = self.pick(now, client);
        if let Decision::Backend { id, .. } = d {
            self.opened(now, id, client);
        }
        d
    }

    /// Decides where a new flow from `client` goes, without counting it yet.
    ///
    /// Persistence first: a client whose template points at an eligible backend goes there.
    /// Otherwise the scheduler picks among eligible backends (up, weight above 0); `opened`
    /// then points the template at its choice. Down, draining and removed backends never get a
    /// new flow here, persistent or not (ipvsadm's `expire_quiescent_template=1` behaviour:
    /// drain means drain).
    ///
    /// Split from [`opened`](Self::opened) for callers whose flow table may still refuse the
    /// flow after the decision (table full): counters then stay exact. The scheduler's
    /// rotation has advanced either way.
    pub fn pick(&mut self, now: Instant, client: SocketAddrV4) -> Decision {
        let pinned = self
            .persist
            .as_ref()
            .and_then(|p| p.lookup(now, *client.ip()))
            .map(|id| usize::from(id.0))
            .filter(|&i| self.slot(i).is_some_and(Backend::is_eligible));
        if pinned.is_some() {
            self.stats.persistent_hits += 1;
        }
        let chosen = pinned.or_else(|| self.scheduler.pick(&self.slots, client, self.hash_port));
        match chosen.and_then(|i| Some((i, self.slot(i)?))) {
            Some((i, b)) => Decision::Backend {
                id: slot_id(i),
                addr: b.addr,
            },
            None => match self.sorry {
                Some(addr) => {
                    self.stats.sorry += 1;
                    Decision::Sorry(addr)
                }
                None => {
                    self.stats.refused += 1;
                    Decision::Refuse
                }
            },
        }
    }

    /// Counts a new flow from `client` on backend `id` (as an inactive connection until
    /// [`established`](Self::established)) and points the client's persistence template at it.
    pub fn opened(&mut self, now: Instant, id: BackendId, client: SocketAddrV4) {
        let Some(b) = self.slot_mut(usize::from(id.0)) else {
            return;
        };
        b.inactive += 1;
        b.stats.connections += 1;
        if let Some(p) = &mut self.persist
            && !p.bind(now, *client.ip(), id)
        {
            self.stats.persist_full += 1;
        }
    }

    /// Moves a connection of `client` from inactive to active (TCP reached ESTABLISHED).
    pub fn established(&mut self, now: Instant, id: BackendId, client: Ipv4Addr) {
        self.transition(now, id, ConnState::Inactive, ConnState::Active, client);
    }

    /// Moves a connection of `client` between the active and inactive counts (e.g. FIN or
    /// RST seen: active → inactive, as LVS counts closing connections). A persistence template
    /// is held while its client has active connections.
    pub fn transition(
        &mut self,
        now: Instant,
        id: BackendId,
        from: ConnState,
        to: ConnState,
        client: Ipv4Addr,
    ) {
        if from == to {
            return;
        }
        let Some(b) = self.slot_mut(usize::from(id.0)) else {
            return;
        };
        let c = b.count_mut(from);
        if *c == 0 {
            return;
        }
        *c -= 1;
        *b.count_mut(to) += 1;
        if let Some(p) = &mut self.persist {
            match to {
                ConnState::Active => p.hold(client),
                ConnState::Inactive => p.release(now, client),
            }
        }
    }

    /// Forgets a connection scheduled by [`schedule`](Self::schedule) for `client`; `state` is
    /// the count it was last in. Frees a removed backend's slot with its last connection.
    pub fn closed(&mut self, now: Instant, id: BackendId, state: ConnState, client: Ipv4Addr) {
        let i = usize::from(id.0);
        if let Some(b) = self.slot_mut(i) {
            let c = b.count_mut(state);
            *c = c.saturating_sub(1);
        }
        if let Some(p) = self.persist.as_mut().filter(|_| state == ConnState::Active) {
            p.release(now, client);
        }
        self.free_if_idle(i);
    }

    /// Adds one packet of `len` bytes to the backend's traffic counters.
    pub fn count_packet(&mut self, id: BackendId, dir: Direction, len: usize) {
        if let Some(b) = self.slot_mut(usize::from(id.0)) {
            let len = len as u64;
            match dir {
                Direction::ToBackend => {
                    b.stats.packets_in += 1;
                    b.stats.bytes_in += len;
                }
                Direction::ToClient => {
                    b.stats.packets_out += 1;
                    b.stats.bytes_out += len;
                }
            }
        }
    }

    /// Sets one backend's weight at run time (`vipgate lb weight`); 0 drains it.
    ///
    /// # Errors
    /// [`PoolError::UnknownBackend`] if no live backend has this address,
    /// [`PoolError::WeightOutOfRange`] above [`MAX_WEIGHT`].
    pub fn set_weight(&mut self, addr: SocketAddrV4, weight: u32) -> Result<(), PoolError> {
        if weight > MAX_WEIGHT {
            return Err(PoolError::WeightOutOfRange(weight));
        }
        let i = self
            .position(addr)
            .filter(|&i| self.slot(i).is_some_and(|b| !b.removed))
            .ok_or(PoolError::UnknownBackend(addr))?;
        if let Some(b) = self.slot_mut(i) {
            if b.weight == weight {
                return Ok(());
            }
            b.weight = weight;
        }
        self.scheduler.rebuild(&self.slots);
        Ok(())
    }

    /// Records a health verdict; returns whether the backend's health changed.
    pub fn set_health(&mut self, id: BackendId, health: Health) -> bool {
        let Some(b) = self.slot_mut(usize::from(id.0)) else {
            return false;
        };
        if b.health == health {
            return false;
        }
        b.health = health;
        self.scheduler.rebuild(&self.slots);
        true
    }

    /// Next persistence template expiry, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.persist.as_ref().and_then(PersistTable::poll_timeout)
    }

    /// Expires persistence templates due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.persist {
            p.handle_timeout(now);
        }
    }

    /// The backend with this id (live or removed-but-draining).
    #[must_use]
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.slot(usize::from(id.0))
    }

    /// The id of the backend with this address.
    #[must_use]
    pub fn find(&self, addr: SocketAddrV4) -> Option<BackendId> {
        self.position(addr).map(slot_id)
    }

    /// Every backend, in slot order, including removed ones still holding connections.
    pub fn backends(&self) -> impl Iterator<Item = (BackendId, &Backend)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((slot_id(i), b.as_ref()?)))
    }

    /// Whether any backend could take a new flow now.
    #[must_use]
    pub fn has_eligible(&self) -> bool {
        self.slots.iter().flatten().any(Backend::is_eligible)
    }

    /// The scheduler in use.
    #[must_use]
    pub fn scheduler(&self) -> SchedulerKind {
        self.kind
    }

    /// Persistence parameters, if persistence is on.
    #[must_use]
    pub fn persistence(&self) -> Option<Persistence> {
        self.persist.as_ref().map(PersistTable::params)
    }

    /// Number of persistence templates held.
    #[must_use]
    pub fn templates(&self) -> usize {
        self.persist.as_ref().map_or(0, PersistTable::len)
    }

    /// The sorry server, if one is configured.
    #[must_use]
    pub fn sorry(&self) -> Option<SocketAddrV4> {
        self.sorry
    }

    /// Pool-wide counters.
    #[must_use]
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    fn slot(&self, i: usize) -> Option<&Backend> {
        self.slots.get(i)?.as_ref()
    }

    fn slot_mut(&mut self, i: usize) -> Option<&mut Backend> {
        self.slots.get_mut(i)?.as_mut()
    }

    fn position(&self, addr: SocketAddrV4) -> Option<usize> {
        self.slots
            .iter()
            .position(|b| b.as_ref().is_some_and(|b| b.addr == addr))
    }

    /// Frees a removed backend's slot once it holds no connection, and forgets templates that
    /// point at it so a backend reusing the id does not inherit its clients.
    fn free_if_idle(&mut self, i: usize) {
        let idle_removed = self
            .slot(i)
            .is_some_and(|b| b.removed && b.active + b.inactive == 0);
        if idle_removed {
            self.slots[i] = None;
            if let Some(p) = &mut self.persist {
                p.forget_backend(slot_id(i));
            }
            self.scheduler.rebuild(&self.slots);
        }
    }
}

fn slot_id(i: usize) -> BackendId {
    // Slots never exceed MAX_BACKENDS (512), so this cannot truncate.
    BackendId(i as u16)
}
