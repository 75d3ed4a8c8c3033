//! The key-rotation management API under `/api/v1/key-rotation/`: queue,
//! execute and emergency rotations, health, a zone's key inventory, and the
//! cleanup of keys past their grace period. The scheduler's own routes
//! (status, pause, resume, `GET schedule`) are in `schedule.rs`.

use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, AppState, Body, JsonResult, PathName, call, json};
use crate::admin::{
    CleanupRequest, EmergencyRequest, EmergencyRotationRequest, ExecuteRequest, ScheduleRequest,
    ScheduleRotationRequest,
};

/// `POST schedule`: one zone's rotation at a time or in its next window.
pub(super) async fn schedule(
    State(s): State<AppState>,
    Body(req): Body<ScheduleRotationRequest>,
) -> JsonResult<serde_json::Value> {
    if req.zone.is_none() {
        return Err(ApiError::bad_request(
            "missing field `zone` (schedule-all schedules every zone)",
        ));
    }
    json(&s, move |b| b.schedule_request(ScheduleRequest::Add(req))).await
}

/// `POST schedule-all`: the same for every zone without such a job.
pub(super) async fn schedule_all(
    State(s): State<AppState>,
    Body(req): Body<ScheduleRotationRequest>,
) -> JsonResult<serde_json::Value> {
    if req.zone.is_some() {
        return Err(ApiError::bad_request(
            "schedule-all takes every zone: leave `zone` out, or use schedule",
        ));
    }
    json(&s, move |b| b.schedule_request(ScheduleRequest::Add(req))).await
}

/// `POST execute`: a queued rotation starts now, window or not.
pub(super) async fn execute(
    State(s): State<AppState>,
    Body(req): Body<ExecuteRequest>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| {
        b.schedule_request(ScheduleRequest::Execute(req))
    })
    .await
}

/// `POST emergency-rotation`: the zone's emergency DEK rotation.
pub(super) async fn emergency(
    State(s): State<AppState>,
    Body(req): Body<EmergencyRotationRequest>,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| {
        b.rotation_emergency(
            &req.zone,
            &EmergencyRequest {
                reason: req.reason,
                approvals: req.approvals,
            },
        )
    })
    .await
}

/// `GET health`: a server without a scheduler answers, degraded.
pub(super) async fn health(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    let r = call(&s, |b| b.schedule_request(ScheduleRequest::Health)).await;
    match r {
        Ok(v) => Ok(axum::Json(v)),
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok(axum::Json(serde_json::json!({
            "status": "degraded",
            "problems": ["this server runs no rotation scheduler"],
            "scheduler": { "up": false },
        }))),
        Err(e) => Err(e),
    }
}

/// `GET keys/{zone}`: the zone's keys (versions, purposes, states, ages)
/// and the content blocks under each DEK version, read from the running
/// server.
pub(super) async fn zone_keys(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| {
        let keys = b.keys(Some(&z))?;
        let rotation = b.rotation_status(&z)?;
        Ok(serde_json::json!({
            "zone": z,
            "phase": rotation.phase,
            "active_dek_version": rotation.active_version,
            "next_dek_version": rotation.next_version,
            "content_blocks": rotation.content_blocks,
            "blocks_per_dek_version": rotation.keys,
            "keys": keys,
        }))
    })
    .await
}

/// Query of `GET report`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportQuery {
    /// Start of the period: a date (UTC) or an RFC 3339 time.
    from: String,
    /// End of the period (exclusive) [default: now].
    to: Option<String>,
}

/// `GET report?from=...&to=...`: the key-rotation report of a period (the
/// data of `keyturn report --format json`).
pub(super) async fn report(
    State(s): State<AppState>,
    q: Result<axum::extract::Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> JsonResult<serde_json::Value> {
    let axum::extract::Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{e}: GET report takes ?from=DATE|TIME[&to=DATE|TIME]"),
        )
    })?;
    json(&s, move |b| b.report(&q.from, q.to.as_deref())).await
}

/// `POST cleanup`: destroys DEKs past their grace period that protect no
/// content block (dual control; `dry_run` lists them).
pub(super) async fn cleanup(
    State(s): State<AppState>,
    Body(req): Body<CleanupRequest>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.key_cleanup(&req)).await
}
