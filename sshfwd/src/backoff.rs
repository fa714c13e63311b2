//! Reconnect schedule: exponential backoff with jitter, reset after a stable connection.
//!
//! What autossh adds to ssh, minus its quirks (autossh retries 5 times at once, then waits
//! 2 s, 8 s, 18 s…, and only forgets failures after 60 s of uptime). Pure: the caller passes
//! `now` and a random number; the schedule never reads a clock.

use std::time::{Duration, Instant};

/// Tunables of the reconnect schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// A connection that stayed up this long resets the schedule to `initial`.
    pub stable_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(30),
        }
    }
}

/// The reconnect schedule of one destination.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
    connected_at: Option<Instant>,
}

impl Backoff {
    /// A fresh schedule: the first retry waits about `config.initial`.
    #[must_use]
    pub fn new(config: BackoffConfig) -> Self {
        Backoff {
            config,
            failures: 0,
            connected_at: None,
        }
    }

    /// Number of consecutive failed or short-lived connections.
    #[must_use]
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The connection is up (authenticated, forwards restored).
    pub fn on_connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection went down (or never came up); returns the delay before the next attempt.
    ///
    /// `random` is any uniformly random `u64`; it places the delay in the upper half of the
    /// current step ("equal jitter"), so that many clients cut off together spread out while
    /// none retries much sooner than planned.
    pub fn on_disconnected(&mut self, now: Instant, random: u64) -> Duration {
        if let Some(up) = self.connected_at.take()
            && now.saturating_duration_since(up) >= self.config.stable_after
        {
            self.failures = 0;
        }
        let step = self.step(self.failures);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        // Scale instead of `%` so the whole range is reachable without modulo bias.
        let span = u128::from(half_nanos) + 1;
        let jitter = u64::try_from((u128::from(random) * span) >> 64).unwrap_or(half_nanos);
        half + Duration::from_nanos(jitter)
    }

    fn step(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_then_caps_then_resets_after_stable_uptime() {
        let cfg = BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
            stable_after: Duration::from_secs(30),
        };
        let mut b = Backoff::new(cfg);
        let t0 = testkit::epoch();
        // random = u64::MAX-ish picks the top of each step's range.
        let top: Vec<u64> = (0..6)
            .map(|_| b.on_disconnected(t0, u64::MAX).as_secs())
            .collect();
        assert_eq!(top, vec![1, 2, 4, 8, 8, 8]);
        b.on_connected(t0);
        let d = b.on_disconnected(t0 + Duration::from_secs(5), 0);
        assert_eq!(d, Duration::from_secs(4), "short uptime keeps the penalty");
        b.on_connected(t0);
        let d = b.on_disconnected(t0 + Duration::from_secs(31), 0);
        assert_eq!(
            d,
            Duration::from_millis(500),
            "stable uptime resets to initial/2..initial"
        );
    }

    proptest! {
        #[test]
        fn delay_within_bounds(randoms in proptest::collection::vec(any::<u64>(), 1..40)) {
            let cfg = BackoffConfig::default();
            let mut b = Backoff::new(cfg);
            let now = testkit::epoch();
            for (i, r) in randoms.into_iter().enumerate() {
                let d = b.on_disconnected(now, r);
                prop_assert!(d <= cfg.max);
                let step = cfg.initial.saturating_mul(1u32 << i.min(20)).min(cfg.max);
                prop_assert!(d >= step / 2);
            }
        }
    }
}
