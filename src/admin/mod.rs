//! The admin API: what a running server lets an operator do and see, over
//! HTTP on loopback with a bearer token.
//!
//! [`AdminBackend`] is the contract between the HTTP layer (which knows
//! routes, authentication and JSON, nothing of keys or blocks) and the pool
//! (which implements it). The types here are the JSON bodies.
//!
//! - [`http`]: the server (routes, authentication, errors);
//! - [`client`]: the blocking client the CLI uses;
//! - [`token`]: the pool's admin token and its file;
//! - [`tokens`]: named tokens with roles, stored hashed;
//! - [`metrics`]: the Prometheus recorder and the rotation gauges;
//! - [`key_metrics`]: key ages, the scheduler and the audit log as metrics.

pub mod client;
pub mod http;
pub mod key_metrics;
pub mod limits;
pub mod metrics;
pub mod tls_listener;
pub mod token;
pub mod tokens;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The body of every answer that is not a success:
/// `{"error": "what went wrong", "kind": "not_found"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The message, for a person.
    pub error: String,
    /// What kind of failure: `not_found`, `invalid`, `conflict`,
    /// `forbidden`, `internal` (from [`AdminError`]), or `unauthorized`,
    /// `bad_request`, `payload_too_large`, `request_timeout`, `no_route`,
    /// `method_not_allowed`.
    pub kind: String,
    /// A request outside its token's role (403): the role it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_role: Option<String>,
}

/// Errors an admin operation returns; each maps to one HTTP status.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum AdminError {
    /// No zone (or volume) of that name: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or names an impossible value: 400.
    #[error("{0}")]
    Invalid(String),
    /// The operation does not fit the current state (e.g. flip without a window): 409.
    #[error("{0}")]
    Conflict(String),
    /// Dual control refused the request: 403.
    #[error("{0}")]
    Forbidden(String),
    /// The operation failed inside the server: 500.
    #[error("{0}")]
    Internal(String),
}

/// Where a zone is in its DEK rotation cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationPhase {
    /// No rotation under way: every content block is under the active key.
    Idle,
    /// The window is open: the next key exists, writes go to both keys and
    /// the pipeline stages existing blocks.
    Window,
    /// The window is open but the staging pipeline is paused.
    Paused,
    /// Flipped: the migrator re-encrypts what was not staged and destages.
    Migrating,
    /// Migration is done; the old key waits out the grace period before it
    /// is destroyed.
    Grace,
}

/// Body of `POST /api/v1/zones/{zone}/rotation/prepare`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// Flip automatically at this time (Unix seconds).
    #[serde(default)]
    pub at_unix: Option<u64>,
    /// Flip automatically this many seconds after the window opens.
    #[serde(default)]
    pub window_secs: Option<u64>,
}

/// Body of `POST /api/v1/zones/{zone}/rotation/emergency`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyRequest {
    /// Why (recorded in the audit log).
    pub reason: String,
    /// Dual-control approval tokens, each the JSON text of one approval file.
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// Body of `POST /api/v1/zones/{zone}/rotation/rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Dual-control approval tokens (operation `rollback-rotation`), each
    /// the JSON text of one approval file.
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// Body of `POST /api/v1/zones/{zone}/kek/rotate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekRotateRequest {
    /// Dual-control approval tokens, each the JSON text of one approval file.
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// What `/api/v1/zones/{zone}/stream/...` asks of a zone's change stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamRequest {
    /// `GET .../stream`: the stream's status.
    Status,
    /// `POST .../stream/enable`.
    Enable,
    /// `POST .../stream/disable`.
    Disable,
    /// `GET .../stream/keys`: key sets and windows.
    Keys,
    /// `GET .../stream/agents`: registered agents and their grants.
    Agents,
    /// `POST .../stream/grant`: register an agent.
    Grant(GrantRequest),
    /// `POST .../stream/revoke`: remove an agent.
    Revoke {
        /// Agent name.
        name: String,
    },
    /// `POST .../stream/shred`: crypto-shred one window.
    Shred(ShredRequest),
}

/// Body of `POST /api/v1/zones/{zone}/stream/grant`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Agent name.
    pub name: String,
    /// X25519 public key, 64 hex digits.
    pub public_key: String,
    /// First window start granted, unix seconds (default 0: from the start).
    #[serde(default)]
    pub from_unix: u64,
    /// Windows starting at or after this are not granted (default: open-ended).
    #[serde(default)]
    pub to_unix: Option<u64>,
}

/// Body of `POST /api/v1/zones/{zone}/stream/shred`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShredRequest {
    /// The window's key id (`z<zone>-stream-s<set>-w<window>`), or
    /// `set` and `window`.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Key set.
    #[serde(default)]
    pub set: Option<u32>,
    /// Window within the set.
    #[serde(default)]
    pub window: Option<u32>,
    /// Dual-control approval tokens (JSON texts).
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// A secret in a request body (a passphrase): zeroized on drop, redacted
/// in `Debug`, never `Display`. It travels only inside the JSON body of a
/// request to the loopback admin API, and is never logged.
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    /// Takes ownership of `s`.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// Moves the text out (the caller takes over wiping it); `self` is left
    /// empty.
    pub fn take(mut self) -> String {
        std::mem::take(&mut *self.0)
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// Body of `POST /api/v1/root/rotate`: a root key rotation of the running
/// pool (or the rest of one a crash interrupted).
///
/// A sealed-file pool needs the same secrets as `keyturn keys rotate-root`
/// offline: the passphrase of the root key pool.toml names now (so the
/// admin token alone cannot choose a passphrase for the root key) and the
/// new one. A PKCS#11 pool needs neither: the server is logged in to its
/// token.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootRotateRequest {
    /// Dual-control approval tokens, each the JSON text of one approval file.
    #[serde(default)]
    pub approvals: Vec<String>,
    /// Sealed file: the passphrase of the root key pool.toml names now (the
    /// old one until the rotation switches pool.toml, the new one after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<SecretText>,
    /// Sealed file: the passphrase of the new root key file (not needed to
    /// finish a rotation that has switched pool.toml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_passphrase: Option<SecretText>,
    /// PKCS#11: the label of the new key, generated in the token; `None`
    /// resumes the rotation in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_key_label: Option<String>,
    /// KEKs re-wrapped per atomic save of a zone key file (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Pause between saves, in milliseconds (default 0, at most 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Sealed file: Argon2id memory cost of the new file in KiB (default:
    /// the current file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf_memory_kib: Option<u32>,
    /// Sealed file: Argon2id passes of the new file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf_iterations: Option<u32>,
}

/// Body of `POST /api/v1/root/passphrase`: the same root key sealed under a
/// new passphrase (sealed-file pools).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassphraseRequest {
    /// Dual-control approval tokens (`rotate-root` approvals).
    #[serde(default)]
    pub approvals: Vec<String>,
    /// The current passphrase.
    pub passphrase: Option<SecretText>,
    /// The new passphrase.
    pub new_passphrase: Option<SecretText>,
    /// Argon2id memory cost in KiB (default: the current file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf_memory_kib: Option<u32>,
    /// Argon2id passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf_iterations: Option<u32>,
}

/// `GET /api/v1/root`: the root key and any rotation of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootStatus {
    /// `sealed-file` or `pkcs11`.
    pub provider: String,
    /// The id of the root key pool.toml names (`sealed-file:PATH` or
    /// `pkcs11:TOKEN/LABEL`).
    pub root_id: String,
    /// What unwraps KEKs now, for people (kind and location only).
    pub description: String,
    /// Whether a root key rotation or passphrase change is running now.
    pub busy: bool,
    /// The root key rotation recorded in the pool, if one is unfinished.
    pub rotation: Option<RootRotationStatus>,
}

/// An unfinished root key rotation (see [`RootStatus`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootRotationStatus {
    /// `rewrap`: KEKs are being re-wrapped, the old root key's secret
    /// opens the pool. `retire`: pool.toml names the new root key (its
    /// secret opens the pool); the old one is still to be destroyed.
    pub phase: String,
    /// The id of the root key being retired.
    pub old_root: String,
    /// The id of the root key taking its place.
    pub new_root: String,
    /// When the rotation began (Unix seconds).
    pub started_unix: u64,
    /// KEKs that still have material, over all zones.
    pub keks: usize,
    /// Of those, the ones wrapped by the new root key.
    pub keks_rewrapped: usize,
}

/// Content blocks under one DEK version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyBlocks {
    /// DEK version.
    pub version: u32,
    /// Its state (pre-active, active, decrypt-only, compromised, destroyed).
    pub state: String,
    /// Live content blocks whose live copy is under this version.
    pub blocks: u64,
}

/// `GET /api/v1/zones/{zone}/rotation`: everything an operator needs to
/// follow a rotation. Counters are since the window opened, in this server
/// run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationStatus {
    /// Zone name.
    pub zone: String,
    /// Phase.
    pub phase: RotationPhase,
    /// Active DEK version.
    pub active_version: u32,
    /// The next DEK version (during a window).
    pub next_version: Option<u32>,
    /// The version being migrated away from (after a flip).
    pub old_version: Option<u32>,
    /// Content blocks per DEK version.
    pub keys: Vec<KeyBlocks>,
    /// Live content blocks in the zone.
    pub content_blocks: u64,
    /// Content blocks with a staged copy under the next key.
    pub staged_blocks: u64,
    /// Content blocks migrated (re-encrypted or destaged) since the flip.
    pub migrated_blocks: u64,
    /// Content blocks the phase still has to handle: those without a staged
    /// copy (window), those under an old key or with a staged copy still
    /// to destage (after the flip); 0 once migrated.
    #[serde(default)]
    pub remaining_blocks: u64,
    /// The phase's progress, 0..=100: in a window, staged of all content
    /// blocks; after the flip, migrated of migrated plus remaining (the
    /// blocks the migration has to move, not the zone's blocks written
    /// since).
    pub progress_percent: f64,
    /// Throughput of the phase's pipeline or migrator, bytes per second,
    /// over the phase's own time: from its start until now while it works,
    /// until its work was done once it is (0 when unknown, and when idle).
    pub rate_bytes_per_sec: f64,
    /// Estimated seconds to the end of staging or migration, while it runs
    /// and its rate is known; `None` once done or paused.
    pub eta_secs: Option<f64>,
    /// Staging device bytes in use.
    pub staging_used_bytes: u64,
    /// Staging device bytes free (within the configured capacity).
    pub staging_free_bytes: u64,
    /// Foreground writes acknowledged without a staged copy (staging full or failed).
    pub unstaged_writes: u64,
    /// Staging or migration I/O errors and integrity failures.
    pub errors: u64,
    /// The last error, if any (never key material).
    pub last_error: Option<String>,
    /// Set while the staging pipeline or the migrator waits for space on a
    /// full device: which one, and why. It resumes by itself once space
    /// returns.
    #[serde(default)]
    pub waiting_for_space: Option<String>,
    /// When the window opened (Unix seconds).
    pub window_opened_unix: Option<u64>,
    /// When the flip is (or was) scheduled (Unix seconds).
    pub flip_at_unix: Option<u64>,
    /// When the flip happened (Unix seconds).
    pub flipped_unix: Option<u64>,
    /// When the old key is due for destruction (end of grace, Unix
    /// seconds): a time to come, or just past until the scheduler acts.
    pub destroy_at_unix: Option<u64>,
    /// Whether the current rotation is an emergency one.
    pub emergency: bool,
    /// Blocks decrypted and encrypted under another key since the server
    /// started (staging and migration; destaging is not re-encryption).
    #[serde(default)]
    pub reencrypted_blocks: u64,
    /// How long the last flip took, from taking the zone lock to its journal
    /// record being durable, in microseconds.
    #[serde(default)]
    pub last_flip_micros: Option<u64>,
    /// Seconds from the window opening until every content block had a
    /// staged copy (this server run only).
    #[serde(default)]
    pub staging_secs: Option<f64>,
    /// Seconds from the flip until the migration's records were durable
    /// (this server run only).
    #[serde(default)]
    pub migration_secs: Option<f64>,
    /// The last flip was rolled back: the key version it had made active.
    #[serde(default)]
    pub rolled_back_from: Option<u32>,
    /// When it was rolled back (Unix seconds).
    #[serde(default)]
    pub rolled_back_unix: Option<u64>,
    /// The staging and migration throttle in force, MiB/s (0: none): the
    /// zone policy's when the scheduler started the rotation, else the
    /// pool's `[rotation] rate_mib_s`.
    #[serde(default)]
    pub throttle_mib_s: u64,
    /// Where the throttle comes from: "policy" or "pool".
    #[serde(default)]
    pub throttle_source: String,
    /// Strict writes (policy `staging_full = strict`) that waited for
    /// staging space and got it.
    #[serde(default)]
    pub strict_waited_writes: u64,
    /// Strict writes that waited out the bound and went unstaged (alerted).
    #[serde(default)]
    pub strict_fallbacks: u64,
}

/// `GET /api/v1/zones/{zone}/scrub`, and the answer to starting one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// Zone name.
    pub zone: String,
    /// Whether a scrub is running.
    pub running: bool,
    /// Content-block copies checked so far (data and staged copies).
    pub checked: u64,
    /// Copies to check in all.
    pub total: u64,
    /// Every bad block found, one line each: volume, LBA, content block, reason.
    pub bad: Vec<BadBlock>,
    /// When the last scrub finished (Unix seconds).
    pub finished_unix: Option<u64>,
}

/// One block that failed a scrub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    /// Volume name (empty when no volume maps the content block).
    pub volume: String,
    /// Logical block address in that volume.
    pub lba: u64,
    /// Content block id.
    pub cbid: u64,
    /// Which copy: "data" or "staging".
    pub copy: String,
    /// What went wrong (I/O error, integrity check failed, key missing).
    pub reason: String,
}

/// `GET /api/v1/volumes`: usage and dedup per volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStats {
    /// Volume name.
    pub name: String,
    /// Volume id (names its map file).
    #[serde(default)]
    pub id: u64,
    /// Zone name.
    pub zone: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical blocks mapped (not reading as holes).
    pub mapped_blocks: u64,
    /// Distinct content blocks those map to.
    pub content_blocks: u64,
    /// mapped_blocks / content_blocks (1.0 when nothing is shared).
    pub dedup_ratio: f64,
}

impl VolumeStats {
    /// A volume with nothing mapped yet (a new one).
    pub fn empty(name: &str, id: u64, zone: &str, size: u64) -> Self {
        Self {
            name: name.into(),
            id,
            zone: zone.into(),
            size,
            mapped_blocks: 0,
            content_blocks: 0,
            dedup_ratio: 1.0,
        }
    }
}

/// `GET /api/v1/zones/{zone}`, and the answer to creating a zone or
/// changing its dedup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ZoneInfo {
    /// Zone id.
    pub id: u64,
    /// Zone name.
    pub name: String,
    /// Whether equal blocks written to the zone share one content block.
    pub dedup: bool,
    /// How many volumes it holds.
    pub volumes: u64,
}

/// `POST /api/v1/zones`: create a zone (with its own key chain).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateZoneRequest {
    /// Zone name.
    pub name: String,
    /// Dedup for the zone's writes (on when left out).
    #[serde(default = "default_true")]
    pub dedup: bool,
}

fn default_true() -> bool {
    true
}

/// `POST /api/v1/zones/{zone}/dedup`: turn dedup on or off for new writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupRequest {
    /// On or off.
    pub on: bool,
}

/// `POST /api/v1/volumes`: create a volume, served at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Volume name (its NBD export name).
    pub name: String,
    /// The zone whose keys encrypt it.
    pub zone: String,
    /// Size in bytes, a positive multiple of 4096.
    pub size: u64,
}

/// One key of a zone's inventory (`GET /api/v1/keys`, `GET
/// /api/v1/zones/{zone}/keys`, `keyturn keys list`): what it is and where
/// it stands, never key material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyInfo {
    /// Zone name.
    pub zone: String,
    /// Key id (`z1-dek-v2`).
    pub id: String,
    /// `kek`, `dek` or `mac`.
    pub purpose: String,
    /// Version within its purpose.
    pub version: u32,
    /// pre-active, active, decrypt-only, destroyed or compromised.
    pub state: String,
    /// Days since it was made.
    pub age_days: f64,
    /// The KEK version that wraps it (`None`: a KEK, wrapped by the root key).
    pub wrapped_by_kek: Option<u32>,
    /// The root key that wraps it (KEKs).
    pub wrapped_by_root: Option<String>,
    /// Content blocks whose live copy is under it (DEKs only).
    pub content_blocks: Option<u64>,
    /// When it was made (Unix seconds).
    pub created_unix: u64,
    /// When it became active.
    pub activated_unix: Option<u64>,
    /// When it stopped encrypting.
    pub deactivated_unix: Option<u64>,
    /// When it was destroyed.
    pub destroyed_unix: Option<u64>,
}

/// `GET /api/v1/check` and `keyturn check`: the pool's metadata checked
/// (block maps, refcounts, slot ownership).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckReport {
    /// Logical blocks mapped, over all volumes.
    pub mapped_blocks: u64,
    /// Live content blocks.
    pub content_blocks: u64,
    /// Data slots the allocator counts as used (including frees not yet durable).
    pub used_slots: u64,
    /// Every inconsistency, one line each.
    pub problems: Vec<String>,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// "ok", or "degraded" with reasons.
    pub status: String,
    /// Why it is degraded (a poisoned device, a damaged audit log, ...).
    pub problems: Vec<String>,
}

/// What the admin API asks of the pool. Methods may block (they wait for
/// journal commits and key files); the HTTP layer calls them off the async
/// worker threads.
pub trait AdminBackend: Send + Sync + 'static {
    /// Zone names.
    fn zones(&self) -> Vec<String>;
    /// Rotation status of a zone.
    fn rotation_status(&self, zone: &str) -> Result<RotationStatus, AdminError>;
    /// Opens a rotation window (makes the next DEK, starts staging).
    fn rotation_prepare(
        &self,
        zone: &str,
        req: &PrepareRequest,
    ) -> Result<RotationStatus, AdminError>;
    /// Flips the zone to the next DEK now.
    fn rotation_flip(&self, zone: &str) -> Result<RotationStatus, AdminError>;
    /// Pauses the staging pipeline or migrator.
    fn rotation_pause(&self, zone: &str) -> Result<RotationStatus, AdminError>;
    /// Resumes it.
    fn rotation_resume(&self, zone: &str) -> Result<RotationStatus, AdminError>;
    /// Aborts the window: discards staged copies and destroys the next key.
    fn rotation_abort(&self, zone: &str) -> Result<RotationStatus, AdminError>;
    /// Emergency rotation: compromise the active key, flip at once, migrate unthrottled.
    fn rotation_emergency(
        &self,
        zone: &str,
        req: &EmergencyRequest,
    ) -> Result<RotationStatus, AdminError>;
    /// Starts a scrub of the zone (or returns the running one).
    fn scrub_start(&self, zone: &str) -> Result<ScrubStatus, AdminError>;
    /// The running or last scrub of the zone.
    fn scrub_status(&self, zone: &str) -> Result<ScrubStatus, AdminError>;
    /// KEK rotation of a zone while serving (re-wraps the zone's keys; no
    /// data moves). `approvals` as in [`EmergencyRequest`]. Returns the
    /// report as JSON.
    fn kek_rotate(&self, zone: &str, approvals: &[String])
    -> Result<serde_json::Value, AdminError>;
    /// The root key and any unfinished rotation of it.
    fn root_status(&self) -> Result<RootStatus, AdminError>;
    /// Root key rotation while serving (re-wraps every zone's KEKs; no data
    /// moves), or the rest of an interrupted one. Returns the report as JSON.
    fn root_rotate(&self, req: RootRotateRequest) -> Result<serde_json::Value, AdminError>;
    /// Seals the same root key under a new passphrase while serving.
    fn root_passphrase(&self, req: PassphraseRequest) -> Result<serde_json::Value, AdminError>;
    /// Usage and dedup of every volume.
    fn volume_stats(&self) -> Vec<VolumeStats>;
    /// One zone.
    fn zone_info(&self, zone: &str) -> Result<ZoneInfo, AdminError>;
    /// Creates a zone with a fresh key chain.
    fn zone_create(&self, req: &CreateZoneRequest) -> Result<ZoneInfo, AdminError>;
    /// Turns dedup on or off for a zone's new writes.
    fn zone_set_dedup(&self, zone: &str, on: bool) -> Result<ZoneInfo, AdminError>;
    /// Creates a volume; new connections can open it at once.
    fn volume_create(&self, req: &CreateVolumeRequest) -> Result<VolumeStats, AdminError>;
    /// Deletes a volume and frees its space; refused (409) while a client
    /// has it open.
    fn volume_delete(&self, volume: &str) -> Result<serde_json::Value, AdminError>;
    /// The keys of one zone, or of every zone (`None`).
    fn keys(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>, AdminError>;
    /// The metadata check of the pool as it is now.
    fn check(&self) -> CheckReport;
    /// Health.
    fn health(&self) -> Health;
    /// Provenance of one logical block (see `Pool::block_info`).
    fn block_info(&self, volume: &str, lba: u64) -> Result<serde_json::Value, AdminError>;
    /// A zone's change stream (see [`StreamRequest`]).
    fn stream_request(
        &self,
        zone: &str,
        req: StreamRequest,
    ) -> Result<serde_json::Value, AdminError>;
    /// Rolls the zone back to the DEK its last flip retired (within the
    /// grace period; dual control). A backend without it answers 404.
    fn rotation_rollback(
        &self,
        zone: &str,
        req: &RollbackRequest,
    ) -> Result<RotationStatus, AdminError> {
        let _ = (zone, req);
        Err(AdminError::NotFound(
            "this server cannot roll rotations back".into(),
        ))
    }
    /// Starts a MAC key rotation of the zone (`rotate`) or reports where
    /// its MAC keys stand, as JSON. A backend without it answers 404.
    fn mac_request(&self, zone: &str, rotate: bool) -> Result<serde_json::Value, AdminError> {
        let _ = (zone, rotate);
        Err(AdminError::NotFound(
            "this server cannot rotate MAC keys".into(),
        ))
    }
    /// The key-rotation report of `[from, to)` (times as `keyturn report`
    /// takes them: a date or an RFC 3339 time; `to` absent: now). A backend
    /// without reports answers 404.
    fn report(&self, from: &str, to: Option<&str>) -> Result<serde_json::Value, AdminError> {
        let _ = (from, to);
        Err(AdminError::NotFound("this server makes no reports".into()))
    }
    /// The rotation scheduler and the zones' policies (see
    /// [`ScheduleRequest`]). A backend without a scheduler answers 404.
    fn schedule_request(&self, req: ScheduleRequest) -> Result<serde_json::Value, AdminError> {
        let _ = req;
        Err(AdminError::NotFound(
            "this server runs no rotation scheduler".into(),
        ))
    }
    /// Destroys the DEKs past their grace period that protect no content
    /// block (see [`CleanupRequest`]). Dual-controlled.
    fn key_cleanup(&self, req: &CleanupRequest) -> Result<serde_json::Value, AdminError> {
        let _ = req;
        Err(AdminError::NotFound(
            "this server has no key cleanup".into(),
        ))
    }
    /// The last `limit` records of the audit log, oldest first, as
    /// `{"records": [...]}`. A backend without an audit log answers 404.
    fn audit_recent(&self, limit: usize) -> Result<serde_json::Value, AdminError> {
        let _ = limit;
        Err(AdminError::NotFound(
            "this server keeps no audit log".into(),
        ))
    }
    /// Appends `event` to the audit log (the API's own events: tokens).
    fn record(&self, event: crate::audit::AuditEvent) -> Result<(), AdminError> {
        let _ = event;
        Ok(())
    }
    /// Whether the audit log takes records, and its last record's id
    /// (`None`: this backend keeps no audit log).
    fn audit_state(&self) -> Option<(bool, u64)> {
        None
    }
}

/// What the scheduler and policy routes ask.
#[derive(Debug, Clone)]
pub enum ScheduleRequest {
    /// `GET /api/v1/key-rotation/scheduler/status`.
    Status,
    /// `GET /api/v1/key-rotation/schedule`: every queued, running and failed job.
    Schedule,
    /// `POST /api/v1/key-rotation/scheduler/pause`: start nothing, pool-wide.
    Pause,
    /// `POST /api/v1/key-rotation/scheduler/resume` (failed jobs are retried).
    Resume,
    /// `POST /api/v1/zones/{zone}/policy/hold`: start nothing in this zone.
    Hold(String),
    /// `POST /api/v1/zones/{zone}/policy/release` (its failed jobs are retried).
    Release(String),
    /// `GET /api/v1/zones/{zone}/policy`.
    GetPolicy(String),
    /// `PUT /api/v1/zones/{zone}/policy`: validated, then stored.
    SetPolicy(String, Box<crate::schedule::policy::Policy>),
    /// `POST /api/v1/key-rotation/schedule` (one zone) and
    /// `.../schedule-all` (every zone, `zone` absent): queue a rotation.
    Add(ScheduleRotationRequest),
    /// `POST /api/v1/key-rotation/execute`: start a queued rotation now.
    Execute(ExecuteRequest),
    /// `GET /api/v1/key-rotation/health`: the scheduler, its jobs, and
    /// every key's age against its cryptoperiod.
    Health,
    /// `GET /api/v1/zones/{zone}/rotation/plan`: the predictive plan of the
    /// zone's next DEK rotation and every input it was made from.
    Plan(String),
    /// `GET /api/v1/threat`: threat levels.
    GetThreat,
    /// `POST /api/v1/threat`: raise or clear a threat level.
    Threat(crate::schedule::threat::ThreatChange),
    /// `POST /api/v1/threat/approve`: approvals for the emergency rotation
    /// a critical threat is waiting on (zone, approval token texts).
    Approve(String, Vec<String>),
}

/// Body of `POST /api/v1/key-rotation/schedule` and `.../schedule-all`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRotationRequest {
    /// The zone (`schedule`); `schedule-all` takes every zone and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `dek` (default) or `kek`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::schedule::queue::KeyKind>,
    /// Flip (DEK) or start (KEK) at this time, Unix seconds; absent: in
    /// the zone's next maintenance window (DEK) or at once (KEK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix: Option<u64>,
    /// Why (kept with the job, shown by `GET schedule`, audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of `POST /api/v1/key-rotation/execute`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// The zone whose queued rotation starts now.
    pub zone: String,
    /// `dek` (default) or `kek`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::schedule::queue::KeyKind>,
}

/// Body of `POST /api/v1/key-rotation/emergency-rotation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyRotationRequest {
    /// The zone.
    pub zone: String,
    /// Why (recorded in the audit log).
    pub reason: String,
    /// Dual-control approval tokens, each the JSON text of one approval file.
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// Body of `POST /api/v1/key-rotation/cleanup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    /// One zone (default: every zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// List what would be destroyed, destroy nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Dual-control approval tokens (`destroy-key` approvals for the zone,
    /// or for no zone when cleaning every zone).
    #[serde(default)]
    pub approvals: Vec<String>,
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Token name (1 to 64 of letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: tokens::Role,
}

/// The scheduler as the pool hands admin requests to it: a small trait so
/// that the pool never depends on the `schedule` module that drives it.
pub trait ScheduleService: Send + Sync {
    /// Answers one request.
    fn request(&self, req: ScheduleRequest) -> Result<serde_json::Value, AdminError>;
}
