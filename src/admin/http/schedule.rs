//! Routes of the rotation scheduler (`/api/v1/key-rotation/...`), of a
//! zone's rotation policy (`/api/v1/zones/{zone}/policy...`) and plan
//! (`/api/v1/zones/{zone}/rotation/plan`), and threat input
//! (`/api/v1/threat`).

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::ScheduleRequest;
use crate::schedule::policy::Policy;
use crate::schedule::threat::ThreatChange;

/// Body of `POST /api/v1/threat/approve`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    zone: String,
    /// Approval token texts, one per operator.
    approvals: Vec<String>,
}

/// Pool-wide routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/key-rotation/scheduler/status", get(status))
        .route("/api/v1/key-rotation/scheduler/pause", post(pause))
        .route("/api/v1/key-rotation/scheduler/resume", post(resume))
        .route("/api/v1/key-rotation/schedule", get(schedule))
        .route("/api/v1/threat", get(threat).post(set_threat))
        .route("/api/v1/threat/approve", post(approve))
}

/// Routes relative to a zone.
pub(super) fn zone_routes() -> Router<AppState> {
    Router::new()
        .route("/policy", get(policy).put(set_policy))
        .route("/policy/hold", post(hold))
        .route("/policy/release", post(release))
        .route("/rotation/plan", get(plan))
}

async fn ask(s: AppState, req: ScheduleRequest) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.schedule_request(req)).await
}

async fn status(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Status).await
}

async fn pause(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Pause).await
}

async fn resume(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Resume).await
}

async fn schedule(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Schedule).await
}

async fn policy(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::GetPolicy(z)).await
}

async fn set_policy(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(p): Body<Policy>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::SetPolicy(z, Box::new(p))).await
}

async fn hold(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Hold(z)).await
}

async fn release(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Release(z)).await
}

async fn plan(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Plan(z)).await
}

async fn threat(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::GetThreat).await
}

async fn set_threat(
    State(s): State<AppState>,
    Body(c): Body<ThreatChange>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Threat(c)).await
}

async fn approve(
    State(s): State<AppState>,
    Body(b): Body<ApproveBody>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Approve(b.zone, b.approvals)).await
}
