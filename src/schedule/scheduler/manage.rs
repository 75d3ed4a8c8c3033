//! What the management API asks of the scheduler beyond its own loop:
//! rotations queued by hand (at a time or in the next window), started
//! now, and the health view (every key's age against its cryptoperiod).

use std::sync::Arc;

use serde::Serialize;

use super::{Scheduler, key_age};
use crate::admin::{AdminError, ExecuteRequest, ScheduleRotationRequest};
use crate::audit::AuditEvent;
use crate::keys::wrap::Purpose;
use crate::keys::zone_keys::{KeyState, ZoneKeyFile};
use crate::pool::Pool;
use crate::schedule::queue::{Job, JobState, KeyAge, KeyKind, Start, Urgency};

/// Longest reason kept with a job.
const MAX_REASON: usize = 200;

/// One zone key's age against its cryptoperiod.
#[derive(Clone, Debug, Serialize)]
pub struct KeyHealth {
    /// Zone.
    pub zone: String,
    /// `dek` or `kek`.
    pub purpose: &'static str,
    /// The active version (`None`: no active key).
    pub version: Option<u32>,
    /// `ok`, `due`, `overdue`, `severely_overdue`, `missing` or `compromised`.
    pub state: &'static str,
    /// Seconds since it became active.
    pub age_secs: Option<u64>,
    /// Its cryptoperiod under the zone's policy.
    pub cryptoperiod_secs: u64,
    /// Seconds until it is due (negative: overdue by that much).
    pub due_in_secs: Option<i64>,
}

pub(super) fn state_name(u: Option<Urgency>) -> &'static str {
    match u {
        None => "ok",
        Some(Urgency::Due) => "due",
        Some(Urgency::Overdue) => "overdue",
        Some(Urgency::SeverelyOverdue) => "severely_overdue",
        Some(Urgency::Missing) => "missing",
        Some(Urgency::Emergency) => "compromised",
    }
}

/// Why a job is in the queue, for `GET schedule`.
pub(super) fn job_reason(job: &Job) -> String {
    if let Some(r) = &job.reason {
        return r.clone();
    }
    let key = match job.kind {
        KeyKind::Dek => "DEK",
        KeyKind::Kek => "KEK",
        KeyKind::Mac => "MAC key",
    };
    match job.urgency {
        Urgency::Due => format!("the active {key} reached its cryptoperiod"),
        Urgency::Overdue => format!("the active {key} is past 125% of its cryptoperiod"),
        Urgency::SeverelyOverdue => {
            format!("the active {key} is past 150% of its cryptoperiod: no window waited for")
        }
        Urgency::Missing => format!("the zone has no active {key}"),
        Urgency::Emergency => format!("the active {key} is marked compromised"),
    }
}

impl Scheduler {
    /// Every zone's active DEK, KEK and MAC key against the zone's policy, now.
    pub fn key_health(&self, pool: &Pool) -> Vec<KeyHealth> {
        let now = crate::clock::unix_now();
        let policies = self.policies.lock().clone();
        let mut out = Vec::new();
        for z in pool.catalog().zones {
            let file = match ZoneKeyFile::load(&Pool::zone_key_path(pool.dir(), z.id)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(zone = %z.name, error = %e, "health: zone key file unreadable");
                    continue;
                }
            };
            let policy = policies.of(&z.name);
            for (purpose, name, period) in [
                (Purpose::Dek, "dek", policy.dek_period()),
                (Purpose::Kek, "kek", policy.kek_period()),
                (Purpose::Mac, "mac", policy.mac_period()),
            ] {
                let age = key_age(&file, purpose);
                let version = file
                    .records()
                    .iter()
                    .find(|r| r.purpose == purpose && r.state == KeyState::Active)
                    .map(|r| r.version);
                let since = match age {
                    KeyAge::ActiveSince(t) => Some(t),
                    _ => None,
                };
                out.push(KeyHealth {
                    zone: z.name.clone(),
                    purpose: name,
                    version,
                    state: state_name(age.urgency(period, now)),
                    age_secs: since.map(|t| now.saturating_sub(t)),
                    cryptoperiod_secs: period.secs(),
                    due_in_secs: since.map(|t| {
                        (i128::from(t) + i128::from(period.secs()) - i128::from(now))
                            .clamp(i128::from(i64::MIN), i128::from(i64::MAX))
                            as i64
                    }),
                });
            }
        }
        out
    }

    /// Whether the scheduler's thread runs.
    pub fn is_up(&self) -> bool {
        self.settings.enabled
            && self
                .thread
                .lock()
                .as_ref()
                .is_some_and(|h| !h.is_finished())
    }

    /// `GET /api/v1/key-rotation/health`.
    pub(super) fn health(&self, pool: &Pool) -> serde_json::Value {
        let keys = self.key_health(pool);
        let (queued, running, failed, paused, next) = {
            let s = self.schedule.lock();
            let count = |st: JobState| s.jobs.iter().filter(|j| j.state == st).count();
            let next = s
                .jobs
                .iter()
                .filter(|j| j.state != JobState::Failed)
                .filter_map(|j| j.flip_at_unix.or(j.at_unix))
                .min();
            (
                count(JobState::Queued),
                count(JobState::Running),
                count(JobState::Failed),
                s.paused,
                next,
            )
        };
        let up = self.is_up();
        let count = |st: &str| keys.iter().filter(|k| k.state == st).count();
        let mut problems = Vec::new();
        if !up {
            problems.push("the rotation scheduler is not running".to_string());
        }
        if paused {
            problems.push("the rotation scheduler is paused".into());
        }
        if failed > 0 {
            problems.push(format!(
                "{failed} scheduled rotation(s) failed after retries"
            ));
        }
        for k in keys.iter().filter(|k| !matches!(k.state, "ok" | "due")) {
            problems.push(format!("zone {}: the {} is {}", k.zone, k.purpose, k.state));
        }
        let now = crate::clock::unix_now();
        // The scheduler does not rotate the root key: due is a problem.
        let root = self.root_health(pool, now);
        if !matches!(root["state"].as_str(), Some("ok" | "unknown")) {
            problems.push(format!(
                "the root key is {}: rotate it with `keyturn keys rotate-root`",
                root["state"].as_str().unwrap_or("?")
            ));
        }
        // The next rotation: a job's flip or start time, else the first key
        // to fall due.
        let next_in = next.map(|t| t as i64 - now as i64).or_else(|| {
            keys.iter()
                .filter_map(|k| k.due_in_secs)
                .min()
                .map(|d| d.max(0))
        });
        serde_json::json!({
            "status": if problems.is_empty() { "ok" } else { "degraded" },
            "problems": problems,
            "scheduler": {
                "up": up,
                "enabled": self.settings.enabled,
                "paused": paused,
                "queued": queued,
                "running": running,
                "failed": failed,
            },
            "counts": {
                "due": count("due"),
                "overdue": count("overdue"),
                "severely_overdue": count("severely_overdue"),
                "missing": count("missing"),
                "compromised": count("compromised"),
            },
            "next_rotation_in_secs": next_in,
            "now_unix": now,
            "keys": keys,
            "root_key": root,
        })
    }

    /// `POST schedule` / `schedule-all`: queue a rotation of one zone or of
    /// every zone that has no job of that kind yet.
    pub(super) fn add(
        &self,
        pool: &Pool,
        req: ScheduleRotationRequest,
    ) -> Result<serde_json::Value, AdminError> {
        let kind = req.kind.unwrap_or(KeyKind::Dek);
        let reason = match req.reason.as_deref().map(str::trim) {
            Some(r) if r.chars().any(char::is_control) || r.len() > MAX_REASON => {
                return Err(AdminError::Invalid(format!(
                    "reason must be at most {MAX_REASON} bytes of printable text"
                )));
            }
            Some(r) if !r.is_empty() => Some(r.to_string()),
            _ => None,
        };
        let zones: Vec<String> = match &req.zone {
            Some(z) => {
                self.zone_exists(pool, z)?;
                vec![z.clone()]
            }
            None => pool.catalog().zones.into_iter().map(|z| z.name).collect(),
        };
        let now = crate::clock::unix_now();
        let who = crate::actor::current().unwrap_or_else(|| "the command line".into());
        let why = format!(
            "requested by {who}{}",
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        let (mut added, mut skipped) = (Vec::new(), Vec::new());
        {
            let _c = self.check_lock.lock();
            let mut s = self.schedule.lock().clone();
            for z in &zones {
                if let Some(j) = s.jobs.iter().find(|j| &j.zone == z && j.kind == kind) {
                    if req.zone.is_some() {
                        return Err(AdminError::Conflict(format!(
                            "zone {z:?} already has a {} rotation {}; execute it, or wait for it",
                            kind_name(kind),
                            state_word(j.state)
                        )));
                    }
                    skipped.push(z.clone());
                    continue;
                }
                s.jobs.push(Job {
                    zone: z.clone(),
                    kind,
                    urgency: Urgency::Due,
                    state: JobState::Queued,
                    attempts: 0,
                    queued_unix: now,
                    next_try_unix: 0,
                    started_unix: None,
                    flip_at_unix: None,
                    last_error: None,
                    at_unix: req.at_unix,
                    reason: Some(why.clone()),
                    open_at_unix: None,
                    predicted_coverage: None,
                    replans: 0,
                    coverage_recorded: false,
                    approval_request: None,
                });
                added.push(z.clone());
            }
            s.save(&self.dir)
                .map_err(|e| AdminError::Internal(e.to_string()))?;
            *self.schedule.lock() = s;
        }
        for z in &added {
            pool.record(
                AuditEvent::ok(match kind {
                    KeyKind::Dek => "schedule.dek.add",
                    KeyKind::Kek => "schedule.kek.add",
                    KeyKind::Mac => "schedule.mac.add",
                })
                .zone(z),
            )
            .map_err(AdminError::from)?;
            metrics::counter!("keyturn_rotations_scheduled_total", "kind" => kind_name(kind), "by" => "request").increment(1);
        }
        tracing::info!(
            ?added,
            ?skipped,
            kind = kind_name(kind),
            at = req.at_unix,
            "rotations scheduled by request"
        );
        Ok(serde_json::json!({
            "kind": kind,
            "at_unix": req.at_unix,
            "scheduled": added,
            "skipped": skipped,
        }))
    }

    /// `POST execute`: the zone's queued (or failed) job starts now,
    /// ignoring the window, the pause and the cap (an operator asked).
    pub(super) fn execute(
        &self,
        pool: &Arc<Pool>,
        req: ExecuteRequest,
    ) -> Result<serde_json::Value, AdminError> {
        self.zone_exists(pool, &req.zone)?;
        let kind = req.kind.unwrap_or(KeyKind::Dek);
        let now = crate::clock::unix_now();
        let _c = self.check_lock.lock();
        let mut s = self.schedule.lock().clone();
        let Some(i) = s
            .jobs
            .iter()
            .position(|j| j.zone == req.zone && j.kind == kind)
        else {
            return Err(AdminError::NotFound(format!(
                "zone {:?} has no scheduled {} rotation; POST /api/v1/key-rotation/schedule first",
                req.zone,
                kind_name(kind)
            )));
        };
        if s.jobs[i].state == JobState::Running {
            return Err(AdminError::Conflict(format!(
                "the {} rotation of zone {:?} is running already",
                kind_name(kind),
                req.zone
            )));
        }
        if kind == KeyKind::Dek {
            let phase = pool.rotation_status(&req.zone)?.phase;
            if phase != crate::admin::RotationPhase::Idle
                && phase != crate::admin::RotationPhase::Grace
            {
                return Err(AdminError::Conflict(format!(
                    "zone {:?} has a DEK rotation under way ({phase:?}); it cannot start another",
                    req.zone
                )));
            }
        }
        let job = &mut s.jobs[i];
        job.state = JobState::Running;
        job.started_unix = Some(now);
        job.flip_at_unix = (kind == KeyKind::Dek).then_some(now);
        job.next_try_unix = 0;
        let start = Start {
            zone: job.zone.clone(),
            kind,
            urgency: job.urgency,
            flip_at: now,
        };
        let policies = self.policies.lock().clone();
        self.begin(pool, &mut s, &policies, start, now);
        let job = s.jobs[i].clone();
        s.save(&self.dir)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        *self.schedule.lock() = s;
        if job.state != JobState::Running {
            let e = job.last_error.unwrap_or_else(|| "it did not start".into());
            let _ = pool.record(AuditEvent::failed("schedule.execute", &e).zone(&req.zone));
            return Err(AdminError::Conflict(format!(
                "the {} rotation of zone {:?} did not start: {e}",
                kind_name(kind),
                req.zone
            )));
        }
        pool.record(AuditEvent::ok("schedule.execute").zone(&req.zone))
            .map_err(AdminError::from)?;
        Ok(serde_json::json!({ "started": job }))
    }
}

fn kind_name(kind: KeyKind) -> &'static str {
    kind.name()
}

fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::AwaitingApproval => "waiting for dual-control approvals",
        JobState::Failed => "that failed (resume the scheduler or release the zone to retry)",
    }
}

impl Scheduler {
    /// `GET schedule`: the queue in the order the planner takes it (its
    /// `priority`, 1 first), each job with why it is there.
    pub(super) fn schedule_view(&self) -> serde_json::Value {
        let s = self.schedule.lock().clone();
        let mut order: Vec<&Job> = s.jobs.iter().collect();
        order.sort_by(|a, b| {
            b.urgency
                .cmp(&a.urgency)
                .then(a.queued_unix.cmp(&b.queued_unix))
                .then(a.zone.cmp(&b.zone))
        });
        let jobs: Vec<serde_json::Value> = order
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let mut v = serde_json::to_value(j).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("priority".into(), (i + 1).into());
                    o.insert("reason".into(), job_reason(j).into());
                }
                v
            })
            .collect();
        serde_json::json!({ "paused": s.paused, "held": s.held, "jobs": jobs, "flips": s.flips })
    }
}
