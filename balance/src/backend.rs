//! One real server of a pool: its address, weight, health and connection counters.

use std::fmt;
use std::net::SocketAddrV4;

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
pub enum Health {
    /// Passing its checks (or not checked at all).
    Up,
    /// Failed its checks: gets no new flows at all, persistent or not.
    Down,
}

/// How a backend takes part in scheduling, as `show lb` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Healthy with a weight above zero: gets new flows.
    Up,
    /// Healthy with weight 0: keeps its flows, gets no new ones (ipvsadm's "quiescent").
    Draining,
    /// Failed its health checks: gets no new flows.
    Down,
    /// Gone from the configuration but still holding connections; freed when they close.
    Removed,
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
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// Traffic counters of one backend, like `ipvsadm -L --stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

/// One real server of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub(crate) addr: SocketAddrV4,
    pub(crate) weight: u32,
    pub(crate) health: Health,
    pub(crate) removed: bool,
    pub(crate) active: u32,
    pub(crate) inactive: u32,
    pub(crate) stats: BackendStats,
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
            active: 0,
            inactive: 0,
            stats: BackendStats::default(),
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

    /// Scheduling state derived from removal, health and weight, in that order.
    #[must_use]
    pub fn state(&self) -> BackendState {
        if self.removed {
            BackendState::Removed
        } else if self.health == Health::Down {
            BackendState::Down
        } else if self.weight == 0 {
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
