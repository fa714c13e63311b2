//! Least connections (`lc`) and weighted least connections (`wlc`), as LVS defines them.
//!
//! The load of a backend is its overhead `active * 256 + inactive`
//! (include/net/ip_vs.h `ip_vs_dest_conn_overhead`). `lc` takes the smallest overhead; `wlc`
//! the smallest `overhead / weight`, compared by cross-multiplication so no division rounds.
//!
//! One deliberate difference: LVS breaks ties by list order, so a burst of new connections to
//! an idle service all land on the first server until counts differ. We start the scan one
//! past the previous winner, which spreads ties round-robin and picks exactly the same
//! minimum otherwise.

use crate::backend::Backend;

/// Start of the next scan (tie-breaking only).
#[derive(Debug, Clone, Default)]
pub(crate) struct LeastConn {
    start: usize,
}

impl LeastConn {
    pub(crate) fn pick(&mut self, slots: &[Option<Backend>], weighted: bool) -> Option<usize> {
        let n = slots.len();
        let mut best: Option<(usize, &Backend)> = None;
        for idx in (0..n).map(|i| (self.start + i) % n) {
            let Some(b) = slots[idx].as_ref().filter(|b| b.is_eligible()) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((_, cur)) if weighted => {
                    // b.overhead / b.weight < cur.overhead / cur.weight; overheads stay below
                    // 2^41 and weights below 2^17, so the products fit in u64.
                    b.overhead() * u64::from(cur.weight) < cur.overhead() * u64::from(b.weight)
                }
                Some((_, cur)) => b.overhead() < cur.overhead(),
            };
            if better {
                best = Some((idx, b));
            }
        }
        let (idx, _) = best?;
        self.start = idx + 1;
        Some(idx)
    }
}
