//! Standby flows: the flows a peer synced to this node (`flowsync`), held apart from the
//! table until this node becomes master and promotes them.
//!
//! Invariants:
//! - a standby flow is never looked at by the packet path and counts toward no bound of the
//!   table (not the table size, not a host's flows, not the half-open bounds);
//! - the store holds at most `cap` flows (by default the table's capacity): a new flow past
//!   that is refused and counted (`over_cap`); a change to a flow already held is applied;
//! - a standby flow lives until its peer removes it, a newer state replaces it, or its
//!   deadline passes: the remaining timeout it was sent with, plus [`STANDBY_GRACE`] (the
//!   master re-sends its flows periodically, so a live flow never reaches it).
//!
//! Persistence templates are carried by the protocol but not held here yet: the gateway's
//! services keep their templates inside the balancer, which exports none (they are counted
//! as `persistence_ignored`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowsync::{FlowKey, FlowProto, FlowState, TcpPhase, Update};

use crate::flow::{ListenerId, Proto};
use crate::table::FlowImage;
use crate::tcp::TcpState;

/// Added to a standby flow's remaining timeout before it is dropped unrefreshed.
pub const STANDBY_GRACE: Duration = Duration::from_secs(60);

/// Counters of the standby store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandbyStats {
    /// Flow states applied (new or changed).
    pub applied: u64,
    /// Flows removed by their peer.
    pub removed: u64,
    /// New flows refused because the store was full.
    pub over_cap: u64,
    /// Flows dropped because their deadline passed unrefreshed.
    pub expired: u64,
    /// Persistence templates received and not held.
    pub persistence_ignored: u64,
    /// Flows promoted into the table.
    pub promoted: u64,
    /// Flows that could not be promoted (clash with a flow of this node, table full, a
    /// public address this node does not have, a dynamic flow on an endpoint this node's
    /// PAT never allocates: off the overload address, or a port outside `ports`; or a
    /// listener's flow to an inside endpoint that listener does not lead to).
    pub promote_refused: u64,
}

/// What a promotion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Promotion {
    /// Flows now live in the table.
    pub promoted: usize,
    /// Flows this node already had (its own traffic created them first).
    pub already_live: usize,
    /// Flows refused (see [`StandbyStats::promote_refused`]).
    pub refused: usize,
}

#[derive(Debug, Clone, Copy)]
struct Standby {
    state: FlowState,
    deadline: Instant,
}

/// The standby flows of a gateway. See the module docs.
#[derive(Debug)]
pub struct StandbyFlows {
    flows: HashMap<FlowKey, Standby>,
    cap: usize,
    stats: StandbyStats,
}

impl StandbyFlows {
    pub(crate) fn new(cap: usize) -> Self {
        StandbyFlows {
            flows: HashMap::new(),
            cap,
            stats: StandbyStats::default(),
        }
    }

    /// Standby flows held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The bound on standby flows.
    #[must_use]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &StandbyStats {
        &self.stats
    }

    pub(crate) fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    pub(crate) fn count_promotion(&mut self, p: &Promotion) {
        self.stats.promoted += p.promoted as u64;
        self.stats.promote_refused += p.refused as u64;
    }

    /// Applies a peer's changes.
    pub(crate) fn apply(&mut self, now: Instant, updates: &[Update]) {
        for u in updates {
            match u {
                Update::Flow(state) => {
                    if !self.flows.contains_key(&state.key) && self.flows.len() >= self.cap {
                        self.expire(now);
                        if self.flows.len() >= self.cap {
                            self.stats.over_cap += 1;
                            continue;
                        }
                    }
                    let deadline =
                        now + Duration::from_secs(u64::from(state.expires_in_secs)) + STANDBY_GRACE;
                    self.flows.insert(
                        state.key,
                        Standby {
                            state: *state,
                            deadline,
                        },
                    );
                    self.stats.applied += 1;
                }
                Update::FlowGone(key) => {
                    if self.flows.remove(key).is_some() {
                        self.stats.removed += 1;
                    }
                }
                Update::Persist(_) | Update::PersistGone(_) => {
                    self.stats.persistence_ignored += 1;
                }
            }
        }
    }

    /// Drops the flows whose deadline passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        let before = self.flows.len();
        self.flows.retain(|_, s| s.deadline > now);
        self.stats.expired += (before - self.flows.len()) as u64;
    }

    /// Takes every unexpired standby flow out of the store, as table images.
    pub(crate) fn take_all(&mut self, now: Instant) -> Vec<FlowImage> {
        self.expire(now);
        self.flows
            .drain()
            .map(|(_, s)| image_of(&s.state))
            .collect()
    }
}

fn proto_of(p: FlowProto) -> Proto {
    match p {
        FlowProto::Tcp => Proto::Tcp,
        FlowProto::Udp => Proto::Udp,
        FlowProto::Icmp => Proto::Icmp,
    }
}

fn flow_proto(p: Proto) -> FlowProto {
    match p {
        Proto::Tcp => FlowProto::Tcp,
        Proto::Udp => FlowProto::Udp,
        Proto::Icmp => FlowProto::Icmp,
    }
}

fn tcp_state(p: TcpPhase) -> TcpState {
    match p {
        TcpPhase::None => TcpState::None,
        TcpPhase::SynSent => TcpState::SynSent,
        TcpPhase::SynRecv => TcpState::SynRecv,
        TcpPhase::Established => TcpState::Established,
        TcpPhase::FinWait => TcpState::FinWait,
        TcpPhase::CloseWait => TcpState::CloseWait,
        TcpPhase::LastAck => TcpState::LastAck,
        TcpPhase::TimeWait => TcpState::TimeWait,
        TcpPhase::Close => TcpState::Close,
    }
}

fn tcp_phase(s: TcpState) -> TcpPhase {
    match s {
        TcpState::None => TcpPhase::None,
        TcpState::SynSent => TcpPhase::SynSent,
        TcpState::SynRecv => TcpPhase::SynRecv,
        TcpState::Established => TcpPhase::Established,
        TcpState::FinWait => TcpPhase::FinWait,
        TcpState::CloseWait => TcpPhase::CloseWait,
        TcpState::LastAck => TcpPhase::LastAck,
        TcpState::TimeWait => TcpPhase::TimeWait,
        TcpState::Close => TcpPhase::Close,
    }
}

/// The key of a removed flow, as sync names it.
pub(crate) fn flow_key(
    proto: Proto,
    public: std::net::SocketAddrV4,
    outside: std::net::SocketAddrV4,
) -> FlowKey {
    FlowKey {
        proto: flow_proto(proto),
        public,
        outside,
    }
}

/// A table image as sync sends it.
pub(crate) fn state_of(img: &FlowImage) -> FlowState {
    FlowState {
        key: flow_key(img.proto, img.public, img.outside),
        inside: img.inside,
        listener: img.listener.map(|l| l.0),
        tcp: if img.proto == Proto::Tcp {
            tcp_phase(img.tcp)
        } else {
            TcpPhase::None
        },
        first_fin_from_originator: img.first_fin_orig,
        from_inside: img.from_inside,
        replied: img.replied,
        assured: img.assured,
        expires_in_secs: img.expires_in_secs.min(flowsync::MAX_EXPIRES_SECS),
    }
}

/// A synced flow as the table installs it.
fn image_of(s: &FlowState) -> FlowImage {
    FlowImage {
        proto: proto_of(s.key.proto),
        inside: s.inside,
        public: s.key.public,
        outside: s.key.outside,
        listener: s.listener.map(ListenerId),
        tcp: tcp_state(s.tcp),
        first_fin_orig: s.first_fin_from_originator,
        from_inside: s.from_inside,
        replied: s.replied,
        assured: s.assured,
        expires_in_secs: s.expires_in_secs,
    }
}
