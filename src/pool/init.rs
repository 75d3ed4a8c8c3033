//! `keyturn init`: creating a pool directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{DualControlSection, PoolConfig, RootKeyConfig, ServerSection};
use crate::keys::kmip::{KmipConfig, KmipProvider};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::{Pkcs11Config, Pkcs11Provider};
use crate::keys::root::RootKeyProvider;
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::store::journal::Journal;

use super::{
    Catalog, POOL_FORMAT, Pool, PoolError, Result, RootSecret, io_at, write_atomic, wrong_secret,
};

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

impl Pool {
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
}
