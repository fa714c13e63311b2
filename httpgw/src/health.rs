//! The health of a pool's backends as the gateway sees it: the verdict of the active checks
//! (natgw's [`HealthChecker`](natgw::health::HealthChecker), run by the driver, the same
//! checker the L4 services use) and passive ejection from the answers of real requests
//! (nginx `max_fails`/`fail_timeout`, HAProxy `observe layer7 error-limit N on-error
//! mark-down`, Envoy's outlier detection `consecutive_5xx`).
//!
//! Invariants, kept by [`Gateway`](crate::Gateway) for every backend:
//! - it is in rotation (balance's [`Health::Up`]) exactly while its checks hold it up and it
//!   is not ejected; coming back into rotation starts the pool's slow start;
//! - an ejection is only made while another backend of the pool is eligible: the last live
//!   backend is never ejected (Envoy's `max_ejection_percent` below 100 %), the refusal is
//!   counted instead;
//! - an ejection ends after its duration; the backend then returns if its checks hold it up
//!   (they kept probing meanwhile, so their verdict is at most one interval old).

use std::fmt;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use balance::Health;
use natgw::health::ProbeFailure;

use crate::gateway::Outcome;

/// Passive ejection of one pool: `consecutive_errors` failed requests in a row (connection
/// refused or broken, no answer in time, a 5xx answer) take a backend out of rotation for
/// `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EjectConfig {
    /// Failed requests in a row that eject (nginx `max_fails`, HAProxy `error-limit`).
    pub consecutive_errors: u32,
    /// How long an ejected backend stays out (nginx `fail_timeout`).
    pub duration: Duration,
}

impl EjectConfig {
    /// Most errors in a row that may be asked for.
    pub const MAX_ERRORS: u32 = 10_000;
    /// Shortest ejection.
    pub const MIN_DURATION: Duration = Duration::from_secs(1);
    /// Longest ejection.
    pub const MAX_DURATION: Duration = Duration::from_secs(3600);

    /// Checks the bounds.
    ///
    /// # Errors
    /// What is out of range.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(1..=Self::MAX_ERRORS).contains(&self.consecutive_errors) {
            return Err("eject consecutive_errors must be 1..=10000");
        }
        if !(Self::MIN_DURATION..=Self::MAX_DURATION).contains(&self.duration) {
            return Err("eject duration must be between 1s and 1h");
        }
        Ok(())
    }
}

/// Names one checked backend: its pool and address (the checker's target key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckKey {
    /// Pool name.
    pub pool: String,
    /// Backend address.
    pub backend: SocketAddrV4,
}

impl fmt::Display for CheckKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pool, self.backend)
    }
}

/// A request a backend failed, as passive ejection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamError {
    /// The connection was refused.
    Refused,
    /// No answer within `upstream_timeout`.
    TimedOut,
    /// The connection broke or the answer was not HTTP.
    Broken,
    /// It answered this 5xx status.
    Status(u16),
}

impl UpstreamError {
    /// The error an outcome is, `None` for an answer below 500 or a cancelled request.
    #[must_use]
    pub fn of(outcome: Outcome) -> Option<Self> {
        match outcome {
            Outcome::Answered(s) if s.is_server_error() => Some(Self::Status(s.as_u16())),
            Outcome::Answered(_) | Outcome::Cancelled => None,
            Outcome::Refused => Some(Self::Refused),
            Outcome::TimedOut => Some(Self::TimedOut),
            Outcome::Broken => Some(Self::Broken),
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::TimedOut => f.write_str("timeout"),
            Self::Broken => f.write_str("broken response"),
            Self::Status(s) => write!(f, "HTTP status {s}"),
        }
    }
}

/// What passive ejection did after a failed request (for the driver's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// The backend.
    pub key: CheckKey,
    /// The error that reached the limit.
    pub last: UpstreamError,
    /// Errors in a row.
    pub errors: u32,
    /// `false`: out of rotation for the pool's ejection duration; `true`: spared as the
    /// pool's last live backend.
    pub spared: bool,
}

/// One backend's health state beside the pool; see the module documentation.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackendHealth {
    /// The checks hold it down (their last transition was to down).
    pub(crate) check_down: bool,
    /// Failed probes.
    pub(crate) checks_failed: u64,
    /// The last probe failure (why it went down, while it is down).
    pub(crate) last_check_failure: Option<ProbeFailure>,
    /// Failed requests in a row.
    pub(crate) consecutive_errors: u32,
    /// Out of rotation until then, after that many errors in a row ending with this one.
    pub(crate) ejected: Option<(Instant, u32, UpstreamError)>,
    /// Ejections made.
    pub(crate) ejections: u64,
    /// Ejections not made because no other backend was live.
    pub(crate) ejections_spared: u64,
}

impl BackendHealth {
    /// Whether it belongs in rotation.
    pub(crate) fn health(&self) -> Health {
        if self.check_down || self.ejected.is_some() {
            Health::Down
        } else {
            Health::Up
        }
    }

    /// Counts one finished request; `Some(errors, last, spared)` when it reached the limit
    /// (the count then starts again). `live` says whether the backend takes requests now,
    /// `others_live` whether another backend of the pool does.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        outcome: Outcome,
        eject: EjectConfig,
        live: bool,
        others_live: bool,
    ) -> Option<(u32, UpstreamError, bool)> {
        let Some(error) = UpstreamError::of(outcome) else {
            if matches!(outcome, Outcome::Answered(_)) {
                self.consecutive_errors = 0;
            }
            return None;
        };
        self.consecutive_errors = self.consecutive_errors.saturating_add(1);
        // Requests already under way when it left rotation still finish here: they do not
        // eject it again, nor count against it once it is back.
        if !live || self.consecutive_errors < eject.consecutive_errors {
            return None;
        }
        let errors = std::mem::take(&mut self.consecutive_errors);
        if others_live {
            self.ejected = Some((now + eject.duration, errors, error));
            self.ejections += 1;
            Some((errors, error, false))
        } else {
            self.ejections_spared += 1;
            Some((errors, error, true))
        }
    }

    /// Ends an ejection due at `now`; returns whether one ended.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        if self.ejected.is_some_and(|(until, _, _)| until <= now) {
            self.ejected = None;
            self.consecutive_errors = 0;
            true
        } else {
            false
        }
    }

    /// `up`, `down` (by its checks) or `ejected`, and why, for `show http`.
    pub(crate) fn describe(&self) -> (&'static str, Option<String>) {
        if self.check_down {
            let why = self
                .last_check_failure
                .map_or_else(|| "health check failed".to_owned(), |w| w.to_string());
            ("down", Some(why))
        } else if let Some((_, errors, last)) = self.ejected {
            (
                "ejected",
                Some(format!("{errors} errors in a row, the last {last}")),
            )
        } else {
            ("up", None)
        }
    }
}
