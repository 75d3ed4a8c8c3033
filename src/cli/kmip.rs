//! `keyturn init --root-key kmip`: the flags that name a KMIP server and the
//! TLS files to reach it, turned into the pool's root key choice.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::keys::kmip::{DEFAULT_RETRY_SECS, KmipConfig};
use crate::pool::RootKeyChoice;

/// The KMIP flags of `keyturn init`.
#[derive(Args, Debug, Clone)]
pub(super) struct KmipInitArgs {
    /// KMIP server `host:port` (KMIP's port is 5696), with --root-key kmip.
    #[arg(long, required_if_eq("root_key", "kmip"))]
    kmip_url: Option<String>,
    /// CA certificate (PEM) that signed the KMIP server's certificate.
    #[arg(long, required_if_eq("root_key", "kmip"))]
    kmip_ca: Option<PathBuf>,
    /// This server's client certificate (PEM) for the KMIP server.
    #[arg(long, required_if_eq("root_key", "kmip"))]
    kmip_cert: Option<PathBuf>,
    /// This server's client private key (PEM) for the KMIP server.
    #[arg(long, required_if_eq("root_key", "kmip"))]
    kmip_key: Option<PathBuf>,
    /// Seconds a key wrap or unwrap waits for an unreachable KMIP server
    /// while serving, retrying with backoff, before it fails.
    #[arg(long, default_value_t = DEFAULT_RETRY_SECS)]
    kmip_retry_secs: u64,
}

/// An absolute path, so pool.toml names the same file whatever the
/// directory the server starts in.
fn absolute(flag: &str, p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{flag} {}", p.display()))
}

impl KmipInitArgs {
    /// The root key choice for `--root-key kmip`: `key_label` is the key's
    /// Name in the KMS.
    pub(super) fn choice(&self, key_label: &str, use_existing: bool) -> Result<RootKeyChoice> {
        let (Some(url), Some(ca), Some(cert), Some(key)) = (
            &self.kmip_url,
            &self.kmip_ca,
            &self.kmip_cert,
            &self.kmip_key,
        ) else {
            bail!("--root-key kmip needs --kmip-url, --kmip-ca, --kmip-cert and --kmip-key");
        };
        let url = url.trim_start_matches("kmip://").trim_end_matches('/');
        if url
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            bail!("--kmip-url {url:?} is not host:port");
        }
        Ok(RootKeyChoice::Kmip {
            config: KmipConfig {
                addr: url.to_string(),
                ca: absolute("--kmip-ca", ca)?,
                cert: absolute("--kmip-cert", cert)?,
                client_key: absolute("--kmip-key", key)?,
                key_name: key_label.to_string(),
                key_id: String::new(),
                retry_secs: self.kmip_retry_secs,
            },
            use_existing,
        })
    }
}
