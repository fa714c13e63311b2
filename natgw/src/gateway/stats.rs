//! Packet and flow counters of a [`super::Gateway`].

use crate::error::DropReason;
use netutil::DropCounters;

/// Packet counters of a [`Gateway`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GatewayStats {
    /// Inside → outside packets translated.
    pub translated_out: u64,
    /// Outside → inside packets translated.
    pub translated_in: u64,
    /// Inside → public address → inside packets (hairpinning).
    pub hairpinned: u64,
    /// ICMP errors translated (either way).
    pub icmp_errors: u64,
    /// Packets forwarded untouched (to the gateway itself, or not translatable).
    pub passed_through: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows taken over in the middle (a mid-stream segment to a static forward or a `dh`/
    /// `sh`/`mh` service this node never saw start: stateless adoption). Counted in
    /// `flows_created` as well.
    #[cfg_attr(feature = "serde", serde(default))]
    pub flows_adopted: u64,
    /// Flows removed (expired or cleared).
    pub flows_removed: u64,
    /// Half-open flows removed to make room (table full, or their listener at its bound).
    pub early_drops: u64,
    /// Echo requests to a public address not assigned here (a VIP), answered by the gateway.
    pub answered_echo: u64,
    /// TCP segments to such an address that nothing translates, answered with a RST.
    pub answered_rst: u64,
    /// Packets to a direct-routing service's VIP handed to the data path for delivery,
    /// unchanged, to their backend.
    #[cfg_attr(feature = "serde", serde(default))]
    pub direct_routed: u64,
    /// Datagrams to a one-packet UDP service, each scheduled on its own (no flow made).
    #[cfg_attr(feature = "serde", serde(default))]
    pub one_packet_in: u64,
    /// Datagrams from a one-packet service's backends, sent on from its VIP without a flow.
    #[cfg_attr(feature = "serde", serde(default))]
    pub one_packet_out: u64,
    /// Flows a second data path opened by executing a published listener's SYN
    /// ([`crate::Gateway::adopt_opened_syn`]) that this core adopted. Counted in
    /// `flows_created` as well.
    #[cfg_attr(feature = "serde", serde(default))]
    pub flows_opened_by_data_path: u64,
    /// Such flows the core refused (its verdict on the SYN was not that flow: a bound hit
    /// since the publication, a withdrawn listener): the data path removes their entries.
    #[cfg_attr(feature = "serde", serde(default))]
    pub data_path_opens_refused: u64,
    /// SYN-ACKs of such flows a second data path sent on and reported
    /// ([`crate::Gateway::follow_opened_syn_ack`]) that this core tracked as its own.
    #[cfg_attr(feature = "serde", serde(default))]
    pub syn_acks_by_data_path: u64,
    /// Such SYN-ACKs whose flow the core did not have, or would have translated otherwise
    /// (a refused or expired flow): already sent, they change nothing here.
    #[cfg_attr(feature = "serde", serde(default))]
    pub data_path_syn_acks_unmatched: u64,
    /// Packets dropped, by reason.
    pub drops: DropCounters<DropReason>,
}
