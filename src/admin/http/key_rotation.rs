//! Routes that change which key a zone writes under outside the forward
//! rotation: the rollback of a flip.

use axum::Router;
use axum::extract::State;
use axum::routing::post;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{RollbackRequest, RotationStatus};

/// Routes relative to a zone.
pub(super) fn zone_routes() -> Router<AppState> {
    Router::new().route("/rotation/rollback", post(rollback))
}

async fn rollback(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<RollbackRequest>,
) -> JsonResult<RotationStatus> {
    json(&s, move |b| b.rotation_rollback(&z, &req)).await
}
