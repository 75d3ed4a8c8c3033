//! Zone change streams: every committed write, trim and write-zeroes of a
//! streaming zone becomes a sealed record in the zone's stream, in commit
//! order (see `../shared/DESIGN.md`, "The way a change travels to a
//! replica").
//!
//! The write path hands each change to [`ZoneStream::committed`] while the
//! journal's append lock is held (a queue push and a copy it made before
//! its zone lock). A writer thread seals the queue's records under their
//! window keys (a block the current window already carried goes as a
//! reference) and appends them to the segment log. The committer's data
//! sync calls [`ZoneStream::sync`] before any frame is written, so a record
//! is durable no later than the write it describes (invariant 10). A record
//! is served only once its journal frame is durable, and recovery cuts
//! records whose frames were lost, so a replica never sees a write that the
//! source itself lost in a crash.

pub mod grant;
pub mod keyset;
pub mod log;
pub mod nats;
pub mod record;
pub mod serve;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::crypto::tag::Tag;
use crate::crypto::wipe::Wiped;
use crate::ids::{BLOCK_SIZE, JournalSeq, Lba, VolumeId, ZoneId};
use crate::keys::KeyError;
use crate::zone::change::{ChangeSink, ZoneChange};
use keyset::{KeySets, SetWrapping};
use log::{FrameReader, SegmentLog};
use record::{BlockRef, Body, Header, Op, StreamId, WindowId};

/// Errors of a zone stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Segment or state file I/O.
    #[error("stream of zone {zone}: {op}: {source}")]
    Io {
        /// Zone name.
        zone: String,
        /// What was being done.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Key sets.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The stream stopped recording after an error; it needs a resync.
    #[error("stream of zone {zone} is broken: {reason}")]
    Broken {
        /// Zone name.
        zone: String,
        /// What broke it.
        reason: String,
    },
    /// A bad record.
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

/// Stream settings (`[stream]` in pool.toml).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Length of a key set, seconds (a day).
    pub set_secs: u64,
    /// Length of a window, seconds (an hour).
    pub window_secs: u64,
    /// Stream bytes kept at most, per zone.
    pub retention_mib: u64,
    /// Records kept at most this long, seconds.
    pub retention_secs: u64,
    /// Archived key sets are destroyed this long after their last window.
    pub key_retention_secs: u64,
    /// Size of a segment file.
    pub segment_mib: u64,
    /// Records queued but not yet sealed, at most (writers wait beyond it).
    pub backlog_mib: u64,
    /// Address the stream listener binds (empty: no listener).
    pub listen: String,
    /// Publishing to NATS JetStream (`[stream.nats]`).
    pub nats: nats::NatsSettings,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            set_secs: 86_400,
            window_secs: 3_600,
            retention_mib: 4096,
            retention_secs: 7 * 86_400,
            key_retention_secs: 30 * 86_400,
            segment_mib: 64,
            backlog_mib: 256,
            listen: String::new(),
            nats: nats::NatsSettings::default(),
        }
    }
}

/// Unix milliseconds now. The one place a stream reads the clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `streams/zone-<id>/state.json`: the stream's identity, its open count,
/// and what each registered consumer acknowledged.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    stream_id: String,
    epoch: u32,
    #[serde(default)]
    acked: std::collections::BTreeMap<String, u64>,
}

enum Item {
    Change(ZoneChange),
    Volume {
        id: VolumeId,
        name: String,
        size: Option<u64>,
    },
}

struct Queued {
    seq: u64,
    jseq: u64,
    time_ms: u64,
    item: Item,
}

#[derive(Default)]
struct Queue {
    next_seq: u64,
    items: VecDeque<Queued>,
    bytes: usize,
    stopping: bool,
}

/// The writer's view: log and what the current window carried.
struct Writing {
    log: SegmentLog,
    dedup_window: Option<WindowId>,
    carried: HashMap<Tag, (u64, u32)>,
    /// (journal seq, stream seq) written but not yet visible.
    unseen: VecDeque<(u64, u64)>,
    last_housekeeping: Instant,
    state_dirty: bool,
}

/// Counters for status and metrics.
#[derive(Default, Debug)]
pub struct StreamStats {
    /// Records written.
    pub records: AtomicU64,
    /// Logical bytes the records describe (blocks written x 4 KiB).
    pub logical_bytes: AtomicU64,
    /// Bytes of records written (what crosses the wire).
    pub record_bytes: AtomicU64,
    /// Blocks sent as a reference to an earlier record.
    pub referenced_blocks: AtomicU64,
    /// Blocks sent as payload.
    pub payload_blocks: AtomicU64,
}

/// A streaming zone's stream.
pub struct ZoneStream {
    zone: ZoneId,
    zone_name: String,
    dir: PathBuf,
    id: StreamId,
    epoch: u32,
    settings: StreamSettings,
    queue: Mutex<Queue>,
    queued: Condvar,
    writing: Mutex<Writing>,
    /// Last sequence appended to the log, and its wake-up.
    written: Mutex<u64>,
    written_cv: Condvar,
    keys: Mutex<KeySets>,
    wrapping: Arc<dyn SetWrapping>,
    visible: tokio::sync::watch::Sender<u64>,
    durable_jseq: AtomicU64,
    broken: Mutex<Option<String>>,
    state: Mutex<State>,
    snapshot_nonce: AtomicU64,
    /// Key sets destroyed at the end of their retention, not yet audited.
    destroyed_sets: Mutex<Vec<u32>>,
    /// Positions reported by agents consuming through NATS.
    reported: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Counters.
    pub stats: StreamStats,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for ZoneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneStream")
            .field("zone", &self.zone_name)
            .field("id", &self.id.to_hex())
            .finish_non_exhaustive()
    }
}

/// Status of a zone stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamStatus {
    /// Zone name.
    pub zone: String,
    /// Stream id.
    pub stream_id: String,
    /// Oldest record kept.
    pub first_seq: u64,
    /// Last record served (durable).
    pub last_seq: u64,
    /// Bytes kept.
    pub bytes: u64,
    /// Records written since start.
    pub records: u64,
    /// Logical bytes written since start.
    pub logical_bytes: u64,
    /// Record bytes since start.
    pub record_bytes: u64,
    /// Blocks sent as references since start.
    pub referenced_blocks: u64,
    /// Blocks sent as payload since start.
    pub payload_blocks: u64,
    /// Acknowledged sequence per consumer.
    pub consumers: std::collections::BTreeMap<String, u64>,
    /// Sequence durable on each agent that consumes through NATS, as it
    /// last reported it (these hold no records: JetStream keeps them).
    #[serde(default)]
    pub nats_agents: std::collections::BTreeMap<String, u64>,
    /// Why the stream stopped recording, if it did.
    pub broken: Option<String>,
}

impl ZoneStream {
    /// The stream directory of `zone` in a pool.
    pub fn dir_of(pool_dir: &Path, zone: ZoneId) -> PathBuf {
        pool_dir.join("streams").join(format!("zone-{}", zone.0))
    }

    /// Opens (or creates) a zone's stream. `journal_durable` is the last
    /// journal frame recovery replayed: records beyond it are cut.
    pub fn open(
        pool_dir: &Path,
        zone: ZoneId,
        zone_name: &str,
        settings: &StreamSettings,
        journal_durable: JournalSeq,
        wrapping: Arc<dyn SetWrapping>,
    ) -> Result<Arc<Self>, StreamError> {
        let dir = Self::dir_of(pool_dir, zone);
        let io = |op: &'static str| {
            let zone = zone_name.to_string();
            move |source| StreamError::Io { zone, op, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("create directory"))?;
        let state_path = dir.join("state.json");
        let mut state: State = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StreamError::Io {
                zone: zone_name.into(),
                op: "read state.json",
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                stream_id: StreamId::generate().to_hex(),
                ..State::default()
            },
            Err(e) => return Err(io("read state.json")(e)),
        };
        let id = StreamId::from_hex(&state.stream_id).ok_or_else(|| StreamError::Io {
            zone: zone_name.into(),
            op: "read state.json",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "bad stream id"),
        })?;
        // A fresh epoch, durable before any record of this open is sealed:
        // nonces are (epoch, seq), and a crash may have cut seqs that will
        // be reused.
        state.epoch = state
            .epoch
            .checked_add(1)
            .filter(|e| *e < 1 << 31)
            .ok_or_else(|| StreamError::Broken {
                zone: zone_name.into(),
                reason: "the stream was opened 2^31 times; start a new stream".into(),
            })?;
        crate::pool::write_atomic(
            &state_path,
            &serde_json::to_vec_pretty(&state).expect("plain data"),
        )
        .map_err(|e| StreamError::Broken {
            zone: zone_name.into(),
            reason: e.to_string(),
        })?;
        let (log, report) = SegmentLog::open(&dir, journal_durable.0, settings.segment_mib << 20)
            .map_err(io("open segments"))?;
        if report.unjournaled > 0 || report.torn {
            tracing::warn!(
                zone = zone_name,
                unjournaled = report.unjournaled,
                torn = report.torn,
                "stream: cut records whose writes did not survive the crash"
            );
        }
        let keys_dir = pool_dir.join("keys");
        let keys = KeySets::open(
            &KeySets::path(&keys_dir, zone),
            zone,
            settings.set_secs,
            settings.window_secs,
            wrapping.as_ref(),
        )?;
        let last = log.last_seq();
        let (visible, _) = tokio::sync::watch::channel(last);
        let stream = Arc::new(Self {
            zone,
            zone_name: zone_name.into(),
            dir,
            id,
            epoch: state.epoch,
            settings: settings.clone(),
            queue: Mutex::new(Queue {
                next_seq: last + 1,
                ..Queue::default()
            }),
            queued: Condvar::new(),
            writing: Mutex::new(Writing {
                log,
                dedup_window: None,
                carried: HashMap::new(),
                unseen: VecDeque::new(),
                last_housekeeping: Instant::now(),
                state_dirty: false,
            }),
            written: Mutex::new(last),
            written_cv: Condvar::new(),
            keys: Mutex::new(keys),
            wrapping,
            visible,
            durable_jseq: AtomicU64::new(journal_durable.0),
            broken: Mutex::new(None),
            state: Mutex::new(state),
            snapshot_nonce: AtomicU64::new(0),
            destroyed_sets: Mutex::new(Vec::new()),
            reported: Mutex::new(Default::default()),
            stats: StreamStats::default(),
            stopped: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        stream.prepare_keys(now_ms())?;
        let s = stream.clone();
        let handle = std::thread::Builder::new()
            .name(format!("keyturn-stream-{}", zone.0))
            .spawn(move || s.writer_loop())
            .map_err(io("spawn writer"))?;
        *stream.thread.lock() = Some(handle);
        Ok(stream)
    }

    /// Zone id.
    pub fn zone(&self) -> ZoneId {
        self.zone
    }

    /// Zone name.
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// Stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The key sets (for listing, grants and shredding).
    pub fn keys(&self) -> &Mutex<KeySets> {
        &self.keys
    }

    /// The wrapping the key sets use.
    pub fn wrapping(&self) -> &dyn SetWrapping {
        self.wrapping.as_ref()
    }

    /// Makes the key sets of `ms` and of the window after it exist.
    fn prepare_keys(&self, ms: u64) -> Result<(), KeyError> {
        let mut keys = self.keys.lock();
        let now = keys.window_at(ms).set;
        let soon = keys.window_at(ms + keys.window_secs() * 1000).set;
        keys.ensure(now, self.wrapping.as_ref())?;
        keys.ensure(soon, self.wrapping.as_ref())?;
        Ok(())
    }

    /// Queues a volume's creation (`size`) or deletion (`None`), then makes
    /// it durable and visible. The caller has committed the journal first,
    /// so no record before it can still be cut by a crash.
    pub fn volume_changed(
        &self,
        id: VolumeId,
        name: &str,
        size: Option<u64>,
    ) -> Result<(), StreamError> {
        self.push(
            0,
            Item::Volume {
                id,
                name: name.into(),
                size,
            },
        );
        self.sync()?;
        let d = self.durable_jseq.load(Ordering::Acquire);
        self.advance(d);
        Ok(())
    }

    fn push(&self, jseq: u64, item: Item) {
        let bytes = match &item {
            Item::Change(ZoneChange::Write { plain, .. }) => plain.len(),
            _ => 64,
        };
        let mut q = self.queue.lock();
        let seq = q.next_seq;
        q.next_seq += 1;
        q.bytes += bytes;
        q.items.push_back(Queued {
            seq,
            jseq,
            time_ms: now_ms(),
            item,
        });
        self.queued.notify_one();
    }

    /// Makes every record queued so far durable. The committer calls it
    /// before it writes journal frames.
    pub fn sync(&self) -> Result<(), StreamError> {
        let target = self.queue.lock().next_seq - 1;
        {
            let mut w = self.written.lock();
            while *w < target {
                if self.broken.lock().is_some() || self.stopped.load(Ordering::Acquire) {
                    break;
                }
                self.written_cv.wait_for(&mut w, Duration::from_millis(50));
            }
        }
        if self.broken.lock().is_some() {
            // A broken stream records nothing more; the data path goes on.
            return Ok(());
        }
        // The writer goes on appending while the file syncs.
        let file = self.writing.lock().log.sync_handle();
        crate::store::durable::sync_data(&file).map_err(|source| StreamError::Io {
            zone: self.zone_name.clone(),
            op: "sync",
            source,
        })
    }

    /// Frames through `jseq` are durable: their records may be served.
    pub fn durable(&self, jseq: JournalSeq) {
        self.durable_jseq.fetch_max(jseq.0, Ordering::AcqRel);
        self.advance(jseq.0);
    }

    fn advance(&self, jseq: u64) {
        let mut w = self.writing.lock();
        let mut last = None;
        while let Some(&(j, s)) = w.unseen.front() {
            if j > jseq {
                break;
            }
            last = Some(s);
            w.unseen.pop_front();
        }
        drop(w);
        if let Some(s) = last {
            self.visible.send_if_modified(|v| {
                let changed = s > *v;
                *v = (*v).max(s);
                changed
            });
        }
    }

    /// The last record that may be served, and its changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.visible.subscribe()
    }

    /// Last record that may be served.
    pub fn last_visible(&self) -> u64 {
        *self.visible.borrow()
    }

    /// Oldest record kept.
    pub fn first_kept(&self) -> u64 {
        self.writing.lock().log.first_seq()
    }

    /// Why the stream stopped recording, if it did.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().clone()
    }

    /// Reads records `from..=to` (at most `max_bytes` of them, at least
    /// one), in order. Fails if `from` is no longer kept.
    pub fn read(
        &self,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Vec<bytes::Bytes>, StreamError> {
        self.read_at(&mut None, from, to, max_bytes)
    }

    /// [`read`](Self::read) that goes on from where `cursor` stopped when
    /// `from` is its next record: a consumer following the stream reads
    /// each segment once, instead of from its start for every batch.
    pub fn read_at(
        &self,
        cursor: &mut Option<Cursor>,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Vec<bytes::Bytes>, StreamError> {
        let io = |op: &'static str| {
            let zone = self.zone_name.clone();
            move |source| StreamError::Io { zone, op, source }
        };
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let mut c = match cursor.take() {
            Some(c) if c.next == from => c,
            _ => {
                let Some(seg) = self.writing.lock().log.locate(from) else {
                    return Err(StreamError::Broken {
                        zone: self.zone_name.clone(),
                        reason: format!("record {from} is not kept"),
                    });
                };
                Cursor {
                    reader: FrameReader::open(&seg.path).map_err(io("open segment"))?,
                    path: seg.path,
                    next: seg.first,
                }
            }
        };
        let mut bytes = 0;
        // Never read past `to`: records after it may be half written.
        while c.next <= to && bytes < max_bytes {
            let Some(rec) = c.reader.next_record().map_err(io("read segment"))? else {
                // The rest is in the next segment, if it is kept.
                match self.writing.lock().log.locate(c.next) {
                    Some(s) if s.path != c.path => {
                        c.reader = FrameReader::open(&s.path).map_err(io("open segment"))?;
                        c.path = s.path;
                        continue;
                    }
                    _ => break,
                }
            };
            let seq = u64::from_le_bytes(rec[24..32].try_into().expect("header"));
            if seq != c.next {
                break;
            }
            c.next += 1;
            if seq < from {
                continue;
            }
            bytes += rec.len();
            out.push(bytes::Bytes::from(rec));
        }
        *cursor = Some(c);
        Ok(out)
    }

    /// Records a consumer's acknowledged sequence (retention keeps what the
    /// slowest registered consumer still needs, within the hard limits).
    pub fn ack(&self, consumer: &str, seq: u64) {
        let mut st = self.state.lock();
        let e = st.acked.entry(consumer.to_string()).or_insert(0);
        if *e != seq {
            *e = seq;
            self.writing.lock().state_dirty = true;
        }
    }

    /// Records the position an agent consuming through NATS reports. It
    /// holds no records here: JetStream keeps them for such agents.
    pub fn report_position(&self, agent: &str, seq: u64) {
        let seq = seq.min(self.last_visible());
        self.reported.lock().insert(agent.to_string(), seq);
    }

    /// Forgets a consumer (its acknowledgements no longer hold records).
    pub fn forget_consumer(&self, consumer: &str) {
        self.state.lock().acked.remove(consumer);
        self.writing.lock().state_dirty = true;
    }

    /// Key sets destroyed since the last call, for the audit log.
    pub fn take_destroyed_sets(&self) -> Vec<u32> {
        std::mem::take(&mut *self.destroyed_sets.lock())
    }

    /// The settings the stream was opened with.
    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// Status.
    pub fn status(&self) -> StreamStatus {
        let (first, bytes) = {
            let w = self.writing.lock();
            (w.log.first_seq(), w.log.bytes())
        };
        StreamStatus {
            zone: self.zone_name.clone(),
            stream_id: self.id.to_hex(),
            first_seq: first,
            last_seq: self.last_visible(),
            bytes,
            records: self.stats.records.load(Ordering::Relaxed),
            logical_bytes: self.stats.logical_bytes.load(Ordering::Relaxed),
            record_bytes: self.stats.record_bytes.load(Ordering::Relaxed),
            referenced_blocks: self.stats.referenced_blocks.load(Ordering::Relaxed),
            payload_blocks: self.stats.payload_blocks.load(Ordering::Relaxed),
            consumers: self.state.lock().acked.clone(),
            nats_agents: self.reported.lock().clone(),
            broken: self.broken(),
        }
    }

    /// Seals a snapshot chunk (a full-sync copy of blocks, not a stream
    /// record): a write record flagged by its epoch's top bit, numbered by
    /// its own counter, so its nonces never meet a record's.
    pub fn seal_snapshot(
        &self,
        volume: VolumeId,
        first: Lba,
        tags: &[Option<Tag>],
        plain: &[u8],
    ) -> Result<Vec<u8>, StreamError> {
        let time_ms = now_ms();
        let keys = self.keys.lock();
        let window = keys.window_at(time_ms);
        let key = keys.key(window).ok_or_else(|| StreamError::Broken {
            zone: self.zone_name.clone(),
            reason: format!("no key for window {}", record::key_id(self.zone.0, window)),
        })?;
        let mut payload = Wiped::with_capacity(plain.len());
        let blocks: Vec<BlockRef> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                None => BlockRef::Zero,
                Some(t) => {
                    payload.extend_from_slice(&plain[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                    BlockRef::Payload(*t)
                }
            })
            .collect();
        let header = Header {
            op: Op::Write,
            stream: self.id,
            seq: self.snapshot_nonce.fetch_add(1, Ordering::Relaxed) + 1,
            journal_seq: 0,
            time_ms,
            window,
            epoch: self.epoch | 1 << 31,
            volume,
            lba: first,
            count: tags.len() as u32,
        };
        Ok(record::seal(
            &header,
            &Body::Write(blocks),
            &payload,
            key.expose(),
        ))
    }

    /// Stops the writer after it has written everything queued.
    pub fn stop(&self) {
        {
            let mut q = self.queue.lock();
            q.stopping = true;
            self.queued.notify_one();
        }
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
        self.stopped.store(true, Ordering::Release);
        let _ = self.writing.lock().log.sync();
        self.save_state();
    }

    fn save_state(&self) {
        let st = self.state.lock().clone();
        if let Err(e) = crate::pool::write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(&st).expect("plain data"),
        ) {
            tracing::warn!(zone = %self.zone_name, error = %e, "stream: cannot save consumer state");
        }
    }

    fn break_with(&self, reason: String) {
        tracing::error!(zone = %self.zone_name, %reason,
            "stream stopped recording; replicas of this zone need a full resync");
        *self.broken.lock() = Some(reason);
        self.written_cv.notify_all();
    }

    fn writer_loop(self: Arc<Self>) {
        loop {
            let (items, stopping) = {
                let mut q = self.queue.lock();
                if q.items.is_empty() && !q.stopping {
                    self.queued.wait_for(&mut q, Duration::from_millis(500));
                }
                q.bytes = 0;
                (std::mem::take(&mut q.items), q.stopping)
            };
            if !items.is_empty() {
                if self.broken.lock().is_some() {
                    // Keep sequence numbers moving so sync() never waits.
                    let last = items.back().map(|i| i.seq).unwrap_or(0);
                    *self.written.lock() = last;
                    self.written_cv.notify_all();
                } else if let Err(e) = self.write_batch(items) {
                    self.break_with(e.to_string());
                }
            }
            self.housekeeping();
            if stopping && self.queue.lock().items.is_empty() {
                return;
            }
        }
    }

    fn write_batch(&self, items: VecDeque<Queued>) -> Result<(), StreamError> {
        let mut sealed = Vec::with_capacity(items.len());
        let mut seen = Vec::with_capacity(items.len());
        let mut w = self.writing.lock();
        for it in items {
            let window = {
                let keys = self.keys.lock();
                keys.window_at(it.time_ms)
            };
            if self.keys.lock().key(window).is_none() {
                self.prepare_keys(it.time_ms)?;
            }
            if w.dedup_window != Some(window) {
                w.dedup_window = Some(window);
                w.carried.clear();
                // Get the next set ready before it is needed.
                if let Err(e) = self.prepare_keys(it.time_ms) {
                    tracing::warn!(zone = %self.zone_name, error = %e, "stream: cannot prepare the next key set yet");
                }
            }
            let (header_base, body, picked) = self.build(&mut w, &it, window);
            // Every block as payload (new data): seal straight from the copy
            // the write made instead of copying it once more.
            let payload: &[u8] = match (&picked, &it.item) {
                (None, Item::Change(ZoneChange::Write { plain, .. })) => plain,
                (Some(p), _) => p,
                (None, _) => &[],
            };
            let keys = self.keys.lock();
            let key = keys.key(window).ok_or_else(|| StreamError::Broken {
                zone: self.zone_name.clone(),
                reason: format!(
                    "window key {} is {}",
                    record::key_id(self.zone.0, window),
                    keys.missing_reason(window)
                ),
            })?;
            let bytes = record::seal(&header_base, &body, payload, key.expose());
            drop(keys);
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            self.stats
                .record_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            seen.push((it.jseq, it.seq));
            sealed.push(bytes);
        }
        w.log.append(&sealed).map_err(|source| StreamError::Io {
            zone: self.zone_name.clone(),
            op: "append",
            source,
        })?;
        w.unseen.extend(seen.iter().copied());
        let last = seen.last().map(|s| s.1);
        drop(w);
        if let Some(last) = last {
            *self.written.lock() = last;
            self.written_cv.notify_all();
        }
        // Records not tied to a frame become visible as soon as written
        // and everything before them is.
        self.advance(self.durable_jseq.load(Ordering::Acquire));
        Ok(())
    }

    /// The record's header and body, and its payload when it is not the
    /// write's blocks whole (`None`: every block goes as payload).
    fn build(
        &self,
        w: &mut Writing,
        it: &Queued,
        window: WindowId,
    ) -> (Header, Body, Option<Wiped>) {
        let mut header = Header {
            op: Op::Write,
            stream: self.id,
            seq: it.seq,
            journal_seq: it.jseq,
            time_ms: it.time_ms,
            window,
            epoch: self.epoch,
            volume: VolumeId(0),
            lba: Lba(0),
            count: 0,
        };
        let mut picked = None;
        let body = match &it.item {
            Item::Change(ZoneChange::Write {
                volume,
                first,
                tags,
                plain,
            }) => {
                header.volume = *volume;
                header.lba = *first;
                header.count = tags.len() as u32;
                self.stats
                    .logical_bytes
                    .fetch_add((tags.len() * BLOCK_SIZE) as u64, Ordering::Relaxed);
                let mut blocks = Vec::with_capacity(tags.len());
                let mut carried = Vec::with_capacity(tags.len());
                for (i, t) in tags.iter().enumerate() {
                    let Some(t) = t else {
                        blocks.push(BlockRef::Zero);
                        continue;
                    };
                    let floor = w.log.recent_floor();
                    if let Some(&(seq, block)) = w.carried.get(t).filter(|(seq, _)| *seq >= floor) {
                        self.stats.referenced_blocks.fetch_add(1, Ordering::Relaxed);
                        blocks.push(BlockRef::Reference {
                            tag: *t,
                            seq,
                            block,
                        });
                    } else {
                        self.stats.payload_blocks.fetch_add(1, Ordering::Relaxed);
                        if w.carried.len() < MAX_CARRIED {
                            w.carried.insert(*t, (it.seq, i as u32));
                        }
                        carried.push(i);
                        blocks.push(BlockRef::Payload(*t));
                    }
                }
                if carried.len() < tags.len() {
                    let mut payload = Wiped::with_capacity(carried.len() * BLOCK_SIZE);
                    for i in carried {
                        payload.extend_from_slice(&plain[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                    }
                    picked = Some(payload);
                }
                Body::Write(blocks)
            }
            Item::Change(ZoneChange::Unmap { volume, runs, zero }) => {
                header.op = if *zero { Op::Zero } else { Op::Trim };
                header.volume = *volume;
                header.lba = runs.first().map(|r| r.0).unwrap_or(Lba(0));
                header.count = runs.iter().map(|r| r.1).sum();
                Body::Unmap(runs.clone())
            }
            Item::Volume { id, name, size } => {
                header.volume = *id;
                match size {
                    Some(size) => {
                        header.op = Op::VolumeCreated;
                        Body::VolumeCreated {
                            name: name.clone(),
                            size: *size,
                        }
                    }
                    None => {
                        header.op = Op::VolumeDeleted;
                        Body::VolumeDeleted { name: name.clone() }
                    }
                }
            }
        };
        (header, body, picked)
    }

    /// Retention, key set ageing and consumer state, every few seconds.
    fn housekeeping(&self) {
        let mut w = self.writing.lock();
        if w.last_housekeeping.elapsed() < Duration::from_secs(2) {
            return;
        }
        w.last_housekeeping = Instant::now();
        let now = now_ms();
        let max_bytes = self.settings.retention_mib << 20;
        let max_age_ms = self.settings.retention_secs.saturating_mul(1000);
        let (min_acked, any) = {
            let st = self.state.lock();
            (
                st.acked.values().copied().min().unwrap_or(0),
                !st.acked.is_empty(),
            )
        };
        let visible = self.last_visible();
        let dropped = w.log.trim(|seg, total| {
            // Never what has not been served yet.
            seg.last <= visible
                && ((any && seg.last <= min_acked)
                    || total > max_bytes
                    || seg.last_time_ms.saturating_add(max_age_ms) < now)
        });
        match dropped {
            Ok(n) if n > 0 => {
                // A reference must point at a record still kept.
                let first = w.log.first_seq();
                w.carried.retain(|_, (seq, _)| *seq >= first);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(zone = %self.zone_name, error = %e, "stream: retention failed")
            }
        }
        let dirty = std::mem::take(&mut w.state_dirty);
        drop(w);
        if dirty {
            self.save_state();
        }
        let destroyed = self
            .keys
            .lock()
            .age(now / 1000, self.settings.key_retention_secs);
        match destroyed {
            Ok(sets) => {
                for &set in &sets {
                    tracing::info!(zone = %self.zone_name, set, "stream key set destroyed at the end of its retention");
                }
                self.destroyed_sets.lock().extend(sets);
            }
            Err(e) => {
                tracing::warn!(zone = %self.zone_name, error = %e, "stream: key set ageing failed")
            }
        }
    }
}

/// Where a reader of the stream is: a segment open at record `next`.
pub struct Cursor {
    path: PathBuf,
    reader: FrameReader,
    next: u64,
}

/// Distinct blocks a window remembers for wire dedup (48 bytes each).
const MAX_CARRIED: usize = 1 << 20;

impl ChangeSink for ZoneStream {
    fn committed(&self, jseq: JournalSeq, change: ZoneChange) {
        self.push(jseq.0, Item::Change(change));
    }

    fn has_room(&self) -> bool {
        self.queue.lock().bytes < (self.settings.backlog_mib << 20) as usize
    }
}

impl Drop for ZoneStream {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
    }
}
