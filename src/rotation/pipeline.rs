//! The re-encryption pipeline, shared by staging (before the flip) and
//! migration (after it): pick → read → decrypt/verify/encrypt → write →
//! record, one thread per stage, joined by bounded channels so a slow stage
//! holds the others back (back-pressure) and memory stays bounded.
//!
//! Every block is decrypted and its tag checked before its new copy is
//! written, so the pipeline is also the verifier of what it moves. The
//! record stage changes a content block only if its record is exactly the
//! one the pick stage saw: a block rewritten, freed or moved meanwhile is
//! skipped and its new slot given back, so the pipeline never races a
//! foreground write into a wrong map. It never overwrites a slot a durable
//! record points to: new copies go to freshly allocated slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use futures::future::join_all;
use zeroize::Zeroize;

use crate::crypto::tag::Tag;
use crate::ids::{BLOCK_SIZE, Cbid, KeyVersion, Slot};
use crate::store::Storage;
use crate::store::device::AlignedBuf;
use crate::store::journal::{CbRecord, Entry, Journal, LiveCopy, Place, StagedCopy};
use crate::volume::{Freed, free_slots_after};
use crate::zone::Zone;

use super::throttle::Throttle;

/// Reader and writer threads per pipeline (batches in flight on the devices).
const IO_THREADS: usize = 3;

/// What the pipeline does to each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Put a copy under the window's next key on the staging device.
    Stage {
        /// The next DEK version.
        next: KeyVersion,
    },
    /// Move the block under the active key to a new data-device slot
    /// (re-encrypting, or destaging a staged copy as it is).
    Migrate {
        /// The active DEK version.
        active: KeyVersion,
    },
}

/// Counters shared with the status report.
#[derive(Default)]
pub struct Counters {
    /// Blocks given a staged copy by the pipeline in this window.
    pub staged: AtomicU64,
    /// Blocks moved under the active key since the flip (this server run).
    /// Added under the zone's block-map lock, with the records, so a status
    /// read under that lock sees this count and the blocks left agree.
    pub migrated: AtomicU64,
    /// Blocks decrypted and encrypted again under another key.
    pub reencrypted: AtomicU64,
    /// Blocks copied from staging to the data device without re-encryption.
    pub destaged: AtomicU64,
    /// Read, write or integrity errors met.
    pub errors: AtomicU64,
    /// Bytes processed (for the rate).
    pub bytes: AtomicU64,
    /// The last error, for the status.
    pub last_error: parking_lot::Mutex<Option<String>>,
    /// Blocks the MAC re-tag pass found damaged (this server run).
    pub retag_errors: AtomicU64,
    /// Those blocks, not tried again until a restart.
    pub retag_failed: parking_lot::Mutex<rustc_hash::FxHashSet<Cbid>>,
    /// When this cycle's steps happened (this server run only).
    pub timeline: parking_lot::Mutex<Timeline>,
    /// Set while the device written to is out of space.
    pub space: super::space::SpaceWait,
}

/// How long the steps of the current or last rotation took, measured by
/// the server itself (the status reports them; a benchmark polling the
/// status from outside would add its own polling delay).
#[derive(Default, Clone, Copy, Debug)]
pub struct Timeline {
    /// When the window opened.
    pub window_opened: Option<Instant>,
    /// From the window opening to the first moment every content block had
    /// a staged copy.
    pub staged_all: Option<Duration>,
    /// When the flip record was durable.
    pub flipped: Option<Instant>,
    /// From the flip to the migration's records being durable.
    pub migrated: Option<Duration>,
    /// When the running phase began in this server run (the window
    /// opening, the flip, or the server's start for a phase already under
    /// way), and [`Counters::bytes`] then: its rate is over its own time.
    pub phase_start: Option<(Instant, u64)>,
    /// The phase's own time and bytes once its work was first all done
    /// (everything staged, or the migration complete).
    pub phase_done: Option<(Duration, u64)>,
}

impl Timeline {
    /// A phase that begins now, with the byte counter at `bytes`.
    pub fn starting(bytes: u64) -> Self {
        Self {
            phase_start: Some((Instant::now(), bytes)),
            ..Self::default()
        }
    }

    /// Records, once, that the running phase has done all its work, with
    /// the byte counter at `bytes`.
    pub fn phase_finished(&mut self, bytes: u64) {
        if self.phase_done.is_none()
            && let Some((start, b0)) = self.phase_start
        {
            self.phase_done = Some((start.elapsed(), bytes.saturating_sub(b0)));
        }
    }

    /// Bytes per second of the running phase: over its own time, up to
    /// now while it works (`done` false), and up to the moment its work
    /// was done after that. 0 when unknown.
    pub fn phase_rate(&self, bytes: u64, done: bool) -> f64 {
        let (secs, moved) = match (self.phase_done, self.phase_start) {
            (Some((d, b)), _) if done => (d.as_secs_f64(), b),
            (_, Some((start, b0))) if !done => {
                (start.elapsed().as_secs_f64(), bytes.saturating_sub(b0))
            }
            _ => return 0.0,
        };
        if secs > 0.0 { moved as f64 / secs } else { 0.0 }
    }
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %what, "rotation pipeline");
        *self.last_error.lock() = Some(what);
    }
}

/// What a pipeline run needs.
pub struct Context {
    /// The zone.
    pub zone: Arc<Zone>,
    /// Devices and allocators.
    pub storage: Arc<Storage>,
    /// The pool's journal.
    pub journal: Arc<Journal>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Set to stop at the next batch.
    pub stop: Arc<AtomicBool>,
    /// Blocks whose staged copy failed: read their data copy instead.
    pub avoid_staged: Arc<parking_lot::Mutex<rustc_hash::FxHashSet<Cbid>>>,
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every picked block was handled (some may have been skipped).
    Done,
    /// Stopped by the stop flag.
    Stopped,
    /// The staging area has no room left for the pipeline.
    StagingFull,
}

/// One block in flight.
struct Item {
    cbid: Cbid,
    record: CbRecord,
    src: LiveCopy,
    dst: Slot,
    ok: bool,
}

/// A batch in flight.
struct Job {
    items: Vec<Item>,
    /// Runs of items whose sources are consecutive slots on one device.
    src_runs: Vec<(usize, usize)>,
    src_bufs: Vec<AlignedBuf>,
    /// Runs of items whose destinations are consecutive slots.
    dst_runs: Vec<(usize, usize)>,
    dst_bufs: Vec<AlignedBuf>,
    /// Write the re-encrypted copies past the page cache (see `write_stage`).
    uncached: bool,
    /// The zone had no foreground I/O when the job was picked: read the
    /// sources past the page cache. Measured on a 1 GiB zone whose data was
    /// not cached, staging took 1.4-1.9 s against 2.5-3.0 s through the
    /// cache; under load, reads stay buffered, to hit what the foreground
    /// keeps cached.
    idle: bool,
}

fn runs_by(items: &[Item], key: impl Fn(&Item) -> (Place, u64)) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let (p, s) = key(it);
        match out.last_mut() {
            Some((start, len))
                if {
                    let (p0, s0) = key(&items[*start]);
                    p0 == p && s0 + *len as u64 == s
                } =>
            {
                *len += 1
            }
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Runs the pipeline over `batches` of candidate content blocks (best
/// first) until they are exhausted, the stop flag is set or, when staging,
/// the staging area is full. `throttle` paces the pick stage.
pub fn run(
    ctx: &Context,
    mode: Mode,
    batches: impl Iterator<Item = Vec<Cbid>>,
    throttle: &mut Throttle,
) -> Ended {
    let started = Instant::now();
    let meter = &Meter::default();
    let (to_read, read_rx) = bounded::<Job>(IO_THREADS);
    let (to_crypt, crypt_rx) = bounded::<Job>(IO_THREADS);
    let (to_write, write_rx) = bounded::<Job>(IO_THREADS);
    let (to_record, record_rx) = bounded::<Job>(IO_THREADS);
    let ended = std::thread::scope(|s| {
        // Several readers and writers: each waits for its batch's device I/O,
        // so one alone leaves the device idle between batches (O_DIRECT
        // staging writes are latency-bound).
        for _ in 0..IO_THREADS {
            let (rx, tx) = (read_rx.clone(), to_crypt.clone());
            s.spawn(move || read_stage(ctx, rx, tx, meter));
            let (rx, tx) = (write_rx.clone(), to_record.clone());
            s.spawn(move || write_stage(ctx, mode, rx, tx, meter));
        }
        drop((read_rx, to_crypt, write_rx, to_record));
        s.spawn(move || crypt_stage(ctx, mode, crypt_rx, to_write, meter));
        s.spawn(|| record_stage(ctx, mode, record_rx, meter));
        pick_stage(ctx, mode, batches, throttle, to_read, meter)
    });
    meter.log(mode, started.elapsed());
    ended
}

/// The pipeline's stages, as indices into [`Meter`].
#[derive(Clone, Copy)]
enum Stage {
    Pick,
    Read,
    Crypt,
    Write,
    Record,
}

/// What the stages cost.
///
/// - Per stage, the wall time spent on batches (not waiting for the
///   neighbours), summed over its threads, logged at the end of a run: the
///   stage whose busy time comes closest to its thread count times the run
///   is the bottleneck.
/// - In all, the CPU time the run has used since the throttle last looked:
///   every stage thread's own CPU time, plus the wall time of buffered
///   device writes, which the kernel spends copying into the page cache on
///   io_uring's worker threads. (Measured: with only the crypt stage
///   counted, a migration under foreground load took about 0.8 of a core
///   with a cpu_share of 0.25.)
#[derive(Default)]
struct Meter {
    wall: [AtomicU64; 5],
    /// Since the throttle last looked.
    cpu: AtomicU64,
    /// Since the run began.
    cpu_total: AtomicU64,
}

/// A stage's start on a batch.
struct Mark {
    at: Instant,
    cpu: Duration,
}

impl Meter {
    fn start(&self) -> Mark {
        Mark {
            at: Instant::now(),
            cpu: super::throttle::thread_cpu_time(),
        }
    }

    /// Ends a stage's batch begun at `mark`; `offloaded` is CPU time the
    /// kernel spent for it on other threads.
    fn finish(&self, stage: Stage, mark: Mark, offloaded: Duration) {
        let wall = mark.at.elapsed();
        let cpu = super::throttle::thread_cpu_time().saturating_sub(mark.cpu) + offloaded;
        let cpu = cpu.as_nanos() as u64;
        self.wall[stage as usize].fetch_add(wall.as_nanos() as u64, Ordering::Relaxed);
        self.cpu.fetch_add(cpu, Ordering::Relaxed);
        self.cpu_total.fetch_add(cpu, Ordering::Relaxed);
    }

    /// CPU time used since the last call.
    fn take_cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu.swap(0, Ordering::Relaxed))
    }

    fn log(&self, mode: Mode, elapsed: Duration) {
        let busy = |s: Stage| Duration::from_nanos(self.wall[s as usize].load(Ordering::Relaxed));
        tracing::debug!(
            ?mode,
            ?elapsed,
            pick = ?busy(Stage::Pick),
            read = ?busy(Stage::Read),
            crypt = ?busy(Stage::Crypt),
            write = ?busy(Stage::Write),
            record = ?busy(Stage::Record),
            io_threads = IO_THREADS,
            cpu = ?Duration::from_nanos(self.cpu_total.load(Ordering::Relaxed)),
            "pipeline run ended: busy time per stage, CPU in all"
        );
    }
}

fn pick_stage(
    ctx: &Context,
    mode: Mode,
    batches: impl Iterator<Item = Vec<Cbid>>,
    throttle: &mut Throttle,
    out: Sender<Job>,
    meter: &Meter,
) -> Ended {
    for (n, batch) in batches.enumerate() {
        let mark = meter.start();
        if ctx.stop.load(Ordering::Acquire) {
            return Ended::Stopped;
        }
        // Out of space: one batch per pass probes whether it came back.
        if n > 0 && ctx.counters.space.waiting() {
            return Ended::StagingFull;
        }
        let mut items = Vec::with_capacity(batch.len());
        {
            let meta = ctx.zone.meta.lock();
            let avoid = ctx.avoid_staged.lock();
            for cbid in batch {
                let Some(record) = meta.cb(cbid) else {
                    continue;
                };
                let live = meta.live(&record);
                let src = match mode {
                    Mode::Stage { next } => {
                        if meta.window != Some(next)
                            || record.staged.is_some()
                            || live.key_version != meta.active
                        {
                            continue;
                        }
                        live
                    }
                    Mode::Migrate { active } => {
                        if live.key_version == active && record.staged.is_none() {
                            continue;
                        }
                        if live.place == Place::Staging && avoid.contains(&cbid) {
                            LiveCopy {
                                place: Place::Data,
                                slot: record.slot,
                                key_version: record.key_version,
                            }
                        } else {
                            live
                        }
                    }
                };
                items.push(Item {
                    cbid,
                    record,
                    src,
                    dst: Slot(0),
                    ok: true,
                });
            }
        }
        if items.is_empty() {
            continue;
        }
        // Sources in slot order: runs of consecutive slots become one read.
        items.sort_unstable_by_key(|it| (it.src.place == Place::Staging, it.src.slot));
        let dsts = match mode {
            Mode::Stage { .. } => {
                let Some(staging) = &ctx.storage.staging else {
                    return Ended::StagingFull;
                };
                let got = staging.alloc_background(items.len() as u64);
                if got.is_empty() {
                    return Ended::StagingFull;
                }
                if let Some(end) = got.iter().map(|s| s.0 + 1).max()
                    && let Err(e) = staging.ensure_slots(end)
                {
                    staging.release_now(&got);
                    ctx.counters.error(format!("staging device: {e}"));
                    return Ended::StagingFull;
                }
                got
            }
            Mode::Migrate { .. } => match alloc_data(&ctx.storage, items.len()) {
                Ok(got) => got,
                Err(e) => {
                    ctx.counters.error(e);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        items.truncate(dsts.len());
        for (it, d) in items.iter_mut().zip(&dsts) {
            it.dst = *d;
        }
        let n = items.len() as u64;
        let src_runs = runs_by(&items, |it| (it.src.place, it.src.slot.0));
        let dst_runs = runs_by(&items, |it| (Place::Data, it.dst.0));
        let idle = throttle.zone_idle(&ctx.zone);
        let job = Job {
            items,
            src_runs,
            src_bufs: Vec::new(),
            dst_runs,
            dst_bufs: Vec::new(),
            uncached: matches!(mode, Mode::Migrate { .. }) && idle,
            idle,
        };
        meter.finish(Stage::Pick, mark, Duration::ZERO);
        if out.send(job).is_err() {
            return Ended::Stopped;
        }
        throttle.pace(&ctx.zone, n * BLOCK_SIZE as u64, meter.take_cpu());
    }
    Ended::Done
}

/// Data slots for migrated copies, growing the data file as needed.
fn alloc_data(storage: &Storage, n: usize) -> Result<Vec<Slot>, String> {
    let mut slots = Vec::with_capacity(n);
    {
        let mut a = storage.slots.lock();
        while slots.len() < n {
            match a.alloc_run((n - slots.len()) as u64) {
                Some((f, c)) => slots.extend((f..f + c).map(Slot)),
                None => {
                    for s in &slots {
                        a.release_now(s.0, 1);
                    }
                    return Err("the data device is full; migration waits for space".into());
                }
            }
        }
    }
    if let Some(end) = slots.iter().map(|s| s.0 + 1).max()
        && let Err(e) = storage.ensure_slots(end)
    {
        let mut a = storage.slots.lock();
        for s in &slots {
            a.release_now(s.0, 1);
        }
        return Err(format!("data device: {e}"));
    }
    Ok(slots)
}

fn read_stage(ctx: &Context, input: Receiver<Job>, out: Sender<Job>, meter: &Meter) {
    for mut job in input {
        let mark = meter.start();
        let reads = job.src_runs.iter().map(|&(start, len)| {
            let src = job.items[start].src;
            ctx.storage
                .read_copy_bulk(src.place, src.slot, ctx.storage.bufs.get(len), job.idle)
        });
        let results = futures::executor::block_on(join_all(reads));
        for (&(start, len), (res, buf)) in job.src_runs.iter().zip(results) {
            if let Err(e) = res {
                ctx.counters
                    .error(format!("reading {len} block(s) to re-encrypt: {e}"));
                for it in &mut job.items[start..start + len] {
                    it.ok = false;
                    if it.src.place == Place::Staging {
                        ctx.avoid_staged.lock().insert(it.cbid);
                    }
                }
            }
            job.src_bufs.push(buf);
        }
        meter.finish(Stage::Read, mark, Duration::ZERO);
        if out.send(job).is_err() {
            return;
        }
    }
}

fn crypt_stage(ctx: &Context, mode: Mode, input: Receiver<Job>, out: Sender<Job>, meter: &Meter) {
    // Plaintext of one destination run, tagged in one batch; zeroized
    // after every job.
    let mut plain: Vec<u8> = Vec::new();
    let mut tags: Vec<Tag> = Vec::new();
    for mut job in input {
        let mark = meter.start();
        let crypto = ctx.zone.crypto();
        let target = match mode {
            Mode::Stage { next } => next,
            Mode::Migrate { active } => active,
        };
        // Item index → (source run, offset in it).
        let mut src_at = vec![(0usize, 0usize); job.items.len()];
        for (r, &(start, len)) in job.src_runs.iter().enumerate() {
            for j in 0..len {
                src_at[start + j] = (r, j);
            }
        }
        let to = crypto.xts(target);
        let mut dst_bufs = Vec::with_capacity(job.dst_runs.len());
        for &(start, len) in &job.dst_runs {
            let mut buf = ctx.storage.bufs.get(len);
            if plain.capacity() < len * BLOCK_SIZE {
                // Grow without a reallocation that would free plaintext unwiped.
                plain.zeroize();
                plain = Vec::with_capacity(len * BLOCK_SIZE);
            }
            plain.resize(len * BLOCK_SIZE, 0);
            let src_of = |j: usize| {
                let (r, off) = src_at[start + j];
                &job.src_bufs[r][off * BLOCK_SIZE..(off + 1) * BLOCK_SIZE]
            };
            for j in 0..len {
                let it = &mut job.items[start + j];
                if !it.ok {
                    continue;
                }
                let (Some(from), Some(_)) = (crypto.xts(it.src.key_version), to) else {
                    it.ok = false;
                    ctx.counters.error(format!(
                        "content block {}: key version {} or {target} is not available",
                        it.cbid, it.src.key_version
                    ));
                    continue;
                };
                from.decrypt(
                    it.cbid.0,
                    src_of(j),
                    &mut plain[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                );
            }
            tags.resize(len, Tag::default());
            crypto.tagger().tag_blocks(&plain, &mut tags);
            for j in 0..len {
                let it = &mut job.items[start + j];
                if !it.ok {
                    continue;
                }
                let to = to.expect("checked above for every block still ok");
                let src = src_of(j);
                let plain = &plain[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE];
                let dst = &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE];
                let good = if it.record.mac == crypto.mac_version() {
                    tags[j].ct_eq(&it.record.tag)
                } else {
                    crypto.verify_tag(it.record.mac, plain, &it.record.tag)
                };
                if !good {
                    it.ok = false;
                    ctx.counters.error(format!(
                        "content block {} failed its integrity check on the {:?} device",
                        it.cbid, it.src.place
                    ));
                    if it.src.place == Place::Staging {
                        ctx.avoid_staged.lock().insert(it.cbid);
                    }
                    continue;
                }
                if it.src.key_version == target {
                    // Destage: same key, same tweak, so the verified
                    // ciphertext moves as it is.
                    dst.copy_from_slice(src);
                    ctx.counters.destaged.fetch_add(1, Ordering::Relaxed);
                } else {
                    to.encrypt(it.cbid.0, plain, dst);
                    ctx.counters.reencrypted.fetch_add(1, Ordering::Relaxed);
                }
            }
            dst_bufs.push(buf);
        }
        crate::crypto::wipe::wipe(plain.as_mut_slice());
        for b in job.src_bufs.drain(..) {
            ctx.storage.bufs.put(b);
        }
        job.dst_bufs = dst_bufs;
        meter.finish(Stage::Crypt, mark, Duration::ZERO);
        if out.send(job).is_err() {
            return;
        }
    }
}

fn write_stage(ctx: &Context, mode: Mode, input: Receiver<Job>, out: Sender<Job>, meter: &Meter) {
    for mut job in input {
        let mark = meter.start();
        // Migrated blocks go to the data device past the page cache while
        // the zone is idle: buffered, io_uring hands every write to the file
        // to one kernel worker, whose page-cache copy capped destaging at
        // about half the disk's write bandwidth. Under foreground I/O they
        // stay buffered: uncached, reads of freshly migrated blocks all went
        // to the disk, 0.42x of idle read IOPS.
        let device = match mode {
            Mode::Stage { .. } => ctx.storage.staging.as_ref().map(|s| &s.device),
            Mode::Migrate { .. } => Some(&ctx.storage.data),
        };
        let Some(device) = device else { return };
        let bufs = std::mem::take(&mut job.dst_bufs);
        let writes = job.dst_runs.iter().zip(bufs).map(|(&(start, _), buf)| {
            let offset = Storage::offset(job.items[start].dst);
            async move {
                if job.uncached {
                    device.write_at_uncached(offset, buf).await
                } else {
                    device.write_at(offset, buf).await
                }
            }
        });
        let results = futures::executor::block_on(join_all(writes));
        for (&(start, len), (res, buf)) in job.dst_runs.iter().zip(results) {
            match &res {
                Err(e) if crate::store::full::is_no_space(e) => {
                    let dev = if matches!(mode, Mode::Stage { .. }) {
                        "staging"
                    } else {
                        "data"
                    };
                    ctx.counters.space.full(dev, e);
                }
                Err(_) => {}
                Ok(()) => ctx.counters.space.written(),
            }
            if let Err(e) = res {
                ctx.counters
                    .error(format!("writing {len} re-encrypted block(s): {e}"));
                for it in &mut job.items[start..start + len] {
                    it.ok = false;
                }
            }
            ctx.storage.bufs.put(buf);
        }
        // A buffered write's wait is the kernel copying it into the page
        // cache on another thread: CPU all the same. A direct write's wait
        // is the device.
        let past_cache = if job.uncached {
            device.writes_uncached()
        } else {
            device.is_direct()
        };
        let offloaded = if past_cache {
            Duration::ZERO
        } else {
            mark.at.elapsed()
        };
        meter.finish(Stage::Write, mark, offloaded);
        if out.send(job).is_err() {
            return;
        }
    }
}

fn record_stage(ctx: &Context, mode: Mode, input: Receiver<Job>, meter: &Meter) {
    for job in input {
        let mark = meter.start();
        let mut unused = Vec::new();
        let mut entries = Vec::new();
        let mut frees = Vec::new();
        let mut changed = Vec::new();
        let mut meta = ctx.zone.meta.lock();
        for it in &job.items {
            let current = meta.cb(it.cbid);
            let still = it.ok && current == Some(it.record);
            let record = match mode {
                Mode::Stage { next } if still && meta.window == Some(next) => CbRecord {
                    staged: Some(StagedCopy {
                        slot: it.dst,
                        key_version: next,
                    }),
                    ..it.record
                },
                Mode::Migrate { active } if still && meta.active == active => {
                    frees.push(Freed {
                        cbid: it.cbid,
                        slot: it.record.slot,
                        staged: it.record.staged.map(|s| s.slot),
                    });
                    CbRecord {
                        slot: it.dst,
                        key_version: active,
                        staged: None,
                        ..it.record
                    }
                }
                _ => {
                    unused.push(it.dst);
                    continue;
                }
            };
            entries.push(Entry::Cb {
                zone: ctx.zone.id,
                cbid: it.cbid,
                record,
            });
            changed.push((it.cbid, record));
        }
        if !entries.is_empty() {
            let seq = ctx.journal.append(ctx.zone.id, &entries);
            for (cbid, record) in &changed {
                meta.set_cb(*cbid, Some(*record), seq);
            }
            free_slots_after(&ctx.storage, seq, &frees);
        }
        let done = changed.len() as u64;
        if let Mode::Migrate { .. } = mode {
            // Under the block-map lock: see `Counters::migrated`.
            ctx.counters.migrated.fetch_add(done, Ordering::Relaxed);
        }
        drop(meta);
        match mode {
            Mode::Stage { .. } => {
                ctx.counters.staged.fetch_add(done, Ordering::Relaxed);
                if let Some(staging) = &ctx.storage.staging {
                    staging.release_now(&unused);
                }
            }
            Mode::Migrate { .. } => {
                let mut a = ctx.storage.slots.lock();
                for s in &unused {
                    a.release_now(s.0, 1);
                }
            }
        }
        ctx.counters.bytes.fetch_add(
            job.items.len() as u64 * BLOCK_SIZE as u64,
            Ordering::Relaxed,
        );
        meter.finish(Stage::Record, mark, Duration::ZERO);
    }
}
