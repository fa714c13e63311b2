//! VRRPv3 advertisements for IPv4 (RFC 5798 §5.1) and the IPv4 envelope they arrive in.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       IPv4 Address(es)                        |
//! ```
//!
//! Invariant (as in smoltcp's `wire`): once [`VrrpPacket::new_checked`] succeeds, no accessor
//! panics, because the length covers the fixed header and every address `count` announces.
//! Under `cfg(fuzzing)` the checksum check always passes so a fuzzer reaches the field checks.

use std::net::Ipv4Addr;

use netutil::ipv4::Ipv4View;
use netutil::{bytes, checksum};

use crate::error::WireError;

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
pub const IP_PROTOCOL: u8 = 112;
/// The IPv4 multicast group adverts are sent to (RFC 5798 §5.1.1.2).
pub const MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The only TTL an advert may be sent or accepted with (RFC 5798 §5.1.1.3, §7.1).
pub const TTL: u8 = 255;
/// Protocol version this crate speaks.
pub const VERSION: u8 = 3;
/// The only packet type RFC 5798 defines: ADVERTISEMENT.
pub const TYPE_ADVERTISEMENT: u8 = 1;
/// Length of the fixed part of an advert.
pub const HEADER_LEN: usize = 8;
/// The largest advert interval the 12-bit field can carry, in centiseconds.
pub const MAX_INTERVAL_CS: u16 = 0x0fff;

mod field {
    use std::ops::Range;
    pub(super) const VER_TYPE: usize = 0;
    pub(super) const VRID: usize = 1;
    pub(super) const PRIORITY: usize = 2;
    pub(super) const COUNT: usize = 3;
    pub(super) const INTERVAL: Range<usize> = 4..6;
    pub(super) const CHECKSUM: Range<usize> = 6..8;
}

/// A read/write view of a VRRPv3 advert in a byte buffer.
#[derive(Debug, Clone)]
pub struct VrrpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VrrpPacket<T> {
    /// Wraps a buffer without checking its length (use for emitting into a sized buffer).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that it holds the header and every announced address.
    ///
    /// # Errors
    /// [`WireError::Truncated`] if it does not.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the buffer is long enough for every accessor.
    ///
    /// # Errors
    /// [`WireError::Truncated`] if it is not.
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        if buf.len() < HEADER_LEN || buf.len() < HEADER_LEN + 4 * usize::from(buf[field::COUNT]) {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// Returns the version nibble (3 for VRRPv3).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TYPE] >> 4
    }

    /// Returns the type nibble (1 = ADVERTISEMENT).
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TYPE] & 0x0f
    }

    /// Returns the Virtual Router ID.
    pub fn vrid(&self) -> u8 {
        self.buffer.as_ref()[field::VRID]
    }

    /// Returns the sender's priority (0 = master resigning, 255 = address owner).
    pub fn priority(&self) -> u8 {
        self.buffer.as_ref()[field::PRIORITY]
    }

    /// Returns the number of IPv4 addresses that follow the header.
    pub fn count(&self) -> u8 {
        self.buffer.as_ref()[field::COUNT]
    }

    /// Returns the Max Adver Int in centiseconds (the 4 reserved bits are ignored).
    pub fn max_advert_interval(&self) -> u16 {
        bytes::get16(self.buffer.as_ref(), field::INTERVAL.start) & MAX_INTERVAL_CS
    }

    /// Returns the checksum field.
    pub fn checksum(&self) -> u16 {
        bytes::get16(self.buffer.as_ref(), field::CHECKSUM.start)
    }

    /// Returns the announced addresses.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let buf = self.buffer.as_ref();
        let n = usize::from(self.count());
        buf[HEADER_LEN..HEADER_LEN + 4 * n]
            .chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
    }

    /// Validates the checksum over the pseudo-header and the whole message (RFC 5798 §5.2.8).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if cfg!(fuzzing) {
            return true;
        }
        let buf = self.buffer.as_ref();
        let Ok(len) = u16::try_from(buf.len()) else {
            return false;
        };
        let acc = checksum::pseudo_header_v4(src.octets(), dst.octets(), IP_PROTOCOL, len);
        checksum::fold(checksum::sum(acc, buf)) == 0xffff
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VrrpPacket<T> {
    fn buf(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets version and type.
    pub fn set_version_kind(&mut self, version: u8, kind: u8) {
        self.buf()[field::VER_TYPE] = (version << 4) | (kind & 0x0f);
    }

    /// Sets the Virtual Router ID.
    pub fn set_vrid(&mut self, vrid: u8) {
        self.buf()[field::VRID] = vrid;
    }

    /// Sets the priority.
    pub fn set_priority(&mut self, priority: u8) {
        self.buf()[field::PRIORITY] = priority;
    }

    /// Sets the address count.
    pub fn set_count(&mut self, count: u8) {
        self.buf()[field::COUNT] = count;
    }

    /// Sets Max Adver Int (centiseconds, 12 bits); the reserved bits are sent as zero.
    pub fn set_max_advert_interval(&mut self, cs: u16) {
        bytes::put16(self.buf(), field::INTERVAL.start, cs & MAX_INTERVAL_CS);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        bytes::put16(self.buf(), field::CHECKSUM.start, value);
    }

    /// Computes and stores the checksum for the given pseudo-header addresses.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let buf = self.buffer.as_ref();
        // Adverts are at most 8 + 255 * 4 bytes, far below u16::MAX.
        let len = u16::try_from(buf.len()).unwrap_or(u16::MAX);
        let acc = checksum::pseudo_header_v4(src.octets(), dst.octets(), IP_PROTOCOL, len);
        let value = !checksum::fold(checksum::sum(acc, buf));
        self.set_checksum(value);
    }
}

/// The meaning of a VRRPv3 advert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpRepr {
    /// Virtual Router ID (1..=255).
    pub vrid: u8,
    /// Sender priority.
    pub priority: u8,
    /// Advert interval in centiseconds (1..=4095).
    pub max_advert_interval_cs: u16,
    /// The virtual addresses the sender backs up.
    pub addresses: Vec<Ipv4Addr>,
}

impl VrrpRepr {
    /// Parses and validates an advert that came from `src` to `dst`.
    ///
    /// # Errors
    /// Bad version or type, VRID 0, a checksum that does not verify.
    pub fn parse<T: AsRef<[u8]>>(
        packet: &VrrpPacket<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<Self, WireError> {
        packet.check_len()?;
        if packet.version() != VERSION {
            return Err(WireError::BadVersion);
        }
        if packet.kind() != TYPE_ADVERTISEMENT {
            return Err(WireError::BadType);
        }
        if !packet.verify_checksum(src, dst) {
            return Err(WireError::BadChecksum);
        }
        // Bytes after the announced addresses mean the count lies (RFC 5798 §7.1 asks to
        // check the count against the packet).
        if packet.buffer.as_ref().len() != HEADER_LEN + 4 * usize::from(packet.count()) {
            return Err(WireError::AddressCount);
        }
        if packet.vrid() == 0 {
            return Err(WireError::BadVrid);
        }
        Ok(Self {
            vrid: packet.vrid(),
            priority: packet.priority(),
            max_advert_interval_cs: packet.max_advert_interval(),
            addresses: packet.addresses().collect(),
        })
    }

    /// Returns the length of the emitted advert.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + 4 * self.addresses.len().min(255)
    }

    /// Writes the advert (with its checksum) into a buffer of exactly [`Self::buffer_len`] bytes.
    ///
    /// At most 255 addresses are written; config validation rejects more.
    ///
    /// # Panics
    /// If the buffer is shorter than [`Self::buffer_len`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut VrrpPacket<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        let count = self.addresses.len().min(255);
        packet.set_version_kind(VERSION, TYPE_ADVERTISEMENT);
        packet.set_vrid(self.vrid);
        packet.set_priority(self.priority);
        packet.set_count(count as u8);
        packet.set_max_advert_interval(self.max_advert_interval_cs);
        for (i, addr) in self.addresses.iter().take(count).enumerate() {
            let at = HEADER_LEN + 4 * i;
            packet.buf()[at..at + 4].copy_from_slice(&addr.octets());
        }
        packet.fill_checksum(src, dst);
    }

    /// Emits into a new vector.
    pub fn to_bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut out = vec![0; self.buffer_len()];
        self.emit(&mut VrrpPacket::new_unchecked(&mut out[..]), src, dst);
        out
    }
}

/// The IPv4 header fields an advert is judged by, and where its payload starts.
///
/// IPv4 raw sockets deliver the IP header on receive; this reads only what VRRP needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Envelope {
    /// Source address (the sender's primary address).
    pub src: Ipv4Addr,
    /// Destination (224.0.0.18, or our address for unicast peers).
    pub dst: Ipv4Addr,
    /// TTL as received; must be 255.
    pub ttl: u8,
    /// Byte range of the VRRP message inside the buffer.
    pub payload: std::ops::Range<usize>,
}

impl Ipv4Envelope {
    /// Parses the IPv4 header of a packet read from a raw socket.
    ///
    /// # Errors
    /// [`WireError::BadIpHeader`] for anything that is not an unfragmented IPv4 packet of
    /// protocol 112 whose lengths fit the buffer.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let ip = Ipv4View::new_checked(buf).map_err(|_| WireError::BadIpHeader)?;
        // More-fragments or an offset: adverts are tiny and never fragmented.
        if ip.protocol() != IP_PROTOCOL || ip.is_fragment() {
            return Err(WireError::BadIpHeader);
        }
        Ok(Self {
            src: ip.src(),
            dst: ip.dst(),
            ttl: ip.ttl(),
            payload: ip.ihl()..ip.total_len(),
        })
    }
}

/// Parses an IPv4 packet carrying an advert: envelope and advert together.
///
/// # Errors
/// Any [`WireError`] of the envelope or the advert; the TTL is returned, not judged.
pub fn parse_ipv4(buf: &[u8]) -> Result<(Ipv4Envelope, VrrpRepr), WireError> {
    let env = Ipv4Envelope::parse(buf)?;
    let packet = VrrpPacket::new_checked(&buf[env.payload.clone()])?;
    let repr = VrrpRepr::parse(&packet, env.src, env.dst)?;
    Ok((env, repr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);

    // An advert as keepalived 2.2.7 sends it (vrid 51, priority 100, 1 s, VIP 198.51.100.10),
    // with the checksum computed by hand over the pseudo-header.
    const ADVERT: [u8; 12] = [
        0x31, 0x33, 0x64, 0x01, 0x00, 0x64, 0x00, 0x00, 198, 51, 100, 10,
    ];

    fn fixture() -> Vec<u8> {
        let mut b = ADVERT.to_vec();
        let mut p = VrrpPacket::new_unchecked(&mut b[..]);
        p.fill_checksum(SRC, MULTICAST_GROUP);
        b
    }

    #[test]
    fn deconstruct() {
        let b = fixture();
        let p = VrrpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 3);
        assert_eq!(p.kind(), 1);
        assert_eq!(p.vrid(), 51);
        assert_eq!(p.priority(), 100);
        assert_eq!(p.count(), 1);
        assert_eq!(p.max_advert_interval(), 100);
        assert!(p.verify_checksum(SRC, MULTICAST_GROUP));
        let r = VrrpRepr::parse(&p, SRC, MULTICAST_GROUP).unwrap();
        assert_eq!(r.addresses, vec![Ipv4Addr::new(198, 51, 100, 10)]);
    }

    #[test]
    fn construct() {
        let r = VrrpRepr {
            vrid: 51,
            priority: 100,
            max_advert_interval_cs: 100,
            addresses: vec![Ipv4Addr::new(198, 51, 100, 10)],
        };
        assert_eq!(r.to_bytes(SRC, MULTICAST_GROUP), fixture());
    }

    #[test]
    fn checksum_covers_pseudo_header() {
        let b = fixture();
        let p = VrrpPacket::new_checked(&b[..]).unwrap();
        let other = Ipv4Addr::new(198, 51, 100, 12);
        assert_eq!(
            VrrpRepr::parse(&p, other, MULTICAST_GROUP),
            Err(WireError::BadChecksum)
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let mut b = fixture();
        b[0] = 0x21;
        let p = VrrpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(
            VrrpRepr::parse(&p, SRC, MULTICAST_GROUP),
            Err(WireError::BadVersion)
        );
        let mut b = fixture();
        b[0] = 0x32;
        let p = VrrpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(
            VrrpRepr::parse(&p, SRC, MULTICAST_GROUP),
            Err(WireError::BadType)
        );
        let mut b = fixture();
        b[3] = 2;
        assert_eq!(
            VrrpPacket::new_checked(&b[..]).err(),
            Some(WireError::Truncated)
        );
        let mut b = fixture();
        b.extend_from_slice(&[0; 4]);
        let mut p = VrrpPacket::new_unchecked(&mut b[..]);
        p.fill_checksum(SRC, MULTICAST_GROUP);
        let p = VrrpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(
            VrrpRepr::parse(&p, SRC, MULTICAST_GROUP),
            Err(WireError::AddressCount)
        );
        assert_eq!(
            VrrpPacket::new_checked(&b[..5]).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn ipv4_envelope() {
        let adv = fixture();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 255, 112, 0, 0, 198, 51, 100, 11, 224, 0, 0, 18,
        ];
        let total = (20 + adv.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&adv);
        let (env, repr) = parse_ipv4(&ip).unwrap();
        assert_eq!(env.ttl, 255);
        assert_eq!(env.src, SRC);
        assert_eq!(repr.vrid, 51);
        ip[9] = 17;
        assert_eq!(parse_ipv4(&ip).err(), Some(WireError::BadIpHeader));
    }

    fn arb_repr() -> impl Strategy<Value = VrrpRepr> {
        (
            1u8..=255,
            any::<u8>(),
            1u16..=MAX_INTERVAL_CS,
            proptest::collection::vec(any::<[u8; 4]>().prop_map(Ipv4Addr::from), 0..20),
        )
            .prop_map(|(vrid, priority, i, addresses)| VrrpRepr {
                vrid,
                priority,
                max_advert_interval_cs: i,
                addresses,
            })
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(r in arb_repr(), src in any::<[u8; 4]>(), dst in any::<[u8; 4]>()) {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            let b = r.to_bytes(src, dst);
            let p = VrrpPacket::new_checked(&b[..]).unwrap();
            prop_assert_eq!(VrrpRepr::parse(&p, src, dst), Ok(r));
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_ipv4(&b);
            if let Ok(p) = VrrpPacket::new_checked(&b[..]) {
                let _ = VrrpRepr::parse(&p, SRC, MULTICAST_GROUP);
            }
        }

        #[test]
        fn any_bit_flip_is_caught(r in arb_repr(), bit in 0usize..64) {
            let mut b = r.to_bytes(SRC, MULTICAST_GROUP);
            let bit = bit % (b.len() * 8);
            // Flips inside the reserved nibble are not covered by the parsed fields but are by
            // the checksum; every single-bit flip must be rejected.
            b[bit / 8] ^= 1 << (bit % 8);
            let rejected = match VrrpPacket::new_checked(&b[..]) {
                Ok(p) => VrrpRepr::parse(&p, SRC, MULTICAST_GROUP).is_err(),
                Err(_) => true,
            };
            prop_assert!(rejected);
        }
    }
}
