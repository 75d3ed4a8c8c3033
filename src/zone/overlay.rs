//! The changes to a checkpoint table made since the last checkpoint.
//!
//! A table holds the state as of a checkpoint and never anything newer (see
//! `store::table`); an overlay holds every change since, by record index,
//! each tagged with the journal frame that made it. Lookups look in the
//! overlay first.
//!
//! A checkpoint at sequence S runs in three steps so that writers wait only
//! for the first: [`freeze`](Overlay::freeze) sets the changes up to S
//! aside (under the zone lock, with appenders stopped, so no change is
//! newer than S), [`copy_frozen`](Overlay::copy_frozen) copies them into
//! the table a bounded number at a time, taking the lock for each batch,
//! and [`thaw`](Overlay::thaw) drops them once all are copied. Meanwhile
//! new changes go to the live set, and lookups look there first, then in
//! the frozen set, then in the table: the frozen set and the table agree on
//! what has been copied, so the answer is the same at every step.
//!
//! Changes are kept in pages of 64 consecutive record indexes, so that the
//! changes one write makes (its fresh CBIDs come in runs, a long write's
//! LBAs are consecutive) share a few pages: one hash lookup per page, and
//! memory that is already in cache for the next index. A page stores only
//! the changes it has, so a sparse page (random writes on a large zone)
//! costs little more than its changes.

use rustc_hash::FxHashMap as HashMap;

use crate::ids::JournalSeq;

/// Log2 of the record indexes in one page.
const PAGE_SHIFT: u32 = 6;
/// Mask of an index's place in its page.
const IN_PAGE: u64 = (1 << PAGE_SHIFT) - 1;

/// The changes to one page of records: bit `i` of `present` is set when
/// record `page * 64 + i` changed, and its change is `changes[place[i]]`.
/// Changes are kept in arrival order, so that recording one never moves
/// the others.
struct Page<V> {
    present: u64,
    place: [u8; 1 << PAGE_SHIFT],
    changes: Vec<(V, JournalSeq)>,
}

impl<V: Copy> Page<V> {
    fn new() -> Self {
        Self {
            present: 0,
            place: [0; 1 << PAGE_SHIFT],
            // Room for one: a page of a random write may never get a second
            // (Vec's first growth would make room for four).
            changes: Vec::with_capacity(1),
        }
    }

    fn contains(&self, bit: u64) -> bool {
        self.present & (1u64 << bit) != 0
    }

    fn get(&self, bit: u64) -> Option<&(V, JournalSeq)> {
        self.contains(bit)
            .then(|| &self.changes[usize::from(self.place[bit as usize])])
    }

    /// Records a change; true when the record had none in this page.
    fn set(&mut self, bit: u64, change: (V, JournalSeq)) -> bool {
        if self.contains(bit) {
            self.changes[usize::from(self.place[bit as usize])] = change;
            return false;
        }
        self.present |= 1u64 << bit;
        // At most 64 changes, so the place fits a byte.
        self.place[bit as usize] = self.changes.len() as u8;
        self.changes.push(change);
        true
    }

    fn remove(&mut self, bit: u64) -> Option<(V, JournalSeq)> {
        if !self.contains(bit) {
            return None;
        }
        self.present &= !(1u64 << bit);
        let at = self.place[bit as usize];
        let last = (self.changes.len() - 1) as u8;
        // The last change moves into the hole: find whose it is.
        if at != last
            && let Some(moved) = self.bits().find(|&b| self.place[b as usize] == last)
        {
            self.place[moved as usize] = at;
        }
        Some(self.changes.swap_remove(usize::from(at)))
    }

    /// The bits set, lowest first.
    fn bits(&self) -> impl Iterator<Item = u64> + use<V> {
        let mut present = self.present;
        std::iter::from_fn(move || {
            (present != 0).then(|| {
                let bit = u64::from(present.trailing_zeros());
                present &= present - 1;
                bit
            })
        })
    }

    /// Every change with its bit, in index order.
    fn iter(&self) -> impl Iterator<Item = (u64, &(V, JournalSeq))> + '_ {
        self.bits()
            .map(|b| (b, &self.changes[usize::from(self.place[b as usize])]))
    }
}

/// Pages by page number (record index / 64).
type Pages<V> = HashMap<u64, Page<V>>;

fn split(index: u64) -> (u64, u64) {
    (index >> PAGE_SHIFT, index & IN_PAGE)
}

/// Every change in `pages`, by record index.
fn changes<V: Copy>(pages: &Pages<V>) -> impl Iterator<Item = (u64, V)> + '_ {
    pages.iter().flat_map(|(&page, p)| {
        p.iter()
            .map(move |(bit, &(v, _))| ((page << PAGE_SHIFT) | bit, v))
    })
}

/// Changes to one table: record index → (value, journal frame).
pub struct Overlay<V> {
    /// Changes not yet set aside by a checkpoint.
    live: Pages<V>,
    /// Changes a running checkpoint is copying into the table.
    frozen: Pages<V>,
    /// Number of changes in `live`.
    live_len: usize,
    /// Number of changes in `frozen`.
    frozen_len: usize,
    /// Pages of `frozen` not yet copied, the last one first...
    uncopied: Vec<u64>,
    /// ...of whose changes this many are copied already.
    copied_in_page: usize,
}

impl<V> Default for Overlay<V> {
    fn default() -> Self {
        Self {
            live: HashMap::default(),
            frozen: HashMap::default(),
            live_len: 0,
            frozen_len: 0,
            uncopied: Vec::new(),
            copied_in_page: 0,
        }
    }
}

impl<V: Copy> Overlay<V> {
    /// The newest change to record `index`, if it changed since the table.
    pub fn get(&self, index: u64) -> Option<V> {
        let (page, bit) = split(index);
        self.live
            .get(&page)
            .and_then(|p| p.get(bit))
            .or_else(|| self.frozen.get(&page).and_then(|p| p.get(bit)))
            .map(|&(v, _)| v)
    }

    /// Whether record `index` changed since the table.
    pub fn contains(&self, index: u64) -> bool {
        let (page, bit) = split(index);
        let has = |pages: &Pages<V>| pages.get(&page).is_some_and(|p| p.contains(bit));
        has(&self.live) || has(&self.frozen)
    }

    /// Records a change made by the journal frame `seq`.
    pub fn set(&mut self, index: u64, value: V, seq: JournalSeq) {
        let (page, bit) = split(index);
        if self
            .live
            .entry(page)
            .or_insert_with(Page::new)
            .set(bit, (value, seq))
        {
            self.live_len += 1;
        }
    }

    /// Number of changes held (a checkpoint bounds it).
    pub fn len(&self) -> usize {
        self.live_len + self.frozen_len
    }

    /// Whether no change is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest change of every record that changed, in no order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, V)> + '_ {
        let frozen = changes(&self.frozen).filter(|&(i, _)| {
            let (page, bit) = split(i);
            !self.live.get(&page).is_some_and(|p| p.contains(bit))
        });
        changes(&self.live).chain(frozen)
    }

    /// Starts a checkpoint at `seq`: the changes up to it are set aside to
    /// be copied. Changes newer than `seq` stay live (there are none when
    /// appenders are stopped, as the pool's checkpoint has them).
    pub fn freeze(&mut self, seq: JournalSeq) {
        // A checkpoint left unfinished gave its changes back.
        debug_assert!(self.frozen.is_empty(), "a checkpoint is already running");
        self.unfreeze();
        // The frozen map kept its capacity from the last checkpoint; the
        // live map gets it now, so writes after this one do not regrow it.
        std::mem::swap(&mut self.live, &mut self.frozen);
        self.frozen_len = std::mem::take(&mut self.live_len);
        // One pass, under the zone lock: the pages to copy (into the list's
        // capacity from the last checkpoint), and the rare newer changes.
        let mut newer = Vec::new();
        for (&page, p) in &self.frozen {
            self.uncopied.push(page);
            newer.extend(
                p.iter()
                    .filter(|&(_, &(_, s))| s > seq)
                    .map(|(bit, _)| (page, bit)),
            );
        }
        for (page, bit) in newer {
            let p = self.frozen.get_mut(&page).expect("page seen above");
            let change = p.remove(bit).expect("change seen above");
            if p.present == 0 {
                self.frozen.remove(&page);
            }
            self.frozen_len -= 1;
            self.live
                .entry(page)
                .or_insert_with(Page::new)
                .set(bit, change);
            self.live_len += 1;
        }
    }

    /// Copies frozen changes into the table through `put`, taking one from
    /// `budget` for each, until all are copied or the budget is spent.
    /// Returns whether every frozen change is now copied. On an error, the
    /// change that failed stays uncopied.
    pub fn copy_frozen<E>(
        &mut self,
        budget: &mut usize,
        mut put: impl FnMut(u64, V) -> Result<(), E>,
    ) -> Result<bool, E> {
        while *budget > 0 {
            let Some(&page) = self.uncopied.last() else {
                break;
            };
            // Frozen pages do not change while a checkpoint copies them
            // (writers go to the live set), so the count stays valid.
            let page_changes = self.frozen.get(&page);
            let pending = page_changes
                .map_or(0, |p| p.changes.len())
                .saturating_sub(self.copied_in_page);
            let take = pending.min(*budget);
            if let Some(p) = page_changes {
                for (n, (bit, &(v, _))) in p.iter().enumerate().skip(self.copied_in_page).take(take)
                {
                    put((page << PAGE_SHIFT) | bit, v)?;
                    self.copied_in_page = n + 1;
                }
            }
            *budget -= take;
            if take == pending {
                self.uncopied.pop();
                self.copied_in_page = 0;
                // An empty page costs one, so the loop always moves on.
                *budget = budget.saturating_sub(usize::from(take == 0));
            }
        }
        Ok(self.uncopied.is_empty())
    }

    /// Ends a checkpoint whose changes are all copied: the table now holds
    /// them, so the frozen set is dropped (keeping the map's capacity).
    pub fn thaw(&mut self) {
        debug_assert!(
            self.uncopied.is_empty(),
            "thawed before every change was copied"
        );
        self.frozen.clear();
        self.frozen_len = 0;
        self.uncopied.clear();
        self.copied_in_page = 0;
    }

    /// Gives up a checkpoint: frozen changes go back to the live set,
    /// except where a newer change replaced them.
    pub fn unfreeze(&mut self) {
        for (page, p) in self.frozen.drain() {
            match self.live.get_mut(&page) {
                None => {
                    self.live_len += p.changes.len();
                    self.live.insert(page, p);
                }
                Some(live) => {
                    for (bit, &change) in p.iter() {
                        if !live.contains(bit) {
                            live.set(bit, change);
                            self.live_len += 1;
                        }
                    }
                }
            }
        }
        self.frozen_len = 0;
        self.uncopied.clear();
        self.copied_in_page = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> JournalSeq {
        JournalSeq(n)
    }

    #[test]
    fn lookups_agree_at_every_step_of_a_checkpoint() {
        let mut table: HashMap<u64, u32> = HashMap::default();
        let mut o: Overlay<u32> = Overlay::default();
        for i in 0..100 {
            o.set(i, i as u32, seq(i + 1));
        }
        let read = |o: &Overlay<u32>, table: &HashMap<u64, u32>, i: u64| {
            o.get(i).or_else(|| table.get(&i).copied())
        };
        o.freeze(seq(90));
        // Newer than the checkpoint: stays live, never copied.
        assert!(o.live_len == 10 && o.frozen_len == 90);
        // Changes after the freeze shadow frozen ones.
        o.set(5, 500, seq(101));
        o.set(200, 2000, seq(102));
        let mut done = false;
        while !done {
            done = o
                .copy_frozen(&mut 7, |i, v| {
                    table.insert(i, v);
                    Ok::<(), ()>(())
                })
                .unwrap();
            for i in 0..100 {
                let want = if i == 5 { 500 } else { i as u32 };
                assert_eq!(read(&o, &table, i), Some(want), "record {i}");
            }
        }
        assert_eq!(table.len(), 90, "exactly the changes up to the checkpoint");
        assert_eq!(
            table[&5], 5,
            "the table holds the value as of the checkpoint"
        );
        assert!(!table.contains_key(&95));
        o.thaw();
        assert_eq!(o.len(), 12);
        assert_eq!(read(&o, &table, 5), Some(500));
        assert_eq!(read(&o, &table, 95), Some(95));
        assert_eq!(read(&o, &table, 200), Some(2000));
        let mut entries: Vec<_> = o.entries().collect();
        entries.sort_unstable();
        assert_eq!(entries.first(), Some(&(5, 500)));
        assert_eq!(entries.len(), 12);
    }

    #[test]
    fn a_failed_checkpoint_gives_its_changes_back() {
        let mut o: Overlay<u32> = Overlay::default();
        for i in 0..10 {
            o.set(i, i as u32, seq(1));
        }
        o.freeze(seq(1));
        o.set(3, 33, seq(2));
        let mut copied = 0;
        let r = o.copy_frozen(&mut 10, |_, _| {
            copied += 1;
            if copied == 4 {
                Err("disk full")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("disk full"));
        // Every change still answers, frozen or not.
        for i in 0..10 {
            assert_eq!(o.get(i), Some(if i == 3 { 33 } else { i as u32 }));
        }
        o.unfreeze();
        assert!(o.frozen.is_empty() && o.uncopied.is_empty());
        assert_eq!(o.len(), 10);
        assert_eq!(o.get(3), Some(33), "the newer change wins");
        // And the next checkpoint takes them all.
        o.freeze(seq(2));
        assert_eq!(o.frozen_len, 10);
        assert!(o.copy_frozen(&mut 100, |_, _| Ok::<(), ()>(())).unwrap());
        o.thaw();
        assert!(o.is_empty());
    }

    /// Random changes over many pages against a plain map, through whole
    /// checkpoints, checkpoints given up half way, and writers between the
    /// copy steps: every lookup, `entries` and `len` agree with the model,
    /// and the table holds exactly the state as of each finished checkpoint.
    #[test]
    fn paged_changes_agree_with_a_plain_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut o: Overlay<u32> = Overlay::default();
        let mut table: HashMap<u64, u32> = HashMap::default();
        // Newest value per index since the table, and its sequence.
        let mut model: HashMap<u64, (u32, u64)> = HashMap::default();
        let mut s = 0u64;
        let check =
            |o: &Overlay<u32>, table: &HashMap<u64, u32>, model: &HashMap<u64, (u32, u64)>| {
                for i in 0..700 {
                    let want = model
                        .get(&i)
                        .map(|&(v, _)| v)
                        .or_else(|| table.get(&i).copied());
                    assert_eq!(
                        o.get(i).or_else(|| table.get(&i).copied()),
                        want,
                        "index {i}"
                    );
                    assert_eq!(o.contains(i), o.get(i).is_some());
                }
                let mut got: Vec<(u64, u32)> = o.entries().collect();
                got.sort_unstable();
                let mut entries: Vec<(u64, u32)> = got.clone();
                entries.dedup_by_key(|e| e.0);
                assert_eq!(entries.len(), got.len(), "one entry per index");
            };
        for round in 0..40 {
            for _ in 0..rng.gen_range(1..200) {
                s += 1;
                // Clustered and scattered indexes, as writes make them.
                let i = if rng.gen_bool(0.5) {
                    rng.gen_range(0..700)
                } else {
                    64 * 3 + s % 64
                };
                let v = rng.r#gen::<u32>();
                o.set(i, v, seq(s));
                model.insert(i, (v, s));
            }
            check(&o, &table, &model);
            // Some changes newer than the checkpoint, as a pool's checkpoint
            // never has but the overlay allows.
            let cut = s - rng.gen_range(0..20).min(s);
            o.freeze(seq(cut));
            let mut done = false;
            let give_up = round % 5 == 4;
            while !done {
                done = o
                    .copy_frozen(&mut rng.gen_range(1..40), |i, v| {
                        table.insert(i, v);
                        Ok::<(), ()>(())
                    })
                    .unwrap();
                // Writers between steps.
                for _ in 0..5 {
                    s += 1;
                    let i = rng.gen_range(0..700);
                    o.set(i, s as u32, seq(s));
                    model.insert(i, (s as u32, s));
                }
                check(&o, &table, &model);
                if give_up {
                    break;
                }
            }
            if give_up {
                o.unfreeze();
            } else {
                o.thaw();
                // What the table took is gone from the overlay.
                model.retain(|_, &mut (_, at)| at > cut);
            }
            check(&o, &table, &model);
            assert_eq!(o.len(), o.entries().count());
            assert_eq!(o.len(), model.len());
        }
    }
}
