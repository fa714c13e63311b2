//! Smooth weighted round robin, the nginx algorithm (REFERENCE.md §4.2).
//!
//! Each pick adds every eligible backend's weight to its running score, takes the highest
//! score (first wins a tie) and subtracts the total weight from the winner. Scores always sum
//! to zero after a pick, and after Σweights picks from all-zero they are all zero again, so
//! the sequence is periodic with period Σweights: *every* window of Σweights consecutive picks
//! holds each backend exactly `weight` times, interleaved ({5,1,1} gives a a b a c a a, never
//! a burst of five).
//!
//! Scores grow by the effective weight (slow start ramps it), and a backend over its connection
//! threshold sits the turn out, so exactness holds over windows where neither happens.
//!
//! LVS's own `wrr` is the classic interleaved variant that sends bursts to the heaviest
//! server; we use nginx's because the issue asks for "never bursts of one backend".

use crate::backend::Backend;

/// Running scores, one per slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct SmoothWrr {
    current: Vec<i64>,
}

impl SmoothWrr {
    /// Starts a fresh cycle. Called whenever the set of eligible backends or a weight changes,
    /// because stale scores of a returning backend would break the exact-per-cycle property.
    pub(crate) fn reset(&mut self, slots: usize) {
        self.current.clear();
        self.current.resize(slots, 0);
    }

    pub(crate) fn pick(&mut self, slots: &[Option<Backend>]) -> Option<usize> {
        if self.current.len() != slots.len() {
            self.reset(slots.len());
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in slots.iter().enumerate() {
            let Some(b) = b.as_ref().filter(|b| b.is_available()) else {
                continue;
            };
            let w = i64::from(b.effective);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|j| self.current[i] > self.current[j]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}
