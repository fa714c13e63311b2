//! Errors of the gateway: configuration problems ([`NatError`]) and the reasons a packet is
//! dropped ([`DropReason`], counted, never propagated).

use std::net::SocketAddrV4;

use crate::flow::Proto;

/// A configuration the core cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NatError {
    /// Two forwards (or a forward and a service) claim the same public endpoint.
    #[error("{proto} {public} is forwarded twice")]
    DuplicatePublic {
        /// Protocol of the clash.
        proto: Proto,
        /// The public endpoint claimed twice.
        public: SocketAddrV4,
    },
    /// Two forwards point at the same inside endpoint (its replies could not be told apart).
    #[error("{proto} {inside} is the inside endpoint of two forwards")]
    DuplicateInside {
        /// Protocol of the clash.
        proto: Proto,
        /// The inside endpoint used twice.
        inside: SocketAddrV4,
    },
    /// More than 255 public addresses.
    #[error("too many public addresses (at most 255)")]
    TooManyPublicAddresses,
    /// Only TCP and UDP ports can be forwarded.
    #[error("only tcp and udp can be forwarded, not {0}")]
    UnforwardableProto(Proto),
    /// The dynamic port range is empty.
    #[error("the dynamic port range is empty")]
    EmptyPortRange,
    /// A virtual service's pool configuration was rejected, or a reload asked for a change
    /// that needs a restart.
    #[error("service {name}: {reason}")]
    Service {
        /// The service.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

netutil::drop_reasons! {
    /// Why a packet was dropped. Each reason has a counter in [`crate::GatewayStats`].
    #[non_exhaustive]
    pub enum DropReason {
        /// Not a well-formed IPv4 packet (bad version, lengths, or transport header).
        Malformed => "malformed",
        /// An ICMP error with a bad checksum, or whose quoted packet is unusable (RFC 5508 REQ-3).
        BadIcmpError => "bad_icmp_error",
        /// Denied by an ACL rule or the ACL's implicit deny.
        AclDenied => "acl_denied",
        /// A non-first fragment: it carries no ports, and the gateway does not reassemble.
        Fragment => "fragment",
        /// Inbound to a dynamic mapping from an address the inside endpoint never sent to
        /// (address-dependent filtering).
        Filtered => "filtered",
        /// Inbound or ICMP error that matches no flow.
        NoSession => "no_session",
        /// A TCP segment other than an initial SYN tried to open an inbound flow (forward,
        /// service or dynamic mapping).
        NotSyn => "not_syn",
        /// The table is at `max_mappings`: new flows are refused.
        TableFull => "table_full",
        /// The inside host is at its per-host limit.
        HostLimit => "host_limit",
        /// No free public port.
        PortsExhausted => "ports_exhausted",
        /// The listener had no inside endpoint to offer (e.g. every backend down).
        NoInsideEndpoint => "no_inside_endpoint",
        /// The chosen inside endpoint is already mapped for another listener.
        InsideEndpointBusy => "inside_endpoint_busy",
        /// A new inbound flow from a source network already at `max_half_open_per_source`
        /// half-open flows.
        HalfOpenSource => "half_open_source",
        /// A RST outside the receiver's window (the flow is left as it was).
        RstOutOfWindow => "rst_out_of_window",
        /// A new inbound session to a dynamic mapping already at `max_inbound_per_mapping`.
        MappingInboundLimit => "mapping_inbound_limit",
        /// An outbound packet whose source is not in an inside network (anti-spoofing).
        SpoofedSource => "spoofed_source",
        /// An outbound packet of a protocol the gateway cannot translate (GRE, ESP, SCTP, ICMP
        /// timestamp...): it would leave with its private source.
        Untranslatable => "untranslatable",
        /// An outbound ICMP error not sent by the inside endpoint it quotes.
        IcmpErrorSpoofed => "icmp_error_spoofed",
        /// To a public address not assigned to this host that nothing translates (passing it
        /// back to `nat0` would loop it).
        Unowned => "unowned",
        /// An outbound flow from a virtual service's backend (or sorry server) endpoint that
        /// would have needed a dynamic mapping: that endpoint is reserved for the service.
        ServiceEndpointReserved => "service_endpoint_reserved",
        /// A new connection to a direct-routing service while no data path can deliver it
        /// (the kernel path did not load: the TUN cannot change a frame's MACs).
        DirectRouteUnavailable => "direct_route_unavailable",
    }
}
