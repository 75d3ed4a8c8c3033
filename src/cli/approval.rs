//! Dual control from the command line: register operators, propose an
//! operation (`approval-request`) and sign it (`approve`). None of these
//! opens the pool or needs its passphrase.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::{now_unix, parse_duration, require_pool_dir, write_secret_file};
use crate::keys::approval::{
    self, ApprovalRequest, Operation, OperatorKey, OperatorRegistry, Target,
};

/// The pool directory alone: operator commands touch only
/// `operators.json`, so they never ask for the passphrase.
#[derive(Args, Debug, Clone)]
pub(super) struct PoolDirArg {
    /// Pool directory.
    #[arg(long, env = "KEYTURN_POOL")]
    pool: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(super) enum OperatorCmd {
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
pub(super) struct ApprovalRequestArgs {
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
pub(super) struct ApproveArgs {
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

/// `keyturn operator add|list`.
pub(super) fn operator(cmd: OperatorCmd) -> Result<()> {
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

/// `keyturn approval-request`.
pub(super) fn approval_request(a: ApprovalRequestArgs) -> Result<()> {
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

/// `keyturn approve`.
pub(super) fn approve(a: ApproveArgs) -> Result<()> {
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
