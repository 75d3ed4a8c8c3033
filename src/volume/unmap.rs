//! Trim and write-zeroes: unmapping whole blocks in bounded journal
//! frames, and rewriting partial ones.

use std::ops::Range;

use super::record::{Changes, apply_changes};
use super::{BS, Volume, free_after, io_err};
use crate::ids::{BLOCK_SIZE, Cbid, JournalSeq, Lba};
use crate::nbd::export::ExportError;
use crate::store::journal::Entry;
use crate::zone::ZoneMeta;
use crate::zone::change::{ChangeSink, ZoneChange};

/// Largest number of entries in one journal frame for unmapping.
const UNMAP_FRAME: usize = 16384;

impl Volume {
    /// Unmaps whole blocks, in frames of bounded size. The caller holds the
    /// range lock exclusively. Returns the last frame written, if any.
    pub(super) fn unmap_blocks(
        &self,
        blocks: Range<u64>,
        zero: bool,
        applied: Option<u64>,
    ) -> Result<Option<JournalSeq>, ExportError> {
        let mut last = None;
        let mut b = blocks.start;
        let sink = self.zone.sink();
        while b < blocks.end {
            let end = (b + UNMAP_FRAME as u64).min(blocks.end);
            let mut meta = self.zone.meta.lock();
            let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
            let olds: Vec<(Lba, Cbid)> = (b..end)
                .filter_map(|l| map.get(Lba(l)).map(|c| (Lba(l), c)))
                .collect();
            let change = sink.as_ref().map(|s| {
                (
                    s.as_ref(),
                    ZoneChange::Unmap {
                        volume: self.id,
                        runs: runs_of(&olds),
                        zero,
                    },
                )
            });
            // A replica's position moves with its last frame, or alone.
            let applied_here = applied.filter(|_| end == blocks.end);
            last = self
                .unmap_locked(&mut meta, &olds, change, applied_here)?
                .or(last);
            b = end;
        }
        Ok(last)
    }

    /// Unmaps every mapped block (deleting the volume), in bounded frames.
    /// Returns the last frame written, if any.
    pub(crate) fn unmap_everything(&self) -> Result<Option<JournalSeq>, ExportError> {
        let mapped = {
            let meta = self.zone.meta.lock();
            meta.volumes
                .get(&self.id)
                .map(|m| m.mapped())
                .unwrap_or_default()
        };
        let mut last = None;
        for chunk in mapped.chunks(UNMAP_FRAME) {
            let change = self.zone.sink().map(|s| {
                (
                    s,
                    ZoneChange::Unmap {
                        volume: self.id,
                        runs: runs_of(chunk),
                        zero: false,
                    },
                )
            });
            last = self
                .unmap_locked(
                    &mut self.zone.meta.lock(),
                    chunk,
                    change.as_ref().map(|(s, c)| (s.as_ref(), c.clone())),
                    None,
                )?
                .or(last);
        }
        Ok(last)
    }

    /// Unmaps `olds` (blocks and the content blocks they map to now) in one
    /// journal frame, under the zone lock the caller holds.
    pub(super) fn unmap_locked(
        &self,
        meta: &mut ZoneMeta,
        olds: &[(Lba, Cbid)],
        change: Option<(&dyn ChangeSink, ZoneChange)>,
        applied: Option<u64>,
    ) -> Result<Option<JournalSeq>, ExportError> {
        if olds.is_empty() && applied.is_none() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(olds.len() * 2);
        let mut changed = Changes::with_capacity_and_hasher(olds.len(), Default::default());
        let mut frees = Vec::new();
        for &(lba, cbid) in olds {
            entries.push(Entry::Map {
                volume: self.id,
                lba,
                cbid: None,
            });
            Self::unref(
                meta,
                self.zone.id,
                cbid,
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
        // Nothing was mapped: nothing changed, and the stream needs no record.
        let change = change.filter(|_| !olds.is_empty());
        let seq = self.journal.append_with(self.zone.id, &entries, |seq| {
            if let Some((sink, change)) = change {
                sink.committed(seq, change);
            }
        });
        apply_changes(meta, changed, seq);
        let map = meta
            .volumes
            .get_mut(&self.id)
            .ok_or(ExportError::Shutdown)?;
        for &(lba, _) in olds {
            map.set(lba, None, seq);
        }
        free_after(&self.storage, meta, seq, &frees);
        Ok(Some(seq))
    }

    /// Makes `[offset, offset+len)` read as zeros: whole blocks are unmapped,
    /// partial ones rewritten.
    pub(super) async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        zero: bool,
    ) -> Result<(), ExportError> {
        self.check_range(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let blocks = Self::block_range(offset, len);
        let guard = self.locks.lock(blocks.clone(), true).await;
        let end = offset + len;
        let mut last = None;
        let full_start = offset.div_ceil(BS);
        let full_end = end / BS;
        // Partial blocks at either end: read, zero the part, write back.
        let mut partial = vec![blocks.start];
        if blocks.end - 1 != blocks.start {
            partial.push(blocks.end - 1);
        }
        for b in partial {
            if b >= full_start && b < full_end {
                continue;
            }
            let mut buf = vec![0u8; BLOCK_SIZE];
            self.read_blocks(b, &mut buf).await?;
            let from = offset.max(b * BS) - b * BS;
            let to = end.min((b + 1) * BS) - b * BS;
            buf[from as usize..to as usize].fill(0);
            last = Some(self.write_blocks(b, &buf).await?);
        }
        if full_start < full_end
            && let Some(seq) = self.unmap_blocks(full_start..full_end, zero, None)?
        {
            last = Some(seq);
        }
        drop(guard);
        if fua && let Some(seq) = last {
            self.journal.commit(seq).await.map_err(io_err)?;
        }
        Ok(())
    }
}

/// Runs `(first, blocks)` of consecutive LBAs in `olds` (sorted).
fn runs_of(olds: &[(Lba, Cbid)]) -> Vec<(Lba, u32)> {
    let mut out: Vec<(Lba, u32)> = Vec::new();
    for &(lba, _) in olds {
        match out.last_mut() {
            Some((first, n)) if first.0 + u64::from(*n) == lba.0 => *n += 1,
            _ => out.push((lba, 1)),
        }
    }
    out
}
