//! The OpenAPI 3 document of the admin API, written by hand beside this
//! file and compiled in. A test holds it and the route table to each
//! other: every route served is documented with its role, and every
//! documented route is served.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document (JSON).
pub const OPENAPI: &str = include_str!("openapi.json");

/// `GET /api/v1/openapi.json`.
pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
