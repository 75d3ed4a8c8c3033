//! Signed digests of the audit chain: `POOL/audit.digests`, made with the
//! pool's audit signing key `POOL/keys/audit-signing.json`.
//!
//! The hash chain (see [`crate::audit`]) catches edits made without
//! recomputing hashes; someone who can write the log and its anchor can still
//! rewrite history from any point. A digest closes that gap: after every
//! record the server signs the chain head (the record's id and hash) with an
//! Ed25519 key that only the unlocked root key gives access to. Checking
//! needs the public key alone ([`super::signed`]): a rewritten record no
//! longer matches the hash its digest signed, and a record added by someone
//! without the key is covered by no digest.
//!
//! # The signing key
//!
//! Where the root key provider can sign inside its key store
//! ([`RootKeyProvider::audit_signer`]: a PKCS#11 token that lists
//! `CKM_EC_EDWARDS_KEY_PAIR_GEN` and `CKM_EDDSA`), the key pair is generated
//! there and the private key never leaves it (see
//! [`crate::keys::pkcs11_sign`]); the file names it by its token label:
//!
//! ```json
//! { "format": "keyturn-audit-signing-key", "version": 1,
//!   "key_id": "audit-<16 hex>", "public_key": "<base64, 32 bytes>",
//!   "created_unix": 1700000000, "wrapped_by_root": null,
//!   "token_key": "keyturn-audit-<16 hex>" }
//! ```
//!
//! Otherwise (sealed file, KMIP, a token without EdDSA) it is a random
//! Ed25519 key wrapped under the root key provider with the label
//! `audit-signing` (zone 0, purpose root, version 1), unwrapped into memory
//! to sign:
//!
//! ```json
//! { "format": "keyturn-audit-signing-key", "version": 1,
//!   "key_id": "audit-<16 hex>", "public_key": "<base64, 32 bytes>",
//!   "created_unix": 1700000000, "wrapped_by_root": null,
//!   "wrapped": "<base64>" }
//! ```
//!
//! Exactly one of `token_key` and `wrapped` is present; the file is mode
//! 0600 either way. `key_id` is `audit-` and the first 16 hex digits of
//! BLAKE3(public key). The choice is made once, when the key is made, and
//! the key is never replaced: a pool keeps one audit public key for life,
//! so `audit verify --public-key` needs that one key for the whole chain.
//! A root key rotation re-wraps a wrapped key with the KEKs ([`rewrap`]);
//! a token key stays where it is, since a PKCS#11 root key rotation makes
//! the new root key in the same token, and [`Signer::open`] finds it by
//! label through whichever root key the pool opens with.
//!
//! # Digests
//!
//! `audit.digests` is append-only JSON lines, one per signed head, members
//! always in this order:
//!
//! ```text
//! {"digest":"keyturn-audit-v1","id":7,"hash":"<64 hex>","time":"2025-01-31T09:30:00.123Z",
//!  "key":"audit-0123456789abcdef","sig":"<base64, 64 bytes>"}
//! ```
//!
//! The signed bytes are the line up to (not including) `,"sig":"`, followed
//! by `}`: the same rule as a record's hash, so a verifier needs no JSON
//! canonicalisation. `digest` names the format (domain separation: these
//! bytes can never be a valid approval request or record). `hash` is the
//! hash of record `id`, which commits to every record before it.
//!
//! A digest is written (appended, fdatasync'ed) right after each record, by
//! the process that has the signing key unlocked (a server, or any command
//! that opens the pool). Records appended without it (a crash between the
//! record and its digest) are covered by the next digest; opening the pool
//! signs the head at once.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::ZoneId;
use crate::keys::KeyError;
use crate::keys::fsutil::{self, Replace, b64};
use crate::keys::root::{RootKeyProvider, TokenSigner};
use crate::keys::wrap::{KeyLabel, Purpose};

/// The signing key file, relative to the pool directory.
pub const KEY_FILE: &str = "keys/audit-signing.json";
/// The digest file, in the pool directory.
pub const DIGEST_FILE: &str = "audit.digests";
/// The first member of every digest line.
pub const DIGEST_TAG: &str = "keyturn-audit-v1";

const WHAT: &str = "audit signing key file";
const FORMAT: &str = "keyturn-audit-signing-key";
const FORMAT_VERSION: u32 = 1;
const MAX_KEY_FILE: u64 = 16 * 1024;
/// How much of the digest file's end is read to find the last digest.
const TAIL_BYTES: u64 = 16 * 1024;
/// The member the signed bytes leave out.
pub(crate) const SIG_MEMBER: &[u8] = b",\"sig\":\"";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key
/// bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors of the audit signing key and digests.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key file could not be read, written or unwrapped.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The digest file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A public key file is not an Ed25519 public key.
    #[error("{}: {reason}", path.display())]
    BadPublicKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SignError + 'a {
    move |source| SignError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The wrap label of the signing key.
fn label() -> KeyLabel {
    KeyLabel {
        key_id: "audit-signing".into(),
        zone: ZoneId(0),
        purpose: Purpose::Root,
        version: 1,
    }
}

/// The id of a signing key: `audit-` and 16 hex digits of its public key's hash.
pub fn key_id(public: &VerifyingKey) -> String {
    let h = blake3::hash(public.as_bytes());
    format!("audit-{}", &h.to_hex()[..16])
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    key_id: String,
    #[serde(with = "b64")]
    public_key: Vec<u8>,
    created_unix: u64,
    #[serde(default)]
    wrapped_by_root: Option<String>,
    /// The key in the root key's token that signs; `None`: the key is
    /// `wrapped` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_key: Option<String>,
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    wrapped: Vec<u8>,
}

impl KeyFile {
    /// A new key's file for `public`, made now; the caller says where the
    /// private key is (`token_key` or `wrapped`).
    fn new(public: &VerifyingKey) -> Self {
        KeyFile {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            key_id: key_id(public),
            public_key: public.as_bytes().to_vec(),
            created_unix: crate::clock::unix_now(),
            wrapped_by_root: None,
            token_key: None,
            wrapped: Vec::new(),
        }
    }

    fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = fsutil::read_limited(WHAT, path, MAX_KEY_FILE)?;
        let corrupt = |reason: String| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        let f: Self = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(crate::keys::describe_json_error(&e)))?;
        if f.format != FORMAT {
            return Err(corrupt("the format field does not name one".into()));
        }
        if f.version != FORMAT_VERSION {
            return Err(KeyError::UnsupportedFormat {
                what: WHAT,
                path: path.to_path_buf(),
                found: f.version,
                supported: FORMAT_VERSION,
            });
        }
        match (&f.token_key, f.wrapped.is_empty()) {
            (Some(name), true) if !name.is_empty() => {}
            (None, false) => {}
            (Some(_), false) => {
                return Err(corrupt(
                    "it names a token key and holds a wrapped key; exactly one is allowed".into(),
                ));
            }
            _ => {
                return Err(corrupt(
                    "it names no token key and holds no wrapped key".into(),
                ));
            }
        }
        Ok(f)
    }

    fn save(&self, path: &Path, replace: Replace) -> Result<(), KeyError> {
        let mut json = serde_json::to_vec_pretty(self).expect("key file serialises");
        json.push(b'\n');
        fsutil::write_private_atomic(WHAT, path, &json, replace)
    }

    fn public(&self, path: &Path) -> Result<VerifyingKey, KeyError> {
        let bytes: [u8; 32] =
            self.public_key
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::Corrupt {
                    what: WHAT,
                    path: path.to_path_buf(),
                    reason: "public key is not 32 bytes".into(),
                })?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason: "public key is not a valid Ed25519 point".into(),
        })
    }
}

/// The public key of the pool in `pool_dir` (no secret needed: the key
/// file keeps it in the clear).
pub fn public_key(pool_dir: &Path) -> Result<VerifyingKey, SignError> {
    let path = pool_dir.join(KEY_FILE);
    Ok(KeyFile::load(&path)?.public(&path)?)
}

/// Where a pool's audit signing key is kept, as its key file says (no
/// secret needed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kept", rename_all = "kebab-case")]
pub enum KeyPlace {
    /// Inside the root key's token, under this label; it signs there.
    Token {
        /// The key's label in the token.
        label: String,
    },
    /// Wrapped under the root key, unwrapped into memory to sign.
    Wrapped {
        /// The id of the root key that wrapped it (`None`: the pool's only one).
        root: Option<String>,
    },
}

impl std::fmt::Display for KeyPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyPlace::Token { label } => write!(
                f,
                "in the root key's PKCS#11 token as {label:?} (generated there, signs there, never leaves it)"
            ),
            KeyPlace::Wrapped { root: Some(r) } => write!(
                f,
                "wrapped under root key {r} (unwrapped into memory to sign: the root key provider cannot sign inside)"
            ),
            KeyPlace::Wrapped { root: None } => write!(
                f,
                "wrapped under the root key (unwrapped into memory to sign: the root key provider cannot sign inside)"
            ),
        }
    }
}

/// The id of the pool's signing key and where it is kept.
pub fn key_place(pool_dir: &Path) -> Result<(String, KeyPlace), SignError> {
    let file = KeyFile::load(&pool_dir.join(KEY_FILE))?;
    let place = match file.token_key {
        Some(label) => KeyPlace::Token { label },
        None => KeyPlace::Wrapped {
            root: file.wrapped_by_root,
        },
    };
    Ok((file.key_id, place))
}

/// The public key as PEM (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes it).
pub fn public_key_pem(public: &VerifyingKey) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public.as_bytes());
    let b64 = Base64::encode_string(&der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

/// Reads a public key file written by `keyturn audit public-key` (PEM
/// SubjectPublicKeyInfo of an Ed25519 key).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, SignError> {
    let bad = |reason: &str| SignError::BadPublicKey {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let text = fsutil::read_limited("public key file", path, 16 * 1024)?;
    let text = std::str::from_utf8(&text).map_err(|_| bad("not text"))?;
    parse_public_key_pem(text).map_err(bad)
}

/// Parses PEM text of an Ed25519 SubjectPublicKeyInfo.
pub fn parse_public_key_pem(text: &str) -> Result<VerifyingKey, &'static str> {
    let body = text
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")
        .and_then(|t| t.strip_suffix("-----END PUBLIC KEY-----"))
        .ok_or("not a PEM public key (BEGIN/END PUBLIC KEY)")?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let der = Base64::decode_vec(&b64).map_err(|_| "invalid base64 in the PEM body")?;
    let key = der
        .strip_prefix(&SPKI_PREFIX[..])
        .filter(|k| k.len() == 32)
        .ok_or("not an Ed25519 public key")?;
    let bytes: [u8; 32] = key.try_into().map_err(|_| "not an Ed25519 public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 point")
}

/// Creates the signing key of the pool in `pool_dir` if it has none.
/// Returns whether one was made.
pub fn ensure_key(pool_dir: &Path, provider: &dyn RootKeyProvider) -> Result<bool, SignError> {
    let path = pool_dir.join(KEY_FILE);
    if path.exists() {
        return Ok(false);
    }
    if let Some(t) = provider.audit_signer(None)? {
        let public = VerifyingKey::from_bytes(&t.public_key()).map_err(|_| KeyError::Corrupt {
            what: WHAT,
            path: path.clone(),
            reason: format!("{} returned an invalid Ed25519 public key", t.location()),
        })?;
        let file = KeyFile {
            token_key: Some(t.key_name().to_string()),
            ..KeyFile::new(&public)
        };
        file.save(&path, Replace::Never)?;
        tracing::info!(key = %file.key_id, token_key = %t.key_name(), "audit signing key created in {}", t.location());
        return Ok(true);
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();
    let file = KeyFile {
        wrapped_by_root: provider.root_id().map(Into::into),
        wrapped: provider.wrap_key(&label(), seed.as_ref())?,
        ..KeyFile::new(&public)
    };
    file.save(&path, Replace::Never)?;
    tracing::info!(key = %file.key_id, "audit signing key created, wrapped under {} (it cannot sign inside)", provider.describe());
    Ok(true)
}

/// Re-wraps the signing key under the new root key of a root key rotation
/// (`roots` unwraps under either root key and wraps under the new one).
/// Nothing to do for a pool without one, or one whose key is in the token
/// (the new root key is made in the same token).
pub fn rewrap(pool_dir: &Path, roots: &dyn RootKeyProvider) -> Result<(), SignError> {
    let path = pool_dir.join(KEY_FILE);
    if !path.exists() {
        return Ok(());
    }
    let mut file = KeyFile::load(&path)?;
    if file.token_key.is_some() {
        // Nothing is wrapped: the key stays in its token.
        return Ok(());
    }
    let new_root = roots.root_id().map(str::to_string);
    if new_root.is_some() && file.wrapped_by_root == new_root {
        return Ok(());
    }
    let seed = roots.unwrap_key_from(file.wrapped_by_root.as_deref(), &label(), &file.wrapped)?;
    file.wrapped = roots.wrap_key(&label(), &seed)?;
    file.wrapped_by_root = new_root;
    file.save(&path, Replace::Allow)?;
    Ok(())
}

/// Where the private key is.
enum Key {
    /// Unwrapped into process memory (zeroized on drop by ed25519-dalek).
    Local(Box<SigningKey>),
    /// In a token, signing through it.
    Token(Box<dyn TokenSigner>),
}

impl Key {
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        match self {
            Key::Local(k) => Ok(k.sign(msg).to_bytes()),
            Key::Token(t) => t.sign(msg),
        }
    }
}

/// The unlocked signing key, appending digests to `audit.digests`.
pub struct Signer {
    key: Key,
    public: VerifyingKey,
    key_id: String,
    path: PathBuf,
    /// The digest file (append) and the last id it signed.
    state: Mutex<(File, u64)>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Opens the signing key of the pool in `pool_dir` (making one first if
    /// the pool has none): finds it in the token by the label its file
    /// names, or unwraps it. Either way it must match the public key in the
    /// file. Then opens the digest file; an incomplete last digest line,
    /// left by a crash, is cut off.
    pub fn open(pool_dir: &Path, provider: &dyn RootKeyProvider) -> Result<Self, SignError> {
        ensure_key(pool_dir, provider)?;
        let key_path = pool_dir.join(KEY_FILE);
        let file = KeyFile::load(&key_path)?;
        let public = file.public(&key_path)?;
        let key = match &file.token_key {
            Some(name) => {
                let t = provider.audit_signer(Some(name))?.ok_or_else(|| KeyError::Corrupt {
                    what: WHAT,
                    path: key_path.clone(),
                    reason: format!(
                        "the signing key is {name:?} in a PKCS#11 token, and {} cannot sign there",
                        provider.describe()
                    ),
                })?;
                if t.public_key() != *public.as_bytes() {
                    return Err(KeyError::Corrupt {
                        what: WHAT,
                        path: key_path,
                        reason: format!(
                            "token key {name:?} does not match the public key in the file"
                        ),
                    }
                    .into());
                }
                tracing::info!(key = %file.key_id, token_key = %name, "audit signing key is in {}; it never leaves the token", t.location());
                Key::Token(t)
            }
            None => {
                let key = Self::unwrap_local(provider, &file, &key_path, &public)?;
                tracing::info!(key = %file.key_id, "audit signing key is wrapped under {} and unwrapped to sign (the provider cannot sign inside)", provider.describe());
                Key::Local(Box::new(key))
            }
        };
        let path = pool_dir.join(DIGEST_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&path)
            .map_err(io("open", &path))?;
        let last = last_signed(&mut f, &path)?;
        Ok(Self {
            key,
            public,
            key_id: file.key_id,
            path,
            state: Mutex::new((f, last)),
        })
    }

    fn unwrap_local(
        provider: &dyn RootKeyProvider,
        file: &KeyFile,
        key_path: &Path,
        public: &VerifyingKey,
    ) -> Result<SigningKey, SignError> {
        let seed =
            provider.unwrap_key_from(file.wrapped_by_root.as_deref(), &label(), &file.wrapped)?;
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(seed.as_slice().try_into().map_err(
            |_| KeyError::InvalidKey {
                label: label().to_string(),
                reason: format!("{} bytes, expected 32", seed.len()),
            },
        )?);
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key() != *public {
            return Err(KeyError::Corrupt {
                what: WHAT,
                path: key_path.to_path_buf(),
                reason: "the wrapped key does not match the public key beside it".into(),
            }
            .into());
        }
        Ok(key)
    }

    /// The public key.
    pub fn public(&self) -> VerifyingKey {
        self.public
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The last event id a digest covers (0: none).
    pub fn last_signed(&self) -> u64 {
        self.state.lock().1
    }

    /// Signs the chain head (record `id` with hash `hash`) at `time` and
    /// appends the digest durably. A head already signed is not signed again.
    pub fn sign_head(&self, id: u64, hash: &str, time: &str) -> Result<(), SignError> {
        let mut st = self.state.lock();
        if id == 0 || id <= st.1 {
            return Ok(());
        }
        let line = digest_line(&self.key, &self.key_id, id, hash, time)?;
        st.0.write_all(&line).map_err(io("append to", &self.path))?;
        crate::store::durable::sync_data(&st.0).map_err(io("fdatasync", &self.path))?;
        st.1 = id;
        Ok(())
    }
}

/// The unsigned part of a digest line (see the module docs).
#[derive(Serialize)]
struct DigestBody<'a> {
    digest: &'a str,
    id: u64,
    hash: &'a str,
    time: &'a str,
    key: &'a str,
}

/// A digest line (with its newline), signed by `key`.
fn digest_line(
    key: &Key,
    key_id: &str,
    id: u64,
    hash: &str,
    time: &str,
) -> Result<Vec<u8>, KeyError> {
    let body = DigestBody {
        digest: DIGEST_TAG,
        id,
        hash,
        time,
        key: key_id,
    };
    let mut line = serde_json::to_vec(&body).expect("digest serialises");
    let sig = key.sign(&line)?;
    line.pop(); // the closing brace
    line.extend_from_slice(SIG_MEMBER);
    line.extend_from_slice(Base64::encode_string(&sig).as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok(line)
}

/// A digest as read back.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    /// Always [`DIGEST_TAG`].
    pub digest: String,
    /// The event id signed.
    pub id: u64,
    /// Its hash.
    pub hash: String,
    /// When it was signed.
    pub time: String,
    /// The signing key's id.
    pub key: String,
    /// Ed25519 signature, base64.
    pub sig: String,
}

/// The id of the last complete digest line of `f` (0 when none); cuts off
/// an incomplete last line.
fn last_signed(f: &mut File, path: &Path) -> Result<u64, SignError> {
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map_err(io("stat", path))?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).map_err(io("seek", path))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(io("read", path))?;
    let end = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if (start + end as u64) < len {
        tracing::warn!(path = %path.display(), "audit digest file ends in an incomplete line (interrupted append); removing it");
        f.set_len(start + end as u64)
            .and_then(|()| crate::store::durable::sync_all(f))
            .map_err(io("truncate", path))?;
    }
    let last = tail[..end]
        .split(|&b| b == b'\n')
        .rev()
        .find(|l| !l.is_empty())
        .and_then(|l| serde_json::from_slice::<Digest>(l).ok())
        .map_or(0, |d| d.id);
    Ok(last)
}

/// Unlocks the signing key of the pool in `pool_dir` (making it if the
/// pool has none) and has `log` sign under it. A key that cannot be
/// unlocked leaves the log unsigned from here on: logged, not fatal, since
/// `audit verify --public-key` then names the first record left uncovered.
pub fn attach(pool_dir: &Path, log: &super::AuditLog, provider: &dyn RootKeyProvider) {
    match Signer::open(pool_dir, provider) {
        Ok(signer) => {
            let id = signer.key_id().to_string();
            if let Err(e) = log.set_signer(std::sync::Arc::new(signer)) {
                tracing::error!(error = %e, "cannot sign the audit chain head");
            } else {
                tracing::info!(key = %id, "audit records are signed");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "audit signing key unusable: new audit records are not signed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, AuditLog};
    use crate::keys::root::test_support::MemoryProvider;
    use crate::keys::root_rotation::RootPair;
    use std::sync::Arc;

    #[test]
    fn key_is_stored_wrapped_and_every_record_is_signed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let root = MemoryProvider::new();
        let log = AuditLog::create_or_open(dir.path()).unwrap();
        attach(dir.path(), &log, &root);
        for _ in 0..3 {
            log.append(AuditEvent::ok("zone.create").zone("z1"))
                .unwrap();
        }
        let signer = Signer::open(dir.path(), &root).unwrap();
        assert_eq!(signer.last_signed(), 3);
        let Key::Local(key) = &signer.key else {
            panic!("a memory root key cannot sign inside")
        };
        let seed = key.to_bytes();
        let file = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        let b64 = Base64::encode_string(&seed);
        assert!(!file.windows(8).any(|w| seed.windows(8).any(|s| s == w)));
        assert!(!String::from_utf8_lossy(&file).contains(&b64[..16]));
        assert!(!format!("{signer:?}").contains(&b64[..16]));
        let public = public_key(dir.path()).unwrap();
        let r = crate::audit::signed::verify_pool(dir.path(), &public).unwrap();
        assert_eq!((r.records, r.digests), (3, 3));
        // Another root key cannot unwrap it.
        assert!(Signer::open(dir.path(), &MemoryProvider::new()).is_err());
    }

    #[test]
    fn root_rotation_rewraps_the_signing_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let old: Arc<dyn RootKeyProvider> = Arc::new(MemoryProvider::new());
        let new: Arc<dyn RootKeyProvider> = Arc::new(MemoryProvider::new());
        ensure_key(dir.path(), old.as_ref()).unwrap();
        let before = public_key(dir.path()).unwrap();
        let pair = RootPair::new("old".into(), old.clone(), "new".into(), new.clone());
        rewrap(dir.path(), &pair).unwrap();
        let s = Signer::open(dir.path(), new.as_ref()).unwrap();
        assert_eq!(s.public(), before);
        assert!(Signer::open(dir.path(), old.as_ref()).is_err());
    }

    /// A "token" shared by providers: Ed25519 keys by label, which sign
    /// without handing the key out (the seed stays in here).
    #[derive(Default, Debug)]
    struct FakeToken(parking_lot::Mutex<std::collections::HashMap<String, [u8; 32]>>);

    /// A root key that can sign inside its token (`eddsa`), like a PKCS#11
    /// provider on a token with `CKM_EDDSA`.
    #[derive(Debug)]
    struct TokenProvider {
        root: MemoryProvider,
        token: Arc<FakeToken>,
        eddsa: bool,
    }

    #[derive(Debug)]
    struct FakeSigner {
        label: String,
        token: Arc<FakeToken>,
    }

    impl FakeSigner {
        fn key(&self) -> Result<SigningKey, KeyError> {
            let t = self.token.0.lock();
            let seed = t.get(&self.label).ok_or_else(|| KeyError::Pkcs11 {
                op: "sign on",
                token: "fake".into(),
                reason: "key gone".into(),
            })?;
            Ok(SigningKey::from_bytes(seed))
        }
    }

    impl TokenSigner for FakeSigner {
        fn key_name(&self) -> &str {
            &self.label
        }
        fn location(&self) -> String {
            "fake token".into()
        }
        fn public_key(&self) -> [u8; 32] {
            self.key().unwrap().verifying_key().to_bytes()
        }
        fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
            Ok(self.key()?.sign(msg).to_bytes())
        }
    }

    impl RootKeyProvider for TokenProvider {
        fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.root.wrap_key(label, key)
        }
        fn unwrap_key(
            &self,
            label: &KeyLabel,
            wrapped: &[u8],
        ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            self.root.unwrap_key(label, wrapped)
        }
        fn describe(&self) -> String {
            "fake token root key".into()
        }
        fn audit_signer(
            &self,
            existing: Option<&str>,
        ) -> Result<Option<Box<dyn TokenSigner>>, KeyError> {
            if !self.eddsa {
                return Ok(None);
            }
            let label = match existing {
                Some(l) => {
                    if !self.token.0.lock().contains_key(l) {
                        return Err(KeyError::Pkcs11 {
                            op: "find the audit signing key on",
                            token: "fake".into(),
                            reason: format!("no key labelled {l:?}"),
                        });
                    }
                    l.to_string()
                }
                None => {
                    let l = format!("keyturn-audit-{}", self.token.0.lock().len());
                    let mut seed = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
                    self.token.0.lock().insert(l.clone(), seed);
                    l
                }
            };
            Ok(Some(Box::new(FakeSigner {
                label,
                token: self.token.clone(),
            })))
        }
    }

    fn token_provider(token: &Arc<FakeToken>, eddsa: bool) -> TokenProvider {
        TokenProvider {
            root: MemoryProvider::new(),
            token: token.clone(),
            eddsa,
        }
    }

    fn pool_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        dir
    }

    #[test]
    fn a_token_that_signs_keeps_the_key_and_the_file_names_it() {
        let dir = pool_dir();
        let token = Arc::new(FakeToken::default());
        let root = token_provider(&token, true);
        let log = AuditLog::create_or_open(dir.path()).unwrap();
        attach(dir.path(), &log, &root);
        for _ in 0..3 {
            log.append(AuditEvent::ok("zone.create").zone("z1"))
                .unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["token_key"], "keyturn-audit-0", "{text}");
        assert!(v.get("wrapped").is_none(), "{text}");
        let seed = token.0.lock()["keyturn-audit-0"];
        assert!(!text.contains(&Base64::encode_string(&seed)[..16]));
        let (id, place) = key_place(dir.path()).unwrap();
        assert_eq!(
            place,
            KeyPlace::Token {
                label: "keyturn-audit-0".into()
            }
        );
        let public = public_key(dir.path()).unwrap();
        assert_eq!(id, key_id(&public));
        assert_eq!(
            public,
            SigningKey::from_bytes(&seed).verifying_key(),
            "the file's public key is the token key's"
        );
        let r = crate::audit::signed::verify_pool(dir.path(), &public).unwrap();
        assert_eq!((r.records, r.digests), (3, 3));

        // Reopened: found again by label, no second key made.
        let s = Signer::open(dir.path(), &root).unwrap();
        assert!(matches!(s.key, Key::Token(_)));
        assert_eq!(token.0.lock().len(), 1);
        assert!(!format!("{s:?}").contains(&Base64::encode_string(&seed)[..16]));

        // A root key rotation in the same token: nothing to re-wrap, and the
        // key signs through the new root key, the old one, or the pair.
        let before = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        let old: Arc<dyn RootKeyProvider> = Arc::new(token_provider(&token, true));
        let new: Arc<dyn RootKeyProvider> = Arc::new(token_provider(&token, true));
        let pair = RootPair::new("old".into(), old.clone(), "new".into(), new.clone());
        rewrap(dir.path(), &pair).unwrap();
        assert_eq!(std::fs::read(dir.path().join(KEY_FILE)).unwrap(), before);
        for p in [&pair as &dyn RootKeyProvider, new.as_ref(), old.as_ref()] {
            let s = Signer::open(dir.path(), p).unwrap();
            assert_eq!(s.public(), public);
        }
        assert_eq!(token.0.lock().len(), 1, "no key made during the rotation");
    }

    #[test]
    fn a_token_key_gone_or_replaced_signs_nothing() {
        let dir = pool_dir();
        let token = Arc::new(FakeToken::default());
        let root = token_provider(&token, true);
        ensure_key(dir.path(), &root).unwrap();
        // Another key under the same label: refused, not trusted.
        token.0.lock().insert("keyturn-audit-0".into(), [3u8; 32]);
        let e = Signer::open(dir.path(), &root).unwrap_err().to_string();
        assert!(e.contains("does not match the public key"), "{e}");
        // The key gone from the token: no fallback to a wrapped key.
        token.0.lock().clear();
        assert!(Signer::open(dir.path(), &root).is_err());
        // A provider that cannot sign inside cannot use a token key.
        let e = Signer::open(dir.path(), &token_provider(&token, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot sign there"), "{e}");
        assert!(token.0.lock().is_empty(), "opening made no key");
    }

    #[test]
    fn a_token_without_eddsa_falls_back_to_a_wrapped_key() {
        let dir = pool_dir();
        let token = Arc::new(FakeToken::default());
        let root = token_provider(&token, false);
        ensure_key(dir.path(), &root).unwrap();
        assert!(token.0.lock().is_empty());
        let (_, place) = key_place(dir.path()).unwrap();
        assert_eq!(place, KeyPlace::Wrapped { root: None });
        assert!(place.to_string().contains("cannot sign inside"));
        let s = Signer::open(dir.path(), &root).unwrap();
        assert!(matches!(s.key, Key::Local(_)));
        // The token gaining EdDSA later does not move or replace the key:
        // the pool keeps one public key for life.
        let root = TokenProvider {
            eddsa: true,
            ..root
        };
        let s2 = Signer::open(dir.path(), &root).unwrap();
        assert!(matches!(s2.key, Key::Local(_)));
        assert_eq!(s2.public(), s.public());
        assert!(token.0.lock().is_empty());
    }

    #[test]
    fn key_file_holds_exactly_one_of_token_key_and_wrapped() {
        let dir = pool_dir();
        let token = Arc::new(FakeToken::default());
        ensure_key(dir.path(), &token_provider(&token, true)).unwrap();
        let path = dir.path().join(KEY_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["wrapped"] = "AAAA".into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = key_place(dir.path()).unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        v.as_object_mut().unwrap().remove("wrapped");
        v.as_object_mut().unwrap().remove("token_key");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = key_place(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no token key and holds no wrapped key"), "{e}");
    }

    #[test]
    fn pem_round_trip_and_garbage() {
        let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        assert_eq!(parse_public_key_pem(&public_key_pem(&key)).unwrap(), key);
        assert!(parse_public_key_pem("hello").is_err());
        assert!(
            parse_public_key_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_err()
        );
    }
}
