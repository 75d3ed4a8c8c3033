//! Routes of the key inventory, the metadata check and the root key.

use axum::extract::State;

use super::{AppState, JsonResult, PathName, SecretBody, json};
use crate::admin::{PassphraseRequest, RootRotateRequest};

pub(super) async fn keys(State(s): State<AppState>) -> JsonResult<Vec<crate::admin::KeyInfo>> {
    json(&s, |b| b.keys(None)).await
}

pub(super) async fn zone_keys(
    State(s): State<AppState>,
    PathName(z): PathName,
) -> JsonResult<Vec<crate::admin::KeyInfo>> {
    json(&s, move |b| b.keys(Some(&z))).await
}

pub(super) async fn check(State(s): State<AppState>) -> JsonResult<crate::admin::CheckReport> {
    json(&s, |b| Ok(b.check())).await
}

pub(super) async fn root_status(State(s): State<AppState>) -> JsonResult<crate::admin::RootStatus> {
    json(&s, |b| b.root_status()).await
}

pub(super) async fn root_rotate(
    State(s): State<AppState>,
    SecretBody(req): SecretBody<RootRotateRequest>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.root_rotate(req)).await
}

pub(super) async fn root_passphrase(
    State(s): State<AppState>,
    SecretBody(req): SecretBody<PassphraseRequest>,
) -> JsonResult<serde_json::Value> {
    json(&s, move |b| b.root_passphrase(req)).await
}
