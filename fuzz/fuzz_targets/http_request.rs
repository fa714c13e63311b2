//! Arbitrary bytes as a client's request stream: httpgw's framing guard (fed whole and byte by
//! byte, which must agree) and the gateway's hygiene and routing on every head it lets through.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    httpgw::fuzzing::run_request(now, data);
});
