//! The dashboard: one static page, its script and its style sheet,
//! compiled into the binary (no CDN, no build step). They hold no data and
//! need no token; the page asks the operator for one (a viewer token is
//! enough), keeps it in the tab's `sessionStorage`, and reads the JSON API
//! with it as `Authorization: Bearer`. A token may also be handed over in
//! the URL fragment (`/dashboard#token=...`), which browsers never send to
//! the server; the page moves it to `sessionStorage` and drops it from the
//! address bar.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// Only the page's own files may run or style it, and it may talk only to
/// this server: an injected script or a hostile frame gets nowhere near the
/// token.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /dashboard`.
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/app.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/style.css`.
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
