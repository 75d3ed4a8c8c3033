//! MAC key rotation: a new MAC key tags new blocks at once, the retired one
//! still verifies the tags it made, and a background pass re-tags every
//! content block (read, decrypt, verify under the old key, tag under the
//! new one, record; the ciphertext does not move). When no record names
//! the old key, and no write that tagged under it is in flight, it is
//! destroyed (crypto-erase in the key file) and dropped from memory.
//!
//! The pass is separate from a DEK rotation's staging pass: it reads each
//! block once and writes only a record, and a MAC rotation runs on its own
//! cryptoperiod. State lives in the key file alone (a retired MAC key with
//! material means a pass to run) and in each record's MAC version, so a
//! restart resumes where the records say, with nothing else to reconcile.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::ids::{BLOCK_SIZE, Cbid};
use crate::keys::wrap::{KeyLabel, Purpose};
use crate::keys::zone_keys::ZoneKeyFile;
use crate::pool::Pool;
use crate::store::journal::{CbRecord, Entry, LiveCopy};

use super::{Result, ZoneRotation, scrub_replaced};

/// `GET /api/v1/zones/{zone}/mac`: where a zone's MAC keys stand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacStatus {
    /// Zone name.
    pub zone: String,
    /// The MAC key version that tags new blocks.
    pub active_version: u32,
    /// Retired versions that still verify tags (a rotation under way).
    pub retiring_versions: Vec<u32>,
    /// Live content blocks whose tag is under the active key.
    pub blocks_active: u64,
    /// Live content blocks whose tag is under a retired key.
    pub blocks_retiring: u64,
    /// Blocks that failed their integrity check when re-tagged (they keep
    /// their old tag, and the old key, until rewritten; see `scrub`).
    pub retag_errors: u64,
}

impl Pool {
    /// Starts a MAC key rotation of `zone` (see the module doc).
    pub fn mac_rotate(&self, zone: &str) -> Result<MacStatus> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        self.audit()?;
        let z = &rot.zone;
        let started = Instant::now();
        let (old, new) = {
            let _k = z.key_file_lock.lock();
            let root = self.root();
            let path = Pool::zone_key_path(&self.dir, z.id);
            let mut file = ZoneKeyFile::load(&path)?;
            let (old, new) = file.begin_mac_rotation(root.as_ref()).inspect_err(|e| {
                let _ = self.record(AuditEvent::refused("mac.rotate", e).zone(zone));
            })?;
            file.save(&path)?;
            let ring = file.unlock(root.as_ref())?;
            // Under the zone lock: a write plans under the keys it tagged with.
            let _meta = z.meta.lock();
            z.set_crypto(z.crypto().with_macs(ring.mac_version(), ring.mac_keys()));
            (old, new)
        };
        tracing::info!(zone, old, new, "MAC key rotation started");
        self.audit_ok(
            AuditEvent::ok("mac.rotate")
                .zone(zone)
                .key(&KeyLabel::new(z.id, Purpose::Mac, new))
                .duration(started.elapsed()),
        )?;
        self.mac_status(zone)
    }

    /// Where `zone`'s MAC keys stand.
    pub fn mac_status(&self, zone: &str) -> Result<MacStatus> {
        let rot = self.rotation(zone)?;
        let z = &rot.zone;
        let versions = ZoneKeyFile::load(&Pool::zone_key_path(&self.dir, z.id))?.mac_versions();
        let (mut active, mut retiring) = (0, 0);
        for (_, r) in z.meta.lock().live_records() {
            if r.mac == versions.active {
                active += 1;
            } else {
                retiring += 1;
            }
        }
        Ok(MacStatus {
            zone: z.name.clone(),
            active_version: versions.active,
            retiring_versions: versions.retiring,
            blocks_active: active,
            blocks_retiring: retiring,
            retag_errors: rot
                .counters
                .retag_errors
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// One step of the re-tag pass of `rot`'s zone (from the scheduler
    /// tick, every 100 ms): a batch of `[rotation] batch_blocks` blocks, or
    /// the old key's destruction once none is left. One batch a tick keeps
    /// the pass gentle (2,560 blocks, 10 MiB, a second at the default) and
    /// the scheduler thread free for the other zones.
    pub(super) fn mac_tick(&self, rot: &ZoneRotation) -> Result<()> {
        let z = &rot.zone;
        let crypto = z.crypto();
        if crypto.old_taggers().next().is_none() {
            return Ok(());
        }
        let active = crypto.mac_version();
        let size = self.config().rotation.batch_blocks;
        let batch: Vec<(Cbid, CbRecord, LiveCopy)> = {
            let meta = z.meta.lock();
            let failed = rot.counters.retag_failed.lock();
            meta.live_records()
                .into_iter()
                .filter(|(c, r)| r.mac != active && !failed.contains(c))
                .take(size)
                .map(|(c, r)| (c, r, meta.live(&r)))
                .collect()
        };
        if batch.is_empty() {
            return self.finish_mac_rotation(rot);
        }
        self.retag(rot, &batch)
    }

    /// Re-tags `batch` under the active MAC key: one journal frame.
    fn retag(&self, rot: &ZoneRotation, batch: &[(Cbid, CbRecord, LiveCopy)]) -> Result<()> {
        let z = &rot.zone;
        let crypto = z.crypto();
        let mut plain = zeroize::Zeroizing::new(vec![0u8; BLOCK_SIZE]);
        let mut done = Vec::with_capacity(batch.len());
        for &(cbid, r, live) in batch {
            let (res, buf) = futures::executor::block_on(self.storage.read_copy(
                live.place,
                live.slot,
                self.storage.bufs.get(1),
            ));
            let ok = res.is_ok()
                && crypto.xts(live.key_version).is_some_and(|x| {
                    x.decrypt(cbid.0, &buf, &mut plain);
                    true
                })
                && crypto.verify_tag(r.mac, &plain, &r.tag);
            self.storage.bufs.put(buf);
            if ok {
                done.push((cbid, r, crypto.tagger().tag(&plain)));
            } else {
                // Read again next time only after a restart: a damaged block
                // is for scrub, and keeps the old key alive until rewritten.
                rot.counters
                    .retag_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rot.counters.retag_failed.lock().insert(cbid);
                tracing::warn!(zone = %z.name, %cbid, "MAC re-tag: the block failed its integrity check");
            }
        }
        let mut meta = z.meta.lock();
        let (mut entries, mut changed) = (Vec::new(), Vec::new());
        for (cbid, r, tag) in done {
            // Only a record still exactly as read: a block rewritten, moved
            // or freed meanwhile is picked up again (or gone).
            if meta.cb(cbid) != Some(r) {
                continue;
            }
            let record = CbRecord {
                tag,
                mac: crypto.mac_version(),
                ..r
            };
            entries.push(Entry::Cb {
                zone: z.id,
                cbid,
                record,
            });
            changed.push((cbid, record));
        }
        if !entries.is_empty() {
            let seq = self.journal.append(z.id, &entries);
            for (cbid, record) in changed {
                meta.set_cb(cbid, Some(record), seq);
            }
        }
        Ok(())
    }

    /// No record names a retired MAC key: destroys it once no write that
    /// may have tagged under it is in flight.
    fn finish_mac_rotation(&self, rot: &ZoneRotation) -> Result<()> {
        let z = &rot.zone;
        // The re-tag records are durable before the key that verifies the
        // tags they replace is erased.
        self.journal.commit_blocking(self.journal.last_appended())?;
        let _k = z.key_file_lock.lock();
        let meta = z.meta.lock();
        let crypto = z.crypto();
        let active = crypto.mac_version();
        if !meta.writers.is_empty() || meta.live_records().iter().any(|(_, r)| r.mac != active) {
            return Ok(());
        }
        let old: Vec<u32> = crypto.old_taggers().map(|(v, _)| v).collect();
        let path = Pool::zone_key_path(&self.dir, z.id);
        let mut file = ZoneKeyFile::load(&path)?;
        let before = std::fs::File::open(&path).ok();
        for &v in &old {
            if file.mac_versions().retiring.contains(&v) {
                file.destroy_mac(v)?;
            }
        }
        file.save(&path)?;
        scrub_replaced(before);
        // Under the zone lock: a write that tagged under `old` and has not
        // planned yet tags again (see `Volume::plan_write`).
        let mut next = (*crypto).clone();
        for &v in &old {
            next = next.without_mac(v);
        }
        z.set_crypto(next);
        drop(meta);
        for v in old {
            tracing::info!(zone = %z.name, version = v, "old MAC key destroyed");
            self.audit_ok(
                AuditEvent::ok("key.destroy")
                    .zone(&z.name)
                    .key(&KeyLabel::new(z.id, Purpose::Mac, v)),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Profile;
    use crate::ids::{BLOCK_SIZE, ZoneId};
    use crate::keys::zone_keys::ZoneKeyFile;
    use crate::nbd::export::{Export, ExportCatalog};
    use crate::pool::Pool;
    use crate::rotation::tests::{block, new_pool, open_rotating, wait_for};

    /// 64 distinct blocks and 64 copies of one: 65 content blocks.
    fn content(i: u64) -> Vec<u8> {
        if i < 64 { block(i) } else { block(7777) }
    }

    #[test]
    fn mac_rotation_retags_keeps_dedup_and_destroys_the_old_key() {
        let (_dir, pdir, pass) = new_pool();
        let (pool, vol, rt) = open_rotating(&pdir, &pass, 16, 16 << 20);
        let check = |vol: &crate::volume::Volume, ctx: &str, n: u64| {
            rt.block_on(async {
                for i in 0..n {
                    let mut got = vec![0u8; BLOCK_SIZE];
                    vol.read(i * 4096, &mut got)
                        .await
                        .unwrap_or_else(|e| panic!("{ctx}: block {i}: {e}"));
                    let want = if i < 128 {
                        content(i)
                    } else {
                        content(i - 128)
                    };
                    assert!(got == want, "{ctx}: block {i}");
                }
            })
        };
        rt.block_on(async {
            for i in 0..128u64 {
                vol.write(i * 4096, &content(i), false).await.unwrap();
            }
            vol.flush().await.unwrap();
        });
        let blocks = |pool: &Pool| pool.rotation_status("z").unwrap().content_blocks;
        assert_eq!(blocks(&pool), 65);
        let st = pool.mac_rotate("z").unwrap();
        assert_eq!(
            (st.active_version, st.retiring_versions.clone()),
            (2, vec![1])
        );
        assert_eq!((st.blocks_active, st.blocks_retiring), (0, 65));
        assert!(pool.mac_rotate("z").is_err(), "one MAC rotation at a time");
        // Old tags still verify, and new writes of old content share it
        // (found under the old MAC key's tag).
        check(&vol, "right after the rotation", 128);
        rt.block_on(async {
            for i in 128..160u64 {
                vol.write(i * 4096, &content(i - 128), false).await.unwrap();
            }
            vol.flush().await.unwrap();
        });
        assert_eq!(blocks(&pool), 65, "dedup found content under the old tags");
        pool.start_background();
        wait_for("the re-tag pass and the old key's destruction", || {
            pool.mac_status("z").unwrap().retiring_versions.is_empty()
        });
        pool.stop_background();
        let st = pool.mac_status("z").unwrap();
        assert_eq!((st.blocks_active, st.blocks_retiring), (65, 0));
        assert_eq!(blocks(&pool), 65);
        check(&vol, "after the re-tag pass", 160);
        let file = ZoneKeyFile::load(&Pool::zone_key_path(&pdir, ZoneId(1))).unwrap();
        let v1 = file.records().iter().find(|r| r.id == "z1-mac-v1").unwrap();
        assert!(v1.wrapped.is_none(), "old MAC key crypto-erased");
        drop((vol, pool));
        let pool = Pool::open(&pdir, &pass, &Profile::load("ci-2core").unwrap()).unwrap();
        let vol = pool.open("v").unwrap();
        check(&vol, "after a restart", 160);
        // New copies match under the new key alone.
        rt.block_on(async { vol.write(200 * 4096, &content(5), true).await.unwrap() });
        assert_eq!(blocks(&pool), 65);
    }

    /// A tag never matches a record of another MAC version, even when the
    /// bytes are equal.
    #[test]
    fn dedup_never_matches_across_mac_versions() {
        let (_dir, pdir, pass) = new_pool();
        let (pool, vol, rt) = open_rotating(&pdir, &pass, 16, 16 << 20);
        rt.block_on(async { vol.write(0, &block(1), true).await.unwrap() });
        let zone = pool.zones.read().values().next().unwrap().clone();
        let meta = zone.meta.lock();
        let (cbid, r) = meta.live_records()[0];
        assert_eq!(r.mac, 1);
        assert_eq!(meta.find_by_tag(&r.tag, 1).map(|x| x.0), Some(cbid));
        assert!(meta.find_by_tag(&r.tag, 2).is_none());
    }
}
