//! Recording a write or an unmap: the content-block records one journal
//! frame changes, the map moves, and the frees queued until the frame is
//! durable.

use super::Volume;
use super::write::{Lbas, Target, WritePlan};
use crate::ids::{Cbid, JournalSeq, Lba, Slot};
use crate::nbd::export::ExportError;
use crate::store::Storage;
use crate::store::journal::{CbRecord, Entry, StagedCopy};
use crate::zone::ZoneMeta;
use crate::zone::change::{ChangeSink, ZoneChange};

/// Content-block records changed by one journal frame, by CBID.
pub(super) type Changes = rustc_hash::FxHashMap<Cbid, Change>;

/// One content block's record before a journal frame and after it, so
/// applying the frame needs no second lookup of the old record.
#[derive(Clone, Copy)]
pub(super) struct Change {
    before: Option<CbRecord>,
    after: Option<CbRecord>,
}

/// The change to `cbid` in `changed`, started from its current record.
pub(super) fn change<'a>(changed: &'a mut Changes, meta: &ZoneMeta, cbid: Cbid) -> &'a mut Change {
    changed.entry(cbid).or_insert_with(|| {
        let now = meta.cb(cbid);
        Change {
            before: now,
            after: now,
        }
    })
}

/// Applies a frame's changes to the zone's records.
pub(super) fn apply_changes(meta: &mut ZoneMeta, changed: Changes, seq: JournalSeq) {
    meta.replace_cbs(
        changed.iter().map(|(&cbid, c)| (cbid, c.before, c.after)),
        seq,
    );
}

/// A content block freed by a frame: its id and every slot it held.
#[derive(Clone, Copy)]
pub(crate) struct Freed {
    pub cbid: Cbid,
    pub slot: Slot,
    pub staged: Option<Slot>,
}

impl Volume {
    /// Moves the map and records the write in one journal frame, under the
    /// zone lock the caller holds; `committed` goes to the zone's stream
    /// (one record per run of consecutive blocks).
    pub(super) fn record_write(
        &self,
        meta: &mut ZoneMeta,
        lbas: Lbas<'_>,
        plan: &WritePlan,
        committed: Option<(&dyn ChangeSink, Vec<ZoneChange>)>,
        applied: Option<u64>,
    ) -> Result<JournalSeq, ExportError> {
        let n = plan.targets.len();
        self.zone
            .stats
            .written_blocks
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Self::unregister_writer(meta, plan.active);
        // A staged copy is kept only if its key is still the window's next
        // key or has become active; after an abort it is dropped.
        let keep_staged = plan
            .window
            .is_some_and(|w| meta.window == Some(w) || meta.active == w);
        // References per new content block, by index (a plain vector: this
        // runs once per write, under the zone lock).
        let mut refs = vec![0u32; plan.new.len()];
        for t in &plan.targets {
            if let Target::New(k) = t {
                refs[*k] += 1;
            }
        }
        let mut dropped_staging = Vec::new();
        let mut entries = Vec::with_capacity(n * 2 + 2);
        // At most one change per new block and one per block overwritten;
        // sized once, so a long write does not rehash it on the way.
        let mut changed = Changes::with_capacity_and_hasher(plan.new.len() + n, Default::default());
        for (k, nc) in plan.new.iter().enumerate() {
            let refcount = refs[k];
            if refcount == 0 {
                continue;
            }
            let staged = match (nc.staged, plan.window) {
                (Some(slot), Some(v)) if keep_staged => Some(StagedCopy {
                    slot,
                    key_version: v,
                }),
                (Some(slot), _) => {
                    dropped_staging.push(slot);
                    None
                }
                _ => None,
            };
            let record = CbRecord {
                slot: nc.slot,
                key_version: plan.active,
                refcount,
                tag: nc.tag,
                mac: plan.mac,
                staged,
            };
            entries.push(Entry::Cb {
                zone: self.zone.id,
                cbid: nc.cbid,
                record,
            });
            // A fresh CBID has no record yet.
            debug_assert!(meta.cb(nc.cbid).is_none());
            changed.insert(
                nc.cbid,
                Change {
                    before: None,
                    after: Some(record),
                },
            );
            self.zone.heat.touch(nc.cbid);
        }
        // New references to shared blocks before dropping old ones, so a
        // block rewritten with its own content never reaches zero.
        for t in &plan.targets {
            if let Target::Shared(cbid) = *t {
                let c = change(&mut changed, meta, cbid);
                let r = c.after.as_mut().expect("checked live by the caller");
                r.refcount += 1;
                entries.push(Entry::Cb {
                    zone: self.zone.id,
                    cbid,
                    record: *r,
                });
                self.zone.heat.touch(cbid);
            }
        }
        let mut frees = Vec::new();
        let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
        let olds: Vec<Option<Cbid>> = (0..n).map(|i| map.get(Lba(lbas.at(i)))).collect();
        let new_of = |i: usize| match plan.targets[i] {
            Target::Zero => None,
            Target::New(k) => Some(plan.new[k].cbid),
            Target::Shared(c) => Some(c),
        };
        for (i, old) in olds.iter().enumerate() {
            let new = new_of(i);
            if old.is_none() && new.is_none() {
                continue;
            }
            entries.push(Entry::Map {
                volume: self.id,
                lba: Lba(lbas.at(i)),
                cbid: new,
            });
        }
        for old in olds.into_iter().flatten() {
            Self::unref(
                meta,
                self.zone.id,
                old,
                &mut changed,
                &mut entries,
                &mut frees,
            );
        }
        if let Some(seq) = applied {
            entries.push(Entry::Applied {
                zone: self.zone.id,
                seq,
            });
            meta.applied = meta.applied.max(seq);
        }
        let seq = self.journal.append_with(self.zone.id, &entries, |seq| {
            if let Some((sink, changes)) = committed {
                for c in changes {
                    sink.committed(seq, c);
                }
            }
        });
        apply_changes(meta, changed, seq);
        let map = meta.volumes.get_mut(&self.id).expect("checked above");
        for i in 0..n {
            map.set(Lba(lbas.at(i)), new_of(i), seq);
        }
        free_after(&self.storage, meta, seq, &frees);
        if let Some(staging) = &self.storage.staging {
            staging.release_now(&dropped_staging);
        }
        Ok(seq)
    }

    /// Drops one reference to `cbid` (looking through changes made earlier
    /// in the same frame), recording the new record or its freeing.
    pub(super) fn unref(
        meta: &ZoneMeta,
        zone: crate::ids::ZoneId,
        cbid: Cbid,
        changed: &mut Changes,
        entries: &mut Vec<Entry>,
        frees: &mut Vec<Freed>,
    ) {
        let c = change(changed, meta, cbid);
        let Some(mut record) = c.after else {
            tracing::error!(%cbid, "map pointed to a content block with no record; ignoring");
            return;
        };
        record.refcount -= 1;
        if record.refcount == 0 {
            entries.push(Entry::CbFree { zone, cbid });
            c.after = None;
            frees.push(Freed {
                cbid,
                slot: record.slot,
                staged: record.staged.map(|s| s.slot),
            });
        } else {
            entries.push(Entry::Cb { zone, cbid, record });
            c.after = Some(record);
        }
    }
}

/// Queues the content blocks and slots a frame freed, to be released once
/// that frame is durable (invariant 7).
pub(crate) fn free_after(storage: &Storage, meta: &mut ZoneMeta, seq: JournalSeq, frees: &[Freed]) {
    if frees.is_empty() {
        return;
    }
    for f in frees {
        meta.cbids.free_after(seq, f.cbid.0);
    }
    free_slots_after(storage, seq, frees);
}

/// Queues the data and staging slots of `frees` (not their CBIDs: the
/// content blocks moved, they were not freed), released once `seq` is durable.
pub(crate) fn free_slots_after(storage: &Storage, seq: JournalSeq, frees: &[Freed]) {
    if frees.is_empty() {
        return;
    }
    let mut slots = storage.slots.lock();
    for f in frees {
        slots.free_after(seq, f.slot.0);
    }
    drop(slots);
    if let Some(staging) = &storage.staging {
        let mut slots = staging.slots.lock();
        for s in frees.iter().filter_map(|f| f.staged) {
            slots.free_after(seq, s.0);
        }
    }
}
