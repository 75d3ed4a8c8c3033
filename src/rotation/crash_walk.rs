//! The power-loss walk: each operation that makes something durable is
//! run again and again from the same starting pool, with a simulated power
//! loss ([`crate::store::powerloss`]) at each of its syncs in turn, and
//! several seeds (which unsynced writes are dropped, kept or torn) per
//! sync. After each loss the pool is opened from the after-loss image, as
//! the binary would at restart, and checked: every write acknowledged as
//! durable reads back, every block reads whole (one of the versions ever
//! written to it) without error, no slot is claimed twice, every key file
//! unwraps, and the audit chain verifies.
//!
//! In process, driving the pool directly: only so can the crash point be
//! each sync in turn, including those of the rotation workers and the
//! committer. `KEYTURN_CRASH_SEEDS` raises the seeds per point (default 2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{PoolConfig, Profile};
use crate::ids::{BLOCK_SIZE, KeyVersion};
use crate::keys::passphrase::Passphrase;
use crate::keys::sealed::SealedFileProvider;
use crate::keys::zone_keys::{KeyState, ZoneKeyFile};
use crate::nbd::export::{Export, ExportCatalog};
use crate::pool::Pool;
use crate::rotation::tests::{block, new_pool, wait_for};
use crate::store::powerloss::{PowerLoss, copy_tree};
use crate::volume::Volume;

/// Blocks of the volume the walk writes and checks.
const BLOCKS: u64 = 48;

/// What may be read at each block: every version written, and from which
/// one on a version is acknowledged as durable.
#[derive(Clone, Default)]
struct Model {
    versions: BTreeMap<u64, Vec<Vec<u8>>>,
    durable_from: BTreeMap<u64, usize>,
}

impl Model {
    fn issued(&mut self, lba: u64, data: Vec<u8>) -> usize {
        let v = self
            .versions
            .entry(lba)
            .or_insert_with(|| vec![vec![0u8; BLOCK_SIZE]]);
        v.push(data);
        v.len() - 1
    }

    fn durable(&mut self, lba: u64, version: usize) {
        self.durable_from.insert(lba, version);
    }

    /// Whether `got` is a version `lba` may read as.
    fn allows(&self, lba: u64, got: &[u8]) -> bool {
        let zero = vec![vec![0u8; BLOCK_SIZE]];
        let v = self.versions.get(&lba).unwrap_or(&zero);
        let from = self.durable_from.get(&lba).copied().unwrap_or(0);
        v[from..].iter().any(|x| x == got)
    }
}

/// What an operation under test gets to work with.
struct Run<'a> {
    pool: &'a Arc<Pool>,
    vol: &'a Arc<Volume>,
    rt: &'a tokio::runtime::Runtime,
    model: &'a mut Model,
    /// No crash in this run: the operation must succeed.
    dry: bool,
}

impl Run<'_> {
    /// Writes version `tag` of each block; with `fua`, acknowledged ones are durable.
    fn write(&mut self, lbas: &[u64], tag: u64, fua: bool) -> Vec<(u64, usize)> {
        let mut done = Vec::new();
        for &lba in lbas {
            let data = block(lba * 1000 + tag);
            let v = self.model.issued(lba, data.clone());
            let r = self
                .rt
                .block_on(self.vol.write(lba * BLOCK_SIZE as u64, &data, fua));
            assert!(!self.dry || r.is_ok(), "write without a crash: {r:?}");
            if r.is_err() {
                break;
            }
            if fua {
                self.model.durable(lba, v);
            }
            done.push((lba, v));
        }
        done
    }

    /// FLUSH: acknowledged writes before it become durable.
    fn flush(&mut self, written: &[(u64, usize)]) {
        let r = self.rt.block_on(self.vol.flush());
        assert!(!self.dry || r.is_ok(), "flush without a crash: {r:?}");
        if r.is_ok() {
            for &(lba, v) in written {
                self.model.durable(lba, v);
            }
        }
    }
}

fn pass() -> Passphrase {
    Passphrase::new("correct horse".into()).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn seeds() -> u64 {
    std::env::var("KEYTURN_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

/// A baseline pool: zone "z", volume "v", blocks 0..32 written and
/// flushed, then `prepare` on the open pool. Returns the (closed) pool
/// directory and the model of what it holds.
fn baseline(
    tmp: &Path,
    profile: &Profile,
    prepare: impl FnOnce(&Arc<Pool>, &Arc<Volume>, &tokio::runtime::Runtime, &mut Model),
) -> (PathBuf, Model) {
    let (_keep, pdir, pass) = new_pool();
    let mut config = PoolConfig::load(&pdir.join("pool.toml")).unwrap();
    config.rotation.grace_secs = 3600;
    config.rotation.batch_blocks = 8;
    std::fs::write(pdir.join("pool.toml"), config.to_toml()).unwrap();
    let mut model = Model::default();
    {
        let pool = Arc::new(Pool::open(&pdir, &pass, profile).unwrap());
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", 16 << 20).unwrap();
        let vol = pool.open("v").unwrap();
        let rt = runtime();
        let mut run = Run {
            pool: &pool,
            vol: &vol,
            rt: &rt,
            model: &mut model,
            dry: true,
        };
        let w = run.write(&(0..32).collect::<Vec<_>>(), 0, false);
        run.flush(&w);
        assert_eq!(w.len(), 32);
        prepare(&pool, &vol, &rt, &mut model);
        pool.stop_background();
    }
    let base = tmp.join("base");
    copy_tree(&pdir, &base).unwrap();
    (base, model)
}

/// Opens the after-loss image and checks everything the walk promises.
fn check_recovered(image: &Path, profile: &Profile, model: &Model, ctx: &str) {
    let pool = Arc::new(
        Pool::open(image, &pass(), profile)
            .unwrap_or_else(|e| panic!("{ctx}: the pool does not open after the loss: {e}")),
    );
    let vol = pool.open("v").unwrap();
    let rt = runtime();
    for lba in 0..BLOCKS {
        let mut got = vec![0u8; BLOCK_SIZE];
        rt.block_on(vol.read(lba * BLOCK_SIZE as u64, &mut got))
            .unwrap_or_else(|e| panic!("{ctx}: block {lba} answers an error: {e}"));
        assert!(
            model.allows(lba, &got),
            "{ctx}: block {lba} reads neither an acknowledged version nor a later one (torn or lost)"
        );
    }
    let report = pool.check();
    assert!(report.problems.is_empty(), "{ctx}: {:?}", report.problems);
    let provider = SealedFileProvider::open(&image.join("keys/root.sealed"), &pass()).unwrap();
    for (zone, file) in pool.key_files().unwrap() {
        let ring = file
            .unlock(&provider)
            .unwrap_or_else(|e| panic!("{ctx}: zone {zone}'s keys do not unwrap: {e}"));
        for r in file.records() {
            if r.purpose == crate::keys::wrap::Purpose::Dek && r.state != KeyState::Destroyed {
                assert!(
                    ring.dek(KeyVersion(r.version)).is_some(),
                    "{ctx}: zone {zone}: DEK {} ({:?}) does not unwrap",
                    r.version,
                    r.state
                );
            }
        }
    }
    drop(vol);
    drop(pool);
    crate::audit::verify(image)
        .unwrap_or_else(|e| panic!("{ctx}: the audit chain does not verify: {e}"));
    // The key files alone (no pool) unwrap too.
    let _ = ZoneKeyFile::load(&Pool::zone_key_path(image, crate::ids::ZoneId(1))).unwrap();
}

/// Walks a power loss through every sync of `op`, run on the pool
/// `base` holds. Returns the syncs of the operation (for the report).
fn walk(
    name: &str,
    base: &Path,
    model: &Model,
    profile: &Profile,
    op: impl Fn(&mut Run<'_>),
) -> Vec<String> {
    walk_checked(name, base, model, profile, op, |_, _| {})
}

/// [`walk`], with `check` run on each after-loss image (with its context)
/// after the common checks.
fn walk_checked(
    name: &str,
    base: &Path,
    model: &Model,
    profile: &Profile,
    op: impl Fn(&mut Run<'_>),
    check: impl Fn(&Path, &str),
) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let one = |crash_at: Option<u64>, seed: u64, n: usize| {
        let live = tmp.path().join(format!("live{n}"));
        let image = tmp.path().join(format!("image{n}"));
        copy_tree(base, &live).unwrap();
        let mut model = model.clone();
        let sim;
        {
            let pool = Arc::new(Pool::open(&live, &pass(), profile).unwrap());
            let vol = pool.open("v").unwrap();
            let rt = runtime();
            sim = PowerLoss::arm(&live, crash_at, seed, &image).unwrap();
            op(&mut Run {
                pool: &pool,
                vol: &vol,
                rt: &rt,
                model: &mut model,
                dry: crash_at.is_none(),
            });
            pool.stop_background();
        }
        let out = (sim.crashed(), sim.syncs(), sim.trace());
        drop(sim);
        let _ = std::fs::remove_dir_all(&live);
        (out, image, model)
    };
    let ((_, total, trace), _, _) = one(None, 0, 0);
    assert!(total > 0, "{name}: the operation syncs nothing");
    let mut n = 1;
    for at in 1..=total {
        for seed in 0..seeds() {
            let ((crashed, _, _), image, model) = one(Some(at), seed, n);
            n += 1;
            if crashed {
                let ctx = format!("{name}: power lost at sync {at} (seed {seed})");
                check_recovered(&image, profile, &model, &ctx);
                check(&image, &ctx);
            }
            let _ = std::fs::remove_dir_all(&image);
        }
    }
    eprintln!("{name}: {total} syncs walked: {trace:?}");
    trace
}

fn profile() -> Profile {
    Profile::load("ci-2core").unwrap()
}

#[test]
fn power_loss_at_every_sync_of_a_fua_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |_, _, _, _| {});
    walk("a 4 KiB FUA write", &base, &model, &profile(), |r| {
        r.write(&[40], 1, true);
        r.write(&[3], 1, true);
    });
}

#[test]
fn power_loss_at_every_sync_of_a_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |_, _, _, _| {});
    walk("a FLUSH", &base, &model, &profile(), |r| {
        let w = r.write(&[5, 6, 41, 42], 1, false);
        r.flush(&w);
    });
}

#[test]
fn power_loss_at_every_sync_of_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = profile();
    let (base, model) = baseline(tmp.path(), &p, |_, _, _, _| {});
    // Every commit is past the checkpoint size: the flush checkpoints.
    p.journal.checkpoint_mib = 0;
    walk("a checkpoint", &base, &model, &p, |r| {
        let w = r.write(&[7, 8, 43], 1, false);
        r.flush(&w);
    });
}

/// Each flush's commit starts a checkpoint, which copies and syncs the
/// tables on its own thread while the next writes commit into the next
/// generation, in the journal's other region. A loss at any sync leaves
/// every flushed write, whichever header was current.
#[test]
fn power_loss_at_every_sync_of_flushes_beside_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = profile();
    let (base, model) = baseline(tmp.path(), &p, |_, _, _, _| {});
    p.journal.checkpoint_mib = 0;
    // Which frames land in which region depends on when the checkpoint's
    // thread takes its cut; the pause makes the other region likely (the
    // journal's own tests cover it deterministically).
    walk("flushes beside a checkpoint", &base, &model, &p, |r| {
        for (tag, lbas) in [[7, 8], [9, 43], [7, 44], [8, 45]].iter().enumerate() {
            let w = r.write(lbas, 10 + tag as u64, false);
            r.flush(&w);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
}

/// Starts a rotation of "z" and waits until every block is staged.
fn stage_all(pool: &Arc<Pool>) {
    pool.start_background();
    pool.rotation_prepare("z", None).unwrap();
    wait_for("staging", || {
        let s = pool.rotation_status("z").unwrap();
        s.staged_blocks == s.content_blocks
    });
    pool.stop_background();
}

#[test]
fn power_loss_at_every_sync_of_a_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| stage_all(pool));
    walk("a flip", &base, &model, &profile(), |r| {
        let st = r.pool.rotation_flip("z");
        if r.dry {
            assert_eq!(st.unwrap().active_version, 2);
        }
    });
}

/// Zone "b" (streamed) writes; zone "z" flips while those writes' frames
/// still wait for their data sync, so the flip's frame is written ahead of
/// them; then "b" flushes. After a loss at any sync, "b" holds a prefix of
/// its writes and its stream exactly one record for each: a record whose
/// frame was lost behind the flip is cut, though the flip is durable.
#[test]
fn power_loss_at_every_sync_of_a_flip_ahead_of_another_zones_writes() {
    const WRITES: u64 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let mut p = profile();
    // The other zone's frames wait until its FLUSH.
    p.journal.commit_interval_ms = 600_000;
    let streamed_before = std::sync::atomic::AtomicU64::new(0);
    let (base, model) = baseline(tmp.path(), &p, |pool, _, _, _| {
        pool.create_zone("b").unwrap();
        pool.enable_stream("b").unwrap();
        pool.create_volume("vb", "b", 1 << 20).unwrap();
        let before = pool.stream_status("b").unwrap().last_seq;
        streamed_before.store(before, std::sync::atomic::Ordering::SeqCst);
        stage_all(pool);
    });
    let streamed_before = streamed_before.into_inner();
    let data = |lba: u64| block(7000 + lba);
    let op = |r: &mut Run<'_>| {
        let vb = r.pool.open("vb").unwrap();
        // b's writes land between the flip's pre-commit and its record.
        let writer = vb.clone();
        let dry = r.dry;
        crate::rotation::tests::BEFORE_FLIP.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move || {
                let rt = runtime();
                for lba in 0..WRITES {
                    let w = rt.block_on(writer.write(lba * BLOCK_SIZE as u64, &data(lba), false));
                    assert!(!dry || w.is_ok(), "{w:?}");
                }
            }))
        });
        let st = r.pool.rotation_flip("z");
        crate::rotation::tests::BEFORE_FLIP.with(|hook| *hook.borrow_mut() = None);
        if r.dry {
            assert_eq!(st.unwrap().active_version, 2);
            let j = crate::store::journal::Journal::read(&r.pool.dir().join("journal")).unwrap();
            assert!(
                j.in_order_through < j.last,
                "the flip was not written ahead of zone b's frames"
            );
        }
        let f = r.rt.block_on(vb.flush());
        assert!(!r.dry || f.is_ok(), "{f:?}");
    };
    let check = |image: &Path, ctx: &str| {
        let pool = Pool::open(image, &pass(), &p).unwrap();
        let vb = pool.open("vb").unwrap();
        let rt = runtime();
        let mut kept = 0;
        for lba in 0..WRITES {
            let mut got = vec![0u8; BLOCK_SIZE];
            rt.block_on(vb.read(lba * BLOCK_SIZE as u64, &mut got))
                .unwrap();
            if got == data(lba) {
                assert_eq!(kept, lba, "{ctx}: b's writes kept are not a prefix");
                kept += 1;
            } else {
                assert!(got.iter().all(|&b| b == 0), "{ctx}: block {lba} of vb torn");
            }
        }
        let streamed = pool.stream_status("b").unwrap().last_seq - streamed_before;
        assert_eq!(
            streamed, kept,
            "{ctx}: zone b's stream holds {streamed} records for {kept} writes kept"
        );
    };
    walk_checked(
        "a flip ahead of another zone's writes",
        &base,
        &model,
        &p,
        op,
        check,
    );
}

/// One migrator pass over zone "z", as the scheduler starts it; `dry`:
/// check that it left nothing under the old key or staged.
fn migrate_pass(pool: &Arc<Pool>, dry: bool) {
    let rot = pool.rotation("z").unwrap();
    let st = rot.state.lock().clone();
    pool.start_worker(&rot, &st);
    if let Some(h) = rot.worker.lock().take() {
        h.join().unwrap();
    }
    if dry {
        let mut meta = rot.zone.meta.lock();
        let census = meta.census();
        assert!(
            census.keys().all(|&k| k == (KeyVersion(2), None)),
            "the pass migrated and destaged everything: {census:?}"
        );
    }
}

#[test]
fn power_loss_at_every_sync_of_a_migration_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // Flipped with nothing staged: every block is re-encrypted.
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| {
        pool.rotation_prepare("z", None).unwrap();
        pool.rotation_pause("z").unwrap();
        pool.rotation_flip("z").unwrap();
    });
    walk("a migration batch", &base, &model, &profile(), |r| {
        migrate_pass(r.pool, r.dry)
    });
}

#[test]
fn power_loss_at_every_sync_of_a_destage() {
    let tmp = tempfile::tempdir().unwrap();
    // Flipped fully staged: every staged copy is destaged.
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| {
        stage_all(pool);
        pool.rotation_pause("z").unwrap();
        pool.rotation_flip("z").unwrap();
    });
    walk("a destage", &base, &model, &profile(), |r| {
        migrate_pass(r.pool, r.dry)
    });
}

#[test]
fn power_loss_at_every_sync_of_an_old_keys_destroy() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| {
        stage_all(pool);
        pool.rotation_flip("z").unwrap();
        // The scheduler's steps, one by one (its thread stops for good
        // once stopped): migrate, then queue the old key for destroy.
        migrate_pass(pool, true);
        let rot = pool.rotation("z").unwrap();
        pool.tick_zone(&rot).unwrap();
        assert!(
            rot.state
                .lock()
                .pending_destroy
                .iter()
                .any(|p| p.version == 1),
            "the old key waits for its destroy"
        );
    });
    walk("an old key's destroy", &base, &model, &profile(), |r| {
        let rot = r.pool.rotation("z").unwrap();
        let p = rot.state.lock().pending_destroy[0];
        let done = r.pool.destroy_old_key(&rot, p);
        if r.dry {
            done.unwrap();
            assert!(rot.zone.crypto().xts(KeyVersion(1)).is_none(), "destroyed");
        }
    });
}

#[test]
fn power_loss_at_every_sync_of_a_kek_rewrap_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| stage_all(pool));
    walk("a KEK re-wrap batch", &base, &model, &profile(), |r| {
        let report = r
            .pool
            .rotate_kek("z", 1, std::time::Duration::from_millis(0));
        assert!(!r.dry || report.is_ok(), "{report:?}");
    });
}

#[test]
fn power_loss_at_every_sync_of_a_stream_append() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, model) = baseline(tmp.path(), &profile(), |pool, _, _, _| {
        pool.enable_stream("z").unwrap();
    });
    walk("a stream append", &base, &model, &profile(), |r| {
        let before = r.pool.stream_status("z").unwrap();
        let w = r.write(&[9, 44], 1, false);
        r.flush(&w);
        if r.dry {
            let after = r.pool.stream_status("z").unwrap();
            assert!(after.last_seq > before.last_seq, "the writes were streamed");
        }
    });
}
