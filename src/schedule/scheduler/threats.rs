//! The scheduler's threat input: level changes from the API and the feed
//! file (audited, re-planned at once), and emergency DEK rotations: run at
//! once, or, where dual control applies, filed as an approval request that
//! operators sign and hand back (`keyturn threat approve`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use ::metrics::{counter, gauge};

use super::Scheduler;
use crate::admin::AdminError;
use crate::audit::AuditEvent;
use crate::keys::approval::{self, ApprovalRequest, Operation, Target};
use crate::pool::{Pool, PoolError};
use crate::schedule::queue::{JobState, KeyKind, Schedule};
use crate::schedule::threat::{self, ThreatChange, ThreatLevel};

/// Where the scheduler files approval requests, in the pool directory.
pub const REQUEST_DIR: &str = "approval-requests";
/// How long a filed request stays valid.
const REQUEST_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl Scheduler {
    /// Applies the lines the feed file gained since the last check.
    pub(super) fn read_feed(&self, pool: &Pool, now: u64) {
        let Some(feed) = &self.settings.threat_feed else {
            return;
        };
        let path = pool.dir().join(feed);
        let offset = self.threat.lock().feed_offset;
        let (lines, next) = match threat::read_feed(&path, offset) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "threat feed not readable");
                return;
            }
        };
        for line in lines {
            match line {
                Ok(change) => {
                    if let Err(e) = self.change_threat(pool, &change, "feed") {
                        tracing::warn!(error = %e, "threat feed: change refused");
                        let _ = pool.record(AuditEvent::refused("threat.feed", &e));
                    }
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), error = %why, "threat feed: line skipped");
                    counter!("keyturn_threat_feed_rejected_total").increment(1);
                    let _ = pool.record(AuditEvent::refused("threat.feed", &why));
                }
            }
        }
        let mut t = self.threat.lock();
        if t.feed_offset != next {
            t.feed_offset = next;
            if let Err(e) = t.save(pool.dir()) {
                tracing::error!(error = %e, "scheduler: cannot save the threat state");
            }
        }
        let _ = now;
    }

    /// Raises or clears a level: saved, every transition audited, and the
    /// scheduler woken to re-plan at once.
    pub(super) fn change_threat(
        &self,
        pool: &Pool,
        change: &ThreatChange,
        source: &str,
    ) -> Result<serde_json::Value, AdminError> {
        change
            .validate()
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        if let Some(z) = &change.zone {
            self.zone_exists(pool, z)?;
        }
        let now = crate::clock::unix_now();
        let transitions = {
            let mut t = self.threat.lock();
            let mut next = t.clone();
            let tr = next.apply(change, now, source);
            next.save(pool.dir())
                .map_err(|e| AdminError::Internal(e.to_string()))?;
            *t = next;
            tr
        };
        let reason = change.reason.trim();
        for tr in &transitions {
            let scope = tr.zone.as_deref().unwrap_or("(all zones)");
            tracing::warn!(
                zone = scope,
                from = tr.from.name(),
                to = tr.to.name(),
                source,
                reason,
                "threat level changed"
            );
            let mut e = AuditEvent::ok(if tr.to > tr.from {
                "threat.raise"
            } else {
                "threat.clear"
            })
            .actor(source)
            .error(&format!("{} -> {}: {reason}", tr.from.name(), tr.to.name()));
            if let Some(z) = &tr.zone {
                e = e.zone(z);
            }
            pool.record(e).map_err(AdminError::from)?;
        }
        if transitions.is_empty() {
            tracing::info!(source, "threat level unchanged");
        }
        self.wake.store(true, Ordering::Release);
        Ok(self.threat_report(pool))
    }

    /// Threat levels: raised entries and the level of every zone.
    pub(super) fn threat_report(&self, pool: &Pool) -> serde_json::Value {
        let t = self.threat.lock().clone();
        let levels: std::collections::BTreeMap<String, ThreatLevel> = pool
            .catalog()
            .zones
            .into_iter()
            .map(|z| {
                let l = t.level(&z.name);
                (z.name, l)
            })
            .collect();
        serde_json::json!({ "pool": t.pool, "zones": t.zones, "levels": levels })
    }

    /// Why an emergency rotation of `zone` runs.
    fn emergency_reason(&self, zone: &str) -> String {
        let t = self.threat.lock();
        match t.of(zone).filter(|r| r.level == ThreatLevel::Critical) {
            Some(r) if t.emergency_due(zone) => format!("threat level critical: {}", r.reason),
            _ => "scheduled: the active DEK is marked compromised".into(),
        }
    }

    /// Marks `zone`'s critical threat handled once its emergency ran.
    fn emergency_ran(&self, pool: &Pool, zone: &str) {
        let mut t = self.threat.lock();
        if t.emergency_due(zone) {
            t.mark_handled(zone);
            if let Err(e) = t.save(pool.dir()) {
                tracing::error!(error = %e, "scheduler: cannot save the threat state");
            }
        }
    }

    /// Starts an emergency DEK rotation, or, under dual control, files its
    /// approval request and alerts (`None`: the job now waits).
    pub(super) fn begin_emergency(
        &self,
        pool: &Pool,
        schedule: &mut Schedule,
        zone: &str,
        now: u64,
    ) -> Option<Result<(), PoolError>> {
        let reason = self.emergency_reason(zone);
        if !pool.config().dual_control.required {
            let r = pool.rotation_emergency(zone, &reason, None).map(drop);
            if r.is_ok() {
                self.emergency_ran(pool, zone);
            }
            return Some(r);
        }
        let job = schedule
            .jobs
            .iter_mut()
            .find(|j| j.zone == zone && j.kind == KeyKind::Dek)?;
        job.state = JobState::AwaitingApproval;
        job.started_unix = None;
        job.reason = Some(reason.clone());
        let target = Target::new(Operation::EmergencyRotation, Some(zone), None);
        let filed = ApprovalRequest::new(target, now, REQUEST_LIFETIME)
            .map_err(|e| e.to_string())
            .and_then(|req| {
                let dir = pool.dir().join(REQUEST_DIR);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let path = dir.join(format!("emergency-{zone}-{}.json", req.nonce));
                let text = serde_json::to_vec_pretty(&req).map_err(|e| e.to_string())?;
                crate::pool::write_atomic(&path, &text).map_err(|e| e.to_string())?;
                Ok(path)
            });
        match filed {
            Ok(path) => {
                let shown = path.display().to_string();
                tracing::error!(zone, request = %shown, reason, "ALERT: an emergency rotation waits for dual-control approvals; sign the request with `keyturn approve` and hand the tokens to `keyturn threat approve`");
                counter!("keyturn_schedule_alerts_total", "kind" => "approval_needed").increment(1);
                gauge!("keyturn_schedule_awaiting_approval").increment(1.0);
                let _ = pool.record(
                    AuditEvent::ok("schedule.approval.requested")
                        .zone(zone)
                        .actor("scheduler")
                        .error(&format!("{reason}; request {shown}")),
                );
                job.approval_request = Some(shown);
                None
            }
            Err(e) => Some(Err(PoolError::Conflict(format!(
                "cannot file the approval request: {e}"
            )))),
        }
    }

    /// Runs the emergency rotation `zone` waits on with the approvals given.
    pub(super) fn approve(
        &self,
        pool: &Pool,
        zone: &str,
        tokens: &[String],
    ) -> Result<serde_json::Value, AdminError> {
        let _c = self.check_lock.lock();
        let mut schedule = self.schedule.lock().clone();
        let job = schedule
            .jobs
            .iter_mut()
            .find(|j| j.zone == zone && j.state == JobState::AwaitingApproval)
            .ok_or_else(|| {
                AdminError::Conflict(format!(
                    "zone {zone} has no emergency rotation waiting for approvals"
                ))
            })?;
        if tokens.is_empty() {
            return Err(AdminError::Invalid(
                "give the approval tokens (--approval FILE, once per operator)".into(),
            ));
        }
        let now = crate::clock::unix_now();
        let target = Target::new(Operation::EmergencyRotation, Some(zone), None);
        let auth = approval::authorize_json(
            pool.dir(),
            &pool.config().dual_control,
            &target,
            tokens,
            now,
        )
        .map_err(|e| {
            let _ = pool.record(AuditEvent::refused("rotation.emergency", &e).zone(zone));
            AdminError::Forbidden(e.to_string())
        })?;
        let reason = job
            .reason
            .clone()
            .unwrap_or_else(|| "scheduled emergency".into());
        pool.rotation_emergency(zone, &reason, Some(auth))?;
        job.state = JobState::Running;
        job.started_unix = Some(now);
        if let Some(p) = job.approval_request.take() {
            let _ = std::fs::remove_file(p);
        }
        self.emergency_ran(pool, zone);
        schedule
            .save(&self.dir)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        *self.schedule.lock() = schedule;
        tracing::info!(zone, "approved emergency rotation ran");
        Ok(self.status())
    }
}
