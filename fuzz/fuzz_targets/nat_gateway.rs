//! Arbitrary bytes through the PAT gateway's `handle_packet`, both directions, then expiry.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    natgw::fuzzing::run_gateway(now, data);
});
