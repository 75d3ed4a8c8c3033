//! Handlers that change a zone's keys outside the DEK rotation's own flow:
//! the rollback of a flip, and MAC key rotation; the table in `routes.rs`
//! maps them.

use axum::extract::State;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{RollbackRequest, RotationStatus};

pub(super) async fn mac_status(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.mac_request(&z, false)).await
}

pub(super) async fn mac_rotate(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.mac_request(&z, true)).await
}

pub(super) async fn rollback(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<RollbackRequest>,
) -> JsonResult<RotationStatus> {
    json(&s, move |b| b.rotation_rollback(&z, &req)).await
}
