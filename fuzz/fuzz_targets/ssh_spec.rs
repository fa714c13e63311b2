#![no_main]
//! Arbitrary input into sshfwd's spec parser: errors are fine, panics are not.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sshfwd::fuzzing::spec_parse(text);
    }
});
