//! The vocabulary every other module shares: protocols, directions, listener ids, flow
//! events and the TCP flag bits that decide whether a segment may open a flow.
//!
//! Invariant: this module is the leaf of the crate (no `crate::` imports), so that every
//! other module can depend on it without closing a cycle.

/// Transport protocols the gateway translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Proto {
    /// TCP (RFC 5382 behaviour).
    Tcp,
    /// UDP (RFC 4787 behaviour).
    Udp,
    /// ICMP echo, keyed by the query identifier (RFC 5508).
    Icmp,
}

impl Proto {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
        }
    }

    /// The protocol for an IP protocol number, if the gateway translates it.
    #[must_use]
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            1 => Some(Proto::Icmp),
            _ => None,
        }
    }

    /// Lower-case name as used in the config and in `show nat`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }

    /// Two-bit code packed into the table's keys and entries.
    pub(crate) fn code(self) -> u8 {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Icmp => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> Proto {
        match c {
            0 => Proto::Tcp,
            1 => Proto::Udp,
            _ => Proto::Icmp,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a packet read from `nat0` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From an inside host (steered into `nat0` by policy routing). A packet to a public
    /// address is hairpinned.
    Outbound,
    /// From the outside, addressed to one of the gateway's public addresses.
    Inbound,
}

/// Identifies a listener (a static forward or a virtual service) in a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(transparent)
)]
pub struct ListenerId(pub u16);

/// What happened to a flow of a listener; delivered to its selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// A new flow to `inside` was opened (right after the selector chose it).
    Opened,
    /// The TCP flow became established (LVS: an active connection).
    Established,
    /// The TCP flow left established: FIN both ways or RST (LVS: inactive).
    Closing,
    /// The flow was removed (idle timeout or `nat clear`).
    Closed {
        /// Whether it was still established when removed.
        was_established: bool,
    },
}

/// TCP flag bits (byte 13 of the TCP header).
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// A SYN without ACK: the only segment allowed to open a flow through a forward.
pub(crate) fn is_initial_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}
