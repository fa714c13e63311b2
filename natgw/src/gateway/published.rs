//! Decisions stated in advance: the TCP listeners whose new connections a second data path
//! (the kernel fast path) may open without asking the core, SYN by SYN.
//!
//! Invariant: a listener is published only when the core's answer to every SYN from the
//! outside to it is already known and is "open a flow to this inside endpoint": a static
//! forward (one inside endpoint, no choice to make), the ACL's first match for a TCP packet
//! to its public endpoint a `permit` whatever the source address and port
//! ([`crate::Acl::verdict_for_any_source`]), and the table not under pressure
//! (the table's `new_flow_pressure`: a flood must meet the core's defences — early drop,
//! the per-source bound — packet by packet, so the listener is withdrawn while half-open
//! flows reach half of a bound). Everything else (virtual services, whose schedulers
//! choose per connection; UDP; a source-dependent or denying ACL) is never published and
//! keeps the slow path. The set is recomputed from the core's state at each call, so a
//! withdrawal takes effect at the data path's next update.
//!
//! What the executor must still leave to the core, because the verdict depends on it and
//! the publication does not carry it: a SYN whose source lies in the inside networks (the
//! core treats it as a hairpin from the inside, [`Gateway::direction`]), a SYN of a
//! flow the data path already has an entry for, and a SYN carrying data.
//!
//! Adoption ([`Gateway::adopt_opened_syn`]): the executor reports each SYN it carried with
//! its TCP header whole; the core rebuilds the SYN and handles it as if it had crossed the
//! core, so that everything it decides and tracks for a SYN (the ACL rule's hit, the bounds,
//! the half-open accounting, the window tracking and its window scale) happens here, once.
//! Its verdict is the adoption's: anything but that very translation is a refusal, and the
//! executor removes what it installed. A publication withdrawn while reports are in flight
//! is thereby handled: the core decides each late SYN on its own.
//!
//! The inside server's SYN-ACK of an adopted flow may be executed too
//! ([`Gateway::follow_opened_syn_ack`]): its translation is the flow's, already decided; the
//! executor reports it (after its flow's SYN) and the core tracks it as if it had crossed,
//! so that its window scale, sequence numbers and the flow's state are the core's, once.

use std::net::SocketAddrV4;
use std::time::Instant;

use super::{Gateway, Verdict};
use crate::acl::AclDecision;
use crate::flow::{Direction, Proto};

/// The shortest and longest TCP header.
const TCP_HEADER_LEN: std::ops::RangeInclusive<usize> = 20..=60;

/// A SYN a second data path executed for a [`PublishedListener`], as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedSyn<'a> {
    /// The outside client (the SYN's source).
    pub client: SocketAddrV4,
    /// The public endpoint the SYN was addressed to.
    pub public: SocketAddrV4,
    /// The inside endpoint the data path sent it to.
    pub inside: SocketAddrV4,
    /// The SYN's TCP header as it arrived (options included, no payload).
    pub tcp_header: &'a [u8],
}

/// A TCP static forward whose SYNs a data path may execute (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedListener {
    /// The public endpoint a SYN is addressed to.
    pub public: SocketAddrV4,
    /// The inside endpoint the SYN goes to, source address and port preserved.
    pub inside: SocketAddrV4,
    /// The ACL rule whose `permit` decides every such SYN (`None`: no rule matches, the
    /// outside's default permit), so that a flow opened elsewhere counts its hit.
    pub acl_rule: Option<usize>,
}

impl Gateway {
    /// The TCP static forwards whose new connections a second data path may open on its
    /// own right now, in listener order (see the module docs for the rule).
    #[must_use]
    pub fn published_listeners(&self) -> Vec<PublishedListener> {
        self.listeners()
            .filter(|(_, l)| l.proto == Proto::Tcp)
            .filter_map(|(id, l)| {
                let inside = l.selector.as_static()?.inside;
                let acl_rule = match self.acl.verdict_for_any_source(
                    Proto::Tcp,
                    *l.public.ip(),
                    l.public.port(),
                )? {
                    AclDecision::Permit(rule) => rule,
                    AclDecision::Deny(_) => return None,
                };
                if self.table.new_flow_pressure(id) {
                    return None;
                }
                Some(PublishedListener {
                    public: l.public,
                    inside,
                    acl_rule,
                })
            })
            .collect()
    }
}

impl Gateway {
    /// Adopts a flow a second data path opened by executing `syn` (see the module docs):
    /// the SYN is handled as if it had crossed the core. True when the core's translation
    /// is the one the data path executed (the flow is now the core's, half-open, counted in
    /// [`crate::GatewayStats::flows_opened_by_data_path`]); false when the core decided
    /// otherwise, and the data path must remove the flow's entries (and the core keeps
    /// whatever its own decision made, which the slow path then carries).
    pub fn adopt_opened_syn(&mut self, now: Instant, syn: &OpenedSyn<'_>) -> bool {
        let adopted = self.handle_opened_syn(now, syn);
        if adopted {
            self.stats.flows_opened_by_data_path += 1;
        } else {
            self.stats.data_path_opens_refused += 1;
        }
        adopted
    }

    fn handle_opened_syn(&mut self, now: Instant, syn: &OpenedSyn<'_>) -> bool {
        let Some(mut packet) = rebuild(syn.client, syn.public, syn.tcp_header) else {
            return false;
        };
        if self.handle_packet(now, Direction::Inbound, &mut packet) != Verdict::Forward {
            return false;
        }
        // The same length as built: the core rewrites in place.
        packet.get(16..20) == Some(&syn.inside.ip().octets()[..])
            && packet.get(22..24) == Some(&syn.inside.port().to_be_bytes()[..])
    }

    /// Tracks the SYN-ACK (`segment`: the inside server's answer, its header as it left the
    /// server, from `inside` to `client`) that a second data path sent on for a flow it
    /// opened (see the module docs), as if it had crossed the core. True when the core
    /// translates the segment exactly as the data path did (counted in
    /// [`crate::GatewayStats::syn_acks_by_data_path`]); false otherwise (counted in
    /// `data_path_syn_acks_unmatched`): the segment is gone already; the core's verdict on
    /// its copy is what the slow path would have done with it.
    pub fn follow_opened_syn_ack(&mut self, now: Instant, segment: &OpenedSyn<'_>) -> bool {
        let followed = rebuild(segment.inside, segment.client, segment.tcp_header).is_some_and(
            |mut packet| {
                self.handle_packet(now, Direction::Outbound, &mut packet) == Verdict::Forward
                    && packet.get(12..16) == Some(&segment.public.ip().octets()[..])
                    && packet.get(20..22) == Some(&segment.public.port().to_be_bytes()[..])
            },
        );
        if followed {
            self.stats.syn_acks_by_data_path += 1;
        } else {
            self.stats.data_path_syn_acks_unmatched += 1;
        }
        followed
    }
}

/// The IPv4 packet of a reported TCP header (`tcp`, as it left `source` for `destination`,
/// no payload), or `None` for a header of impossible length or whose ports are not the
/// endpoints'.
fn rebuild(source: SocketAddrV4, destination: SocketAddrV4, tcp: &[u8]) -> Option<Vec<u8>> {
    let ports_match = tcp.get(0..2) == Some(&source.port().to_be_bytes()[..])
        && tcp.get(2..4) == Some(&destination.port().to_be_bytes()[..]);
    if !TCP_HEADER_LEN.contains(&tcp.len()) || !ports_match {
        return None;
    }
    let total = u16::try_from(20 + tcp.len()).ok()?;
    let mut packet = Vec::with_capacity(usize::from(total));
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total.to_be_bytes());
    // Identification 0, don't fragment, TTL 64, TCP, checksum (below).
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    packet.extend_from_slice(&source.ip().octets());
    packet.extend_from_slice(&destination.ip().octets());
    let checksum = ipv4_header_checksum(&packet).to_be_bytes();
    packet[10..12].copy_from_slice(&checksum);
    packet.extend_from_slice(tcp);
    Some(packet)
}

/// The ones' complement sum of a 20-byte IPv4 header whose checksum field is zero.
fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap_or(u16::MAX)
}
