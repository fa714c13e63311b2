//! Typed configuration of the translation core. The CLI builds it from TOML; the core never
//! sees TOML.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

use crate::acl::AclRule;
use crate::flow::Proto;
use crate::service::ServiceConfig;
use crate::table::Timeouts;

/// Inbound filtering of dynamic mappings (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "kebab-case")
)]
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StaticEntry {
    /// Protocol (TCP or UDP).
    pub proto: Proto,
    /// Public address and port.
    #[cfg_attr(feature = "serde", serde(rename = "inside_global"))]
    pub public: SocketAddrV4,
    /// Inside address and port.
    #[cfg_attr(feature = "serde", serde(rename = "inside_local"))]
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
    pub services: Vec<ServiceConfig>,
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
