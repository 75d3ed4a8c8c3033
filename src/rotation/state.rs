//! The persisted state of a zone's DEK rotation: `rotation/zone-N.json`,
//! replaced atomically at every transition.
//!
//! The file says what the operator asked for (a window, a scheduled flip,
//! an abort, a pause); the journal's flip record says whether the flip
//! happened. At open the two are reconciled: a window whose next key the
//! block map already calls active was flipped, and its key file and this
//! file are brought forward.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{KeyVersion, ZoneId};

/// Where a zone is in its rotation cycle (as persisted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Every content block is under the active key (or waits only for destage).
    #[default]
    Idle,
    /// The window is open: writes go to both keys, the pipeline stages.
    Window,
    /// An abort is clearing staged copies; then the next key is destroyed.
    Aborting,
    /// Flipped: the migrator moves what is not under the active key yet.
    Migrating,
}

/// An old DEK waiting out its grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDestroy {
    /// DEK version.
    pub version: u32,
    /// When it may be destroyed (Unix seconds).
    pub due_unix: u64,
}

/// A zone's rotation state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RotationState {
    /// Phase.
    pub phase: Phase,
    /// The next DEK version (window, aborting).
    pub next: Option<u32>,
    /// When the window opened.
    pub window_opened_unix: Option<u64>,
    /// Scheduled flip time.
    pub flip_at_unix: Option<u64>,
    /// Whether the operator paused the pipeline or migrator.
    pub paused: bool,
    /// An emergency rotation: the old key is compromised, migration unthrottled.
    pub emergency: bool,
    /// The operator's reason for an emergency rotation.
    pub reason: Option<String>,
    /// When the last flip happened.
    pub flipped_unix: Option<u64>,
    /// How long the last flip took, in microseconds.
    pub flip_micros: Option<u64>,
    /// The version the last flip moved away from.
    pub old_version: Option<u32>,
    /// Old DEKs waiting to be destroyed.
    pub pending_destroy: Vec<PendingDestroy>,
    /// This rotation's grace period in seconds (from the zone's policy,
    /// when the scheduler started it); else `[rotation] grace_secs`.
    pub grace_secs: Option<u64>,
    /// Content blocks by class and how many had a staged copy, just before
    /// the last flip (the achieved coverage the scheduler records).
    pub coverage_at_flip: Option<crate::zone::classes::ClassCensus>,
    /// The last flip was rolled back: the DEK it had made active (now
    /// decrypt-only, migrated away from). Cleared by the next window.
    pub rolled_back_from: Option<u32>,
    /// When the rollback happened.
    pub rolled_back_unix: Option<u64>,
    /// This rotation's staging and migration throttle in MiB/s (the zone
    /// policy's, when the scheduler started it); else `[rotation] rate_mib_s`.
    pub rate_mib_s: Option<u64>,
}

impl RotationState {
    /// The state file of `zone` in pool `dir`.
    pub fn path(dir: &Path, zone: ZoneId) -> PathBuf {
        dir.join("rotation").join(format!("zone-{}.json", zone.0))
    }

    /// Reads the state (a missing file is an idle zone).
    pub fn load(dir: &Path, zone: ZoneId) -> std::io::Result<Self> {
        let path = Self::path(dir, zone);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the state file atomically (and durably).
    pub fn save(&self, dir: &Path, zone: ZoneId) -> std::io::Result<()> {
        let path = Self::path(dir, zone);
        if let Some(parent) = path.parent()
            && !parent.is_dir()
        {
            std::fs::create_dir_all(parent)?;
            // The new directory's entry, so the state file renamed into it
            // cannot outlive a power loss without it.
            if let Some(up) = parent.parent() {
                crate::store::durable::sync_dir(up)?;
            }
        }
        crate::pool::write_atomic(
            &path,
            &serde_json::to_vec_pretty(self).expect("state serialises"),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// The window's next key version.
    pub fn next_version(&self) -> Option<KeyVersion> {
        self.next.map(KeyVersion)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_idle_and_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            RotationState::load(dir.path(), ZoneId(3)).unwrap(),
            RotationState::default()
        );
        let s = RotationState {
            phase: Phase::Window,
            next: Some(4),
            flip_at_unix: Some(99),
            pending_destroy: vec![PendingDestroy {
                version: 2,
                due_unix: 7,
            }],
            ..Default::default()
        };
        s.save(dir.path(), ZoneId(3)).unwrap();
        assert_eq!(RotationState::load(dir.path(), ZoneId(3)).unwrap(), s);
        std::fs::write(RotationState::path(dir.path(), ZoneId(3)), "{").unwrap();
        assert!(RotationState::load(dir.path(), ZoneId(3)).is_err());
    }
}
