//! Response-time percentiles over a sliding window, for `show http` (HAProxy's `rtime`,
//! nginx's `$upstream_response_time` summarised).
//!
//! Invariants: memory is fixed at construction (two HDR histograms of 1 µs to 60 s at two
//! significant digits, a few KiB each), a sample outside the range is clamped into it, and
//! the figures cover the last [`WINDOW`] to 2 × [`WINDOW`] of answers: the histogram being
//! filled and the one before it. Time comes from the caller (sans-IO).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long one histogram fills before it becomes the previous one.
pub const WINDOW: Duration = Duration::from_secs(30);

/// The slowest answer recorded as itself; slower ones count as this.
const HIGHEST_US: u64 = 60_000_000;

/// Percentiles of the window, in microseconds; all zero with no sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct LatencyStatus {
    /// Answers in the window.
    pub samples: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// Two histograms: the one being filled and the one before it.
#[derive(Debug, Clone)]
pub struct LatencyWindow {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    /// When `current` started filling; `None` before the first sample.
    started: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 2).expect("constant bounds hdrhistogram accepts")
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            current: histogram(),
            previous: histogram(),
            started: None,
        }
    }
}

impl LatencyWindow {
    /// Moves the window on to `now`: a full window becomes the previous one, and two windows
    /// without a sample empty both.
    fn advance(&mut self, now: Instant) {
        let Some(started) = self.started else { return };
        let age = now.saturating_duration_since(started);
        if age >= WINDOW * 2 {
            self.current.reset();
            self.previous.reset();
            self.started = Some(now);
        } else if age >= WINDOW {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
            self.started = Some(started + WINDOW);
        }
    }

    /// Records an answer that took `took`, at `now`.
    pub fn record(&mut self, now: Instant, took: Duration) {
        if self.started.is_none() {
            self.started = Some(now);
        }
        self.advance(now);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.current.saturating_record(us.clamp(1, HIGHEST_US));
    }

    /// The percentiles of the window as of `now`.
    #[must_use]
    pub fn status(&self, now: Instant) -> LatencyStatus {
        let mut window = self.clone();
        window.advance(now);
        let mut all = window.previous;
        // Same bounds on both sides: adding cannot fail.
        let _same_bounds = all.add(&window.current);
        if all.is_empty() {
            return LatencyStatus::default();
        }
        LatencyStatus {
            samples: all.len(),
            p50_us: all.value_at_quantile(0.50),
            p90_us: all.value_at_quantile(0.90),
            p99_us: all.value_at_quantile(0.99),
            max_us: all.max(),
        }
    }
}

#[cfg(test)]
// Tests build their own instants.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Within hdrhistogram's two significant digits.
    fn near(got: u64, want: u64) -> bool {
        got.abs_diff(want) * 100 <= want
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::default();
        assert_eq!(w.status(t0), LatencyStatus::default());
        // 1..=100 ms, one each.
        for i in 1..=100 {
            w.record(t0, ms(i));
        }
        let s = w.status(t0);
        assert_eq!(s.samples, 100);
        assert!(near(s.p50_us, 50_000), "{s:?}");
        assert!(near(s.p90_us, 90_000), "{s:?}");
        assert!(near(s.p99_us, 99_000), "{s:?}");
        assert!(near(s.max_us, 100_000), "{s:?}");
    }

    #[test]
    fn old_answers_leave_the_window() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::default();
        for _ in 0..10 {
            w.record(t0, ms(500));
        }
        // Still there in the next window, as the previous histogram.
        w.record(t0 + WINDOW + ms(1), ms(2));
        let s = w.status(t0 + WINDOW + ms(1));
        assert_eq!(s.samples, 11);
        assert!(near(s.max_us, 500_000), "{s:?}");
        // Gone a window later; and everything gone after two idle windows.
        w.record(t0 + WINDOW * 2 + ms(2), ms(3));
        let s = w.status(t0 + WINDOW * 2 + ms(2));
        assert_eq!(s.samples, 2, "{s:?}");
        assert!(s.max_us < 10_000, "{s:?}");
        assert_eq!(w.status(t0 + WINDOW * 5), LatencyStatus::default());
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::default();
        w.record(t0, Duration::ZERO);
        w.record(t0, Duration::from_secs(3600));
        let s = w.status(t0);
        assert_eq!(s.samples, 2);
        assert!(near(s.max_us, HIGHEST_US), "{s:?}");
    }
}
