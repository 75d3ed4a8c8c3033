//! The secret a command needs to open a pool: the passphrase of a sealed
//! root key file, the PIN of a PKCS#11 token, or nothing for a KMIP root key.

use anyhow::{Context, Result};

use super::{DEMO_PASS_FILE, PASS_ENV, PoolArgs};
use crate::config::{Profile, RootKeyConfig};
use crate::keys::passphrase::Passphrase;
use crate::keys::pkcs11::Pin;
use crate::pool::{Pool, RootSecret};

pub(super) fn passphrase(args: &PoolArgs) -> Result<Passphrase> {
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

pub(super) fn pin(args: &PoolArgs) -> Result<Pin> {
    Pin::resolve(args.pin_file.as_deref()).context("the PKCS#11 token user PIN is needed")
}

/// The secret a pool's root key needs: a PIN when it is in a PKCS#11 token
/// (no passphrase is asked for), else the passphrase of the sealed file.
pub(super) enum Secret {
    Passphrase(Passphrase),
    Pin(Pin),
    /// A KMIP root key: nothing to ask for.
    Kms,
}

impl Secret {
    pub(super) fn for_pool(args: &PoolArgs) -> Result<Self> {
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

    pub(super) fn as_root(&self) -> RootSecret<'_> {
        match self {
            Secret::Passphrase(p) => RootSecret::Passphrase(p),
            Secret::Pin(p) => RootSecret::Pin(p),
            Secret::Kms => RootSecret::Kms,
        }
    }
}

pub(super) fn open_pool(args: &PoolArgs, profile: &Profile) -> Result<Pool> {
    let secret = Secret::for_pool(args)?;
    Pool::open_with(&args.pool, secret.as_root(), profile)
        .with_context(|| format!("cannot open pool {}", args.pool.display()))
}
