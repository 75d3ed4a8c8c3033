//! The command line: the edge where errors get their context.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::admin::client::ADDR_FILE;
use crate::admin::http as admin_http;
use crate::admin::metrics::Exporter;
use crate::admin::token::AdminToken;
use crate::admin::{AdminBackend, PassphraseRequest, RootRotateRequest, SecretText};
use crate::audit::AuditEvent;
use crate::config::RootKeyConfig;
use crate::config::{DualControlSection, Profile, ServerSection};
use crate::keys::approval::{
    self, ApprovalRequest, Operation, OperatorKey, OperatorRegistry, Target,
};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{DEFAULT_KEY_LABEL, Pin, Pkcs11Config};
use crate::keys::sealed::KdfParams;
use crate::keys::zone_keys::KeyState;
use crate::nbd;
use crate::pool::{InitOptions, Pool, RootKeyChoice, RootSecret, parse_size};

mod api;
mod audit;
mod backup;
mod catalog;
mod demo;
mod keys;
mod kmip;
mod mac;
mod report;
mod schedule;
mod stream;
mod threat;
mod tls;
mod tokens;

const PASS_ENV: &str = "KEYTURN_PASSPHRASE";
/// Where `keyturn demo` keeps its pool's passphrase, in the pool directory.
const DEMO_PASS_FILE: &str = "demo.passphrase";
/// Where `serve` writes the stream listener's address (removed at a clean stop).
const STREAM_ADDR_FILE: &str = "stream.addr";
/// The new passphrase of `keys rotate-root` and `keys change-passphrase`.
const NEW_PASS_ENV: &str = "KEYTURN_NEW_PASSPHRASE";

/// keyturn: encrypted block devices over NBD, with zero-downtime key rotation.
#[derive(Parser, Debug)]
#[command(name = "keyturn", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "KEYTURN_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a pool: metadata directory, data and staging devices, sealed root key.
    Init(InitArgs),
    /// Manage zones (security domains with their own keys), through the running server if there is one.
    #[command(subcommand)]
    Zone(ZoneCmd),
    /// Manage volumes (one NBD export each), through the running server if there is one.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Serve a pool's volumes over NBD.
    Serve(ServeArgs),
    /// Create (or reuse) a demo pool with one 1 GiB volume and serve it.
    Demo(DemoArgs),
    /// Inspect and rotate keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Key-rotation report of a period: keys, ages and states, rotations,
    /// blocks per key version, overdue keys, approvals, audit chain check.
    Report(report::ReportArgs),
    /// Manage the operators whose approvals dual control counts (no passphrase needed).
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Propose a dual-controlled operation: print a request (fresh nonce and
    /// expiry) as JSON for every approving operator to sign with `approve`.
    ApprovalRequest(ApprovalRequestArgs),
    /// Sign a request file with an operator key, producing an approval token.
    Approve(ApproveArgs),
    /// DEK rotation of a zone, through the running server's admin API.
    #[command(subcommand)]
    Rotate(api::RotateCmd),
    /// Check every content block of a zone (data and staged copies) through
    /// the admin API; lists bad blocks and fails if there are any.
    Scrub(api::ScrubArgs),
    /// A zone's change stream: turn it on, see it, its window keys, the
    /// agents granted windows, shredding (through the server if there is one).
    #[command(subcommand)]
    Stream(stream::StreamCmd),
    /// A zone's rotation policy: cryptoperiods, window, sensitivity (on the running server).
    #[command(subcommand)]
    Policy(schedule::PolicyCmd),
    /// The rotation scheduler: status, pause, resume, the schedule (on the running server).
    #[command(subcommand)]
    Scheduler(schedule::SchedulerCmd),
    /// Named API tokens with a role (viewer, operator, admin): create,
    /// list, revoke (through the running server if there is one).
    #[command(subcommand)]
    Token(tokens::TokenCmd),
    /// Threat levels: raise, clear, show; approve an emergency rotation a
    /// critical level waits on (on the running server).
    #[command(subcommand)]
    Threat(threat::ThreatCmd),
    /// A zone's MAC key (the dedup tags' key): rotate it, see the re-tag
    /// pass (on the running server).
    #[command(subcommand)]
    Mac(mac::MacCmd),
    /// Make an X25519 key for a replication agent: writes the secret, prints
    /// the public key to register with `stream grant`.
    AgentKey(stream::AgentKeyArgs),
    /// Replication agent: follow a source zone's stream into a zone of a
    /// replica pool (opened here), under the replica's own keys.
    Replicate(stream::ReplicateArgs),
    /// Compare a replica zone with its source at one stream record (hashes
    /// only cross); exits 1 when they differ, 2 when not comparable.
    VerifyReplica(stream::VerifyReplicaArgs),
    /// A replica zone's progress.
    #[command(subcommand)]
    Replica(stream::ReplicaCmd),
    /// Per-block provenance: content block, the key protecting it and since
    /// when, the stream record that last wrote it.
    #[command(subcommand)]
    Block(stream::BlockCmd),
    /// Check a pool's metadata: maps, refcounts, slot ownership. Through
    /// the running server if there is one.
    Check {
        #[command(flatten)]
        pool: PoolArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
struct PoolArgs {
    /// Pool directory.
    #[arg(long, env = "KEYTURN_POOL")]
    pool: PathBuf,
    /// File holding the root key passphrase (else $KEYTURN_PASSPHRASE, else a prompt).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// File holding the PKCS#11 token user PIN, for pools whose root key is
    /// in a token (else $KEYTURN_PKCS11_PIN).
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

/// `--root-key` of `keyturn init`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum RootKeyKind {
    /// A root key file sealed with a passphrase (Argon2id).
    #[default]
    SealedFile,
    /// An AES-256 key inside a PKCS#11 token (HSM), unlocked with a PIN.
    Pkcs11,
    /// An AES-256 key inside a KMIP server, reached over mutual TLS.
    Kmip,
}

/// The pool directory alone: operator commands touch only
/// `operators.json`, so they never ask for the passphrase.
#[derive(Args, Debug, Clone)]
struct PoolDirArg {
    /// Pool directory.
    #[arg(long, env = "KEYTURN_POOL")]
    pool: PathBuf,
}

#[derive(Subcommand, Debug)]
enum OperatorCmd {
    /// Generate an operator key pair: register the public key in the pool,
    /// write the private key to a new file (mode 0600).
    Add {
        #[command(flatten)]
        pool: PoolDirArg,
        /// Operator name.
        name: String,
        /// Where to write the private key (must not exist).
        #[arg(long)]
        key_out: PathBuf,
    },
    /// List registered operators.
    List {
        #[command(flatten)]
        pool: PoolDirArg,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ApprovalRequestArgs {
    /// rotate-kek, rotate-root, destroy-key, compromise-key,
    /// emergency-rotation, shred-stream-window or rollback-rotation.
    #[arg(long)]
    operation: String,
    /// Zone the operation acts on.
    #[arg(long)]
    zone: Option<String>,
    /// Key id the operation acts on.
    #[arg(long)]
    key: Option<String>,
    /// How long the request stays valid (e.g. 30m, 1h, 2d; at most 7d).
    #[arg(long, default_value = "1h")]
    expires_in: String,
    /// Also write the request to this file (must not exist).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ApproveArgs {
    #[command(flatten)]
    pool: PoolDirArg,
    /// The operator's private key file (from `operator add`).
    #[arg(long)]
    operator_key: PathBuf,
    /// The request file (from `approval-request`).
    #[arg(long)]
    request: PathBuf,
    /// Where to write the approval token (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Data device: a file (grown as needed) or a raw block device [default: POOL/data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Staging device for rotation windows (fast NVMe) [default: POOL/staging].
    #[arg(long)]
    staging: Option<PathBuf>,
    /// Argon2id memory cost in KiB for sealing the root key.
    #[arg(long, default_value_t = KdfParams::default().memory_kib)]
    kdf_memory_kib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = KdfParams::default().iterations)]
    kdf_iterations: u32,
    /// Default listen address written into pool.toml.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Root key provider.
    #[arg(long, value_enum, default_value_t = RootKeyKind::SealedFile)]
    root_key: RootKeyKind,
    /// PKCS#11 module (shared library), with --root-key pkcs11.
    #[arg(long, required_if_eq("root_key", "pkcs11"))]
    pkcs11_module: Option<PathBuf>,
    /// Label of the PKCS#11 token, with --root-key pkcs11.
    #[arg(long, required_if_eq("root_key", "pkcs11"))]
    token_label: Option<String>,
    #[command(flatten)]
    kmip: kmip::KmipInitArgs,
    /// Label of the root key object on the token (the key's Name in a KMIP server).
    #[arg(long, default_value = DEFAULT_KEY_LABEL)]
    key_label: String,
    /// Use an existing key with --key-label instead of generating one.
    #[arg(long)]
    use_existing_key: bool,
    /// Require approvals from two distinct operators for KEK and root key
    /// rotation, key destruction and compromise ([dual_control] in pool.toml).
    #[arg(long)]
    dual_control: bool,
}

#[derive(Subcommand, Debug)]
enum ZoneCmd {
    /// Create a zone with a fresh key chain.
    Create {
        #[command(flatten)]
        pool: PoolArgs,
        /// Zone name.
        name: String,
        /// Do not share equal blocks between logical blocks of this zone.
        #[arg(long)]
        no_dedup: bool,
    },
    /// Turn dedup on or off for a zone's future writes.
    SetDedup {
        #[command(flatten)]
        pool: PoolArgs,
        /// Zone name.
        name: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// List zones.
    List {
        #[command(flatten)]
        pool: PoolArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume (served at once when a server runs the pool).
    Create {
        #[command(flatten)]
        pool: PoolArgs,
        /// Zone the volume belongs to.
        #[arg(long)]
        zone: String,
        /// Size, e.g. 10G, 512M (binary units; a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Volume name (its NBD export name).
        name: String,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        pool: PoolArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and free its space. Refused while a server serves it,
    /// unless --online.
    Delete {
        #[command(flatten)]
        pool: PoolArgs,
        /// Delete it through the running server, which stops exporting it
        /// (still refused while a client has it open).
        #[arg(long)]
        online: bool,
        /// Volume name.
        name: String,
    },
    /// Usage and dedup of every volume (from the running server, else the pool opened here).
    Stats {
        #[command(flatten)]
        pool: PoolArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Write every wrapped key and the pool's metadata to a file encrypted
    /// under a backup passphrase (never in plaintext). The pool must not be
    /// served; needs approvals of `backup-keys` from distinct operators.
    Backup(backup::BackupArgs),
    /// Restore a backup into a new pool directory (with the data device
    /// copied): a new root key, every volume readable. Needs approvals of
    /// `restore-keys --key BACKUP_ID`.
    Restore(backup::RestoreArgs),
    /// List every key: version, state, age, wrapping KEK, content blocks
    /// per DEK. Through the running server if there is one.
    List {
        #[command(flatten)]
        pool: PoolArgs,
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one key by id (e.g. z1-dek-v2). Through the running server if
    /// there is one.
    Show {
        #[command(flatten)]
        pool: PoolArgs,
        /// Key id.
        key: String,
    },
    /// Rotate a zone's KEK: re-wrap its DEKs and MAC key under KEK v(n+1).
    /// Touches no volume data. Through the running server's admin API when
    /// one answers for the pool, else with the pool opened here.
    RotateKek {
        #[command(flatten)]
        pool: PoolArgs,
        /// Zone.
        #[arg(long)]
        zone: String,
        /// Keys re-wrapped per atomic save (offline rotation only).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Pause between batches, in milliseconds (offline rotation only).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// An approval token (from `approve`); once per operator when the
        /// pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
    /// Rotate the root key: re-wrap every zone's KEKs under a new root key,
    /// then destroy the old one.
    ///
    /// The new root key is a new random key sealed under a new passphrase in
    /// a new file beside the old one, or a new key generated in the same
    /// PKCS#11 token. Once every KEK is re-wrapped, pool.toml is switched to
    /// it and the old one destroyed (the old sealed file is overwritten and
    /// removed; the old token key is destroyed with C_DestroyObject).
    ///
    /// Through the running server's admin API when one answers for the pool
    /// (it keeps serving; a sealed file still needs the current and the new
    /// passphrase, a token no PIN), else with the pool opened here. Both
    /// root keys work until every KEK is re-wrapped: after a crash the pool
    /// still opens with the old passphrase (or the PIN), and running the
    /// command again resumes. Once pool.toml names the new root key, the new
    /// passphrase opens the pool. Touches no volume data, DEK or MAC key.
    ///
    /// To seal the same root key under a new passphrase (no re-wrap, but a
    /// copy of the old file still opens with the old passphrase), use
    /// `keys change-passphrase` instead.
    RotateRoot {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        new: NewPassphraseArgs,
        /// Label of the new root key in the PKCS#11 token (pkcs11 pools): it
        /// is generated there and must not exist yet. Resuming needs no label.
        #[arg(long, value_name = "LABEL")]
        new_key_label: Option<String>,
        /// KEKs re-wrapped per atomic save of a zone key file.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Pause between saves, in milliseconds.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        #[command(flatten)]
        approvals: RootApprovals,
    },
    /// Seal the same root key under a new passphrase (sealed-file pools): no
    /// KEK is re-wrapped.
    ///
    /// Cheap, but a copy of the old sealed file still opens with the old
    /// passphrase; when that matters, use `keys rotate-root`, which replaces
    /// the root key itself. Dual control as for rotate-root. Through the
    /// running server when one answers for the pool, else offline.
    ChangePassphrase {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        new: NewPassphraseArgs,
        #[command(flatten)]
        approvals: RootApprovals,
    },
    /// Destroy a key (crypto-erase: its wrapped bytes are erased). A DEK only
    /// when no content block uses it; never the active DEK or MAC key.
    Destroy {
        #[command(flatten)]
        pool: PoolArgs,
        /// Key id.
        key: String,
        /// An approval token; once per operator when the pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
    /// Mark a key compromised: never used to encrypt again, kept for
    /// decryption until no block references it.
    Compromise {
        #[command(flatten)]
        pool: PoolArgs,
        /// Key id.
        key: String,
        /// An approval token; once per operator when the pool requires dual control.
        #[arg(long = "approval", value_name = "FILE")]
        approvals: Vec<PathBuf>,
    },
}

/// Approval tokens of the root key commands.
#[derive(Args, Debug, Clone)]
struct RootApprovals {
    /// An approval token for `rotate-root`; once per operator when the pool
    /// requires dual control.
    #[arg(long = "approval", value_name = "FILE")]
    approvals: Vec<PathBuf>,
}

/// The new passphrase of a sealed root key file, and its Argon2id cost.
#[derive(Args, Debug, Clone)]
struct NewPassphraseArgs {
    /// File holding the new passphrase (else $KEYTURN_NEW_PASSPHRASE, else a
    /// prompt, twice). Sealed-file pools.
    #[arg(long, value_name = "FILE")]
    new_passphrase_file: Option<PathBuf>,
    /// Argon2id memory cost in KiB for the new sealed file [default: the
    /// current file's cost].
    #[arg(long)]
    kdf_memory_kib: Option<u32>,
    /// Argon2id passes for the new sealed file [default: the current file's].
    #[arg(long)]
    kdf_iterations: Option<u32>,
}

impl NewPassphraseArgs {
    /// Whether a new passphrase was given without a prompt (file or
    /// environment).
    fn given(&self) -> bool {
        self.new_passphrase_file.is_some() || std::env::var_os(NEW_PASS_ENV).is_some()
    }

    fn passphrase(&self) -> Result<Passphrase> {
        Passphrase::resolve_new(self.new_passphrase_file.as_deref(), NEW_PASS_ENV, true)
            .context("a new passphrase for the root key file is needed")
    }

    /// The KDF cost asked for; `None` keeps the current file's. One flag
    /// alone takes the other from the default cost.
    fn kdf(&self) -> Option<KdfParams> {
        KdfParams::with_cost(self.kdf_memory_kib, self.kdf_iterations)
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// TCP address to listen on [default: from pool.toml, else 127.0.0.1:10809]; port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Hardware profile: a name from hw-profiles/ or a path to a profile file.
    #[arg(long)]
    profile: Option<String>,
    /// Loopback address of the admin API [default: [admin] listen in
    /// pool.toml, 127.0.0.1:10810; a free port when the NBD address has port 0].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Address of the change stream listener for replication agents
    /// [default: [stream] listen in pool.toml; none when empty].
    #[arg(long, value_name = "ADDR")]
    stream_listen: Option<String>,
    /// Publish every streaming zone's records to this NATS JetStream
    /// cluster: nats://HOST:PORT[,HOST:PORT...] [default: [stream.nats] url
    /// in pool.toml; none when empty].
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Serve NBD without TLS on an address beyond loopback (logs a warning).
    #[arg(long)]
    allow_plaintext: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Pool directory; created with a demo pool if empty [default: a fresh temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Loopback address of the admin API [default: as for `serve`].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyturn: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors in the
/// chain already include their cause's text in their own message.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn passphrase(args: &PoolArgs) -> Result<Passphrase> {
    Passphrase::resolve(args.passphrase_file.as_deref(), PASS_ENV, true)
        .map_err(|e| {
            // A demo pool keeps its passphrase beside it: say where.
            let demo = args.pool.join(DEMO_PASS_FILE);
            if matches!(e, crate::keys::KeyError::NoPassphrase { .. }) && demo.is_file() {
                anyhow::anyhow!(
                    "{e}; this demo pool keeps its passphrase in {f}: add --passphrase-file {f}",
                    f = demo.display()
                )
            } else {
                e.into()
            }
        })
        .context("the root key passphrase is needed")
}

fn pin(args: &PoolArgs) -> Result<Pin> {
    Pin::resolve(args.pin_file.as_deref()).context("the PKCS#11 token user PIN is needed")
}

/// The secret a pool's root key needs: a PIN when it is in a PKCS#11 token
/// (no passphrase is asked for), else the passphrase of the sealed file.
enum Secret {
    Passphrase(Passphrase),
    Pin(Pin),
    /// A KMIP root key: nothing to ask for.
    Kms,
}

impl Secret {
    fn for_pool(args: &PoolArgs) -> Result<Self> {
        let dir = &args.pool;
        // Without a pool.toml, let Pool::open say so; ask for a passphrase
        // as before so the message order is unchanged for sealed pools.
        let config = if Pool::exists(dir) {
            Some(
                Pool::root_key_config(dir)
                    .with_context(|| format!("cannot open pool {}", dir.display()))?,
            )
        } else {
            None
        };
        Ok(match config {
            Some(RootKeyConfig::Pkcs11 { .. }) => Secret::Pin(pin(args)?),
            Some(RootKeyConfig::Kmip { .. }) => Secret::Kms,
            _ => Secret::Passphrase(passphrase(args)?),
        })
    }

    fn as_root(&self) -> RootSecret<'_> {
        match self {
            Secret::Passphrase(p) => RootSecret::Passphrase(p),
            Secret::Pin(p) => RootSecret::Pin(p),
            Secret::Kms => RootSecret::Kms,
        }
    }
}

fn open_pool(args: &PoolArgs, profile: &Profile) -> Result<Pool> {
    let secret = Secret::for_pool(args)?;
    Pool::open_with(&args.pool, secret.as_root(), profile)
        .with_context(|| format!("cannot open pool {}", args.pool.display()))
}

fn default_profile() -> Result<Profile> {
    Ok(Profile::load("ci-2core")?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => {
            let (secret, root_key) = match a.root_key {
                RootKeyKind::SealedFile => (
                    Secret::Passphrase(
                        Passphrase::resolve_new(a.pool.passphrase_file.as_deref(), PASS_ENV, true)
                            .context("a passphrase for the new root key is needed")?,
                    ),
                    RootKeyChoice::SealedFile,
                ),
                RootKeyKind::Pkcs11 => {
                    // clap enforces both with --root-key pkcs11.
                    let (Some(module), Some(token_label)) = (a.pkcs11_module, a.token_label) else {
                        bail!("--root-key pkcs11 needs --pkcs11-module and --token-label");
                    };
                    (
                        Secret::Pin(pin(&a.pool)?),
                        RootKeyChoice::Pkcs11 {
                            config: Pkcs11Config {
                                module,
                                token_label,
                                key_label: a.key_label,
                            },
                            use_existing: a.use_existing_key,
                        },
                    )
                }
                RootKeyKind::Kmip => (
                    Secret::Kms,
                    a.kmip.choice(&a.key_label, a.use_existing_key)?,
                ),
            };
            let opts = InitOptions {
                root_key,
                data: a.data,
                staging: a.staging,
                kdf: KdfParams {
                    memory_kib: a.kdf_memory_kib,
                    iterations: a.kdf_iterations,
                    ..KdfParams::default()
                },
                server: ServerSection {
                    listen: a.listen,
                    ..ServerSection::default()
                },
                dual_control: DualControlSection {
                    required: a.dual_control,
                    ..DualControlSection::default()
                },
            };
            Pool::init_with(&a.pool.pool, &opts, secret.as_root())
                .with_context(|| format!("cannot create pool {}", a.pool.pool.display()))?;
            let token = new_admin_token(&a.pool.pool)?;
            println!("created pool {}", a.pool.pool.display());
            println!("admin API token in {}", token.display());
            Ok(())
        }
        Command::Zone(ZoneCmd::Create {
            pool,
            name,
            no_dedup,
        }) => catalog::zone_create(&pool, &name, no_dedup)
            .with_context(|| format!("cannot create zone {name:?}")),
        Command::Zone(ZoneCmd::SetDedup { pool, name, state }) => {
            catalog::zone_set_dedup(&pool, &name, state == "on")
                .with_context(|| format!("cannot change dedup of zone {name:?}"))
        }
        Command::Zone(ZoneCmd::List { pool, json }) => catalog::zone_list(&pool, json),
        Command::Volume(VolumeCmd::Create {
            pool,
            zone,
            size,
            name,
        }) => catalog::volume_create(&pool, &name, &zone, parse_size(&size)?)
            .with_context(|| format!("cannot create volume {name:?}")),
        Command::Volume(VolumeCmd::List { pool, json }) => catalog::volume_list(&pool, json),
        Command::Volume(VolumeCmd::Delete { pool, online, name }) => {
            catalog::volume_delete(&pool, &name, online)
                .with_context(|| format!("cannot delete volume {name:?}"))
        }
        Command::Serve(a) => {
            let secret = Secret::for_pool(&a.pool)?;
            let listen = Listen {
                nbd: a.listen,
                unix: a.unix,
                admin: a.admin_listen,
                stream: a.stream_listen,
                nats: a.nats,
                allow_plaintext: a.allow_plaintext,
            };
            serve(&a.pool.pool, &secret, listen, a.profile, None)
        }
        Command::Volume(VolumeCmd::Stats { pool, json }) => api::volume_stats(&pool, json),
        Command::Rotate(cmd) => api::rotate(cmd),
        Command::Stream(cmd) => stream::stream(cmd),
        Command::Policy(cmd) => schedule::policy(cmd),
        Command::Scheduler(cmd) => schedule::scheduler(cmd),
        Command::Token(cmd) => tokens::token(cmd),
        Command::Threat(cmd) => threat::threat(cmd),
        Command::Mac(cmd) => mac::run(cmd),
        Command::AgentKey(a) => stream::agent_key(a),
        Command::Replicate(a) => stream::replicate(a),
        Command::VerifyReplica(a) => match stream::verify_replica(a)? {
            0 => Ok(()),
            code => {
                let _ = std::io::stdout().flush();
                std::process::exit(i32::from(code))
            }
        },
        Command::Replica(cmd) => stream::replica(cmd),
        Command::Block(cmd) => stream::block(cmd),
        Command::Scrub(a) => api::scrub(a),
        Command::Demo(a) => demo(a),
        Command::Keys(cmd) => keys(cmd),
        Command::Audit(cmd) => audit::audit(cmd),
        Command::Report(a) => report::report(a),
        Command::Operator(cmd) => operator(cmd),
        Command::ApprovalRequest(a) => approval_request(a),
        Command::Approve(a) => approve(a),
        Command::Check { pool, json } => keys::check(&pool, json),
    }
}

fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Backup(a) => backup::backup(a),
        KeysCmd::Restore(a) => backup::restore(a),
        KeysCmd::List { pool, zone, json } => keys::list(&pool, zone.as_deref(), json),
        KeysCmd::Show { pool, key } => keys::show(&pool, &key),
        KeysCmd::RotateRoot {
            pool,
            new,
            new_key_label,
            batch,
            pause_ms,
            approvals,
        } => rotate_root(
            &pool,
            &new,
            new_key_label,
            batch,
            pause_ms,
            &approvals.approvals,
        ),
        KeysCmd::ChangePassphrase {
            pool,
            new,
            approvals,
        } => change_passphrase(&pool, &new, &approvals.approvals),
        KeysCmd::Destroy {
            pool,
            key,
            approvals,
        } => set_key_state(&pool, &key, KeyState::Destroyed, &approvals),
        KeysCmd::Compromise {
            pool,
            key,
            approvals,
        } => set_key_state(&pool, &key, KeyState::Compromised, &approvals),
        KeysCmd::RotateKek {
            pool,
            zone,
            batch,
            pause_ms,
            approvals,
        } => {
            if let Some(report) = api::rotate_kek_online(&pool.pool, &zone, &approvals)? {
                print_kek_report(&report);
                return Ok(());
            }
            let p = open_pool(&pool, &default_profile()?)?;
            let pause = std::time::Duration::from_millis(pause_ms);
            let policy = p.config().dual_control.clone();
            let report = if policy.required || !approvals.is_empty() {
                // Checked after the pool opened (so a wrong passphrase does
                // not spend the approvals) and before any key changes.
                if !p.catalog().zones.iter().any(|z| z.name == zone) {
                    bail!("no zone named {zone:?}");
                }
                let target = Target::new(Operation::RotateKek, Some(&zone), None);
                let auth =
                    match approval::authorize(&pool.pool, &policy, &target, &approvals, now_unix())
                    {
                        Ok(a) => a,
                        Err(e) => {
                            // Every refused attempt is on the record, as on the API path.
                            let _ = p.record(AuditEvent::refused("kek.rotate", &e).zone(&zone));
                            return Err(anyhow::Error::new(e)
                                .context(format!("KEK rotation of zone {zone:?} refused")));
                        }
                    };
                println!("approved by {}", auth.approvers().join(", "));
                p.rotate_kek_approved(&zone, batch, pause, auth)
            } else {
                p.rotate_kek(&zone, batch, pause)
            }
            .with_context(|| format!("KEK rotation of zone {zone:?} failed"))?;
            print_kek_report(&serde_json::to_value(&report)?);
            Ok(())
        }
    }
}

/// Prints a KEK rotation report, from this process or from the server:
/// one line when it has the fields of [`crate::pool::KekRotationReport`],
/// else the JSON as it came.
fn print_kek_report(report: &serde_json::Value) {
    #[derive(serde::Deserialize)]
    struct Line {
        zone: String,
        new_version: u32,
        rewrapped: usize,
        destroyed: Vec<String>,
        resumed: bool,
        elapsed: std::time::Duration,
    }
    match serde_json::from_value::<Line>(report.clone()) {
        Ok(r) => println!(
            "zone {}: KEK v{} active, {} keys re-wrapped{}, destroyed {:?}, {:.3} s",
            r.zone,
            r.new_version,
            r.rewrapped,
            if r.resumed { " (resumed)" } else { "" },
            r.destroyed,
            r.elapsed.as_secs_f64()
        ),
        Err(_) => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_else(|_| report.to_string())
        ),
    }
}

/// Dual control for the root key commands: checked after the pool opened
/// (a wrong passphrase spends no approval) and before anything changes.
fn authorize_root(
    p: &Pool,
    approvals: &[PathBuf],
    action: &'static str,
    what: &str,
) -> Result<Option<approval::Authorized>> {
    let auth = p
        .authorize_root(action, approvals)
        .with_context(|| format!("{what} refused"))?;
    if let Some(a) = &auth {
        println!("approved by {}", a.approvers().join(", "));
    }
    Ok(auth)
}

/// `keys rotate-root`: through the running server when one answers for
/// the pool, else with the pool opened here.
fn rotate_root(
    pool: &PoolArgs,
    new: &NewPassphraseArgs,
    new_key_label: Option<String>,
    batch: usize,
    pause_ms: u64,
    approvals: &[PathBuf],
) -> Result<()> {
    use crate::pool_root::{NewRoot, RootRotationPhase};
    require_pool_dir(&pool.pool)?;
    let pending = Pool::root_rotation(&pool.pool).with_context(|| {
        format!(
            "cannot read the root key rotation of {}",
            pool.pool.display()
        )
    })?;
    let retiring = matches!(pending, Some((_, RootRotationPhase::Retire)));
    let sealed = matches!(
        Pool::root_key_config(&pool.pool)?,
        RootKeyConfig::SealedFile { .. }
    );
    if sealed && new_key_label.is_some() {
        bail!(
            "--new-key-label is for pools whose root key is in a PKCS#11 token; this pool's is a sealed file"
        );
    }
    if !sealed && (new.given() || new.kdf().is_some()) {
        bail!(
            "a new passphrase is for pools whose root key is a sealed file; this pool's is in a PKCS#11 token (use --new-key-label)"
        );
    }
    if let Some((state, phase)) = &pending {
        println!(
            "resuming the root key rotation from {} to {} ({})",
            state.old_id(),
            state.new_id(),
            match phase {
                RootRotationPhase::Rewrap => "re-wrapping KEKs",
                RootRotationPhase::Retire => "pool.toml already names the new root key",
            }
        );
    }
    // Once pool.toml names the new root key, the new passphrase opens the
    // pool: running the same command again finishes the rotation.
    let current_passphrase = || -> Result<Passphrase> {
        if retiring && new.given() {
            new.passphrase()
        } else {
            passphrase(pool)
        }
    };
    if let Some(client) = api::server_for(&pool.pool)? {
        // A sealed file needs the same passphrases as offline; a token
        // needs no PIN (the server is logged in to it).
        let (current, new_pass) = if sealed {
            let current = current_passphrase()?;
            let new_pass = if retiring {
                None
            } else {
                Some(new.passphrase()?)
            };
            (Some(current), new_pass)
        } else {
            (None, None)
        };
        let kdf = new.kdf();
        let req = RootRotateRequest {
            approvals: api::read_approvals(approvals)?,
            passphrase: current.map(|p| SecretText::new(p.expose().to_owned())),
            new_passphrase: new_pass.map(|p| SecretText::new(p.expose().to_owned())),
            new_key_label,
            batch: Some(batch),
            pause_ms: Some(pause_ms),
            kdf_memory_kib: kdf.map(|k| k.memory_kib),
            kdf_iterations: kdf.map(|k| k.iterations),
        };
        println!(
            "rotating the root key through the server at {} (it keeps serving)",
            client.addr()
        );
        let report = client
            .root_rotate(&req)
            .context("root key rotation failed")?;
        print_root_report(&report, sealed);
        return Ok(());
    }
    let secret = if sealed {
        Secret::Passphrase(current_passphrase()?)
    } else {
        Secret::for_pool(pool)?
    };
    let p = Pool::open_with(&pool.pool, secret.as_root(), &default_profile()?).with_context(
        || {
            let hint = if retiring {
                " (a root key rotation has switched it to the new root key: give the new passphrase)"
            } else {
                ""
            };
            format!("cannot open pool {}{hint}", pool.pool.display())
        },
    )?;
    let new_pass = if sealed && !retiring {
        Some(new.passphrase()?)
    } else {
        None
    };
    let new_root = if sealed {
        NewRoot::SealedFile {
            passphrase: new_pass.as_ref(),
            kdf: new.kdf(),
        }
    } else {
        NewRoot::Pkcs11 {
            key_label: new_key_label,
        }
    };
    let auth = authorize_root(&p, approvals, "root.rotate", "root key rotation")?;
    let report = p
        .rotate_root(
            secret.as_root(),
            new_root,
            batch,
            std::time::Duration::from_millis(pause_ms),
            auth,
        )
        .context("root key rotation failed")?;
    print_root_report(&serde_json::to_value(&report)?, sealed);
    Ok(())
}

/// Prints a root key rotation report, from this process or from the
/// server (the fields of [`crate::pool_root::RootRotationReport`]).
fn print_root_report(report: &serde_json::Value, sealed: bool) {
    #[derive(serde::Deserialize)]
    struct Line {
        old_root: String,
        new_root: String,
        zones: usize,
        rewrapped: usize,
        checked: usize,
        old_destroyed: bool,
        resumed: bool,
        elapsed: std::time::Duration,
    }
    match serde_json::from_value::<Line>(report.clone()) {
        Ok(r) => println!(
            "root key rotated: {} -> {}; {} KEKs re-wrapped{}, {} KEKs of {} zones unwrap under the new root key; old root key {}; {:.3} s",
            r.old_root,
            r.new_root,
            r.rewrapped,
            if r.resumed { " (resumed)" } else { "" },
            r.checked,
            r.zones,
            if r.old_destroyed {
                "destroyed"
            } else {
                "was already gone"
            },
            r.elapsed.as_secs_f64()
        ),
        Err(_) => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_else(|_| report.to_string())
        ),
    }
    if sealed {
        println!("the pool now opens with the new passphrase");
    }
}

/// `keys change-passphrase`: through the running server when one answers
/// for the pool, else with the pool opened here.
fn change_passphrase(
    pool: &PoolArgs,
    new: &NewPassphraseArgs,
    approvals: &[PathBuf],
) -> Result<()> {
    require_pool_dir(&pool.pool)?;
    if !matches!(
        Pool::root_key_config(&pool.pool)?,
        RootKeyConfig::SealedFile { .. }
    ) {
        bail!(
            "this pool's root key is in a PKCS#11 token: it has no passphrase (its PIN is the token's)"
        );
    }
    if let Some(client) = api::server_for(&pool.pool)? {
        let old = passphrase(pool)?;
        let new_pass = new.passphrase()?;
        let kdf = new.kdf();
        let req = PassphraseRequest {
            approvals: api::read_approvals(approvals)?,
            passphrase: Some(SecretText::new(old.expose().to_owned())),
            new_passphrase: Some(SecretText::new(new_pass.expose().to_owned())),
            kdf_memory_kib: kdf.map(|k| k.memory_kib),
            kdf_iterations: kdf.map(|k| k.iterations),
        };
        client
            .root_passphrase(&req)
            .context("cannot change the passphrase")?;
        println!(
            "the root key is sealed under the new passphrase (through the server at {}); the old one no longer opens the pool",
            client.addr()
        );
        return Ok(());
    }
    let old = passphrase(pool)?;
    let p = Pool::open(&pool.pool, &old, &default_profile()?)
        .with_context(|| format!("cannot open pool {}", pool.pool.display()))?;
    let new_pass = new.passphrase()?;
    let auth = authorize_root(&p, approvals, "root.reseal", "passphrase change")?;
    p.change_passphrase(&old, &new_pass, new.kdf(), auth)
        .context("cannot change the passphrase")?;
    println!(
        "the root key is sealed under the new passphrase; the old one no longer opens the pool"
    );
    Ok(())
}

/// `keys destroy` and `keys compromise`: approvals are checked after the
/// pool opened (a wrong passphrase spends none) and before anything changes.
fn set_key_state(pool: &PoolArgs, key: &str, state: KeyState, approvals: &[PathBuf]) -> Result<()> {
    let p = open_pool(pool, &default_profile()?)?;
    let verb = if state == KeyState::Destroyed {
        "destroy"
    } else {
        "compromise"
    };
    let policy = p.config().dual_control.clone();
    let auth = if policy.required || !approvals.is_empty() {
        let (zone, _) = p.key_file_of(key)?;
        let operation = if state == KeyState::Destroyed {
            Operation::DestroyKey
        } else {
            Operation::CompromiseKey
        };
        let target = Target::new(operation, Some(&zone), Some(key));
        let auth = approval::authorize(&pool.pool, &policy, &target, approvals, now_unix())
            .with_context(|| format!("{verb} of key {key:?} refused"))?;
        println!("approved by {}", auth.approvers().join(", "));
        Some(auth)
    } else {
        None
    };
    let zone = p
        .set_key_state(key, state, auth)
        .with_context(|| format!("cannot {verb} key {key:?}"))?;
    println!("key {key} of zone {zone} is now {}", state.name());
    Ok(())
}

/// `keyturn audit verify`: never opens the pool (no key, no lock), so it
/// also runs while the pool is served.
fn audit_verify(pool: &Path, json: bool) -> Result<()> {
    use crate::audit::{self, AuditError};
    let log = pool.join(audit::LOG_FILE);
    match audit::verify(pool) {
        Ok(report) => {
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["ok"] = true.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "audit log {}: {} records, chain intact, ends at event {} (hash {})",
                    log.display(),
                    report.records,
                    report.last_id,
                    report.last_hash
                );
                if report.unanchored > 0 {
                    println!(
                        "note: the last record is not yet in audit.head (an append was interrupted); the next open of the pool moves the anchor"
                    );
                }
            }
            Ok(())
        }
        Err(AuditError::Broken {
            path,
            line,
            id,
            why,
        }) => {
            // Show the offending line, escaped and cut short: it may hold
            // anything, including terminal escapes.
            let text = std::fs::read(&path).ok().and_then(|data| {
                let l = data
                    .split(|&b| b == b'\n')
                    .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
                let l = String::from_utf8_lossy(l);
                let mut shown: String = l.chars().take(400).collect();
                if l.chars().count() > 400 {
                    shown.push('…');
                }
                Some(shown)
            });
            if json {
                let v = serde_json::json!({
                    "ok": false, "line": line, "id": id, "kind": why.kind(),
                    "reason": why.to_string(), "record": text,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "first broken record: line {line}, event id {}",
                    id.map_or_else(|| "unknown".into(), |i| i.to_string())
                );
                println!("why: {why}");
                if let Some(t) = &text {
                    println!("record: {t:?}");
                }
            }
            bail!(
                "audit log {} is broken at line {line} (event id {}): {why}",
                path.display(),
                id.map_or_else(|| "unknown".into(), |i| i.to_string())
            )
        }
        Err(e) => {
            if json {
                let v =
                    serde_json::json!({"ok": false, "kind": "unreadable", "reason": e.to_string()});
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Err(e)
                .with_context(|| format!("cannot verify the audit log of pool {}", pool.display()))
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses "90s", "30m", "1h", "2d" (a bare number is seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (use e.g. 30m, 1h, 2d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(mult)))
}

fn require_pool_dir(dir: &Path) -> Result<()> {
    if !Pool::exists(dir) {
        bail!(
            "{} is not a keyturn pool (no pool.toml); create one with `keyturn init`",
            dir.display()
        );
    }
    Ok(())
}

fn operator(cmd: OperatorCmd) -> Result<()> {
    match cmd {
        OperatorCmd::Add {
            pool,
            name,
            key_out,
        } => {
            require_pool_dir(&pool.pool)?;
            let key = OperatorKey::generate(&name);
            let _lock = approval::lock(&pool.pool)?;
            let mut reg = OperatorRegistry::load(&pool.pool)?;
            reg.add(&name, &key.public(), now_unix())?;
            // Key file before registry: if registering then fails, the key
            // file is removed; a registered key nobody holds never exists.
            key.save(&key_out)?;
            if let Err(e) = reg.save(&pool.pool) {
                let _ = std::fs::remove_file(&key_out);
                return Err(e.into());
            }
            tracing::info!(operator = %key.id(), name, "operator registered");
            println!(
                "added operator {name} (id {}); private key in {}",
                key.id(),
                key_out.display()
            );
            Ok(())
        }
        OperatorCmd::List { pool, json } => {
            require_pool_dir(&pool.pool)?;
            let reg = OperatorRegistry::load(&pool.pool)?;
            if json {
                println!("{}", serde_json::to_string_pretty(reg.operators())?);
            } else {
                println!("{:<20} {:<24} {:>12}", "ID", "NAME", "ADDED");
                for o in reg.operators() {
                    println!("{:<20} {:<24} {:>12}", o.id, o.name, o.added_unix);
                }
            }
            Ok(())
        }
    }
}

fn approval_request(a: ApprovalRequestArgs) -> Result<()> {
    let operation: Operation = a.operation.parse()?;
    let lifetime = parse_duration(&a.expires_in)?;
    let target = Target::new(operation, a.zone.as_deref(), a.key.as_deref());
    let req = ApprovalRequest::new(target, now_unix(), lifetime)?;
    let json = serde_json::to_string_pretty(&req)?;
    if let Some(out) = &a.out {
        write_secret_file(out, &json)?;
    }
    println!("{json}");
    Ok(())
}

fn approve(a: ApproveArgs) -> Result<()> {
    require_pool_dir(&a.pool.pool)?;
    let key = OperatorKey::load(&a.operator_key)?;
    let reg = OperatorRegistry::load(&a.pool.pool)?;
    if reg.get(&key.id()).is_none() {
        bail!(
            "operator key {} (id {}) is not registered in pool {}",
            a.operator_key.display(),
            key.id(),
            a.pool.pool.display()
        );
    }
    let req = ApprovalRequest::load(&a.request)?;
    if now_unix() >= req.expires_unix {
        bail!(
            "the request (nonce {}) expired at {}; ask for a new one",
            req.nonce,
            req.expires_unix
        );
    }
    let token = key.approve(&req);
    token.save(&a.out)?;
    tracing::info!(operator = %token.operator, operation = %req.operation, nonce = %req.nonce, "approval signed");
    println!(
        "operator {} approved {} (nonce {}, expires {}); token in {}",
        token.operator,
        req.target(),
        req.nonce,
        req.expires_unix,
        a.out.display()
    );
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => {
            let d = std::env::temp_dir().join(format!("keyturn-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
    };
    let pass_file = dir.join(DEMO_PASS_FILE);
    if !Pool::exists(&dir) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let pass = {
            use rand::RngCore;
            let mut b = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut b);
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        };
        write_secret_file(&pass_file, &pass)?;
        let pass = Passphrase::new(pass)?;
        let opts = InitOptions {
            data: None,
            staging: None,
            kdf: KdfParams::default(),
            root_key: RootKeyChoice::SealedFile,
            server: ServerSection {
                listen: a.listen.clone(),
                ..ServerSection::default()
            },
            dual_control: DualControlSection::default(),
        };
        Pool::init(&dir, &opts, &pass)
            .with_context(|| format!("cannot create demo pool in {}", dir.display()))?;
        new_admin_token(&dir)?;
        let pool = Pool::open(&dir, &pass, &default_profile()?)?;
        pool.create_zone("demo")?;
        pool.create_volume("vol0", "demo", 1 << 30)?;
        eprintln!(
            "keyturn demo: created a pool in {} with zone 'demo' and a 1 GiB volume 'vol0'",
            dir.display()
        );
    } else {
        eprintln!(
            "keyturn demo: serving the pool already in {}",
            dir.display()
        );
    }
    let pass = Passphrase::resolve(Some(&pass_file), PASS_ENV, false)
        .with_context(|| format!("the demo keeps its passphrase in {}", pass_file.display()))?;
    let listen = Listen {
        nbd: Some(a.listen),
        unix: a.unix,
        admin: a.admin_listen,
        stream: None,
        nats: None,
        allow_plaintext: false,
    };
    serve(&dir, &Secret::Passphrase(pass), listen, None, Some(()))
}

fn write_secret_file(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Writes a fresh admin API token into the new pool in `dir`; returns its path.
fn new_admin_token(dir: &Path) -> Result<PathBuf> {
    let config = crate::config::PoolConfig::load(&dir.join("pool.toml"))?;
    let path = config.admin.token_path(dir);
    AdminToken::create(&path)
        .with_context(|| format!("cannot write the admin API token {}", path.display()))?;
    Ok(path)
}

/// Where `serve` listens; `None` takes pool.toml's setting.
struct Listen {
    nbd: Option<String>,
    unix: Option<PathBuf>,
    admin: Option<String>,
    stream: Option<String>,
    nats: Option<String>,
    allow_plaintext: bool,
}

/// The admin API address: `--admin-listen`, else pool.toml's; with port 0
/// when the NBD address has port 0 (a free port for each), so that servers
/// started that way never collide on the admin port.
fn admin_listen(
    given: Option<String>,
    nbd: &str,
    config: &crate::config::AdminSection,
) -> Result<String> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let nbd_port_0 = nbd
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse() == Ok(0u16));
    if !nbd_port_0 {
        return Ok(config.listen.clone());
    }
    let mut addr = admin_http::loopback_addr(&config.listen)
        .with_context(|| format!("[admin] listen in pool.toml is {:?}", config.listen))?;
    addr.set_port(0);
    Ok(addr.to_string())
}

/// Installs the test clock named by `KEYTURN_TEST_CLOCK`, only on a pool
/// whose pool.toml allows it (a test facility: see [`crate::clock`]).
fn install_test_clock(config: &crate::config::PoolConfig) -> Result<()> {
    let Some(path) = std::env::var_os(crate::clock::TEST_CLOCK_ENV) else {
        return Ok(());
    };
    if !config.test.allow_test_clock {
        bail!(
            "{} is set, but the test clock is a test facility: this pool's pool.toml does not have \
             `[test] allow_test_clock = true`; unset {} to serve with the system clock",
            crate::clock::TEST_CLOCK_ENV,
            crate::clock::TEST_CLOCK_ENV
        );
    }
    let clock = crate::clock::Clock::file(Path::new(&path))?;
    let now = clock.unix_now();
    crate::clock::install(clock)?;
    tracing::warn!(
        file = %Path::new(&path).display(),
        now,
        "TEST CLOCK ON: calendar time (key ages, rotation timers, the scheduler) comes from a file; never use this in production"
    );
    Ok(())
}

fn serve(
    dir: &Path,
    secret: &Secret,
    listen: Listen,
    profile: Option<String>,
    demo: Option<()>,
) -> Result<()> {
    if !Pool::exists(dir) {
        bail!(
            "{} is not a keyturn pool (no pool.toml); create one with `keyturn init` or `keyturn demo`",
            dir.display()
        );
    }
    let config = crate::config::PoolConfig::load(&dir.join("pool.toml"))?;
    let profile = Profile::load(profile.as_deref().unwrap_or(&config.server.profile))?;
    install_test_clock(&config)?;
    let unix = listen.unix.or(config.server.unix.clone());
    let listen_admin = admin_listen(
        listen.admin,
        listen.nbd.as_deref().unwrap_or(&config.server.listen),
        &config.admin,
    )?;
    let stream_listen = listen
        .stream
        .clone()
        .unwrap_or_else(|| config.stream.listen.clone());
    let mut nats = config.stream.nats.clone();
    if let Some(url) = listen.nats.clone() {
        nats.url = url;
    }
    nats.url = nats
        .url
        .split(',')
        .map(|a| a.trim().trim_start_matches("nats://"))
        .collect::<Vec<_>>()
        .join(",");
    nats.validate().map_err(anyhow::Error::msg)?;
    let allow_plaintext = listen.allow_plaintext;
    let listen = listen.nbd.unwrap_or(config.server.listen.clone());
    let secured = tls::setup(dir, &config, &listen, allow_plaintext)?;
    // Refused before anything is opened: the admin API is loopback only,
    // unless it can be served over HTTPS.
    let admin_tls = secured.admin_tls(&listen_admin);
    if admin_tls.is_none() {
        admin_http::loopback_addr(&listen_admin)?;
    }
    let token_path = config.admin.token_path(dir);
    let token = AdminToken::load_or_create(&token_path).with_context(|| {
        format!(
            "cannot read or create the admin API token {}",
            token_path.display()
        )
    })?;
    let tokens = crate::admin::tokens::TokenStore::load(dir, Some(token))
        .context("cannot read the pool's API tokens")?;
    let exporter = Exporter::install()?;
    let addr_file = dir.join(ADDR_FILE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(profile.server.worker_threads.max(1))
        .thread_name("keyturn-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let pool = Arc::new(
        Pool::open_with(dir, secret.as_root(), &profile)
            .with_context(|| format!("cannot open pool {}", dir.display()))?,
    );
    // Serving is not refused when the audit log cannot take records: the
    // pool already logged that loudly, and data availability comes first.
    let started = std::time::Instant::now();
    pool.start_background();
    // Serving goes on without the scheduler if its files are unreadable:
    // data availability comes first, and the log says why.
    let scheduler = match crate::schedule::Scheduler::start(&pool) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "ALERT: the rotation scheduler cannot start; no rotation will start by itself");
            None
        }
    };
    let reporter = crate::report::scheduled::Reporter::start(&pool).unwrap_or_else(|e| {
        tracing::error!(error = %e, "ALERT: scheduled reports cannot start; none will be written");
        None
    });
    if let Err(e) = pool.record(AuditEvent::ok("serve.start")) {
        tracing::warn!(error = %e, "serve.start not recorded");
    }
    let mut stream_task: Option<tokio::task::JoinHandle<()>> = None;
    secured.attach(&pool);
    let result = runtime.block_on(async {
        let reload = secured.spawn_reload()?;
        let server_config = nbd::server::ServerConfig {
            max_in_flight: profile.server.max_inflight_per_conn,
            handshake_timeout: std::time::Duration::from_secs(
                config.server.handshake_timeout_secs.max(1),
            ),
            ..nbd::server::ServerConfig::default()
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // The admin port first: if it is taken, no NBD client was ever accepted.
        let admin_listener = admin_http::bind(&listen_admin, admin_tls.is_some()).await?;
        let admin_addr = admin_listener.local_addr()?;
        let tcp = nbd::server::bind(&listen).await?;
        crate::pool::write_atomic(&addr_file, format!("{admin_addr}\n").as_bytes())?;
        let addr = tcp.local_addr().to_string();
        let export = pool
            .catalog()
            .volumes
            .first()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        tasks.push(tokio::spawn(nbd::server::serve_secured(
            tcp,
            pool.clone(),
            server_config.clone(),
            secured.nbd.clone(),
            rx.clone(),
        )));
        let mut unix_uri = None;
        if let Some(path) = &unix {
            let _ = std::fs::remove_file(path);
            let l = nbd::server::bind(&format!("unix:{}", path.display())).await?;
            unix_uri = Some(format!("nbd+unix:///{export}?socket={}", path.display()));
            // A local socket: no TLS, but the same access rules.
            let local = nbd::Security {
                mode: crate::tls::TlsMode::Off,
                tls: None,
                gate: secured.nbd.gate.clone(),
            };
            tasks.push(tokio::spawn(nbd::server::serve_secured(
                l,
                pool.clone(),
                server_config.clone(),
                local,
                rx.clone(),
            )));
        }
        let mut stream_line = None;
        if !stream_listen.is_empty() {
            let l = tokio::net::TcpListener::bind(&stream_listen)
                .await
                .with_context(|| format!("cannot listen for stream agents on {stream_listen}"))?;
            let a = l.local_addr()?;
            crate::pool::write_atomic(&dir.join(STREAM_ADDR_FILE), format!("{a}\n").as_bytes())?;
            let stream_tls = secured.stream_tls(&stream_listen);
            let scheme = if stream_tls.is_some() {
                "keyturns"
            } else {
                "keyturn"
            };
            stream_line = Some(format!("stream: {scheme}://{a}"));
            let source: Arc<dyn crate::stream::serve::StreamSource> =
                Arc::new(crate::pool::PoolStreams(pool.clone()));
            stream_task = Some(tokio::spawn(crate::stream::serve::run_secured(
                l, source, stream_tls,
            )));
        }
        let nats_task = (!nats.url.is_empty()).then(|| {
            let source: Arc<dyn crate::stream::serve::StreamSource> =
                Arc::new(crate::pool::PoolStreams(pool.clone()));
            tokio::spawn(crate::stream::nats::run(nats.clone(), source))
        });
        let backend: Arc<dyn AdminBackend> = pool.clone();
        let admin = tokio::spawn(admin_http::serve(
            admin_listener,
            backend,
            tokens,
            exporter,
            rx.clone(),
            admin_tls.clone(),
        ));
        let uri = format!("nbd://{addr}/{export}");
        if demo.is_some() {
            // On stdout, before the ready line: what a person (or a script) needs.
            print!("{}", demo::hints(&uri, dir, &demo::shown_exe()));
        }
        // Handlers first: a SIGTERM sent as soon as "ready:" is read must
        // stop the server cleanly, not kill it with the default action.
        let shutdown = ShutdownSignals::install()?;
        let mut out = std::io::stdout().lock();
        let admin_scheme = if admin_tls.is_some() { "https" } else { "http" };
        writeln!(out, "admin: {admin_scheme}://{admin_addr}/")?;
        if let Some(l) = &stream_line {
            writeln!(out, "{l}")?;
        }
        if !nats.url.is_empty() {
            writeln!(out, "stream: nats://{} (prefix {})", nats.url, nats.prefix)?;
        }
        writeln!(out, "ready: nbd://{addr}/")?;
        if let Some(u) = &unix_uri {
            writeln!(out, "ready: {u}")?;
        }
        out.flush()?;
        drop(out);
        tracing::info!(%addr, exports = pool.catalog().volumes.len(), "serving");
        shutdown.wait().await;
        tracing::info!("shutting down: finishing requests in flight");
        reload.abort();
        let _ = tx.send(true);
        if let Some(t) = stream_task.take() {
            t.abort();
        }
        if let Some(t) = nats_task {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        // Bounded: a client stuck in the middle of a request must not hold
        // the shutdown up.
        match tokio::time::timeout(std::time::Duration::from_secs(5), admin).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin API server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "admin API task failed"),
            Err(_) => tracing::warn!("admin API requests still open after 5 s; closing them"),
        }
        anyhow::Ok(())
    });
    if let Some(s) = &scheduler {
        s.stop();
    }
    if let Some(r) = &reporter {
        r.stop();
    }
    pool.stop_background();
    let _ = std::fs::remove_file(dir.join(STREAM_ADDR_FILE));
    if let Err(e) = std::fs::remove_file(&addr_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %addr_file.display(), error = %e, "cannot remove the admin address file");
    }
    let synced = pool.sync().context("final flush failed");
    let event = match (&result, &synced) {
        (Ok(()), Ok(())) => AuditEvent::ok("serve.stop"),
        (Err(e), _) | (_, Err(e)) => AuditEvent::failed("serve.stop", &error_chain(e)),
    };
    if let Err(e) = pool.record(event.duration(started.elapsed())) {
        tracing::warn!(error = %e, "serve.stop not recorded");
    }
    synced?;
    result
}

/// SIGTERM and SIGINT, caught from the moment of `install` on.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Until either signal arrives (or arrived since `install`).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
