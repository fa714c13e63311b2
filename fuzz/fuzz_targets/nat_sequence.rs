//! Stateful NAT fuzzing: packet sequences from both sides with time advancing, through a
//! gateway with static forwards, a load-balanced listener and dynamic PAT; invariants checked
//! after every step (see `natgw::fuzzing::run_sequence`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    natgw::fuzzing::run_sequence(now, data);
});
