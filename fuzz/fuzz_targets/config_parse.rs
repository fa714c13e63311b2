#![no_main]
//! Arbitrary text into the config loader: errors are fine, panics are not.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        vipgate::fuzzing::config_parse(text);
    }
});
