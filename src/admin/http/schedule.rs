//! Handlers of the rotation scheduler (`/api/v1/key-rotation/scheduler/...`,
//! `/api/v1/key-rotation/schedule`) and of a zone's rotation policy
//! (`/api/v1/zones/{zone}/policy...`); the table in `routes.rs` maps them.

use axum::extract::State;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::ScheduleRequest;
use crate::schedule::policy::Policy;

async fn ask(s: AppState, req: ScheduleRequest) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.schedule_request(req)).await
}

pub(super) async fn status(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Status).await
}

pub(super) async fn pause(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Pause).await
}

pub(super) async fn resume(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Resume).await
}

pub(super) async fn schedule(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Schedule).await
}

pub(super) async fn policy(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::GetPolicy(z)).await
}

pub(super) async fn set_policy(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(p): Body<Policy>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::SetPolicy(z, Box::new(p))).await
}

pub(super) async fn hold(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Hold(z)).await
}

pub(super) async fn release(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Release(z)).await
}
