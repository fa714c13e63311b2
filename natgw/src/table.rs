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
//! Expiry uses a hashed timer wheel of one-second slots with lazy refresh: a packet only
//! stores a new deadline in its session; when the slot of the old deadline comes round the
//! session is moved to the slot of its current deadline. So per packet the cost is one store,
//! and per second only the sessions of one slot are looked at — never the whole table.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::config::{Proto, Timeouts};
use crate::error::DropReason;

/// "No entry" in the intrusive lists and for `Mapping::listener`.
const NIL: u32 = u32::MAX;
/// No listener (dynamic mapping).
pub(crate) const NO_LISTENER: u16 = u16::MAX;
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

/// TCP state bits of a session.
pub(crate) const SYN_OUT: u8 = 0x01;
pub(crate) const SYN_IN: u8 = 0x02;
pub(crate) const FIN_OUT: u8 = 0x04;
pub(crate) const FIN_IN: u8 = 0x08;
pub(crate) const RST: u8 = 0x10;
/// Session flag: opened by an inside host (counts toward its per-host limit).
const S_FROM_INSIDE: u8 = 0x01;

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
    remote_port: u16,
    tcp: u8,
    flags: u8,
}

/// Index of a session: public endpoint plus remote endpoint (the same in both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey {
    remote_ip: u32,
    ports: u32,
    proto_public: u32,
}

impl SessionKey {
    fn new(proto: Proto, public_idx: u8, public_port: u16, remote: SocketAddrV4) -> Self {
        SessionKey {
            remote_ip: u32::from(*remote.ip()),
            ports: (u32::from(public_port) << 16) | u32::from(remote.port()),
            proto_public: (u32::from(proto.code()) << 8) | u32::from(public_idx),
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
    Mapping(u32),
    /// A listener: new inbound flows ask its selector for the inside endpoint.
    Listener(u16),
}

/// A read-only view of one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MappingView {
    pub(crate) proto: Proto,
    pub(crate) inside: SocketAddrV4,
    pub(crate) public_idx: u8,
    pub(crate) public_port: u16,
    pub(crate) listener: Option<u16>,
}

/// What changed about a session's TCP state after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateChange {
    None,
    /// Became established (LVS counts it as an active connection).
    Established,
    /// Left established (FIN both ways or RST: an inactive connection).
    Closing,
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
pub struct Translation {
    /// Protocol.
    pub proto: Proto,
    /// Inside local (the inside host's own endpoint).
    pub inside: SocketAddrV4,
    /// Inside global (the public endpoint it appears as).
    pub public: SocketAddrV4,
    /// Outside (the remote endpoint).
    pub outside: SocketAddrV4,
    /// TCP: established; others: always false.
    pub established: bool,
    /// Seconds until the entry expires if idle.
    pub expires_in: Duration,
    /// The listener (static forward or service) that created it, if any.
    pub listener: Option<u16>,
}

/// Configuration of a [`PatTable`] (a subset of [`crate::GatewayConfig`]).
#[derive(Debug, Clone)]
pub(crate) struct TableConfig {
    pub(crate) timeouts: Timeouts,
    pub(crate) max_sessions: usize,
    pub(crate) max_per_host: usize,
    pub(crate) port_range: RangeInclusive<u16>,
    pub(crate) seed: u64,
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
    wheel: Vec<u32>,
    /// Next tick the wheel has not processed yet.
    cursor: u32,
    live_sessions: usize,
    live_mappings: usize,
    rng: u64,
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
            wheel: vec![NIL; SLOTS as usize],
            cursor: 0,
            live_sessions: 0,
            live_mappings: 0,
            rng: mix(cfg.seed ^ 0x5eed),
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
    pub(crate) fn public_index(&mut self, addr: Ipv4Addr) -> Option<u8> {
        if let Some(i) = self.publics.iter().position(|a| *a == addr) {
            return u8::try_from(i).ok();
        }
        let i = u8::try_from(self.publics.len())
            .ok()
            .filter(|i| *i < u8::MAX)?;
        self.publics.push(addr);
        Some(i)
    }

    /// Index of a known public address.
    pub(crate) fn find_public(&self, addr: Ipv4Addr) -> Option<u8> {
        self.publics
            .iter()
            .position(|a| *a == addr)
            .and_then(|i| u8::try_from(i).ok())
    }

    pub(crate) fn public_addr(&self, idx: u8) -> Ipv4Addr {
        self.publics[usize::from(idx)]
    }

    fn inside_key(proto: Proto, inside: SocketAddrV4) -> u64 {
        KIND_INSIDE
            | (u64::from(proto.code()) << 56)
            | (u64::from(u32::from(*inside.ip())) << 16)
            | u64::from(inside.port())
    }

    fn public_key(proto: Proto, idx: u8, port: u16) -> u64 {
        KIND_PUBLIC | (u64::from(proto.code()) << 56) | (u64::from(idx) << 16) | u64::from(port)
    }

    /// The mapping of an inside endpoint.
    pub(crate) fn mapping_of_inside(&self, proto: Proto, inside: SocketAddrV4) -> Option<u32> {
        self.index.get(&Self::inside_key(proto, inside)).copied()
    }

    /// The owner of a public endpoint.
    pub(crate) fn public_owner(&self, proto: Proto, idx: u8, port: u16) -> Option<PublicOwner> {
        self.index
            .get(&Self::public_key(proto, idx, port))
            .map(|v| {
                if v & OWNER_LISTENER != 0 {
                    PublicOwner::Listener((v & 0xffff) as u16)
                } else {
                    PublicOwner::Mapping(*v)
                }
            })
    }

    /// Reserves a public endpoint for a listener. False if it is taken.
    pub(crate) fn add_listener(&mut self, proto: Proto, idx: u8, port: u16, id: u16) -> bool {
        let key = Self::public_key(proto, idx, port);
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key, OWNER_LISTENER | u32::from(id));
        true
    }

    /// Removes a listener: its public endpoint, every flow it opened and every mapping it made
    /// (its permanent one included), calling `on_removed` for each flow. Other flows are not
    /// touched. Costs one pass over the mapping slab (a reload, not a packet path).
    pub(crate) fn remove_listener(
        &mut self,
        proto: Proto,
        idx: u8,
        port: u16,
        id: u16,
        mut on_removed: impl FnMut(RemovedSession),
    ) {
        let key = Self::public_key(proto, idx, port);
        if self.index.get(&key) == Some(&(OWNER_LISTENER | u32::from(id))) {
            self.index.remove(&key);
        }
        for m in 0..u32::try_from(self.mappings.len()).unwrap_or(u32::MAX) {
            if self.mappings[m as usize].listener != id || !self.mapping_live(m) {
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
        let v = self.mapping(m);
        self.index.get(&Self::inside_key(v.proto, v.inside)) == Some(&m)
    }

    pub(crate) fn mapping(&self, m: u32) -> MappingView {
        let m = &self.mappings[m as usize];
        MappingView {
            proto: Proto::from_code(m.proto_flags & 0x3),
            inside: SocketAddrV4::new(Ipv4Addr::from(m.inside_ip), m.inside_port),
            public_idx: m.public_idx,
            public_port: m.public_port,
            listener: (m.listener != NO_LISTENER).then_some(m.listener),
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.rng)
    }

    /// A free public port: the inside port if allowed and free (port preservation), otherwise
    /// a random one from the range, probing linearly from a random start (RFC 6056 alg. 1-like).
    fn allocate_port(&mut self, proto: Proto, idx: u8, preferred: u16) -> Option<u16> {
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
        idx: u8,
        public_port: Option<u16>,
        listener: u16,
        permanent: bool,
    ) -> Result<u32, DropReason> {
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
            public_idx: idx,
            listener,
            sessions: 0,
            head: NIL,
        });
        self.index.insert(inside_key, m);
        if public_port.is_none() {
            self.index.insert(Self::public_key(proto, idx, port), m);
        }
        Ok(m)
    }

    fn remove_mapping(&mut self, m: u32) {
        let view = self.mapping(m);
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
        self.free_mapping = m;
        self.live_mappings -= 1;
    }

    /// Removes a mapping that has no session (one made for a flow that was then refused).
    pub(crate) fn release_unused_mapping(&mut self, m: u32) {
        let mapping = &self.mappings[m as usize];
        if mapping.sessions == 0 && mapping.proto_flags & M_PERMANENT == 0 {
            self.remove_mapping(m);
        }
    }

    /// The session of a public endpoint and remote endpoint.
    pub(crate) fn session(
        &self,
        proto: Proto,
        idx: u8,
        public_port: u16,
        remote: SocketAddrV4,
    ) -> Option<u32> {
        self.flows
            .get(&SessionKey::new(proto, idx, public_port, remote))
            .copied()
    }

    pub(crate) fn session_mapping(&self, s: u32) -> u32 {
        self.sessions[s as usize].mapping
    }

    /// Address-dependent filtering: has this mapping any session with `remote_ip`?
    /// Walks the mapping's session list (only on the unsolicited-inbound path).
    pub(crate) fn mapping_has_remote_ip(&self, m: u32, remote_ip: Ipv4Addr) -> bool {
        let want = u32::from(remote_ip);
        let mut s = self.mappings[m as usize].head;
        while s != NIL {
            let sess = &self.sessions[s as usize];
            if sess.remote_ip == want {
                return true;
            }
            s = sess.next;
        }
        false
    }

    /// Opens a session on mapping `m`. Enforces the table bound and, for flows opened by an
    /// inside host, the per-host bound.
    pub(crate) fn create_session(
        &mut self,
        now: Instant,
        m: u32,
        remote: SocketAddrV4,
        from_inside: bool,
    ) -> Result<u32, DropReason> {
        if self.live_sessions >= self.cfg.max_sessions {
            return Err(DropReason::TableFull);
        }
        let inside_ip = self.mappings[m as usize].inside_ip;
        if from_inside {
            let n = self.per_host.entry(inside_ip).or_insert(0);
            if *n as usize >= self.cfg.max_per_host {
                return Err(DropReason::HostLimit);
            }
            *n += 1;
        }
        let view = self.mapping(m);
        let now_tick = self.tick(now);
        let expires = now_tick.saturating_add(self.timeout_ticks(view.proto, 0));
        let head = self.mappings[m as usize].head;
        let sess = Session {
            mapping: m,
            remote_ip: u32::from(*remote.ip()),
            expires,
            wheel_next: NIL,
            wheel_prev: NIL,
            next: head,
            prev: NIL,
            remote_port: remote.port(),
            tcp: 0,
            flags: if from_inside { S_FROM_INSIDE } else { 0 },
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
        self.live_sessions += 1;
        if self.live_sessions == 1 {
            // The wheel was idle: start it at the current tick instead of replaying the gap.
            self.cursor = now_tick;
        }
        self.link_wheel(s, expires);
        Ok(s)
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

    fn timeout_ticks(&self, proto: Proto, tcp: u8) -> u32 {
        let t = &self.cfg.timeouts;
        tick_secs(match proto {
            Proto::Udp => t.udp,
            Proto::Icmp => t.icmp,
            Proto::Tcp if is_established(tcp) => t.tcp_established,
            Proto::Tcp => t.tcp_transitory,
        })
    }

    /// Records a packet on session `s`: TCP state from its flags, and a new idle deadline.
    pub(crate) fn touch(&mut self, now: Instant, s: u32, tcp_bits: u8) -> StateChange {
        let m = self.sessions[s as usize].mapping;
        let proto = Proto::from_code(self.mappings[m as usize].proto_flags & 0x3);
        let before = self.sessions[s as usize].tcp;
        let after = before | tcp_bits;
        let deadline = self
            .tick(now)
            .saturating_add(self.timeout_ticks(proto, after));
        let sess = &mut self.sessions[s as usize];
        sess.tcp = after;
        let earlier = deadline < sess.expires;
        sess.expires = deadline;
        if earlier {
            self.unlink_wheel(s);
            self.link_wheel(s, deadline);
        }
        match (is_established(before), is_established(after)) {
            (false, true) => StateChange::Established,
            (true, false) => StateChange::Closing,
            _ => StateChange::None,
        }
    }

    /// Whether TCP session `s` has ended (a RST, or FINs both ways): a new SYN on its 4-tuple
    /// is a new connection reusing the client's port.
    pub(crate) fn session_closed(&self, s: u32) -> bool {
        let tcp = self.sessions[s as usize].tcp;
        tcp & RST != 0 || tcp & (FIN_OUT | FIN_IN) == (FIN_OUT | FIN_IN)
    }

    /// Removes session `s` at once (a closed connection replaced by a new one on its 4-tuple).
    pub(crate) fn remove_now(&mut self, s: u32) -> RemovedSession {
        self.unlink_wheel(s);
        self.remove_session(s)
    }

    /// Removes session `s` (and its mapping when that was its last session and the mapping is
    /// not permanent). The session must already be out of the wheel.
    fn remove_session(&mut self, s: u32) -> RemovedSession {
        let sess = self.sessions[s as usize];
        let view = self.mapping(sess.mapping);
        let remote = SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port);
        self.flows.remove(&SessionKey::new(
            view.proto,
            view.public_idx,
            view.public_port,
            remote,
        ));
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
            was_established: is_established(sess.tcp),
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
            + self.wheel.capacity() * size_of::<u32>()
    }

    /// Every live flow, for `show nat`.
    pub(crate) fn translations(&self, now: Instant) -> Vec<Translation> {
        let now_tick = self.tick(now);
        let mut out = Vec::with_capacity(self.live_sessions);
        for slot in &self.wheel {
            let mut s = *slot;
            while s != NIL {
                let sess = &self.sessions[s as usize];
                let view = self.mapping(sess.mapping);
                out.push(Translation {
                    proto: view.proto,
                    inside: view.inside,
                    public: SocketAddrV4::new(self.public_addr(view.public_idx), view.public_port),
                    outside: SocketAddrV4::new(Ipv4Addr::from(sess.remote_ip), sess.remote_port),
                    established: view.proto == Proto::Tcp && is_established(sess.tcp),
                    expires_in: Duration::from_secs(u64::from(
                        sess.expires.saturating_sub(now_tick),
                    )),
                    listener: view.listener,
                });
                s = sess.wheel_next;
            }
        }
        out
    }
}

/// Both sides sent a SYN and neither a RST nor both FINs (RFC 6146 §3.5.2 in short).
fn is_established(tcp: u8) -> bool {
    tcp & (SYN_OUT | SYN_IN) == (SYN_OUT | SYN_IN)
        && tcp & RST == 0
        && tcp & (FIN_OUT | FIN_IN) != (FIN_OUT | FIN_IN)
}

/// Grows a slab by a quarter instead of doubling (memory per flow matters more than the
/// occasional copy).
fn grow<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 4).max(256));
    }
}
