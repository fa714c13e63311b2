//! Shortest expected delay (`sed`) and never queue (`nq`), as LVS defines them.
//!
//! Both count only established connections: the expected delay of a backend is
//! `(active + 1) / weight`, the time the new connection would wait there if every backend
//! served its established connections at a rate proportional to its weight. `sed` takes the
//! smallest; `nq` first sends the connection to an idle backend (no active connection) if
//! there is one, the first in configuration order, and only otherwise acts as `sed`. Ties go
//! to the first listed backend, as LVS resolves them by list order.
//!
//! Weights are effective weights (slow start); overloaded backends are skipped.

use crate::backend::Backend;

/// `sed` (`never_queue = false`) or `nq`: one O(n) pass, no state.
pub(crate) fn pick(slots: &[Option<Backend>], never_queue: bool) -> Option<usize> {
    let mut best: Option<(usize, &Backend)> = None;
    for (i, b) in slots.iter().enumerate() {
        let Some(b) = b.as_ref().filter(|b| b.is_available()) else {
            continue;
        };
        if never_queue && b.active == 0 {
            return Some(i);
        }
        // (a + 1) / wa < (c + 1) / wc  ⇔  (a + 1)·wc < (c + 1)·wa; both fit in u64.
        let delay = |x: &Backend| u64::from(x.active) + 1;
        if best.is_none_or(|(_, cur)| {
            delay(b) * u64::from(cur.effective) < delay(cur) * u64::from(b.effective)
        }) {
            best = Some((i, b));
        }
    }
    best.map(|(i, _)| i)
}
