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
//! Standby persistence templates (a service's client network → backend, `balance`'s) live
//! beside the standby flows under the same rules: at most `cap` of them (past that a new one
//! is refused and counted, `templates_over_cap`), outside every bound of the pools (a pool's
//! `MAX_TEMPLATES` applies when they are installed, at promotion), replaced by a newer state,
//! removed by their peer, dropped when the time they had left runs out.
//!
//! Locality entries (an `lblc`/`lblcr` service's destination → backends) are not held here:
//! a backup schedules nothing, so the gateway installs them into their service's pool as
//! they arrive (bounded and expiring there as the pool's own, `balance::MAX_LOCALITY_ENTRIES`
//! a service) and removes them when their peer does, and only counts them here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowsync::{
    FlowKey, FlowProto, FlowState, LocalityKey, LocalityState, PersistKey, PersistState, TcpPhase,
    Update,
};

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
    /// Persistence template states applied (new or changed).
    pub templates_applied: u64,
    /// Persistence templates removed by their peer.
    pub templates_removed: u64,
    /// New persistence templates refused because the store was full.
    pub templates_over_cap: u64,
    /// Persistence templates dropped because their time ran out before a promotion.
    pub templates_expired: u64,
    /// Persistence templates installed into their service's pool at a promotion.
    pub templates_installed: u64,
    /// Persistence templates a promotion could not install: no such service, a service
    /// without persistence, a backend the service does not have (matched by address), or a
    /// pool already holding its `balance::MAX_TEMPLATES`.
    pub templates_refused: u64,
    /// Flows promoted into the table.
    pub promoted: u64,
    /// Flows that could not be promoted (clash with a flow of this node, table full, a
    /// public address this node does not have, a dynamic flow on an endpoint this node's
    /// PAT never allocates: off the overload address, or a port outside `ports`; or a
    /// listener's flow to an inside endpoint that listener does not lead to).
    pub promote_refused: u64,
    /// Locality entries installed into their service's pool (new or replaced).
    pub locality_installed: u64,
    /// Locality entries refused: no such service, a service whose scheduler is not
    /// `lblc`/`lblcr`, a backend the service does not have (matched by address), or a
    /// destination table full of entries none of which is idle long enough to reclaim; and
    /// removals for no such service or a destination its pool holds no entry for.
    pub locality_refused: u64,
    /// Locality entries removed from their service's pool because their peer removed them.
    pub locality_removed: u64,
}

/// What became of a peer's locality record ([`StandbyStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalityOutcome {
    /// An entry installed (`locality_installed`).
    Installed,
    /// An entry removed (`locality_removed`).
    Removed,
    /// An entry or a removal refused (`locality_refused`).
    Refused,
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
    /// Persistence templates installed into their service's pool.
    pub templates: usize,
    /// Persistence templates the pool had already (its own traffic made them first).
    pub templates_already_live: usize,
    /// Persistence templates refused (see [`StandbyStats::templates_refused`]).
    pub templates_refused: usize,
}

#[derive(Debug, Clone, Copy)]
struct Standby {
    state: FlowState,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy)]
struct StandbyTemplate {
    backend: std::net::SocketAddrV4,
    /// When its time runs out.
    expires: Instant,
}

/// A standby persistence template ready to install: where, and with how much time left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TemplateToInstall {
    pub(crate) listener: ListenerId,
    pub(crate) image: balance::TemplateImage,
}

/// The standby flows (and persistence templates) of a gateway. See the module docs.
#[derive(Debug)]
pub struct StandbyFlows {
    flows: HashMap<FlowKey, Standby>,
    templates: HashMap<PersistKey, StandbyTemplate>,
    cap: usize,
    stats: StandbyStats,
}

impl StandbyFlows {
    pub(crate) fn new(cap: usize) -> Self {
        StandbyFlows {
            flows: HashMap::new(),
            templates: HashMap::new(),
            cap,
            stats: StandbyStats::default(),
        }
    }

    /// Standby persistence templates held (bounded by [`StandbyFlows::cap`] too).
    #[must_use]
    pub fn templates(&self) -> usize {
        self.templates.len()
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

    pub(crate) fn count_locality(&mut self, outcome: LocalityOutcome) {
        match outcome {
            LocalityOutcome::Installed => self.stats.locality_installed += 1,
            LocalityOutcome::Removed => self.stats.locality_removed += 1,
            LocalityOutcome::Refused => self.stats.locality_refused += 1,
        }
    }

    pub(crate) fn count_promotion(&mut self, p: &Promotion) {
        self.stats.promoted += p.promoted as u64;
        self.stats.promote_refused += p.refused as u64;
        self.stats.templates_installed += p.templates as u64;
        self.stats.templates_refused += p.templates_refused as u64;
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
                Update::Persist(t) => self.apply_template(now, t),
                Update::PersistGone(key) => {
                    if self.templates.remove(key).is_some() {
                        self.stats.templates_removed += 1;
                    }
                }
                // Installed into (removed from) the pools by the gateway.
                Update::Locality(_) | Update::LocalityGone(_) => {}
            }
        }
    }

    fn apply_template(&mut self, now: Instant, t: &PersistState) {
        if !self.templates.contains_key(&t.key) && self.templates.len() >= self.cap {
            self.expire(now);
            if self.templates.len() >= self.cap {
                self.stats.templates_over_cap += 1;
                return;
            }
        }
        self.templates.insert(
            t.key,
            StandbyTemplate {
                backend: t.backend,
                expires: now + Duration::from_secs(u64::from(t.expires_in_secs)),
            },
        );
        self.stats.templates_applied += 1;
    }

    /// Drops the flows whose deadline passed, and the templates whose time ran out.
    pub(crate) fn expire(&mut self, now: Instant) {
        let before = self.flows.len();
        self.flows.retain(|_, s| s.deadline > now);
        self.stats.expired += (before - self.flows.len()) as u64;
        let before = self.templates.len();
        self.templates.retain(|_, t| t.expires > now);
        self.stats.templates_expired += (before - self.templates.len()) as u64;
    }

    /// Takes every standby template with time left out of the store.
    pub(crate) fn take_templates(&mut self, now: Instant) -> Vec<TemplateToInstall> {
        self.expire(now);
        self.templates
            .drain()
            .map(|(key, t)| TemplateToInstall {
                listener: ListenerId(key.listener),
                image: balance::TemplateImage {
                    client: key.client,
                    backend: t.backend,
                    remaining: t.expires.saturating_duration_since(now),
                },
            })
            .collect()
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

/// A service's persistence template as sync sends it.
pub(crate) fn template_state(listener: ListenerId, t: &balance::TemplateImage) -> PersistState {
    // Whole seconds, rounded up: a template in force is never sent as expired.
    let secs = t.remaining.as_secs() + u64::from(t.remaining.subsec_nanos() > 0);
    PersistState {
        key: PersistKey {
            listener: listener.0,
            client: t.client,
        },
        backend: t.backend,
        expires_in_secs: u32::try_from(secs)
            .unwrap_or(u32::MAX)
            .min(flowsync::MAX_EXPIRES_SECS),
    }
}

/// A removed persistence template as sync names it.
pub(crate) fn template_key(listener: ListenerId, client: std::net::Ipv4Addr) -> PersistKey {
    PersistKey {
        listener: listener.0,
        client,
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

/// A service's destination entry as sync sends it (at most `MAX_LOCALITY_BACKENDS` of its
/// backends, the most recently added).
pub(crate) fn locality_state(listener: ListenerId, e: &balance::LocalityImage) -> LocalityState {
    let secs = |d: Duration| {
        u32::try_from(d.as_secs())
            .unwrap_or(u32::MAX)
            .min(flowsync::MAX_EXPIRES_SECS)
    };
    LocalityState {
        key: LocalityKey {
            listener: listener.0,
            dest: e.dest,
        },
        backends: e
            .backends
            .iter()
            .take(flowsync::MAX_LOCALITY_BACKENDS)
            .copied()
            .collect(),
        idle_secs: secs(e.idle),
        unchanged_secs: secs(e.unchanged),
    }
}

/// A synced destination entry as a pool installs it.
pub(crate) fn locality_image(s: &LocalityState) -> balance::LocalityImage {
    balance::LocalityImage {
        dest: s.key.dest,
        backends: s.backends.clone(),
        idle: Duration::from_secs(u64::from(s.idle_secs)),
        unchanged: Duration::from_secs(u64::from(s.unchanged_secs)),
    }
}
