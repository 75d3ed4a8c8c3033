//! Tests of root key rotation and passphrase changes: crashes at every
//! step, resumption, dual control.
//! Root key rotation of a real pool in one process: a crash (an error
//! from the step hook) at every batch boundary and every later step,
//! then reopen, read, resume and check.

use std::collections::BTreeMap;

use super::*;
use crate::config::{DualControlSection, Profile, ServerSection};
use crate::ids::{BLOCK_SIZE, ZoneId};
use crate::keys::wrap::Purpose;
use crate::nbd::export::{Export, ExportCatalog};
use crate::pool::{InitOptions, RootKeyChoice};

const OLD: &str = "old passphrase for the root";
const NEW: &str = "new passphrase for the root";

fn pass(s: &str) -> Passphrase {
    Passphrase::new(s.into()).unwrap()
}

fn profile() -> Profile {
    Profile::load("ci-2core").unwrap()
}

fn block(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    for (j, x) in b.chunks_mut(8).enumerate() {
        x.copy_from_slice(&(i * 7919 + j as u64 + 1).to_le_bytes());
    }
    b
}

/// Every DEK and MAC key of every zone, by zone, as `provider` unlocks them.
type Keys = BTreeMap<u32, (Vec<(u32, Vec<u8>)>, Vec<u8>)>;

fn keys_of(pool: &Pool, provider: &dyn RootKeyProvider) -> Result<Keys, KeyError> {
    let mut out = BTreeMap::new();
    for z in pool.catalog().zones {
        let ring = ZoneKeyFile::load(&Pool::zone_key_path(pool.dir(), z.id))?.unlock(provider)?;
        let deks = ring
            .versions()
            .map(|v| (v.0, ring.dek(v).unwrap().expose().to_vec()))
            .collect();
        out.insert(z.id.0, (deks, ring.mac_key().expose().to_vec()));
    }
    Ok(out)
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    keys: Keys,
    /// A copy of the old sealed file, as a backup would keep it.
    old_copy: PathBuf,
}

/// A pool with three zones and four KEKs that have material: z1 (one
/// KEK, a volume with data), z2 (an unfinished KEK rotation: two), z3 (a
/// finished one: KEK v1 destroyed, v2 live).
fn fixture(dual_control: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    Pool::init(
        &dir,
        &InitOptions {
            data: None,
            staging: None,
            kdf: KdfParams::INSECURE_FAST,
            root_key: RootKeyChoice::SealedFile,
            server: ServerSection::default(),
            dual_control: DualControlSection {
                required: dual_control,
                ..DualControlSection::default()
            },
        },
        &pass(OLD),
    )
    .unwrap();
    let pool = Pool::open(&dir, &pass(OLD), &profile()).unwrap();
    for z in ["z1", "z2", "z3"] {
        pool.create_zone(z).unwrap();
    }
    pool.create_volume("v", "z1", 8 << 20).unwrap();
    let path = Pool::zone_key_path(&dir, ZoneId(2));
    let mut f = ZoneKeyFile::load(&path).unwrap();
    f.begin_kek_rotation(pool.root().as_ref()).unwrap();
    f.save(&path).unwrap();
    if !dual_control {
        pool.rotate_kek("z3", 64, Duration::ZERO).unwrap();
    }
    let vol = pool.open("v").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..16u64 {
            vol.write(i * 4096, &block(i), false).await.unwrap();
        }
        vol.flush().await.unwrap();
    });
    drop(vol);
    let keys = keys_of(&pool, pool.root().as_ref()).unwrap();
    drop(pool);
    let old_copy = tmp.path().join("root.sealed.backup");
    std::fs::copy(dir.join("keys/root.sealed"), &old_copy).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        keys,
        old_copy,
    }
}

fn read_back(pool: &Pool) {
    let vol = pool.open("v").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..16u64 {
            let mut got = vec![0u8; BLOCK_SIZE];
            vol.read(i * 4096, &mut got).await.unwrap();
            assert!(got == block(i), "block {i} reads wrong data");
        }
    });
}

fn sealed_new(p: &Passphrase) -> NewRoot<'_> {
    NewRoot::SealedFile {
        passphrase: Some(p),
        kdf: None,
    }
}

/// A root key rotation of `pool` to a sealed file under `new`.
fn rotate(
    pool: &Pool,
    current: &str,
    new: &Passphrase,
    batch: usize,
) -> Result<RootRotationReport> {
    pool.rotate_root(
        RootSecret::Passphrase(&pass(current)),
        sealed_new(new),
        batch,
        Duration::ZERO,
        None,
    )
}

/// [`rotate`], one KEK per batch, crashing at `at`.
fn crash(pool: &Pool, current: &str, new: &Passphrase, at: Step) -> PoolError {
    let e = pool
        .rotate_root_with(
            RootSecret::Passphrase(&pass(current)),
            sealed_new(new),
            1,
            Duration::ZERO,
            None,
            &crash_at(at),
        )
        .unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{at:?}: {e}");
    e
}

fn crash_at(at: Step) -> impl Fn(Step) -> Result<()> {
    move |s| {
        if s == at {
            Err(PoolError::Conflict(format!("simulated crash at {s:?}")))
        } else {
            Ok(())
        }
    }
}

fn is_wrong_passphrase(r: Result<Pool>) -> bool {
    matches!(r, Err(PoolError::Key(KeyError::WrongPassphrase { .. })))
}

fn kek_roots(dir: &Path) -> Vec<Option<String>> {
    (1..=3)
        .flat_map(|z| {
            ZoneKeyFile::load(&Pool::zone_key_path(dir, ZoneId(z)))
                .unwrap()
                .records()
                .iter()
                .filter(|r| r.purpose == Purpose::Kek && r.state.has_material())
                .map(|r| r.wrapped_by_root.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// After the rotation: the new passphrase opens the pool and reads the
/// data, the old one is refused, the old file and the record are gone,
/// and the old root key (from a backup copy) unwraps nothing.
fn check_finished(fx: &Fixture) {
    let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
    assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), fx.keys);
    read_back(&pool);
    let RootKeyConfig::SealedFile { path } = &pool.config().root_key else {
        panic!("sealed");
    };
    assert_ne!(path, Path::new("keys/root.sealed"));
    assert!(path.starts_with("keys"), "beside the old file: {path:?}");
    drop(pool);
    assert!(is_wrong_passphrase(Pool::open(
        &fx.dir,
        &pass(OLD),
        &profile()
    )));
    assert!(
        !fx.dir.join("keys/root.sealed").exists(),
        "old file destroyed"
    );
    assert!(!RootRotationState::path(&fx.dir).exists(), "record removed");
    let old = SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap();
    for z in 1..=3 {
        let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap();
        let e = f.check_keks_unwrap(&old).unwrap_err();
        assert!(matches!(e, KeyError::Unwrap { .. }), "zone {z}: {e}");
        assert!(f.unlock(&old).is_err(), "zone {z}");
    }
    let new_id = root_id(&Pool::root_key_config(&fx.dir).unwrap());
    assert!(
        kek_roots(&fx.dir)
            .iter()
            .all(|r| r.as_deref() == Some(new_id.as_str())),
        "{:?}",
        kek_roots(&fx.dir)
    );
    let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
    let ok = log
        .lines()
        .filter(|l| l.contains("\"root.rotate\"") && l.contains("\"ok\""))
        .count();
    assert_eq!(ok, 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("\"key.destroy\"") && l.contains("sealed-file:keys/root.sealed")),
        "{log}"
    );
    crate::audit::verify(&fx.dir).unwrap();
}

#[test]
fn rotation_without_a_crash() {
    let fx = fixture(false);
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let new = pass(NEW);
    let report = rotate(&pool, OLD, &new, 64).unwrap();
    assert_eq!(
        (report.rewrapped, report.checked, report.zones),
        (4, 4, 3),
        "{report:?}"
    );
    assert!(report.old_destroyed && !report.resumed);
    // The open pool now works with the new root key: a new zone's keys
    // are wrapped by it.
    pool.create_zone("z4").unwrap();
    drop(pool);
    let mut fx = fx;
    let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
    fx.keys
        .insert(4, keys_of(&pool, pool.root().as_ref()).unwrap()[&4].clone());
    drop(pool);
    check_finished(&fx);
    // The new file keeps the old file's KDF cost.
    let path = Pool::resolve(
        &fx.dir,
        match &Pool::root_key_config(&fx.dir).unwrap() {
            RootKeyConfig::SealedFile { path } => path,
            _ => unreachable!(),
        },
    );
    let sealed = SealedFileProvider::open(&path, &pass(NEW)).unwrap();
    assert_eq!(sealed.params(), KdfParams::INSECURE_FAST);
}

/// A crash after every batch (one KEK each) and after every later step:
/// the pool opens with the passphrase pool.toml calls for, every key
/// unwraps, the data reads back, the other passphrase is refused, and
/// running again finishes.
#[test]
fn crash_at_every_step_then_resume() {
    let steps = [
        Step::Begun,
        Step::Saved(1),
        Step::Saved(2),
        Step::Saved(3),
        Step::Saved(4),
        Step::Checked,
        Step::Switched,
        Step::Retired,
    ];
    for at in steps {
        let fx = fixture(false);
        let new = pass(NEW);
        {
            let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
            crash(&pool, OLD, &new, at);
        }
        let switched = matches!(at, Step::Switched | Step::Retired);
        let (right, wrong) = if switched { (NEW, OLD) } else { (OLD, NEW) };
        assert!(
            is_wrong_passphrase(Pool::open(&fx.dir, &pass(wrong), &profile())),
            "{at:?}: {wrong} must be refused"
        );
        let pool = Pool::open(&fx.dir, &pass(right), &profile()).unwrap();
        assert_eq!(
            keys_of(&pool, pool.root().as_ref()).unwrap(),
            fx.keys,
            "{at:?}: every key unwraps"
        );
        read_back(&pool);
        let state = RootRotationState::load(&fx.dir).unwrap().expect("recorded");
        let new_id = state.new_id();
        let moved = kek_roots(&fx.dir)
            .iter()
            .filter(|r| r.as_deref() == Some(new_id.as_str()))
            .count();
        let expect_moved = match at {
            Step::Begun => 0,
            Step::Saved(k) => k,
            _ => 4,
        };
        assert_eq!(moved, expect_moved, "{at:?}");
        if let Step::Saved(_) = at {
            assert!(
                pool.root().describe().contains("rotation in progress"),
                "{at:?}"
            );
            // The old root alone no longer unlocks every zone.
            assert!(
                keys_of(
                    &pool,
                    &SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap()
                )
                .is_err()
            );
        }
        let report = rotate(&pool, right, &new, 1).unwrap();
        assert!(report.resumed, "{at:?}");
        assert_eq!(report.rewrapped, 4 - expect_moved, "{at:?}");
        assert_eq!(report.old_destroyed, at != Step::Retired, "{at:?}");
        assert_eq!(report.new_root, new_id);
        drop(pool);
        check_finished(&fx);
        let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("\"root.rotate\"") && l.contains("\"failed\"")),
            "{at:?}: the crashed run is recorded"
        );
    }
}

/// The rotation on a shared pool, as the server runs it, while other
/// threads rotate KEKs, open and abort DEK rotation windows and create
/// zones on the same key files: each of them succeeds every time, the
/// pool reads its data throughout, every KEK ends under the new root key
/// alone, and the pool reopens with the new passphrase.
#[test]
fn online_rotation_beside_kek_and_dek_rotations_and_new_zones() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let fx = fixture(false);
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let new = pass(NEW);
    let done = AtomicBool::new(false);
    let (keks, windows, zones) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                for z in ["z2", "z3"] {
                    pool.rotate_kek(z, 1, Duration::ZERO).unwrap();
                    keks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                pool.rotation_prepare("z1", None).unwrap();
                read_back(&pool);
                pool.rotation_abort("z1").unwrap();
                windows.fetch_add(1, Ordering::Relaxed);
            }
        });
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                let n = zones.fetch_add(1, Ordering::Relaxed);
                pool.create_zone(&format!("n{n}")).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // One KEK per batch and a pause: the others run between batches.
        let r = pool.rotate_root(
            RootSecret::Passphrase(&pass(OLD)),
            sealed_new(&new),
            1,
            Duration::from_millis(40),
            None,
        );
        done.store(true, Ordering::Release);
        r
    })
    .unwrap();
    assert!(report.rewrapped >= 1 && !report.resumed, "{report:?}");
    for (what, n) in [
        ("KEK rotations", &keks),
        ("windows", &windows),
        ("zones", &zones),
    ] {
        assert!(n.load(Ordering::Relaxed) >= 1, "no {what} ran beside it");
    }
    // The pool goes on: new keys come from the new root key.
    pool.rotate_kek("z1", 64, Duration::ZERO).unwrap();
    pool.rotation_prepare("z1", None).unwrap();
    read_back(&pool);
    pool.rotation_abort("z1").unwrap();
    pool.create_zone("after").unwrap();
    let all = keys_of(&pool, pool.root().as_ref()).unwrap();
    drop(pool);
    let new_root = SealedFileProvider::open(
        &Pool::resolve(
            &fx.dir,
            match &Pool::root_key_config(&fx.dir).unwrap() {
                RootKeyConfig::SealedFile { path } => path,
                _ => unreachable!(),
            },
        ),
        &new,
    )
    .unwrap();
    let zones_now = Pool::open(&fx.dir, &new, &profile())
        .map(|p| p.catalog().zones.len())
        .unwrap();
    assert_eq!(zones_now, all.len());
    for z in 1..=all.len() as u32 {
        let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap();
        assert!(f.check_keks_unwrap(&new_root).unwrap() >= 1, "zone {z}");
    }
    assert!(is_wrong_passphrase(Pool::open(
        &fx.dir,
        &pass(OLD),
        &profile()
    )));
    let pool = Pool::open(&fx.dir, &new, &profile()).unwrap();
    read_back(&pool);
    assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), all);
}

#[test]
fn one_root_operation_at_a_time() {
    let fx = fixture(false);
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let guard = pool.root_op_guard().unwrap();
    let e = pool
        .change_passphrase(&pass(OLD), &pass(NEW), None, None)
        .unwrap_err();
    assert!(matches!(e, PoolError::Conflict(_)), "{e}");
    let e = rotate(&pool, OLD, &pass(NEW), 64).unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    drop(guard);
    assert!(RootRotationState::load(&fx.dir).unwrap().is_none());
    pool.change_passphrase(&pass(OLD), &pass(NEW), None, None)
        .unwrap();
}

/// A zone created while a rotation is unfinished gets a KEK under the
/// new root key, and the resumed rotation has nothing to do for it.
#[test]
fn zone_made_mid_rotation_is_under_the_new_root() {
    let fx = fixture(false);
    let new = pass(NEW);
    {
        let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
        crash(&pool, OLD, &new, Step::Saved(2));
    }
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    pool.create_zone("z4").unwrap();
    let new_id = RootRotationState::load(&fx.dir).unwrap().unwrap().new_id();
    let f = ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(4))).unwrap();
    assert_eq!(
        f.records()[0].wrapped_by_root.as_deref(),
        Some(new_id.as_str())
    );
    let report = rotate(&pool, OLD, &new, 64).unwrap();
    assert_eq!((report.rewrapped, report.checked, report.zones), (2, 5, 4));
    drop(pool);
    let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
    assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap().len(), 4);
}

#[test]
fn wrong_old_passphrase_and_missing_approvals_change_nothing() {
    let fx = fixture(true);
    let before = std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(1))).unwrap();
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let new = pass(NEW);
    // Dual control: no approvals, refused and recorded.
    let e = rotate(&pool, OLD, &new, 64).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Approval(crate::keys::approval::ApprovalError::NotEnough { got: 0, .. })
        ),
        "{e}"
    );
    let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"root.rotate\"") && l.contains("\"refused\"")),
        "{log}"
    );
    // Without dual control, a wrong old passphrase is refused before
    // anything is written.
    let mut config = (*pool.config()).clone();
    config.dual_control.required = false;
    pool.set_config(config);
    let e = rotate(&pool, "not the passphrase", &new, 64).unwrap_err();
    assert!(
        matches!(e, PoolError::Key(KeyError::WrongPassphrase { .. })),
        "{e}"
    );
    let e = pool
        .rotate_root(
            RootSecret::Passphrase(&pass(OLD)),
            NewRoot::SealedFile {
                passphrase: None,
                kdf: None,
            },
            64,
            Duration::ZERO,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("needs a new passphrase"), "{e}");
    let e = pool
        .rotate_root(
            RootSecret::Passphrase(&pass(OLD)),
            NewRoot::Pkcs11 {
                key_label: Some("k".into()),
            },
            64,
            Duration::ZERO,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("sealed file"), "{e}");
    assert!(RootRotationState::load(&fx.dir).unwrap().is_none());
    assert_eq!(
        std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(1))).unwrap(),
        before
    );
    assert!(fx.dir.join("keys/root.sealed").exists());
    drop(pool);
    assert!(Pool::open(&fx.dir, &pass(OLD), &profile()).is_ok());
}

#[test]
fn change_passphrase_reseals_the_same_root_key() {
    let fx = fixture(false);
    let zone_files: Vec<Vec<u8>> = (1..=3)
        .map(|z| std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap())
        .collect();
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let e = pool
        .change_passphrase(&pass("wrong"), &pass(NEW), None, None)
        .unwrap_err();
    assert!(
        matches!(e, PoolError::Key(KeyError::WrongPassphrase { .. })),
        "{e}"
    );
    pool.change_passphrase(&pass(OLD), &pass(NEW), None, None)
        .unwrap();
    drop(pool);
    assert!(is_wrong_passphrase(Pool::open(
        &fx.dir,
        &pass(OLD),
        &profile()
    )));
    let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
    assert_eq!(keys_of(&pool, pool.root().as_ref()).unwrap(), fx.keys);
    read_back(&pool);
    drop(pool);
    // No KEK was re-wrapped: the zone key files are byte for byte the same,
    // and a copy of the old file still opens them with the old passphrase
    // (which is what rotate-root is for).
    for (z, before) in (1..=3).zip(&zone_files) {
        assert_eq!(
            &std::fs::read(Pool::zone_key_path(&fx.dir, ZoneId(z))).unwrap(),
            before
        );
    }
    let old = SealedFileProvider::open(&fx.old_copy, &pass(OLD)).unwrap();
    assert!(
        ZoneKeyFile::load(&Pool::zone_key_path(&fx.dir, ZoneId(1)))
            .unwrap()
            .unlock(&old)
            .is_ok()
    );
    let log = std::fs::read_to_string(fx.dir.join("audit.log")).unwrap();
    assert!(log.contains("\"root.reseal\""), "{log}");
    // Not during a root key rotation.
    let pool = Pool::open(&fx.dir, &pass(NEW), &profile()).unwrap();
    let third = pass("third");
    crash(&pool, NEW, &third, Step::Saved(1));
    let e = pool
        .change_passphrase(&pass(NEW), &pass("fourth"), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("in progress"), "{e}");
}

/// Every file under `dir`, by path.
fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// DESIGN invariant 8 through a root key rotation: neither root key's
/// bytes nor either passphrase reach a pool file, an error or a Debug
/// string, at a crash mid-way or at the end.
#[test]
fn no_root_key_or_passphrase_in_files_errors_or_debug() {
    let fx = fixture(false);
    let old_root = SealedFileProvider::open(&fx.old_copy, &pass(OLD))
        .unwrap()
        .root_for_tests()
        .expose()
        .to_vec();
    let new = pass(NEW);
    let mut texts: Vec<(String, Vec<u8>)> = Vec::new();
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    let e = crash(&pool, OLD, &new, Step::Saved(2));
    texts.push(("crash error".into(), format!("{e} {e:?}").into_bytes()));
    texts.push((
        "pair".into(),
        format!("{:?} {}", pool.root().describe(), pool.root().describe()).into_bytes(),
    ));
    drop(pool);
    let state = RootRotationState::load(&fx.dir).unwrap().unwrap();
    texts.push(("state".into(), format!("{state:?}").into_bytes()));
    texts.extend(all_files(&fx.dir));
    let pool = Pool::open(&fx.dir, &pass(OLD), &profile()).unwrap();
    texts.push(("reopened pair".into(), pool.root().describe().into_bytes()));
    // The new root key, as the record holds it.
    let new_root = state.new_root(pool.root().as_ref()).unwrap().unwrap();
    let new_root = new_root.expose().to_vec();
    let e = state
        .new_root(&crate::keys::root::test_support::MemoryProvider::new())
        .unwrap_err();
    texts.push(("unwrap error".into(), format!("{e} {e:?}").into_bytes()));
    rotate(&pool, OLD, &new, 1).unwrap();
    texts.push(("final provider".into(), pool.root().describe().into_bytes()));
    drop(pool);
    let e = Pool::open(&fx.dir, &pass(OLD), &profile()).err().unwrap();
    texts.push((
        "old passphrase refused".into(),
        format!("{e} {e:?}").into_bytes(),
    ));
    texts.extend(all_files(&fx.dir));

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("old passphrase".into(), OLD.as_bytes().to_vec()),
        ("new passphrase".into(), NEW.as_bytes().to_vec()),
    ];
    for (what, k) in [("old root", &old_root), ("new root", &new_root)] {
        use base64ct::{Base64, Encoding};
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        needles.push((format!("{what} raw"), k.to_vec()));
        needles.push((format!("{what} hex"), hex.as_bytes()[..16].to_vec()));
        needles.push((format!("{what} HEX"), hex[..16].to_uppercase().into_bytes()));
        needles.push((
            format!("{what} base64"),
            Base64::encode_string(k).as_bytes()[..12].to_vec(),
        ));
    }
    assert_ne!(old_root, new_root);
    // The scan can fail: each needle is found where it is known to be.
    let ac = aho_corasick::AhoCorasick::new(needles.iter().map(|(_, n)| n)).unwrap();
    for (_, n) in &needles {
        assert!(ac.is_match(&[b"x".as_slice(), n, b"y"].concat()));
    }
    let mut hits = Vec::new();
    for (what, hay) in &texts {
        for m in ac.find_overlapping_iter(hay.as_slice()) {
            hits.push(format!(
                "{} found in {what}",
                needles[m.pattern().as_usize()].0
            ));
        }
    }
    assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
    assert!(
        texts.len() > 20,
        "files and messages to scan: {}",
        texts.len()
    );
}
