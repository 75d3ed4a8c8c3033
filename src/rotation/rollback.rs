//! Rollback after a flip: the DEK the flip retired becomes the write key
//! again, the flip's new DEK is kept (decrypt-only) until nothing uses it,
//! and the migrator runs the other way, re-encrypting under the old key
//! whatever the new one protects.
//!
//! Allowed while the old key is neither destroyed nor compromised and its
//! grace period has not ended: during the migration after the flip, or
//! once it is done, until the old key's destruction is due. Dual control
//! applies (operation `rollback-rotation`) when the pool requires it.
//!
//! Like the flip, the rollback is one journal record ([`Entry::Rollback`]);
//! the key file and the state file follow it. Recovery brings both back to
//! the record ([`Pool::recover_rollback`]): a key file still naming the
//! flip's key active is rolled back, and a state file that still queues the
//! (again active) old key for destruction is corrected, so nothing is ever
//! destroyed that the block map calls active.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::admin::RotationStatus;
use crate::audit::AuditEvent;
use crate::ids::KeyVersion;
use crate::keys::approval::{Authorized, Operation, Target};
use crate::keys::wrap::{KeyLabel, Purpose};
use crate::keys::zone_keys::{KeyState, ZoneKeyFile};
use crate::pool::{Pool, PoolError};
use crate::store::journal::Entry;
use crate::zone::Zone;

use super::state::{Phase, RotationState};
use super::{Result, ZoneRotation, unix_now};

impl Pool {
    /// Rolls `zone` back to the DEK its last flip retired (see the module
    /// doc). `auth`: the approvals, where the pool needs dual control.
    /// Refused, with the reason, and audited as refused otherwise.
    pub fn rotation_rollback(
        &self,
        zone: &str,
        auth: Option<Authorized>,
    ) -> Result<RotationStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.audit()?;
        let expected = Target::new(Operation::RollbackRotation, Some(zone), None);
        let approvers = self.check_approval(&expected, auth.as_ref(), |e| {
            AuditEvent::refused("rotation.rollback", e).zone(zone)
        })?;
        let old = match self.rollback_target(&rot) {
            Ok(v) => v,
            Err(why) => {
                let _ = self.record(
                    AuditEvent::refused("rotation.rollback", &why)
                        .zone(zone)
                        .approvers(approvers.iter()),
                );
                return Err(PoolError::Conflict(why));
            }
        };
        let started = Instant::now();
        let z = &rot.zone;
        rot.stop_worker();
        // The one durable step: from this record on the old key is active.
        let from = {
            let mut meta = z.meta.lock();
            let from = meta.active;
            let seq = self.journal.append(
                z.id,
                &[Entry::Rollback {
                    zone: z.id,
                    to: old,
                }],
            );
            meta.active = old;
            meta.window = None;
            drop(meta);
            self.journal.commit_blocking(seq)?;
            from
        };
        let took = started.elapsed();
        {
            let _k = z.key_file_lock.lock();
            let path = Pool::zone_key_path(&self.dir, z.id);
            let mut file = ZoneKeyFile::load(&path)?;
            if file.active_dek() != Some(old) {
                file.rollback_dek(old)?;
                file.save(&path)?;
            }
        }
        let mut st = rot.state.lock().clone();
        mark_rolled_back(&mut st, from, old);
        self.save_state(&rot, &st)?;
        rot.counters.migrated.store(0, Ordering::Relaxed);
        rot.start_migration_timeline();
        tracing::info!(zone, %from, to = %old, ?took, "rolled back");
        self.audit_ok(
            AuditEvent::ok("rotation.rollback")
                .zone(zone)
                .key(&KeyLabel::new(z.id, Purpose::Dek, old.0))
                .approvers(approvers.iter())
                .duration(took),
        )?;
        self.rotation_status(zone)
    }

    /// The DEK a rollback of `rot`'s zone would make active again, or why
    /// there is none.
    fn rollback_target(&self, rot: &ZoneRotation) -> std::result::Result<KeyVersion, String> {
        let z = &rot.zone;
        let name = &z.name;
        let st = rot.state.lock().clone();
        if matches!(st.phase, Phase::Window | Phase::Aborting) {
            return Err(format!(
                "zone {name} has an open rotation window; a rollback undoes a flip \
                 (to drop the window, `keyturn rotate abort --zone {name}`)"
            ));
        }
        if let Some(from) = st.rolled_back_from {
            return Err(format!(
                "the last flip of zone {name} (to DEK v{from}) was already rolled back"
            ));
        }
        let active = z.meta.lock().active;
        let Some(old) = st
            .old_version
            .map(KeyVersion)
            .filter(|&o| o != active && o.0 != 0)
        else {
            return Err(format!("zone {name} has no flip to roll back"));
        };
        let file =
            ZoneKeyFile::load(&Pool::zone_key_path(&self.dir, z.id)).map_err(|e| e.to_string())?;
        match file.dek_state(old) {
            Some(KeyState::DecryptOnly) => {}
            Some(KeyState::Destroyed) => {
                return Err(format!(
                    "DEK v{} of zone {name} was destroyed when its grace period ended; \
                     a rollback is no longer possible",
                    old.0
                ));
            }
            Some(KeyState::Compromised) => {
                return Err(format!(
                    "DEK v{} of zone {name} is compromised (emergency rotation); \
                     rolling back would put new writes under a revoked key",
                    old.0
                ));
            }
            s => {
                return Err(format!(
                    "DEK v{} of zone {name} is {}; only a decrypt-only key can be made active again",
                    old.0,
                    s.map_or("missing", KeyState::name)
                ));
            }
        }
        if st.phase == Phase::Idle {
            // Migration is over: the grace period runs until the destroy.
            let now = unix_now();
            match st.pending_destroy.iter().find(|p| p.version == old.0) {
                Some(p) if p.due_unix > now => {}
                Some(p) => {
                    return Err(format!(
                        "the grace period of DEK v{} of zone {name} ended at {} (now {now}); \
                         it is about to be destroyed",
                        old.0, p.due_unix
                    ));
                }
                None => {
                    return Err(format!(
                        "DEK v{} of zone {name} is not in its grace period",
                        old.0
                    ));
                }
            }
        }
        if z.crypto().xts(old).is_none() {
            return Err(format!("DEK v{} of zone {name} is not loaded", old.0));
        }
        Ok(old)
    }

    /// Brings the key file and `st` to a rollback whose journal record is
    /// durable (called at open, after replay; see the module doc).
    pub(super) fn recover_rollback(
        &self,
        zone: &Zone,
        active: KeyVersion,
        st: &mut RotationState,
    ) -> Result<()> {
        let (ahead, newest) = {
            let _k = zone.key_file_lock.lock();
            let path = Pool::zone_key_path(&self.dir, zone.id);
            let mut file = ZoneKeyFile::load(&path)?;
            // A flip saves the key file after its record, so the key file is
            // never ahead of the block map, except after a rollback.
            let ahead = file.active_dek().filter(|&a| a > active);
            if let Some(a) = ahead {
                file.rollback_dek(active)?;
                file.save(&path)?;
                tracing::info!(zone = %zone.name, from = %a, to = %active, "key file brought back to the rollback");
            }
            let newest = file
                .records()
                .iter()
                .filter(|r| r.purpose == Purpose::Dek)
                .map(|r| r.version)
                .max();
            (ahead, newest)
        };
        // A flip always moves the active key above the one it retired: a
        // state file whose retired key is active again missed its rollback.
        let missed = st.rolled_back_from.is_none()
            && st.phase != Phase::Window
            && st.old_version == Some(active.0);
        let queued = st.pending_destroy.iter().any(|p| p.version == active.0);
        if ahead.is_some() || missed || queued {
            if st.rolled_back_from.is_none() {
                let from = ahead.or(newest.map(KeyVersion)).unwrap_or(active);
                mark_rolled_back(st, from, active);
            }
            st.pending_destroy.retain(|p| p.version != active.0);
            st.phase = Phase::Migrating;
            st.save(&self.dir, zone.id)
                .map_err(|e| self.state_err(zone, e))?;
            tracing::warn!(zone = %zone.name, %active, "rollback completed at recovery; migrating back");
        }
        Ok(())
    }
}

/// The state after a rollback from `from` to `to`: migrating (back to
/// `to`), `from` the key moved away from, `to` no longer queued for
/// destruction.
fn mark_rolled_back(st: &mut RotationState, from: KeyVersion, to: KeyVersion) {
    st.phase = Phase::Migrating;
    st.paused = false;
    st.next = None;
    st.flip_at_unix = None;
    st.emergency = false;
    st.old_version = Some(from.0);
    st.rolled_back_from = Some(from.0);
    st.rolled_back_unix = Some(unix_now());
    st.pending_destroy.retain(|p| p.version != to.0);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::admin::RotationPhase;
    use crate::config::{PoolConfig, Profile};
    use crate::ids::{BLOCK_SIZE, KeyVersion, ZoneId};
    use crate::keys::zone_keys::{KeyState, ZoneKeyFile};
    use crate::nbd::export::{Export, ExportCatalog};
    use crate::pool::Pool;
    use crate::rotation::tests::{block, new_pool, open_rotating, wait_for};
    use crate::store::journal::Entry;

    const N: u64 = 96;

    /// Zone "z" with `N` blocks written, flipped to DEK v2 with the
    /// migrator paused (half the story: some blocks staged, the rest still
    /// under v1), a grace period of an hour, and blocks N..N+8 written
    /// after the flip (under v2).
    fn flipped(
        pdir: &std::path::Path,
        pass: &crate::keys::passphrase::Passphrase,
    ) -> (
        Arc<Pool>,
        Arc<crate::volume::Volume>,
        tokio::runtime::Runtime,
    ) {
        let (pool, vol, rt) = open_rotating(pdir, pass, 16, 16 << 20);
        drop((pool, vol));
        let mut config = PoolConfig::load(&pdir.join("pool.toml")).unwrap();
        config.rotation.grace_secs = 3600;
        std::fs::write(pdir.join("pool.toml"), config.to_toml()).unwrap();
        let profile = Profile::load("ci-2core").unwrap();
        let pool = Arc::new(Pool::open(pdir, pass, &profile).unwrap());
        let vol = pool.open("v").unwrap();
        rt.block_on(async {
            for i in 0..N {
                vol.write(i * 4096, &block(i), false).await.unwrap();
            }
            vol.flush().await.unwrap();
        });
        pool.rotation_prepare("z", None).unwrap();
        pool.rotation_pause("z").unwrap();
        pool.rotation_flip("z").unwrap();
        rt.block_on(async {
            for i in N..N + 8 {
                vol.write(i * 4096, &block(i), false).await.unwrap();
            }
            vol.flush().await.unwrap();
        });
        (pool, vol, rt)
    }

    fn check(rt: &tokio::runtime::Runtime, vol: &crate::volume::Volume, ctx: &str) {
        rt.block_on(async {
            for i in 0..N + 8 {
                let mut got = vec![0u8; BLOCK_SIZE];
                vol.read(i * 4096, &mut got)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: block {i}: {e}"));
                assert!(got == block(i), "{ctx}: block {i} reads wrong data");
            }
        });
    }

    fn key_state(pdir: &std::path::Path, v: u32) -> KeyState {
        ZoneKeyFile::load(&Pool::zone_key_path(pdir, ZoneId(1)))
            .unwrap()
            .dek_state(KeyVersion(v))
            .unwrap()
    }

    #[test]
    fn rollback_makes_the_old_key_active_and_migrates_back() {
        let (_dir, pdir, pass) = new_pool();
        let (pool, vol, rt) = flipped(&pdir, &pass);
        let st = pool.rotation_rollback("z", None).unwrap();
        assert_eq!(st.active_version, 1);
        assert_eq!(st.rolled_back_from, Some(2));
        assert_eq!(key_state(&pdir, 1), KeyState::Active);
        assert_eq!(key_state(&pdir, 2), KeyState::DecryptOnly);
        check(&rt, &vol, "right after the rollback");
        // New writes are under v1 again.
        rt.block_on(async { vol.write(0, &block(0), true).await.unwrap() });
        pool.start_background();
        wait_for("the migration back to v1", || {
            let s = pool.rotation_status("z").unwrap();
            s.phase == RotationPhase::Grace
                && s.keys.iter().all(|k| k.version == 1 || k.blocks == 0)
        });
        check(&rt, &vol, "after the migration back");
        let st = pool.rotation_status("z").unwrap();
        assert_eq!(st.staged_blocks, 0);
        assert!(
            st.destroy_at_unix.is_some(),
            "v2 waits out the grace period"
        );
        let e = pool.rotation_rollback("z", None).unwrap_err();
        assert!(e.to_string().contains("already rolled back"), "{e}");
        pool.stop_background();
        drop((vol, pool));
        // And after a restart.
        let pool = Pool::open(&pdir, &pass, &Profile::load("ci-2core").unwrap()).unwrap();
        let vol = pool.open("v").unwrap();
        check(&rt, &vol, "after a restart");
        assert_eq!(pool.rotation_status("z").unwrap().active_version, 1);
    }

    /// A crash after the rollback's journal record, before the key file
    /// (`key_file` false) or before the state file (`key_file` true): the
    /// reopened pool is rolled back, key file and state included, and
    /// migrates back.
    #[test]
    fn a_crash_mid_rollback_recovers_to_the_rollback() {
        for key_file in [false, true] {
            let (_dir, pdir, pass) = new_pool();
            let (pool, vol, rt) = flipped(&pdir, &pass);
            {
                let zone = pool.zones.read().values().next().unwrap().clone();
                let mut meta = zone.meta.lock();
                let seq = pool.journal.append(
                    zone.id,
                    &[Entry::Rollback {
                        zone: zone.id,
                        to: KeyVersion(1),
                    }],
                );
                meta.active = KeyVersion(1);
                drop(meta);
                pool.journal.commit_blocking(seq).unwrap();
            }
            if key_file {
                let path = Pool::zone_key_path(&pdir, ZoneId(1));
                let mut f = ZoneKeyFile::load(&path).unwrap();
                f.rollback_dek(KeyVersion(1)).unwrap();
                f.save(&path).unwrap();
            }
            // Dropping the pool closes it cleanly; the state file still
            // says "migrating to v2", as after a crash at this point.
            drop((vol, pool));
            let pool =
                Arc::new(Pool::open(&pdir, &pass, &Profile::load("ci-2core").unwrap()).unwrap());
            let st = pool.rotation_status("z").unwrap();
            assert_eq!(st.active_version, 1, "key_file {key_file}");
            assert_eq!(st.rolled_back_from, Some(2), "key_file {key_file}");
            assert_eq!(st.phase, RotationPhase::Migrating);
            assert_eq!(key_state(&pdir, 1), KeyState::Active);
            assert_eq!(key_state(&pdir, 2), KeyState::DecryptOnly);
            let vol = pool.open("v").unwrap();
            check(&rt, &vol, "after recovery");
            pool.start_background();
            wait_for("the migration back to v1", || {
                let s = pool.rotation_status("z").unwrap();
                s.phase == RotationPhase::Grace
                    && s.keys.iter().all(|k| k.version == 1 || k.blocks == 0)
            });
            check(&rt, &vol, "after the migration back");
            pool.stop_background();
        }
    }

    /// After the migration to v2 is over, v1 waits for its destruction; a
    /// crash right after a rollback's record must not leave v1 (active
    /// again) queued for destruction.
    #[test]
    fn recovery_never_leaves_the_active_key_queued_for_destruction() {
        let (_dir, pdir, pass) = new_pool();
        let (pool, vol, rt) = flipped(&pdir, &pass);
        pool.rotation_resume("z").unwrap();
        pool.start_background();
        wait_for("the migration to v2", || {
            pool.rotation_status("z").unwrap().phase == RotationPhase::Grace
        });
        pool.stop_background();
        {
            let zone = pool.zones.read().values().next().unwrap().clone();
            let mut meta = zone.meta.lock();
            let seq = pool.journal.append(
                zone.id,
                &[Entry::Rollback {
                    zone: zone.id,
                    to: KeyVersion(1),
                }],
            );
            meta.active = KeyVersion(1);
            drop(meta);
            pool.journal.commit_blocking(seq).unwrap();
        }
        drop((vol, pool));
        let pool = Pool::open(&pdir, &pass, &Profile::load("ci-2core").unwrap()).unwrap();
        let state = super::RotationState::load(&pdir, ZoneId(1)).unwrap();
        assert!(
            state.pending_destroy.iter().all(|p| p.version != 1),
            "{state:?}"
        );
        assert_eq!(state.phase, super::Phase::Migrating);
        assert_eq!(key_state(&pdir, 1), KeyState::Active);
        let vol = pool.open("v").unwrap();
        check(&rt, &vol, "after recovery");
    }

    #[test]
    fn rollback_is_refused_with_a_reason() {
        let (_dir, pdir, pass) = new_pool();
        let (pool, _vol, _rt) = open_rotating(&pdir, &pass, 16, 16 << 20);
        let e = pool.rotation_rollback("z", None).unwrap_err();
        assert!(e.to_string().contains("no flip to roll back"), "{e}");
        pool.rotation_prepare("z", None).unwrap();
        let e = pool.rotation_rollback("z", None).unwrap_err();
        assert!(e.to_string().contains("open rotation window"), "{e}");
        pool.rotation_emergency("z", "leak", None).unwrap();
        let e = pool.rotation_rollback("z", None).unwrap_err();
        assert!(e.to_string().contains("compromised"), "{e}");
        assert_eq!(pool.rotation_status("z").unwrap().active_version, 2);
    }
}
