//! Fragments past the first: they carry no transport header, so they cannot be matched to a
//! flow by ports. The gateway remembers how it rewrote the addresses of each first fragment
//! (keyed by the datagram's original source, destination, protocol and IP id, which every
//! fragment of it repeats) and rewrites the later fragments the same way, as Linux conntrack
//! does after reassembly and Cisco IOS does with its fragment table. No fragment is buffered:
//! one that arrives before its first fragment finds no entry and is dropped and counted, as
//! before; on a LAN and across a TUN fragments arrive in order.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netutil::ipv4::Ipv4View;

/// How long the rewrite of a datagram is remembered after its first fragment: Linux's
/// `ipfrag_time` default; a receiver gives up reassembling after that too.
pub(crate) const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);

/// Datagrams remembered at once. The oldest entry makes room for a new one, so a flood of
/// first fragments costs a bounded amount of memory and only ages out older datagrams.
pub(crate) const FRAGMENT_CAPACITY: usize = 4096;

/// What identifies the fragments of one datagram (RFC 791: source, destination, protocol,
/// identification), as the gateway received them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FragmentKey {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
}

impl FragmentKey {
    /// The key of the packet in `buf`, whose IPv4 header has been validated.
    pub(crate) fn of(buf: &[u8]) -> Self {
        let ip = Ipv4View::new_unchecked(buf);
        FragmentKey {
            src: ip.src(),
            dst: ip.dst(),
            proto: ip.protocol(),
            id: ip.ident(),
        }
    }
}

/// The addresses a datagram's first fragment left the gateway with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rewrite {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    /// Which way the first fragment went (counted the same for the later ones).
    pub(crate) outbound: bool,
}

impl Rewrite {
    /// The addresses of the (translated) first fragment in `buf`.
    pub(crate) fn of(buf: &[u8], outbound: bool) -> Self {
        let k = FragmentKey::of(buf);
        Rewrite {
            src: k.src,
            dst: k.dst,
            outbound,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    rewrite: Rewrite,
    recorded: Instant,
}

/// The bounded table of datagrams whose first fragment was translated.
#[derive(Debug, Default)]
pub(crate) struct FragmentTable {
    entries: HashMap<FragmentKey, Entry>,
    /// Keys in the order they were recorded, which is also the order they expire in.
    order: VecDeque<(FragmentKey, Instant)>,
}

impl FragmentTable {
    /// Remembers how the first fragment of a datagram was rewritten.
    pub(crate) fn record(&mut self, now: Instant, key: FragmentKey, rewrite: Rewrite) {
        self.expire(now);
        // The queue may hold stale keys of re-recorded datagrams: bound it too.
        while self.entries.len() >= FRAGMENT_CAPACITY || self.order.len() >= 2 * FRAGMENT_CAPACITY {
            let Some((oldest, at)) = self.order.pop_front() else {
                break;
            };
            self.remove_if_recorded_at(oldest, at);
        }
        self.entries.insert(
            key,
            Entry {
                rewrite,
                recorded: now,
            },
        );
        self.order.push_back((key, now));
    }

    /// The rewrite for a later fragment, if its first fragment was translated recently.
    pub(crate) fn lookup(&mut self, now: Instant, key: FragmentKey) -> Option<Rewrite> {
        self.expire(now);
        self.entries.get(&key).map(|e| e.rewrite)
    }

    /// Datagrams remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets everything (`vipgate nat clear`).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            if now.saturating_duration_since(at) < FRAGMENT_LIFETIME {
                break;
            }
            self.order.pop_front();
            self.remove_if_recorded_at(key, at);
        }
    }

    /// Removes `key` unless it was recorded again after `at` (then a later queue entry is
    /// its own).
    fn remove_if_recorded_at(&mut self, key: FragmentKey, at: Instant) {
        if self.entries.get(&key).is_some_and(|e| e.recorded == at) {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::epoch;

    fn key(id: u16) -> FragmentKey {
        FragmentKey {
            src: Ipv4Addr::new(192, 168, 101, 10),
            dst: Ipv4Addr::new(198, 51, 100, 200),
            proto: 17,
            id,
        }
    }

    fn rw() -> Rewrite {
        Rewrite {
            src: Ipv4Addr::new(198, 51, 100, 1),
            dst: Ipv4Addr::new(198, 51, 100, 200),
            outbound: true,
        }
    }

    #[test]
    fn entries_expire_after_the_lifetime() {
        let now = epoch();
        let mut t = FragmentTable::default();
        t.record(now, key(1), rw());
        assert_eq!(t.lookup(now + Duration::from_secs(29), key(1)), Some(rw()));
        assert_eq!(t.lookup(now + FRAGMENT_LIFETIME, key(1)), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn rerecorded_key_lives_from_its_last_record() {
        let now = epoch();
        let mut t = FragmentTable::default();
        t.record(now, key(1), rw());
        t.record(now + Duration::from_secs(20), key(1), rw());
        assert_eq!(t.lookup(now + Duration::from_secs(40), key(1)), Some(rw()));
        assert_eq!(t.lookup(now + Duration::from_secs(50), key(1)), None);
    }

    #[test]
    fn bounded_by_evicting_the_oldest() {
        let now = epoch();
        let mut t = FragmentTable::default();
        for id in 0..=u16::try_from(FRAGMENT_CAPACITY).unwrap() {
            t.record(now, key(id), rw());
        }
        assert_eq!(t.len(), FRAGMENT_CAPACITY);
        assert_eq!(t.lookup(now, key(0)), None, "the oldest made room");
        assert!(t.lookup(now, key(1)).is_some());
    }
}
