//! The pool: backends, the scheduler, persistence and the sorry server of one virtual service.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::backend::{AdminState, Backend, BackendId, ConnState, Health, Ramp};
use crate::dh::DestinationHash;
use crate::error::PoolError;
use crate::lc::LeastConn;
use crate::locality::{Locality, LocalityImage, LocalityRefused};
use crate::mh::{DEFAULT_TABLE_SIZE, Maglev};
use crate::persist::{PersistTable, Persistence, TemplateChange, TemplateImage, TemplateRefused};
use crate::rr::RoundRobin;
use crate::sh::SourceHash;
use crate::twos::TwoChoices;
use crate::wrr::SmoothWrr;
use crate::{expected, failover};

/// Highest weight a backend may have (ipvsadm's range).
pub const MAX_WEIGHT: u32 = 65_535;

/// Most backends one pool holds, counting removed ones that still have connections. Ids are
/// `u16` and every scheduler's state is linear in it; 1,024 leaves room for the large cache
/// farms `lblc`/`lblcr` serve.
pub const MAX_BACKENDS: usize = 1_024;

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
    /// Locality-based least connection: a destination address stays on its backend (cache)
    /// until that one is unavailable or busy.
    Lblc,
    /// Locality-based least connection with replication: a destination is served by a set of
    /// backends that grows while they are busy and shrinks when it cools.
    Lblcr,
    /// Destination hashing: a destination address always maps to the same backend.
    Dh,
    /// Source hashing: a client address always maps to the same backend while the set is stable.
    Sh,
    /// Shortest expected delay: smallest (active + 1) / weight.
    Sed,
    /// Never queue: an idle backend if there is one, else as `sed`.
    Nq,
    /// Weighted failover: the available backend with the highest weight.
    Fo,
    /// Overflow connection: the highest weight whose active connections do not exceed it.
    Ovf,
    /// Maglev hashing: like `sh`, but a backend leaving moves (almost) only its own clients.
    Mh,
    /// Weighted random of two, the less loaded of the two winning.
    Twos,
}

impl SchedulerKind {
    /// Every kind, in ipvsadm's order.
    pub const ALL: [Self; 14] = [
        Self::Rr,
        Self::Wrr,
        Self::Lc,
        Self::Wlc,
        Self::Lblc,
        Self::Lblcr,
        Self::Dh,
        Self::Sh,
        Self::Sed,
        Self::Nq,
        Self::Fo,
        Self::Ovf,
        Self::Mh,
        Self::Twos,
    ];

    /// The ipvsadm name (`"wrr"`, ...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Lblc => "lblc",
            Self::Lblcr => "lblcr",
            Self::Dh => "dh",
            Self::Sh => "sh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::Fo => "fo",
            Self::Ovf => "ovf",
            Self::Mh => "mh",
            Self::Twos => "twos",
        }
    }

    /// Whether picking a backend costs time linear in the number of backends (as in LVS:
    /// every scheduler that compares loads scans the list); the others are O(1) per
    /// connection, plus a hash-table lookup for `lblc`/`lblcr` hits.
    #[must_use]
    pub fn is_linear(self) -> bool {
        !matches!(self, Self::Rr | Self::Dh | Self::Sh | Self::Mh)
    }

    /// Whether a backend's share of new connections follows its share of the weights: per
    /// cycle (`wrr`), in the long run through the load (`wlc`, `sed`, `nq`, `twos`) or by
    /// client address space (`sh`, `mh`). The others ignore weights (`rr`, `lc`, `dh` but for
    /// 0), use them as an order (`fo`, `ovf`), or keep a destination on its backend
    /// (`lblc`, `lblcr`). A canary step ([`crate::canary_weights`]) needs one that follows.
    #[must_use]
    pub fn follows_weights(self) -> bool {
        matches!(
            self,
            Self::Wrr | Self::Wlc | Self::Sed | Self::Nq | Self::Twos | Self::Sh | Self::Mh
        )
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scheduler name that is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scheduler {0:?} (expected rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh or twos)"
)]
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
    /// Upper connection threshold (ipvsadm `-x`): on reaching it the backend is overloaded
    /// and gets no new flows. 0: no threshold.
    pub max_connections: u32,
    /// Lower connection threshold (ipvsadm `-y`): an overloaded backend takes flows again
    /// once under it (under 3/4 of `max_connections` when 0).
    pub min_connections: u32,
}

impl BackendConfig {
    /// A backend without connection thresholds.
    #[must_use]
    pub const fn new(addr: SocketAddrV4, weight: u32) -> Self {
        Self {
            addr,
            weight,
            max_connections: 0,
            min_connections: 0,
        }
    }
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
    /// `sh`/`mh` send a client whose backend is overloaded to the next available one instead
    /// of refusing it (ipvsadm `sh-fallback`/`mh-fallback`).
    pub fallback: bool,
    /// Maglev table size for `mh` (a prime); [`DEFAULT_TABLE_SIZE`] unless there is a reason.
    pub mh_table_size: u32,
    /// Most connections the whole service holds; new ones beyond go to the sorry server or
    /// are refused. 0: no limit.
    pub max_connections: u32,
    /// A backend coming up (health recovered, weight raised from 0, added by reconfigure)
    /// ramps its effective weight linearly from 1 to its weight over this time. `None`: at
    /// once.
    pub slow_start: Option<Duration>,
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
            fallback: false,
            mh_table_size: DEFAULT_TABLE_SIZE,
            max_connections: 0,
            slow_start: None,
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
            let (max, min) = (b.max_connections, b.min_connections);
            if min != 0 && (max == 0 || min > max) {
                return Err(PoolError::BadThresholds {
                    backend: b.addr,
                    min,
                    max,
                });
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

/// Pool-wide counters. A counter missing from serialised input (an older daemon's status)
/// reads as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(default)
)]
pub struct PoolStats {
    /// New flows sent to the sorry server.
    #[cfg_attr(feature = "serde", serde(rename = "sorry_connections"))]
    pub sorry: u64,
    /// New flows refused because no backend could take them.
    pub refused: u64,
    /// New flows that followed a persistence template.
    pub persistent_hits: u64,
    /// New flows of a client without a template that got none because the pool already holds
    /// [`MAX_TEMPLATES`](crate::MAX_TEMPLATES) (scheduled, not pinned).
    pub persist_full: u64,
    /// New flows turned away (to the sorry server or refused) because the service held its
    /// `max_connections`; also counted in `sorry` or `refused`.
    pub over_limit: u64,
    /// New destinations of `lblc`/`lblcr` scheduled without a table entry because the table
    /// held [`MAX_LOCALITY_ENTRIES`](crate::MAX_LOCALITY_ENTRIES) busy entries.
    pub locality_full: u64,
}

/// Direction of a packet of a balanced flow, for the traffic counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → backend.
    ToBackend,
    /// Backend → client.
    ToClient,
}

/// What a scheduler may look at for one new flow.
#[derive(Debug, Clone, Copy)]
struct Flow {
    now: Instant,
    client: SocketAddrV4,
    dest: Ipv4Addr,
    hash_port: bool,
    fallback: bool,
}

#[derive(Debug, Clone)]
enum Scheduler {
    Rr(RoundRobin),
    Wrr(SmoothWrr),
    Lc(LeastConn),
    Wlc(LeastConn),
    Locality(Locality),
    Dh(DestinationHash),
    Sh(SourceHash),
    Sed,
    Nq,
    Fo,
    Ovf,
    Mh(Maglev),
    Twos(TwoChoices),
}

impl Scheduler {
    fn new(kind: SchedulerKind, mh_table_size: u32) -> Result<Self, PoolError> {
        Ok(match kind {
            SchedulerKind::Rr => Self::Rr(RoundRobin::default()),
            SchedulerKind::Wrr => Self::Wrr(SmoothWrr::default()),
            SchedulerKind::Lc => Self::Lc(LeastConn::default()),
            SchedulerKind::Wlc => Self::Wlc(LeastConn::default()),
            SchedulerKind::Lblc => Self::Locality(Locality::new(false)),
            SchedulerKind::Lblcr => Self::Locality(Locality::new(true)),
            SchedulerKind::Dh => Self::Dh(DestinationHash::default()),
            SchedulerKind::Sh => Self::Sh(SourceHash::default()),
            SchedulerKind::Sed => Self::Sed,
            SchedulerKind::Nq => Self::Nq,
            SchedulerKind::Fo => Self::Fo,
            SchedulerKind::Ovf => Self::Ovf,
            SchedulerKind::Mh => Self::Mh(Maglev::new(mh_table_size)?),
            SchedulerKind::Twos => Self::Twos(TwoChoices::default()),
        })
    }

    /// Brings derived state in line after a weight, health or membership change.
    fn rebuild(&mut self, slots: &[Option<Backend>]) {
        match self {
            Self::Wrr(s) => s.reset(slots.len()),
            Self::Dh(s) => s.rebuild(slots),
            Self::Sh(s) => s.rebuild(slots),
            Self::Mh(s) => s.rebuild(slots),
            Self::Rr(_)
            | Self::Lc(_)
            | Self::Wlc(_)
            | Self::Locality(_)
            | Self::Sed
            | Self::Nq
            | Self::Fo
            | Self::Ovf
            | Self::Twos(_) => {}
        }
    }

    fn pick(&mut self, slots: &[Option<Backend>], flow: Flow) -> Option<usize> {
        match self {
            Self::Rr(s) => s.pick(slots),
            Self::Wrr(s) => s.pick(slots),
            Self::Lc(s) => s.pick(slots, false),
            Self::Wlc(s) => s.pick(slots, true),
            Self::Locality(s) => s.pick(slots, flow.dest, flow.now),
            Self::Dh(s) => s.pick(slots, flow.dest),
            Self::Sh(s) => s.pick(slots, flow.client, flow.hash_port, flow.fallback),
            Self::Sed => expected::pick(slots, false),
            Self::Nq => expected::pick(slots, true),
            Self::Fo => failover::pick(slots, false),
            Self::Ovf => failover::pick(slots, true),
            Self::Mh(s) => s.pick(slots, flow.client, flow.hash_port, flow.fallback),
            Self::Twos(s) => s.pick(slots, flow.client),
        }
    }

    /// The pick of a scheduler whose choice is a pure function of the flow and the backend
    /// set (`dh`, `sh`, `mh`); `None` for every other scheduler.
    fn pick_stateless(&self, slots: &[Option<Backend>], flow: Flow) -> Option<Option<usize>> {
        match self {
            Self::Dh(s) => Some(s.pick(slots, flow.dest)),
            Self::Sh(s) => Some(s.pick(slots, flow.client, flow.hash_port, flow.fallback)),
            Self::Mh(s) => Some(s.pick(slots, flow.client, flow.hash_port, flow.fallback)),
            _ => None,
        }
    }

    fn locality(&self) -> Option<&Locality> {
        match self {
            Self::Locality(l) => Some(l),
            _ => None,
        }
    }

    fn locality_mut(&mut self) -> Option<&mut Locality> {
        match self {
            Self::Locality(l) => Some(l),
            _ => None,
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
    fallback: bool,
    mh_table_size: u32,
    max_connections: u32,
    slow_start: Option<Duration>,
    slots: Vec<Option<Backend>>,
    /// Connections counted on any backend (what `max_connections` limits).
    live: u64,
    /// Some backend's slow start is pending or running.
    ramping: bool,
    /// Persistence templates and locality entries are journaled for flow sync.
    sync_journal: bool,
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
            fallback: config.fallback,
            mh_table_size: config.mh_table_size,
            max_connections: config.max_connections,
            slow_start: config.slow_start,
            slots: config
                .backends
                .iter()
                .map(|b| Some(configured(b)))
                .collect(),
            live: 0,
            ramping: false,
            sync_journal: false,
            stats: PoolStats::default(),
        };
        pool.scheduler.rebuild(&pool.slots);
        Ok(pool)
    }

    /// Applies a new configuration without disturbing live flows.
    ///
    /// Backends are matched by address: a kept backend keeps its id, health and counters and
    /// takes the new weight and thresholds; a new one starts up (in slow start, when
    /// configured, as does a kept one whose weight rises from 0); a dropped one with live connections stays as
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
        self.slow_start = config.slow_start;
        for c in &config.backends {
            match self.position(c.addr) {
                Some(i) => {
                    if let Some(b) = &mut self.slots[i] {
                        let rising = b.weight == 0 || b.removed;
                        if b.removed {
                            // Listed again: it comes back as a new backend would.
                            b.admin = AdminState::Ready;
                        }
                        b.weight = c.weight;
                        b.removed = false;
                        if b.ramp == Ramp::Done || c.weight == 0 {
                            b.ramp = Ramp::Done;
                            b.effective = c.weight;
                        }
                        b.set_thresholds(c.max_connections, c.min_connections);
                        if rising {
                            self.ramping |= start_ramp(b, self.slow_start);
                        }
                    }
                }
                None => {
                    let mut b = configured(c);
                    self.ramping |= start_ramp(&mut b, self.slow_start);
                    let b = Some(b);
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

        let journal = self.sync_journal;
        if let Some(s) = scheduler {
            self.scheduler = s;
            self.kind = config.scheduler;
            self.mh_table_size = config.mh_table_size;
            // A new (empty) table under a journal: the next drain sends all of it.
            if let Some(l) = self.scheduler.locality_mut() {
                l.set_journal(journal, true);
            }
        }
        match (&mut self.persist, config.persistence) {
            (Some(t), Some(p)) => t.set_params(p),
            (slot, p) => {
                *slot = p.map(PersistTable::new);
                // A new table under a journal: the next drain sends all of it (nothing yet).
                if let Some(t) = slot.as_mut().filter(|_| journal) {
                    t.set_journal(true);
                    t.journal_overflowed();
                }
            }
        }
        self.sorry = config.sorry;
        self.hash_port = config.hash_port;
        self.fallback = config.fallback;
        self.max_connections = config.max_connections;
        if self.slow_start.is_none() {
            self.finish_ramps();
        }
        self.scheduler.rebuild(&self.slots);
        Ok(())
    }

    /// Picks the backend for a new flow from `client` and counts the connection: exactly
    /// [`pick`](Self::pick) followed by [`opened`](Self::opened) when it names a backend.
    pub fn schedule(&mut self, now: Instant, client: SocketAddrV4, dest: Ipv4Addr) -> Decision {
        let d = self.pick(now, client, dest);
        if let Decision::Backend { id, .. } = d {
            self.opened(now, id, client);
        }
        d
    }

    /// Decides where a new flow from `client` to `dest` goes, without counting it yet.
    ///
    /// `dest` is the address the client connected to (the VIP; with a service covering many
    /// destinations, each of them): `dh`, `lblc` and `lblcr` schedule by it. A service that
    /// already holds its `max_connections` turns the flow away. Persistence first: a client whose template points at an eligible backend goes there.
    /// Otherwise the scheduler picks among eligible backends (up, weight above 0); `opened`
    /// then points the template at its choice. Down, draining and removed backends never get a
    /// new flow here, persistent or not (ipvsadm's `expire_quiescent_template=1` behaviour:
    /// drain means drain), with one exception: a backend the operator set to
    /// [`AdminState::Drain`] keeps the clients its templates point at (HAProxy's `drain`).
    ///
    /// Split from [`opened`](Self::opened) for callers whose flow table may still refuse the
    /// flow after the decision (table full): counters then stay exact. The scheduler's
    /// rotation has advanced either way.
    pub fn pick(&mut self, now: Instant, client: SocketAddrV4, dest: Ipv4Addr) -> Decision {
        if self.ramping {
            self.advance_ramps(now);
        }
        let full = self.max_connections != 0 && self.live >= u64::from(self.max_connections);
        if full {
            self.stats.over_limit += 1;
        }
        let pinned = self
            .persist
            .as_ref()
            .filter(|_| !full)
            .and_then(|p| p.lookup(now, *client.ip()))
            .map(|id| usize::from(id.0))
            .filter(|&i| self.slot(i).is_some_and(Backend::takes_persistent));
        if pinned.is_some() {
            self.stats.persistent_hits += 1;
        }
        let flow = self.flow(now, client, dest);
        let chosen = if full {
            None
        } else {
            pinned.or_else(|| self.scheduler.pick(&self.slots, flow))
        };
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

    /// What the scheduler may look at for a flow from `client` to `dest`.
    fn flow(&self, now: Instant, client: SocketAddrV4, dest: Ipv4Addr) -> Flow {
        Flow {
            now,
            client,
            dest,
            hash_port: self.hash_port,
            fallback: self.fallback,
        }
    }

    /// Where a flow already under way from `client` to `dest` was sent, as any node with this
    /// pool computes it, when the scheduler decides from the flow and the backend set alone
    /// (`dh`, `sh`, `mh`): the scheduler's own pick, with no persistence template
    /// and no `max_connections` limit (the flow was admitted where it began), never the
    /// sorry server. `None` when the scheduler is not stateless or no backend is available
    /// for it. Counts nothing; the caller calls [`opened`](Self::opened) if it takes the flow.
    pub fn pick_stateless(
        &mut self,
        now: Instant,
        client: SocketAddrV4,
        dest: Ipv4Addr,
    ) -> Option<(BackendId, SocketAddrV4)> {
        if self.ramping {
            self.advance_ramps(now);
        }
        let flow = self.flow(now, client, dest);
        let i = self.scheduler.pick_stateless(&self.slots, flow)??;
        let b = self.slot(i)?;
        Some((slot_id(i), b.addr))
    }

    /// Counts a new flow from `client` on backend `id` (as an inactive connection until
    /// [`established`](Self::established)) and points the client's persistence template at it.
    pub fn opened(&mut self, now: Instant, id: BackendId, client: SocketAddrV4) {
        let Some(b) = self.slot_mut(usize::from(id.0)) else {
            return;
        };
        b.inactive += 1;
        b.stats.connections += 1;
        b.check_overload_on_open();
        self.live += 1;
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
            if *c > 0 {
                *c -= 1;
                b.check_overload_on_close();
                self.live = self.live.saturating_sub(1);
            }
        }
        if let Some(p) = self.persist.as_mut().filter(|_| state == ConnState::Active) {
            p.release(now, client);
        }
        self.free_if_idle(i);
    }

    /// Counts `n` datagrams of a one-packet service that a data path scheduled to backend
    /// `id` without the core (each a connection opened and forgotten at once, as
    /// [`opened`](Self::opened) then [`closed`](Self::closed) would count it: only the
    /// backend's total of connections grows).
    pub fn count_datagrams(&mut self, id: BackendId, n: u64) {
        if let Some(b) = self.slot_mut(usize::from(id.0)) {
            b.stats.connections += n;
        }
    }

    /// Adds one packet of `len` bytes to the backend's traffic counters.
    pub fn count_packet(&mut self, id: BackendId, dir: Direction, len: usize) {
        self.count_traffic(id, dir, 1, len as u64);
    }

    /// Adds `packets` packets of `bytes` bytes in all to the backend's traffic counters (what
    /// a data path that moved them without the core reports in one go).
    pub fn count_traffic(&mut self, id: BackendId, dir: Direction, packets: u64, bytes: u64) {
        if let Some(b) = self.slot_mut(usize::from(id.0)) {
            match dir {
                Direction::ToBackend => {
                    b.stats.packets_in += packets;
                    b.stats.bytes_in += bytes;
                }
                Direction::ToClient => {
                    b.stats.packets_out += packets;
                    b.stats.bytes_out += bytes;
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
        self.set_weights(&[(addr, weight)])
    }

    /// Sets several backends' weights at once (a canary step): all or none, and the
    /// scheduler starts one fresh cycle with all of them, not one per change.
    ///
    /// # Errors
    /// As [`Pool::set_weight`], for the first change that cannot be made; then nothing
    /// changed.
    pub fn set_weights(&mut self, weights: &[(SocketAddrV4, u32)]) -> Result<(), PoolError> {
        let mut slots = Vec::with_capacity(weights.len());
        for &(addr, weight) in weights {
            if weight > MAX_WEIGHT {
                return Err(PoolError::WeightOutOfRange(weight));
            }
            let i = self
                .position(addr)
                .filter(|&i| self.slot(i).is_some_and(|b| !b.removed))
                .ok_or(PoolError::UnknownBackend(addr))?;
            slots.push((i, weight));
        }
        let slow_start = self.slow_start;
        let mut changed = false;
        for (i, weight) in slots {
            if let Some(b) = self.slot_mut(i) {
                if b.weight == weight {
                    continue;
                }
                changed = true;
                let rising = b.weight == 0;
                b.weight = weight;
                if b.ramp == Ramp::Done || weight == 0 {
                    b.ramp = Ramp::Done;
                    b.effective = weight;
                }
                self.ramping |= rising && start_ramp(b, slow_start);
            }
        }
        if changed {
            self.scheduler.rebuild(&self.slots);
        }
        Ok(())
    }

    /// Sets one backend's operator state at run time (`vipgate lb set state`); returns
    /// whether it changed. Back to [`AdminState::Ready`], the backend starts its slow start.
    /// Flows it holds are never touched. [`Pool::reconfigure`] keeps the state of the
    /// backends it keeps.
    ///
    /// # Errors
    /// [`PoolError::UnknownBackend`] if no live backend has this address.
    pub fn set_admin(&mut self, addr: SocketAddrV4, admin: AdminState) -> Result<bool, PoolError> {
        let i = self
            .position(addr)
            .filter(|&i| self.slot(i).is_some_and(|b| !b.removed))
            .ok_or(PoolError::UnknownBackend(addr))?;
        let slow_start = self.slow_start;
        let Some(b) = self.slot_mut(i) else {
            return Err(PoolError::UnknownBackend(addr));
        };
        if b.admin == admin {
            return Ok(false);
        }
        b.admin = admin;
        if admin == AdminState::Ready {
            self.ramping |= start_ramp(b, slow_start);
        }
        self.scheduler.rebuild(&self.slots);
        Ok(true)
    }

    /// Records a health verdict; returns whether the backend's health changed. A backend
    /// recovering starts its slow start (timed from the next call that passes `now`).
    pub fn set_health(&mut self, id: BackendId, health: Health) -> bool {
        let slow_start = self.slow_start;
        let Some(b) = self.slot_mut(usize::from(id.0)) else {
            return false;
        };
        if b.health == health {
            return false;
        }
        b.health = health;
        match health {
            Health::Up => {
                b.stats.up_transitions += 1;
                self.ramping |= start_ramp(b, slow_start);
            }
            Health::Down => b.stats.down_transitions += 1,
        }
        self.scheduler.rebuild(&self.slots);
        true
    }

    /// Counts a failed health check of backend `id` (the checker reports each one; the
    /// verdicts it draws from them arrive through [`Pool::set_health`]). An unknown id is
    /// ignored, as a late report for a backend already freed.
    pub fn check_failed(&mut self, id: BackendId) {
        if let Some(b) = self.slot_mut(usize::from(id.0)) {
            b.stats.checks_failed += 1;
        }
    }

    /// Next expiry of a persistence template or an `lblc`/`lblcr` entry, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let persist = self.persist.as_ref().and_then(PersistTable::poll_timeout);
        let locality = self.scheduler.locality().and_then(Locality::poll_timeout);
        persist.into_iter().chain(locality).min()
    }

    /// Expires persistence templates and `lblc`/`lblcr` entries due at `now`, and moves slow
    /// starts on.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.persist {
            p.handle_timeout(now);
        }
        if let Some(l) = self.scheduler.locality_mut() {
            l.handle_timeout(now);
        }
        if self.ramping {
            self.advance_ramps(now);
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

    /// Whether any backend is eligible (up, weight above 0, configured): what VRRP's
    /// `track_services` follows. Overload is a passing load condition, not a failure, so it
    /// does not count here.
    #[must_use]
    pub fn has_eligible(&self) -> bool {
        self.slots.iter().flatten().any(Backend::is_eligible)
    }

    /// Whether any backend could take a new flow now (eligible and not overloaded).
    #[must_use]
    pub fn has_available(&self) -> bool {
        self.slots.iter().flatten().any(Backend::is_available)
    }

    /// Connections the whole service holds (what `max_connections` limits).
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.live
    }

    /// The service-wide connection limit; 0 means none.
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The slow-start period, if configured.
    #[must_use]
    pub fn slow_start(&self) -> Option<Duration> {
        self.slow_start
    }

    /// Whether `sh`/`mh` fall back to another backend when the hashed one is overloaded.
    #[must_use]
    pub fn fallback(&self) -> bool {
        self.fallback
    }

    /// Destinations remembered by `lblc`/`lblcr` (0 for other schedulers).
    #[must_use]
    pub fn locality_entries(&self) -> usize {
        self.scheduler.locality().map_or(0, Locality::len)
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

    /// Turns the journals of persistence templates and of the `lblc`/`lblcr` destination
    /// table on (empty) or off, for flow sync: see
    /// [`take_template_changes`](Self::take_template_changes) and
    /// [`take_locality_changes`](Self::take_locality_changes). They stay on across
    /// [`reconfigure`](Self::reconfigure). At most [`MAX_TEMPLATES`](crate::MAX_TEMPLATES)
    /// client networks and [`MAX_LOCALITY_ENTRIES`](crate::MAX_LOCALITY_ENTRIES)
    /// destinations are marked between two drains (past that, the next drain sends every
    /// template, or every entry).
    pub fn set_sync_journal(&mut self, on: bool) {
        self.sync_journal = on;
        if let Some(p) = &mut self.persist {
            p.set_journal(on);
        }
        if let Some(l) = self.scheduler.locality_mut() {
            l.set_journal(on, false);
        }
    }

    /// The `lblc`/`lblcr` destination entries created or changed since the last call, each
    /// with its state now (every entry after the journal overflowed). Empty while the
    /// journal is off or the scheduler keeps no table.
    pub fn take_locality_changes(&mut self, now: Instant) -> Vec<LocalityImage> {
        let slots = &self.slots;
        let addr = |s: u16| Some(slots.get(usize::from(s))?.as_ref()?.addr);
        self.scheduler
            .locality_mut()
            .map(|l| l.take_changes(now, addr))
            .unwrap_or_default()
    }

    /// The destinations whose `lblc`/`lblcr` entry was removed since the last call (expired,
    /// its slot reclaimed, its backends gone) and not made again; entries due at `now` expire
    /// first (the table otherwise expires them at the next pick). Empty while the journal is
    /// off or the scheduler keeps no table; at most
    /// [`MAX_LOCALITY_ENTRIES`](crate::MAX_LOCALITY_ENTRIES) between two calls (a removal
    /// past that is not reported).
    pub fn take_locality_removals(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        self.scheduler
            .locality_mut()
            .map(|l| {
                l.handle_timeout(now);
                l.take_removals()
            })
            .unwrap_or_default()
    }

    /// Removes the destination entry for `dest` because the peer director that made it
    /// removed it. `Ok(false)`: this pool held none (never installed, or expired here first).
    ///
    /// # Errors
    /// [`LocalityRefused::NotLocality`]: this pool's scheduler is not `lblc`/`lblcr`.
    pub fn remove_locality(&mut self, dest: Ipv4Addr) -> Result<bool, LocalityRefused> {
        self.scheduler
            .locality_mut()
            .map(|l| l.remove(dest))
            .ok_or(LocalityRefused::NotLocality)
    }

    /// Every `lblc`/`lblcr` destination entry in force at `now`: its destination, its
    /// backends' addresses and how long ago it was used and changed.
    #[must_use]
    pub fn export_locality(&self, now: Instant) -> Vec<LocalityImage> {
        let addr = |s: u16| Some(self.slot(usize::from(s))?.addr);
        self.scheduler
            .locality()
            .map(|l| l.export(now, addr))
            .unwrap_or_default()
    }

    /// Installs a destination entry a peer director made: backends matched by address (ids
    /// are local), bounded by [`MAX_LOCALITY_ENTRIES`](crate::MAX_LOCALITY_ENTRIES) as the
    /// pool's own entries, expiring a day after the use the peer reported. The peer's state
    /// replaces an entry for the same destination. `Ok(false)`: it had expired already.
    ///
    /// # Errors
    /// [`LocalityRefused`]: this pool's scheduler is not `lblc`/`lblcr`, one of the backends
    /// is not in the pool, none is named, or the table is full.
    pub fn install_locality(
        &mut self,
        now: Instant,
        entry: &LocalityImage,
    ) -> Result<bool, LocalityRefused> {
        if self.scheduler.locality().is_none() {
            return Err(LocalityRefused::NotLocality);
        }
        let set = entry
            .backends
            .iter()
            .map(|&a| {
                self.position(a)
                    .filter(|&i| self.slot(i).is_some_and(|b| !b.removed))
                    .map(|i| slot_id(i).0)
                    .ok_or(LocalityRefused::UnknownBackend(a))
            })
            .collect::<Result<Vec<u16>, _>>()?;
        let Some(l) = self.scheduler.locality_mut() else {
            return Err(LocalityRefused::NotLocality);
        };
        l.install(now, entry.dest, set, entry.idle, entry.unchanged)
    }

    /// The templates created, re-pointed, refreshed or removed since the last call, each with
    /// its state now (every template after the journal overflowed). Empty while the journal
    /// is off or the pool has no persistence.
    pub fn take_template_changes(&mut self, now: Instant) -> Vec<TemplateChange> {
        let slots = &self.slots;
        let addr = |id: BackendId| Some(slots.get(usize::from(id.0))?.as_ref()?.addr);
        self.persist
            .as_mut()
            .map(|p| p.take_changes(now, addr))
            .unwrap_or_default()
    }

    /// Every persistence template in force at `now`: its client network, its backend's
    /// address and the time it has left.
    #[must_use]
    pub fn export_templates(&self, now: Instant) -> Vec<TemplateImage> {
        let addr = |id: BackendId| Some(self.slot(usize::from(id.0))?.addr);
        self.persist
            .as_ref()
            .map(|p| p.export(now, addr))
            .unwrap_or_default()
    }

    /// Installs a template a peer director made: the backend is matched by address (ids are
    /// local), the lifetime capped at this pool's timeout. `Ok(false)` when there is nothing
    /// to do: this pool has a template for that client network already (made by its own
    /// traffic, which wins), or no time is left on it.
    ///
    /// # Errors
    /// [`TemplateRefused`]: this pool has no persistence, no backend with that address, or
    /// holds [`MAX_TEMPLATES`](crate::MAX_TEMPLATES) templates already.
    pub fn install_template(
        &mut self,
        now: Instant,
        template: &TemplateImage,
    ) -> Result<bool, TemplateRefused> {
        let Some(p) = self.persist.as_mut() else {
            return Err(TemplateRefused::NoPersistence);
        };
        let id = self
            .slots
            .iter()
            .position(|b| b.as_ref().is_some_and(|b| b.addr == template.backend))
            .map(slot_id)
            .ok_or(TemplateRefused::UnknownBackend(template.backend))?;
        p.install(now, template.client, id, template.remaining)
    }

    /// The sorry server, if one is configured.
    #[must_use]
    pub fn sorry(&self) -> Option<SocketAddrV4> {
        self.sorry
    }

    /// Pool-wide counters.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            locality_full: self.scheduler.locality().map_or(0, Locality::full),
            ..self.stats
        }
    }

    /// Times pending slow starts from `now` and recomputes ramping effective weights.
    fn advance_ramps(&mut self, now: Instant) {
        let slow_start = self.slow_start;
        let mut still = false;
        for b in self.slots.iter_mut().flatten() {
            still |= b.advance_ramp(now, slow_start);
        }
        self.ramping = still;
    }

    /// Every backend at its full weight at once (slow start turned off).
    fn finish_ramps(&mut self) {
        for b in self.slots.iter_mut().flatten() {
            b.ramp = Ramp::Done;
            b.effective = b.weight;
        }
        self.ramping = false;
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
            if let Some(l) = self.scheduler.locality_mut() {
                l.forget_backend(i);
            }
            self.scheduler.rebuild(&self.slots);
        }
    }
}

/// A backend as configured: up, with its thresholds, at full weight.
fn configured(c: &BackendConfig) -> Backend {
    let mut b = Backend::new(c.addr, c.weight);
    b.set_thresholds(c.max_connections, c.min_connections);
    b
}

/// Puts a backend that just came up into slow start, if the pool has one and the backend has
/// a weight to ramp to; returns whether it did.
fn start_ramp(b: &mut Backend, slow_start: Option<Duration>) -> bool {
    if slow_start.is_none_or(|p| p.is_zero()) || b.weight == 0 {
        return false;
    }
    b.ramp = Ramp::Pending;
    b.effective = 1;
    true
}

fn slot_id(i: usize) -> BackendId {
    // Slots never exceed MAX_BACKENDS (1,024), so this cannot truncate.
    BackendId(i as u16)
}
