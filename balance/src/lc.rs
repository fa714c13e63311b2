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
//!
//! `wlc` divides by the effective weight (lower while slow start ramps a backend up); a backend
//! over its upper connection threshold is skipped, as LVS skips `IP_VS_DEST_F_OVERLOAD`.

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
            let Some(b) = slots[idx].as_ref().filter(|b| b.is_available()) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((_, cur)) if weighted => lighter(b, cur),
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

/// `a.overhead / a.weight < b.overhead / b.weight` by effective weights, compared by
/// cross-multiplication: overheads stay below 2^41 and weights below 2^17, so the products fit.
pub(crate) fn lighter(a: &Backend, b: &Backend) -> bool {
    a.overhead() * u64::from(b.effective) < b.overhead() * u64::from(a.effective)
}

/// The available backend with the smallest `overhead / weight` among `candidates`, the first
/// in their order on a tie (the kernel's `wlc` pass inside `lblc`/`lblcr`).
pub(crate) fn weighted_least(
    slots: &[Option<Backend>],
    candidates: impl IntoIterator<Item = usize>,
) -> Option<usize> {
    let mut best: Option<(usize, &Backend)> = None;
    for i in candidates {
        let Some(b) = slots.get(i).and_then(Option::as_ref) else {
            continue;
        };
        if !b.is_available() {
            continue;
        }
        if best.is_none_or(|(_, cur)| lighter(b, cur)) {
            best = Some((i, b));
        }
    }
    best.map(|(i, _)| i)
}
