//! The write-ahead journal: metadata changes as checksummed frames, with
//! group commit.
//!
//! Every metadata change is appended as one frame (the unit of atomicity)
//! while the caller still holds the lock under which it changed the
//! in-memory state, so journal order is state order. A committer thread
//! writes pending frames out: first it makes the data devices durable (a
//! frame must never be durable before the data it points to; a group of
//! frames that point to none, a flip alone, skips this), then it writes
//! the frames and fdatasyncs the journal. Everyone waiting for a sequence at
//! or below the last written frame is then answered: one fsync pair serves
//! the whole group.
//!
//! A frame that points to no data and touches one zone only (a flip) may
//! be written *ahead* ([`Journal::commit_ahead`]): before earlier frames of
//! other zones that still wait for their data sync, so the flip never
//! waits for someone else's data. It commutes with them (no entry of one
//! touches what the other does), so replay may apply it before them, and
//! if they are lost (a crash before their commit) the state is that of
//! the commuted order. It is never written ahead of a frame of its own
//! zone, or of a frame whose appender did not name its zone.
//!
//! A checkpoint does not stop commits. It takes its sequence (the cut),
//! the committer writes the frames up to the cut and then starts the next
//! generation in the *other* region, and goes on committing there while
//! the checkpoint copies changes into the tables and syncs them. Only then
//! is the new generation's header written. Until it is, the old header
//! rules: replay reads the old generation's frames, then the next
//! generation's frames in the other region, which continue them. Frames
//! go ahead again once the committer has switched regions (a frame after
//! the cut, written ahead into the old region, would be lost with it).
//!
//! File layout (all integers little-endian). Region 0 is the journal file
//! itself; region 1 is the side file `<journal>.1`:
//! ```text
//! offset 0     header slot 0 ┐ 64 bytes each; the valid one with the highest
//! offset 4096  header slot 1 ┘ generation wins; a new header goes to the
//!                              slot the current one is not in
//!              [0..8)   magic b"KTJRNL04"
//!              [8..16)  generation
//!              [16..24) checkpoint sequence: every frame up to it is in the tables
//!              [24..32) region of this generation's frames (0 or 1)
//!              [32..36) crc32c of bytes [0..32)
//!              (b"KTJRNL03" and b"KTJRNL02", still read: no region field,
//!              crc32c of [0..24) at [24..28), frames in region 0, no
//!              next generation to follow)
//! offset 8192  frames of a region, back to back:
//!              [0..4)   payload length n
//!              [4..8)   crc32c of bytes [8..24+n)
//!              [8..16)  generation (frames of another generation are stale)
//!              [16..24) sequence; bit 63 set: written ahead
//!                       (otherwise the lowest sequence not yet seen)
//!              [24..24+n) payload: entries
//! ```
//! Replay reads frames of the header's generation from its region and
//! stops at the first one that is torn, stale or out of sequence (a frame
//! in order must carry the lowest sequence not yet seen; one written ahead
//! any higher sequence not yet seen), then goes on the same way with
//! frames of the next generation in the other region. Recovery then
//! checkpoints and starts a generation two past the header's, never used
//! before, so the bytes past the last valid frame can never be mistaken
//! for frames later.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use std::collections::BTreeSet;

use crate::ids::{JournalSeq, ZoneId};

mod entry;
pub use entry::{CbRecord, Entry, LiveCopy, Place, StagedCopy};
mod replay;
pub use replay::Replay;

const MAGIC: &[u8; 8] = b"KTJRNL04";
/// The magic of journals written before checkpoints let commits go on:
/// read (every generation in region 0), never written. A keyturn that
/// knows only this one refuses a newer journal rather than missing the
/// frames in the other region.
const MAGIC_V3: &[u8; 8] = b"KTJRNL03";
/// The magic of journals written before frames could go ahead: read (they
/// hold no such frame), never written.
const MAGIC_V2: &[u8; 8] = b"KTJRNL02";
/// Bit 63 of a frame's sequence field: the frame was written ahead.
const AHEAD: u64 = 1 << 63;
const HEADER_SLOT: u64 = 4096;
const FRAMES_START: u64 = 8192;
const FRAME_HEADER: usize = 24;
/// Largest payload a frame may carry; a larger length is corruption.
const MAX_PAYLOAD: u32 = 256 << 20;

/// Errors from the journal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Journal or data device I/O failed. The journal is now fail-stop:
    /// no later commit will report success.
    #[error("journal {op} failed: {message}")]
    Io {
        /// Operation.
        op: &'static str,
        /// OS error text.
        message: String,
    },
    /// The journal file is not a keyturn journal.
    #[error("journal {path} has no valid header")]
    Format {
        /// File.
        path: PathBuf,
    },
    /// An entry in a valid frame could not be decoded (written by a newer keyturn?).
    #[error("journal frame {seq} holds an entry of unknown type {kind}")]
    UnknownEntry {
        /// Frame sequence.
        seq: u64,
        /// Entry type byte.
        kind: u8,
    },
    /// The journal is shutting down.
    #[error("journal closed")]
    Closed,
}

/// What the journal knows to be durable.
#[derive(Clone, Debug)]
pub struct Durable {
    /// Every frame up to this sequence is durable.
    pub seq: JournalSeq,
    /// Set once a commit failed: nothing later will be reported durable.
    pub error: Option<JournalError>,
}

/// Tuning of the committer.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Commit pending frames at least this often, even without a FLUSH.
    /// Each commit makes the data device durable first, so a short interval
    /// turns buffered writes into device-speed writes; FLUSH and FUA commit
    /// at once whatever the interval.
    pub commit_interval: Duration,
    /// Commit when this many bytes of frames are pending, whatever the
    /// interval: bounds the memory they hold and the frees they delay.
    pub commit_bytes: usize,
    /// Checkpoint when the journal file grows past this many bytes.
    pub checkpoint_bytes: u64,
}

/// Called by the committer around its work; implemented by the pool.
pub trait CommitHooks: Send + Sync + 'static {
    /// Makes every completed data write durable (before frames are written).
    fn sync_data(&self) -> Result<(), std::io::Error>;
    /// Frames up to `seq` are durable: frees they recorded may be reused.
    /// Called before [`Journal::commit`] callers waiting for `seq` wake.
    fn durable(&self, seq: JournalSeq);
    /// Checkpoints, on a thread of its own while the committer goes on:
    /// with every appender stopped (the zone locks), takes
    /// `journal.last_appended()` as the checkpoint's sequence (the cut) and
    /// sets the in-memory changes up to it aside; then, appenders going on,
    /// waits until the frames up to it are durable (`journal.flush_through`)
    /// before any of those changes reach a table, copies them in, syncs the
    /// tables, and returns the sequence. The tables then hold exactly the
    /// state up to it; later frames go to the next generation meanwhile.
    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError>;
}

/// What a checkpoint asks of the journal (see [`CommitHooks::checkpoint`]).
pub trait CheckpointJournal {
    /// The sequence of the last frame appended, taken as the checkpoint's
    /// cut on the first call (later calls return the same).
    fn last_appended(&self) -> JournalSeq;
    /// Returns once every frame up to `seq`, the cut, is durable, data
    /// sync first. Frames after it belong to the next generation.
    fn flush_through(&mut self, seq: JournalSeq) -> Result<(), JournalError>;
}

/// A checkpoint's view of the journal, on the checkpoint's own thread.
struct Checkpointing<'a> {
    shared: &'a Shared,
    /// The checkpoint's cut, once taken.
    cut: std::cell::Cell<Option<JournalSeq>>,
}

impl CheckpointJournal for Checkpointing<'_> {
    /// Takes the cut: from here the committer writes the frames up to it
    /// into the old generation and then switches to the next (a frame
    /// after the cut written into the old region would be lost with it).
    /// Later calls return the same cut.
    fn last_appended(&self) -> JournalSeq {
        if let Some(cut) = self.cut.get() {
            return cut;
        }
        let mut p = self.shared.pending.lock();
        let cut = JournalSeq(p.next_seq - 1);
        p.switch_at = Some(cut.0);
        p.requested = true;
        self.shared.wake.notify_one();
        self.cut.set(Some(cut));
        cut
    }

    /// Waits until the committer has written the frames up to the cut and
    /// switched generations.
    fn flush_through(&mut self, seq: JournalSeq) -> Result<(), JournalError> {
        if self.cut.get() != Some(seq) {
            return Err(JournalError::Io {
                op: "checkpoint",
                message: format!(
                    "the checkpoint's sequence {} is not its cut {:?}",
                    seq.0,
                    self.cut.get()
                ),
            });
        }
        let failed = || self.shared.durable.borrow().error.clone();
        let mut p = self.shared.pending.lock();
        while p.switch_at.is_some() {
            // A committer that failed stops serving the switch: it may have
            // cleared the cut before this checkpoint took it, so look again
            // now and then.
            if let Some(e) = failed() {
                return Err(e);
            }
            self.shared
                .switched
                .wait_for(&mut p, Duration::from_millis(50));
        }
        drop(p);
        failed().map_or(Ok(()), Err)
    }
}

/// A checkpoint, on its own thread while the committer goes on: the
/// hooks copy the changes up to the cut into the tables and sync them;
/// then the new generation's header makes them the state replay starts
/// from.
fn run_checkpoint(shared: &Shared, hooks: &dyn CommitHooks) -> Result<(), JournalError> {
    let mut journal = Checkpointing {
        shared,
        cut: std::cell::Cell::new(None),
    };
    let seq = hooks.checkpoint(&mut journal)?;
    // Checks that `seq` is the cut; returns at once if the hooks waited
    // for the switch already.
    journal.flush_through(seq)?;
    let (generation, region) = {
        let w = shared.writer.lock();
        (w.generation, w.region)
    };
    shared.headers.lock().write(Header {
        generation,
        checkpoint: seq.0,
        region,
        continues: true,
    })
}

/// Recovery's checkpoint: everything up to the replayed sequence is in
/// memory and nothing is pending.
struct Recovered(JournalSeq);

impl CheckpointJournal for Recovered {
    fn last_appended(&self) -> JournalSeq {
        self.0
    }

    fn flush_through(&mut self, _: JournalSeq) -> Result<(), JournalError> {
        Ok(())
    }
}

/// A frame appended and not yet written.
struct PendingFrame {
    seq: u64,
    /// Encoded entries.
    payload: Vec<u8>,
    /// Whether the frame may point to data on a device or in a stream (see
    /// [`Entry::points_to_data`]): only then must the data be synced first.
    points_to_data: bool,
    /// The zone all its entries belong to: a frame of another zone may go
    /// ahead of it.
    zone: ZoneId,
}

struct Pending {
    /// Frames not yet written, in sequence order.
    frames: Vec<PendingFrame>,
    /// Sequence the next appended frame gets.
    next_seq: u64,
    /// Bytes of `frames`.
    bytes: usize,
    /// Someone waits for a commit.
    requested: bool,
    closing: bool,
    /// `(seq, zone)` of the frames the committer has taken and not yet
    /// made durable (it is waiting for their data sync, or writing them).
    in_flight: Vec<(u64, ZoneId)>,
    /// A checkpoint has begun and the committer has not yet switched to
    /// the next generation: nothing goes ahead (a frame after the cut,
    /// written ahead into the old region, would be lost with it).
    checkpointing: bool,
    /// The cut of a checkpoint waiting for the committer to write the
    /// frames up to it and switch regions.
    switch_at: Option<u64>,
    /// Every frame up to this sequence is durable.
    durable_through: u64,
    /// Frames written ahead, above `durable_through`.
    ahead_done: BTreeSet<u64>,
    /// Frames handed to the committer to be written ahead at the start of
    /// its next group, before that group's data sync.
    handed: BTreeSet<u64>,
}

impl Pending {
    /// Takes frame `seq` out of the queue to be written ahead, if it is
    /// still queued, points to no data, and no earlier frame queued or in
    /// flight is of its zone.
    fn take_ahead(&mut self, seq: u64, zone: ZoneId) -> Option<PendingFrame> {
        if self.checkpointing {
            return None;
        }
        let i = self.frames.binary_search_by_key(&seq, |f| f.seq).ok()?;
        let clash = self.frames[..i].iter().any(|f| f.zone == zone)
            || self.in_flight.iter().any(|&(_, z)| z == zone);
        if clash || self.frames[i].points_to_data {
            return None;
        }
        let f = self.frames.remove(i);
        self.bytes -= f.payload.len();
        Some(f)
    }

    /// Whether frame `seq` is durable.
    fn is_durable(&self, seq: u64) -> bool {
        seq <= self.durable_through || self.ahead_done.contains(&seq)
    }

    /// Takes the frames up to `through` for the committer: those handed to
    /// it that may go ahead (they point to no data, and no earlier frame
    /// of their zone is among the taken), and the rest, in order. All of
    /// them are in flight until noted durable.
    fn take_group(&mut self, through: u64) -> (Vec<PendingFrame>, Vec<PendingFrame>) {
        let n = self.frames.partition_point(|f| f.seq <= through);
        let taken: Vec<_> = if n == self.frames.len() {
            std::mem::take(&mut self.frames)
        } else {
            self.frames.drain(..n).collect()
        };
        self.bytes -= taken.iter().map(|f| f.payload.len()).sum::<usize>();
        self.in_flight = taken.iter().map(|f| (f.seq, f.zone)).collect();
        // Every write's group comes here: nothing handed, nothing to sort.
        if self.handed.is_empty() {
            return (Vec::new(), taken);
        }
        let (mut ahead, mut rest) = (Vec::new(), Vec::with_capacity(taken.len()));
        for f in taken {
            let handed = self.handed.remove(&f.seq);
            if handed && !f.points_to_data && !rest.iter().any(|r: &PendingFrame| r.zone == f.zone)
            {
                ahead.push(f);
            } else {
                rest.push(f);
            }
        }
        (ahead, rest)
    }

    /// The last frame of `zone` queued or in flight.
    fn last_of(&self, zone: ZoneId) -> Option<u64> {
        let queued = self.frames.iter().rev().find(|f| f.zone == zone);
        let flying = self.in_flight.iter().rev().find(|&&(_, z)| z == zone);
        queued.map(|f| f.seq).max(flying.map(|&(s, _)| s))
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled (under `pending`) when the committer has served a
    /// checkpoint's `switch_at`.
    switched: Condvar,
    durable: watch::Sender<Durable>,
    /// The file's end, shared by the committer and frames written ahead.
    /// Lock order: `writer`, then `pending`.
    writer: Mutex<Writer>,
    /// Written by the checkpoint thread only, after the tables are synced.
    headers: Mutex<Headers>,
}

impl Shared {
    /// The sequence of the last appended frame.
    fn last_appended(&self) -> JournalSeq {
        JournalSeq(self.pending.lock().next_seq - 1)
    }

    /// Records frames made durable: every frame up to `in_order` (a group
    /// the committer wrote), or frame `ahead` alone. Returns the sequence
    /// every frame up to which is now durable.
    fn note_durable(&self, in_order: Option<u64>, ahead: Option<u64>) -> u64 {
        let mut p = self.pending.lock();
        if let Some(last) = in_order {
            p.in_flight.clear();
            p.durable_through = p.durable_through.max(last);
        }
        if let Some(seq) = ahead {
            p.ahead_done.insert(seq);
        }
        loop {
            let next = p.durable_through + 1;
            if !p.ahead_done.remove(&next) {
                break;
            }
            p.durable_through = next;
        }
        let through = p.durable_through;
        p.ahead_done.retain(|&s| s > through);
        // A frame handed over after the committer had taken it is durable now.
        p.handed.retain(|&s| s > through);
        through
    }

    /// Tells everyone that the frames up to `last` (a group the committer
    /// wrote) are durable: the hook first, so that a waiter woken by the
    /// new durable sequence finds what it freed already back in the
    /// allocators.
    fn publish(&self, hooks: &dyn CommitHooks, last: JournalSeq) {
        let through = JournalSeq(self.note_durable(Some(last.0), None));
        hooks.durable(through);
        self.durable.send_modify(|d| d.seq = d.seq.max(through));
    }

    /// Fail-stop: after a failed write or fsync nothing later may be
    /// reported durable, because we cannot know what reached the disk.
    fn fail(&self, e: JournalError) {
        tracing::error!(error = %e, "journal commit failed; refusing further commits");
        self.durable.send_modify(|d| d.error = Some(e));
    }
}

/// A frame appended by [`Journal::append_ahead`], to be made durable by
/// [`Journal::commit_ahead`].
#[must_use = "commit it with Journal::commit_ahead"]
#[derive(Debug)]
pub struct AheadFrame {
    seq: JournalSeq,
    zone: ZoneId,
}

impl AheadFrame {
    /// The frame's sequence.
    pub fn seq(&self) -> JournalSeq {
        self.seq
    }
}

/// How [`Journal::commit_ahead`] made its frame durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Written at once, ahead of any earlier frames of other zones still
    /// waiting for their data sync.
    Ahead,
    /// The committer was in a group's data sync, or a checkpoint was
    /// about to switch generations: the frame was handed to the committer
    /// and written once that group was, ahead of the next group's data
    /// sync (or in order with it, if a frame of its zone was in it).
    Handed,
    /// With the frames before it, in order: an earlier frame of its zone
    /// was still pending, or the committer had already taken it.
    InOrder,
}

/// The journal. Append from any thread; wait for durability with [`Journal::commit`].
pub struct Journal {
    shared: Arc<Shared>,
    hooks: Arc<dyn CommitHooks>,
    commit_bytes: usize,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where the committer writes.
struct Writer {
    /// The two regions' files: the journal file and its side file.
    regions: [RegionFile; 2],
    /// The region the current generation's frames go to.
    region: usize,
    generation: u64,
    write_pos: u64,
}

/// One region's file.
struct RegionFile {
    file: File,
    /// The file's length: frames up to it overwrite blocks in place.
    len: u64,
}

/// The header slots, written by a checkpoint beside the committer.
struct Headers {
    /// The journal file.
    file: File,
    /// The slot of the current header.
    slot: u64,
}

impl Headers {
    /// Makes `header` the current one: written to the other slot, so that
    /// a torn write leaves the current header in force.
    fn write(&mut self, header: Header) -> Result<(), JournalError> {
        let slot = 1 - self.slot;
        self.file
            .write_all_at(&encode_header(header), slot * HEADER_SLOT)
            .map_err(Writer::io("header write"))?;
        super::durable::sync_data(&self.file).map_err(Writer::io("header sync"))?;
        self.slot = slot;
        Ok(())
    }
}

/// How far ahead of the frames the journal file is grown, with zeros.
const GROW_AHEAD: u64 = 8 << 20;

/// A journal header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    generation: u64,
    /// Every frame up to this sequence is in the tables.
    checkpoint: u64,
    /// The region holding this generation's frames.
    region: usize,
    /// Whether frames of the next generation, in the other region, follow
    /// this generation's on replay (the header was written by a keyturn
    /// whose checkpoints let commits go on; see the module comment).
    continues: bool,
}

fn encode_header(h: Header) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&h.generation.to_le_bytes());
    b[16..24].copy_from_slice(&h.checkpoint.to_le_bytes());
    b[24..32].copy_from_slice(&(h.region as u64).to_le_bytes());
    let crc = crc32c::crc32c(&b[..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_header(b: &[u8; 64]) -> Option<Header> {
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let crc = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let (region, continues) = if &b[..8] == MAGIC {
        if crc(32) != crc32c::crc32c(&b[..32]) || word(24) > 1 {
            return None;
        }
        (word(24) as usize, true)
    } else if &b[..8] == MAGIC_V3 || &b[..8] == MAGIC_V2 {
        // Every generation's frames in the journal file itself.
        if crc(24) != crc32c::crc32c(&b[..24]) {
            return None;
        }
        (0, false)
    } else {
        return None;
    };
    Some(Header {
        generation: word(8),
        checkpoint: word(16),
        region,
        continues,
    })
}

/// The file holding `region`'s frames: the journal file itself, or the
/// side file beside it.
pub(super) fn region_path(path: &Path, region: usize) -> PathBuf {
    if region == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    name.into()
}

fn frame_crc(generation: u64, seq: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&generation.to_le_bytes());
    head[8..].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

impl Writer {
    fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        move |e| JournalError::Io {
            op,
            message: e.to_string(),
        }
    }

    /// Starts the next generation in the other region, with no I/O: its
    /// first frame overwrites what is there, stale since the current
    /// header was written.
    fn switch(&mut self) {
        self.region ^= 1;
        self.generation += 1;
        self.write_pos = FRAMES_START;
    }

    /// Writes `frames` at the end and makes them durable; `ahead` marks
    /// them written ahead.
    fn write_frames(&mut self, frames: &[PendingFrame], ahead: bool) -> Result<(), JournalError> {
        let total: usize = frames.iter().map(|f| FRAME_HEADER + f.payload.len()).sum();
        let mut buf = Vec::with_capacity(total);
        for PendingFrame { seq, payload, .. } in frames {
            let field = if ahead { seq | AHEAD } else { *seq };
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&frame_crc(self.generation, field, payload).to_le_bytes());
            buf.extend_from_slice(&self.generation.to_le_bytes());
            buf.extend_from_slice(&field.to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let end = self.write_pos + buf.len() as u64;
        let region = &mut self.regions[self.region];
        if end > region.len {
            region.grow_to(end.next_multiple_of(GROW_AHEAD))?;
        }
        region
            .file
            .write_all_at(&buf, self.write_pos)
            .map_err(Self::io("write"))?;
        super::durable::sync_data(&region.file).map_err(Self::io("sync"))?;
        self.write_pos = end;
        Ok(())
    }
}

impl RegionFile {
    fn open(file: File) -> Result<Self, JournalError> {
        let len = file.metadata().map_err(Writer::io("stat"))?.len();
        Ok(Self { file, len })
    }

    /// Extends the file to `len` with zeros actually written (not a hole,
    /// not an unwritten extent): the commits that follow overwrite blocks
    /// in place, so their fdatasync has no size or extent change to make
    /// durable. On ext4 such a change is a journal commit, which in
    /// ordered mode waits for other files' writeback: the flip's commit
    /// must not wait for someone else's data. Zeros never pass for frames
    /// (a frame's generation is never 0). The sync after the frames makes
    /// the new length durable with them.
    fn grow_to(&mut self, len: u64) -> Result<(), JournalError> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        // Never over the header slots.
        let mut at = self.len.max(FRAMES_START);
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(Writer::io("grow"))?;
            at += n as u64;
        }
        self.len = len;
        Ok(())
    }
}

impl Journal {
    /// Creates a new, empty journal file (its side file is created when
    /// the journal is started).
    pub fn create(path: &Path) -> Result<(), JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Writer::io("create"))?;
        // A new file has no current header: this one goes to slot 0.
        Headers { file, slot: 1 }.write(Header {
            generation: 1,
            checkpoint: 0,
            region: 0,
            continues: true,
        })
    }

    /// Opens the journal for appending after recovery: the caller has
    /// replayed everything up to `last_seq` into memory. Writes a new
    /// generation only after `hooks.checkpoint(last_seq)` has put that state
    /// into the tables, so no byte of the old generations is needed again.
    pub fn start(
        path: &Path,
        last_seq: JournalSeq,
        config: JournalConfig,
        hooks: Arc<dyn CommitHooks>,
    ) -> Result<Self, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Writer::io("open"))?;
        let (header, slot) = Self::read_header(&file, path)?;
        let side = Self::open_side_file(path)?;
        hooks.checkpoint(&mut Recovered(last_seq))?;
        let mut headers = Headers {
            file: file.try_clone().map_err(Writer::io("open"))?,
            slot,
        };
        // Two past the header's: the next generation may have frames in
        // the other region (a checkpoint was under way), and a generation
        // is never used twice. Either region would do, since nothing is
        // written to either before this header is durable.
        let generation = header.generation + 2;
        let region = header.region;
        headers.write(Header {
            generation,
            checkpoint: last_seq.0,
            region,
            continues: true,
        })?;
        let writer = Writer {
            regions: [RegionFile::open(file)?, RegionFile::open(side)?],
            region,
            generation,
            write_pos: FRAMES_START,
        };
        let (durable, _) = watch::channel(Durable {
            seq: last_seq,
            error: None,
        });
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                frames: Vec::new(),
                next_seq: last_seq.0 + 1,
                bytes: 0,
                requested: false,
                closing: false,
                in_flight: Vec::new(),
                checkpointing: false,
                switch_at: None,
                durable_through: last_seq.0,
                ahead_done: BTreeSet::new(),
                handed: BTreeSet::new(),
            }),
            wake: Condvar::new(),
            switched: Condvar::new(),
            durable,
            writer: Mutex::new(writer),
            headers: Mutex::new(headers),
        });
        let s = shared.clone();
        let commit_bytes = config.commit_bytes.max(1);
        let h = hooks.clone();
        let committer = std::thread::Builder::new()
            .name("keyturn-journal".into())
            .spawn(move || committer_loop(s, config, h))
            .map_err(Writer::io("spawn committer"))?;
        Ok(Self {
            shared,
            hooks,
            commit_bytes,
            committer: Mutex::new(Some(committer)),
        })
    }

    /// Opens region 1's file, creating it (and making its name durable)
    /// on a journal that has none yet.
    fn open_side_file(path: &Path) -> Result<File, JournalError> {
        let side = region_path(path, 1);
        let open = |create| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .open(&side)
        };
        match open(false) {
            Ok(file) => Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = open(true).map_err(Writer::io("create side file"))?;
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                super::durable::sync_dir(dir.unwrap_or(Path::new(".")))
                    .map_err(Writer::io("directory sync"))?;
                Ok(file)
            }
            Err(e) => Err(Writer::io("open side file")(e)),
        }
    }

    /// Appends one frame holding `entries`, all of them changes to `zone`;
    /// returns its sequence. Call while holding the lock under which the
    /// change was made in memory.
    pub fn append(&self, zone: ZoneId, entries: &[Entry]) -> JournalSeq {
        self.append_with(zone, entries, |_| {})
    }

    /// [`append`](Self::append), calling `with` with the frame's sequence
    /// before the committer can see the frame: what `with` queues (a stream
    /// record) is there before the data sync that precedes the frame.
    pub fn append_with(
        &self,
        zone: ZoneId,
        entries: &[Entry],
        with: impl FnOnce(JournalSeq),
    ) -> JournalSeq {
        debug_assert!(
            entries.iter().all(|e| e.zone().is_none_or(|z| z == zone)),
            "a frame holds changes to one zone"
        );
        let mut payload = Vec::with_capacity(entries.len() * 61);
        for e in entries {
            e.encode(&mut payload);
        }
        let mut p = self.shared.pending.lock();
        let seq = p.next_seq;
        with(JournalSeq(seq));
        p.next_seq += 1;
        p.bytes += payload.len();
        p.frames.push(PendingFrame {
            seq,
            payload,
            points_to_data: entries.iter().any(Entry::points_to_data),
            zone,
        });
        if p.bytes >= self.commit_bytes && !p.requested {
            p.requested = true;
            self.shared.wake.notify_one();
        }
        JournalSeq(seq)
    }

    /// Appends a frame to be made durable with [`commit_ahead`](Self::commit_ahead),
    /// under the same lock rule as [`append`](Self::append).
    pub fn append_ahead(&self, zone: ZoneId, entries: &[Entry]) -> AheadFrame {
        AheadFrame {
            seq: self.append(zone, entries),
            zone,
        }
    }

    /// Makes `frame` durable, ahead of earlier frames of other zones when
    /// it can (see the module comment). Call without the lock it was
    /// appended under.
    ///
    /// When the committer is idle, the frame is written at once: one write
    /// and fdatasync of the journal. When it is syncing a group's data, the
    /// frame waits for that group and is written right after it, before
    /// the next group's data sync: on a device with a volatile cache and no
    /// FUA, a sync issued in the middle of another's writeback waits for
    /// that writeback anyway, and costs more than one right after it
    /// (docs/benchmarks.md, "The flip under load").
    pub fn commit_ahead(&self, frame: AheadFrame) -> Result<Committed, JournalError> {
        let AheadFrame { seq, zone } = frame;
        let written = {
            let mut w = self.shared.writer.lock();
            if let Some(e) = &self.shared.durable.borrow().error {
                return Err(e.clone());
            }
            let mut p = self.shared.pending.lock();
            // During a checkpoint's switch the committer decides which
            // generation the frame belongs to, so it is handed over too.
            if !p.in_flight.is_empty() || p.checkpointing {
                p.handed.insert(seq.0);
                p.requested = true;
                self.shared.wake.notify_one();
                drop(p);
                drop(w);
                return self.wait_durable(seq).map(|()| Committed::Handed);
            }
            let Some(f) = p.take_ahead(seq.0, zone) else {
                drop(p);
                drop(w);
                self.commit_blocking(seq)?;
                return Ok(Committed::InOrder);
            };
            drop(p);
            w.write_frames(std::slice::from_ref(&f), true)
        };
        if let Err(e) = written {
            self.shared.fail(e.clone());
            return Err(e);
        }
        let through = self.shared.note_durable(None, Some(seq.0));
        if through >= seq.0 {
            // Nothing before it was pending: the durable sequence moved.
            self.hooks.durable(JournalSeq(through));
            self.shared
                .durable
                .send_modify(|d| d.seq = d.seq.max(JournalSeq(through)));
        }
        Ok(Committed::Ahead)
    }

    /// Waits until frame `seq` alone is durable (frames below it may not be).
    fn wait_durable(&self, seq: JournalSeq) -> Result<(), JournalError> {
        loop {
            if let Some(e) = &self.shared.durable.borrow().error {
                return Err(e.clone());
            }
            if self.shared.pending.lock().is_durable(seq.0) {
                return Ok(());
            }
            // The committer runs on its own thread; as in `commit_blocking`.
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The last frame of `zone` not yet durable, if any.
    pub fn last_pending_of(&self, zone: ZoneId) -> Option<JournalSeq> {
        self.shared.pending.lock().last_of(zone).map(JournalSeq)
    }

    /// The sequence of the last appended frame.
    pub fn last_appended(&self) -> JournalSeq {
        self.shared.last_appended()
    }

    /// The durable state now.
    pub fn durable(&self) -> Durable {
        self.shared.durable.borrow().clone()
    }

    /// Waits until every frame up to `seq` is durable.
    pub async fn commit(&self, seq: JournalSeq) -> Result<(), JournalError> {
        let mut rx = self.shared.durable.subscribe();
        {
            let d = rx.borrow_and_update();
            if let Some(e) = &d.error {
                return Err(e.clone());
            }
            if d.seq >= seq {
                return Ok(());
            }
        }
        self.request_commit();
        loop {
            if rx.changed().await.is_err() {
                return Err(JournalError::Closed);
            }
            let d = rx.borrow_and_update();
            if let Some(e) = &d.error {
                return Err(e.clone());
            }
            if d.seq >= seq {
                return Ok(());
            }
        }
    }

    /// Blocking form of [`Journal::commit`] for non-async callers.
    pub fn commit_blocking(&self, seq: JournalSeq) -> Result<(), JournalError> {
        let mut rx = self.shared.durable.subscribe();
        let mut requested = false;
        loop {
            {
                let d = rx.borrow_and_update();
                if let Some(e) = &d.error {
                    return Err(e.clone());
                }
                if d.seq >= seq {
                    return Ok(());
                }
            }
            // Only when something is still to commit, as `commit` does: a
            // request for frames already durable woke the committer for
            // whatever came next, and so took the frames a flip is about
            // to be written ahead of into a group of their own.
            if !requested {
                self.request_commit();
                requested = true;
            }
            // The committer runs on its own thread, so polling a watch is safe here.
            let done = rx.has_changed();
            if done.is_err() {
                return Err(JournalError::Closed);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn request_commit(&self) {
        let mut p = self.shared.pending.lock();
        p.requested = true;
        self.shared.wake.notify_one();
    }

    /// Commits everything pending and stops the committer.
    pub fn close(&self) {
        {
            let mut p = self.shared.pending.lock();
            p.closing = true;
            self.shared.wake.notify_one();
        }
        if let Some(h) = self.committer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn committer_loop(shared: Arc<Shared>, config: JournalConfig, hooks: Arc<dyn CommitHooks>) {
    let mut checkpoint: Option<std::thread::JoinHandle<Result<(), JournalError>>> = None;
    loop {
        let (closing, switch_at) = {
            let mut p = shared.pending.lock();
            if !p.requested && !p.closing {
                shared.wake.wait_for(&mut p, config.commit_interval);
            }
            p.requested = false;
            (p.closing, p.switch_at)
        };
        if shared.durable.borrow().error.is_some() {
            // A checkpoint waiting for its switch hears of the failure.
            let mut p = shared.pending.lock();
            p.switch_at = None;
            shared.switched.notify_all();
            drop(p);
            if closing {
                if let Some(h) = checkpoint.take() {
                    let _ = h.join();
                }
                return;
            }
            continue;
        }
        if let Some(cut) = switch_at {
            // The frames up to the checkpoint's cut go to the old
            // generation; the ones after it to the next, in the other region.
            match flush_pending(&shared, hooks.as_ref(), JournalSeq(cut)) {
                Ok(last) => {
                    if let Some(last) = last {
                        shared.publish(hooks.as_ref(), last);
                    }
                    shared.writer.lock().switch();
                }
                Err(e) => shared.fail(e),
            }
            let mut p = shared.pending.lock();
            p.switch_at = None;
            p.checkpointing = false;
            shared.switched.notify_all();
        }
        match flush_pending(&shared, hooks.as_ref(), JournalSeq(u64::MAX)) {
            Ok(Some(last)) => shared.publish(hooks.as_ref(), last),
            Ok(None) => shared.durable.send_modify(|_| {}),
            Err(e) => shared.fail(e),
        }
        if let Some(h) = checkpoint.take_if(|h| h.is_finished()) {
            let outcome = h.join().unwrap_or_else(|_| {
                Err(JournalError::Io {
                    op: "checkpoint",
                    message: "the checkpoint thread panicked".into(),
                })
            });
            // A checkpoint that failed before its cut leaves nothing to switch.
            shared.pending.lock().checkpointing = false;
            if let Err(e) = outcome {
                shared.fail(e);
            }
        }
        let write_pos = shared.writer.lock().write_pos;
        // Never a checkpoint of a generation with no frame: with a
        // threshold of 0, checkpoints would follow each other for ever.
        if checkpoint.is_none()
            && write_pos > config.checkpoint_bytes.max(FRAMES_START)
            && shared.durable.borrow().error.is_none()
        {
            // Nothing goes ahead from before the checkpoint takes its cut
            // until the committer has switched regions at it.
            shared.pending.lock().checkpointing = true;
            let (s, h) = (shared.clone(), hooks.clone());
            let spawned = std::thread::Builder::new()
                .name("keyturn-checkpoint".into())
                .spawn(move || {
                    let done = run_checkpoint(&s, h.as_ref());
                    // Wake the committer to collect it.
                    let mut p = s.pending.lock();
                    p.requested = true;
                    s.wake.notify_one();
                    drop(p);
                    done
                });
            match spawned {
                Ok(h) => checkpoint = Some(h),
                Err(e) => {
                    shared.pending.lock().checkpointing = false;
                    shared.fail(Writer::io("spawn checkpoint")(e));
                }
            }
        }
        if closing && checkpoint.is_none() && shared.pending.lock().frames.is_empty() {
            return;
        }
    }
}

/// Writes the pending frames up to `through` after making the data
/// devices durable. Returns the last sequence written, or `None` if no such
/// frame was pending. The caller records them durable
/// ([`Shared::note_durable`]), which also ends their time in flight.
fn flush_pending(
    shared: &Shared,
    hooks: &dyn CommitHooks,
    through: JournalSeq,
) -> Result<Option<JournalSeq>, JournalError> {
    let (ahead, frames) = shared.pending.lock().take_group(through.0);
    // Frames handed over by `commit_ahead` first: their waiters poll for
    // them alone, so they need not wait for this group's data sync.
    if !ahead.is_empty() {
        shared.writer.lock().write_frames(&ahead, true)?;
        let mut durable = 0;
        for f in &ahead {
            durable = shared.note_durable(None, Some(f.seq));
        }
        // The durable sequence moves if nothing below them was pending.
        hooks.durable(JournalSeq(durable));
        shared
            .durable
            .send_modify(|d| d.seq = d.seq.max(JournalSeq(durable)));
    }
    let last = ahead.iter().chain(&frames).map(|f| f.seq).max();
    let Some(last) = last.map(JournalSeq) else {
        return Ok(None);
    };
    if frames.is_empty() {
        return Ok(Some(last));
    }
    // A group of frames that point to no data (a flip alone) waits for no
    // one's data: what they depend on was made durable with the earlier
    // frames that recorded it. The writer is not held meanwhile, so a
    // frame can go ahead of this group.
    if frames.iter().any(|f| f.points_to_data) {
        hooks.sync_data().map_err(|e| JournalError::Io {
            op: "data sync",
            message: e.to_string(),
        })?;
    }
    shared.writer.lock().write_frames(&frames, false)?;
    Ok(Some(last))
}

#[cfg(test)]
mod ahead_tests;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod hostile;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::tag::Tag;
    use crate::ids::{Cbid, KeyVersion, Lba, Slot, VolumeId, ZoneId};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Hooks that count what the committer asks of them (shared with the
    /// other test modules of the journal).
    #[derive(Default)]
    pub(super) struct Hooks {
        syncs: AtomicU64,
        durable: AtomicU64,
        checkpoints: AtomicU64,
    }

    impl CommitHooks for Hooks {
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn durable(&self, seq: JournalSeq) {
            self.durable.store(seq.0, Ordering::SeqCst);
        }
        fn checkpoint(
            &self,
            journal: &mut dyn CheckpointJournal,
        ) -> Result<JournalSeq, JournalError> {
            self.checkpoints.fetch_add(1, Ordering::SeqCst);
            let seq = journal.last_appended();
            journal.flush_through(seq)?;
            Ok(seq)
        }
    }

    fn cfg() -> JournalConfig {
        JournalConfig {
            commit_interval: Duration::from_millis(5),
            commit_bytes: 1 << 20,
            checkpoint_bytes: 1 << 30,
        }
    }

    /// Like `cfg`, but checkpoints every 10 kB of frames.
    fn checkpointing_cfg() -> JournalConfig {
        JournalConfig {
            checkpoint_bytes: 10_000,
            ..cfg()
        }
    }

    fn sample(i: u64) -> Vec<Entry> {
        vec![
            Entry::Cb {
                zone: ZoneId(1),
                cbid: Cbid(i),
                record: CbRecord {
                    slot: Slot(i * 3),
                    key_version: KeyVersion(1),
                    refcount: 1,
                    tag: Tag([i as u8; 32]),
                    mac: 1 + (i % 3) as u32,
                    staged: (i % 2 == 1).then_some(StagedCopy {
                        slot: Slot(i),
                        key_version: KeyVersion(2),
                    }),
                },
            },
            Entry::Flip {
                zone: ZoneId(1),
                to: KeyVersion(i as u32 + 2),
            },
            Entry::Rollback {
                zone: ZoneId(1),
                to: KeyVersion(i as u32 + 1),
            },
            Entry::Map {
                volume: VolumeId(2),
                lba: Lba(i),
                cbid: Some(Cbid(i)),
            },
            Entry::Map {
                volume: VolumeId(2),
                lba: Lba(i + 1000),
                cbid: None,
            },
            Entry::CbFree {
                zone: ZoneId(1),
                cbid: Cbid(i + 7),
            },
        ]
    }

    #[test]
    fn entries_round_trip() {
        let mut buf = Vec::new();
        for e in sample(5) {
            e.encode(&mut buf);
        }
        assert_eq!(Entry::decode_all(1, &buf).unwrap(), sample(5));
        assert!(Entry::decode_all(1, &[99]).is_err());
        assert!(Entry::decode_all(1, &buf[..buf.len() - 1]).is_err());
    }

    /// A commit of flips alone syncs no data device; one with any frame
    /// that points to data does, flips in the group or not.
    #[test]
    fn only_frames_that_point_to_data_wait_for_a_data_sync() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let hooks = Arc::new(Hooks::default());
        let config = JournalConfig {
            commit_interval: Duration::from_secs(3600),
            ..cfg()
        };
        let j = Journal::start(&p, JournalSeq(0), config, hooks.clone()).unwrap();
        let syncs = || hooks.syncs.load(Ordering::SeqCst);
        let flip = |to| Entry::Flip {
            zone: ZoneId(1),
            to: KeyVersion(to),
        };
        let write = |i: u64| sample(i).swap_remove(0);
        let base = syncs();
        let s = j.append(ZoneId(1), &[flip(2)]);
        let s = j.append(ZoneId(1), &[flip(3)]).max(s);
        j.commit_blocking(s).unwrap();
        assert_eq!(syncs(), base, "flips alone: no data sync");
        let s = j.append(ZoneId(1), &[write(1)]);
        let s = j.append(ZoneId(1), &[flip(4)]).max(s);
        j.commit_blocking(s).unwrap();
        assert_eq!(syncs(), base + 1, "a write before a flip: synced first");
        let s = j.append(ZoneId(1), &[flip(5), write(2)]);
        j.commit_blocking(s).unwrap();
        assert_eq!(syncs(), base + 2, "a write in the flip's frame: synced");
        j.close();
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.frames.len(), 5, "every frame was written");
    }

    /// The file is grown ahead of the frames with zeros written, so later
    /// commits overwrite allocated blocks and leave its length alone; the
    /// zeros never replay as frames.
    #[test]
    fn commits_overwrite_a_file_grown_ahead_with_zeros() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let j = Journal::start(&p, JournalSeq(0), cfg(), Arc::new(Hooks::default())).unwrap();
        let s = j.append(ZoneId(1), &sample(1));
        j.commit_blocking(s).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), GROW_AHEAD, "grown ahead in one step");
        assert!(
            m.blocks() * 512 >= GROW_AHEAD - FRAMES_START,
            "the zeros are written, not a hole: {} blocks",
            m.blocks()
        );
        for i in 2..=20 {
            let s = j.append(ZoneId(1), &sample(i));
            j.commit_blocking(s).unwrap();
        }
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            GROW_AHEAD,
            "overwritten in place"
        );
        j.close();
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.frames.len(), 20);
        assert_eq!(r.damaged_frames_after, 0, "the zeros are no damage");
    }

    #[test]
    fn replay_returns_committed_frames_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let hooks = Arc::new(Hooks::default());
        let j = Journal::start(&p, JournalSeq(0), cfg(), hooks.clone()).unwrap();
        let mut last = JournalSeq(0);
        for i in 1..=50 {
            last = j.append(ZoneId(1), &sample(i));
        }
        j.commit_blocking(last).unwrap();
        assert!(
            hooks.syncs.load(Ordering::SeqCst) >= 1,
            "data is synced before frames"
        );
        assert_eq!(hooks.durable.load(Ordering::SeqCst), 50);
        drop(j);
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.checkpoint_seq, JournalSeq(0));
        assert_eq!(r.frames.len(), 50);
        for (i, (seq, entries)) in r.frames.iter().enumerate() {
            assert_eq!(seq.0, i as u64 + 1);
            assert_eq!(entries, &sample(i as u64 + 1));
        }
    }

    #[test]
    fn torn_tail_is_dropped_and_new_generation_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let j = Journal::start(&p, JournalSeq(0), cfg(), Arc::new(Hooks::default())).unwrap();
        for i in 1..=10 {
            j.append(ZoneId(1), &sample(i));
        }
        j.commit_blocking(JournalSeq(10)).unwrap();
        drop(j);
        // Corrupt one byte inside frame 7's payload.
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.frames.len(), 10);
        let frame_len = (FRAME_HEADER + {
            let mut b = Vec::new();
            sample(1).iter().for_each(|e| e.encode(&mut b));
            b.len()
        }) as u64;
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xAA], FRAMES_START + 6 * frame_len + 30)
            .unwrap();
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.frames.len(), 6, "replay stops at the torn frame");
        assert_eq!(
            r.damaged_frames_after, 3,
            "frames 8..10 are intact beyond the damage"
        );
        // Restart from seq 6: the new generation must not resurrect frames 8..10.
        let j = Journal::start(&p, JournalSeq(6), cfg(), Arc::new(Hooks::default())).unwrap();
        let s = j.append(ZoneId(1), &sample(100));
        assert_eq!(s, JournalSeq(7));
        j.commit_blocking(s).unwrap();
        drop(j);
        let r = Journal::read(&p).unwrap();
        assert_eq!(r.checkpoint_seq, JournalSeq(6));
        assert_eq!(r.frames.len(), 1);
        assert_eq!(r.frames[0].1, sample(100));
    }

    #[test]
    fn checkpoint_starts_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let hooks = Arc::new(Hooks::default());
        let config = checkpointing_cfg();
        let j = Journal::start(&p, JournalSeq(0), config, hooks.clone()).unwrap();
        let mut last = JournalSeq(0);
        for i in 1..=200 {
            last = j.append(ZoneId(1), &sample(i));
            if i % 20 == 0 {
                j.commit_blocking(last).unwrap();
            }
        }
        j.commit_blocking(last).unwrap();
        drop(j);
        // One checkpoint at start, and more as the file grew past 10 kB.
        assert!(hooks.checkpoints.load(Ordering::SeqCst) >= 3);
        let r = Journal::read(&p).unwrap();
        let replayed_to = r.frames.last().map_or(r.checkpoint_seq, |f| f.0);
        assert_eq!(replayed_to, JournalSeq(200));
        assert!(r.checkpoint_seq.0 > 0);
    }

    /// Hooks whose checkpoint lets a frame be appended after it took its
    /// sequence and before it flushed, as the pool's does.
    #[derive(Default)]
    struct LateAppendHooks {
        inner: Hooks,
        journal: Mutex<Option<Arc<Journal>>>,
    }

    impl CommitHooks for LateAppendHooks {
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.inner.sync_data()
        }
        fn durable(&self, seq: JournalSeq) {
            self.inner.durable(seq)
        }
        fn checkpoint(
            &self,
            journal: &mut dyn CheckpointJournal,
        ) -> Result<JournalSeq, JournalError> {
            self.inner.checkpoints.fetch_add(1, Ordering::SeqCst);
            let seq = journal.last_appended();
            if let Some(j) = self.journal.lock().as_ref() {
                // The test thread may append too, so only "after".
                let late = j.append(ZoneId(1), &sample(9999));
                assert!(late > seq);
            }
            journal.flush_through(seq)?;
            Ok(seq)
        }
    }

    #[test]
    fn frames_appended_during_a_checkpoint_go_to_the_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        Journal::create(&p).unwrap();
        let hooks = Arc::new(LateAppendHooks::default());
        let config = checkpointing_cfg();
        let j = Arc::new(Journal::start(&p, JournalSeq(0), config, hooks.clone()).unwrap());
        *hooks.journal.lock() = Some(j.clone());
        for i in 1..=200 {
            let last = j.append(ZoneId(1), &sample(i));
            if i % 20 == 0 {
                j.commit_blocking(last).unwrap();
            }
        }
        *hooks.journal.lock() = None;
        // The frames the checkpoints appended count too. A checkpoint that
        // lost frames would leave this waiting for ever: bounded.
        let last = j.last_appended();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = j.clone();
        let thread = std::thread::spawn(move || tx.send(waiter.commit_blocking(last)));
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the last frame never became durable")
            .unwrap();
        thread.join().unwrap().ok();
        assert!(hooks.inner.checkpoints.load(Ordering::SeqCst) >= 3);
        assert!(last.0 > 200, "the checkpoints appended frames");
        drop(Arc::into_inner(j).expect("only reference"));
        // A frame appended after the checkpoint's sequence but written into
        // the old generation would be gone with it.
        let r = Journal::read(&p).unwrap();
        let replayed_to = r.frames.last().map_or(r.checkpoint_seq, |f| f.0);
        assert_eq!(replayed_to, last);
        for ((seq, _), expect) in r.frames.iter().zip(r.checkpoint_seq.0 + 1..) {
            assert_eq!(seq.0, expect, "frames after the checkpoint are contiguous");
        }
    }
}
