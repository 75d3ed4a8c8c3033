//! `keyturn keys backup` and `keyturn keys restore`: every key of a pool,
//! encrypted under a backup passphrase, and back into a new pool.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::secret::Secret;
use super::{PASS_ENV, PoolArgs};
use crate::keys::backup;
use crate::keys::passphrase::Passphrase;
use crate::keys::sealed::KdfParams;
use crate::pool::Pool;

/// The backup passphrase, when no file is given.
const BACKUP_PASS_ENV: &str = "KEYTURN_BACKUP_PASSPHRASE";

/// Argon2id cost of the backup key (and of the restored root key file).
#[derive(Args, Debug)]
pub(super) struct KdfArgs {
    /// Argon2id memory cost in KiB [default: 65536].
    #[arg(long)]
    kdf_memory_kib: Option<u32>,
    /// Argon2id passes [default: 3].
    #[arg(long)]
    kdf_iterations: Option<u32>,
}

impl KdfArgs {
    fn params(&self) -> KdfParams {
        KdfParams::with_cost(self.kdf_memory_kib, self.kdf_iterations).unwrap_or_default()
    }
}

/// `keys backup`.
#[derive(Args, Debug)]
pub(super) struct BackupArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// The backup file to write (must not exist).
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// File holding the backup passphrase (else $KEYTURN_BACKUP_PASSPHRASE,
    /// else a prompt, twice). Keep it apart from the pool's passphrase.
    #[arg(long, value_name = "FILE")]
    backup_passphrase_file: Option<PathBuf>,
    #[command(flatten)]
    kdf: KdfArgs,
    /// An approval token of `backup-keys` (from `approve`), once per operator.
    #[arg(long = "approval", value_name = "FILE")]
    approvals: Vec<PathBuf>,
}

/// `keys restore`.
#[derive(Args, Debug)]
pub(super) struct RestoreArgs {
    /// The backup file (from `keys backup`).
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// The new pool directory (empty, or holding only a refused attempt).
    #[arg(long, env = "KEYTURN_POOL")]
    pool: PathBuf,
    /// File holding the passphrase of the new pool's root key (else
    /// $KEYTURN_PASSPHRASE, else a prompt, twice).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// File holding the backup passphrase (else $KEYTURN_BACKUP_PASSPHRASE, else a prompt).
    #[arg(long, value_name = "FILE")]
    backup_passphrase_file: Option<PathBuf>,
    /// The data device: a copy of the source pool's.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// A copy of the source's staging device [default: a new empty file];
    /// needed only if staged copies were live when the backup was taken.
    #[arg(long, value_name = "PATH")]
    staging: Option<PathBuf>,
    #[command(flatten)]
    kdf: KdfArgs,
    /// An approval token of `restore-keys` with --key BACKUP_ID, signed by
    /// an operator of the backed-up pool; once per operator.
    #[arg(long = "approval", value_name = "FILE")]
    approvals: Vec<PathBuf>,
}

/// `keys backup`: the pool must not be served (its lock is taken).
pub(super) fn backup(a: BackupArgs) -> Result<()> {
    let secret = Secret::for_pool(&a.pool)?;
    let pass = Passphrase::resolve_new(a.backup_passphrase_file.as_deref(), BACKUP_PASS_ENV, true)
        .context("a backup passphrase is needed")?;
    let r = Pool::backup_keys(
        &a.pool.pool,
        secret.as_root(),
        &a.to,
        &pass,
        a.kdf.params(),
        &a.approvals,
    )
    .with_context(|| format!("cannot back up the keys of pool {}", a.pool.pool.display()))?;
    println!(
        "backup {} written to {}: {} zones, {} keys (wrapped), {} destroyed keys (state only), {} metadata files",
        r.backup_id,
        a.to.display(),
        r.zones,
        r.keys,
        r.destroyed,
        r.files
    );
    println!(
        "to restore: keyturn approval-request --operation restore-keys --key {}",
        r.backup_id
    );
    Ok(())
}

/// `keys restore`.
pub(super) fn restore(a: RestoreArgs) -> Result<()> {
    let (id, _) = backup::peek(&a.from)?;
    let pass = Passphrase::resolve(a.backup_passphrase_file.as_deref(), BACKUP_PASS_ENV, true)
        .context("the backup passphrase is needed")?;
    let new_pass = Passphrase::resolve_new(a.passphrase_file.as_deref(), PASS_ENV, true)
        .context("a passphrase for the new pool's root key is needed")?;
    let r = Pool::restore_keys(
        &a.pool,
        &a.from,
        &pass,
        &new_pass,
        a.kdf.params(),
        &a.data,
        a.staging.as_deref(),
        &a.approvals,
    )
    .with_context(|| {
        format!(
            "cannot restore backup {id} into {} (approvals: keyturn approval-request --operation restore-keys --key {id})",
            a.pool.display()
        )
    })?;
    let token = super::init::new_admin_token(&a.pool)?;
    println!(
        "restored backup {} into {}: {} zones, {} KEKs re-wrapped under a new root key",
        r.backup_id,
        a.pool.display(),
        r.zones,
        r.keks
    );
    println!(
        "the source's audit chain ended at event {} (hash {}) when the backup was taken",
        r.source_audit_head.0, r.source_audit_head.1
    );
    println!("admin API token in {}", token.display());
    Ok(())
}
