//! Temporal key sets: the keys that seal a zone's stream records.
//!
//! Time is cut into windows (an hour by default) grouped in sets (a day by
//! default). Each set holds one random AES-256 key per window and is stored
//! wrapped, as one blob, under the zone's newest KEK (re-wrapped on a KEK
//! rotation), in `keys/stream-zone-<id>.json`:
//!
//! ```text
//! { "format": "keyturn-stream-keys", "version": 1, "zone": 3,
//!   "set_secs": 86400, "window_secs": 3600,
//!   "sets": [ { "set": 20428, "state": "active", "created_unix": ...,
//!               "kek_version": 1, "wrapped": "<base64>", "shredded": [5],
//!               "destroyed_unix": null } ] }
//! ```
//! A set's wrapped blob is its windows' keys back to back (32 bytes each),
//! wrapped with the label `z<zone>-stream-s<set>` (purpose stream, version
//! = set). A shredded window's key is zeros in the blob and named in
//! `shredded`; a destroyed set has no blob. When a blob loses a key the old
//! file is overwritten with noise before it is unlinked, so the key does not
//! linger in the file system's free blocks more than it must.
//!
//! States: active (its time has not ended), archived (ended, kept wrapped
//! until retention ends), destroyed (erased).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::record::WindowId;
use crate::ids::ZoneId;
use crate::keys::KeyError;
use crate::keys::fsutil::{self, Replace, b64};
use crate::keys::secret::StreamKey;
use crate::keys::wrap::{KeyLabel, Purpose};

const FORMAT: &str = "keyturn-stream-keys";
const FORMAT_VERSION: u32 = 1;
const WHAT: &str = "stream key file";
/// A set's blob is wrapped whole: at most this many windows.
pub const MAX_WINDOWS_PER_SET: u64 = 32;

/// Wraps and unwraps set blobs under the zone's KEK (the pool implements it).
pub trait SetWrapping: Send + Sync {
    /// Wraps `plain` under the newest KEK; returns its version and the bytes.
    fn wrap(&self, label: &KeyLabel, plain: &[u8]) -> Result<(u32, Vec<u8>), KeyError>;
    /// Unwraps bytes wrapped under KEK `kek_version`.
    fn unwrap(
        &self,
        kek_version: u32,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError>;
}

/// Life state of a key set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetState {
    /// Its time has not ended.
    Active,
    /// Ended; kept wrapped until retention ends.
    Archived,
    /// Erased.
    Destroyed,
}

impl SetState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SetState::Active => "active",
            SetState::Archived => "archived",
            SetState::Destroyed => "destroyed",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRecord {
    set: u32,
    state: SetState,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kek_version: Option<u32>,
    #[serde(default, with = "b64::option", skip_serializing_if = "Option::is_none")]
    wrapped: Option<Vec<u8>>,
    #[serde(default)]
    shredded: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    destroyed_unix: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    zone: ZoneId,
    set_secs: u64,
    window_secs: u64,
    sets: Vec<SetRecord>,
}

/// One window as listed by `stream keys`.
#[derive(Clone, Debug, Serialize)]
pub struct WindowInfo {
    /// Window within the set.
    pub window: u32,
    /// Key id.
    pub key_id: String,
    /// Start, unix seconds.
    pub start_unix: u64,
    /// "available", "shredded" or "destroyed".
    pub state: &'static str,
}

/// One set as listed by `stream keys`.
#[derive(Clone, Debug, Serialize)]
pub struct SetInfo {
    /// Set index.
    pub set: u32,
    /// State.
    pub state: &'static str,
    /// Start, unix seconds.
    pub start_unix: u64,
    /// KEK version wrapping it.
    pub kek_version: Option<u32>,
    /// Its windows.
    pub windows: Vec<WindowInfo>,
}

/// A zone's key sets: the file and the unwrapped keys of live sets.
pub struct KeySets {
    path: PathBuf,
    file: KeyFile,
    keys: BTreeMap<u32, Vec<Option<StreamKey>>>,
}

impl std::fmt::Debug for KeySets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySets")
            .field("zone", &self.file.zone)
            .field("sets", &self.file.sets.len())
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a set length and a window length.
pub fn check_lengths(set_secs: u64, window_secs: u64) -> Result<(), String> {
    if window_secs < 1 || set_secs < window_secs || !set_secs.is_multiple_of(window_secs) {
        return Err(format!(
            "a key set of {set_secs} s must hold a whole number (at least one) of windows of {window_secs} s"
        ));
    }
    if set_secs / window_secs > MAX_WINDOWS_PER_SET {
        return Err(format!(
            "a key set holds at most {MAX_WINDOWS_PER_SET} windows; {set_secs} s / {window_secs} s is {}",
            set_secs / window_secs
        ));
    }
    Ok(())
}

impl KeySets {
    /// The key file of `zone` under `keys_dir`.
    pub fn path(keys_dir: &Path, zone: ZoneId) -> PathBuf {
        keys_dir.join(format!("stream-zone-{}.json", zone.0))
    }

    /// Opens the key file, or creates an empty one with these lengths.
    /// Lengths of an existing file are kept (records name their windows).
    pub fn open(
        path: &Path,
        zone: ZoneId,
        set_secs: u64,
        window_secs: u64,
        wrapping: &dyn SetWrapping,
    ) -> Result<Self, KeyError> {
        let corrupt = |reason: String| KeyError::Corrupt {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        // A shred interrupted after the new file was in place.
        let _ = fsutil::destroy_file(WHAT, &shredding_path(path));
        let file = if path.exists() {
            let bytes = fsutil::read_limited(WHAT, path, 16 << 20)?;
            let f: KeyFile = serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(crate::keys::describe_json_error(&e)))?;
            if f.format != FORMAT || f.version != FORMAT_VERSION || f.zone != zone {
                return Err(corrupt(
                    "not this zone's stream key file, or another format".into(),
                ));
            }
            check_lengths(f.set_secs, f.window_secs).map_err(corrupt)?;
            f
        } else {
            check_lengths(set_secs, window_secs)
                .map_err(|e| KeyError::Inconsistent { zone, reason: e })?;
            KeyFile {
                format: FORMAT.into(),
                version: FORMAT_VERSION,
                zone,
                set_secs,
                window_secs,
                sets: Vec::new(),
            }
        };
        let mut sets = Self {
            path: path.to_path_buf(),
            file,
            keys: BTreeMap::new(),
        };
        for r in sets.file.sets.clone() {
            if let (Some(kek), Some(wrapped)) = (r.kek_version, r.wrapped.as_deref()) {
                let plain = wrapping.unwrap(kek, &sets.label(r.set), wrapped)?;
                sets.keys
                    .insert(r.set, sets.split(r.set, &plain, &r.shredded)?);
            }
        }
        Ok(sets)
    }

    fn label(&self, set: u32) -> KeyLabel {
        KeyLabel {
            key_id: format!("z{}-stream-s{set}", self.file.zone.0),
            zone: self.file.zone,
            purpose: Purpose::Stream,
            version: set,
        }
    }

    fn windows_per_set(&self) -> u32 {
        (self.file.set_secs / self.file.window_secs) as u32
    }

    fn split(
        &self,
        set: u32,
        plain: &[u8],
        shredded: &[u32],
    ) -> Result<Vec<Option<StreamKey>>, KeyError> {
        let n = self.windows_per_set() as usize;
        if plain.len() != n * StreamKey::LEN {
            return Err(KeyError::InvalidKey {
                label: self.label(set).to_string(),
                reason: format!("{} bytes, expected {}", plain.len(), n * StreamKey::LEN),
            });
        }
        Ok(plain
            .chunks(StreamKey::LEN)
            .enumerate()
            .map(|(i, k)| {
                (!shredded.contains(&(i as u32)))
                    .then(|| StreamKey::from_slice(k).expect("32 bytes"))
            })
            .collect())
    }

    /// Zone.
    pub fn zone(&self) -> ZoneId {
        self.file.zone
    }

    /// Window length in seconds.
    pub fn window_secs(&self) -> u64 {
        self.file.window_secs
    }

    /// The window that unix time `ms` falls in.
    pub fn window_at(&self, ms: u64) -> WindowId {
        let secs = ms / 1000;
        WindowId {
            set: (secs / self.file.set_secs) as u32,
            window: ((secs % self.file.set_secs) / self.file.window_secs) as u32,
        }
    }

    /// Start of a window, unix seconds.
    pub fn window_start(&self, w: WindowId) -> u64 {
        u64::from(w.set) * self.file.set_secs + u64::from(w.window) * self.file.window_secs
    }

    /// The key of window `w`, if it exists and was neither shredded nor destroyed.
    pub fn key(&self, w: WindowId) -> Option<&StreamKey> {
        self.keys.get(&w.set)?.get(w.window as usize)?.as_ref()
    }

    /// Why window `w` has no key: "shredded", "destroyed" or "unknown".
    pub fn missing_reason(&self, w: WindowId) -> &'static str {
        match self.file.sets.iter().find(|r| r.set == w.set) {
            Some(r) if r.state == SetState::Destroyed => "destroyed",
            Some(r) if r.shredded.contains(&w.window) => "shredded",
            Some(_) => "unknown",
            None => "unknown",
        }
    }

    /// Makes set `set` exist (random keys, wrapped and saved). Returns true
    /// if it was created.
    pub fn ensure(&mut self, set: u32, wrapping: &dyn SetWrapping) -> Result<bool, KeyError> {
        if self.file.sets.iter().any(|r| r.set == set) {
            return Ok(false);
        }
        let keys: Vec<StreamKey> = (0..self.windows_per_set())
            .map(|_| StreamKey::generate())
            .collect();
        let mut plain = Zeroizing::new(Vec::with_capacity(keys.len() * StreamKey::LEN));
        for k in &keys {
            plain.extend_from_slice(k.expose());
        }
        let (kek, wrapped) = wrapping.wrap(&self.label(set), &plain)?;
        self.file.sets.push(SetRecord {
            set,
            state: SetState::Active,
            created_unix: unix_now(),
            kek_version: Some(kek),
            wrapped: Some(wrapped),
            shredded: Vec::new(),
            destroyed_unix: None,
        });
        self.file.sets.sort_by_key(|r| r.set);
        self.save(false)?;
        self.keys.insert(set, keys.into_iter().map(Some).collect());
        Ok(true)
    }

    /// Crypto-shreds window `w`: its key is erased from the file and from
    /// memory, so its records can never be opened again. Only a window that
    /// has ended (at `now_unix`): records are still being sealed under the
    /// current one.
    pub fn shred(
        &mut self,
        w: WindowId,
        now_unix: u64,
        wrapping: &dyn SetWrapping,
    ) -> Result<(), KeyError> {
        let label = self.label(w.set);
        let n = self.windows_per_set();
        let end = self.window_start(w) + self.file.window_secs;
        if end > now_unix {
            return Err(KeyError::InvalidKey {
                label: super::record::key_id(self.file.zone.0, w),
                reason: format!(
                    "the window is still open or to come (it ends at unix {end}); a window can be shredded once it has ended"
                ),
            });
        }
        let Some(i) = self.file.sets.iter().position(|r| r.set == w.set) else {
            return Err(KeyError::InvalidKey {
                label: label.to_string(),
                reason: "no such key set".into(),
            });
        };
        if w.window >= n {
            return Err(KeyError::InvalidKey {
                label: label.to_string(),
                reason: format!("a set has windows 0..{n}"),
            });
        }
        if self.file.sets[i].state == SetState::Destroyed
            || self.file.sets[i].shredded.contains(&w.window)
        {
            return Ok(());
        }
        let keys = self
            .keys
            .get_mut(&w.set)
            .expect("live sets are unwrapped at open");
        keys[w.window as usize] = None;
        let mut plain = Zeroizing::new(Vec::with_capacity(n as usize * StreamKey::LEN));
        for k in keys.iter() {
            match k {
                Some(k) => plain.extend_from_slice(k.expose()),
                None => plain.extend_from_slice(&[0u8; 32]),
            }
        }
        let (kek, wrapped) = wrapping.wrap(&label, &plain)?;
        let r = &mut self.file.sets[i];
        r.shredded.push(w.window);
        r.shredded.sort_unstable();
        r.kek_version = Some(kek);
        r.wrapped = Some(wrapped);
        self.save(true)
    }

    /// Marks sets whose time has ended archived, and destroys those whose
    /// last window ended more than `retention_secs` ago. Returns the sets
    /// destroyed.
    pub fn age(&mut self, now_unix: u64, retention_secs: u64) -> Result<Vec<u32>, KeyError> {
        let mut destroyed = Vec::new();
        let mut changed = false;
        for r in &mut self.file.sets {
            let end = (u64::from(r.set) + 1) * self.file.set_secs;
            if r.state == SetState::Active && now_unix >= end {
                r.state = SetState::Archived;
                changed = true;
            }
            if r.state == SetState::Archived && now_unix >= end.saturating_add(retention_secs) {
                r.state = SetState::Destroyed;
                r.wrapped = None;
                r.kek_version = None;
                r.destroyed_unix = Some(now_unix);
                self.keys.remove(&r.set);
                destroyed.push(r.set);
                changed = true;
            }
        }
        if changed {
            self.save(!destroyed.is_empty())?;
        }
        Ok(destroyed)
    }

    /// Re-wraps every set under the newest KEK (a KEK rotation calls this
    /// before the old KEK is destroyed). Returns how many were re-wrapped.
    pub fn rewrap(&mut self, wrapping: &dyn SetWrapping) -> Result<usize, KeyError> {
        let mut n = 0;
        for i in 0..self.file.sets.len() {
            let (set, Some(kek), Some(wrapped)) = (
                self.file.sets[i].set,
                self.file.sets[i].kek_version,
                self.file.sets[i].wrapped.clone(),
            ) else {
                continue;
            };
            let label = self.label(set);
            let plain = wrapping.unwrap(kek, &label, &wrapped)?;
            let (new_kek, rewrapped) = wrapping.wrap(&label, &plain)?;
            if new_kek != kek {
                n += 1;
            }
            self.file.sets[i].kek_version = Some(new_kek);
            self.file.sets[i].wrapped = Some(rewrapped);
        }
        self.save(false)?;
        Ok(n)
    }

    /// The KEK versions the sets are wrapped under.
    pub fn kek_versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .file
            .sets
            .iter()
            .filter_map(|r| r.kek_version)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Sets and windows, for `stream keys`.
    pub fn list(&self) -> Vec<SetInfo> {
        let n = self.windows_per_set();
        self.file
            .sets
            .iter()
            .map(|r| SetInfo {
                set: r.set,
                state: r.state.name(),
                start_unix: u64::from(r.set) * self.file.set_secs,
                kek_version: r.kek_version,
                windows: (0..n)
                    .map(|w| {
                        let id = WindowId {
                            set: r.set,
                            window: w,
                        };
                        WindowInfo {
                            window: w,
                            key_id: super::record::key_id(self.file.zone.0, id),
                            start_unix: self.window_start(id),
                            state: if r.state == SetState::Destroyed {
                                "destroyed"
                            } else if r.shredded.contains(&w) {
                                "shredded"
                            } else {
                                "available"
                            },
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// Writes the file; `erase_old` first keeps a link to the old file and
    /// overwrites it once the new one is in place.
    fn save(&self, erase_old: bool) -> Result<(), KeyError> {
        let mut json = serde_json::to_vec_pretty(&self.file).map_err(|e| KeyError::Corrupt {
            what: WHAT,
            path: self.path.clone(),
            reason: format!("cannot serialise: {}", crate::keys::describe_json_error(&e)),
        })?;
        json.push(b'\n');
        let old = shredding_path(&self.path);
        let linked = erase_old && std::fs::hard_link(&self.path, &old).is_ok();
        fsutil::write_private_atomic(WHAT, &self.path, &json, Replace::Allow)?;
        if linked {
            fsutil::destroy_file(WHAT, &old)?;
        }
        Ok(())
    }
}

fn shredding_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".shredding");
    PathBuf::from(p)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::secret::Kek;
    use crate::keys::wrap;
    use parking_lot::Mutex;

    /// KEKs by version, the newest wrapping.
    pub(crate) struct TestKeks(pub Mutex<Vec<Kek>>);

    impl TestKeks {
        pub(crate) fn new() -> Self {
            Self(Mutex::new(vec![Kek::generate()]))
        }
    }

    impl SetWrapping for TestKeks {
        fn wrap(&self, label: &KeyLabel, plain: &[u8]) -> Result<(u32, Vec<u8>), KeyError> {
            let keks = self.0.lock();
            Ok((
                keks.len() as u32,
                wrap::wrap(keks.last().unwrap(), label, plain)?,
            ))
        }
        fn unwrap(
            &self,
            v: u32,
            label: &KeyLabel,
            w: &[u8],
        ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            let keks = self.0.lock();
            wrap::unwrap(&keks[v as usize - 1], label, w)
        }
    }

    #[test]
    fn sets_are_created_reopened_shredded_rewrapped_and_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let keks = TestKeks::new();
        let mut s = KeySets::open(&path, ZoneId(2), 86400, 3600, &keks).unwrap();
        let w = s.window_at(1_700_000_000_000);
        assert!(s.key(w).is_none());
        assert!(s.ensure(w.set, &keks).unwrap());
        assert!(!s.ensure(w.set, &keks).unwrap());
        let k = *s.key(w).unwrap().expose();
        let other = WindowId {
            set: w.set,
            window: (w.window + 1) % 24,
        };
        let k2 = *s.key(other).unwrap().expose();
        assert_ne!(k, k2);
        // No key bytes in the file.
        let text = std::fs::read(&path).unwrap();
        assert!(!text.windows(32).any(|x| x == k));

        let s2 = KeySets::open(&path, ZoneId(2), 1, 1, &keks).unwrap();
        assert_eq!(s2.key(w).unwrap().expose(), &k);
        assert_eq!(s2.window_secs(), 3600, "an existing file keeps its lengths");

        let after = s.window_start(w) + 3600;
        assert!(
            s.shred(w, after - 1, &keks).is_err(),
            "an open window is not shredded"
        );
        s.shred(w, after, &keks).unwrap();
        assert!(s.key(w).is_none());
        assert_eq!(s.missing_reason(w), "shredded");
        let s3 = KeySets::open(&path, ZoneId(2), 86400, 3600, &keks).unwrap();
        assert!(s3.key(w).is_none());
        assert_eq!(s3.key(other).unwrap().expose(), &k2);
        assert!(!path.with_extension("json.shredding").exists());

        // A new KEK: re-wrap, then the old one is not needed.
        keks.0.lock().push(Kek::generate());
        assert_eq!(s.rewrap(&keks).unwrap(), 1);
        assert_eq!(s.kek_versions(), vec![2]);
        keks.0.lock()[0] = Kek::generate();
        let s4 = KeySets::open(&path, ZoneId(2), 86400, 3600, &keks).unwrap();
        assert_eq!(s4.key(other).unwrap().expose(), &k2);

        // Retention.
        let end = (u64::from(w.set) + 1) * 86400;
        assert!(s.age(end, 100).unwrap().is_empty());
        assert_eq!(s.list()[0].state, "archived");
        assert_eq!(s.age(end + 100, 100).unwrap(), vec![w.set]);
        assert!(s.key(other).is_none());
        assert_eq!(s.missing_reason(other), "destroyed");
        let s5 = KeySets::open(&path, ZoneId(2), 86400, 3600, &keks).unwrap();
        assert!(s5.key(other).is_none());
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert!(check_lengths(86400, 3600).is_ok());
        assert!(check_lengths(86400, 0).is_err());
        assert!(check_lengths(86400, 7000).is_err());
        assert!(check_lengths(86400, 60).is_err());
        assert!(check_lengths(60, 120).is_err());
    }
}
