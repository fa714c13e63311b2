//! Admission of unauthenticated connections, as OpenSSH's `MaxStartups start:rate:full`,
//! `PerSourceMaxStartups` and `PerSourceNetBlockSize`. Pure: the caller passes the peer
//! address and a random number, and releases each admitted connection once it authenticates
//! or ends.
//!
//! Invariants: `pending()` is the number of admitted, not yet released connections; it never
//! exceeds `full`; no source block holds more than `per_source` of them; the per-source table
//! holds only blocks with at least one pending connection (so it is bounded by `full`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// `MaxStartups start:rate:full`: below `start` pending connections every new one is
/// admitted; from `start` on a new one is refused with probability `rate`% rising linearly
/// to 100% at `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    /// Pending connections admitted unconditionally.
    pub start: u32,
    /// Refusal probability (percent) at `start`.
    pub rate: u32,
    /// Pending connections at which every new one is refused.
    pub full: u32,
}

impl Default for MaxStartups {
    /// OpenSSH's default, `10:30:100`.
    fn default() -> Self {
        MaxStartups {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

/// A `MaxStartups` or `PerSourceNetBlockSize` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupsError {
    /// Not `start`, or `start:rate:full` with `1 <= start <= full`, `rate <= 100`.
    #[error(
        "bad max_startups '{0}': expected start or start:rate:full (1 <= start <= full <= 100000, rate <= 100)"
    )]
    BadMaxStartups(String),
    /// Not `v4len[:v6len]` with `v4len <= 32`, `v6len <= 128`.
    #[error("bad per_source_netblock_size '{0}': expected v4len[:v6len] (0..=32, 0..=128)")]
    BadNetBlock(String),
}

/// The largest `full` accepted: each pending connection holds a file descriptor.
pub const MAX_FULL: u32 = 100_000;

impl FromStr for MaxStartups {
    type Err = StartupsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StartupsError::BadMaxStartups(s.to_string());
        let num = |t: &str| -> Result<u32, StartupsError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let m = match parts.as_slice() {
            // OpenSSH: a single number is both start and full.
            [one] => {
                let n = num(one)?;
                MaxStartups {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [a, b, c] => MaxStartups {
                start: num(a)?,
                rate: num(b)?,
                full: num(c)?,
            },
            _ => return Err(bad()),
        };
        if m.start == 0 || m.start > m.full || m.rate > 100 || m.full > MAX_FULL {
            return Err(bad());
        }
        Ok(m)
    }
}

impl fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

/// `PerSourceNetBlockSize v4len:v6len`: sources are counted per network of this size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetBlock {
    /// IPv4 prefix length (0..=32).
    pub v4: u8,
    /// IPv6 prefix length (0..=128).
    pub v6: u8,
}

impl Default for NetBlock {
    /// OpenSSH's default, `32:128` (one address).
    fn default() -> Self {
        NetBlock { v4: 32, v6: 128 }
    }
}

impl fmt::Display for NetBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.v4, self.v6)
    }
}

impl FromStr for NetBlock {
    type Err = StartupsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StartupsError::BadNetBlock(s.to_string());
        let num = |t: &str, max: u8| -> Result<u8, StartupsError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(bad)
        };
        match s.trim().split_once(':') {
            None => Ok(NetBlock {
                v4: num(s.trim(), 32)?,
                v6: 128,
            }),
            Some((a, b)) => Ok(NetBlock {
                v4: num(a, 32)?,
                v6: num(b, 128)?,
            }),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; anything else unchanged.
#[must_use]
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

impl NetBlock {
    /// The network `addr` belongs to (mapped IPv4 counted as IPv4).
    #[must_use]
    pub fn of(&self, addr: IpAddr) -> IpAddr {
        match canonical_ip(addr) {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        }
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `full` pending connections, or the random early drop between `start` and `full`.
    MaxStartups,
    /// The source's network already has `per_source` pending connections.
    PerSource,
}

/// The admission state.
#[derive(Debug)]
pub struct Startups {
    limits: MaxStartups,
    per_source: Option<u32>,
    block: NetBlock,
    pending: u32,
    by_source: HashMap<IpAddr, u32>,
}

impl Startups {
    /// Empty state; `per_source` `None` means no per-source cap.
    #[must_use]
    pub fn new(limits: MaxStartups, per_source: Option<u32>, block: NetBlock) -> Self {
        Startups {
            limits,
            per_source,
            block,
            pending: 0,
            by_source: HashMap::new(),
        }
    }

    /// Pending (admitted, not yet released) connections.
    #[must_use]
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Decides on a new connection from `peer`; `random` is any uniformly random number.
    /// On success returns the source key to pass to [`Startups::release`].
    ///
    /// # Errors
    /// The [`Refusal`]; nothing is recorded then.
    pub fn admit(&mut self, peer: IpAddr, random: u32) -> Result<IpAddr, Refusal> {
        let l = self.limits;
        if self.pending >= l.full {
            return Err(Refusal::MaxStartups);
        }
        if self.pending >= l.start {
            // OpenSSH's drop(): p = rate + (100 - rate) * (pending - start) / (full - start).
            // start == full (a single number): every connection beyond it is refused.
            let p = ((100 - l.rate) * (self.pending - l.start))
                .checked_div(l.full - l.start)
                .map_or(100, |rise| l.rate + rise);
            if random % 100 < p {
                return Err(Refusal::MaxStartups);
            }
        }
        let source = self.block.of(peer);
        let n = self.by_source.get(&source).copied().unwrap_or(0);
        if self.per_source.is_some_and(|cap| n >= cap) {
            return Err(Refusal::PerSource);
        }
        self.by_source.insert(source, n + 1);
        self.pending += 1;
        Ok(source)
    }

    /// Releases a connection admitted for `source` (it authenticated, or it ended).
    pub fn release(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
            self.pending = self.pending.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_openssh_forms() {
        assert_eq!("10:30:100".parse(), Ok(MaxStartups::default()));
        assert_eq!(
            "5".parse(),
            Ok(MaxStartups {
                start: 5,
                rate: 100,
                full: 5
            })
        );
        for bad in [
            "",
            "0",
            "0:30:100",
            "20:30:10",
            "10:101:100",
            "1:2",
            "a:b:c",
            "1:1:100001",
        ] {
            assert!(bad.parse::<MaxStartups>().is_err(), "{bad}");
        }
        assert_eq!("24:56".parse(), Ok(NetBlock { v4: 24, v6: 56 }));
        assert!("33".parse::<NetBlock>().is_err());
        assert!("24:129".parse::<NetBlock>().is_err());
    }

    #[test]
    fn below_start_always_admits_at_full_always_refuses() {
        let mut s = Startups::new(MaxStartups::default(), None, NetBlock::default());
        for i in 0..10u8 {
            // random 0 is the most refusing draw
            assert!(s.admit(IpAddr::from([10, 0, 0, i]), 0).is_ok());
        }
        // at start: 30% refused, i.e. draws 0..30
        assert_eq!(s.admit(ip("10.1.0.1"), 29), Err(Refusal::MaxStartups));
        assert!(s.admit(ip("10.1.0.1"), 30).is_ok());
        while s.pending() < 100 {
            let _ = s.admit(ip("10.2.0.1"), 99);
        }
        assert_eq!(s.admit(ip("10.3.0.1"), 99), Err(Refusal::MaxStartups));
        s.release(ip("10.2.0.1"));
        assert_eq!(s.pending(), 99);
    }

    #[test]
    fn refusal_probability_rises_linearly() {
        let mut s = Startups::new(MaxStartups::default(), None, NetBlock::default());
        while s.pending() < 55 {
            s.admit(ip("10.0.0.1"), 99).unwrap();
        }
        // halfway from 10 to 100: 30 + 70 * 45 / 90 = 65 %
        let refused = (0..100u32)
            .filter(|r| {
                let ok = s.admit(ip("10.0.0.2"), *r);
                if ok.is_ok() {
                    s.release(ip("10.0.0.2"));
                }
                ok.is_err()
            })
            .count();
        assert_eq!(refused, 65);
    }

    #[test]
    fn per_source_cap_counts_networks_and_mapped_peers() {
        let block = NetBlock { v4: 24, v6: 64 };
        let mut s = Startups::new(
            MaxStartups {
                start: 100,
                rate: 30,
                full: 100,
            },
            Some(2),
            block,
        );
        let a = s.admit(ip("192.0.2.1"), 0).unwrap();
        s.admit(ip("::ffff:192.0.2.7"), 0).unwrap();
        assert_eq!(s.admit(ip("192.0.2.200"), 0), Err(Refusal::PerSource));
        assert!(s.admit(ip("192.0.3.1"), 0).is_ok());
        s.release(a);
        assert!(s.admit(ip("192.0.2.9"), 0).is_ok());
        s.admit(ip("2001:db8::1"), 0).unwrap();
        s.admit(ip("2001:db8::2"), 0).unwrap();
        assert_eq!(s.admit(ip("2001:db8::3"), 0), Err(Refusal::PerSource));
        assert!(s.admit(ip("2001:db8:0:1::3"), 0).is_ok());
    }

    #[test]
    fn release_of_unknown_source_is_harmless() {
        let mut s = Startups::new(MaxStartups::default(), Some(1), NetBlock::default());
        s.release(ip("10.0.0.1"));
        assert_eq!(s.pending(), 0);
    }
}
