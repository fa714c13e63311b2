//! Persistence (ipvsadm `-p TIMEOUT -M NETMASK`): a client network stays on its backend.
//!
//! A template maps `client & netmask` to a backend. It is re-armed by every new connection of
//! that client network and lives while the client has established connections, then for
//! `timeout` after the later of its last new connection and the end (FIN, RST or expiry) of
//! its last established one. The kernel similarly keeps a template while it controls
//! connections (`n_control > 0`) and re-arms it on reuse; counting only established ones
//! keeps closed connections lingering in the flow table (TIME_WAIT-like states) from pinning
//! a client for minutes beyond its timeout.
//!
//! Expiry uses a min-heap with one entry per template: a popped entry whose template was
//! re-armed in the meantime is pushed again with the new deadline, so a busy client never
//! grows the heap and nothing scans the whole table.
//!
//! The table holds at most [`MAX_TEMPLATES`] templates (and so at most that many heap
//! entries): a new client network beyond it is refused a template in O(1) (its connection is
//! still scheduled, just not pinned) and counted, so a flood of distinct sources cannot grow
//! the table; templates free their slots by expiring as usual.
//!
//! Flow sync (a pair of directors): with the journal on ([`PersistTable::set_journal`]) every
//! template created, re-pointed, refreshed (a new connection, the end of the last established
//! one) or removed (expiry, its backend freed, a regrouping) marks its client network; a drain
//! turns the marks into [`TemplateChange`]s with the template's state at that moment. The
//! journal holds at most [`MAX_TEMPLATES`] marks (one per client network, however often it
//! changes); past that it overflows and the next drain sends every template instead. A peer's
//! template is installed with [`PersistTable::install`]: bounded like a local one, and never
//! over a template this node made itself.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::backend::BackendId;
use crate::error::PoolError;

/// The most persistence templates one pool holds: one per client network, so at the default
/// /32 netmask the number of distinct clients seen within the timeout. 65 536 is the NAT
/// gateway's default flow-table size (every template was made by a flow), at ~40 bytes a
/// template plus its heap entry about 3 MiB per pool.
pub const MAX_TEMPLATES: usize = 65_536;

/// How long and how widely clients stick to their backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Persistence {
    /// Idle time after which a client may move (ipvsadm `-p`, default 300 s).
    pub timeout: Duration,
    /// Prefix length grouping clients (ipvsadm `-M`, default /32: each address on its own).
    pub netmask: u8,
}

impl Persistence {
    /// Per-address persistence with `timeout`.
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            netmask: 32,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), PoolError> {
        if self.netmask > 32 {
            return Err(PoolError::BadNetmask(self.netmask));
        }
        if self.timeout.is_zero() {
            return Err(PoolError::ZeroPersistence);
        }
        Ok(())
    }

    fn key(&self, client: Ipv4Addr) -> u32 {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.netmask))
            .unwrap_or(0);
        u32::from(client) & mask
    }
}

/// A persistence template as flow sync carries it between directors
/// ([`Pool::export_templates`](crate::Pool::export_templates),
/// [`Pool::install_template`](crate::Pool::install_template)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TemplateImage {
    /// The client network: the client's address masked with the persistence netmask.
    pub client: Ipv4Addr,
    /// The backend the client network sticks to, by address (ids are local to a pool).
    pub backend: SocketAddrV4,
    /// Time left before it expires unless renewed: the full timeout while the client network
    /// has an established connection.
    pub remaining: Duration,
}

/// One change of a journaled template ([`Pool::take_template_changes`](crate::Pool::take_template_changes)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateChange {
    /// Created, re-pointed or refreshed: its state now.
    Live(TemplateImage),
    /// Expired or forgotten: the client network it was for.
    Gone(Ipv4Addr),
}

/// Why a peer's template was not installed
/// ([`Pool::install_template`](crate::Pool::install_template)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TemplateRefused {
    /// This pool has no persistence (the peers' configurations differ).
    #[error("the service has no persistence")]
    NoPersistence,
    /// No backend of this pool has the template's address.
    #[error("backend {0} is not in the pool")]
    UnknownBackend(SocketAddrV4),
    /// The pool already holds [`MAX_TEMPLATES`] templates.
    #[error("the pool holds {max} templates already", max = MAX_TEMPLATES)]
    Full,
}

/// The marks of a journal: the client networks whose template changed since the last drain.
#[derive(Debug, Clone, Default)]
struct Journal {
    dirty: HashSet<u32>,
    /// More than [`MAX_TEMPLATES`] networks changed: the next drain sends every template.
    overflowed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Template {
    backend: BackendId,
    /// Last new connection, or end of the last established connection.
    last: Instant,
    /// Established connections of this client network.
    live: u32,
}

/// The persistence templates of one pool.
#[derive(Debug, Clone)]
pub(crate) struct PersistTable {
    params: Persistence,
    templates: HashMap<u32, Template>,
    deadlines: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Off (`None`) unless flow sync needs the changes.
    journal: Option<Journal>,
}

impl PersistTable {
    pub(crate) fn new(params: Persistence) -> Self {
        Self {
            params,
            templates: HashMap::new(),
            deadlines: BinaryHeap::new(),
            journal: None,
        }
    }

    /// Turns the journal on (empty) or off.
    pub(crate) fn set_journal(&mut self, on: bool) {
        self.journal = on.then(Journal::default);
    }

    /// Makes the next drain send every template (the table was rebuilt under a journal).
    pub(crate) fn journal_overflowed(&mut self) {
        if let Some(j) = &mut self.journal {
            j.dirty.clear();
            j.overflowed = true;
        }
    }

    /// Marks `key`'s template as changed.
    fn note(&mut self, key: u32) {
        let Some(j) = &mut self.journal else { return };
        if j.overflowed {
            return;
        }
        if j.dirty.len() >= MAX_TEMPLATES && !j.dirty.contains(&key) {
            j.dirty.clear();
            j.overflowed = true;
        } else {
            j.dirty.insert(key);
        }
    }

    /// Time left on a template at `now` (zero: no longer in force).
    fn remaining(&self, t: &Template, now: Instant) -> Duration {
        if t.live > 0 {
            self.params.timeout
        } else {
            (t.last + self.params.timeout).saturating_duration_since(now)
        }
    }

    fn image(
        &self,
        now: Instant,
        key: u32,
        t: &Template,
        addr: &impl Fn(BackendId) -> Option<SocketAddrV4>,
    ) -> Option<TemplateImage> {
        let remaining = self.remaining(t, now);
        if remaining.is_zero() {
            return None;
        }
        Some(TemplateImage {
            client: Ipv4Addr::from(key),
            backend: addr(t.backend)?,
            remaining,
        })
    }

    /// Every template in force at `now`; `addr` names a backend id's address.
    pub(crate) fn export(
        &self,
        now: Instant,
        addr: impl Fn(BackendId) -> Option<SocketAddrV4>,
    ) -> Vec<TemplateImage> {
        self.templates
            .iter()
            .filter_map(|(&key, t)| self.image(now, key, t, &addr))
            .collect()
    }

    /// The changes journaled since the last call (every template after an overflow); empty
    /// when the journal is off.
    pub(crate) fn take_changes(
        &mut self,
        now: Instant,
        addr: impl Fn(BackendId) -> Option<SocketAddrV4>,
    ) -> Vec<TemplateChange> {
        let Some(j) = self.journal.as_mut() else {
            return Vec::new();
        };
        let dirty = std::mem::take(&mut j.dirty);
        if std::mem::take(&mut j.overflowed) {
            return self
                .export(now, addr)
                .into_iter()
                .map(TemplateChange::Live)
                .collect();
        }
        dirty
            .into_iter()
            .map(|key| {
                self.templates
                    .get(&key)
                    .and_then(|t| self.image(now, key, t, &addr))
                    .map_or(
                        TemplateChange::Gone(Ipv4Addr::from(key)),
                        TemplateChange::Live,
                    )
            })
            .collect()
    }

    /// Installs a peer's template for `client`'s network on `backend`, with `remaining` left
    /// (at most this table's timeout). `Ok(false)`: nothing to do, this node has a template
    /// for that network already (its own traffic made it, which wins) or none is left.
    pub(crate) fn install(
        &mut self,
        now: Instant,
        client: Ipv4Addr,
        backend: BackendId,
        remaining: Duration,
    ) -> Result<bool, TemplateRefused> {
        self.install_capped(now, client, backend, remaining, MAX_TEMPLATES)
    }

    fn install_capped(
        &mut self,
        now: Instant,
        client: Ipv4Addr,
        backend: BackendId,
        remaining: Duration,
        cap: usize,
    ) -> Result<bool, TemplateRefused> {
        let key = self.params.key(client);
        let remaining = remaining.min(self.params.timeout);
        if self.templates.contains_key(&key) || remaining.is_zero() {
            return Ok(false);
        }
        if self.templates.len() >= cap {
            return Err(TemplateRefused::Full);
        }
        // `last` such that the template expires `remaining` from now.
        let last = now
            .checked_sub(self.params.timeout - remaining)
            .unwrap_or(now);
        self.templates.insert(
            key,
            Template {
                backend,
                last,
                live: 0,
            },
        );
        self.deadlines.push(Reverse((now + remaining, key)));
        self.note(key);
        Ok(true)
    }

    pub(crate) fn params(&self) -> Persistence {
        self.params
    }

    /// Changes timeout and netmask; a new netmask regroups clients, so templates start over.
    pub(crate) fn set_params(&mut self, params: Persistence) {
        if params.netmask != self.params.netmask {
            let keys: Vec<u32> = self.templates.keys().copied().collect();
            for key in keys {
                self.note(key);
            }
            self.templates.clear();
            self.deadlines.clear();
        }
        self.params = params;
    }

    pub(crate) fn len(&self) -> usize {
        self.templates.len()
    }

    /// The backend a client is pinned to, if its template is still in force at `now`.
    pub(crate) fn lookup(&self, now: Instant, client: Ipv4Addr) -> Option<BackendId> {
        let t = self.templates.get(&self.params.key(client))?;
        (t.live > 0 || now < t.last + self.params.timeout).then_some(t.backend)
    }

    /// Records a new connection of `client` to `backend` (re-pointing the template if the
    /// previous backend could not take it). It is not established yet: see [`hold`](Self::hold).
    /// `false`: the client network has no template and the table is full ([`MAX_TEMPLATES`]),
    /// so none was made.
    pub(crate) fn bind(&mut self, now: Instant, client: Ipv4Addr, backend: BackendId) -> bool {
        self.bind_capped(now, client, backend, MAX_TEMPLATES)
    }

    fn bind_capped(
        &mut self,
        now: Instant,
        client: Ipv4Addr,
        backend: BackendId,
        cap: usize,
    ) -> bool {
        let full = self.templates.len() >= cap;
        let key = self.params.key(client);
        match self.templates.entry(key) {
            Entry::Occupied(mut e) => {
                let t = e.get_mut();
                t.backend = backend;
                t.last = now;
            }
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(e) => {
                e.insert(Template {
                    backend,
                    last: now,
                    live: 0,
                });
                self.deadlines
                    .push(Reverse((now + self.params.timeout, key)));
            }
        }
        self.note(key);
        true
    }

    /// A connection of `client` became established: the template stays while it lasts.
    pub(crate) fn hold(&mut self, client: Ipv4Addr) {
        let key = self.params.key(client);
        if let Some(t) = self.templates.get_mut(&key) {
            t.live += 1;
            if t.live == 1 {
                self.note(key);
            }
        }
    }

    /// An established connection of `client` ended (closing, reset or removed).
    pub(crate) fn release(&mut self, now: Instant, client: Ipv4Addr) {
        let key = self.params.key(client);
        if let Some(t) = self.templates.get_mut(&key) {
            t.live = t.live.saturating_sub(1);
            if t.live == 0 && now > t.last {
                t.last = now;
            }
            if t.live == 0 {
                self.note(key);
            }
        }
    }

    /// Forgets every template pointing at `backend` (its slot is about to be reused).
    pub(crate) fn forget_backend(&mut self, backend: BackendId) {
        let gone: Vec<u32> = self
            .templates
            .iter()
            .filter(|(_, t)| t.backend == backend)
            .map(|(&key, _)| key)
            .collect();
        for key in gone {
            self.templates.remove(&key);
            self.note(key);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(t) = self.templates.get(&key) else {
                continue; // forgotten or regrouped meanwhile
            };
            let due = if t.live > 0 {
                now + self.params.timeout
            } else {
                t.last + self.params.timeout
            };
            if due > now {
                self.deadlines.push(Reverse((due, key)));
            } else {
                self.templates.remove(&key);
                self.note(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(300);

    #[test]
    fn netmask_groups_clients() {
        let mut p = PersistTable::new(Persistence {
            timeout: T,
            netmask: 24,
        });
        let now = testkit::epoch();
        p.bind(now, Ipv4Addr::new(192, 0, 2, 7), BackendId(3));
        assert_eq!(
            p.lookup(now, Ipv4Addr::new(192, 0, 2, 200)),
            Some(BackendId(3))
        );
        assert_eq!(p.lookup(now, Ipv4Addr::new(192, 0, 3, 7)), None);
    }

    #[test]
    fn template_expires_timeout_after_last_close() {
        let mut p = PersistTable::new(Persistence::new(T));
        let t0 = testkit::epoch();
        let c = Ipv4Addr::new(192, 0, 2, 7);
        p.bind(t0, c, BackendId(1));
        p.hold(c);
        // A long connection keeps the template past the timeout.
        let t1 = t0 + T + Duration::from_secs(100);
        p.handle_timeout(t1);
        assert_eq!(p.lookup(t1, c), Some(BackendId(1)));
        p.release(t1, c);
        let t2 = t1 + T - Duration::from_secs(1);
        p.handle_timeout(t2);
        assert_eq!(p.lookup(t2, c), Some(BackendId(1)));
        let t3 = t1 + T;
        assert_eq!(p.lookup(t3, c), None);
        // The heap holds exactly one entry per template and drains with it.
        p.handle_timeout(t3 + T);
        assert_eq!(p.len(), 0);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn distinct_clients_beyond_the_cap_are_refused_and_counted() {
        let mut p = PersistTable::new(Persistence::new(T));
        let t0 = testkit::epoch();
        let cap = 1000;
        let refused = (0..10 * cap as u32)
            .filter(|&i| !p.bind_capped(t0, Ipv4Addr::from(0x0a00_0000 + i), BackendId(1), cap))
            .count();
        assert_eq!(p.len(), cap);
        assert_eq!(p.deadlines.len(), cap, "the heap is bounded with the table");
        assert_eq!(refused, 9 * cap);
        // A client that has a template keeps it when full; an unknown one gets none.
        assert!(p.bind_capped(t0, Ipv4Addr::from(0x0a00_0000), BackendId(2), cap));
        assert_eq!(
            p.lookup(t0, Ipv4Addr::from(0x0a00_0000)),
            Some(BackendId(2))
        );
        assert_eq!(p.lookup(t0, Ipv4Addr::from(0x0b00_0000)), None);
        // Expiry frees the slots.
        p.handle_timeout(t0 + T);
        assert_eq!(p.len(), 0);
        assert!(p.bind_capped(t0 + T, Ipv4Addr::from(0x0b00_0000), BackendId(1), cap));
    }

    #[test]
    fn the_pool_cap_holds_a_flood_of_distinct_clients() {
        let mut p = PersistTable::new(Persistence::new(T));
        let t0 = testkit::epoch();
        let made = (0..MAX_TEMPLATES as u32 + 5000)
            .filter(|&i| p.bind(t0, Ipv4Addr::from(i), BackendId(1)))
            .count();
        assert_eq!(made, MAX_TEMPLATES);
        assert_eq!(p.len(), MAX_TEMPLATES);
    }

    /// The journal holds one mark per client network, at most MAX_TEMPLATES: one more
    /// network overflows it, and the next drain sends every template instead (then it marks
    /// again).
    #[test]
    fn the_journal_is_bounded_and_an_overflow_sends_everything() {
        let mut p = PersistTable::new(Persistence::new(T));
        p.set_journal(true);
        let t0 = testkit::epoch();
        let addr = |_| Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80));
        let client = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        for _ in 0..3 {
            p.bind(t0, client(0), BackendId(1));
        }
        assert_eq!(p.take_changes(t0, addr).len(), 1, "one mark per network");
        let n = MAX_TEMPLATES as u32 + 1;
        for i in 0..n {
            assert!(p.bind_capped(t0, client(i), BackendId(1), n as usize));
        }
        let j = p.journal.as_ref().unwrap();
        assert!(j.overflowed && j.dirty.is_empty(), "bounded: no mark kept");
        let all = p.take_changes(t0, addr);
        assert_eq!(all.len(), n as usize);
        assert!(all.iter().all(|c| matches!(c, TemplateChange::Live(_))));
        p.bind(t0, client(5), BackendId(1));
        assert_eq!(p.take_changes(t0, addr).len(), 1, "marking again");
    }

    #[test]
    fn reuse_rearms_without_growing_the_heap() {
        let mut p = PersistTable::new(Persistence::new(T));
        let t0 = testkit::epoch();
        let c = Ipv4Addr::new(192, 0, 2, 7);
        for s in 0..1000 {
            let now = t0 + Duration::from_secs(s);
            p.bind(now, c, BackendId(1));
            p.hold(c);
            p.release(now, c);
            p.handle_timeout(now);
        }
        assert_eq!(p.deadlines.len(), 1);
        assert_eq!(
            p.lookup(
                t0 + Duration::from_secs(999) + T - Duration::from_secs(1),
                c
            ),
            Some(BackendId(1))
        );
    }
}
