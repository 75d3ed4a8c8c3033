//! `keyturn init`: create a pool and its first admin API token.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::secret::{Secret, pin};
use super::{PASS_ENV, PoolArgs, kmip};
use crate::admin::token::AdminToken;
use crate::config::{DualControlSection, ServerSection};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{DEFAULT_KEY_LABEL, Pkcs11Config};
use crate::keys::sealed::KdfParams;
use crate::pool::{InitOptions, Pool, RootKeyChoice};

/// `--root-key` of `keyturn init`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum RootKeyKind {
    /// A root key file sealed with a passphrase (Argon2id).
    #[default]
    SealedFile,
    /// An AES-256 key inside a PKCS#11 token (HSM), unlocked with a PIN.
    Pkcs11,
    /// An AES-256 key inside a KMIP server, reached over mutual TLS.
    Kmip,
}

#[derive(Args, Debug)]
pub(super) struct InitArgs {
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

/// `keyturn init`.
pub(super) fn init(a: InitArgs) -> Result<()> {
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

/// Writes a fresh admin API token into the new pool in `dir`; returns its path.
pub(super) fn new_admin_token(dir: &Path) -> Result<PathBuf> {
    let config = crate::config::PoolConfig::load(&dir.join("pool.toml"))?;
    let path = config.admin.token_path(dir);
    AdminToken::create(&path)
        .with_context(|| format!("cannot write the admin API token {}", path.display()))?;
    Ok(path)
}
