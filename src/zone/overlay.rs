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

use rustc_hash::FxHashMap as HashMap;

use crate::ids::JournalSeq;

/// Changes to one table: record index → (value, journal frame).
pub struct Overlay<V> {
    /// Changes not yet set aside by a checkpoint.
    live: HashMap<u64, (V, JournalSeq)>,
    /// Changes a running checkpoint is copying into the table.
    frozen: HashMap<u64, (V, JournalSeq)>,
    /// Indexes of `frozen` not yet copied.
    uncopied: Vec<u64>,
}

impl<V> Default for Overlay<V> {
    fn default() -> Self {
        Self {
            live: HashMap::default(),
            frozen: HashMap::default(),
            uncopied: Vec::new(),
        }
    }
}

impl<V: Copy> Overlay<V> {
    /// The newest change to record `index`, if it changed since the table.
    pub fn get(&self, index: u64) -> Option<V> {
        self.live
            .get(&index)
            .or_else(|| self.frozen.get(&index))
            .map(|&(v, _)| v)
    }

    /// Whether record `index` changed since the table.
    pub fn contains(&self, index: u64) -> bool {
        self.live.contains_key(&index) || self.frozen.contains_key(&index)
    }

    /// Records a change made by the journal frame `seq`.
    pub fn set(&mut self, index: u64, value: V, seq: JournalSeq) {
        self.live.insert(index, (value, seq));
    }

    /// Number of changes held (a checkpoint bounds it).
    pub fn len(&self) -> usize {
        self.live.len() + self.frozen.len()
    }

    /// Whether no change is held.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.frozen.is_empty()
    }

    /// The newest change of every record that changed, in no order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, V)> + '_ {
        let frozen = self
            .frozen
            .iter()
            .filter(|(i, _)| !self.live.contains_key(i));
        self.live.iter().chain(frozen).map(|(&i, &(v, _))| (i, v))
    }

    /// Starts a checkpoint at `seq`: the changes up to it are set aside to
    /// be copied. Changes newer than `seq` stay live (there are none when
    /// appenders are stopped, as the pool's checkpoint has them).
    pub fn freeze(&mut self, seq: JournalSeq) {
        // A checkpoint left unfinished gave its changes back.
        debug_assert!(self.frozen.is_empty(), "a checkpoint is already running");
        self.unfreeze();
        // The frozen set kept its capacity from the last checkpoint; the
        // live set gets it now, so writes after this one do not regrow it.
        std::mem::swap(&mut self.live, &mut self.frozen);
        // One pass, under the zone lock: the keys to copy (into the list's
        // capacity from the last checkpoint), and the rare newer changes.
        let mut newer = Vec::new();
        for (&i, &(_, s)) in &self.frozen {
            if s > seq {
                newer.push(i);
            } else {
                self.uncopied.push(i);
            }
        }
        for i in newer {
            if let Some(change) = self.frozen.remove(&i) {
                self.live.insert(i, change);
            }
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
            let Some(&i) = self.uncopied.last() else {
                break;
            };
            if let Some(&(v, _)) = self.frozen.get(&i) {
                put(i, v)?;
            }
            self.uncopied.pop();
            *budget -= 1;
        }
        Ok(self.uncopied.is_empty())
    }

    /// Ends a checkpoint whose changes are all copied: the table now holds
    /// them, so the frozen set is dropped (keeping its capacity).
    pub fn thaw(&mut self) {
        debug_assert!(
            self.uncopied.is_empty(),
            "thawed before every change was copied"
        );
        self.frozen.clear();
        self.uncopied.clear();
    }

    /// Gives up a checkpoint: frozen changes go back to the live set,
    /// except where a newer change replaced them.
    pub fn unfreeze(&mut self) {
        for (i, change) in self.frozen.drain() {
            self.live.entry(i).or_insert(change);
        }
        self.uncopied.clear();
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
        assert!(o.live.len() == 10 && o.frozen.len() == 90);
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
        assert_eq!(o.frozen.len(), 10);
        assert!(o.copy_frozen(&mut 100, |_, _| Ok::<(), ()>(())).unwrap());
        o.thaw();
        assert!(o.is_empty());
    }
}
