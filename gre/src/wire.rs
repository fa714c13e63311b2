//! The GRE header: RFC 2784 (base header, checksum) with the RFC 2890 key and sequence number.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |C| |K|S| Reserved0       | Ver |         Protocol Type         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      Checksum (optional)      |       Reserved1 (Optional)    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                         Key (optional)                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Sequence Number (Optional)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! [`GrePacket`] is a view over borrowed bytes; [`GreRepr`] is what the header means.
//! Invariant: once [`GrePacket::new_checked`] has succeeded, no accessor panics, whatever the
//! bytes are. [`GreRepr::parse`] then enforces the RFC rules (version 0, reserved bits 1, 4
//! and 5 clear, checksum valid when present).

use netutil::checksum::{checksum, fold, sum};

/// Length of the mandatory part of the header.
pub const BASE_HEADER_LEN: usize = 4;
/// Longest header this codec emits: base + checksum + key + sequence.
pub const MAX_HEADER_LEN: usize = 16;

/// EtherType of an IPv4 payload (RFC 2784 §3).
pub const PROTO_IPV4: u16 = 0x0800;
/// EtherType of an IPv6 payload (RFC 7676).
pub const PROTO_IPV6: u16 = 0x86DD;
/// Protocol type of a Cisco keepalive reply: the inner GRE packet of a keepalive probe.
pub const PROTO_KEEPALIVE: u16 = 0x0000;

const FLAG_C: u16 = 0x8000;
const FLAG_K: u16 = 0x2000;
const FLAG_S: u16 = 0x1000;
/// Bits 1, 4 and 5: RFC 1701 routing/strict-source-route/recursion. RFC 2784 §2.3 says a
/// receiver that does not implement RFC 1701 MUST discard packets that set them.
const MUST_BE_ZERO: u16 = 0x4C00;
const VERSION_MASK: u16 = 0x0007;

mod field {
    use core::ops::Range;
    pub(super) const FLAGS: Range<usize> = 0..2;
    pub(super) const PROTOCOL: Range<usize> = 2..4;
}

/// Why bytes are not an acceptable GRE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than the header its flags announce.
    #[error("truncated GRE header")]
    Truncated,
    /// Version field other than 0 (1 is PPTP's enhanced GRE, RFC 2637).
    #[error("unsupported GRE version {0}")]
    BadVersion(u8),
    /// One of the RFC 1701 bits (routing, strict source route, recursion) is set.
    #[error("reserved GRE flag bits set")]
    ReservedBits,
    /// The checksum over header and payload does not verify.
    #[error("bad GRE checksum")]
    BadChecksum,
}

/// A read (and, for mutable buffers, write) view of a GRE packet: header and payload.
#[derive(Debug, Clone)]
pub struct GrePacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> GrePacket<T> {
    /// Wraps a buffer without checking its length; accessors may panic on short buffers.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that it holds the whole header its flags announce.
    ///
    /// # Errors
    /// [`WireError::Truncated`] if it does not.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the buffer holds the base header and every optional field flagged.
    ///
    /// # Errors
    /// [`WireError::Truncated`] if it does not.
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < BASE_HEADER_LEN || len < self.header_len() {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn flags(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::FLAGS];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Reads whether the checksum field is present (C bit).
    pub fn checksum_present(&self) -> bool {
        self.flags() & FLAG_C != 0
    }

    /// Reads whether the key field is present (K bit, RFC 2890).
    pub fn key_present(&self) -> bool {
        self.flags() & FLAG_K != 0
    }

    /// Reads whether the sequence number field is present (S bit, RFC 2890).
    pub fn sequence_present(&self) -> bool {
        self.flags() & FLAG_S != 0
    }

    /// Reads the version field.
    pub fn version(&self) -> u8 {
        (self.flags() & VERSION_MASK) as u8
    }

    /// Reads whether any bit that must be zero for an RFC 2784/2890 receiver is set.
    pub fn reserved_bits_set(&self) -> bool {
        self.flags() & MUST_BE_ZERO != 0
    }

    /// Reads the protocol type (an EtherType).
    pub fn protocol(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::PROTOCOL];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Computes the header length from the flags (4 to 16 bytes).
    pub fn header_len(&self) -> usize {
        let flags = self.flags();
        BASE_HEADER_LEN
            + 4 * (usize::from(flags & FLAG_C != 0)
                + usize::from(flags & FLAG_K != 0)
                + usize::from(flags & FLAG_S != 0))
    }

    fn key_offset(&self) -> usize {
        BASE_HEADER_LEN + 4 * usize::from(self.checksum_present())
    }

    fn sequence_offset(&self) -> usize {
        self.key_offset() + 4 * usize::from(self.key_present())
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = &self.buffer.as_ref()[at..at + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Reads the checksum field, if present.
    pub fn checksum(&self) -> Option<u16> {
        self.checksum_present().then(|| {
            let b = &self.buffer.as_ref()[BASE_HEADER_LEN..BASE_HEADER_LEN + 2];
            u16::from_be_bytes([b[0], b[1]])
        })
    }

    /// Reads the key, if present.
    pub fn key(&self) -> Option<u32> {
        self.key_present().then(|| self.u32_at(self.key_offset()))
    }

    /// Reads the sequence number, if present.
    pub fn sequence(&self) -> Option<u32> {
        self.sequence_present()
            .then(|| self.u32_at(self.sequence_offset()))
    }

    /// Verifies the checksum over header and payload; true when no checksum is present.
    pub fn verify_checksum(&self) -> bool {
        if !self.checksum_present() {
            return true;
        }
        // The fuzzer cannot forge checksums; let it reach the code behind them.
        if cfg!(fuzzing) {
            return true;
        }
        fold(sum(0, self.buffer.as_ref())) == 0xffff
    }

    /// Returns the payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

/// The meaning of a GRE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreRepr {
    /// EtherType of the payload.
    pub protocol: u16,
    /// Whether a checksum over header and payload is carried.
    pub checksum: bool,
    /// The RFC 2890 key.
    pub key: Option<u32>,
    /// The RFC 2890 sequence number.
    pub sequence: Option<u32>,
}

impl GreRepr {
    /// Parses and validates a header (version, reserved bits, checksum).
    ///
    /// # Errors
    /// The first RFC 2784/2890 rule the packet breaks.
    pub fn parse<T: AsRef<[u8]>>(packet: &GrePacket<T>) -> Result<Self, WireError> {
        packet.check_len()?;
        if packet.version() != 0 {
            return Err(WireError::BadVersion(packet.version()));
        }
        if packet.reserved_bits_set() {
            return Err(WireError::ReservedBits);
        }
        if !packet.verify_checksum() {
            return Err(WireError::BadChecksum);
        }
        Ok(Self {
            protocol: packet.protocol(),
            checksum: packet.checksum_present(),
            key: packet.key(),
            sequence: packet.sequence(),
        })
    }

    /// Length of the header this repr emits.
    pub const fn header_len(&self) -> usize {
        BASE_HEADER_LEN
            + 4 * (self.checksum as usize
                + self.key.is_some() as usize
                + self.sequence.is_some() as usize)
    }

    /// Writes the header at the start of `packet`, whose payload must already be in place
    /// after it (the checksum covers it).
    ///
    /// # Panics
    /// If `packet` is shorter than [`GreRepr::header_len`].
    pub fn emit(&self, packet: &mut [u8]) {
        let mut flags = 0u16;
        if self.checksum {
            flags |= FLAG_C;
        }
        if self.key.is_some() {
            flags |= FLAG_K;
        }
        if self.sequence.is_some() {
            flags |= FLAG_S;
        }
        packet[field::FLAGS].copy_from_slice(&flags.to_be_bytes());
        packet[field::PROTOCOL].copy_from_slice(&self.protocol.to_be_bytes());
        let mut at = BASE_HEADER_LEN;
        if self.checksum {
            // Checksum and Reserved1 are zero while the sum is computed.
            packet[at..at + 4].fill(0);
            at += 4;
        }
        if let Some(key) = self.key {
            packet[at..at + 4].copy_from_slice(&key.to_be_bytes());
            at += 4;
        }
        if let Some(seq) = self.sequence {
            packet[at..at + 4].copy_from_slice(&seq.to_be_bytes());
        }
        if self.checksum {
            let c = checksum(packet);
            packet[BASE_HEADER_LEN..BASE_HEADER_LEN + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Linux `ip tunnel ... key 42 seq csum` header (flags 0xb000) around 4 payload bytes,
    /// checksum computed by hand: !(0xb000+0x0800+0x0000+0x0000+0x0000+0x002a+0x0000+0x0007
    /// +0x4500+0x0000).
    const KEYED: [u8; 20] = [
        0xb0, 0x00, 0x08, 0x00, // C K S, IPv4
        0x02, 0xce, 0x00, 0x00, // checksum, reserved1
        0x00, 0x00, 0x00, 0x2a, // key 42
        0x00, 0x00, 0x00, 0x07, // seq 7
        0x45, 0x00, 0x00, 0x00, // payload
    ];

    #[test]
    fn deconstruct_plain() {
        let bytes = [0x00, 0x00, 0x86, 0xdd, 0x60];
        let pkt = GrePacket::new_checked(&bytes[..]).unwrap();
        let repr = GreRepr::parse(&pkt).unwrap();
        assert_eq!(
            repr,
            GreRepr {
                protocol: PROTO_IPV6,
                checksum: false,
                key: None,
                sequence: None
            }
        );
        assert_eq!(pkt.payload(), &[0x60]);
    }

    #[test]
    fn deconstruct_all_options() {
        let pkt = GrePacket::new_checked(&KEYED[..]).unwrap();
        assert_eq!(pkt.header_len(), 16);
        let repr = GreRepr::parse(&pkt).unwrap();
        assert_eq!(repr.key, Some(42));
        assert_eq!(repr.sequence, Some(7));
        assert!(repr.checksum);
        assert_eq!(pkt.payload(), &[0x45, 0, 0, 0]);
    }

    #[test]
    fn construct_all_options() {
        let repr = GreRepr {
            protocol: PROTO_IPV4,
            checksum: true,
            key: Some(42),
            sequence: Some(7),
        };
        let mut buf = [0u8; 20];
        buf[16] = 0x45;
        repr.emit(&mut buf);
        assert_eq!(buf, KEYED);
    }

    #[test]
    fn rejects_rfc_violations() {
        let truncated = [0x20, 0x00, 0x08, 0x00, 0x00];
        assert_eq!(
            GrePacket::new_checked(&truncated[..]).unwrap_err(),
            WireError::Truncated
        );
        let version1 = [0x00, 0x01, 0x88, 0x0b];
        let pkt = GrePacket::new_checked(&version1[..]).unwrap();
        assert_eq!(GreRepr::parse(&pkt), Err(WireError::BadVersion(1)));
        let routing = [0x40, 0x00, 0x08, 0x00];
        let pkt = GrePacket::new_checked(&routing[..]).unwrap();
        assert_eq!(GreRepr::parse(&pkt), Err(WireError::ReservedBits));
        let mut bad = KEYED;
        bad[19] ^= 1;
        let pkt = GrePacket::new_checked(&bad[..]).unwrap();
        assert_eq!(GreRepr::parse(&pkt), Err(WireError::BadChecksum));
        // Bits 6-12 are "send 0, ignore on receive".
        let ignored = [0x00, 0x80, 0x08, 0x00];
        assert!(GreRepr::parse(&GrePacket::new_checked(&ignored[..]).unwrap()).is_ok());
    }

    fn any_repr() -> impl Strategy<Value = GreRepr> {
        (
            any::<u16>(),
            any::<bool>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
        )
            .prop_map(|(protocol, checksum, key, sequence)| GreRepr {
                protocol,
                checksum,
                key,
                sequence,
            })
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(repr in any_repr(),
                                payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = vec![0u8; repr.header_len()];
            buf.extend_from_slice(&payload);
            repr.emit(&mut buf);
            let pkt = GrePacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(GreRepr::parse(&pkt), Ok(repr));
            prop_assert_eq!(pkt.payload(), &payload[..]);
        }

        #[test]
        fn checksum_detects_any_bit_flip(repr in any_repr(),
                                         payload in proptest::collection::vec(any::<u8>(), 1..100),
                                         bit in any::<prop::sample::Index>()) {
            let repr = GreRepr { checksum: true, ..repr };
            let mut buf = vec![0u8; repr.header_len()];
            buf.extend_from_slice(&payload);
            repr.emit(&mut buf);
            // Flip a payload bit (header flips may turn into other errors instead).
            let at = repr.header_len() * 8 + bit.index(payload.len() * 8);
            buf[at / 8] ^= 1 << (at % 8);
            let pkt = GrePacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(GreRepr::parse(&pkt), Err(WireError::BadChecksum));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(pkt) = GrePacket::new_checked(&bytes[..]) {
                let _ = GreRepr::parse(&pkt);
                let _ = (pkt.key(), pkt.sequence(), pkt.checksum(), pkt.payload().len());
            }
        }
    }
}
