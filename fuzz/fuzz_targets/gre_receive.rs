#![no_main]
//! The GRE receive path as the driver runs it: several underlay packets through one
//! tunnel's decapsulation into the coalescer, with batch flushes; the frames must resegment
//! to exactly the accepted packets, and nothing may panic.

use std::sync::OnceLock;
use std::time::Instant;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static T0: OnceLock<Instant> = OnceLock::new();
    gre::fuzzing::receive(*T0.get_or_init(Instant::now), data);
});
