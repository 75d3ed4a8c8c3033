//! The audit signing key inside the PKCS#11 token of the root key.
//!
//! When the token lists `CKM_EC_EDWARDS_KEY_PAIR_GEN` and `CKM_EDDSA`
//! (SoftHSM2 2.6 does), the Ed25519 key pair is generated in the token: the
//! private key is `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`, sign-only, labelled `keyturn-audit-<16 hex>`, and every
//! digest is signed with `C_Sign` / `CKM_EDDSA` (pure Ed25519), so the
//! signatures verify with an ordinary Ed25519 public key. The public key
//! object keeps the same label, so the key is found again by it.
//!
//! The signer owns its own session. It does not log in: login state is per
//! process and token, and the root key provider that hands it out has
//! logged in already (see `pkcs11::login`).
//!
//! Whether made here or found again, the private key's attributes are read
//! back and a key that is not a sensitive, non-extractable, private token
//! object is refused: an operator's hand-made key under our label must not
//! quietly sign with weaker protection.

#![forbid(unsafe_code)]

use std::sync::Mutex;

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rand::RngCore;

use super::KeyError;
use super::pkcs11::{Pkcs11Config, ck, context, find_token};
use super::root::TokenSigner;

/// DER of the Ed25519 curve OID 1.3.101.112 (RFC 8410), for `CKA_EC_PARAMS`.
const ED25519_OID_DER: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// Label prefix of the audit key pair on the token.
pub const LABEL_PREFIX: &str = "keyturn-audit-";

/// An Ed25519 key pair in a PKCS#11 token that signs audit digests.
pub struct Pkcs11Signer {
    token: String,
    label: String,
    public: [u8; 32],
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl std::fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("token", &self.token)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Signer {
    /// Opens the key pair labelled `existing` on the token of `config`, or
    /// generates a new one when `existing` is `None`. `Ok(None)` when the
    /// token lacks Ed25519 key generation or EdDSA signing.
    pub fn open(config: &Pkcs11Config, existing: Option<&str>) -> Result<Option<Self>, KeyError> {
        let token = config.token_label.clone();
        let err = |op: &'static str, e: &cryptoki::error::Error| KeyError::Pkcs11 {
            op,
            token: token.clone(),
            reason: ck(e),
        };
        let ctx = context(&config.module)?;
        let slot = find_token(&ctx, config)?;
        let mechs = ctx
            .get_mechanism_list(slot)
            .map_err(|e| err("list the mechanisms of", &e))?;
        if !mechs.contains(&MechanismType::EDDSA)
            || !mechs.contains(&MechanismType::ECC_EDWARDS_KEY_PAIR_GEN)
        {
            if existing.is_none() {
                tracing::warn!(token = %token, "the PKCS#11 token lacks CKM_EC_EDWARDS_KEY_PAIR_GEN or CKM_EDDSA: the audit signing key is kept wrapped under the root key instead of in the token");
            }
            return Ok(None);
        }
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| err("open a session on", &e))?;
        let (label, key, public_obj) = match existing {
            Some(label) => {
                let find = |class| {
                    session
                        .find_objects(&[
                            Attribute::Class(class),
                            Attribute::KeyType(KeyType::EC_EDWARDS),
                            Attribute::Label(label.as_bytes().to_vec()),
                        ])
                        .map_err(|e| err("search for the audit signing key on", &e))
                };
                let (private, public) = (
                    find(ObjectClass::PRIVATE_KEY)?,
                    find(ObjectClass::PUBLIC_KEY)?,
                );
                match (private.as_slice(), public.as_slice()) {
                    ([k], [p]) => (label.to_string(), *k, *p),
                    _ => {
                        return Err(KeyError::Pkcs11 {
                            op: "find the audit signing key on",
                            token,
                            reason: format!(
                                "{} private and {} public Ed25519 keys are labelled {label:?} (expected one each)",
                                private.len(),
                                public.len()
                            ),
                        });
                    }
                }
            }
            None => {
                let mut id = [0u8; 8];
                rand::rngs::OsRng.fill_bytes(&mut id);
                let label = format!("{LABEL_PREFIX}{}", hex(&id));
                let name = label.as_bytes().to_vec();
                let public_t = [
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Verify(true),
                    Attribute::EcParams(ED25519_OID_DER.to_vec()),
                    Attribute::Label(name.clone()),
                ];
                let private_t = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Decrypt(false),
                    Attribute::Derive(false),
                    Attribute::Unwrap(false),
                    Attribute::Label(name),
                ];
                let (p, k) = session
                    .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public_t, &private_t)
                    .map_err(|e| err("generate the audit signing key on", &e))?;
                tracing::info!(token = %token, key = %label, "generated the audit signing key in the token");
                (label, k, p)
            }
        };
        check_private(&session, key).map_err(|reason| KeyError::Pkcs11 {
            op: "check the audit signing key on",
            token: token.clone(),
            reason: format!("the private key {label:?} {reason}"),
        })?;
        let point = session
            .get_attributes(public_obj, &[AttributeType::EcPoint])
            .map_err(|e| err("read the audit public key on", &e))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .unwrap_or_default();
        let public = parse_ec_point(&point).ok_or_else(|| KeyError::Pkcs11 {
            op: "read the audit public key on",
            token: token.clone(),
            reason: format!(
                "CKA_EC_POINT of {} bytes is not an Ed25519 point",
                point.len()
            ),
        })?;
        Ok(Some(Self {
            token,
            label,
            public,
            session: Mutex::new(session),
            key,
        }))
    }
}

/// Reads back the private key's protection: `Err` says what is missing.
fn check_private(session: &Session, key: ObjectHandle) -> Result<(), String> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Sign,
            ],
        )
        .map_err(|e| format!("cannot be read: {}", ck(&e)))?;
    let mut flags = Flags::default();
    for a in attrs {
        match a {
            Attribute::Token(b) => flags.token = b,
            Attribute::Private(b) => flags.private = b,
            Attribute::Sensitive(b) => flags.sensitive = b,
            Attribute::Extractable(b) => flags.extractable = b,
            Attribute::Sign(b) => flags.sign = b,
            _ => {}
        }
    }
    flags.check()
}

/// The attributes [`check_private`] insists on.
#[derive(Default)]
struct Flags {
    token: bool,
    private: bool,
    sensitive: bool,
    extractable: bool,
    sign: bool,
}

impl Flags {
    fn check(&self) -> Result<(), String> {
        let missing: Vec<&str> = [
            (!self.token, "CKA_TOKEN"),
            (!self.private, "CKA_PRIVATE"),
            (!self.sensitive, "CKA_SENSITIVE"),
            (self.extractable, "not CKA_EXTRACTABLE"),
            (!self.sign, "CKA_SIGN"),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "lacks {}: refusing to sign with it",
                missing.join(", ")
            ))
        }
    }
}

/// The 32 key bytes of `CKA_EC_POINT`: a DER OCTET STRING around them (as
/// the standard says) or the raw bytes (as some tokens return).
fn parse_ec_point(p: &[u8]) -> Option<[u8; 32]> {
    match p {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest.try_into().ok(),
        raw if raw.len() == 32 => raw.try_into().ok(),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl TokenSigner for Pkcs11Signer {
    fn key_name(&self) -> &str {
        &self.label
    }

    fn location(&self) -> String {
        format!("PKCS#11 token {:?}", self.token)
    }

    fn public_key(&self) -> [u8; 32] {
        self.public
    }

    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let sig = session
            .sign(&mech, self.key, msg)
            .map_err(|e| KeyError::Pkcs11 {
                op: "sign an audit digest on",
                token: self.token.clone(),
                reason: ck(&e),
            })?;
        sig.as_slice().try_into().map_err(|_| KeyError::Pkcs11 {
            op: "sign an audit digest on",
            token: self.token.clone(),
            reason: format!("C_Sign returned {} bytes, expected 64", sig.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_wrapped_or_raw() {
        let k = [9u8; 32];
        let mut der = vec![0x04, 0x20];
        der.extend_from_slice(&k);
        assert_eq!(parse_ec_point(&der), Some(k));
        assert_eq!(parse_ec_point(&k), Some(k));
        assert_eq!(parse_ec_point(&der[..33]), None);
        assert_eq!(parse_ec_point(&[]), None);
    }

    #[test]
    fn weak_private_keys_are_refused() {
        let good = Flags {
            token: true,
            private: true,
            sensitive: true,
            extractable: false,
            sign: true,
        };
        assert_eq!(good.check(), Ok(()));
        let extractable = Flags {
            extractable: true,
            ..good
        };
        assert!(
            extractable
                .check()
                .unwrap_err()
                .contains("not CKA_EXTRACTABLE")
        );
        let session_only = Flags {
            token: false,
            sensitive: false,
            ..good
        };
        let e = session_only.check().unwrap_err();
        assert!(
            e.contains("CKA_TOKEN") && e.contains("CKA_SENSITIVE") && !e.contains("CKA_PRIVATE"),
            "{e}"
        );
    }

    #[test]
    fn signer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pkcs11Signer>();
    }
}
