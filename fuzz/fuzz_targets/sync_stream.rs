//! Fuzzes the flow-sync protocol: a stream of datagrams (each after a two-byte length),
//! re-signed with the fuzzing key so the checks behind the HMAC are reached, fed to one sync
//! engine. Whatever decodes must re-encode to the same bytes; the engine's bounds must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    static START: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods)] // the harness's one clock read: a base for simulated time
    let start = *START.get_or_init(Instant::now);
    flowsync::fuzzing::check_stream(data, start);
});
