//! Destination hashing (ipvsadm `-s dh`): the flow's destination address picks one of 256
//! buckets, each bucket naming a backend.
//!
//! As in LVS, the buckets go to the eligible backends in turn, one each, whatever their
//! weights (a weight only has to be above 0), so a destination always reaches the same
//! backend while the set is stable: the cache that already holds its objects. A backend that
//! fails or drains leaves the table (its destinations are rehashed, as when keepalived removes
//! it); one over its connection threshold stays, and its destinations are refused until it
//! drops under the lower threshold: `dh` has no fallback in LVS either.

use std::net::Ipv4Addr;

use crate::backend::Backend;
use crate::sh::{bucket_of, eligible_weights, probe};

const TABLE_SIZE: usize = 256;

/// Bucket → slot table; empty while no backend is eligible.
#[derive(Debug, Clone, Default)]
pub(crate) struct DestinationHash {
    table: Vec<u16>,
}

impl DestinationHash {
    pub(crate) fn rebuild(&mut self, slots: &[Option<Backend>]) {
        self.table.clear();
        let eligible = eligible_weights(slots);
        if eligible.is_empty() {
            return;
        }
        self.table
            .extend((0..TABLE_SIZE).map(|i| eligible[i % eligible.len()].0));
    }

    pub(crate) fn pick(&self, slots: &[Option<Backend>], dest: Ipv4Addr) -> Option<usize> {
        probe(&self.table, slots, bucket_of(u32::from(dest)), false)
    }
}
