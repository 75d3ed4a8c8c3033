//! Zones: content blocks, their table, the CBID allocator, and the keys in use.
//!
//! A zone's metadata (its content-block table and the LBA maps of its
//! volumes) sits behind one lock: placement and map updates are decided
//! under it, data I/O and crypto run outside it. State newer than the last
//! checkpoint lives in overlays tagged with the journal sequence that made
//! it; a checkpoint moves durable overlay entries into the mmap tables.
//!
//! Content-block table record (64 bytes, little-endian), indexed by CBID:
//! ```text
//! [0..8)   slot on the data device
//! [8..12)  key version of the data-device copy
//! [12..16) refcount (0 = free record)
//! [16..48) tag: keyed BLAKE3 of the plaintext
//! [48..56) staged copy: slot on the staging device + 1 (0 = none)
//! [56..60) staged copy: key version
//! [60..64) version of the MAC key that made the tag (0, in tables from
//!          before MAC rotation, means 1)
//! ```
//! Header word 0 of the table holds the zone's active DEK version as of
//! the checkpoint, so a flip whose journal record a checkpoint retired is
//! not forgotten.

pub mod change;
pub mod classes;
pub mod heat;
pub mod mac;
mod overlay;
pub mod staging_wait;

use overlay::Overlay;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;

use parking_lot::{Mutex, RwLock};

use crate::crypto::tag::{Tag, Tagger};
use crate::crypto::xts::Xts;
use crate::ids::{Cbid, JournalSeq, KeyVersion, Lba, Slot, VolumeId, ZoneId};
use crate::keys::secret::{DataKey, MacKey};
use crate::store::alloc::IdAllocator;
use crate::store::journal::{CbRecord, LiveCopy, StagedCopy};
use crate::store::table::{Table, TableError, TableSync};

/// Size of one content-block table record.
pub const CB_RECORD: usize = 64;
/// Header word of the content-block table holding the active DEK version.
const HEADER_ACTIVE: usize = 0;
/// Header word holding the last source stream record applied to this zone
/// (a replica zone; 0 otherwise).
const HEADER_APPLIED: usize = 1;
/// Size of one LBA map record.
pub const MAP_RECORD: usize = 8;

/// The keys a zone encrypts and verifies with, expanded and ready. Which
/// of them is active is block-map state (see [`ZoneMeta::active`]).
#[derive(Clone)]
pub struct ZoneCrypto {
    xts: BTreeMap<KeyVersion, Arc<Xts>>,
    tagger: Arc<Tagger>,
    /// The active MAC key's version: new tags are made under it.
    mac_version: u32,
    /// Retired MAC keys that still verify the tags they made (a MAC
    /// rotation under way), by version.
    old_taggers: BTreeMap<u32, Arc<Tagger>>,
}

impl ZoneCrypto {
    /// Expands the unwrapped keys of a zone (MAC key version 1).
    pub fn new<'a>(
        deks: impl IntoIterator<Item = (KeyVersion, &'a DataKey)>,
        mac: &MacKey,
    ) -> Self {
        let xts = deks
            .into_iter()
            .map(|(v, k)| (v, Arc::new(Xts::new(k))))
            .collect();
        Self {
            xts,
            tagger: Arc::new(Tagger::new(mac)),
            mac_version: 1,
            old_taggers: BTreeMap::new(),
        }
    }

    /// This key set with MAC key `version` active and the rest of `macs`
    /// (retired keys) verifying only.
    pub fn with_macs<'a>(
        &self,
        version: u32,
        macs: impl IntoIterator<Item = (u32, &'a MacKey)>,
    ) -> Self {
        let mut next = self.clone();
        next.old_taggers.clear();
        for (v, k) in macs {
            if v == version {
                next.tagger = Arc::new(Tagger::new(k));
            } else {
                next.old_taggers.insert(v, Arc::new(Tagger::new(k)));
            }
        }
        next.mac_version = version;
        next
    }

    /// This key set without retired MAC key `version` (after it is destroyed).
    pub fn without_mac(&self, version: u32) -> Self {
        let mut next = self.clone();
        next.old_taggers.remove(&version);
        next
    }

    /// The active MAC key's version.
    pub fn mac_version(&self) -> u32 {
        self.mac_version
    }

    /// The tagger of MAC key `version`, if held.
    pub fn tagger_for(&self, version: u32) -> Option<&Tagger> {
        if version == self.mac_version {
            Some(&self.tagger)
        } else {
            self.old_taggers.get(&version).map(|t| &**t)
        }
    }

    /// Whether `data` has tag `expected` under MAC key `mac` (false when
    /// that key is not held).
    pub fn verify_tag(&self, mac: u32, data: &[u8], expected: &Tag) -> bool {
        self.tagger_for(mac)
            .is_some_and(|t| t.verify(data, expected))
    }

    /// Retired MAC keys still held (a MAC rotation under way), by version.
    pub fn old_taggers(&self) -> impl Iterator<Item = (u32, &Tagger)> + '_ {
        self.old_taggers.iter().map(|(v, t)| (*v, &**t))
    }

    /// This key set with DEK `version` added.
    pub fn with_key(&self, version: KeyVersion, key: &DataKey) -> Self {
        let mut next = self.clone();
        next.xts.insert(version, Arc::new(Xts::new(key)));
        next
    }

    /// This key set without DEK `version` (after it is destroyed).
    pub fn without_key(&self, version: KeyVersion) -> Self {
        let mut next = self.clone();
        next.xts.remove(&version);
        next
    }

    /// The versions held.
    pub fn versions(&self) -> impl Iterator<Item = KeyVersion> + '_ {
        self.xts.keys().copied()
    }

    /// The cipher for `version`, if that key is available.
    pub fn xts(&self, version: KeyVersion) -> Option<&Xts> {
        self.xts.get(&version).map(|x| &**x)
    }

    /// The zone's tagger (the active MAC key).
    pub fn tagger(&self) -> &Tagger {
        &self.tagger
    }
}

/// A volume's LBA → CBID map: a checkpoint table plus an overlay.
pub struct VolumeMap {
    table: Table,
    overlay: Overlay<Option<Cbid>>,
    blocks: u64,
}

impl VolumeMap {
    /// Opens (or creates) the map table of a volume of `blocks` blocks.
    pub fn open(path: &Path, blocks: u64, create: bool) -> Result<Self, TableError> {
        let table = if create {
            Table::create(path, MAP_RECORD, blocks)?
        } else {
            Table::open(path, MAP_RECORD)?
        };
        Ok(Self {
            table,
            overlay: Overlay::default(),
            blocks,
        })
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The content block `lba` maps to, if any.
    pub fn get(&self, lba: Lba) -> Option<Cbid> {
        if let Some(c) = self.overlay.get(lba.0) {
            return c;
        }
        let raw = self.table.get(lba.0)?;
        let v = u64::from_le_bytes(raw.try_into().expect("8-byte record"));
        v.checked_sub(1).map(Cbid)
    }

    /// Records a change made by the journal frame `seq`.
    pub fn set(&mut self, lba: Lba, cbid: Option<Cbid>, seq: JournalSeq) {
        self.overlay.set(lba.0, cbid, seq);
    }

    /// Every mapped `(lba, cbid)`, overlay included.
    pub fn mapped(&self) -> Vec<(Lba, Cbid)> {
        let mut out: Vec<(Lba, Cbid)> = self
            .table
            .iter_nonempty()
            .filter(|&(i, _)| !self.overlay.contains(i))
            .map(|(i, r)| {
                (
                    Lba(i),
                    Cbid(u64::from_le_bytes(r.try_into().expect("8")) - 1),
                )
            })
            .collect();
        out.extend(
            self.overlay
                .entries()
                .filter_map(|(l, c)| c.map(|c| (Lba(l), c))),
        );
        out.sort_unstable();
        out
    }

    /// Copies up to `budget` changes of the running checkpoint into the
    /// table; true when all are (see [`Overlay::copy_frozen`]).
    fn copy_frozen(&mut self, budget: &mut usize) -> Result<bool, TableError> {
        let table = &mut self.table;
        self.overlay.copy_frozen(budget, |lba, cbid| {
            table.put(lba, &cbid.map_or(0, |c| c.0 + 1).to_le_bytes())
        })
    }
}

/// A checkpoint under way in a zone (see [`ZoneMeta::begin_checkpoint`]).
#[must_use = "a checkpoint begun must be finished or abandoned"]
pub struct CheckpointRun {
    /// The active key version as of the checkpoint's sequence.
    active: KeyVersion,
    /// The applied stream sequence as of the checkpoint's sequence.
    applied: u64,
}

/// A zone's mutable metadata, behind the zone lock.
pub struct ZoneMeta {
    cb_table: Table,
    cb_overlay: Overlay<Option<CbRecord>>,
    /// CBID allocator.
    pub cbids: IdAllocator,
    /// LBA maps of the zone's volumes.
    pub volumes: HashMap<VolumeId, VolumeMap>,
    /// The DEK version new content blocks are encrypted under. Changed only
    /// by a flip, under this lock, in the same step as its journal record.
    pub active: KeyVersion,
    /// The next DEK version while a rotation window is open: writes also
    /// put a copy under it on the staging device.
    pub window: Option<KeyVersion>,
    /// For a replica zone: the last source stream record applied, changed
    /// in the same journal frame as the data it covers.
    pub applied: u64,
    /// Writes between allocation and record, by the key version they
    /// encrypt under (the migrator waits for those under old keys).
    pub writers: HashMap<KeyVersion, u32>,
    /// Content index for dedup: tag prefix → content block (`None`: dedup off).
    dedup: Option<HashMap<u64, Cbid>>,
    /// Live content blocks by (data-copy key version, staged-copy key
    /// version), kept up to date by `set_cb` once built: rotation status and
    /// the key layer's usage questions need no scan of the block map.
    census: Option<HashMap<(KeyVersion, Option<KeyVersion>), u64>>,
}

/// The census key of a record.
fn census_key(r: &CbRecord) -> (KeyVersion, Option<KeyVersion>) {
    (r.key_version, r.staged.map(|s| s.key_version))
}

/// The dedup index key of a tag.
fn tag_key(tag: &Tag) -> u64 {
    u64::from_le_bytes(tag.0[..8].try_into().expect("8 bytes"))
}

fn encode_cb(r: &CbRecord) -> [u8; CB_RECORD] {
    let mut b = [0u8; CB_RECORD];
    b[..8].copy_from_slice(&r.slot.0.to_le_bytes());
    b[8..12].copy_from_slice(&r.key_version.0.to_le_bytes());
    b[12..16].copy_from_slice(&r.refcount.to_le_bytes());
    b[16..48].copy_from_slice(&r.tag.0);
    if let Some(s) = r.staged {
        b[48..56].copy_from_slice(&(s.slot.0 + 1).to_le_bytes());
        b[56..60].copy_from_slice(&s.key_version.0.to_le_bytes());
    }
    b[60..64].copy_from_slice(&r.mac.to_le_bytes());
    b
}

fn decode_cb(b: &[u8]) -> Option<CbRecord> {
    let refcount = u32::from_le_bytes(b[12..16].try_into().ok()?);
    (refcount > 0).then(|| CbRecord {
        slot: Slot(u64::from_le_bytes(b[..8].try_into().expect("8"))),
        key_version: KeyVersion(u32::from_le_bytes(b[8..12].try_into().expect("4"))),
        refcount,
        tag: Tag(b[16..48].try_into().expect("32")),
        mac: u32::from_le_bytes(b[60..64].try_into().expect("4")).max(1),
        staged: u64::from_le_bytes(b[48..56].try_into().expect("8"))
            .checked_sub(1)
            .map(|slot| StagedCopy {
                slot: Slot(slot),
                key_version: KeyVersion(u32::from_le_bytes(b[56..60].try_into().expect("4"))),
            }),
    })
}

impl ZoneMeta {
    /// Opens (or creates) a zone's content-block table.
    pub fn open(path: &Path, create: bool) -> Result<Self, TableError> {
        let cb_table = if create {
            Table::create(path, CB_RECORD, 1024)?
        } else {
            Table::open(path, CB_RECORD)?
        };
        let active = KeyVersion(cb_table.header_word(HEADER_ACTIVE) as u32);
        let applied = cb_table.header_word(HEADER_APPLIED);
        Ok(Self {
            applied,
            cb_table,
            cb_overlay: Overlay::default(),
            cbids: IdAllocator::new(u64::MAX),
            volumes: HashMap::default(),
            active,
            window: None,
            writers: HashMap::default(),
            dedup: None,
            census: None,
        })
    }

    /// Turns the content index on (built from every live record) or off.
    pub fn set_dedup(&mut self, on: bool) {
        self.dedup = on.then(|| {
            let mut index = HashMap::default();
            for (cbid, r) in self.live_records() {
                index.entry(tag_key(&r.tag)).or_insert(cbid);
            }
            index
        });
    }

    /// Whether dedup is on.
    pub fn dedup_enabled(&self) -> bool {
        self.dedup.is_some()
    }

    /// A live content block whose plaintext has tag `tag` under MAC key
    /// `mac`, if dedup is on. A tag of another MAC version never matches.
    pub fn find_by_tag(&self, tag: &Tag, mac: u32) -> Option<(Cbid, CbRecord)> {
        let cbid = *self.dedup.as_ref()?.get(&tag_key(tag))?;
        self.cb(cbid)
            .filter(|r| r.tag == *tag && r.mac == mac)
            .map(|r| (cbid, r))
    }

    /// Live content blocks by (data-copy key version, staged-copy key
    /// version). Built by one scan on first use, then maintained.
    pub fn census(&mut self) -> &HashMap<(KeyVersion, Option<KeyVersion>), u64> {
        if self.census.is_none() {
            let mut c: HashMap<(KeyVersion, Option<KeyVersion>), u64> = HashMap::default();
            for (_, r) in self.live_records() {
                *c.entry(census_key(&r)).or_default() += 1;
            }
            self.census = Some(c);
        }
        self.census.as_ref().expect("built above")
    }

    /// Takes a content block that failed an integrity check out of the
    /// dedup index, so no new write shares the damaged copy (a rewrite of
    /// the same content gets a fresh block and repairs the volume).
    pub fn forget_damaged(&mut self, cbid: Cbid) {
        let Some(tag) = self.cb(cbid).map(|r| r.tag) else {
            return;
        };
        if let Some(index) = self.dedup.as_mut()
            && index.get(&tag_key(&tag)) == Some(&cbid)
        {
            index.remove(&tag_key(&tag));
        }
    }

    /// The live copy of a record under this zone's active key.
    pub fn live(&self, record: &CbRecord) -> LiveCopy {
        record.live(self.active)
    }

    /// The record of content block `cbid`, if it is live.
    pub fn cb(&self, cbid: Cbid) -> Option<CbRecord> {
        if let Some(r) = self.cb_overlay.get(cbid.0) {
            return r;
        }
        decode_cb(self.cb_table.get(cbid.0)?)
    }

    /// Records a change made by the journal frame `seq` (`None`: freed).
    pub fn set_cb(&mut self, cbid: Cbid, record: Option<CbRecord>, seq: JournalSeq) {
        let old = self.tracks_records().then(|| self.cb(cbid)).flatten();
        self.replace_cb(cbid, old, record, seq);
    }

    /// Whether a record change must know the record it replaces (for the
    /// dedup index or the census).
    fn tracks_records(&self) -> bool {
        self.dedup.is_some() || self.census.is_some()
    }

    /// Like [`set_cb`](Self::set_cb) for a caller that already knows the
    /// current record: `old` must be what [`cb`](Self::cb) returns now. The
    /// write path knows it, and skipping the lookup matters there (a miss in
    /// a large overlay per block).
    pub fn replace_cb(
        &mut self,
        cbid: Cbid,
        old: Option<CbRecord>,
        record: Option<CbRecord>,
        seq: JournalSeq,
    ) {
        self.replace_cbs(std::iter::once((cbid, old, record)), seq);
    }

    /// [`replace_cb`](Self::replace_cb) for many content blocks (each at
    /// most once), as one journal frame changes them. Each structure is
    /// updated for all of them in turn, so that the content index's lookups
    /// (a cache miss each: its keys are random) follow each other and the
    /// CPU overlaps them; and every freed tag leaves the index before a new
    /// one goes in, so a tag that moves between blocks in the frame stays
    /// indexed.
    pub fn replace_cbs<I>(&mut self, changes: I, seq: JournalSeq)
    where
        I: Iterator<Item = (Cbid, Option<CbRecord>, Option<CbRecord>)> + Clone,
    {
        debug_assert!(
            !self.tracks_records() || changes.clone().all(|(c, old, _)| old == self.cb(c)),
            "stale old record"
        );
        if let Some(census) = self.census.as_mut() {
            for (_, old, record) in changes.clone() {
                if let Some(old) = &old
                    && let Some(n) = census.get_mut(&census_key(old))
                {
                    *n -= 1;
                    if *n == 0 {
                        census.remove(&census_key(old));
                    }
                }
                if let Some(r) = &record {
                    *census.entry(census_key(r)).or_default() += 1;
                }
            }
        }
        if let Some(index) = self.dedup.as_mut() {
            for (cbid, old, record) in changes.clone() {
                if let Some(old) = old
                    && record.is_none_or(|r| r.tag != old.tag)
                    && index.get(&tag_key(&old.tag)) == Some(&cbid)
                {
                    index.remove(&tag_key(&old.tag));
                }
            }
            for (cbid, _, record) in changes.clone() {
                if let Some(r) = &record {
                    index.entry(tag_key(&r.tag)).or_insert(cbid);
                }
            }
        }
        for (cbid, _, record) in changes {
            self.cb_overlay.set(cbid.0, record, seq);
        }
    }

    /// Every live content block in the checkpoint table (call after a checkpoint,
    /// when the overlay is empty, to rebuild allocators).
    pub fn live_cbs(&self) -> Vec<(Cbid, CbRecord)> {
        debug_assert!(self.cb_overlay.is_empty());
        self.cb_table
            .iter_nonempty()
            .filter_map(|(i, b)| decode_cb(b).map(|r| (Cbid(i), r)))
            .collect()
    }

    /// Every live content block, overlay included.
    pub fn live_records(&self) -> Vec<(Cbid, CbRecord)> {
        let mut out: Vec<(Cbid, CbRecord)> = self
            .cb_table
            .iter_nonempty()
            .filter(|&(i, _)| !self.cb_overlay.contains(i))
            .filter_map(|(i, b)| decode_cb(b).map(|r| (Cbid(i), r)))
            .collect();
        out.extend(
            self.cb_overlay
                .entries()
                .filter_map(|(c, r)| r.map(|r| (Cbid(c), r))),
        );
        out.sort_unstable_by_key(|(c, _)| *c);
        out
    }

    /// Moves every overlay entry up to `seq` into the tables and syncs
    /// them, in one go (the pool's checkpoint takes the steps below with
    /// the lock released between them).
    #[cfg(test)]
    pub fn checkpoint(&mut self, seq: JournalSeq) -> Result<(), TableError> {
        let run = self.begin_checkpoint(seq);
        // An unbounded budget copies everything in one call.
        if let Err(e) = self.copy_checkpoint(usize::MAX) {
            self.abandon_checkpoint();
            return Err(e);
        }
        for table in self.finish_checkpoint(run) {
            table.sync()?;
        }
        Ok(())
    }

    /// Starts a checkpoint at `seq` (see `overlay`): sets aside every change
    /// up to `seq`, to be copied by [`copy_checkpoint`](Self::copy_checkpoint).
    /// Call it with appenders stopped, so that `seq` covers every change.
    pub fn begin_checkpoint(&mut self, seq: JournalSeq) -> CheckpointRun {
        self.cb_overlay.freeze(seq);
        for v in self.volumes.values_mut() {
            v.overlay.freeze(seq);
        }
        CheckpointRun {
            active: self.active,
            applied: self.applied,
        }
    }

    /// Copies up to `budget` changes set aside by
    /// [`begin_checkpoint`](Self::begin_checkpoint) into the tables; true
    /// when every one is. Between calls the lock may be released: writers
    /// add changes meanwhile, and lookups stay right throughout.
    pub fn copy_checkpoint(&mut self, budget: usize) -> Result<bool, TableError> {
        let mut budget = budget;
        let table = &mut self.cb_table;
        if !self.cb_overlay.copy_frozen(&mut budget, |cbid, r| {
            table.put(cbid, &r.map_or([0u8; CB_RECORD], |r| encode_cb(&r)))
        })? {
            return Ok(false);
        }
        for v in self.volumes.values_mut() {
            if !v.copy_frozen(&mut budget)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Ends a checkpoint whose changes are all copied: stamps the active
    /// key version as of its start, and returns the tables to sync before
    /// they count as holding the state up to its sequence. Changes made
    /// since go to the overlays, never to the tables, so the syncs need no
    /// lock.
    pub fn finish_checkpoint(&mut self, run: CheckpointRun) -> Vec<TableSync> {
        self.cb_overlay.thaw();
        // The key version as of the checkpoint's sequence: a flip since
        // then is in the journal after it, not in these tables.
        self.cb_table
            .set_header_word(HEADER_ACTIVE, u64::from(run.active.0));
        self.cb_table.set_header_word(HEADER_APPLIED, run.applied);
        let mut syncs = vec![self.cb_table.syncer()];
        for v in self.volumes.values_mut() {
            v.overlay.thaw();
            syncs.push(v.table.syncer());
        }
        syncs
    }

    /// Gives up a checkpoint that failed: its changes go back to the
    /// overlays, where the next one finds them.
    pub fn abandon_checkpoint(&mut self) {
        self.cb_overlay.unfreeze();
        for v in self.volumes.values_mut() {
            v.overlay.unfreeze();
        }
    }

    /// Number of overlay entries (a checkpoint bounds this).
    pub fn overlay_len(&self) -> usize {
        self.cb_overlay.len()
            + self
                .volumes
                .values()
                .map(|v| v.overlay.len())
                .sum::<usize>()
    }
}

/// Data-path counters the rotation status reports.
#[derive(Default)]
pub struct ZoneStats {
    /// Writes in a window acknowledged without a staged copy (staging full).
    pub unstaged: std::sync::atomic::AtomicU64,
    /// Staging writes that failed (the write was still acknowledged).
    pub staging_errors: std::sync::atomic::AtomicU64,
    /// Reads served from the other copy because the live one failed.
    pub read_fallbacks: std::sync::atomic::AtomicU64,
    /// Logical blocks written (the rotation planner's foreground write rate).
    pub written_blocks: std::sync::atomic::AtomicU64,
    /// Writes in strict mode that waited for staging space and got it.
    pub strict_waited: std::sync::atomic::AtomicU64,
    /// Writes in strict mode that waited out the bound and went unstaged.
    pub strict_fallbacks: std::sync::atomic::AtomicU64,
}

/// A zone: its id, name, keys, and metadata.
pub struct Zone {
    /// Numeric id.
    pub id: ZoneId,
    /// Name.
    pub name: String,
    /// Keys in use (replaced whole when a key is added or destroyed).
    crypto: RwLock<Arc<ZoneCrypto>>,
    /// Metadata behind the zone lock.
    pub meta: Mutex<ZoneMeta>,
    /// Access counters for staging priority.
    pub heat: heat::Heat,
    /// Serialises changes to the zone's key file (rotation, KEK re-wrap,
    /// destroy) inside one process.
    pub key_file_lock: Mutex<()>,
    /// Milliseconds (since process start) of the last foreground I/O.
    last_io: AtomicU64,
    /// Data-path counters.
    pub stats: ZoneStats,
    /// Where committed changes go when the zone streams (see `stream`).
    pub sink: RwLock<Option<Arc<dyn change::ChangeSink>>>,
    /// What a write in a window does when staging is full (the policy's).
    pub staging_wait: staging_wait::StagingWait,
}

/// Milliseconds since the first call in this process: a cheap clock for
/// "when was this zone last busy".
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Zone {
    /// A zone with its keys and metadata.
    pub fn new(id: ZoneId, name: String, crypto: ZoneCrypto, meta: ZoneMeta) -> Self {
        Self {
            id,
            name,
            crypto: RwLock::new(Arc::new(crypto)),
            meta: Mutex::new(meta),
            heat: heat::Heat::default(),
            key_file_lock: Mutex::new(()),
            last_io: AtomicU64::new(0),
            stats: ZoneStats::default(),
            sink: RwLock::new(None),
            staging_wait: staging_wait::StagingWait::default(),
        }
    }

    /// Notes foreground I/O (the rotation throttle backs off while a zone is busy).
    pub fn note_io(&self) {
        self.last_io.store(now_ms(), Ordering::Relaxed);
    }

    /// How long the zone has gone without foreground I/O.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_io.load(Ordering::Relaxed)))
    }

    /// The change sink, if the zone streams.
    pub fn sink(&self) -> Option<Arc<dyn change::ChangeSink>> {
        self.sink.read().clone()
    }

    /// The keys as they are now.
    pub fn crypto(&self) -> Arc<ZoneCrypto> {
        self.crypto.read().clone()
    }

    /// Replaces the key set.
    pub fn set_crypto(&self, crypto: ZoneCrypto) {
        *self.crypto.write() = Arc::new(crypto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zone's metadata in `dir` with one volume (id 1) of `blocks` blocks.
    fn open_meta(dir: &Path, blocks: u64, create: bool) -> ZoneMeta {
        let mut m = ZoneMeta::open(&dir.join("cb"), create).unwrap();
        m.volumes.insert(
            VolumeId(1),
            VolumeMap::open(&dir.join("map"), blocks, create).unwrap(),
        );
        m
    }

    #[test]
    fn cb_records_round_trip_through_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = open_meta(dir.path(), 16, true);
        let rec = CbRecord {
            slot: Slot(9),
            key_version: KeyVersion(2),
            refcount: 1,
            tag: Tag([5; 32]),
            mac: 2,
            staged: Some(StagedCopy {
                slot: Slot(4),
                key_version: KeyVersion(3),
            }),
        };
        m.set_cb(Cbid(3), Some(rec), JournalSeq(1));
        m.set_cb(Cbid(4), Some(rec), JournalSeq(2));
        m.volumes
            .get_mut(&VolumeId(1))
            .unwrap()
            .set(Lba(7), Some(Cbid(3)), JournalSeq(1));
        m.checkpoint(JournalSeq(1)).unwrap();
        assert_eq!(
            m.overlay_len(),
            1,
            "entries newer than the checkpoint stay in the overlay"
        );
        assert_eq!(m.cb(Cbid(3)), Some(rec));
        assert_eq!(m.cb(Cbid(4)), Some(rec));
        drop(m);
        let m = open_meta(dir.path(), 16, false);
        assert_eq!(m.cb(Cbid(3)), Some(rec));
        assert_eq!(
            m.cb(Cbid(4)),
            None,
            "a change past the checkpoint is not in the table"
        );
        assert_eq!(m.volumes[&VolumeId(1)].get(Lba(7)), Some(Cbid(3)));
        assert_eq!(m.volumes[&VolumeId(1)].mapped(), vec![(Lba(7), Cbid(3))]);
    }

    #[test]
    fn a_checkpoint_in_steps_lets_writers_in_between() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = open_meta(dir.path(), 64, true);
        let rec = |slot: u64| CbRecord {
            slot: Slot(slot),
            key_version: KeyVersion(1),
            refcount: 1,
            tag: Tag([slot as u8; 32]),
            mac: 1,
            staged: None,
        };
        m.active = KeyVersion(1);
        for i in 0..40 {
            m.set_cb(Cbid(i), Some(rec(i)), JournalSeq(i + 1));
            let map = m.volumes.get_mut(&VolumeId(1)).unwrap();
            map.set(Lba(i), Some(Cbid(i)), JournalSeq(i + 1));
        }
        let run = m.begin_checkpoint(JournalSeq(40));
        let mut steps = 0;
        while !m.copy_checkpoint(9).unwrap() {
            steps += 1;
            // A writer between two steps: a new record, a changed one, a
            // remapped block, and a flip, all after the checkpoint.
            let n = 40 + steps;
            m.set_cb(Cbid(n), Some(rec(n)), JournalSeq(n + 1));
            m.set_cb(Cbid(0), Some(rec(100 + n)), JournalSeq(n + 1));
            let map = m.volumes.get_mut(&VolumeId(1)).unwrap();
            map.set(Lba(1), Some(Cbid(n)), JournalSeq(n + 1));
            m.active = KeyVersion(2);
            for i in 1..40 {
                assert_eq!(m.cb(Cbid(i)), Some(rec(i)), "step {steps}, cbid {i}");
            }
            assert_eq!(m.cb(Cbid(0)), Some(rec(100 + n)));
            assert_eq!(m.volumes[&VolumeId(1)].get(Lba(1)), Some(Cbid(n)));
            assert_eq!(m.volumes[&VolumeId(1)].get(Lba(2)), Some(Cbid(2)));
        }
        assert!(steps >= 8, "80 changes in steps of 9");
        for t in m.finish_checkpoint(run) {
            t.sync().unwrap();
        }
        let live_now = m.live_records();
        let last = 40 + steps;
        assert_eq!(m.cb(Cbid(0)), Some(rec(100 + last)));
        assert_eq!(m.volumes[&VolumeId(1)].get(Lba(1)), Some(Cbid(last)));
        drop(m);
        // The tables hold exactly the state as of the checkpoint, the key
        // version included.
        let m = open_meta(dir.path(), 64, false);
        assert_eq!(
            m.active,
            KeyVersion(1),
            "the flip came after the checkpoint"
        );
        for i in 0..40 {
            assert_eq!(m.cb(Cbid(i)), Some(rec(i)));
            assert_eq!(m.volumes[&VolumeId(1)].get(Lba(i)), Some(Cbid(i)));
        }
        assert_eq!(m.cb(Cbid(41)), None);
        assert_eq!(live_now.len(), 40 + steps as usize);
    }

    /// A frame's changes applied together leave the records, the content
    /// index and the census as one at a time would, except that a tag
    /// moving from a freed block to a new one in the same frame stays
    /// indexed whatever the order.
    #[test]
    fn a_frames_changes_together_agree_with_one_at_a_time() {
        let rec = |slot: u64, tag: u8, refcount: u32| CbRecord {
            slot: Slot(slot),
            key_version: KeyVersion(1),
            refcount,
            tag: Tag([tag; 32]),
            mac: 1,
            staged: None,
        };
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut ms: Vec<ZoneMeta> = dirs.iter().map(|d| open_meta(d.path(), 8, true)).collect();
        for m in &mut ms {
            m.set_dedup(true);
            m.census();
            for i in 0..6 {
                m.set_cb(Cbid(i), Some(rec(i, i as u8, 1)), JournalSeq(1));
            }
        }
        // Block 0 freed, 1 referenced twice, 2's tag moves to new block 9
        // (freed in the same frame, listed after it), 3 re-tagged in place.
        let frame = [
            (Cbid(9), None, Some(rec(9, 2, 1))),
            (Cbid(0), Some(rec(0, 0, 1)), None),
            (Cbid(1), Some(rec(1, 1, 1)), Some(rec(1, 1, 2))),
            (Cbid(2), Some(rec(2, 2, 1)), None),
            (Cbid(3), Some(rec(3, 3, 1)), Some(rec(3, 7, 1))),
        ];
        let (one, together) = ms.split_at_mut(1);
        let (one, together) = (&mut one[0], &mut together[0]);
        for &(c, old, new) in &frame {
            one.replace_cb(c, old, new, JournalSeq(2));
        }
        together.replace_cbs(frame.iter().copied(), JournalSeq(2));
        for c in 0..10 {
            assert_eq!(one.cb(Cbid(c)), together.cb(Cbid(c)), "record {c}");
        }
        assert_eq!(one.census(), together.census());
        for t in [0u8, 1, 3, 4, 5, 7] {
            assert_eq!(
                one.find_by_tag(&Tag([t; 32]), 1).map(|(c, _)| c),
                together.find_by_tag(&Tag([t; 32]), 1).map(|(c, _)| c),
                "tag {t}"
            );
        }
        assert_eq!(
            together.find_by_tag(&Tag([0; 32]), 1),
            None,
            "a freed tag leaves"
        );
        assert_eq!(
            together.find_by_tag(&Tag([7; 32]), 1).map(|(c, _)| c),
            Some(Cbid(3))
        );
        assert_eq!(
            together.find_by_tag(&Tag([2; 32]), 1).map(|(c, _)| c),
            Some(Cbid(9)),
            "the tag that moved is found at its new block"
        );
        assert_eq!(
            one.find_by_tag(&Tag([2; 32]), 1),
            None,
            "one at a time, in this order, loses it (only a missed dedup)"
        );
    }
}
