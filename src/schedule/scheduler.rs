//! The scheduler thread: every check interval it reads each zone's key
//! ages from its key file and its policy, runs the planner
//! ([`super::queue::plan`]), starts what the planner picked through the
//! pool's rotation API, follows running jobs to their end, retries failed
//! starts with exponential backoff, and keeps `schedule.json` up to date.
//!
//! A DEK rotation is started with `rotation_prepare` and a flip time inside
//! the maintenance window (the rotation's own timer flips it); severely
//! overdue and missing keys flip at once; a compromised active key takes
//! the emergency path. A KEK rotation runs `rotate_kek` on its own thread,
//! with the policy's batch size and pause. A crash leaves `schedule.json`
//! and each rotation's own state file: at restart a running DEK job is
//! followed to its end (the rotation resumes by itself) and a running KEK
//! job is started again (`rotate_kek` resumes an interrupted re-wrap).
//!
//! The predictive plan of each DEK rotation, the learned staging rates and
//! the coverage record at each flip are in [`planning`]; threat input and
//! emergency rotations under dual control in [`threats`].

mod planning;
mod root;
mod threats;
mod write_modes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::policy::{OnFailure, Policies, Policy, PolicyError, Span, ZoneFacts};
use super::predict::{Learned, Prediction};
use super::queue::{
    JobState, KeyAge, KeyKind, Schedule, ScheduleFileError, Start, Urgency, ZoneView, plan,
    record_failure,
};
use super::threat::{ThreatError, ThreatLevel, ThreatState};
use crate::admin::{AdminError, RotationPhase, ScheduleRequest, ScheduleService};
use crate::audit::AuditEvent;
use crate::config::ScheduleSection;
use crate::ids::BLOCK_SIZE;
use crate::keys::wrap::Purpose;
use crate::keys::zone_keys::{KeyState, ZoneKeyFile};
use crate::pool::Pool;

mod manage;

pub use manage::KeyHealth;

/// Errors starting the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// `schedule.json` could not be read.
    #[error(transparent)]
    File(#[from] ScheduleFileError),
    /// `policies.json` could not be read.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// `threat.json` could not be read.
    #[error(transparent)]
    Threat(#[from] ThreatError),
}

/// What the last check saw and cost.
#[derive(Clone, Debug, Default, Serialize)]
struct LastCheck {
    at_unix: Option<u64>,
    zones: usize,
    /// Wall time of the whole check (key files, statuses, plan, starts).
    micros: u64,
    /// Of which the planner.
    plan_micros: u64,
}

/// The rotation scheduler of one served pool.
pub struct Scheduler {
    pool: Weak<Pool>,
    dir: PathBuf,
    settings: ScheduleSection,
    schedule: Mutex<Schedule>,
    policies: Mutex<Policies>,
    kek_workers: Mutex<BTreeMap<String, JoinHandle<Result<(), String>>>>,
    last: Mutex<LastCheck>,
    shutdown: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Serialises checks and admin changes to the schedule.
    check_lock: Mutex<()>,
    /// Threat levels (`threat.json`).
    threat: Mutex<ThreatState>,
    /// Staging rates learned per zone (`staging-rates.json`).
    learned: Mutex<BTreeMap<String, Learned>>,
    /// Per zone, the last staging rate and write rate seen in its open window.
    samples: Mutex<BTreeMap<String, (f64, f64)>>,
    /// Per zone, the write counter when last measured and the write rate.
    writes: Mutex<BTreeMap<String, planning::WriteMeter>>,
    /// Per zone, the last plan made.
    plans: Mutex<BTreeMap<String, Prediction>>,
    /// When heat was last saved.
    heat_saved: Mutex<Option<Instant>>,
    /// Set to check at once (a threat change).
    wake: AtomicBool,
    /// The root key's age, from the audit log.
    root: Mutex<root::RootWatch>,
}

impl Scheduler {
    /// Loads the schedule and policies of `pool`, hands the pool's admin
    /// requests for them to the scheduler, and starts its thread (unless
    /// `[schedule] enabled = false`).
    pub fn start(pool: &Arc<Pool>) -> Result<Arc<Self>, ScheduleError> {
        let dir = pool.dir().to_path_buf();
        let settings = pool.config().schedule.clone();
        let s = Arc::new(Scheduler {
            pool: Arc::downgrade(pool),
            schedule: Mutex::new(Schedule::load(&dir)?),
            policies: Mutex::new(Policies::load(&dir)?),
            dir,
            settings,
            kek_workers: Mutex::default(),
            last: Mutex::default(),
            shutdown: AtomicBool::new(false),
            thread: Mutex::new(None),
            check_lock: Mutex::new(()),
            threat: Mutex::new(ThreatState::load(pool.dir())?),
            learned: Mutex::new(planning::load_learned(pool.dir())),
            samples: Mutex::default(),
            writes: Mutex::default(),
            plans: Mutex::default(),
            heat_saved: Mutex::new(None),
            wake: AtomicBool::new(false),
            root: Mutex::default(),
        });
        pool.load_heat();
        write_modes::apply(pool, &s.policies.lock());
        pool.set_schedule_service(s.clone());
        if s.settings.enabled {
            let me = s.clone();
            let handle = std::thread::Builder::new()
                .name("keyturn-schedule".into())
                .spawn(move || me.run())
                .map_err(|e| ScheduleFileError {
                    path: Schedule::path(&s.dir),
                    message: format!("cannot start the scheduler thread: {e}"),
                })?;
            *s.thread.lock() = Some(handle);
        }
        Ok(s)
    }

    /// Stops the thread (running rotations go on with the pool's own
    /// rotation threads until the pool stops them).
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.save_heat();
        }
        let workers = std::mem::take(&mut *self.kek_workers.lock());
        for (_, h) in workers {
            let _ = h.join();
        }
    }

    fn run(&self) {
        let interval = Duration::from_millis(self.settings.check_interval_ms);
        while !self.shutdown.load(Ordering::Acquire) {
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            self.check(&pool);
            drop(pool);
            let end = Instant::now() + interval;
            while Instant::now() < end
                && !self.shutdown.load(Ordering::Acquire)
                && !self.wake.swap(false, Ordering::AcqRel)
            {
                std::thread::sleep(Duration::from_millis(20).min(interval));
            }
        }
    }

    /// One check: follow running jobs, plan, start, persist.
    fn check(&self, pool: &Arc<Pool>) {
        let _c = self.check_lock.lock();
        let started = Instant::now();
        let now = crate::clock::unix_now();
        self.read_feed(pool, now);
        let policies = self.policies.lock().clone();
        // A zone made since the last check gets its policy's write mode.
        write_modes::apply(pool, &policies);
        let threat = self.threat.lock().clone();
        let facts = match self.zone_facts(pool, &policies, &threat) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "scheduler: cannot read the zones' keys");
                return;
            }
        };
        let mut schedule = self.schedule.lock().clone();
        let before = schedule.clone();
        self.learn(pool, &facts, now);
        let facts = self.predict_all(pool, &policies, &schedule, facts, now);
        self.follow_running(pool, &mut schedule, &facts, now);
        self.replan_windows(pool, &mut schedule, &policies, &facts, now);
        let views: Vec<ZoneView<'_>> = facts
            .iter()
            .map(|f| ZoneView {
                name: &f.name,
                policy: policies.of(&f.name),
                dek: f.dek,
                kek: f.kek,
                mac: f.mac,
                rotation_secs: f.rotation_secs,
                dek_busy: f.dek_busy,
                dek_period: f.dek_period,
                kek_period: f.kek_period,
                mac_period: f.mac_period,
                threat_emergency: f.threat_emergency,
                dek_plan: f.plan.as_ref().map(|p| (p.open_at, p.flip_at)),
            })
            .collect();
        let planned = Instant::now();
        let starts = plan(&mut schedule, &views, now, self.settings.max_concurrent);
        let plan_micros = planned.elapsed().as_micros() as u64;
        for j in &schedule.jobs {
            if !before
                .jobs
                .iter()
                .any(|b| b.zone == j.zone && b.kind == j.kind)
            {
                metrics::counter!("keyturn_rotations_scheduled_total", "kind" => kind_label(j.kind), "by" => "policy")
                    .increment(1);
            }
        }
        for s in starts {
            if let Some(p) = facts
                .iter()
                .find(|f| f.name == s.zone)
                .and_then(|f| f.plan.as_ref())
                && let Some(j) = schedule
                    .jobs
                    .iter_mut()
                    .find(|j| j.zone == s.zone && j.kind == s.kind)
                && s.kind == KeyKind::Dek
                && s.urgency < Urgency::SeverelyOverdue
            {
                j.open_at_unix = Some(now);
                j.predicted_coverage = Some(p.predicted_coverage_percent);
            }
            self.begin(pool, &mut schedule, &policies, s, now);
        }
        self.root.lock().check(pool, &policies, now);
        self.publish(&schedule, &facts);
        self.save_heat_now_and_then(pool);
        if schedule != before
            && let Err(e) = schedule.save(&self.dir)
        {
            tracing::error!(error = %e, "scheduler: cannot save the schedule");
        }
        *self.schedule.lock() = schedule;
        *self.last.lock() = LastCheck {
            at_unix: Some(now),
            zones: facts.len(),
            micros: started.elapsed().as_micros() as u64,
            plan_micros,
        };
    }

    /// Each zone's key ages, whether an operator's rotation is under way,
    /// and how long its rotation would take.
    fn zone_facts(
        &self,
        pool: &Pool,
        policies: &Policies,
        threat: &ThreatState,
    ) -> Result<Vec<Facts>, String> {
        let zones = pool.catalog().zones;
        let mut out = Vec::with_capacity(zones.len());
        for z in zones {
            let name = z.name;
            let file = match ZoneKeyFile::load(&Pool::zone_key_path(pool.dir(), z.id)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(zone = %name, error = %e, "scheduler: zone skipped");
                    continue;
                }
            };
            // One zone that cannot be read must not stop the others' rotations.
            let status = match pool.rotation_status(&name) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(zone = %name, error = %e, "scheduler: zone skipped");
                    continue;
                }
            };
            let policy = policies.of(&name);
            let content = status.content_blocks * BLOCK_SIZE as u64;
            let level = threat.level(&name);
            out.push(Facts {
                id: z.id,
                dek_period: policy.threat.scale(policy.dek_period(), level),
                kek_period: policy.threat.scale(policy.kek_period(), level),
                mac_period: policy.threat.scale(policy.mac_period(), level),
                threat_level: level,
                threat_emergency: threat.emergency_due(&name),
                plan: None,
                census: None,
                staging_free_bytes: status.staging_free_bytes,
                window_rate: (status.phase == RotationPhase::Window && !status.emergency)
                    .then_some(status.rate_bytes_per_sec)
                    .filter(|r| *r > 0.0),
                dek: key_age(&file, Purpose::Dek),
                kek: key_age(&file, Purpose::Kek),
                mac: key_age(&file, Purpose::Mac),
                rotation_secs: self.facts_for(pool, policy, content).rotation_secs(),
                dek_busy: matches!(
                    status.phase,
                    RotationPhase::Window | RotationPhase::Paused | RotationPhase::Migrating
                ),
                phase: status.phase,
                name,
            });
        }
        Ok(out)
    }

    fn facts_for(&self, pool: &Pool, policy: &Policy, content_bytes: u64) -> ZoneFacts {
        let mib_s = [
            policy.rate_mib_s,
            pool.config().rotation.rate_mib_s,
            self.settings.assumed_rate_mib_s,
        ]
        .into_iter()
        .find(|r| *r > 0)
        .unwrap_or(1);
        ZoneFacts {
            content_bytes,
            rate_bytes_per_sec: mib_s << 20,
        }
    }

    /// Ends the jobs whose rotation is over: a DEK job once its zone is idle
    /// or in grace, a KEK job once its thread returns (and restarts a KEK
    /// job a crash left without a thread).
    fn follow_running(&self, pool: &Arc<Pool>, schedule: &mut Schedule, facts: &[Facts], now: u64) {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut recorded = Vec::new();
        for (i, job) in schedule.jobs.iter().enumerate() {
            if !matches!(job.state, JobState::Running | JobState::AwaitingApproval) {
                continue;
            }
            match job.kind {
                KeyKind::Dek if job.state == JobState::AwaitingApproval => {}
                KeyKind::Dek => {
                    let phase = facts.iter().find(|f| f.name == job.zone).map(|f| f.phase);
                    if !job.coverage_recorded && phase.is_some_and(|p| p != RotationPhase::Window) {
                        recorded.push(i);
                    }
                    match phase {
                        // A zone skipped this time (unreadable) keeps its job;
                        // a zone that is gone ends it.
                        None if pool.catalog().zones.iter().any(|z| z.name == job.zone) => {}
                        None | Some(RotationPhase::Idle | RotationPhase::Grace) => done.push(i),
                        Some(_) => {}
                    }
                }
                KeyKind::Mac => match pool.mac_status(&job.zone) {
                    // The re-tag pass runs on the pool's rotation tick; the
                    // old key is destroyed when no tag names it.
                    Ok(st) if st.retiring_versions.is_empty() => done.push(i),
                    Ok(st) if st.blocks_retiring > 0 && st.blocks_retiring == st.retag_errors => {
                        failed.push((
                            i,
                            format!(
                                "{} blocks failed their integrity check when re-tagged and keep \
                                 the old MAC key; run `keyturn scrub --zone {}`",
                                st.retag_errors, job.zone
                            ),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) if !pool.catalog().zones.iter().any(|z| z.name == job.zone) => {
                        done.push(i)
                    }
                    Err(e) => {
                        tracing::warn!(zone = %job.zone, error = %e, "scheduler: MAC rotation status unreadable")
                    }
                },
                KeyKind::Kek => {
                    let mut workers = self.kek_workers.lock();
                    match workers.get(&job.zone) {
                        Some(h) if h.is_finished() => {
                            let h = workers.remove(&job.zone).expect("present");
                            match h.join() {
                                Ok(Ok(())) => done.push(i),
                                Ok(Err(e)) => failed.push((i, e)),
                                Err(_) => failed.push((i, "the KEK rotation panicked".into())),
                            }
                        }
                        Some(_) => {}
                        None => {
                            drop(workers);
                            tracing::info!(zone = %job.zone, "scheduler: resuming a KEK rotation");
                            let policies = self.policies.lock().clone();
                            self.spawn_kek(pool, &job.zone, policies.of(&job.zone));
                        }
                    }
                }
            }
        }
        for (i, e) in failed {
            let job = &mut schedule.jobs[i];
            self.fail(pool, job, &e, now);
        }
        for &i in &recorded {
            self.record_coverage(pool, schedule, i, facts);
        }
        for i in done.into_iter().rev() {
            let job = schedule.jobs.remove(i);
            tracing::info!(zone = %job.zone, kind = ?job.kind, "scheduled rotation done");
            let kind = kind_label(job.kind);
            metrics::counter!("keyturn_rotations_completed_total", "kind" => kind).increment(1);
            if let Some(t) = job.started_unix {
                metrics::histogram!("keyturn_rotation_duration_seconds", "kind" => kind)
                    .record(now.saturating_sub(t) as f64);
            }
            let _ = pool.record(
                AuditEvent::ok(match job.kind {
                    KeyKind::Dek => "schedule.dek.done",
                    KeyKind::Kek => "schedule.kek.done",
                    KeyKind::Mac => "schedule.mac.done",
                })
                .zone(&job.zone)
                .actor("scheduler"),
            );
        }
    }

    /// Starts one rotation the planner picked.
    fn begin(
        &self,
        pool: &Arc<Pool>,
        schedule: &mut Schedule,
        policies: &Policies,
        s: Start,
        now: u64,
    ) {
        let policy = policies.of(&s.zone);
        let result = match s.kind {
            KeyKind::Dek if s.urgency == Urgency::Emergency => {
                match self.begin_emergency(pool, schedule, &s.zone, now) {
                    Some(r) => r,
                    None => return,
                }
            }
            KeyKind::Dek => pool
                .rotation_prepare_with(
                    &s.zone,
                    Some(s.flip_at),
                    Some(policy.dek.grace.secs()),
                    (policy.rate_mib_s > 0).then_some(policy.rate_mib_s),
                )
                .map(drop),
            KeyKind::Kek => {
                self.spawn_kek(pool, &s.zone, policy);
                Ok(())
            }
            KeyKind::Mac => pool.mac_rotate(&s.zone).map(drop),
        };
        let action = match s.kind {
            KeyKind::Dek => "schedule.dek.start",
            KeyKind::Kek => "schedule.kek.start",
            KeyKind::Mac => "schedule.mac.start",
        };
        match result {
            Ok(()) => {
                tracing::info!(zone = %s.zone, kind = ?s.kind, urgency = ?s.urgency, flip_at = s.flip_at, "scheduled rotation started");
                metrics::counter!("keyturn_rotations_started_total", "kind" => kind_label(s.kind))
                    .increment(1);
                let _ = pool.record(AuditEvent::ok(action).zone(&s.zone).actor("scheduler"));
            }
            Err(e) => {
                let _ = pool.record(
                    AuditEvent::failed(action, &e)
                        .zone(&s.zone)
                        .actor("scheduler"),
                );
                if let Some(job) = schedule
                    .jobs
                    .iter_mut()
                    .find(|j| j.zone == s.zone && j.kind == s.kind)
                {
                    self.fail(pool, job, &e.to_string(), now);
                }
            }
        }
    }

    /// A failed start or run: back off, or give up (alert, audit, and abort
    /// the window when the policy says so).
    fn fail(&self, pool: &Pool, job: &mut super::queue::Job, error: &str, now: u64) {
        let s = &self.settings;
        let gave_up = record_failure(
            job,
            error,
            now,
            s.retry_base_secs,
            s.retry_max_secs,
            s.max_attempts,
        );
        if !gave_up {
            tracing::warn!(zone = %job.zone, kind = ?job.kind, attempts = job.attempts, next_try = job.next_try_unix, error, "scheduled rotation failed; will retry");
            return;
        }
        tracing::error!(zone = %job.zone, kind = ?job.kind, attempts = job.attempts, error, "ALERT: scheduled rotation failed for good");
        metrics::counter!("keyturn_rotations_failed_total", "kind" => kind_label(job.kind))
            .increment(1);
        let _ = pool.record(
            AuditEvent::failed("schedule.failed", &error)
                .zone(&job.zone)
                .actor("scheduler")
                .count(u64::from(job.attempts)),
        );
        let on_failure = self.policies.lock().of(&job.zone).on_failure;
        if job.kind == KeyKind::Dek && on_failure == OnFailure::Abort {
            match pool.rotation_abort(&job.zone) {
                Ok(_) => {
                    tracing::warn!(zone = %job.zone, "scheduler: the failed rotation's window was aborted")
                }
                Err(e) => {
                    tracing::warn!(zone = %job.zone, error = %e, "scheduler: no window to abort")
                }
            }
        }
    }

    fn spawn_kek(&self, pool: &Arc<Pool>, zone: &str, policy: &Policy) {
        let weak = Arc::downgrade(pool);
        let (zone_name, batch, pause) = (zone.to_string(), policy.kek_batch, policy.kek_pause());
        let handle = std::thread::Builder::new()
            .name(format!("keyturn-kek-{zone}"))
            .spawn(move || {
                let pool = weak.upgrade().ok_or("the pool is closing")?;
                pool.rotate_kek(&zone_name, batch, pause)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
        match handle {
            Ok(h) => {
                self.kek_workers.lock().insert(zone.to_string(), h);
            }
            Err(e) => {
                tracing::error!(zone, error = %e, "scheduler: cannot start a KEK rotation thread")
            }
        }
    }

    fn zone_exists(&self, pool: &Pool, zone: &str) -> Result<(), AdminError> {
        if pool.catalog().zones.iter().any(|z| z.name == zone) {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!("no zone named {zone:?}")))
        }
    }

    fn status(&self) -> serde_json::Value {
        let s = self.schedule.lock();
        let count = |st: JobState| s.jobs.iter().filter(|j| j.state == st).count();
        let threat = self.threat.lock().clone();
        serde_json::json!({
            "enabled": self.settings.enabled,
            "paused": s.paused,
            "held": s.held,
            "check_interval_ms": self.settings.check_interval_ms,
            "max_concurrent": self.settings.max_concurrent,
            "running": count(JobState::Running),
            "queued": count(JobState::Queued),
            "failed": count(JobState::Failed),
            "awaiting_approval": count(JobState::AwaitingApproval),
            "flips": s.flips,
            "threat": threat,
            "last_check": *self.last.lock(),
            "test_clock": crate::clock::is_test(),
            "now_unix": crate::clock::unix_now(),
        })
    }

    /// Changes the durable schedule with `f`, persists it, audits `action`.
    fn change(
        &self,
        pool: &Pool,
        action: &'static str,
        zone: Option<&str>,
        f: impl FnOnce(&mut Schedule),
    ) -> Result<serde_json::Value, AdminError> {
        {
            let _c = self.check_lock.lock();
            let mut s = self.schedule.lock().clone();
            f(&mut s);
            s.save(&self.dir)
                .map_err(|e| AdminError::Internal(e.to_string()))?;
            *self.schedule.lock() = s;
        }
        let mut event = AuditEvent::ok(action);
        if let Some(z) = zone {
            event = event.zone(z);
        }
        pool.record(event).map_err(AdminError::from)?;
        tracing::info!(action, zone, "scheduler changed");
        Ok(self.status())
    }
}

/// The `kind` label of the rotation metrics.
fn kind_label(kind: KeyKind) -> &'static str {
    kind.name()
}

/// Failed jobs go back to the queue with a fresh count.
fn retry_failed(s: &mut Schedule, zone: Option<&str>) {
    for j in &mut s.jobs {
        if j.state == JobState::Failed && zone.is_none_or(|z| z == j.zone) {
            j.state = JobState::Queued;
            j.attempts = 0;
            j.next_try_unix = 0;
        }
    }
}

/// The age of the zone's active key of `purpose`.
fn key_age(file: &ZoneKeyFile, purpose: Purpose) -> KeyAge {
    let mut latest = None;
    for r in file.records().iter().filter(|r| r.purpose == purpose) {
        if r.state == KeyState::Active {
            return KeyAge::ActiveSince(r.activated_unix.unwrap_or(r.created_unix));
        }
        if latest.is_none_or(|(v, _)| r.version > v) {
            latest = Some((r.version, r.state));
        }
    }
    match latest {
        Some((_, KeyState::Compromised)) => KeyAge::Compromised,
        _ => KeyAge::Missing,
    }
}

struct Facts {
    id: crate::ids::ZoneId,
    dek_period: Span,
    kek_period: Span,
    mac_period: Span,
    threat_level: ThreatLevel,
    threat_emergency: bool,
    /// The DEK rotation's plan, when its deadline is near or it is under way.
    plan: Option<Prediction>,
    /// Blocks by class (with the plan).
    census: Option<crate::zone::classes::ClassCensus>,
    staging_free_bytes: u64,
    /// The staging rate of an open (not emergency) window.
    window_rate: Option<f64>,
    name: String,
    dek: KeyAge,
    kek: KeyAge,
    mac: KeyAge,
    rotation_secs: u64,
    dek_busy: bool,
    phase: RotationPhase,
}

impl ScheduleService for Scheduler {
    fn request(&self, req: ScheduleRequest) -> Result<serde_json::Value, AdminError> {
        let pool = self
            .pool
            .upgrade()
            .ok_or_else(|| AdminError::Internal("the pool is closing".into()))?;
        match req {
            ScheduleRequest::Status => Ok(self.status()),
            ScheduleRequest::Schedule => Ok(self.schedule_view()),
            ScheduleRequest::Add(req) => self.add(&pool, req),
            ScheduleRequest::Execute(req) => self.execute(&pool, req),
            ScheduleRequest::Health => Ok(self.health(&pool)),
            ScheduleRequest::Pause => {
                self.change(&pool, "schedule.pause", None, |s| s.paused = true)
            }
            ScheduleRequest::Resume => self.change(&pool, "schedule.resume", None, |s| {
                s.paused = false;
                retry_failed(s, None);
            }),
            ScheduleRequest::Hold(z) => {
                self.zone_exists(&pool, &z)?;
                self.change(&pool, "schedule.hold", Some(&z), |s| {
                    s.held.insert(z.clone());
                })
            }
            ScheduleRequest::Release(z) => {
                self.zone_exists(&pool, &z)?;
                self.change(&pool, "schedule.release", Some(&z), |s| {
                    s.held.remove(&z);
                    retry_failed(s, Some(&z));
                })
            }
            ScheduleRequest::GetPolicy(z) => {
                self.zone_exists(&pool, &z)?;
                let p = self.policies.lock();
                Ok(serde_json::json!({
                    "zone": z,
                    "source": if p.zones.contains_key(&z) { "zone" } else { "default" },
                    "policy": p.of(&z),
                    "held": self.schedule.lock().held.contains(&z),
                }))
            }
            ScheduleRequest::Plan(z) => {
                self.zone_exists(&pool, &z)?;
                self.plan_report(&pool, &z)
            }
            ScheduleRequest::GetThreat => Ok(self.threat_report(&pool)),
            ScheduleRequest::Threat(change) => self.change_threat(&pool, &change, "api"),
            ScheduleRequest::Approve(z, tokens) => {
                self.zone_exists(&pool, &z)?;
                self.approve(&pool, &z, &tokens)
            }
            ScheduleRequest::SetPolicy(z, policy) => {
                self.zone_exists(&pool, &z)?;
                let content = pool.rotation_status(&z)?.content_blocks * BLOCK_SIZE as u64;
                policy
                    .validate(&z, self.facts_for(&pool, &policy, content))
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
                {
                    let mut p = self.policies.lock();
                    let mut next = p.clone();
                    next.zones.insert(z.clone(), (*policy).clone());
                    next.save(&self.dir)
                        .map_err(|e| AdminError::Internal(e.to_string()))?;
                    *p = next;
                    write_modes::apply(&pool, &p);
                }
                pool.record(AuditEvent::ok("policy.set").zone(&z))
                    .map_err(AdminError::from)?;
                Ok(serde_json::json!({"zone": z, "source": "zone", "policy": *policy}))
            }
        }
    }
}
