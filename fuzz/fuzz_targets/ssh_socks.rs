#![no_main]
//! Arbitrary input into sshfwd's socks parser: errors are fine, panics are not.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sshfwd::fuzzing::socks_parse(data);
});
