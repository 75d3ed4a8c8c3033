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
//! DIR/keys/root-rotation.json  a root key rotation in progress (see [`root`])
//! DIR/journal, journal.1     write-ahead journal: headers and frame region 0, frame region 1
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
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{ConfigError, PoolConfig, Profile, RootKeyConfig};
use crate::ids::{BLOCK_SIZE, JournalSeq, KeyVersion, VolumeId, ZoneId};
use crate::keys::KeyError;
use crate::keys::approval::ApprovalError;
use crate::keys::kmip::KmipProvider;
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{Pin, Pkcs11Provider};
use crate::keys::root::RootKeyProvider;
use crate::keys::sealed::SealedFileProvider;
use crate::keys::zone_keys::ZoneKeyFile;
use crate::store::device::{Device, DeviceError, DeviceOptions, Engine, EngineConfig};
use crate::store::journal::{Entry, Journal, JournalConfig, JournalError};
use crate::store::table::TableError;
use crate::store::{Staging, Storage};
use crate::volume::Volume;
use crate::zone::{VolumeMap, Zone, ZoneCrypto, ZoneMeta};

pub mod admin;
mod backup;
mod block;
mod catalog;
mod check;
mod hooks;
mod init;
mod input;
mod keys;
pub mod root;
mod stream;
mod volumes;
pub use backup::{BackupReport, RestoreReport};
pub use block::BlockInfo;
pub use catalog::{Catalog, VolumeEntry, VolumeState, ZoneEntry};
use hooks::Hooks;
pub use init::{InitOptions, RootKeyChoice};
pub use input::parse_size;
use input::validate_name;
pub use keys::KekRotationReport;
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

/// What [`Pool::check`] found (a JSON body of the admin API as well).
pub use crate::admin::CheckReport;

/// The on-disk format this build reads and writes (2: content-block
/// records carry a staged copy; journal entries for flips).
pub const POOL_FORMAT: u32 = 2;

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
        // Frames written ahead come before lower sequences; they commute
        // with those (see `store::journal`), so file order is fine.
        let replay = Journal::read(&dir.join("journal"))?;
        let (last, in_order) = (replay.last, replay.in_order_through);
        for (seq, entries) in replay.frames {
            for e in entries {
                Self::apply(&zones, e, seq);
            }
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
        pool.open_streams(in_order)?;
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

    /// Bytes of the data device in use.
    pub fn used_bytes(&self) -> u64 {
        self.storage.slots.lock().used() * BLOCK_SIZE as u64
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        self.journal.commit_blocking(self.journal.last_appended())?;
        Ok(())
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
