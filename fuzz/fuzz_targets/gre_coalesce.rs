#![no_main]
//! Arbitrary packet runs into the tunnels' receive coalescer: frames may be anything
//! the kernel would refuse, but never a panic or an oversized frame.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gre::fuzzing::coalesce(data);
});
