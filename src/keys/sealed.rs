//! The default root key provider: a random root key sealed under a
//! passphrase in a small JSON file.
//!
//! ```text
//! passphrase ──Argon2id(salt, m, t, p)──▶ 256-bit sealing key
//! sealing key ──AES-256-GCM(nonce, aad)──▶ seals the 32-byte RootKey
//! ```
//!
//! File (JSON, mode 0600, replaced only atomically):
//!
//! ```json
//! {
//!   "format": "keyturn-sealed-root-key",
//!   "version": 1,
//!   "kdf": { "algorithm": "argon2id", "argon2_version": 19,
//!            "memory_kib": 65536, "iterations": 3, "parallelism": 1 },
//!   "salt": "<base64, 16 bytes>",
//!   "cipher": "aes-256-gcm",
//!   "nonce": "<base64, 12 bytes>",
//!   "ciphertext": "<base64, 32-byte root key + 16-byte tag>"
//! }
//! ```
//!
//! The associated data covers the format version, the KDF parameters and the
//! salt, so editing any of them fails like a wrong passphrase does (rather
//! than, say, quietly weakening the KDF on the next re-seal).
//!
//! KDF parameters read from a file are bounded (memory ≤ 4 GiB, iterations ≤
//! 64, parallelism ≤ 64) so a crafted file cannot make `open` exhaust memory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::fsutil::{self, Replace, b64};
use super::passphrase::Passphrase;
use super::root::RootKeyProvider;
use super::secret::RootKey;
use super::wrap::{self, KeyLabel, NONCE_LEN};
use super::{KeyError, describe_json_error};

const WHAT: &str = "root key file";
const FORMAT: &str = "keyturn-sealed-root-key";
const FORMAT_VERSION: u32 = 1;
const AAD_DOMAIN: &[u8] = b"keyturn/sealed-root-key";
const SALT_LEN: usize = 16;
const MAX_FILE_LEN: u64 = 64 * 1024;

const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 64;

/// Argon2id cost parameters; stored in the sealed file so that each file
/// opens with the cost it was sealed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Time cost (passes over memory).
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// m = 64 MiB, t = 3, p = 1: about a third of a second on this class of
    /// machine, which an operator pays once per unlock.
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// m = 8 MiB, t = 1, p = 1. Cheap enough for tests and demos, far too
    /// cheap to protect a real root key against guessing.
    pub const INSECURE_FAST: KdfParams = KdfParams {
        memory_kib: 8 * 1024,
        iterations: 1,
        parallelism: 1,
    };

    /// The cost an operator asked for: `None` when neither value was given
    /// (keep the current file's); one value alone takes the other from the
    /// default cost.
    pub fn with_cost(memory_kib: Option<u32>, iterations: Option<u32>) -> Option<Self> {
        if memory_kib.is_none() && iterations.is_none() {
            return None;
        }
        let d = Self::default();
        Some(Self {
            memory_kib: memory_kib.unwrap_or(d.memory_kib),
            iterations: iterations.unwrap_or(d.iterations),
            ..d
        })
    }

    fn to_argon2(self) -> Result<Argon2<'static>, KeyError> {
        if self.memory_kib > MAX_MEMORY_KIB
            || self.iterations > MAX_ITERATIONS
            || self.parallelism == 0
            || self.parallelism > MAX_PARALLELISM
        {
            return Err(KeyError::Kdf {
                reason: format!(
                    "parameters m={} KiB, t={}, p={} are outside the accepted range \
                     (m ≤ {MAX_MEMORY_KIB} KiB, t ≤ {MAX_ITERATIONS}, 1 ≤ p ≤ {MAX_PARALLELISM})",
                    self.memory_kib, self.iterations, self.parallelism
                ),
            });
        }
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| KeyError::Kdf {
                reason: format!(
                    "parameters m={} KiB, t={}, p={} rejected: {e}",
                    self.memory_kib, self.iterations, self.parallelism
                ),
            })?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    pub(crate) fn derive(
        self,
        pass: &Passphrase,
        salt: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let mut out = Zeroizing::new([0u8; 32]);
        self.to_argon2()?
            .hash_password_into(pass.expose().as_bytes(), salt, &mut out[..])
            .map_err(|e| KeyError::Kdf {
                reason: e.to_string(),
            })?;
        Ok(out)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfSection {
    algorithm: String,
    argon2_version: u32,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedFile {
    format: String,
    version: u32,
    kdf: KdfSection,
    #[serde(with = "b64")]
    salt: Vec<u8>,
    cipher: String,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

fn seal_aad(params: &KdfParams, salt: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(&(AAD_DOMAIN.len() as u32).to_le_bytes());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    aad.extend_from_slice(&0x13u32.to_le_bytes());
    aad.extend_from_slice(&params.memory_kib.to_le_bytes());
    aad.extend_from_slice(&params.iterations.to_le_bytes());
    aad.extend_from_slice(&params.parallelism.to_le_bytes());
    aad.extend_from_slice(&(salt.len() as u32).to_le_bytes());
    aad.extend_from_slice(salt);
    aad
}

/// A root key unsealed from a passphrase-protected file, held in memory
/// (zeroized on drop) while the process runs.
pub struct SealedFileProvider {
    path: PathBuf,
    params: KdfParams,
    root: RootKey,
}

impl std::fmt::Debug for SealedFileProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedFileProvider")
            .field("path", &self.path)
            .field("params", &self.params)
            .field("root", &self.root)
            .finish()
    }
}

impl SealedFileProvider {
    /// Generates a new random root key and seals it into a new file at
    /// `path` under `pass`. Refuses to replace an existing file.
    pub fn create(path: &Path, pass: &Passphrase, params: KdfParams) -> Result<Self, KeyError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::AlreadyExists {
                what: WHAT,
                path: path.to_path_buf(),
            });
        }
        let root = RootKey::generate();
        write_sealed(path, pass, params, &root, Replace::Never)?;
        Ok(Self {
            path: path.to_path_buf(),
            params,
            root,
        })
    }

    /// Seals `root` (a root key made elsewhere: the new root key of a root
    /// key rotation) into `path` under `pass`, atomically replacing any file
    /// there, and returns the provider holding it.
    pub fn seal_root(
        path: &Path,
        pass: &Passphrase,
        params: KdfParams,
        root: RootKey,
    ) -> Result<Self, KeyError> {
        write_sealed(path, pass, params, &root, Replace::Allow)?;
        Ok(Self {
            path: path.to_path_buf(),
            params,
            root,
        })
    }

    /// Opens the sealed file at `path` with `pass`.
    pub fn open(path: &Path, pass: &Passphrase) -> Result<Self, KeyError> {
        let bytes = fsutil::read_limited(WHAT, path, MAX_FILE_LEN)?;
        warn_if_readable_by_others(path);
        let corrupt = |reason: String| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        let file: SealedFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
        if file.format != FORMAT {
            return Err(corrupt(
                "the format field does not name a sealed root key".into(),
            ));
        }
        if file.version != FORMAT_VERSION {
            return Err(KeyError::UnsupportedFormat {
                what: WHAT,
                path: path.to_path_buf(),
                found: file.version,
                supported: FORMAT_VERSION,
            });
        }
        if file.kdf.algorithm != "argon2id" || file.kdf.argon2_version != 0x13 {
            return Err(corrupt(
                "unsupported KDF (expected argon2id version 19)".into(),
            ));
        }
        if file.cipher != "aes-256-gcm" {
            return Err(corrupt("unsupported cipher (expected aes-256-gcm)".into()));
        }
        if !(8..=64).contains(&file.salt.len()) {
            return Err(corrupt(format!("salt is {} bytes", file.salt.len())));
        }
        let nonce: [u8; NONCE_LEN] = file.nonce.as_slice().try_into().map_err(|_| {
            corrupt(format!(
                "nonce is {} bytes, expected {NONCE_LEN}",
                file.nonce.len()
            ))
        })?;
        let params = KdfParams {
            memory_kib: file.kdf.memory_kib,
            iterations: file.kdf.iterations,
            parallelism: file.kdf.parallelism,
        };

        let key = params.derive(pass, &file.salt).map_err(|e| match e {
            KeyError::Kdf { reason } => corrupt(format!("KDF parameters: {reason}")),
            other => other,
        })?;
        let plain = wrap::open_raw(
            &key,
            &nonce,
            &seal_aad(&params, &file.salt),
            &file.ciphertext,
        )
        .ok_or_else(|| KeyError::WrongPassphrase {
            path: path.to_path_buf(),
        })?;
        let root = RootKey::from_slice(&plain)
            .ok_or_else(|| corrupt(format!("sealed key is {} bytes, expected 32", plain.len())))?;
        Ok(Self {
            path: path.to_path_buf(),
            params,
            root,
        })
    }

    /// Seals the same root key again under a new passphrase and/or KDF cost,
    /// atomically replacing the file. Every wrapped KEK stays valid.
    pub fn reseal(&mut self, new_pass: &Passphrase, params: KdfParams) -> Result<(), KeyError> {
        write_sealed(&self.path, new_pass, params, &self.root, Replace::Allow)?;
        self.params = params;
        Ok(())
    }

    /// The sealed file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The KDF cost the file is sealed with.
    pub fn params(&self) -> KdfParams {
        self.params
    }

    #[cfg(test)]
    pub(crate) fn root_for_tests(&self) -> &RootKey {
        &self.root
    }
}

fn write_sealed(
    path: &Path,
    pass: &Passphrase,
    params: KdfParams,
    root: &RootKey,
    replace: Replace,
) -> Result<(), KeyError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let key = params.derive(pass, &salt)?;
    let ciphertext = wrap::seal_raw(&key, &nonce, &seal_aad(&params, &salt), root.expose())
        .ok_or_else(|| KeyError::Kdf {
            reason: "AES-GCM refused to seal the root key".into(),
        })?;
    let file = SealedFile {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        kdf: KdfSection {
            algorithm: "argon2id".into(),
            argon2_version: 0x13,
            memory_kib: params.memory_kib,
            iterations: params.iterations,
            parallelism: params.parallelism,
        },
        salt: salt.to_vec(),
        cipher: "aes-256-gcm".into(),
        nonce: nonce.to_vec(),
        ciphertext,
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Corrupt {
        what: WHAT,
        path: path.to_path_buf(),
        reason: format!("cannot serialise: {}", describe_json_error(&e)),
    })?;
    json.push(b'\n');
    fsutil::write_private_atomic(WHAT, path, &json, replace)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "root key file is accessible to group or others; chmod 600 it"
            );
        }
    }
}

impl RootKeyProvider for SealedFileProvider {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        wrap::wrap(&self.root, label, key)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        wrap::unwrap(&self.root, label, wrapped)
    }

    fn describe(&self) -> String {
        format!(
            "passphrase-sealed root key file {} (argon2id m={} KiB, t={}, p={})",
            self.path.display(),
            self.params.memory_kib,
            self.params.iterations,
            self.params.parallelism
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ZoneId;
    use crate::keys::wrap::Purpose;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.into()).unwrap()
    }

    #[test]
    fn create_open_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        let p = SealedFileProvider::create(&path, &pass("pw"), KdfParams::INSECURE_FAST).unwrap();
        let label = KeyLabel::new(ZoneId(1), Purpose::Kek, 1);
        let wrapped = p.wrap_key(&label, &[5u8; 32]).unwrap();

        let q = SealedFileProvider::open(&path, &pass("pw")).unwrap();
        assert_eq!(q.root.expose(), p.root.expose());
        assert_eq!(q.params(), KdfParams::INSECURE_FAST);
        assert_eq!(&q.unwrap_key(&label, &wrapped).unwrap()[..], &[5u8; 32]);
        assert!(q.describe().contains("root.json"));

        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["format"], FORMAT);
        assert_eq!(v["kdf"]["memory_kib"], 8192);
    }

    #[test]
    fn wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        SealedFileProvider::create(&path, &pass("right"), KdfParams::INSECURE_FAST).unwrap();
        let e = SealedFileProvider::open(&path, &pass("wrong")).unwrap_err();
        assert!(matches!(e, KeyError::WrongPassphrase { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("wrong passphrase for root key file "),
            "{msg}"
        );
        assert!(
            msg.contains("root.json") && msg.contains("or the file is corrupt"),
            "{msg}"
        );
    }

    #[test]
    fn overwrite_refused_and_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        SealedFileProvider::create(&path, &pass("a"), KdfParams::INSECURE_FAST).unwrap();
        let before = std::fs::read(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e =
            SealedFileProvider::create(&path, &pass("b"), KdfParams::INSECURE_FAST).unwrap_err();
        assert!(matches!(e, KeyError::AlreadyExists { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        let e = SealedFileProvider::open(&path, &pass("x")).unwrap_err();
        assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"));

        std::fs::write(&path, "{ not json").unwrap();
        let e = SealedFileProvider::open(&path, &pass("x")).unwrap_err();
        assert!(matches!(e, KeyError::Corrupt { .. }), "{e}");

        SealedFileProvider::create(&dir.path().join("r2"), &pass("x"), KdfParams::INSECURE_FAST)
            .unwrap();
        let good = std::fs::read_to_string(dir.path().join("r2")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v["version"] = 9.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = SealedFileProvider::open(&path, &pass("x")).unwrap_err();
        assert!(
            matches!(e, KeyError::UnsupportedFormat { found: 9, .. }),
            "{e}"
        );

        // A cheaper KDF cost written into the file does not open it.
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v["kdf"]["iterations"] = 2.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = SealedFileProvider::open(&path, &pass("x")).unwrap_err();
        assert!(matches!(e, KeyError::WrongPassphrase { .. }), "{e}");

        // An absurd cost is refused before any memory is allocated.
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v["kdf"]["memory_kib"] = u32::MAX.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = SealedFileProvider::open(&path, &pass("x")).unwrap_err();
        assert!(matches!(e, KeyError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn reseal_keeps_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        let mut p =
            SealedFileProvider::create(&path, &pass("old"), KdfParams::INSECURE_FAST).unwrap();
        p.reseal(&pass("new"), KdfParams::INSECURE_FAST).unwrap();
        assert!(matches!(
            SealedFileProvider::open(&path, &pass("old")),
            Err(KeyError::WrongPassphrase { .. })
        ));
        let q = SealedFileProvider::open(&path, &pass("new")).unwrap();
        assert_eq!(q.root.expose(), p.root.expose());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
