//! `serve`'s TLS and access-control wiring: certificates and `[[access]]`
//! rules from pool.toml, the audit record of refused NBD clients, the
//! plaintext-beyond-loopback check, and the SIGHUP reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};

use anyhow::{Context, Result, bail};

use crate::audit::AuditEvent;
use crate::config::PoolConfig;
use crate::nbd::Security;
use crate::nbd::access::{AccessRules, Client, RulesGate};
use crate::pool::Pool;
use crate::tls::{ServerTls, TlsMode};

/// What `serve` needs for TLS and access control.
pub(super) struct Secured {
    /// For the NBD TCP listener.
    pub nbd: Security,
    /// The certificates, for the other listeners.
    pub tls: Option<Arc<ServerTls>>,
    gate: Arc<RulesGate>,
    pool_toml: PathBuf,
    stream_always: bool,
    /// Where refusals are audited, once the pool is open.
    audit: Arc<OnceLock<Weak<Pool>>>,
}

/// Loads certificates and rules and checks the listen address:
/// plaintext NBD beyond loopback needs `allow_plaintext` (flag or config).
/// Runs before the pool is opened, so that a bad setting stops `serve`
/// with nothing to undo; [`Secured::attach`] gives it the pool afterwards.
pub(super) fn setup(
    dir: &Path,
    config: &PoolConfig,
    nbd_listen: &str,
    allow_plaintext_flag: bool,
) -> Result<Secured> {
    let files = config
        .tls
        .files(dir)
        .context("[tls] in pool.toml is incomplete")?;
    let tls = match files {
        Some(f) => Some(Arc::new(
            ServerTls::load(f).context("cannot load the TLS certificates named in pool.toml")?,
        )),
        None => None,
    };
    let mode = config.tls.nbd;
    if mode != TlsMode::Off && tls.is_none() {
        bail!("[tls] nbd = {mode:?} needs cert and key in pool.toml");
    }
    if !crate::tls::is_local_listen(nbd_listen) && mode != TlsMode::Required {
        if !(allow_plaintext_flag || config.tls.allow_plaintext) {
            bail!(
                "NBD would listen on {nbd_listen}, beyond loopback, without TLS required: set [tls] nbd = \"required\" with a certificate, or pass --allow-plaintext"
            );
        }
        tracing::warn!(
            addr = nbd_listen,
            ?mode,
            "NBD listens beyond loopback and accepts plaintext clients: anyone on the network can read what they send and receive"
        );
    }
    let rules = AccessRules::new(&config.access).context("[[access]] in pool.toml")?;
    let audit: Arc<OnceLock<Weak<Pool>>> = Arc::default();
    let audit_pool = audit.clone();
    let gate = Arc::new(RulesGate::new(
        rules,
        Box::new(move |client: &Client, refused: &[String]| {
            if let Some(pool) = audit_pool.get() {
                record_refusal(pool, client, refused)
            }
        }),
    ));
    let nbd = Security {
        mode,
        tls: tls.clone(),
        gate: Some(gate.clone()),
    };
    Ok(Secured {
        nbd,
        tls,
        gate,
        pool_toml: dir.join("pool.toml"),
        stream_always: config.tls.stream,
        audit,
    })
}

/// One audit record for a refused client: who, from where, what.
fn record_refusal(pool: &Weak<Pool>, client: &Client, refused: &[String]) {
    let Some(pool) = pool.upgrade() else { return };
    let from = client
        .addr
        .map_or_else(|| "unix socket".to_owned(), |a| a.to_string());
    let reason = format!("refused {}", refused.join(", "));
    tracing::warn!(client = client.identity(), %from, %reason, "NBD client refused");
    let mut event = AuditEvent::refused("nbd.access", &reason)
        .actor(format!("{}@{from}", client.identity()))
        .count(refused.len() as u64);
    // The first export name, when the refusal was about one.
    if let Some(first) = refused.iter().find(|r| !r.starts_with("TLS handshake")) {
        event = event.volume(first.clone());
    }
    if let Err(e) = pool.record(event) {
        tracing::warn!(error = %e, "NBD refusal not recorded in the audit log");
    }
}

impl Secured {
    /// The certificates for the admin API on `listen`: HTTPS whenever it
    /// listens beyond loopback and certificates are configured.
    pub(super) fn admin_tls(&self, listen: &str) -> Option<Arc<ServerTls>> {
        self.tls
            .clone()
            .filter(|_| !crate::tls::is_local_listen(listen))
    }

    /// Refused clients are audited in `pool` from now on.
    pub(super) fn attach(&self, pool: &Arc<Pool>) {
        let _ = self.audit.set(Arc::downgrade(pool));
    }

    /// The certificates for the stream listener on `listen`: used beyond
    /// loopback whenever configured, on loopback when `[tls] stream` says so.
    pub(super) fn stream_tls(&self, listen: &str) -> Option<Arc<ServerTls>> {
        let beyond = !crate::tls::is_local_listen(listen);
        if beyond && self.tls.is_none() {
            tracing::warn!(
                addr = listen,
                "the stream listener is beyond loopback without TLS: configure [tls] cert and key"
            );
        }
        self.tls.clone().filter(|_| beyond || self.stream_always)
    }

    /// Re-reads the certificates and the `[[access]]` rules on every
    /// SIGHUP. A failed reload keeps what was in force and says why.
    pub(super) fn spawn_reload(&self) -> Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("cannot catch SIGHUP")?;
        let tls = self.tls.clone();
        let gate = self.gate.clone();
        let pool_toml = self.pool_toml.clone();
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                reload(&pool_toml, tls.as_deref(), &gate);
            }
        }))
    }
}

fn reload(pool_toml: &Path, tls: Option<&ServerTls>, gate: &RulesGate) {
    if let Some(tls) = tls {
        match tls.reload() {
            Ok(()) => {
                tracing::info!(cert = %tls.files().cert.display(), "SIGHUP: TLS certificates reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificates not reloaded; the old ones stay")
            }
        }
    }
    let rules = PoolConfig::load(pool_toml)
        .map_err(anyhow::Error::from)
        .and_then(|c| AccessRules::new(&c.access).map_err(anyhow::Error::from));
    match rules {
        Ok(r) => {
            gate.replace(r);
            tracing::info!("SIGHUP: [[access]] rules reloaded");
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: [[access]] rules not reloaded; the old ones stay")
        }
    }
}
