//! A thin read/write view of an IPv4 header in a caller's buffer, for the handful of fields
//! the data paths touch by hand (full parses use etherparse).
//!
//! Invariants: [`Ipv4View::new_checked`] guarantees that every accessor is in bounds (the
//! fixed header, the options up to [`Ipv4View::ihl`] and the payload up to
//! [`Ipv4View::total_len`] are all inside the buffer). A view made with
//! [`Ipv4View::new_unchecked`] over a buffer of at least [`HEADER_LEN`] bytes (a
//! `&[u8; 20]` proves it) reads and writes the fixed fields safely; anything past them may
//! panic. Setters of covered fields keep the header checksum right with the RFC 1624
//! update, so a valid header stays valid. Nothing here allocates.

use std::net::Ipv4Addr;

use crate::bytes::{get16, put16};
use crate::checksum::{adjust16, adjust32, checksum};

/// Byte offsets of the header fields.
pub mod field {
    /// A field of more than one byte.
    pub type Field = core::ops::Range<usize>;

    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub const VER_IHL: usize = 0;
    /// DSCP and ECN.
    pub const TOS: usize = 1;
    /// Total length of the datagram, header included.
    pub const LENGTH: Field = 2..4;
    /// Identification (groups the fragments of one datagram).
    pub const IDENT: Field = 4..6;
    /// Flags (3 bits) and fragment offset in 8-byte units (13 bits).
    pub const FLG_OFF: Field = 6..8;
    /// Time to live; shares its 16-bit checksum word with [`PROTOCOL`].
    pub const TTL: usize = 8;
    /// The transport protocol number.
    pub const PROTOCOL: usize = 9;
    /// Header checksum.
    pub const CHECKSUM: Field = 10..12;
    /// Source address.
    pub const SRC: Field = 12..16;
    /// Destination address.
    pub const DST: Field = 16..20;
}

/// Length of the fixed header (a header without options).
pub const HEADER_LEN: usize = field::DST.end;

const FLAG_MF: u16 = 0x2000;
const FLAG_DF: u16 = 0x4000;
const OFFSET_MASK: u16 = 0x1fff;

/// Why a buffer is not a usable IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Ipv4Error {
    /// Shorter than the fixed header, its header length or its total length.
    #[error("IPv4 packet truncated")]
    Truncated,
    /// The version nibble is not 4.
    #[error("not an IPv4 packet")]
    NotIpv4,
    /// The header length is below 20 or the total length below the header length.
    #[error("IPv4 header lengths are inconsistent")]
    Malformed,
}

/// An IPv4 header at the start of `buffer`, read and written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4View<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4View<T> {
    /// A view without any check (see the module's invariants for what stays in bounds).
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4View { buffer }
    }

    /// A view whose every accessor is in bounds: version 4, a header length of at least 20,
    /// and header length <= total length <= buffer length. Bytes past the total length
    /// (link padding) are allowed and outside [`Ipv4View::payload`].
    ///
    /// # Errors
    /// [`Ipv4Error`] says which check failed.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, Ipv4Error> {
        let view = Self::new_unchecked(buffer);
        view.check_len()?;
        Ok(view)
    }

    /// The checks of [`Ipv4View::new_checked`].
    ///
    /// # Errors
    /// [`Ipv4Error`] says which check failed.
    #[inline]
    pub fn check_len(&self) -> Result<(), Ipv4Error> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Ipv4Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Ipv4Error::NotIpv4);
        }
        let (ihl, total) = (self.ihl(), self.total_len());
        if ihl < HEADER_LEN || total < ihl {
            return Err(Ipv4Error::Malformed);
        }
        if total > len {
            return Err(Ipv4Error::Truncated);
        }
        Ok(())
    }

    /// The buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The version nibble.
    #[inline]
    #[must_use]
    pub fn version(&self) -> u8 {
        self.bytes()[field::VER_IHL] >> 4
    }

    /// The header length in bytes (options included).
    #[inline]
    #[must_use]
    pub fn ihl(&self) -> usize {
        usize::from(self.bytes()[field::VER_IHL] & 0x0f) * 4
    }

    /// The total length field, in bytes.
    #[inline]
    #[must_use]
    pub fn total_len(&self) -> usize {
        usize::from(get16(self.bytes(), field::LENGTH.start))
    }

    /// The identification field.
    #[inline]
    #[must_use]
    pub fn ident(&self) -> u16 {
        get16(self.bytes(), field::IDENT.start)
    }

    /// The don't-fragment flag.
    #[inline]
    #[must_use]
    pub fn dont_frag(&self) -> bool {
        get16(self.bytes(), field::FLG_OFF.start) & FLAG_DF != 0
    }

    /// The more-fragments flag.
    #[inline]
    #[must_use]
    pub fn more_frags(&self) -> bool {
        get16(self.bytes(), field::FLG_OFF.start) & FLAG_MF != 0
    }

    /// The fragment offset in 8-byte units (0 for an unfragmented packet or a first fragment).
    #[inline]
    #[must_use]
    pub fn frag_offset(&self) -> u16 {
        get16(self.bytes(), field::FLG_OFF.start) & OFFSET_MASK
    }

    /// Whether this is a fragment (more-fragments set, or a non-zero offset).
    #[inline]
    #[must_use]
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Time to live.
    #[inline]
    #[must_use]
    pub fn ttl(&self) -> u8 {
        self.bytes()[field::TTL]
    }

    /// The transport protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    #[inline]
    #[must_use]
    pub fn protocol(&self) -> u8 {
        self.bytes()[field::PROTOCOL]
    }

    /// The header checksum field.
    #[inline]
    #[must_use]
    pub fn checksum(&self) -> u16 {
        get16(self.bytes(), field::CHECKSUM.start)
    }

    /// Whether the header checksum is right (the header sums to 0xffff).
    #[inline]
    #[must_use]
    pub fn verify_checksum(&self) -> bool {
        checksum(&self.bytes()[..self.ihl()]) == 0
    }

    /// The source address.
    #[inline]
    #[must_use]
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.src_octets())
    }

    /// The destination address.
    #[inline]
    #[must_use]
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.dst_octets())
    }

    /// The source address as bytes in network order (for checksum sums and compares).
    #[inline]
    #[must_use]
    pub fn src_octets(&self) -> [u8; 4] {
        octets(self.bytes(), field::SRC.start)
    }

    /// The destination address as bytes in network order.
    #[inline]
    #[must_use]
    pub fn dst_octets(&self) -> [u8; 4] {
        octets(self.bytes(), field::DST.start)
    }

    /// The bytes after the header, up to the total length.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.ihl()..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4View<T> {
    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the source address, updating the header checksum (RFC 1624). The transport
    /// checksum, whose pseudo-header also covers it, is the caller's.
    #[inline]
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        self.set_addr(field::SRC.start, addr.octets());
    }

    /// Sets the destination address, updating the header checksum (RFC 1624).
    #[inline]
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        self.set_addr(field::DST.start, addr.octets());
    }

    #[inline]
    fn set_addr(&mut self, at: usize, new: [u8; 4]) {
        let old = octets(self.bytes(), at);
        let check = adjust32(self.checksum(), old, new);
        let b = self.bytes_mut();
        b[at..at + 4].copy_from_slice(&new);
        put16(b, field::CHECKSUM.start, check);
    }

    /// Sets the time to live, updating the header checksum (RFC 1624).
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        let old = get16(self.bytes(), field::TTL);
        let new = u16::from(ttl) << 8 | (old & 0x00ff);
        let check = adjust16(self.checksum(), old, new);
        let b = self.bytes_mut();
        put16(b, field::TTL, new);
        put16(b, field::CHECKSUM.start, check);
    }

    /// Sets the total length, updating the header checksum (RFC 1624).
    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        let old = get16(self.bytes(), field::LENGTH.start);
        let check = adjust16(self.checksum(), old, len);
        let b = self.bytes_mut();
        put16(b, field::LENGTH.start, len);
        put16(b, field::CHECKSUM.start, check);
    }

    /// Recomputes the header checksum from scratch (after writing a header by hand).
    #[inline]
    pub fn fill_checksum(&mut self) {
        let ihl = self.ihl();
        let b = self.bytes_mut();
        put16(b, field::CHECKSUM.start, 0);
        let check = checksum(&b[..ihl]);
        put16(b, field::CHECKSUM.start, check);
    }

    /// The bytes after the header, up to the total length, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (ihl, total) = (self.ihl(), self.total_len());
        &mut self.bytes_mut()[ihl..total]
    }
}

#[inline]
fn octets(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv4Header, Ipv4HeaderSlice};
    use proptest::prelude::*;

    /// A valid header built by etherparse (the reference), with options and a payload.
    fn packet(h: &Ipv4Header, payload: &[u8]) -> Vec<u8> {
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        b
    }

    fn header() -> impl Strategy<Value = (Ipv4Header, Vec<u8>)> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<bool>(),
            any::<bool>(),
            0u16..0x2000,
            proptest::collection::vec(any::<u8>(), 0..11),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(
                |(src, dst, ttl, proto, ident, df, mf, offset, opt_words, payload)| {
                    let mut h = Ipv4Header::new(0, ttl, IpNumber(proto), src, dst)
                        .expect("a zero payload length fits");
                    h.identification = ident;
                    h.dont_fragment = df;
                    h.more_fragments = mf;
                    h.fragment_offset = offset.try_into().expect("13 bits");
                    let options = vec![0u8; opt_words.len() * 4];
                    h.options = options[..].try_into().expect("at most 40 bytes");
                    h.set_payload_len(payload.len()).expect("small");
                    h.header_checksum = h.calc_header_checksum();
                    (h, payload)
                },
            )
    }

    #[test]
    fn short_wrong_version_and_bad_lengths_are_refused() {
        let h = Ipv4Header::new(4, 64, IpNumber::UDP, [10, 0, 0, 1], [10, 0, 0, 2]).unwrap();
        let good = packet(&h, &[1, 2, 3, 4]);
        assert!(Ipv4View::new_checked(&good[..]).is_ok());
        assert_eq!(
            Ipv4View::new_checked(&good[..19]).err(),
            Some(Ipv4Error::Truncated)
        );
        assert_eq!(
            Ipv4View::new_checked(&good[..23]).err(),
            Some(Ipv4Error::Truncated)
        );
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4View::new_checked(&v6[..]).err(),
            Some(Ipv4Error::NotIpv4)
        );
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Ipv4View::new_checked(&short_ihl[..]).err(),
            Some(Ipv4Error::Malformed)
        );
        let mut short_total = good.clone();
        put16(&mut short_total, 2, 19);
        assert_eq!(
            Ipv4View::new_checked(&short_total[..]).err(),
            Some(Ipv4Error::Malformed)
        );
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        let v = Ipv4View::new_checked(&padded[..]).expect("padding is fine");
        assert_eq!(v.payload(), &[1, 2, 3, 4]);
    }

    #[test]
    fn a_fixed_header_array_reads_without_checks() {
        let h = Ipv4Header::new(0, 9, IpNumber::TCP, [1, 2, 3, 4], [5, 6, 7, 8]).unwrap();
        let v = Ipv4View::new_unchecked(h.to_bytes().first_chunk::<20>().copied().unwrap());
        assert_eq!((v.ttl(), v.protocol()), (9, 6));
        assert_eq!(v.dst(), Ipv4Addr::new(5, 6, 7, 8));
    }

    proptest! {
        #[test]
        fn reads_what_etherparse_reads((h, payload) in header()) {
            let bytes = packet(&h, &payload);
            let v = Ipv4View::new_checked(&bytes[..]).expect("etherparse built it valid");
            let e = Ipv4HeaderSlice::from_slice(&bytes).expect("valid");
            prop_assert_eq!(v.version(), 4);
            prop_assert_eq!(v.ihl(), e.slice().len());
            prop_assert_eq!(v.total_len(), usize::from(e.total_len()));
            prop_assert_eq!(v.ident(), e.identification());
            prop_assert_eq!(v.dont_frag(), e.dont_fragment());
            prop_assert_eq!(v.more_frags(), e.more_fragments());
            prop_assert_eq!(v.frag_offset(), e.fragments_offset().value());
            prop_assert_eq!(v.is_fragment(), e.is_fragmenting_payload());
            prop_assert_eq!(v.ttl(), e.ttl());
            prop_assert_eq!(v.protocol(), e.protocol().0);
            prop_assert_eq!(v.checksum(), e.header_checksum());
            prop_assert!(v.verify_checksum());
            prop_assert_eq!(v.src(), e.source_addr());
            prop_assert_eq!(v.dst(), e.destination_addr());
            prop_assert_eq!(v.payload(), &payload[..]);
        }

        #[test]
        fn setters_keep_the_checksum_etherparse_computes(
            (h, payload) in header(),
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            ttl in any::<u8>(),
            which in 0u8..4,
        ) {
            let mut bytes = packet(&h, &payload);
            let mut expected = h.clone();
            let mut v = Ipv4View::new_checked(&mut bytes[..]).expect("valid");
            match which {
                0 => { v.set_src(src.into()); expected.source = src; }
                1 => { v.set_dst(dst.into()); expected.destination = dst; }
                2 => { v.set_ttl(ttl); expected.time_to_live = ttl; }
                _ => {
                    v.fill_checksum();
                }
            }
            let e = Ipv4HeaderSlice::from_slice(&bytes).expect("still valid").to_header();
            prop_assert_eq!(&e, &{
                let mut x = expected.clone();
                x.header_checksum = e.header_checksum;
                x
            });
            // 0x0000 and 0xffff are the same one's-complement value: compare as such.
            let want = expected.calc_header_checksum();
            prop_assert_eq!(e.header_checksum % 0xffff, want % 0xffff);
            prop_assert!(Ipv4View::new_checked(&bytes[..]).expect("valid").verify_checksum());
        }

        #[test]
        fn set_total_len_keeps_the_checksum((h, payload) in header(), cut in 0usize..64) {
            let mut bytes = packet(&h, &payload);
            let len = h.header_len() + payload.len().min(cut);
            let mut v = Ipv4View::new_checked(&mut bytes[..]).expect("valid");
            v.set_total_len(u16::try_from(len).expect("small"));
            let v = Ipv4View::new_checked(&bytes[..]).expect("a shorter total is valid");
            prop_assert_eq!(v.total_len(), len);
            prop_assert!(v.verify_checksum());
        }

        #[test]
        fn arbitrary_bytes_never_panic_a_checked_view(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(v) = Ipv4View::new_checked(&b[..]) {
                prop_assert!(v.payload().len() <= b.len());
                prop_assert_eq!(Ipv4HeaderSlice::from_slice(&b).map(|e| e.slice().len()).ok(), Some(v.ihl()));
            }
        }
    }
}
