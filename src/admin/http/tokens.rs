//! Routes of the named API tokens: list, create, revoke. The store lives
//! in the server (it authenticates every request); each change is saved
//! to `tokens.json` and audited.

use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, AppState, Body, JsonResult, PathName, call};
use crate::admin::CreateTokenRequest;
use crate::admin::tokens::{NewToken, TokenInfo, TokensError};
use crate::audit::AuditEvent;

fn api_error(e: TokensError) -> ApiError {
    match e {
        TokensError::Invalid(_) => ApiError::bad_request(e.to_string()),
        TokensError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        TokensError::NotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        TokensError::File(_) | TokensError::Corrupt { .. } => {
            tracing::error!(error = %e, "cannot save the API tokens");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot save the tokens file (see the server's log)",
            )
        }
    }
}

/// `GET /api/v1/tokens`.
pub(super) async fn list(State(s): State<AppState>) -> JsonResult<Vec<TokenInfo>> {
    Ok(axum::Json(s.tokens.read().list()))
}

/// `POST /api/v1/tokens`: the answer holds the token's text, once.
pub(super) async fn create(
    State(s): State<AppState>,
    Body(req): Body<CreateTokenRequest>,
) -> JsonResult<NewToken> {
    let store = s.tokens.clone();
    let made = call(&s, move |b| {
        let by = crate::actor::current();
        let r = store
            .write()
            .create(&req.name, req.role, by.as_deref(), crate::clock::unix_now());
        let event = match &r {
            Ok(_) => AuditEvent::ok("token.create"),
            Err(e) => AuditEvent::refused("token.create", e),
        };
        b.record(event.key_id(format!("token:{}:{}", req.name_for_audit(), req.role)))?;
        Ok(r)
    })
    .await?
    .map_err(api_error)?;
    tracing::info!(name = made.name, role = %made.role, "API token created");
    Ok(axum::Json(made))
}

/// `POST /api/v1/tokens/{name}/revoke`: the token stops working at once.
pub(super) async fn revoke(
    State(s): State<AppState>,
    PathName(name): PathName,
) -> JsonResult<TokenInfo> {
    let store = s.tokens.clone();
    let gone = call(&s, move |b| {
        let r = store.write().revoke(&name);
        let event = match &r {
            Ok(_) => AuditEvent::ok("token.revoke"),
            Err(e) => AuditEvent::refused("token.revoke", e),
        };
        b.record(event.key_id(format!("token:{}", sanitize(&name))))?;
        Ok(r)
    })
    .await?
    .map_err(api_error)?;
    tracing::info!(name = gone.name, "API token revoked");
    Ok(axum::Json(gone))
}

/// A name as the audit log may hold it (a refused name may be anything).
fn sanitize(name: &str) -> String {
    let clean: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if clean.is_empty() { "?".into() } else { clean }
}

impl CreateTokenRequest {
    fn name_for_audit(&self) -> String {
        sanitize(&self.name)
    }
}
