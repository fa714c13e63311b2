//! Source hashing (ipvsadm `-s sh`): a static 256-bucket table, each eligible backend
//! replicated by its weight, indexed by a hash of the client address (and port with
//! `hash_port`, ipvsadm's `sh-port`).
//!
//! The table only holds eligible backends, so a client whose backend fails or drains is
//! rehashed at once (LVS gets the same effect when keepalived removes the failed server).
//! Unlike [`mh`](crate::mh) a change reshuffles many clients; pick `mh` when that matters.
//!
//! A backend over its connection threshold stays in the table (overload comes and goes with
//! every connection; rebuilding would reshuffle clients each time). Its clients are refused, as
//! LVS refuses them, unless the service sets `fallback` (ipvsadm `sh-fallback`): then the
//! following buckets are tried in order, the first available backend taking the flow.

use std::net::SocketAddrV4;

use crate::backend::Backend;

/// LVS's `CONFIG_IP_VS_SH_TAB_BITS` default.
const TABLE_BITS: u32 = 8;
const TABLE_SIZE: usize = 1 << TABLE_BITS;

/// Bucket → slot table; empty while no backend is eligible.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceHash {
    table: Vec<u16>,
}

impl SourceHash {
    /// Refills the buckets in slot order, `weight / gcd` consecutive buckets per backend.
    pub(crate) fn rebuild(&mut self, slots: &[Option<Backend>]) {
        self.table.clear();
        let eligible: Vec<(u16, u32)> = eligible_weights(slots);
        let g = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w));
        if eligible.is_empty() {
            return;
        }
        self.table.reserve(TABLE_SIZE);
        'fill: loop {
            for &(slot, w) in &eligible {
                for _ in 0..w / g {
                    if self.table.len() == TABLE_SIZE {
                        break 'fill;
                    }
                    self.table.push(slot);
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
        let port = if with_port {
            u32::from(client.port())
        } else {
            0
        };
        let key = u32::from(*client.ip()).wrapping_add(port);
        probe(&self.table, slots, bucket_of(key), fallback)
    }
}

/// The 256-entry bucket of a 32-bit key: multiplicative hashing by the 32-bit golden ratio, as
/// the kernel's `hash_32`.
pub(crate) fn bucket_of(key: u32) -> usize {
    (key.wrapping_mul(0x61c8_8647) >> (32 - TABLE_BITS)) as usize
}

/// The backend of `table[start]` if it is available; with `fallback`, else the first available
/// one in the following entries (wrapping), each entry looked at once.
pub(crate) fn probe(
    table: &[u16],
    slots: &[Option<Backend>],
    start: usize,
    fallback: bool,
) -> Option<usize> {
    let available = |i: usize| {
        let slot = usize::from(table[i % table.len()]);
        slots[slot]
            .as_ref()
            .is_some_and(Backend::is_available)
            .then_some(slot)
    };
    if table.is_empty() {
        return None;
    }
    if let Some(hit) = available(start) {
        return Some(hit);
    }
    // The walk is bounded by the table; skip it when nobody could take the flow (every
    // backend overloaded), which would otherwise cost a whole Maglev table per refusal.
    if !fallback || !slots.iter().flatten().any(Backend::is_available) {
        return None;
    }
    (start + 1..start + table.len()).find_map(available)
}

/// `(slot, weight)` of every eligible backend, in slot order.
pub(crate) fn eligible_weights(slots: &[Option<Backend>]) -> Vec<(u16, u32)> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let b = b.as_ref().filter(|b| b.is_eligible())?;
            // Pools hold at most MAX_BACKENDS slots, far below u16::MAX.
            Some((u16::try_from(i).ok()?, b.weight))
        })
        .collect()
}

pub(crate) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}
