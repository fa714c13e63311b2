//! `PatTable`: the bounded translation table (conntrack) of the gateway.
//!
//! Two levels, as RFC 4787 describes them:
//! - a **mapping** binds an inside endpoint `(proto, inside ip, inside port)` to a public
//!   endpoint `(proto, public ip, public port)`. Dynamic mappings are endpoint-independent
//!   (REQ-1): every flow of one inside endpoint uses the same public port. Mappings made for a
//!   listener (a static forward or a virtual service) are created per inside endpoint the
//!   listener chose, so every flow knows its own inside endpoint.
//! - a **session** is one flow `(mapping, remote ip, remote port)`: it carries the TCP state,
//!   the idle deadline, and is what filtering looks at. The public endpoint plus the remote
//!   endpoint identify a session in both directions, so one hash index serves both.
//!
//! Memory is compact on purpose (`Mapping` 20 bytes, `Session` 28 bytes, two hash indexes of
//! 16-byte entries): the bench target is ≤ 128 bytes per flow at 100,000 flows. Slabs grow by a
//! quarter at a time instead of doubling for the same reason.
//!
//! TCP flows are tracked as conntrack does ([`crate::tcp`]): states with their own timeouts,
//! a window per direction, RSTs checked against it.
//!
//! Half-open ("unassured") sessions: a TCP flow before its handshake completed, a UDP or
//! ICMP flow before its first reply. Each sits on an age-ordered list of its class (flows
//! opened from the inside; inbound flows to dynamic mappings; the inbound flows of each
//! listener) until it is assured or removed. Invariants: a session is on exactly one list
//! while unassured and on none once assured; `half_open_sources` counts the unassured
//! inbound sessions per source network; when the table is full (or a listener at its
//! half-open bound) the oldest session of the longest list (or of that listener's list) is
//! removed first, so established flows are never evicted for new ones.
//!
//! Expiry uses a hashed timer wheel of one-second slots with lazy refresh: a packet only
//! stores a new deadline in its session; when the slot of the old deadline comes round the
//! session is moved to the slot of its current deadline. So per packet the cost is one store,
//! and per second only the sessions of one slot are looked at — never the whole table.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::error::DropReason;
use crate::flow::{ListenerId, Proto};
use crate::tcp::{Outcome, Segment, TcpState, Tracker};

pub(crate) mod sync;

pub(crate) use sync::{FlowChange, FlowImage, InstallError, JournalDrain};

/// "No entry" in the intrusive lists.
const NIL: u32 = u32::MAX;
/// `Mapping::listener` of a dynamic mapping (kept as a bare `u16` so a mapping stays small;
/// it never leaves this module: the rest of the crate sees `Option<ListenerId>`).
const NO_LISTENER: u16 = u16::MAX;
/// Listener ids run below this bound (the last `u16` is `NO_LISTENER`).
pub(crate) const LISTENER_LIMIT: usize = NO_LISTENER as usize;
/// Number of one-second wheel slots (a power of two larger than the common timeouts).
const SLOTS: u32 = 8192;

/// Ports tried before a new mapping is refused as [`DropReason::PortsExhausted`].
const MAX_PORT_PROBES: u32 = 4096;

/// Keys of the mapping index: inside endpoint → mapping, public endpoint → owner.
const KIND_INSIDE: u64 = 0;
const KIND_PUBLIC: u64 = 1 << 62;
/// Tag on a public-endpoint owner that is a listener, not a mapping.
const OWNER_LISTENER: u32 = 1 << 31;

/// Tag of `Session::wheel_prev` on the first session of a slot.
const HEAD: u32 = 1 << 31;

/// Mapping flag bits.
const M_PERMANENT: u8 = 0x80;

/// Session flag: opened by an inside host (counts toward its per-host limit).
const S_FROM_INSIDE: u8 = 0x01;
/// Session flag: a packet went the other way (the responder answered).
const S_REPLIED: u8 = 0x02;
/// Session flag: assured (established, or answered): off the half-open lists.
const S_ASSURED: u8 = 0x04;
/// Session flag: taken over in the middle of a connection this table never saw start
/// ([`PatTable::adopt_session`]) and not confirmed yet: not counted as established, on the
/// half-open list with a transitory timeout, until the side that did not send the adopted
/// segment sends too (or, on a one-way flow, the client sends a second segment).
const S_ADOPTED: u8 = 0x08;
/// Session flag: a one-way adopted session's first segment was tracked.
const S_ADOPTED_SEEN: u8 = 0x10;
/// Session flag: the adopted segment came from the responder (a backend's reply), so the
/// originator's next segment confirms the session.
const S_ADOPTED_BY_REPLY: u8 = 0x20;

/// Half-open class of the sessions opened by inside hosts.
const CLASS_OUTBOUND: usize = 0;
/// Half-open class of inbound sessions to dynamic mappings.
const CLASS_INBOUND_DYNAMIC: usize = 1;
/// Listener `l`'s half-open class is `CLASS_LISTENER + l`.
const CLASS_LISTENER: usize = 2;

/// conntrack's timeouts of the TCP states that are not established (seconds).
const SYN_SENT_SECS: u64 = 120;
const SYN_RECV_SECS: u64 = 60;
const FIN_WAIT_SECS: u64 = 120;
const CLOSE_WAIT_SECS: u64 = 60;
const LAST_ACK_SECS: u64 = 30;
const TIME_WAIT_SECS: u64 = 120;
const CLOSE_SECS: u64 = 10;

/// A mapping's slot in the table's mapping slab (valid while the mapping lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MappingId(u32);

/// A session's slot in the table's session slab (valid while the session lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionId(u32);

/// Index of a public address of the gateway (at most 255 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublicIdx(u8);

fn listener_of(raw: u16) -> Option<ListenerId> {
    (raw != NO_LISTENER).then_some(ListenerId(raw))
}

fn raw_listener(l: Option<ListenerId>) -> u16 {
    l.map_or(NO_LISTENER, |l| l.0)
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

/// An age-ordered list of half-open sessions (oldest first), linked through
/// `Session::age_prev/age_next`.
#[derive(Debug, Clone, Copy)]
struct AgeList {
    oldest: u32,
    newest: u32,
    len: u32,
}

const EMPTY_LIST: AgeList = AgeList {
    oldest: NIL,
    newest: NIL,
    len: 0,
};

#[derive(Debug, Clone, Copy)]
struct Mapping {
    inside_ip: u32,
    inside_port: u16,
    public_port: u16,
    /// Protocol code in the low bits, `M_PERMANENT` on top.
    proto_flags: u8,
    public_idx: u8,
    listener: u16,
    sessions: u32,
    /// Sessions of this mapping opened from the outside.
    inbound: u32,
    /// First session of this mapping (doubly linked through `Session::next/prev`); reused as
    /// the free-list link while the slot is free.
    head: u32,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    mapping: u32,
    remote_ip: u32,
    /// Idle deadline in ticks (seconds since the table's epoch).
    expires: u32,
    /// Next session in the same wheel slot; free-list link while the slot is free.
    wheel_next: u32,
    /// Previous session in the wheel slot, or `HEAD | slot` for the first one. Needed only
    /// when a deadline moves earlier (TCP closing), which lazy refresh cannot handle.
    wheel_prev: u32,
    next: u32,
    prev: u32,
    /// Neighbours on the half-open list of its class (NIL once assured).
    age_prev: u32,
    age_next: u32,
    remote_port: u16,
    flags: u8,
    tcp: Tracker,
}

/// Index of a session: public endpoint plus remote endpoint (the same in both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey {
    remote_ip: u32,
    ports: u32,
    proto_public: u32,
}

impl SessionKey {
    fn new(proto: Proto, public_idx: PublicIdx, public_port: u16, remote: SocketAddrV4) -> Self {
        SessionKey {
            remote_ip: u32::from(*remote.ip()),
            ports: (u32::from(public_port) << 16) | u32::from(remote.port()),
            proto_public: (u32::from(proto.code()) << 8) | u32::from(public_idx.0),
        }
    }
}

/// A seeded hasher: keys contain attacker-chosen remote addresses and ports, so the table
/// must not use a fixed hash function. (splitmix64 finalizer over a per-table seed.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeededState(u64);

impl BuildHasher for SeededState {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(self.0)
    }
}

pub(crate) struct MixHasher(u64);

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = mix(self.0 ^ u64::from(*b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = mix(self.0 ^ u64::from(v)).rotate_left(17);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix(self.0 ^ v);
    }
    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// Who owns a public endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublicOwner {
    /// A mapping (dynamic, or the permanent mapping of a static forward).
    Mapping(MappingId),
    /// A listener: new inbound flows ask its selector for the inside endpoint.
    Listener(ListenerId),
}

/// A read-only view of one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MappingView {
    pub(crate) proto: Proto,
    pub(crate) inside: SocketAddrV4,
    pub(crate) public_idx: PublicIdx,
    pub(crate) public_port: u16,
    pub(crate) listener: Option<ListenerId>,
}

/// What changed about a session's TCP state after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateChange {
    None,
    /// Became established (LVS counts it as an active connection).
    Established,
    /// Left established (a FIN or RST: an inactive connection).
    Closing,
}

/// The half-open bounds of a [`PatTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HalfOpenLimits {
    /// Inbound half-open sessions per listener (the oldest makes room).
    pub(crate) per_listener: usize,
    /// Inbound half-open sessions per source network (more are refused).
    pub(crate) per_source: usize,
    /// Prefix length of a source network.
    pub(crate) source_prefix: u8,
    /// Sessions opened from the outside per dynamic mapping.
    pub(crate) inbound_per_mapping: usize,
}

/// A session that was removed, with what observers need to know about it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemovedSession {
    pub(crate) mapping: MappingView,
    /// The outside endpoint of the session (a virtual service's client).
    pub(crate) remote: SocketAddrV4,
    pub(crate) was_established: bool,
}

/// One line of `show nat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Translation {
    /// Protocol.
    pub proto: Proto,
    /// Inside local (the inside host's own endpoint).
    #[cfg_attr(feature = "serde", serde(rename = "inside_local"))]
    pub inside: SocketAddrV4,
    /// Inside global (the public endpoint it appears as).
    #[cfg_attr(feature = "serde", serde(rename = "inside_global"))]
    pub public: SocketAddrV4,
    /// Outside (the remote endpoint).
    pub outside: SocketAddrV4,
    /// TCP: established; others: always false.
    pub established: bool,
    /// Time until the entry expires if idle.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "expires_in_ms", with = "netutil::serde_ms")
    )]
    pub expires_in: Duration,
    /// The listener (static forward or service) that created it, if any.
    pub listener: Option<ListenerId>,
}

/// Configuration of a [`PatTable`] (a subset of [`crate::GatewayConfig`]).
#[derive(Debug, Clone)]
pub(crate) struct TableConfig {
    pub(crate) timeouts: Timeouts,
    pub(crate) max_sessions: usize,
    pub(crate) max_per_host: usize,
    pub(crate) port_range: RangeInclusive<u16>,
    pub(crate) seed: u64,
    pub(crate) half_open: HalfOpenLimits,
}

/// The bounded translation table. See the module docs.
#[derive(Debug)]
pub struct PatTable {
    epoch: Instant,
    cfg: TableConfig,
    publics: Vec<Ipv4Addr>,
    mappings: Vec<Mapping>,
    free_mapping: u32,
    sessions: Vec<Session>,
    free_session: u32,
    index: HashMap<u64, u32, SeededState>,
    flows: HashMap<SessionKey, u32, SeededState>,
    per_host: HashMap<u32, u32, SeededState>,
    /// (mapping << 32 | remote ip) → sessions of that dynamic mapping with that remote
    /// address (address-dependent filtering without walking the mapping's sessions).
    remote_ips: HashMap<u64, u32, SeededState>,
    /// Source network → unassured inbound sessions from it.
    half_open_sources: HashMap<u32, u32, SeededState>,
    /// Half-open lists, indexed by class (see `CLASS_*`).
    classes: Vec<AgeList>,
    /// Sessions removed to make room, for the gateway to report (drained by `take_evicted`).
    evicted: Vec<RemovedSession>,
    wheel: Vec<u32>,
    /// Next tick the wheel has not processed yet.
    cursor: u32,
    live_sessions: usize,
    live_mappings: usize,
    rng: u64,
    /// Flows created, changed and removed since flow sync last took them (off by default).
    journal: sync::Journal,
    /// Listeners whose flows the gateway sees one direction of (direct-routing services),
    /// indexed by listener id: tracked by the input-only rules, assured without a reply.
    one_way: Vec<bool>,
}

fn tick_secs(d: Duration) -> u32 {
    // Round up so that an entry never expires before its configured timeout.
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(s).unwrap_or(u32::MAX / 2).max(1)
}

impl PatTable {
    pub(crate) fn new(now: Instant, cfg: TableConfig) -> Self {
        let hasher = SeededState(cfg.seed);
        PatTable {
            epoch: now,
            publics: Vec::new(),
            mappings: Vec::new(),
            free_mapping: NIL,
            sessions: Vec::new(),
            free_session: NIL,
            index: HashMap::with_hasher(hasher),
            flows: HashMap::with_hasher(SeededState(mix(cfg.seed ^ 0x51))),
            per_host: HashMap::with_hasher(SeededState(mix(cfg.seed ^ 0x52))),
            remote_ips: HashMap::with_hasher(SeededState(mix(cfg.seed ^ 0x53))),
            half_open_sources: HashMap::with_hasher(SeededState(mix(cfg.seed ^ 0x54))),
            classes: vec![EMPTY_LIST; CLASS_LISTENER],
            evicted: Vec::new(),
            wheel: vec![NIL; SLOTS as usize],
            cursor: 0,
            live_sessions: 0,
            live_mappings: 0,
            rng: mix(cfg.seed ^ 0x5eed),
            journal: sync::Journal::default(),
            one_way: Vec::new(),
            cfg,
        }
    }

    /// New timeouts and bounds. Open flows keep their current deadline until their next
    /// packet; flows above a lowered bound stay until they end (only new flows are refused).
    pub(crate) fn set_config(&mut self, cfg: TableConfig) {
        self.cfg = TableConfig {
            seed: self.cfg.seed,
            ..cfg
        };
    }

    fn tick(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX / 2)
    }

    /// Index of a public address, registering it on first use (at most 255 addresses).
    pub(crate) fn public_index(&mut self, addr: Ipv4Addr) -> Option<PublicIdx> {
        if let Some(i) = self.find_public(addr) {
            return Some(i);
        }
        let i = u8::try_from(self.publics.len())
            .ok()
            .filter(|i| *i < u8::MAX)?;
        self.publics.push(addr);
        Some(PublicIdx(i))
    }

    /// Index of a known public address.
    pub(crate) fn find_public(&self, addr: Ipv4Addr) -> Option<PublicIdx> {
        self.publics
            .iter()
            .position(|a| *a == addr)
            .and_then(|i| u8::try_from(i).ok())
            .map(PublicIdx)
    }

    pub(crate) fn public_addr(&self, idx: PublicIdx) -> Ipv4Addr {
        self.publics[usize::from(idx.0)]
    }

    fn inside_key(proto: Proto, inside: SocketAddrV4) -> u64 {
        KIND_INSIDE
            | (u64::from(proto.code()) << 56)
            | (u64::from(u32::from(*inside.ip())) << 16)
            | u64::from(inside.port())
    }

    fn public_key(proto: Proto, idx: PublicIdx, port: u16) -> u64 {
        KIND_PUBLIC | (u64::from(proto.code()) << 56) | (u64::from(idx.0) << 16) | u64::from(port)
    }

    /// The mapping of an inside endpoint.
    pub(crate) fn mapping_of_inside(
        &self,
        proto: Proto,
        inside: SocketAddrV4,
    ) -> Option<MappingId> {
        self.index
            .get(&Self::inside_key(proto, inside))
            .copied()
            .map(MappingId)
    }

    /// The owner of a public endpoint.
    pub(crate) fn public_owner(
        &self,
        proto: Proto,
        idx: PublicIdx,
        port: u16,
    ) -> Option<PublicOwner> {
        self.index
            .get(&Self::public_key(proto, idx, port))
            .map(|v| {
                if v & OWNER_LISTENER != 0 {
                    PublicOwner::Listener(ListenerId((v & 0xffff) as u16))
                } else {
                    PublicOwner::Mapping(MappingId(*v))
                }
            })
    }

    /// Reserves a public endpoint for a listener. False if it is taken.
    pub(crate) fn add_listener(
        &mut self,
        proto: Proto,
        idx: PublicIdx,
        port: u16,
        id: ListenerId,
    ) -> bool {
        let key = Self::public_key(proto, idx, port);
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key, OWNER_LISTENER | u32::from(id.0));
        true
    }

    /// Gives back the public endpoints `ports` of listener `id` (no new flow reaches it
    /// there; its flows stay).
    pub(crate) fn release_listener_ports(
        &mut self,
        proto: Proto,
        idx: PublicIdx,
        ports: &[u16],
        id: ListenerId,
    ) {
        for &port in ports {
            let key = Self::public_key(proto, idx, port);
            if self.index.get(&key) == Some(&(OWNER_LISTENER | u32::from(id.0))) {
                self.index.remove(&key);
            }
        }
    }

    /// Marks listener `id`'s flows as seen in one direction only (see [`crate::tcp`]'s
    /// input-only tracking), or not.
    pub(crate) fn set_one_way(&mut self, id: ListenerId, one_way: bool) {
        let i = usize::from(id.0);
        if self.one_way.len() <= i {
            self.one_way.resize(i + 1, false);
        }
        self.one_way[i] = one_way;
    }

    /// Whether mapping `m` belongs to a one-way listener.
    fn one_way(&self, m: u32) -> bool {
        let l = self.mappings[m as usize].listener;
        l != NO_LISTENER && self.one_way.get(usize::from(l)).copied().unwrap_or(false)
    }

    /// Removes a listener: its public endpoint, every flow it opened and every mapping it made
    /// (its permanent one included), calling `on_removed` for each flow. Other flows are not
    /// touched. Costs one pass over the mapping slab (a reload, not a packet path).
    pub(crate) fn remove_listener(
        &mut self,
        proto: Proto,
        idx: PublicIdx,
        ports: &[u16],
        id: ListenerId,
        mut on_removed: impl FnMut(RemovedSession),
    ) {
        self.release_listener_ports(proto, idx, ports, id);
        self.set_one_way(id, false);
        for m in 0..u32::try_from(self.mappings.len()).unwrap_or(u32::MAX) {
            if self.mappings[m as usize].listener != id.0 || !self.mapping_live(m) {
                continue;
            }
            let mut s = self.mappings[m as usize].head;
            while s != NIL {
                let next = self.sessions[s as usize].next;
                self.unlink_wheel(s);
                on_removed(self.remove_session(s));
                s = next;
            }
            // A permanent mapping outlives its last session; this one goes too.
            if self.mapping_live(m) {
                self.remove_mapping(m);
            }
        }
    }

    /// Whether slab slot `m` holds a mapping (free slots keep stale fields).
    fn mapping_live(&self, m: u32) -> bool {
        let v = self.view(m);
        self.index.get(&Self::inside_key(v.proto, v.inside)) == Some(&m)
    }

    pub(crate) fn mapping(&self, m: MappingId) -> MappingView {
        self.view(m.0)
    }

    fn view(&self, m: u32) -> MappingView {
        let m = &self.mappings[m as usize];
        MappingView {
            proto: Proto::from_code(m.proto_flags & 0x3),
            inside: SocketAddrV4::new(Ipv4Addr::from(m.inside_ip), m.inside_port),
            public_idx: PublicIdx(m.public_idx),
            public_port: m.public_port,
            listener: listener_of(m.listener),
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.rng)
    }

    /// A free public port: the inside port if allowed and free (port preservation), otherwise
    /// a random one from the range, probing linearly from a random start (RFC 6056 alg. 1-like).
    fn allocate_port(&mut self, proto: Proto, idx: PublicIdx, preferred: u16) -> Option<u16> {
        let range = if proto == Proto::Icmp {
            0..=u16::MAX
        } else {
            self.cfg.port_range.clone()
        };
        let free = |t: &Self, p: u16| !t.index.contains_key(&Self::public_key(proto, idx, p));
        if range.contains(&preferred) && free(self, preferred) {
            return Some(preferred);
        }
        let (lo, hi) = (u32::from(*range.start()), u32::from(*range.end()));
        if lo > hi {
            return None;
        }
        let size = hi - lo + 1;
        let start = (self.next_random() % u64::from(size)) as u32;
        // Bounded probing: a nearly full range must not cost a scan of 64k ports per new flow
        // (that would make exhaustion a CPU attack). Past the bound the flow is refused.
        (0..size.min(MAX_PORT_PROBES))
            .map(|i| (lo + (start + i) % size) as u16)
            .find(|p| free(self, *p))
    }

    fn alloc_mapping(&mut self, m: Mapping) -> u32 {
        self.live_mappings += 1;
        if self.free_mapping != NIL {
            let i = self.free_mapping;
            self.free_mapping = self.mappings[i as usize].head;
            self.mappings[i as usize] = m;
            return i;
        }
        grow(&mut self.mappings);
        self.mappings.push(m);
        (self.mappings.len() - 1) as u32
    }

    /// Creates a mapping for an inside endpoint. `public_port: None` allocates one (dynamic
    /// PAT); `Some` is used for listeners, whose public endpoint is fixed and already owned by
    /// the listener entry (so only the inside index is written).
    pub(crate) fn create_mapping(
        &mut self,
        proto: Proto,
        inside: SocketAddrV4,
        idx: PublicIdx,
        public_port: Option<u16>,
        listener: Option<ListenerId>,
        permanent: bool,
    ) -> Result<MappingId, DropReason> {
        let inside_key = Self::inside_key(proto, inside);
        if self.index.contains_key(&inside_key) {
            return Err(DropReason::InsideEndpointBusy);
        }
        let port = match public_port {
            Some(p) => p,
            None => self
                .allocate_port(proto, idx, inside.port())
                .ok_or(DropReason::PortsExhausted)?,
        };
        let m = self.alloc_mapping(Mapping {
            inside_ip: u32::from(*inside.ip()),
            inside_port: inside.port(),
            public_port: port,
            proto_flags: proto.code() | if permanent { M_PERMANENT } else { 0 },
            public_idx: idx.0,
            listener: raw_listener(listener),
            sessions: 0,
            inbound: 0,
            head: NIL,
        });
        self.index.insert(inside_key, m);
        if public_port.is_none() {
            self.index.insert(Self::public_key(proto, idx, port), m);
        }
        Ok(MappingId(m))
    }

    fn remove_mapping(&mut self, m: u32) {
        let view = self.view(m);
        self.index
            .remove(&Self::inside_key(view.proto, view.inside));
        if view.listener.is_none() {
            self.index.remove(&Self::public_key(
                view.proto,
                view.public_idx,
                view.public_port,
            ));
        }
        self.mappings[m as usize].head = self.free_mapping;
        self.mappings[m as usize].sessions = 0;
        self.mappings[m as usize].inbound = 0;
        self.free_mapping = m;
        self.live_mappings -= 1;
    }

    /// Removes a mapping that has no session (one made for a flow that was then refused).
    /// The refusal may itself have removed it (early drop evicting its last session): a freed
    /// slot must not go on the free list twice, or two mappings would later share it.
    pub(crate) fn release_unused_mapping(&mut self, m: MappingId) {
        if !self.mapping_live(m.0) {
            return;
        }
        let mapping = &self.mappings[m.0 as usize];
        if mapping.sessions == 0 && mapping.proto_flags & M_PERMANENT == 0 {
            self.remove_mapping(m.0);
        }
    }

    /// The session of a public endpoint and remote endpoint.
    pub(crate) fn session(
        &self,
        proto: Proto,
        idx: PublicIdx,
        public_port: u16,
        remote: SocketAddrV4,
    ) -> Option<SessionId> {
        self.flows
            .get(&SessionKey::new(proto, idx, public_port, remote))
            .copied()
            .map(SessionId)
    }

    pub(crate) fn session_mapping(&self, s: SessionId) -> MappingId {
        MappingId(self.sessions[s.0 as usize].mapping)
    }

    /// Address-dependent filtering: has this dynamic mapping any session with `remote_ip`?
    /// One hash lookup (an index kept per mapping and remote address).
    pub(crate) fn mapping_has_remote_ip(&self, m: MappingId, remote_ip: Ipv4Addr) -> bool {
        self.remote_ips
            .contains_key(&remote_ip_key(m.0, u32::from(remote_ip)))
    }

    /// Whether dynamic mapping `m` may take one more session from the outside.
    fn mapping_accepts_inbound(&self, m: u32) -> bool {
        (self.mappings[m as usize].inbound as usize) < self.cfg.half_open.inbound_per_mapping
    }

    fn source_net(&self, ip: u32) -> u32 {
        let prefix = u32::from(self.cfg.half_open.source_prefix.clamp(1, 32));
        ip & (u32::MAX << (32 - prefix))
    }

    fn class_of(&self, s: u32) -> usize {
        let sess = &self.sessions[s as usize];
        if sess.flags & S_FROM_INSIDE != 0 {
            return CLASS_OUTBOUND;
        }
        match self.mappings[sess.mapping as usize].listener {
            NO_LISTENER => CLASS_INBOUND_DYNAMIC,
            l => CLASS_LISTENER + usize::from(l),
        }
    }

    fn age_push(&mut self, s: u32) {
        let c = self.class_of(s);
        if self.classes.len() <= c {
            self.classes.resize(c + 1, EMPTY_LIST);
        }
        let list = self.classes[c];
        {
            let sess = &mut self.sessions[s as usize];
            sess.age_prev = list.newest;
            sess.age_next = NIL;
        }
        if list.newest != NIL {
            self.sessions[list.newest as usize].age_next = s;
        }
        let list = &mut self.classes[c];
        if list.oldest == NIL {
            list.oldest = s;
        }
        list.newest = s;
        list.len += 1;
    }

    /// Takes an unassured session off its half-open list (and its source network's count).
    fn age_unlink(&mut self, s: u32) {
        let c = self.class_of(s);
        let Session {
            age_prev,
            age_next,
            flags,
            remote_ip,
            ..
        } = self.sessions[s as usize];
        if flags & S_ASSURED != 0 {
            return;
        }
        let Some(list) = self.classes.get_mut(c) else {
            return;
        };
        if age_prev == NIL {
            list.oldest = age_next;
        }
        if age_next == NIL {
            list.newest = age_prev;
        }
        list.len = list.len.saturating_sub(1);
        if age_prev != NIL {
            self.sessions[age_prev as usize].age_next = age_next;
        }
        if age_next != NIL {
            self.sessions[age_next as usize].age_prev = age_prev;
        }
        let sess = &mut self.sessions[s as usize];
        sess.age_prev = NIL;
        sess.age_next = NIL;
        sess.flags |= S_ASSURED;
        if flags & S_FROM_INSIDE == 0 {
            let net = self.source_net(remote_ip);
            if let Some(n) = self.half_open_sources.get_mut(&net) {
                *n -= 1;
                if *n == 0 {
                    self.half_open_sources.remove(&net);
                }
            }
        }
    }

    /// Early drop: removes the oldest half-open session of class `c`. False if it has none.
    fn evict_oldest(&mut self, c: usize) -> bool {
        let Some(s) = self.classes.get(c).map(|l| l.oldest).filter(|s| *s != NIL) else {
            return false;
        };
        self.unlink_wheel(s);
        let removed = self.remove_session(s);
        self.evicted.push(removed);
        true
    }

    /// Early drop when the table is full: the oldest half-open session of the longest list.
    fn evict_for_room(&mut self) -> bool {
        let longest = self
            .classes
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| l.len)
            .filter(|(_, l)| l.len > 0)
            .map(|(c, _)| c);
        longest.is_some_and(|c| self.evict_oldest(c))
    }

    /// Sessions removed to make room since the last call (the gateway reports them).
    pub(crate) fn take_evicted(&mut self) -> Vec<RemovedSession> {
        std::mem::take(&mut self.evicted)
    }

    /// Half-open sessions right now (on any list).
    #[must_use]
    pub fn half_open(&self) -> usize {
        self.classes.iter().map(|l| l.len as usize).sum()
    }

    /// Whether the table is under pressure for a new connection to `listener`: inbound
    /// half-open sessions at half of one of the bounds that concern it or more (the table's
    /// size, the listener's own bound, any source network's), or the table seven eighths
    /// full. Then a decision stated in advance for that listener's SYNs must be withdrawn,
    /// so that a flood meets this table's defences packet by packet (early drop, the
    /// per-source refusal, the full table's refusal) and a data path executing the stated
    /// decision overshoots no bound by more than it opens before the withdrawal reaches it.
    /// Costs one walk of the per-source counts (at most one entry per half-open session).
    pub(crate) fn new_flow_pressure(&self, listener: ListenerId) -> bool {
        let at_half = |n: usize, bound: usize| n.saturating_mul(2) >= bound;
        let own = self
            .classes
            .get(CLASS_LISTENER + usize::from(listener.0))
            .map_or(0, |l| l.len as usize);
        let busiest_source = self.half_open_sources.values().copied().max().unwrap_or(0);
        at_half(self.half_open(), self.cfg.max_sessions)
            || at_half(own, self.cfg.half_open.per_listener)
            || at_half(busiest_source as usize, self.cfg.half_open.per_source)
            || self.live_sessions.saturating_mul(8) >= self.cfg.max_sessions.saturating_mul(7)
    }

    /// Opens a session on mapping `m`. Enforces the table bound and, for flows opened by an
    /// inside host, the per-host bound.
    pub(crate) fn create_session(
        &mut self,
        now: Instant,
        m: MappingId,
        remote: SocketAddrV4,
        from_inside: bool,
    ) -> Result<SessionId, DropReason> {
        let m = m.0;
        let inside_ip = self.mappings[m as usize].inside_ip;
        let listener = self.mappings[m as usize].listener;
        let net = self.source_net(u32::from(*remote.ip()));
        if from_inside {
            if self.per_host.get(&inside_ip).copied().unwrap_or(0) as usize >= self.cfg.max_per_host
            {
                return Err(DropReason::HostLimit);
            }
        } else {
            if self.half_open_sources.get(&net).copied().unwrap_or(0) as usize
                >= self.cfg.half_open.per_source
            {
                return Err(DropReason::HalfOpenSource);
            }
            if listener == NO_LISTENER && !self.mapping_accepts_inbound(m) {
                return Err(DropReason::MappingInboundLimit);
            }
            if listener != NO_LISTENER {
                let c = CLASS_LISTENER + usize::from(listener);
                if self.classes.get(c).map_or(0, |l| l.len as usize)
                    >= self.cfg.half_open.per_listener
                {
                    self.evict_oldest(c);
                }
            }
        }
        if self.live_sessions >= self.cfg.max_sessions && !self.evict_for_room() {
            return Err(DropReason::TableFull);
        }
        // Eviction may have removed mapping `m` with its last session; such a mapping is
        // made again by the caller's next packet, this one is refused.
        if !self.mapping_live(m) {
            return Err(DropReason::TableFull);
        }
        if from_inside {
            *self.per_host.entry(inside_ip).or_insert(0) += 1;
        } else {
            *self.half_open_sources.entry(net).or_insert(0) += 1;
            self.mappings[m as usize].inbound += 1;
        }
        let now_tick = self.tick(now);
        let flags = if from_inside { S_FROM_INSIDE } else { 0 };
        let s = self.insert_session(now_tick, m, remote, flags, Tracker::default());
        Ok(SessionId(s))
    }

    /// Opens a session from `client` on listener mapping `m` for a TCP connection already
    /// under way (stateless adoption), the client as its originator: the same bounds as a
    /// new inbound session (it is half-open until confirmed), tracked as conntrack's
    /// mid-stream pickup (windows unknown), and not established for anyone (services'
    /// counts, the fast path) until the other side of the segment that adopted it
    /// (`by_reply`: the backend's) sends too or, on a one-way flow, the client sends again.
    /// Unconfirmed, it lives for the SYN-RECV timeout, so a stray segment holds nothing for
    /// long.
    pub(crate) fn adopt_session(
        &mut self,
        now: Instant,
        m: MappingId,
        client: SocketAddrV4,
        by_reply: bool,
    ) -> Result<SessionId, DropReason> {
        let s = self.create_session(now, m, client, false)?;
        let sess = &mut self.sessions[s.0 as usize];
        sess.tcp = Tracker::resumed(TcpState::Established, false);
        sess.flags |= S_ADOPTED | if by_reply { S_ADOPTED_BY_REPLY } else { 0 };
        Ok(s)
    }

    /// Whether session `s` counts as an established TCP connection: in that state, and not
    /// an adoption still waiting for confirmation.
    fn counts_established(&self, s: u32) -> bool {
        let sess = &self.sessions[s as usize];
        sess.tcp.state == TcpState::Established
            && sess.flags & S_ADOPTED == 0
            && Proto::from_code(self.mappings[sess.mapping as usize].proto_flags & 0x3)
                == Proto::Tcp
    }

    /// Links a new session into the slab, its mapping, the indexes, the half-open list of its
    /// class (unless `flags` says assured) and the wheel, with the full timeout of its state.
    /// The caller has checked the bounds and counted the session toward them.
    fn insert_session(
        &mut self,
        now_tick: u32,
        m: u32,
        remote: SocketAddrV4,
        flags: u8,
        tcp: Tracker,
    ) -> u32 {
        let view = self.view(m);
        let expires = now_tick.saturating_add(self.timeout_ticks(view.proto, tcp.state));
        let head = self.mappings[m as usize].head;
        let sess = Session {
            mapping: m,
            remote_ip: u32::from(*remote.ip()),
            expires,
            wheel_next: NIL,
            wheel_prev: NIL,
            next: head,
            prev: NIL,
            age_prev: NIL,
            age_next: NIL,
            remote_port: remote.port(),
            flags,
            tcp,
        };
        let s = if self.free_session != NIL {
            let s = self.free_session;
            self.free_session = self.sessions[s as usize].wheel_next;
            self.sessions[s as usize] = sess;
            s
        } else {
            grow(&mut self.sessions);
            self.sessions.push(sess);
            (self.sessions.len() - 1) as u32
        };
        if head != NIL {
            self.sessions[head as usize].prev = s;
        }
        let mapping = &mut self.mappings[m as usize];
        mapping.head = s;
        mapping.sessions += 1;
        self.flows.insert(
            SessionKey::new(view.proto, view.public_idx, view.public_port, remote),
            s,
        );
        if view.listener.is_none() {
            *self
                .remote_ips
                .entry(remote_ip_key(m, u32::from(*remote.ip())))
                .or_insert(0) += 1;
        }
        if flags & S_ASSURED == 0 {
            self.age_push(s);
        }
        self.live_sessions += 1;
        if self.live_sessions == 1 {
            // The wheel was idle: start it at the current tick instead of replaying the gap.
            self.cursor = now_tick;
        }
        self.link_wheel(s, expires);
        self.journal.record(
            SessionKey::new(view.proto, view.public_idx, view.public_port, remote),
            false,
        );
        s
    }

    fn link_wheel(&mut self, s: u32, expires: u32) {
        let slot = expires % SLOTS;
        let first = self.wheel[slot as usize];
        if first != NIL {
            self.sessions[first as usize].wheel_prev = s;
        }
        let sess = &mut self.sessions[s as usize];
        sess.wheel_next = first;
        sess.wheel_prev = HEAD | slot;
        self.wheel[slot as usize] = s;
    }

    fn unlink_wheel(&mut self, s: u32) {
        let Session {
            wheel_next: next,
            wheel_prev: prev,
            ..
        } = self.sessions[s as usize];
        if prev & HEAD != 0 {
            self.wheel[(prev & !HEAD) as usize] = next;
        } else {
            self.sessions[prev as usize].wheel_next = next;
        }
        if next != NIL {
            self.sessions[next as usize].wheel_prev = prev;
        }
    }

    /// The idle timeout of a session: per protocol, per TCP state (conntrack's values for
    /// the states that are not established, each capped by `tcp_transitory`).
    fn timeout_ticks(&self, proto: Proto, tcp: TcpState) -> u32 {
        let t = &self.cfg.timeouts;
        let transitory = |secs: u64| Duration::from_secs(secs).min(t.tcp_transitory);
        tick_secs(match proto {
            Proto::Udp => t.udp,
            Proto::Icmp => t.icmp,
            Proto::Tcp => match tcp {
                TcpState::Established => t.tcp_established,
                TcpState::None | TcpState::SynSent => transitory(SYN_SENT_SECS),
                TcpState::SynRecv => transitory(SYN_RECV_SECS),
                TcpState::FinWait => transitory(FIN_WAIT_SECS),
                TcpState::CloseWait => transitory(CLOSE_WAIT_SECS),
                TcpState::LastAck => transitory(LAST_ACK_SECS),
                TcpState::TimeWait => transitory(TIME_WAIT_SECS),
                TcpState::Close => transitory(CLOSE_SECS),
            },
        })
    }

    /// Records a packet on session `s`, sent by the inside host when `outbound`: TCP state
    /// and window from `seg` (None for UDP and ICMP), a new idle deadline, and whether the
    /// session is now assured.
    ///
    /// # Errors
    /// [`DropReason::RstOutOfWindow`]: a RST outside the window; nothing changed.
    pub(crate) fn touch(
        &mut self,
        now: Instant,
        s: SessionId,
        outbound: bool,
        seg: Option<&Segment>,
    ) -> Result<StateChange, DropReason> {
        let s = s.0;
        let m = self.sessions[s as usize].mapping;
        let proto = Proto::from_code(self.mappings[m as usize].proto_flags & 0x3);
        let flags = self.sessions[s as usize].flags;
        let from_orig = outbound == (flags & S_FROM_INSIDE != 0);
        let before = self.sessions[s as usize].tcp.state;
        let was_established = self.counts_established(s);
        // A one-way flow has no reply: the client's side is all there is to judge.
        let one_way = self.one_way(m);
        if let Some(seg) = seg.filter(|_| proto == Proto::Tcp) {
            if one_way {
                self.sessions[s as usize].tcp.track_input_only(seg.flags);
            } else if self.sessions[s as usize].tcp.track(seg, from_orig) == Outcome::RstOutOfWindow
            {
                return Err(DropReason::RstOutOfWindow);
            }
        }
        let after = self.sessions[s as usize].tcp.state;
        if !from_orig {
            self.sessions[s as usize].flags |= S_REPLIED;
        }
        if flags & S_ADOPTED != 0 {
            self.confirm_adoption(s, one_way, from_orig);
        }
        let adopted = self.sessions[s as usize].flags & S_ADOPTED != 0;
        let replied = one_way || self.sessions[s as usize].flags & S_REPLIED != 0;
        let assured = !adopted
            && match proto {
                Proto::Tcp => replied && after >= TcpState::Established,
                Proto::Udp | Proto::Icmp => replied,
            };
        if assured {
            self.age_unlink(s);
        }
        let timeout_state = if adopted { TcpState::SynRecv } else { after };
        let deadline = self
            .tick(now)
            .saturating_add(self.timeout_ticks(proto, timeout_state));
        let sess = &mut self.sessions[s as usize];
        let earlier = deadline < sess.expires;
        sess.expires = deadline;
        if earlier {
            self.unlink_wheel(s);
            self.link_wheel(s, deadline);
        }
        if before != after || self.sessions[s as usize].flags != flags {
            let key = self.session_key(s);
            self.journal.record(key, false);
        }
        Ok(match (was_established, self.counts_established(s)) {
            (false, true) => StateChange::Established,
            (true, false) => StateChange::Closing,
            _ => StateChange::None,
        })
    }

    /// An adopted session is confirmed by a segment from the side that did not send the
    /// adopted one, or, when the gateway sees one direction only, by the client's second.
    fn confirm_adoption(&mut self, s: u32, one_way: bool, from_orig: bool) {
        let sess = &mut self.sessions[s as usize];
        let confirmed = if one_way {
            let seen = sess.flags & S_ADOPTED_SEEN != 0;
            sess.flags |= S_ADOPTED_SEEN;
            seen
        } else {
            from_orig == (sess.flags & S_ADOPTED_BY_REPLY != 0)
        };
        if confirmed {
            sess.flags &= !(S_ADOPTED | S_ADOPTED_SEEN | S_ADOPTED_BY_REPLY);
        }
    }

    /// Whether TCP session `s` is established.
    pub(crate) fn session_established(&self, s: SessionId) -> bool {
        self.counts_established(s.0)
    }

    /// Whether TCP session `s` has ended (an accepted RST, or the close completed): a new
    /// SYN on its 4-tuple is a new connection reusing the client's port.
    pub(crate) fn session_closed(&self, s: SessionId) -> bool {
        matches!(
            self.sessions[s.0 as usize].tcp.state,
            TcpState::Close | TcpState::TimeWait
        )
    }

    /// Whether TCP session `s` is past its open phase: a FIN was seen (the close began), or
    /// it has ended. It is never established again.
    pub(crate) fn session_closing(&self, s: SessionId) -> bool {
        self.sessions[s.0 as usize].tcp.state > TcpState::Established
    }

    /// Removes session `s` at once (a closed connection replaced by a new one on its 4-tuple).
    pub(crate) fn remove_now(&mut self, s: SessionId) -> RemovedSession {
        self.unlink_wheel(s.0);
        self.remove_session(s.0)
    }

    /// Removes session `s` (and its mapping when that was its last session and the mapping is
    /// not permanent). The session must already be out of the wheel.
    fn remove_session(&mut self, s: u32) -> RemovedSession {
        let was_established = self.counts_established(s);
        self.age_unlink(s);
        let sess = self.sessions[s as usize];
        let view = self.view(sess.mapping);
        let remote = SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port);
        if view.listener.is_none() {
            let key = remote_ip_key(sess.mapping, sess.remote_ip);
            if let Some(n) = self.remote_ips.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.remote_ips.remove(&key);
                }
            }
        }
        if sess.flags & S_FROM_INSIDE == 0 {
            let mapping = &mut self.mappings[sess.mapping as usize];
            mapping.inbound = mapping.inbound.saturating_sub(1);
        }
        let key = SessionKey::new(view.proto, view.public_idx, view.public_port, remote);
        self.flows.remove(&key);
        self.journal.record(key, true);
        if sess.prev != NIL {
            self.sessions[sess.prev as usize].next = sess.next;
        } else {
            self.mappings[sess.mapping as usize].head = sess.next;
        }
        if sess.next != NIL {
            self.sessions[sess.next as usize].prev = sess.prev;
        }
        let mapping = &mut self.mappings[sess.mapping as usize];
        mapping.sessions -= 1;
        if mapping.sessions == 0 && mapping.proto_flags & M_PERMANENT == 0 {
            self.remove_mapping(sess.mapping);
        }
        let inside_ip = u32::from(*view.inside.ip());
        if sess.flags & S_FROM_INSIDE != 0
            && let Some(n) = self.per_host.get_mut(&inside_ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_host.remove(&inside_ip);
            }
        }
        self.sessions[s as usize].wheel_next = self.free_session;
        self.free_session = s;
        self.live_sessions -= 1;
        RemovedSession {
            mapping: view,
            remote,
            was_established,
        }
    }

    /// Expires idle sessions up to `now`, calling `on_removed` for each.
    pub(crate) fn expire(&mut self, now: Instant, mut on_removed: impl FnMut(RemovedSession)) {
        let now_tick = self.tick(now);
        if self.live_sessions == 0 {
            self.cursor = now_tick.saturating_add(1);
            return;
        }
        if now_tick < self.cursor {
            return;
        }
        let steps = (now_tick - self.cursor + 1).min(SLOTS);
        for i in 0..steps {
            let slot = (self.cursor.wrapping_add(i) % SLOTS) as usize;
            let mut s = std::mem::replace(&mut self.wheel[slot], NIL);
            while s != NIL {
                let next = self.sessions[s as usize].wheel_next;
                let expires = self.sessions[s as usize].expires;
                if expires <= now_tick {
                    on_removed(self.remove_session(s));
                } else {
                    self.link_wheel(s, expires);
                }
                s = next;
            }
        }
        self.cursor = now_tick.saturating_add(1);
    }

    /// When [`PatTable::expire`] has work: the start of the next unprocessed tick.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        (self.live_sessions > 0).then(|| self.epoch + Duration::from_secs(u64::from(self.cursor)))
    }

    /// Removes every session (and every non-permanent mapping): `vipgate nat clear`.
    pub(crate) fn clear(&mut self, mut on_removed: impl FnMut(RemovedSession)) {
        for slot in 0..SLOTS as usize {
            let mut s = std::mem::replace(&mut self.wheel[slot], NIL);
            while s != NIL {
                let next = self.sessions[s as usize].wheel_next;
                on_removed(self.remove_session(s));
                s = next;
            }
        }
    }

    /// Number of live sessions (flows).
    #[must_use]
    pub fn len(&self) -> usize {
        self.live_sessions
    }

    /// True when no flow is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.live_sessions == 0
    }

    /// Number of live mappings (including the permanent ones of static forwards).
    #[must_use]
    pub fn mappings(&self) -> usize {
        self.live_mappings
    }

    /// The configured bound on flows.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cfg.max_sessions
    }

    /// Heap bytes held by the table's containers (what the bench divides by the flow count).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        fn map<K, V, S>(m: &HashMap<K, V, S>) -> usize {
            // hashbrown: buckets = capacity * 8 / 7 rounded up to a power of two, one control
            // byte per bucket plus a group of trailing control bytes.
            let cap = m.capacity();
            if cap == 0 {
                return 0;
            }
            let buckets = if cap < 8 {
                cap + 1
            } else {
                (cap * 8 / 7).next_power_of_two()
            };
            buckets * (size_of::<(K, V)>() + 1) + 16
        }
        self.mappings.capacity() * size_of::<Mapping>()
            + self.sessions.capacity() * size_of::<Session>()
            + map(&self.index)
            + map(&self.flows)
            + map(&self.per_host)
            + map(&self.remote_ips)
            + map(&self.half_open_sources)
            + self.classes.capacity() * size_of::<AgeList>()
            + self.wheel.capacity() * size_of::<u32>()
    }

    /// Session `s` as `show nat` and `show lb --connections` list it.
    fn translation(&self, s: u32, now_tick: u32) -> Translation {
        let sess = &self.sessions[s as usize];
        let view = self.view(sess.mapping);
        Translation {
            proto: view.proto,
            inside: view.inside,
            public: SocketAddrV4::new(self.public_addr(view.public_idx), view.public_port),
            outside: SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port),
            established: self.counts_established(s),
            expires_in: Duration::from_secs(u64::from(sess.expires.saturating_sub(now_tick))),
            listener: view.listener,
        }
    }

    /// Every live flow, for `show nat`.
    pub(crate) fn translations(&self, now: Instant) -> Vec<Translation> {
        let now_tick = self.tick(now);
        let mut out = Vec::with_capacity(self.live_sessions);
        for slot in &self.wheel {
            let mut s = *slot;
            while s != NIL {
                out.push(self.translation(s, now_tick));
                s = self.sessions[s as usize].wheel_next;
            }
        }
        out
    }

    /// The live flows `keep` selects, at most `limit` of them, each with its state as
    /// `ipvsadm -Lnc` names it (TCP) or its protocol's name; and how many `keep` selects in
    /// all. For `show lb --connections`: the answer stays bounded however large the table.
    pub(crate) fn translations_where(
        &self,
        now: Instant,
        mut keep: impl FnMut(&Translation) -> bool,
        limit: usize,
    ) -> (Vec<(Translation, &'static str)>, usize) {
        let now_tick = self.tick(now);
        let mut out = Vec::new();
        let mut matched = 0;
        for slot in &self.wheel {
            let mut s = *slot;
            while s != NIL {
                let sess = &self.sessions[s as usize];
                let t = self.translation(s, now_tick);
                if keep(&t) {
                    matched += 1;
                    if out.len() < limit {
                        let state = match t.proto {
                            Proto::Tcp => sess.tcp.state.ipvsadm_name(),
                            Proto::Udp => "UDP",
                            Proto::Icmp => "ICMP",
                        };
                        out.push((t, state));
                    }
                }
                s = sess.wheel_next;
            }
        }
        (out, matched)
    }
}

fn remote_ip_key(m: u32, remote_ip: u32) -> u64 {
    (u64::from(m) << 32) | u64::from(remote_ip)
}

/// Grows a slab by a quarter instead of doubling (memory per flow matters more than the
/// occasional copy).
fn grow<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 4).max(256));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::epoch;

    fn config(max: usize, udp: Duration, seed: u64) -> TableConfig {
        TableConfig {
            timeouts: Timeouts {
                udp,
                ..Timeouts::default()
            },
            max_sessions: max,
            max_per_host: max,
            port_range: 1024..=65535,
            seed,
            half_open: HalfOpenLimits {
                per_listener: max,
                per_source: max,
                source_prefix: 24,
                inbound_per_mapping: max,
            },
        }
    }

    fn table(now: Instant, max: usize, udp_secs: u64) -> (PatTable, PublicIdx) {
        let mut t = PatTable::new(now, config(max, Duration::from_secs(udp_secs), 7));
        let idx = t.public_index(Ipv4Addr::new(198, 51, 100, 1)).unwrap();
        (t, idx)
    }

    fn inside(host: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), port)
    }

    fn remote(n: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 5000 + n)
    }

    /// An outbound UDP flow from `inside` (a new dynamic mapping).
    fn open(
        t: &mut PatTable,
        now: Instant,
        idx: PublicIdx,
        inside: SocketAddrV4,
        n: u16,
    ) -> Result<(MappingId, SessionId), DropReason> {
        let m = t.create_mapping(Proto::Udp, inside, idx, None, None, false)?;
        let s = t.create_session(now, m, remote(n), true)?;
        Ok((m, s))
    }

    fn expire(t: &mut PatTable, at: Instant) -> usize {
        let mut n = 0;
        t.expire(at, |_| n += 1);
        n
    }

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_timeout_longer_than_the_wheel_survives_its_laps() {
        let now = epoch();
        let lap = u64::from(SLOTS);
        let (mut t, idx) = table(now, 16, lap + 100);
        open(&mut t, now, idx, inside(1, 1000), 0).unwrap();
        // The slot of the deadline comes round once before the deadline, and again.
        for at in [lap / 2, lap + 1, lap + 50] {
            assert_eq!(expire(&mut t, now + secs(at)), 0, "expired early at {at} s");
        }
        assert_eq!(t.len(), 1);
        assert_eq!(expire(&mut t, now + secs(lap + 100)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn lazy_refresh_moves_a_session_to_its_new_deadline() {
        let now = epoch();
        let (mut t, idx) = table(now, 16, 60);
        let (_, s) = open(&mut t, now, idx, inside(1, 1000), 0).unwrap();
        // A packet at 50 s only stores the new deadline (110 s).
        t.touch(now + secs(50), s, true, None).unwrap();
        // At the old deadline the session is moved, not removed...
        assert_eq!(expire(&mut t, now + secs(61)), 0);
        assert_eq!(t.len(), 1);
        assert_eq!(t.next_deadline(), Some(now + secs(62)));
        // ...and goes at the new one.
        assert_eq!(expire(&mut t, now + secs(109)), 0);
        assert_eq!(expire(&mut t, now + secs(111)), 1);
    }

    #[test]
    fn slabs_grow_by_a_quarter() {
        let mut v: Vec<u32> = vec![0; 1024];
        grow(&mut v);
        assert_eq!(v.capacity(), 1024 + 256);
        let mut small: Vec<u32> = Vec::new();
        grow(&mut small);
        assert_eq!(small.capacity(), 256, "at least 256 slots at a time");
        let now = epoch();
        let (mut t, idx) = table(now, 1000, 60);
        for n in 0..300 {
            open(&mut t, now, idx, inside(1, 1000 + n), n).unwrap();
        }
        assert_eq!(t.sessions.capacity(), 512);
        assert_eq!(t.mappings.capacity(), 512);
    }

    #[test]
    fn freed_slots_are_reused() {
        let now = epoch();
        let (mut t, idx) = table(now, 16, 60);
        let (m1, s1) = open(&mut t, now, idx, inside(1, 1000), 0).unwrap();
        assert_eq!(expire(&mut t, now + secs(61)), 1);
        assert_eq!(t.mappings(), 0);
        let (m2, s2) = open(&mut t, now + secs(61), idx, inside(2, 2000), 1).unwrap();
        assert_eq!((m2, s2), (m1, s1));
        assert_eq!((t.sessions.len(), t.mappings.len()), (1, 1));
        assert_eq!(t.mapping(m2).inside, inside(2, 2000));
    }

    #[test]
    fn bounds_refuse_new_flows_once_the_old_are_assured() {
        let now = epoch();
        let (mut t, idx) = table(now, 4, 60);
        t.cfg.max_per_host = 3;
        for n in 0..3 {
            let (_, s) = open(&mut t, now, idx, inside(1, 1000 + n), n).unwrap();
            // A reply assures the flow: it is no longer a candidate for early drop.
            t.touch(now, s, false, None).unwrap();
        }
        assert_eq!(
            open(&mut t, now, idx, inside(1, 2000), 9),
            Err(DropReason::HostLimit)
        );
        let (_, s) = open(&mut t, now, idx, inside(2, 1000), 3).unwrap();
        t.touch(now, s, false, None).unwrap();
        assert_eq!(
            open(&mut t, now, idx, inside(3, 1000), 4),
            Err(DropReason::TableFull)
        );
        assert_eq!(t.len(), t.capacity());
    }

    #[test]
    fn hashes_and_ports_follow_the_seed() {
        let now = epoch();
        let ports = |seed: u64| {
            let mut t = PatTable::new(now, config(64, secs(60), seed));
            let idx = t.public_index(Ipv4Addr::new(198, 51, 100, 1)).unwrap();
            // Port 80 is outside the dynamic range: each mapping gets a random port.
            (0..8)
                .map(|h| {
                    let m = t
                        .create_mapping(Proto::Udp, inside(h, 80), idx, None, None, false)
                        .unwrap();
                    t.mapping(m).public_port
                })
                .collect::<Vec<u16>>()
        };
        assert_eq!(ports(7), ports(7));
        assert_ne!(ports(7), ports(8));
        let key = SessionKey::new(Proto::Tcp, PublicIdx(0), 80, remote(1));
        assert_eq!(SeededState(7).hash_one(key), SeededState(7).hash_one(key));
        assert_ne!(SeededState(7).hash_one(key), SeededState(8).hash_one(key));
    }
}
