//! Weighted failover (`fo`) and overflow connection (`ovf`), as LVS defines them.
//!
//! `fo` sends every new connection to the available backend with the highest weight: a
//! primary with a standby of lower weight, the standby taking over when the primary fails,
//! drains or reaches its connection threshold. `ovf` also prefers the highest weight but
//! treats the weight as a capacity: a backend whose established connections exceed its weight
//! overflows to the next one. Ties go to the first listed backend. Weights are effective
//! weights, so a primary coming back under slow start wins back its traffic as it ramps.

use crate::backend::Backend;

/// `fo` (`overflow = false`) or `ovf`: one O(n) pass, no state.
pub(crate) fn pick(slots: &[Option<Backend>], overflow: bool) -> Option<usize> {
    let mut best: Option<(usize, u32)> = None;
    for (i, b) in slots.iter().enumerate() {
        let Some(b) = b.as_ref().filter(|b| b.is_available()) else {
            continue;
        };
        if overflow && b.active > b.effective {
            continue;
        }
        if best.is_none_or(|(_, w)| b.effective > w) {
            best = Some((i, b.effective));
        }
    }
    best.map(|(i, _)| i)
}
