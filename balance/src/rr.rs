//! Round robin (ipvsadm `-s rr`): every eligible backend in turn, weights ignored except 0;
//! backends over their connection threshold are skipped.

use crate::backend::Backend;

/// Cursor of the rotation.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// The first eligible slot at or after the cursor, wrapping around.
    pub(crate) fn pick(&mut self, slots: &[Option<Backend>]) -> Option<usize> {
        let n = slots.len();
        let idx = (0..n)
            .map(|i| (self.next + i) % n)
            .find(|&i| slots[i].as_ref().is_some_and(Backend::is_available))?;
        self.next = idx + 1;
        Some(idx)
    }
}
