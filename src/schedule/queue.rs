//! The durable schedule and the planner: which keys are due, in what
//! order they rotate, and which may start now under the pool-wide cap.
//!
//! The planner is a pure function of the schedule, what each zone's keys
//! look like and the time, so it is tested and benchmarked without a pool.
//!
//! `schedule.json` in the pool directory, replaced atomically at every
//! change:
//!
//! ```json
//! { "paused": false, "held": ["z3"],
//!   "jobs": [ { "zone": "z1", "kind": "dek", "urgency": "due", "state": "running",
//!               "attempts": 0, "queued_unix": 1, "next_try_unix": 0,
//!               "started_unix": 5, "flip_at_unix": 7200, "last_error": null,
//!               "open_at_unix": 5, "predicted_coverage": 100.0, "replans": 0 } ],
//!   "flips": { "z2": { "flipped_unix": 7190, "predicted_percent": 100.0,
//!                      "achieved_percent": 100.0, "met": true,
//!                      "target_blocks": 800, "staged_blocks": 800 } } }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::policy::{Policy, Span};

/// The schedule file in the pool directory.
pub const SCHEDULE_FILE: &str = "schedule.json";

/// Which key of a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// The data key: staged rotation, flip, migration.
    Dek,
    /// The key-encryption key: online re-wrap in batches.
    Kek,
    /// The MAC key of the content tags: a new key, then a background
    /// re-tag pass, then the old key's destruction.
    Mac,
}

impl KeyKind {
    /// Its name in JSON, metrics labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Dek => "dek",
            KeyKind::Kek => "kek",
            KeyKind::Mac => "mac",
        }
    }
}

/// How urgent a rotation is; higher first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Urgency {
    /// The key reached its cryptoperiod (100%): rotates in the next window.
    Due,
    /// Past 125%: still waits for the window, ahead of due keys.
    Overdue,
    /// Past 150%: high priority, bypasses the maintenance window.
    SeverelyOverdue,
    /// No active key, or it is destroyed: high priority, no window.
    Missing,
    /// The active key is compromised: immediate, preempts the cap.
    Emergency,
}

/// What a zone's key looks like to the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAge {
    /// Active since this time (Unix seconds).
    ActiveSince(u64),
    /// No active key, or the active one is destroyed.
    Missing,
    /// The active key is marked compromised.
    Compromised,
}

impl KeyAge {
    /// How urgent this key's rotation is at `now` under cryptoperiod
    /// `period`, or `None` when it is not due.
    pub fn urgency(self, period: Span, now: u64) -> Option<Urgency> {
        match self {
            KeyAge::Compromised => Some(Urgency::Emergency),
            KeyAge::Missing => Some(Urgency::Missing),
            KeyAge::ActiveSince(t) => {
                let age = u128::from(now.saturating_sub(t)) * 100;
                let p = u128::from(period.0.max(1));
                if age > p * 150 {
                    Some(Urgency::SeverelyOverdue)
                } else if age >= p * 125 {
                    Some(Urgency::Overdue)
                } else if age >= p * 100 {
                    Some(Urgency::Due)
                } else {
                    None
                }
            }
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its window, a free slot under the cap, or its retry time.
    Queued,
    /// Started; done when the rotation is.
    Running,
    /// Gave up after the retry limit: waits for the scheduler's resume or
    /// the zone's release.
    Failed,
    /// An emergency rotation under dual control: the approval request is
    /// filed, the operators alerted; it runs once approvals arrive.
    AwaitingApproval,
}

/// One rotation the scheduler owes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Zone.
    pub zone: String,
    /// Which key.
    pub kind: KeyKind,
    /// How urgent.
    pub urgency: Urgency,
    /// Where it is.
    pub state: JobState,
    /// Failed starts so far.
    pub attempts: u32,
    /// When it was queued.
    pub queued_unix: u64,
    /// Not retried before this time.
    pub next_try_unix: u64,
    /// When it was started.
    #[serde(default)]
    pub started_unix: Option<u64>,
    /// The flip time it was started with (DEK).
    #[serde(default)]
    pub flip_at_unix: Option<u64>,
    /// The last failure.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Asked for a time (`POST schedule`): a DEK flips then (starting its
    /// staging lead before), a KEK starts then; no maintenance window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix: Option<u64>,
    /// Why it was asked for (`POST schedule`: who and their reason), or
    /// why an emergency runs (a critical threat's reason). Jobs the
    /// scheduler queued itself otherwise have none; their urgency says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the plan opened (or opens) its window (DEK).
    #[serde(default)]
    pub open_at_unix: Option<u64>,
    /// The coverage of the target predicted at the flip, percent (DEK).
    #[serde(default)]
    pub predicted_coverage: Option<f64>,
    /// Times a re-plan moved the flip.
    #[serde(default)]
    pub replans: u32,
    /// The achieved coverage at the flip is recorded.
    #[serde(default)]
    pub coverage_recorded: bool,
    /// The approval request filed for it (dual control), a file in the pool.
    #[serde(default)]
    pub approval_request: Option<String>,
}

/// Predicted and achieved staging coverage at a zone's last flip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlipRecord {
    /// When the flip happened (Unix seconds).
    pub flipped_unix: Option<u64>,
    /// Predicted share of the target staged at the flip, percent.
    pub predicted_percent: Option<f64>,
    /// Achieved share, percent.
    pub achieved_percent: f64,
    /// Whether every class met its requirement.
    pub met: bool,
    /// Blocks in the target.
    pub target_blocks: u64,
    /// Of those, staged at the flip.
    pub staged_blocks: u64,
}

/// The durable schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    /// Paused pool-wide: nothing is started.
    pub paused: bool,
    /// Zones on hold: nothing of theirs is started.
    pub held: BTreeSet<String>,
    /// Queued, running and failed rotations.
    pub jobs: Vec<Job>,
    /// Each zone's last scheduled flip: predicted and achieved coverage.
    pub flips: BTreeMap<String, FlipRecord>,
}

/// Errors reading or writing the schedule file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ScheduleFileError {
    /// File.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

impl Schedule {
    /// The file in pool directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(SCHEDULE_FILE)
    }

    /// Reads it (empty when there is no file).
    pub fn load(dir: &Path) -> Result<Self, ScheduleFileError> {
        let path = Self::path(dir);
        let err = |m: String| ScheduleFileError {
            path: path.clone(),
            message: m,
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Writes it atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ScheduleFileError> {
        let path = Self::path(dir);
        let err = |m: String| ScheduleFileError {
            path: path.clone(),
            message: m,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        crate::pool::write_atomic(&path, &text).map_err(|e| err(e.to_string()))
    }

    /// Running jobs.
    pub fn running(&self) -> usize {
        self.jobs
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count()
    }

    fn job_mut(&mut self, zone: &str, kind: KeyKind) -> Option<&mut Job> {
        self.jobs
            .iter_mut()
            .find(|j| j.zone == zone && j.kind == kind)
    }
}

/// A zone as the planner sees it.
#[derive(Clone, Debug)]
pub struct ZoneView<'a> {
    /// Name.
    pub name: &'a str,
    /// Its policy.
    pub policy: &'a Policy,
    /// Its active DEK.
    pub dek: KeyAge,
    /// Its active KEK.
    pub kek: KeyAge,
    /// Its active MAC key.
    pub mac: KeyAge,
    /// Seconds a rotation of its data is expected to take (staging lead),
    /// when there is no plan.
    pub rotation_secs: u64,
    /// An operator's DEK rotation is under way: none is started.
    pub dek_busy: bool,
    /// The DEK cryptoperiod (sensitivity and threat level applied).
    pub dek_period: Span,
    /// The KEK cryptoperiod (likewise).
    pub kek_period: Span,
    /// The MAC key cryptoperiod (likewise).
    pub mac_period: Span,
    /// A critical threat asks for an emergency DEK rotation.
    pub threat_emergency: bool,
    /// The predictive plan of the DEK rotation: (open at, flip at).
    pub dek_plan: Option<(u64, u64)>,
}

/// A rotation to start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// Zone.
    pub zone: String,
    /// Which key.
    pub kind: KeyKind,
    /// How urgent.
    pub urgency: Urgency,
    /// For a DEK: flip at this time.
    pub flip_at: u64,
}

/// One planning pass: queues keys that became due (or more urgent), then
/// picks what starts now, highest urgency first, oldest first, at most
/// `cap` running at once (an emergency ignores the cap). A DEK below
/// severely overdue starts `lead` before its maintenance window, so that it
/// flips at the window's start (or now, inside one). Started jobs are
/// marked running in `schedule`; the caller persists it.
pub fn plan(schedule: &mut Schedule, zones: &[ZoneView<'_>], now: u64, cap: usize) -> Vec<Start> {
    for z in zones {
        if schedule.held.contains(z.name) {
            continue;
        }
        let dek = if z.threat_emergency {
            KeyAge::Compromised
        } else {
            z.dek
        };
        for (kind, age, period) in [
            (KeyKind::Dek, dek, z.dek_period),
            (KeyKind::Kek, z.kek, z.kek_period),
            (KeyKind::Mac, z.mac, z.mac_period),
        ] {
            // A zone without an active MAC key has nothing to rotate from
            // (a MAC rotation retires the active key).
            if kind == KeyKind::Mac && age == KeyAge::Missing {
                continue;
            }
            // A plan's window may open before the key is due, so that it
            // flips before its cryptoperiod ends.
            let planned = kind == KeyKind::Dek && z.dek_plan.is_some_and(|(open, _)| open <= now);
            let Some(urgency) = age.urgency(period, now).or(planned.then_some(Urgency::Due)) else {
                continue;
            };
            if kind == KeyKind::Dek && z.dek_busy && urgency != Urgency::Emergency {
                continue;
            }
            match schedule.job_mut(z.name, kind) {
                Some(j) => {
                    if j.state == JobState::Queued && urgency > j.urgency {
                        j.urgency = urgency;
                    }
                }
                None => schedule.jobs.push(Job {
                    zone: z.name.to_string(),
                    kind,
                    urgency,
                    state: JobState::Queued,
                    attempts: 0,
                    queued_unix: now,
                    next_try_unix: 0,
                    started_unix: None,
                    flip_at_unix: None,
                    last_error: None,
                    at_unix: None,
                    reason: None,
                    open_at_unix: None,
                    predicted_coverage: None,
                    replans: 0,
                    coverage_recorded: false,
                    approval_request: None,
                }),
            }
        }
    }
    if schedule.paused {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..schedule.jobs.len())
        .filter(|&i| schedule.jobs[i].state == JobState::Queued)
        .collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&schedule.jobs[a], &schedule.jobs[b]);
        b.urgency
            .cmp(&a.urgency)
            .then(a.queued_unix.cmp(&b.queued_unix))
            .then(a.zone.cmp(&b.zone))
    });
    let mut running = schedule.running();
    let mut starts = Vec::new();
    for i in order {
        let job = &schedule.jobs[i];
        if schedule.held.contains(&job.zone) || job.next_try_unix > now {
            continue;
        }
        let emergency = job.urgency == Urgency::Emergency;
        if running >= cap && !emergency {
            continue;
        }
        let Some(z) = zones.iter().find(|z| z.name == job.zone) else {
            continue;
        };
        let flip_at = match (job.kind, job.at_unix) {
            // A time asked for: start the lead before it, flip at it.
            (_, Some(at)) if job.urgency < Urgency::SeverelyOverdue => {
                let lead = if job.kind == KeyKind::Dek {
                    if z.dek_busy && !emergency {
                        continue;
                    }
                    z.rotation_secs
                } else {
                    0
                };
                if at.saturating_sub(lead) > now {
                    continue;
                }
                at.max(now)
            }
            (kind, _) => match kind {
                KeyKind::Kek | KeyKind::Mac => now,
                KeyKind::Dek if z.dek_busy && !emergency => continue,
                KeyKind::Dek if job.urgency >= Urgency::SeverelyOverdue => now,
                // The predictive plan: open the window when it says, flip when it says.
                KeyKind::Dek if z.dek_plan.is_some() => match z.dek_plan {
                    Some((open, flip)) if open <= now => flip.max(now),
                    _ => continue,
                },
                KeyKind::Dek => {
                    let w = &z.policy.window;
                    match w.containing(now) {
                        Some((_, end)) => {
                            (now + z.rotation_secs).min(end.saturating_sub(1)).max(now)
                        }
                        None => match w.next_start(now) {
                            Some(s) if s.saturating_sub(z.rotation_secs) <= now => s,
                            _ => continue,
                        },
                    }
                }
            },
        };
        let job = &mut schedule.jobs[i];
        job.state = JobState::Running;
        job.started_unix = Some(now);
        job.flip_at_unix = (job.kind == KeyKind::Dek).then_some(flip_at);
        running += 1;
        starts.push(Start {
            zone: job.zone.clone(),
            kind: job.kind,
            urgency: job.urgency,
            flip_at,
        });
    }
    starts
}

/// After a failed start: back off exponentially (`base` × 2^(attempts-1),
/// at most `max`), or give up after `max_attempts`. Returns whether the
/// job has failed for good.
pub fn record_failure(
    job: &mut Job,
    error: &str,
    now: u64,
    base: u64,
    max: u64,
    max_attempts: u32,
) -> bool {
    job.attempts += 1;
    job.last_error = Some(error.to_string());
    job.started_unix = None;
    if job.attempts >= max_attempts {
        job.state = JobState::Failed;
        return true;
    }
    let shift = (job.attempts - 1).min(30);
    job.state = JobState::Queued;
    job.next_try_unix = now + base.saturating_mul(1 << shift).min(max);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::policy::Window;

    const DAY: u64 = 86_400;
    // Monday 2026-12-07 00:00 UTC.
    const MON: u64 = 20_794 * DAY;

    fn policy() -> Policy {
        let mut p = Policy::from_preset("90d").unwrap();
        p.window = Window {
            start: "02:00".into(),
            duration: Span(2 * 3600),
            days: crate::schedule::policy::Weekday::ALL.to_vec(),
        };
        p
    }

    fn view<'a>(name: &'a str, p: &'a Policy, dek_days_old: u64, now: u64) -> ZoneView<'a> {
        ZoneView {
            name,
            policy: p,
            dek: KeyAge::ActiveSince(now - dek_days_old * DAY),
            kek: KeyAge::ActiveSince(now),
            mac: KeyAge::ActiveSince(now),
            rotation_secs: 0,
            dek_busy: false,
            dek_period: p.dek_period(),
            kek_period: p.kek_period(),
            mac_period: p.mac_period(),
            threat_emergency: false,
            dek_plan: None,
        }
    }

    #[test]
    fn ages_map_to_urgency() {
        let p = Span::days(100);
        let a = |d: u64| KeyAge::ActiveSince(MON - d * DAY).urgency(p, MON);
        assert_eq!(a(99), None);
        assert_eq!(a(100), Some(Urgency::Due));
        assert_eq!(a(125), Some(Urgency::Overdue));
        assert_eq!(a(150), Some(Urgency::Overdue));
        assert_eq!(a(151), Some(Urgency::SeverelyOverdue));
        assert_eq!(
            KeyAge::Compromised.urgency(p, MON),
            Some(Urgency::Emergency)
        );
    }

    #[test]
    fn a_due_key_waits_for_its_window_and_a_severe_one_does_not() {
        let p = policy();
        let mut s = Schedule::default();
        let zones = [view("a", &p, 91, MON), view("b", &p, 140, MON)];
        let starts = plan(&mut s, &zones, MON, 2);
        assert_eq!(starts.len(), 1);
        assert_eq!((starts[0].zone.as_str(), starts[0].flip_at), ("b", MON));
        assert_eq!(s.jobs.len(), 2);
        // In the window: a starts and flips now.
        let at = MON + 2 * 3600 + 60;
        let starts = plan(&mut s, &[view("a", &p, 91, at)], at, 2);
        assert_eq!(starts.len(), 1);
        assert_eq!(starts[0].flip_at, at);
        // A lead of 3 hours starts it at 23:00 the day before, to flip at 02:00.
        let mut s = Schedule::default();
        let mut v = view("a", &p, 91, MON - 3600);
        v.rotation_secs = 3 * 3600;
        let starts = plan(&mut s, &[v], MON - 3600, 2);
        assert_eq!(starts[0].flip_at, MON + 2 * 3600);
    }

    #[test]
    fn the_cap_holds_and_an_emergency_ignores_it() {
        let p = policy();
        let mut s = Schedule::default();
        let at = MON + 3 * 3600;
        let mut zones: Vec<ZoneView<'_>> = ["a", "b", "c"]
            .iter()
            .map(|n| view(n, &p, 95, at))
            .collect();
        assert_eq!(plan(&mut s, &zones, at, 2).len(), 2);
        assert_eq!(plan(&mut s, &zones, at, 2).len(), 0);
        assert_eq!(s.running(), 2);
        zones.push(ZoneView {
            dek: KeyAge::Compromised,
            ..view("d", &p, 0, at)
        });
        let starts = plan(&mut s, &zones, at, 2);
        assert_eq!(starts.len(), 1);
        assert_eq!(starts[0].urgency, Urgency::Emergency);
        assert_eq!(s.running(), 3);
    }

    #[test]
    fn held_paused_and_backoff() {
        let p = policy();
        let at = MON + 3 * 3600;
        let zones = [view("a", &p, 95, at)];
        let mut s = Schedule {
            paused: true,
            ..Default::default()
        };
        assert!(plan(&mut s, &zones, at, 2).is_empty());
        assert_eq!(s.jobs.len(), 1, "queued even while paused");
        s.paused = false;
        s.held.insert("a".into());
        assert!(plan(&mut s, &zones, at, 2).is_empty());
        s.held.clear();
        assert_eq!(plan(&mut s, &zones, at, 2).len(), 1);
        let j = &mut s.jobs[0];
        assert!(!record_failure(j, "x", at, 60, 3600, 3));
        assert_eq!(j.next_try_unix, at + 60);
        assert!(!record_failure(j, "x", at, 60, 3600, 3));
        assert_eq!(j.next_try_unix, at + 120);
        assert!(plan(&mut s, &zones, at + 100, 2).is_empty());
        assert_eq!(plan(&mut s, &zones, at + 120, 2).len(), 1);
        assert!(record_failure(&mut s.jobs[0], "x", at, 60, 3600, 3));
        assert_eq!(s.jobs[0].state, JobState::Failed);
        assert!(plan(&mut s, &zones, at + 9999, 2).is_empty());
    }

    #[test]
    fn a_job_asked_for_a_time_starts_its_lead_before_outside_any_window() {
        let p = policy();
        // 10:00, outside the 02:00-04:00 window; the key is not due.
        let at = MON + 10 * 3600;
        let mut s = Schedule::default();
        s.jobs.push(Job {
            zone: "a".into(),
            kind: KeyKind::Dek,
            urgency: Urgency::Due,
            state: JobState::Queued,
            attempts: 0,
            queued_unix: MON,
            next_try_unix: 0,
            started_unix: None,
            flip_at_unix: None,
            last_error: None,
            at_unix: Some(at),
            reason: Some("requested by ops: audit finding".into()),
            open_at_unix: None,
            predicted_coverage: None,
            replans: 0,
            coverage_recorded: false,
            approval_request: None,
        });
        let mut v = view("a", &p, 1, MON);
        v.rotation_secs = 600;
        assert!(plan(&mut s, std::slice::from_ref(&v), at - 601, 2).is_empty());
        let starts = plan(&mut s, &[v.clone()], at - 600, 2);
        assert_eq!((starts.len(), starts[0].flip_at), (1, at));
        assert_eq!(s.jobs[0].state, JobState::Running);
        // A time already past starts (and flips) now.
        s.jobs[0].state = JobState::Queued;
        let starts = plan(&mut s, &[v], at + 50, 2);
        assert_eq!(starts[0].flip_at, at + 50);
    }
}
