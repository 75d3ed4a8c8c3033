//! Id and slot allocators: a bitmap of used ids, plus frees that wait for
//! durability.
//!
//! An id (a device slot or a CBID) that a durable record points to must not
//! be handed out again until the record that stops pointing to it is durable
//! (DESIGN invariants 4 and 7). So a free goes to `pending` with the journal
//! sequence of the record that freed it, and only [`IdAllocator::release_durable`]
//! moves it back to the free set.
//!
//! The bitmap is rebuilt at start-up from the tables, so the allocator keeps
//! no on-disk state of its own.

use crate::ids::JournalSeq;

/// Allocates `u64` ids densely from zero, preferring contiguous runs.
#[derive(Debug, Default)]
pub struct IdAllocator {
    /// One bit per id: set = in use (or pending free).
    words: Vec<u64>,
    /// Ids below this are all tracked by `words`; ids at or above are free.
    capacity: u64,
    /// Lowest id that may be free; a search hint.
    hint: u64,
    /// Frees waiting for their journal record to be durable, in sequence order.
    pending: Vec<(JournalSeq, u64)>,
    /// Number of ids in use (including pending frees).
    used: u64,
    /// Upper bound on ids (a fixed-size device); `u64::MAX` when growable.
    limit: u64,
}

impl IdAllocator {
    /// An empty allocator whose ids stay below `limit`.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    fn ensure_capacity(&mut self, id: u64) {
        if id >= self.capacity {
            let words = (id / 64 + 1) as usize;
            let words = words.max(self.words.len() * 2).max(16);
            self.words.resize(words, 0);
            self.capacity = words as u64 * 64;
        }
    }

    fn is_set(&self, id: u64) -> bool {
        id < self.capacity && self.words[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    fn set(&mut self, id: u64) {
        self.ensure_capacity(id);
        self.words[(id / 64) as usize] |= 1 << (id % 64);
    }

    fn clear(&mut self, id: u64) {
        self.words[(id / 64) as usize] &= !(1 << (id % 64));
    }

    /// Marks `id` as used (start-up rebuild). Returns false if it already was.
    pub fn mark_used(&mut self, id: u64) -> bool {
        if self.is_set(id) {
            return false;
        }
        self.set(id);
        self.used += 1;
        true
    }

    /// Runs `(first, count)` of free ids in `range` (ids past the bitmap
    /// are free). Pending frees count as used.
    pub fn free_runs(&self, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |id: u64, n: u64| match out.last_mut() {
            Some((f, c)) if *f + *c == id => *c += n,
            _ => out.push((id, n)),
        };
        let tracked = range.end.min(self.capacity);
        for id in range.start..tracked {
            if !self.is_set(id) {
                push(id, 1);
            }
        }
        // The untracked tail is free in one run.
        let tail = range.start.max(tracked);
        if tail < range.end {
            push(tail, range.end - tail);
        }
        out
    }

    /// Number of ids in use, counting frees not yet durable.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// One past the highest id ever tracked; a file sized to this holds every used id.
    pub fn high_water(&self) -> u64 {
        let mut w = self.words.len();
        while w > 0 && self.words[w - 1] == 0 {
            w -= 1;
        }
        if w == 0 {
            return 0;
        }
        let word = self.words[w - 1];
        (w as u64 - 1) * 64 + 64 - u64::from(word.leading_zeros())
    }

    /// Allocates up to `want` contiguous ids; returns `(first, count)` with
    /// `count >= 1`, or `None` when the limit is reached.
    pub fn alloc_run(&mut self, want: u64) -> Option<(u64, u64)> {
        let first = self
            .find_free_from(self.hint)
            .or_else(|| self.find_free_from(0))?;
        Some(self.take_run_at(first, want.max(1)))
    }

    /// The first free id at or after `start`, skipping whole used words.
    fn find_free_from(&self, start: u64) -> Option<u64> {
        let mut id = start;
        while id < self.capacity.min(self.limit) {
            let word = self.words[(id / 64) as usize] >> (id % 64);
            let free_in_word = (!word).trailing_zeros();
            if u64::from(free_in_word) < 64 - id % 64 {
                let found = id + u64::from(free_in_word);
                return (found < self.limit).then_some(found);
            }
            id = (id / 64 + 1) * 64;
        }
        let next = id.max(self.capacity);
        (next < self.limit).then_some(next)
    }

    fn take_run_at(&mut self, first: u64, want: u64) -> (u64, u64) {
        let mut n = 0;
        while n < want && first + n < self.limit && !self.is_set(first + n) {
            self.set(first + n);
            n += 1;
        }
        self.used += n;
        self.hint = first + n;
        (first, n)
    }

    /// Returns ids that were never recorded durably (a failed write's
    /// reservation): free at once.
    pub fn release_now(&mut self, first: u64, count: u64) {
        for id in first..first + count {
            if self.is_set(id) {
                self.clear(id);
                self.used -= 1;
            }
        }
        self.hint = self.hint.min(first);
    }

    /// Frees `id` once the journal record at `seq` is durable.
    pub fn free_after(&mut self, seq: JournalSeq, id: u64) {
        debug_assert!(self.is_set(id), "freeing an id that is not in use");
        self.pending.push((seq, id));
    }

    /// Moves every pending free whose record is durable back to the free set.
    pub fn release_durable(&mut self, durable: JournalSeq) {
        if self.pending.first().is_none_or(|p| p.0 > durable) {
            return;
        }
        let mut keep = Vec::new();
        for (seq, id) in std::mem::take(&mut self.pending) {
            if seq <= durable {
                self.clear(id);
                self.used -= 1;
                self.hint = self.hint.min(id);
            } else {
                keep.push((seq, id));
            }
        }
        self.pending = keep;
    }

    /// Number of frees still waiting for durability.
    pub fn pending_frees(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_and_distinct() {
        let mut a = IdAllocator::new(u64::MAX);
        assert_eq!(a.alloc_run(10), Some((0, 10)));
        assert_eq!(a.alloc_run(5), Some((10, 5)));
        a.release_now(3, 4);
        assert_eq!(
            a.alloc_run(10),
            Some((3, 4)),
            "a run stops at the next used id"
        );
        assert_eq!(a.used(), 15);
    }

    #[test]
    fn frees_wait_for_durability() {
        let mut a = IdAllocator::new(4);
        assert_eq!(a.alloc_run(4), Some((0, 4)));
        a.free_after(JournalSeq(7), 2);
        assert_eq!(a.alloc_run(1), None, "a pending free must not be reused");
        a.release_durable(JournalSeq(6));
        assert_eq!(a.alloc_run(1), None);
        a.release_durable(JournalSeq(7));
        assert_eq!(a.alloc_run(1), Some((2, 1)));
        assert_eq!(a.pending_frees(), 0);
    }

    #[test]
    fn limit_is_respected_and_wraps() {
        let mut a = IdAllocator::new(130);
        assert_eq!(a.alloc_run(200), Some((0, 130)));
        assert_eq!(a.alloc_run(1), None);
        a.release_now(64, 1);
        assert_eq!(a.alloc_run(3), Some((64, 1)));
    }

    #[test]
    fn mark_used_and_high_water() {
        let mut a = IdAllocator::new(u64::MAX);
        assert!(a.mark_used(100));
        assert!(!a.mark_used(100));
        assert_eq!(a.high_water(), 101);
        assert_eq!(a.alloc_run(1), Some((0, 1)));
        assert_eq!(a.used(), 2);
    }

    #[test]
    fn never_double_allocates_under_random_use() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut a = IdAllocator::new(500);
        let mut owned = std::collections::BTreeSet::new();
        let mut seq = 0;
        for _ in 0..5000 {
            seq += 1;
            if rng.gen_bool(0.6) {
                if let Some((f, n)) = a.alloc_run(rng.gen_range(1..8)) {
                    for id in f..f + n {
                        assert!(owned.insert(id), "id {id} handed out twice");
                    }
                }
            } else if let Some(&id) = owned.iter().nth(rng.gen_range(0..owned.len().max(1))) {
                owned.remove(&id);
                a.free_after(JournalSeq(seq), id);
            }
            a.release_durable(JournalSeq(seq.saturating_sub(3)));
        }
    }
}
