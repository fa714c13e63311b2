//! The poison-tolerant lock.
//!
//! Invariant for every mutex locked this way: a holder that panics cannot leave the data in
//! a state worse than refusing to serve would (counters, tables whose entries are updated
//! whole, plain values). The drivers keep forwarding after a panic in one task instead of
//! turning one bug into a dead data path.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data over from a holder that panicked.
#[inline]
pub fn lock_unpoisoned<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks_with_its_data() {
        let m = Mutex::new(7);
        let poisoned = std::panic::catch_unwind(|| {
            let _guard = m.lock().expect("first lock");
            panic!("holder panics");
        });
        assert!(poisoned.is_err() && m.is_poisoned());
        *lock_unpoisoned(&m) += 1;
        assert_eq!(*lock_unpoisoned(&m), 8);
    }
}
