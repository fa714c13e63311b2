#![no_main]
//! authorized_keys text plus connection metadata (peer address, user, time, forward targets)
//! through sshd's real policy decisions, asserting its invariants (see
//! `sshfwd::fuzzing::auth_policy`).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sshfwd::fuzzing::auth_policy(text);
    }
});
