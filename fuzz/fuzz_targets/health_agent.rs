//! Arbitrary bytes as what a HAProxy agent-check agent sends (natgw's agent line reader and
//! reply parser); a parsed reply must read back the same from its own text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    natgw::fuzzing::run_agent_line(data);
});
