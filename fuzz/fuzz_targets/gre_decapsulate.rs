#![no_main]
//! Arbitrary bytes into a GRE tunnel's decapsulation: drops are fine, panics are not.

use std::sync::OnceLock;
use std::time::Instant;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static T0: OnceLock<Instant> = OnceLock::new();
    gre::fuzzing::decapsulate(*T0.get_or_init(Instant::now), data);
});
