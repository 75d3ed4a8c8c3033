//! Handlers of the rotation scheduler (`/api/v1/key-rotation/...`), of a
//! zone's rotation policy (`/api/v1/zones/{zone}/policy...`) and plan
//! (`/api/v1/zones/{zone}/rotation/plan`), and of threat input
//! (`/api/v1/threat`); the table in `routes.rs` maps them.

use axum::extract::State;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::ScheduleRequest;
use crate::schedule::policy::Policy;
use crate::schedule::threat::ThreatChange;

/// Body of `POST /api/v1/threat/approve`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApproveBody {
    zone: String,
    /// Approval token texts, one per operator.
    approvals: Vec<String>,
}

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

pub(super) async fn plan(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Plan(z)).await
}

pub(super) async fn threat(State(s): State<AppState>) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::GetThreat).await
}

pub(super) async fn set_threat(
    State(s): State<AppState>,
    Body(c): Body<ThreatChange>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Threat(c)).await
}

pub(super) async fn approve(
    State(s): State<AppState>,
    Body(b): Body<ApproveBody>,
) -> JsonResult<serde_json::Value> {
    ask(s, ScheduleRequest::Approve(b.zone, b.approvals)).await
}
