//! One's-complement checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! Invariant: every function here works on 16-bit words in network byte order and folds
//! carries end-around, so `adjust` after a rewrite gives exactly what a full recomputation
//! over the rewritten bytes would (property-tested below).

/// Sums `data` as big-endian 16-bit words into a 32-bit accumulator (odd tail padded with 0).
#[must_use]
pub fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early so the accumulator can never overflow, whatever the length.
        if acc & 0x8000_0000 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[must_use]
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (the value to store in the checksum field).
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// Sum of the IPv4 pseudo-header used by TCP, UDP and VRRP checksums (RFC 793, RFC 768, RFC 5798).
#[must_use]
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, length: u16) -> u32 {
    let mut acc = sum(0, &src);
    acc = sum(acc, &dst);
    acc + u32::from(protocol) + u32::from(length)
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word changed from `old` to `new`.
#[must_use]
pub fn adjust16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// RFC 1624 update for a 32-bit field (an IPv4 address): two 16-bit words.
#[must_use]
pub fn adjust32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let acc = u32::from(!check)
        + u32::from(!u16::from_be_bytes([old[0], old[1]]))
        + u32::from(!u16::from_be_bytes([old[2], old[3]]))
        + u32::from(u16::from_be_bytes([new[0], new[1]]))
        + u32::from(u16::from_be_bytes([new[2], new[3]]));
    !fold(acc)
}

/// Reads the 16-bit big-endian word at `at`.
///
/// # Panics
/// If `at + 2 > buf.len()`; callers check lengths first.
#[must_use]
pub fn get16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Writes the 16-bit big-endian word at `at`.
///
/// # Panics
/// If `at + 2 > buf.len()`; callers check lengths first.
pub fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example bytes: 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0xab]), checksum(&[0xab, 0x00]));
    }

    proptest! {
        #[test]
        fn adjust16_matches_recompute(mut data in proptest::collection::vec(any::<u8>(), 4..64),
                                      idx in any::<prop::sample::Index>(), new in any::<u16>()) {
            if data.len() % 2 == 1 { data.pop(); }
            let words = data.len() / 2;
            let at = idx.index(words) * 2;
            let before = checksum(&data);
            let old = get16(&data, at);
            put16(&mut data, at, new);
            let after = checksum(&data);
            let adjusted = adjust16(before, old, new);
            // 0x0000 and 0xffff are the same one's-complement value; compare as such.
            prop_assert_eq!(fold(u32::from(adjusted)) % 0xffff, fold(u32::from(after)) % 0xffff);
        }

        #[test]
        fn adjust32_matches_recompute(mut data in proptest::collection::vec(any::<u8>(), 8..64),
                                      idx in any::<prop::sample::Index>(), new in any::<[u8; 4]>()) {
            if data.len() % 2 == 1 { data.pop(); }
            let at = idx.index(data.len() / 2 - 1) * 2;
            let before = checksum(&data);
            let old = [data[at], data[at + 1], data[at + 2], data[at + 3]];
            data[at..at + 4].copy_from_slice(&new);
            let after = checksum(&data);
            prop_assert_eq!(adjust32(before, old, new) % 0xffff, after % 0xffff);
        }
    }
}
