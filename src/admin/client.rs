//! A blocking client of the admin API, for the CLI.
//!
//! It finds the server of a pool by `POOL/admin.addr` (written by `keyturn
//! serve`, removed when it stops cleanly), else by `[admin] listen` in
//! `pool.toml`, and authenticates with the pool's token file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::token::{AdminToken, TokenError};
use super::{
    CheckReport, CreateVolumeRequest, CreateZoneRequest, DedupRequest, EmergencyRequest, ErrorBody,
    Health, KekRotateRequest, KeyInfo, PassphraseRequest, PrepareRequest, RootRotateRequest,
    RootStatus, RotationStatus, ScrubStatus, VolumeStats, ZoneInfo,
};
use crate::config::{ConfigError, PoolConfig};
use crate::keys::KeyError;

/// File in the pool directory holding the running server's admin address.
pub const ADDR_FILE: &str = "admin.addr";

/// Errors talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the address: no server runs for the pool.
    #[error("no keyturn server is answering for pool {pool} at {addr} (start `keyturn serve`)")]
    NotRunning {
        /// Pool directory.
        pool: String,
        /// Address tried.
        addr: String,
    },
    /// The server answered with an error; `message` is its own.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error kind from the body (see [`ErrorBody`]).
        kind: String,
        /// Error message from the body.
        message: String,
    },
    /// The pool's configuration cannot be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The token file cannot be read.
    #[error("cannot read the admin API token: {0}")]
    Token(#[from] TokenError),
    /// `admin.addr` cannot be read.
    #[error("cannot read {path}: {source}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The request failed on the way (a reset, a timeout, not HTTP).
    #[error("admin API at {addr}: {source}")]
    Transport {
        /// Server address.
        addr: String,
        /// What failed.
        #[source]
        source: ureq::Error,
    },
    /// The server's answer is not what the API promises.
    #[error("admin API at {addr}: unexpected answer to {path}: {reason}")]
    BadAnswer {
        /// Server address.
        addr: String,
        /// Route.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The environment variable holding a named API token for the CLI (else
/// the pool's admin token file is used).
pub const API_TOKEN_ENV: &str = "KEYTURN_API_TOKEN";

/// A client bound to one pool's admin API.
pub struct AdminClient {
    agent: ureq::Agent,
    pool: PathBuf,
    addr: String,
    /// `addr` is `pool.toml`'s, not the one a running server of this pool
    /// wrote to `admin.addr`.
    configured: bool,
    token: AdminToken,
}

impl AdminClient {
    /// The client for the pool in `dir`: its server address and token.
    /// Nothing is sent yet.
    pub fn for_pool(dir: &Path) -> Result<Self, ClientError> {
        let config = PoolConfig::load(&dir.join("pool.toml"))?;
        let addr_file = dir.join(ADDR_FILE);
        let (addr, configured) = match std::fs::read_to_string(&addr_file) {
            Ok(text) => (text.trim().to_owned(), false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (config.admin.listen.clone(), true)
            }
            Err(source) => {
                return Err(ClientError::AddrFile {
                    path: addr_file,
                    source,
                });
            }
        };
        // A named token from the environment acts with its own role.
        let named = match std::env::var(API_TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => {
                Some(AdminToken::parse(&t).map_err(|reason| TokenError::Invalid {
                    path: format!("${API_TOKEN_ENV}"),
                    reason,
                })?)
            }
            _ => None,
        };
        // Every server writes the token file before it listens: without
        // one, no server has run for this pool.
        let token = match named {
            Some(t) => t,
            None => match AdminToken::load(&config.admin.token_path(dir)) {
                Err(TokenError::File(KeyError::NotFound { .. })) => {
                    return Err(ClientError::NotRunning {
                        pool: dir.display().to_string(),
                        addr,
                    });
                }
                t => t?,
            },
        };
        let agent = ureq::Agent::config_builder()
            // Loopback only: never through a proxy from the environment.
            .proxy(None)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        Ok(AdminClient {
            agent,
            pool: dir.to_path_buf(),
            addr,
            configured,
            token,
        })
    }

    /// The server address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET path`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.decode(path, self.send(path, None)?)
    }

    /// `POST path` with `body` as JSON, decoded as `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| self.bad(path, e.to_string()))?;
        self.decode(path, self.send(path, Some(&json))?)
    }

    /// [`AdminClient::post`] for a body that carries secrets: its JSON text
    /// is wiped once sent.
    fn post_secret<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(body).map_err(|e| self.bad(path, e.to_string()))?,
        );
        self.decode(path, self.send(path, Some(&json))?)
    }

    /// `PUT path` with `body` as JSON, decoded as `T`.
    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| self.bad(path, e.to_string()))?;
        self.decode(path, self.send_as(path, Some(&json), true)?)
    }

    /// `POST path` with no body, decoded as `T`.
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.decode(path, self.send(path, Some(b""))?)
    }

    /// The text of `GET path` (for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.send(path, None)
    }

    /// Sends a GET (no body) or a POST, and returns the body of a success;
    /// an error status becomes [`ClientError::Api`] with the server's message.
    fn send(&self, path: &str, body: Option<&[u8]>) -> Result<String, ClientError> {
        self.send_as(path, body, false)
    }

    /// [`AdminClient::send`], with a body sent as a PUT when `put`.
    fn send_as(&self, path: &str, body: Option<&[u8]>, put: bool) -> Result<String, ClientError> {
        let url = format!("http://{}{path}", self.addr);
        let auth = format!("Bearer {}", self.token.expose());
        let resp = match body {
            None => self.agent.get(&url).header("Authorization", &auth).call(),
            Some(b) if put => self
                .agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b),
            Some(b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b),
        };
        let mut resp = resp.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.bad(path, e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        if status == 401 && self.configured {
            // A server of this pool writes `admin.addr` before it listens,
            // so one found only at the configured address that refuses this
            // pool's token serves another pool (two pools on one host, both
            // on the default address): none runs for this one. Opening the
            // pool here is still guarded by its lock.
            return Err(ClientError::NotRunning {
                pool: self.pool.display().to_string(),
                addr: self.addr.clone(),
            });
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Err(ClientError::Api {
                status,
                kind: body.kind,
                message: body.error,
            }),
            Err(_) => Err(self.bad(path, format!("HTTP {status} without an error body"))),
        }
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, text: String) -> Result<T, ClientError> {
        serde_json::from_str(&text).map_err(|e| self.bad(path, e.to_string()))
    }

    fn bad(&self, path: &str, reason: String) -> ClientError {
        ClientError::BadAnswer {
            addr: self.addr.clone(),
            path: path.to_owned(),
            reason,
        }
    }

    fn transport(&self, e: ureq::Error) -> ClientError {
        let refused = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ),
            ureq::Error::ConnectionFailed => true,
            _ => false,
        };
        if refused {
            ClientError::NotRunning {
                pool: self.pool.display().to_string(),
                addr: self.addr.clone(),
            }
        } else {
            ClientError::Transport {
                addr: self.addr.clone(),
                source: e,
            }
        }
    }

    // Typed calls, one per route.

    /// `GET /health`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.get("/health")
    }

    /// `GET /api/v1/zones`.
    pub fn zones(&self) -> Result<Vec<String>, ClientError> {
        self.get("/api/v1/zones")
    }

    /// `GET /api/v1/volumes`.
    pub fn volume_stats(&self) -> Result<Vec<VolumeStats>, ClientError> {
        self.get("/api/v1/volumes")
    }

    /// `GET /api/v1/zones/{zone}`.
    pub fn zone_info(&self, zone: &str) -> Result<ZoneInfo, ClientError> {
        self.get(&zone_path(zone, ""))
    }

    /// `POST /api/v1/zones`.
    pub fn zone_create(&self, req: &CreateZoneRequest) -> Result<ZoneInfo, ClientError> {
        self.post("/api/v1/zones", req)
    }

    /// `POST /api/v1/zones/{zone}/dedup`.
    pub fn zone_set_dedup(&self, zone: &str, on: bool) -> Result<ZoneInfo, ClientError> {
        self.post(&zone_path(zone, "dedup"), &DedupRequest { on })
    }

    /// `POST /api/v1/volumes`.
    pub fn volume_create(&self, req: &CreateVolumeRequest) -> Result<VolumeStats, ClientError> {
        self.post("/api/v1/volumes", req)
    }

    /// `POST /api/v1/volumes/{volume}/delete`.
    pub fn volume_delete(&self, volume: &str) -> Result<serde_json::Value, ClientError> {
        self.post_empty(&named_path("/api/v1/volumes/", volume, "delete"))
    }

    /// `GET /api/v1/zones/{zone}/rotation`.
    pub fn rotation_status(&self, zone: &str) -> Result<RotationStatus, ClientError> {
        self.get(&zone_path(zone, "rotation"))
    }

    /// `POST /api/v1/zones/{zone}/rotation/prepare`.
    pub fn rotation_prepare(
        &self,
        zone: &str,
        req: &PrepareRequest,
    ) -> Result<RotationStatus, ClientError> {
        self.post(&zone_path(zone, "rotation/prepare"), req)
    }

    /// `POST /api/v1/zones/{zone}/rotation/{action}` for `flip`, `pause`,
    /// `resume` and `abort`.
    pub fn rotation_action(&self, zone: &str, action: &str) -> Result<RotationStatus, ClientError> {
        self.post_empty(&zone_path(zone, &format!("rotation/{action}")))
    }

    /// `POST /api/v1/zones/{zone}/mac/rotate` (`rotate`), else
    /// `GET /api/v1/zones/{zone}/mac`.
    pub fn mac(&self, zone: &str, rotate: bool) -> Result<serde_json::Value, ClientError> {
        if rotate {
            self.post(&zone_path(zone, "mac/rotate"), &serde_json::json!({}))
        } else {
            self.get(&zone_path(zone, "mac"))
        }
    }

    /// `POST /api/v1/zones/{zone}/rotation/rollback`.
    pub fn rotation_rollback(
        &self,
        zone: &str,
        req: &crate::admin::RollbackRequest,
    ) -> Result<RotationStatus, ClientError> {
        self.post(&zone_path(zone, "rotation/rollback"), req)
    }

    /// `POST /api/v1/zones/{zone}/rotation/emergency`.
    pub fn rotation_emergency(
        &self,
        zone: &str,
        req: &EmergencyRequest,
    ) -> Result<RotationStatus, ClientError> {
        self.post(&zone_path(zone, "rotation/emergency"), req)
    }

    /// `POST /api/v1/zones/{zone}/kek/rotate`.
    pub fn kek_rotate(
        &self,
        zone: &str,
        req: &KekRotateRequest,
    ) -> Result<serde_json::Value, ClientError> {
        self.post(&zone_path(zone, "kek/rotate"), req)
    }

    /// `GET /api/v1/keys`, or `GET /api/v1/zones/{zone}/keys` for one zone.
    pub fn keys(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>, ClientError> {
        match zone {
            Some(z) => self.get(&zone_path(z, "keys")),
            None => self.get("/api/v1/keys"),
        }
    }

    /// `GET /api/v1/check`.
    pub fn check(&self) -> Result<CheckReport, ClientError> {
        self.get("/api/v1/check")
    }

    /// `GET /api/v1/root`.
    pub fn root_status(&self) -> Result<RootStatus, ClientError> {
        self.get("/api/v1/root")
    }

    /// `POST /api/v1/root/rotate`. The request's passphrases travel in the
    /// body only.
    pub fn root_rotate(&self, req: &RootRotateRequest) -> Result<serde_json::Value, ClientError> {
        self.post_secret("/api/v1/root/rotate", req)
    }

    /// `POST /api/v1/root/passphrase`.
    pub fn root_passphrase(
        &self,
        req: &PassphraseRequest,
    ) -> Result<serde_json::Value, ClientError> {
        self.post_secret("/api/v1/root/passphrase", req)
    }

    /// `POST /api/v1/zones/{zone}/scrub`.
    pub fn scrub_start(&self, zone: &str) -> Result<ScrubStatus, ClientError> {
        self.post_empty(&zone_path(zone, "scrub"))
    }

    /// `GET /api/v1/zones/{zone}/scrub`.
    pub fn scrub_status(&self, zone: &str) -> Result<ScrubStatus, ClientError> {
        self.get(&zone_path(zone, "scrub"))
    }
}

/// `/api/v1/zones/{zone}/{rest}`, the zone percent-encoded (no trailing
/// slash when `rest` is empty).
fn zone_path(zone: &str, rest: &str) -> String {
    named_path("/api/v1/zones/", zone, rest)
}

/// `{prefix}{name}/{rest}`, the name percent-encoded.
fn named_path(prefix: &str, name: &str, rest: &str) -> String {
    let mut p = String::from(prefix);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    if !rest.is_empty() {
        p.push('/');
        p.push_str(rest);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names_are_escaped_in_paths() {
        assert_eq!(zone_path("z1", "rotation"), "/api/v1/zones/z1/rotation");
        assert_eq!(
            zone_path("a/b c%", "scrub"),
            "/api/v1/zones/a%2Fb%20c%25/scrub"
        );
    }
}
