//! In-place IPv4/TCP/UDP/ICMP rewriting with incremental checksums (RFC 1624).
//!
//! Parsing uses etherparse (which has no mutable slices): it validates the headers and
//! gives the fields; the rewrite then patches bytes at known offsets in the caller's buffer
//! and adjusts every checksum that covers them. Nothing here allocates.
//!
//! Invariant: every `set_*` keeps each checksum it touches as valid (or as invalid) as it was,
//! and a UDP checksum of zero ("none", RFC 768) stays zero. With [`L4Checksum::Partial`] the
//! transport checksum field holds a partial sum instead (TUN offload); the invariant then is
//! that finishing it after the rewrite gives the checksum a full recomputation would.

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Slice, Ipv4HeaderSlice, Ipv4Slice, TcpHeaderSlice, UdpHeaderSlice};
use netutil::bytes::{get16, put16};
use netutil::checksum::{adjust16, checksum};
use netutil::ipv4::{Ipv4View, field};

use crate::error::DropReason;
use crate::flow::{Proto, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::tcp::Segment;

const IP_TTL: usize = field::TTL;
const IP_CSUM: usize = field::CHECKSUM.start;
const IP_SRC: usize = field::SRC.start;
const IP_DST: usize = field::DST.start;

pub(crate) const ICMP_ECHO_REPLY: u8 = 0;
pub(crate) const ICMP_DEST_UNREACH: u8 = 3;
pub(crate) const ICMP_ECHO_REQUEST: u8 = 8;
pub(crate) const ICMP_TIME_EXCEEDED: u8 = 11;
pub(crate) const ICMP_PARAM_PROBLEM: u8 = 12;

/// What the TCP/UDP checksum field of the outer packet holds.
///
/// A packet read from a TUN with offload comes with a virtio-net header; when that header has
/// `NEEDS_CSUM` (the kernel's `CHECKSUM_PARTIAL`), the transport checksum has not been
/// computed yet: the field holds the folded one's-complement sum of the pseudo-header only,
/// not complemented, and the kernel finishes it later by summing the transport header and
/// payload on top (after segmenting a GSO super-packet, per segment). The IPv4 header
/// checksum is always complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum L4Checksum {
    /// A complete checksum (RFC 793, RFC 768): every rewrite adjusts it (RFC 1624).
    #[default]
    Full,
    /// A partial sum of the pseudo-header (`NEEDS_CSUM`): an address change is added to it as a
    /// sum (not complemented), a port or query id change leaves it alone (those bytes are summed
    /// when the checksum is finished), and UDP's "zero means none" rule does not apply.
    Partial,
}

/// The transport part of a parsed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        /// What connection tracking reads (sequence numbers, window, options).
        seg: Segment,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Echo request or reply: `id` is the query identifier (RFC 5508 "query ID").
    IcmpEcho {
        request: bool,
        id: u16,
    },
    /// Destination unreachable, time exceeded or parameter problem: carries a quoted packet.
    IcmpError,
    /// Other ICMP messages, other protocols: not translated.
    Untranslatable,
    /// A fragment past the first: no transport header.
    LaterFragment,
}

/// The fields of a validated IPv4 packet the gateway works with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parsed {
    pub(crate) ihl: usize,
    pub(crate) len: usize,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) l4: L4,
    /// The first fragment of a fragmented datagram (more fragments follow, offset 0).
    pub(crate) first_fragment: bool,
}

impl Parsed {
    pub(crate) fn proto(&self) -> Option<Proto> {
        match self.l4 {
            L4::Tcp { .. } => Some(Proto::Tcp),
            L4::Udp { .. } => Some(Proto::Udp),
            L4::IcmpEcho { .. } | L4::IcmpError => Some(Proto::Icmp),
            L4::Untranslatable | L4::LaterFragment => None,
        }
    }

    pub(crate) fn ports(&self) -> (Option<u16>, Option<u16>) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (Some(sport), Some(dport)),
            _ => (None, None),
        }
    }
}

/// Validates `buf` as an IPv4 packet and extracts what translation needs.
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed, DropReason> {
    let ip = Ipv4Slice::from_slice(buf).map_err(|_| DropReason::Malformed)?;
    let h = ip.header();
    let ihl = h.slice().len();
    let len = usize::from(h.total_len());
    let l4_bytes = &buf[ihl..len];
    let l4 = if u16::from(h.fragments_offset()) != 0 {
        L4::LaterFragment
    } else {
        match h.protocol().0 {
            6 => {
                let t = TcpHeaderSlice::from_slice(l4_bytes).map_err(|_| DropReason::Malformed)?;
                let flags = l4_bytes[13];
                let wscale = if flags & TCP_SYN != 0 {
                    t.options_iterator().find_map(|o| match o {
                        Ok(etherparse::TcpOptionElement::WindowScale(s)) => Some(s),
                        _ => None,
                    })
                } else {
                    None
                };
                let payload = l4_bytes.len().saturating_sub(t.slice().len());
                L4::Tcp {
                    sport: t.source_port(),
                    dport: t.destination_port(),
                    flags,
                    seg: Segment {
                        flags,
                        seq: t.sequence_number(),
                        ack: t.acknowledgment_number(),
                        window: t.window_size(),
                        wscale,
                        payload: u32::try_from(payload).unwrap_or(u32::MAX),
                    },
                }
            }
            17 => {
                let u = UdpHeaderSlice::from_slice(l4_bytes).map_err(|_| DropReason::Malformed)?;
                L4::Udp {
                    sport: u.source_port(),
                    dport: u.destination_port(),
                }
            }
            1 => {
                let icmp = Icmpv4Slice::from_slice(l4_bytes).map_err(|_| DropReason::Malformed)?;
                match icmp.type_u8() {
                    t @ (ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) => L4::IcmpEcho {
                        request: t == ICMP_ECHO_REQUEST,
                        id: get16(l4_bytes, 4),
                    },
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM => L4::IcmpError,
                    _ => L4::Untranslatable,
                }
            }
            _ => L4::Untranslatable,
        }
    };
    Ok(Parsed {
        ihl,
        len,
        src: h.source_addr(),
        dst: h.destination_addr(),
        l4,
        first_fragment: h.more_fragments() && u16::from(h.fragments_offset()) == 0,
    })
}

/// What kind of field a checksum covering a rewritten word is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckKind {
    /// A complete checksum.
    Full,
    /// A UDP checksum: zero means "none" and stays zero; a computed zero is sent as 0xffff.
    Udp,
    /// A partial pseudo-header sum ([`L4Checksum::Partial`]).
    Partial,
}

/// Where a checksum covering a rewritten word is.
#[derive(Debug, Clone, Copy)]
struct Check {
    at: usize,
    kind: CheckKind,
}

const IP_CHECK: Check = Check {
    at: IP_CSUM,
    kind: CheckKind::Full,
};

/// Writes one 16-bit word and adjusts the checksums that cover it.
fn set16(buf: &mut [u8], at: usize, new: u16, checks: &[Check]) {
    let old = get16(buf, at);
    if old == new {
        return;
    }
    put16(buf, at, new);
    for c in checks {
        let cur = get16(buf, c.at);
        let next = match c.kind {
            CheckKind::Full => adjust16(cur, old, new),
            CheckKind::Udp if cur == 0 => continue,
            CheckKind::Udp => match adjust16(cur, old, new) {
                0 => 0xffff,
                v => v,
            },
            // The field is a sum, not its complement: RFC 1624 on the complemented value.
            CheckKind::Partial => !adjust16(!cur, old, new),
        };
        put16(buf, c.at, next);
    }
}

fn set_addr(buf: &mut [u8], at: usize, addr: Ipv4Addr, checks: &[Check]) {
    let o = addr.octets();
    set16(buf, at, u16::from_be_bytes([o[0], o[1]]), checks);
    set16(buf, at + 2, u16::from_be_bytes([o[2], o[3]]), checks);
}

/// The checksums covering the IP addresses of the (outer or quoted) packet at `ip`: its header
/// checksum and, for TCP/UDP, the transport checksum (pseudo-header) when it is present.
fn addr_checks(
    buf: &[u8],
    ip: usize,
    ihl: usize,
    proto: u8,
    csum: L4Checksum,
    out: &mut [Check; 2],
) -> usize {
    out[0] = Check {
        at: ip + IP_CSUM,
        kind: CheckKind::Full,
    };
    let l4 = ip + ihl;
    let (at, kind) = match (proto, csum) {
        (6 | 17, L4Checksum::Partial) if buf.len() >= l4 + 8 => {
            (l4 + if proto == 6 { 16 } else { 6 }, CheckKind::Partial)
        }
        (6, L4Checksum::Full) if buf.len() >= l4 + 18 => (l4 + 16, CheckKind::Full),
        (17, L4Checksum::Full) if buf.len() >= l4 + 8 => (l4 + 6, CheckKind::Udp),
        _ => return 1,
    };
    // A partial TCP checksum field must be inside the buffer too.
    if at + 2 > buf.len() {
        return 1;
    }
    out[1] = Check { at, kind };
    2
}

/// The checksum covering the transport ports / ICMP id of the packet at `l4`. A partial sum
/// does not cover them: they are summed when it is finished.
fn port_check(buf: &[u8], l4: usize, proto: u8, csum: L4Checksum) -> Option<Check> {
    if csum == L4Checksum::Partial {
        return None;
    }
    match proto {
        6 if buf.len() >= l4 + 18 => Some(Check {
            at: l4 + 16,
            kind: CheckKind::Full,
        }),
        17 if buf.len() >= l4 + 8 => Some(Check {
            at: l4 + 6,
            kind: CheckKind::Udp,
        }),
        1 if buf.len() >= l4 + 4 => Some(Check {
            at: l4 + 2,
            kind: CheckKind::Full,
        }),
        _ => None,
    }
}

/// Which address or port of a packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Src,
    Dst,
}

/// Rewrites the source or destination address of the packet starting at `ip` (the outer
/// packet: `ip = 0`; a quoted packet: its offset, always with [`L4Checksum::Full`]). Returns
/// false if the header is cut short.
pub(crate) fn set_ip(
    buf: &mut [u8],
    ip: usize,
    side: Side,
    addr: Ipv4Addr,
    csum: L4Checksum,
) -> bool {
    let Some(h) = header_at(buf, ip) else {
        return false;
    };
    let (ihl, proto) = (h.ihl(), h.protocol());
    let mut checks = [IP_CHECK; 2];
    let n = addr_checks(buf, ip, ihl, proto, csum, &mut checks);
    let at = ip + if side == Side::Src { IP_SRC } else { IP_DST };
    set_addr(buf, at, addr, &checks[..n]);
    true
}

/// The fixed IPv4 header at `buf[ip..]`, if it is all there.
fn header_at(buf: &[u8], ip: usize) -> Option<Ipv4View<&[u8; 20]>> {
    buf.get(ip..)?
        .first_chunk::<20>()
        .map(Ipv4View::new_unchecked)
}

/// Rewrites an address of a fragment past the first: only the IP header checksum covers it
/// there (the transport checksum travels in the first fragment, updated when that one was).
pub(crate) fn set_ip_header_only(buf: &mut [u8], side: Side, addr: Ipv4Addr) {
    let at = if side == Side::Src { IP_SRC } else { IP_DST };
    set_addr(buf, at, addr, &[IP_CHECK]);
}

/// Rewrites the source or destination port (TCP/UDP) or the query id (ICMP echo: `side` is
/// ignored) of the packet whose IP header starts at `ip`.
pub(crate) fn set_port(buf: &mut [u8], ip: usize, side: Side, port: u16, csum: L4Checksum) -> bool {
    let Some(h) = header_at(buf, ip) else {
        return false;
    };
    let (ihl, proto) = (h.ihl(), h.protocol());
    let l4 = ip + ihl;
    let at = match proto {
        1 => l4 + 4,
        _ if side == Side::Src => l4,
        _ => l4 + 2,
    };
    if buf.len() < at + 2 {
        return false;
    }
    match port_check(buf, l4, proto, csum) {
        Some(c) => set16(buf, at, port, &[c]),
        None => set16(buf, at, port, &[]),
    }
    true
}

/// Adds one to the TTL (see [`crate::GatewayConfig::compensate_ttl`]); never wraps.
pub(crate) fn bump_ttl(buf: &mut [u8]) {
    if buf[IP_TTL] < u8::MAX {
        let word = get16(buf, IP_TTL);
        set16(buf, IP_TTL, word + 0x0100, &[IP_CHECK]);
    }
}

/// The quoted packet of an ICMP error: where it starts and its fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quoted {
    /// Offset of the quoted IP header in the buffer.
    pub(crate) ip: usize,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) proto: Proto,
    /// Source and destination ports, or (id, id) for a quoted ICMP echo.
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// Validates an ICMP error (checksum, quoted header and its checksum, RFC 5508 REQ-3) and
/// returns its quoted packet. The quoted transport checksum is not validated (REQ-3c).
pub(crate) fn quoted(buf: &[u8], p: &Parsed) -> Result<Quoted, DropReason> {
    let icmp = &buf[p.ihl..p.len];
    if checksum(icmp) != 0 && !cfg!(fuzzing) {
        return Err(DropReason::BadIcmpError);
    }
    let qip = p.ihl + 8;
    let inner = buf.get(qip..p.len).ok_or(DropReason::BadIcmpError)?;
    let h = Ipv4HeaderSlice::from_slice(inner).map_err(|_| DropReason::BadIcmpError)?;
    if checksum(h.slice()) != 0 && !cfg!(fuzzing) {
        return Err(DropReason::BadIcmpError);
    }
    if u16::from(h.fragments_offset()) != 0 {
        return Err(DropReason::BadIcmpError);
    }
    let l4 = &inner[h.slice().len()..];
    if l4.len() < 8 {
        return Err(DropReason::BadIcmpError);
    }
    let (proto, sport, dport) = match h.protocol().0 {
        6 | 17 => (
            if h.protocol().0 == 6 {
                Proto::Tcp
            } else {
                Proto::Udp
            },
            get16(l4, 0),
            get16(l4, 2),
        ),
        1 if matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) => {
            (Proto::Icmp, get16(l4, 4), get16(l4, 4))
        }
        _ => return Err(DropReason::BadIcmpError),
    };
    Ok(Quoted {
        ip: qip,
        src: h.source_addr(),
        dst: h.destination_addr(),
        proto,
        sport,
        dport,
    })
}

/// Recomputes the ICMP checksum after the quoted packet was rewritten (errors are small and
/// rare; their checksum was verified on the way in by [`quoted`]).
pub(crate) fn refresh_icmp_checksum(buf: &mut [u8], p: &Parsed) {
    let at = p.ihl + 2;
    put16(buf, at, 0);
    let c = checksum(&buf[p.ihl..p.len]);
    put16(buf, at, c);
}

/// Turns an ICMP echo request (parsed as `p`, not fragmented) into its echo reply in place:
/// addresses swapped, type 0, a fresh TTL, both checksums recomputed (the ICMP checksum
/// covers no pseudo-header, so a partial one cannot occur). False if `p` is no echo request.
pub(crate) fn echo_reply_in_place(buf: &mut [u8], p: &Parsed) -> bool {
    if !matches!(p.l4, L4::IcmpEcho { request: true, .. })
        || p.first_fragment
        || buf.len() < p.len
        || p.len < p.ihl + 8
    {
        return false;
    }
    buf[field::SRC].copy_from_slice(&p.dst.octets());
    buf[field::DST].copy_from_slice(&p.src.octets());
    buf[IP_TTL] = 64;
    Ipv4View::new_unchecked(&mut buf[..p.ihl]).fill_checksum();
    buf[p.ihl] = ICMP_ECHO_REPLY;
    refresh_icmp_checksum(buf, p);
    true
}

/// Finishes a partial checksum in place, as the kernel does for `CHECKSUM_PARTIAL`: sums
/// `buf[start..]` (the field at `start + offset` holding the partial sum) and stores the
/// complement in the field. For a TCP/UDP packet this gives its full checksum (a UDP result of
/// zero is sent as 0xffff, RFC 768). Returns false (and changes nothing) when the field is
/// outside `buf`.
pub fn finish_partial_checksum(buf: &mut [u8], start: usize, offset: usize, udp: bool) -> bool {
    let at = start.saturating_add(offset);
    if at.saturating_add(2) > buf.len() {
        return false;
    }
    let mut c = checksum(&buf[start..]);
    if udp && c == 0 {
        c = 0xffff;
    }
    put16(buf, at, c);
    true
}

/// A packet whose transport checksum is valid (for tests and the fuzz harness). False for a
/// packet that does not parse.
pub(crate) fn l4_checksum_ok(buf: &[u8]) -> bool {
    use netutil::checksum::{fold, pseudo_header_v4, sum};
    let Ok(p) = parse(buf) else {
        return false;
    };
    let l4 = &buf[p.ihl..p.len];
    match p.l4 {
        L4::Udp { .. } if get16(l4, 6) == 0 => true,
        L4::Tcp { .. } | L4::Udp { .. } => {
            let proto = buf[9];
            let acc = pseudo_header_v4(p.src.octets(), p.dst.octets(), proto, l4.len() as u16);
            fold(sum(acc, l4)) == 0xffff
        }
        _ => checksum(l4) == 0,
    }
}

/// Turns a TCP segment (IPv4, in `buf`) into the RST a closed port would answer, in place
/// (RFC 9293 §3.10.7.1): addresses and ports swapped; for a segment without ACK (a SYN) a
/// RST+ACK with `ack = seq + segment length`, for one with ACK a RST with `seq = its ack`;
/// options overwritten with NOPs so the length stays the same, both checksums recomputed.
/// Returns false (buffer untouched) if the packet is not a well-formed TCP segment.
///
/// This is how a service with no backend left refuses a connection (as LVS with no real
/// server, and HAProxy with no server up, make the client fail at once instead of retrying
/// its SYN for a minute).
pub(crate) fn rewrite_syn_as_rst(buf: &mut [u8]) -> bool {
    use netutil::checksum::{fold, pseudo_header_v4, sum};

    let Ok(ip) = Ipv4View::new_checked(&*buf) else {
        return false;
    };
    let (ihl, total, src, dst) = (ip.ihl(), ip.total_len(), ip.src_octets(), ip.dst_octets());
    if ip.protocol() != 6 || buf.len() < ihl + 20 {
        return false;
    }
    let doff = usize::from(buf[ihl + 12] >> 4) * 4;
    if doff < 20 || ihl + doff > total {
        return false;
    }
    let flags = buf[ihl + 13];
    let seg_len = (total - ihl - doff) as u32
        + u32::from(flags & TCP_SYN != 0)
        + u32::from(flags & TCP_FIN != 0);
    let seq = u32::from_be_bytes([buf[ihl + 4], buf[ihl + 5], buf[ihl + 6], buf[ihl + 7]]);
    let ack = u32::from_be_bytes([buf[ihl + 8], buf[ihl + 9], buf[ihl + 10], buf[ihl + 11]]);

    // IP: swap addresses, fresh TTL, DF and no fragmentation business.
    buf[field::SRC].copy_from_slice(&dst);
    buf[field::DST].copy_from_slice(&src);
    buf[IP_TTL] = 64;
    put16(buf, field::FLG_OFF.start, 0x4000);
    Ipv4View::new_unchecked(&mut buf[..ihl]).fill_checksum();

    // TCP: RST+ACK acknowledging the SYN (RFC 9293 §3.10.7.1, reset for a closed port).
    let t = ihl;
    let (sport, dport) = (get16(buf, t), get16(buf, t + 2));
    put16(buf, t, dport);
    put16(buf, t + 2, sport);
    if flags & TCP_ACK != 0 {
        buf[t + 4..t + 8].copy_from_slice(&ack.to_be_bytes());
        buf[t + 8..t + 12].copy_from_slice(&0u32.to_be_bytes());
        buf[t + 13] = TCP_RST;
    } else {
        buf[t + 4..t + 8].copy_from_slice(&0u32.to_be_bytes());
        buf[t + 8..t + 12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        buf[t + 13] = TCP_RST | TCP_ACK;
    }
    put16(buf, t + 14, 0); // window
    put16(buf, t + 16, 0); // checksum, filled below
    put16(buf, t + 18, 0); // urgent pointer
    buf[t + 20..t + doff].fill(1); // NOP options
    let seg = &buf[t..total];
    let acc = pseudo_header_v4(dst, src, 6, seg.len() as u16);
    let check = !fold(sum(acc, seg));
    put16(buf, t + 16, check);
    true
}
