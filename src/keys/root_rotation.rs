//! The key-level half of a root key rotation: the durable record of a
//! rotation in progress, and the pair of root keys that serves while it runs.
//!
//! A root key rotation re-wraps every zone's KEKs from the old root key to a
//! new one, a batch of KEKs per atomic save of a zone key file. Until the
//! last KEK is re-wrapped both root keys must stay usable, so the pool keeps
//! `POOL/keys/root-rotation.json` (mode 0600, replaced only atomically):
//!
//! ```json
//! {
//!   "format": "keyturn-root-rotation",
//!   "version": 1,
//!   "started_unix": 1700000000,
//!   "old": { "provider": "sealed-file", "path": "keys/root.sealed" },
//!   "new": { "provider": "sealed-file", "path": "keys/root-1700000000.sealed" },
//!   "new_wrapped": "<base64>"
//! }
//! ```
//!
//! `old` and `new` are `[root_key]` sections as pool.toml holds them; a root
//! key's id ([`root_id`]) is made from its section, and each re-wrapped KEK
//! record names the id of the root key that wrapped it. `new_wrapped`
//! (sealed-file rotations only) is the new root key wrapped by the old one
//! (AES-256-GCM, label [`root_label`]): with it the old passphrase alone
//! opens both root keys until pool.toml switches to the new one, and the new
//! sealed file need not exist before then. A PKCS#11 rotation needs no such
//! copy: both keys are objects in the same token, opened with the same PIN.
//!
//! While the record exists and pool.toml still names the old root key, the
//! pool unlocks through a [`RootPair`]: it unwraps each KEK with the root key
//! its record names and wraps new KEKs under the new root key. Once pool.toml
//! names the new root key, every KEK is under it and the record only says
//! that the old root key is still to be destroyed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::fsutil::{self, Replace, b64};
use super::root::RootKeyProvider;
use super::secret::RootKey;
use super::wrap::{self, KeyLabel, Purpose};
use super::{KeyError, describe_json_error};
use crate::config::RootKeyConfig;
use crate::ids::ZoneId;

const WHAT: &str = "root key rotation record";
const FORMAT: &str = "keyturn-root-rotation";
const FORMAT_VERSION: u32 = 1;
const MAX_FILE_LEN: u64 = 64 * 1024;

/// Where the record of a root key rotation in progress lives, in the pool
/// directory.
pub const ROTATION_FILE: &str = "keys/root-rotation.json";

/// The id of the root key a `[root_key]` section names, as KEK records and
/// audit records carry it: `sealed-file:PATH` (the path as pool.toml spells
/// it) or `pkcs11:TOKEN/KEY_LABEL`.
pub fn root_id(config: &RootKeyConfig) -> String {
    match config {
        RootKeyConfig::SealedFile { path } => format!("sealed-file:{}", path.display()),
        RootKeyConfig::Pkcs11 {
            token_label,
            key_label,
            ..
        } => format!("pkcs11:{token_label}/{key_label}"),
        RootKeyConfig::Kmip { addr, key_id, .. } => format!("kmip:{addr}/{key_id}"),
    }
}

/// The label a root key is wrapped under (zone 0, purpose root, version 0:
/// root keys are named by their id, not numbered).
pub fn root_label(id: &str) -> KeyLabel {
    KeyLabel {
        key_id: id.to_string(),
        zone: ZoneId(0),
        purpose: Purpose::Root,
        version: 0,
    }
}

/// A root key rotation in progress, as `POOL/keys/root-rotation.json` holds
/// it (see the module documentation).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootRotationState {
    format: String,
    version: u32,
    /// When the rotation started (Unix seconds).
    pub started_unix: u64,
    /// The root key being retired.
    pub old: RootKeyConfig,
    /// The root key taking its place.
    pub new: RootKeyConfig,
    /// Sealed-file rotations: the new root key wrapped by the old one.
    #[serde(default, with = "b64::option", skip_serializing_if = "Option::is_none")]
    new_wrapped: Option<Vec<u8>>,
}

impl std::fmt::Debug for RootRotationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootRotationState")
            .field("started_unix", &self.started_unix)
            .field("old", &self.old_id())
            .field("new", &self.new_id())
            .field(
                "new_wrapped",
                &self
                    .new_wrapped
                    .as_ref()
                    .map(|w| format!("<{} bytes>", w.len())),
            )
            .finish()
    }
}

impl RootRotationState {
    /// A rotation from `old` to `new` started at `now`. For a sealed-file
    /// rotation, `new_root` is the new root key and `old_provider` wraps it
    /// into the record; a PKCS#11 rotation passes `None` (the new key lives
    /// in the token).
    pub fn new(
        old: RootKeyConfig,
        new: RootKeyConfig,
        now: u64,
        new_root: Option<(&RootKey, &dyn RootKeyProvider)>,
    ) -> Result<Self, KeyError> {
        let new_wrapped = match new_root {
            Some((key, old_provider)) => {
                Some(old_provider.wrap_key(&root_label(&root_id(&new)), key.expose())?)
            }
            None => None,
        };
        Ok(Self {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            started_unix: now,
            old,
            new,
            new_wrapped,
        })
    }

    /// The record's path in the pool in `pool_dir`.
    pub fn path(pool_dir: &Path) -> PathBuf {
        pool_dir.join(ROTATION_FILE)
    }

    /// Reads the record of the pool in `pool_dir`; `None` when no root key
    /// rotation is in progress.
    pub fn load(pool_dir: &Path) -> Result<Option<Self>, KeyError> {
        let path = Self::path(pool_dir);
        let bytes = match fsutil::read_limited(WHAT, &path, MAX_FILE_LEN) {
            Ok(b) => b,
            Err(KeyError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let corrupt = |reason: String| KeyError::Corrupt {
            what: WHAT,
            path: path.clone(),
            reason,
        };
        let state: Self =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
        if state.format != FORMAT {
            return Err(corrupt(
                "the format field does not name a root key rotation record".into(),
            ));
        }
        if state.version != FORMAT_VERSION {
            return Err(KeyError::UnsupportedFormat {
                what: WHAT,
                path,
                found: state.version,
                supported: FORMAT_VERSION,
            });
        }
        if state.old_id() == state.new_id() {
            return Err(corrupt("the old and the new root key are the same".into()));
        }
        Ok(Some(state))
    }

    /// Writes the record for the first time; refuses to replace one (a
    /// rotation already in progress is resumed, never restarted).
    pub fn create(&self, pool_dir: &Path) -> Result<(), KeyError> {
        let path = Self::path(pool_dir);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| KeyError::Corrupt {
            what: WHAT,
            path: path.clone(),
            reason: format!("cannot serialise: {}", describe_json_error(&e)),
        })?;
        json.push(b'\n');
        fsutil::write_private_atomic(WHAT, &path, &json, Replace::Never)
    }

    /// Overwrites and removes the record of the pool in `pool_dir` (it may
    /// hold the new root key wrapped by the old one): the rotation is over.
    pub fn destroy(pool_dir: &Path) -> Result<(), KeyError> {
        fsutil::destroy_file(WHAT, &Self::path(pool_dir))
    }

    /// The old root key's id.
    pub fn old_id(&self) -> String {
        root_id(&self.old)
    }

    /// The new root key's id.
    pub fn new_id(&self) -> String {
        root_id(&self.new)
    }

    /// Sealed-file rotations: the new root key, unwrapped by the old root
    /// key `old` (or by a [`RootPair`], which routes the old id to it).
    pub fn new_root(&self, old: &dyn RootKeyProvider) -> Result<Option<RootKey>, KeyError> {
        let Some(wrapped) = &self.new_wrapped else {
            return Ok(None);
        };
        let id = self.new_id();
        let label = root_label(&id);
        let plain = old.unwrap_key_from(Some(&self.old_id()), &label, wrapped)?;
        RootKey::from_slice(&plain)
            .map(Some)
            .ok_or_else(|| KeyError::InvalidKey {
                label: label.to_string(),
                reason: format!("{} bytes, expected 32", plain.len()),
            })
    }
}

/// A root key held in memory with no file of its own yet: the new root key
/// of a sealed-file rotation, until it is sealed under the new passphrase.
pub struct UnsealedRoot {
    root: RootKey,
    what: String,
}

impl UnsealedRoot {
    /// `root`, described as `what` in logs.
    pub fn new(root: RootKey, what: String) -> Self {
        Self { root, what }
    }

    /// The key itself, for sealing it into its file.
    pub fn key(&self) -> &RootKey {
        &self.root
    }
}

impl std::fmt::Debug for UnsealedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnsealedRoot")
            .field("what", &self.what)
            .field("root", &self.root)
            .finish()
    }
}

impl RootKeyProvider for UnsealedRoot {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        wrap::wrap(&self.root, label, key)
    }

    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        wrap::unwrap(&self.root, label, wrapped)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Both root keys of a rotation in progress, as one provider: KEKs are
/// unwrapped by the root key their record names (the new one when it names
/// the new id, else the old one) and new wraps go under the new root key.
pub struct RootPair {
    old_id: String,
    old: Arc<dyn RootKeyProvider>,
    new_id: String,
    new: Arc<dyn RootKeyProvider>,
}

impl std::fmt::Debug for RootPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPair")
            .field("old", &self.old_id)
            .field("new", &self.new_id)
            .finish_non_exhaustive()
    }
}

impl RootPair {
    /// The pair for a rotation from `old` (id `old_id`) to `new` (`new_id`).
    pub fn new(
        old_id: String,
        old: Arc<dyn RootKeyProvider>,
        new_id: String,
        new: Arc<dyn RootKeyProvider>,
    ) -> Self {
        Self {
            old_id,
            old,
            new_id,
            new,
        }
    }

    /// The new root key alone.
    pub fn new_root(&self) -> Arc<dyn RootKeyProvider> {
        self.new.clone()
    }

    fn route(&self, root: Option<&str>) -> &dyn RootKeyProvider {
        if root == Some(self.new_id.as_str()) {
            self.new.as_ref()
        } else {
            self.old.as_ref()
        }
    }
}

impl RootKeyProvider for RootPair {
    fn wrap_key(&self, label: &KeyLabel, key: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.new.wrap_key(label, key)
    }

    /// Without a record of the root key, the old one: every KEK written
    /// before the rotation is under it.
    fn unwrap_key(&self, label: &KeyLabel, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.old.unwrap_key(label, wrapped)
    }

    /// A new key from the new root key; an existing one from whichever
    /// root key reaches it (the new first: it outlives the rotation).
    fn audit_signer(
        &self,
        existing: Option<&str>,
    ) -> Result<Option<Box<dyn super::root::TokenSigner>>, KeyError> {
        match (existing, self.new.audit_signer(existing)) {
            (Some(_), Ok(None) | Err(_)) => self.old.audit_signer(existing),
            (_, r) => r,
        }
    }

    fn describe(&self) -> String {
        format!(
            "root key rotation in progress: old {}, new {}",
            self.old.describe(),
            self.new.describe()
        )
    }

    fn root_id(&self) -> Option<&str> {
        Some(&self.new_id)
    }

    fn unwrap_key_from(
        &self,
        root: Option<&str>,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.route(root).unwrap_key(label, wrapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::root::test_support::MemoryProvider;
    use crate::keys::zone_keys::{KeyState, ZoneKeyFile};

    fn sealed(path: &str) -> RootKeyConfig {
        RootKeyConfig::SealedFile { path: path.into() }
    }

    fn pair(old: MemoryProvider, new: MemoryProvider) -> RootPair {
        RootPair::new("old".into(), Arc::new(old), "new".into(), Arc::new(new))
    }

    /// Two providers holding the same root keys (MemoryProvider is not Clone).
    fn twins() -> (MemoryProvider, MemoryProvider) {
        let p = MemoryProvider::new();
        let q = MemoryProvider(p.0.clone());
        (p, q)
    }

    #[test]
    fn ids_name_the_key_and_differ() {
        assert_eq!(
            root_id(&sealed("keys/root.sealed")),
            "sealed-file:keys/root.sealed"
        );
        let hsm = RootKeyConfig::Pkcs11 {
            module: "/m.so".into(),
            token_label: "tok".into(),
            key_label: "k2".into(),
        };
        assert_eq!(root_id(&hsm), "pkcs11:tok/k2");
        assert_ne!(root_id(&sealed("a")), root_id(&sealed("b")));
    }

    #[test]
    fn record_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        assert!(RootRotationState::load(dir.path()).unwrap().is_none());
        let old = MemoryProvider::new();
        let new_key = RootKey::generate();
        let s = RootRotationState::new(
            sealed("keys/root.sealed"),
            sealed("keys/root-2.sealed"),
            7,
            Some((&new_key, &old)),
        )
        .unwrap();
        s.create(dir.path()).unwrap();
        assert!(
            matches!(s.create(dir.path()), Err(KeyError::AlreadyExists { .. })),
            "a rotation in progress is never restarted"
        );
        let back = RootRotationState::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.started_unix, 7);
        assert_eq!(back.new_id(), "sealed-file:keys/root-2.sealed");
        // The new root key comes back only through the old one.
        let got = back.new_root(&old).unwrap().unwrap();
        assert_eq!(got.expose(), new_key.expose());
        let e = back.new_root(&MemoryProvider::new()).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }), "{e}");
        // The file holds the new root key only wrapped, and Debug none of it.
        let text = std::fs::read_to_string(RootRotationState::path(dir.path())).unwrap();
        let hex: String = new_key
            .expose()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&hex[..16]));
        assert!(!format!("{back:?}").contains(&hex[..16]));
        assert!(format!("{back:?}").contains("bytes>"));

        RootRotationState::destroy(dir.path()).unwrap();
        assert!(RootRotationState::load(dir.path()).unwrap().is_none());

        // Same key twice, or another format: refused.
        let path = RootRotationState::path(dir.path());
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["new"] = v["old"].clone();
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(matches!(
            RootRotationState::load(dir.path()),
            Err(KeyError::Corrupt { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["version"] = 2.into();
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(matches!(
            RootRotationState::load(dir.path()),
            Err(KeyError::UnsupportedFormat { found: 2, .. })
        ));
    }

    /// A zone's KEKs re-wrapped one per batch, saved and reloaded after each
    /// batch as a crash would leave them: at every boundary the pair unlocks
    /// the zone with the same keys; the old root alone stops working as soon
    /// as one KEK moved, and the new root alone works once all have.
    #[test]
    fn pair_rewraps_and_unlocks_at_every_batch_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zone.json");
        let (old, old_copy) = twins();
        let (new, new_copy) = twins();
        let mut f = ZoneKeyFile::create(&old, ZoneId(1), "z").unwrap();
        // Two KEKs with material: an unfinished KEK rotation.
        f.begin_kek_rotation(&old).unwrap();
        f.save(&path).unwrap();
        let before = f.unlock(&old).unwrap();
        let roots = pair(old, new);
        assert_eq!(f.root_rewrap_remaining("new"), 2);

        let mut boundaries = 0;
        loop {
            let mut f = ZoneKeyFile::load(&path).unwrap();
            let ring = f.unlock(&roots).unwrap();
            assert_eq!(ring.mac_key().expose(), before.mac_key().expose());
            assert_eq!(
                ring.active_dek().expose(),
                before.active_dek().expose(),
                "boundary {boundaries}"
            );
            if f.root_rewrap_remaining("new") == 0 {
                break;
            }
            let left = f.rewrap_root_batch(&roots, 1).unwrap();
            f.save(&path).unwrap();
            boundaries += 1;
            assert_eq!(left, 2 - boundaries);
            let moved = ZoneKeyFile::load(&path).unwrap();
            assert!(
                moved.unlock(&old_copy).is_err() || boundaries == 0,
                "the old root alone no longer unlocks a zone with a moved KEK"
            );
        }
        assert_eq!(boundaries, 2);
        let f = ZoneKeyFile::load(&path).unwrap();
        assert!(
            f.records()
                .iter()
                .filter(|r| r.purpose == Purpose::Kek && r.state != KeyState::Destroyed)
                .all(|r| r.wrapped_by_root.as_deref() == Some("new"))
        );
        // The new root alone opens everything; the old one nothing.
        assert_eq!(f.check_keks_unwrap(&new_copy).unwrap(), 2);
        let e = f.check_keks_unwrap(&old_copy).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }), "{e}");
        // A KEK made while the pair serves is wrapped by the new root.
        let mut f = f;
        while f.rewrap_batch(&roots, 8).unwrap().remaining > 0 {}
        struct NoBlocks;
        impl crate::keys::zone_keys::BlockUsage for NoBlocks {
            fn blocks_under(&self, _: ZoneId, _: crate::ids::KeyVersion) -> u64 {
                0
            }
        }
        f.finish_kek_rotation(&NoBlocks).unwrap();
        f.begin_kek_rotation(&roots).unwrap();
        let kek3 = f.records().iter().find(|r| r.id == "z1-kek-v3").unwrap();
        assert_eq!(kek3.wrapped_by_root.as_deref(), Some("new"));
        assert_eq!(f.check_keks_unwrap(&new_copy).unwrap(), 2);
    }

    #[test]
    fn rewrap_needs_a_rotation_and_files_without_the_field_parse() {
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(2), "z").unwrap();
        let e = f.rewrap_root_batch(&p, 4).unwrap_err();
        assert!(matches!(e, KeyError::Inconsistent { .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.json");
        f.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("wrapped_by_root"), "{text}");
        assert!(ZoneKeyFile::load(&path).unwrap().unlock(&p).is_ok());
        // A DEK that names a root key is refused.
        let text = text.replacen(
            "\"wrapped_by_kek\": 1",
            "\"wrapped_by_kek\": 1, \"wrapped_by_root\": \"x\"",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let e = ZoneKeyFile::load(&path).unwrap_err();
        assert!(e.to_string().contains("names a root key"), "{e}");
    }
}
