//! Heat: a decaying access counter per content block, so a rotation can
//! stage the blocks in use first.
//!
//! Counters are one byte each in a fixed array indexed by CBID modulo its
//! size (CBIDs are dense, so collisions are rare and only blur priorities).
//! A touch is one relaxed atomic add on the I/O path; `decay` halves every
//! counter, so a block's heat is roughly its accesses over the last few
//! decay periods.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::ids::Cbid;

/// Number of counters per zone (1 MiB).
const SLOTS: usize = 1 << 20;

/// Decaying per-content-block access counters.
pub struct Heat {
    counters: Box<[AtomicU8]>,
}

impl Default for Heat {
    fn default() -> Self {
        Self {
            counters: (0..SLOTS).map(|_| AtomicU8::new(0)).collect(),
        }
    }
}

impl Heat {
    fn slot(&self, cbid: Cbid) -> &AtomicU8 {
        &self.counters[(cbid.0 as usize) & (SLOTS - 1)]
    }

    /// Counts one access (saturating).
    pub fn touch(&self, cbid: Cbid) {
        let c = self.slot(cbid);
        // Racy read-then-add is fine: a lost increment only blurs a hint.
        if c.load(Ordering::Relaxed) < u8::MAX {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The block's current heat.
    pub fn get(&self, cbid: Cbid) -> u8 {
        self.slot(cbid).load(Ordering::Relaxed)
    }

    /// Halves every counter.
    pub fn decay(&self) {
        for c in self.counters.iter() {
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                c.store(v / 2, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_count_and_decay_halves() {
        let h = Heat::default();
        for _ in 0..10 {
            h.touch(Cbid(5));
        }
        h.touch(Cbid(6));
        assert_eq!(h.get(Cbid(5)), 10);
        assert_eq!(h.get(Cbid(6)), 1);
        h.decay();
        assert_eq!(h.get(Cbid(5)), 5);
        assert_eq!(h.get(Cbid(6)), 0);
        for _ in 0..1000 {
            h.touch(Cbid(7));
        }
        assert_eq!(h.get(Cbid(7)), u8::MAX, "saturates");
    }
}
