//! Zero-downtime DEK rotation: the window (writes to both keys, staging
//! pipeline), the flip (one journal record), migration and destage, and
//! the crypto-erase of the old key after its grace period.
//!
//! Each zone has a [`ZoneRotation`]: its persisted [`state::RotationState`],
//! counters, and at most one worker thread (the staging pipeline during a
//! window, the migrator after a flip). A scheduler thread starts workers,
//! flips at the scheduled time and destroys keys whose grace has passed.
//! Operator actions (prepare, flip, pause, resume, abort, emergency) are
//! methods on [`Pool`], serialised per zone.

pub mod cleanup;
mod forecast;
pub mod mac;
pub mod pipeline;
mod probe;
pub mod rollback;
pub mod space;
pub mod state;
pub mod throttle;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashSet;

use crate::admin::{KeyBlocks, RotationPhase, RotationStatus};
use crate::audit::AuditEvent;
use crate::ids::{BLOCK_SIZE, Cbid, KeyVersion, ZoneId};
use crate::keys::approval::{Authorized, Operation, Target};
use crate::keys::wrap::{KeyLabel, Purpose};
use crate::keys::zone_keys::{BlockUsage, KeyState, ZoneKeyFile};
use crate::pool::{Pool, PoolError};
use crate::store::journal::{CbRecord, Entry};
use crate::zone::Zone;

use pipeline::{Context, Counters, Ended, Mode, Timeline};
use state::{PendingDestroy, Phase, RotationState};
use throttle::Throttle;

type Result<T, E = PoolError> = std::result::Result<T, E>;

/// Largest number of records one abort frame clears.
const CLEAR_FRAME: usize = 16384;
/// How often the scheduler looks at the zones.
const TICK: Duration = Duration::from_millis(100);
/// How often heat decays.
const HEAT_DECAY: Duration = Duration::from_secs(30);

fn unix_now() -> u64 {
    crate::clock::unix_now()
}

/// A zone's rotation: state, counters, worker.
pub struct ZoneRotation {
    zone: Arc<Zone>,
    state: Mutex<RotationState>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    avoid_staged: Arc<Mutex<FxHashSet<Cbid>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Serialises operator actions and the scheduler on this zone.
    op: Mutex<()>,
    /// When the last worker started (a migrator pass that leaves work
    /// behind, say on a failing device, is retried at most once a second).
    last_start: Mutex<Option<Instant>>,
}

impl ZoneRotation {
    fn new(zone: Arc<Zone>, state: RotationState) -> Self {
        let counters = Counters::default();
        // A phase already under way is timed from this start.
        *counters.timeline.lock() = Timeline::starting(0);
        Self {
            zone,
            state: Mutex::new(state),
            counters: Arc::new(counters),
            stop: Arc::default(),
            avoid_staged: Arc::default(),
            worker: Mutex::new(None),
            op: Mutex::new(()),
            last_start: Mutex::new(None),
        }
    }

    /// A new window: forget the last cycle's timings and counts.
    fn open_timeline(&self) {
        let c = &self.counters;
        c.staged.store(0, Ordering::Relaxed);
        c.migrated.store(0, Ordering::Relaxed);
        *c.timeline.lock() = Timeline {
            window_opened: Some(Instant::now()),
            ..Timeline::starting(c.bytes.load(Ordering::Relaxed))
        };
    }

    /// The flip: the migration phase begins (the window's timings stay).
    fn start_migration_timeline(&self) {
        let c = &self.counters;
        let bytes = c.bytes.load(Ordering::Relaxed);
        let mut t = c.timeline.lock();
        t.flipped = Some(Instant::now());
        t.phase_start = Some((Instant::now(), bytes));
        t.phase_done = None;
    }

    fn worker_running(&self) -> bool {
        self.worker
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Stops the worker and waits for it.
    fn stop_worker(&self) {
        self.stop.store(true, Ordering::Release);
        let handle = self.worker.lock().take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.stop.store(false, Ordering::Release);
    }
}

/// Every zone's rotation, and the scheduler.
#[derive(Default)]
pub struct Rotations {
    zones: RwLock<BTreeMap<ZoneId, Arc<ZoneRotation>>>,
    scheduler: Mutex<Option<JoinHandle<()>>>,
    shutdown: Arc<AtomicBool>,
    /// Each zone's last or running scrub.
    pub(crate) scrubs: Mutex<BTreeMap<ZoneId, Arc<crate::scrub::Scrub>>>,
}

/// Block counts per key version, as the key layer asks for them.
struct Usage(BTreeMap<KeyVersion, u64>);

impl BlockUsage for Usage {
    fn blocks_under(&self, _zone: ZoneId, version: KeyVersion) -> u64 {
        self.0.get(&version).copied().unwrap_or(0)
    }
}

impl Pool {
    fn rotation(&self, zone: &str) -> Result<Arc<ZoneRotation>> {
        let id = self.zone_id(zone)?;
        self.rotations
            .zones
            .read()
            .get(&id)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: zone.into(),
            })
    }

    /// Copies of content blocks under each key version: the live copy and
    /// any other (a data copy behind a staged one). A key is destroyed
    /// only when nothing at all refers to it.
    pub(crate) fn key_references(&self, zone: &Zone) -> BTreeMap<KeyVersion, u64> {
        let mut out = BTreeMap::new();
        for (&(data, staged), &n) in zone.meta.lock().census() {
            *out.entry(data).or_default() += n;
            if let Some(s) = staged {
                *out.entry(s).or_default() += n;
            }
        }
        out
    }

    /// Reconciles every zone's rotation state with the block map after
    /// recovery (see [`state`]), and sets each zone's window.
    pub(crate) fn recover_rotations(&self) -> Result<()> {
        let zones: Vec<Arc<Zone>> = self.zones.read().values().cloned().collect();
        for zone in zones {
            let mut st = RotationState::load(&self.dir, zone.id).map_err(|e| PoolError::Io {
                path: RotationState::path(&self.dir, zone.id),
                source: e,
            })?;
            let active = zone.meta.lock().active;
            // The key file follows the block map: a flip whose record is
            // durable is complete even if the process died right after it.
            self.sync_key_file_to(&zone, active, st.emergency)?;
            self.recover_rollback(&zone, active, &mut st)?;
            match (st.phase, st.next_version()) {
                (Phase::Window, Some(next)) if active >= next => {
                    tracing::info!(zone = %zone.name, %next, "the flip was recorded before the stop; migrating");
                    st.phase = Phase::Migrating;
                    st.old_version.get_or_insert(next.0.saturating_sub(1));
                    st.flipped_unix.get_or_insert(unix_now());
                    st.next = None;
                    st.save(&self.dir, zone.id)
                        .map_err(|e| self.state_err(&zone, e))?;
                }
                (Phase::Window, Some(next)) => {
                    if zone.crypto().xts(next).is_some() {
                        zone.meta.lock().window = Some(next);
                    } else {
                        tracing::warn!(zone = %zone.name, %next, "window key is gone; finishing the abort");
                        st.phase = Phase::Aborting;
                    }
                }
                _ => {}
            }
            if st.phase == Phase::Idle && !st.pending_destroy.is_empty() {
                let refs = self.key_references(&zone);
                if st
                    .pending_destroy
                    .iter()
                    .any(|p| refs.get(&KeyVersion(p.version)).copied().unwrap_or(0) > 0)
                {
                    tracing::warn!(zone = %zone.name, "blocks remain under a key waiting for destruction; migrating again");
                    st.phase = Phase::Migrating;
                    st.save(&self.dir, zone.id)
                        .map_err(|e| self.state_err(&zone, e))?;
                }
            }
            let rot = Arc::new(ZoneRotation::new(zone.clone(), st.clone()));
            self.rotations.zones.write().insert(zone.id, rot.clone());
            if st.phase == Phase::Aborting {
                let _op = rot.op.lock();
                self.finish_abort(&rot)?;
            }
        }
        Ok(())
    }

    /// Gives a zone created while the pool is open its (idle) rotation, so
    /// it can be rotated without a restart.
    pub(crate) fn register_rotation(&self, zone: Arc<Zone>) {
        self.rotations
            .zones
            .write()
            .entry(zone.id)
            .or_insert_with(|| Arc::new(ZoneRotation::new(zone, RotationState::default())));
    }

    fn state_err(&self, zone: &Zone, e: std::io::Error) -> PoolError {
        PoolError::Io {
            path: RotationState::path(&self.dir, zone.id),
            source: e,
        }
    }

    /// Brings the zone's key file to `active` if the block map is ahead of
    /// it (a flip record replayed after a crash).
    fn sync_key_file_to(&self, zone: &Zone, active: KeyVersion, emergency: bool) -> Result<()> {
        let _k = zone.key_file_lock.lock();
        let path = Pool::zone_key_path(&self.dir, zone.id);
        let mut file = ZoneKeyFile::load(&path)?;
        let current = file
            .records()
            .iter()
            .find(|r| r.purpose == Purpose::Dek && r.state == KeyState::Active)
            .map(|r| KeyVersion(r.version));
        if current.is_some_and(|c| c < active) {
            let (old, _) = file.flip_dek()?;
            if emergency {
                let usage = Usage(BTreeMap::new());
                file.set_state(
                    &KeyLabel::new(zone.id, Purpose::Dek, old.0).id(),
                    KeyState::Compromised,
                    &usage,
                )?;
            }
            file.save(&path)?;
            tracing::info!(zone = %zone.name, %old, new = %active, "key file brought up to the flip");
        }
        Ok(())
    }

    fn save_state(&self, rot: &ZoneRotation, st: &RotationState) -> Result<()> {
        st.save(&self.dir, rot.zone.id)
            .map_err(|e| self.state_err(&rot.zone, e))?;
        *rot.state.lock() = st.clone();
        Ok(())
    }

    fn audit_ok(&self, event: AuditEvent) -> Result<()> {
        self.record(event).map(drop)
    }

    /// Opens a rotation window on `zone`: makes the next DEK (pre-active),
    /// then every write also stores a copy under it on the staging device,
    /// and the pipeline stages existing blocks. `flip_at`: flip
    /// automatically then (Unix seconds).
    pub fn rotation_prepare(&self, zone: &str, flip_at: Option<u64>) -> Result<RotationStatus> {
        self.rotation_prepare_with(zone, flip_at, None, None)
    }

    /// [`Pool::rotation_prepare`] with this rotation's grace period for the
    /// old key (`None`: `[rotation] grace_secs`) and its staging and
    /// migration throttle in MiB/s (`None`: `[rotation] rate_mib_s`).
    pub fn rotation_prepare_with(
        &self,
        zone: &str,
        flip_at: Option<u64>,
        grace_secs: Option<u64>,
        rate_mib_s: Option<u64>,
    ) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.audit()?;
        let st = rot.state.lock().clone();
        if st.phase != Phase::Idle {
            return Err(PoolError::Conflict(format!(
                "zone {zone} is not idle (phase {:?}); finish or abort the current rotation first",
                st.phase
            )));
        }
        if self.storage.staging.is_none() {
            return Err(PoolError::Conflict("the pool has no staging device".into()));
        }
        probe::staging_writable(&self.storage)?;
        let started = Instant::now();
        let z = &rot.zone;
        let next = self.make_next_key(z)?;
        let new = RotationState {
            phase: Phase::Window,
            next: Some(next.0),
            window_opened_unix: Some(unix_now()),
            flip_at_unix: flip_at,
            pending_destroy: st.pending_destroy.clone(),
            grace_secs,
            rate_mib_s,
            ..Default::default()
        };
        self.save_state(&rot, &new)?;
        // The key is in memory before any write can ask for it.
        z.meta.lock().window = Some(next);
        rot.avoid_staged.lock().clear();
        rot.open_timeline();
        tracing::info!(zone, %next, ?flip_at, "rotation window open");
        self.audit_ok(
            AuditEvent::ok("rotation.prepare")
                .zone(zone)
                .key(&KeyLabel::new(z.id, Purpose::Dek, next.0))
                .duration(started.elapsed()),
        )?;
        self.rotation_status(zone)
    }

    /// Makes the zone's next DEK (pre-active, wrapped under its KEK) and
    /// puts it in memory, before any write can ask for it.
    fn make_next_key(&self, z: &Zone) -> Result<KeyVersion> {
        let _k = z.key_file_lock.lock();
        // Read under the lock (see `Pool`): a root key rotation cannot
        // replace the provider until this key file is saved.
        let root = self.root();
        let path = Pool::zone_key_path(&self.dir, z.id);
        let mut file = ZoneKeyFile::load(&path)?;
        let next = file.add_dek_version(root.as_ref())?;
        file.save(&path)?;
        let ring = file.unlock(root.as_ref())?;
        let key = ring.dek(next).ok_or_else(|| {
            PoolError::Conflict(format!("DEK {next} of zone {} did not unwrap", z.name))
        })?;
        z.set_crypto(z.crypto().with_key(next, key));
        Ok(next)
    }

    /// Flips `zone` to the window's next key now: one journal record.
    pub fn rotation_flip(&self, zone: &str) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.flip_locked(&rot, false, None)?;
        self.rotation_status(zone)
    }

    /// The flip, with the zone's operation lock held. Returns the flip time.
    fn flip_locked(
        &self,
        rot: &ZoneRotation,
        emergency: bool,
        approvers: Option<&[String]>,
    ) -> Result<Duration> {
        let z = &rot.zone;
        let mut st = rot.state.lock().clone();
        let Some(next) = st.next_version().filter(|_| st.phase == Phase::Window) else {
            return Err(PoolError::Conflict(format!(
                "zone {} has no open rotation window (phase {:?}); `rotate prepare` first",
                z.name, st.phase
            )));
        };
        self.audit()?;
        rot.stop_worker();
        // What staging achieved, counted once the pipeline has stopped.
        let coverage = forecast::census_of(z, Some(next));
        // The flip's record goes ahead of other zones' frames still waiting
        // for their data sync (`Journal::commit_ahead`), never ahead of its
        // own zone's. Commit what is pending first, outside the zone lock
        // (writes go on; only this caller waits): its own zone's frames, so
        // that it can go ahead, and the others' too, so that it follows a
        // data sync. On a disk with a volatile cache and no FUA every sync
        // is a cache flush that waits for all writeback in flight, and one
        // right after a sync finds the least of it (docs/benchmarks.md).
        self.journal.commit_blocking(self.journal.last_appended())?;
        #[cfg(test)]
        tests::BEFORE_FLIP.with(|hook| hook.borrow_mut().as_mut().map(|f| f()));
        let started = Instant::now();
        let (old, committed) = {
            let mut meta = z.meta.lock();
            let old = meta.active;
            let frame = self.journal.append_ahead(
                z.id,
                &[Entry::Flip {
                    zone: z.id,
                    to: next,
                }],
            );
            meta.active = next;
            meta.window = None;
            drop(meta);
            (old, self.journal.commit_ahead(frame)?)
        };
        let flip_time = started.elapsed();
        rot.start_migration_timeline();
        // From here the flip has happened; the rest follows it (and recovery
        // completes it if we die now).
        st.phase = Phase::Migrating;
        st.next = None;
        st.flipped_unix = Some(unix_now());
        st.flip_micros = Some(flip_time.as_micros() as u64);
        st.old_version = Some(old.0);
        st.emergency = emergency;
        st.coverage_at_flip = Some(coverage);
        {
            // Recovery reads `emergency` to mark the old key compromised.
            let mut pre = rot.state.lock().clone();
            pre.emergency = emergency;
            self.save_state(rot, &pre)?;
        }
        self.sync_key_file_to(z, next, emergency)?;
        self.save_state(rot, &st)?;
        let staged = rot.counters.staged.load(Ordering::Relaxed);
        tracing::info!(zone = %z.name, %old, new = %next, ?flip_time, ?committed, emergency, "flipped");
        let mut event = AuditEvent::ok(if emergency {
            "rotation.emergency"
        } else {
            "rotation.flip"
        })
        .zone(&z.name)
        .key(&KeyLabel::new(z.id, Purpose::Dek, next.0))
        .count(staged)
        .duration(flip_time);
        if let Some(a) = approvers {
            event = event.approvers(a.iter());
        }
        if let Some(reason) = &st.reason {
            event = event.error(reason);
        }
        self.audit_ok(event)?;
        Ok(flip_time)
    }

    /// Pauses the zone's staging pipeline or migrator.
    pub fn rotation_pause(&self, zone: &str) -> Result<RotationStatus> {
        self.set_paused(zone, true)
    }

    /// Resumes it.
    pub fn rotation_resume(&self, zone: &str) -> Result<RotationStatus> {
        self.set_paused(zone, false)
    }

    fn set_paused(&self, zone: &str, paused: bool) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        let mut st = rot.state.lock().clone();
        if !matches!(st.phase, Phase::Window | Phase::Migrating) {
            return Err(PoolError::Conflict(format!(
                "zone {zone} has no rotation to {} (phase {:?})",
                if paused { "pause" } else { "resume" },
                st.phase
            )));
        }
        st.paused = paused;
        self.save_state(&rot, &st)?;
        if paused {
            rot.stop_worker();
        }
        self.audit_ok(
            AuditEvent::ok(if paused {
                "rotation.pause"
            } else {
                "rotation.resume"
            })
            .zone(zone),
        )?;
        self.rotation_status(zone)
    }

    /// Aborts the window: staged copies are discarded and the next key is
    /// destroyed. Every block stays readable under the active key.
    pub fn rotation_abort(&self, zone: &str) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.audit()?;
        let mut st = rot.state.lock().clone();
        if st.phase != Phase::Window {
            return Err(PoolError::Conflict(format!(
                "zone {zone} has no open window to abort (phase {:?})",
                st.phase
            )));
        }
        st.phase = Phase::Aborting;
        self.save_state(&rot, &st)?;
        let n = self.finish_abort(&rot)?;
        self.audit_ok(AuditEvent::ok("rotation.abort").zone(zone).count(n))?;
        self.rotation_status(zone)
    }

    /// Clears staged copies under the aborted key, destroys it, and goes
    /// idle. Idempotent: recovery calls it again after a crash. Returns the
    /// number of staged copies discarded.
    fn finish_abort(&self, rot: &ZoneRotation) -> Result<u64> {
        let z = &rot.zone;
        rot.stop_worker();
        let mut st = rot.state.lock().clone();
        let Some(next) = st.next_version() else {
            st.phase = Phase::Idle;
            self.save_state(rot, &st)?;
            return Ok(0);
        };
        let mut cleared = 0u64;
        let mut last = None;
        {
            let mut meta = z.meta.lock();
            meta.window = None;
            let staged: Vec<(Cbid, CbRecord)> = meta
                .live_records()
                .into_iter()
                .filter(|(_, r)| r.staged.is_some_and(|s| s.key_version == next))
                .collect();
            for chunk in staged.chunks(CLEAR_FRAME) {
                let entries: Vec<Entry> = chunk
                    .iter()
                    .map(|(cbid, r)| Entry::Cb {
                        zone: z.id,
                        cbid: *cbid,
                        record: CbRecord { staged: None, ..*r },
                    })
                    .collect();
                let seq = self.journal.append(z.id, &entries);
                for (cbid, r) in chunk {
                    meta.set_cb(*cbid, Some(CbRecord { staged: None, ..*r }), seq);
                }
                if let Some(staging) = &self.storage.staging {
                    let mut slots = staging.slots.lock();
                    for s in chunk.iter().filter_map(|(_, r)| r.staged) {
                        slots.free_after(seq, s.slot.0);
                    }
                }
                cleared += chunk.len() as u64;
                last = Some(seq);
            }
        }
        if let Some(seq) = last {
            self.journal.commit_blocking(seq)?;
        }
        {
            let _k = z.key_file_lock.lock();
            let path = Pool::zone_key_path(&self.dir, z.id);
            let mut file = ZoneKeyFile::load(&path)?;
            let id = KeyLabel::new(z.id, Purpose::Dek, next.0).id();
            let state = file.records().iter().find(|r| r.id == id).map(|r| r.state);
            if state == Some(KeyState::PreActive) {
                let old = std::fs::File::open(&path).ok();
                file.set_state(&id, KeyState::Destroyed, &Usage(self.key_references(z)))?;
                file.save(&path)?;
                scrub_replaced(old);
            }
            z.set_crypto(z.crypto().without_key(next));
        }
        st.phase = Phase::Idle;
        st.next = None;
        st.flip_at_unix = None;
        st.paused = false;
        self.save_state(rot, &st)?;
        tracing::info!(zone = %z.name, %next, cleared, "rotation aborted; next key destroyed");
        Ok(cleared)
    }

    /// Emergency rotation: the active key is marked compromised, a new key
    /// becomes active at once (flipping whatever is staged), and everything
    /// else is migrated at top priority with the throttle lifted. Needs
    /// dual control when the pool requires it.
    pub fn rotation_emergency(
        &self,
        zone: &str,
        reason: &str,
        auth: Option<Authorized>,
    ) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.audit()?;
        let expected = Target::new(Operation::EmergencyRotation, Some(zone), None);
        let approvers = self.check_approval(&expected, auth.as_ref(), |e| {
            AuditEvent::refused("rotation.emergency", e).zone(zone)
        })?;
        if reason.trim().is_empty() {
            return Err(PoolError::Invalid(
                "an emergency rotation needs a --reason".into(),
            ));
        }
        let st = rot.state.lock().clone();
        if st.phase == Phase::Aborting {
            self.finish_abort(&rot)?;
        }
        let st = rot.state.lock().clone();
        if st.phase != Phase::Window {
            // No window: make the next key now (nothing is staged).
            rot.stop_worker();
            let z = &rot.zone;
            let next = self.make_next_key(z)?;
            let new = RotationState {
                phase: Phase::Window,
                next: Some(next.0),
                window_opened_unix: Some(unix_now()),
                pending_destroy: st.pending_destroy.clone(),
                ..Default::default()
            };
            self.save_state(&rot, &new)?;
            z.meta.lock().window = Some(next);
            rot.open_timeline();
        }
        {
            let mut st = rot.state.lock().clone();
            st.reason = Some(reason.to_string());
            st.emergency = true;
            self.save_state(&rot, &st)?;
        }
        self.flip_locked(&rot, true, Some(&approvers))?;
        self.rotation_status(zone)
    }

    /// The rotation status of `zone`.
    pub fn rotation_status(&self, zone: &str) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let z = &rot.zone;
        let st = rot.state.lock().clone();
        let c = &rot.counters;
        let (active, content, staged, to_migrate, migrated, mut per_key) = {
            let mut meta = z.meta.lock();
            let active = meta.active;
            let mut per_key: BTreeMap<KeyVersion, u64> = BTreeMap::new();
            let (mut staged, mut content, mut to_migrate) = (0, 0, 0);
            for (&(data, st), &n) in meta.census() {
                let live = st.filter(|s| *s <= active).unwrap_or(data);
                *per_key.entry(live).or_default() += n;
                if st.is_some_and(|s| s > active) {
                    staged += n;
                }
                // What the migrator picks: an old key, or a copy to destage.
                if data != active || st.is_some() {
                    to_migrate += n;
                }
                content += n;
            }
            // Read under the lock the migrator counts under: the two agree.
            let migrated = c.migrated.load(Ordering::Relaxed);
            (active, content, staged, to_migrate, migrated, per_key)
        };
        let states: BTreeMap<u32, String> = {
            let file = ZoneKeyFile::load(&Pool::zone_key_path(&self.dir, z.id))?;
            file.records()
                .iter()
                .filter(|r| r.purpose == Purpose::Dek)
                .map(|r| (r.version, r.state.name().to_string()))
                .collect()
        };
        for v in states.keys() {
            per_key.entry(KeyVersion(*v)).or_default();
        }
        let keys = per_key
            .iter()
            .map(|(v, n)| KeyBlocks {
                version: v.0,
                state: states
                    .get(&v.0)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
                blocks: *n,
            })
            .collect();
        let phase = match st.phase {
            Phase::Window if st.paused => RotationPhase::Paused,
            Phase::Window | Phase::Aborting => RotationPhase::Window,
            Phase::Migrating if st.paused => RotationPhase::Paused,
            Phase::Migrating => RotationPhase::Migrating,
            Phase::Idle if !st.pending_destroy.is_empty() => RotationPhase::Grace,
            Phase::Idle => RotationPhase::Idle,
        };
        // Each phase counts over its own blocks: the window over the zone's
        // content blocks, the migration over those it had to move (moved
        // so far plus those left), so "done/total" always adds up.
        let (done, remaining) = match st.phase {
            Phase::Window | Phase::Aborting => (staged, content.saturating_sub(staged)),
            Phase::Migrating => (migrated, to_migrate),
            Phase::Idle => (migrated, 0),
        };
        let progress = match done + remaining {
            0 => 100.0,
            total => 100.0 * done as f64 / total as f64,
        };
        let running = matches!(st.phase, Phase::Window | Phase::Migrating) && !st.paused;
        let timeline = *c.timeline.lock();
        let rate = if st.phase == Phase::Idle && st.pending_destroy.is_empty() {
            0.0
        } else {
            timeline.phase_rate(c.bytes.load(Ordering::Relaxed), remaining == 0)
        };
        let (used, free) = match &self.storage.staging {
            Some(s) => {
                let used = s.used();
                (
                    used * BLOCK_SIZE as u64,
                    s.capacity.saturating_sub(used) * BLOCK_SIZE as u64,
                )
            }
            None => (0, 0),
        };
        Ok(RotationStatus {
            zone: z.name.clone(),
            phase,
            active_version: active.0,
            next_version: st.next,
            old_version: st.old_version,
            keys,
            content_blocks: content,
            staged_blocks: staged,
            migrated_blocks: migrated,
            remaining_blocks: remaining,
            progress_percent: progress,
            rate_bytes_per_sec: rate,
            eta_secs: (running && rate > 0.0 && remaining > 0)
                .then(|| remaining as f64 * BLOCK_SIZE as f64 / rate),
            staging_used_bytes: used,
            staging_free_bytes: free,
            unstaged_writes: z.stats.unstaged.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed)
                + z.stats.staging_errors.load(Ordering::Relaxed),
            last_error: c.last_error.lock().clone(),
            waiting_for_space: c.space.reason(),
            window_opened_unix: st.window_opened_unix,
            flip_at_unix: st.flip_at_unix,
            flipped_unix: st.flipped_unix,
            destroy_at_unix: st.pending_destroy.iter().map(|p| p.due_unix).min(),
            emergency: st.emergency,
            reencrypted_blocks: c.reencrypted.load(Ordering::Relaxed),
            last_flip_micros: st.flip_micros,
            staging_secs: timeline.staged_all.map(|d| d.as_secs_f64()),
            migration_secs: timeline.migrated.map(|d| d.as_secs_f64()),
            rolled_back_from: st.rolled_back_from,
            rolled_back_unix: st.rolled_back_unix,
            throttle_mib_s: st.rate_mib_s.unwrap_or(self.config().rotation.rate_mib_s),
            throttle_source: if st.rate_mib_s.is_some() {
                "policy"
            } else {
                "pool"
            }
            .into(),
            strict_waited_writes: z.stats.strict_waited.load(Ordering::Relaxed),
            strict_fallbacks: z.stats.strict_fallbacks.load(Ordering::Relaxed),
        })
    }

    /// Starts the rotation scheduler (the server calls this once it serves).
    pub fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let shutdown = self.rotations.shutdown.clone();
        let handle = std::thread::Builder::new()
            .name("keyturn-rotation".into())
            .spawn(move || {
                let mut last_decay = Instant::now();
                while !shutdown.load(Ordering::Acquire) {
                    let Some(pool) = weak.upgrade() else { return };
                    pool.tick();
                    pool.audit_destroyed_key_sets();
                    if last_decay.elapsed() >= HEAT_DECAY {
                        for z in pool.zones.read().values() {
                            z.heat.decay();
                        }
                        last_decay = Instant::now();
                    }
                    drop(pool);
                    std::thread::sleep(TICK);
                }
            })
            .expect("spawn the rotation scheduler");
        *self.rotations.scheduler.lock() = Some(handle);
    }

    /// Stops the scheduler and every worker (at the end of serving).
    pub fn stop_background(&self) {
        self.rotations.shutdown.store(true, Ordering::Release);
        if let Some(h) = self.rotations.scheduler.lock().take() {
            let _ = h.join();
        }
        let rots: Vec<_> = self.rotations.zones.read().values().cloned().collect();
        for r in rots {
            r.stop_worker();
        }
    }

    /// One scheduler pass over every zone.
    fn tick(self: &Arc<Self>) {
        let rots: Vec<_> = self.rotations.zones.read().values().cloned().collect();
        for rot in rots {
            if let Err(e) = self.tick_zone(&rot) {
                tracing::error!(zone = %rot.zone.name, error = %e, "rotation scheduler");
                *rot.counters.last_error.lock() = Some(e.to_string());
            }
        }
    }

    fn tick_zone(self: &Arc<Self>, rot: &Arc<ZoneRotation>) -> Result<()> {
        let Some(_op) = rot.op.try_lock() else {
            return Ok(());
        };
        self.mac_tick(rot)?;
        let st = rot.state.lock().clone();
        let now = unix_now();
        if st.phase == Phase::Window && st.flip_at_unix.is_some_and(|t| t <= now) {
            self.flip_locked(rot, false, None)?;
            return Ok(());
        }
        if let Some(p) = st
            .pending_destroy
            .iter()
            .find(|p| p.due_unix <= now)
            .copied()
        {
            self.destroy_old_key(rot, p)?;
        }
        let st = rot.state.lock().clone();
        if !matches!(st.phase, Phase::Window | Phase::Migrating)
            || st.paused
            || rot.worker_running()
        {
            return Ok(());
        }
        if st.phase == Phase::Migrating && self.migration_done(rot)? {
            return self.finish_migration(rot);
        }
        if rot
            .last_start
            .lock()
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        *rot.last_start.lock() = Some(Instant::now());
        self.start_worker(rot, &st);
        Ok(())
    }

    fn start_worker(self: &Arc<Self>, rot: &Arc<ZoneRotation>, st: &RotationState) {
        // Reap a finished worker first.
        if let Some(h) = rot.worker.lock().take() {
            let _ = h.join();
        }
        let ctx = Context {
            zone: rot.zone.clone(),
            storage: self.storage.clone(),
            journal: self.journal.clone(),
            counters: rot.counters.clone(),
            stop: rot.stop.clone(),
            avoid_staged: rot.avoid_staged.clone(),
        };
        let mut config = self.config().rotation.clone();
        // The policy's throttle for a rotation the scheduler started.
        if let Some(rate) = st.rate_mib_s {
            config.rate_mib_s = rate;
        }
        let phase = st.phase;
        let next = st.next_version();
        let emergency = st.emergency;
        let handle = std::thread::Builder::new()
            .name(format!(
                "keyturn-{}-{}",
                if phase == Phase::Window {
                    "stage"
                } else {
                    "migrate"
                },
                rot.zone.id
            ))
            .spawn(move || {
                let mut throttle = Throttle::new(&config, emergency);
                match (phase, next) {
                    (Phase::Window, Some(next)) => stage_pass(&ctx, next, &config, &mut throttle),
                    _ => migrate_pass(&ctx, &config, &mut throttle),
                }
            })
            .expect("spawn a rotation worker");
        *rot.worker.lock() = Some(handle);
    }

    /// Whether nothing is left under an old key (live or staged), and no
    /// write that started before the flip is still to record.
    fn migration_done(&self, rot: &ZoneRotation) -> Result<bool> {
        let mut meta = rot.zone.meta.lock();
        let active = meta.active;
        if meta.writers.keys().any(|v| *v != active) {
            return Ok(false);
        }
        Ok(meta.census().keys().all(|&k| k == (active, None)))
    }

    /// Migration is complete: the old keys wait out the grace period.
    fn finish_migration(&self, rot: &ZoneRotation) -> Result<()> {
        let z = &rot.zone;
        // The migrator's records must be durable before the state file says
        // the old keys are unused: else a crash could bring blocks back
        // under a key already queued for destruction.
        self.journal.commit_blocking(self.journal.last_appended())?;
        {
            let mut t = rot.counters.timeline.lock();
            t.migrated = t.flipped.map(|f| f.elapsed());
            t.phase_finished(rot.counters.bytes.load(Ordering::Relaxed));
        }
        let active = z.meta.lock().active;
        let mut st = rot.state.lock().clone();
        let due = unix_now() + st.grace_secs.unwrap_or(self.config().rotation.grace_secs);
        let file = ZoneKeyFile::load(&Pool::zone_key_path(&self.dir, z.id))?;
        for r in file.records() {
            if r.purpose == Purpose::Dek
                && r.version != active.0
                && matches!(r.state, KeyState::DecryptOnly | KeyState::Compromised)
                && !st.pending_destroy.iter().any(|p| p.version == r.version)
            {
                st.pending_destroy.push(PendingDestroy {
                    version: r.version,
                    due_unix: due,
                });
            }
        }
        st.phase = Phase::Idle;
        st.paused = false;
        self.save_state(rot, &st)?;
        let migrated = rot.counters.migrated.load(Ordering::Relaxed);
        tracing::info!(zone = %z.name, migrated, "migration complete");
        self.audit_ok(
            AuditEvent::ok("rotation.migrated")
                .zone(&z.name)
                .count(migrated),
        )
    }

    /// Destroys an old DEK whose grace period has passed: its wrapped bytes
    /// are erased from the key file (crypto-erase), it leaves memory, and
    /// the free space of both devices is discarded so no old ciphertext
    /// lingers in freed slots.
    fn destroy_old_key(&self, rot: &ZoneRotation, p: PendingDestroy) -> Result<()> {
        let z = &rot.zone;
        let version = KeyVersion(p.version);
        if z.meta.lock().active == version {
            // Active again (a rollback): never destroyed. Recovery and the
            // rollback take it off the queue; this is the last line.
            let mut st = rot.state.lock().clone();
            st.pending_destroy.retain(|q| q.version != p.version);
            return self.save_state(rot, &st);
        }
        let refs = self.key_references(z);
        if refs.get(&version).copied().unwrap_or(0) > 0 {
            // Blocks under it again (a crash lost the tail of the migration):
            // migrate again before anything is destroyed.
            tracing::warn!(zone = %z.name, %version, "content blocks still use a key queued for destruction; migrating again");
            let mut st = rot.state.lock().clone();
            if st.phase == Phase::Idle {
                st.phase = Phase::Migrating;
                self.save_state(rot, &st)?;
            }
            return Ok(());
        }
        let started = Instant::now();
        let label = KeyLabel::new(z.id, Purpose::Dek, p.version);
        {
            let _k = z.key_file_lock.lock();
            let path = Pool::zone_key_path(&self.dir, z.id);
            let mut file = ZoneKeyFile::load(&path)?;
            let state = file
                .records()
                .iter()
                .find(|r| r.id == label.id())
                .map(|r| r.state);
            if state.is_some_and(|s| s != KeyState::Destroyed) {
                let old = std::fs::File::open(&path).ok();
                file.set_state(&label.id(), KeyState::Destroyed, &Usage(refs))?;
                file.save(&path)?;
                scrub_replaced(old);
            }
            z.set_crypto(z.crypto().without_key(version));
        }
        // Frees of the migration must be durable before their slots count as free.
        self.journal.commit_blocking(self.journal.last_appended())?;
        let punched = self.storage.discard_free().map_err(|e| PoolError::Io {
            path: self.dir.clone(),
            source: e,
        })?;
        let mut st = rot.state.lock().clone();
        st.pending_destroy.retain(|q| q.version != p.version);
        self.save_state(rot, &st)?;
        tracing::info!(zone = %z.name, %version, punched_slots = punched, "old DEK destroyed");
        self.audit_ok(
            AuditEvent::ok("key.destroy")
                .zone(&z.name)
                .key(&label)
                .count(punched)
                .duration(started.elapsed()),
        )
    }
}

/// Overwrites the previous contents of a file just replaced by rename, so
/// the erased wrapped key does not survive in the old inode's blocks
/// (best effort: a copy-on-write filesystem may keep them).
fn scrub_replaced(old: Option<std::fs::File>) {
    use std::os::unix::fs::FileExt;
    let Some(old) = old else { return };
    let Ok(meta) = old.metadata() else { return };
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&old)
    )) else {
        return;
    };
    let zeros = vec![0u8; meta.len() as usize];
    if f.write_all_at(&zeros, 0)
        .and_then(|()| crate::store::durable::sync_all(&f))
        .is_err()
    {
        tracing::warn!("could not overwrite the replaced key file");
    }
}

/// One staging pass over the zone: candidates by priority (shared blocks,
/// then hot ones, then the rest in slot order), until done, full, paused or
/// stopped. Then waits a little and looks again (writes that found staging
/// full or failing leave blocks to pick up).
fn stage_pass(
    ctx: &Context,
    next: KeyVersion,
    config: &crate::config::RotationSection,
    throttle: &mut Throttle,
) {
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        let candidates: Vec<Cbid> = {
            let meta = ctx.zone.meta.lock();
            if meta.window != Some(next) {
                return;
            }
            let active = meta.active;
            let mut c: Vec<(u64, u64, Cbid)> = meta
                .live_records()
                .into_iter()
                .filter(|(_, r)| r.staged.is_none() && r.key_version == active)
                .map(|(cbid, r)| {
                    let score = u64::from(r.refcount - 1) * 16 + u64::from(ctx.zone.heat.get(cbid));
                    (score, r.slot.0, cbid)
                })
                .collect();
            c.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            c.into_iter().map(|(_, _, cbid)| cbid).collect()
        };
        if candidates.is_empty() {
            note_all_staged(ctx);
            sleep_unless_stopped(ctx, Duration::from_secs(1));
            continue;
        }
        let batches = candidates.chunks(config.batch_blocks).map(<[Cbid]>::to_vec);
        match pipeline::run(ctx, Mode::Stage { next }, batches, throttle) {
            Ended::Stopped => return,
            Ended::StagingFull => sleep_unless_stopped(ctx, Duration::from_secs(1)),
            Ended::Done => {
                note_all_staged(ctx);
                sleep_unless_stopped(ctx, Duration::from_millis(500));
            }
        }
    }
}

/// One migration pass: every block not under the active key, or with a
/// staged copy to destage, in slot order.
fn migrate_pass(ctx: &Context, config: &crate::config::RotationSection, throttle: &mut Throttle) {
    let candidates: Vec<Cbid> = {
        let meta = ctx.zone.meta.lock();
        let active = meta.active;
        let mut c: Vec<(bool, u64, Cbid)> = meta
            .live_records()
            .into_iter()
            .filter(|(_, r)| r.live(active).key_version != active || r.staged.is_some())
            .map(|(cbid, r)| {
                let live = r.live(active);
                (
                    live.place == crate::store::journal::Place::Staging,
                    live.slot.0,
                    cbid,
                )
            })
            .collect();
        c.sort_unstable();
        c.into_iter().map(|(_, _, cbid)| cbid).collect()
    };
    if candidates.is_empty() {
        return;
    }
    let active = ctx.zone.meta.lock().active;
    let batches = candidates.chunks(config.batch_blocks).map(<[Cbid]>::to_vec);
    pipeline::run(ctx, Mode::Migrate { active }, batches, throttle);
}

/// Records when the window first had every content block staged.
fn note_all_staged(ctx: &Context) {
    let all = {
        let mut meta = ctx.zone.meta.lock();
        let active = meta.active;
        !meta
            .census()
            .iter()
            .any(|(&(data, staged), &n)| data == active && staged.is_none() && n > 0)
    };
    let mut t = ctx.counters.timeline.lock();
    if all && t.staged_all.is_none() {
        t.staged_all = t.window_opened.map(|w| w.elapsed());
    }
    if all {
        t.phase_finished(ctx.counters.bytes.load(Ordering::Relaxed));
    }
}

fn sleep_unless_stopped(ctx: &Context, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !ctx.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod crash_walk;
#[cfg(test)]
pub(crate) mod tests;
