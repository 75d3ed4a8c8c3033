//! Routes that change a zone's keys outside the DEK rotation's own flow:
//! the rollback of a flip, and MAC key rotation.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{RollbackRequest, RotationStatus};

/// Routes relative to a zone.
pub(super) fn zone_routes() -> Router<AppState> {
    Router::new()
        .route("/rotation/rollback", post(rollback))
        .route("/mac", get(mac_status))
        .route("/mac/rotate", post(mac_rotate))
}

async fn mac_status(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.mac_request(&z, false)).await
}

async fn mac_rotate(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.mac_request(&z, true)).await
}

async fn rollback(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<RollbackRequest>,
) -> JsonResult<RotationStatus> {
    json(&s, move |b| b.rotation_rollback(&z, &req)).await
}
