//! A zone's key file (only wrapped keys, plus their life-cycle state) and the
//! unlocked keyring the data path uses.
//!
//! File (JSON, mode 0600, replaced only atomically):
//!
//! ```json
//! {
//!   "format": "keyturn-zone-keys",
//!   "version": 1,
//!   "zone": 3,
//!   "zone_name": "prod",
//!   "keys": [
//!     { "id": "z3-kek-v1", "zone": 3, "purpose": "kek", "version": 1,
//!       "state": "active", "created_unix": 1700000000,
//!       "activated_unix": 1700000000, "wrapped": "<base64>" },
//!     { "id": "z3-dek-v1", "zone": 3, "purpose": "dek", "version": 1,
//!       "state": "active", "wrapped_by_kek": 1, … },
//!     { "id": "z3-mac-v1", "zone": 3, "purpose": "mac", "version": 1,
//!       "state": "active", "wrapped_by_kek": 1, … }
//!   ]
//! }
//! ```
//!
//! A KEK is wrapped by the root key provider; a DEK or the MAC key by the
//! zone KEK whose version `wrapped_by_kek` names. A KEK written during or
//! since a root key rotation also names the root key that wraps it
//! (`wrapped_by_root`, e.g. `"sealed-file:keys/root-1700000000.sealed"`), so
//! a rotation interrupted half-way knows which of its two root keys to ask;
//! older files lack the field and mean the root key in pool.toml. `wrapped` is absent once a
//! key is destroyed: destroying the wrapped copy is the crypto-erase. Every
//! wrapped key is bound to its record's label (id, zone, purpose, version),
//! so records cannot be swapped or renumbered in the file.
//!
//! States follow NIST SP 800-57: pre-active (the next DEK, during a rotation
//! window) → active → decrypt-only → destroyed; compromised when revoked in an
//! emergency (still decryptable, so its data can be re-encrypted).
//!
//! Times are unix seconds.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::fsutil::{self, Replace, b64};
use super::root::RootKeyProvider;
use super::secret::{DataKey, Kek, MacKey};
use super::wrap::{self, KeyLabel, Purpose};
use super::{KeyError, describe_json_error};
use crate::ids::{KeyVersion, ZoneId};

mod mac;
mod rollback;

const WHAT: &str = "zone key file";
const FORMAT: &str = "keyturn-zone-keys";
const FORMAT_VERSION: u32 = 1;
/// A record is a few hundred bytes; this allows thousands of versions.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// A key's life-cycle state (NIST SP 800-57 Part 1, §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Generated, not yet used to protect data (the next DEK).
    PreActive,
    /// Protects new data.
    Active,
    /// Only decrypts data it protected earlier.
    DecryptOnly,
    /// Wrapped copy erased; data under it is unreadable.
    Destroyed,
    /// Revoked in an emergency; decrypts only so data can be re-encrypted.
    Compromised,
}

impl KeyState {
    /// Whether a wrapped copy of the key exists in this state.
    pub fn has_material(self) -> bool {
        self != KeyState::Destroyed
    }

    /// Whether NIST SP 800-57 lets a key go from `self` to `next`:
    /// pre-active → active (or destroyed, when a rotation is abandoned);
    /// active → decrypt-only or compromised; decrypt-only → destroyed or
    /// compromised; compromised → destroyed. Nothing leaves destroyed.
    pub fn may_become(self, next: KeyState) -> bool {
        use KeyState::*;
        matches!(
            (self, next),
            (PreActive, Active | Destroyed)
                | (Active, DecryptOnly | Compromised)
                | (DecryptOnly, Destroyed | Compromised)
                | (Compromised, Destroyed)
        )
    }

    /// The state's name as written in key files.
    pub fn name(self) -> &'static str {
        match self {
            KeyState::PreActive => "pre-active",
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Destroyed => "destroyed",
            KeyState::Compromised => "compromised",
        }
    }
}

/// How many content blocks each DEK version still protects. The key layer
/// asks the block map before destroying a DEK; it does not trust a caller's
/// word for it.
pub trait BlockUsage {
    /// Content blocks of `zone` encrypted under DEK `version`.
    fn blocks_under(&self, zone: ZoneId, version: KeyVersion) -> u64;
}

/// Progress of a KEK rotation: keys still wrapped by an older KEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KekRotation {
    /// The new KEK version (pre-active until every key is re-wrapped).
    pub new_version: u32,
    /// DEK and MAC keys still wrapped by an older KEK.
    pub remaining: usize,
}

/// One key's metadata and wrapped bytes.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Key id, e.g. `z3-dek-v1`; part of the wrap label.
    pub id: String,
    /// The zone; part of the wrap label.
    pub zone: ZoneId,
    /// What the key is for; part of the wrap label.
    pub purpose: Purpose,
    /// Version within zone and purpose; part of the wrap label.
    pub version: u32,
    /// Life-cycle state.
    pub state: KeyState,
    /// For a DEK or MAC key: the version of the zone KEK that wraps it.
    /// `None` for a KEK (the root provider wraps those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_by_kek: Option<u32>,
    /// For a KEK: the id of the root key that wrapped it, when a root key
    /// rotation recorded one (see [`RootKeyProvider::root_id`]). `None` for
    /// DEK and MAC keys, and for KEKs written before any root key rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_by_root: Option<String>,
    /// When the key was generated.
    pub created_unix: u64,
    /// When it became active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_unix: Option<u64>,
    /// When it stopped protecting new data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated_unix: Option<u64>,
    /// When its wrapped copy was erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_unix: Option<u64>,
    /// The wrapped key; `None` once destroyed.
    #[serde(default, with = "b64::option", skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<Vec<u8>>,
}

impl KeyRecord {
    /// The label its wrapped bytes are bound to.
    pub fn label(&self) -> KeyLabel {
        KeyLabel {
            key_id: self.id.clone(),
            zone: self.zone,
            purpose: self.purpose,
            version: self.version,
        }
    }

    fn new(
        zone: ZoneId,
        purpose: Purpose,
        version: u32,
        state: KeyState,
        wrapped_by_kek: Option<u32>,
        now: u64,
        wrapped: Vec<u8>,
    ) -> Self {
        let label = KeyLabel::new(zone, purpose, version);
        Self {
            id: label.key_id,
            zone,
            purpose,
            version,
            state,
            wrapped_by_kek,
            wrapped_by_root: None,
            created_unix: now,
            activated_unix: (state == KeyState::Active).then_some(now),
            deactivated_unix: None,
            destroyed_unix: None,
            wrapped: Some(wrapped),
        }
    }

    /// Records the root key that wrapped this KEK, when `provider` names one.
    fn wrapped_by(mut self, provider: &dyn RootKeyProvider) -> Self {
        self.wrapped_by_root = provider.root_id().map(Into::into);
        self
    }
}

impl std::fmt::Debug for KeyRecord {
    // Wrapped bytes are ciphertext, but there is no reason to print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("zone", &self.zone)
            .field("purpose", &self.purpose)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("wrapped_by_kek", &self.wrapped_by_kek)
            .field("wrapped_by_root", &self.wrapped_by_root)
            .field("created_unix", &self.created_unix)
            .field("activated_unix", &self.activated_unix)
            .field("deactivated_unix", &self.deactivated_unix)
            .field("destroyed_unix", &self.destroyed_unix)
            .field(
                "wrapped",
                &self
                    .wrapped
                    .as_ref()
                    .map(|w| format!("<{} bytes>", w.len())),
            )
            .finish()
    }
}

/// A zone's stored key chain: wrapped KEK versions, DEK versions and MAC key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneKeyFile {
    format: String,
    version: u32,
    zone: ZoneId,
    zone_name: String,
    keys: Vec<KeyRecord>,
}

fn unix_now() -> u64 {
    crate::clock::unix_now()
}

impl ZoneKeyFile {
    /// A new key chain for `zone`: KEK v1 wrapped by `provider`, and DEK v1
    /// and the MAC key (both active) wrapped by KEK v1. Nothing is written
    /// until [`save`](Self::save).
    pub fn create(
        provider: &dyn RootKeyProvider,
        zone: ZoneId,
        zone_name: &str,
    ) -> Result<Self, KeyError> {
        let now = unix_now();
        let kek = Kek::generate();
        let kek_label = KeyLabel::new(zone, Purpose::Kek, 1);
        let kek_wrapped = provider.wrap_key(&kek_label, kek.expose())?;

        let dek = DataKey::generate();
        let dek_wrapped = wrap::wrap(&kek, &KeyLabel::new(zone, Purpose::Dek, 1), dek.expose())?;
        let mac = MacKey::generate();
        let mac_wrapped = wrap::wrap(&kek, &KeyLabel::new(zone, Purpose::Mac, 1), mac.expose())?;

        let keys = vec![
            KeyRecord::new(
                zone,
                Purpose::Kek,
                1,
                KeyState::Active,
                None,
                now,
                kek_wrapped,
            )
            .wrapped_by(provider),
            KeyRecord::new(
                zone,
                Purpose::Dek,
                1,
                KeyState::Active,
                Some(1),
                now,
                dek_wrapped,
            ),
            KeyRecord::new(
                zone,
                Purpose::Mac,
                1,
                KeyState::Active,
                Some(1),
                now,
                mac_wrapped,
            ),
        ];
        let file = Self {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            zone,
            zone_name: zone_name.to_string(),
            keys,
        };
        debug_assert!(file.check().is_ok());
        Ok(file)
    }

    /// Writes the file atomically (mode 0600), replacing any previous one.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason: format!("cannot serialise: {}", describe_json_error(&e)),
        })?;
        json.push(b'\n');
        fsutil::write_private_atomic(WHAT, path, &json, Replace::Allow)
    }

    /// Reads and checks a zone key file. Nothing is unwrapped.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = fsutil::read_limited(WHAT, path, MAX_FILE_LEN)?;
        let corrupt = |reason: String| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        // Check the header first so a newer format is reported as such, not
        // as a field this build does not know.
        #[derive(Deserialize)]
        struct Header {
            format: String,
            version: u32,
        }
        let header: Header =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
        if header.format != FORMAT {
            return Err(corrupt(
                "the format field does not name a zone key file".into(),
            ));
        }
        if header.version != FORMAT_VERSION {
            return Err(KeyError::UnsupportedFormat {
                what: WHAT,
                path: path.to_path_buf(),
                found: header.version,
                supported: FORMAT_VERSION,
            });
        }
        let file: Self =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
        file.check().map_err(corrupt)?;
        Ok(file)
    }

    /// Unwraps the keys the data path needs: every DEK that still has
    /// material, and the MAC key. KEKs are unwrapped through `provider` and
    /// dropped (zeroized) before this returns.
    pub fn unlock(&self, provider: &dyn RootKeyProvider) -> Result<ZoneKeyring, KeyError> {
        self.check().map_err(|reason| KeyError::Inconsistent {
            zone: self.zone,
            reason,
        })?;
        let mut keks: BTreeMap<u32, Kek> = BTreeMap::new();
        let mut deks = BTreeMap::new();
        let mut macs = BTreeMap::new();
        let mut mac_version = None;
        let mut active = None;
        for r in &self.keys {
            // The active MAC key tags; a decrypt-only one (a MAC rotation
            // under way) still verifies the tags it made.
            if r.purpose == Purpose::Kek
                || !r.state.has_material()
                || (r.purpose == Purpose::Mac
                    && !matches!(r.state, KeyState::Active | KeyState::DecryptOnly))
            {
                continue;
            }
            let (Some(kek_version), Some(wrapped)) = (r.wrapped_by_kek, r.wrapped.as_deref())
            else {
                continue; // check() rules this out
            };
            let kek = match keks.entry(kek_version) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(self.unwrap_kek(provider, kek_version)?),
            };
            let label = r.label();
            let plain = wrap::unwrap(kek, &label, wrapped)?;
            let invalid = |reason: String| KeyError::InvalidKey {
                label: label.to_string(),
                reason,
            };
            match r.purpose {
                Purpose::Dek => {
                    let dek = DataKey::from_slice(&plain).ok_or_else(|| {
                        invalid(format!("{} bytes, expected {}", plain.len(), DataKey::LEN))
                    })?;
                    // DESIGN invariant 2, checked on every unlock, not only at
                    // generation.
                    if dek.expose()[..32] == dek.expose()[32..] {
                        return Err(invalid("its two XTS halves are equal".into()));
                    }
                    if r.state == KeyState::Active {
                        active = Some(KeyVersion(r.version));
                    }
                    deks.insert(KeyVersion(r.version), (r.state, dek));
                }
                Purpose::Mac => {
                    let mac = MacKey::from_slice(&plain).ok_or_else(|| {
                        invalid(format!("{} bytes, expected {}", plain.len(), MacKey::LEN))
                    })?;
                    if r.state == KeyState::Active {
                        mac_version = Some(r.version);
                    }
                    macs.insert(r.version, mac);
                }
                Purpose::Kek | Purpose::Root | Purpose::Stream => {}
            }
        }
        let inconsistent = |reason: &str| KeyError::Inconsistent {
            zone: self.zone,
            reason: reason.into(),
        };
        Ok(ZoneKeyring {
            zone: self.zone,
            active: active.ok_or_else(|| inconsistent("no active DEK"))?,
            deks,
            mac_version: mac_version.ok_or_else(|| inconsistent("no MAC key"))?,
            macs,
        })
    }

    /// Adds DEK version n+1 in state pre-active, wrapped under the active
    /// KEK, for the next rotation. Fails if a pre-active DEK already exists.
    /// Call [`save`](Self::save) to keep it.
    pub fn add_dek_version(
        &mut self,
        provider: &dyn RootKeyProvider,
    ) -> Result<KeyVersion, KeyError> {
        let inconsistent = |reason: String| KeyError::Inconsistent {
            zone: self.zone,
            reason,
        };
        if let Some(r) = self.deks().find(|r| r.state == KeyState::PreActive) {
            return Err(inconsistent(format!(
                "pre-active DEK {} already exists; activate or destroy it first",
                r.id
            )));
        }
        let kek_version = self
            .keys
            .iter()
            .filter(|r| r.purpose == Purpose::Kek && r.state == KeyState::Active)
            .map(|r| r.version)
            .max()
            .ok_or_else(|| inconsistent("no active KEK".into()))?;
        let next = self
            .deks()
            .map(|r| r.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| inconsistent("DEK versions exhausted".into()))?;
        let kek = self.unwrap_kek(provider, kek_version)?;
        let dek = DataKey::generate();
        let wrapped = wrap::wrap(
            &kek,
            &KeyLabel::new(self.zone, Purpose::Dek, next),
            dek.expose(),
        )?;
        self.keys.push(KeyRecord::new(
            self.zone,
            Purpose::Dek,
            next,
            KeyState::PreActive,
            Some(kek_version),
            unix_now(),
            wrapped,
        ));
        Ok(KeyVersion(next))
    }

    fn record_mut(&mut self, key_id: &str) -> Result<&mut KeyRecord, KeyError> {
        let zone = self.zone;
        self.keys
            .iter_mut()
            .find(|r| r.id == key_id)
            .ok_or_else(|| KeyError::UnknownKey {
                zone,
                key: key_id.into(),
            })
    }

    /// Moves key `key_id` to state `next`, if NIST SP 800-57 allows it and
    /// the key chain stays usable (one active DEK and MAC key, every stored
    /// key unwrappable). Destroying erases the wrapped bytes (crypto-erase);
    /// a DEK is destroyed only when `usage` says no content block uses it,
    /// and a KEK only when no key with material is wrapped by it. Call
    /// [`save`](Self::save) to keep the change.
    pub fn set_state(
        &mut self,
        key_id: &str,
        next: KeyState,
        usage: &dyn BlockUsage,
    ) -> Result<(), KeyError> {
        let zone = self.zone;
        let record = self.record_mut(key_id)?.clone();
        if !record.state.may_become(next) {
            return Err(KeyError::IllegalTransition {
                key: key_id.into(),
                from: record.state.name().into(),
                to: next.name().into(),
            });
        }
        if next == KeyState::Destroyed {
            match record.purpose {
                Purpose::Dek => {
                    let blocks = usage.blocks_under(zone, KeyVersion(record.version));
                    if blocks > 0 {
                        return Err(KeyError::InUse {
                            key: key_id.into(),
                            reason: format!("{blocks} content blocks are still encrypted under it"),
                        });
                    }
                }
                Purpose::Kek => {
                    let dependants: Vec<&str> = self
                        .keys
                        .iter()
                        .filter(|r| {
                            r.wrapped_by_kek == Some(record.version) && r.state.has_material()
                        })
                        .map(|r| r.id.as_str())
                        .collect();
                    if !dependants.is_empty() {
                        return Err(KeyError::InUse {
                            key: key_id.into(),
                            reason: format!("it still wraps {}", dependants.join(", ")),
                        });
                    }
                }
                Purpose::Mac | Purpose::Root | Purpose::Stream => {}
            }
        }
        let before = self.keys.clone();
        let now = unix_now();
        let r = self.record_mut(key_id)?;
        if r.state == KeyState::Active {
            r.deactivated_unix = Some(now);
        }
        if next == KeyState::Active {
            r.activated_unix = Some(now);
        }
        if next == KeyState::Destroyed {
            r.destroyed_unix = Some(now);
            // Crypto-erase: without the wrapped copy the key is gone.
            r.wrapped = None;
        }
        r.state = next;
        if let Err(reason) = self.check() {
            self.keys = before;
            return Err(KeyError::Inconsistent {
                zone,
                reason: format!("refused: {reason}"),
            });
        }
        Ok(())
    }

    /// The flip at key level: the pre-active DEK becomes active and the
    /// active one decrypt-only, in one change (one save). Returns (old, new).
    pub fn flip_dek(&mut self) -> Result<(KeyVersion, KeyVersion), KeyError> {
        let zone = self.zone;
        let find = |s: KeyState| {
            self.deks()
                .find(|r| r.state == s)
                .map(|r| r.version)
                .ok_or_else(|| KeyError::Inconsistent {
                    zone,
                    reason: format!("no {} DEK", s.name()),
                })
        };
        let (old, new) = (find(KeyState::Active)?, find(KeyState::PreActive)?);
        let now = unix_now();
        for r in self.keys.iter_mut().filter(|r| r.purpose == Purpose::Dek) {
            if r.version == old {
                r.state = KeyState::DecryptOnly;
                r.deactivated_unix = Some(now);
            } else if r.version == new {
                r.state = KeyState::Active;
                r.activated_unix = Some(now);
            }
        }
        debug_assert!(self.check().is_ok());
        Ok((KeyVersion(old), KeyVersion(new)))
    }

    /// The KEK rotation in progress, if any: a pre-active KEK exists.
    pub fn kek_rotation(&self) -> Option<KekRotation> {
        let new = self
            .keys
            .iter()
            .find(|r| r.purpose == Purpose::Kek && r.state == KeyState::PreActive)?;
        let remaining = self
            .keys
            .iter()
            .filter(|r| {
                r.state.has_material() && r.wrapped_by_kek.is_some_and(|v| v != new.version)
            })
            .count();
        Some(KekRotation {
            new_version: new.version,
            remaining,
        })
    }

    /// Starts a KEK rotation: KEK v(n+1), pre-active, wrapped by the root
    /// provider. Both KEK versions stay usable until every DEK and MAC key is
    /// re-wrapped, so a crash at any point leaves every key readable.
    pub fn begin_kek_rotation(
        &mut self,
        provider: &dyn RootKeyProvider,
    ) -> Result<KekRotation, KeyError> {
        if let Some(r) = self.kek_rotation() {
            return Ok(r);
        }
        let next = self
            .keys
            .iter()
            .filter(|r| r.purpose == Purpose::Kek)
            .map(|r| r.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| KeyError::Inconsistent {
                zone: self.zone,
                reason: "KEK versions exhausted".into(),
            })?;
        let kek = Kek::generate();
        let wrapped =
            provider.wrap_key(&KeyLabel::new(self.zone, Purpose::Kek, next), kek.expose())?;
        self.keys.push(
            KeyRecord::new(
                self.zone,
                Purpose::Kek,
                next,
                KeyState::PreActive,
                None,
                unix_now(),
                wrapped,
            )
            .wrapped_by(provider),
        );
        Ok(self.kek_rotation().expect("just added"))
    }

    /// Re-wraps up to `max` keys still wrapped by an older KEK under the new
    /// one. Only wrapped bytes change; the keys themselves, and so every
    /// byte of volume data, stay the same. Returns the progress after it.
    pub fn rewrap_batch(
        &mut self,
        provider: &dyn RootKeyProvider,
        max: usize,
    ) -> Result<KekRotation, KeyError> {
        let Some(rotation) = self.kek_rotation() else {
            return Err(KeyError::Inconsistent {
                zone: self.zone,
                reason: "no KEK rotation in progress".into(),
            });
        };
        let new_kek = self.unwrap_kek(provider, rotation.new_version)?;
        let mut old_keks: BTreeMap<u32, Kek> = BTreeMap::new();
        let todo: Vec<usize> = (0..self.keys.len())
            .filter(|&i| {
                let r = &self.keys[i];
                r.state.has_material()
                    && r.wrapped_by_kek.is_some_and(|v| v != rotation.new_version)
            })
            .take(max)
            .collect();
        for i in todo {
            let old = self.keys[i].wrapped_by_kek.expect("filtered");
            if let Entry::Vacant(e) = old_keks.entry(old) {
                e.insert(self.unwrap_kek(provider, old)?);
            }
            let label = self.keys[i].label();
            let wrapped = self.keys[i].wrapped.as_deref().expect("has material");
            let plain = wrap::unwrap(&old_keks[&old], &label, wrapped)?;
            let rewrapped = wrap::wrap(&new_kek, &label, &plain)?;
            let r = &mut self.keys[i];
            r.wrapped = Some(rewrapped);
            r.wrapped_by_kek = Some(rotation.new_version);
        }
        Ok(self.kek_rotation().expect("still in progress"))
    }

    /// Ends a KEK rotation once nothing is wrapped by an older KEK: the new
    /// KEK becomes active, older ones decrypt-only and then destroyed (no
    /// key depends on them any more). Returns the ids destroyed.
    pub fn finish_kek_rotation(&mut self, usage: &dyn BlockUsage) -> Result<Vec<String>, KeyError> {
        let Some(rotation) = self.kek_rotation() else {
            return Err(KeyError::Inconsistent {
                zone: self.zone,
                reason: "no KEK rotation in progress".into(),
            });
        };
        if rotation.remaining > 0 {
            return Err(KeyError::Inconsistent {
                zone: self.zone,
                reason: format!("{} keys are not re-wrapped yet", rotation.remaining),
            });
        }
        let olds: Vec<(String, KeyState)> = self
            .keys
            .iter()
            .filter(|r| {
                r.purpose == Purpose::Kek
                    && r.version != rotation.new_version
                    && r.state.has_material()
            })
            .map(|r| (r.id.clone(), r.state))
            .collect();
        let new_id = KeyLabel::new(self.zone, Purpose::Kek, rotation.new_version).key_id;
        self.set_state(&new_id, KeyState::Active, usage)?;
        let mut destroyed = Vec::new();
        for (id, state) in olds {
            if state == KeyState::Active {
                self.set_state(&id, KeyState::DecryptOnly, usage)?;
            }
            self.set_state(&id, KeyState::Destroyed, usage)?;
            destroyed.push(id);
        }
        Ok(destroyed)
    }

    /// KEKs that still have material and are not yet wrapped by root key
    /// `new_root` (a root key rotation's progress in this zone).
    pub fn root_rewrap_remaining(&self, new_root: &str) -> usize {
        self.keks_not_under(new_root).count()
    }

    fn keks_not_under<'a>(&'a self, root: &'a str) -> impl Iterator<Item = usize> + 'a {
        (0..self.keys.len()).filter(move |&i| {
            let r = &self.keys[i];
            r.purpose == Purpose::Kek
                && r.state.has_material()
                && r.wrapped_by_root.as_deref() != Some(root)
        })
    }

    /// One batch of a root key rotation: re-wraps up to `max` KEKs not yet
    /// under the new root key. `roots` is the rotation in progress (it
    /// unwraps under the root key each record names and wraps under the new
    /// one, whose id [`RootKeyProvider::root_id`] gives). Each re-wrapped
    /// record names the new root key, so a crash after [`save`](Self::save)
    /// leaves every KEK readable by one of the two. Only wrapped KEK bytes
    /// change; DEKs, the MAC key and volume data do not. Returns how many
    /// KEKs remain.
    pub fn rewrap_root_batch(
        &mut self,
        roots: &dyn RootKeyProvider,
        max: usize,
    ) -> Result<usize, KeyError> {
        let new_root = roots
            .root_id()
            .ok_or_else(|| KeyError::Inconsistent {
                zone: self.zone,
                reason: "re-wrapping KEKs needs a root key rotation in progress".into(),
            })?
            .to_string();
        let todo: Vec<usize> = self.keks_not_under(&new_root).take(max).collect();
        for i in todo {
            let r = &self.keys[i];
            let label = r.label();
            let wrapped = r.wrapped.as_deref().expect("has material");
            let plain = roots.unwrap_key_from(r.wrapped_by_root.as_deref(), &label, wrapped)?;
            if plain.len() != Kek::LEN {
                return Err(KeyError::InvalidKey {
                    label: label.to_string(),
                    reason: format!("{} bytes, expected {}", plain.len(), Kek::LEN),
                });
            }
            let rewrapped = roots.wrap_key(&label, &plain)?;
            let r = &mut self.keys[i];
            r.wrapped = Some(rewrapped);
            r.wrapped_by_root = Some(new_root.clone());
        }
        Ok(self.root_rewrap_remaining(&new_root))
    }

    /// Unwraps every KEK that still has material through `provider` alone
    /// and drops it: the check made before an old root key is destroyed.
    /// Returns how many KEKs it checked.
    pub fn check_keks_unwrap(&self, provider: &dyn RootKeyProvider) -> Result<usize, KeyError> {
        let versions: Vec<u32> = self
            .keys
            .iter()
            .filter(|r| r.purpose == Purpose::Kek && r.state.has_material())
            .map(|r| r.version)
            .collect();
        for v in &versions {
            self.unwrap_kek(provider, *v)?;
        }
        Ok(versions.len())
    }

    /// The zone this file belongs to.
    pub fn zone(&self) -> ZoneId {
        self.zone
    }

    /// The zone's human-readable name.
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// All key records, in creation order.
    pub fn records(&self) -> &[KeyRecord] {
        &self.keys
    }

    fn deks(&self) -> impl Iterator<Item = &KeyRecord> {
        self.keys.iter().filter(|r| r.purpose == Purpose::Dek)
    }

    /// Wraps zone key material that lives outside this file (stream key
    /// sets) under the newest KEK with material: the pre-active one during a
    /// KEK rotation, so nothing wrapped meanwhile needs re-wrapping. Returns
    /// the KEK version used.
    pub fn wrap_under_kek(
        &self,
        provider: &dyn RootKeyProvider,
        label: &KeyLabel,
        plain: &[u8],
    ) -> Result<(u32, Vec<u8>), KeyError> {
        let version = self
            .keys
            .iter()
            .filter(|r| r.purpose == Purpose::Kek && r.state.has_material())
            .map(|r| r.version)
            .max()
            .ok_or_else(|| KeyError::Inconsistent {
                zone: self.zone,
                reason: "no KEK with material".into(),
            })?;
        let kek = self.unwrap_kek(provider, version)?;
        Ok((version, wrap::wrap(&kek, label, plain)?))
    }

    /// Unwraps material wrapped by [`wrap_under_kek`](Self::wrap_under_kek).
    pub fn unwrap_under_kek(
        &self,
        provider: &dyn RootKeyProvider,
        kek_version: u32,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        let kek = self.unwrap_kek(provider, kek_version)?;
        wrap::unwrap(&kek, label, wrapped)
    }

    fn unwrap_kek(&self, provider: &dyn RootKeyProvider, version: u32) -> Result<Kek, KeyError> {
        let r = self
            .keys
            .iter()
            .find(|r| r.purpose == Purpose::Kek && r.version == version)
            .ok_or_else(|| KeyError::Inconsistent {
                zone: self.zone,
                reason: format!("KEK v{version} is referenced but has no record"),
            })?;
        let label = r.label();
        let wrapped = r.wrapped.as_deref().ok_or_else(|| KeyError::Inconsistent {
            zone: self.zone,
            reason: format!("KEK {} is needed but destroyed", r.id),
        })?;
        let plain = provider.unwrap_key_from(r.wrapped_by_root.as_deref(), &label, wrapped)?;
        Kek::from_slice(&plain).ok_or_else(|| KeyError::InvalidKey {
            label: label.to_string(),
            reason: format!("{} bytes, expected {}", plain.len(), Kek::LEN),
        })
    }

    /// The rules every stored key chain obeys. Returns what is broken.
    fn check(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        let mut versions = std::collections::HashSet::new();
        for r in &self.keys {
            if r.zone != self.zone {
                return Err(format!(
                    "key {} belongs to zone {}, not {}",
                    r.id, r.zone, self.zone
                ));
            }
            if !ids.insert(r.id.as_str()) {
                return Err(format!("key id {} appears twice", r.id));
            }
            if !versions.insert((r.purpose, r.version)) {
                return Err(format!("two {} keys have version {}", r.purpose, r.version));
            }
            match (r.purpose, r.wrapped_by_kek) {
                (Purpose::Root, _) => {
                    return Err(format!("key {} is a root key; zone files hold none", r.id));
                }
                (Purpose::Stream, _) => {
                    return Err(format!(
                        "key {} is a stream key set; they have a file of their own",
                        r.id
                    ));
                }
                (Purpose::Kek, Some(_)) => {
                    return Err(format!("KEK {} names a wrapping KEK", r.id));
                }
                (Purpose::Dek | Purpose::Mac, None) => {
                    return Err(format!("key {} does not name its wrapping KEK", r.id));
                }
                _ => {}
            }
            if r.purpose != Purpose::Kek && r.wrapped_by_root.is_some() {
                return Err(format!("key {} names a root key; only KEKs do", r.id));
            }
            if r.state.has_material() != r.wrapped.is_some() {
                return Err(format!(
                    "key {} is {:?} but {} wrapped bytes",
                    r.id,
                    r.state,
                    if r.wrapped.is_some() { "has" } else { "lacks" }
                ));
            }
            if let Some(k) = r.wrapped_by_kek
                && r.state.has_material()
                && !self
                    .keys
                    .iter()
                    .any(|x| x.purpose == Purpose::Kek && x.version == k && x.state.has_material())
            {
                return Err(format!(
                    "key {} is wrapped by KEK v{k}, which is missing or destroyed",
                    r.id
                ));
            }
        }
        let count = |p: Purpose, s: KeyState| {
            self.keys
                .iter()
                .filter(|r| r.purpose == p && r.state == s)
                .count()
        };
        if count(Purpose::Dek, KeyState::Active) != 1 {
            return Err("there must be exactly one active DEK".into());
        }
        if count(Purpose::Dek, KeyState::PreActive) > 1 {
            return Err("there is more than one pre-active DEK".into());
        }
        if count(Purpose::Mac, KeyState::Active) != 1 {
            return Err("there must be exactly one active MAC key".into());
        }
        Ok(())
    }
}

/// A zone's unwrapped keys: every DEK that still has material, by version,
/// and the MAC keys (the active one, and during a MAC rotation the one it
/// replaces). Zeroized on drop; `Debug` shows versions and states only.
pub struct ZoneKeyring {
    zone: ZoneId,
    active: KeyVersion,
    deks: BTreeMap<KeyVersion, (KeyState, DataKey)>,
    /// The active MAC key's version (a key of `macs`: `unlock` checks it).
    mac_version: u32,
    macs: BTreeMap<u32, MacKey>,
}

impl ZoneKeyring {
    /// The zone.
    pub fn zone(&self) -> ZoneId {
        self.zone
    }

    /// The version new writes are encrypted under.
    pub fn active_version(&self) -> KeyVersion {
        self.active
    }

    /// The active DEK.
    pub fn active_dek(&self) -> &DataKey {
        // `unlock` inserts the active version into `deks` before it can set
        // `active`, and nothing removes entries.
        &self.deks[&self.active].1
    }

    /// The DEK of `version`, if it still has material.
    pub fn dek(&self, version: KeyVersion) -> Option<&DataKey> {
        self.deks.get(&version).map(|(_, k)| k)
    }

    /// The state of DEK `version`, if present.
    pub fn state(&self, version: KeyVersion) -> Option<KeyState> {
        self.deks.get(&version).map(|(s, _)| *s)
    }

    /// The pre-active (next) DEK version, during a rotation window.
    pub fn next_version(&self) -> Option<KeyVersion> {
        self.deks
            .iter()
            .find(|(_, (s, _))| *s == KeyState::PreActive)
            .map(|(v, _)| *v)
    }

    /// The zone's active MAC key.
    pub fn mac_key(&self) -> &MacKey {
        &self.macs[&self.mac_version]
    }

    /// The active MAC key's version.
    pub fn mac_version(&self) -> u32 {
        self.mac_version
    }

    /// Every MAC key held (active and decrypt-only), by version.
    pub fn mac_keys(&self) -> impl Iterator<Item = (u32, &MacKey)> + '_ {
        self.macs.iter().map(|(v, k)| (*v, k))
    }

    /// Every DEK version held, ascending.
    pub fn versions(&self) -> impl Iterator<Item = KeyVersion> + '_ {
        self.deks.keys().copied()
    }
}

impl std::fmt::Debug for ZoneKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneKeyring")
            .field("zone", &self.zone)
            .field("active", &self.active)
            .field(
                "deks",
                &self
                    .deks
                    .iter()
                    .map(|(v, (s, _))| (v.0, *s))
                    .collect::<Vec<_>>(),
            )
            .field("mac_version", &self.mac_version)
            .field("mac_versions", &self.macs.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::passphrase::Passphrase;
    use crate::keys::root::test_support::MemoryProvider;
    use crate::keys::sealed::{KdfParams, SealedFileProvider};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_save_load_unlock_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pass = Passphrase::new("zone test".into()).unwrap();
        let root_path = dir.path().join("root.json");
        let provider =
            SealedFileProvider::create(&root_path, &pass, KdfParams::INSECURE_FAST).unwrap();

        let file = ZoneKeyFile::create(&provider, ZoneId(3), "prod").unwrap();
        let ring1 = file.unlock(&provider).unwrap();
        let path = dir.path().join("zone-3.keys.json");
        file.save(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A fresh process: reopen the root and the zone file.
        let provider2 = SealedFileProvider::open(&root_path, &pass).unwrap();
        let loaded = ZoneKeyFile::load(&path).unwrap();
        assert_eq!(loaded.zone(), ZoneId(3));
        assert_eq!(loaded.zone_name(), "prod");
        let ids: Vec<_> = loaded.records().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["z3-kek-v1", "z3-dek-v1", "z3-mac-v1"]);
        let ring2 = loaded.unlock(&provider2).unwrap();

        assert_eq!(ring2.zone(), ZoneId(3));
        assert_eq!(ring2.active_version(), KeyVersion(1));
        assert_eq!(ring2.versions().collect::<Vec<_>>(), [KeyVersion(1)]);
        let dek = ring2.dek(KeyVersion(1)).unwrap();
        assert_eq!(dek.expose(), ring1.dek(KeyVersion(1)).unwrap().expose());
        assert_ne!(dek.expose()[..32], dek.expose()[32..]);
        assert_eq!(ring2.mac_key().expose(), ring1.mac_key().expose());
        assert!(ring2.dek(KeyVersion(2)).is_none());
        assert_eq!(ring2.state(KeyVersion(1)), Some(KeyState::Active));
    }

    #[test]
    fn add_pre_active_dek() {
        let p = MemoryProvider::new();
        let mut file = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        assert_eq!(file.add_dek_version(&p).unwrap(), KeyVersion(2));
        assert!(matches!(
            file.add_dek_version(&p),
            Err(KeyError::Inconsistent { .. })
        ));
        let ring = file.unlock(&p).unwrap();
        assert_eq!(ring.active_version(), KeyVersion(1));
        assert_eq!(ring.next_version(), Some(KeyVersion(2)));
        assert_ne!(
            ring.dek(KeyVersion(1)).unwrap().expose(),
            ring.dek(KeyVersion(2)).unwrap().expose()
        );
    }

    #[test]
    fn another_root_cannot_unlock() {
        let file = ZoneKeyFile::create(&MemoryProvider::new(), ZoneId(1), "z").unwrap();
        let e = file.unlock(&MemoryProvider::new()).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }), "{e}");
        assert!(e.to_string().contains("z1-kek-v1"), "{e}");
    }

    #[test]
    fn swapped_records_fail_to_unwrap() {
        let p = MemoryProvider::new();
        let mut file = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        file.add_dek_version(&p).unwrap();
        // Move DEK v2's wrapped bytes into DEK v1's record.
        let v2 = file.keys[3].wrapped.clone();
        file.keys[1].wrapped = v2;
        let e = file.unlock(&p).unwrap_err();
        assert!(e.to_string().contains("z1-dek-v1"), "{e}");

        // Moving the whole chain to another zone changes every label.
        let mut file = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        file.zone = ZoneId(5);
        for r in &mut file.keys {
            r.zone = ZoneId(5);
        }
        let e = file.unlock(&p).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }), "{e}");
    }

    #[test]
    fn load_rejects_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = MemoryProvider::new();
        let file = ZoneKeyFile::create(&p, ZoneId(2), "z").unwrap();
        let path = dir.path().join("k.json");

        assert!(matches!(
            ZoneKeyFile::load(&path),
            Err(KeyError::NotFound { .. })
        ));

        let mut f2 = file.clone();
        f2.keys[1].state = KeyState::DecryptOnly; // no active DEK left
        f2.save(&path).unwrap();
        let e = ZoneKeyFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("exactly one active DEK"), "{e}");

        let mut f3 = file.clone();
        f3.keys[1].wrapped = None; // active but no material
        f3.save(&path).unwrap();
        assert!(matches!(
            ZoneKeyFile::load(&path),
            Err(KeyError::Corrupt { .. })
        ));

        let mut f4 = file.clone();
        f4.version = 2;
        f4.save(&path).unwrap();
        assert!(matches!(
            ZoneKeyFile::load(&path),
            Err(KeyError::UnsupportedFormat { found: 2, .. })
        ));

        std::fs::write(&path, "[]").unwrap();
        assert!(matches!(
            ZoneKeyFile::load(&path),
            Err(KeyError::Corrupt { .. })
        ));
    }

    #[test]
    fn destroyed_dek_is_absent_from_keyring() {
        let p = MemoryProvider::new();
        let mut file = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        file.add_dek_version(&p).unwrap();
        // Hand-rotate: v2 active, v1 destroyed.
        file.keys[1].state = KeyState::Destroyed;
        file.keys[1].wrapped = None;
        file.keys[3].state = KeyState::Active;
        let ring = file.unlock(&p).unwrap();
        assert_eq!(ring.active_version(), KeyVersion(2));
        assert!(ring.dek(KeyVersion(1)).is_none());
        assert_eq!(ring.versions().collect::<Vec<_>>(), [KeyVersion(2)]);
    }

    struct Usage(u64);
    impl BlockUsage for Usage {
        fn blocks_under(&self, _zone: ZoneId, _version: KeyVersion) -> u64 {
            self.0
        }
    }

    #[test]
    fn transitions_follow_sp800_57() {
        use KeyState::*;
        let all = [PreActive, Active, DecryptOnly, Destroyed, Compromised];
        let allowed = [
            (PreActive, Active),
            (PreActive, Destroyed),
            (Active, DecryptOnly),
            (Active, Compromised),
            (DecryptOnly, Destroyed),
            (DecryptOnly, Compromised),
            (Compromised, Destroyed),
        ];
        for a in all {
            for b in all {
                assert_eq!(a.may_become(b), allowed.contains(&(a, b)), "{a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn set_state_enforces_rules_and_crypto_erases() {
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(4), "z").unwrap();
        // Active -> destroyed skips decrypt-only: refused.
        let e = f
            .set_state("z4-dek-v1", KeyState::Destroyed, &Usage(0))
            .unwrap_err();
        assert!(matches!(e, KeyError::IllegalTransition { .. }), "{e}");
        // Deactivating the only active DEK would leave none: refused, unchanged.
        let e = f
            .set_state("z4-dek-v1", KeyState::DecryptOnly, &Usage(0))
            .unwrap_err();
        assert!(matches!(e, KeyError::Inconsistent { .. }), "{e}");
        assert_eq!(f.records()[1].state, KeyState::Active);
        // A second DEK, activated, lets v1 retire; destroying it asks the map.
        let v2 = f.add_dek_version(&p).unwrap();
        f.set_state("z4-dek-v1", KeyState::DecryptOnly, &Usage(0))
            .unwrap_err();
        f.set_state(&format!("z4-dek-v{}", v2.0), KeyState::Active, &Usage(0))
            .unwrap_err();
        // The flip does both at once.
        assert_eq!(f.flip_dek().unwrap(), (KeyVersion(1), KeyVersion(2)));
        assert!(f.flip_dek().is_err(), "no pre-active DEK left");
        let e = f
            .set_state("z4-dek-v1", KeyState::Destroyed, &Usage(17))
            .unwrap_err();
        assert!(
            matches!(e, KeyError::InUse { .. }) && e.to_string().contains("17"),
            "{e}"
        );
        f.set_state("z4-dek-v1", KeyState::Destroyed, &Usage(0))
            .unwrap();
        let r = f.records().iter().find(|r| r.id == "z4-dek-v1").unwrap();
        assert!(r.wrapped.is_none() && r.destroyed_unix.is_some());
        let e = f
            .set_state("z4-dek-v1", KeyState::Active, &Usage(0))
            .unwrap_err();
        assert!(matches!(e, KeyError::IllegalTransition { .. }));
        assert!(matches!(
            f.set_state("nope", KeyState::Active, &Usage(0)),
            Err(KeyError::UnknownKey { .. })
        ));
        // The KEK still wraps live keys: it cannot be destroyed.
        let e = f.set_state("z4-kek-v1", KeyState::DecryptOnly, &Usage(0));
        assert!(e.is_ok());
        let e = f
            .set_state("z4-kek-v1", KeyState::Destroyed, &Usage(0))
            .unwrap_err();
        assert!(matches!(e, KeyError::InUse { .. }), "{e}");
    }

    #[test]
    fn kek_rotation_rewraps_in_batches_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zone.json");
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(2), "z").unwrap();
        for _ in 0..5 {
            f.add_dek_version(&p).unwrap();
            f.flip_dek().unwrap();
        }
        let before = f.unlock(&p).unwrap();
        let r = f.begin_kek_rotation(&p).unwrap();
        assert_eq!(
            (r.new_version, r.remaining),
            (2, 7),
            "6 DEKs and the MAC key"
        );
        let r = f.rewrap_batch(&p, 3).unwrap();
        assert_eq!(r.remaining, 4);
        // A crash here: the file on disk is half re-wrapped, and every key
        // still unwraps (both KEKs are usable).
        f.save(&path).unwrap();
        let mut f = ZoneKeyFile::load(&path).unwrap();
        let mid = f.unlock(&p).unwrap();
        assert!(
            f.finish_kek_rotation(&Usage(0)).is_err(),
            "not finished yet"
        );
        assert_eq!(
            f.begin_kek_rotation(&p).unwrap().remaining,
            4,
            "resumes, no third KEK"
        );
        while f.rewrap_batch(&p, 3).unwrap().remaining > 0 {}
        let destroyed = f.finish_kek_rotation(&Usage(0)).unwrap();
        assert_eq!(destroyed, vec!["z2-kek-v1".to_string()]);
        f.save(&path).unwrap();
        let f = ZoneKeyFile::load(&path).unwrap();
        assert!(f.kek_rotation().is_none());
        let kek1 = f.records().iter().find(|r| r.id == "z2-kek-v1").unwrap();
        assert!(kek1.wrapped.is_none() && kek1.state == KeyState::Destroyed);
        assert!(
            f.records()
                .iter()
                .filter(|r| r.purpose != Purpose::Kek)
                .all(|r| r.wrapped_by_kek == Some(2))
        );
        let after = f.unlock(&p).unwrap();
        // The data keys themselves are unchanged: volume data needs no work.
        for ring in [&mid, &after] {
            assert_eq!(ring.active_version(), before.active_version());
            for v in before.versions() {
                assert_eq!(
                    ring.dek(v).unwrap().expose(),
                    before.dek(v).unwrap().expose()
                );
            }
            assert_eq!(ring.mac_key().expose(), before.mac_key().expose());
        }
    }

    /// Re-wrap figure for the README: a zone with 1,000 DEK versions, the
    /// sealed-file root provider, batches of 64 with an atomic save each
    /// (what `keyturn keys rotate-kek` does). Run:
    /// `cargo test --release --lib kek_rotation_of_1000_deks -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn kek_rotation_of_1000_deks() {
        let dir = tempfile::tempdir().unwrap();
        let pass = Passphrase::new("bench".into()).unwrap();
        let p =
            SealedFileProvider::create(&dir.path().join("root"), &pass, KdfParams::INSECURE_FAST)
                .unwrap();
        let (median, min, max) = time_kek_rotation_of_1000_deks(&p, dir.path());
        println!(
            "re-wrap of 1000 DEKs + MAC key, an atomic save per 64: median {median:.3} s (min {min:.3}, max {max:.3})"
        );
    }

    /// A KEK rotation of a zone holding 1,000 DEK versions under `provider`,
    /// as the CLI runs it (an atomic save of the key file per 64 keys), five
    /// times in `dir`: (median, min, max) seconds. Benchmarks of both root key
    /// providers share it.
    pub(crate) fn time_kek_rotation_of_1000_deks(
        provider: &dyn RootKeyProvider,
        dir: &std::path::Path,
    ) -> (f64, f64, f64) {
        let path = dir.join("zone.json");
        let mut f = ZoneKeyFile::create(provider, ZoneId(1), "z").unwrap();
        for _ in 1..1000 {
            f.add_dek_version(provider).unwrap();
            f.flip_dek().unwrap();
        }
        f.save(&path).unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let mut f = ZoneKeyFile::load(&path).unwrap();
            let mut r = f.begin_kek_rotation(provider).unwrap();
            f.save(&path).unwrap();
            while r.remaining > 0 {
                r = f.rewrap_batch(provider, 64).unwrap();
                f.save(&path).unwrap();
            }
            f.finish_kek_rotation(&Usage(0)).unwrap();
            f.save(&path).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        assert!(ZoneKeyFile::load(&path).unwrap().unlock(provider).is_ok());
        times.sort_by(f64::total_cmp);
        (times[2], times[0], times[4])
    }
}
