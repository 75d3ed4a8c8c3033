//! Dual control: dangerous key operations (rotating a KEK or the root key,
//! destroying a key, marking one compromised) need signed approvals from
//! distinct operators.
//!
//! Each operator holds an Ed25519 key pair. The pool keeps the public halves
//! in `POOL/operators.json` ([`OperatorRegistry`]); the private half stays in
//! the operator's own key file ([`OperatorKey`], mode 0600). Whoever proposes
//! an operation makes one [`ApprovalRequest`] (operation, zone, key, a fresh
//! random nonce, an expiry); every approving operator signs that same request
//! and hands over an [`Approval`] token. [`verify_approvals`] checks the set;
//! [`authorize`] adds the pool's policy and the durable record of used nonces
//! (`POOL/approvals-used.json`), and yields an [`Authorized`] proof that the
//! operation itself then consumes.
//!
//! # Canonical request encoding (the bytes that are signed)
//!
//! ```text
//! str("keyturn-approval-v1")            domain separation and version
//! str(operation)                        "rotate-kek" | "rotate-root" |
//!                                       "destroy-key" | "compromise-key"
//! opt(zone)                             zone name
//! opt(key)                              key id, e.g. "z1-dek-v2"
//! str(nonce)                            32 lowercase hex digits (128 bits)
//! u64be(expires_unix)                   8 bytes, seconds since the epoch
//!
//! str(s) = u32be(len(s)) || s           UTF-8 bytes, length in bytes
//! opt(x) = 0x00                         when absent
//!        | 0x01 || str(x)               when present
//! ```
//!
//! Every variable field carries its length, so no two different requests
//! encode to the same bytes (no "zone=ab,key=c" vs "zone=a,key=bc"), and an
//! absent zone differs from an empty one. Ed25519 signs these bytes directly;
//! verification is `verify_strict` (no malleable or small-order signatures).
//!
//! Nothing here is secret except an [`OperatorKey`]: requests, approvals,
//! signatures and operator ids are public and may be logged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64ct::{Base64, Encoding};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::KeyError;
use super::fsutil::{self, Replace};
use crate::config::DualControlSection;

/// Domain string that starts every canonical request.
pub const DOMAIN: &str = "keyturn-approval-v1";
/// The operator registry, in the pool directory.
pub const OPERATORS_FILE: &str = "operators.json";
/// Nonces already spent, in the pool directory.
pub const USED_NONCES_FILE: &str = "approvals-used.json";
/// Serialises read-modify-write of the two files above, in the pool
/// directory. Separate from the pool's own lock so operators can be managed
/// while the pool is served.
const LOCK_FILE: &str = "approvals.lock";
/// Longest a request may stay valid. Approvals are meant for an operation
/// about to happen; a long-lived one is a standing authorisation.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Clock skew tolerated between the proposer's machine and the verifier's.
const CLOCK_SKEW_SECS: u64 = 300;
const NONCE_HEX_LEN: usize = 32;
const FORMAT: u32 = 1;
/// Small JSON files; anything bigger is a mistake or an attack on memory.
const FILE_LIMIT: u64 = 1 << 20;

/// Why a set of approvals (or an operator file) was refused.
///
/// Every message names operators by id, requests by their public fields and
/// files by path; none carries private key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// Fewer distinct valid approvals than the policy needs.
    #[error(
        "dual control: {got} approval(s) given, {required} from distinct operators are needed \
         (pass --approval FILE once per operator)"
    )]
    NotEnough {
        /// Distinct approvals given.
        got: usize,
        /// Approvals needed.
        required: usize,
    },
    /// One operator approved more than once.
    #[error(
        "dual control: operator {operator} approved more than once; approvals must come from distinct operators"
    )]
    DuplicateOperator {
        /// The operator id.
        operator: String,
    },
    /// The approval names an operator the pool does not know.
    #[error(
        "dual control: operator {operator} is not registered in this pool (see `keyturn operator list`)"
    )]
    UnknownOperator {
        /// The operator id from the token.
        operator: String,
    },
    /// The signature does not verify under the operator's registered key.
    #[error(
        "dual control: the signature of operator {operator} does not verify (altered token or wrong key)"
    )]
    BadSignature {
        /// The operator id from the token.
        operator: String,
    },
    /// The request's expiry has passed.
    #[error(
        "dual control: the approved request (nonce {nonce}) expired at {expires_unix}, now is {now}"
    )]
    Expired {
        /// The request's nonce.
        nonce: String,
        /// Its expiry (Unix seconds).
        expires_unix: u64,
        /// The verifier's clock (Unix seconds).
        now: u64,
    },
    /// The request expires further ahead than [`MAX_LIFETIME`] allows.
    #[error(
        "dual control: the request (nonce {nonce}) is valid until {expires_unix}, longer than the {max_secs} s allowed"
    )]
    TooLongLived {
        /// The request's nonce.
        nonce: String,
        /// Its expiry (Unix seconds).
        expires_unix: u64,
        /// The longest lifetime allowed, in seconds.
        max_secs: u64,
    },
    /// The approvals are for another operation, zone or key.
    #[error("dual control: operator {operator} approved {approved}, but this is {expected}")]
    WrongRequest {
        /// Who signed the other request.
        operator: String,
        /// What they approved.
        approved: String,
        /// What is being done.
        expected: String,
    },
    /// The approvals sign different requests (they must share one nonce).
    #[error(
        "dual control: approvals sign different requests (operator {first} signed nonce {first_nonce}, \
         operator {other} signed nonce {other_nonce}); every operator must sign the same request file"
    )]
    DifferentRequests {
        /// First operator.
        first: String,
        /// First operator's nonce.
        first_nonce: String,
        /// The operator whose request differs.
        other: String,
        /// That operator's nonce.
        other_nonce: String,
    },
    /// The request's nonce was already spent on an operation.
    #[error(
        "dual control: the request with nonce {nonce} was already used; approvals cannot be replayed"
    )]
    Replayed {
        /// The nonce.
        nonce: String,
    },
    /// A field of a request or token is malformed.
    #[error("dual control: {what} is malformed: {reason}")]
    Malformed {
        /// Which field or file.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The pool's dual-control policy is unusable.
    #[error("dual control: {0}")]
    Policy(String),
    /// An operator with that name or public key is already registered.
    #[error("an operator {what} {value:?} is already registered")]
    OperatorExists {
        /// "named" or "with public key id".
        what: &'static str,
        /// The name or id.
        value: String,
    },
    /// An operator key file others can read.
    #[error("operator key file {} has mode {mode:o}; it must not be readable by group or others (chmod 600)", path.display())]
    InsecureKeyFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading, writing or locking a file failed.
    #[error(transparent)]
    File(#[from] KeyError),
}

type Result<T, E = ApprovalError> = std::result::Result<T, E>;

/// A key operation that needs dual control.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Rotate a zone's KEK.
    RotateKek,
    /// Rotate the root key.
    RotateRoot,
    /// Destroy a key.
    DestroyKey,
    /// Mark a key compromised.
    CompromiseKey,
    /// Emergency DEK rotation of a zone (compromise the active key, flip now).
    EmergencyRotation,
    /// Crypto-shred one window of a zone's change stream.
    ShredStreamWindow,
    /// Write a backup of every key of the pool (`keys backup`).
    BackupKeys,
    /// Restore a pool's keys from a backup (`keys restore`; the key is the backup id).
    RestoreKeys,
    /// Roll a zone back to the DEK its last flip retired.
    RollbackRotation,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 9] = [
        Self::RotateKek,
        Self::RotateRoot,
        Self::DestroyKey,
        Self::CompromiseKey,
        Self::EmergencyRotation,
        Self::ShredStreamWindow,
        Self::BackupKeys,
        Self::RestoreKeys,
        Self::RollbackRotation,
    ];

    /// The name used on the command line, in files and in the signed bytes.
    pub fn name(self) -> &'static str {
        match self {
            Self::RotateKek => "rotate-kek",
            Self::RotateRoot => "rotate-root",
            Self::DestroyKey => "destroy-key",
            Self::CompromiseKey => "compromise-key",
            Self::EmergencyRotation => "emergency-rotation",
            Self::ShredStreamWindow => "shred-stream-window",
            Self::BackupKeys => "backup-keys",
            Self::RestoreKeys => "restore-keys",
            Self::RollbackRotation => "rollback-rotation",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Operation {
    type Err = ApprovalError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| ApprovalError::Malformed {
                what: "operation".into(),
                reason: format!(
                    "{s:?} is not one of rotate-kek, rotate-root, destroy-key, compromise-key, emergency-rotation, shred-stream-window, backup-keys, restore-keys, rollback-rotation"
                ),
            })
    }
}

/// What an operation is about to do: the part of a request the verifier
/// knows on its own, and compares the approved request against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The operation.
    pub operation: Operation,
    /// The zone it acts on, if any.
    pub zone: Option<String>,
    /// The key it acts on, if any.
    pub key: Option<String>,
}

impl Target {
    /// A target for `operation` on `zone` (and `key`).
    pub fn new(operation: Operation, zone: Option<&str>, key: Option<&str>) -> Self {
        Self {
            operation,
            zone: zone.map(Into::into),
            key: key.map(Into::into),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of zone {} key {}",
            self.operation,
            self.zone.as_deref().unwrap_or("(none)"),
            self.key.as_deref().unwrap_or("(none)")
        )
    }
}

/// A proposed operation that operators approve by signing its canonical
/// encoding (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// The operation.
    pub operation: Operation,
    /// The zone it acts on, if any.
    pub zone: Option<String>,
    /// The key it acts on, if any.
    pub key: Option<String>,
    /// 128 random bits as 32 lowercase hex digits; spent once used.
    pub nonce: String,
    /// When the request stops being valid (Unix seconds).
    pub expires_unix: u64,
}

impl ApprovalRequest {
    /// A fresh request with a random nonce, valid for `lifetime` from `now`.
    pub fn new(target: Target, now: u64, lifetime: Duration) -> Result<Self> {
        if lifetime.is_zero() || lifetime > MAX_LIFETIME {
            return Err(ApprovalError::Policy(format!(
                "a request must be valid for between 1 s and {} s",
                MAX_LIFETIME.as_secs()
            )));
        }
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        Ok(Self {
            operation: target.operation,
            zone: target.zone,
            key: target.key,
            nonce: hex(&nonce),
            expires_unix: now.saturating_add(lifetime.as_secs()),
        })
    }

    /// What the request approves.
    pub fn target(&self) -> Target {
        Target {
            operation: self.operation,
            zone: self.zone.clone(),
            key: self.key.clone(),
        }
    }

    /// The bytes operators sign (layout in the module documentation).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            // Fields are short; a length over u32 cannot come from a parsed
            // request file (those are capped at FILE_LIMIT).
            let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
            match s {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    put_str(out, s);
                }
            }
        }
        let mut out = Vec::with_capacity(96);
        put_str(&mut out, DOMAIN);
        put_str(&mut out, self.operation.name());
        put_opt(&mut out, self.zone.as_deref());
        put_opt(&mut out, self.key.as_deref());
        put_str(&mut out, &self.nonce);
        out.extend_from_slice(&self.expires_unix.to_be_bytes());
        out
    }

    fn check_nonce(&self) -> Result<()> {
        let ok = self.nonce.len() == NONCE_HEX_LEN
            && self
                .nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(())
        } else {
            Err(ApprovalError::Malformed {
                what: "request nonce".into(),
                reason: format!("expected {NONCE_HEX_LEN} lowercase hex digits"),
            })
        }
    }

    /// Reads a request file written by `keyturn approval-request`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fsutil::read_limited("approval request file", path, FILE_LIMIT)?;
        let req: Self = serde_json::from_slice(&bytes).map_err(|e| ApprovalError::Malformed {
            what: format!("approval request file {}", path.display()),
            reason: super::describe_json_error(&e),
        })?;
        req.check_nonce()?;
        Ok(req)
    }
}

/// One operator's signed approval of a request: a small JSON token file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Id of the operator who signed.
    pub operator: String,
    /// The request approved.
    pub request: ApprovalRequest,
    /// Ed25519 signature over `request.canonical_bytes()`, standard base64.
    pub signature: String,
}

impl Approval {
    /// The token as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the token to `path` (never replacing an existing file).
    pub fn save(&self, path: &Path) -> Result<()> {
        fsutil::write_private_atomic(
            "approval token",
            path,
            self.to_json().as_bytes(),
            Replace::Never,
        )?;
        Ok(())
    }

    /// Parses a token's JSON text (as sent to the admin API); `what` names
    /// it in errors.
    pub fn from_json(what: &str, text: &str) -> Result<Self> {
        if text.len() as u64 > FILE_LIMIT {
            return Err(ApprovalError::Malformed {
                what: what.into(),
                reason: "too large".into(),
            });
        }
        serde_json::from_str(text).map_err(|e| ApprovalError::Malformed {
            what: what.into(),
            reason: super::describe_json_error(&e),
        })
    }

    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fsutil::read_limited("approval token", path, FILE_LIMIT)?;
        serde_json::from_slice(&bytes).map_err(|e| ApprovalError::Malformed {
            what: format!("approval token {}", path.display()),
            reason: super::describe_json_error(&e),
        })
    }
}

/// An operator id: "op-" and the first 8 bytes of BLAKE3(public key), in hex.
/// Short enough to read out, stable for the key, and it changes with the key.
pub fn operator_id(public: &VerifyingKey) -> String {
    let h = blake3::hash(public.as_bytes());
    format!("op-{}", hex(&h.as_bytes()[..8]))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An operator's private signing key. Zeroized on drop (ed25519-dalek's
/// `zeroize` feature), redacted in `Debug`, stored only in a 0600 file.
pub struct OperatorKey {
    name: String,
    signing: SigningKey,
}

impl fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorKey")
            .field("name", &self.name)
            .field("id", &self.id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The on-disk form of an [`OperatorKey`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorKeyFile {
    format: u32,
    name: String,
    id: String,
    /// The 32-byte Ed25519 secret key, base64.
    secret_key: String,
}

impl Drop for OperatorKeyFile {
    fn drop(&mut self) {
        self.secret_key.zeroize();
    }
}

impl OperatorKey {
    /// A new random key pair for operator `name`.
    pub fn generate(name: &str) -> Self {
        // ed25519-dalek 3 wants a rand_core 0.10 RNG for `generate`; the
        // crate uses rand 0.8. `generate` only fills the 32 secret bytes from
        // the RNG, so fill them from the OS RNG here and build the same key.
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed[..]);
        Self {
            name: name.into(),
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half.
    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The operator id of this key.
    pub fn id(&self) -> String {
        operator_id(&self.public())
    }

    /// Signs `request`, producing a token.
    pub fn approve(&self, request: &ApprovalRequest) -> Approval {
        let sig = self.signing.sign(&request.canonical_bytes());
        Approval {
            operator: self.id(),
            request: request.clone(),
            signature: Base64::encode_string(&sig.to_bytes()),
        }
    }

    /// Writes the key to `path` with mode 0600; refuses to replace a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let seed = Zeroizing::new(self.signing.to_bytes());
        let file = OperatorKeyFile {
            format: FORMAT,
            name: self.name.clone(),
            id: self.id(),
            secret_key: Base64::encode_string(&seed[..]),
        };
        // Sized up front so the buffer holding the secret is never regrown
        // (a regrown buffer leaves a copy behind in freed memory).
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        serde_json::to_writer_pretty(&mut *out, &file).map_err(|e| ApprovalError::Malformed {
            what: "operator key".into(),
            reason: super::describe_json_error(&e),
        })?;
        fsutil::write_private_atomic("operator key file", path, &out, Replace::Never)?;
        Ok(())
    }

    /// Reads a key file written by [`OperatorKey::save`]. Refuses one that
    /// group or others can read, as ssh does.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Io {
            op: "stat",
            path: path.into(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ApprovalError::InsecureKeyFile {
                path: path.into(),
                mode,
            });
        }
        let bytes = Zeroizing::new(fsutil::read_limited("operator key file", path, FILE_LIMIT)?);
        let corrupt = |reason: String| {
            ApprovalError::File(KeyError::Corrupt {
                what: "operator key file",
                path: path.into(),
                reason,
            })
        };
        let file: OperatorKeyFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(super::describe_json_error(&e)))?;
        if file.format != FORMAT {
            return Err(corrupt(format!("unknown format {}", file.format)));
        }
        let seed = Zeroizing::new(
            Base64::decode_vec(&file.secret_key).map_err(|_| corrupt("invalid base64".into()))?,
        );
        let seed: &[u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret key is not 32 bytes".into()))?;
        let key = Self {
            name: file.name.clone(),
            signing: SigningKey::from_bytes(seed),
        };
        if key.id() != file.id {
            return Err(corrupt(format!(
                "id {} does not match the key (which is {})",
                file.id,
                key.id()
            )));
        }
        Ok(key)
    }
}

/// One registered operator: public data only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// Human name.
    pub name: String,
    /// [`operator_id`] of the public key.
    pub id: String,
    /// Ed25519 public key, standard base64.
    pub public_key: String,
    /// When it was registered (Unix seconds).
    pub added_unix: u64,
}

/// `POOL/operators.json`: the operators whose approvals count.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorRegistry {
    format: u32,
    operators: Vec<Operator>,
}

impl Default for OperatorRegistry {
    fn default() -> Self {
        Self {
            format: FORMAT,
            operators: Vec::new(),
        }
    }
}

impl OperatorRegistry {
    /// The registry file of the pool in `pool_dir`.
    pub fn path(pool_dir: &Path) -> PathBuf {
        pool_dir.join(OPERATORS_FILE)
    }

    /// Reads the registry; a pool without the file has no operators.
    pub fn load(pool_dir: &Path) -> Result<Self> {
        let path = Self::path(pool_dir);
        let bytes = match fsutil::read_limited("operator registry", &path, FILE_LIMIT) {
            Ok(b) => b,
            Err(KeyError::NotFound { .. }) => return Ok(Self::default()),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |reason: String| {
            ApprovalError::File(KeyError::Corrupt {
                what: "operator registry",
                path: path.clone(),
                reason,
            })
        };
        let reg: Self =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(super::describe_json_error(&e)))?;
        if reg.format != FORMAT {
            return Err(corrupt(format!("unknown format {}", reg.format)));
        }
        // An id that does not match its key would let a token name one
        // operator and be checked against another's key.
        for op in &reg.operators {
            let key =
                decode_public(&op.public_key).map_err(|r| corrupt(format!("{}: {r}", op.id)))?;
            if operator_id(&key) != op.id {
                return Err(corrupt(format!(
                    "{}: id does not match its public key",
                    op.id
                )));
            }
        }
        Ok(reg)
    }

    /// Writes the registry atomically.
    pub fn save(&self, pool_dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_private_atomic(
            "operator registry",
            &Self::path(pool_dir),
            &json,
            Replace::Allow,
        )?;
        Ok(())
    }

    /// Registers a public key under `name`; refuses a name or key already
    /// present.
    pub fn add(&mut self, name: &str, public: &VerifyingKey, now: u64) -> Result<&Operator> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !name_ok {
            return Err(ApprovalError::Malformed {
                what: "operator name".into(),
                reason: "use 1 to 64 letters, digits, '-', '_', '.' or '@'".into(),
            });
        }
        let id = operator_id(public);
        if self.operators.iter().any(|o| o.name == name) {
            return Err(ApprovalError::OperatorExists {
                what: "named",
                value: name.into(),
            });
        }
        if self.operators.iter().any(|o| o.id == id) {
            return Err(ApprovalError::OperatorExists {
                what: "with key id",
                value: id,
            });
        }
        self.operators.push(Operator {
            name: name.into(),
            id,
            public_key: Base64::encode_string(public.as_bytes()),
            added_unix: now,
        });
        Ok(self.operators.last().expect("just pushed"))
    }

    /// Every registered operator.
    pub fn operators(&self) -> &[Operator] {
        &self.operators
    }

    /// The operator with this id.
    pub fn get(&self, id: &str) -> Option<&Operator> {
        self.operators.iter().find(|o| o.id == id)
    }
}

fn decode_public(b64: &str) -> std::result::Result<VerifyingKey, &'static str> {
    let bytes = Base64::decode_vec(b64).map_err(|_| "public key is not base64")?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "public key is not 32 bytes")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not an Ed25519 public key")
}

/// Nonces already spent on an operation, with their expiry. Kept until the
/// request expires: after that the expiry check refuses it anyway.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsedNonces {
    format: u32,
    /// nonce → expires_unix
    used: BTreeMap<String, u64>,
}

impl Default for UsedNonces {
    fn default() -> Self {
        Self::new()
    }
}

impl UsedNonces {
    /// An empty set (tests, or a pool that never used approvals).
    pub fn new() -> Self {
        Self {
            format: FORMAT,
            used: BTreeMap::new(),
        }
    }

    /// The file of the pool in `pool_dir`.
    pub fn path(pool_dir: &Path) -> PathBuf {
        pool_dir.join(USED_NONCES_FILE)
    }

    /// Reads the pool's spent nonces and drops those expired before `now`.
    pub fn load(pool_dir: &Path, now: u64) -> Result<Self> {
        let path = Self::path(pool_dir);
        let mut set = match fsutil::read_limited("used approvals file", &path, FILE_LIMIT * 16) {
            Ok(bytes) => serde_json::from_slice::<Self>(&bytes).map_err(|e| {
                ApprovalError::File(KeyError::Corrupt {
                    what: "used approvals file",
                    path: path.clone(),
                    reason: super::describe_json_error(&e),
                })
            })?,
            Err(KeyError::NotFound { .. }) => Self::new(),
            Err(e) => return Err(e.into()),
        };
        set.prune(now);
        Ok(set)
    }

    /// Writes the set atomically.
    pub fn save(&self, pool_dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_private_atomic(
            "used approvals file",
            &Self::path(pool_dir),
            &json,
            Replace::Allow,
        )?;
        Ok(())
    }

    /// Forgets nonces whose requests expired before `now`. Pruning uses the
    /// same clock and the same skew as verification, so a pruned nonce is
    /// one verification refuses as expired.
    pub fn prune(&mut self, now: u64) {
        self.used
            .retain(|_, exp| exp.saturating_add(CLOCK_SKEW_SECS) >= now);
    }

    /// Whether `nonce` was spent.
    pub fn contains(&self, nonce: &str) -> bool {
        self.used.contains_key(nonce)
    }

    /// Marks `nonce` spent until `expires_unix`.
    pub fn insert(&mut self, nonce: &str, expires_unix: u64) {
        self.used.insert(nonce.into(), expires_unix);
    }

    /// How many nonces are held.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Checks `approvals` for `expected` against the operator registry and
/// returns the approving operator ids (sorted). On success the request's
/// nonce is added to `used` (in memory: the caller makes it durable before
/// acting, as [`authorize`] does).
///
/// Refuses, in this order: a token naming an unknown operator, a bad
/// signature, a malformed nonce, tokens signing different requests, a
/// request for another operation/zone/key, an expired or too long-lived
/// request, an operator appearing twice, fewer than `required` approvals, and
/// a nonce already spent. Any single bad token refuses the whole set: a
/// forged or stray token next to good ones is worth a human look.
pub fn verify_approvals(
    registry: &OperatorRegistry,
    required: usize,
    expected: &Target,
    approvals: &[Approval],
    now: u64,
    used: &mut UsedNonces,
) -> Result<Vec<String>> {
    if required < 2 {
        return Err(ApprovalError::Policy(format!(
            "{required} approval(s) configured; dual control needs at least 2"
        )));
    }
    let Some(first) = approvals.first() else {
        return Err(ApprovalError::NotEnough { got: 0, required });
    };
    for a in approvals {
        let op = registry
            .get(&a.operator)
            .ok_or_else(|| ApprovalError::UnknownOperator {
                operator: a.operator.clone(),
            })?;
        let public = decode_public(&op.public_key).map_err(|reason| ApprovalError::Malformed {
            what: format!("registered key of {}", op.id),
            reason: reason.into(),
        })?;
        let bad = || ApprovalError::BadSignature {
            operator: a.operator.clone(),
        };
        let sig_bytes = Base64::decode_vec(&a.signature).map_err(|_| bad())?;
        let sig = Signature::from_slice(&sig_bytes).map_err(|_| bad())?;
        public
            .verify_strict(&a.request.canonical_bytes(), &sig)
            .map_err(|_| bad())?;
        a.request.check_nonce()?;
    }
    for a in &approvals[1..] {
        if a.request != first.request {
            return Err(ApprovalError::DifferentRequests {
                first: first.operator.clone(),
                first_nonce: first.request.nonce.clone(),
                other: a.operator.clone(),
                other_nonce: a.request.nonce.clone(),
            });
        }
    }
    let request = &first.request;
    if request.target() != *expected {
        return Err(ApprovalError::WrongRequest {
            operator: first.operator.clone(),
            approved: request.target().to_string(),
            expected: expected.to_string(),
        });
    }
    if now >= request.expires_unix {
        return Err(ApprovalError::Expired {
            nonce: request.nonce.clone(),
            expires_unix: request.expires_unix,
            now,
        });
    }
    if request.expires_unix > now + MAX_LIFETIME.as_secs() + CLOCK_SKEW_SECS {
        return Err(ApprovalError::TooLongLived {
            nonce: request.nonce.clone(),
            expires_unix: request.expires_unix,
            max_secs: MAX_LIFETIME.as_secs(),
        });
    }
    let mut distinct = BTreeSet::new();
    for a in approvals {
        if !distinct.insert(a.operator.clone()) {
            return Err(ApprovalError::DuplicateOperator {
                operator: a.operator.clone(),
            });
        }
    }
    if distinct.len() < required {
        return Err(ApprovalError::NotEnough {
            got: distinct.len(),
            required,
        });
    }
    if used.contains(&request.nonce) {
        return Err(ApprovalError::Replayed {
            nonce: request.nonce.clone(),
        });
    }
    used.insert(&request.nonce, request.expires_unix);
    Ok(distinct.into_iter().collect())
}

/// Proof that a dual-controlled operation was approved: made only by
/// [`authorize`], after the nonce was durably spent. The operation takes it
/// by value, so one proof serves one operation.
#[derive(Debug)]
pub struct Authorized {
    target: Target,
    approvers: Vec<String>,
    nonce: String,
}

impl Authorized {
    /// What was approved.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The approving operator ids, for the audit record.
    pub fn approvers(&self) -> &[String] {
        &self.approvers
    }

    /// The request's nonce, for the audit record.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }
}

/// Holds an exclusive lock on `POOL/approvals.lock` while alive, so two
/// processes never both read, check and rewrite the registry or the spent
/// nonces at once (which would let the same approvals pass twice).
pub struct ApprovalLock(#[allow(dead_code)] File);

/// Takes the approvals lock of the pool in `pool_dir`, waiting for it.
pub fn lock(pool_dir: &Path) -> Result<ApprovalLock> {
    use std::os::fd::AsRawFd;
    let path = pool_dir.join(LOCK_FILE);
    let io = |op, source| {
        ApprovalError::File(KeyError::Io {
            op,
            path: path.clone(),
            source,
        })
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io("open", e))?;
    // SAFETY: flock only reads the integer fd, which `f` keeps open.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io("lock", std::io::Error::last_os_error()));
    }
    Ok(ApprovalLock(f))
}

/// Checks the approval token files for `expected` under the pool's policy,
/// durably spends the request's nonce, and returns the proof the operation
/// needs. Logs every attempt (accepted or refused) with the operator ids
/// involved; tokens hold only public data, so nothing secret is logged.
///
/// Other dual-controlled operations (destroy, compromise, root rotation)
/// call this with their own [`Target`] before changing anything.
pub fn authorize(
    pool_dir: &Path,
    policy: &DualControlSection,
    expected: &Target,
    token_files: &[PathBuf],
    now: u64,
) -> Result<Authorized> {
    authorize_with(pool_dir, policy, expected, now, || {
        token_files.iter().map(|p| Approval::load(p)).collect()
    })
}

/// [`authorize`] with the tokens' JSON texts (from the admin API) instead of files.
pub fn authorize_json(
    pool_dir: &Path,
    policy: &DualControlSection,
    expected: &Target,
    tokens: &[String],
    now: u64,
) -> Result<Authorized> {
    authorize_with(pool_dir, policy, expected, now, || {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| Approval::from_json(&format!("approval {}", i + 1), t))
            .collect()
    })
}

fn authorize_with(
    pool_dir: &Path,
    policy: &DualControlSection,
    expected: &Target,
    now: u64,
    load: impl FnOnce() -> Result<Vec<Approval>>,
) -> Result<Authorized> {
    // Ids as the tokens claim them: logged on refusal too, marked unverified.
    let mut claimed: Vec<String> = Vec::new();
    let mut nonce: Option<String> = None;
    let outcome = (|| {
        let approvals = load()?;
        claimed = approvals.iter().map(|a| a.operator.clone()).collect();
        nonce = approvals.first().map(|a| a.request.nonce.clone());
        let _lock = lock(pool_dir)?;
        let registry = OperatorRegistry::load(pool_dir)?;
        let mut used = UsedNonces::load(pool_dir, now)?;
        let approvers = verify_approvals(
            &registry,
            policy.approvals,
            expected,
            &approvals,
            now,
            &mut used,
        )?;
        // Spent before the operation starts: a crash after this point burns
        // the approvals rather than leaving them replayable.
        used.save(pool_dir)?;
        Ok(approvers)
    })();
    match outcome {
        Ok(approvers) => {
            let nonce = nonce.unwrap_or_default();
            tracing::info!(
                operation = %expected.operation,
                zone = expected.zone.as_deref().unwrap_or(""),
                key = expected.key.as_deref().unwrap_or(""),
                approvers = ?approvers,
                nonce = %nonce,
                "dual control: approvals accepted"
            );
            Ok(Authorized {
                target: expected.clone(),
                approvers,
                nonce,
            })
        }
        Err(e) => {
            tracing::warn!(
                operation = %expected.operation,
                zone = expected.zone.as_deref().unwrap_or(""),
                key = expected.key.as_deref().unwrap_or(""),
                presented_unverified = ?claimed,
                nonce = nonce.as_deref().unwrap_or(""),
                reason = %e,
                "dual control: approvals refused"
            );
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    struct Fixture {
        reg: OperatorRegistry,
        alice: OperatorKey,
        bob: OperatorKey,
        carol: OperatorKey,
        req: ApprovalRequest,
        target: Target,
    }

    fn fixture() -> Fixture {
        let mut reg = OperatorRegistry::default();
        let (alice, bob, carol) = (
            OperatorKey::generate("alice"),
            OperatorKey::generate("bob"),
            OperatorKey::generate("carol"),
        );
        for k in [&alice, &bob, &carol] {
            reg.add(k.name(), &k.public(), NOW).unwrap();
        }
        let target = Target::new(Operation::RotateKek, Some("z1"), None);
        let req = ApprovalRequest::new(target.clone(), NOW, Duration::from_secs(3600)).unwrap();
        Fixture {
            reg,
            alice,
            bob,
            carol,
            req,
            target,
        }
    }

    fn verify(
        f: &Fixture,
        approvals: &[Approval],
        now: u64,
        used: &mut UsedNonces,
    ) -> Result<Vec<String>> {
        verify_approvals(&f.reg, 2, &f.target, approvals, now, used)
    }

    #[test]
    fn two_distinct_operators_are_accepted_and_the_nonce_is_spent() {
        let f = fixture();
        let mut used = UsedNonces::new();
        let ids = verify(
            &f,
            &[f.alice.approve(&f.req), f.bob.approve(&f.req)],
            NOW + 10,
            &mut used,
        )
        .unwrap();
        let mut want = vec![f.alice.id(), f.bob.id()];
        want.sort();
        assert_eq!(ids, want);
        assert!(used.contains(&f.req.nonce));
        // Three of three also passes.
        let req2 = ApprovalRequest::new(f.target.clone(), NOW, Duration::from_secs(60)).unwrap();
        let all = [&f.alice, &f.bob, &f.carol].map(|k| k.approve(&req2));
        assert_eq!(verify(&f, &all, NOW, &mut used).unwrap().len(), 3);
    }

    #[test]
    fn too_few_approvals_are_refused() {
        let f = fixture();
        let mut used = UsedNonces::new();
        assert!(matches!(
            verify(&f, &[], NOW, &mut used),
            Err(ApprovalError::NotEnough {
                got: 0,
                required: 2
            })
        ));
        assert!(matches!(
            verify(&f, &[f.alice.approve(&f.req)], NOW, &mut used),
            Err(ApprovalError::NotEnough {
                got: 1,
                required: 2
            })
        ));
        assert!(used.is_empty(), "a refused set spends nothing");
    }

    #[test]
    fn the_same_operator_twice_is_refused() {
        let f = fixture();
        let a = f.alice.approve(&f.req);
        let e = verify(&f, &[a.clone(), a], NOW, &mut UsedNonces::new()).unwrap_err();
        assert!(
            matches!(&e, ApprovalError::DuplicateOperator { operator } if *operator == f.alice.id())
        );
        assert!(e.to_string().contains("more than once"), "{e}");
    }

    #[test]
    fn an_unknown_operator_is_refused() {
        let f = fixture();
        let mallory = OperatorKey::generate("mallory");
        let e = verify(
            &f,
            &[f.alice.approve(&f.req), mallory.approve(&f.req)],
            NOW,
            &mut UsedNonces::new(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ApprovalError::UnknownOperator { operator } if *operator == mallory.id())
        );
    }

    #[test]
    fn bad_signatures_are_refused() {
        let f = fixture();
        let mut used = UsedNonces::new();
        // Signed by someone else but claiming to be bob.
        let mallory = OperatorKey::generate("mallory");
        let mut forged = mallory.approve(&f.req);
        forged.operator = f.bob.id();
        let e = verify(&f, &[f.alice.approve(&f.req), forged], NOW, &mut used).unwrap_err();
        assert!(matches!(&e, ApprovalError::BadSignature { operator } if *operator == f.bob.id()));
        // A flipped signature bit, and garbage.
        let mut flipped = f.bob.approve(&f.req);
        let mut sig = Base64::decode_vec(&flipped.signature).unwrap();
        sig[5] ^= 1;
        flipped.signature = Base64::encode_string(&sig);
        assert!(matches!(
            verify(&f, &[f.alice.approve(&f.req), flipped], NOW, &mut used),
            Err(ApprovalError::BadSignature { .. })
        ));
        let mut garbage = f.bob.approve(&f.req);
        garbage.signature = "not base64!".into();
        assert!(matches!(
            verify(&f, &[f.alice.approve(&f.req), garbage], NOW, &mut used),
            Err(ApprovalError::BadSignature { .. })
        ));
        // A request edited after signing (zone changed) no longer verifies.
        let mut edited = f.bob.approve(&f.req);
        edited.request.zone = Some("z2".into());
        assert!(matches!(
            verify(&f, &[f.alice.approve(&f.req), edited], NOW, &mut used),
            Err(ApprovalError::BadSignature { .. })
        ));
        assert!(used.is_empty());
    }

    #[test]
    fn expired_and_too_long_lived_requests_are_refused() {
        let f = fixture();
        let both = [f.alice.approve(&f.req), f.bob.approve(&f.req)];
        let e = verify(&f, &both, f.req.expires_unix, &mut UsedNonces::new()).unwrap_err();
        assert!(matches!(e, ApprovalError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
        // Valid until far in the future: a standing authorisation.
        let mut long = f.req.clone();
        long.expires_unix = NOW + 365 * 86400;
        let both = [f.alice.approve(&long), f.bob.approve(&long)];
        assert!(matches!(
            verify(&f, &both, NOW, &mut UsedNonces::new()),
            Err(ApprovalError::TooLongLived { .. })
        ));
        assert!(
            ApprovalRequest::new(f.target.clone(), NOW, Duration::from_secs(8 * 86400)).is_err()
        );
    }

    #[test]
    fn a_request_for_another_operation_zone_or_key_is_refused() {
        let f = fixture();
        for target in [
            Target::new(Operation::DestroyKey, Some("z1"), None),
            Target::new(Operation::RotateKek, Some("z2"), None),
            Target::new(Operation::RotateKek, Some("z1"), Some("z1-kek-v1")),
            Target::new(Operation::RotateKek, None, None),
        ] {
            let req = ApprovalRequest::new(target, NOW, Duration::from_secs(60)).unwrap();
            let e = verify(
                &f,
                &[f.alice.approve(&req), f.bob.approve(&req)],
                NOW,
                &mut UsedNonces::new(),
            )
            .unwrap_err();
            assert!(matches!(e, ApprovalError::WrongRequest { .. }), "{e}");
            assert!(
                e.to_string().contains("but this is rotate-kek of zone z1"),
                "{e}"
            );
        }
    }

    #[test]
    fn approvals_of_different_requests_are_refused() {
        let f = fixture();
        let other = ApprovalRequest::new(f.target.clone(), NOW, Duration::from_secs(3600)).unwrap();
        let e = verify(
            &f,
            &[f.alice.approve(&f.req), f.bob.approve(&other)],
            NOW,
            &mut UsedNonces::new(),
        )
        .unwrap_err();
        assert!(matches!(e, ApprovalError::DifferentRequests { .. }), "{e}");
        // Same nonce, different expiry: still not the same request.
        let mut later = f.req.clone();
        later.expires_unix += 1;
        let e = verify(
            &f,
            &[f.alice.approve(&f.req), f.bob.approve(&later)],
            NOW,
            &mut UsedNonces::new(),
        )
        .unwrap_err();
        assert!(matches!(e, ApprovalError::DifferentRequests { .. }), "{e}");
    }

    #[test]
    fn a_replayed_nonce_is_refused_durably_until_expiry() {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let both = [f.alice.approve(&f.req), f.bob.approve(&f.req)];
        let mut used = UsedNonces::load(dir.path(), NOW).unwrap();
        verify(&f, &both, NOW, &mut used).unwrap();
        used.save(dir.path()).unwrap();
        let mode = std::fs::metadata(UsedNonces::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut used = UsedNonces::load(dir.path(), NOW + 60).unwrap();
        let e = verify(&f, &both, NOW + 60, &mut used).unwrap_err();
        assert!(
            matches!(&e, ApprovalError::Replayed { nonce } if *nonce == f.req.nonce),
            "{e}"
        );

        // Pruned once expired (plus skew); the expiry check refuses it then.
        let late = f.req.expires_unix + CLOCK_SKEW_SECS + 1;
        let mut used = UsedNonces::load(dir.path(), late).unwrap();
        assert!(!used.contains(&f.req.nonce));
        assert!(matches!(
            verify(&f, &both, late, &mut used),
            Err(ApprovalError::Expired { .. })
        ));
    }

    #[test]
    fn malformed_nonce_and_weak_policy_are_refused() {
        let f = fixture();
        let mut req = f.req.clone();
        req.nonce = "1234".into();
        let both = [f.alice.approve(&req), f.bob.approve(&req)];
        assert!(matches!(
            verify(&f, &both, NOW, &mut UsedNonces::new()),
            Err(ApprovalError::Malformed { .. })
        ));
        let both = [f.alice.approve(&f.req), f.bob.approve(&f.req)];
        assert!(matches!(
            verify_approvals(&f.reg, 1, &f.target, &both, NOW, &mut UsedNonces::new()),
            Err(ApprovalError::Policy(_))
        ));
        // Two approvals are not enough when three are required.
        assert!(matches!(
            verify_approvals(&f.reg, 3, &f.target, &both, NOW, &mut UsedNonces::new()),
            Err(ApprovalError::NotEnough {
                got: 2,
                required: 3
            })
        ));
    }

    #[test]
    fn canonical_encoding_is_length_prefixed_and_unambiguous() {
        let req = ApprovalRequest {
            operation: Operation::RotateKek,
            zone: Some("z1".into()),
            key: None,
            nonce: "00112233445566778899aabbccddeeff".into(),
            expires_unix: 0x0102030405060708,
        };
        let mut want = Vec::new();
        want.extend_from_slice(&19u32.to_be_bytes());
        want.extend_from_slice(b"keyturn-approval-v1");
        want.extend_from_slice(&10u32.to_be_bytes());
        want.extend_from_slice(b"rotate-kek");
        want.extend_from_slice(&[1, 0, 0, 0, 2]);
        want.extend_from_slice(b"z1");
        want.push(0);
        want.extend_from_slice(&32u32.to_be_bytes());
        want.extend_from_slice(b"00112233445566778899aabbccddeeff");
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(req.canonical_bytes(), want);
        // Moving characters between fields changes the bytes.
        let mut a = req.clone();
        a.zone = Some("ab".into());
        a.key = Some("c".into());
        let mut b = req.clone();
        b.zone = Some("a".into());
        b.key = Some("bc".into());
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        let mut empty = req.clone();
        empty.zone = Some(String::new());
        let mut none = req;
        none.zone = None;
        assert_ne!(empty.canonical_bytes(), none.canonical_bytes());
    }

    #[test]
    fn operator_keys_and_registry_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let key = OperatorKey::generate("alice");
        assert!(
            key.id().starts_with("op-") && key.id().len() == 19,
            "{}",
            key.id()
        );
        let dbg = format!("{key:?}");
        assert!(dbg.contains("redacted"), "{dbg}");
        let seed_b64 = Base64::encode_string(&key.signing.to_bytes());
        assert!(!dbg.contains(&seed_b64));

        let path = dir.path().join("alice.key");
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            key.save(&path),
            Err(ApprovalError::File(KeyError::AlreadyExists { .. }))
        ));
        let back = OperatorKey::load(&path).unwrap();
        assert_eq!(back.id(), key.id());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            OperatorKey::load(&path),
            Err(ApprovalError::InsecureKeyFile { .. })
        ));

        let mut reg = OperatorRegistry::load(dir.path()).unwrap();
        assert!(reg.operators().is_empty());
        reg.add("alice", &key.public(), NOW).unwrap();
        assert!(matches!(
            reg.add("alice", &OperatorKey::generate("x").public(), NOW),
            Err(ApprovalError::OperatorExists { .. })
        ));
        assert!(matches!(
            reg.add("alice2", &key.public(), NOW),
            Err(ApprovalError::OperatorExists { .. })
        ));
        reg.save(dir.path()).unwrap();
        let back = OperatorRegistry::load(dir.path()).unwrap();
        assert_eq!(back.operators(), reg.operators());
        let text = std::fs::read_to_string(OperatorRegistry::path(dir.path())).unwrap();
        assert!(
            !text.contains(&seed_b64),
            "the registry holds public keys only"
        );

        // An entry whose id does not match its key is refused on load.
        let tampered = text.replace(&key.id(), "op-0000000000000000");
        std::fs::write(OperatorRegistry::path(dir.path()), tampered).unwrap();
        assert!(OperatorRegistry::load(dir.path()).is_err());
    }

    #[test]
    fn authorize_spends_the_nonce_and_refuses_a_replay() {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        f.reg.save(dir.path()).unwrap();
        let policy = DualControlSection {
            required: true,
            approvals: 2,
        };
        let files: Vec<PathBuf> = [&f.alice, &f.bob]
            .iter()
            .map(|k| {
                let p = dir.path().join(format!("{}.approval", k.name()));
                k.approve(&f.req).save(&p).unwrap();
                p
            })
            .collect();
        let auth = authorize(dir.path(), &policy, &f.target, &files, NOW).unwrap();
        assert_eq!(auth.approvers().len(), 2);
        assert_eq!(auth.nonce(), f.req.nonce);
        assert!(matches!(
            authorize(dir.path(), &policy, &f.target, &files, NOW + 1),
            Err(ApprovalError::Replayed { .. })
        ));
    }
}
