//! Routes of the rotation scheduler (`/api/v1/key-rotation/...`) and of a
//! zone's rotation policy (`/api/v1/zones/{zone}/policy...`).

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::ScheduleRequest;
use crate::schedule::policy::Policy;

/// Pool-wide routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/key-rotation/scheduler/status", get(status))
        .route("/api/v1/key-rotation/scheduler/pause", post(pause))
        .route("/api/v1/key-rotation/scheduler/resume", post(resume))
        .route("/api/v1/key-rotation/schedule", get(schedule))
}

/// Routes relative to a zone.
pub(super) fn zone_routes() -> Router<AppState> {
    Router::new()
        .route("/policy", get(policy).put(set_policy))
        .route("/policy/hold", post(hold))
        .route("/policy/release", post(release))
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
