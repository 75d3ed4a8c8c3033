//! Routes of zones and volumes: list, create, dedup, delete.

use axum::extract::State;

use super::{AppState, Body, JsonResult, PathName, json};
use crate::admin::{CreateVolumeRequest, CreateZoneRequest, DedupRequest};

pub(super) async fn zones(State(s): State<AppState>) -> JsonResult<Vec<String>> {
    json(&s, |b| Ok(b.zones())).await
}

pub(super) async fn volumes(
    State(s): State<AppState>,
) -> JsonResult<Vec<crate::admin::VolumeStats>> {
    json(&s, |b| Ok(b.volume_stats())).await
}

pub(super) async fn zone_create(
    State(s): State<AppState>,
    Body(req): Body<CreateZoneRequest>,
) -> JsonResult<crate::admin::ZoneInfo> {
    json(&s, move |b| b.zone_create(&req)).await
}

pub(super) async fn zone_info(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<crate::admin::ZoneInfo> {
    json(&s, move |b| b.zone_info(&z)).await
}

pub(super) async fn zone_dedup(
    State(s): State<AppState>,
    PathName(z): PathName,
    Body(req): Body<DedupRequest>,
) -> JsonResult<crate::admin::ZoneInfo> {
    json(&s, move |b| b.zone_set_dedup(&z, req.on)).await
}

pub(super) async fn volume_create(
    State(s): State<AppState>,
    Body(req): Body<CreateVolumeRequest>,
) -> JsonResult<crate::admin::VolumeStats> {
    json(&s, move |b| b.volume_create(&req)).await
}

pub(super) async fn volume_delete(
    State(s): State<AppState>,
    PathName(v): PathName,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.volume_delete(&v)).await
}
