//! Cleanup: destroys the DEKs of a zone that are past their grace period
//! and protect nothing (no content block refers to them), which the
//! rotation's own timer has not destroyed (a key retired before grace
//! periods were tracked, a destroy that failed, a timer that has not come
//! round yet). A key that still protects blocks is never destroyed here.

use serde::Serialize;

use super::state::PendingDestroy;
use crate::audit::AuditEvent;
use crate::ids::KeyVersion;
use crate::keys::wrap::Purpose;
use crate::keys::zone_keys::{KeyRecord, KeyState, ZoneKeyFile};
use crate::pool::{Pool, PoolError};

type Result<T> = std::result::Result<T, PoolError>;

/// One DEK cleanup looked at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CleanupKey {
    /// Zone.
    pub zone: String,
    /// Key id.
    pub key_id: String,
    /// DEK version.
    pub version: u32,
    /// Its state before cleanup.
    pub state: String,
    /// Content blocks that still refer to it.
    pub blocks: u64,
    /// When its grace period ends (Unix seconds).
    pub grace_ends_unix: u64,
    /// Why it is kept (absent: destroyed, or to be with `dry_run`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_because: Option<String>,
}

/// What [`Pool::key_cleanup`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanupReport {
    /// Nothing was destroyed: `destroyed` lists what would be.
    pub dry_run: bool,
    /// Destroyed keys.
    pub destroyed: Vec<CleanupKey>,
    /// Retired keys kept, each with its reason.
    pub kept: Vec<CleanupKey>,
}

/// The retired DEKs of one zone, split into those to destroy and those
/// kept (`keep`: versions a rotation uses): a pure function of the key records, the rotation state and the
/// block references, so it is tested without a pool.
pub(crate) fn select(
    zone: &str,
    records: &[KeyRecord],
    keep: &[u32],
    pending: &[PendingDestroy],
    blocks: impl Fn(u32) -> u64,
    grace_secs: u64,
    now: u64,
) -> (Vec<CleanupKey>, Vec<CleanupKey>) {
    let (mut destroy, mut kept) = (Vec::new(), Vec::new());
    for r in records.iter().filter(|r| {
        r.purpose == Purpose::Dek
            && matches!(r.state, KeyState::DecryptOnly | KeyState::Compromised)
    }) {
        let grace_ends_unix = pending
            .iter()
            .find(|p| p.version == r.version)
            .map(|p| p.due_unix)
            .unwrap_or_else(|| {
                r.deactivated_unix
                    .unwrap_or(r.created_unix)
                    .saturating_add(grace_secs)
            });
        let n = blocks(r.version);
        let mut key = CleanupKey {
            zone: zone.into(),
            key_id: r.id.clone(),
            version: r.version,
            state: r.state.name().into(),
            blocks: n,
            grace_ends_unix,
            kept_because: None,
        };
        key.kept_because = if keep.contains(&r.version) {
            Some("a rotation of the zone still uses it".into())
        } else if n > 0 {
            Some(format!("it protects {n} content block(s)"))
        } else if grace_ends_unix > now {
            Some(format!(
                "its grace period ends in {} s",
                grace_ends_unix - now
            ))
        } else {
            None
        };
        if key.kept_because.is_some() {
            kept.push(key);
        } else {
            destroy.push(key);
        }
    }
    (destroy, kept)
}

impl Pool {
    /// Destroys (crypto-erases) the DEKs of `zone`, or of every zone, that
    /// are past their grace period and protect no content block; with
    /// `dry_run`, only lists them. The caller has checked dual control;
    /// `approvers` go on the record.
    pub fn key_cleanup(
        &self,
        zone: Option<&str>,
        dry_run: bool,
        approvers: &[String],
    ) -> Result<CleanupReport> {
        let zones: Vec<String> = match zone {
            Some(z) => {
                self.zone_id(z)?;
                vec![z.to_string()]
            }
            None => self.catalog().zones.into_iter().map(|z| z.name).collect(),
        };
        let mut report = CleanupReport {
            dry_run,
            ..Default::default()
        };
        let now = crate::clock::unix_now();
        for name in zones {
            let rot = self.rotation(&name)?;
            // Operator actions and the rotation's timer on this zone wait.
            let _op = rot.op.lock();
            let z = rot.zone.clone();
            let st = rot.state.lock().clone();
            let file = ZoneKeyFile::load(&Pool::zone_key_path(&self.dir, z.id))?;
            let mut keep = vec![z.meta.lock().active.0];
            keep.extend(st.next);
            // The key a migration is still moving blocks away from.
            if st.phase != super::state::Phase::Idle {
                keep.extend(st.old_version);
            }
            let refs = self.key_references(&z);
            let grace = st.grace_secs.unwrap_or(self.config().rotation.grace_secs);
            let (destroy, kept) = select(
                &name,
                file.records(),
                &keep,
                &st.pending_destroy,
                |v| refs.get(&KeyVersion(v)).copied().unwrap_or(0),
                grace,
                now,
            );
            report.kept.extend(kept);
            for key in destroy {
                if !dry_run {
                    self.destroy_old_key(
                        &rot,
                        PendingDestroy {
                            version: key.version,
                            due_unix: key.grace_ends_unix,
                        },
                    )?;
                }
                report.destroyed.push(key);
            }
        }
        if !dry_run {
            self.record(
                AuditEvent::ok("key.cleanup")
                    .count(report.destroyed.len() as u64)
                    .approvers(approvers.iter().cloned()),
            )?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ZoneId;

    fn dek(version: u32, state: KeyState, deactivated: Option<u64>) -> KeyRecord {
        KeyRecord {
            id: format!("z1-dek-v{version}"),
            zone: ZoneId(1),
            purpose: Purpose::Dek,
            version,
            state,
            wrapped_by_kek: Some(1),
            wrapped_by_root: None,
            created_unix: 10,
            activated_unix: Some(10),
            deactivated_unix: deactivated,
            destroyed_unix: None,
            wrapped: Some(vec![0; 8]),
        }
    }

    #[test]
    fn only_retired_keys_past_grace_that_protect_nothing_are_chosen() {
        let records = [
            dek(1, KeyState::Destroyed, Some(100)),
            dek(2, KeyState::DecryptOnly, Some(100)),
            dek(3, KeyState::Compromised, Some(900)),
            dek(4, KeyState::DecryptOnly, Some(100)),
            dek(5, KeyState::DecryptOnly, Some(100)),
            dek(6, KeyState::Active, None),
        ];
        let pending = [PendingDestroy {
            version: 5,
            due_unix: 5000,
        }];
        let blocks = |v: u32| if v == 4 { 7 } else { 0 };
        let (destroy, kept) = select("z1", &records, &[6], &pending, blocks, 1000, 1500);
        let ids = |v: &[CleanupKey]| v.iter().map(|k| k.version).collect::<Vec<_>>();
        // v2: grace ended at 1100. v3: ends at 1900. v4: blocks. v5: pending until 5000.
        assert_eq!(ids(&destroy), [2]);
        assert_eq!(ids(&kept), [3, 4, 5]);
        assert!(
            kept[1]
                .kept_because
                .as_deref()
                .unwrap()
                .contains("7 content block")
        );
        assert!(
            kept[0]
                .kept_because
                .as_deref()
                .unwrap()
                .contains("grace period")
        );
        let (destroy, _) = select("z1", &records, &[6], &pending, blocks, 1000, 6000);
        assert_eq!(ids(&destroy), [2, 3, 5]);
        // Versions a rotation still uses are never candidates.
        let (destroy, kept) = select("z1", &records, &[2, 3, 5, 6], &pending, blocks, 0, 9999);
        assert!(destroy.is_empty());
        assert!(
            kept[0]
                .kept_because
                .as_deref()
                .unwrap()
                .contains("rotation")
        );
    }
}
