//! The admin API over HTTP: routes, bearer-token authentication, JSON
//! bodies and errors. It knows nothing of keys or blocks; everything goes
//! through [`AdminBackend`], whose (blocking) methods run on tokio's
//! blocking pool.
//!
//! Every route needs a token, `/health` and `/metrics` included: the pool's
//! admin token or a named token (see [`super::tokens`]), whose role must
//! allow the route (the table in [`routes`]), except the dashboard's static
//! files, which hold no data. Every answer that is not a
//! success is JSON: `{"error": "...", "kind": "..."}`. The server listens
//! on loopback only.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Exporter;
use super::tokens::{Role, TokenStore};
use super::{AdminBackend, AdminError, ErrorBody};

/// Largest request body accepted (413 beyond it).
pub const MAX_BODY: usize = 1 << 20;

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is not on the loopback interface.
    #[error(
        "admin API address {0} is not a loopback address: the admin API listens on loopback only (use 127.0.0.1:PORT or [::1]:PORT)"
    )]
    NotLoopback(String),
    /// The address cannot be parsed or resolved.
    #[error("admin API address {addr:?} is not an address: {reason}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// Why it is not usable.
        reason: String,
    },
    /// Binding failed (in use, permission).
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("admin API server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Resolves `listen` and checks that every address it names is loopback.
pub fn loopback_addr(listen: &str) -> Result<SocketAddr, ServeError> {
    let bad = |reason: String| ServeError::BadAddress {
        addr: listen.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .collect();
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        Some(a) => Err(ServeError::NotLoopback(a.to_string())),
        None => addrs
            .first()
            .copied()
            .ok_or_else(|| bad("it resolves to nothing".into())),
    }
}

/// Binds the admin API's listener on `listen`, which must be loopback
/// unless the API is served over HTTPS (`https`).
pub async fn bind(listen: &str, https: bool) -> Result<TcpListener, ServeError> {
    let addr = if https {
        listen
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ServeError::BadAddress {
                addr: listen.to_owned(),
                reason: "it resolves to nothing".into(),
            })?
    } else {
        loopback_addr(listen)?
    };
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    backend: Arc<dyn AdminBackend>,
    tokens: Arc<parking_lot::RwLock<TokenStore>>,
    exporter: Exporter,
}

/// Serves the admin API on `listener` until `shutdown` becomes true, then
/// finishes the requests in flight and returns. Refuses a listener that is
/// not on loopback.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn AdminBackend>,
    tokens: TokenStore,
    exporter: Exporter,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> Result<(), ServeError> {
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && tls.is_none() {
        return Err(ServeError::NotLoopback(local.to_string()));
    }
    let app = router(AppState {
        backend,
        tokens: Arc::new(parking_lot::RwLock::new(tokens)),
        exporter,
    });
    tracing::info!(addr = %local, https = tls.is_some(), "admin API listening");
    // A dropped sender means the same as shutting down here.
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    match tls {
        None => super::limits::serve(listener, app, stop).await,
        Some(tls) => {
            let listener = super::tls_listener::TlsListener::new(listener, tls)?;
            super::limits::serve(listener, app, stop).await
        }
    }
    tracing::info!("admin API stopped");
    Ok(())
}

mod audit;
mod dashboard;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz_body;
mod key_changes;
mod key_rotation;
mod keys;
mod openapi;
mod rotation;
pub(crate) mod routes;
mod schedule;
mod stream;
mod tokens;
mod zones;

pub use openapi::OPENAPI;

fn router(state: AppState) -> Router {
    // The fallbacks sit behind authentication too: without a token, an
    // unknown route is a 401 like any other.
    routes::router()
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .merge(routes::pages().method_not_allowed_fallback(wrong_method))
        .with_state(state)
}

// ------------------------------------------------------------------ errors

/// A failed request: its status and JSON body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// For a 403 of the role check: the role the route needs.
    required_role: Option<Role>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            required_role: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let (status, kind) = match &e {
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AdminError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            kind: self.kind.to_owned(),
            required_role: self.required_role.map(|r| r.name().to_owned()),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no such route: {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

// ------------------------------------------------------------------ auth

tokio::task_local! {
    /// The token name of the request being handled, for [`call`].
    static ACTOR: String;
}

/// Lets a request through only with `Authorization: Bearer <token>` of a
/// known token, and hands its [`super::tokens::Actor`] to the role check
/// and the audit log. No token, expected or presented, is ever logged.
async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        let scheme = v.get(..7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| v[7..].trim_ascii())
    });
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let actor = presented.and_then(|t| state.tokens.read().authenticate(t));
    let Some(actor) = actor else {
        let why = if presented.is_some() {
            "wrong bearer token"
        } else {
            "missing bearer token"
        };
        tracing::warn!(%method, path, "admin API request refused: {why}");
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{why}: send `Authorization: Bearer TOKEN` with a token from `keyturn token create` or the pool's admin token file"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    };
    let name = actor.name.clone();
    let mut req = req;
    req.extensions_mut().insert(actor);
    let resp = ACTOR.scope(name.clone(), next.run(req)).await;
    tracing::debug!(%method, path, token = name, status = resp.status().as_u16(), "admin API request");
    resp
}

// ------------------------------------------------------------- extractors

/// The one `{zone}` or `{volume}` of a route; a malformed one is a JSON 400.
struct PathName(String);

impl<S: Send + Sync> FromRequestParts<S> for PathName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(zone) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(PathName(zone))
    }
}

/// A JSON body of type `T`. An empty body reads as `{}`, so bodies whose
/// fields all have defaults may be left out. Unknown fields, bad JSON and
/// bodies over [`MAX_BODY`] are refused with a JSON error.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
    }
}

/// A JSON body that carries secrets (passphrases): as [`Body`], but an
/// error names only where the JSON went wrong, never a value from it, and
/// the bytes read are wiped once parsed (best effort: the HTTP library's
/// own read buffers are not ours to wipe).
struct SecretBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for SecretBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Vec::from(Bytes) takes the buffer over when nothing else holds it.
        let bytes = zeroize::Zeroizing::new(Vec::from(body_bytes(req, state).await?));
        parse_json(&bytes).map(SecretBody).map_err(|e| {
            ApiError::bad_request(format!(
                "bad JSON body: {:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }
}

/// The body of `req`, refused beyond [`MAX_BODY`] bytes.
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body larger than {MAX_BODY} bytes"),
        )
    };
    // Refuse a declared oversized body before reading any of it.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    // A body trickled in slowly would hold the connection: bounded.
    let read = tokio::time::timeout(super::limits::BODY_TIMEOUT, Bytes::from_request(req, state));
    let body = read.await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "request body not received within {} s",
                super::limits::BODY_TIMEOUT.as_secs()
            ),
        )
    })?;
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))
        }
    })
}

/// `bytes` as a JSON object of type `T`; empty reads as `{}`.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let text: &[u8] = match bytes.trim_ascii() {
        b"" => b"{}",
        t if t.starts_with(b"{") => t,
        // serde would take a struct from an array, by position.
        _ => {
            return Err(serde::de::Error::custom("expected a JSON object"));
        }
    };
    serde_json::from_slice(text)
}

// --------------------------------------------------------------- handlers

/// Runs `f` against the backend on the blocking pool. A panic inside the
/// backend is a 500, not a dead server.
async fn call<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn AdminBackend) -> Result<T, AdminError> + Send + 'static,
{
    let backend = state.backend.clone();
    // The token's name goes with the call, for the audit records it makes.
    let actor = ACTOR.try_with(Clone::clone).ok();
    match tokio::task::spawn_blocking(move || crate::actor::acting_as(actor, || f(&*backend))).await
    {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "admin operation panicked");
            Err(ApiError::from(AdminError::Internal(
                "the operation failed inside the server (see its log)".into(),
            )))
        }
    }
}

type JsonResult<T> = Result<axum::Json<T>, ApiError>;

/// [`call`] for handlers that answer with `f`'s value as JSON.
async fn json<T, F>(state: &AppState, f: F) -> JsonResult<T>
where
    T: Serialize + Send + 'static,
    F: FnOnce(&dyn AdminBackend) -> Result<T, AdminError> + Send + 'static,
{
    call(state, f).await.map(axum::Json)
}

async fn health(State(s): State<AppState>) -> JsonResult<super::Health> {
    json(&s, |b| Ok(b.health())).await
}

async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let exporter = s.exporter.clone();
    let text = call(&s, move |b| Ok(exporter.render(b))).await?;
    Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    use parking_lot::Mutex;

    use super::*;
    use crate::admin::{
        CheckReport, CreateVolumeRequest, CreateZoneRequest, EmergencyRequest, Health, KeyBlocks,
        KeyInfo, PassphraseRequest, PrepareRequest, RootRotateRequest, RootStatus, RotationPhase,
        RotationStatus, ScrubStatus, VolumeStats, ZoneInfo,
    };

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A backend whose every answer is known, and which records what it was asked.
    #[derive(Default)]
    struct Fake {
        asked: Mutex<Vec<String>>,
        /// The audit actor each `volume_stats` call ran as.
        actors: Mutex<Vec<Option<String>>>,
    }

    fn status(zone: &str) -> RotationStatus {
        RotationStatus {
            zone: zone.into(),
            phase: RotationPhase::Window,
            active_version: 1,
            next_version: Some(2),
            old_version: None,
            keys: vec![
                KeyBlocks {
                    version: 1,
                    state: "active".into(),
                    blocks: 10,
                },
                KeyBlocks {
                    version: 2,
                    state: "pre-active".into(),
                    blocks: 3,
                },
            ],
            content_blocks: 10,
            staged_blocks: 3,
            migrated_blocks: 0,
            remaining_blocks: 7,
            progress_percent: 30.0,
            rate_bytes_per_sec: 4096.0,
            eta_secs: Some(7.0),
            staging_used_bytes: 12288,
            staging_free_bytes: 1 << 20,
            unstaged_writes: 0,
            errors: 0,
            last_error: None,
            waiting_for_space: None,
            window_opened_unix: Some(1),
            flip_at_unix: None,
            flipped_unix: None,
            destroy_at_unix: None,
            emergency: false,
            reencrypted_blocks: 0,
            last_flip_micros: None,
            staging_secs: None,
            migration_secs: None,
            rolled_back_from: None,
            rolled_back_unix: None,
            throttle_mib_s: 0,
            throttle_source: "pool".into(),
            strict_waited_writes: 0,
            strict_fallbacks: 0,
        }
    }

    impl Fake {
        fn zone(&self, zone: &str) -> Result<RotationStatus, AdminError> {
            if zone == "z1" {
                Ok(status(zone))
            } else {
                Err(AdminError::NotFound(format!("no zone named {zone:?}")))
            }
        }
    }

    impl AdminBackend for Fake {
        fn zones(&self) -> Vec<String> {
            vec!["z1".into()]
        }
        fn rotation_status(&self, zone: &str) -> Result<RotationStatus, AdminError> {
            self.zone(zone)
        }
        fn rotation_prepare(
            &self,
            zone: &str,
            req: &PrepareRequest,
        ) -> Result<RotationStatus, AdminError> {
            self.asked.lock().push(format!(
                "prepare {zone} {:?} {:?}",
                req.at_unix, req.window_secs
            ));
            self.zone(zone)
        }
        fn rotation_flip(&self, _: &str) -> Result<RotationStatus, AdminError> {
            Err(AdminError::Conflict("no window is open".into()))
        }
        fn rotation_pause(&self, _: &str) -> Result<RotationStatus, AdminError> {
            Err(AdminError::Forbidden("two approvals needed".into()))
        }
        fn rotation_resume(&self, _: &str) -> Result<RotationStatus, AdminError> {
            Err(AdminError::Invalid("nothing to resume".into()))
        }
        fn rotation_abort(&self, _: &str) -> Result<RotationStatus, AdminError> {
            Err(AdminError::Internal("staging device failed".into()))
        }
        fn rotation_emergency(
            &self,
            zone: &str,
            req: &EmergencyRequest,
        ) -> Result<RotationStatus, AdminError> {
            self.asked.lock().push(format!(
                "emergency {zone} {} {:?}",
                req.reason, req.approvals
            ));
            self.zone(zone)
        }
        fn scrub_start(&self, _: &str) -> Result<ScrubStatus, AdminError> {
            panic!("scrub exploded");
        }
        fn scrub_status(&self, zone: &str) -> Result<ScrubStatus, AdminError> {
            self.zone(zone)?;
            Ok(ScrubStatus {
                zone: zone.into(),
                checked: 5,
                total: 9,
                ..Default::default()
            })
        }
        fn kek_rotate(
            &self,
            zone: &str,
            approvals: &[String],
        ) -> Result<serde_json::Value, AdminError> {
            self.zone(zone)?;
            Ok(serde_json::json!({ "zone": zone, "approvals": approvals.len() }))
        }
        fn root_status(&self) -> Result<RootStatus, AdminError> {
            Ok(RootStatus {
                provider: "sealed-file".into(),
                root_id: "sealed-file:keys/root.sealed".into(),
                description: "sealed root key file".into(),
                busy: false,
                rotation: None,
            })
        }
        fn root_rotate(&self, req: RootRotateRequest) -> Result<serde_json::Value, AdminError> {
            let secrets = [&req.passphrase, &req.new_passphrase].map(|p| p.is_some());
            self.asked.lock().push(format!("root rotate {req:?}"));
            if req.passphrase.is_some_and(|p| p.take() == "wrong") {
                return Err(AdminError::Forbidden("wrong passphrase".into()));
            }
            Ok(serde_json::json!({ "secrets": secrets, "batch": req.batch }))
        }
        fn root_passphrase(&self, req: PassphraseRequest) -> Result<serde_json::Value, AdminError> {
            self.asked.lock().push(format!("root passphrase {req:?}"));
            Ok(serde_json::json!({ "resealed": true }))
        }
        fn volume_stats(&self) -> Vec<VolumeStats> {
            self.actors.lock().push(crate::actor::current());
            vec![VolumeStats {
                name: "vol0".into(),
                id: 1,
                zone: "z1".into(),
                size: 1 << 20,
                mapped_blocks: 4,
                content_blocks: 4,
                dedup_ratio: 1.0,
            }]
        }
        fn zone_info(&self, zone: &str) -> Result<ZoneInfo, AdminError> {
            self.zone(zone)?;
            Ok(ZoneInfo {
                id: 1,
                name: zone.into(),
                dedup: true,
                volumes: 1,
            })
        }
        fn zone_create(&self, req: &CreateZoneRequest) -> Result<ZoneInfo, AdminError> {
            self.asked
                .lock()
                .push(format!("zone create {} {}", req.name, req.dedup));
            self.zone(&req.name)
                .map(|_| Err(AdminError::Conflict("zone \"z1\" already exists".into())))
                .unwrap_or(Ok(ZoneInfo {
                    id: 2,
                    name: req.name.clone(),
                    dedup: req.dedup,
                    volumes: 0,
                }))
        }
        fn zone_set_dedup(&self, zone: &str, on: bool) -> Result<ZoneInfo, AdminError> {
            self.asked.lock().push(format!("dedup {zone} {on}"));
            self.zone_info(zone)
        }
        fn volume_create(&self, req: &CreateVolumeRequest) -> Result<VolumeStats, AdminError> {
            self.asked.lock().push(format!(
                "volume create {} {} {}",
                req.name, req.zone, req.size
            ));
            self.zone(&req.zone)?;
            Ok(VolumeStats::empty(&req.name, 2, &req.zone, req.size))
        }
        fn volume_delete(&self, volume: &str) -> Result<serde_json::Value, AdminError> {
            self.asked.lock().push(format!("volume delete {volume}"));
            match volume {
                "vol0" => Err(AdminError::Conflict(
                    "volume \"vol0\" is being served".into(),
                )),
                v => Ok(serde_json::json!({ "deleted": v })),
            }
        }
        fn keys(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>, AdminError> {
            self.asked.lock().push(format!("keys {zone:?}"));
            if let Some(z) = zone {
                self.zone(z)?;
            }
            Ok(vec![KeyInfo {
                zone: "z1".into(),
                id: "z1-dek-v1".into(),
                purpose: "dek".into(),
                version: 1,
                state: "active".into(),
                age_days: 0.5,
                wrapped_by_kek: Some(1),
                wrapped_by_root: None,
                content_blocks: Some(4),
                created_unix: 1,
                activated_unix: Some(1),
                deactivated_unix: None,
                destroyed_unix: None,
            }])
        }
        fn check(&self) -> CheckReport {
            CheckReport {
                mapped_blocks: 4,
                content_blocks: 4,
                used_slots: 4,
                problems: vec!["a problem".into()],
            }
        }
        fn health(&self) -> Health {
            Health {
                status: "ok".into(),
                problems: vec![],
            }
        }

        fn block_info(&self, volume: &str, _lba: u64) -> Result<serde_json::Value, AdminError> {
            Err(AdminError::NotFound(format!("no volume named {volume:?}")))
        }

        fn stream_request(
            &self,
            zone: &str,
            _req: crate::admin::StreamRequest,
        ) -> Result<serde_json::Value, AdminError> {
            Err(AdminError::NotFound(format!("no zone named {zone:?}")))
        }
    }

    struct TestServer {
        addr: SocketAddr,
        fake: Arc<Fake>,
        /// Named tokens: viewer, operator, admin (in that order).
        named: Vec<String>,
        _dir: tempfile::TempDir,
        stop: watch::Sender<bool>,
        thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = self.stop.send(true);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn start() -> TestServer {
        let fake = Arc::new(Fake::default());
        let backend: Arc<dyn AdminBackend> = fake.clone();
        let (stop, rx) = watch::channel(false);
        let (tx, addr_rx) = mpsc::channel();
        let dir = tempfile::tempdir().unwrap();
        let token = crate::admin::token::AdminToken::parse(TOKEN).unwrap();
        let mut tokens = TokenStore::load(dir.path(), Some(token)).unwrap();
        let named = Role::ALL
            .iter()
            .map(|r| tokens.create(r.name(), *r, None, 1).unwrap().token.clone())
            .collect();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = bind("127.0.0.1:0", false).await?;
                tx.send(listener.local_addr()?).unwrap();
                serve(
                    listener,
                    backend,
                    tokens,
                    Exporter::install().unwrap(),
                    rx,
                    None,
                )
                .await
            })
        });
        let addr = addr_rx.recv().expect("server started");
        TestServer {
            addr,
            fake,
            named,
            _dir: dir,
            stop,
            thread: Some(thread),
        }
    }

    /// One request; returns the status, content type and body.
    fn request(
        srv: &TestServer,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let url = format!("http://{}{path}", srv.addr);
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (m, b) => {
                let mut r = if m == "POST" {
                    agent.post(&url)
                } else {
                    agent.put(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(b.unwrap_or(""))
            }
        };
        let mut resp = resp.expect("an HTTP answer");
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (
            resp.status().as_u16(),
            ctype,
            resp.body_mut().read_to_string().unwrap(),
        )
    }

    fn error_of(body: &str) -> ErrorBody {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
    }

    #[test]
    fn every_route_needs_the_token() {
        let srv = start();
        for path in [
            "/health",
            "/metrics",
            "/api/v1/zones",
            "/api/v1/volumes",
            "/api/v1/root",
            "/api/v1/keys",
            "/api/v1/zones/z1/keys",
            "/api/v1/check",
            "/nope",
        ] {
            for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
                let (code, ctype, body) = request(&srv, "GET", path, token, None);
                assert_eq!(code, 401, "{path} with {token:?}: {body}");
                assert!(ctype.starts_with("application/json"), "{ctype}");
                let e = error_of(&body);
                assert_eq!(e.kind, "unauthorized");
                assert!(!body.contains(TOKEN), "{body}");
            }
        }
        let (code, _, body) = request(
            &srv,
            "POST",
            "/api/v1/zones/z1/rotation/prepare",
            None,
            Some("{}"),
        );
        assert_eq!(code, 401, "{body}");
        assert!(
            srv.fake.asked.lock().is_empty(),
            "an unauthenticated call reached the backend"
        );
        let (code, _, body) = request(&srv, "GET", "/health", Some(TOKEN), None);
        assert_eq!(code, 200, "{body}");
        let h: Health = serde_json::from_str(&body).unwrap();
        assert_eq!(h.status, "ok");
    }

    #[test]
    fn bodies_reach_the_backend_and_answers_come_back() {
        let srv = start();
        let (code, _, body) = request(&srv, "GET", "/api/v1/zones", Some(TOKEN), None);
        assert_eq!((code, body.as_str()), (200, r#"["z1"]"#));
        let (code, _, body) = request(&srv, "GET", "/api/v1/volumes", Some(TOKEN), None);
        assert_eq!(code, 200);
        let v: Vec<VolumeStats> = serde_json::from_str(&body).unwrap();
        assert_eq!((v[0].name.as_str(), v[0].mapped_blocks), ("vol0", 4));
        let (code, _, body) = request(&srv, "GET", "/api/v1/zones/z1/rotation", Some(TOKEN), None);
        assert_eq!(code, 200);
        let st: RotationStatus = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (st.phase, st.staged_blocks, st.keys.len()),
            (RotationPhase::Window, 3, 2)
        );

        let prepare = "/api/v1/zones/z1/rotation/prepare";
        assert_eq!(request(&srv, "POST", prepare, Some(TOKEN), None).0, 200);
        assert_eq!(
            request(
                &srv,
                "POST",
                prepare,
                Some(TOKEN),
                Some(r#"{"window_secs": 90}"#)
            )
            .0,
            200
        );
        let emergency = r#"{"reason": "leak", "approvals": ["{\"a\":1}"]}"#;
        let (code, _, body) = request(
            &srv,
            "POST",
            "/api/v1/zones/z1/rotation/emergency",
            Some(TOKEN),
            Some(emergency),
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            *srv.fake.asked.lock(),
            [
                "prepare z1 None None",
                "prepare z1 None Some(90)",
                r#"emergency z1 leak ["{\"a\":1}"]"#
            ]
        );
        let (code, _, body) = request(
            &srv,
            "POST",
            "/api/v1/zones/z1/kek/rotate",
            Some(TOKEN),
            Some(r#"{"approvals": ["x", "y"]}"#),
        );
        assert_eq!(
            (code, body.as_str()),
            (200, r#"{"approvals":2,"zone":"z1"}"#)
        );
        let (code, _, body) = request(&srv, "GET", "/api/v1/zones/z1/scrub", Some(TOKEN), None);
        assert_eq!(code, 200);
        let sc: ScrubStatus = serde_json::from_str(&body).unwrap();
        assert_eq!((sc.checked, sc.total), (5, 9));
    }

    #[test]
    fn keys_and_the_check_are_read_through_the_api() {
        let srv = start();
        let get = |path| request(&srv, "GET", path, Some(TOKEN), None);
        for path in ["/api/v1/keys", "/api/v1/zones/z1/keys"] {
            let (code, _, body) = get(path);
            assert_eq!(code, 200, "{path}: {body}");
            let keys: Vec<KeyInfo> = serde_json::from_str(&body).unwrap();
            assert_eq!(
                (keys[0].id.as_str(), keys[0].content_blocks),
                ("z1-dek-v1", Some(4))
            );
        }
        let (code, _, body) = get("/api/v1/zones/nope/keys");
        assert_eq!((code, error_of(&body).kind.as_str()), (404, "not_found"));
        assert_eq!(
            *srv.fake.asked.lock(),
            ["keys None", "keys Some(\"z1\")", "keys Some(\"nope\")"]
        );
        let (code, _, body) = get("/api/v1/check");
        assert_eq!(code, 200, "{body}");
        let report: CheckReport = serde_json::from_str(&body).unwrap();
        assert_eq!((report.used_slots, report.problems.len()), (4, 1));
        let (code, _, body) = request(&srv, "POST", "/api/v1/check", Some(TOKEN), None);
        assert_eq!(
            (code, error_of(&body).kind.as_str()),
            (405, "method_not_allowed")
        );
    }

    #[test]
    fn zones_and_volumes_are_managed_through_the_api() {
        let srv = start();
        let call = |method, path, body| request(&srv, method, path, Some(TOKEN), body);
        let (code, _, body) = call("GET", "/api/v1/zones/z1", None);
        assert_eq!(code, 200, "{body}");
        let z: ZoneInfo = serde_json::from_str(&body).unwrap();
        assert_eq!((z.name.as_str(), z.volumes), ("z1", 1));
        let (code, _, body) = call("POST", "/api/v1/zones", Some(r#"{"name": "z2"}"#));
        assert_eq!(code, 200, "{body}");
        let z: ZoneInfo = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (z.name.as_str(), z.dedup),
            ("z2", true),
            "dedup on by default"
        );
        let (code, _, body) = call(
            "POST",
            "/api/v1/zones",
            Some(r#"{"name": "z1", "dedup": false}"#),
        );
        assert_eq!((code, error_of(&body).kind.as_str()), (409, "conflict"));
        let (code, _, body) = call("POST", "/api/v1/zones/z1/dedup", Some(r#"{"on": false}"#));
        assert_eq!(code, 200, "{body}");
        let (code, _, body) = call(
            "POST",
            "/api/v1/volumes",
            Some(r#"{"name": "v2", "zone": "z1", "size": 8192}"#),
        );
        assert_eq!(code, 200, "{body}");
        let v: VolumeStats = serde_json::from_str(&body).unwrap();
        assert_eq!((v.name.as_str(), v.size), ("v2", 8192));
        let (code, _, body) = call(
            "POST",
            "/api/v1/volumes",
            Some(r#"{"name": "v3", "zone": "nope", "size": 8192}"#),
        );
        assert_eq!((code, error_of(&body).kind.as_str()), (404, "not_found"));
        for bad in [
            r#"{"name": "v3", "zone": "z1"}"#,
            r#"{"name": "v3", "zone": "z1", "size": -1}"#,
            r#"{"name": "v3", "zone": "z1", "size": 8192, "colour": 1}"#,
        ] {
            let (code, _, body) = call("POST", "/api/v1/volumes", Some(bad));
            assert_eq!(
                (code, error_of(&body).kind.as_str()),
                (400, "bad_request"),
                "{bad}"
            );
        }
        let (code, _, body) = call("POST", "/api/v1/volumes/v2/delete", None);
        assert_eq!((code, body.as_str()), (200, r#"{"deleted":"v2"}"#));
        let (code, _, body) = call("POST", "/api/v1/volumes/vol0/delete", None);
        assert_eq!((code, error_of(&body).kind.as_str()), (409, "conflict"));
        assert_eq!(
            *srv.fake.asked.lock(),
            [
                "zone create z2 true",
                "zone create z1 false",
                "dedup z1 false",
                "volume create v2 z1 8192",
                "volume create v3 nope 8192",
                "volume delete v2",
                "volume delete vol0",
            ]
        );
    }

    #[test]
    fn admin_errors_map_to_statuses_with_json_bodies() {
        let srv = start();
        for (path, code, kind, msg) in [
            (
                "/api/v1/zones/zz/rotation/prepare",
                404,
                "not_found",
                "no zone named \"zz\"",
            ),
            (
                "/api/v1/zones/z1/rotation/resume",
                400,
                "invalid",
                "nothing to resume",
            ),
            (
                "/api/v1/zones/z1/rotation/flip",
                409,
                "conflict",
                "no window is open",
            ),
            (
                "/api/v1/zones/z1/rotation/pause",
                403,
                "forbidden",
                "two approvals needed",
            ),
            (
                "/api/v1/zones/z1/rotation/abort",
                500,
                "internal",
                "staging device failed",
            ),
            (
                "/api/v1/zones/z1/scrub",
                500,
                "internal",
                "the operation failed inside the server",
            ),
            (
                "/api/v1/zones/z1/nothing",
                404,
                "no_route",
                "no such route: POST /api/v1/zones/z1/nothing",
            ),
        ] {
            let (got, ctype, body) = request(&srv, "POST", path, Some(TOKEN), None);
            assert_eq!(got, code, "{path}: {body}");
            assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
            let e = error_of(&body);
            assert_eq!(e.kind, kind, "{path}");
            assert!(e.error.starts_with(msg), "{path}: {}", e.error);
        }
        let (code, _, body) = request(&srv, "GET", "/api/v1/zones/zz/rotation", Some(TOKEN), None);
        assert_eq!((code, error_of(&body).kind.as_str()), (404, "not_found"));
        let (code, _, body) = request(&srv, "PUT", "/api/v1/zones", Some(TOKEN), Some("{}"));
        assert_eq!(
            (code, error_of(&body).kind.as_str()),
            (405, "method_not_allowed")
        );
        // The server outlived the backend's panic.
        assert_eq!(request(&srv, "GET", "/health", Some(TOKEN), None).0, 200);
    }

    #[test]
    fn bad_bodies_are_refused_clearly() {
        let srv = start();
        let prepare = "/api/v1/zones/z1/rotation/prepare";
        for (body, want) in [
            ("{not json", "bad JSON body"),
            (
                r#"{"window_secs": 90, "colour": "red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"window_secs": -1}"#, "bad JSON body"),
            ("[1, 2]", "bad JSON body"),
        ] {
            let (code, _, text) = request(&srv, "POST", prepare, Some(TOKEN), Some(body));
            assert_eq!(code, 400, "{body}: {text}");
            let e = error_of(&text);
            assert_eq!(e.kind, "bad_request");
            assert!(e.error.contains(want), "{body}: {}", e.error);
        }
        // An emergency needs its reason: an empty body is not enough.
        let (code, _, text) = request(
            &srv,
            "POST",
            "/api/v1/zones/z1/rotation/emergency",
            Some(TOKEN),
            None,
        );
        assert_eq!(code, 400, "{text}");
        assert!(
            error_of(&text).error.contains("missing field `reason`"),
            "{text}"
        );
        assert!(
            srv.fake.asked.lock().is_empty(),
            "a refused body reached the backend"
        );
    }

    /// The root key routes: bodies with passphrases reach the backend, whose
    /// Debug of them is redacted; a bad body is refused without echoing any
    /// of its values.
    #[test]
    fn root_routes_carry_secrets_without_echoing_them() {
        let srv = start();
        let (code, _, body) = request(&srv, "GET", "/api/v1/root", Some(TOKEN), None);
        assert_eq!(code, 200, "{body}");
        let st: RootStatus = serde_json::from_str(&body).unwrap();
        assert_eq!(st.provider, "sealed-file");
        let rotate = "/api/v1/root/rotate";
        let (code, _, body) = request(
            &srv,
            "POST",
            rotate,
            Some(TOKEN),
            Some(r#"{"passphrase": "old-s3cret", "new_passphrase": "new-s3cret", "batch": 2}"#),
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, r#"{"batch":2,"secrets":[true,true]}"#);
        let (code, _, body) = request(
            &srv,
            "POST",
            rotate,
            Some(TOKEN),
            Some(r#"{"passphrase": "wrong"}"#),
        );
        assert_eq!((code, error_of(&body).kind.as_str()), (403, "forbidden"));
        let (code, _, body) = request(
            &srv,
            "POST",
            "/api/v1/root/passphrase",
            Some(TOKEN),
            Some(r#"{"passphrase": "old-s3cret", "new_passphrase": "new-s3cret"}"#),
        );
        assert_eq!(code, 200, "{body}");
        let asked = srv.fake.asked.lock().join("\n");
        assert!(asked.contains("SecretText(<redacted>)"), "{asked}");
        assert!(!asked.contains("s3cret"), "{asked}");
        // A value in the wrong place, an unknown field named after a secret,
        // bad JSON: refused, and nothing of the body comes back.
        for bad in [
            r#"{"passphrase": "old-s3cret", "batch": "new-s3cret"}"#,
            r#"{"passphrase": "old-s3cret", "new-s3cret": 1}"#,
            r#"{"passphrase": "old-s3cret" "#,
            r#"{"passphrase": ["old-s3cret"]}"#,
        ] {
            for path in [rotate, "/api/v1/root/passphrase"] {
                let (code, _, text) = request(&srv, "POST", path, Some(TOKEN), Some(bad));
                assert_eq!(code, 400, "{bad}: {text}");
                let e = error_of(&text);
                assert!(e.error.starts_with("bad JSON body"), "{text}");
                assert!(!text.contains("s3cret"), "{bad} echoed: {text}");
            }
        }
        assert_eq!(srv.fake.asked.lock().len(), 3);
    }

    /// Sends raw bytes (headers and part of a body) and returns the answer.
    fn raw(srv: &TestServer, head: String, body: Vec<u8>) -> String {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut w = s.try_clone().unwrap();
        // The server may answer before it has read everything: write from a
        // thread and ignore a reset.
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&body);
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("}") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        drop(s);
        let _ = writer.join();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn oversized_bodies_are_refused_with_413() {
        let srv = start();
        let path = "/api/v1/zones/z1/rotation/prepare";
        // Declared too large: refused before a byte of it is read.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let answer = raw(&srv, head, Vec::new());
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#""kind":"payload_too_large""#), "{answer}");
        // Chunked, so the size is only known while reading.
        let big = MAX_BODY + 4096;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n{big:x}\r\n"
        );
        let answer = raw(&srv, head, vec![b' '; big]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#""kind":"payload_too_large""#), "{answer}");
        assert!(srv.fake.asked.lock().is_empty());
    }

    #[test]
    fn metrics_render_zone_gauges() {
        let srv = start();
        let (code, ctype, text) = request(&srv, "GET", "/metrics", Some(TOKEN), None);
        assert_eq!(code, 200, "{text}");
        assert_eq!(ctype, PROMETHEUS_TEXT);
        let value = |name: &str, labels: &[&str]| -> Option<f64> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .find(|l| labels.iter().all(|x| l.contains(x)))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        assert_eq!(
            value("keyturn_rotation_phase", &[r#"zone="z1""#]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value("keyturn_rotation_staged_blocks", &[r#"zone="z1""#]),
            Some(3.0)
        );
        assert_eq!(
            value("keyturn_rotation_staging_used_bytes", &[r#"zone="z1""#]),
            Some(12288.0)
        );
        assert_eq!(
            value(
                "keyturn_zone_key_blocks",
                &[r#"zone="z1""#, r#"version="1""#]
            ),
            Some(10.0)
        );
        assert_eq!(
            value(
                "keyturn_zone_key_blocks",
                &[r#"zone="z1""#, r#"version="2""#]
            ),
            Some(3.0)
        );
        assert!(text.contains("# HELP keyturn_rotation_phase"), "{text}");
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in ["127.0.0.1:0", "[::1]:10810", "127.1.2.3:80", "localhost:0"] {
            assert!(loopback_addr(ok).is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0:10810", "192.0.2.7:10810", "[::]:1"] {
            let e = loopback_addr(bad).unwrap_err();
            assert!(matches!(e, ServeError::NotLoopback(_)), "{bad}: {e}");
            assert!(e.to_string().contains("loopback only"), "{e}");
        }
        assert!(matches!(
            loopback_addr("nonsense"),
            Err(ServeError::BadAddress { .. })
        ));
    }

    mod roles;
}
