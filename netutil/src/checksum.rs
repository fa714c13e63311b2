//! One's-complement checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! Invariant: every function here works on 16-bit words in network byte order and folds
//! carries end-around, so `adjust` after a rewrite gives exactly what a full recomputation
//! over the rewritten bytes would (property-tested below).

/// Sums `data` as big-endian 16-bit words into a 32-bit accumulator (odd tail padded with 0).
///
/// The result is folded to at most 0xffff, so callers may add more terms to it freely.
#[must_use]
pub fn sum(acc: u32, data: &[u8]) -> u32 {
    // Eight bytes per step as two 32-bit words into a 64-bit accumulator: 2^16 ≡ 1
    // (mod 0xffff), so this is the same one's-complement sum as 16-bit words, with a quarter
    // of the additions (it runs per received segment on the tunnels' GRO path).
    let mut wide = u64::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        wide += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for c in &mut words {
        wide += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = words.remainder() {
        wide += u64::from(*last) << 8;
    }
    while wide > 0xffff {
        wide = (wide & 0xffff) + (wide >> 16);
    }
    wide as u32
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{get16, put16};
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

    /// The plain RFC 1071 loop, 16 bits at a time, as the reference for [`sum`].
    fn sum_reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            let word = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
            acc += u32::from(word);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest! {
        #[test]
        fn sum_matches_the_16_bit_reference(data in proptest::collection::vec(any::<u8>(), 0..3000),
                                            acc in any::<u32>()) {
            let folded = |v: u32| u32::from(fold(v)) % 0xffff;
            prop_assert_eq!(folded(sum(0, &data)), u32::from(sum_reference(&data)) % 0xffff);
            // A carried-in accumulator is part of the sum, whatever its size.
            let with_acc = (u64::from(acc) + u64::from(sum_reference(&data))) % 0xffff;
            prop_assert_eq!(u64::from(folded(sum(acc, &data))), with_acc);
        }

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
