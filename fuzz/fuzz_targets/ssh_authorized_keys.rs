#![no_main]
//! Arbitrary input into sshfwd's authorized_keys parser: errors are fine, panics are not.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sshfwd::fuzzing::authorized_keys_parse(text);
    }
});
