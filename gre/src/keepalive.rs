//! Cisco-compatible GRE keepalives (`keepalive <period> <retries>` on an IOS tunnel).
//!
//! The probe carries its own reply: the outer packet goes to the peer, and what the peer
//! finds inside after ordinary decapsulation is a packet addressed back to us, which it
//! routes natively. The peer therefore needs no keepalive support at all.
//!
//! ```text
//! outer IPv4 us->peer | GRE 0x0800 | inner IPv4 peer->us, proto 47 | GRE 0x0000 (+key)
//! ```
//!
//! For GRE-in-UDP the inner packet is `IPv4 peer->us | UDP 4754->4754 | GRE 0x0000`, so
//! the reflected probe comes back on the UDP port like any other tunnel packet.
//!
//! Counting follows IOS: every probe sent increments a miss counter, any reply resets it,
//! and when a probe is due while the counter has reached `retries` the tunnel goes down.
//! Probes keep going out while down; the first reply brings the tunnel back up.

use core::time::Duration;
use std::net::Ipv4Addr;
use std::time::Instant;

use netutil::checksum::checksum;

use crate::wire::{GreRepr, MAX_HEADER_LEN, PROTO_KEEPALIVE};

/// IANA port of GRE-in-UDP (RFC 8086 §3).
pub const GRE_IN_UDP_PORT: u16 = 4754;

/// `keepalive { interval, retries }` of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KeepaliveConfig {
    /// Time between probes (IOS "period"); toolkit default 10 s.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "interval_ms", with = "netutil::serde_ms")
    )]
    pub interval: Duration,
    /// Probes without a reply before the tunnel goes down; toolkit default 3.
    pub retries: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            retries: 3,
        }
    }
}

/// What a keepalive timer tick asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveTick {
    /// Nothing is due yet.
    Idle,
    /// Send a probe.
    Probe,
    /// The retries ran out: the tunnel just went down; send a probe as well.
    WentDown,
}

/// Keepalive bookkeeping of one tunnel: when to probe and whether the peer answers.
#[derive(Debug, Clone)]
pub struct GreKeepalive {
    config: KeepaliveConfig,
    misses: u32,
    up: bool,
    next_probe: Instant,
    last_reply: Option<Instant>,
}

impl GreKeepalive {
    /// Starts with the tunnel up (as IOS does) and the first probe due at `now`.
    pub fn new(now: Instant, config: KeepaliveConfig) -> Self {
        Self {
            config,
            misses: 0,
            up: true,
            next_probe: now,
            last_reply: None,
        }
    }

    /// Whether the peer is considered reachable.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Probes sent since the last reply.
    pub fn misses(&self) -> u32 {
        self.misses
    }

    /// When the last reply arrived.
    pub fn last_reply(&self) -> Option<Instant> {
        self.last_reply
    }

    /// The configuration in force.
    pub fn config(&self) -> KeepaliveConfig {
        self.config
    }

    /// When [`GreKeepalive::handle_timeout`] wants to be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next_probe
    }

    /// Advances the timer; says whether to probe and whether the tunnel just went down.
    pub fn handle_timeout(&mut self, now: Instant) -> KeepaliveTick {
        if now < self.next_probe {
            return KeepaliveTick::Idle;
        }
        // A driver that wakes late must not fire a burst of probes to catch up.
        self.next_probe = now + self.config.interval;
        let went_down = self.up && self.misses >= self.config.retries;
        if went_down {
            self.up = false;
        }
        self.misses = self.misses.saturating_add(1);
        if went_down {
            KeepaliveTick::WentDown
        } else {
            KeepaliveTick::Probe
        }
    }

    /// Applies a new period/retry count without losing the link state: misses so far
    /// count against the new `retries`, and a longer period never delays the probe that
    /// is already due sooner.
    pub fn set_config(&mut self, now: Instant, config: KeepaliveConfig) {
        self.config = config;
        self.next_probe = self.next_probe.min(now + config.interval);
    }

    /// Records a reply; returns true when this brings the tunnel back up.
    pub fn handle_reply(&mut self, now: Instant) -> bool {
        self.misses = 0;
        self.last_reply = Some(now);
        let came_up = !self.up;
        self.up = true;
        came_up
    }
}

/// Bytes of the per-probe marker that follow the inner GRE header of our probes. The peer
/// routes the inner packet back verbatim (Cisco and Linux only decrement its TTL), so the
/// reply carries the marker and proves it answers the probe outstanding, not a spoofer.
pub(crate) const MARKER_LEN: usize = 8;

/// Longest inner packet of a probe: IPv4 + UDP + GRE with every option + the marker.
pub(crate) const MAX_PROBE_INNER_LEN: usize = 20 + 8 + MAX_HEADER_LEN + MARKER_LEN;

/// Writes the inner part of a probe (the packet the peer will route back to us) into `buf`
/// and returns its length (20 + [8 for UDP] + GRE header + [`MARKER_LEN`]); `None` when
/// `buf` is shorter than that.
pub(crate) fn emit_probe_inner(
    buf: &mut [u8],
    local: Ipv4Addr,
    peer: Ipv4Addr,
    key: Option<u32>,
    udp: bool,
    marker: u64,
) -> Option<usize> {
    let gre = GreRepr {
        protocol: PROTO_KEEPALIVE,
        checksum: false,
        key,
        sequence: None,
    };
    let l4 = if udp { 8 } else { 0 };
    let gre_end = 20 + l4 + gre.header_len();
    let total = gre_end + MARKER_LEN;
    let packet = buf.get_mut(..total)?;
    let (ip, rest) = packet.split_first_chunk_mut::<20>()?;
    ip[0] = 0x45;
    ip[1] = 0;
    // Lossless: total <= MAX_PROBE_INNER_LEN.
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].fill(0);
    // DF: the reply is tiny, and fragments of it would only confuse middleboxes.
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 255;
    ip[9] = if udp { 17 } else { 47 };
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&peer.octets());
    ip[16..20].copy_from_slice(&local.octets());
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let gre_bytes = if udp {
        let (u, gre_bytes) = rest.split_first_chunk_mut::<8>()?;
        u[0..2].copy_from_slice(&GRE_IN_UDP_PORT.to_be_bytes());
        u[2..4].copy_from_slice(&GRE_IN_UDP_PORT.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + gre.header_len() + MARKER_LEN) as u16).to_be_bytes());
        // Zero UDP checksum is allowed over IPv4 (RFC 768) and RFC 8086 §5.1.
        u[6..8].fill(0);
        gre_bytes
    } else {
        rest
    };
    let (header, tail) = gre_bytes.split_at_mut_checked(gre.header_len())?;
    gre.emit(header);
    tail.copy_from_slice(&marker.to_be_bytes());
    Some(total)
}

/// The marker of a keepalive reply: the first [`MARKER_LEN`] bytes after its GRE header.
pub(crate) fn reply_marker(payload: &[u8]) -> Option<u64> {
    payload
        .first_chunk::<MARKER_LEN>()
        .map(|m| u64::from_be_bytes(*m))
}

/// A token bucket in simulated time: `rate` tokens a second, at most `burst` banked.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: u32,
    burst: u32,
    per_token: Duration,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(now: Instant, rate: u32, burst: u32) -> Self {
        Self {
            tokens: burst,
            burst,
            per_token: Duration::from_secs(1) / rate.max(1),
            last: now,
        }
    }

    /// Takes a token if one is there.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let earned = elapsed.as_nanos() / self.per_token.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            // Whole tokens only: the remainder keeps accruing.
            self.last += self.per_token * earned.min(self.burst);
            if self.tokens == self.burst {
                self.last = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::GrePacket;

    fn cfg(interval: u64, retries: u32) -> KeepaliveConfig {
        KeepaliveConfig {
            interval: Duration::from_secs(interval),
            retries,
        }
    }

    #[test]
    fn goes_down_after_retries_periods_and_back_up_on_reply() {
        let t0 = testkit::epoch();
        let mut ka = GreKeepalive::new(t0, cfg(10, 3));
        assert_eq!(ka.handle_timeout(t0), KeepaliveTick::Probe);
        assert_eq!(ka.poll_timeout(), t0 + Duration::from_secs(10));
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(5)),
            KeepaliveTick::Idle
        );
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(10)),
            KeepaliveTick::Probe
        );
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(20)),
            KeepaliveTick::Probe
        );
        assert!(ka.is_up());
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(30)),
            KeepaliveTick::WentDown
        );
        assert!(!ka.is_up());
        // Still probing while down, never "going down" twice.
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(40)),
            KeepaliveTick::Probe
        );
        assert!(ka.handle_reply(t0 + Duration::from_secs(41)));
        assert!(ka.is_up());
        assert_eq!(ka.misses(), 0);
        assert!(!ka.handle_reply(t0 + Duration::from_secs(42)));
    }

    #[test]
    fn replies_keep_it_up() {
        let t0 = testkit::epoch();
        let mut ka = GreKeepalive::new(t0, cfg(1, 2));
        for s in 0..100 {
            let now = t0 + Duration::from_secs(s);
            assert_ne!(ka.handle_timeout(now), KeepaliveTick::WentDown);
            ka.handle_reply(now);
        }
        assert!(ka.is_up());
    }

    #[test]
    fn late_wakeup_sends_one_probe() {
        let t0 = testkit::epoch();
        let mut ka = GreKeepalive::new(t0, cfg(1, 5));
        let late = t0 + Duration::from_secs(100);
        assert_eq!(ka.handle_timeout(late), KeepaliveTick::Probe);
        assert_eq!(ka.handle_timeout(late), KeepaliveTick::Idle);
        assert_eq!(ka.misses(), 1);
    }

    #[test]
    fn token_bucket_allows_its_burst_then_its_rate() {
        let t0 = testkit::epoch();
        let mut b = TokenBucket::new(t0, 10, 5);
        assert_eq!((0..20).filter(|_| b.take(t0)).count(), 5);
        let later = t0 + Duration::from_millis(250);
        assert_eq!((0..20).filter(|_| b.take(later)).count(), 2);
        let much_later = t0 + Duration::from_secs(100);
        assert_eq!((0..20).filter(|_| b.take(much_later)).count(), 5);
    }

    #[test]
    fn probe_inner_is_a_valid_packet_back_to_us() {
        let local = Ipv4Addr::new(198, 51, 100, 1);
        let peer = Ipv4Addr::new(198, 51, 100, 2);
        let mut buf = [0u8; 64];
        let len = emit_probe_inner(&mut buf, local, peer, Some(42), false, 7).unwrap();
        assert_eq!(len, 28 + MARKER_LEN);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&buf[..len]).unwrap();
        assert_eq!(ip.source_addr(), peer);
        assert_eq!(ip.destination_addr(), local);
        assert_eq!(ip.protocol(), etherparse::IpNumber::GRE);
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
        let gre = GrePacket::new_checked(&buf[20..len]).unwrap();
        assert_eq!(gre.protocol(), PROTO_KEEPALIVE);
        assert_eq!(gre.key(), Some(42));
        assert_eq!(reply_marker(gre.payload()), Some(7));
        assert!(emit_probe_inner(&mut buf[..35], local, peer, Some(42), false, 7).is_none());

        let len = emit_probe_inner(&mut buf, local, peer, None, true, 7).unwrap();
        assert_eq!(len, 32 + MARKER_LEN);
        assert_eq!(buf[9], 17);
        assert_eq!(u16::from_be_bytes([buf[22], buf[23]]), GRE_IN_UDP_PORT);
    }
}
