//! The tunnel core: one configured GRE tunnel, without any I/O.
//!
//! Call order for a driver (quinn-proto style):
//! - a packet read from the TUN → [`Tunnel::encapsulate`] → [`Encap`] says where it goes;
//! - a GRE packet from the underlay → [`Tunnel::decapsulate`] → [`Verdict`];
//! - whenever `now >= poll_timeout()` → [`Tunnel::handle_timeout`], then drain
//!   [`Tunnel::poll_transmit`] (keepalive probes) and [`Tunnel::poll_event`] (up/down, which
//!   the driver turns into route changes).
//!
//! Buffers: every packet stays in the caller's buffer. The inner packet of an encapsulation
//! must start at least [`HEADROOM`] bytes into the buffer so the GRE header is written in
//! front of it; results are ranges of that same buffer.

use core::ops::Range;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Instant;

use netutil::checksum::checksum;
use netutil::ipv4::{Ipv4View, field};
use netutil::mss::{MssOutcome, clamp_mss};
use netutil::{DropCounters, Reconfigured};

use crate::keepalive::{
    GRE_IN_UDP_PORT, GreKeepalive, KeepaliveConfig, KeepaliveTick, MAX_PROBE_INNER_LEN,
    TokenBucket, emit_probe_inner, reply_marker,
};
use crate::wire::{
    GrePacket, GreRepr, MAX_HEADER_LEN, PROTO_IPV4, PROTO_IPV6, PROTO_KEEPALIVE, WireError,
};

/// Bytes a driver must leave free in front of an inner packet for [`Tunnel::encapsulate`].
pub const HEADROOM: usize = MAX_HEADER_LEN;

/// Smallest buffer [`Tunnel::poll_transmit`] needs for a keepalive probe.
pub const PROBE_BUF_LEN: usize = HEADROOM + MAX_PROBE_INNER_LEN;

/// Peer probes reflected per second and tunnel at most (a peer probing every 100 ms, the
/// shortest interval vipgate allows, needs 10), and how many may come at once.
pub const REFLECT_RATE: u32 = 20;
/// See [`REFLECT_RATE`].
pub const REFLECT_BURST: u32 = 40;

/// Longest GRE payload after a reflected probe's inner GRE header: our own marker is 8
/// bytes, Cisco and Linux send none. Anything longer is not a bare keepalive.
const MAX_REFLECTED_PAYLOAD: usize = 16;

/// How GRE packets travel on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Underlay {
    /// IP protocol 47 (RFC 2784).
    #[default]
    Gre,
    /// GRE-in-UDP, destination port 4754 (RFC 8086), for paths through NAT.
    Udp,
}

impl Underlay {
    /// Outer IPv4 (+ UDP) bytes in front of the GRE header.
    pub const fn outer_len(self) -> usize {
        match self {
            Self::Gre => 20,
            Self::Udp => 28,
        }
    }
}

/// Everything the core needs to know about one tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Name (the TUN interface), used in events and logs.
    pub name: String,
    /// Outer source address.
    pub local: Ipv4Addr,
    /// Outer destination: the only source accepted on receive.
    pub remote: Ipv4Addr,
    /// Inner address of this end, used as the source of ICMP errors we generate.
    pub inner_address: Option<Ipv4Addr>,
    /// RFC 2890 key, sent and required on receive (Linux `key`, IOS `tunnel key`).
    pub key: Option<u32>,
    /// Send sequence numbers and drop out-of-order/duplicate received ones (RFC 2890 §2.2).
    pub sequence: bool,
    /// Send checksums (received ones are always verified, RFC 2784 §2.2).
    pub checksum: bool,
    /// Largest inner packet; see [`TunnelConfig::default_mtu`].
    pub mtu: u16,
    /// Keepalives, off when `None` (as on IOS).
    pub keepalive: Option<KeepaliveConfig>,
    /// GRE or GRE-in-UDP.
    pub underlay: Underlay,
}

impl TunnelConfig {
    /// A tunnel between two addresses with no options and a 1500-byte underlay.
    pub fn new(name: impl Into<String>, local: Ipv4Addr, remote: Ipv4Addr) -> Self {
        let mut config = Self {
            name: name.into(),
            local,
            remote,
            inner_address: None,
            key: None,
            sequence: false,
            checksum: false,
            mtu: 0,
            keepalive: None,
            underlay: Underlay::Gre,
        };
        config.mtu = config.default_mtu(1500);
        config
    }

    /// The GRE header length with the configured options.
    pub fn gre_header_len(&self) -> usize {
        self.gre_repr(PROTO_IPV4).header_len()
    }

    /// Underlay MTU minus everything the tunnel adds: 24 bytes for plain GRE over IPv4,
    /// plus 4 per option, plus 8 for GRE-in-UDP.
    pub fn default_mtu(&self, underlay_mtu: u16) -> u16 {
        let overhead = self.underlay.outer_len() + self.gre_header_len();
        underlay_mtu.saturating_sub(overhead as u16)
    }

    fn gre_repr(&self, protocol: u16) -> GreRepr {
        GreRepr {
            protocol,
            checksum: self.checksum,
            key: self.key,
            // Placeholder; the real number is filled in per packet.
            sequence: self.sequence.then_some(0),
        }
    }
}

netutil::drop_reasons! {
    /// Why a packet was dropped; each reason has its own counter.
    #[non_exhaustive]
    pub enum DropReason {
        /// GRE header shorter than its flags announce.
        Truncated => "truncated",
        /// GRE version other than 0.
        BadVersion => "bad_version",
        /// RFC 1701 flag bits set.
        ReservedBits => "reserved_bits",
        /// GRE checksum did not verify.
        BadChecksum => "bad_checksum",
        /// Protocol type other than IPv4, IPv6 or a keepalive reply.
        UnknownProtocol => "unknown_protocol",
        /// Outer source is not the configured remote.
        WrongSource => "wrong_source",
        /// Key missing, unexpected or different from the configured one.
        WrongKey => "wrong_key",
        /// Sequence number at or behind the last one delivered (RFC 2890 §2.2).
        OutOfSequence => "out_of_sequence",
        /// The inner packet is not a well-formed IP packet of the announced version.
        BadInner => "bad_inner",
        /// A packet read from the TUN is not IPv4 or IPv6.
        NotIp => "not_ip",
        /// Larger than the tunnel MTU and no ICMP error could be sent for it.
        TooBig => "too_big",
        /// The buffer had no room in front of the inner packet for the GRE header.
        NoHeadroom => "no_headroom",
        /// A keepalive reply (protocol 0) while no probe was outstanding, or whose marker is
        /// not the outstanding probe's: spoofed, duplicated or late.
        UnexpectedKeepalive => "unexpected_keepalive",
        /// `sequence` is on and the packet carries no sequence number (Linux ip_gre drops
        /// these too).
        MissingSequence => "missing_sequence",
        /// A packet from us to the peer inside the tunnel that is not a bare keepalive probe
        /// (inner GRE protocol 0 with our key, no IP options, small): never reflected.
        NotAProbe => "not_a_probe",
        /// A peer probe over the reflection rate limit ([`REFLECT_RATE`]).
        ReflectLimited => "reflect_limited",
    }
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Truncated => Self::Truncated,
            WireError::BadVersion(_) => Self::BadVersion,
            WireError::ReservedBits => Self::ReservedBits,
            WireError::BadChecksum => Self::BadChecksum,
        }
    }
}

/// Per-tunnel counters: every field only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    /// Inner packets encapsulated toward the peer.
    pub tx_packets: u64,
    /// Inner bytes encapsulated toward the peer.
    pub tx_bytes: u64,
    /// Inner packets decapsulated for the TUN.
    pub rx_packets: u64,
    /// Inner bytes decapsulated for the TUN.
    pub rx_bytes: u64,
    /// Keepalive probes sent.
    pub keepalives_sent: u64,
    /// Replies to our probes received.
    pub keepalive_replies: u64,
    /// The peer's probes reflected back to it.
    pub keepalives_reflected: u64,
    /// TCP SYNs whose MSS was lowered.
    pub mss_clamped: u64,
    /// ICMP "fragmentation needed" errors generated for oversized DF packets.
    pub frag_needed_sent: u64,
    /// Sequenced packets accepted after a gap (lost or reordered predecessors).
    pub sequence_gaps: u64,
    /// Packets dropped, by reason.
    pub drops: DropCounters<DropReason>,
}

/// What to do with an inner packet handed to [`Tunnel::encapsulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Encap {
    /// Send this range (GRE header + inner packet) to the remote on the underlay.
    ToPeer(Range<usize>),
    /// Write this range (an ICMP error for the sender) back into the TUN.
    ToTun(Range<usize>),
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// What to do with an underlay packet handed to [`Tunnel::decapsulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Write this range (the inner packet) into the TUN.
    ToTun(Range<usize>),
    /// The peer's keepalive probe: send this range, a complete IPv4 packet addressed to
    /// the peer, natively (raw socket with the header included), not into the TUN.
    Reflect(Range<usize>),
    /// A reply to our keepalive; nothing to send.
    KeepaliveReply,
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// Link state changes for the driver (routes in, routes out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEvent {
    /// Keepalive replies returned: install the tunnel's routes.
    Up,
    /// `retries` probes went unanswered: withdraw the tunnel's routes.
    Down,
}

/// After this many packets "behind" the window, numbered consecutively among themselves,
/// we assume the peer restarted its sequence space (RFC 2890 has no signal for that) and
/// resynchronise.
///
/// Why a resync at all, and why this one: without it one forged packet far ahead (any
/// sender that knows the key can forge one: GRE has no authentication) would make every
/// genuine packet "behind" for up to 2^31 packets, and a restarted peer would be cut off as
/// long. Requiring a consecutive run means scattered replays or stray duplicates never add
/// up to a resync, and a resync can only move the window to where 64 consecutive numbers
/// just arrived. What it cannot stop (nothing in GRE can): an attacker who knows the key may
/// send 64 consecutive numbers of its own choosing, which gains it nothing it could not do
/// by injecting packets with the next numbers directly (RFC 2890 §3: sequence numbers are
/// not a security mechanism). Use IPsec or WireGuard underneath for replay protection.
const SEQUENCE_RESYNC_AFTER: u32 = 64;

/// RFC 2890 §2.2 receive state.
#[derive(Debug, Clone)]
struct SequenceWindow {
    last: u32,
    /// Length of the current run of consecutive "behind" numbers, and its last number.
    behind_run: u32,
    behind_last: u32,
}

impl SequenceWindow {
    const fn new() -> Self {
        // "The receiver initialises last delivered to 2^32 - 1" so that 0 is in sequence.
        Self {
            last: u32::MAX,
            behind_run: 0,
            behind_last: 0,
        }
    }

    /// Ok(true) in sequence, Ok(false) accepted after a gap, Err(()) discard.
    fn check(&mut self, seq: u32) -> Result<bool, ()> {
        let ahead = seq.wrapping_sub(self.last);
        if ahead == 0 || ahead > 1 << 31 {
            let continues = self.behind_run > 0 && seq == self.behind_last.wrapping_add(1);
            self.behind_run = if continues { self.behind_run + 1 } else { 1 };
            self.behind_last = seq;
            if self.behind_run >= SEQUENCE_RESYNC_AFTER {
                self.behind_run = 0;
                self.last = seq;
            }
            return Err(());
        }
        self.behind_run = 0;
        self.last = seq;
        // Gapped packets are delivered at once: buffering them (RFC 2890's optional
        // MAX_PERFLOW_BUFFER) would only add latency for the IP traffic we carry.
        Ok(ahead == 1)
    }
}

/// One GRE tunnel: encapsulation, decapsulation checks, keepalive state and counters.
#[derive(Debug, Clone)]
pub struct Tunnel {
    config: TunnelConfig,
    tx_sequence: u32,
    rx_window: SequenceWindow,
    keepalive: Option<GreKeepalive>,
    probe_pending: bool,
    /// The marker of the probe last sent, until its reply arrives.
    outstanding: Option<u64>,
    /// Secret input of the probe markers (random per tunnel) and probes sent so far.
    marker_secret: u64,
    probes: u64,
    reflect: TokenBucket,
    events: VecDeque<TunnelEvent>,
    down_since: Option<Instant>,
    counters: Counters,
}

impl Tunnel {
    /// Creates the tunnel; with keepalives, the first probe is due at `now`.
    pub fn new(now: Instant, config: TunnelConfig) -> Self {
        let keepalive = config.keepalive.map(|k| GreKeepalive::new(now, k));
        Self {
            config,
            tx_sequence: 0,
            rx_window: SequenceWindow::new(),
            keepalive,
            probe_pending: false,
            outstanding: None,
            marker_secret: random_secret(),
            probes: 0,
            reflect: TokenBucket::new(now, REFLECT_RATE, REFLECT_BURST),
            events: VecDeque::new(),
            down_since: None,
            counters: Counters::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counters the driver updates for drops it detects itself.
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Keepalive state, when keepalives are on.
    pub fn keepalive(&self) -> Option<&GreKeepalive> {
        self.keepalive.as_ref()
    }

    /// Whether the tunnel is up (always, without keepalives).
    pub fn is_up(&self) -> bool {
        self.keepalive.as_ref().is_none_or(GreKeepalive::is_up)
    }

    /// When the tunnel last went down, while it is down.
    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    /// Applies a new configuration to the running tunnel, keeping its counters, sequence
    /// numbers and link state.
    ///
    /// Live: `mtu` (and with it the MSS clamp and the frag-needed threshold) and
    /// `keepalive` (period, retries, on/off). Turning keepalives off brings a down tunnel
    /// back up (a [`TunnelEvent::Up`] is queued so the driver reinstalls its routes).
    ///
    /// [`Reconfigured::NeedsRestart`], naming the field, when anything else differs (name,
    /// endpoints, key, sequence, checksum, underlay, inner address): those need a new
    /// socket, TUN device or sequence space. Nothing is changed then.
    pub fn reconfigure(&mut self, now: Instant, new: TunnelConfig) -> Reconfigured {
        let old = &self.config;
        let fixed: [(&'static str, bool); 8] = [
            ("name", old.name == new.name),
            ("local", old.local == new.local),
            ("remote", old.remote == new.remote),
            ("address", old.inner_address == new.inner_address),
            ("key", old.key == new.key),
            ("sequence", old.sequence == new.sequence),
            ("checksum", old.checksum == new.checksum),
            ("encap", old.underlay == new.underlay),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
            return Reconfigured::restart(format!(
                "changing `{field}` needs the tunnel to be restarted"
            ));
        }
        match (self.keepalive.as_mut(), new.keepalive) {
            (Some(ka), Some(k)) => ka.set_config(now, k),
            (None, Some(k)) => self.keepalive = Some(GreKeepalive::new(now, k)),
            (Some(_), None) => {
                let was_up = self.is_up();
                self.keepalive = None;
                self.probe_pending = false;
                self.outstanding = None;
                if !was_up {
                    self.down_since = None;
                    self.events.push_back(TunnelEvent::Up);
                }
            }
            (None, None) => {}
        }
        self.config = new;
        Reconfigured::Live
    }

    /// Encapsulates the inner packet `buf[inner]` in place.
    ///
    /// The GRE header is written into the `HEADROOM` bytes in front of it. TCP SYNs get
    /// their MSS clamped to the tunnel MTU; an IPv4 packet with DF set that exceeds the
    /// tunnel MTU is turned into an ICMP "fragmentation needed" for its sender.
    pub fn encapsulate(&mut self, buf: &mut [u8], inner: Range<usize>) -> Encap {
        let Some(packet) = buf.get_mut(inner.clone()) else {
            return self.drop(DropReason::NotIp);
        };
        let protocol = match packet.first().map(|b| b >> 4) {
            Some(4) if packet.len() >= 20 => PROTO_IPV4,
            Some(6) if packet.len() >= 40 => PROTO_IPV6,
            _ => return self.drop(DropReason::NotIp),
        };
        let mtu = usize::from(self.config.mtu);
        if packet.len() > mtu {
            if protocol == PROTO_IPV4 && packet.get(6).is_some_and(|f| f & 0x40 != 0) {
                return self.frag_needed(buf, inner);
            }
            if protocol == PROTO_IPV6 {
                // IPv6 routers never fragment; the kernel sends Packet Too Big for
                // oversized packets before they reach the TUN, whose MTU is ours.
                return self.drop(DropReason::TooBig);
            }
            // DF clear: the outer packet is fragmented by the underlay (RFC 4459 "outer
            // fragmentation"), which the peer's kernel reassembles before we see it.
        }
        if self.clamp(packet, protocol) {
            self.counters.mss_clamped += 1;
        }
        let len = inner.len();
        match self.encapsulate_raw(buf, inner, protocol) {
            Some(range) => {
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64;
                Encap::ToPeer(range)
            }
            None => self.drop(DropReason::NoHeadroom),
        }
    }

    fn encapsulate_raw(
        &mut self,
        buf: &mut [u8],
        inner: Range<usize>,
        protocol: u16,
    ) -> Option<Range<usize>> {
        let mut repr = self.config.gre_repr(protocol);
        let start = inner.start.checked_sub(repr.header_len())?;
        if let Some(seq) = repr.sequence.as_mut() {
            *seq = self.tx_sequence;
            self.tx_sequence = self.tx_sequence.wrapping_add(1);
        }
        let packet = buf.get_mut(start..inner.end)?;
        if packet.len() < repr.header_len() {
            return None;
        }
        repr.emit(packet);
        Some(start..inner.end)
    }

    /// Decapsulates `buf`, a GRE header and payload whose outer source was `source`.
    ///
    /// Checks, in order: header well-formed, source is the remote, key matches, protocol
    /// known, sequence in order (when enabled), inner packet well-formed.
    pub fn decapsulate(&mut self, now: Instant, source: Ipv4Addr, buf: &mut [u8]) -> Verdict {
        let (repr, header_len) = match GrePacket::new_checked(&*buf)
            .and_then(|p| GreRepr::parse(&p).map(|r| (r, p.header_len())))
        {
            Ok(parsed) => parsed,
            Err(e) => return self.drop_rx(DropReason::from(e), source),
        };
        if source != self.config.remote {
            return self.drop_rx(DropReason::WrongSource, source);
        }
        if repr.key != self.config.key {
            return self.drop_rx(DropReason::WrongKey, source);
        }
        match repr.protocol {
            PROTO_IPV4 | PROTO_IPV6 => {}
            PROTO_KEEPALIVE => {
                let marker = buf.get(header_len..).and_then(reply_marker);
                return self.keepalive_reply(now, marker, source);
            }
            _ => return self.drop_rx(DropReason::UnknownProtocol, source),
        }
        if self.config.sequence {
            let Some(seq) = repr.sequence else {
                return self.drop_rx(DropReason::MissingSequence, source);
            };
            match self.rx_window.check(seq) {
                Ok(true) => {}
                Ok(false) => self.counters.sequence_gaps += 1,
                Err(()) => return self.drop_rx(DropReason::OutOfSequence, source),
            }
        }
        let Some(inner_len) = buf
            .get(header_len..)
            .and_then(|p| inner_len(p, repr.protocol))
        else {
            return self.drop_rx(DropReason::BadInner, source);
        };
        // Trailing bytes past the IP length (underlay padding) are not part of the packet.
        let inner = header_len..header_len + inner_len;
        let Some(packet) = buf.get_mut(inner.clone()) else {
            return self.drop_rx(DropReason::BadInner, source);
        };
        if repr.protocol == PROTO_IPV4 && self.is_to_peer(packet) {
            if !self.is_bare_probe(packet) {
                return self.drop_rx(DropReason::NotAProbe, source);
            }
            if !self.reflect.take(now) {
                return self.drop_rx(DropReason::ReflectLimited, source);
            }
            self.counters.keepalives_reflected += 1;
            return Verdict::Reflect(inner);
        }
        if self.clamp(packet, repr.protocol) {
            self.counters.mss_clamped += 1;
        }
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += inner.len() as u64;
        Verdict::ToTun(inner)
    }

    /// A packet from us to the peer carrying the tunnel's own encapsulation (IP protocol
    /// 47, or UDP to 4754): what a peer's keepalive probe decapsulates to. Such a packet is
    /// either reflected (when [`Tunnel::is_bare_probe`]) or dropped, never routed.
    fn is_to_peer(&self, ip: &[u8]) -> bool {
        let Some(h) = ip.first_chunk::<20>().map(Ipv4View::new_unchecked) else {
            return false;
        };
        let ihl = h.ihl();
        let to_peer = h.dst() == self.config.remote;
        let from_us = h.src() == self.config.local;
        let carries_tunnel = match self.config.underlay {
            Underlay::Gre => h.protocol() == 47,
            Underlay::Udp => {
                h.protocol() == 17
                    && ip.get(ihl + 2..ihl + 4) == Some(&GRE_IN_UDP_PORT.to_be_bytes()[..])
            }
        };
        to_peer && from_us && carries_tunnel
    }

    /// Finding 6.3: only a bare keepalive goes back out with our source address: no IP
    /// options, not a fragment, an inner GRE header that parses with protocol 0 and this
    /// tunnel's key, and at most [`MAX_REFLECTED_PAYLOAD`] bytes after it. So the peer
    /// receives nothing from us an attacker chose beyond what a probe holds.
    fn is_bare_probe(&self, ip: &[u8]) -> bool {
        let Some(h) = ip.first_chunk::<20>().map(Ipv4View::new_unchecked) else {
            return false;
        };
        if h.version() != 4 || h.ihl() != 20 || h.is_fragment() {
            return false;
        }
        let gre_at = match self.config.underlay {
            Underlay::Gre => 20,
            Underlay::Udp => 28,
        };
        let Some(gre) = ip.get(gre_at..) else {
            return false;
        };
        GrePacket::new_checked(gre)
            .ok()
            .and_then(|p| Some((GreRepr::parse(&p).ok()?, p.payload().len())))
            .is_some_and(|(repr, payload)| {
                repr.protocol == PROTO_KEEPALIVE
                    && repr.key == self.config.key
                    && repr.sequence.is_none()
                    && payload <= MAX_REFLECTED_PAYLOAD
            })
    }

    /// Finding 6.2: a reply counts only while a probe is outstanding and only with that
    /// probe's marker; it is then no longer outstanding (a duplicate does not count twice).
    fn keepalive_reply(&mut self, now: Instant, marker: Option<u64>, source: Ipv4Addr) -> Verdict {
        if marker.is_none() || self.outstanding != marker {
            return self.drop_rx(DropReason::UnexpectedKeepalive, source);
        }
        self.outstanding = None;
        self.counters.keepalive_replies += 1;
        if let Some(ka) = self.keepalive.as_mut()
            && ka.handle_reply(now)
        {
            self.down_since = None;
            // The peer may have restarted meanwhile and begun its sequence at 0 again; only
            // a reply bearing our marker gets here, so a spoofer cannot reset the window.
            self.rx_window = SequenceWindow::new();
            self.events.push_back(TunnelEvent::Up);
        }
        Verdict::KeepaliveReply
    }

    /// When [`Tunnel::handle_timeout`] wants to be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keepalive.as_ref().map(GreKeepalive::poll_timeout)
    }

    /// Advances keepalive timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(ka) = self.keepalive.as_mut() else {
            return;
        };
        match ka.handle_timeout(now) {
            KeepaliveTick::Idle => {}
            KeepaliveTick::Probe => self.probe_pending = true,
            KeepaliveTick::WentDown => {
                self.probe_pending = true;
                self.down_since = Some(now);
                self.events.push_back(TunnelEvent::Down);
            }
        }
    }

    /// Writes a due keepalive probe into `buf` (at least [`PROBE_BUF_LEN`] bytes) and
    /// returns its range: GRE header + inner packet, to send to the remote like any
    /// encapsulated packet.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Range<usize>> {
        if !self.probe_pending || buf.len() < PROBE_BUF_LEN {
            return None;
        }
        self.probe_pending = false;
        self.probes = self.probes.wrapping_add(1);
        let marker = probe_marker(self.marker_secret, self.probes);
        let inner_len = emit_probe_inner(
            buf.get_mut(HEADROOM..)?,
            self.config.local,
            self.config.remote,
            self.config.key,
            self.config.underlay == Underlay::Udp,
            marker,
        )?;
        let range = self.encapsulate_raw(buf, HEADROOM..HEADROOM + inner_len, PROTO_IPV4)?;
        // Only the latest probe is answerable: a reply to an earlier one is late.
        self.outstanding = Some(marker);
        self.counters.keepalives_sent += 1;
        Some(range)
    }

    /// The next link state change, if any.
    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    fn clamp(&self, packet: &mut [u8], protocol: u16) -> bool {
        let (tcp_at, max_mss) = if protocol == PROTO_IPV4 {
            let Some(ip) = packet.first_chunk::<20>().map(Ipv4View::new_unchecked) else {
                return false;
            };
            let ihl = ip.ihl();
            if ip.protocol() != 6 || ip.frag_offset() != 0 || ihl < 20 {
                return false;
            }
            (ihl, self.config.mtu.saturating_sub(40))
        } else {
            // Only a TCP header right after the fixed header; SYNs carry no extension
            // headers in practice, and anything else is passed unmodified.
            if packet.first_chunk::<40>().is_none_or(|ip| ip[6] != 6) {
                return false;
            }
            (40, self.config.mtu.saturating_sub(60))
        };
        let Some(tcp) = packet.get_mut(tcp_at..) else {
            return false;
        };
        matches!(clamp_mss(tcp, max_mss), MssOutcome::Clamped(..))
    }

    /// Rewrites the oversized IPv4 packet `buf[inner]` in place into an ICMP type 3 code 4
    /// error carrying the tunnel MTU, addressed to the packet's source (RFC 1191, RFC 2003 §5).
    fn frag_needed(&mut self, buf: &mut [u8], inner: Range<usize>) -> Encap {
        let Some(orig) = buf.get(inner.clone()) else {
            return self.drop(DropReason::TooBig);
        };
        let Some(ip) = orig.first_chunk::<20>().map(Ipv4View::new_unchecked) else {
            return self.drop(DropReason::TooBig);
        };
        let ihl = ip.ihl();
        let fragment_offset = ip.frag_offset();
        // Never an error about an ICMP error (RFC 1122 §3.2.2) or a non-first fragment.
        let icmp_error = ip.protocol() == 1
            && ihl >= 20
            && orig
                .get(ihl)
                .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
        if ihl < 20 || ihl > orig.len() || fragment_offset != 0 || icmp_error {
            return self.drop(DropReason::TooBig);
        }
        let sender = ip.src();
        let quoted = (ihl + 8).min(orig.len());
        let total = 28 + quoted;
        // Every range below is inside buf[at..at + total], checked here once.
        if inner.start + total > buf.len() {
            return self.drop(DropReason::TooBig);
        }
        let from = self.config.inner_address.unwrap_or(self.config.local);
        let at = inner.start;
        buf.copy_within(at..at + quoted, at + 28);
        // A fresh header: every field written, then the checksum computed over them.
        let ip = &mut buf[at..at + 20];
        ip[field::VER_IHL] = 0x45;
        ip[field::TOS] = 0xc0;
        ip[field::LENGTH].copy_from_slice(&(total as u16).to_be_bytes());
        ip[field::IDENT.start..field::FLG_OFF.end].fill(0);
        ip[field::TTL] = 64;
        ip[field::PROTOCOL] = 1;
        ip[field::SRC].copy_from_slice(&from.octets());
        ip[field::DST].copy_from_slice(&sender.octets());
        Ipv4View::new_unchecked(ip).fill_checksum();
        let icmp = &mut buf[at + 20..at + total];
        icmp[0] = 3;
        icmp[1] = 4;
        icmp[2..6].fill(0);
        icmp[6..8].copy_from_slice(&self.config.mtu.to_be_bytes());
        let c = checksum(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        self.counters.frag_needed_sent += 1;
        Encap::ToTun(at..at + total)
    }

    fn drop(&mut self, reason: DropReason) -> Encap {
        self.counters.drops.count(reason);
        tracing::debug!(tunnel = %self.config.name, reason = reason.as_str(), "dropped inner packet");
        Encap::Drop(reason)
    }

    fn drop_rx(&mut self, reason: DropReason, source: Ipv4Addr) -> Verdict {
        self.counters.drops.count(reason);
        tracing::debug!(tunnel = %self.config.name, %source, reason = reason.as_str(), "dropped GRE packet");
        Verdict::Drop(reason)
    }
}

/// A per-tunnel secret for the probe markers, from the OS randomness std seeds its hash
/// maps with (no I/O of our own: the core stays sans-IO).
fn random_secret() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x6772_655f_6b61_u64)
}

/// The marker of probe number `n`: SipHash of the secret and the number, so an observer of
/// some markers cannot tell the next one.
fn probe_marker(secret: u64, n: u64) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    (secret, n).hash(&mut h);
    h.finish()
}

/// The length of a well-formed inner packet at the start of `packet` (of the version the
/// GRE protocol type announces), or `None` when it is not one: IPv4 with a header length of
/// at least 20 and a total length between header and buffer; IPv6 with a payload length
/// that fits; and, for an unfragmented TCP segment right after the IP header, a complete
/// fixed TCP header with a data offset inside the segment. Everything past the decapsulation
/// (MSS clamp, coalescer, kernel) may rely on this.
fn inner_len(packet: &[u8], protocol: u16) -> Option<usize> {
    let (len, tcp_at, tcp) = if protocol == PROTO_IPV4 {
        let ip = Ipv4View::new_checked(packet).ok()?;
        (
            ip.total_len(),
            ip.ihl(),
            ip.protocol() == 6 && ip.frag_offset() == 0,
        )
    } else {
        let ip = packet.first_chunk::<40>()?;
        let total = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        if ip[0] >> 4 != 6 || total > packet.len() {
            return None;
        }
        (total, 40, ip[6] == 6)
    };
    if tcp {
        let segment = packet.get(tcp_at..len)?;
        let doff = usize::from(segment.first_chunk::<20>()?[12] >> 4) * 4;
        if doff < 20 || doff > segment.len() {
            return None;
        }
    }
    Some(len)
}

/// (remote, key) of one tunnel.
type DemuxEntry = (Ipv4Addr, Option<u32>);

/// Finds which of several tunnels sharing one underlay address a packet belongs to.
///
/// Tunnels are told apart by (remote, key), as RFC 2890 §2.1 says. A packet matching no
/// tunnel exactly is attributed to the tunnel most likely meant — same remote (so the
/// key is wrong), else same key (so the source is wrong), else the first tunnel — so that
/// its drop is counted where an operator looks for it.
#[derive(Debug, Clone, Default)]
pub struct Demux {
    entries: Vec<DemuxEntry>,
}

impl Demux {
    /// Builds the table; tunnel `i` is the `i`-th (remote, key) pair.
    pub fn new(entries: impl IntoIterator<Item = (Ipv4Addr, Option<u32>)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// The index of the tunnel for a packet from `source` starting with GRE bytes `gre`;
    /// `None` only when there are no tunnels.
    pub fn lookup(&self, source: Ipv4Addr, gre: &[u8]) -> Option<usize> {
        let key = GrePacket::new_checked(gre).ok().and_then(|p| p.key());
        let find = |matches: fn(&DemuxEntry, Ipv4Addr, Option<u32>) -> bool| {
            self.entries.iter().position(|e| matches(e, source, key))
        };
        find(|e, s, k| *e == (s, k))
            .or_else(|| find(|e, s, _| e.0 == s))
            .or_else(|| find(|e, _, k| e.1 == k))
            .or_else(|| (!self.entries.is_empty()).then_some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;
    use netutil::bytes::get16;
    use proptest::prelude::*;

    const HQ: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const BR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn pair(mut f: impl FnMut(&mut TunnelConfig)) -> (Tunnel, Tunnel) {
        let t0 = testkit::epoch();
        let mut a = TunnelConfig::new("gre-br", HQ, BR);
        let mut b = TunnelConfig::new("gre-hq", BR, HQ);
        f(&mut a);
        f(&mut b);
        (Tunnel::new(t0, a), Tunnel::new(t0, b))
    }

    /// An IPv4 packet 192.168.101.10 -> 192.168.102.10 of `len` bytes with `proto`.
    fn ipv4(len: usize, proto: u8, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[192, 168, 101, 10]);
        p[16..20].copy_from_slice(&[192, 168, 102, 10]);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn with_headroom(inner: &[u8]) -> (Vec<u8>, Range<usize>) {
        let mut buf = vec![0u8; HEADROOM];
        buf.extend_from_slice(inner);
        (buf, HEADROOM..HEADROOM + inner.len())
    }

    /// Encapsulates on `a`, decapsulates on `b`, returns b's verdict and the buffer.
    fn carry(a: &mut Tunnel, b: &mut Tunnel, inner: &[u8]) -> (Verdict, Vec<u8>) {
        let (mut buf, range) = with_headroom(inner);
        let Encap::ToPeer(out) = a.encapsulate(&mut buf, range) else {
            panic!("not encapsulated")
        };
        let mut wire = buf[out].to_vec();
        let src = a.config().local;
        (b.decapsulate(testkit::epoch(), src, &mut wire), wire)
    }

    #[test]
    fn reconfigure_applies_mtu_and_keepalive_and_refuses_identity_changes() {
        let t0 = testkit::epoch();
        let (mut a, _) = pair(|_| {});
        let mut new = a.config().clone();
        new.mtu = 1400;
        new.keepalive = Some(KeepaliveConfig {
            interval: Duration::from_secs(1),
            retries: 2,
        });
        assert_eq!(a.reconfigure(t0, new.clone()), Reconfigured::Live);
        assert_eq!(a.config().mtu, 1400);
        assert_eq!(a.poll_timeout(), Some(t0));
        // The new MTU is what DF packets are checked against now.
        let (mut buf, range) = with_headroom(&ipv4(1450, 17, true));
        assert!(matches!(a.encapsulate(&mut buf, range), Encap::ToTun(_)));

        // Two unanswered probes: down; turning keepalives off brings it back up.
        for s in 0..4 {
            a.handle_timeout(t0 + Duration::from_secs(s));
        }
        assert!(!a.is_up());
        assert_eq!(a.poll_event(), Some(TunnelEvent::Down));
        new.keepalive = None;
        assert_eq!(
            a.reconfigure(t0 + Duration::from_secs(5), new.clone()),
            Reconfigured::Live
        );
        assert!(a.is_up());
        assert_eq!(a.poll_event(), Some(TunnelEvent::Up));
        assert_eq!(a.poll_timeout(), None);

        let before = a.config().clone();
        for (field, change) in [
            (
                "key",
                (|c: &mut TunnelConfig| c.key = Some(7)) as fn(&mut TunnelConfig),
            ),
            ("remote", |c| c.remote = Ipv4Addr::new(203, 0, 113, 9)),
            ("encap", |c| c.underlay = Underlay::Udp),
            ("sequence", |c| c.sequence = true),
        ] {
            let mut c = before.clone();
            change(&mut c);
            assert_eq!(
                a.reconfigure(t0, c),
                Reconfigured::restart(format!(
                    "changing `{field}` needs the tunnel to be restarted"
                ))
            );
            assert_eq!(a.config(), &before);
        }
    }

    #[test]
    fn longer_keepalive_period_keeps_misses_and_an_earlier_due_probe() {
        let t0 = testkit::epoch();
        let (mut a, _) = pair(|c| {
            c.keepalive = Some(KeepaliveConfig {
                interval: Duration::from_secs(1),
                retries: 3,
            });
        });
        a.handle_timeout(t0);
        a.handle_timeout(t0 + Duration::from_secs(1));
        let mut new = a.config().clone();
        new.keepalive = Some(KeepaliveConfig {
            interval: Duration::from_secs(30),
            retries: 3,
        });
        assert_eq!(
            a.reconfigure(t0 + Duration::from_millis(1500), new),
            Reconfigured::Live
        );
        let ka = a.keepalive().unwrap();
        assert_eq!(ka.misses(), 2);
        assert_eq!(a.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn carries_ipv4_with_every_option() {
        let (mut a, mut b) = pair(|c| {
            c.key = Some(42);
            c.sequence = true;
            c.checksum = true;
        });
        let inner = ipv4(100, 17, false);
        for _ in 0..3 {
            let (v, wire) = carry(&mut a, &mut b, &inner);
            let Verdict::ToTun(r) = v else {
                panic!("{v:?}")
            };
            assert_eq!(&wire[r], &inner[..]);
        }
        assert_eq!(a.counters().tx_packets, 3);
        assert_eq!(b.counters().rx_packets, 3);
        assert_eq!(b.counters().rx_bytes, 300);
        assert_eq!(b.counters().sequence_gaps, 0);
    }

    #[test]
    fn wrong_key_and_source_are_dropped_and_counted() {
        let t0 = testkit::epoch();
        let (mut a, mut b) = pair(|c| c.key = Some(42));
        let (mut buf, range) = with_headroom(&ipv4(60, 17, false));
        let Encap::ToPeer(out) = a.encapsulate(&mut buf, range) else {
            panic!()
        };
        let wire = buf[out].to_vec();
        let mut w = wire.clone();
        assert_eq!(
            b.decapsulate(t0, Ipv4Addr::new(203, 0, 113, 9), &mut w),
            Verdict::Drop(DropReason::WrongSource)
        );
        let mut w = wire.clone();
        w[7] = 43; // key 42 -> 43
        assert_eq!(
            b.decapsulate(t0, HQ, &mut w),
            Verdict::Drop(DropReason::WrongKey)
        );
        // A keyless packet into a keyed tunnel.
        let (mut plain, _) = pair(|_| {});
        let (mut buf, range) = with_headroom(&ipv4(60, 17, false));
        let Encap::ToPeer(out) = plain.encapsulate(&mut buf, range) else {
            panic!()
        };
        assert_eq!(
            b.decapsulate(t0, HQ, &mut buf[out]),
            Verdict::Drop(DropReason::WrongKey)
        );
        assert_eq!(b.counters().drops.get(DropReason::WrongSource), 1);
        assert_eq!(b.counters().drops.get(DropReason::WrongKey), 2);
        assert_eq!(b.counters().rx_packets, 0);
    }

    #[test]
    fn malformed_packets_are_counted() {
        let t0 = testkit::epoch();
        let (_, mut b) = pair(|_| {});
        let cases: [(&[u8], DropReason); 5] = [
            (&[0x00, 0x00, 0x08], DropReason::Truncated),
            (&[0x00, 0x01, 0x08, 0x00, 0x45], DropReason::BadVersion),
            (
                &[0x80, 0x00, 0x08, 0x00, 0, 0, 0, 0, 0x45],
                DropReason::BadChecksum,
            ),
            (&[0x00, 0x00, 0x65, 0x58, 0], DropReason::UnknownProtocol),
            (
                &[0x00, 0x00, 0x08, 0x00, 0x60, 0, 0, 0],
                DropReason::BadInner,
            ),
        ];
        for (bytes, reason) in cases {
            let mut w = bytes.to_vec();
            assert_eq!(b.decapsulate(t0, HQ, &mut w), Verdict::Drop(reason));
            assert_eq!(b.counters().drops.get(reason), 1);
        }
    }

    /// Finding 1.1 at the decapsulation: inner packets whose headers are shorter than they
    /// announce are dropped as `bad_inner` before the coalescer or the kernel sees them.
    #[test]
    fn malformed_inner_packets_are_dropped_as_bad_inner() {
        let t0 = testkit::epoch();
        let (_, mut b) = pair(|_| {});
        let wire = |proto: [u8; 2], inner: &[u8]| {
            let mut w = vec![0, 0, proto[0], proto[1]];
            w.extend_from_slice(inner);
            w
        };
        let tcp_v4 = |len: usize, total: usize, ihl: u8, doff: u8| {
            let mut p = ipv4(len, 6, false);
            p[0] = 0x40 | ihl;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            if len > 32 {
                p[32] = doff << 4;
            }
            p
        };
        let tcp_v6 = |len: usize, payload: u16, doff: u8| {
            let mut p = vec![0u8; len];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&payload.to_be_bytes());
            p[6] = 6;
            if len > 52 {
                p[52] = doff << 4;
            }
            p
        };
        let review = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/gre_decapsulate/review_1_1_33byte_tcp"
        ))
        .unwrap();
        let bad: Vec<Vec<u8>> = vec![
            review[2..].to_vec(),                    // the review's 33-byte packet
            wire([8, 0], &tcp_v4(33, 33, 5, 5)),     // 13-byte TCP header
            wire([8, 0], &tcp_v4(39, 39, 5, 5)),     // 19-byte TCP header
            wire([8, 0], &tcp_v4(60, 60, 5, 4)),     // data offset below 20
            wire([8, 0], &tcp_v4(60, 60, 5, 15)),    // data offset past the end
            wire([8, 0], &tcp_v4(60, 60, 4, 5)),     // IHL 4
            wire([8, 0], &tcp_v4(60, 60, 15, 5)),    // IHL 15 past the total length
            wire([8, 0], &tcp_v4(60, 61, 5, 5)),     // total length past the buffer
            wire([8, 0], &tcp_v4(60, 10, 5, 5)),     // total length below the header
            wire([0x86, 0xdd], &tcp_v6(53, 13, 5)),  // IPv6, 13-byte TCP header
            wire([0x86, 0xdd], &tcp_v6(39, 0, 5)),   // truncated IPv6 header
            wire([0x86, 0xdd], &tcp_v6(80, 41, 5)),  // payload length past the buffer
            wire([0x86, 0xdd], &tcp_v6(80, 40, 15)), // data offset past the end
        ];
        for (i, w) in bad.iter().enumerate() {
            assert_eq!(
                b.decapsulate(t0, HQ, &mut w.clone()),
                Verdict::Drop(DropReason::BadInner),
                "case {i}"
            );
        }
        assert_eq!(
            b.counters().drops.get(DropReason::BadInner),
            bad.len() as u64
        );
        // Underlay padding after a good packet is cut off, not delivered.
        let mut padded = wire([8, 0], &ipv4(40, 17, false));
        padded.extend_from_slice(&[0xee; 6]);
        assert_eq!(b.decapsulate(t0, HQ, &mut padded), Verdict::ToTun(4..44));
    }

    #[test]
    fn sequence_drops_duplicates_and_reordering() {
        let (mut a, mut b) = pair(|c| c.sequence = true);
        let inner = ipv4(40, 17, false);
        let mut wires = Vec::new();
        for _ in 0..4 {
            let (mut buf, range) = with_headroom(&inner);
            let Encap::ToPeer(out) = a.encapsulate(&mut buf, range) else {
                panic!()
            };
            wires.push(buf[out].to_vec());
        }
        let t0 = testkit::epoch();
        let mut deliver = |i: usize| b.decapsulate(t0, HQ, &mut wires[i].clone());
        assert!(matches!(deliver(0), Verdict::ToTun(_)));
        assert_eq!(deliver(0), Verdict::Drop(DropReason::OutOfSequence));
        assert!(matches!(deliver(2), Verdict::ToTun(_))); // gap: 1 lost
        assert_eq!(deliver(1), Verdict::Drop(DropReason::OutOfSequence));
        assert!(matches!(deliver(3), Verdict::ToTun(_)));
        assert_eq!(b.counters().sequence_gaps, 1);
        assert_eq!(b.counters().drops.get(DropReason::OutOfSequence), 2);
    }

    #[test]
    fn sequence_resyncs_after_peer_restart() {
        let mut w = SequenceWindow::new();
        for s in 0..1000 {
            assert_eq!(w.check(s), Ok(true));
        }
        // Peer restarted at 0: dropped for a bounded run, then accepted again.
        let mut accepted_at = None;
        for s in 0..200u32 {
            if w.check(s).is_ok() {
                accepted_at = Some(s);
                break;
            }
        }
        assert_eq!(accepted_at, Some(SEQUENCE_RESYNC_AFTER));
    }

    #[test]
    fn syn_mss_is_clamped_both_ways() {
        let (mut a, mut b) = pair(|_| {});
        let mut syn = ipv4(44, 6, true);
        syn[20 + 12] = 6 << 4; // data offset 24
        syn[20 + 13] = 0x02; // SYN
        syn[40..44].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        let (v, wire) = carry(&mut a, &mut b, &syn);
        let Verdict::ToTun(r) = v else { panic!() };
        assert_eq!(get16(&wire[r], 42), 1476 - 40);
        assert_eq!(a.counters().mss_clamped, 1);
        // The receiving end clamps too, whatever a (misconfigured) sender did.
        let mut wide = TunnelConfig::new("wide", HQ, BR);
        wide.mtu = 1500;
        let mut wide = Tunnel::new(testkit::epoch(), wide);
        let (v, wire) = carry(&mut wide, &mut b, &syn);
        let Verdict::ToTun(r) = v else { panic!() };
        assert_eq!(get16(&wire[r], 42), 1436);
        assert_eq!(wide.counters().mss_clamped, 0);
    }

    #[test]
    fn oversized_df_packet_becomes_frag_needed() {
        let (mut a, _) = pair(|c| c.inner_address = Some(Ipv4Addr::new(172, 16, 0, 1)));
        let big = ipv4(1500, 6, true);
        let (mut buf, range) = with_headroom(&big);
        let Encap::ToTun(r) = a.encapsulate(&mut buf, range) else {
            panic!()
        };
        let icmp = &buf[r];
        let ip = etherparse::Ipv4HeaderSlice::from_slice(icmp).unwrap();
        assert_eq!(ip.destination_addr(), Ipv4Addr::new(192, 168, 101, 10));
        assert_eq!(ip.source_addr(), Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
        assert_eq!(icmp.len(), 20 + 8 + 28);
        assert_eq!((icmp[20], icmp[21]), (3, 4));
        assert_eq!(get16(icmp, 26), 1476);
        assert_eq!(checksum(&icmp[20..]), 0);
        assert_eq!(&icmp[28..48], &big[..20]);
        assert_eq!(a.counters().frag_needed_sent, 1);
        // Without DF it is sent and fragmented by the underlay.
        let (mut buf, range) = with_headroom(&ipv4(1500, 6, false));
        assert!(matches!(a.encapsulate(&mut buf, range), Encap::ToPeer(_)));
    }

    #[test]
    fn keepalive_probe_is_reflected_by_peer_and_recognised() {
        let t0 = testkit::epoch();
        let (mut a, mut b) = pair(|c| {
            c.key = Some(7);
            c.keepalive = Some(KeepaliveConfig {
                interval: Duration::from_secs(1),
                retries: 3,
            });
        });
        a.handle_timeout(t0);
        let mut buf = [0u8; 128];
        let probe = a.poll_transmit(&mut buf).unwrap();
        assert!(a.poll_transmit(&mut buf).is_none());
        let mut wire = buf[probe].to_vec();
        let Verdict::Reflect(r) = b.decapsulate(t0, HQ, &mut wire) else {
            panic!()
        };
        // The peer sends the inner packet natively; it reaches A as GRE from B.
        let reflected = &mut wire[r];
        let ip = etherparse::Ipv4HeaderSlice::from_slice(reflected).unwrap();
        assert_eq!((ip.source_addr(), ip.destination_addr()), (BR, HQ));
        assert_eq!(
            a.decapsulate(t0, BR, &mut reflected[20..]),
            Verdict::KeepaliveReply
        );
        assert_eq!(a.counters().keepalive_replies, 1);
        assert_eq!(b.counters().keepalives_reflected, 1);
        assert_eq!(b.counters().rx_packets, 0);
    }

    /// A keepalive reply as an attacker spoofing the peer would send it: GRE protocol 0
    /// with the key, and a guessed marker.
    fn spoofed_reply(key: Option<u32>, marker: Option<u64>) -> Vec<u8> {
        let mut w = match key {
            Some(k) => {
                let mut w = vec![0x20, 0, 0, 0];
                w.extend_from_slice(&k.to_be_bytes());
                w
            }
            None => vec![0, 0, 0, 0],
        };
        if let Some(m) = marker {
            w.extend_from_slice(&m.to_be_bytes());
        }
        w
    }

    /// Finding 6.2: replies count only for the outstanding probe and with its marker, so a
    /// spoofer neither keeps a dead tunnel up nor resets the sequence window.
    #[test]
    fn spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up() {
        let t0 = testkit::epoch();
        let (mut a, mut b) = pair(|c| {
            c.key = Some(7);
            c.sequence = true;
            c.keepalive = Some(KeepaliveConfig {
                interval: Duration::from_secs(1),
                retries: 3,
            });
        });
        // No probe outstanding yet: nothing is a reply.
        assert_eq!(
            a.decapsulate(t0, BR, &mut spoofed_reply(Some(7), Some(1))),
            Verdict::Drop(DropReason::UnexpectedKeepalive)
        );
        // A real exchange: the reflected probe is the reply, once.
        a.handle_timeout(t0);
        let mut buf = [0u8; PROBE_BUF_LEN];
        let probe = a.poll_transmit(&mut buf).unwrap();
        let mut wire = buf[probe].to_vec();
        let Verdict::Reflect(r) = b.decapsulate(t0, HQ, &mut wire) else {
            panic!()
        };
        let reply = wire[r.start + 20..r.end].to_vec();
        assert_eq!(
            a.decapsulate(t0, BR, &mut reply.clone()),
            Verdict::KeepaliveReply
        );
        assert_eq!(
            a.decapsulate(t0, BR, &mut reply.clone()),
            Verdict::Drop(DropReason::UnexpectedKeepalive),
            "a duplicate"
        );
        // The peer dies; a spoofer floods replies with guessed markers, Cisco-style
        // unmarked ones, and replays the last real one. The tunnel still goes down.
        let mut went_down = false;
        for s in 1..8u64 {
            let now = t0 + Duration::from_secs(s);
            a.handle_timeout(now);
            let _ = a.poll_transmit(&mut buf);
            for guess in 0..100 {
                let _ = a.decapsulate(now, BR, &mut spoofed_reply(Some(7), Some(guess)));
            }
            let _ = a.decapsulate(now, BR, &mut spoofed_reply(Some(7), None));
            let _ = a.decapsulate(now, BR, &mut reply.clone());
            went_down |= a.poll_event() == Some(TunnelEvent::Down);
        }
        assert!(went_down && !a.is_up());
        assert_eq!(a.counters().keepalive_replies, 1);
        assert!(a.counters().drops.get(DropReason::UnexpectedKeepalive) >= 7 * 102);
        // The window was never reset: an old sequence number is still behind.
        let mut seq5 = vec![0x30, 0, 8, 0, 0, 0, 0, 7, 0, 0, 0, 5];
        seq5.extend_from_slice(&ipv4(40, 17, false));
        let mut seq9 = seq5.clone();
        seq9[11] = 9;
        assert!(matches!(
            a.decapsulate(t0, BR, &mut seq9),
            Verdict::ToTun(_)
        ));
        for guess in 0..50 {
            let _ = a.decapsulate(t0, BR, &mut spoofed_reply(Some(7), Some(guess)));
        }
        assert_eq!(
            a.decapsulate(t0, BR, &mut seq5),
            Verdict::Drop(DropReason::OutOfSequence)
        );
    }

    #[test]
    fn sequence_on_drops_packets_without_a_sequence_number() {
        let t0 = testkit::epoch();
        let (_, mut b) = pair(|c| c.sequence = true);
        let mut plain = vec![0, 0, 8, 0];
        plain.extend_from_slice(&ipv4(40, 17, false));
        assert_eq!(
            b.decapsulate(t0, HQ, &mut plain),
            Verdict::Drop(DropReason::MissingSequence)
        );
        assert_eq!(b.counters().drops.get(DropReason::MissingSequence), 1);
    }

    /// The resync needs 64 consecutive numbers behind the window: scattered old numbers
    /// (replays, duplicates) never move it back, however many.
    #[test]
    fn scattered_old_sequence_numbers_never_resync() {
        let mut w = SequenceWindow::new();
        for s in 0..10_000 {
            assert_eq!(w.check(s), Ok(true));
        }
        for i in 0..10_000u32 {
            assert_eq!(w.check((i * 7919) % 5000), Err(()), "packet {i}");
        }
        assert_eq!(w.check(10_000), Ok(true), "the window stayed where it was");
    }

    /// Finding 6.3: only a bare keepalive is reflected, at most REFLECT_BURST at once and
    /// REFLECT_RATE a second; a Cisco probe (no marker) still is.
    #[test]
    fn only_bare_probes_are_reflected_and_at_a_bounded_rate() {
        let t0 = testkit::epoch();
        let (_, mut b) = pair(|c| c.key = Some(7));
        // What A's tunnel to B would carry: inner IPv4 HQ -> BR (from B's view: local BR,
        // remote HQ, so the probe is BR -> HQ) with a GRE keepalive inside.
        let probe = |gre_payload: &[u8], ihl: u8, protocol: u16, key: Option<u32>| {
            let mut inner = vec![0u8; 4 * usize::from(ihl)];
            inner[0] = 0x40 | ihl;
            inner[8] = 255;
            inner[9] = 47;
            inner[12..16].copy_from_slice(&BR.octets());
            inner[16..20].copy_from_slice(&HQ.octets());
            let mut gre = spoofed_reply(key, None);
            gre[2..4].copy_from_slice(&protocol.to_be_bytes());
            inner.extend_from_slice(&gre);
            inner.extend_from_slice(gre_payload);
            let total = inner.len() as u16;
            inner[2..4].copy_from_slice(&total.to_be_bytes());
            let mut w = spoofed_reply(Some(7), None);
            w[2..4].copy_from_slice(&PROTO_IPV4.to_be_bytes());
            w.extend_from_slice(&inner);
            w
        };
        let cisco = probe(&[], 5, PROTO_KEEPALIVE, Some(7));
        assert!(matches!(
            b.decapsulate(t0, HQ, &mut cisco.clone()),
            Verdict::Reflect(_)
        ));
        let refused = [
            probe(&[], 6, PROTO_KEEPALIVE, Some(7)),      // IP options
            probe(&[], 5, PROTO_IPV4, Some(7)),           // not a keepalive
            probe(&[0; 17], 5, PROTO_KEEPALIVE, Some(7)), // a payload of its own
            probe(&[], 5, PROTO_KEEPALIVE, Some(8)),      // another tunnel's key
            probe(&[], 5, PROTO_KEEPALIVE, None),
        ];
        for (i, p) in refused.iter().enumerate() {
            assert_eq!(
                b.decapsulate(t0, HQ, &mut p.clone()),
                Verdict::Drop(DropReason::NotAProbe),
                "case {i}"
            );
        }
        let reflected = (0..1000)
            .filter(|_| {
                matches!(
                    b.decapsulate(t0, HQ, &mut cisco.clone()),
                    Verdict::Reflect(_)
                )
            })
            .count();
        assert_eq!(reflected, REFLECT_BURST as usize - 1);
        let next_second = t0 + Duration::from_secs(1);
        let reflected = (0..1000)
            .filter(|_| {
                matches!(
                    b.decapsulate(next_second, HQ, &mut cisco.clone()),
                    Verdict::Reflect(_)
                )
            })
            .count();
        assert_eq!(reflected, REFLECT_RATE as usize);
        assert_eq!(
            b.counters().drops.get(DropReason::ReflectLimited),
            2000 - REFLECT_BURST as u64 + 1 - REFLECT_RATE as u64
        );
        assert_eq!(
            b.counters().keepalives_reflected,
            u64::from(REFLECT_BURST + REFLECT_RATE)
        );
        assert_eq!(b.counters().rx_packets, 0, "nothing of it reached the TUN");
    }

    /// One simulated second for `x`: its timer, its probe across the link, its events.
    fn step(
        x: &mut Tunnel,
        y: &mut Tunnel,
        now: Instant,
        link_up: bool,
        s: u64,
        events: &mut Vec<(u64, String, TunnelEvent)>,
    ) {
        if x.poll_timeout().is_some_and(|d| d <= now) {
            x.handle_timeout(now);
        }
        let mut buf = [0u8; 128];
        if let Some(p) = x.poll_transmit(&mut buf)
            && link_up
        {
            let src = x.config().local;
            let mut wire = buf[p].to_vec();
            if let Verdict::Reflect(r) = y.decapsulate(now, src, &mut wire) {
                let back = y.config().local;
                assert_eq!(
                    x.decapsulate(now, back, &mut wire[r.start + 20..r.end]),
                    Verdict::KeepaliveReply
                );
            }
        }
        while let Some(e) = x.poll_event() {
            events.push((s, x.config().name.clone(), e));
        }
    }

    /// Two tunnels in memory with a link that can be cut: the pair simulation of §2.6.
    #[test]
    fn keepalive_pair_goes_down_and_up_with_the_link() {
        let t0 = testkit::epoch();
        let (mut a, mut b) = pair(|c| {
            c.keepalive = Some(KeepaliveConfig {
                interval: Duration::from_secs(2),
                retries: 3,
            })
        });
        let mut events = Vec::new();
        for s in 0..40u64 {
            let now = t0 + Duration::from_secs(s);
            let link_up = !(10..20).contains(&s);
            step(&mut a, &mut b, now, link_up, s, &mut events);
            step(&mut b, &mut a, now, link_up, s, &mut events);
        }
        // Last reply before the cut at s=8; probes at 10,12,14 missed; down at 16.
        assert!(events.contains(&(16, "gre-br".into(), TunnelEvent::Down)));
        assert!(events.contains(&(20, "gre-br".into(), TunnelEvent::Up)));
        assert_eq!(events.len(), 4);
        assert!(a.is_up() && b.is_up());
    }

    #[test]
    fn no_headroom_is_a_drop_not_a_panic() {
        let (mut a, _) = pair(|c| c.key = Some(1));
        let mut buf = ipv4(60, 17, false);
        let len = buf.len();
        assert_eq!(
            a.encapsulate(&mut buf, 0..len),
            Encap::Drop(DropReason::NoHeadroom)
        );
        assert_eq!(
            a.encapsulate(&mut buf, 2..200),
            Encap::Drop(DropReason::NotIp)
        );
    }

    #[test]
    fn demux_by_remote_and_key() {
        let c = Ipv4Addr::new(198, 51, 100, 3);
        let d = Demux::new([(BR, Some(1)), (BR, Some(2)), (c, None)]);
        let keyed = |k: u32| {
            let mut g = vec![0x20, 0, 8, 0];
            g.extend_from_slice(&k.to_be_bytes());
            g
        };
        assert_eq!(d.lookup(BR, &keyed(2)), Some(1));
        assert_eq!(d.lookup(BR, &keyed(1)), Some(0));
        assert_eq!(d.lookup(c, &[0, 0, 8, 0]), Some(2));
        assert_eq!(d.lookup(BR, &keyed(9)), Some(0)); // wrong key on BR's first tunnel
        assert_eq!(d.lookup(HQ, &keyed(2)), Some(1)); // wrong source, key of tunnel 1
        assert_eq!(d.lookup(HQ, &[0xff]), Some(2)); // truncated, keyless like tunnel 2
        assert_eq!(Demux::default().lookup(HQ, &[]), None);
    }

    #[test]
    fn default_mtu_subtracts_overhead() {
        let mut c = TunnelConfig::new("t", HQ, BR);
        assert_eq!(c.default_mtu(1500), 1476);
        c.key = Some(1);
        c.sequence = true;
        c.checksum = true;
        assert_eq!(c.default_mtu(1500), 1464);
        c.underlay = Underlay::Udp;
        assert_eq!(c.default_mtu(1500), 1456);
    }

    proptest! {
        #[test]
        fn decapsulate_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80),
                                    key in any::<Option<u32>>(), seq in any::<bool>()) {
            let (_, mut b) = pair(|c| { c.key = key; c.sequence = seq; });
            let mut w = bytes;
            let _ = b.decapsulate(testkit::epoch(), HQ, &mut w);
        }

        #[test]
        fn encapsulate_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600),
                                    start in 0usize..40, mtu in 0u16..1600) {
            let (mut a, _) = pair(|c| c.mtu = mtu);
            let mut buf = vec![0u8; start];
            buf.extend_from_slice(&bytes);
            let len = buf.len();
            if let Encap::ToPeer(r) | Encap::ToTun(r) = a.encapsulate(&mut buf, start..len) {
                prop_assert!(r.end <= len);
            }
        }

        #[test]
        fn carried_packets_arrive_unchanged(len in 20usize..1400, proto in any::<u8>(),
                                            key in any::<Option<u32>>(), csum in any::<bool>(),
                                            seq in any::<bool>()) {
            // SYN clamping may rewrite TCP; keep to non-TCP here.
            let proto = if proto == 6 { 17 } else { proto };
            let (mut a, mut b) = pair(|c| { c.key = key; c.checksum = csum; c.sequence = seq; });
            let inner = ipv4(len, proto, false);
            let (v, wire) = carry(&mut a, &mut b, &inner);
            if proto == 47 {
                // 192.168.101.10 -> .102.10 is not a probe of ours.
                prop_assert!(matches!(v, Verdict::ToTun(_)));
            }
            let Verdict::ToTun(r) = v else { panic!("{v:?}") };
            prop_assert_eq!(&wire[r], &inner[..]);
        }
    }
}
