//! Receive coalescing (GRO) of decapsulated TCP segments into one TUN super-packet.
//!
//! The peer's TCP sender hands its TUN a 64 KiB TSO super-packet; the tunnel carries it as
//! a run of MTU-sized segments of one flow, back to back. Writing each segment to our TUN
//! costs one syscall and one trip through the kernel's forwarding path, so consecutive
//! segments of one flow are merged here, as Linux GRO does, and written once with a
//! virtio-net header asking the kernel to segment (or hand it as is to a local socket).
//!
//! Merging follows the kernel's TCP GRO rules: same addresses, ports, IP TOS/TTL/DF (or
//! IPv6 traffic class, flow label, hop limit), same ACK number, window, header length and
//! option bytes; contiguous sequence numbers; only ACK (and PSH on the last segment) set;
//! every segment but the last exactly as long as the first; checksum verified on each
//! segment before it is merged, so a damaged segment is never hidden under the fresh
//! checksum the kernel computes for the merged packet.
//!
//! A packet that arrives with its transport checksum still *partial* is the other case: a
//! peer whose kernel carries GSO super-packets across a virtual link (vipgate's own kernel
//! data path, or Linux ip_gre, over veth) sends the inner TCP/UDP checksum as the kernel left
//! it, the folded pseudo-header sum, for whichever device would have finished it, and a TCP
//! packet possibly larger than the tunnel MTU. A raw socket reads both as they are. Such a
//! packet (its checksum fails, but its field is exactly the pseudo-header sum) is written alone
//! with `NEEDS_CSUM`, so the kernel finishes the checksum, and, when longer than the tunnel
//! MTU, as a TCP super-packet the kernel segments at the MTU. A packet damaged on the way
//! keeps failing: only an exact pseudo-header sum is taken as partial (a random error matches
//! it with probability 2^-16, the checksum's own strength).
//!
//! What this module does NOT do: hold packets across batches (a batch ends with a flush,
//! so no packet waits for a timer), merge interleaved flows (a different flow flushes),
//! IPv4 options or IPv6 extension headers (such packets pass through unmerged).

use netutil::bytes::put16;
use netutil::checksum::{fold, sum};
use netutil::ipv4::{Ipv4View, field};
use netutil::vnet::VnetHdr;

/// Length of the virtio-net header in front of every frame written to an offload TUN.
const VNET_HDR_LEN: usize = VnetHdr::LEN;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Largest IP packet the merged result may become (IPv4 total length / IPv6 payload length).
const MAX_MERGED: usize = 65_535;

/// The first segment of the packet being built, as far as merging needs it.
#[derive(Debug, Clone, Copy)]
struct Flow {
    v6: bool,
    /// IP header length (where TCP starts).
    ip_len: usize,
    /// IP + TCP header length.
    hdr_len: usize,
    /// Payload length of the first segment: every merged segment but the last has it.
    seg: usize,
    next_seq: u32,
    segments: usize,
    /// A short or PSH segment was merged: nothing may follow it.
    closed: bool,
}

/// Builds one frame (virtio-net header + packet) at a time from consecutive packets.
///
/// Use: [`TcpCoalescer::push`] each packet and write the frame it hands back, if any (the
/// packets before this one that could not take it); at the end of a batch, write what
/// [`TcpCoalescer::finish`] returns. Two buffers, so the frame handed back stays valid
/// while the new one is already being built.
#[derive(Debug, Default)]
pub(crate) struct TcpCoalescer {
    /// The frame being built.
    buf: Vec<u8>,
    /// The last completed frame, lent to the caller for its write.
    done: Vec<u8>,
    /// Mergeability of `buf`'s packet; `None` when it must go out alone.
    flow: Option<Flow>,
    pending: bool,
    /// The tunnel MTU: a partial-checksum TCP packet longer than this is handed to the
    /// kernel as a super-packet of segments this long (0: never).
    pub(crate) mtu: usize,
}

impl TcpCoalescer {
    /// An empty coalescer for a tunnel of this MTU.
    pub(crate) fn with_mtu(mtu: usize) -> Self {
        TcpCoalescer {
            mtu,
            ..TcpCoalescer::default()
        }
    }

    /// Merges `packet` into the frame being built, or completes that frame, returns it for
    /// the TUN write and starts a new one with `packet` (which may be anything: a packet
    /// that cannot be merged goes out alone).
    pub(crate) fn push(&mut self, packet: &[u8]) -> Option<&[u8]> {
        let next = candidate(packet);
        if let Some(next) = &next
            && self.merge(packet, next).is_some()
        {
            return None;
        }
        let completed = self.complete();
        std::mem::swap(&mut self.buf, &mut self.done);
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(packet);
        self.pending = true;
        self.flow = next.map(|c| Flow {
            v6: c.v6,
            ip_len: c.ip_len,
            hdr_len: c.hdr_len,
            seg: c.payload,
            // Lossless: a candidate's payload is below 64 KiB.
            next_seq: c.seq.wrapping_add(c.payload as u32),
            segments: 1,
            closed: c.psh,
        });
        completed.then_some(self.done.as_slice())
    }

    /// The frame built so far, ready for the TUN write, or `None` when nothing is pending.
    /// The coalescer is empty afterwards.
    pub(crate) fn finish(&mut self) -> Option<&[u8]> {
        self.complete().then_some(self.buf.as_slice())
    }

    /// Appends `packet` (already found mergeable as `next`) to the frame when it continues
    /// its flow; `None` when it does not (or, defensively, when a header is not where the
    /// flow says: nothing is indexed without a length check).
    fn merge(&mut self, packet: &[u8], next: &Candidate) -> Option<()> {
        let flow = self.flow?;
        if flow.closed || !self.pending || next.v6 != flow.v6 || next.hdr_len != flow.hdr_len {
            return None;
        }
        let first = self.buf.get(VNET_HDR_LEN..VNET_HDR_LEN + flow.hdr_len)?;
        let merged_len = (self.buf.len() - VNET_HDR_LEN).checked_add(next.payload)?;
        if next.seq != flow.next_seq || next.payload > flow.seg || merged_len > MAX_MERGED {
            return None;
        }
        let (ip, tcp) = packet.get(..next.hdr_len)?.split_at_checked(flow.ip_len)?;
        let (first_ip, first_tcp) = first.split_at_checked(flow.ip_len)?;
        let same = |a: &[u8], b: &[u8], r: core::ops::Range<usize>| matches!((a.get(r.clone()), b.get(r)), (Some(x), Some(y)) if x == y);
        let same_ip = if flow.v6 {
            // Version, traffic class, flow label; next header, hop limit; addresses.
            same(ip, first_ip, 0..4) && same(ip, first_ip, 6..40)
        } else {
            // TOS; DF; TTL, protocol; addresses.
            same(ip, first_ip, 1..2)
                && ip.get(6)? & 0x40 == first_ip.get(6)? & 0x40
                && same(ip, first_ip, 8..10)
                && same(ip, first_ip, 12..20)
        };
        let same_tcp = same(tcp, first_tcp, 0..4) // ports
            && same(tcp, first_tcp, 8..13) // ack number, header length
            && same(tcp, first_tcp, 14..16) // window
            && tcp.get(20..)? == first_tcp.get(20..)?; // options
        if !same_ip || !same_tcp {
            return None;
        }
        self.buf.extend_from_slice(packet.get(next.hdr_len..)?);
        if next.psh {
            *self.buf.get_mut(VNET_HDR_LEN + flow.ip_len + 13)? |= TCP_PSH;
        }
        self.flow = Some(Flow {
            // Lossless: the payload is below 64 KiB.
            next_seq: flow.next_seq.wrapping_add(next.payload as u32),
            segments: flow.segments + 1,
            closed: next.psh || next.payload < flow.seg,
            ..flow
        });
        Some(())
    }

    /// Makes `buf` a complete frame (header fixed up if segments were merged); `false` when
    /// nothing was pending.
    fn complete(&mut self) -> bool {
        if !std::mem::take(&mut self.pending) {
            return false;
        }
        let merged = match self.flow.take() {
            Some(flow) if flow.segments > 1 => self.seal(flow).is_some(),
            _ => false,
        };
        if !merged && let Some((header, packet)) = self.buf.split_first_chunk_mut::<VNET_HDR_LEN>()
        {
            // One packet: complete as received; offload only to finish a partial checksum.
            partial_checksum(packet, self.mtu)
                .unwrap_or_default()
                .encode(header);
        }
        true
    }

    /// Rewrites the lengths of the merged packet, leaves the pseudo-header sum in the TCP
    /// checksum field and asks the kernel (virtio-net header) to segment and checksum.
    /// `None` (the frame then goes out without offload) only if the frame is not the
    /// flow's, which `merge` never lets happen.
    fn seal(&mut self, flow: Flow) -> Option<()> {
        let (header, packet) = self.buf.split_at_mut_checked(VNET_HDR_LEN)?;
        let total = packet.len();
        if total > MAX_MERGED || total < flow.hdr_len || flow.hdr_len < flow.ip_len + 20 {
            return None;
        }
        let tcp_len = total - flow.ip_len;
        // Lossless below: total <= MAX_MERGED (checked above), and every offset is below
        // hdr_len <= total (checked above), so put16 and the ranges stay in `packet`.
        let pseudo = if flow.v6 {
            put16(packet, 4, tcp_len as u16);
            sum(0, packet.get(8..40)?) + tcp_len as u32 + 6
        } else {
            let mut ip = Ipv4View::new_unchecked(packet.get_mut(..flow.ip_len)?);
            ip.set_total_len(total as u16);
            // From scratch: the first segment's header checksum was never verified.
            ip.fill_checksum();
            sum(0, packet.get(field::SRC.start..field::DST.end)?) + tcp_len as u32 + 6
        };
        put16(packet, flow.ip_len + 16, fold(pseudo));
        let header: &mut [u8; VNET_HDR_LEN] = header.try_into().ok()?;
        // The lengths are below 64 KiB (hdr_len, seg <= total <= MAX_MERGED).
        VnetHdr {
            flags: VnetHdr::NEEDS_CSUM,
            gso_type: if flow.v6 {
                VnetHdr::GSO_TCPV6
            } else {
                VnetHdr::GSO_TCPV4
            },
            hdr_len: flow.hdr_len as u16,
            gso_size: flow.seg as u16,
            csum_start: flow.ip_len as u16,
            csum_offset: 16,
        }
        .encode(header);
        Some(())
    }
}

/// A packet's IP layer as coalescing and checksum finishing need it: an IPv4 header without
/// options or fragmentation, or an IPv6 header without extension headers, whose length field
/// matches the packet exactly.
struct PlainIp {
    v6: bool,
    /// IP header length (where the transport header starts).
    ip_len: usize,
    protocol: u8,
    /// The transport checksum's pseudo-header sum, unfolded, for the packet's own length.
    pseudo: u32,
}

/// The packet's [`PlainIp`], or `None` for anything else; every byte read is length-checked.
fn plain_ip(packet: &[u8]) -> Option<PlainIp> {
    let (v6, ip_len, protocol, addresses) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4View::new_unchecked(packet.first_chunk::<20>()?);
            if ip.ihl() != 20 || ip.total_len() != packet.len() || ip.is_fragment() {
                return None;
            }
            (false, 20, ip.protocol(), field::SRC.start..field::DST.end)
        }
        6 => {
            let ip = packet.first_chunk::<40>()?;
            if usize::from(u16::from_be_bytes([ip[4], ip[5]])) + 40 != packet.len() {
                return None;
            }
            (true, 40, ip[6], 8..40)
        }
        _ => return None,
    };
    let l4_len = u32::try_from(packet.len() - ip_len).ok()?;
    let pseudo = sum(0, packet.get(addresses)?) + l4_len + u32::from(protocol);
    Some(PlainIp {
        v6,
        ip_len,
        protocol,
        pseudo,
    })
}

/// The virtio-net header that has the kernel finish `packet`'s transport checksum, when that
/// checksum is partial (the field holds exactly the folded pseudo-header sum and the full
/// sum does not verify): TCP or UDP in IPv4 without options or in IPv6 without extension
/// headers, lengths consistent. A TCP packet longer than `mtu` (when `mtu` leaves room for
/// payload) also becomes a super-packet of `mtu`-sized segments. `None` for anything else.
fn partial_checksum(packet: &[u8], mtu: usize) -> Option<VnetHdr> {
    let PlainIp {
        v6,
        ip_len,
        protocol,
        pseudo,
    } = plain_ip(packet)?;
    let l4 = packet.get(ip_len..)?;
    let (csum_offset, hdr_len) = match protocol {
        6 => (16, ip_len + usize::from(l4.get(12)? >> 4) * 4),
        17 if l4.get(4..6)? == &(l4.len() as u16).to_be_bytes()[..] => (6, ip_len + 8),
        _ => return None,
    };
    let field = l4.get(csum_offset..csum_offset + 2)?;
    let partial =
        u16::from_be_bytes([field[0], field[1]]) == fold(pseudo) && fold(sum(pseudo, l4)) != 0xffff;
    if !partial || hdr_len < ip_len + 8 || hdr_len > packet.len() {
        return None;
    }
    let segment = mtu.checked_sub(hdr_len).filter(|&s| s > 0);
    let gso = match segment {
        Some(segment) if protocol == 6 && packet.len() > mtu => Some(segment),
        _ => None,
    };
    // Lengths below 64 KiB: the IP length fields said so.
    Some(VnetHdr {
        flags: VnetHdr::NEEDS_CSUM,
        gso_type: match (gso, v6) {
            (None, _) => VnetHdr::GSO_NONE,
            (Some(_), false) => VnetHdr::GSO_TCPV4,
            (Some(_), true) => VnetHdr::GSO_TCPV6,
        },
        hdr_len: if gso.is_some() { hdr_len as u16 } else { 0 },
        gso_size: gso.map_or(0, |s| u16::try_from(s).unwrap_or(u16::MAX)),
        csum_start: ip_len as u16,
        csum_offset: csum_offset as u16,
    })
}

/// What a mergeable segment looks like. Invariant (from [`candidate`]): the packet holds
/// `hdr_len + payload` bytes, `hdr_len >= ip_len + 20`, and `payload` is at least 1.
struct Candidate {
    v6: bool,
    ip_len: usize,
    hdr_len: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

/// A TCP segment that may be merged: plain IP header, ACK (and maybe PSH) only, a
/// payload, and a checksum that verifies. Anything shorter than the headers it announces
/// is `None` (and passes through unmerged): every byte read is length-checked first.
fn candidate(packet: &[u8]) -> Option<Candidate> {
    let PlainIp {
        v6,
        ip_len,
        protocol,
        pseudo,
    } = plain_ip(packet)?;
    if protocol != 6 {
        return None;
    }
    let tcp = packet.get(ip_len..)?;
    // The fixed TCP header must be there before any of it is read (finding 1.1: a 13-byte
    // "header" used to be indexed at 13).
    let fixed = tcp.first_chunk::<20>()?;
    let doff = usize::from(fixed[12] >> 4) * 4;
    let flags = fixed[13];
    if doff < 20 || tcp.len() <= doff || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    if fold(sum(pseudo, tcp)) != 0xffff {
        return None;
    }
    Some(Candidate {
        v6,
        ip_len,
        hdr_len: ip_len + doff,
        payload: tcp.len() - doff,
        seq: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
        psh: flags & TCP_PSH != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netutil::checksum::checksum;
    use proptest::prelude::*;

    /// An IPv4 TCP segment with valid checksums.
    fn segment(seq: u32, payload: &[u8], flags: u8, options: &[u8]) -> Vec<u8> {
        let doff = 20 + options.len();
        let total = 20 + doff + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        put16(&mut p, 2, total as u16);
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[192, 168, 101, 10]);
        p[16..20].copy_from_slice(&[192, 168, 102, 10]);
        let ip_check = checksum(&p[..20]);
        put16(&mut p, 10, ip_check);
        let t = &mut p[20..];
        put16(t, 0, 40000);
        put16(t, 2, 5201);
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = ((doff / 4) as u8) << 4;
        t[13] = flags;
        put16(t, 14, 500);
        t[20..doff].copy_from_slice(options);
        t[doff..].copy_from_slice(payload);
        let pseudo = sum(0, &p[12..20]) + (total - 20) as u32 + 6;
        let check = !fold(sum(pseudo, &p[20..]));
        put16(&mut p, 36, check);
        p
    }

    /// Feeds packets the way the driver does and returns the frames written.
    fn run(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = TcpCoalescer::default();
        let mut frames = Vec::new();
        for p in packets {
            frames.extend(c.push(p).map(<[u8]>::to_vec));
        }
        frames.extend(c.finish().map(<[u8]>::to_vec));
        frames
    }

    /// Splits a frame back into segments as the kernel would (TSO), with full checksums.
    fn resegment(frame: &[u8]) -> Vec<Vec<u8>> {
        let packet = &frame[VNET_HDR_LEN..];
        if frame[1] == 0 {
            return vec![packet.to_vec()];
        }
        let hdr_len = usize::from(u16::from_ne_bytes([frame[2], frame[3]]));
        let seg = usize::from(u16::from_ne_bytes([frame[4], frame[5]]));
        let options = &packet[40..hdr_len];
        let seq0 = u32::from_be_bytes([packet[24], packet[25], packet[26], packet[27]]);
        let psh = packet[33] & TCP_PSH;
        let chunks: Vec<&[u8]> = packet[hdr_len..].chunks(seg).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let flags = TCP_ACK | if i == last { psh } else { 0 };
                segment(seq0.wrapping_add((i * seg) as u32), c, flags, options)
            })
            .collect()
    }

    /// `segment`'s packet with its TCP checksum left partial, as a sending kernel leaves
    /// it for the device: the folded pseudo-header sum.
    fn partial(mut p: Vec<u8>) -> Vec<u8> {
        let pseudo = sum(0, &p[12..20]) + (p.len() - 20) as u32 + 6;
        put16(&mut p, 36, fold(pseudo));
        p
    }

    #[test]
    fn a_partial_checksum_is_left_for_the_kernel_to_finish() {
        let p = partial(segment(1000, &[7; 300], TCP_ACK | TCP_PSH, &[]));
        let mut c = TcpCoalescer::with_mtu(1476);
        assert!(c.push(&p).is_none());
        let frame = c.finish().unwrap().to_vec();
        let header = VnetHdr::decode(&frame).unwrap();
        assert_eq!(
            header,
            VnetHdr {
                flags: VnetHdr::NEEDS_CSUM,
                csum_start: 20,
                csum_offset: 16,
                ..VnetHdr::default()
            }
        );
        assert_eq!(&frame[VNET_HDR_LEN..], &p[..], "the packet goes as it came");
    }

    #[test]
    fn a_partial_super_packet_is_segmented_at_the_tunnel_mtu() {
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let p = partial(segment(1000, &[9; 5000], TCP_ACK, &ts));
        let mut c = TcpCoalescer::with_mtu(1476);
        assert!(c.push(&p).is_none());
        let frame = c.finish().unwrap().to_vec();
        let header = VnetHdr::decode(&frame).unwrap();
        assert_eq!(header.gso_type, VnetHdr::GSO_TCPV4);
        assert!(header.needs_csum());
        assert_eq!(usize::from(header.hdr_len), 20 + 32);
        assert_eq!(usize::from(header.gso_size), 1476 - 52);
        assert_eq!((header.csum_start, header.csum_offset), (20, 16));
        assert_eq!(&frame[VNET_HDR_LEN..], &p[..]);
    }

    #[test]
    fn a_damaged_checksum_is_not_taken_for_a_partial_one() {
        let mut p = segment(1000, &[7; 300], TCP_ACK, &[]);
        p[100] ^= 1;
        let mut c = TcpCoalescer::with_mtu(1476);
        assert!(c.push(&p).is_none());
        let frame = c.finish().unwrap().to_vec();
        assert_eq!(VnetHdr::decode(&frame).unwrap(), VnetHdr::default());
        // A whole checksum that verifies is not partial either, even a short one.
        assert_eq!(
            partial_checksum(&segment(1, &[1], TCP_ACK, &[]), 1476),
            None
        );
    }

    #[test]
    fn a_partial_udp_checksum_is_finished_but_never_segmented() {
        let payload = [3u8; 2000];
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        put16(&mut p, 2, total as u16);
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        put16(&mut p, 20, 5000);
        put16(&mut p, 22, 53);
        put16(&mut p, 24, (total - 20) as u16);
        p[28..].copy_from_slice(&payload);
        let pseudo = sum(0, &p[12..20]) + (total - 20) as u32 + 17;
        put16(&mut p, 26, fold(pseudo));
        let header = partial_checksum(&p, 1476).unwrap();
        assert_eq!(header.gso_type, VnetHdr::GSO_NONE);
        assert_eq!((header.csum_start, header.csum_offset), (20, 6));
    }

    #[test]
    fn a_run_of_segments_becomes_one_super_packet() {
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let packets: Vec<Vec<u8>> = (0..5u32)
            .map(|i| segment(1000 + i * 100, &[i as u8; 100], TCP_ACK, &ts))
            .collect();
        let frames = run(&packets);
        assert_eq!(frames.len(), 1);
        let f = &frames[0];
        assert_eq!(f[0], VnetHdr::NEEDS_CSUM);
        assert_eq!(f[1], VnetHdr::GSO_TCPV4);
        assert_eq!(u16::from_ne_bytes([f[4], f[5]]), 100);
        let packet = &f[VNET_HDR_LEN..];
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[2], packet[3]])),
            packet.len()
        );
        assert_eq!(checksum(&packet[..20]), 0, "IPv4 header checksum");
        assert_eq!(resegment(f), packets);
    }

    #[test]
    fn gaps_flags_and_other_flows_are_not_merged() {
        let a = segment(1000, &[1; 100], TCP_ACK, &[]);
        let gap = segment(1200, &[2; 100], TCP_ACK, &[]);
        let fin = segment(1300, &[3; 100], TCP_ACK | 0x01, &[]);
        let mut other = segment(1400, &[4; 100], TCP_ACK, &[]);
        other[21] ^= 1; // another source port (checksum no longer matters: not mergeable)
        let frames = run(&[a.clone(), gap.clone(), fin.clone(), other.clone()]);
        assert_eq!(frames.len(), 4);
        for (f, p) in frames.iter().zip([a, gap, fin, other]) {
            assert_eq!(
                &f[..VNET_HDR_LEN],
                &[0; VNET_HDR_LEN],
                "sent alone, as received"
            );
            assert_eq!(&f[VNET_HDR_LEN..], &p[..]);
        }
    }

    #[test]
    fn a_damaged_segment_is_never_merged() {
        let a = segment(1000, &[1; 100], TCP_ACK, &[]);
        let mut b = segment(1100, &[2; 100], TCP_ACK, &[]);
        b[60] ^= 0xff;
        let frames = run(&[a, b.clone()]);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            &frames[1][VNET_HDR_LEN..],
            &b[..],
            "passed on for the kernel to drop"
        );
    }

    #[test]
    fn nothing_follows_a_short_or_psh_segment() {
        let a = segment(1000, &[1; 100], TCP_ACK, &[]);
        let short = segment(1100, &[2; 50], TCP_ACK, &[]);
        let after = segment(1150, &[3; 100], TCP_ACK, &[]);
        assert_eq!(run(&[a.clone(), short.clone(), after.clone()]).len(), 2);
        let psh = segment(1100, &[2; 100], TCP_ACK | TCP_PSH, &[]);
        let next = segment(1200, &[3; 100], TCP_ACK, &[]);
        let frames = run(&[a, psh.clone(), next]);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[0][VNET_HDR_LEN + 33] & TCP_PSH,
            TCP_PSH,
            "PSH kept on the merge"
        );
    }

    #[test]
    fn non_tcp_and_short_garbage_pass_through() {
        let frames = run(&[vec![0x45, 0, 0], vec![], vec![0x60; 10]]);
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][VNET_HDR_LEN..], &[0x45, 0, 0]);
    }

    /// An IPv4 packet of `len` bytes, IHL 5, total length `len`, protocol TCP, no checksum.
    fn bare_tcp_v4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        put16(&mut p, 2, len as u16);
        p[8] = 64;
        p[9] = 6;
        p
    }

    /// Finding 1.1: a 13-byte TCP "header" (33-byte IPv4 packet, 53-byte IPv6 packet) and
    /// every other length below a complete fixed TCP header pass through, unmerged.
    #[test]
    fn short_tcp_headers_pass_through_without_panic() {
        for len in 20..60 {
            let p = bare_tcp_v4(len);
            let frames = run(&[p.clone(), p.clone()]);
            assert_eq!(frames.len(), 2, "IPv4 len {len}");
            assert_eq!(&frames[0][VNET_HDR_LEN..], &p[..]);
        }
        for len in 40..80 {
            let mut p = vec![0u8; len];
            p[0] = 0x60;
            put16(&mut p, 4, (len - 40) as u16);
            p[6] = 6;
            p[7] = 64;
            let frames = run(&[p.clone(), p.clone()]);
            assert_eq!(frames.len(), 2, "IPv6 len {len}");
        }
        // The 33-byte packet of the review, as the fuzz input it came with.
        let seed = include_bytes!("../../fuzz/corpus/gre_coalesce/review_1_1_33byte_tcp");
        assert_eq!(
            (seed.len(), seed[2], seed[11]),
            (35, 0x45, 6),
            "the review's packet"
        );
        crate::fuzzing::coalesce(seed);
    }

    /// A damaged header length or a data offset past the end, after a good segment.
    #[test]
    fn bad_data_offsets_after_a_good_segment_are_not_merged() {
        let a = segment(1000, &[1; 100], TCP_ACK, &[]);
        for doff in [0u8, 4, 15] {
            let mut b = segment(1100, &[2; 100], TCP_ACK, &[]);
            b[32] = doff << 4;
            assert_eq!(run(&[a.clone(), b]).len(), 2, "data offset {doff}");
        }
    }

    proptest! {
        /// Whatever the segment sizes, flags and order, what the kernel would resegment
        /// from the frames is exactly the packets that went in, and no frame exceeds 64 KiB.
        #[test]
        fn frames_resegment_to_the_input(
            sizes in proptest::collection::vec(prop_oneof![Just(1000usize), Just(1000), Just(1000), 1usize..1400], 1..80),
            psh in proptest::collection::vec(any::<bool>(), 80),
            skip in proptest::collection::vec(0u8..20, 80),
        ) {
            let mut seq = 5000u32;
            let mut packets = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                if skip[i] == 0 { seq = seq.wrapping_add(7); } // an occasional gap
                let flags = TCP_ACK | if psh[i] && i % 5 == 0 { TCP_PSH } else { 0 };
                packets.push(segment(seq, &vec![i as u8; *n], flags, &[]));
                seq = seq.wrapping_add(*n as u32);
            }
            let frames = run(&packets);
            let mut back = Vec::new();
            for f in &frames {
                prop_assert!(f.len() - VNET_HDR_LEN <= MAX_MERGED);
                back.extend(resegment(f));
            }
            prop_assert_eq!(back, packets);
        }

        /// Arbitrary inner packets (random bytes behind a plausible IPv4/IPv6 TCP header,
        /// any lengths) mixed with mergeable segments: never a panic, never a frame over
        /// 64 KiB, and every packet comes out in some frame.
        #[test]
        fn arbitrary_inner_packets_never_panic(
            packets in proptest::collection::vec(
                (0u8..4, proptest::collection::vec(any::<u8>(), 0..120), any::<u16>()), 1..30),
        ) {
            let mut input = Vec::new();
            for (i, (shape, bytes, len_field)) in packets.iter().enumerate() {
                let mut p = bytes.clone();
                match shape {
                    0 if p.len() >= 20 => { p[0] = 0x45; p[9] = 6; let n = p.len() as u16; put16(&mut p, 2, n); }
                    1 if p.len() >= 40 => { p[0] = 0x60; p[6] = 6; put16(&mut p, 4, *len_field); }
                    2 => p = segment(1000 + 100 * i as u32, &[7; 100], TCP_ACK, &[]),
                    _ => {}
                }
                input.push(p);
            }
            let mut c = TcpCoalescer::default();
            let mut out = 0usize;
            for p in &input {
                if let Some(f) = c.push(p) {
                    prop_assert!(f.len() - VNET_HDR_LEN <= MAX_MERGED);
                    out += f.len() - VNET_HDR_LEN;
                }
            }
            if let Some(f) = c.finish() {
                out += f.len() - VNET_HDR_LEN;
            }
            // Merging drops only repeated headers, never a packet's payload.
            prop_assert!(out <= input.iter().map(Vec::len).sum::<usize>());
            prop_assert!(out > 0 || input.iter().all(Vec::is_empty));
        }
    }
}
