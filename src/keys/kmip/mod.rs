//! A root key inside a KMIP key manager (a shared enterprise KMS; PyKMIP's
//! server in tests), reached over mutual TLS.
//!
//! The root key is an AES-256 symmetric key object in the KMS, made with
//! KMIP Create (usage mask Encrypt|Decrypt) and Activate, and named in
//! pool.toml by its unique identifier. Keys are wrapped and unwrapped inside
//! the KMS with KMIP Encrypt / Decrypt in AES-GCM, the associated data being
//! [`KeyLabel::to_aad`] as for the other providers. The root key never
//! leaves the KMS. A wrapped key is stored as:
//!
//! ```text
//! offset  size  field
//! 0       1     KMIP_WRAP_VERSION (= 1)
//! 1       12    IV (96 bits from the host's OS generator, fresh per wrap)
//! 13      n     ciphertext of the key (n = key length)
//! 13+n    16    GCM tag (128 bits)
//! ```
//!
//! GCM rather than KMIP's own key wrapping (Get with a Key Wrapping
//! Specification): that wraps keys *stored in* the KMS, while ours live in
//! the pool; and GCM binds the label natively. The host picks the IV so the
//! stored format does not depend on whether a KMS returns the IV it chose.
//!
//! While serving, the KMS may go away. Wraps and unwraps then wait and retry
//! with backoff (logging `ALERT` and counting `keyturn_kms_errors_total`)
//! for up to `retry_secs` before failing; keys already unwrapped stay in
//! memory, so volumes keep being served. Opening a pool does not wait: a KMS
//! that does not answer at start is a refusal to serve, naming the address.

pub mod client;
pub mod ttlv;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;
use super::root::RootKeyProvider;
use super::wrap::{KeyLabel, MAX_WRAPPED_KEY_LEN, NONCE_LEN, TAG_LEN};
use client::{KmipClient, KmsError};

/// Version byte at the start of every key wrapped by this provider.
pub const KMIP_WRAP_VERSION: u8 = 1;
/// The KMS object name used when none is given.
pub const DEFAULT_KEY_NAME: &str = "keyturn-root";
/// How long a wrap or unwrap waits for an unreachable KMS while serving.
pub const DEFAULT_RETRY_SECS: u64 = 900;
/// First pause between retries; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between retries (also the delay before a KMS that came
/// back is noticed).
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Additional data of the probe run when the pool opens.
const PROBE_AAD: &[u8] = b"keyturn kmip probe v1";

/// Where the root key lives: the KMS, the TLS files to reach it, the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipConfig {
    /// `host:port` of the KMIP server (port 5696 is KMIP's).
    pub addr: String,
    /// PEM file of the CA that signed the KMS's certificate.
    pub ca: PathBuf,
    /// PEM file of this client's certificate.
    pub cert: PathBuf,
    /// PEM file of this client's private key.
    pub client_key: PathBuf,
    /// The root key's Name attribute in the KMS.
    pub key_name: String,
    /// The root key's KMIP unique identifier (empty until created).
    #[serde(default)]
    pub key_id: String,
    /// Seconds a wrap or unwrap waits for an unreachable KMS while serving.
    pub retry_secs: u64,
}

/// A [`RootKeyProvider`] whose root key stays in a KMIP server.
pub struct KmipProvider {
    client: KmipClient,
    key_id: String,
    retry_for: Duration,
}

impl std::fmt::Debug for KmipProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipProvider")
            .field("addr", &self.client.addr())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// `keyturn_kms_up`: 1 while the last KMS call answered, 0 while retrying.
fn kms_up(up: bool) {
    ::metrics::gauge!("keyturn_kms_up").set(if up { 1.0 } else { 0.0 });
}

/// `keyturn_kms_errors_total`: KMS calls that found the KMS unreachable.
fn kms_error() {
    ::metrics::counter!("keyturn_kms_errors_total").increment(1);
}

/// Help texts of the KMS metrics (once per process, with the others').
pub fn describe_metrics() {
    ::metrics::describe_gauge!(
        "keyturn_kms_up",
        "1 while the KMIP server holding the root key answers, 0 while calls to it are retried"
    );
    ::metrics::describe_counter!(
        "keyturn_kms_errors_total",
        "Calls to the KMIP server holding the root key that found it unreachable"
    );
}

fn kms_error_to_key(addr: &str, op: &'static str, e: KmsError) -> KeyError {
    match e {
        KmsError::Unreachable(reason) => KeyError::KmsUnreachable {
            addr: addr.to_string(),
            op,
            reason,
        },
        other => KeyError::Kms {
            addr: addr.to_string(),
            op,
            reason: other.to_string(),
        },
    }
}

impl KmipProvider {
    fn client(config: &KmipConfig, dir: &Path) -> Result<KmipClient, KeyError> {
        let at = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let tls = crate::tls::ClientTls::load(
            &at(&config.ca),
            Some((&at(&config.cert), &at(&config.client_key))),
        )
        .map_err(|e| KeyError::Kms {
            addr: config.addr.clone(),
            op: "load the TLS files for",
            reason: e.to_string(),
        })?;
        Ok(KmipClient::new(&config.addr, tls.config()))
    }

    /// Opens the configured root key (relative TLS paths are relative to
    /// `dir`) and proves it works with one Encrypt/Decrypt round trip. No
    /// retries: a pool whose KMS does not answer is not opened.
    pub fn open(config: &KmipConfig, dir: &Path) -> Result<Self, KeyError> {
        if config.key_id.is_empty() {
            return Err(KeyError::Kms {
                addr: config.addr.clone(),
                op: "open the root key in",
                reason: "pool.toml names no key_id".into(),
            });
        }
        let p = Self {
            client: Self::client(config, dir)?,
            key_id: config.key_id.clone(),
            retry_for: Duration::from_secs(config.retry_secs),
        };
        p.probe()?;
        kms_up(true);
        Ok(p)
    }

    /// Creates an AES-256 root key named `config.key_name` in the KMS (or,
    /// with `use_existing`, finds the one key of that name), activates a new
    /// one, proves it works, and returns the config with its `key_id`.
    pub fn create_key(
        config: &KmipConfig,
        dir: &Path,
        use_existing: bool,
    ) -> Result<(Self, KmipConfig), KeyError> {
        let client = Self::client(config, dir)?;
        let addr = config.addr.clone();
        let found = client
            .locate(&config.key_name)
            .map_err(|e| kms_error_to_key(&addr, "look up the root key in", e))?;
        let id = if use_existing {
            match found.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(KeyError::Kms {
                        addr,
                        op: "find the root key in",
                        reason: format!(
                            "no object named {:?}; leave out --use-existing-key to create one",
                            config.key_name
                        ),
                    });
                }
                many => {
                    return Err(KeyError::Kms {
                        addr,
                        op: "find the root key in",
                        reason: format!(
                            "{} objects are named {:?}; name one that is unique",
                            many.len(),
                            config.key_name
                        ),
                    });
                }
            }
        } else {
            if !found.is_empty() {
                return Err(KeyError::Kms {
                    addr,
                    op: "create the root key in",
                    reason: format!(
                        "an object named {:?} exists already (unique identifier {}); \
                         use --use-existing-key to share it, or another --key-label",
                        config.key_name, found[0]
                    ),
                });
            }
            let id = client
                .create_aes256(&config.key_name)
                .map_err(|e| kms_error_to_key(&addr, "create the root key in", e))?;
            client
                .activate(&id)
                .map_err(|e| kms_error_to_key(&addr, "activate the root key in", e))?;
            id
        };
        let config = KmipConfig {
            key_id: id,
            ..config.clone()
        };
        let p = Self {
            client,
            key_id: config.key_id.clone(),
            retry_for: Duration::from_secs(config.retry_secs),
        };
        p.probe()?;
        Ok((p, config))
    }

    /// One Encrypt/Decrypt round trip of random bytes.
    fn probe(&self) -> Result<(), KeyError> {
        let addr = self.client.addr();
        let mut data = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(data.as_mut());
        let mut iv = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let sealed = self
            .client
            .encrypt_gcm(&self.key_id, &iv, PROBE_AAD, data.as_ref())
            .map_err(|e| kms_error_to_key(addr, "encrypt with the root key in", e))?;
        let back = self
            .client
            .decrypt_gcm(
                &self.key_id,
                &sealed.iv,
                PROBE_AAD,
                &sealed.ciphertext,
                &sealed.tag,
            )
            .map_err(|e| kms_error_to_key(addr, "decrypt with the root key in", e))?;
        if back.as_slice() != data.as_ref() {
            return Err(KeyError::Kms {
                addr: addr.to_string(),
                op: "check the root key in",
                reason: "a decrypted probe differs from what was encrypted".into(),
            });
        }
        Ok(())
    }

    /// Runs `f` until it succeeds, fails for a reason other than an
    /// unreachable KMS, or `retry_for` has passed; alerting on every miss.
    fn with_retry<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut missed = 0u32;
        loop {
            match f() {
                Ok(v) => {
                    if missed > 0 {
                        tracing::warn!(
                            kms = self.client.addr(),
                            attempts = missed + 1,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "KMIP server is back; {what} done"
                        );
                    }
                    kms_up(true);
                    return Ok(v);
                }
                Err(KmsError::Unreachable(reason)) if started.elapsed() < self.retry_for => {
                    missed += 1;
                    kms_error();
                    kms_up(false);
                    tracing::error!(
                        kms = self.client.addr(),
                        attempt = missed,
                        retry_in_ms = backoff.as_millis() as u64,
                        "ALERT: KMIP server unreachable ({reason}); {what} waits and retries"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    if matches!(e, KmsError::Unreachable(_)) {
                        kms_error();
                        tracing::error!(
                            kms = self.client.addr(),
                            "ALERT: KMIP server still unreachable after {:?}; {what} gives up",
                            self.retry_for
                        );
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl RootKeyProvider for KmipProvider {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        if key.is_empty() || key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(KeyError::InvalidKey {
                label: label.to_string(),
                reason: format!("{} bytes is not a key length this wraps", key.len()),
            });
        }
        let mut iv = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let aad = label.to_aad();
        let sealed = self
            .with_retry("wrapping a key", || {
                self.client.encrypt_gcm(&self.key_id, &iv, &aad, key)
            })
            .map_err(|e| {
                kms_error_to_key(self.client.addr(), "wrap a key with the root key in", e)
            })?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + key.len() + TAG_LEN);
        out.push(KMIP_WRAP_VERSION);
        out.extend_from_slice(&sealed.iv);
        out.extend_from_slice(&sealed.ciphertext);
        out.extend_from_slice(&sealed.tag);
        Ok(out)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let bad = |reason: &str| KeyError::Unwrap {
            label: label.to_string(),
            reason: reason.to_string(),
        };
        if wrapped.len() <= 1 + NONCE_LEN + TAG_LEN {
            return Err(bad("wrapped key too short"));
        }
        if wrapped[0] != KMIP_WRAP_VERSION {
            return Err(bad(
                "not wrapped by a KMIP root key (unknown format version)",
            ));
        }
        let (iv, rest) = wrapped[1..].split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let aad = label.to_aad();
        match self.with_retry("unwrapping a key", || {
            self.client.decrypt_gcm(&self.key_id, iv, &aad, ct, tag)
        }) {
            Ok(k) => Ok(k),
            // GCM in the KMS cannot tell a wrong label from altered bytes.
            Err(KmsError::Refused(reason)) => Err(bad(&format!(
                "the KMS would not decrypt it (wrong label, altered bytes, or another root key): {reason}"
            ))),
            Err(e) => Err(kms_error_to_key(
                self.client.addr(),
                "unwrap a key with the root key in",
                e,
            )),
        }
    }

    fn describe(&self) -> String {
        format!("KMIP root key {} at {}", self.key_id, self.client.addr())
    }
}
