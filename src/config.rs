//! Pool configuration (`pool.toml`) and hardware profiles (`hw-profiles/`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// File (or profile name).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No built-in profile has that name and no such file exists.
    #[error("unknown hardware profile {0:?} (built in: {1})")]
    UnknownProfile(String, String),
}

/// `pool.toml`: where a pool's devices are and how it is served.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// On-disk format version.
    pub format: u32,
    /// Data device: a file (grown as needed) or a raw block device; relative
    /// paths are relative to the pool directory.
    pub data: PathBuf,
    /// Staging device (fast NVMe) for rotation windows.
    pub staging: PathBuf,
    /// Root key provider.
    pub root_key: RootKeyConfig,
    /// Server settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Dual control for dangerous key operations. Defaulted so pools made
    /// before it existed still parse (with dual control off).
    #[serde(default)]
    pub dual_control: DualControlSection,
    /// DEK rotation: staging area, throttle, grace period.
    #[serde(default)]
    pub rotation: RotationSection,
    /// The admin HTTP API. Defaulted so pools made before it existed still
    /// parse (on the default address, with the default token file).
    #[serde(default)]
    pub admin: AdminSection,
    /// Zone change streams: windows, retention, the stream listener.
    #[serde(default)]
    pub stream: crate::stream::StreamSettings,
    /// The rotation scheduler. Defaulted: on, checking once a minute.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Daily and weekly reports written to a directory. Defaulted: off.
    #[serde(default, skip_serializing_if = "ReportsSection::is_off")]
    pub reports: ReportsSection,
    /// Test facilities (a test pool only). Defaulted: off.
    #[serde(default, skip_serializing_if = "TestSection::is_off")]
    pub test: TestSection,
    /// TLS certificates for the listeners, and the NBD TLS mode.
    #[serde(default, skip_serializing_if = "crate::tls::TlsSection::is_unset")]
    pub tls: crate::tls::TlsSection,
    /// Who may open which export (`[[access]]`); none: everyone everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<crate::nbd::access::AccessRule>,
}

/// `[schedule]` in `pool.toml`: the rotation scheduler (pool-wide; the
/// per-zone policies are in `policies.json`, see [`crate::schedule::policy`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Whether the scheduler runs at all.
    pub enabled: bool,
    /// How often it looks at every key, in milliseconds.
    pub check_interval_ms: u64,
    /// Rotations running at once, pool-wide (an emergency ignores it).
    pub max_concurrent: usize,
    /// Failed starts before a rotation is marked failed.
    pub max_attempts: u32,
    /// First retry delay in seconds; doubled at each failure.
    pub retry_base_secs: u64,
    /// Longest retry delay in seconds.
    pub retry_max_secs: u64,
    /// Re-encryption rate assumed for a zone's rotation when neither its
    /// policy nor `[rotation] rate_mib_s` sets one, in MiB/s: it sets how
    /// far ahead of the window a rotation opens and which cryptoperiods
    /// are too short.
    pub assumed_rate_mib_s: u64,
    /// A threat feed: a file of JSON lines the scheduler reads as they are
    /// appended (see [`crate::schedule::threat`]); relative to the pool
    /// directory unless absolute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threat_feed: Option<PathBuf>,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            enabled: true,
            check_interval_ms: 60_000,
            max_concurrent: 2,
            max_attempts: 5,
            retry_base_secs: 60,
            retry_max_secs: 3600,
            assumed_rate_mib_s: 100,
            threat_feed: None,
        }
    }
}

impl ScheduleSection {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.check_interval_ms == 0 {
            return Err("schedule.check_interval_ms must be at least 1".into());
        }
        if self.max_concurrent == 0 {
            return Err("schedule.max_concurrent must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("schedule.max_attempts must be at least 1".into());
        }
        if self.assumed_rate_mib_s == 0 {
            return Err("schedule.assumed_rate_mib_s must be at least 1".into());
        }
        Ok(())
    }
}

/// `[reports]` in `pool.toml`: the server writes the key-rotation report
/// of each past day and week into `dir` (see [`crate::report::scheduled`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsSection {
    /// Where reports go (relative to the pool directory unless absolute);
    /// none: no scheduled reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// A report of each day (UTC), written after midnight.
    pub daily: bool,
    /// A report of each week (Monday to Monday, UTC), written after the
    /// week ends.
    pub weekly: bool,
    /// The files made of each report.
    pub format: Vec<crate::report::render::Format>,
}

impl Default for ReportsSection {
    fn default() -> Self {
        Self {
            dir: None,
            daily: true,
            weekly: true,
            format: vec![
                crate::report::render::Format::Json,
                crate::report::render::Format::Md,
                crate::report::render::Format::Html,
            ],
        }
    }
}

impl ReportsSection {
    fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.dir.is_some() && self.format.is_empty() {
            return Err(
                "reports.format names no format: give some of \"json\", \"md\", \"html\"".into(),
            );
        }
        if self.dir.is_some() && !self.daily && !self.weekly {
            return Err(
                "reports.dir is set but neither reports.daily nor reports.weekly is true".into(),
            );
        }
        Ok(())
    }
}

/// `[test]` in `pool.toml`: facilities for tests, refused on any pool
/// that does not turn them on here. Never set this on a production pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestSection {
    /// Let `keyturn serve` take its calendar time from the file named by
    /// `KEYTURN_TEST_CLOCK` (see [`crate::clock`]).
    pub allow_test_clock: bool,
}

impl TestSection {
    fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

/// `[rotation]` in `pool.toml`: how DEK rotations use the staging device
/// and how hard they may push.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationSection {
    /// Staging capacity in MiB (on a block device: at most its size).
    pub staging_capacity_mib: u64,
    /// MiB of staging kept for foreground writes: the pipeline stops picking
    /// before it eats into them.
    pub staging_reserve_mib: u64,
    /// Throttle for the staging pipeline and the migrator while volumes are
    /// busy, in MiB/s of re-encrypted data (0: no byte limit).
    pub rate_mib_s: u64,
    /// Share of one core the pipeline may use while volumes are busy: the
    /// CPU time of all its threads and of the kernel's page-cache copies of
    /// its writes (0 < share <= 1).
    pub cpu_share: f64,
    /// After this many milliseconds without foreground I/O in the zone the
    /// throttle is lifted (an idle zone re-encrypts at full speed).
    pub idle_after_ms: u64,
    /// Content blocks per pipeline or migration batch.
    pub batch_blocks: usize,
    /// Seconds an old DEK is kept (decrypt-only, unused) after migration,
    /// before it is destroyed.
    pub grace_secs: u64,
}

impl Default for RotationSection {
    fn default() -> Self {
        Self {
            staging_capacity_mib: 1024,
            staging_reserve_mib: 64,
            rate_mib_s: 0,
            // benches/rotation-impact.sh (4 KiB random reads at QD32 on a
            // 4 GiB volume, 2 cores): 0.25 left 0.73x of idle while staging
            // and 0.83x while migrating; 0.15 left 0.82-0.88x and 0.92x+.
            cpu_share: 0.15,
            idle_after_ms: 200,
            batch_blocks: 256,
            grace_secs: 3600,
        }
    }
}

/// `[admin]` in `pool.toml`: where the admin API listens (loopback only)
/// and which file holds its bearer token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Loopback address and port of the admin API (port 0 picks a free one).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// The bearer token file, relative to the pool directory unless absolute.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
}

fn default_admin_listen() -> String {
    "127.0.0.1:10810".into()
}

fn default_token_file() -> PathBuf {
    "admin.token".into()
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_file: default_token_file(),
        }
    }
}

impl RotationSection {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.cpu_share > 0.0 && self.cpu_share <= 1.0) {
            return Err(format!(
                "rotation.cpu_share must be in (0, 1], not {}",
                self.cpu_share
            ));
        }
        if self.batch_blocks == 0 || self.batch_blocks > 4096 {
            return Err(format!(
                "rotation.batch_blocks must be in 1..=4096, not {}",
                self.batch_blocks
            ));
        }
        if self.staging_reserve_mib > self.staging_capacity_mib {
            return Err("rotation.staging_reserve_mib exceeds staging_capacity_mib".into());
        }
        Ok(())
    }
}

impl AdminSection {
    /// The token file of the pool in `pool_dir`.
    pub fn token_path(&self, pool_dir: &Path) -> PathBuf {
        pool_dir.join(&self.token_file)
    }
}

/// `[dual_control]` in `pool.toml`: whether KEK/root rotation, key
/// destruction and compromise need signed approvals from distinct operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DualControlSection {
    /// Whether approvals are required at all.
    #[serde(default)]
    pub required: bool,
    /// How many distinct operators must approve (at least 2 when required).
    #[serde(default = "default_approvals")]
    pub approvals: usize,
}

fn default_approvals() -> usize {
    2
}

impl Default for DualControlSection {
    fn default() -> Self {
        Self {
            required: false,
            approvals: default_approvals(),
        }
    }
}

/// How the root key is held.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RootKeyConfig {
    /// A key file sealed with a passphrase (Argon2id).
    SealedFile {
        /// Path of the sealed key file, relative to the pool directory.
        path: PathBuf,
    },
    /// An AES-256 key inside a PKCS#11 token (an HSM); wrapping happens in
    /// the token and the key never leaves it. Unlocked with the user PIN.
    Pkcs11 {
        /// Path of the PKCS#11 module (shared library).
        module: PathBuf,
        /// Label of the token holding the root key.
        token_label: String,
        /// Label of the root key object on the token.
        #[serde(default = "default_key_label")]
        key_label: String,
    },
    /// An AES-256 key inside a KMIP key manager reached over mutual TLS;
    /// wrapping happens in the KMS and the key never leaves it.
    Kmip {
        /// `host:port` of the KMIP server.
        addr: String,
        /// CA certificate (PEM) that signed the server's certificate.
        ca: PathBuf,
        /// This client's certificate (PEM).
        cert: PathBuf,
        /// This client's private key (PEM).
        client_key: PathBuf,
        /// The root key's Name in the KMS.
        #[serde(default = "default_kmip_key_name")]
        key_name: String,
        /// The root key's KMIP unique identifier.
        key_id: String,
        /// Seconds a wrap or unwrap waits for an unreachable KMS while serving.
        #[serde(default = "default_kmip_retry_secs")]
        retry_secs: u64,
    },
}

fn default_kmip_key_name() -> String {
    crate::keys::kmip::DEFAULT_KEY_NAME.into()
}

fn default_kmip_retry_secs() -> u64 {
    crate::keys::kmip::DEFAULT_RETRY_SECS
}

fn default_key_label() -> String {
    crate::keys::pkcs11::DEFAULT_KEY_LABEL.into()
}

impl RootKeyConfig {
    /// The PKCS#11 settings, if this is a PKCS#11 root key.
    pub fn pkcs11(&self) -> Option<crate::keys::Pkcs11Config> {
        match self {
            RootKeyConfig::Pkcs11 {
                module,
                token_label,
                key_label,
            } => Some(crate::keys::Pkcs11Config {
                module: module.clone(),
                token_label: token_label.clone(),
                key_label: key_label.clone(),
            }),
            RootKeyConfig::SealedFile { .. } | RootKeyConfig::Kmip { .. } => None,
        }
    }

    /// The KMIP settings, if this is a KMIP root key.
    pub fn kmip(&self) -> Option<crate::keys::KmipConfig> {
        match self {
            RootKeyConfig::Kmip {
                addr,
                ca,
                cert,
                client_key,
                key_name,
                key_id,
                retry_secs,
            } => Some(crate::keys::KmipConfig {
                addr: addr.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                client_key: client_key.clone(),
                key_name: key_name.clone(),
                key_id: key_id.clone(),
                retry_secs: *retry_secs,
            }),
            _ => None,
        }
    }

    /// The `[root_key]` for a KMIP root key.
    pub fn from_kmip(c: &crate::keys::KmipConfig) -> Self {
        RootKeyConfig::Kmip {
            addr: c.addr.clone(),
            ca: c.ca.clone(),
            cert: c.cert.clone(),
            client_key: c.client_key.clone(),
            key_name: c.key_name.clone(),
            key_id: c.key_id.clone(),
            retry_secs: c.retry_secs,
        }
    }
}

/// `[server]` in `pool.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// TCP address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Also listen on this Unix socket.
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// Hardware profile name or path.
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Seconds an NBD client has to finish its handshake (however slowly
    /// it trickles bytes in) before it is dropped.
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
}

fn default_handshake_timeout_secs() -> u64 {
    30
}

fn default_listen() -> String {
    "127.0.0.1:10809".into()
}

fn default_profile() -> String {
    "ci-2core".into()
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            unix: None,
            profile: default_profile(),
            handshake_timeout_secs: default_handshake_timeout_secs(),
        }
    }
}

impl PoolConfig {
    /// Reads `pool.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        config
            .rotation
            .validate()
            .and_then(|()| config.schedule.validate())
            .and_then(|()| config.reports.validate())
            .map_err(|message| ConfigError::Parse {
                path: path.into(),
                message,
            })?;
        Ok(config)
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// A hardware profile: queue depths, threads, batch sizes, commit intervals.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Profile name.
    pub name: String,
    /// What machine it is for.
    pub description: String,
    /// Device I/O.
    pub io: IoProfile,
    /// NBD server.
    pub server: ServerProfile,
    /// Journal.
    pub journal: JournalProfile,
    /// Batching.
    pub batch: BatchProfile,
}

/// `[io]` of a profile.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoProfile {
    /// io_uring submission queue entries.
    pub queue_depth: u32,
    /// Try O_DIRECT on the data device.
    pub direct: bool,
    /// With buffered I/O, foreground writes of at least this many KiB in one
    /// contiguous run go past the page cache; 0 keeps them all buffered.
    #[serde(default)]
    pub uncached_write_kib: u64,
    /// With buffered I/O, writes of at most this many KiB are made on the
    /// calling worker thread instead of through io_uring, by at most one
    /// fewer workers than `[server] worker_threads` at once; 0 sends them
    /// all through io_uring.
    #[serde(default)]
    pub inline_write_kib: u64,
}

/// `[server]` of a profile.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerProfile {
    /// Tokio worker threads.
    pub worker_threads: usize,
    /// Requests in flight per connection.
    pub max_inflight_per_conn: usize,
}

/// `[journal]` of a profile.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalProfile {
    /// Commit interval without a FLUSH, in milliseconds.
    pub commit_interval_ms: u64,
    /// Checkpoint threshold in MiB of journal.
    pub checkpoint_mib: u64,
    /// Commit when this many MiB of journal frames are pending.
    #[serde(default = "default_commit_mib")]
    pub commit_mib: u64,
}

fn default_commit_mib() -> u64 {
    4
}

/// `[batch]` of a profile.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchProfile {
    /// Most blocks one device I/O carries.
    pub max_run_blocks: u64,
}

/// The profiles compiled into the binary, from `hw-profiles/`.
const BUILT_IN: &[(&str, &str)] = &[
    ("ci-2core", include_str!("../hw-profiles/ci-2core.toml")),
    (
        "nvme-server",
        include_str!("../hw-profiles/nvme-server.toml"),
    ),
];

impl Profile {
    /// A built-in profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ConfigError> {
        let parse = |text: &str, path: &Path| {
            toml::from_str::<Profile>(text).map_err(|e| ConfigError::Parse {
                path: path.into(),
                message: e.to_string(),
            })
        };
        if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return parse(text, Path::new(name_or_path));
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.into(),
                source,
            })?;
            return parse(&text, path);
        }
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        Err(ConfigError::UnknownProfile(
            name_or_path.into(),
            names.join(", "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_parse() {
        for (name, _) in BUILT_IN {
            let p = Profile::load(name).unwrap();
            assert_eq!(&p.name, name);
            assert!(p.server.worker_threads >= 1);
        }
        assert!(matches!(
            Profile::load("nope"),
            Err(ConfigError::UnknownProfile(..))
        ));
    }

    #[test]
    fn pool_config_round_trips() {
        let c = PoolConfig {
            format: 1,
            data: "data".into(),
            staging: "staging".into(),
            root_key: RootKeyConfig::SealedFile {
                path: "keys/root.sealed".into(),
            },
            server: ServerSection::default(),
            dual_control: DualControlSection {
                required: true,
                approvals: 3,
            },
            rotation: RotationSection::default(),
            admin: AdminSection::default(),
            stream: Default::default(),
            schedule: Default::default(),
            reports: Default::default(),
            test: Default::default(),
            tls: Default::default(),
            access: Vec::new(),
        };
        let back: PoolConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.data, c.data);
        assert_eq!(back.dual_control, c.dual_control);
        // A pool.toml from before dual control existed parses, with it off.
        let old = "format = 1\ndata = \"data\"\nstaging = \"staging\"\n\
                   [root_key]\nprovider = \"sealed-file\"\npath = \"k\"\n";
        let old: PoolConfig = toml::from_str(old).unwrap();
        assert_eq!(old.dual_control, DualControlSection::default());
        assert!(!old.dual_control.required);
        assert!(toml::from_str::<PoolConfig>("format = 1\nbogus = 2").is_err());
    }

    const SEALED: &str = "format = 1\ndata = \"data\"\nstaging = \"staging\"\n\
                          [root_key]\nprovider = \"sealed-file\"\npath = \"k\"\n";

    #[test]
    fn admin_section_defaults_and_overrides() {
        // A pool.toml from before the admin API: the defaults.
        let old: PoolConfig = toml::from_str(SEALED).unwrap();
        assert_eq!(old.admin.listen, "127.0.0.1:10810");
        assert_eq!(
            old.admin.token_path(Path::new("/srv/pool")),
            Path::new("/srv/pool/admin.token")
        );
        // One field given, the other defaulted; an absolute token path stays.
        let c: PoolConfig = toml::from_str(&format!(
            "{SEALED}[admin]\ntoken_file = \"/etc/kt.token\"\n"
        ))
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:10810");
        assert_eq!(
            c.admin.token_path(Path::new("/srv/pool")),
            Path::new("/etc/kt.token")
        );
        let c: PoolConfig =
            toml::from_str(&format!("{SEALED}[admin]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:0");
        let back: PoolConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.admin, c.admin);
        assert!(c.to_toml().contains("[admin]"), "{}", c.to_toml());
        // Typos are refused, not ignored.
        let err = toml::from_str::<PoolConfig>(&format!("{SEALED}[admin]\nlisten_addr = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn pkcs11_root_key_config() {
        let text = r#"
format = 1
data = "data"
staging = "staging"

[root_key]
provider = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keyturn"
"#;
        let c: PoolConfig = toml::from_str(text).unwrap();
        let p = c.root_key.pkcs11().unwrap();
        assert_eq!(p.token_label, "keyturn");
        assert_eq!(p.key_label, "keyturn-root");
        let back: PoolConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.root_key.pkcs11(), Some(p));
        assert!(c.to_toml().contains(r#"provider = "pkcs11""#));
    }
}
