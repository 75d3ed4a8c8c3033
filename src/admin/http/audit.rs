//! `GET /api/v1/audit/recent`: the audit log's last records (the
//! dashboard's list of recent events).

use axum::extract::{Query, State};

use super::{ApiError, AppState, JsonResult, json};

/// Most records one request returns.
const MAX_LIMIT: usize = 500;

/// Query of `GET /api/v1/audit/recent`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecentQuery {
    /// How many records [default: 20, at most 500].
    limit: Option<usize>,
}

/// The last `limit` records, oldest first.
pub(super) async fn recent(
    State(s): State<AppState>,
    q: Result<Query<RecentQuery>, axum::extract::rejection::QueryRejection>,
) -> JsonResult<serde_json::Value> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("{e}: takes ?limit=N")))?;
    let limit = q.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    json(&s, move |b| b.audit_recent(limit)).await
}
