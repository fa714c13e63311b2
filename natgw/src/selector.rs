//! Who decides the inside endpoint of a new inbound flow to a listener: a [`Selector`], one
//! of a closed set. A static forward always answers the same endpoint; a virtual service
//! picks a backend from its pool. Every flow keeps the endpoint chosen for it for its whole
//! life, and the selector hears of its life cycle ([`FlowEvent`]) to count active and
//! inactive connections per backend.

use std::net::SocketAddrV4;
use std::time::Instant;

use crate::flow::FlowEvent;
use crate::service::VirtualService;

/// The selector of a static port forward: always the same inside endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticForward {
    /// The inside endpoint.
    pub inside: SocketAddrV4,
}

/// Decides the inside endpoint of each new inbound flow to one public endpoint.
#[derive(Debug)]
pub enum Selector {
    /// A static port forward.
    Static(StaticForward),
    /// A load-balanced virtual service (boxed: a pool is much larger than a forward).
    Service(Box<VirtualService>),
}

impl Selector {
    /// A new flow from `client` to public port `port` arrived: the inside endpoint to send
    /// it to, or `None` to refuse it (counted as [`crate::DropReason::NoInsideEndpoint`]).
    pub fn select(
        &mut self,
        now: Instant,
        client: SocketAddrV4,
        port: u16,
    ) -> Option<SocketAddrV4> {
        match self {
            Selector::Static(s) => Some(s.inside),
            Selector::Service(s) => s.select(now, client, port),
        }
    }

    /// A TCP connection from `client` to public port `port` already under way, which this
    /// node never saw start: the inside endpoint it started on, when every node decides that
    /// alike (a static forward; a virtual service scheduled by `dh`, `sh` or `mh`), else
    /// `None`.
    pub fn adopt(&mut self, now: Instant, client: SocketAddrV4, port: u16) -> Option<SocketAddrV4> {
        match self {
            Selector::Static(s) => Some(s.inside),
            Selector::Service(s) => s.adopt(now, client, port),
        }
    }

    /// The flow between `client` and `inside` changed state (`client` lets a virtual service
    /// release the client's persistence template).
    pub fn on_flow(
        &mut self,
        now: Instant,
        inside: SocketAddrV4,
        client: SocketAddrV4,
        event: FlowEvent,
    ) {
        let Selector::Service(s) = self else {
            return;
        };
        match event {
            FlowEvent::Opened => s.flow_opened(now, inside, client),
            FlowEvent::Established => s.flow_established(now, inside, client),
            FlowEvent::Closing => s.flow_closing(now, inside, client),
            FlowEvent::Closed { was_established } => {
                s.flow_closed(now, inside, client, was_established);
            }
        }
    }

    /// A packet of `len` bytes of a flow to `inside` was translated, towards `inside` when
    /// `to_inside` (virtual services count bytes per backend).
    pub fn on_packet(&mut self, inside: SocketAddrV4, to_inside: bool, len: usize) {
        if let Selector::Service(s) = self {
            s.count_packet(inside, to_inside, len);
        }
    }

    /// A second data path moved `packets` packets (`bytes` in all) of a flow to `inside`
    /// without the core, towards `inside` when `to_inside`.
    pub fn on_traffic(&mut self, inside: SocketAddrV4, to_inside: bool, packets: u64, bytes: u64) {
        if let Selector::Service(s) = self {
            s.count_traffic(inside, to_inside, packets, bytes);
        }
    }

    /// The static forward, if this is one.
    #[must_use]
    pub fn as_static(&self) -> Option<&StaticForward> {
        match self {
            Selector::Static(s) => Some(s),
            Selector::Service(_) => None,
        }
    }

    /// The virtual service, if this is one.
    #[must_use]
    pub fn as_service(&self) -> Option<&VirtualService> {
        match self {
            Selector::Service(s) => Some(s),
            Selector::Static(_) => None,
        }
    }

    /// The virtual service, if this is one (to change weights or health at run time).
    pub fn as_service_mut(&mut self) -> Option<&mut VirtualService> {
        match self {
            Selector::Service(s) => Some(s),
            Selector::Static(_) => None,
        }
    }
}

impl From<StaticForward> for Selector {
    fn from(s: StaticForward) -> Self {
        Selector::Static(s)
    }
}

impl From<VirtualService> for Selector {
    fn from(s: VirtualService) -> Self {
        Selector::Service(Box::new(s))
    }
}
