//! The command line: the edge where errors get their context.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::Profile;
use crate::keys::zone_keys::KeyState;
use crate::pool::{Pool, parse_size};

mod api;
mod approval;
mod audit;
mod backup;
mod catalog;
mod demo;
mod init;
mod key_changes;
mod keys;
mod kmip;
mod mac;
mod report;
mod root;
mod schedule;
mod secret;
mod serve;
mod stream;
mod threat;
mod tls;
mod tokens;

const PASS_ENV: &str = "KEYTURN_PASSPHRASE";
/// Where `keyturn demo` keeps its pool's passphrase, in the pool directory.
const DEMO_PASS_FILE: &str = "demo.passphrase";

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
    Init(init::InitArgs),
    /// Manage zones (security domains with their own keys), through the running server if there is one.
    #[command(subcommand)]
    Zone(ZoneCmd),
    /// Manage volumes (one NBD export each), through the running server if there is one.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Serve a pool's volumes over NBD.
    Serve(serve::ServeArgs),
    /// Create (or reuse) a demo pool with one 1 GiB volume and serve it.
    Demo(demo::DemoArgs),
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
    Operator(approval::OperatorCmd),
    /// Propose a dual-controlled operation: print a request (fresh nonce and
    /// expiry) as JSON for every approving operator to sign with `approve`.
    ApprovalRequest(approval::ApprovalRequestArgs),
    /// Sign a request file with an operator key, producing an approval token.
    Approve(approval::ApproveArgs),
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
        new: root::NewPassphraseArgs,
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
        approvals: root::RootApprovals,
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
        new: root::NewPassphraseArgs,
        #[command(flatten)]
        approvals: root::RootApprovals,
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

fn default_profile() -> Result<Profile> {
    Ok(Profile::load("ci-2core")?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => init::init(a),
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
        Command::Serve(a) => serve::run(a),
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
        Command::Demo(a) => demo::demo(a),
        Command::Keys(cmd) => keys(cmd),
        Command::Audit(cmd) => audit::audit(cmd),
        Command::Report(a) => report::report(a),
        Command::Operator(cmd) => approval::operator(cmd),
        Command::ApprovalRequest(a) => approval::approval_request(a),
        Command::Approve(a) => approval::approve(a),
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
        } => root::rotate_root(
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
        } => root::change_passphrase(&pool, &new, &approvals.approvals),
        KeysCmd::Destroy {
            pool,
            key,
            approvals,
        } => key_changes::set_key_state(&pool, &key, KeyState::Destroyed, &approvals),
        KeysCmd::Compromise {
            pool,
            key,
            approvals,
        } => key_changes::set_key_state(&pool, &key, KeyState::Compromised, &approvals),
        KeysCmd::RotateKek {
            pool,
            zone,
            batch,
            pause_ms,
            approvals,
        } => key_changes::rotate_kek(&pool, &zone, batch, pause_ms, &approvals),
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
