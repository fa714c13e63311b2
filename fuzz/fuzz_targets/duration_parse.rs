#![no_main]
//! Arbitrary text into the duration parser; accepted values must round-trip through Display.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        vipgate::fuzzing::duration_parse(text);
    }
});
