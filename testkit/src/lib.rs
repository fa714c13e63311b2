//! Helpers shared by the unit tests of vipgate's crates (a dev-dependency only, never
//! published).
//!
//! - [`epoch`]: the base instant of a test's simulated clock, and the one clock read tests
//!   make (the workspace bans `Instant::now` outside drivers; tests add durations to this).
//! - [`replay_corpus`]: feeds every seed of a cargo-fuzz corpus (`fuzz/corpus/TARGET`) to a
//!   function, so `cargo test` on stable exercises what the fuzzers found.
//! - [`packet`]: IPv4 TCP, UDP and ICMP packets built with etherparse, checksums valid.

pub mod packet;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

/// The base instant of a test's simulated clock: the same value for the whole test process.
///
/// Only differences from it matter; tests move time by adding durations.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods)] // the one clock read of the tests, by design
    *EPOCH.get_or_init(Instant::now)
}

/// Feeds every seed of the cargo-fuzz corpus `fuzz/corpus/TARGET` to `feed`, in file name
/// order, and returns how many there were.
///
/// # Panics
/// When the corpus directory or a seed cannot be read: a corpus that disappears must fail
/// the test, not replay nothing.
pub fn replay_corpus(target: &str, mut feed: impl FnMut(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the {target} corpus {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("the {target} corpus {}: {e}", dir.display()))
                .path()
        })
        .collect();
    seeds.sort();
    for seed in &seeds {
        let bytes =
            std::fs::read(seed).unwrap_or_else(|e| panic!("the seed {}: {e}", seed.display()));
        feed(&bytes);
    }
    seeds.len()
}

/// `fuzz/corpus/TARGET` of this workspace.
fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_one_instant() {
        assert_eq!(epoch(), epoch());
    }

    #[test]
    fn replay_feeds_every_seed_once() {
        let mut fed = 0;
        let mut bytes = 0;
        let count = replay_corpus("duration_parse", |seed| {
            fed += 1;
            bytes += seed.len();
        });
        assert!(count > 0);
        assert_eq!(fed, count);
        let on_disk: u64 = std::fs::read_dir(corpus_dir("duration_parse"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(u64::try_from(bytes).unwrap(), on_disk);
    }

    #[test]
    #[should_panic(expected = "the no_such_target corpus")]
    fn a_missing_corpus_fails() {
        replay_corpus("no_such_target", |_| {});
    }
}
