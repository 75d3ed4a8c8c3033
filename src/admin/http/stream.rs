//! Routes of a zone's change stream, under `/api/v1/zones/{zone}/stream`.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{GrantRequest, ShredRequest, StreamRequest};

/// `GET /api/v1/volumes/{volume}/blocks/{lba}`: one block's provenance.
pub(super) fn block_routes() -> Router<AppState> {
    Router::new().route("/api/v1/volumes/{volume}/blocks/{lba}", get(block))
}

async fn block(
    State(s): State<AppState>,
    Path((volume, lba)): Path<(String, u64)>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.block_info(&volume, lba)).await
}

/// The stream routes, relative to a zone.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/stream", get(status))
        .route("/stream/enable", post(enable))
        .route("/stream/disable", post(disable))
        .route("/stream/keys", get(keys))
        .route("/stream/agents", get(agents))
        .route("/stream/grant", post(grant))
        .route("/stream/revoke", post(revoke))
        .route("/stream/shred", post(shred))
}

async fn ask(s: AppState, zone: String, req: StreamRequest) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.stream_request(&zone, req)).await
}

async fn status(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Status).await
}

async fn enable(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Enable).await
}

async fn disable(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Disable).await
}

async fn keys(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Keys).await
}

async fn agents(State(s): State<AppState>, PathName(z): PathName) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Agents).await
}

async fn grant(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<GrantRequest>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Grant(req)).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    name: String,
}

async fn revoke(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<RevokeBody>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Revoke { name: req.name }).await
}

async fn shred(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<ShredRequest>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Shred(req)).await
}
