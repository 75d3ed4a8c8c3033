//! A whole rotation in one process: window, staging, flip, migration,
//! destroy, with data checked at each step and the crypto-erase checked
//! with the old key itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{DualControlSection, PoolConfig, Profile, ServerSection};
use crate::crypto::xts::Xts;
use crate::ids::{BLOCK_SIZE, KeyVersion};
use crate::keys::passphrase::Passphrase;
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::keys::zone_keys::ZoneKeyFile;
use crate::nbd::export::{Export, ExportCatalog};
use crate::pool::{InitOptions, Pool, RootKeyChoice};

thread_local! {
    /// Run by a flip on this thread after its pre-commit and before it
    /// takes the zone lock: a test's frames of other zones land there.
    pub(crate) static BEFORE_FLIP: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        const { std::cell::RefCell::new(None) };
}

pub(crate) fn block(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    for (j, x) in b.chunks_mut(8).enumerate() {
        x.copy_from_slice(&(i * 1_000_003 + j as u64).to_le_bytes());
    }
    b
}

pub(crate) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Until zone "z" is idle again with its first DEK destroyed: migration and
/// destroy are done.
fn wait_old_key_destroyed(pool: &Pool) {
    wait_for("migration and destroy", || {
        let s = pool.rotation_status("z").unwrap();
        s.phase == crate::admin::RotationPhase::Idle
            && s.keys
                .iter()
                .any(|k| k.version == 1 && k.state == "destroyed")
    });
}

/// A fresh pool in a temporary directory: (the directory, the pool, its passphrase).
pub(crate) fn new_pool() -> (tempfile::TempDir, std::path::PathBuf, Passphrase) {
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("pool");
    let pass = Passphrase::new("correct horse".into()).unwrap();
    Pool::init(
        &pdir,
        &InitOptions {
            data: None,
            staging: None,
            kdf: KdfParams::INSECURE_FAST,
            root_key: RootKeyChoice::SealedFile,
            server: ServerSection::default(),
            dual_control: DualControlSection::default(),
        },
        &pass,
    )
    .unwrap();
    (dir, pdir, pass)
}

/// The pool at `pdir` with no grace period and `batch` blocks per
/// pipeline batch, a zone "z" and a volume "v" of `size` bytes in it:
/// (the pool, the volume, a runtime to drive it).
pub(crate) fn open_rotating(
    pdir: &std::path::Path,
    pass: &Passphrase,
    batch: usize,
    size: u64,
) -> (
    Arc<Pool>,
    Arc<crate::volume::Volume>,
    tokio::runtime::Runtime,
) {
    let mut config = PoolConfig::load(&pdir.join("pool.toml")).unwrap();
    config.rotation.grace_secs = 0;
    config.rotation.batch_blocks = batch;
    std::fs::write(pdir.join("pool.toml"), config.to_toml()).unwrap();
    let profile = Profile::load("ci-2core").unwrap();
    {
        let pool = Pool::open(pdir, pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", size).unwrap();
    }
    let pool = Arc::new(Pool::open(pdir, pass, &profile).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let vol = pool.open("v").unwrap();
    (pool, vol, rt)
}

#[test]
fn full_rotation_stages_flips_migrates_and_erases() {
    let (_dir, pdir, pass) = new_pool();
    let (pool, vol, rt) = open_rotating(&pdir, &pass, 32, 64 << 20);
    // 600 distinct blocks, then 200 copies of one block (dedup: 1 content block).
    rt.block_on(async {
        for i in 0..600u64 {
            vol.write(i * 4096, &block(i), false).await.unwrap();
        }
        for i in 600..800u64 {
            vol.write(i * 4096, &block(7777), false).await.unwrap();
        }
        vol.flush().await.unwrap();
    });
    let expect = |i: u64| if i < 600 { block(i) } else { block(7777) };
    let check_all = |ctx: &str| {
        rt.block_on(async {
            for i in 0..800u64 {
                let mut got = vec![0u8; BLOCK_SIZE];
                vol.read(i * 4096, &mut got)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: block {i}: {e}"));
                assert!(got == expect(i), "{ctx}: block {i} reads wrong data");
            }
        })
    };
    let st = pool.rotation_status("z").unwrap();
    assert_eq!(
        st.content_blocks, 601,
        "dedup stores the repeated block once"
    );

    // The old key, kept by the test to prove the crypto-erase later.
    let provider = SealedFileProvider::open(&pdir.join("keys/root.sealed"), &pass).unwrap();
    let ring = ZoneKeyFile::load(&Pool::zone_key_path(&pdir, crate::ids::ZoneId(1)))
        .unwrap()
        .unlock(&provider)
        .unwrap();
    let old_xts = Xts::new(ring.dek(KeyVersion(1)).unwrap());

    pool.start_background();
    let st = pool.rotation_prepare("z", None).unwrap();
    assert_eq!(st.next_version, Some(2));
    // A write in the window lands under both keys.
    rt.block_on(async { vol.write(800 * 4096, &block(800), true).await.unwrap() });
    wait_for("staging to finish", || {
        let s = pool.rotation_status("z").unwrap();
        s.staged_blocks == s.content_blocks
    });
    let st = pool.rotation_status("z").unwrap();
    assert_eq!(
        st.reencrypted_blocks, 601,
        "each content block staged once (the shared one once)"
    );
    check_all("window");
    let zone = pool.zones.read().values().next().unwrap().clone();
    let before: Vec<_> = zone.meta.lock().live_records();

    let st = pool.rotation_flip("z").unwrap();
    assert_eq!(st.active_version, 2);
    let old_blocks = st
        .keys
        .iter()
        .find(|k| k.version == 1)
        .map_or(0, |k| k.blocks);
    assert_eq!(
        old_blocks, 0,
        "fully staged: nothing is under the old key after the flip"
    );
    check_all("after flip");

    wait_old_key_destroyed(&pool);
    check_all("after migration");
    let refs = pool.key_references(&zone);
    assert_eq!(
        refs.get(&KeyVersion(1)),
        None,
        "nothing refers to the old key"
    );
    assert!(
        zone.crypto().xts(KeyVersion(1)).is_none(),
        "old key gone from memory"
    );
    let staging_used = pool.storage.staging.as_ref().unwrap().used();
    assert_eq!(staging_used, 0, "destaging freed the staging area");

    // Crypto-erase: no slot of either device decrypts under the old key to
    // any block it held, nor does any staged copy under the next key linger.
    let data = std::fs::read(pdir.join("data")).unwrap();
    let mut plain = vec![0u8; BLOCK_SIZE];
    let crypto = zone.crypto();
    let tagger = crypto.tagger();
    let mut hits = 0;
    for (cbid, r) in &before {
        let at = r.slot.0 as usize * BLOCK_SIZE;
        if at + BLOCK_SIZE <= data.len() {
            old_xts.decrypt(cbid.0, &data[at..at + BLOCK_SIZE], &mut plain);
            if tagger.verify(&plain, &r.tag) {
                hits += 1;
            }
        }
    }
    assert_eq!(
        hits, 0,
        "old-key ciphertext is still readable in {hits} data slots"
    );
    let staging = std::fs::read(pdir.join("staging")).unwrap();
    assert!(
        staging.iter().all(|&b| b == 0),
        "the staging area was discarded"
    );
    pool.stop_background();
}

/// A crash right after the flip record is durable, before the key file and
/// the rotation state follow: the next open completes the flip from the
/// journal alone.
#[test]
fn flip_record_alone_completes_the_flip_at_open() {
    let (_dir, pdir, pass) = new_pool();
    let profile = Profile::load("ci-2core").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", 16 << 20).unwrap();
    }
    {
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        let vol = pool.open("v").unwrap();
        rt.block_on(async {
            for i in 0..50u64 {
                vol.write(i * 4096, &block(i), false).await.unwrap();
            }
        });
        pool.rotation_prepare("z", None).unwrap();
        rt.block_on(async { vol.write(50 * 4096, &block(50), true).await.unwrap() });
        // The flip record, durable (written ahead, as the flip writes it),
        // and nothing after it.
        let zone = pool.zones.read().values().next().unwrap().clone();
        let frame = pool.journal.append_ahead(
            zone.id,
            &[crate::store::journal::Entry::Flip {
                zone: zone.id,
                to: KeyVersion(2),
            }],
        );
        pool.journal.commit_ahead(frame).unwrap();
        drop(vol);
        // Dropping the pool is a clean close; the key file and state file
        // still say "window", as after a crash at this point.
    }
    let pool = Pool::open(&pdir, &pass, &profile).unwrap();
    let st = pool.rotation_status("z").unwrap();
    assert_eq!(st.active_version, 2);
    assert_eq!(st.phase, crate::admin::RotationPhase::Migrating);
    let state = |v: u32| {
        st.keys
            .iter()
            .find(|k| k.version == v)
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(state(2), "active");
    assert_eq!(state(1), "decrypt-only");
    let vol = pool.open("v").unwrap();
    rt.block_on(async {
        for i in 0..51u64 {
            let mut got = vec![0u8; BLOCK_SIZE];
            vol.read(i * 4096, &mut got).await.unwrap();
            assert!(got == block(i), "block {i}");
        }
    });
}

/// After a flip, a staged block has two verified copies: the staged one
/// under the new key (live) and the data-device one under the old key,
/// until the migrator destages it. Reads may use either, and must fall
/// back from a damaged copy to the other in both directions; the migrator
/// then re-encrypts from the data copy where the staged one is damaged.
#[test]
fn reads_after_the_flip_use_either_verified_copy() {
    use std::os::unix::fs::FileExt;
    let (_dir, pdir, pass) = new_pool();
    let (pool, vol, rt) = open_rotating(&pdir, &pass, 256, 16 << 20);
    const N: u64 = 64;
    rt.block_on(async {
        for i in 0..N {
            vol.write(i * 4096, &block(i), false).await.unwrap();
        }
        vol.flush().await.unwrap();
    });
    pool.start_background();
    pool.rotation_prepare("z", None).unwrap();
    wait_for("staging to finish", || {
        let s = pool.rotation_status("z").unwrap();
        s.staged_blocks == s.content_blocks
    });
    // Paused, the flip leaves every block staged and nothing migrated.
    pool.rotation_pause("z").unwrap();
    pool.rotation_flip("z").unwrap();
    let zone = pool.zones.read().values().next().unwrap().clone();
    let records: Vec<_> = {
        let meta = zone.meta.lock();
        let map = meta.volumes.values().next().unwrap();
        (0..N)
            .map(|i| {
                let cbid = map.get(crate::ids::Lba(i)).unwrap();
                meta.cb(cbid).unwrap()
            })
            .collect()
    };
    assert!(records.iter().all(|r| r.staged.is_some()));
    // Damage the data copy of block 3 and the staged copy of every other.
    let garbage = vec![0xa5u8; BLOCK_SIZE];
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(pdir.join("data"))
        .unwrap();
    let staging = std::fs::OpenOptions::new()
        .write(true)
        .open(pdir.join("staging"))
        .unwrap();
    for (i, r) in records.iter().enumerate() {
        if i == 3 {
            data.write_all_at(&garbage, r.slot.0 * BLOCK_SIZE as u64)
                .unwrap();
        } else {
            let s = r.staged.unwrap().slot;
            staging
                .write_all_at(&garbage, s.0 * BLOCK_SIZE as u64)
                .unwrap();
        }
    }
    data.sync_all().unwrap();
    staging.sync_all().unwrap();
    let check_all = |ctx: &str| {
        rt.block_on(async {
            // One multi-block read (runs) and single-block reads.
            let mut all = vec![0u8; N as usize * BLOCK_SIZE];
            vol.read(0, &mut all)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            for i in 0..N {
                let got = &all[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
                assert!(got == block(i), "{ctx}: block {i} reads wrong data");
                let mut one = vec![0u8; BLOCK_SIZE];
                vol.read(i * 4096, &mut one).await.unwrap();
                assert!(one == block(i), "{ctx}: block {i} alone reads wrong data");
            }
        })
    };
    check_all("after the flip, one copy of each block damaged");
    // The migrator destages block 3 and re-encrypts the rest from their
    // data copies (their staged copies fail their check).
    pool.rotation_resume("z").unwrap();
    wait_old_key_destroyed(&pool);
    check_all("after migration");
    let st = pool.rotation_status("z").unwrap();
    assert_eq!(
        st.reencrypted_blocks,
        N + N - 1,
        "staged once each, then re-encrypted where the staged copy was damaged: {st:?}"
    );
    pool.stop_background();
}

/// The status of each phase adds up: right after the flip nothing is
/// migrated of all there is to migrate, a finished phase has no ETA and a
/// rate over its own time, and the next window counts from zero.
#[test]
fn status_counts_add_up_in_every_phase() {
    use crate::admin::RotationPhase;
    let (_dir, pdir, pass) = new_pool();
    let (pool, vol, rt) = open_rotating(&pdir, &pass, 16, 16 << 20);
    const N: u64 = 64;
    rt.block_on(async {
        for i in 0..N {
            vol.write(i * 4096, &block(i), false).await.unwrap();
        }
        vol.flush().await.unwrap();
    });
    pool.start_background();
    for round in 0..2 {
        let st = pool.rotation_prepare("z", None).unwrap();
        assert_eq!(
            (st.staged_blocks, st.migrated_blocks, st.remaining_blocks),
            (0, 0, N),
            "round {round}: a new window counts from zero: {st:?}"
        );
        // The pipeline notes the staging's end just after its last batch
        // is recorded: wait for both (a loaded machine showed the gap).
        wait_for("staging to finish", || {
            let st = pool.rotation_status("z").unwrap();
            st.remaining_blocks == 0 && st.staging_secs.is_some()
        });
        let st = pool.rotation_status("z").unwrap();
        assert_eq!(st.staged_blocks, N);
        assert_eq!(st.progress_percent, 100.0);
        assert_eq!(st.eta_secs, None, "no ETA once staged: {st:?}");
        let secs = st.staging_secs.expect("staging time");
        let expect = (N * BLOCK_SIZE as u64) as f64 / secs;
        assert!(
            (st.rate_bytes_per_sec - expect).abs() <= expect * 0.01,
            "the rate is the staging's own: {} vs {expect}",
            st.rate_bytes_per_sec
        );
        // It stays that rate while the window waits for the flip.
        std::thread::sleep(Duration::from_millis(1100));
        let later = pool.rotation_status("z").unwrap();
        assert_eq!(later.rate_bytes_per_sec, st.rate_bytes_per_sec);

        pool.rotation_pause("z").unwrap();
        let st = pool.rotation_flip("z").unwrap();
        assert_eq!(st.phase, RotationPhase::Paused);
        assert_eq!(
            (st.migrated_blocks, st.remaining_blocks, st.progress_percent),
            (0, N, 0.0),
            "right after the flip, every staged copy is still to destage: {st:?}"
        );
        assert_eq!(st.eta_secs, None);
        pool.rotation_resume("z").unwrap();
        wait_for("migration", || {
            pool.rotation_status("z").unwrap().phase == RotationPhase::Idle
        });
        let st = pool.rotation_status("z").unwrap();
        assert_eq!(
            (st.migrated_blocks, st.remaining_blocks, st.progress_percent),
            (N, 0, 100.0),
            "{st:?}"
        );
        assert_eq!(st.eta_secs, None);
    }
    pool.stop_background();
}
