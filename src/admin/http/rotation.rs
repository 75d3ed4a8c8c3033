//! Routes of one zone's DEK rotation, KEK rotation and scrub, under
//! `/api/v1/zones/{zone}/`.

use axum::extract::State;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{EmergencyRequest, KekRotateRequest, PrepareRequest};

pub(super) async fn rotation_status(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_status(&z)).await
}

pub(super) async fn rotation_prepare(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<PrepareRequest>,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_prepare(&z, &req)).await
}

pub(super) async fn rotation_flip(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_flip(&z)).await
}

pub(super) async fn rotation_pause(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_pause(&z)).await
}

pub(super) async fn rotation_resume(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_resume(&z)).await
}

pub(super) async fn rotation_abort(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_abort(&z)).await
}

pub(super) async fn rotation_emergency(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<EmergencyRequest>,
) -> JsonResult<crate::admin::RotationStatus> {
    json(&s, move |b| b.rotation_emergency(&z, &req)).await
}

pub(super) async fn kek_rotate(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<KekRotateRequest>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.kek_rotate(&z, &req.approvals)).await
}

pub(super) async fn scrub_start(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::ScrubStatus> {
    json(&s, move |b| b.scrub_start(&z)).await
}

pub(super) async fn scrub_status(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::ScrubStatus> {
    json(&s, move |b| b.scrub_status(&z)).await
}
