//! The virtio-net header (`struct virtio_net_hdr`) that precedes every packet read from or
//! written to a TUN opened with offload (`IFF_VNET_HDR`).
//!
//! Invariant: on a legacy TUN (no `TUNSETVNETLE`/`TUNSETVNETBE`, which is how tun-rs opens
//! it) the 16-bit fields are in the host's byte order, so [`VnetHdr::decode`] and
//! [`VnetHdr::encode`] use native order; the packet itself stays in network order.

/// One decoded virtio-net header ([`VnetHdr::LEN`] bytes on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// [`VnetHdr::NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// [`VnetHdr::GSO_NONE`], [`VnetHdr::GSO_TCPV4`] or [`VnetHdr::GSO_TCPV6`] (plus the
    /// kinds this workspace never writes, passed through as read).
    pub gso_type: u8,
    /// Length of the headers (IP + transport) of a super-packet.
    pub hdr_len: u16,
    /// Payload bytes per segment when the kernel segments a super-packet.
    pub gso_size: u16,
    /// Where the partial checksum's coverage starts (the transport header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The length of a `struct virtio_net_hdr` (without the `num_buffers` of the mergeable
    /// variant, which a TUN does not use).
    pub const LEN: usize = 10;
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum field holds a partial sum
    /// (`CHECKSUM_PARTIAL`), to be finished over `csum_start..`.
    pub const NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_GSO_NONE`: one packet, not a super-packet.
    pub const GSO_NONE: u8 = 0;
    /// `VIRTIO_NET_HDR_GSO_TCPV4`: a TCP over IPv4 super-packet.
    pub const GSO_TCPV4: u8 = 1;
    /// `VIRTIO_NET_HDR_GSO_TCPV6`: a TCP over IPv6 super-packet.
    pub const GSO_TCPV6: u8 = 4;

    /// The header at the start of `b`; `None` when `b` is shorter than [`VnetHdr::LEN`].
    #[inline]
    #[must_use]
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.first_chunk::<{ Self::LEN }>()?;
        let at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: at(2),
            gso_size: at(4),
            csum_start: at(6),
            csum_offset: at(8),
        })
    }

    /// Writes the header into `out`.
    #[inline]
    pub fn encode(&self, out: &mut [u8; Self::LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// Whether the packet's transport checksum is a partial sum.
    #[inline]
    #[must_use]
    pub fn needs_csum(&self) -> bool {
        self.flags & Self::NEEDS_CSUM != 0
    }

    /// Whether the packet is a super-packet the kernel segments on the way out.
    #[inline]
    #[must_use]
    pub fn is_gso(&self) -> bool {
        self.gso_type != Self::GSO_NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_short_buffer_has_no_header() {
        assert_eq!(VnetHdr::decode(&[0; VnetHdr::LEN - 1]), None);
    }

    #[test]
    fn the_all_zero_header_is_a_plain_complete_packet() {
        let h = VnetHdr::decode(&[0; VnetHdr::LEN]).expect("long enough");
        assert_eq!(h, VnetHdr::default());
        assert!(!h.needs_csum() && !h.is_gso());
    }

    #[test]
    fn fields_sit_where_the_kernel_puts_them() {
        let h = VnetHdr {
            flags: VnetHdr::NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VnetHdr::LEN];
        h.encode(&mut b);
        assert_eq!(b[..2], [1, 1]);
        assert_eq!(b[2..4], 52u16.to_ne_bytes());
        assert_eq!(b[4..6], 1448u16.to_ne_bytes());
        assert_eq!(b[6..8], 20u16.to_ne_bytes());
        assert_eq!(b[8..10], 16u16.to_ne_bytes());
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(b in any::<[u8; VnetHdr::LEN]>(), tail in any::<u8>()) {
            let mut long = b.to_vec();
            long.push(tail);
            let h = VnetHdr::decode(&long).expect("long enough");
            let mut out = [0u8; VnetHdr::LEN];
            h.encode(&mut out);
            prop_assert_eq!(out, b);
        }
    }
}
