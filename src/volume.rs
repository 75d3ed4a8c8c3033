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

use crate::crypto::tag::Tag;
use crate::ids::{BLOCK_SHIFT, BLOCK_SIZE, Cbid, JournalSeq, KeyVersion, Lba, Slot, VolumeId};
use crate::nbd::export::{Export, ExportError, Extent};
use crate::store::Storage;
use crate::store::journal::{CbRecord, Entry, Journal, LiveCopy, Place, StagedCopy};
use crate::zone::change::{ChangeSink, ZoneChange};
use crate::zone::mac::WriteTags;
use crate::zone::{Zone, ZoneCrypto, ZoneMeta};

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

/// Content-block records changed by one journal frame, by CBID.
type Changes = rustc_hash::FxHashMap<Cbid, Change>;

/// One content block's record before a journal frame and after it, so
/// applying the frame needs no second lookup of the old record.
#[derive(Clone, Copy)]
struct Change {
    before: Option<CbRecord>,
    after: Option<CbRecord>,
}

/// The change to `cbid` in `changed`, started from its current record.
fn change<'a>(changed: &'a mut Changes, meta: &ZoneMeta, cbid: Cbid) -> &'a mut Change {
    changed.entry(cbid).or_insert_with(|| {
        let now = meta.cb(cbid);
        Change {
            before: now,
            after: now,
        }
    })
}

/// Applies a frame's changes to the zone's records.
fn apply_changes(meta: &mut ZoneMeta, changed: Changes, seq: JournalSeq) {
    for (cbid, c) in changed {
        meta.replace_cb(cbid, c.before, c.after, seq);
    }
}

/// Where one logical block's data is.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Located {
    cbid: Cbid,
    record: CbRecord,
    live: LiveCopy,
}

/// A content block freed by a frame: its id and every slot it held.
#[derive(Clone, Copy)]
pub(crate) struct Freed {
    pub cbid: Cbid,
    pub slot: Slot,
    pub staged: Option<Slot>,
}

/// A new content block a write creates.
struct NewCb {
    cbid: Cbid,
    slot: Slot,
    /// Staging slot for the copy under the next key, during a window.
    staged: Option<Slot>,
    tag: Tag,
    /// Index (into the request's blocks) of its plaintext.
    block: usize,
}

/// Where each block of a write goes.
#[derive(Clone, Copy)]
enum Target {
    /// An all-zero block: unmapped.
    Zero,
    /// A new content block (index into `WritePlan::new`).
    New(usize),
    /// An existing content block with equal content (dedup).
    Shared(Cbid),
}

/// What a write decided under the zone lock before doing any I/O.
struct WritePlan {
    targets: Vec<Target>,
    new: Vec<NewCb>,
    /// DEK version of the data-device copies.
    active: KeyVersion,
    /// DEK version of the staged copies (the window's next key).
    window: Option<KeyVersion>,
    /// Version of the MAC key the new blocks' tags were made under.
    mac: u32,
    /// Blocks shared with a content block whose tag is under a retired MAC
    /// key: the (tag, version) it had when found.
    shared_under: rustc_hash::FxHashMap<usize, (Tag, u32)>,
    /// How many of `new` hold data (and staging) slots.
    placed: usize,
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

/// Number of times a read re-locates a block whose copy moved under it.
const READ_RETRIES: usize = 3;

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

    /// Fail-stop: once a journal commit failed (a full metadata directory,
    /// say), no later write could ever be made durable, so none is
    /// acknowledged; reads go on. A restart recovers from the journal.
    fn check_writable(&self) -> Result<(), ExportError> {
        match self.journal.durable().error {
            Some(e) => Err(io_err(format!(
                "{e}; writes are refused until the server restarts"
            ))),
            None => Ok(()),
        }
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
                    Some(record) => Ok(Some(Located {
                        cbid,
                        record,
                        live: meta.live(&record),
                    })),
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
        self.zone.note_io();
        let crypto = self.zone.crypto();
        let prefer_data = !self.storage.data.is_direct();
        // The copy each block is read from (cheap: a comparison or two).
        let source = |l: &Located| read_source(l, prefer_data, &crypto);
        // Group blocks into runs of consecutive slots on one device: one
        // device read each, from the run's first copy on.
        let mut runs: Vec<(usize, usize, LiveCopy)> = Vec::new();
        for (i, loc) in located.iter().enumerate() {
            match loc {
                None => out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0),
                Some(l) => {
                    self.zone.heat.touch(l.cbid);
                    let c = source(l);
                    match runs.last_mut() {
                        Some((start, len, first))
                            if *start + *len == i
                                && *len < self.storage.max_run_blocks()
                                && first.place == c.place
                                && first.slot.0 + *len as u64 == c.slot.0 =>
                        {
                            *len += 1
                        }
                        _ => runs.push((i, 1, c)),
                    }
                }
            }
        }
        let reads = runs.iter().map(|&(_, len, first)| {
            self.storage
                .read_copy(first.place, first.slot, self.storage.bufs.get(len))
        });
        let results = join_all(reads).await;
        let mut failed = Vec::new();
        for ((start, len, _), (res, buf)) in runs.into_iter().zip(results) {
            match res {
                Ok(()) => {
                    decrypt_verify_run(
                        &crypto,
                        &located[start..start + len],
                        |loc| source(loc).key_version,
                        &buf[..len * BLOCK_SIZE],
                        &mut out[start * BLOCK_SIZE..(start + len) * BLOCK_SIZE],
                        start,
                        &mut failed,
                    );
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, error = %e, "read failed; retrying block by block");
                    failed.extend(start..start + len);
                }
            }
            self.storage.bufs.put(buf);
        }
        drop(crypto);
        for i in failed {
            let dst = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            self.reread_block(first + i as u64, dst).await?;
        }
        Ok(())
    }

    /// Reads one block whose first read failed: the content block may have
    /// moved under the read (migration, destaging), or its live copy may sit
    /// on a failing device while another copy is intact. Tries the block's
    /// current copies, then reports EIO. Never serves unverified data.
    async fn reread_block(&self, lba: u64, dst: &mut [u8]) -> Result<(), ExportError> {
        let mut last_error = String::from("integrity check failed");
        let mut tried: Vec<LiveCopy> = Vec::new();
        for _ in 0..READ_RETRIES {
            let Some(loc) = self.locate(lba..lba + 1)?[0] else {
                dst.fill(0);
                return Ok(());
            };
            let mut copies = vec![loc.live];
            if loc.live.place == Place::Staging {
                copies.push(LiveCopy {
                    place: Place::Data,
                    slot: loc.record.slot,
                    key_version: loc.record.key_version,
                });
            }
            let fresh: Vec<LiveCopy> = copies.into_iter().filter(|c| !tried.contains(c)).collect();
            if fresh.is_empty() {
                break;
            }
            for copy in fresh {
                tried.push(copy);
                let (res, buf) = self
                    .storage
                    .read_copy(copy.place, copy.slot, self.storage.bufs.get(1))
                    .await;
                let ok = match res {
                    Ok(()) => {
                        let crypto = self.zone.crypto();
                        decrypt_verify(&crypto, &loc, copy.key_version, &buf, dst)
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        false
                    }
                };
                self.storage.bufs.put(buf);
                if ok {
                    if copy != loc.live {
                        self.zone
                            .stats
                            .read_fallbacks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, lba, cbid = %loc.cbid,
                            "live copy unreadable; served the verified copy on the {:?} device", copy.place);
                    }
                    return Ok(());
                }
            }
        }
        dst.fill(0);
        if let Some(loc) = self.locate(lba..lba + 1)?[0] {
            self.zone.meta.lock().forget_damaged(loc.cbid);
        }
        tracing::error!(volume = %self.name, lba, error = %last_error,
            "content block failed its integrity check or could not be read");
        Err(io_err(format!(
            "volume {} block {lba}: {last_error}",
            self.name
        )))
    }

    /// Decides where each block of a write goes, under the zone lock:
    /// all-zero blocks unmap, blocks equal to a live content block share it
    /// (dedup), the rest get fresh CBIDs. Registers the write as in flight
    /// under the active key.
    /// `None` when the MAC key of `tagged` is no longer held.
    fn plan_write(
        &self,
        tagged: &WriteTags,
        dedup: bool,
    ) -> Result<Option<WritePlan>, ExportError> {
        let (tags, mac) = (&tagged.tags, tagged.mac);
        let mut meta = self.zone.meta.lock();
        // Under the zone lock, where a MAC key is dropped (see `rotation::mac`).
        if self.zone.crypto().tagger_for(mac).is_none() {
            return Ok(None);
        }
        let mut shared_under = rustc_hash::FxHashMap::default();
        let dedup = dedup && meta.dedup_enabled();
        let mut targets = Vec::with_capacity(tags.len());
        let mut new: Vec<NewCb> = Vec::new();
        let mut in_request: rustc_hash::FxHashMap<Tag, usize> = Default::default();
        for (i, tag) in tags.iter().enumerate() {
            let Some(tag) = tag else {
                targets.push(Target::Zero);
                continue;
            };
            if dedup {
                let found = meta.find_by_tag(tag, mac).or_else(|| {
                    tagged
                        .old
                        .iter()
                        .find_map(|(v, old)| old[i].as_ref().and_then(|t| meta.find_by_tag(t, *v)))
                });
                if let Some((cbid, r)) = found
                    && r.refcount < u32::MAX / 2
                {
                    if r.mac != mac {
                        shared_under.insert(i, (r.tag, r.mac));
                    }
                    targets.push(Target::Shared(cbid));
                    continue;
                }
                if let Some(&k) = in_request.get(tag) {
                    targets.push(Target::New(k));
                    continue;
                }
                in_request.insert(*tag, new.len());
            }
            targets.push(Target::New(new.len()));
            new.push(NewCb {
                cbid: Cbid(0),
                slot: Slot(0),
                staged: None,
                tag: *tag,
                block: i,
            });
        }
        let mut k = 0;
        while k < new.len() {
            let (f, c) = meta
                .cbids
                .alloc_run((new.len() - k) as u64)
                .ok_or_else(|| io_err("out of CBIDs"))?;
            for id in f..f + c {
                new[k].cbid = Cbid(id);
                k += 1;
            }
        }
        let active = meta.active;
        *meta.writers.entry(active).or_default() += 1;
        Ok(Some(WritePlan {
            targets,
            new,
            active,
            window: meta.window,
            mac,
            shared_under,
            placed: 0,
        }))
    }

    /// Ends a write's registration as in flight (see [`ZoneMeta::writers`]).
    fn unregister_writer(meta: &mut ZoneMeta, active: KeyVersion) {
        if let Some(n) = meta.writers.get_mut(&active) {
            *n -= 1;
            if *n == 0 {
                meta.writers.remove(&active);
            }
        }
    }

    /// Writes whole blocks of plaintext `plain` starting at block `first`,
    /// and returns the journal frame that records them. The caller holds the
    /// range lock exclusively.
    async fn write_blocks(&self, first: u64, plain: &[u8]) -> Result<JournalSeq, ExportError> {
        self.write_blocks_applying(first, plain, None).await
    }

    /// [`write_blocks`](Self::write_blocks), with `applied` (a replica's
    /// stream position) journaled in the same frame as the write.
    async fn write_blocks_applying(
        &self,
        first: u64,
        plain: &[u8],
        applied: Option<u64>,
    ) -> Result<JournalSeq, ExportError> {
        self.zone.note_io();
        // All-zero blocks are unmapped rather than stored: they read as zeros
        // without touching a device, and block status can say so truthfully.
        let mut tagged = WriteTags::of(&self.zone.crypto(), plain);
        // A streaming zone gets its own copy of the blocks, made before the
        // zone lock; a full stream backlog holds writers back here.
        let sink = self.zone.sink();
        if let Some(sink) = &sink {
            while !sink.has_room() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        let mut copy = sink
            .as_ref()
            .map(|_| zeroize::Zeroizing::new(plain.to_vec()));
        // A MAC key retired and destroyed since the tags were made (a MAC
        // rotation that ended meanwhile): tag again under the keys held.
        let mut plan = loop {
            match self.plan_write(&tagged, true)? {
                Some(plan) => break plan,
                None => tagged = WriteTags::of(&self.zone.crypto(), plain),
            }
        };
        let tags = &tagged.tags;
        let mut written = 0;
        loop {
            if let Err(e) = self.place_and_write(plain, &mut plan, written).await {
                self.abandon(&plan);
                return Err(e);
            }
            written = plan.new.len();
            // Under the zone lock: every shared block must still be live with
            // the same content; one freed meanwhile is written after all.
            let mut meta = self.zone.meta.lock();
            let mut lost = false;
            for (i, tag) in tags.iter().enumerate() {
                if let Target::Shared(cbid) = plan.targets[i]
                    && meta.cb(cbid).is_none_or(|r| {
                        let expect = plan.shared_under.get(&i).copied();
                        let expect = expect.or(tag.map(|t| (t, plan.mac)));
                        Some((r.tag, r.mac)) != expect
                    })
                {
                    let tag = tag.expect("shared blocks are non-zero");
                    let Some((f, _)) = meta.cbids.alloc_run(1) else {
                        drop(meta);
                        self.abandon(&plan);
                        return Err(io_err("out of CBIDs"));
                    };
                    plan.targets[i] = Target::New(plan.new.len());
                    plan.new.push(NewCb {
                        cbid: Cbid(f),
                        slot: Slot(0),
                        staged: None,
                        tag,
                        block: i,
                    });
                    lost = true;
                }
            }
            if !lost {
                let change = match (&sink, copy.take()) {
                    (Some(sink), Some(plain)) => Some((
                        sink.as_ref(),
                        ZoneChange::Write {
                            volume: self.id,
                            first: Lba(first),
                            tags: tags.clone(),
                            plain,
                        },
                    )),
                    _ => None,
                };
                return self.record_write(&mut meta, first, &plan, change, applied);
            }
        }
    }

    /// Allocates slots for the new content blocks from `from` on, encrypts
    /// them (under both keys in a window) and writes them.
    async fn place_and_write(
        &self,
        plain: &[u8],
        plan: &mut WritePlan,
        from: usize,
    ) -> Result<(), ExportError> {
        let count = plan.new.len() - from;
        if count == 0 {
            return Ok(());
        }
        let slots = self.allocate_slots_waiting(count).await?;
        for (nc, slot) in plan.new[from..].iter_mut().zip(slots) {
            nc.slot = slot;
        }
        plan.placed = plan.new.len();
        if let (Some(next), Some(staging)) = (plan.window, &self.storage.staging) {
            let mut staged = staging.alloc_foreground(count as u64);
            if staged.len() < count
                && let Some(bound) = self.zone.staging_wait.bound()
            {
                crate::zone::staging_wait::wait_for_staging(
                    &self.zone,
                    staging,
                    next,
                    &mut staged,
                    count,
                    bound,
                )
                .await;
            }
            if (staged.len()) < count {
                self.zone.stats.unstaged.fetch_add(
                    (count - staged.len()) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            for (nc, slot) in plan.new[from..].iter_mut().zip(staged) {
                nc.staged = Some(slot);
            }
        }
        self.encrypt_and_write(plain, plan, from).await
    }

    /// Gives back everything a failed write reserved: nothing durable points to it.
    fn abandon(&self, plan: &WritePlan) {
        let mut meta = self.zone.meta.lock();
        for nc in &plan.new {
            meta.cbids.release_now(nc.cbid.0, 1);
        }
        Self::unregister_writer(&mut meta, plan.active);
        drop(meta);
        let placed = &plan.new[..plan.placed];
        let mut alloc = self.storage.slots.lock();
        for nc in placed {
            alloc.release_now(nc.slot.0, 1);
        }
        drop(alloc);
        if let Some(staging) = &self.storage.staging {
            let staged: Vec<Slot> = placed.iter().filter_map(|nc| nc.staged).collect();
            staging.release_now(&staged);
        }
    }

    /// Moves the map and records the write in one journal frame, under the
    /// zone lock the caller holds.
    fn record_write(
        &self,
        meta: &mut ZoneMeta,
        first: u64,
        plan: &WritePlan,
        committed: Option<(&dyn ChangeSink, ZoneChange)>,
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
        let olds: Vec<Option<Cbid>> = (0..n).map(|i| map.get(Lba(first + i as u64))).collect();
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
                lba: Lba(first + i as u64),
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
        let seq = self.journal.append_with(&entries, |seq| {
            if let Some((sink, c)) = committed {
                sink.committed(seq, c);
            }
        });
        apply_changes(meta, changed, seq);
        let map = meta.volumes.get_mut(&self.id).expect("checked above");
        for i in 0..n {
            map.set(Lba(first + i as u64), new_of(i), seq);
        }
        free_after(&self.storage, meta, seq, &frees);
        if let Some(staging) = &self.storage.staging {
            staging.release_now(&dropped_staging);
        }
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

    /// [`allocate_slots`](Self::allocate_slots), but a full device whose
    /// frees are waiting for durability commits the journal and tries again
    /// rather than failing: copy-on-write frees the slots an overwrite
    /// replaces only once its record is durable, so a device with little
    /// headroom is full for a moment under sustained overwrites, and a
    /// client must not see ENOSPC for that.
    async fn allocate_slots_waiting(&self, n: usize) -> Result<Vec<Slot>, ExportError> {
        // Each commit frees whatever was pending when it started; more
        // than a few rounds means other writers keep taking the space.
        const COMMITS: usize = 4;
        let mut commits = 0;
        loop {
            match self.allocate_slots(n) {
                Err(ExportError::NoSpace(_))
                    if commits < COMMITS && self.storage.slots.lock().pending_frees() > 0 =>
                {
                    commits += 1;
                    self.journal
                        .commit(self.journal.last_appended())
                        .await
                        .map_err(io_err)?;
                }
                r => return r,
            }
        }
    }

    /// Reserves `n` data slots (in as few runs as the allocator gives).
    fn allocate_slots(&self, n: usize) -> Result<Vec<Slot>, ExportError> {
        let mut slots = Vec::with_capacity(n);
        let mut alloc = self.storage.slots.lock();
        while slots.len() < n {
            match alloc.alloc_run((n - slots.len()) as u64) {
                Some((f, c)) => slots.extend((f..f + c).map(Slot)),
                None => {
                    for s in &slots {
                        alloc.release_now(s.0, 1);
                    }
                    return Err(ExportError::NoSpace("the data device is full".into()));
                }
            }
        }
        Ok(slots)
    }

    /// Encrypts the new content blocks from `from` on into their slots and
    /// writes them, one device write per run of consecutive slots; in a
    /// window also under the next key to their staging slots. A staging
    /// failure is counted and the copy dropped: the write still succeeds
    /// on the data device (migration re-encrypts the block after the flip).
    async fn encrypt_and_write(
        &self,
        plain: &[u8],
        plan: &mut WritePlan,
        from: usize,
    ) -> Result<(), ExportError> {
        let new = &plan.new[from..];
        if let Some(end) = new.iter().map(|nc| nc.slot.0 + 1).max() {
            self.storage.ensure_slots(end).map_err(|e| match e {
                crate::store::device::DeviceError::OutOfRange { .. } => {
                    ExportError::NoSpace(e.to_string())
                }
                e => io_err(e),
            })?;
        }
        let crypto = self.zone.crypto();
        let key = |v: KeyVersion| {
            crypto.xts(v).ok_or_else(|| {
                io_err(format!(
                    "key version {v} of zone {} is not available",
                    self.zone.name
                ))
            })
        };
        let xts = key(plan.active)?;
        let staging = self
            .storage
            .staging
            .as_ref()
            .filter(|_| plan.window.is_some());
        let next = match plan.window {
            Some(v) if staging.is_some() => Some(key(v)?),
            _ => None,
        };
        let src = |nc: &NewCb| &plain[nc.block * BLOCK_SIZE..(nc.block + 1) * BLOCK_SIZE];
        let max_run = self.storage.max_run_blocks();
        let mut data_writes = Vec::new();
        for (start, len) in runs(new.iter().map(|nc| Some(nc.slot)), max_run) {
            let mut buf = self.storage.bufs.get(len);
            for (j, nc) in new[start..start + len].iter().enumerate() {
                xts.encrypt(
                    nc.cbid.0,
                    src(nc),
                    &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                );
            }
            data_writes.push(self.storage.write_data_run(new[start].slot, len, buf));
        }
        let mut staging_writes = Vec::new();
        let mut staging_runs = Vec::new();
        if let (Some(staging), Some(next)) = (staging, next) {
            if let Some(end) = new.iter().filter_map(|nc| nc.staged).map(|s| s.0 + 1).max()
                && staging.ensure_slots(end).is_err()
            {
                // Treated like a failed staging write below.
            }
            for (start, len) in runs(new.iter().map(|nc| nc.staged), max_run) {
                let mut buf = self.storage.bufs.get(len);
                for (j, nc) in new[start..start + len].iter().enumerate() {
                    next.encrypt(
                        nc.cbid.0,
                        src(nc),
                        &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                    );
                }
                let slot = new[start].staged.expect("runs skip unstaged blocks");
                staging_runs.push((start, len));
                staging_writes.push(staging.device.write_at(Storage::offset(slot), buf));
            }
        }
        let (data_results, staging_results) =
            futures::future::join(join_all(data_writes), join_all(staging_writes)).await;
        let mut outcome = Ok(());
        for (res, buf) in data_results {
            if let Err(e) = res {
                // A full device is NBD_ENOSPC (the spec's answer), not EIO.
                outcome = Err(if crate::store::full::is_no_space(&e) {
                    ExportError::NoSpace(e.to_string())
                } else {
                    io_err(e)
                });
            }
            self.storage.bufs.put(buf);
        }
        let mut failed = Vec::new();
        for ((start, len), (res, buf)) in staging_runs.into_iter().zip(staging_results) {
            if let Err(e) = res {
                tracing::warn!(zone = %self.zone.name, error = %e, blocks = len,
                    "staging write failed; the blocks stay under the active key until migration");
                self.zone
                    .stats
                    .staging_errors
                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                for nc in &mut plan.new[from + start..from + start + len] {
                    failed.extend(nc.staged.take());
                }
            }
            self.storage.bufs.put(buf);
        }
        if let Some(staging) = &self.storage.staging {
            staging.release_now(&failed);
        }
        outcome
    }

    /// Unmaps whole blocks, in frames of bounded size. The caller holds the
    /// range lock exclusively. Returns the last frame written, if any.
    fn unmap_blocks(
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
    fn unmap_locked(
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
        let seq = self.journal.append_with(&entries, |seq| {
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
    async fn zero_range(
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

/// Groups consecutive slots into runs `(start index, length)`; `None`
/// entries belong to no run.
fn runs(slots: impl Iterator<Item = Option<Slot>>, max: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize, u64)> = Vec::new();
    for (i, s) in slots.enumerate() {
        let Some(s) = s else { continue };
        match out.last_mut() {
            Some((start, len, first))
                if *start + *len == i && *len < max && *first + *len as u64 == s.0 =>
            {
                *len += 1
            }
            _ => out.push((i, 1, s.0)),
        }
    }
    out.into_iter().map(|(s, l, _)| (s, l)).collect()
}

/// Which copy of a located block a read fetches first. Normally the live
/// one. After a flip, a staged block keeps its data-device copy under the
/// old key (decrypt-only, still in memory) until the migrator destages it;
/// when the data device is read through the page cache that copy is most
/// likely cached, while the staging device is read with O_DIRECT, so the
/// data copy is read first. Both carry the same content and are checked
/// against the same tag; a read that fails its check (the block moved, or
/// the copy is damaged) falls back to every current copy.
fn read_source(loc: &Located, prefer_data: bool, crypto: &ZoneCrypto) -> LiveCopy {
    let data = LiveCopy {
        place: Place::Data,
        slot: loc.record.slot,
        key_version: loc.record.key_version,
    };
    if prefer_data && loc.live.place == Place::Staging && crypto.xts(data.key_version).is_some() {
        data
    } else {
        loc.live
    }
}

/// Decrypts one block of ciphertext under `version` and checks its tag.
/// On failure `dst` is zeroed (never left holding unverified plaintext).
fn decrypt_verify(
    crypto: &ZoneCrypto,
    loc: &Located,
    version: KeyVersion,
    src: &[u8],
    dst: &mut [u8],
) -> bool {
    let mut bad = Vec::new();
    decrypt_verify_run(crypto, &[Some(*loc)], |_| version, src, dst, 0, &mut bad);
    bad.is_empty()
}

/// [`decrypt_verify`] for a run of (mapped) blocks read in one piece:
/// decrypts each under the key version `version` picks, tags them in
/// batches, and pushes `first + j` to `bad` for each block `j` that failed
/// (its `dst` block zeroed). No allocation: batches of up to 64 blocks use
/// stack arrays.
fn decrypt_verify_run(
    crypto: &ZoneCrypto,
    blocks: &[Option<Located>],
    version: impl Fn(&Located) -> KeyVersion,
    src: &[u8],
    dst: &mut [u8],
    first: usize,
    bad: &mut Vec<usize>,
) {
    const BATCH: usize = 64;
    let batches = blocks
        .chunks(BATCH)
        .zip(src.chunks(BATCH * BLOCK_SIZE))
        .zip(dst.chunks_mut(BATCH * BLOCK_SIZE));
    for (b, ((blocks, src), dst)) in batches.enumerate() {
        let mut ok = [false; BATCH];
        for (((loc, ok), s), d) in blocks
            .iter()
            .zip(&mut ok)
            .zip(src.chunks_exact(BLOCK_SIZE))
            .zip(dst.chunks_exact_mut(BLOCK_SIZE))
        {
            let loc = loc.expect("runs hold mapped blocks");
            if let Some(xts) = crypto.xts(version(&loc)) {
                xts.decrypt(loc.cbid.0, s, d);
                *ok = true;
            }
        }
        let mut tags = [Tag::default(); BATCH];
        let tags = &mut tags[..blocks.len()];
        crypto.tagger().tag_blocks(dst, tags);
        for (j, (loc, tag)) in blocks.iter().zip(tags.iter()).enumerate() {
            let loc = loc.expect("runs hold mapped blocks");
            // A tag made under another MAC key (a MAC rotation under way)
            // is checked under that key.
            let good = if loc.record.mac == crypto.mac_version() {
                tag.ct_eq(&loc.record.tag)
            } else {
                crypto.verify_tag(
                    loc.record.mac,
                    &dst[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                    &loc.record.tag,
                )
            };
            if !(ok[j] && good) {
                dst[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].fill(0);
                bad.push(first + b * BATCH + j);
            }
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

impl Volume {
    /// Applies a replicated write of whole blocks from block `first`, with
    /// `applied` (the source stream record) journaled in the same frame.
    pub async fn apply_write(
        &self,
        first: u64,
        plain: &[u8],
        applied: u64,
    ) -> Result<(), ExportError> {
        if plain.is_empty() || !plain.len().is_multiple_of(BLOCK_SIZE) {
            return Err(ExportError::Invalid(
                "a replicated write is whole blocks".into(),
            ));
        }
        self.check_range(first * BS, plain.len() as u64)?;
        let blocks = first..first + (plain.len() / BLOCK_SIZE) as u64;
        let _guard = self.locks.lock(blocks, true).await;
        self.write_blocks_applying(first, plain, Some(applied))
            .await?;
        Ok(())
    }

    /// Applies replicated trims or write-zeroes (`zero`), with `applied`
    /// journaled in the frame of the last run.
    pub async fn apply_unmap(
        &self,
        runs: &[(Lba, u32)],
        zero: bool,
        applied: u64,
    ) -> Result<(), ExportError> {
        for (i, &(lba, n)) in runs.iter().enumerate() {
            self.check_range(lba.0 * BS, u64::from(n) * BS)?;
            if n == 0 {
                return Err(ExportError::Invalid("an empty run".into()));
            }
            let blocks = lba.0..lba.0 + u64::from(n);
            let _guard = self.locks.lock(blocks.clone(), true).await;
            let last = i + 1 == runs.len();
            self.unmap_blocks(blocks, zero, last.then_some(applied))?;
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
        self.check_writable()?;
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
        self.zero_range(offset, length, fua, false).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, length, fua, true).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_break_at_gaps_holes_and_the_cap() {
        let slots = |v: &[Option<u64>]| v.iter().map(|s| s.map(Slot)).collect::<Vec<_>>();
        let v = slots(&[Some(5), Some(6), Some(7), None, Some(8), Some(10), Some(11)]);
        assert_eq!(runs(v.iter().copied(), 100), [(0, 3), (4, 1), (5, 2)]);
        let v = slots(&[Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert_eq!(runs(v.iter().copied(), 2), [(0, 2), (2, 2), (4, 1)]);
        assert_eq!(runs(v.iter().copied(), 1).len(), 5);
        assert!(runs(std::iter::empty(), 4).is_empty());
    }

    /// One write mixing all-zero blocks (unmapped, never tagged) with runs
    /// of data blocks (tagged a run at a time): every block reads back, in
    /// one read and block by block, and only data blocks take space.
    #[test]
    fn a_write_mixing_zero_and_data_blocks_reads_back() {
        use crate::config::Profile;
        use crate::nbd::export::ExportCatalog;
        use crate::pool::Pool;

        let (_dir, pdir, pass) = crate::rotation::tests::new_pool();
        let profile = Profile::load("ci-2core").unwrap();
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", 1 << 20).unwrap();
        let vol = pool.open("v").unwrap();
        // Zero at 0, 3, 4 and 9: data runs of 2, 4 and 2 blocks between.
        let zero = [0, 3, 4, 9];
        let mut data = vec![0u8; 12 * BLOCK_SIZE];
        for (i, b) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            if !zero.contains(&i) {
                b.fill(i as u8 + 1);
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            vol.write(BLOCK_SIZE as u64, &data, true).await.unwrap();
            let mut back = vec![0xffu8; data.len()];
            vol.read(BLOCK_SIZE as u64, &mut back).await.unwrap();
            assert!(back == data, "one read");
            for (i, want) in data.chunks_exact(BLOCK_SIZE).enumerate() {
                let mut b = vec![0xffu8; BLOCK_SIZE];
                vol.read(((i + 1) * BLOCK_SIZE) as u64, &mut b)
                    .await
                    .unwrap();
                assert!(b == want, "block {i}");
            }
        });
        let meta = vol.zone.meta.lock();
        let mapped = meta.volumes.get(&vol.id).unwrap().mapped();
        assert_eq!(mapped.len(), 12 - zero.len());
    }

    /// A raw device with little headroom beyond its volume: overwrites
    /// without a flush free their old slots only at the next commit, and
    /// must wait for it, not fail with ENOSPC. A volume that really does
    /// not fit still gets ENOSPC.
    #[test]
    fn overwrites_on_a_full_device_wait_for_frees_instead_of_failing() {
        use crate::config::Profile;
        use crate::nbd::export::ExportCatalog;
        use crate::pool::Pool;

        const BLOCKS: usize = 256;
        let (_dir, pdir, pass) = crate::rotation::tests::new_pool();
        let profile = Profile::load("ci-2core").unwrap();
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", (2 * BLOCKS * BLOCK_SIZE) as u64)
            .unwrap();
        // As if the data device were a raw device of BLOCKS + 32 slots.
        pool.storage.slots.lock().set_limit(BLOCKS as u64 + 32);
        let vol = pool.open("v").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pass_data = |pass: usize| {
            let mut data = vec![0u8; BLOCKS * BLOCK_SIZE];
            for (i, b) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
                b.fill((pass * 7 + i) as u8 | 1);
            }
            data
        };
        rt.block_on(async {
            // Every pass replaces all BLOCKS blocks, 16 at a time, well
            // within one commit interval.
            for pass in 0..6 {
                let data = pass_data(pass);
                for (i, chunk) in data.chunks(16 * BLOCK_SIZE).enumerate() {
                    let at = (i * 16 * BLOCK_SIZE) as u64;
                    vol.write(at, chunk, false)
                        .await
                        .unwrap_or_else(|e| panic!("pass {pass} write {i}: {e}"));
                }
            }
            let mut back = vec![0u8; BLOCKS * BLOCK_SIZE];
            vol.read(0, &mut back).await.unwrap();
            assert!(back == pass_data(5), "the last pass reads back");
            // The second half of the volume does not fit: ENOSPC, no hang.
            let more = pass_data(9);
            let at = (BLOCKS * BLOCK_SIZE) as u64;
            let err = vol.write(at, &more, false).await.unwrap_err();
            assert!(matches!(err, ExportError::NoSpace(_)), "{err}");
            vol.read(0, &mut back).await.unwrap();
            assert!(back == pass_data(5), "a failed write changes nothing");
        });
    }
}
