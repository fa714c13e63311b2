//! Typed configuration of the translation core. The CLI builds it from TOML; the core never
//! sees TOML.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::acl::AclRule;

/// Transport protocols the gateway translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Idle timeouts of translation entries. Defaults are the RFC minimums/recommendations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// UDP (RFC 4787 REQ-5: ≥ 2 min, 5 min recommended). Default 5 min.
    pub udp: Duration,
    /// Established TCP (RFC 5382 REQ-5: ≥ 2 h 4 min). Default 2 h 4 min.
    pub tcp_established: Duration,
    /// Partly open or closing TCP (RFC 5382 REQ-5, RFC 7857 §2.2: ≥ 4 min). Default 4 min.
    pub tcp_transitory: Duration,
    /// ICMP query (RFC 5508 REQ-2: ≥ 60 s). Default 60 s.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp: Duration::from_secs(300),
            tcp_established: Duration::from_secs(7440),
            tcp_transitory: Duration::from_secs(240),
            icmp: Duration::from_secs(60),
        }
    }
}

/// Inbound filtering of dynamic mappings (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filtering {
    /// Address-dependent: inbound is accepted only from an address the inside endpoint has
    /// sent to through this mapping (the default).
    #[default]
    AddressDependent,
    /// Endpoint-independent: anyone may send to an existing mapping.
    EndpointIndependent,
}

/// A static port forward: `ip nat inside source static tcp INSIDE PORT interface X OUTSIDE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticEntry {
    /// Protocol (TCP or UDP).
    pub proto: Proto,
    /// Public address and port.
    pub public: SocketAddrV4,
    /// Inside address and port.
    pub inside: SocketAddrV4,
}

/// Everything the sans-IO core needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The overload (dynamic PAT) address. `None` disables dynamic PAT.
    pub overload: Option<Ipv4Addr>,
    /// Prefixes of the inside networks: a packet from one of them to a public address is
    /// hairpinned, not treated as inbound. See [`crate::Gateway::direction`].
    pub inside_networks: Vec<Ipv4Net>,
    /// ACL, first match wins (see [`crate::acl`]).
    pub acl: Vec<AclRule>,
    /// Static port forwards.
    pub statics: Vec<StaticEntry>,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Upper bound on translation entries (one per flow). Default 65,536.
    pub max_mappings: usize,
    /// Upper bound on flows one inside host may open. Default 4,096.
    pub max_per_host: usize,
    /// Ports used for dynamic TCP/UDP mappings when the inside port cannot be preserved.
    /// Default 1024–65535.
    pub port_range: RangeInclusive<u16>,
    /// Inbound filtering of dynamic mappings. Default address-dependent.
    pub filtering: Filtering,
    /// Seed of the port randomisation (RFC 6056) and of the table's hash keys.
    pub seed: u64,
    /// Add one to the TTL of translated packets. The TUN path makes the kernel forward each
    /// packet twice (into `nat0` and out of it), so without this the gateway would count as two
    /// hops and traceroute would lose one. Default true.
    pub compensate_ttl: bool,
    /// Load-balanced virtual services (each a TCP listener on its VIP:port).
    pub services: Vec<crate::service::ServiceConfig>,
    /// Addresses assigned to an interface of this host. Traffic to a public address among
    /// them that the gateway does not translate is passed to the host (SSH to the router);
    /// to any other public address (a VIP) it is answered or dropped, never passed back.
    pub local_addresses: Vec<Ipv4Addr>,
    /// Inbound half-open flows per listener; a new one replaces the listener's oldest.
    /// Default 16,384.
    pub max_half_open_per_listener: usize,
    /// Inbound half-open flows per source network; more are refused. Default 256.
    pub max_half_open_per_source: usize,
    /// Prefix length of a source network for `max_half_open_per_source`. Default 24.
    pub half_open_source_prefix: u8,
    /// Sessions outside hosts may open to one dynamic mapping. Default 1,024.
    pub max_inbound_per_mapping: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            overload: None,
            inside_networks: Vec::new(),
            acl: Vec::new(),
            statics: Vec::new(),
            timeouts: Timeouts::default(),
            max_mappings: 65_536,
            max_per_host: 4_096,
            port_range: 1024..=65535,
            filtering: Filtering::default(),
            seed: 0x5eed_1e55_c0ff_ee00,
            compensate_ttl: true,
            services: Vec::new(),
            local_addresses: Vec::new(),
            max_half_open_per_listener: 16_384,
            max_half_open_per_source: 256,
            half_open_source_prefix: 24,
            max_inbound_per_mapping: 1_024,
        }
    }
}
