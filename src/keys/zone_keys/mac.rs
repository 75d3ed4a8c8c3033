//! MAC key rotation at key level. A rotation adds MAC key v(n+1), active,
//! and makes the active one decrypt-only: it no longer tags new blocks but
//! still verifies the tags it made, until a re-tag pass has moved every tag
//! to the new key. Then the old key is destroyed (its wrapped copy erased).
//! One rotation at a time: a second waits for the first's old key to go.

use super::{KeyRecord, KeyState, ZoneKeyFile, unix_now};
use crate::keys::KeyError;
use crate::keys::root::RootKeyProvider;
use crate::keys::secret::MacKey;
use crate::keys::wrap::{KeyLabel, Purpose};

/// Where a zone's MAC keys stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacVersions {
    /// The version that tags new blocks.
    pub active: u32,
    /// Versions retired by a rotation that still verify old tags.
    pub retiring: Vec<u32>,
}

impl ZoneKeyFile {
    /// The zone's MAC key versions.
    pub fn mac_versions(&self) -> MacVersions {
        let macs = || self.keys.iter().filter(|r| r.purpose == Purpose::Mac);
        MacVersions {
            active: macs()
                .find(|r| r.state == KeyState::Active)
                .map_or(0, |r| r.version),
            retiring: macs()
                .filter(|r| r.state == KeyState::DecryptOnly)
                .map(|r| r.version)
                .collect(),
        }
    }

    /// Starts a MAC rotation: MAC key v(n+1), active, wrapped under the
    /// newest KEK; the active one becomes decrypt-only. Refused while an
    /// earlier rotation's old key still verifies tags. Returns (old, new).
    /// Call [`save`](Self::save) to keep it.
    pub fn begin_mac_rotation(
        &mut self,
        provider: &dyn RootKeyProvider,
    ) -> Result<(u32, u32), KeyError> {
        let zone = self.zone;
        let inconsistent = |reason: String| KeyError::Inconsistent { zone, reason };
        let now = self.mac_versions();
        if let Some(v) = now.retiring.first() {
            return Err(inconsistent(format!(
                "a MAC rotation is under way: tags still use MAC key v{v}; \
                 wait until the re-tag pass destroys it"
            )));
        }
        let next = self
            .keys
            .iter()
            .filter(|r| r.purpose == Purpose::Mac)
            .map(|r| r.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| inconsistent("MAC key versions exhausted".into()))?;
        let mac = MacKey::generate();
        let label = KeyLabel::new(zone, Purpose::Mac, next);
        let (kek_version, wrapped) = self.wrap_under_kek(provider, &label, mac.expose())?;
        let stamp = unix_now();
        for r in self.keys.iter_mut() {
            if r.purpose == Purpose::Mac && r.state == KeyState::Active {
                r.state = KeyState::DecryptOnly;
                r.deactivated_unix = Some(stamp);
            }
        }
        self.keys.push(KeyRecord::new(
            zone,
            Purpose::Mac,
            next,
            KeyState::Active,
            Some(kek_version),
            stamp,
            wrapped,
        ));
        debug_assert!(self.check().is_ok());
        Ok((now.active, next))
    }

    /// Destroys retired MAC key `version` (crypto-erase). The caller has
    /// checked that no tag uses it.
    pub fn destroy_mac(&mut self, version: u32) -> Result<(), KeyError> {
        let id = KeyLabel::new(self.zone, Purpose::Mac, version).key_id;
        struct NoBlocks;
        impl super::BlockUsage for NoBlocks {
            fn blocks_under(&self, _: crate::ids::ZoneId, _: crate::ids::KeyVersion) -> u64 {
                0
            }
        }
        self.set_state(&id, KeyState::Destroyed, &NoBlocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ZoneId;
    use crate::keys::root::test_support::MemoryProvider;

    #[test]
    fn mac_rotation_keeps_the_old_key_until_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.json");
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        let before = f.unlock(&p).unwrap();
        assert_eq!(f.begin_mac_rotation(&p).unwrap(), (1, 2));
        assert!(
            f.begin_mac_rotation(&p).is_err(),
            "one MAC rotation at a time"
        );
        f.save(&path).unwrap();
        let f2 = ZoneKeyFile::load(&path).unwrap();
        let ring = f2.unlock(&p).unwrap();
        assert_eq!(ring.mac_version(), 2);
        let macs: Vec<u32> = ring.mac_keys().map(|(v, _)| v).collect();
        assert_eq!(macs, [1, 2]);
        let old = ring.mac_keys().find(|(v, _)| *v == 1).unwrap().1;
        assert_eq!(old.expose(), before.mac_key().expose());
        assert_ne!(ring.mac_key().expose(), before.mac_key().expose());
        let mut f = f2;
        f.destroy_mac(1).unwrap();
        assert_eq!(
            f.mac_versions(),
            MacVersions {
                active: 2,
                retiring: vec![]
            }
        );
        let r = f.records().iter().find(|r| r.id == "z1-mac-v1").unwrap();
        assert!(r.wrapped.is_none());
        assert_eq!(f.unlock(&p).unwrap().mac_keys().count(), 1);
        assert!(f.destroy_mac(2).is_err(), "the active MAC key stays");
        assert_eq!(f.begin_mac_rotation(&p).unwrap(), (2, 3));
    }
}
