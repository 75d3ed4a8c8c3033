//! Every route of the admin API in one table: method, path, the role it
//! needs, and its handler. The router is built from [`ROUTES`] and nothing
//! else, and the OpenAPI document is checked against it, so a route cannot
//! be served without being documented and given a role.
//!
//! A few rows are pages ([`Route::public`]): the dashboard's static files,
//! served without a token because a browser cannot send one when it
//! navigates. They hold no data; the page reads the API with the token the
//! operator gives it, so their role is the one the page needs to work.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};

use super::{ApiError, AppState};
use super::{
    audit, dashboard, key_changes, key_rotation, keys, openapi, rotation, schedule, stream, tokens,
    zones,
};
use crate::admin::tokens::{Actor, Role};

/// One route.
pub(crate) struct Route {
    /// `GET`, `POST` or `PUT`.
    pub method: &'static str,
    /// Path, with `{name}` for a path parameter.
    pub path: &'static str,
    /// The weakest role that may call it.
    pub role: Role,
    /// Served without a token (a static page that holds no data).
    pub public: bool,
    make: fn(MethodFilter) -> MethodRouter<AppState>,
}

macro_rules! route {
    ($m:ident $path:literal $role:ident $h:path) => {
        Route {
            method: stringify!($m),
            path: $path,
            role: Role::$role,
            public: false,
            make: |f| on(f, $h),
        }
    };
    (page $m:ident $path:literal $role:ident $h:path) => {
        Route {
            method: stringify!($m),
            path: $path,
            role: Role::$role,
            public: true,
            make: |f| on(f, $h),
        }
    };
}

/// The admin API. Viewer: reads. Operator: rotation control. Admin: zones,
/// volumes, policies, keys, streams and tokens.
pub(crate) const ROUTES: &[Route] = &[
    route!(GET "/health" Viewer super::health),
    route!(GET "/metrics" Viewer super::metrics),
    route!(GET "/api/v1/openapi.json" Viewer openapi::document),
    // The dashboard: static files; the page asks for a viewer token.
    route!(page GET "/dashboard" Viewer dashboard::page),
    route!(page GET "/dashboard/app.js" Viewer dashboard::script),
    route!(page GET "/dashboard/style.css" Viewer dashboard::style),
    // Zones and volumes.
    route!(GET "/api/v1/zones" Viewer zones::zones),
    route!(POST "/api/v1/zones" Admin zones::zone_create),
    route!(GET "/api/v1/zones/{zone}" Viewer zones::zone_info),
    route!(POST "/api/v1/zones/{zone}/dedup" Admin zones::zone_dedup),
    route!(GET "/api/v1/volumes" Viewer zones::volumes),
    route!(POST "/api/v1/volumes" Admin zones::volume_create),
    route!(POST "/api/v1/volumes/{volume}/delete" Admin zones::volume_delete),
    route!(GET "/api/v1/volumes/{volume}/blocks/{lba}" Viewer stream::block),
    // Keys, the check, the root key.
    route!(GET "/api/v1/keys" Viewer keys::keys),
    route!(GET "/api/v1/zones/{zone}/keys" Viewer keys::zone_keys),
    route!(GET "/api/v1/check" Viewer keys::check),
    route!(GET "/api/v1/root" Viewer keys::root_status),
    route!(POST "/api/v1/root/rotate" Admin keys::root_rotate),
    route!(POST "/api/v1/root/passphrase" Admin keys::root_passphrase),
    // One zone's rotations and scrub.
    route!(GET "/api/v1/zones/{zone}/rotation" Viewer rotation::rotation_status),
    route!(POST "/api/v1/zones/{zone}/rotation/prepare" Operator rotation::rotation_prepare),
    route!(POST "/api/v1/zones/{zone}/rotation/flip" Operator rotation::rotation_flip),
    route!(POST "/api/v1/zones/{zone}/rotation/pause" Operator rotation::rotation_pause),
    route!(POST "/api/v1/zones/{zone}/rotation/resume" Operator rotation::rotation_resume),
    route!(POST "/api/v1/zones/{zone}/rotation/abort" Operator rotation::rotation_abort),
    route!(POST "/api/v1/zones/{zone}/rotation/emergency" Operator rotation::rotation_emergency),
    route!(POST "/api/v1/zones/{zone}/kek/rotate" Operator rotation::kek_rotate),
    route!(POST "/api/v1/zones/{zone}/rotation/rollback" Operator key_changes::rollback),
    route!(GET "/api/v1/zones/{zone}/mac" Viewer key_changes::mac_status),
    route!(POST "/api/v1/zones/{zone}/mac/rotate" Operator key_changes::mac_rotate),
    route!(GET "/api/v1/zones/{zone}/scrub" Viewer rotation::scrub_status),
    route!(POST "/api/v1/zones/{zone}/scrub" Operator rotation::scrub_start),
    // One zone's change stream.
    route!(GET "/api/v1/zones/{zone}/stream" Viewer stream::status),
    route!(POST "/api/v1/zones/{zone}/stream/enable" Admin stream::enable),
    route!(POST "/api/v1/zones/{zone}/stream/disable" Admin stream::disable),
    route!(GET "/api/v1/zones/{zone}/stream/keys" Viewer stream::keys),
    route!(GET "/api/v1/zones/{zone}/stream/agents" Viewer stream::agents),
    route!(POST "/api/v1/zones/{zone}/stream/grant" Admin stream::grant),
    route!(POST "/api/v1/zones/{zone}/stream/revoke" Admin stream::revoke),
    route!(POST "/api/v1/zones/{zone}/stream/shred" Admin stream::shred),
    // One zone's rotation policy.
    route!(GET "/api/v1/zones/{zone}/policy" Viewer schedule::policy),
    route!(PUT "/api/v1/zones/{zone}/policy" Admin schedule::set_policy),
    route!(POST "/api/v1/zones/{zone}/policy/hold" Operator schedule::hold),
    route!(POST "/api/v1/zones/{zone}/policy/release" Operator schedule::release),
    route!(GET "/api/v1/zones/{zone}/rotation/plan" Viewer schedule::plan),
    // Threat input.
    route!(GET "/api/v1/threat" Viewer schedule::threat),
    route!(POST "/api/v1/threat" Operator schedule::set_threat),
    route!(POST "/api/v1/threat/approve" Operator schedule::approve),
    // The key-rotation management API.
    route!(GET "/api/v1/key-rotation/scheduler/status" Viewer schedule::status),
    route!(POST "/api/v1/key-rotation/scheduler/pause" Operator schedule::pause),
    route!(POST "/api/v1/key-rotation/scheduler/resume" Operator schedule::resume),
    route!(GET "/api/v1/key-rotation/schedule" Viewer schedule::schedule),
    route!(POST "/api/v1/key-rotation/schedule" Operator key_rotation::schedule),
    route!(POST "/api/v1/key-rotation/schedule-all" Operator key_rotation::schedule_all),
    route!(POST "/api/v1/key-rotation/execute" Operator key_rotation::execute),
    route!(POST "/api/v1/key-rotation/emergency-rotation" Operator key_rotation::emergency),
    route!(GET "/api/v1/key-rotation/health" Viewer key_rotation::health),
    route!(GET "/api/v1/key-rotation/keys/{zone}" Viewer key_rotation::zone_keys),
    route!(GET "/api/v1/key-rotation/report" Viewer key_rotation::report),
    route!(POST "/api/v1/key-rotation/cleanup" Admin key_rotation::cleanup),
    // The audit log's last records.
    route!(GET "/api/v1/audit/recent" Viewer audit::recent),
    // API tokens.
    route!(GET "/api/v1/tokens" Admin tokens::list),
    route!(POST "/api/v1/tokens" Admin tokens::create),
    route!(POST "/api/v1/tokens/{name}/revoke" Admin tokens::revoke),
];

fn filter(method: &str) -> MethodFilter {
    match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        other => unreachable!("no route in the table takes {other}"),
    }
}

/// Every route of [`ROUTES`] that needs a token, each behind the check of
/// its role.
pub(super) fn router() -> Router<AppState> {
    ROUTES
        .iter()
        .filter(|r| !r.public)
        .fold(Router::new(), |r, route| {
            r.route(
                route.path,
                (route.make)(filter(route.method))
                    .route_layer(middleware::from_fn_with_state(route.role, require)),
            )
        })
}

/// The routes of [`ROUTES`] served without a token.
pub(super) fn pages() -> Router<AppState> {
    ROUTES
        .iter()
        .filter(|r| r.public)
        .fold(Router::new(), |r, route| {
            r.route(route.path, (route.make)(filter(route.method)))
        })
}

/// Lets a request through when its token's role allows the route's.
async fn require(State(needed): State<Role>, req: Request, next: Next) -> Response {
    let Some(actor) = req.extensions().get::<Actor>().cloned() else {
        // authenticate() always runs first; without it nothing is allowed.
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "not authenticated",
        )
        .into_response();
    };
    if actor.role.allows(needed) {
        return next.run(req).await;
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    tracing::warn!(%method, path, token = actor.name, role = %actor.role, needed = %needed, "admin API request refused: role");
    let mut e = ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "token {:?} has role {}; {method} {path} needs role {needed}",
            actor.name, actor.role
        ),
    );
    e.required_role = Some(needed);
    e.into_response()
}
