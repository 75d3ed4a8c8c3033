//! A pool: a data device, a staging device and a metadata directory.
//!
//! Directory layout:
//! ```text
//! DIR/pool.toml              configuration (devices, root key provider, server)
//! DIR/catalog.json           zones and volumes (replaced atomically)
//! DIR/lock                   flock'd by the process that has the pool open
//! DIR/keys/root.sealed       the sealed root key (sealed-file provider;
//!                            a pkcs11 root key lives in its token instead)
//! DIR/keys/zone-<id>.json    a zone's wrapped keys
//! DIR/keys/root-rotation.json  a root key rotation in progress (see [`crate::pool_root`])
//! DIR/journal                write-ahead journal
//! DIR/tables/zone-<id>.cb    content-block table of a zone
//! DIR/tables/vol-<id>.map    LBA map of a volume
//! DIR/data, DIR/staging      default data and staging files
//! DIR/audit.log, audit.head  hash-chained audit log and its anchor (see [`crate::audit`])
//! DIR/keys/stream-zone-<id>.json  a streaming zone's window key sets (see [`crate::stream::keyset`])
//! DIR/streams/zone-<id>/     a zone's stream: segments, state.json, agents.json (see [`crate::stream`])
//! DIR/replicas/zone-<id>.json, .status.json  a replica zone's agent state and progress (see [`crate::replica`])
//! ```
//! Opening a pool replays the journal into memory, checkpoints, and
//! rebuilds the allocators from the tables: recovery is the normal path.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{
    ConfigError, DualControlSection, PoolConfig, Profile, RootKeyConfig, ServerSection,
};
use crate::ids::{BLOCK_SIZE, Cbid, JournalSeq, KeyVersion, VolumeId, ZoneId};
use crate::keys::KeyError;
use crate::keys::approval::{ApprovalError, Authorized, Operation, Target};
use crate::keys::kmip::{KmipConfig, KmipProvider};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
use crate::keys::root::RootKeyProvider;
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::keys::wrap::{KeyLabel, Purpose};
use crate::keys::zone_keys::{BlockUsage, KeyState, ZoneKeyFile};
use crate::nbd::export::{ExportCatalog, ExportInfo};
use crate::store::device::{Device, DeviceError, DeviceOptions, Engine, EngineConfig};
use crate::store::journal::{
    CheckpointJournal, CommitHooks, Entry, Journal, JournalConfig, JournalError,
};
use crate::store::table::TableError;
use crate::store::{Staging, Storage};
use crate::volume::Volume;
use crate::zone::{CheckpointRun, VolumeMap, Zone, ZoneCrypto, ZoneMeta};

mod backup;
mod block;
mod stream;
pub use backup::{BackupReport, RestoreReport};
pub use block::BlockInfo;
pub use stream::PoolStreams;

/// Errors of pool operations.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A metadata file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Configuration error.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Key error (wrong passphrase, missing key file, ...).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Dual control refused or was not satisfied.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// Table error.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Journal error.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Device error.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The pool directory is not a pool, or already is one.
    #[error("{0}")]
    Layout(String),
    /// Another process has the pool open.
    #[error("pool {path} is in use by another keyturn process{pid}")]
    InUse {
        /// Pool directory.
        path: PathBuf,
        /// " (pid N)" when known.
        pid: String,
    },
    /// No zone or volume of that name.
    #[error("no {kind} named {name:?}")]
    NotFound {
        /// "zone" or "volume".
        kind: &'static str,
        /// Name asked for.
        name: String,
    },
    /// A zone or volume of that name exists.
    #[error("a {kind} named {name:?} already exists")]
    Exists {
        /// "zone" or "volume".
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// A bad argument (name, size).
    #[error("{0}")]
    Invalid(String),
    /// The operation does not fit the zone's rotation state.
    #[error("{0}")]
    Conflict(String),
    /// The volume is being served.
    #[error("volume {0:?} is being served; disconnect its clients first")]
    Busy(String),
    /// The audit log cannot take records (changes are refused), or a record
    /// of a change that was made could not be written.
    #[error("audit log: {0}")]
    Audit(String),
}

type Result<T, E = PoolError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A zone in the catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoneEntry {
    /// Id.
    pub id: ZoneId,
    /// Name.
    pub name: String,
    /// Whether equal blocks written to the zone share one content block.
    #[serde(default = "dedup_default")]
    pub dedup: bool,
    /// Whether the zone's changes are streamed (see [`crate::stream`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

fn dedup_default() -> bool {
    true
}

/// Life state of a volume in the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Served.
    Active,
    /// Being deleted: its blocks are freed on the next open if a crash interrupted it.
    Deleting,
}

/// A volume in the catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Id.
    pub id: VolumeId,
    /// Name (the NBD export name).
    pub name: String,
    /// Zone.
    pub zone: ZoneId,
    /// Size in bytes.
    pub size: u64,
    /// State.
    pub state: VolumeState,
}

/// `catalog.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// Format version.
    pub format: u32,
    /// Next zone id.
    pub next_zone: u32,
    /// Next volume id.
    pub next_volume: u32,
    /// Zones.
    pub zones: Vec<ZoneEntry>,
    /// Volumes.
    pub volumes: Vec<VolumeEntry>,
}

/// Options of `keyturn init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Data device path (default: DIR/data).
    pub data: Option<PathBuf>,
    /// Staging device path (default: DIR/staging).
    pub staging: Option<PathBuf>,
    /// Argon2id cost for the sealed root key.
    pub kdf: KdfParams,
    /// Which root key provider the pool uses.
    pub root_key: RootKeyChoice,
    /// Server section written into pool.toml.
    pub server: ServerSection,
    /// Dual control section written into pool.toml.
    pub dual_control: DualControlSection,
}

/// The root key provider chosen at `keyturn init`.
#[derive(Clone, Debug, Default)]
pub enum RootKeyChoice {
    /// A new root key sealed with the passphrase in `DIR/keys/root.sealed`.
    #[default]
    SealedFile,
    /// A root key inside a PKCS#11 token, generated there unless
    /// `use_existing` (then an existing key with that label is used).
    Pkcs11 {
        /// Module, token and key label.
        config: Pkcs11Config,
        /// Use a key that already exists instead of generating one.
        use_existing: bool,
    },
    /// A root key in a KMIP server, created there unless `use_existing`
    /// (then the one object named `config.key_name` is used).
    Kmip {
        /// Server address, TLS files and key name (`key_id` is filled in).
        config: KmipConfig,
        /// Use a key that already exists instead of creating one.
        use_existing: bool,
    },
}

/// The secret that unlocks a pool's root key: the passphrase of a sealed
/// root key file, or the user PIN of a PKCS#11 token.
#[derive(Clone, Copy, Debug)]
pub enum RootSecret<'a> {
    /// Passphrase (sealed-file provider).
    Passphrase(&'a Passphrase),
    /// Token user PIN (pkcs11 provider).
    Pin(&'a Pin),
    /// Nothing from the operator (kmip provider): the TLS client key that
    /// opens the KMS is a file named in pool.toml.
    Kms,
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    f.write_all(bytes).map_err(io_at(&tmp))?;
    crate::store::durable::sync_all(&f).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::store::durable::sync_dir(dir).map_err(io_at(dir))
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Parses a size such as `10G`, `512M`, `4096` (bytes), `1T`; binary units.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => {
                    return Err(PoolError::Invalid(format!(
                        "unknown size unit in {s:?} (use K, M, G or T)"
                    )));
                }
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| PoolError::Invalid(format!("invalid size {s:?}")))?;
    n.checked_mul(mult)
        .ok_or_else(|| PoolError::Invalid(format!("size {s:?} is too large")))
}

/// The error for a secret of the wrong kind: a PIN for a sealed-file pool,
/// or a passphrase for a PKCS#11 one.
pub(crate) fn wrong_secret(needs_pin: bool) -> PoolError {
    if needs_pin {
        KeyError::NoPin {
            env_var: crate::keys::pkcs11::PIN_ENV.into(),
        }
        .into()
    } else {
        KeyError::NoPassphrase {
            env_var: crate::keys::PASSPHRASE_ENV.into(),
        }
        .into()
    }
}

/// Journal hooks: what the committer needs from the pool.
struct Hooks {
    storage: Arc<Storage>,
    zones: Arc<RwLock<BTreeMap<ZoneId, Arc<Zone>>>>,
    streams: stream::Streams,
}

impl CommitHooks for Hooks {
    fn sync_data(&self) -> std::io::Result<()> {
        // Stream records and data both before the frame: a frame must not be
        // durable before the record of the write it maps (invariant 10).
        // The two flushes go to the device side by side rather than one
        // after the other.
        let streams: Vec<_> = self.streams.read().values().cloned().collect();
        if streams.is_empty() {
            return self.storage.sync_data();
        }
        std::thread::scope(|scope| {
            let data = scope.spawn(|| self.storage.sync_data());
            let records = streams
                .iter()
                .try_for_each(|s| s.sync().map_err(std::io::Error::other));
            let data = data
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the data device sync panicked")));
            records.and(data)
        })
    }

    fn durable(&self, seq: JournalSeq) {
        for s in self.streams.read().values() {
            s.durable(seq);
        }
        self.storage.slots.lock().release_durable(seq);
        if let Some(staging) = &self.storage.staging {
            staging.slots.lock().release_durable(seq);
        }
        for zone in self.zones.read().values() {
            zone.meta.lock().cbids.release_durable(seq);
        }
    }

    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let failed = |e: TableError| JournalError::Io {
            op: "checkpoint",
            message: e.to_string(),
        };
        // Writers stop only while the changes are set aside (a swap of maps
        // and a list of their keys per zone). Flushing under the locks, as
        // before, stopped every write for the data sync: 50-80 ms a
        // checkpoint under 4 KiB random writes.
        let all = self.zones.read();
        let zones: Vec<Arc<Zone>> = all.values().cloned().collect();
        // Zone locks in id order stop every appender (appends happen under
        // them, with the in-memory change), so the last frame appended
        // covers every change in the overlays.
        let mut metas: Vec<_> = zones.iter().map(|z| z.meta.lock()).collect();
        let seq = journal.last_appended();
        let runs: Vec<CheckpointRun> = metas.iter_mut().map(|m| m.begin_checkpoint(seq)).collect();
        drop(metas);
        drop(all);
        let abandon = |from: usize| {
            for zone in &zones[from..] {
                zone.meta.lock().abandon_checkpoint();
            }
        };
        // The frames up to `seq` are durable before any of their changes
        // reach a table: the kernel may write a table page back at any time.
        if let Err(e) = journal.flush_through(seq) {
            abandon(0);
            return Err(e);
        }
        // Copying into the tables takes each zone's lock for a bounded
        // batch at a time (about half a million changes took 40 ms).
        let mut syncs = Vec::new();
        for (k, (zone, run)) in zones.iter().zip(runs).enumerate() {
            loop {
                let mut meta = zone.meta.lock();
                match meta.copy_checkpoint(CHECKPOINT_BATCH) {
                    Ok(true) => {
                        syncs.extend(meta.finish_checkpoint(run));
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // This zone and the ones not reached keep their
                        // changes in the overlays.
                        drop(meta);
                        abandon(k);
                        return Err(failed(e));
                    }
                }
            }
        }
        // Changes from here on go to the overlays, never to the tables, so
        // the syncs need no lock either.
        for table in syncs {
            table.sync().map_err(failed)?;
        }
        Ok(seq)
    }
}

/// What [`Pool::check`] found (a JSON body of the admin API as well).
pub use crate::admin::CheckReport;

/// What [`Pool::rotate_kek`] did.
#[derive(Debug, Serialize)]
pub struct KekRotationReport {
    /// Zone name.
    pub zone: String,
    /// The new KEK version.
    pub new_version: u32,
    /// Keys re-wrapped in this run.
    pub rewrapped: usize,
    /// Old KEK ids destroyed.
    pub destroyed: Vec<String>,
    /// Whether an interrupted rotation was resumed.
    pub resumed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// Block counts per DEK version of one zone, as the key layer asks for them.
struct ZoneUsage(BTreeMap<KeyVersion, u64>);

impl BlockUsage for ZoneUsage {
    fn blocks_under(&self, _zone: ZoneId, version: KeyVersion) -> u64 {
        self.0.get(&version).copied().unwrap_or(0)
    }
}

/// The on-disk format this build reads and writes (2: content-block
/// records carry a staged copy; journal entries for flips).
pub const POOL_FORMAT: u32 = 2;

/// Changes a checkpoint copies into the tables per taking of a zone lock:
/// about half a millisecond of the lock.
const CHECKPOINT_BATCH: usize = 8192;

/// An open pool.
///
/// The root key may be switched while the pool is shared (a root key
/// rotation through the admin API), so the pool holds its configuration and
/// root key provider behind locks. The rule that keeps key files and the
/// provider consistent: whoever changes a zone's key file takes that zone's
/// `key_file_lock` first and reads `Pool::root` after it; the provider is
/// replaced only with the catalog lock and every zone's `key_file_lock` held
/// (see `Pool::with_key_files_frozen`). So a key-file writer uses one
/// provider from its load to its save, and no zone is created under a
/// provider that is being replaced.
pub struct Pool {
    pub(crate) dir: PathBuf,
    /// pool.toml as this process holds it: read at open, replaced (with its
    /// new `[root_key]`) when a root key rotation switches pool.toml.
    config: RwLock<Arc<PoolConfig>>,
    catalog: Mutex<Catalog>,
    pub(crate) storage: Arc<Storage>,
    pub(crate) zones: Arc<RwLock<BTreeMap<ZoneId, Arc<Zone>>>>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    pub(crate) journal: Arc<Journal>,
    /// Wraps and unwraps zone KEKs: the configured root key, or a
    /// [`RootPair`](crate::keys::root_rotation::RootPair) while a root key
    /// rotation re-wraps.
    provider: Arc<RwLock<Arc<dyn RootKeyProvider>>>,
    /// Streams of the zones that stream.
    streams: stream::Streams,
    /// The token user PIN of a PKCS#11 root key, for the token sessions a
    /// root key rotation through the admin API opens (this process is logged
    /// in to the token for its whole life anyway). `None` for a sealed file:
    /// its passphrase is never kept.
    pin: Option<Pin>,
    /// Held by a root key rotation or passphrase change: one at a time.
    pub(crate) root_op: Mutex<()>,
    /// Per-zone rotation state and workers.
    pub(crate) rotations: crate::rotation::Rotations,
    /// The rotation scheduler once `serve` starts one: admin requests for it
    /// go through this small trait (the scheduler drives the pool, not the
    /// reverse).
    pub(crate) schedule_service: std::sync::OnceLock<Arc<dyn crate::admin::ScheduleService>>,
    /// The audit log, or why it cannot take records (a damaged log).
    audit: std::result::Result<AuditLog, String>,
    _engine: Engine,
    _lock: File,
}

impl Pool {
    fn catalog_path(dir: &Path) -> PathBuf {
        dir.join("catalog.json")
    }

    pub(crate) fn zone_key_path(dir: &Path, id: ZoneId) -> PathBuf {
        dir.join("keys").join(format!("zone-{}.json", id.0))
    }

    pub(crate) fn cb_table_path(dir: &Path, id: ZoneId) -> PathBuf {
        dir.join("tables").join(format!("zone-{}.cb", id.0))
    }

    fn map_path(dir: &Path, id: VolumeId) -> PathBuf {
        dir.join("tables").join(format!("vol-{}.map", id.0))
    }

    pub(crate) fn resolve(dir: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    }

    /// Whether `dir` holds a pool.
    pub fn exists(dir: &Path) -> bool {
        dir.join("pool.toml").exists()
    }

    /// Creates a new pool in `dir` (which may exist but must not hold a pool).
    ///
    /// Sealed-file pools only; [`init_with`](Self::init_with) takes either
    /// provider's secret.
    pub fn init(dir: &Path, opts: &InitOptions, passphrase: &Passphrase) -> Result<()> {
        Self::init_with(dir, opts, RootSecret::Passphrase(passphrase))
    }

    /// Creates a new pool in `dir` with the root key provider of
    /// `opts.root_key`, unlocked by `secret` (a passphrase for a sealed file,
    /// a PIN for a PKCS#11 token).
    pub fn init_with(dir: &Path, opts: &InitOptions, secret: RootSecret<'_>) -> Result<()> {
        let started = Instant::now();
        if Self::exists(dir) {
            return Err(PoolError::Layout(format!(
                "{} already holds a pool",
                dir.display()
            )));
        }
        // Check the secret matches the provider before touching the disk.
        // A KMIP root key is made in the KMS first: its identifier goes
        // into pool.toml.
        let mut kmip: Option<KmipProvider> = None;
        let root_key = match (&opts.root_key, secret) {
            (RootKeyChoice::SealedFile, RootSecret::Passphrase(_)) => RootKeyConfig::SealedFile {
                path: "keys/root.sealed".into(),
            },
            (RootKeyChoice::Pkcs11 { config, .. }, RootSecret::Pin(_)) => RootKeyConfig::Pkcs11 {
                module: config.module.clone(),
                token_label: config.token_label.clone(),
                key_label: config.key_label.clone(),
            },
            (
                RootKeyChoice::Kmip {
                    config,
                    use_existing,
                },
                _,
            ) => {
                let (provider, made) = KmipProvider::create_key(config, dir, *use_existing)?;
                tracing::info!(root_key = %provider.describe(), existing = *use_existing, "KMIP root key ready");
                kmip = Some(provider);
                RootKeyConfig::from_kmip(&made)
            }
            (RootKeyChoice::SealedFile, RootSecret::Pin(_) | RootSecret::Kms) => {
                return Err(wrong_secret(false));
            }
            (RootKeyChoice::Pkcs11 { .. }, RootSecret::Passphrase(_) | RootSecret::Kms) => {
                return Err(wrong_secret(true));
            }
        };
        for sub in [dir.to_path_buf(), dir.join("keys"), dir.join("tables")] {
            std::fs::create_dir_all(&sub).map_err(io_at(&sub))?;
        }
        let config = PoolConfig {
            format: POOL_FORMAT,
            data: opts.data.clone().unwrap_or_else(|| "data".into()),
            staging: opts.staging.clone().unwrap_or_else(|| "staging".into()),
            root_key,
            server: opts.server.clone(),
            dual_control: opts.dual_control.clone(),
            rotation: Default::default(),
            admin: crate::config::AdminSection::default(),
            stream: Default::default(),
            schedule: Default::default(),
            reports: Default::default(),
            test: Default::default(),
            tls: Default::default(),
            access: Vec::new(),
        };
        let provider: Box<dyn RootKeyProvider> = match (&config.root_key, &opts.root_key, secret) {
            (RootKeyConfig::SealedFile { path }, _, RootSecret::Passphrase(passphrase)) => {
                Box::new(SealedFileProvider::create(
                    &Self::resolve(dir, path),
                    passphrase,
                    opts.kdf,
                )?)
            }
            (
                RootKeyConfig::Pkcs11 { .. },
                RootKeyChoice::Pkcs11 {
                    config,
                    use_existing,
                },
                RootSecret::Pin(pin),
            ) => {
                // Either way the key is opened, so a pool is only written
                // once its root key is known to work.
                Box::new(if *use_existing {
                    Pkcs11Provider::open(config, pin)?
                } else {
                    Pkcs11Provider::create_key(config, pin)?
                })
            }
            (RootKeyConfig::Kmip { .. }, RootKeyChoice::Kmip { .. }, _) => {
                Box::new(kmip.take().expect("the KMIP root key was made above"))
            }
            _ => unreachable!("provider and secret were matched above"),
        };
        for dev in [&config.data, &config.staging] {
            let p = Self::resolve(dir, dev);
            if !p.exists() {
                File::create(&p).map_err(io_at(&p))?;
            }
        }
        Journal::create(&dir.join("journal"))?;
        let catalog = Catalog {
            format: 1,
            next_zone: 1,
            next_volume: 1,
            ..Default::default()
        };
        write_atomic(
            &Self::catalog_path(dir),
            &serde_json::to_vec_pretty(&catalog).expect("catalog serialises"),
        )?;
        // The audit chain is part of a complete pool, so it exists before pool.toml.
        let audit = AuditLog::create_or_open(dir).map_err(|e| PoolError::Audit(e.to_string()))?;
        // pool.toml last: its presence marks a complete pool.
        write_atomic(&dir.join("pool.toml"), config.to_toml().as_bytes())?;
        audit
            .append(AuditEvent::ok("pool.init").duration(started.elapsed()))
            .map_err(|e| {
                PoolError::Audit(format!("the pool was created, but not recorded: {e}"))
            })?;
        crate::audit::sign::attach(dir, &audit, provider.as_ref());
        Ok(())
    }

    fn take_lock(dir: &Path) -> Result<File> {
        let path = dir.join("lock");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_at(&path))?;
        use std::os::fd::AsRawFd;
        // SAFETY-free: flock via libc on an fd we own; it fails rather than blocks.
        let r = unsafe_flock(f.as_raw_fd());
        if r != 0 {
            let pid = std::fs::read_to_string(&path)
                .ok()
                .map(|s| format!(" (pid {})", s.trim()))
                .unwrap_or_default();
            return Err(PoolError::InUse {
                path: dir.to_path_buf(),
                pid,
            });
        }
        f.set_len(0).map_err(io_at(&path))?;
        write!(f, "{}", std::process::id()).map_err(io_at(&path))?;
        Ok(f)
    }

    /// Opens the pool in `dir`: unlocks its keys, replays the journal, and
    /// rebuilds the allocators.
    ///
    /// Sealed-file pools only; [`open_with`](Self::open_with) takes either
    /// provider's secret.
    pub fn open(dir: &Path, passphrase: &Passphrase, profile: &Profile) -> Result<Self> {
        Self::open_with(dir, RootSecret::Passphrase(passphrase), profile)
    }

    /// The root key provider configured in `dir/pool.toml`, without opening
    /// the pool: callers use it to know which secret to ask for.
    pub fn root_key_config(dir: &Path) -> Result<RootKeyConfig> {
        Ok(PoolConfig::load(&dir.join("pool.toml"))?.root_key)
    }

    /// The configured root key alone, unlocked by `secret`.
    pub(crate) fn open_provider(
        dir: &Path,
        root_key: &RootKeyConfig,
        secret: RootSecret<'_>,
    ) -> Result<Box<dyn RootKeyProvider>> {
        Ok(match (root_key, secret) {
            (RootKeyConfig::SealedFile { path }, RootSecret::Passphrase(passphrase)) => Box::new(
                SealedFileProvider::open(&Self::resolve(dir, path), passphrase)?,
            ),
            (RootKeyConfig::Pkcs11 { .. }, RootSecret::Pin(pin)) => {
                let config = root_key.pkcs11().expect("a pkcs11 root key config");
                Box::new(Pkcs11Provider::open(&config, pin)?)
            }
            // The KMS needs nothing from the operator: whatever secret the
            // caller found is not used.
            (RootKeyConfig::Kmip { .. }, _) => {
                let config = root_key.kmip().expect("a kmip root key config");
                Box::new(KmipProvider::open(&config, dir)?)
            }
            (RootKeyConfig::SealedFile { .. }, RootSecret::Pin(_) | RootSecret::Kms) => {
                return Err(wrong_secret(false));
            }
            (RootKeyConfig::Pkcs11 { .. }, RootSecret::Passphrase(_) | RootSecret::Kms) => {
                return Err(wrong_secret(true));
            }
        })
    }

    /// Opens the pool in `dir` with the secret its root key provider needs
    /// (passphrase or PIN): unlocks its keys, replays the journal, and
    /// rebuilds the allocators.
    pub fn open_with(dir: &Path, secret: RootSecret<'_>, profile: &Profile) -> Result<Self> {
        if !Self::exists(dir) {
            return Err(PoolError::Layout(format!(
                "{} is not a keyturn pool (no pool.toml); create one with `keyturn init`",
                dir.display()
            )));
        }
        let lock = Self::take_lock(dir)?;
        let config = PoolConfig::load(&dir.join("pool.toml"))?;
        if config.format != POOL_FORMAT {
            return Err(PoolError::Layout(format!(
                "{} is a format {} pool; this keyturn reads format {POOL_FORMAT} (copy the volumes out with an older keyturn and into a new pool)",
                dir.display(),
                config.format
            )));
        }
        let cat_path = Self::catalog_path(dir);
        let catalog: Catalog =
            serde_json::from_slice(&std::fs::read(&cat_path).map_err(io_at(&cat_path))?)
                .map_err(|e| PoolError::Layout(format!("{}: {e}", cat_path.display())))?;
        let provider = Self::open_roots(dir, &config.root_key, secret)?;
        tracing::info!(root_key = %provider.describe(), "root key unlocked");

        let engine = Engine::start(&EngineConfig {
            inline_write_bytes: usize::try_from(profile.io.inline_write_kib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1024),
            // One worker always free of a write blocked in the kernel.
            inline_writers: profile.server.worker_threads.saturating_sub(1),
            ..EngineConfig::new(profile.io.queue_depth)
        })?;
        let data_path = Self::resolve(dir, &config.data);
        let data = Device::open(
            &data_path,
            &DeviceOptions {
                create: false,
                direct: profile.io.direct,
                // Migration writes (see `rotation::pipeline`) and long
                // foreground runs (`[io] uncached_write_kib`).
                uncached_writes: true,
            },
            &engine,
        )?;
        let data_sync = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_at(&data_path))?;
        let growable = data_sync.metadata().map_err(io_at(&data_path))?.is_file();
        tracing::info!(device = %data_path.display(), direct = data.is_direct(), growable, "data device open");
        let staging = Self::open_staging(dir, &config, &engine)?;
        let storage = Arc::new(
            Storage::new(data, data_sync, growable)
                .with_staging(staging)
                .with_uncached_runs(profile.io.uncached_write_kib)
                .with_max_run(profile.batch.max_run_blocks),
        );

        let mut zones = BTreeMap::new();
        for z in &catalog.zones {
            zones.insert(z.id, Arc::new(Self::load_zone(dir, z, provider.as_ref())?));
        }
        for v in &catalog.volumes {
            let zone = zones.get(&v.zone).ok_or_else(|| {
                PoolError::Layout(format!(
                    "volume {} names zone {} which is not in the catalog",
                    v.name, v.zone
                ))
            })?;
            let map = VolumeMap::open(
                &Self::map_path(dir, v.id),
                v.size / BLOCK_SIZE as u64,
                false,
            )?;
            zone.meta.lock().volumes.insert(v.id, map);
        }

        // Replay: apply every durable frame to the overlays.
        let replay = Journal::read(&dir.join("journal"))?;
        let mut last = replay.checkpoint_seq;
        for (seq, entries) in replay.frames {
            for e in entries {
                Self::apply(&zones, e, seq);
            }
            last = seq;
        }
        for z in &catalog.zones {
            if let Some(zone) = zones.get(&z.id) {
                zone.meta.lock().set_dedup(z.dedup);
            }
        }
        let zones = Arc::new(RwLock::new(zones));
        let streams: stream::Streams = Default::default();
        let hooks = Arc::new(Hooks {
            storage: storage.clone(),
            zones: zones.clone(),
            streams: streams.clone(),
        });
        let jconfig = JournalConfig {
            commit_interval: Duration::from_millis(profile.journal.commit_interval_ms),
            commit_bytes: (profile.journal.commit_mib << 20) as usize,
            checkpoint_bytes: profile.journal.checkpoint_mib << 20,
        };
        let journal = Arc::new(Journal::start(&dir.join("journal"), last, jconfig, hooks)?);

        // Allocators from the checkpointed tables.
        {
            let mut slots = storage.slots.lock();
            for zone in zones.read().values() {
                let mut meta = zone.meta.lock();
                for (cbid, rec) in meta.live_cbs() {
                    meta.cbids.mark_used(cbid.0);
                    if let (Some(st), Some(area)) = (rec.staged, &storage.staging)
                        && !area.slots.lock().mark_used(st.slot.0)
                    {
                        return Err(PoolError::Layout(format!(
                            "staging slot {} is claimed twice (zone {}, content block {cbid}); the pool is damaged",
                            st.slot, zone.name
                        )));
                    }
                    if !slots.mark_used(rec.slot.0) {
                        return Err(PoolError::Layout(format!(
                            "slot {} is claimed twice (zone {}, content block {cbid}); the pool is damaged",
                            rec.slot, zone.name
                        )));
                    }
                }
            }
        }

        // A damaged audit log does not stop the data path; it stops changes
        // (see `Pool::audit`), so nothing changes unrecorded.
        let audit = AuditLog::open(dir).map_err(|e| {
            tracing::error!(error = %e, "audit log unusable: zone, volume and key changes are refused until it is repaired (see `keyturn audit verify`)");
            e.to_string()
        });
        if let Ok(log) = &audit {
            crate::audit::sign::attach(dir, log, provider.as_ref());
        }
        let pin = match secret {
            RootSecret::Pin(p) => Some(p.duplicate()),
            RootSecret::Passphrase(_) | RootSecret::Kms => None,
        };
        let pool = Self {
            dir: dir.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
            catalog: Mutex::new(catalog),
            storage,
            zones,
            volumes: RwLock::new(BTreeMap::new()),
            journal,
            provider: Arc::new(RwLock::new(Arc::from(provider))),
            streams,
            pin,
            root_op: Mutex::new(()),
            rotations: Default::default(),
            schedule_service: std::sync::OnceLock::new(),
            audit,
            _engine: engine,
            _lock: lock,
        };
        let entries = pool.catalog.lock().volumes.clone();
        for v in entries {
            match v.state {
                VolumeState::Active => pool.attach_volume(&v),
                VolumeState::Deleting => pool.finish_delete(&v)?,
            }
        }
        pool.recover_rotations()?;
        pool.open_streams(last)?;
        tracing::info!(pool = %dir.display(), zones = pool.zones.read().len(), volumes = pool.volumes.read().len(),
            replayed_to = last.0, "pool open");
        Ok(pool)
    }

    fn load_zone(dir: &Path, z: &ZoneEntry, provider: &dyn RootKeyProvider) -> Result<Zone> {
        let keyfile = ZoneKeyFile::load(&Self::zone_key_path(dir, z.id))?;
        let ring = keyfile.unlock(provider)?;
        let versions: Vec<KeyVersion> = ring.versions().collect();
        let crypto = ZoneCrypto::new(
            versions
                .iter()
                .filter_map(|v| ring.dek(*v).map(|k| (*v, k))),
            ring.mac_key(),
        )
        .with_macs(ring.mac_version(), ring.mac_keys());
        let mut meta = ZoneMeta::open(&Self::cb_table_path(dir, z.id), false)?;
        // The table header knows flips and rollbacks a checkpoint retired
        // from the journal; the key file knows the active key of a zone
        // never checkpointed (header 0). Replay moves it on from there. The
        // header wins over the key file otherwise: a rollback's record is
        // durable before its key file is saved, so the key file may be
        // ahead of the truth after a crash (recovery brings it back).
        if meta.active == KeyVersion(0) {
            meta.active = ring.active_version();
        }
        Ok(Zone::new(z.id, z.name.clone(), crypto, meta))
    }

    /// Opens the staging device (creating a missing file) with its capacity.
    fn open_staging(dir: &Path, config: &PoolConfig, engine: &Engine) -> Result<Staging> {
        let path = Self::resolve(dir, &config.staging);
        if !path.exists() {
            File::create(&path).map_err(io_at(&path))?;
        }
        // O_DIRECT where the filesystem allows: staged copies are written
        // once and read rarely (after the flip, until destaged), so the page
        // cache only costs a copy, and buffered io_uring writes are punted to
        // one kernel worker thread, which was the staging pipeline's
        // bottleneck here.
        let device = Device::open(
            &path,
            &DeviceOptions {
                create: false,
                direct: true,
                uncached_writes: false,
            },
            engine,
        )?;
        let sync = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let growable = sync.metadata().map_err(io_at(&path))?.is_file();
        let device = match crate::store::fault::FaultPlan::from_env("staging") {
            Some(plan) => {
                tracing::warn!(device = %path.display(), "fault injection armed on the staging device (KEYTURN_FAULTS)");
                device.with_faults(plan)
            }
            None => device,
        };
        let slots = |mib: u64| (mib << 20) / BLOCK_SIZE as u64;
        let r = &config.rotation;
        Ok(Staging::new(
            device,
            sync,
            growable,
            slots(r.staging_capacity_mib),
            slots(r.staging_reserve_mib),
        ))
    }

    fn apply(zones: &BTreeMap<ZoneId, Arc<Zone>>, e: Entry, seq: JournalSeq) {
        match e {
            Entry::Map { volume, lba, cbid } => {
                for z in zones.values() {
                    let mut meta = z.meta.lock();
                    if let Some(map) = meta.volumes.get_mut(&volume) {
                        map.set(lba, cbid, seq);
                        return;
                    }
                }
            }
            Entry::Cb { zone, cbid, record } => {
                if let Some(z) = zones.get(&zone) {
                    z.meta.lock().set_cb(cbid, Some(record), seq);
                }
            }
            Entry::CbFree { zone, cbid } => {
                if let Some(z) = zones.get(&zone) {
                    z.meta.lock().set_cb(cbid, None, seq);
                }
            }
            Entry::Flip { zone, to } => {
                if let Some(z) = zones.get(&zone) {
                    let mut meta = z.meta.lock();
                    meta.active = meta.active.max(to);
                }
            }
            Entry::Rollback { zone, to } => {
                if let Some(z) = zones.get(&zone) {
                    z.meta.lock().active = to;
                }
            }
            Entry::Applied { zone, seq } => {
                if let Some(z) = zones.get(&zone) {
                    let mut meta = z.meta.lock();
                    meta.applied = meta.applied.max(seq);
                }
            }
        }
    }

    /// The `Volume` of a catalog entry (its zone is checked at open).
    fn volume_for(&self, v: &VolumeEntry) -> Volume {
        let zone = self
            .zones
            .read()
            .get(&v.zone)
            .cloned()
            .expect("volume zones are checked at open");
        Volume::new(
            v.id,
            v.name.clone(),
            v.size,
            zone,
            self.storage.clone(),
            self.journal.clone(),
        )
    }

    fn attach_volume(&self, v: &VolumeEntry) {
        let vol = self.volume_for(v);
        self.volumes.write().insert(v.name.clone(), Arc::new(vol));
    }

    fn save_catalog(&self, catalog: &Catalog) -> Result<()> {
        write_atomic(
            &Self::catalog_path(&self.dir),
            &serde_json::to_vec_pretty(catalog).expect("catalog serialises"),
        )
    }

    /// Hands admin requests for the scheduler and policies to `service`
    /// (once; later calls are ignored).
    pub fn set_schedule_service(&self, service: Arc<dyn crate::admin::ScheduleService>) {
        let _ = self.schedule_service.set(service);
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pool configuration (a snapshot: a root key rotation may replace
    /// its `[root_key]` while the pool is served).
    pub fn config(&self) -> Arc<PoolConfig> {
        self.config.read().clone()
    }

    /// Replaces the configuration this process holds (pool.toml was
    /// rewritten to match).
    pub(crate) fn set_config(&self, config: PoolConfig) {
        *self.config.write() = Arc::new(config);
    }

    /// The root key provider, as it is now. A key-file writer reads it after
    /// taking the zone's `key_file_lock` and keeps this one until it releases
    /// the lock (see [`Pool`]).
    pub(crate) fn root(&self) -> Arc<dyn RootKeyProvider> {
        self.provider.read().clone()
    }

    /// The token PIN this pool was opened with (PKCS#11 root keys).
    pub(crate) fn pin(&self) -> Option<&Pin> {
        self.pin.as_ref()
    }

    /// Runs `f` with the catalog lock and every zone's `key_file_lock` held
    /// (in zone id order, after the catalog: the one lock order), so no zone
    /// is created and no key file changes while it runs. `f` gets the zones.
    /// The root key provider is replaced only in here.
    pub(crate) fn with_key_files_frozen<T>(
        &self,
        f: impl FnOnce(&[ZoneEntry]) -> Result<T>,
    ) -> Result<T> {
        let catalog = self.catalog.lock();
        let zones: Vec<Arc<Zone>> = self.zones.read().values().cloned().collect();
        let _held: Vec<_> = zones.iter().map(|z| z.key_file_lock.lock()).collect();
        f(&catalog.zones)
    }

    /// Replaces the root key provider; only inside
    /// [`Pool::with_key_files_frozen`].
    pub(crate) fn set_root_frozen(&self, provider: Arc<dyn RootKeyProvider>) {
        tracing::info!(root_key = %provider.describe(), "root key provider replaced");
        *self.provider.write() = provider;
    }

    /// The catalog as it stands.
    pub fn catalog(&self) -> Catalog {
        self.catalog.lock().clone()
    }

    /// The audit log, or why it cannot take records.
    pub fn audit(&self) -> Result<&AuditLog> {
        self.audit.as_ref().map_err(|e| {
            PoolError::Audit(format!(
                "{e}; changes are refused until the log is repaired (see `keyturn audit verify`)"
            ))
        })
    }

    /// Appends `event` to the audit log.
    pub fn record(&self, event: AuditEvent) -> Result<u64> {
        self.audit()?
            .append(event)
            .map_err(|e| PoolError::Audit(e.to_string()))
    }

    /// Records the outcome `r` of an operation (`events`: its success
    /// records, or its failure). A success that cannot be recorded becomes an
    /// error that says the change was made; a failure that cannot be recorded
    /// keeps its own error.
    pub(crate) fn record_outcome<T>(
        audit: &AuditLog,
        events: Vec<AuditEvent>,
        done: &str,
        r: Result<T>,
    ) -> Result<T> {
        for event in events {
            if let Err(e) = audit.append(event) {
                return match r {
                    Ok(_) => Err(PoolError::Audit(format!("{done}, but not recorded: {e}"))),
                    Err(op) => {
                        tracing::error!(error = %e, "cannot record a failed operation in the audit log");
                        Err(op)
                    }
                };
            }
        }
        r
    }

    /// Turns dedup on or off for a zone's new writes (blocks already shared
    /// stay shared). Recorded in the audit log.
    pub fn set_zone_dedup(&self, name: &str, on: bool) -> Result<()> {
        let audit = self.audit()?;
        let id = self.zone_id(name)?;
        let r = (|| {
            let mut catalog = self.catalog.lock();
            let mut next = catalog.clone();
            if let Some(z) = next.zones.iter_mut().find(|z| z.id == id) {
                z.dedup = on;
            }
            self.save_catalog(&next)?;
            *catalog = next;
            if let Some(z) = self.zones.read().get(&id) {
                z.meta.lock().set_dedup(on);
            }
            Ok(())
        })();
        let event = match &r {
            Ok(()) => AuditEvent::ok(if on {
                "zone.dedup.on"
            } else {
                "zone.dedup.off"
            }),
            Err(e) => AuditEvent::failed(
                if on {
                    "zone.dedup.on"
                } else {
                    "zone.dedup.off"
                },
                e,
            ),
        }
        .zone(name);
        Self::record_outcome(audit, vec![event], "dedup was changed", r)
    }

    /// Creates a zone with a fresh key chain, and records `zone.create` and a
    /// `key.create` for each of its keys. Refused while the audit log cannot
    /// take records.
    pub fn create_zone(&self, name: &str) -> Result<ZoneId> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.create_zone_unaudited(name);
        let events = match &r {
            Ok(id) => {
                // The key ids come from the file just written: what is recorded
                // is what is stored.
                let records = ZoneKeyFile::load(&Self::zone_key_path(&self.dir, *id))
                    .map(|f| f.records().to_vec())
                    .unwrap_or_default();
                let mut events = vec![
                    AuditEvent::ok("zone.create")
                        .zone(name)
                        .count(records.len() as u64)
                        .duration(started.elapsed()),
                ];
                events.extend(
                    records
                        .iter()
                        .map(|k| AuditEvent::ok("key.create").zone(name).key(&k.label())),
                );
                events
            }
            Err(e) => vec![
                AuditEvent::failed("zone.create", e)
                    .zone(name)
                    .duration(started.elapsed()),
            ],
        };
        Self::record_outcome(audit, events, &format!("zone {name:?} was created"), r)
    }

    fn create_zone_unaudited(&self, name: &str) -> Result<ZoneId> {
        validate_name("zone", name)?;
        let mut catalog = self.catalog.lock();
        if catalog.zones.iter().any(|z| z.name == name) {
            return Err(PoolError::Exists {
                kind: "zone",
                name: name.into(),
            });
        }
        let id = ZoneId(catalog.next_zone);
        // Under the catalog lock: the provider cannot be replaced meanwhile.
        let root = self.root();
        let keyfile = ZoneKeyFile::create(root.as_ref(), id, name)?;
        let kpath = Self::zone_key_path(&self.dir, id);
        let tpath = Self::cb_table_path(&self.dir, id);
        // Leftovers of a create that crashed before the catalog named them.
        let _ = std::fs::remove_file(&kpath);
        let _ = std::fs::remove_file(&tpath);
        keyfile.save(&kpath)?;
        ZoneMeta::open(&tpath, true)?;
        let entry = ZoneEntry {
            dedup: true,
            stream: false,
            id,
            name: name.into(),
        };
        let zone = Self::load_zone(&self.dir, &entry, root.as_ref())?;
        let mut next = catalog.clone();
        next.next_zone += 1;
        next.zones.push(entry);
        self.save_catalog(&next)?;
        *catalog = next;
        let zone = Arc::new(zone);
        self.zones.write().insert(id, zone.clone());
        self.register_rotation(zone);
        tracing::info!(zone = name, id = id.0, "zone created");
        Ok(id)
    }

    /// Creates a volume of `size` bytes (a multiple of 4096) in zone `zone`,
    /// and records `volume.create` (its `count`: the size in 4 KiB blocks).
    pub fn create_volume(&self, name: &str, zone: &str, size: u64) -> Result<VolumeId> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.create_volume_unaudited(name, zone, size);
        let event = match &r {
            Ok(_) => AuditEvent::ok("volume.create").count(size / BLOCK_SIZE as u64),
            Err(e) => AuditEvent::failed("volume.create", e),
        };
        let event = event.zone(zone).volume(name).duration(started.elapsed());
        Self::record_outcome(
            audit,
            vec![event],
            &format!("volume {name:?} was created"),
            r,
        )
    }

    fn create_volume_unaudited(&self, name: &str, zone: &str, size: u64) -> Result<VolumeId> {
        validate_name("volume", name)?;
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(PoolError::Invalid(format!(
                "volume size {size} must be a positive multiple of 4096 bytes"
            )));
        }
        if size > 1 << 50 {
            return Err(PoolError::Invalid(format!(
                "volume size {size} is over the 1 PiB limit"
            )));
        }
        let mut catalog = self.catalog.lock();
        if catalog.volumes.iter().any(|v| v.name == name) {
            return Err(PoolError::Exists {
                kind: "volume",
                name: name.into(),
            });
        }
        let zone_id = catalog
            .zones
            .iter()
            .find(|z| z.name == zone)
            .map(|z| z.id)
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: zone.into(),
            })?;
        let id = VolumeId(catalog.next_volume);
        let mpath = Self::map_path(&self.dir, id);
        let _ = std::fs::remove_file(&mpath);
        let map = VolumeMap::open(&mpath, size / BLOCK_SIZE as u64, true)?;
        let entry = VolumeEntry {
            id,
            name: name.into(),
            zone: zone_id,
            size,
            state: VolumeState::Active,
        };
        let mut next = catalog.clone();
        next.next_volume += 1;
        next.volumes.push(entry.clone());
        self.save_catalog(&next)?;
        *catalog = next;
        drop(catalog);
        self.zones.read()[&zone_id]
            .meta
            .lock()
            .volumes
            .insert(id, map);
        self.attach_volume(&entry);
        self.stream_volume_changed(zone_id, id, name, Some(size));
        tracing::info!(volume = name, zone, size, "volume created");
        Ok(id)
    }

    /// Deletes a volume and frees its space, and records `volume.delete`.
    /// Refuses while it is served.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.delete_volume_unaudited(name);
        let event = match &r {
            Ok(()) => AuditEvent::ok("volume.delete"),
            Err(e) => AuditEvent::failed("volume.delete", e),
        };
        let event = event.volume(name).duration(started.elapsed());
        Self::record_outcome(
            audit,
            vec![event],
            &format!("volume {name:?} was deleted"),
            r,
        )
    }

    fn delete_volume_unaudited(&self, name: &str) -> Result<()> {
        let mut volumes = self.volumes.write();
        let vol = volumes.get(name).ok_or_else(|| PoolError::NotFound {
            kind: "volume",
            name: name.into(),
        })?;
        if Arc::strong_count(vol) > 1 {
            return Err(PoolError::Busy(name.into()));
        }
        volumes.remove(name);
        drop(volumes);
        let entry = {
            let mut catalog = self.catalog.lock();
            let mut next = catalog.clone();
            let v = next
                .volumes
                .iter_mut()
                .find(|v| v.name == name)
                .expect("catalog and volumes agree");
            v.state = VolumeState::Deleting;
            let entry = v.clone();
            self.save_catalog(&next)?;
            *catalog = next;
            entry
        };
        self.finish_delete(&entry)
    }

    /// Frees every block of a volume marked deleting, then drops it from the catalog.
    fn finish_delete(&self, v: &VolumeEntry) -> Result<()> {
        // A volume object for the one being deleted: unmapping goes through
        // the same path as TRIM, so refcounts and frees are journaled alike.
        let doomed = self.volume_for(v);
        let zone = doomed.zone().clone();
        let last = doomed
            .unmap_everything()
            .map_err(|e| PoolError::Layout(format!("cannot free volume {}: {e}", v.name)))?;
        if let Some(seq) = last {
            self.journal.commit_blocking(seq)?;
        }
        let mut catalog = self.catalog.lock();
        let mut next = catalog.clone();
        next.volumes.retain(|e| e.id != v.id);
        self.save_catalog(&next)?;
        *catalog = next;
        drop(catalog);
        zone.meta.lock().volumes.remove(&v.id);
        let mpath = Self::map_path(&self.dir, v.id);
        let _ = std::fs::remove_file(&mpath);
        self.stream_volume_changed(v.zone, v.id, &v.name, None);
        tracing::info!(volume = %v.name, "volume deleted");
        Ok(())
    }

    /// Checks the metadata: every mapped block has a live content block,
    /// every refcount equals the number of blocks mapped to it, and no data
    /// slot is claimed twice. Returns the problems found (empty: consistent).
    pub fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        let catalog = self.catalog.lock().clone();
        let zones = self.zones.read();
        let mut slot_owner: rustc_hash::FxHashMap<u64, (ZoneId, Cbid)> = Default::default();
        // Every zone's lock, in id order, held to the end (as a checkpoint
        // takes them): on a served pool, a slot freed in one zone while
        // another is scanned would look referenced but not allocated.
        let metas: Vec<_> = zones.values().map(|z| (z, z.meta.lock())).collect();
        for (zone, meta) in &metas {
            let mut refs: rustc_hash::FxHashMap<Cbid, u32> = Default::default();
            for v in catalog.volumes.iter().filter(|v| v.zone == zone.id) {
                let Some(map) = meta.volumes.get(&v.id) else {
                    continue;
                };
                for (lba, cbid) in map.mapped() {
                    report.mapped_blocks += 1;
                    if meta.cb(cbid).is_none() {
                        report.problems.push(format!(
                            "volume {} block {lba} maps to content block {cbid}, which has no record",
                            v.name
                        ));
                    }
                    *refs.entry(cbid).or_default() += 1;
                }
            }
            for (cbid, rec) in meta.live_records() {
                report.content_blocks += 1;
                let n = refs.remove(&cbid).unwrap_or(0);
                if n != rec.refcount {
                    report.problems.push(format!(
                        "zone {} content block {cbid}: refcount {} but {n} blocks map to it",
                        zone.name, rec.refcount
                    ));
                }
                if let Some((z, other)) = slot_owner.insert(rec.slot.0, (zone.id, cbid)) {
                    report.problems.push(format!(
                        "slot {} is claimed by content block {cbid} of zone {} and {other} of zone {z}",
                        rec.slot, zone.name
                    ));
                }
            }
        }
        report.used_slots = self.storage.slots.lock().used();
        if report.used_slots < slot_owner.len() as u64 {
            report.problems.push(format!(
                "the allocator counts {} slots in use but {} are referenced",
                report.used_slots,
                slot_owner.len()
            ));
        }
        report
    }

    /// A zone's id by name.
    pub(crate) fn zone_id(&self, name: &str) -> Result<ZoneId> {
        self.catalog
            .lock()
            .zones
            .iter()
            .find(|z| z.name == name)
            .map(|z| z.id)
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: name.into(),
            })
    }

    /// Every zone's key file, by zone name.
    pub fn key_files(&self) -> Result<Vec<(String, ZoneKeyFile)>> {
        let zones = self.catalog.lock().zones.clone();
        zones
            .iter()
            .map(|z| {
                Ok((
                    z.name.clone(),
                    ZoneKeyFile::load(&Self::zone_key_path(&self.dir, z.id))?,
                ))
            })
            .collect()
    }

    /// The zone name and key file that hold key `key_id`.
    pub fn key_file_of(&self, key_id: &str) -> Result<(String, ZoneKeyFile)> {
        self.key_files()?
            .into_iter()
            .find(|(_, f)| f.records().iter().any(|r| r.id == key_id))
            .ok_or_else(|| PoolError::NotFound {
                kind: "key",
                name: key_id.into(),
            })
    }

    /// Content blocks per DEK version in `zone`, from the block map.
    pub fn blocks_per_key(&self, zone: ZoneId) -> BTreeMap<KeyVersion, u64> {
        let mut out = BTreeMap::new();
        if let Some(z) = self.zones.read().get(&zone) {
            let mut meta = z.meta.lock();
            let active = meta.active;
            for (&(data, staged), &n) in meta.census() {
                // A block counts under the key of its live copy.
                let live = staged.filter(|s| *s <= active).unwrap_or(data);
                *out.entry(live).or_default() += n;
            }
        }
        out
    }

    /// Rotates a zone's KEK: makes KEK v(n+1) and re-wraps every DEK and
    /// the MAC key under it, `batch` keys per atomic save with `pause`
    /// between saves, then retires and destroys the old KEK. Resumes a
    /// rotation a crash interrupted. Volume data and the block map are not
    /// touched: only wrapped keys change.
    ///
    /// Refused when the pool requires dual control: use
    /// [`Pool::rotate_kek_approved`] then.
    pub fn rotate_kek(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
    ) -> Result<KekRotationReport> {
        let policy = self.config().dual_control.clone();
        if policy.required {
            let e = ApprovalError::NotEnough {
                got: 0,
                required: policy.approvals,
            };
            let _ = self.record(AuditEvent::refused("kek.rotate", &e).zone(zone));
            return Err(e.into());
        }
        self.rotate_kek_audited(zone, batch, pause, Vec::new())
    }

    /// [`Pool::rotate_kek`] under dual control: `auth` (from
    /// [`crate::keys::approval::authorize`]) must approve a KEK rotation of
    /// exactly this zone. Works on pools without dual control too. The
    /// approvers are recorded in the audit log.
    pub fn rotate_kek_approved(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
        auth: Authorized,
    ) -> Result<KekRotationReport> {
        let expected = Target::new(Operation::RotateKek, Some(zone), None);
        if *auth.target() != expected {
            let e = ApprovalError::WrongRequest {
                operator: auth.approvers().join(","),
                approved: auth.target().to_string(),
                expected: expected.to_string(),
            };
            let _ = self.record(
                AuditEvent::refused("kek.rotate", &e)
                    .zone(zone)
                    .approvers(auth.approvers()),
            );
            return Err(e.into());
        }
        tracing::info!(zone, approvers = ?auth.approvers(), nonce = auth.nonce(), "KEK rotation approved");
        self.rotate_kek_audited(zone, batch, pause, auth.approvers().to_vec())
    }

    fn rotate_kek_audited(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
        approvers: Vec<String>,
    ) -> Result<KekRotationReport> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.rotate_kek_unaudited(zone, batch, pause);
        let events = match &r {
            Ok(report) => {
                let mut events = vec![
                    AuditEvent::ok("kek.rotate")
                        .zone(zone)
                        .approvers(approvers.iter())
                        .key(&KeyLabel::new(
                            self.zone_id(zone)?,
                            Purpose::Kek,
                            report.new_version,
                        ))
                        .count(report.rewrapped as u64)
                        .duration(started.elapsed()),
                ];
                let zone_id = self.zone_id(zone)?;
                for id in &report.destroyed {
                    // Ids are made by `KeyLabel::new`: "z{zone}-kek-v{version}".
                    if let Some(v) = id.rsplit_once("-v").and_then(|(_, v)| v.parse().ok()) {
                        events.push(AuditEvent::ok("key.destroy").zone(zone).key(&KeyLabel::new(
                            zone_id,
                            Purpose::Kek,
                            v,
                        )));
                    }
                }
                events
            }
            Err(e) => vec![
                AuditEvent::failed("kek.rotate", e)
                    .zone(zone)
                    .approvers(approvers.iter())
                    .duration(started.elapsed()),
            ],
        };
        Self::record_outcome(audit, events, "the KEK was rotated", r)
    }

    fn rotate_kek_unaudited(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
    ) -> Result<KekRotationReport> {
        let started = std::time::Instant::now();
        let id = self.zone_id(zone)?;
        let z = self.zones.read().get(&id).cloned();
        // One key-file writer at a time (a DEK rotation may run beside this).
        let _k = z.as_ref().map(|z| z.key_file_lock.lock());
        // Read under the lock: a root key rotation cannot replace it until
        // this KEK rotation is done.
        let root = self.root();
        let path = Self::zone_key_path(&self.dir, id);
        let mut file = ZoneKeyFile::load(&path)?;
        let resumed = file.kek_rotation().is_some();
        let first = file.begin_kek_rotation(root.as_ref())?;
        file.save(&path)?;
        let mut rewrapped = 0;
        let mut remaining = first.remaining;
        while remaining > 0 {
            let progress = file.rewrap_batch(root.as_ref(), batch.max(1))?;
            rewrapped += remaining - progress.remaining;
            remaining = progress.remaining;
            file.save(&path)?;
            if remaining > 0 && !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        // Stream key sets are wrapped under the zone's KEK too.
        let sets = self.rewrap_stream_sets(id, &file, root.as_ref())?;
        let usage = ZoneUsage(self.blocks_per_key(id));
        let destroyed = file.finish_kek_rotation(&usage)?;
        file.save(&path)?;
        tracing::info!(
            zone,
            new_kek = first.new_version,
            rewrapped,
            stream_sets = sets,
            ?destroyed,
            resumed,
            "KEK rotated"
        );
        Ok(KekRotationReport {
            zone: zone.into(),
            new_version: first.new_version,
            rewrapped,
            destroyed,
            resumed,
            elapsed: started.elapsed(),
        })
    }

    /// Moves key `key_id` to `state` (destroyed or compromised, the two
    /// operations dual control guards): checked against SP 800-57 and the
    /// key chain's rules, a DEK destroyed only when the block map has no
    /// content block under it, and recorded in the audit log with its
    /// approvers. `auth` must approve exactly this operation on this key when
    /// the pool requires dual control. Returns the key's zone name.
    pub fn set_key_state(
        &self,
        key_id: &str,
        state: KeyState,
        auth: Option<Authorized>,
    ) -> Result<String> {
        let (action, operation) = match state {
            KeyState::Destroyed => ("key.destroy", Operation::DestroyKey),
            KeyState::Compromised => ("key.compromise", Operation::CompromiseKey),
            other => {
                return Err(PoolError::Invalid(format!(
                    "only destroy and compromise are operator commands; {} is reached through a rotation",
                    other.name()
                )));
            }
        };
        let audit = self.audit()?;
        let (zone_name, file) = self.key_file_of(key_id)?;
        let label = file
            .records()
            .iter()
            .find(|r| r.id == key_id)
            .map(|r| r.label())
            .expect("found above");
        let approvers: Vec<String> = auth
            .as_ref()
            .map(|a| a.approvers().to_vec())
            .unwrap_or_default();
        let expected = Target::new(operation, Some(&zone_name), Some(key_id));
        self.check_approval(&expected, auth.as_ref(), |e| {
            AuditEvent::refused(action, e).zone(&zone_name).key(&label)
        })?;
        let started = Instant::now();
        let zone = self.zones.read().get(&file.zone()).cloned();
        // One key-file writer at a time; loaded again under the lock, as a
        // KEK or root key rotation may have saved the file since.
        let _k = zone.as_ref().map(|z| z.key_file_lock.lock());
        let path = Self::zone_key_path(&self.dir, file.zone());
        // Every copy counts, not just live ones: a data copy behind a
        // staged one is still ciphertext under its key.
        let usage = ZoneUsage(
            zone.as_ref()
                .map(|z| self.key_references(z))
                .unwrap_or_default(),
        );
        let r = (|| {
            let mut file = ZoneKeyFile::load(&path)?;
            file.set_state(key_id, state, &usage)?;
            file.save(&path)
        })()
        .map(|()| zone_name.clone())
        .map_err(PoolError::from);
        let event = match &r {
            Ok(_) => AuditEvent::ok(action),
            Err(e) => AuditEvent::failed(action, e),
        }
        .zone(&zone_name)
        .key(&label)
        .approvers(approvers.iter())
        .duration(started.elapsed());
        Self::record_outcome(audit, vec![event], "the key state changed", r)
    }

    /// Checks that `auth` approves exactly `expected` when the pool needs
    /// dual control (any approval given must match, required or not).
    /// A refusal is recorded as `refused(error)` with the approvers, and
    /// returned. Returns the approvers.
    pub(crate) fn check_approval(
        &self,
        expected: &Target,
        auth: Option<&Authorized>,
        refused: impl FnOnce(&ApprovalError) -> AuditEvent,
    ) -> Result<Vec<String>> {
        let approvers: Vec<String> = auth.map(|a| a.approvers().to_vec()).unwrap_or_default();
        let policy = self.config().dual_control.clone();
        let error = match auth {
            None if policy.required => Some(ApprovalError::NotEnough {
                got: 0,
                required: policy.approvals,
            }),
            Some(a) if a.target() != expected => Some(ApprovalError::WrongRequest {
                operator: a.approvers().join(","),
                approved: a.target().to_string(),
                expected: expected.to_string(),
            }),
            _ => None,
        };
        if let Some(e) = error {
            let _ = self.record(refused(&e).approvers(approvers.iter()));
            return Err(e.into());
        }
        Ok(approvers)
    }

    /// Bytes of the data device in use.
    pub fn used_bytes(&self) -> u64 {
        self.storage.slots.lock().used() * BLOCK_SIZE as u64
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        self.journal.commit_blocking(self.journal.last_appended())?;
        Ok(())
    }

    /// Every zone, with its dedup setting and how many volumes it holds.
    pub fn zone_infos(&self) -> Vec<crate::admin::ZoneInfo> {
        let catalog = self.catalog.lock();
        catalog
            .zones
            .iter()
            .map(|z| crate::admin::ZoneInfo {
                id: u64::from(z.id.0),
                name: z.name.clone(),
                dedup: z.dedup,
                volumes: catalog.volumes.iter().filter(|v| v.zone == z.id).count() as u64,
            })
            .collect()
    }

    /// Mapped blocks of every volume, by name.
    pub fn volume_usage(&self) -> BTreeMap<String, u64> {
        let catalog = self.catalog.lock().clone();
        let zones = self.zones.read();
        catalog
            .volumes
            .iter()
            .filter_map(|v| {
                let meta = zones.get(&v.zone)?.meta.lock();
                Some((
                    v.name.clone(),
                    meta.volumes.get(&v.id)?.mapped().len() as u64,
                ))
            })
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Commit what is pending; the journal thread stops with it.
        let _ = self.journal.commit_blocking(self.journal.last_appended());
        self.journal.close();
        self.stop_streams();
    }
}

/// flock(LOCK_EX | LOCK_NB) on `fd`; returns 0 on success.
fn unsafe_flock(fd: std::os::fd::RawFd) -> i32 {
    // SAFETY: flock only reads the integer fd, which the caller keeps open.
    unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }
}

/// The pool's volumes, as NBD exports.
impl ExportCatalog for Pool {
    type Export = Volume;

    fn list(&self) -> Vec<ExportInfo> {
        let catalog = self.catalog.lock();
        self.volumes
            .read()
            .values()
            .map(|v| {
                let zone = catalog.zones.iter().find(|z| {
                    Some(z.id)
                        == catalog
                            .volumes
                            .iter()
                            .find(|e| e.id == v.id)
                            .map(|e| e.zone)
                });
                ExportInfo {
                    name: v.name.clone(),
                    description: format!(
                        "keyturn volume in zone {}",
                        zone.map_or("?", |z| z.name.as_str())
                    ),
                }
            })
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("10X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("volume", "vol-0_a.b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name("volume", bad).is_err(), "{bad:?}");
        }
    }
}
