//! The gauges of key ages against cryptoperiods, of the rotation scheduler
//! and of the audit log, set from the scheduler's health view
//! (`GET /api/v1/key-rotation/health`) on every scrape. The rotation
//! counters and the duration histogram are counted where rotations start
//! and end (the scheduler). Labels: zone names, purposes, states.

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};

use super::{AdminBackend, AdminError, RotationStatus, ScheduleRequest};

/// Key states counted by `keyturn_keys`.
const STATES: [&str; 6] = [
    "ok",
    "due",
    "overdue",
    "severely_overdue",
    "missing",
    "compromised",
];

/// Bucket bounds of `keyturn_rotation_duration_seconds`: a minute to a week.
pub const DURATION_BUCKETS: &[f64] = &[
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    3.0 * 86400.0,
    7.0 * 86400.0,
];

/// Help texts, once per process.
pub fn describe() {
    crate::keys::kmip::describe_metrics();
    for (name, help) in [
        (
            "keyturn_key_age_seconds",
            "Age of the zone's active key of a purpose",
        ),
        (
            "keyturn_key_cryptoperiod_seconds",
            "Cryptoperiod of the zone's keys of a purpose, from its policy",
        ),
        (
            "keyturn_key_due_in_seconds",
            "Seconds until the active key is due (negative: overdue by that much)",
        ),
        (
            "keyturn_keys",
            "Active zone keys (DEK and KEK) by state against their cryptoperiod",
        ),
        ("keyturn_scheduler_up", "1 when the rotation scheduler runs"),
        (
            "keyturn_scheduler_paused",
            "1 when the rotation scheduler is paused",
        ),
        (
            "keyturn_scheduler_jobs",
            "Scheduled rotations by state (queued, running, failed)",
        ),
        (
            "keyturn_next_rotation_seconds",
            "Seconds to the next scheduled rotation or the next key falling due",
        ),
        (
            "keyturn_audit_chain_ok",
            "1 when the audit log takes records (its chain checked at open)",
        ),
        ("keyturn_audit_last_id", "Id of the last audit record"),
        (
            "keyturn_rotation_staging_coverage_ratio",
            "Staged content blocks over all content blocks in the window (achieved coverage)",
        ),
    ] {
        describe_gauge!(name, help);
    }
    describe_counter!(
        "keyturn_rotations_scheduled_total",
        "Rotations queued (by policy or by request)"
    );
    describe_counter!(
        "keyturn_rotations_started_total",
        "Scheduled rotations started"
    );
    describe_counter!(
        "keyturn_rotations_completed_total",
        "Scheduled rotations completed"
    );
    describe_counter!(
        "keyturn_rotations_failed_total",
        "Scheduled rotations that failed after their retries"
    );
    describe_histogram!(
        "keyturn_rotation_duration_seconds",
        Unit::Seconds,
        "Scheduled rotations from start to completion"
    );
}

/// Achieved coverage of a zone's window.
pub fn set_coverage(s: &RotationStatus) {
    let ratio = if s.content_blocks == 0 {
        1.0
    } else {
        (s.staged_blocks as f64 / s.content_blocks as f64).min(1.0)
    };
    let in_window = matches!(
        s.phase,
        super::RotationPhase::Window | super::RotationPhase::Paused
    );
    gauge!("keyturn_rotation_staging_coverage_ratio", "zone" => s.zone.clone()).set(if in_window {
        ratio
    } else {
        0.0
    });
}

/// Sets the key, scheduler and audit gauges from `backend`.
pub fn set_gauges(backend: &dyn AdminBackend) {
    if let Some((ok, last)) = backend.audit_state() {
        gauge!("keyturn_audit_chain_ok").set(if ok { 1.0 } else { 0.0 });
        gauge!("keyturn_audit_last_id").set(last as f64);
    }
    let health = match backend.schedule_request(ScheduleRequest::Health) {
        Ok(h) => h,
        Err(AdminError::NotFound(_)) => {
            gauge!("keyturn_scheduler_up").set(0.0);
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "no scheduler health for the metrics");
            return;
        }
    };
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let sched = &health["scheduler"];
    let flag = |v: &serde_json::Value| if v.as_bool() == Some(true) { 1.0 } else { 0.0 };
    gauge!("keyturn_scheduler_up").set(flag(&sched["up"]));
    gauge!("keyturn_scheduler_paused").set(flag(&sched["paused"]));
    for st in ["queued", "running", "failed"] {
        gauge!("keyturn_scheduler_jobs", "state" => st).set(num(&sched[st]));
    }
    if let Some(n) = health["next_rotation_in_secs"].as_f64() {
        gauge!("keyturn_next_rotation_seconds").set(n);
    }
    let keys = health["keys"].as_array().cloned().unwrap_or_default();
    for st in STATES {
        let n = keys.iter().filter(|k| k["state"] == st).count();
        gauge!("keyturn_keys", "state" => st).set(n as f64);
    }
    for k in &keys {
        let (Some(zone), Some(purpose)) = (k["zone"].as_str(), k["purpose"].as_str()) else {
            continue;
        };
        let (z, p) = (zone.to_string(), purpose.to_string());
        gauge!("keyturn_key_cryptoperiod_seconds", "zone" => z.clone(), "purpose" => p.clone())
            .set(num(&k["cryptoperiod_secs"]));
        if let Some(age) = k["age_secs"].as_f64() {
            gauge!("keyturn_key_age_seconds", "zone" => z.clone(), "purpose" => p.clone()).set(age);
        }
        if let Some(d) = k["due_in_secs"].as_f64() {
            gauge!("keyturn_key_due_in_seconds", "zone" => z, "purpose" => p).set(d);
        }
    }
}
