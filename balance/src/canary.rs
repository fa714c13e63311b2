//! Canary weights: the weights that give one backend a chosen share of a service's new
//! connections while the others keep the ratios between them (`vipgate lb weight SERVICE
//! --canary BACKEND 10%`).
//!
//! Pure arithmetic over *base* weights (the configuration's, not the running ones), so that a
//! canary step is idempotent and `0%` gives every other backend back its configured weight
//! whatever steps came before — including `100%`, which takes every other backend to 0.
//!
//! For `0 < p < 100` the others' base weights are first reduced by their greatest common
//! divisor (ratios `o_i`, sum `S`); the others then get `o_i × (100 − p)` and the canary
//! `S × p`, reduced again: the canary's share of the total is exactly `p %`. Weights are at
//! most [`MAX_WEIGHT`]: when exact weights would exceed it they are scaled down and rounded
//! (never to 0), and [`CanaryWeights::share_per_mille`] says the share obtained.
//!
//! The share of *connections* equals the share of weight only for schedulers that follow
//! weights per connection ([`SchedulerKind::follows_weights`]): exactly per cycle for `wrr`,
//! in the long run for the load-weighted ones (`wlc`, `sed`, `nq`, `twos`), by client address
//! space for the hash tables (`sh`, `mh`).

use crate::{MAX_WEIGHT, SchedulerKind};

/// Why a canary step cannot be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryError {
    /// A share above 100 %.
    #[error("a canary share is 0..=100 %, not {0} %")]
    ShareOutOfRange(u8),
    /// The canary is not one of the backends.
    #[error("the canary is not a backend of the service")]
    UnknownCanary,
    /// No other backend has a weight above 0, so no share below 100 % can be given.
    #[error("no other backend has a weight above 0 to share the rest with")]
    NoOtherBackend,
    /// The scheduler does not pick by weight, so a weight share is not a connection share.
    #[error(
        "scheduler `{0}` does not follow weights per connection (use wrr, wlc, sed, nq, twos, sh or mh)"
    )]
    SchedulerIgnoresWeights(&'static str),
}

/// The weights of one canary step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryWeights<K> {
    /// Every backend with its new weight, in the order given.
    pub weights: Vec<(K, u32)>,
    /// The canary's share of the total weight obtained, in ‰ (exactly `10 × p` unless the
    /// weights had to be scaled down to fit [`MAX_WEIGHT`]).
    pub share_per_mille: u32,
}

/// The weights that give `canary` `percent` % of the total weight, the other backends keeping
/// the ratios of their `base` weights (backends whose base weight is 0 stay at 0).
///
/// # Errors
/// [`CanaryError`]: a share over 100, a canary not in `base`, nobody else to share with, or a
/// scheduler that ignores weights.
pub fn canary_weights<K: Copy + Eq>(
    scheduler: SchedulerKind,
    base: &[(K, u32)],
    canary: K,
    percent: u8,
) -> Result<CanaryWeights<K>, CanaryError> {
    if !scheduler.follows_weights() {
        return Err(CanaryError::SchedulerIgnoresWeights(scheduler.as_str()));
    }
    if percent > 100 {
        return Err(CanaryError::ShareOutOfRange(percent));
    }
    if !base.iter().any(|&(k, _)| k == canary) {
        return Err(CanaryError::UnknownCanary);
    }
    let others = || base.iter().filter(move |&&(k, _)| k != canary);
    let divisor = others().fold(0, |g, &(_, w)| gcd(g, u64::from(w)));
    let with = |canary_weight: u64, scale: u64| -> Vec<(K, u64)> {
        base.iter()
            .map(|&(k, w)| {
                let w = if k == canary {
                    canary_weight
                } else {
                    u64::from(w) / divisor.max(1) * scale
                };
                (k, w)
            })
            .collect()
    };
    let exact = match percent {
        // Back to the base: the others exactly as configured, the canary out.
        0 => base
            .iter()
            .map(|&(k, w)| (k, if k == canary { 0 } else { u64::from(w) }))
            .collect(),
        100 => with(1, 0),
        p => {
            if divisor == 0 {
                return Err(CanaryError::NoOtherBackend);
            }
            let sum: u64 = others().map(|&(_, w)| u64::from(w) / divisor).sum();
            let mut weights = with(sum * u64::from(p), 100 - u64::from(p));
            let common = weights.iter().fold(0, |g, &(_, w)| gcd(g, w));
            for (_, w) in &mut weights {
                *w /= common;
            }
            weights
        }
    };
    let weights = fit(exact);
    let total: u64 = weights.iter().map(|&(_, w)| u64::from(w)).sum();
    let canary_weight = weights
        .iter()
        .find(|&&(k, _)| k == canary)
        .map_or(0, |&(_, w)| u64::from(w));
    let share_per_mille = (canary_weight * 1000)
        .checked_div(total)
        .map_or(0, |s| u32::try_from(s).unwrap_or(1000));
    Ok(CanaryWeights {
        weights,
        share_per_mille,
    })
}

/// Scales weights down to at most [`MAX_WEIGHT`] (rounding, a weight above 0 staying above 0).
fn fit<K>(weights: Vec<(K, u64)>) -> Vec<(K, u32)> {
    let max = weights.iter().map(|&(_, w)| w).max().unwrap_or(0);
    let limit = u64::from(MAX_WEIGHT);
    weights
        .into_iter()
        .map(|(k, w)| {
            let scaled = if max <= limit {
                w
            } else if w == 0 {
                0
            } else {
                ((w * limit + max / 2) / max).max(1)
            };
            (k, u32::try_from(scaled).unwrap_or(MAX_WEIGHT))
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WRR: SchedulerKind = SchedulerKind::Wrr;

    fn weights(base: &[(u8, u32)], canary: u8, p: u8) -> Vec<(u8, u32)> {
        canary_weights(WRR, base, canary, p).unwrap().weights
    }

    #[test]
    fn ten_percent_of_two_equal_backends() {
        // 9 + 9 + 2: the canary's 2 of every 20 connections.
        assert_eq!(
            weights(&[(1, 1), (2, 1), (3, 0)], 3, 10),
            [(1, 9), (2, 9), (3, 2)]
        );
    }

    #[test]
    fn the_others_keep_their_ratio() {
        let w = weights(&[(1, 30), (2, 10), (3, 5)], 3, 20);
        assert_eq!(w, [(1, 3), (2, 1), (3, 1)]);
    }

    #[test]
    fn zero_restores_the_base_and_a_hundred_takes_everything() {
        let base = [(1, 3), (2, 5), (3, 7)];
        assert_eq!(weights(&base, 3, 0), [(1, 3), (2, 5), (3, 0)]);
        assert_eq!(weights(&base, 3, 100), [(1, 0), (2, 0), (3, 1)]);
        // A hundred needs nobody else; zero leaves a lone canary at 0 (nothing to send to).
        assert_eq!(weights(&[(3, 0)], 3, 100), [(3, 1)]);
    }

    #[test]
    fn backends_at_zero_stay_at_zero() {
        assert_eq!(
            weights(&[(1, 4), (2, 0), (3, 1)], 3, 50),
            [(1, 1), (2, 0), (3, 1)]
        );
    }

    #[test]
    fn refusals() {
        let base = [(1, 1), (2, 1)];
        assert_eq!(
            canary_weights(WRR, &base, 2, 101),
            Err(CanaryError::ShareOutOfRange(101))
        );
        assert_eq!(
            canary_weights(WRR, &base, 9, 10),
            Err(CanaryError::UnknownCanary)
        );
        assert_eq!(
            canary_weights(WRR, &[(1, 0), (2, 1)], 2, 10),
            Err(CanaryError::NoOtherBackend)
        );
        assert_eq!(
            canary_weights(SchedulerKind::Rr, &base, 2, 10),
            Err(CanaryError::SchedulerIgnoresWeights("rr"))
        );
    }

    #[test]
    fn weights_too_large_are_scaled_to_fit() {
        let c = canary_weights(WRR, &[(1, 65_535), (2, 65_534), (3, 1)], 3, 1).unwrap();
        assert!(c.weights.iter().all(|&(_, w)| w <= MAX_WEIGHT && w > 0));
        assert_eq!(c.share_per_mille, 10);
    }

    proptest! {
        #[test]
        fn the_share_is_exact_and_the_others_keep_their_ratios(
            base in prop::collection::vec(0u32..=60, 1..8),
            percent in 0u8..=100,
        ) {
            let base: Vec<(usize, u32)> = base.into_iter().enumerate().collect();
            let canary = base.len() - 1;
            let others = &base[..canary];
            let nobody_else = others.iter().all(|&(_, w)| w == 0);
            match canary_weights(WRR, &base, canary, percent) {
                Ok(c) => {
                    if !(percent == 0 && nobody_else) {
                        prop_assert_eq!(c.share_per_mille, u32::from(percent) * 10);
                    }
                    let new = &c.weights[..canary];
                    for (&(_, b1), &(_, n1)) in others.iter().zip(new) {
                        if percent < 100 {
                            prop_assert_eq!(b1 == 0, n1 == 0);
                        }
                        for (&(_, b2), &(_, n2)) in others.iter().zip(new) {
                            prop_assert_eq!(u64::from(b1) * u64::from(n2), u64::from(b2) * u64::from(n1));
                        }
                    }
                }
                Err(CanaryError::NoOtherBackend) => {
                    prop_assert!(nobody_else && percent != 0 && percent != 100);
                }
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
    }
}
