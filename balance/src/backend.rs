//! One real server of a pool: its address, weight, health and connection counters.

use std::fmt;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// Index of a backend inside its [`Pool`](crate::Pool).
///
/// Stable for the backend's whole life in the pool, across weight, health and scheduler changes
/// and across [`Pool::reconfigure`](crate::Pool::reconfigure) as long as the address stays
/// listed. A flow table stores it next to the flow so that closing the flow can find the counters
/// again. A removed backend keeps its id until its last connection closes; only then may a
/// newly added backend reuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub(crate) u16);

impl BackendId {
    /// The id as a plain index (for tables kept beside the pool, e.g. health checkers).
    #[must_use]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What health checks say about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Health {
    /// Passing its checks (or not checked at all).
    Up,
    /// Failed its checks: gets no new flows at all, persistent or not.
    Down,
}

/// How a backend takes part in scheduling, as `show lb` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum BackendState {
    /// Healthy with a weight above zero: gets new flows.
    Up,
    /// Healthy with weight 0: keeps its flows, gets no new ones (ipvsadm's "quiescent").
    Draining,
    /// Failed its health checks: gets no new flows.
    Down,
    /// Gone from the configuration but still holding connections; freed when they close.
    Removed,
    /// Put in maintenance by the operator ([`AdminState::Maint`]): no new flows, no checks.
    Maint,
}

impl BackendState {
    /// Lower-case name used in `show lb` and JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Down => "down",
            Self::Removed => "removed",
            Self::Maint => "maint",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator says about a backend at run time (HAProxy's `set server state`), apart
/// from its weight and its health.
///
/// None of the three touches the flows a backend already holds: they run until they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum AdminState {
    /// Takes new flows as its weight and health say.
    #[default]
    Ready,
    /// No new flows from the scheduler; a client whose persistence template points here still
    /// comes back (HAProxy's `drain`). Health checks go on.
    Drain,
    /// No new flows at all, persistent ones included, and no health checks (HAProxy's
    /// `maint`).
    Maint,
}

impl AdminState {
    /// The name `vipgate lb set state` takes and `show lb` prints.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AdminState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(Self::Ready),
            "drain" => Ok(Self::Drain),
            "maint" => Ok(Self::Maint),
            other => Err(format!(
                "state must be ready, drain or maint, not {other:?}"
            )),
        }
    }
}

/// The LVS split of a backend's connections.
///
/// LVS counts an established TCP connection as active and every other one (being opened,
/// closing, TIME_WAIT, UDP) as inactive; `lc`/`wlc` weigh an active one 256 times an inactive one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// Established TCP.
    Active,
    /// Anything else the flow table still holds.
    Inactive,
}

/// Counters of one backend: its traffic, like `ipvsadm -L --stats`, and what its health
/// checks found. They live as long as the backend stays in the pool (reloads included). A
/// counter missing from serialised input (an older daemon's status) reads as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(default)
)]
pub struct BackendStats {
    /// Connections scheduled to the backend since it joined the pool.
    pub connections: u64,
    /// Packets from clients to the backend.
    pub packets_in: u64,
    /// Packets from the backend back to clients.
    pub packets_out: u64,
    /// Bytes (IP packet lengths) from clients to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend back to clients.
    pub bytes_out: u64,
    /// Health checks that failed ([`Pool::check_failed`](crate::Pool::check_failed)), whether
    /// or not they took the backend down.
    pub checks_failed: u64,
    /// Times the health checks took the backend down (up → down).
    pub down_transitions: u64,
    /// Times the health checks brought the backend back (down → up).
    pub up_transitions: u64,
}

/// Where a backend is in its slow start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ramp {
    /// At full weight.
    Done,
    /// Came up; the ramp starts at the next call that tells the pool the time.
    Pending,
    /// Ramping since this instant.
    Since(Instant),
}

/// One real server of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub(crate) addr: SocketAddrV4,
    pub(crate) weight: u32,
    pub(crate) health: Health,
    pub(crate) removed: bool,
    /// The operator's state (`vipgate lb set state`).
    pub(crate) admin: AdminState,
    pub(crate) active: u32,
    pub(crate) inactive: u32,
    pub(crate) stats: BackendStats,
    /// Upper connection threshold (ipvsadm `-x`); 0: none.
    pub(crate) max_conns: u32,
    /// Lower connection threshold (ipvsadm `-y`); 0: none.
    pub(crate) min_conns: u32,
    /// Over the upper threshold and not yet back under the lower one (LVS's
    /// `IP_VS_DEST_F_OVERLOAD`).
    pub(crate) overloaded: bool,
    pub(crate) ramp: Ramp,
    /// The weight schedulers use: `weight`, or less while slow start ramps it up.
    pub(crate) effective: u32,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddrV4, weight: u32) -> Self {
        Self {
            addr,
            weight,
            // Like keepalived and HAProxy, a configured server is trusted until its checks say
            // otherwise, so a freshly started service answers at once.
            health: Health::Up,
            removed: false,
            admin: AdminState::Ready,
            active: 0,
            inactive: 0,
            stats: BackendStats::default(),
            max_conns: 0,
            min_conns: 0,
            overloaded: false,
            ramp: Ramp::Done,
            effective: weight,
        }
    }

    /// The real server's address and port (the DNAT target).
    #[must_use]
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Configured weight; 0 means draining.
    #[must_use]
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Last verdict of the health checks.
    #[must_use]
    pub fn health(&self) -> Health {
        self.health
    }

    /// The operator's state (`vipgate lb set state`).
    #[must_use]
    pub fn admin(&self) -> AdminState {
        self.admin
    }

    /// Scheduling state derived from removal, maintenance, health, drain and weight, in that
    /// order.
    #[must_use]
    pub fn state(&self) -> BackendState {
        if self.removed {
            BackendState::Removed
        } else if self.admin == AdminState::Maint {
            BackendState::Maint
        } else if self.health == Health::Down {
            BackendState::Down
        } else if self.weight == 0 || self.admin == AdminState::Drain {
            BackendState::Draining
        } else {
            BackendState::Up
        }
    }

    /// Whether the backend may take new flows.
    #[must_use]
    pub fn is_eligible(&self) -> bool {
        self.state() == BackendState::Up
    }

    /// Whether a new flow may go to the backend now: eligible and not over its upper
    /// connection threshold.
    #[must_use]
    pub fn is_available(&self) -> bool {
        self.is_eligible() && !self.overloaded
    }

    /// Whether a client whose persistence template points here may come back: available, or
    /// drained by the operator (HAProxy's `drain` keeps persistent clients) with a weight
    /// above 0, healthy and not overloaded.
    pub(crate) fn takes_persistent(&self) -> bool {
        self.is_available()
            || (self.admin == AdminState::Drain
                && !self.removed
                && self.health == Health::Up
                && self.weight > 0
                && !self.overloaded)
    }

    /// Upper connection threshold (`max_connections`, ipvsadm `-x`); 0 means none.
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.max_conns
    }

    /// Lower connection threshold (`min_connections`, ipvsadm `-y`); 0 means none.
    #[must_use]
    pub fn min_connections(&self) -> u32 {
        self.min_conns
    }

    /// Reached its upper threshold and not yet back under the lower one: gets no new flows
    /// (LVS's overload flag).
    #[must_use]
    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// The weight the schedulers use now: the configured weight, or less while slow start
    /// ramps a backend that just came up.
    #[must_use]
    pub fn effective_weight(&self) -> u32 {
        self.effective
    }

    /// Whether slow start is still ramping this backend (or will at the next decision).
    #[must_use]
    pub fn is_ramping(&self) -> bool {
        self.ramp != Ramp::Done
    }

    /// Every connection the backend holds (LVS's `ip_vs_dest_totalconns`).
    #[must_use]
    pub fn connections(&self) -> u32 {
        self.active + self.inactive
    }

    /// LVS's rule on binding a connection: reaching the upper threshold overloads.
    pub(crate) fn check_overload_on_open(&mut self) {
        if self.max_conns != 0 && self.connections() >= self.max_conns {
            self.overloaded = true;
        }
    }

    /// LVS's rule on unbinding one: back under the lower threshold, or under 3/4 of the upper
    /// one when there is no lower threshold, the backend takes flows again.
    pub(crate) fn check_overload_on_close(&mut self) {
        let total = u64::from(self.connections());
        let clear = if self.min_conns != 0 {
            total < u64::from(self.min_conns)
        } else if self.max_conns != 0 {
            total * 4 < u64::from(self.max_conns) * 3
        } else {
            true
        };
        if clear {
            self.overloaded = false;
        }
    }

    /// Sets the thresholds (configuration or reload) and re-derives the overload flag from
    /// the connections held now.
    pub(crate) fn set_thresholds(&mut self, max: u32, min: u32) {
        (self.max_conns, self.min_conns) = (max, min);
        if max == 0 {
            self.overloaded = false;
        } else if self.connections() >= max {
            self.overloaded = true;
        } else {
            self.check_overload_on_close();
        }
    }

    /// Recomputes the effective weight at `now`; returns whether the ramp is still running.
    pub(crate) fn advance_ramp(&mut self, now: Instant, slow_start: Option<Duration>) -> bool {
        let Some(period) = slow_start.filter(|p| !p.is_zero()) else {
            self.ramp = Ramp::Done;
            self.effective = self.weight;
            return false;
        };
        let since = match self.ramp {
            Ramp::Done => {
                self.effective = self.weight;
                return false;
            }
            Ramp::Pending => {
                self.ramp = Ramp::Since(now);
                now
            }
            Ramp::Since(t) => t,
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= period {
            self.ramp = Ramp::Done;
            self.effective = self.weight;
            return false;
        }
        // Linear, rounded up, never below 1 so a ramping backend still gets a first flow
        // (HAProxy's slowstart rule).
        let share = u128::from(self.weight) * elapsed.as_nanos();
        let w = share.div_ceil(period.as_nanos());
        self.effective = u32::try_from(w)
            .unwrap_or(self.weight)
            .clamp(1, self.weight.max(1));
        true
    }

    /// Established connections (ipvsadm's ActiveConn).
    #[must_use]
    pub fn active(&self) -> u32 {
        self.active
    }

    /// Other live connections (ipvsadm's InActConn).
    #[must_use]
    pub fn inactive(&self) -> u32 {
        self.inactive
    }

    /// The LVS load measure: `active * 256 + inactive` (include/net/ip_vs.h).
    #[must_use]
    pub fn overhead(&self) -> u64 {
        u64::from(self.active) * 256 + u64::from(self.inactive)
    }

    /// Traffic counters.
    #[must_use]
    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }

    pub(crate) fn count_mut(&mut self, state: ConnState) -> &mut u32 {
        match state {
            ConnState::Active => &mut self.active,
            ConnState::Inactive => &mut self.inactive,
        }
    }
}
