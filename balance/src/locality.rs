//! Locality-based least connection, without (`lblc`) and with replication (`lblcr`), as LVS
//! defines them: the schedulers for a farm of transparent caches, where the same destination
//! should keep reaching the cache that already holds its objects.
//!
//! A table maps each destination address to a backend (`lblc`) or a set of backends
//! (`lblcr`). A destination without an entry gets the weighted least-connection backend and an
//! entry. `lblc` keeps using the entry's backend unless it is unavailable (down, draining,
//! removed, over its connection threshold) or *busy*: more active connections than its weight
//! while some other backend has fewer than half its weight; then the destination is scheduled
//! afresh and re-pointed. `lblcr` uses the least loaded available member of the set; when that
//! is busy (or none is available) it adds the weighted least-connection backend to the set, and
//! a set of more than one that has not changed for [`LOCALITY_EXPIRY`] loses its most loaded
//! member, so a hot destination is served by several caches and the set shrinks once it cools.
//! Weights are effective weights (slow start).
//!
//! Bounded state: at most [`MAX_LOCALITY_ENTRIES`] entries (the kernel's table size, 1,024
//! buckets × 16). An entry unused for [`LOCALITY_EXPIRY`] is dropped, driven by the pool's
//! `handle_timeout`, through a min-heap of one deadline per entry re-armed lazily as in
//! persistence. A new destination arriving at a full table takes the slot of the least recently
//! used entry if that one has been idle for [`LOCALITY_RECLAIM_IDLE`] (the kernel's garbage
//! collection threshold), else it is scheduled without an entry and counted
//! (`locality_full`). Sets hold each backend at most once, so at most `MAX_BACKENDS` members.
//!
//! Flow sync (a pair of directors): with the journal on ([`Locality::set_journal`]) every
//! entry created or whose set changed (re-pointed, grown, shed) marks its destination, at most
//! [`MAX_LOCALITY_ENTRIES`] marks (past that the next drain sends every entry); a use alone
//! marks nothing (the periodic full export carries the time since the last use). Every entry
//! removed (expired, reclaimed for another destination, left without a backend) is marked as
//! gone, at most [`MAX_LOCALITY_ENTRIES`] marks between two drains, kept across an overflow
//! (past the bound a removal is not sent: the peer's copy expires on its own clock); an entry
//! made again before the drain is a change, not a removal. A peer's
//! entry is installed with [`Locality::install`]: under the same bound (and the same reclaim
//! of an entry idle for [`LOCALITY_RECLAIM_IDLE`]), with the same expiry counted from the use
//! the peer reported; a peer's state replaces what the entry held, and never moves its last
//! use backwards.
//!
//! Differences from LVS: the kernel checks the cached backend of `lblc` only for weight and
//! busyness, not for its upper threshold; here a backend over its threshold never gets a new
//! flow, whatever the scheduler. Expiry happens at the deadline instead of in a minute-long
//! sweep.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::lc::weighted_least;

/// Most destinations one `lblc`/`lblcr` pool remembers.
pub const MAX_LOCALITY_ENTRIES: usize = 16_384;

/// An entry unused this long is forgotten, and an `lblcr` set unchanged this long sheds its
/// most loaded member (the kernel's `lblc_expiration` / `lblcr_expiration` default, 24 h).
pub const LOCALITY_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// With the table full, an entry idle this long gives its slot to a new destination (the
/// kernel's `ENTRY_TIMEOUT`, 6 min).
pub const LOCALITY_RECLAIM_IDLE: Duration = Duration::from_secs(6 * 60);

/// A destination's entry as flow sync carries it between directors
/// ([`Pool::export_locality`](crate::Pool::export_locality),
/// [`Pool::install_locality`](crate::Pool::install_locality)).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalityImage {
    /// The destination address.
    pub dest: Ipv4Addr,
    /// The backends serving it, by address (ids are local to a pool), most recently added
    /// first; one for `lblc`.
    pub backends: Vec<SocketAddrV4>,
    /// Time since its last use.
    pub idle: Duration,
    /// Time since its set last changed (what `lblcr` sheds by).
    pub unchanged: Duration,
}

/// Why a peer's locality entry was not installed
/// ([`Pool::install_locality`](crate::Pool::install_locality)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LocalityRefused {
    /// This pool's scheduler is neither `lblc` nor `lblcr` (the peers' configurations
    /// differ).
    #[error("the service's scheduler keeps no destination table")]
    NotLocality,
    /// No backend of this pool has one of the entry's addresses.
    #[error("backend {0} is not in the pool")]
    UnknownBackend(SocketAddrV4),
    /// The entry names no backend.
    #[error("the entry names no backend")]
    NoBackend,
    /// The table holds [`MAX_LOCALITY_ENTRIES`] entries, none idle long enough to reclaim.
    #[error("the destination table holds {max} entries already", max = MAX_LOCALITY_ENTRIES)]
    Full,
}

/// The marks of a journal: the destinations whose entry changed, or was removed, since the
/// last drain (disjoint sets).
#[derive(Debug, Clone, Default)]
struct Journal {
    dirty: HashSet<Ipv4Addr>,
    /// More than [`MAX_LOCALITY_ENTRIES`] destinations changed: the next drain sends all.
    overflowed: bool,
    /// Destinations whose entry was removed (at most [`MAX_LOCALITY_ENTRIES`]).
    gone: HashSet<Ipv4Addr>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Slots serving the destination, most recently added first; one for `lblc`.
    set: Vec<u16>,
    last_use: Instant,
    last_change: Instant,
}

/// The destination table of one `lblc` or `lblcr` pool.
#[derive(Debug, Clone)]
pub(crate) struct Locality {
    replicate: bool,
    entries: HashMap<Ipv4Addr, Entry>,
    deadlines: BinaryHeap<Reverse<(Instant, Ipv4Addr)>>,
    cap: usize,
    full: u64,
    /// Off (`None`) unless flow sync needs the changes.
    journal: Option<Journal>,
}

impl Locality {
    pub(crate) fn new(replicate: bool) -> Self {
        Self::with_cap(replicate, MAX_LOCALITY_ENTRIES)
    }

    fn with_cap(replicate: bool, cap: usize) -> Self {
        Self {
            replicate,
            entries: HashMap::new(),
            deadlines: BinaryHeap::new(),
            cap,
            full: 0,
            journal: None,
        }
    }

    /// Turns the journal on (empty, or sending everything at the next drain when
    /// `send_all`) or off.
    pub(crate) fn set_journal(&mut self, on: bool, send_all: bool) {
        self.journal = on.then(|| Journal {
            dirty: HashSet::new(),
            overflowed: send_all,
            gone: HashSet::new(),
        });
    }

    /// Marks `dest`'s entry as changed.
    fn note(&mut self, dest: Ipv4Addr) {
        let Some(j) = &mut self.journal else { return };
        j.gone.remove(&dest);
        if j.overflowed {
            return;
        }
        if j.dirty.len() >= MAX_LOCALITY_ENTRIES && !j.dirty.contains(&dest) {
            j.dirty.clear();
            j.overflowed = true;
        } else {
            j.dirty.insert(dest);
        }
    }

    /// Marks `dest`'s entry as removed.
    fn note_gone(&mut self, dest: Ipv4Addr) {
        let Some(j) = &mut self.journal else { return };
        j.dirty.remove(&dest);
        if j.gone.len() < MAX_LOCALITY_ENTRIES {
            j.gone.insert(dest);
        }
    }

    /// The destinations whose entry was removed since the last call (and not made again);
    /// empty when the journal is off.
    pub(crate) fn take_removals(&mut self) -> Vec<Ipv4Addr> {
        self.journal
            .as_mut()
            .map(|j| std::mem::take(&mut j.gone).into_iter().collect())
            .unwrap_or_default()
    }

    /// Removes `dest`'s entry because a peer removed it (not journaled: the peer's own
    /// removal reached the others). Whether there was one.
    pub(crate) fn remove(&mut self, dest: Ipv4Addr) -> bool {
        // Its deadline goes stale in the heap and is skipped there.
        self.entries.remove(&dest).is_some()
    }

    fn image(
        now: Instant,
        dest: Ipv4Addr,
        e: &Entry,
        addr: &impl Fn(u16) -> Option<SocketAddrV4>,
    ) -> Option<LocalityImage> {
        let idle = now.saturating_duration_since(e.last_use);
        if idle >= LOCALITY_EXPIRY {
            return None;
        }
        let backends: Vec<SocketAddrV4> = e.set.iter().filter_map(|&s| addr(s)).collect();
        (!backends.is_empty()).then(|| LocalityImage {
            dest,
            backends,
            idle,
            unchanged: now.saturating_duration_since(e.last_change),
        })
    }

    /// Every entry in force at `now`; `addr` names a slot's address.
    pub(crate) fn export(
        &self,
        now: Instant,
        addr: impl Fn(u16) -> Option<SocketAddrV4>,
    ) -> Vec<LocalityImage> {
        self.entries
            .iter()
            .filter_map(|(&dest, e)| Self::image(now, dest, e, &addr))
            .collect()
    }

    /// The entries created or changed since the last call (every entry after an overflow);
    /// empty when the journal is off. An entry gone since it was marked is not sent here but
    /// by [`Locality::take_removals`].
    pub(crate) fn take_changes(
        &mut self,
        now: Instant,
        addr: impl Fn(u16) -> Option<SocketAddrV4>,
    ) -> Vec<LocalityImage> {
        let Some(j) = self.journal.as_mut() else {
            return Vec::new();
        };
        let dirty = std::mem::take(&mut j.dirty);
        if std::mem::take(&mut j.overflowed) {
            return self.export(now, addr);
        }
        dirty
            .into_iter()
            .filter_map(|dest| Self::image(now, dest, self.entries.get(&dest)?, &addr))
            .collect()
    }

    /// Installs a peer's entry for `dest`: `set` (slots, most recently added first; only the
    /// first for `lblc`), last used `idle` ago, its set unchanged for `unchanged`.
    /// `Ok(false)`: nothing to do, it would already have expired.
    pub(crate) fn install(
        &mut self,
        now: Instant,
        dest: Ipv4Addr,
        mut set: Vec<u16>,
        idle: Duration,
        unchanged: Duration,
    ) -> Result<bool, LocalityRefused> {
        if set.is_empty() {
            return Err(LocalityRefused::NoBackend);
        }
        if idle >= LOCALITY_EXPIRY {
            return Ok(false);
        }
        if !self.replicate {
            set.truncate(1);
        }
        let mut seen = HashSet::new();
        set.retain(|s| seen.insert(*s));
        let last_use = now.checked_sub(idle).unwrap_or(now);
        let last_change = now.checked_sub(unchanged).unwrap_or(now);
        if let Some(e) = self.entries.get_mut(&dest) {
            e.set = set;
            // A later use re-arms the deadline lazily; an earlier one is ignored.
            e.last_use = e.last_use.max(last_use);
            e.last_change = last_change;
            return Ok(true);
        }
        if self.entries.len() >= self.cap && !self.reclaim(now) {
            return Err(LocalityRefused::Full);
        }
        self.entries.insert(
            dest,
            Entry {
                set,
                last_use,
                last_change,
            },
        );
        self.deadlines
            .push(Reverse((last_use + LOCALITY_EXPIRY, dest)));
        Ok(true)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Destinations scheduled without an entry because the table was full.
    pub(crate) fn full(&self) -> u64 {
        self.full
    }

    pub(crate) fn pick(
        &mut self,
        slots: &[Option<Backend>],
        dest: Ipv4Addr,
        now: Instant,
    ) -> Option<usize> {
        let usable = |i: usize| {
            slots[i]
                .as_ref()
                .is_some_and(Backend::is_available)
                .then_some(i)
                .filter(|&i| !busy(slots, i))
        };
        let mut changed = false;
        if let Some(e) = self.entries.get_mut(&dest) {
            e.last_use = now;
            let current = if self.replicate {
                let least = weighted_least(slots, e.set.iter().map(|&s| usize::from(s)));
                if e.set.len() > 1
                    && now > e.last_change + LOCALITY_EXPIRY
                    && let Some(most) = weighted_most(slots, &e.set)
                {
                    e.set.retain(|&s| s != most);
                    e.last_change = now;
                    changed = true;
                }
                least
            } else {
                Some(usize::from(e.set[0]))
            };
            let picked = match current.and_then(usable) {
                Some(hit) => Some(hit),
                None => weighted_least(slots, 0..slots.len()).inspect(|&fresh| {
                    let slot = slot_u16(fresh);
                    if self.replicate {
                        if !e.set.contains(&slot) {
                            e.set.insert(0, slot);
                            e.last_change = now;
                            changed = true;
                        }
                    } else if e.set[0] != slot {
                        e.set[0] = slot;
                        e.last_change = now;
                        changed = true;
                    }
                }),
            };
            if changed {
                self.note(dest);
            }
            return picked;
        }
        let fresh = weighted_least(slots, 0..slots.len())?;
        self.insert(now, dest, slot_u16(fresh));
        Some(fresh)
    }

    fn insert(&mut self, now: Instant, dest: Ipv4Addr, slot: u16) {
        if self.entries.len() >= self.cap && !self.reclaim(now) {
            self.full += 1;
            return;
        }
        self.entries.insert(
            dest,
            Entry {
                set: vec![slot],
                last_use: now,
                last_change: now,
            },
        );
        self.deadlines.push(Reverse((now + LOCALITY_EXPIRY, dest)));
        self.note(dest);
    }

    /// Frees the least recently used entry if it has been idle for [`LOCALITY_RECLAIM_IDLE`].
    fn reclaim(&mut self, now: Instant) -> bool {
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            let Some(e) = self.entries.get(&key) else {
                self.deadlines.pop();
                continue;
            };
            let due = e.last_use + LOCALITY_EXPIRY;
            if due > at {
                // Used since the deadline was set: bring it up to date and look again.
                self.deadlines.pop();
                self.deadlines.push(Reverse((due, key)));
                continue;
            }
            if now.saturating_duration_since(e.last_use) < LOCALITY_RECLAIM_IDLE {
                return false;
            }
            self.deadlines.pop();
            self.entries.remove(&key);
            self.note_gone(key);
            return true;
        }
        false
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
            let Some(e) = self.entries.get(&key) else {
                continue;
            };
            let due = e.last_use + LOCALITY_EXPIRY;
            if due > now {
                self.deadlines.push(Reverse((due, key)));
            } else {
                self.entries.remove(&key);
                self.note_gone(key);
            }
        }
    }

    /// Takes a freed slot out of every set (a backend reusing it must not inherit its
    /// destinations) and drops the entries left empty.
    pub(crate) fn forget_backend(&mut self, slot: usize) {
        let slot = slot_u16(slot);
        let mut emptied = Vec::new();
        self.entries.retain(|&dest, e| {
            e.set.retain(|&s| s != slot);
            if e.set.is_empty() {
                emptied.push(dest);
            }
            !e.set.is_empty()
        });
        for dest in emptied {
            self.note_gone(dest);
        }
        self.deadlines = self
            .entries
            .iter()
            .map(|(&k, e)| Reverse((e.last_use + LOCALITY_EXPIRY, k)))
            .collect();
        // Sets shrank: the peers hear every entry at the next drain.
        if let Some(j) = &mut self.journal {
            j.dirty.clear();
            j.overflowed = true;
        }
    }
}

/// LVS's `is_overloaded` of `lblc`/`lblcr`: more active connections than its weight while some
/// eligible backend has fewer than half its own.
fn busy(slots: &[Option<Backend>], i: usize) -> bool {
    let Some(b) = slots[i].as_ref() else {
        return true;
    };
    b.active > b.effective
        && slots
            .iter()
            .flatten()
            .any(|d| d.is_eligible() && u64::from(d.active) * 2 < u64::from(d.effective))
}

/// The member of `set` with the largest `overhead / weight` (weights above 0 only), the first
/// on a tie.
fn weighted_most(slots: &[Option<Backend>], set: &[u16]) -> Option<u16> {
    let mut most: Option<(u16, &Backend)> = None;
    for &s in set {
        let Some(b) = slots[usize::from(s)]
            .as_ref()
            .filter(|b| b.effective > 0 && b.weight > 0)
        else {
            continue;
        };
        if most.is_none_or(|(_, m)| {
            m.overhead() * u64::from(b.effective) < b.overhead() * u64::from(m.effective)
        }) {
            most = Some((s, b));
        }
    }
    most.map(|(s, _)| s)
}

fn slot_u16(i: usize) -> u16 {
    // Pools hold at most MAX_BACKENDS (1,024) slots.
    i as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn slots(n: u8) -> Vec<Option<Backend>> {
        (1..=n)
            .map(|i| Some(Backend::new(SocketAddrV4::new([10, 0, 0, i].into(), 80), 1)))
            .collect()
    }

    #[test]
    fn a_full_table_reclaims_only_entries_idle_for_six_minutes_and_counts_the_rest() {
        let s = slots(2);
        let mut t = Locality::with_cap(false, 100);
        let t0 = testkit::epoch();
        for i in 0..300u32 {
            t.pick(&s, Ipv4Addr::from(0x0a00_0000 + i), t0);
        }
        assert_eq!((t.len(), t.full()), (100, 200));
        assert_eq!(t.deadlines.len(), 100, "the heap is bounded with the table");
        // Touch the first 50 later; at t0 + 6 min the other 50 are reclaimable, oldest first.
        let t1 = t0 + Duration::from_secs(60);
        for i in 0..50u32 {
            t.pick(&s, Ipv4Addr::from(0x0a00_0000 + i), t1);
        }
        let t2 = t0 + LOCALITY_RECLAIM_IDLE;
        for i in 1000..1060u32 {
            t.pick(&s, Ipv4Addr::from(0x0a00_0000 + i), t2);
        }
        assert_eq!((t.len(), t.full()), (100, 210));
        assert!(t.entries.contains_key(&Ipv4Addr::from(0x0a00_0000)));
        assert!(!t.entries.contains_key(&Ipv4Addr::from(0x0a00_0000 + 99)));
        assert_eq!(t.deadlines.len(), 100);
        // Everything expires a day after its last use.
        t.handle_timeout(t1 + LOCALITY_EXPIRY);
        assert_eq!(t.len(), 50, "the ones entered at t2 are left");
        t.handle_timeout(t2 + LOCALITY_EXPIRY);
        assert_eq!((t.len(), t.poll_timeout()), (0, None));
    }

    #[test]
    fn an_lblcr_set_unchanged_for_a_day_sheds_its_most_loaded_member() {
        let mut s = slots(3);
        let mut t = Locality::new(true);
        let t0 = testkit::epoch();
        let d = Ipv4Addr::new(203, 0, 113, 80);
        assert_eq!(t.pick(&s, d, t0), Some(0));
        // Slot 0 busy: 2 active > weight 1 while slot 1 is idle. Slot 1 joins the set.
        s[0].as_mut().unwrap().active = 2;
        assert_eq!(t.pick(&s, d, t0), Some(1));
        assert_eq!(t.entries[&d].set, [1, 0]);
        // Used, but not changed, for a day: nothing shed before, slot 0 (the most loaded)
        // after.
        let t1 = t0 + LOCALITY_EXPIRY / 2;
        assert_eq!(t.pick(&s, d, t1), Some(1));
        assert_eq!(t.entries[&d].set, [1, 0]);
        let t2 = t0 + LOCALITY_EXPIRY + Duration::from_secs(1);
        assert_eq!(t.pick(&s, d, t2), Some(1));
        assert_eq!(t.entries[&d].set, [1]);
        // The entry lives a day after its last use, not its creation.
        t.handle_timeout(t2);
        assert_eq!(t.len(), 1);
        t.handle_timeout(t2 + LOCALITY_EXPIRY);
        assert_eq!(t.len(), 0);
    }

    fn addr(s: &[Option<Backend>]) -> impl Fn(u16) -> Option<SocketAddrV4> + '_ {
        |i| Some(s.get(usize::from(i))?.as_ref()?.addr)
    }

    /// Created and re-pointed entries are journaled once each (a use alone is not), an
    /// `lblcr` set that grows is journaled with its new set; a drain gives each by address.
    #[test]
    fn changes_are_journaled_and_a_use_alone_is_not() {
        let mut s = slots(3);
        let mut t = Locality::new(true);
        t.set_journal(true, false);
        let t0 = testkit::epoch();
        let d = Ipv4Addr::new(203, 0, 113, 80);
        t.pick(&s, d, t0);
        let t1 = t0 + Duration::from_secs(10);
        t.pick(&s, d, t1);
        let changes = t.take_changes(t1, addr(&s));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].backends, [s[0].as_ref().unwrap().addr]);
        assert_eq!(changes[0].idle, Duration::ZERO);
        assert_eq!(changes[0].unchanged, Duration::from_secs(10));
        t.pick(&s, d, t1);
        assert!(
            t.take_changes(t1, addr(&s)).is_empty(),
            "a use is no change"
        );
        s[0].as_mut().unwrap().active = 2;
        t.pick(&s, d, t1);
        let changes = t.take_changes(t1, addr(&s));
        let want: Vec<SocketAddrV4> = [1, 0]
            .iter()
            .map(|&i| s[i].as_ref().unwrap().addr)
            .collect();
        assert_eq!(changes[0].backends, want, "the grown set, newest first");
        assert_eq!(t.export(t1, addr(&s)), changes);
    }

    /// A peer's entry is installed with its ages: it expires a day after the use the peer
    /// reported, a later report moves that use forward and never back, and `lblc` keeps one
    /// backend of a set.
    #[test]
    fn an_installed_entry_keeps_the_peers_ages() {
        let s = slots(3);
        let mut t = Locality::new(false);
        let t0 = testkit::epoch() + LOCALITY_EXPIRY;
        let d = Ipv4Addr::new(192, 0, 2, 7);
        let hour = Duration::from_secs(3600);
        assert_eq!(t.install(t0, d, vec![2, 1], hour, hour), Ok(true));
        assert_eq!(t.entries[&d].set, [2]);
        assert_eq!(t.pick(&s, d, t0), Some(2), "the peer's backend");
        // The pick was a use at t0: a report of an older use does not move it back.
        assert_eq!(t.install(t0, d, vec![1], 2 * hour, 2 * hour), Ok(true));
        assert_eq!(t.entries[&d].set, [1], "the peer's latest state wins");
        assert_eq!(t.entries[&d].last_use, t0);
        assert_eq!(t.install(t0, d, vec![1], LOCALITY_EXPIRY, hour), Ok(false));
        assert_eq!(
            t.install(t0, d, Vec::new(), hour, hour),
            Err(LocalityRefused::NoBackend)
        );
        let e = Ipv4Addr::new(192, 0, 2, 8);
        assert_eq!(t.install(t0, e, vec![0], hour, hour), Ok(true));
        assert_eq!(t.deadlines.len(), 2);
        t.handle_timeout(t0 + LOCALITY_EXPIRY - hour);
        assert!(!t.entries.contains_key(&e), "a day after the reported use");
        assert!(t.entries.contains_key(&d));
        // Installing is no change of this node's: nothing to send back.
        t.set_journal(true, false);
        assert_eq!(t.install(t0, e, vec![0], hour, hour), Ok(true));
        assert!(t.take_changes(t0, addr(&s)).is_empty());
    }

    /// A full table refuses a peer's new destination unless an entry has been idle for
    /// six minutes (then it takes that slot), as it does the node's own.
    #[test]
    fn a_full_table_refuses_a_peers_new_destination() {
        let mut t = Locality::with_cap(true, 2);
        let t0 = testkit::epoch();
        let dest = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        for i in 0..2 {
            assert_eq!(
                t.install(t0, dest(i), vec![0], Duration::ZERO, Duration::ZERO),
                Ok(true)
            );
        }
        assert_eq!(
            t.install(t0, dest(2), vec![0], Duration::ZERO, Duration::ZERO),
            Err(LocalityRefused::Full)
        );
        assert_eq!(
            t.install(t0, dest(0), vec![1, 0], Duration::ZERO, Duration::ZERO),
            Ok(true),
            "a known destination is updated in place"
        );
        let later = t0 + LOCALITY_RECLAIM_IDLE;
        assert_eq!(
            t.install(later, dest(2), vec![0], Duration::ZERO, Duration::ZERO),
            Ok(true)
        );
        assert_eq!((t.len(), t.deadlines.len()), (2, 2));
    }

    #[test]
    fn forgetting_a_backend_empties_its_entries() {
        let s = slots(2);
        let mut t = Locality::new(false);
        let t0 = testkit::epoch();
        let d = Ipv4Addr::new(192, 0, 2, 1);
        let first = t.pick(&s, d, t0).unwrap();
        t.forget_backend(first);
        assert_eq!((t.len(), t.deadlines.len()), (0, 0));
    }

    /// Every way an entry leaves the table is journaled as a removal (expiry, reclaim, its
    /// last backend forgotten), a destination made again before the drain is a change and
    /// not a removal, a peer's removal is not journaled, and the marks are bounded.
    #[test]
    fn removals_are_journaled_and_bounded() {
        let s = slots(2);
        let mut t = Locality::with_cap(false, 3);
        t.set_journal(true, false);
        let t0 = testkit::epoch();
        let dest = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        for i in 0..3 {
            t.pick(&s, dest(i), t0);
        }
        let addr = |i: u16| Some(SocketAddrV4::new([10, 0, 0, 1 + i as u8].into(), 80));
        assert_eq!(t.take_changes(t0, addr).len(), 3);
        assert!(t.take_removals().is_empty());

        // dest(3) reclaims the slot of the least recently used, dest(0).
        let t1 = t0 + LOCALITY_RECLAIM_IDLE;
        t.pick(&s, dest(1), t1);
        t.pick(&s, dest(2), t1);
        t.pick(&s, dest(3), t1);
        assert_eq!(t.take_removals(), vec![dest(0)]);
        // dest(1) expires, then comes back before the drain: a change, no removal.
        let t2 = t1 + LOCALITY_EXPIRY;
        t.handle_timeout(t2);
        assert_eq!(t.len(), 0);
        t.pick(&s, dest(1), t2);
        let mut gone = t.take_removals();
        gone.sort();
        assert_eq!(gone, vec![dest(2), dest(3)]);
        assert_eq!(
            t.take_changes(t2, addr).len(),
            1,
            "dest(1) alone: dest(3) is gone"
        );
        // Its backend forgotten, dest(1)'s entry is empty and gone.
        let slot = usize::from(t.entries[&dest(1)].set[0]);
        t.forget_backend(slot);
        assert_eq!(t.take_removals(), vec![dest(1)]);
        // A peer's removal is not echoed.
        t.pick(&s, dest(4), t2);
        assert!(t.remove(dest(4)));
        assert!(!t.remove(dest(4)));
        assert!(t.take_removals().is_empty());

        let mut big = Locality::with_cap(false, MAX_LOCALITY_ENTRIES + 10);
        big.set_journal(true, false);
        for i in 0..(MAX_LOCALITY_ENTRIES as u32 + 10) {
            big.pick(&s, dest(i), t0);
        }
        big.handle_timeout(t0 + LOCALITY_EXPIRY);
        assert_eq!(big.len(), 0);
        assert_eq!(big.take_removals().len(), MAX_LOCALITY_ENTRIES);
    }
}
