//! Arbitrary bytes as a run of pool operations (connects, closes, weight and health changes,
//! reloads, time steps); `balance` checks its own invariants and panics on a violation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    balance::fuzzing::run_pool_ops(now, data);
});
