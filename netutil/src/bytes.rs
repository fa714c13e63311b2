//! Big-endian 16-bit words at byte offsets, the unit every header field and checksum word
//! in this workspace is read and written in.
//!
//! Invariant: callers check the buffer length first; these index directly and panic past
//! the end rather than return an `Option` the per-packet paths would only unwrap.

/// Reads the 16-bit big-endian word at `at`.
///
/// # Panics
/// If `at + 2 > buf.len()`; callers check lengths first.
#[inline]
#[must_use]
pub fn get16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Writes the 16-bit big-endian word at `at`.
///
/// # Panics
/// If `at + 2 > buf.len()`; callers check lengths first.
#[inline]
pub fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_big_endian_and_round_trip() {
        let mut b = [0u8; 5];
        put16(&mut b, 1, 0xabcd);
        assert_eq!(b, [0, 0xab, 0xcd, 0, 0]);
        assert_eq!(get16(&b, 1), 0xabcd);
        assert_eq!(get16(&b, 2), 0xcd00);
    }
}
