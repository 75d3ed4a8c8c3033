//! The key backup file: every wrapped key of a pool and the metadata that
//! reads its volumes, encrypted under a backup passphrase.
//!
//! ```text
//! backup passphrase ──Argon2id(salt, m, t, p)──▶ backup key (256 bits)
//! backup key ──wraps──▶ each zone's KEKs   (label as in the pool; the root key is not in the backup)
//! backup key ──AES-256-GCM(nonce, aad)──▶ the whole payload (JSON)
//! ```
//!
//! File (JSON, mode 0600):
//!
//! ```json
//! { "format": "keyturn-key-backup", "version": 1, "backup_id": "<16 hex>",
//!   "created_unix": 1700000000,
//!   "kdf": { "memory_kib": 65536, "iterations": 3, "parallelism": 1 },
//!   "salt": "<base64, 16 bytes>", "nonce": "<base64, 12 bytes>",
//!   "ciphertext": "<base64>" }
//! ```
//!
//! The associated data covers the format, version, backup id, creation time,
//! KDF parameters and salt, so none of them can be changed unnoticed. The
//! payload ([`Payload`]) holds the zone key files with their KEKs re-wrapped
//! under the backup key (DEKs and MAC keys stay wrapped under their KEKs, as
//! in the pool), and the pool's metadata files verbatim. No key is ever in
//! the clear, in the file or in the payload: a destroyed key has no wrapped
//! bytes in its pool's key file, so it has none in a backup either.

use std::collections::BTreeMap;
use std::path::Path;

use base64ct::{Base64, Encoding};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::fsutil::{self, Replace, b64};
use super::passphrase::Passphrase;
use super::root::RootKeyProvider;
use super::sealed::KdfParams;
use super::secret::RootKey;
use super::wrap::{self, KeyLabel, NONCE_LEN};
use super::zone_keys::ZoneKeyFile;
use super::{KeyError, describe_json_error};

const WHAT: &str = "key backup file";
const FORMAT: &str = "keyturn-key-backup";
const FORMAT_VERSION: u32 = 1;
const AAD_DOMAIN: &str = "keyturn/key-backup";
/// The root id recorded on KEKs wrapped under a backup key.
pub const BACKUP_ROOT_PREFIX: &str = "backup:";
/// Largest backup file read (the journal and tables travel in it).
const MAX_FILE_LEN: u64 = 4 << 30;

/// What a backup carries, once decrypted.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The pool directory it was taken from (for the record only).
    pub source: String,
    /// The source pool's audit chain head when the backup was taken: (id, hash).
    pub audit_head: (u64, String),
    /// The source pool's pool.toml text.
    pub pool_toml: String,
    /// Every zone's key file, KEKs wrapped under the backup key.
    pub zones: Vec<ZoneKeyFile>,
    /// Metadata files by path relative to the pool directory (catalog,
    /// tables, journal, operators, stream key sets), verbatim.
    #[serde(with = "files_b64")]
    pub files: BTreeMap<String, Vec<u8>>,
}

mod files_b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let enc: BTreeMap<&str, String> = m
            .iter()
            .map(|(k, v)| (k.as_str(), Base64::encode_string(v)))
            .collect();
        enc.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let enc = BTreeMap::<String, String>::deserialize(d)?;
        enc.into_iter()
            .map(|(k, v)| {
                Base64::decode_vec(&v)
                    .map(|b| (k, b))
                    .map_err(|_| serde::de::Error::custom("invalid base64"))
            })
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    backup_id: String,
    created_unix: u64,
    kdf: KdfParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

fn aad(e: &Envelope) -> Vec<u8> {
    format!(
        "{AAD_DOMAIN}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0",
        e.format,
        e.version,
        e.backup_id,
        e.created_unix,
        e.kdf.memory_kib,
        e.kdf.iterations,
        e.kdf.parallelism,
        Base64::encode_string(&e.salt)
    )
    .into_bytes()
}

/// The backup key (from the passphrase) as a root key provider, so the
/// zone key files' own re-wrap serves backup and restore.
pub struct BackupKey {
    key: RootKey,
    id: String,
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl RootKeyProvider for BackupKey {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        wrap::wrap(&self.key, label, key)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        wrap::unwrap(&self.key, label, wrapped)
    }

    fn describe(&self) -> String {
        format!("key backup {}", self.id)
    }

    fn root_id(&self) -> Option<&str> {
        Some(&self.id)
    }
}

/// Unwraps under one provider and wraps under another: moving KEKs from
/// the pool's root key to a backup key, or from a backup key to a new root.
pub struct Transfer<'a> {
    /// Unwraps (records name their root; routed by `from`'s own rules).
    pub from: &'a dyn RootKeyProvider,
    /// Wraps.
    pub to: &'a dyn RootKeyProvider,
    /// The id recorded on re-wrapped KEKs.
    pub to_id: String,
}

impl RootKeyProvider for Transfer<'_> {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.to.wrap_key(label, key)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.from.unwrap_key(label, wrapped)
    }

    fn describe(&self) -> String {
        format!("{} to {}", self.from.describe(), self.to.describe())
    }

    fn root_id(&self) -> Option<&str> {
        Some(&self.to_id)
    }

    fn unwrap_key_from(
        &self,
        root: Option<&str>,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.from.unwrap_key_from(root, label, wrapped)
    }
}

/// A backup being written: its id, salt and the key derived from the passphrase.
pub struct Sealer {
    backup_id: String,
    created_unix: u64,
    kdf: KdfParams,
    salt: Vec<u8>,
    key: BackupKey,
}

impl Sealer {
    /// Derives a fresh backup key from `pass` (new random salt and id).
    pub fn new(pass: &Passphrase, kdf: KdfParams, now: u64) -> Result<Self, KeyError> {
        let mut salt = vec![0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let mut id = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let backup_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let derived = kdf.derive(pass, &salt)?;
        Ok(Self {
            key: BackupKey {
                key: RootKey::from_slice(&derived[..]).expect("32 bytes"),
                id: format!("{BACKUP_ROOT_PREFIX}{backup_id}"),
            },
            backup_id,
            created_unix: now,
            kdf,
            salt,
        })
    }

    /// The backup's id.
    pub fn backup_id(&self) -> &str {
        &self.backup_id
    }

    /// The backup key, to re-wrap KEKs under.
    pub fn key(&self) -> &BackupKey {
        &self.key
    }

    /// Encrypts `payload` and writes the backup file at `path` (which must
    /// not exist), mode 0600.
    pub fn write(&self, path: &Path, payload: &Payload) -> Result<(), KeyError> {
        let plain = Zeroizing::new(serde_json::to_vec(payload).map_err(|e| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {}", describe_json_error(&e)),
        })?);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut env = Envelope {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            backup_id: self.backup_id.clone(),
            created_unix: self.created_unix,
            kdf: self.kdf,
            salt: self.salt.clone(),
            nonce: nonce.to_vec(),
            ciphertext: Vec::new(),
        };
        env.ciphertext = wrap::seal_raw(self.key.key.expose(), &nonce, &aad(&env), &plain)
            .ok_or_else(|| KeyError::InvalidKey {
                label: "key backup".into(),
                reason: "AES-GCM refused to encrypt it".into(),
            })?;
        let mut json = serde_json::to_vec_pretty(&env).expect("envelope serialises");
        json.push(b'\n');
        fsutil::write_private_atomic(WHAT, path, &json, Replace::Never)
    }
}

/// A backup file opened with its passphrase.
pub struct Opened {
    /// The backup's id.
    pub backup_id: String,
    /// When it was taken (Unix seconds).
    pub created_unix: u64,
    /// The backup key (unwraps the KEKs in `payload`).
    pub key: BackupKey,
    /// The decrypted payload.
    pub payload: Payload,
}

/// Reads only the public header of a backup file: its id and creation time
/// (for an approval request), without the passphrase.
pub fn peek(path: &Path) -> Result<(String, u64), KeyError> {
    let env = read_envelope(path)?;
    Ok((env.backup_id, env.created_unix))
}

fn read_envelope(path: &Path) -> Result<Envelope, KeyError> {
    let bytes = fsutil::read_limited(WHAT, path, MAX_FILE_LEN)?;
    let corrupt = |reason: String| KeyError::Corrupt {
        what: WHAT,
        path: path.to_path_buf(),
        reason,
    };
    let env: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
    if env.format != FORMAT {
        return Err(corrupt(
            "the format field does not name a key backup".into(),
        ));
    }
    if env.version != FORMAT_VERSION {
        return Err(KeyError::UnsupportedFormat {
            what: WHAT,
            path: path.to_path_buf(),
            found: env.version,
            supported: FORMAT_VERSION,
        });
    }
    if env.backup_id.len() != 16 || !env.backup_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(corrupt("the backup id is not 16 hex digits".into()));
    }
    Ok(env)
}

/// Opens the backup at `path` with `pass`. A wrong passphrase and an altered
/// file look alike (AES-GCM), and say so.
pub fn open(path: &Path, pass: &Passphrase) -> Result<Opened, KeyError> {
    let env = read_envelope(path)?;
    let corrupt = |reason: String| KeyError::Corrupt {
        what: WHAT,
        path: path.to_path_buf(),
        reason,
    };
    if !(8..=64).contains(&env.salt.len()) {
        return Err(corrupt(format!("salt is {} bytes", env.salt.len())));
    }
    let nonce: [u8; NONCE_LEN] = env
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("bad nonce length".into()))?;
    let derived = env.kdf.derive(pass, &env.salt)?;
    let plain = wrap::open_raw(&derived, &nonce, &aad(&env), &env.ciphertext).ok_or_else(|| {
        KeyError::WrongPassphrase {
            path: path.to_path_buf(),
        }
    })?;
    let payload: Payload =
        serde_json::from_slice(&plain).map_err(|e| corrupt(describe_json_error(&e)))?;
    Ok(Opened {
        key: BackupKey {
            key: RootKey::from_slice(&derived[..]).expect("32 bytes"),
            id: format!("{BACKUP_ROOT_PREFIX}{}", env.backup_id),
        },
        backup_id: env.backup_id,
        created_unix: env.created_unix,
        payload,
    })
}
