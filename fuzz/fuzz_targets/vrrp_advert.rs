//! Fuzzes the VRRPv3 parser: an IPv4 packet as a raw socket delivers it. Whatever parses must
//! emit back to the same advert (checksums pass under cfg(fuzzing), so compare fields).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vrrp::fuzzing::check_advert(data);
});
