//! Maglev hashing (ipvsadm `-s mh`; Eisenbud et al., NSDI 2016, §3.4).
//!
//! Every eligible backend owns a permutation of the `M` table slots derived from its address:
//! `offset = h1 mod M`, `skip = h2 mod (M − 1) + 1`, `perm[j] = (offset + j·skip) mod M`.
//! Backends take turns (a backend of weight `w` takes `w / gcd` turns per round) claiming their
//! next unclaimed slot until the table is full. `M` is prime, so each permutation visits
//! every slot.
//!
//! Properties the tests pin: each backend of equal weight owns ⌊M/N⌋ or ⌈M/N⌉ slots; removing
//! one backend moves its own clients plus only a small extra fraction of the others
//! (near-minimal, not minimal); backends are ordered by address before filling, so every
//! director builds the identical table whatever order its configuration lists them in.
//!
//! Overloaded backends (connection thresholds) stay in the table; as with [`sh`](crate::sh)
//! their clients are refused, or with `fallback` (ipvsadm `mh-fallback`) go to the next
//! available backend in table order.

use std::net::SocketAddrV4;

use crate::backend::Backend;
use crate::error::PoolError;
use crate::hash::{client_hash, endpoint_key, mix64};
use crate::sh::{eligible_weights, gcd, probe};

/// The Maglev paper's table size (prime). It keeps `M > 100 · N`, the bound for per-backend
/// shares within 1 %, up to 655 backends, and costs 128 KiB per `mh` service.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

const EMPTY: u16 = u16::MAX;

/// Slot → backend table; empty while no backend is eligible.
#[derive(Debug, Clone)]
pub(crate) struct Maglev {
    size: u32,
    table: Vec<u16>,
}

impl Maglev {
    pub(crate) fn new(size: u32) -> Result<Self, PoolError> {
        if size < 7 || !is_prime(size) {
            return Err(PoolError::BadTableSize(size));
        }
        Ok(Self {
            size,
            table: Vec::new(),
        })
    }

    pub(crate) fn rebuild(&mut self, slots: &[Option<Backend>]) {
        self.table.clear();
        let mut eligible = eligible_weights(slots);
        if eligible.is_empty() {
            return;
        }
        eligible.sort_by_key(|&(slot, _)| slots[usize::from(slot)].as_ref().map(Backend::addr));
        let g = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w));
        let m = u64::from(self.size);
        // (offset, skip, next j) per backend, all below M.
        let mut perm: Vec<(u64, u64, u64)> = eligible
            .iter()
            .map(|&(slot, _)| {
                let key = slots[usize::from(slot)]
                    .as_ref()
                    .map_or(0, |b| endpoint_key(*b.addr.ip(), b.addr.port()));
                let offset = mix64(key ^ 0x9e37_79b9_7f4a_7c15) % m;
                let skip = mix64(key ^ 0xc2b2_ae3d_27d4_eb4f) % (m - 1) + 1;
                (offset, skip, 0)
            })
            .collect();
        self.table.resize(self.size as usize, EMPTY);
        let mut filled = 0usize;
        'fill: loop {
            for (k, &(slot, w)) in eligible.iter().enumerate() {
                for _ in 0..w / g {
                    let (offset, skip, next) = &mut perm[k];
                    // Terminates: the permutation visits every slot and one is still empty.
                    let pos = loop {
                        let pos = ((*offset + *next * *skip) % m) as usize;
                        *next += 1;
                        if self.table[pos] == EMPTY {
                            break pos;
                        }
                    };
                    self.table[pos] = slot;
                    filled += 1;
                    if filled == self.table.len() {
                        break 'fill;
                    }
                }
            }
        }
    }

    pub(crate) fn pick(
        &self,
        slots: &[Option<Backend>],
        client: SocketAddrV4,
        with_port: bool,
        fallback: bool,
    ) -> Option<usize> {
        let pos = client_hash(client, with_port) % u64::from(self.size);
        probe(&self.table, slots, pos as usize, fallback)
    }

    #[cfg(test)]
    pub(crate) fn table(&self) -> &[u16] {
        &self.table
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_must_be_prime() {
        assert!(Maglev::new(65_537).is_ok());
        assert!(Maglev::new(4_093).is_ok());
        assert_eq!(
            Maglev::new(65_536).unwrap_err(),
            PoolError::BadTableSize(65_536)
        );
        assert!(Maglev::new(5).is_err());
    }

    #[test]
    fn equal_weights_get_floor_or_ceil_of_the_table() {
        let slots: Vec<Option<Backend>> = (1..=7)
            .map(|i| Some(Backend::new(SocketAddrV4::new([10, 0, 0, i].into(), 80), 1)))
            .collect();
        let mut mh = Maglev::new(4_093).unwrap();
        mh.rebuild(&slots);
        let mut counts = [0usize; 7];
        for &s in mh.table() {
            counts[usize::from(s)] += 1;
        }
        let (lo, hi) = (4_093 / 7, 4_093usize.div_ceil(7));
        assert!(counts.iter().all(|&c| c == lo || c == hi), "{counts:?}");
    }

    #[test]
    fn configuration_order_does_not_change_the_table() {
        let addrs: Vec<SocketAddrV4> = (1..=5)
            .map(|i| SocketAddrV4::new([10, 0, 0, i].into(), 80))
            .collect();
        let build = |order: &[usize]| {
            let slots: Vec<Option<Backend>> = order
                .iter()
                .map(|&i| Some(Backend::new(addrs[i], 1)))
                .collect();
            let mut mh = Maglev::new(4_093).unwrap();
            mh.rebuild(&slots);
            mh.table()
                .iter()
                .map(|&s| slots[usize::from(s)].as_ref().unwrap().addr())
                .collect::<Vec<_>>()
        };
        assert_eq!(build(&[0, 1, 2, 3, 4]), build(&[4, 2, 0, 3, 1]));
    }
}
