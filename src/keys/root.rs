//! The root of the key hierarchy, behind a trait.
//!
//! A provider wraps and unwraps keys (in practice, zone KEKs) under a root
//! key it never hands out. The passphrase-sealed file
//! ([`SealedFileProvider`](super::SealedFileProvider)) keeps the root key in
//! process memory; a PKCS#11 provider keeps it inside the token and sends it
//! only the key to wrap. Nothing in this trait assumes either.

use zeroize::Zeroizing;

use super::KeyError;
use super::wrap::KeyLabel;

/// Wraps and unwraps keys under a root key that the caller never sees.
///
/// Implementations must bind `label` to the wrapped bytes (as associated
/// data or an equivalent attribute), so that `unwrap_key` under any other
/// label fails with [`KeyError::Unwrap`].
pub trait RootKeyProvider: Send + Sync {
    /// Wraps `key` (the raw bytes of a KEK) under the root key, bound to
    /// `label`. The returned bytes are safe to store.
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// Unwraps bytes produced by [`wrap_key`](Self::wrap_key) with the same
    /// label. Wrong label, tampered bytes or another root key fail.
    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError>;

    /// A one-line description for logs and status output (kind and location,
    /// never key material), e.g. `sealed root key file /etc/keyturn/root.json`.
    fn describe(&self) -> String;

    /// The id to record on keys this provider wraps (a KEK record's
    /// `wrapped_by_root`). `None` for a single root key: pool.toml names the
    /// only root key there is. A root key rotation in progress names its new
    /// root key, which is the one that wraps.
    fn root_id(&self) -> Option<&str> {
        None
    }

    /// Unwraps a key whose record says root key `root` wrapped it (`None`:
    /// not recorded). A single root key ignores the record, so a sealed file
    /// moved and renamed in pool.toml still opens; a root key rotation in
    /// progress routes by it to the old or the new root key.
    fn unwrap_key_from(
        &self,
        root: Option<&str>,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let _ = root;
        self.unwrap_key(label, wrapped)
    }

    /// An Ed25519 signing key that lives where the root key does and never
    /// leaves it (a PKCS#11 token with `CKM_EDDSA`), for the audit chain.
    /// `existing` names a key made earlier (its [`TokenSigner::key_name`]);
    /// `None` makes a new one. `Ok(None)`: this provider cannot sign inside
    /// (sealed file, KMIP, a token without EdDSA), so the caller keeps a
    /// wrapped key instead.
    fn audit_signer(
        &self,
        existing: Option<&str>,
    ) -> Result<Option<Box<dyn TokenSigner>>, KeyError> {
        let _ = existing;
        Ok(None)
    }
}

/// An Ed25519 private key held by a key store that signs for us; the
/// private key is never in process memory.
pub trait TokenSigner: Send + Sync + std::fmt::Debug {
    /// The name of the key in its store (a PKCS#11 `CKA_LABEL`), kept in
    /// the pool so the key can be found again.
    fn key_name(&self) -> &str;

    /// Where the key lives, for logs (token label; never key material).
    fn location(&self) -> String;

    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> [u8; 32];

    /// A pure Ed25519 signature (RFC 8032) of `msg`.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError>;
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A root key held in memory, for tests that need a provider without
    //! paying for Argon2.

    use super::*;
    use crate::keys::secret::RootKey;
    use crate::keys::wrap;

    /// An in-memory root key. Test-only: production roots are sealed or in
    /// an HSM.
    #[derive(Debug)]
    pub(crate) struct MemoryProvider(pub(crate) RootKey);

    impl MemoryProvider {
        pub(crate) fn new() -> Self {
            Self(RootKey::generate())
        }
    }

    impl RootKeyProvider for MemoryProvider {
        fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
            wrap::wrap(&self.0, label, key)
        }

        fn unwrap_key(
            &self,
            label: &KeyLabel,
            wrapped: &[u8],
        ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            wrap::unwrap(&self.0, label, wrapped)
        }

        fn describe(&self) -> String {
            "in-memory test root key".into()
        }
    }
}
