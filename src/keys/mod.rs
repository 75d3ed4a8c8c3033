//! The key hierarchy: root key → per-zone KEK versions → per-zone DEKs and
//! MAC key. Only wrapped keys are ever stored.
//!
//! ```text
//! RootKeyProvider (passphrase-sealed file, or a PKCS#11 token)
//!   └─ wraps  KEK v1, v2, …            (one zone; AES-256)
//!        └─ wraps  DEK v1, v2, …       (one per rotation epoch; AES-256-XTS)
//!        └─ wraps  MAC key             (keyed BLAKE3 for tags and dedup)
//! ```
//!
//! - [`wrap`]: AES-256-GCM key wrapping whose associated data is the wrapped
//!   key's [`KeyLabel`], so one wrapped key cannot stand in for another.
//! - [`root`]: the [`RootKeyProvider`] trait. It never hands out the root key
//!   itself, so an HSM can implement it.
//! - [`sealed`]: [`SealedFileProvider`], the root key sealed under a
//!   passphrase (Argon2id + AES-256-GCM) in a JSON file.
//! - [`pkcs11`]: [`Pkcs11Provider`], the root key inside a PKCS#11 token
//!   (AES-256, sensitive, non-extractable); wrapping happens in the token.
//! - [`kmip`]: [`KmipProvider`], the root key inside a KMIP key manager
//!   reached over mutual TLS; wrapping happens in the KMS.
//! - [`root_rotation`]: the record of a root key rotation in progress and
//!   the [`RootPair`](root_rotation::RootPair) of root keys that serves
//!   meanwhile (the re-wrap itself is driven by the pool).
//! - [`passphrase`]: [`Passphrase`] and where it comes from.
//! - [`zone_keys`]: a zone's key file (wrapped keys plus NIST SP 800-57 state)
//!   and the unlocked [`ZoneKeyring`].
//!
//! DESIGN invariant 8 holds here: no error message, `Debug` string or log line
//! carries key bytes or a passphrase. Errors name keys by label and files by
//! path; messages that come from parsers are reduced to their kind and
//! position, because parsers echo the input they choke on.

pub mod approval;
pub mod backup;
pub(crate) mod fsutil;
pub mod kmip;
pub mod passphrase;
pub mod pkcs11;
pub mod pkcs11_sign;
pub mod root;
pub mod root_rotation;
pub mod sealed;
pub mod secret;
pub mod wrap;
pub mod zone_keys;

#[cfg(test)]
mod leak_tests;

use std::path::PathBuf;

use crate::ids::ZoneId;

pub use kmip::{KmipConfig, KmipProvider};
pub use passphrase::{PASSPHRASE_ENV, Passphrase};
pub use pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
pub use root::{RootKeyProvider, TokenSigner};
pub use sealed::{KdfParams, SealedFileProvider};
pub use secret::{DataKey, Kek, MacKey, RootKey, mlock_failures};
pub use wrap::{KeyLabel, Purpose, WrappingKey};
pub use zone_keys::{KeyRecord, KeyState, ZoneKeyFile, ZoneKeyring};

/// Everything that can go wrong while storing or unlocking keys.
///
/// Messages name labels, paths and counts only: never key bytes, wrapped
/// bytes or passphrases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A wrapped key did not unwrap: wrong wrapping key, wrong label, or
    /// altered bytes. AES-GCM cannot tell these apart, and says so.
    #[error("cannot unwrap key {label}: {reason}")]
    Unwrap {
        /// The label of the key that was being unwrapped.
        label: String,
        /// What failed, without any bytes.
        reason: String,
    },

    /// The passphrase did not open the sealed root key file. A corrupt file
    /// looks the same to AES-GCM.
    #[error("wrong passphrase for root key file {} (or the file is corrupt)", path.display())]
    WrongPassphrase {
        /// The sealed root key file.
        path: PathBuf,
    },

    /// A key file that should exist does not.
    #[error("{what} {} does not exist", path.display())]
    NotFound {
        /// What the file is ("root key file", "zone key file", …).
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },

    /// Creating a key file would have replaced an existing one.
    #[error("{what} {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// What the file is.
        what: &'static str,
        /// The existing file.
        path: PathBuf,
    },

    /// A key file could not be parsed or fails its own consistency rules.
    #[error("{what} {} is corrupt or not a keyturn key file: {reason}", path.display())]
    Corrupt {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (kind and position, never content).
        reason: String,
    },

    /// A key file of a format version this build does not know.
    #[error("{what} {} has format version {found}; this build reads version {supported}", path.display())]
    UnsupportedFormat {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    /// Reading or writing a file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "rename", …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Key derivation parameters out of range, or the KDF failed.
    #[error("key derivation (Argon2id): {reason}")]
    Kdf {
        /// What is wrong.
        reason: String,
    },

    /// No passphrase source was available.
    #[error(
        "no passphrase given: use a passphrase file, set {env_var}, \
         or run on a terminal to be prompted"
    )]
    NoPassphrase {
        /// The environment variable that was consulted.
        env_var: String,
    },

    /// A passphrase was found but cannot be used.
    #[error("the passphrase from {origin} is unusable: {reason}")]
    BadPassphrase {
        /// Where it came from ("file /x", "environment variable X", "terminal").
        origin: String,
        /// Why ("empty", "not valid UTF-8", …).
        reason: &'static str,
    },

    /// Key material of the wrong shape (length, equal XTS halves, …).
    #[error("key {label} is invalid: {reason}")]
    InvalidKey {
        /// The key's label.
        label: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {}: {reason}", module.display())]
    Pkcs11Module {
        /// The module (shared library) path.
        module: PathBuf,
        /// What failed.
        reason: String,
    },

    /// No token with the configured label is present.
    #[error(
        "no PKCS#11 token labelled {token:?} through module {}; tokens present: {available}",
        module.display()
    )]
    TokenNotFound {
        /// The configured token label.
        token: String,
        /// The module searched.
        module: PathBuf,
        /// Labels of the tokens that are present, or "none".
        available: String,
    },

    /// The token refused the user PIN.
    #[error("wrong user PIN for PKCS#11 token {token:?}")]
    WrongPin {
        /// The token's label.
        token: String,
    },

    /// The token holds no root key with the configured label.
    #[error(
        "PKCS#11 token {token:?} holds no AES key labelled {key:?}; \
         create one with `keyturn init --root-key pkcs11` or fix key_label in pool.toml"
    )]
    RootKeyMissing {
        /// The configured key label.
        key: String,
        /// The token's label.
        token: String,
    },

    /// Creating the root key would have shadowed an existing one.
    #[error(
        "PKCS#11 token {token:?} already holds a key labelled {key:?}; refusing to create another"
    )]
    RootKeyExists {
        /// The key label.
        key: String,
        /// The token's label.
        token: String,
    },

    /// Another PKCS#11 operation failed.
    #[error("cannot {op} PKCS#11 token {token:?}: {reason}")]
    Pkcs11 {
        /// What was being done, phrased to precede "PKCS#11 token".
        op: &'static str,
        /// The token's label.
        token: String,
        /// The PKCS#11 function and return value, never data.
        reason: String,
    },

    /// No PIN source was available.
    #[error("no PKCS#11 user PIN given: use a PIN file (--pin-file) or set {env_var}")]
    NoPin {
        /// The environment variable that was consulted.
        env_var: String,
    },

    /// A PIN was found but cannot be used.
    #[error("the PKCS#11 PIN from {origin} is unusable: {reason}")]
    BadPin {
        /// Where it came from.
        origin: String,
        /// Why.
        reason: &'static str,
    },

    /// The KMIP server holding the root key did not answer (refused
    /// connection, failed TLS handshake, timeout).
    #[error("the KMIP server at {addr} is unreachable: cannot {op} it: {reason}")]
    KmsUnreachable {
        /// `host:port` of the KMS.
        addr: String,
        /// What was being done, phrased to precede "it".
        op: &'static str,
        /// What failed (OS or TLS error), never data.
        reason: String,
    },

    /// The KMIP server answered but refused, or answered nonsense.
    #[error("cannot {op} the KMIP server at {addr}: {reason}")]
    Kms {
        /// `host:port` of the KMS.
        addr: String,
        /// What was being done, phrased to precede "the KMIP server".
        op: &'static str,
        /// The KMS's result reason and message, never data.
        reason: String,
    },

    /// A zone's key records do not form a usable key chain.
    #[error("keys of zone {zone}: {reason}")]
    Inconsistent {
        /// The zone.
        zone: ZoneId,
        /// What is missing or contradictory.
        reason: String,
    },

    /// NIST SP 800-57 does not allow this change of state.
    #[error("key {key} cannot go from {from} to {to}")]
    IllegalTransition {
        /// Key id.
        key: String,
        /// Current state.
        from: String,
        /// Requested state.
        to: String,
    },

    /// The key still protects data or other keys.
    #[error("key {key} cannot be destroyed: {reason}")]
    InUse {
        /// Key id.
        key: String,
        /// What still depends on it.
        reason: String,
    },

    /// No key with that id in the zone.
    #[error("zone {zone} has no key {key}")]
    UnknownKey {
        /// The zone.
        zone: ZoneId,
        /// Key id asked for.
        key: String,
    },
}

/// Describes a JSON parse failure by kind and position only. serde_json's own
/// messages quote the offending input, and key files hold wrapped key bytes
/// that have no business in an error.
pub(crate) fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "malformed JSON",
        Category::Data => "unexpected or missing field or value",
        Category::Eof => "file ends early",
    };
    format!("{kind} at line {}, column {}", e.line(), e.column())
}
