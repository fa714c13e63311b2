//! TCP MSS clamping in place (what `iptables -j TCPMSS --clamp-mss-to-pmtu` and Cisco
//! `ip tcp adjust-mss` do).
//!
//! Only SYN segments carry MSS; the value is only ever lowered, and the TCP checksum is
//! updated incrementally (RFC 1624). The option may start at an odd offset, which is why the
//! update works on the aligned 16-bit words that contain the two MSS bytes.

use crate::bytes::{get16, put16};
use crate::checksum::adjust16;

/// Offset of the TCP checksum within the TCP header.
const TCP_CHECKSUM: usize = 16;
const TCP_FLAGS: usize = 13;
const FLAG_SYN: u8 = 0x02;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;

/// What [`clamp_mss`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssOutcome {
    /// Not a SYN, or no MSS option: nothing to do.
    NotApplicable,
    /// The MSS was already at or below the limit.
    Unchanged,
    /// The MSS was lowered from the first value to the second.
    Clamped(u16, u16),
    /// The options were malformed; the segment was left untouched.
    Malformed,
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to at most `max_mss`.
///
/// `tcp` is the TCP segment starting at its header (the IP payload). Never panics on
/// arbitrary input; malformed option lists are reported and left as they are.
pub fn clamp_mss(tcp: &mut [u8], max_mss: u16) -> MssOutcome {
    if tcp.len() < 20 || tcp[TCP_FLAGS] & FLAG_SYN == 0 {
        return MssOutcome::NotApplicable;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return MssOutcome::Malformed;
    }
    let mut i = 20;
    while i < data_offset {
        match tcp[i] {
            OPT_END => break,
            OPT_NOP => i += 1,
            kind => {
                if i + 1 >= data_offset {
                    return MssOutcome::Malformed;
                }
                let len = usize::from(tcp[i + 1]);
                if len < 2 || i + len > data_offset {
                    return MssOutcome::Malformed;
                }
                if kind == OPT_MSS {
                    if len != 4 {
                        return MssOutcome::Malformed;
                    }
                    let at = i + 2;
                    let old = u16::from_be_bytes([tcp[at], tcp[at + 1]]);
                    if old <= max_mss {
                        return MssOutcome::Unchanged;
                    }
                    rewrite_u16_at(tcp, at, max_mss);
                    return MssOutcome::Clamped(old, max_mss);
                }
                i += len;
            }
        }
    }
    MssOutcome::NotApplicable
}

/// Writes `value` at a possibly odd offset and fixes the TCP checksum word by word.
fn rewrite_u16_at(tcp: &mut [u8], at: usize, value: u16) {
    let mut check = get16(tcp, TCP_CHECKSUM);
    // The bytes at..at+2 touch one aligned word (even offset) or two (odd offset).
    let first = at & !1;
    let last = (at + 1) & !1;
    let old_words = [get16(tcp, first), get16(tcp, last)];
    tcp[at..at + 2].copy_from_slice(&value.to_be_bytes());
    check = adjust16(check, old_words[0], get16(tcp, first));
    if last != first {
        check = adjust16(check, old_words[1], get16(tcp, last));
    }
    put16(tcp, TCP_CHECKSUM, check);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{checksum, fold, pseudo_header_v4, sum};
    use proptest::prelude::*;

    const SRC: [u8; 4] = [192, 168, 101, 10];
    const DST: [u8; 4] = [192, 168, 102, 10];

    fn tcp_checksum_ok(tcp: &[u8]) -> bool {
        let acc = pseudo_header_v4(SRC, DST, 6, tcp.len() as u16);
        fold(sum(acc, tcp)) == 0xffff
    }

    /// A SYN with the given option bytes (padded to 4) and a valid checksum.
    fn syn(options: &[u8]) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(OPT_END);
        }
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = (((20 + opts.len()) / 4) as u8) << 4;
        tcp[13] = FLAG_SYN;
        tcp.extend_from_slice(&opts);
        let acc = pseudo_header_v4(SRC, DST, 6, tcp.len() as u16);
        let c = !fold(sum(acc, &tcp));
        put16(&mut tcp, TCP_CHECKSUM, c);
        assert!(tcp_checksum_ok(&tcp));
        tcp
    }

    #[test]
    fn clamps_aligned_mss() {
        let mut tcp = syn(&[OPT_MSS, 4, 0x05, 0xb4]); // 1460
        assert_eq!(clamp_mss(&mut tcp, 1436), MssOutcome::Clamped(1460, 1436));
        assert_eq!(u16::from_be_bytes([tcp[22], tcp[23]]), 1436);
        assert!(tcp_checksum_ok(&tcp));
    }

    #[test]
    fn clamps_mss_at_odd_offset() {
        let mut tcp = syn(&[OPT_NOP, OPT_MSS, 4, 0x05, 0xb4]);
        assert_eq!(clamp_mss(&mut tcp, 1400), MssOutcome::Clamped(1460, 1400));
        assert!(tcp_checksum_ok(&tcp));
    }

    #[test]
    fn never_raises() {
        let mut tcp = syn(&[OPT_MSS, 4, 0x02, 0x18]); // 536
        assert_eq!(clamp_mss(&mut tcp, 1436), MssOutcome::Unchanged);
    }

    #[test]
    fn ignores_non_syn_and_bad_options() {
        let mut tcp = syn(&[OPT_MSS, 4, 0x05, 0xb4]);
        tcp[13] = 0x10;
        assert_eq!(clamp_mss(&mut tcp, 1000), MssOutcome::NotApplicable);
        let mut bad = syn(&[OPT_MSS, 9, 0x05, 0xb4]);
        assert_eq!(clamp_mss(&mut bad, 1000), MssOutcome::Malformed);
        let mut zero_len = syn(&[8, 0, 0, 0]);
        assert_eq!(clamp_mss(&mut zero_len, 1000), MssOutcome::Malformed);
        assert_eq!(checksum(&[]), 0xffff);
    }

    proptest! {
        #[test]
        fn never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..80), max in any::<u16>()) {
            let _ = clamp_mss(&mut bytes, max);
        }

        #[test]
        fn checksum_stays_valid(pad in 0usize..6, mss in any::<u16>(), max in any::<u16>()) {
            let mut opts = vec![OPT_NOP; pad];
            opts.extend_from_slice(&[OPT_MSS, 4]);
            opts.extend_from_slice(&mss.to_be_bytes());
            let mut tcp = syn(&opts);
            let out = clamp_mss(&mut tcp, max);
            prop_assert!(tcp_checksum_ok(&tcp));
            if mss > max { prop_assert_eq!(out, MssOutcome::Clamped(mss, max)); }
        }
    }
}
