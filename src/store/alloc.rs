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
//!
//! # Placement
//! Short runs take the lowest free ids (first fit), which keeps a growable
//! file small. Long runs ([`LONG_RUN`] ids or more) look for whole free
//! bitmap words (64 contiguous free ids) first: after random overwrites the
//! low free ids are scattered singletons, and first fit would split a long
//! write into as many device writes. When no free word is left below the
//! highest used id, a long run may extend the file, but only while it stays
//! within [`GROWTH_SLACK_DIV`] of the ids in use (at least
//! [`GROWTH_SLACK_MIN`] ids); past that it takes fragments like a short run.
//! So contiguity costs at most that much space, never an unbounded file.

use crate::ids::JournalSeq;

/// Runs of at least this many ids prefer whole free words to the lowest
/// free ids.
pub const LONG_RUN: u64 = 32;

/// A long run may grow the id space past the highest used id while the
/// total stays within `used + used / GROWTH_SLACK_DIV`...
pub const GROWTH_SLACK_DIV: u64 = 8;

/// ...or within `used + GROWTH_SLACK_MIN`, whichever is larger
/// (64 MiB of 4 KiB slots).
pub const GROWTH_SLACK_MIN: u64 = 16384;

/// Allocates `u64` ids densely from zero, preferring contiguous runs.
#[derive(Debug, Default)]
pub struct IdAllocator {
    /// One bit per id: set = in use (or pending free).
    words: Vec<u64>,
    /// Ids below this are all tracked by `words`; ids at or above are free.
    capacity: u64,
    /// Lowest id that may be free; a search hint.
    hint: u64,
    /// Lowest id whose bitmap word may be all free; the long runs' hint.
    word_hint: u64,
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
    /// `count >= 1`, or `None` when the limit is reached. See the module
    /// doc for where the run is placed.
    pub fn alloc_run(&mut self, want: u64) -> Option<(u64, u64)> {
        let want = want.max(1);
        if want >= LONG_RUN
            && let Some(first) = self.find_long_run(want)
        {
            let run = self.take_run_at(first, want);
            self.word_hint = run.0 + run.1;
            if self.hint == first {
                self.hint = run.0 + run.1;
            }
            return Some(run);
        }
        let first = self
            .find_free_from(self.hint)
            .or_else(|| self.find_free_from(0))?;
        let run = self.take_run_at(first, want);
        self.hint = run.0 + run.1;
        Some(run)
    }

    /// Where a long run of `want` ids should start: the first all-free word
    /// below the highest used id, from `word_hint` on; else just past the
    /// highest used id, if that stays within the growth bound; else `None`
    /// (take fragments).
    fn find_long_run(&mut self, want: u64) -> Option<u64> {
        let high = self.high_water();
        let end_word = high.div_ceil(64);
        let mut w = self.word_hint / 64;
        let offset = self.word_hint % 64;
        if offset != 0 && self.word_hint < high {
            // Mid-word, where the last long run ended: go on from there if
            // the rest of the word is free, so a stream of long writes
            // lands in one contiguous range.
            if self.words[w as usize] >> offset == 0 && self.word_hint < self.limit {
                return Some(self.word_hint);
            }
            w += 1;
        }
        while w < end_word {
            if self.words[w as usize] == 0 {
                let first = w * 64;
                return (first < self.limit).then_some(first);
            }
            w += 1;
        }
        // No free word below the high-water mark until something is freed.
        self.word_hint = end_word * 64;
        let first = high;
        let bound = if self.limit == u64::MAX {
            let slack = (self.used / GROWTH_SLACK_DIV).max(GROWTH_SLACK_MIN);
            self.used.saturating_add(want).saturating_add(slack)
        } else {
            self.limit
        };
        (first.saturating_add(want) <= bound && first < self.limit).then_some(first)
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
        self.word_hint = self.word_hint.min(first / 64 * 64);
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
                self.word_hint = self.word_hint.min(id / 64 * 64);
            } else {
                keep.push((seq, id));
            }
        }
        self.pending = keep;
    }

    /// Lowers the limit (tests: a raw device of `limit` slots).
    #[cfg(test)]
    pub(crate) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
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

    /// `n` ids in use but every other one of the first `head`: free space
    /// with no run longer than one.
    fn fragmented(n: u64, head: u64) -> IdAllocator {
        let mut a = IdAllocator::new(u64::MAX);
        assert_eq!(a.alloc_run(n), Some((0, n)));
        for id in (0..head).step_by(2) {
            a.release_now(id, 1);
        }
        a
    }

    #[test]
    fn long_runs_take_whole_free_words_and_short_ones_fill_holes() {
        let mut a = fragmented(1024, 1024);
        // Two whole free words in the middle of the fragments.
        for id in (320..448).filter(|id| id % 2 == 1) {
            a.release_now(id, 1);
        }
        assert_eq!(a.alloc_run(LONG_RUN), Some((320, LONG_RUN)));
        assert_eq!(
            a.alloc_run(1),
            Some((0, 1)),
            "short runs fill from the bottom"
        );
        assert_eq!(a.alloc_run(3), Some((2, 1)));
        // The next long run goes on where the last one ended...
        assert_eq!(a.alloc_run(64), Some((352, 64)));
        assert_eq!(a.alloc_run(64), Some((416, 33)), "448 was free too");
        // ...and with no free word left, past the end.
        assert_eq!(a.alloc_run(100), Some((1024, 100)));
        assert_eq!(a.alloc_run(1), Some((4, 1)));
    }

    #[test]
    fn long_runs_grow_the_file_only_while_free_space_inside_is_within_the_slack() {
        let n = 4 * GROWTH_SLACK_MIN;
        // Exactly the slack is free (in fragments) below the end.
        let mut a = fragmented(n, 2 * GROWTH_SLACK_MIN);
        assert_eq!(a.high_water() - a.used(), GROWTH_SLACK_MIN);
        assert_eq!(a.alloc_run(256), Some((n, 256)));
        assert_eq!(a.alloc_run(256), Some((n + 256, 256)), "contiguous");
        // More free space inside the file than the slack: long runs take
        // fragments until it is back within the slack.
        a.release_now(1, 1);
        a.release_now(3, 1);
        let high = a.high_water();
        assert_eq!(a.alloc_run(256), Some((0, 5)));
        assert_eq!(a.high_water(), high);
        assert_eq!(a.alloc_run(256), Some((high, 256)));
        // However long runs and frees mix, the free space inside the file
        // stays within the slack (plus the word alignment of a run).
        for i in 0..1000 {
            a.alloc_run([1, 256, 100][i as usize % 3]);
            if i % 7 == 0 {
                a.release_now(i * 11 % a.high_water(), 1);
            }
            assert!(
                a.high_water() - a.used() <= GROWTH_SLACK_MIN + 64,
                "{} free inside",
                a.high_water() - a.used()
            );
        }
        // When fragments run out, the end is the only free space left.
        let mut b = fragmented(1024, 1024);
        while b.alloc_run(1).is_some_and(|(first, _)| first < 1024) {}
        assert_eq!(b.alloc_run(256), Some((1025, 256)));
        // A fixed-size device uses all of its space for long runs.
        let mut c = IdAllocator::new(n + 1000);
        c.alloc_run(n);
        for id in (0..n).step_by(2) {
            c.release_now(id, 1);
        }
        assert_eq!(c.alloc_run(1000), Some((n, 1000)));
        assert_eq!(c.alloc_run(64), Some((0, 1)));
    }

    #[test]
    fn a_free_below_the_word_hint_is_found_again() {
        let mut a = fragmented(1024, 1024);
        assert_eq!(a.alloc_run(64), Some((1024, 64)), "no free word yet");
        for id in (128..192).filter(|id| id % 2 == 1) {
            a.free_after(JournalSeq(1), id);
        }
        assert_eq!(a.alloc_run(64), Some((1088, 64)), "not durable yet");
        a.release_durable(JournalSeq(1));
        assert_eq!(a.alloc_run(64), Some((128, 64)));
    }

    #[test]
    fn long_runs_grow_a_file_only_within_the_slack_under_random_use() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut a = IdAllocator::new(u64::MAX);
        let mut owned = Vec::new();
        for _ in 0..40_000 {
            if owned.len() > 100_000 || (!owned.is_empty() && rng.gen_bool(0.45)) {
                let id = owned.swap_remove(rng.gen_range(0..owned.len()));
                a.release_now(id, 1);
                continue;
            }
            let want = if rng.gen_bool(0.3) {
                rng.gen_range(LONG_RUN..300)
            } else {
                1
            };
            let (high, used) = (a.high_water(), a.used());
            let (first, count) = a.alloc_run(want).expect("growable");
            owned.extend(first..first + count);
            if first + count > high {
                let slack = (used / GROWTH_SLACK_DIV).max(GROWTH_SLACK_MIN);
                assert!(
                    want < LONG_RUN || high - used <= slack,
                    "grew with {} free inside",
                    high - used
                );
            }
        }
        assert_eq!(a.used(), owned.len() as u64);
        owned.sort_unstable();
        owned.dedup();
        assert_eq!(a.used(), owned.len() as u64, "no id handed out twice");
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
                let want = if rng.gen_bool(0.2) {
                    rng.gen_range(LONG_RUN..200)
                } else {
                    rng.gen_range(1..8)
                };
                if let Some((f, n)) = a.alloc_run(want) {
                    assert!(n <= want && f + n <= 500);
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
