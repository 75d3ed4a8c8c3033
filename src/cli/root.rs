//! The root key commands: `keys rotate-root` and `keys change-passphrase`,
//! through the running server when one answers for the pool, else with the
//! pool opened here.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::secret::{Secret, passphrase};
use super::{PoolArgs, api, default_profile, require_pool_dir};
use crate::admin::{PassphraseRequest, RootRotateRequest, SecretText};
use crate::config::RootKeyConfig;
use crate::keys::approval;
use crate::keys::passphrase::Passphrase;
use crate::keys::sealed::KdfParams;
use crate::pool::Pool;

/// The new passphrase of `keys rotate-root` and `keys change-passphrase`.
const NEW_PASS_ENV: &str = "KEYTURN_NEW_PASSPHRASE";

/// Approval tokens of the root key commands.
#[derive(Args, Debug, Clone)]
pub(super) struct RootApprovals {
    /// An approval token for `rotate-root`; once per operator when the pool
    /// requires dual control.
    #[arg(long = "approval", value_name = "FILE")]
    pub(super) approvals: Vec<PathBuf>,
}

/// The new passphrase of a sealed root key file, and its Argon2id cost.
#[derive(Args, Debug, Clone)]
pub(super) struct NewPassphraseArgs {
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
pub(super) fn rotate_root(
    pool: &PoolArgs,
    new: &NewPassphraseArgs,
    new_key_label: Option<String>,
    batch: usize,
    pause_ms: u64,
    approvals: &[PathBuf],
) -> Result<()> {
    use crate::pool::root::{NewRoot, RootRotationPhase};
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
/// server (the fields of [`crate::pool::root::RootRotationReport`]).
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
pub(super) fn change_passphrase(
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
