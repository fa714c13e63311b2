//! PAT gateway: an ACL, static port forwards, dynamic PAT ("NAT overload") and the hooks for
//! load-balanced virtual services, as a sans-IO core plus a TUN driver.
//!
//! What it does NOT do: IPv6, NAT of protocols other than TCP, UDP and ICMP (those pass
//! untouched), reassembly (fragments are translated one by one: later fragments like their
//! first; one arriving before its first is dropped and counted), ALGs (FTP, SIP), port
//! parity, or paired address pooling (there is one overload address). The core never reads a
//! clock, sleeps or opens sockets; the `driver` feature (on by default) adds the TUN and
//! rtnetlink side.
//!
//! ```text
//!  inside host ──▶ policy routing (iif inside) ─┐
//!                                               ├─▶ nat0 ─▶ Gateway::handle_packet ─▶ nat0 ─▶ kernel routing
//!  outside ──▶ public address routed to nat0 ───┘      ACL → flow table → listener / dynamic PAT
//! ```
//!
//! Per packet, as on a router: the [`Acl`] (first match wins) → an existing flow → a listener
//! (static forward or virtual service) for new inbound flows → a new dynamic mapping for new
//! outbound flows. Rewrites happen in place with RFC 1624 checksum updates ([`L4Checksum`]).
//!
//! # Building on the gateway (virtual services)
//! - The gateway owns several public addresses: the overload address and every address a
//!   listener uses ([`Gateway::public_addresses`]); the driver routes each into `nat0`.
//! - A **listener** is a `(proto, public address, port)` whose new inbound flows are handed
//!   to a [`Selector`] ([`Gateway::add_listener`]); a multi-port service's listener owns
//!   each of its ports ([`ServicePorts`]). [`Selector::select`] is the single place
//!   where a new flow's inside endpoint is decided: a [`StaticForward`] always answers the
//!   same endpoint; a [`VirtualService`] picks a backend from its pool.
//! - Each flow stores the inside endpoint chosen for it (through a per-endpoint mapping), so
//!   a backend keeps its flows when the pool changes.
//! - Flow life cycle is reported to the selector ([`FlowEvent::Opened`], `Established`,
//!   `Closing`, `Closed`): enough to keep LVS-style active/inactive connection counts per
//!   backend.
//! - [`Gateway::service_mut`] (or [`Gateway::selector_mut`]) reaches a service at run time
//!   (weights, health).
//! - A service with [`Forward::DirectRoute`] (LVS-DR) is decided the same way, but its
//!   packets leave the core unchanged with [`Verdict::DirectRoute`]: the data path delivers
//!   them to the backend's MAC (only the kernel path can; [`Gateway::set_direct_routing`]
//!   says whether one does), and the flow is tracked from the client's side alone.
//! - A selector returning `None` refuses the flow ([`DropReason::NoInsideEndpoint`]); a
//!   backend endpoint belongs to one listener at a time ([`DropReason::InsideEndpointBusy`]),
//!   and never to a dynamic mapping ([`DropReason::ServiceEndpointReserved`]).
//! - In the driver, `driver::NatDriver::gateway` shares the core (a mutex held by the packet
//!   loop one batch at a time) and `driver::NatDriver::add_public_address` makes a new VIP live
//!   (route into `nat0` + proxy neighbour, or steering rules if the address is local).
//!
//! # The core decides, a data path moves packets
//! The TUN driver is one data path: it hands every packet to [`Gateway::handle_packet`],
//! which both decides and rewrites. The kernel data path (the `kpath` crate's TC program,
//! `driver::Datapath::Kernel`) executes the decisions without the core touching each packet:
//! the driver installs the flows [`Gateway::fast_path_eligible`] allows and feeds back what
//! the program moved with [`Gateway::fast_path_activity`]. The
//! decision a flow gets is a [`Translation`] ([`Gateway::translations`]): `proto`, `inside`,
//! `public` and `outside` are both directions' rewrite tuples (outbound: source `inside` →
//! `public`; inbound: destination `public` → `inside`), and `listener` says which listener
//! placed it. What stays in the core whatever the data path: the ACL, listener selection,
//! port allocation, the table's bounds and timers, TCP state and the flow events.
//!
//! # Flow sync (failover that keeps connections)
//! With the `flowsync` crate a pair of nodes share their flows: the master's table journals
//! what changed ([`Gateway::take_sync_updates`], or all of it: [`Gateway::export_state`]);
//! a backup holds what it receives as **standby flows** ([`Gateway::apply_standby`]:
//! bounded, counted, outside the table and every limit, never seen by the packet path) and
//! makes them live when VRRP makes it master ([`Gateway::promote_standby`]): each keeps its
//! public endpoint (overload port or listener), inside endpoint (host or backend) and TCP
//! state, with the full idle timeout of that state. The services' persistence templates
//! travel the same way (journaled by their pools, held as standby templates, installed into
//! the pools at the promotion, backends matched by address), so a persistent client's new
//! connections keep going to its backend after a failover.
//!
//! # Module order
//! Imports go one way, and no module imports one that depends on it:
//!
//! ```text
//! flow ─▶ error ─▶ {acl, table, translate} ─▶ service ─▶ selector ─▶ gateway ─▶ driver
//!                   ports (a leaf: a multi-port service's ports and rports) ─▶ service
//!                   config (above acl, table and service: it holds their settings)
//!                   sync (above table: the standby flows; gateway holds them)
//! ```
//! `flow` is the shared vocabulary (protocols, directions, listener ids, flow events, TCP
//! flag bits); `tcp`, `fragments` and `health` are leaves beside it; no `impl Gateway` lives
//! outside `gateway/`.
//!
//! # Public surface
//! The modules are private; what callers use is re-exported below. Two modules stay public
//! because they hold a driver half: [`health`] (the check vocabulary, and `health::probe`,
//! the prober) and `driver`.
#![warn(missing_docs)]

mod acl;
mod config;
#[cfg(feature = "driver")]
pub mod driver;
mod error;
mod flow;
mod fragments;
#[doc(hidden)]
pub mod fuzzing;
mod gateway;
pub mod health;
mod ports;
mod selector;
mod service;
mod sync;
mod table;
mod tcp;
mod translate;

pub use acl::{Acl, AclAction, AclDecision, AclPacket, AclRule};
pub use config::{Filtering, GatewayConfig, StaticEntry};
pub use error::{DropReason, NatError};
pub use flow::{Direction, FlowEvent, ListenerId, Proto};
pub use gateway::{
    AdoptedFlow, DirectRoute, FastPathActivity, FastPathFlow, Gateway, GatewayStats, Listener,
    OnePacketSchedule, OpenedSyn, PacketMeta, PublishedListener, Verdict,
};
pub use ports::{MAX_SERVICE_PORTS, PortRule, PortsError, ServicePorts};
pub use selector::{Selector, StaticForward};
pub use service::{BackendKey, Forward, ServiceConfig, VirtualService};
pub use sync::{Promotion, STANDBY_GRACE, StandbyFlows, StandbyStats};
pub use table::{PatTable, Timeouts, Translation};
pub use translate::{L4Checksum, finish_partial_checksum};
