//! The rollback of a flip at key level: the DEK the flip retired is active
//! again, and the flip's new DEK is kept decrypt-only.
//!
//! NIST SP 800-57 has no way back from decrypt-only to active, so
//! [`KeyState::may_become`] refuses it; this is the one sanctioned exception,
//! and only for a key that was never compromised or destroyed. The rotation
//! layer decides when a rollback is allowed (within the grace period, dual
//! control); this file only keeps the key chain consistent.

use super::{KeyState, ZoneKeyFile, unix_now};
use crate::ids::KeyVersion;
use crate::keys::KeyError;
use crate::keys::wrap::Purpose;

impl ZoneKeyFile {
    /// Makes DEK `to` (decrypt-only) active again and the active DEK
    /// decrypt-only, in one change (one save). Refused for a destroyed,
    /// compromised, pre-active or unknown `to`. Returns the version that
    /// was active. Call [`save`](Self::save) to keep it.
    pub fn rollback_dek(&mut self, to: KeyVersion) -> Result<KeyVersion, KeyError> {
        let zone = self.zone;
        let record = self
            .keys
            .iter()
            .find(|r| r.purpose == Purpose::Dek && r.version == to.0)
            .ok_or_else(|| KeyError::UnknownKey {
                zone,
                key: format!("z{}-dek-v{}", zone.0, to.0),
            })?;
        if record.state != KeyState::DecryptOnly {
            return Err(KeyError::IllegalTransition {
                key: record.id.clone(),
                from: record.state.name().into(),
                to: "active (rollback: only a decrypt-only key can be made active again)".into(),
            });
        }
        let from = self
            .deks()
            .find(|r| r.state == KeyState::Active)
            .map(|r| r.version)
            .ok_or_else(|| KeyError::Inconsistent {
                zone,
                reason: "no active DEK".into(),
            })?;
        let now = unix_now();
        for r in self.keys.iter_mut().filter(|r| r.purpose == Purpose::Dek) {
            if r.version == from {
                r.state = KeyState::DecryptOnly;
                r.deactivated_unix = Some(now);
            } else if r.version == to.0 {
                r.state = KeyState::Active;
                r.activated_unix = Some(now);
                r.deactivated_unix = None;
            }
        }
        debug_assert!(self.check().is_ok());
        Ok(KeyVersion(from))
    }

    /// The active DEK version.
    pub fn active_dek(&self) -> Option<KeyVersion> {
        self.deks()
            .find(|r| r.state == KeyState::Active)
            .map(|r| KeyVersion(r.version))
    }

    /// The state of DEK `version`, if the file has it.
    pub fn dek_state(&self, version: KeyVersion) -> Option<KeyState> {
        self.deks()
            .find(|r| r.version == version.0)
            .map(|r| r.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ZoneId;
    use crate::keys::root::test_support::MemoryProvider;
    use crate::keys::zone_keys::BlockUsage;

    struct NoBlocks;
    impl BlockUsage for NoBlocks {
        fn blocks_under(&self, _: ZoneId, _: KeyVersion) -> u64 {
            0
        }
    }

    #[test]
    fn rollback_swaps_active_and_keeps_both_keys() {
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        f.add_dek_version(&p).unwrap();
        let before = f.unlock(&p).unwrap();
        f.flip_dek().unwrap();
        assert_eq!(f.rollback_dek(KeyVersion(1)).unwrap(), KeyVersion(2));
        assert_eq!(f.active_dek(), Some(KeyVersion(1)));
        assert_eq!(f.dek_state(KeyVersion(2)), Some(KeyState::DecryptOnly));
        let ring = f.unlock(&p).unwrap();
        assert_eq!(ring.active_version(), KeyVersion(1));
        // Both keys are the same keys as before: every block stays readable.
        for v in [1, 2] {
            assert_eq!(
                ring.dek(KeyVersion(v)).unwrap().expose(),
                before.dek(KeyVersion(v)).unwrap().expose()
            );
        }
        // The key that is active already cannot be "made active again".
        let e = f.rollback_dek(KeyVersion(1)).unwrap_err();
        assert!(e.to_string().contains("decrypt-only"), "{e}");
    }

    #[test]
    fn rollback_refused_for_destroyed_compromised_or_unknown_keys() {
        let p = MemoryProvider::new();
        let mut f = ZoneKeyFile::create(&p, ZoneId(1), "z").unwrap();
        f.add_dek_version(&p).unwrap();
        f.flip_dek().unwrap();
        let mut destroyed = f.clone();
        destroyed
            .set_state("z1-dek-v1", KeyState::Destroyed, &NoBlocks)
            .unwrap();
        let e = destroyed.rollback_dek(KeyVersion(1)).unwrap_err();
        assert!(matches!(e, KeyError::IllegalTransition { .. }), "{e}");
        assert!(e.to_string().contains("destroyed"), "{e}");
        let mut compromised = f.clone();
        compromised
            .set_state("z1-dek-v1", KeyState::Compromised, &NoBlocks)
            .unwrap();
        let e = compromised.rollback_dek(KeyVersion(1)).unwrap_err();
        assert!(e.to_string().contains("compromised"), "{e}");
        assert_eq!(compromised.active_dek(), Some(KeyVersion(2)));
        assert!(matches!(
            f.rollback_dek(KeyVersion(9)),
            Err(KeyError::UnknownKey { .. })
        ));
    }
}
