//! Stable hash functions.
//!
//! Every director that builds a table for the same backends must get the same table, today and
//! after an upgrade, so nothing here may depend on `std`'s randomly keyed or
//! unspecified hashers.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The splitmix64 finaliser: a bijection on `u64` with full avalanche, so that addresses that
/// differ only in their last bits land far apart.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An address and port packed into one integer (`ip << 16 | port`).
pub(crate) fn endpoint_key(ip: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(ip)) << 16) | u64::from(port)
}

/// Hash of a client for `sh`/`mh`: its address, plus its port when the service hashes ports.
pub(crate) fn client_hash(client: SocketAddrV4, with_port: bool) -> u64 {
    let port = if with_port { client.port() } else { 0 };
    mix64(endpoint_key(*client.ip(), port) ^ 0x5851_f42d_4c95_7f2d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_is_stable() {
        // Pinned so a change of the function (which would reshuffle every director's tables
        // and break mixed-version pairs) cannot slip through.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }
}
