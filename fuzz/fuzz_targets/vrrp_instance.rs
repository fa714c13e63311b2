//! Fuzzes the VRRP state machine: one instance fed a sequence of adverts (any priority,
//! source, interval, TTL), timer expiries, waits, faults, penalties and admin events decoded
//! from the input, with its invariants checked after every step (see
//! `vrrp::fuzzing::check_instance`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vrrp::fuzzing::check_instance(data);
});
