//! Agents, their grants, and window keys handed out to them.
//!
//! An agent is registered with an X25519 public key and a grant: a zone
//! and a range of windows by start time. The source gives an agent only the
//! window keys its grant covers, each wrapped to its public key:
//!
//! ```text
//! e        fresh X25519 secret per hand-out; E = e·G is sent
//! shared   X25519(e, agent public key)
//! k        BLAKE3 derive_key("keyturn 2026-12 stream key hand-out v1",
//!                             shared || E || agent public key || key id)
//! wrapped  AES-256-GCM(k, nonce 0, aad = key id, window key)
//! ```
//! A zero nonce is safe: `k` is new for every hand-out (fresh `e`).
//! `streams/zone-<id>/agents.json` holds the registrations (public data).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const KDF_CONTEXT: &str = "keyturn 2026-12 stream key hand-out v1";

/// Errors of registrations and hand-outs.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// File I/O.
    #[error("{path}: {message}")]
    Io {
        /// File.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// No agent of that name.
    #[error("no agent named {0:?} is registered for this zone")]
    Unknown(String),
    /// A hand-out could not be opened.
    #[error("window key {0}: the hand-out does not open with this agent's key")]
    Unwrap(String),
}

/// A registered agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// X25519 public key, hex.
    pub public_key: String,
    /// First window start granted, unix seconds (inclusive).
    pub from_unix: u64,
    /// Windows starting at or after this are not granted (none: open-ended).
    pub to_unix: Option<u64>,
    /// When registered, unix seconds.
    pub registered_unix: u64,
}

impl Agent {
    /// Whether a window starting at `start_unix` is granted.
    pub fn grants(&self, start_unix: u64) -> bool {
        start_unix >= self.from_unix && self.to_unix.is_none_or(|t| start_unix < t)
    }

    /// The public key's bytes.
    pub fn public_bytes(&self) -> Result<[u8; 32], GrantError> {
        parse_hex32(&self.public_key)
    }
}

/// Parses 32 bytes of hex.
pub fn parse_hex32(s: &str) -> Result<[u8; 32], GrantError> {
    let s = s.trim();
    if s.len() != 64 {
        return Err(GrantError::Invalid("an X25519 key is 64 hex digits".into()));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| GrantError::Invalid("an X25519 key is 64 hex digits".into()))?;
    }
    Ok(out)
}

/// Hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The registrations of one zone.
#[derive(Debug)]
pub struct Agents {
    path: PathBuf,
    agents: BTreeMap<String, Agent>,
}

impl Agents {
    /// Loads `dir/agents.json` (empty if absent).
    pub fn load(dir: &Path) -> Result<Self, GrantError> {
        let path = dir.join("agents.json");
        let agents = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| GrantError::Io {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(GrantError::Io {
                    path,
                    message: e.to_string(),
                });
            }
        };
        Ok(Self { path, agents })
    }

    fn save(&self) -> Result<(), GrantError> {
        crate::pool::write_atomic(
            &self.path,
            &serde_json::to_vec_pretty(&self.agents).expect("plain data"),
        )
        .map_err(|e| GrantError::Io {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Registers (or replaces) an agent and its grant.
    pub fn grant(&mut self, name: &str, agent: Agent) -> Result<(), GrantError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(GrantError::Invalid(
                "an agent name is 1-64 characters of letters, digits, '-', '_' and '.'".into(),
            ));
        }
        agent.public_bytes()?;
        if agent.to_unix.is_some_and(|t| t <= agent.from_unix) {
            return Err(GrantError::Invalid(
                "a grant's end must come after its start".into(),
            ));
        }
        self.agents.insert(name.to_string(), agent);
        self.save()
    }

    /// Removes an agent.
    pub fn revoke(&mut self, name: &str) -> Result<(), GrantError> {
        self.agents
            .remove(name)
            .ok_or_else(|| GrantError::Unknown(name.into()))?;
        self.save()
    }

    /// An agent.
    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.agents.get(name)
    }

    /// Every agent.
    pub fn all(&self) -> &BTreeMap<String, Agent> {
        &self.agents
    }
}

/// A window key wrapped to an agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandOut {
    /// Key id.
    pub key_id: String,
    /// Ephemeral public key, hex.
    pub ephemeral: String,
    /// Wrapped key, hex.
    pub wrapped: String,
}

fn kdf(shared: &[u8; 32], eph: &[u8; 32], agent: &[u8; 32], key_id: &str) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(96 + key_id.len()));
    ikm.extend_from_slice(shared);
    ikm.extend_from_slice(eph);
    ikm.extend_from_slice(agent);
    ikm.extend_from_slice(key_id.as_bytes());
    Zeroizing::new(blake3::derive_key(KDF_CONTEXT, &ikm))
}

/// Wraps `key` (a window key named `key_id`) to the agent's public key.
pub fn hand_out(agent_public: &[u8; 32], key_id: &str, key: &[u8; 32]) -> HandOut {
    seal_to(agent_public, key_id, key)
}

/// Encrypts `data` to the agent's public key, bound to `label` (the same
/// construction as a key hand-out, for any length: digests for
/// `verify-replica` travel this way, so only the agent reads them).
pub fn seal_to(agent_public: &[u8; 32], label: &str, data: &[u8]) -> HandOut {
    let key_id = label;
    let key = data;
    use rand::RngCore;
    let mut e = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut e[..]);
    let secret = x25519_dalek::StaticSecret::from(*e);
    let eph = x25519_dalek::PublicKey::from(&secret);
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*agent_public));
    let k = kdf(shared.as_bytes(), eph.as_bytes(), agent_public, key_id);
    let wrapped = Aes256Gcm::new((&*k).into())
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: key,
                aad: key_id.as_bytes(),
            },
        )
        .expect("32 bytes encrypt");
    HandOut {
        key_id: key_id.into(),
        ephemeral: hex(eph.as_bytes()),
        wrapped: hex(&wrapped),
    }
}

/// An agent's X25519 key pair.
pub struct AgentKey(x25519_dalek::StaticSecret);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(<redacted>)")
    }
}

impl AgentKey {
    /// A new random key.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut b = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut b[..]);
        Self(x25519_dalek::StaticSecret::from(*b))
    }

    /// From the hex secret a key file holds.
    pub fn from_hex(s: &str) -> Result<Self, GrantError> {
        let b = Zeroizing::new(parse_hex32(s)?);
        Ok(Self(x25519_dalek::StaticSecret::from(*b)))
    }

    /// The hex secret (for the agent's key file, mode 0600).
    pub fn secret_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex(self.0.as_bytes()))
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        *x25519_dalek::PublicKey::from(&self.0).as_bytes()
    }

    /// Opens a hand-out made to this key.
    pub fn open(&self, h: &HandOut) -> Result<Zeroizing<[u8; 32]>, GrantError> {
        let plain = self.open_sealed(h)?;
        let mut out = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(GrantError::Unwrap(h.key_id.clone()));
        }
        out.copy_from_slice(&plain);
        Ok(out)
    }

    /// Opens anything [`seal_to`] sealed to this key.
    pub fn open_sealed(&self, h: &HandOut) -> Result<Zeroizing<Vec<u8>>, GrantError> {
        let fail = || GrantError::Unwrap(h.key_id.clone());
        let eph = parse_hex32(&h.ephemeral).map_err(|_| fail())?;
        let wrapped: Vec<u8> = (0..h.wrapped.len() / 2)
            .map(|i| u8::from_str_radix(h.wrapped.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| fail())?;
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(eph));
        let k = kdf(shared.as_bytes(), &eph, &self.public(), &h.key_id);
        let plain = Zeroizing::new(
            Aes256Gcm::new((&*k).into())
                .decrypt(
                    Nonce::from_slice(&[0u8; 12]),
                    Payload {
                        msg: &wrapped,
                        aad: h.key_id.as_bytes(),
                    },
                )
                .map_err(|_| fail())?,
        );
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_out_opens_only_with_its_agents_key_and_id() {
        let a = AgentKey::generate();
        let b = AgentKey::generate();
        let key = [0x42u8; 32];
        let h = hand_out(&a.public(), "z1-stream-s1-w2", &key);
        assert!(!h.wrapped.contains(&hex(&key)));
        assert_eq!(*a.open(&h).unwrap(), key);
        assert!(b.open(&h).is_err());
        let mut other = h.clone();
        other.key_id = "z1-stream-s1-w3".into();
        assert!(a.open(&other).is_err());
        let again = AgentKey::from_hex(&a.secret_hex()).unwrap();
        assert_eq!(again.public(), a.public());
        assert_eq!(format!("{a:?}"), "AgentKey(<redacted>)");
    }

    #[test]
    fn grants_cover_their_windows_and_registrations_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut agents = Agents::load(dir.path()).unwrap();
        let k = AgentKey::generate();
        let agent = Agent {
            public_key: hex(&k.public()),
            from_unix: 3600,
            to_unix: Some(7200),
            registered_unix: 1,
        };
        assert!(agent.grants(3600) && !agent.grants(7200) && !agent.grants(0));
        agents.grant("dr-site", agent.clone()).unwrap();
        assert!(agents.grant("bad name", agent.clone()).is_err());
        let mut backwards = agent.clone();
        backwards.to_unix = Some(10);
        assert!(agents.grant("x", backwards).is_err());
        let again = Agents::load(dir.path()).unwrap();
        assert_eq!(again.get("dr-site"), Some(&agent));
        agents.revoke("dr-site").unwrap();
        assert!(agents.revoke("dr-site").is_err());
    }
}
