//! Handlers of a zone's change stream, under `/api/v1/zones/{zone}/stream`.

use axum::extract::{Path, State};

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{GrantRequest, ShredRequest, StreamRequest};

pub(super) async fn block(
    State(s): State<AppState>,
    Path((volume, lba)): Path<(String, u64)>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.block_info(&volume, lba)).await
}

async fn ask(s: AppState, zone: String, req: StreamRequest) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.stream_request(&zone, req)).await
}

pub(super) async fn status(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Status).await
}

pub(super) async fn enable(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Enable).await
}

pub(super) async fn disable(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Disable).await
}

pub(super) async fn keys(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Keys).await
}

pub(super) async fn agents(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Agents).await
}

pub(super) async fn grant(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<GrantRequest>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Grant(req)).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeBody {
    name: String,
}

pub(super) async fn revoke(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<RevokeBody>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Revoke { name: req.name }).await
}

pub(super) async fn shred(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<ShredRequest>,
) -> JsonResult<serde_json::Value> {
    ask(s, z, StreamRequest::Shred(req)).await
}
