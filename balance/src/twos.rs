//! Weighted random of two (`twos`, LVS's power-of-two-choices scheduler).
//!
//! Two backends are drawn at random, each with probability `weight / Σweight` over the
//! available backends (the same one may be drawn twice); the one with the smaller
//! `overhead / weight` takes the connection, the first draw on a tie. Random choices keep many
//! directors from herding onto the same least-loaded backend; comparing two keeps the load
//! near the least-connection ideal. O(n) per connection, as in LVS.
//!
//! The pool is pure, so the randomness is a counter run through [`mix64`] together with the
//! client's address and port: reproducible for tests, and nobody outside can steer it without
//! knowing how many connections the pool has scheduled.

use std::net::SocketAddrV4;

use crate::backend::Backend;
use crate::hash::{client_hash, mix64};
use crate::lc::lighter;

/// Draw counter.
#[derive(Debug, Clone, Default)]
pub(crate) struct TwoChoices {
    draws: u64,
}

impl TwoChoices {
    pub(crate) fn pick(
        &mut self,
        slots: &[Option<Backend>],
        client: SocketAddrV4,
    ) -> Option<usize> {
        let available = || {
            slots
                .iter()
                .enumerate()
                .filter_map(|(i, b)| Some((i, b.as_ref().filter(|b| b.is_available())?)))
        };
        let total: u64 = available().map(|(_, b)| u64::from(b.effective)).sum();
        if total == 0 {
            return None;
        }
        self.draws = self.draws.wrapping_add(1);
        let r = mix64(self.draws.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ client_hash(client, true));
        // Two independent 32-bit draws; Σweight < 2^26, so the modulo bias is below 2^-6 of a
        // weight unit's share.
        let (mut r1, mut r2) = ((r & 0xffff_ffff) % total, (r >> 32) % total);
        let (mut first, mut second) = (None, None);
        for (i, b) in available() {
            let w = u64::from(b.effective);
            if first.is_none() {
                if r1 < w {
                    first = Some((i, b));
                } else {
                    r1 -= w;
                }
            }
            if second.is_none() {
                if r2 < w {
                    second = Some((i, b));
                } else {
                    r2 -= w;
                }
            }
            if first.is_some() && second.is_some() {
                break;
            }
        }
        match (first, second) {
            (Some((i, a)), Some((j, b))) => Some(if lighter(b, a) { j } else { i }),
            (Some((i, _)), None) | (None, Some((i, _))) => Some(i),
            (None, None) => None,
        }
    }
}
