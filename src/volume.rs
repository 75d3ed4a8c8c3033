//! Volumes: one NBD export each. Turns byte ranges into logical blocks,
//! does read-modify-write for unaligned requests, orders overlapping
//! requests with a range lock, and maps blocks to content blocks.
//!
//! A write never touches a slot that a durable record points to: it
//! encrypts into freshly allocated slots, waits for the device writes, and
//! only then, under the zone lock, moves the map and appends one journal
//! frame. The replaced content blocks are freed after that frame is durable.

use std::ops::Range;
use std::sync::Arc;

use futures::future::join_all;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::ids::{BLOCK_SHIFT, BLOCK_SIZE, Cbid, JournalSeq, Lba, Slot, VolumeId};
use crate::nbd::export::{Export, ExportError, Extent};
use crate::store::Storage;
use crate::store::journal::{CbRecord, Entry, Journal};
use crate::zone::{Zone, ZoneMeta};

const BS: u64 = BLOCK_SIZE as u64;
/// Largest number of entries in one journal frame for unmapping.
const UNMAP_FRAME: usize = 16384;
/// Largest range one block-status answer covers.
const STATUS_MAX_BLOCKS: u64 = 1 << 18;

/// Shared/exclusive locks on ranges of logical blocks, so overlapping
/// requests (and read-modify-write of a partly written block) serialise
/// while disjoint ones run in parallel.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, Range<u64>, bool)>>,
    next: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Waits until `blocks` is free of conflicting holders, then holds it.
    pub async fn lock(&self, blocks: Range<u64>, exclusive: bool) -> RangeGuard<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before checking, so a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock();
                let conflict = held.iter().any(|(_, r, ex)| {
                    (exclusive || *ex) && r.start < blocks.end && blocks.start < r.end
                });
                if !conflict {
                    held.push((id, blocks, exclusive));
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.held.lock().retain(|(id, _, _)| *id != self.id);
        self.lock.released.notify_waiters();
    }
}

/// Content-block records changed by one journal frame, latest value per CBID.
type Changes = rustc_hash::FxHashMap<Cbid, Option<CbRecord>>;

/// Where one logical block's data is.
#[derive(Clone, Copy)]
struct Located {
    cbid: Cbid,
    record: CbRecord,
}

/// A volume being served.
pub struct Volume {
    /// Numeric id.
    pub id: VolumeId,
    /// Export name.
    pub name: String,
    size: u64,
    zone: Arc<Zone>,
    storage: Arc<Storage>,
    journal: Arc<Journal>,
    locks: RangeLock,
}

fn io_err(what: impl std::fmt::Display) -> ExportError {
    ExportError::Io(what.to_string())
}

impl Volume {
    /// A volume of `size` bytes in `zone`.
    pub fn new(
        id: VolumeId,
        name: String,
        size: u64,
        zone: Arc<Zone>,
        storage: Arc<Storage>,
        journal: Arc<Journal>,
    ) -> Self {
        Self {
            id,
            name,
            size,
            zone,
            storage,
            journal,
            locks: RangeLock::default(),
        }
    }

    /// The zone this volume belongs to.
    pub fn zone(&self) -> &Arc<Zone> {
        &self.zone
    }

    fn block_range(offset: u64, len: u64) -> Range<u64> {
        (offset >> BLOCK_SHIFT)..(offset + len).div_ceil(BS)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} is past the end ({})",
                self.size
            ))),
        }
    }

    /// Looks up where each block of `blocks` lives.
    fn locate(&self, blocks: Range<u64>) -> Result<Vec<Option<Located>>, ExportError> {
        let meta = self.zone.meta.lock();
        let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
        blocks
            .map(|b| {
                let Some(cbid) = map.get(Lba(b)) else {
                    return Ok(None);
                };
                match meta.cb(cbid) {
                    Some(record) => Ok(Some(Located { cbid, record })),
                    None => Err(io_err(format!(
                        "volume {} block {b} maps to content block {cbid}, which has no record",
                        self.name
                    ))),
                }
            })
            .collect()
    }

    /// Reads whole blocks starting at `first` into `out` (a multiple of the
    /// block size). The caller holds the range lock.
    async fn read_blocks(&self, first: u64, out: &mut [u8]) -> Result<(), ExportError> {
        let n = (out.len() / BLOCK_SIZE) as u64;
        let located = self.locate(first..first + n)?;
        // Group blocks into runs of consecutive slots: one device read each.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, loc) in located.iter().enumerate() {
            match loc {
                None => out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0),
                Some(l) => match runs.last_mut() {
                    Some((start, len))
                        if *start + *len == i
                            && located[*start].is_some_and(|s| {
                                s.record.slot.0 + *len as u64 == l.record.slot.0
                            }) =>
                    {
                        *len += 1
                    }
                    _ => runs.push((i, 1)),
                },
            }
        }
        let reads = runs.iter().map(|&(start, len)| {
            let slot = located[start]
                .expect("run starts at a mapped block")
                .record
                .slot;
            self.storage
                .data
                .read_at(Storage::offset(slot), self.storage.bufs.get(len))
        });
        let results = join_all(reads).await;
        let mut outcome = Ok(());
        for ((start, len), (res, buf)) in runs.into_iter().zip(results) {
            if outcome.is_ok() {
                outcome = res
                    .map_err(io_err)
                    .and_then(|()| self.decrypt_run(first, start, len, &located, &buf, out));
            }
            self.storage.bufs.put(buf);
        }
        outcome
    }

    /// Decrypts and verifies one run of blocks read from consecutive slots.
    fn decrypt_run(
        &self,
        first: u64,
        start: usize,
        len: usize,
        located: &[Option<Located>],
        buf: &[u8],
        out: &mut [u8],
    ) -> Result<(), ExportError> {
        let crypto = &self.zone.crypto;
        for j in 0..len {
            let i = start + j;
            let loc = located[i].expect("mapped");
            let xts = crypto.xts(loc.record.key_version).ok_or_else(|| {
                io_err(format!(
                    "key version {} of zone {} is not available",
                    loc.record.key_version, self.zone.name
                ))
            })?;
            let dst = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            xts.decrypt(loc.cbid.0, &buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE], dst);
            if !crypto.tagger().verify(dst, &loc.record.tag) {
                dst.fill(0);
                tracing::error!(volume = %self.name, lba = first + i as u64, cbid = %loc.cbid,
                        "content block failed its integrity check");
                return Err(io_err(format!(
                    "volume {} block {}: integrity check failed",
                    self.name,
                    first + i as u64
                )));
            }
        }
        Ok(())
    }

    /// Writes whole blocks of plaintext `plain` starting at block `first`,
    /// and returns the journal frame that records them. The caller holds the
    /// range lock exclusively.
    async fn write_blocks(&self, first: u64, plain: &[u8]) -> Result<JournalSeq, ExportError> {
        let n = plain.len() / BLOCK_SIZE;
        let block = |i: usize| &plain[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
        // All-zero blocks are unmapped rather than stored: they read as zeros
        // without touching a device, and block status can say so truthfully.
        let nonzero: Vec<usize> = (0..n)
            .filter(|&i| block(i).iter().any(|&b| b != 0))
            .collect();
        let (cbids, slots) = self.allocate(nonzero.len())?;
        let result = self
            .encrypt_and_write(plain, &nonzero, &cbids, &slots)
            .await;
        let tags = match result {
            Ok(tags) => tags,
            Err(e) => {
                self.release_unrecorded(&cbids, &slots);
                return Err(e);
            }
        };
        let active = self.zone.crypto.active();
        let mut meta = self.zone.meta.lock();
        let mut entries = Vec::with_capacity(n * 2 + 2);
        let mut new_of_block: Vec<Option<(Cbid, CbRecord)>> = vec![None; n];
        for (k, &i) in nonzero.iter().enumerate() {
            let record = CbRecord {
                slot: slots[k],
                key_version: active,
                refcount: 1,
                tag: tags[k],
            };
            new_of_block[i] = Some((cbids[k], record));
        }
        let mut frees = Vec::new();
        let mut changed_cbs: Changes = Changes::default();
        let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
        let olds: Vec<Option<Cbid>> = (0..n).map(|i| map.get(Lba(first + i as u64))).collect();
        for (i, new) in new_of_block.iter().enumerate() {
            let lba = Lba(first + i as u64);
            if let Some((cbid, record)) = new {
                entries.push(Entry::Cb {
                    zone: self.zone.id,
                    cbid: *cbid,
                    record: *record,
                });
                changed_cbs.insert(*cbid, Some(*record));
            }
            if olds[i].is_none() && new.is_none() {
                continue;
            }
            entries.push(Entry::Map {
                volume: self.id,
                lba,
                cbid: new.map(|(c, _)| c),
            });
        }
        for old in olds.into_iter().flatten() {
            Self::unref(
                &meta,
                self.zone.id,
                old,
                &mut changed_cbs,
                &mut entries,
                &mut frees,
            );
        }
        let seq = self.journal.append(&entries);
        for (cbid, record) in changed_cbs {
            meta.set_cb(cbid, record, seq);
        }
        let map = meta.volumes.get_mut(&self.id).expect("checked above");
        for (i, new) in new_of_block.iter().enumerate() {
            map.set(Lba(first + i as u64), new.map(|(c, _)| c), seq);
        }
        self.free_after(&mut meta, seq, &frees);
        Ok(seq)
    }

    /// Drops one reference to `cbid` (looking through changes made earlier
    /// in the same frame), recording the new record or its freeing.
    fn unref(
        meta: &ZoneMeta,
        zone: crate::ids::ZoneId,
        cbid: Cbid,
        changed: &mut Changes,
        entries: &mut Vec<Entry>,
        frees: &mut Vec<(Cbid, Slot)>,
    ) {
        let current = changed.get(&cbid).copied().unwrap_or_else(|| meta.cb(cbid));
        let Some(mut record) = current else {
            tracing::error!(%cbid, "map pointed to a content block with no record; ignoring");
            return;
        };
        record.refcount -= 1;
        if record.refcount == 0 {
            entries.push(Entry::CbFree { zone, cbid });
            changed.insert(cbid, None);
            frees.push((cbid, record.slot));
        } else {
            entries.push(Entry::Cb { zone, cbid, record });
            changed.insert(cbid, Some(record));
        }
    }

    fn free_after(
        &self,
        meta: &mut crate::zone::ZoneMeta,
        seq: JournalSeq,
        frees: &[(Cbid, Slot)],
    ) {
        if frees.is_empty() {
            return;
        }
        for (cbid, _) in frees {
            meta.cbids.free_after(seq, cbid.0);
        }
        let mut slots = self.storage.slots.lock();
        for (_, slot) in frees {
            slots.free_after(seq, slot.0);
        }
    }

    /// Reserves `n` CBIDs and `n` slots (in as few runs as the allocator gives).
    fn allocate(&self, n: usize) -> Result<(Vec<Cbid>, Vec<Slot>), ExportError> {
        let mut cbids = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        if n == 0 {
            return Ok((cbids, slots));
        }
        {
            let mut meta = self.zone.meta.lock();
            while cbids.len() < n {
                let (f, c) = meta
                    .cbids
                    .alloc_run((n - cbids.len()) as u64)
                    .ok_or_else(|| io_err("out of CBIDs"))?;
                cbids.extend((f..f + c).map(Cbid));
            }
        }
        let mut alloc = self.storage.slots.lock();
        while slots.len() < n {
            match alloc.alloc_run((n - slots.len()) as u64) {
                Some((f, c)) => slots.extend((f..f + c).map(Slot)),
                None => {
                    for s in &slots {
                        alloc.release_now(s.0, 1);
                    }
                    drop(alloc);
                    let mut meta = self.zone.meta.lock();
                    for c in &cbids {
                        meta.cbids.release_now(c.0, 1);
                    }
                    return Err(ExportError::NoSpace("the data device is full".into()));
                }
            }
        }
        Ok((cbids, slots))
    }

    /// Returns a failed write's reservation: nothing durable points to it.
    fn release_unrecorded(&self, cbids: &[Cbid], slots: &[Slot]) {
        let mut meta = self.zone.meta.lock();
        for c in cbids {
            meta.cbids.release_now(c.0, 1);
        }
        drop(meta);
        let mut alloc = self.storage.slots.lock();
        for s in slots {
            alloc.release_now(s.0, 1);
        }
    }

    /// Encrypts the chosen blocks into their slots and writes them, one
    /// device write per run of consecutive slots. Returns the tags.
    async fn encrypt_and_write(
        &self,
        plain: &[u8],
        which: &[usize],
        cbids: &[Cbid],
        slots: &[Slot],
    ) -> Result<Vec<crate::crypto::tag::Tag>, ExportError> {
        if let Some(end) = slots.iter().map(|s| s.0 + 1).max() {
            self.storage.ensure_slots(end).map_err(|e| match e {
                crate::store::device::DeviceError::OutOfRange { .. } => {
                    ExportError::NoSpace(e.to_string())
                }
                e => io_err(e),
            })?;
        }
        let crypto = &self.zone.crypto;
        let xts = crypto.xts(crypto.active()).ok_or_else(|| {
            io_err(format!(
                "the active key of zone {} is not available",
                self.zone.name
            ))
        })?;
        let mut tags = Vec::with_capacity(which.len());
        let mut writes = Vec::new();
        let mut k = 0;
        while k < which.len() {
            let mut len = 1;
            while k + len < which.len() && slots[k + len].0 == slots[k].0 + len as u64 {
                len += 1;
            }
            let mut buf = self.storage.bufs.get(len);
            for j in 0..len {
                let src = &plain[which[k + j] * BLOCK_SIZE..(which[k + j] + 1) * BLOCK_SIZE];
                tags.push(crypto.tagger().tag(src));
                xts.encrypt(
                    cbids[k + j].0,
                    src,
                    &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                );
            }
            writes.push(self.storage.data.write_at(Storage::offset(slots[k]), buf));
            k += len;
        }
        let mut outcome = Ok(tags);
        for (res, buf) in join_all(writes).await {
            if let Err(e) = res {
                outcome = Err(io_err(e));
            }
            self.storage.bufs.put(buf);
        }
        outcome
    }

    /// Unmaps whole blocks, in frames of bounded size. The caller holds the
    /// range lock exclusively. Returns the last frame written, if any.
    fn unmap_blocks(&self, blocks: Range<u64>) -> Result<Option<JournalSeq>, ExportError> {
        let mut last = None;
        let mut b = blocks.start;
        while b < blocks.end {
            let end = (b + UNMAP_FRAME as u64).min(blocks.end);
            let mut meta = self.zone.meta.lock();
            let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
            let olds: Vec<(Lba, Cbid)> = (b..end)
                .filter_map(|l| map.get(Lba(l)).map(|c| (Lba(l), c)))
                .collect();
            last = self.unmap_locked(&mut meta, &olds)?.or(last);
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
            last = self
                .unmap_locked(&mut self.zone.meta.lock(), chunk)?
                .or(last);
        }
        Ok(last)
    }

    /// Unmaps `olds` (blocks and the content blocks they map to now) in one
    /// journal frame, under the zone lock the caller holds.
    fn unmap_locked(
        &self,
        meta: &mut ZoneMeta,
        olds: &[(Lba, Cbid)],
    ) -> Result<Option<JournalSeq>, ExportError> {
        if olds.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(olds.len() * 2);
        let mut changed = Changes::default();
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
        let seq = self.journal.append(&entries);
        for (cbid, record) in changed {
            meta.set_cb(cbid, record, seq);
        }
        let map = meta
            .volumes
            .get_mut(&self.id)
            .ok_or(ExportError::Shutdown)?;
        for &(lba, _) in olds {
            map.set(lba, None, seq);
        }
        self.free_after(meta, seq, &frees);
        Ok(Some(seq))
    }

    /// Makes `[offset, offset+len)` read as zeros: whole blocks are unmapped,
    /// partial ones rewritten.
    async fn zero_range(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.check_range(offset, len)?;
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
            && let Some(seq) = self.unmap_blocks(full_start..full_end)?
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

impl Export for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = Self::block_range(offset, len);
        let _guard = self.locks.lock(blocks.clone(), false).await;
        if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            return self.read_blocks(blocks.start, buf).await;
        }
        let mut tmp = vec![0u8; ((blocks.end - blocks.start) * BS) as usize];
        self.read_blocks(blocks.start, &mut tmp).await?;
        let skip = (offset - blocks.start * BS) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = Self::block_range(offset, len);
        let guard = self.locks.lock(blocks.clone(), true).await;
        let seq = if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            self.write_blocks(blocks.start, data).await?
        } else {
            // Read-modify-write of the partial blocks at either end, under the lock.
            let mut tmp = vec![0u8; ((blocks.end - blocks.start) * BS) as usize];
            let head = blocks.start;
            let tail = blocks.end - 1;
            if !offset.is_multiple_of(BS) || (head == tail && !len.is_multiple_of(BS)) {
                self.read_blocks(head, &mut tmp[..BLOCK_SIZE]).await?;
            }
            if tail != head && !(offset + len).is_multiple_of(BS) {
                let at = ((tail - head) * BS) as usize;
                self.read_blocks(tail, &mut tmp[at..at + BLOCK_SIZE])
                    .await?;
            }
            let skip = (offset - head * BS) as usize;
            tmp[skip..skip + data.len()].copy_from_slice(data);
            self.write_blocks(head, &tmp).await?
        };
        drop(guard);
        if fua {
            self.journal.commit(seq).await.map_err(io_err)?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        // The journal is shared by the whole pool, so this makes every
        // completed write on every connection durable (multi-conn consistency).
        self.journal
            .commit(self.journal.last_appended())
            .await
            .map_err(io_err)
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, length, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, length, fua).await
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, ExportError> {
        self.check_range(offset, length)?;
        let end = offset + length.min(STATUS_MAX_BLOCKS * BS);
        if end == offset {
            return Err(ExportError::Invalid("zero-length block status".into()));
        }
        let blocks = Self::block_range(offset, end - offset);
        let mapped: Vec<bool> = {
            let meta = self.zone.meta.lock();
            let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
            blocks.clone().map(|b| map.get(Lba(b)).is_some()).collect()
        };
        let mut extents: Vec<Extent> = Vec::new();
        for (i, &m) in mapped.iter().enumerate() {
            let b = blocks.start + i as u64;
            let from = (b * BS).max(offset);
            let to = ((b + 1) * BS).min(end);
            match extents.last_mut() {
                Some(e) if e.hole != m => e.length += to - from,
                _ => extents.push(Extent {
                    length: to - from,
                    hole: !m,
                    zero: !m,
                }),
            }
        }
        Ok(extents)
    }
}
