//! The scheduler's predictive planning: each DEK rotation's plan from the
//! zone's blocks by class, its learned staging rate, its write rate and
//! free staging (see [`crate::schedule::predict`]); re-plans of open
//! windows; what each window's staging rate teaches (`staging-rates.json`);
//! the predicted and achieved coverage at each flip; heat saved now and then.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge};

use super::{Facts, Scheduler};
use crate::admin::{AdminError, RotationPhase};
use crate::audit::AuditEvent;
use crate::ids::BLOCK_SIZE;
use crate::pool::Pool;
use crate::rotation::state::RotationState;
use crate::schedule::policy::{Policies, Policy};
use crate::schedule::predict::{self, Inputs, Learned, Prediction, RateSource};
use crate::schedule::queue::{FlipRecord, JobState, KeyAge, KeyKind, Schedule, Urgency};
use crate::zone::classes::ClassCensus;

/// The learned staging rates, in the pool directory.
pub const RATES_FILE: &str = "staging-rates.json";
/// How often heat is saved.
const HEAT_SAVE: Duration = Duration::from_secs(30);
/// Shortest time a write rate is measured over.
const WRITE_SPAN: Duration = Duration::from_secs(2);

/// A zone's write counter when last measured, and its write rate.
pub(in crate::schedule) struct WriteMeter {
    at: Instant,
    blocks: u64,
    bytes_per_sec: f64,
}

/// Reads the learned rates (none when missing or unreadable: they are
/// learned again).
pub(super) fn load_learned(dir: &Path) -> BTreeMap<String, Learned> {
    match std::fs::read(dir.join(RATES_FILE)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "scheduler: {RATES_FILE} is unreadable; rates are learned again");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

impl Scheduler {
    /// The write rate of `zone`, with its write counter at `written`.
    fn write_rate(&self, zone: &str, written: u64) -> f64 {
        let mut w = self.writes.lock();
        let m = w.entry(zone.to_string()).or_insert(WriteMeter {
            at: Instant::now(),
            blocks: written,
            bytes_per_sec: 0.0,
        });
        if written < m.blocks {
            (m.at, m.blocks) = (Instant::now(), written);
        }
        let span = m.at.elapsed();
        if span >= WRITE_SPAN {
            m.bytes_per_sec = (written - m.blocks) as f64 * BLOCK_SIZE as f64 / span.as_secs_f64();
            (m.at, m.blocks) = (Instant::now(), written);
        }
        m.bytes_per_sec
    }

    /// Folds each window that ended since the last check into its zone's
    /// learned rate, and remembers the rate of each open one.
    pub(super) fn learn(&self, pool: &Pool, facts: &[Facts], now: u64) {
        let mut changed = false;
        {
            let mut samples = self.samples.lock();
            for f in facts {
                let writes = self
                    .writes
                    .lock()
                    .get(&f.name)
                    .map_or(0.0, |m| m.bytes_per_sec);
                match f.window_rate {
                    Some(rate) => {
                        samples.insert(f.name.clone(), (rate, writes));
                    }
                    None if f.phase != RotationPhase::Window => {
                        if let Some((rate, writes)) = samples.remove(&f.name) {
                            let mut l = self.learned.lock();
                            let e = l.entry(f.name.clone()).or_default();
                            e.fold(rate, writes, now);
                            tracing::info!(zone = %f.name, rate_mib_s = rate / 1048576.0, learned_mib_s = e.bytes_per_sec / 1048576.0, "scheduler: staging rate learned from the window");
                            changed = true;
                        }
                    }
                    None => {}
                }
            }
        }
        if changed {
            let l = self.learned.lock().clone();
            let path = pool.dir().join(RATES_FILE);
            let text = serde_json::to_vec_pretty(&l).unwrap_or_default();
            if let Err(e) = crate::pool::write_atomic(&path, &text) {
                tracing::error!(error = %e, "scheduler: cannot save the learned staging rates");
            }
        }
    }

    /// The staging rate to plan `zone` with: learned, else its throttle,
    /// else the assumed one. Returns (bytes/s, source, write rate it was
    /// learned under).
    fn rate(&self, pool: &Pool, policy: &Policy, zone: &str) -> (f64, RateSource, f64) {
        if let Some(l) = self
            .learned
            .lock()
            .get(zone)
            .filter(|l| l.windows > 0 && l.bytes_per_sec > 0.0)
        {
            return (l.bytes_per_sec, RateSource::Learned, l.write_bytes_per_sec);
        }
        let mib = |m: u64| (m << 20) as f64;
        if policy.rate_mib_s > 0 {
            (mib(policy.rate_mib_s), RateSource::PolicyThrottle, 0.0)
        } else if pool.config().rotation.rate_mib_s > 0 {
            (
                mib(pool.config().rotation.rate_mib_s),
                RateSource::PoolThrottle,
                0.0,
            )
        } else {
            (
                mib(self.settings.assumed_rate_mib_s),
                RateSource::Assumed,
                0.0,
            )
        }
    }

    /// The plan's inputs for zone `f`.
    fn inputs(
        &self,
        pool: &Pool,
        policy: &Policy,
        f: &Facts,
        (census, write_bps): (ClassCensus, f64),
        now: u64,
        open_flip_at: Option<u64>,
    ) -> Inputs {
        let (rate, source, rate_writes) = self.rate(pool, policy, &f.name);
        let deadline = match f.dek {
            KeyAge::ActiveSince(t) => t.saturating_add(f.dek_period.secs()),
            KeyAge::Missing | KeyAge::Compromised => now,
        };
        Inputs {
            now,
            deadline,
            census,
            coverage: policy.coverage,
            rate_bytes_per_sec: rate,
            rate_source: source,
            rate_write_bytes_per_sec: rate_writes,
            write_bytes_per_sec: write_bps,
            staging_free_bytes: f.staging_free_bytes,
            sensitivity: policy.sensitivity,
            min_margin_secs: (2 * self.settings.check_interval_ms).div_ceil(1000).max(1),
            window: policy.window.clone(),
            open_flip_at,
        }
    }

    /// Plans the DEK rotation of every zone whose deadline is near (or
    /// that has a job or an open window): counting blocks by class is a
    /// scan of the zone's block map, so far-off zones are not counted.
    pub(super) fn predict_all(
        &self,
        pool: &Pool,
        policies: &Policies,
        schedule: &Schedule,
        mut facts: Vec<Facts>,
        now: u64,
    ) -> Vec<Facts> {
        for f in &mut facts {
            let policy = policies.of(&f.name);
            let has_job = schedule
                .jobs
                .iter()
                .any(|j| j.zone == f.name && j.kind == KeyKind::Dek);
            let horizon = (4 * f.rotation_secs).max(2 * 86_400);
            let near = match f.dek {
                KeyAge::ActiveSince(t) => t + f.dek_period.secs() <= now + horizon,
                _ => false,
            };
            if !(near || has_job || f.phase == RotationPhase::Window) || f.dek_busy && !has_job {
                continue;
            }
            let Ok((census, written)) = pool.zone_census(&f.name) else {
                continue;
            };
            let writes = self.write_rate(&f.name, written);
            let p = predict::predict(&self.inputs(pool, policy, f, (census, writes), now, None));
            self.plans.lock().insert(f.name.clone(), p.clone());
            f.census = Some(census);
            f.plan = Some(p);
        }
        facts
    }

    /// Re-plans each open window the scheduler started from what is staged
    /// now and the rates as they are: the flip moves later when staging
    /// needs it (never past the window's end or the deadline).
    pub(super) fn replan_windows(
        &self,
        pool: &Pool,
        schedule: &mut Schedule,
        policies: &Policies,
        facts: &[Facts],
        now: u64,
    ) {
        for job in &mut schedule.jobs {
            if job.kind != KeyKind::Dek
                || job.state != JobState::Running
                || job.urgency >= Urgency::SeverelyOverdue
            {
                continue;
            }
            let Some(f) = facts.iter().find(|f| f.name == job.zone) else {
                continue;
            };
            let (Some(census), Some(flip)) = (f.census, job.flip_at_unix) else {
                continue;
            };
            if f.phase != RotationPhase::Window || flip <= now {
                continue;
            }
            let writes = self
                .writes
                .lock()
                .get(&f.name)
                .map_or(0.0, |m| m.bytes_per_sec);
            let policy = policies.of(&f.name);
            let p =
                predict::predict(&self.inputs(pool, policy, f, (census, writes), now, Some(flip)));
            job.predicted_coverage = Some(p.predicted_coverage_percent);
            self.plans.lock().insert(f.name.clone(), p.clone());
            if p.flip_at <= flip {
                continue;
            }
            match pool.rotation_move_flip(&job.zone, p.flip_at) {
                Ok(()) => {
                    job.flip_at_unix = Some(p.flip_at);
                    job.replans += 1;
                    tracing::info!(zone = %job.zone, from = flip, to = p.flip_at, write_mib_s = writes / 1048576.0, predicted = p.predicted_coverage_percent, "scheduler: re-plan moved the flip");
                    if !p.meets_target && p.flip_at == p.latest_flip {
                        tracing::warn!(zone = %job.zone, predicted = p.predicted_coverage_percent, "scheduler: staging will not meet the target by the latest flip; migration finishes the rest");
                    }
                    let _ = pool.record(
                        AuditEvent::ok("schedule.dek.replan")
                            .zone(&job.zone)
                            .actor("scheduler")
                            .count(p.flip_at)
                            .error(&format!(
                                "flip moved from {flip} to {}; predicted coverage {:.1}%",
                                p.flip_at, p.predicted_coverage_percent
                            )),
                    );
                }
                Err(e) => {
                    tracing::warn!(zone = %job.zone, error = %e, "scheduler: the flip could not move")
                }
            }
        }
    }

    /// Records the predicted and achieved coverage of job `i`'s flip:
    /// status, metrics and the audit log.
    pub(super) fn record_coverage(
        &self,
        pool: &Pool,
        schedule: &mut Schedule,
        i: usize,
        facts: &[Facts],
    ) {
        let job = &schedule.jobs[i];
        let Some(f) = facts.iter().find(|f| f.name == job.zone) else {
            return;
        };
        let Ok(st) = RotationState::load(pool.dir(), f.id) else {
            return;
        };
        let (Some(c), Some(flipped)) = (st.coverage_at_flip, st.flipped_unix) else {
            return;
        };
        if job.started_unix.is_some_and(|s| flipped < s) {
            return; // An earlier flip; this job's is still to come.
        }
        let cov = self.policies.lock().of(&job.zone).coverage;
        let (achieved, met, target, staged) = predict::achieved(&c, &cov);
        let rec = FlipRecord {
            flipped_unix: Some(flipped),
            predicted_percent: job.predicted_coverage,
            achieved_percent: achieved,
            met,
            target_blocks: target,
            staged_blocks: staged,
        };
        let zone = job.zone.clone();
        let detail = format!(
            "coverage at the flip: predicted {}, achieved {achieved:.1}% of {target} target blocks; target {}",
            rec.predicted_percent
                .map_or("none".into(), |p| format!("{p:.1}%")),
            if met { "met" } else { "missed" }
        );
        tracing::info!(zone, achieved, predicted = ?rec.predicted_percent, met, "{detail}");
        if !met {
            tracing::warn!(
                zone,
                "ALERT: staging missed its coverage target at the flip"
            );
            counter!("keyturn_schedule_alerts_total", "kind" => "coverage_missed").increment(1);
        }
        gauge!("keyturn_rotation_coverage_achieved_percent", "zone" => zone.clone()).set(achieved);
        if let Some(p) = rec.predicted_percent {
            gauge!("keyturn_rotation_coverage_predicted_percent", "zone" => zone.clone()).set(p);
        }
        let event = if met {
            AuditEvent::ok("schedule.dek.coverage")
        } else {
            AuditEvent::failed("schedule.dek.coverage", &"target missed")
        };
        let _ = pool.record(
            event
                .zone(&zone)
                .actor("scheduler")
                .count(staged)
                .error(&detail),
        );
        schedule.jobs[i].coverage_recorded = true;
        schedule.flips.insert(zone, rec);
    }

    /// Gauges of the plans, threats and approvals.
    pub(super) fn publish(&self, schedule: &Schedule, facts: &[Facts]) {
        for f in facts {
            gauge!("keyturn_threat_level", "zone" => f.name.clone()).set(f.threat_level.number());
            if let Some(p) = &f.plan {
                gauge!("keyturn_rotation_plan_coverage_percent", "zone" => f.name.clone())
                    .set(p.predicted_coverage_percent);
            }
        }
        let waiting = schedule
            .jobs
            .iter()
            .filter(|j| j.state == JobState::AwaitingApproval)
            .count();
        gauge!("keyturn_schedule_awaiting_approval").set(waiting as f64);
    }

    /// Saves heat at most every 30 s.
    pub(super) fn save_heat_now_and_then(&self, pool: &Pool) {
        let mut last = self.heat_saved.lock();
        if last.is_none_or(|t| t.elapsed() >= HEAT_SAVE) {
            pool.save_heat();
            *last = Some(Instant::now());
        }
    }

    /// `keyturn rotate plan`: the plan of the zone's next DEK rotation and
    /// every input.
    pub(super) fn plan_report(
        &self,
        pool: &Pool,
        zone: &str,
    ) -> Result<serde_json::Value, AdminError> {
        let now = crate::clock::unix_now();
        let policies = self.policies.lock().clone();
        let threat = self.threat.lock().clone();
        let facts = self
            .zone_facts(pool, &policies, &threat)
            .map_err(AdminError::Internal)?;
        let f = facts
            .iter()
            .find(|f| f.name == zone)
            .ok_or_else(|| AdminError::Internal(format!("zone {zone} could not be read")))?;
        let (census, written) = pool.zone_census(zone)?;
        let writes = self.write_rate(zone, written);
        let schedule = self.schedule.lock().clone();
        let job = schedule
            .jobs
            .iter()
            .find(|j| j.zone == zone && j.kind == KeyKind::Dek)
            .cloned();
        let open_flip = job
            .as_ref()
            .filter(|j| j.state == JobState::Running && f.phase == RotationPhase::Window)
            .and_then(|j| j.flip_at_unix);
        let policy = policies.of(zone);
        let inputs = self.inputs(pool, policy, f, (census, writes), now, open_flip);
        let p: Prediction = predict::predict(&inputs);
        let active_since = match f.dek {
            KeyAge::ActiveSince(t) => Some(t),
            _ => None,
        };
        Ok(serde_json::json!({
            "zone": zone,
            "now_unix": now,
            "active_dek_since_unix": active_since,
            "dek_cryptoperiod": f.dek_period,
            "threat_level": f.threat_level,
            "phase": f.phase,
            "inputs": inputs,
            "prediction": p,
            "learned": self.learned.lock().get(zone),
            "job": job,
            "last_flip": schedule.flips.get(zone),
        }))
    }
}
