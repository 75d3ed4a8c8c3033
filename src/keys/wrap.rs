//! AES-256-GCM key wrapping, bound to the wrapped key's identity.
//!
//! Wrapped form:
//!
//! ```text
//! offset  size  field
//! 0       1     wrap format version (WRAP_VERSION = 1)
//! 1       12    nonce (96 bits from the OS generator, fresh per wrap)
//! 13      n     ciphertext of the key (n = key length)
//! 13+n    16    GCM tag
//! ```
//!
//! The associated data is the canonical encoding of the [`KeyLabel`], so a
//! wrapped DEK v1 cannot be presented as DEK v2, as another zone's DEK, or as
//! a MAC key, and the version byte cannot be changed:
//!
//! ```text
//! u32 LE len || "keyturn/key-label"   domain separation
//! u8         wrap format version
//! u32 LE len || key_id (UTF-8)
//! u32 LE     zone
//! u8         purpose (1 root, 2 kek, 3 dek, 4 mac)
//! u32 LE     version
//! ```
//!
//! Random 96-bit nonces are safe here: a wrapping key wraps at most a few
//! thousand keys in its life, far below the 2^32 bound for random GCM nonces.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;
use super::secret::{Kek, RootKey};
use crate::ids::ZoneId;

/// Version byte at the start of every wrapped key.
pub const WRAP_VERSION: u8 = 1;
/// Nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes a wrapped key adds to the key it wraps.
pub const WRAP_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// Largest key this module wraps; anything bigger is a caller's mistake.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;

const LABEL_DOMAIN: &[u8] = b"keyturn/key-label";

/// What a key is for; part of its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// The root key (wraps KEKs).
    Root,
    /// A zone's key-encryption key (wraps DEKs and the MAC key).
    Kek,
    /// A zone's data encryption key for one epoch.
    Dek,
    /// A zone's MAC key.
    Mac,
    /// A set of a zone's stream window keys (see [`crate::stream::keyset`]).
    Stream,
}

impl Purpose {
    /// The stable code used in the label encoding. Never renumber.
    fn code(self) -> u8 {
        match self {
            Purpose::Root => 1,
            Purpose::Kek => 2,
            Purpose::Dek => 3,
            Purpose::Mac => 4,
            Purpose::Stream => 5,
        }
    }

    /// Short lower-case name, as used in key ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Root => "root",
            Purpose::Kek => "kek",
            Purpose::Dek => "dek",
            Purpose::Mac => "mac",
            Purpose::Stream => "stream",
        }
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a wrapped key. It is authenticated (not encrypted) with
/// the key, so unwrapping under any other label fails.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyLabel {
    /// Human-readable id, e.g. `z3-dek-v1`.
    pub key_id: String,
    /// The zone the key belongs to.
    pub zone: ZoneId,
    /// What the key is for.
    pub purpose: Purpose,
    /// The key's version within its zone and purpose.
    pub version: u32,
}

impl KeyLabel {
    /// A label with the conventional id `z{zone}-{purpose}-v{version}`.
    pub fn new(zone: ZoneId, purpose: Purpose, version: u32) -> Self {
        Self {
            key_id: format!("z{}-{}-v{}", zone.0, purpose.as_str(), version),
            zone,
            purpose,
            version,
        }
    }

    /// The key id (`z{zone}-{purpose}-v{version}` for labels made by [`KeyLabel::new`]).
    pub fn id(&self) -> String {
        self.key_id.clone()
    }

    /// The canonical byte encoding used as associated data (see module docs).
    pub fn to_aad(&self) -> Vec<u8> {
        let id = self.key_id.as_bytes();
        let mut out = Vec::with_capacity(4 + LABEL_DOMAIN.len() + 1 + 4 + id.len() + 4 + 1 + 4);
        put_bytes(&mut out, LABEL_DOMAIN);
        out.push(WRAP_VERSION);
        put_bytes(&mut out, id);
        out.extend_from_slice(&self.zone.0.to_le_bytes());
        out.push(self.purpose.code());
        out.extend_from_slice(&self.version.to_le_bytes());
        out
    }
}

impl std::fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (zone {}, {} v{})",
            self.key_id, self.zone, self.purpose, self.version
        )
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Key ids are short; a length that does not fit u32 cannot occur, and
    // saturating would still keep the encoding injective for real inputs.
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

/// A 256-bit key that may wrap other keys: a [`Kek`] or the [`RootKey`].
pub trait WrappingKey: private::Sealed {
    /// The raw AES-256 key; only the wrapping code reads it.
    #[doc(hidden)]
    fn wrapping_bytes(&self) -> &[u8; 32];
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::Kek {}
    impl Sealed for super::RootKey {}
}

impl WrappingKey for Kek {
    fn wrapping_bytes(&self) -> &[u8; 32] {
        self.expose()
    }
}

impl WrappingKey for RootKey {
    fn wrapping_bytes(&self) -> &[u8; 32] {
        self.expose()
    }
}

/// Wraps `plaintext` (a key) under `wrapping`, bound to `label`.
///
/// Fails only for an empty or oversized key (caller misuse).
pub fn wrap(
    wrapping: &impl WrappingKey,
    label: &KeyLabel,
    plaintext: &[u8],
) -> Result<Vec<u8>, KeyError> {
    seal(wrapping.wrapping_bytes(), label, plaintext)
}

/// Unwraps a key wrapped by [`wrap`] under the same key and label.
pub fn unwrap(
    wrapping: &impl WrappingKey,
    label: &KeyLabel,
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    open(wrapping.wrapping_bytes(), label, wrapped)
}

fn seal(key: &[u8; 32], label: &KeyLabel, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
    if plaintext.is_empty() || plaintext.len() > MAX_WRAPPED_KEY_LEN {
        return Err(KeyError::InvalidKey {
            label: label.to_string(),
            reason: format!(
                "a wrapped key must be 1..={MAX_WRAPPED_KEY_LEN} bytes, got {}",
                plaintext.len()
            ),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);

    // Encrypt in place inside the output buffer, with room for the tag
    // reserved up front: no reallocation can leave a plaintext copy behind.
    let mut out = Vec::with_capacity(WRAP_OVERHEAD + plaintext.len());
    out.push(WRAP_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let cipher = Aes256Gcm::new(key.into());
    let tag = cipher
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &label.to_aad(),
            &mut out[1 + NONCE_LEN..],
        )
        .map_err(|_| KeyError::InvalidKey {
            label: label.to_string(),
            reason: "AES-GCM refused to encrypt it".into(),
        })?;
    out.extend_from_slice(&tag);
    Ok(out)
}

fn open(key: &[u8; 32], label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let fail = |reason: String| KeyError::Unwrap {
        label: label.to_string(),
        reason,
    };
    if wrapped.len() <= WRAP_OVERHEAD {
        return Err(fail(format!(
            "wrapped key is {} bytes, shorter than the minimum {}",
            wrapped.len(),
            WRAP_OVERHEAD + 1
        )));
    }
    if wrapped[0] != WRAP_VERSION {
        return Err(fail(format!(
            "unknown wrap format version {} (expected {WRAP_VERSION})",
            wrapped[0]
        )));
    }
    let nonce = Nonce::from_slice(&wrapped[1..1 + NONCE_LEN]);
    let body = &wrapped[1 + NONCE_LEN..];
    let (ct, tag) = body.split_at(body.len() - TAG_LEN);

    // Decrypt into a zeroizing buffer so the plaintext never sits in memory
    // that is freed without being wiped.
    let mut buf = Zeroizing::new(ct.to_vec());
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt_in_place_detached(nonce, &label.to_aad(), &mut buf[..], tag.into())
        .map_err(|_| {
            fail("authentication failed (wrong wrapping key, wrong label, or altered bytes)".into())
        })?;
    Ok(buf)
}

/// Seals `plaintext` under a raw 256-bit key with caller-chosen associated
/// data; for the sealed root key file, whose key comes from a KDF.
pub(crate) fn seal_raw(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    let tag = Aes256Gcm::new(key.into())
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out[..])
        .ok()?;
    out.extend_from_slice(&tag);
    Some(out)
}

/// Opens what [`seal_raw`] sealed; `None` if authentication fails.
pub(crate) fn open_raw(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < TAG_LEN {
        return None;
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut buf = Zeroizing::new(ct.to_vec());
    Aes256Gcm::new(key.into())
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf[..], tag.into())
        .ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> KeyLabel {
        KeyLabel::new(ZoneId(3), Purpose::Dek, 1)
    }

    #[test]
    fn round_trip() {
        let kek = Kek::generate();
        let dek = DataKeyBytes::random();
        let w = wrap(&kek, &label(), &dek.0).unwrap();
        assert_eq!(w.len(), 64 + WRAP_OVERHEAD);
        assert_eq!(w[0], WRAP_VERSION);
        let back = unwrap(&kek, &label(), &w).unwrap();
        assert_eq!(&back[..], &dek.0[..]);
        // Fresh nonce each time.
        assert_ne!(w, wrap(&kek, &label(), &dek.0).unwrap());
    }

    #[test]
    fn root_key_wraps_too() {
        let root = RootKey::generate();
        let l = KeyLabel::new(ZoneId(1), Purpose::Kek, 2);
        let w = wrap(&root, &l, &[7u8; 32]).unwrap();
        assert_eq!(&unwrap(&root, &l, &w).unwrap()[..], &[7u8; 32]);
    }

    #[test]
    fn tampering_anywhere_fails() {
        let kek = Kek::generate();
        let w = wrap(&kek, &label(), &[9u8; 64]).unwrap();
        for i in 0..w.len() {
            let mut t = w.clone();
            t[i] ^= 0x01;
            let e = unwrap(&kek, &label(), &t).unwrap_err();
            assert!(matches!(e, KeyError::Unwrap { .. }), "byte {i}: {e}");
            assert!(e.to_string().contains("z3-dek-v1"), "{e}");
        }
        // Truncated and extended.
        assert!(matches!(
            unwrap(&kek, &label(), &w[..w.len() - 1]),
            Err(KeyError::Unwrap { .. })
        ));
        let mut longer = w.clone();
        longer.push(0);
        assert!(matches!(
            unwrap(&kek, &label(), &longer),
            Err(KeyError::Unwrap { .. })
        ));
        assert!(matches!(
            unwrap(&kek, &label(), &w[..WRAP_OVERHEAD]),
            Err(KeyError::Unwrap { .. })
        ));
    }

    #[test]
    fn wrong_label_each_field_fails() {
        let kek = Kek::generate();
        let l = label();
        let w = wrap(&kek, &l, &[1u8; 64]).unwrap();
        let variants = [
            KeyLabel {
                key_id: "z3-dek-v1x".into(),
                ..l.clone()
            },
            KeyLabel {
                zone: ZoneId(4),
                ..l.clone()
            },
            KeyLabel {
                purpose: Purpose::Mac,
                ..l.clone()
            },
            KeyLabel {
                version: 2,
                ..l.clone()
            },
        ];
        for bad in &variants {
            let e = unwrap(&kek, bad, &w).unwrap_err();
            assert!(matches!(e, KeyError::Unwrap { .. }));
            assert!(e.to_string().contains(&bad.key_id), "{e}");
        }
    }

    #[test]
    fn wrong_key_fails() {
        let w = wrap(&Kek::generate(), &label(), &[1u8; 32]).unwrap();
        let e = unwrap(&Kek::generate(), &label(), &w).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }));
        assert!(e.to_string().contains("wrong wrapping key"), "{e}");
    }

    #[test]
    fn label_encoding_is_injective_on_id_boundaries() {
        // Length prefixes keep ("ab", …) and ("a", …) apart even when the
        // following fields could otherwise be read as a continuation.
        let a = KeyLabel {
            key_id: "a".into(),
            ..label()
        };
        let b = KeyLabel {
            key_id: "a\u{3}".into(),
            ..label()
        };
        assert_ne!(a.to_aad(), b.to_aad());
    }

    #[test]
    fn refuses_empty_and_huge_keys() {
        let kek = Kek::generate();
        assert!(matches!(
            wrap(&kek, &label(), &[]),
            Err(KeyError::InvalidKey { .. })
        ));
        assert!(matches!(
            wrap(&kek, &label(), &vec![0u8; MAX_WRAPPED_KEY_LEN + 1]),
            Err(KeyError::InvalidKey { .. })
        ));
    }

    struct DataKeyBytes([u8; 64]);
    impl DataKeyBytes {
        fn random() -> Self {
            let mut b = [0u8; 64];
            rand::rngs::OsRng.fill_bytes(&mut b);
            Self(b)
        }
    }
}
