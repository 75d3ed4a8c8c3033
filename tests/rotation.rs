//! DEK rotation through the real binary: window, staging, flip, migration,
//! destroy, abort, emergency, faults, crashes and scrub, with fio, qemu-io
//! and nbdcopy checking the data at every step.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Sets `key = value` in `[rotation]` of the pool's pool.toml.
fn set_rotation(pool: &TestPool, settings: &[(&str, &str)]) {
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let rot = doc
        .entry("rotation")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap();
    for (k, v) in settings {
        let value = format!("x = {v}").parse::<toml::Table>().unwrap()["x"].clone();
        rot.insert((*k).into(), value);
    }
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
}

fn fast_rotation(pool: &TestPool) {
    set_rotation(pool, &[("grace_secs", "0"), ("batch_blocks", "64")]);
}

fn status(pool: &TestPool) -> Value {
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

fn blocks_under(st: &Value, version: u64) -> u64 {
    st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == version)
        .map_or(0, |k| k["blocks"].as_u64().unwrap())
}

fn key_state(st: &Value, version: u64) -> String {
    st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == version)
        .map_or(String::new(), |k| k["state"].as_str().unwrap().to_string())
}

fn wait_staged(pool: &TestPool) -> Value {
    let mut last = Value::Null;
    wait_until("staging to cover the zone", 60, || {
        last = status(pool);
        last["staged_blocks"] == last["content_blocks"]
    });
    last
}

/// Waits until the rotation to `version` is complete and the old key destroyed.
fn wait_destroyed(pool: &TestPool, old: u64) -> Value {
    let start = Instant::now();
    loop {
        let last = status(pool);
        if last["phase"] == "idle" && key_state(&last, old) == "destroyed" {
            return last;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "timed out waiting for migration and destruction of key v{old}: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `len` bytes of seeded random data at `offset` with qemu-io, and
/// returns them.
fn write_random(uri: &str, dir: &Path, seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let data = pattern_bytes(seed, len);
    let file = write_file(dir, &format!("in-{seed}"), &data);
    // qemu-io writes a file's contents at an offset through the NBD export.
    let cmd = format!("write -s {} {offset} {len}", file.display());
    qio_ok(uri, &[&cmd, "flush"]);
    data
}

/// Reads the whole export with nbdcopy.
fn read_all(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("out-{}", rand_name()));
    run_ok("nbdcopy", &[uri, out.to_str().unwrap()]);
    std::fs::read(&out).unwrap()
}

fn rand_name() -> u64 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A full rotation while fio writes and verifies from three connections:
/// prepare, staging, flip, migration and destroy, with zero verify errors
/// and zero EIO.
#[test]
fn full_rotation_under_fio_verify() {
    require_tool("fio");
    require_tool("qemu-io");
    let pool = TestPool::with_volume("96M");
    fast_rotation(&pool);
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    // Data from before the window, checked at the end.
    let before = write_random(&uri, tmp.path(), 1, 64 * MIB, 4 * MIB as usize);

    let out = tmp.path().join("fio.json");
    let fio_uri = uri.clone();
    let fio_out = out.clone();
    let load = std::thread::spawn(move || fio(&fio_uri, 3, 16 * MIB, 6, &fio_out, &[]));
    std::thread::sleep(Duration::from_millis(500));

    let st = status(&pool);
    assert_eq!(st["phase"], "idle");
    let v1 = st["active_version"].as_u64().unwrap();
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    let st = status(&pool);
    assert_eq!(st["phase"], "window");
    assert_eq!(st["next_version"], v1 + 1);
    wait_staged(&pool);
    assert!(
        !load.is_finished(),
        "fio finished before the flip; the test needs more load"
    );
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let st = status(&pool);
    assert_eq!(st["active_version"], v1 + 1);
    let st = wait_destroyed(&pool, v1);
    assert_eq!(blocks_under(&st, v1), 0);
    let (ok, text) = load.join().unwrap();
    assert!(ok, "fio failed:\n{text}");
    assert!(
        fio_errors(&text).iter().all(|&e| e == 0),
        "fio errors:\n{text}"
    );
    // The data written before the window reads back unchanged.
    let all = read_all(&uri, tmp.path());
    assert!(
        all[(64 * MIB) as usize..(68 * MIB) as usize] == before[..],
        "pre-window data changed"
    );
    // A fresh verify pass over fio's regions on new connections.
    fio_verify(&uri, 3, 16 * MIB, &tmp.path().join("v.json"), "verify pass");
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    for action in [
        "rotation.prepare",
        "rotation.flip",
        "rotation.migrated",
        "key.destroy",
    ] {
        assert!(
            log.contains(&format!("\"{action}\"")),
            "no {action} in the audit log"
        );
    }
    assert!(!server.log_text().contains("integrity check failed"));
}

/// Fully staged: after the pipeline finishes, the flip leaves nothing under
/// the old key. Dedup: 1024 logical blocks of one pattern are one content
/// block, re-encrypted once.
#[test]
fn fully_staged_flip_and_dedup_reencrypt_once() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    fast_rotation(&pool);
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    qio_ok(&uri, &["write -P 0x5a 0 4M", "flush"]);
    let random = write_random(&uri, tmp.path(), 9, 8 * MIB, 2 * MIB as usize);
    let stats: Value =
        serde_json::from_str(&pool.keyturn_ok(&["volume", "stats", "--json"])).unwrap();
    let vol = &stats.as_array().unwrap()[0];
    assert_eq!(vol["mapped_blocks"], 1024 + 512);
    assert_eq!(
        vol["content_blocks"],
        1 + 512,
        "one content block for the repeated pattern"
    );
    assert!(vol["dedup_ratio"].as_f64().unwrap() > 2.9);

    let st = status(&pool);
    assert_eq!(st["content_blocks"], 513);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    let st = wait_staged(&pool);
    assert_eq!(
        st["reencrypted_blocks"], 513,
        "each content block re-encrypted exactly once (not once per logical block): {st}"
    );
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let st = status(&pool);
    assert_eq!(
        blocks_under(&st, 1),
        0,
        "fully staged, nothing is left under v1: {st}"
    );
    assert_eq!(blocks_under(&st, 2), 513);
    qio_ok(&uri, &["read -P 0x5a 0 4M"]);
    let all = read_all(&uri, tmp.path());
    assert!(all[(8 * MIB) as usize..(10 * MIB) as usize] == random[..]);
    let st = wait_destroyed(&pool, 1);
    assert_eq!(
        st["reencrypted_blocks"], 513,
        "destaging copies without re-encrypting: {st}"
    );
    assert_eq!(
        st["staging_used_bytes"], 0,
        "the staging area is free again"
    );
    // The server timed both steps of this cycle.
    for step in ["staging_secs", "migration_secs"] {
        let secs = st[step].as_f64().unwrap_or(-1.0);
        assert!(secs > 0.0 && secs < 600.0, "{step}: {st}");
    }
    qio_ok(&uri, &["read -P 0x5a 0 4M"]);
}

/// Abort discards the staged copies and the next key; an emergency
/// rotation compromises the active key and migrates everything.
#[test]
fn abort_then_emergency_keep_every_block_readable() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    fast_rotation(&pool);
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let data = write_random(&uri, tmp.path(), 3, 0, 3 * MIB as usize);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    wait_staged(&pool);
    // A write during the window, then abort.
    qio_ok(&uri, &["write -P 0x77 16M 1M", "flush"]);
    pool.keyturn_ok(&["rotate", "abort", "--zone", "z1"]);
    let st = status(&pool);
    assert_eq!(st["phase"], "idle");
    assert_eq!(key_state(&st, 2), "destroyed", "{st}");
    assert_eq!(st["staged_blocks"], 0);
    assert_eq!(blocks_under(&st, 1), st["content_blocks"].as_u64().unwrap());
    let all = read_all(&uri, tmp.path());
    assert!(all[..data.len()] == data[..], "data changed by the abort");
    qio_ok(&uri, &["read -P 0x77 16M 1M"]);

    // Emergency: needs a reason; then v1 is compromised, v3 active.
    let o = pool.keyturn(&["rotate", "emergency", "--zone", "z1", "--reason", " "]);
    assert!(!o.status.success());
    pool.keyturn_ok(&[
        "rotate",
        "emergency",
        "--zone",
        "z1",
        "--reason",
        "key seen in a core dump",
    ]);
    let st = status(&pool);
    assert_eq!(st["active_version"], 3);
    assert!(
        ["compromised", "destroyed"].contains(&key_state(&st, 1).as_str()),
        "{st}"
    );
    assert_eq!(st["emergency"], true);
    let st = wait_destroyed(&pool, 1);
    assert_eq!(blocks_under(&st, 3), st["content_blocks"].as_u64().unwrap());
    let all = read_all(&uri, tmp.path());
    assert!(
        all[..data.len()] == data[..],
        "data changed by the emergency rotation"
    );
    qio_ok(&uri, &["read -P 0x77 16M 1M"]);
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    assert!(log.contains("rotation.abort") && log.contains("rotation.emergency"));
    assert!(
        log.contains("key seen in a core dump"),
        "the reason is in the audit log"
    );
    let keys = std::fs::read_to_string(pool.path().join("keys/zone-1.json")).unwrap();
    let v1 = keys
        .split("\"id\"")
        .find(|r| r.contains("z1-dek-v1"))
        .unwrap();
    assert!(
        v1.contains("destroyed") && !v1.contains("\"wrapped\""),
        "v1 crypto-erased: {v1}"
    );
}

/// A staging device that fails every write is refused before a window
/// opens; a staging area too small for the data: writes are still
/// acknowledged, counted as unstaged, and the rotation completes through
/// migration with no data lost.
#[test]
fn staging_faults_and_a_full_staging_area_still_complete() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    for case in ["eio", "full"] {
        let pool = TestPool::with_volume("64M");
        fast_rotation(&pool);
        if case == "full" {
            set_rotation(
                &pool,
                &[("staging_capacity_mib", "1"), ("staging_reserve_mib", "0")],
            );
        }
        let server = if case == "eio" {
            pool.serve_env(&[], &[("KEYTURN_FAULTS", "staging:fail-writes")])
        } else {
            pool.serve()
        };
        let uri = server.uri("vol0");
        let tmp = tempfile::tempdir().unwrap();
        let a = write_random(&uri, tmp.path(), 11, 0, 2 * MIB as usize);
        if case == "eio" {
            // A staging device that cannot be written is found before a
            // window opens (rotation/probe.rs): the start is refused clearly
            // and the volume goes on serving its data.
            let o = pool.keyturn(&["rotate", "prepare", "--zone", "z1"]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("staging device cannot be written"),
                "{err}"
            );
            assert_eq!(status(&pool)["phase"], "idle");
            let all = read_all(&uri, tmp.path());
            assert!(all[..a.len()] == a[..], "{case}: data after the refusal");
            continue;
        }
        pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
        // Writes in the window: acknowledged whatever staging does.
        let b = write_random(&uri, tmp.path(), 12, 8 * MIB, 4 * MIB as usize);
        std::thread::sleep(Duration::from_secs(1));
        let st = status(&pool);
        if case == "eio" {
            assert!(
                st["errors"].as_u64().unwrap() >= 1024,
                "staging faults counted: {st}"
            );
            assert_eq!(st["staged_blocks"], 0, "{st}");
        } else {
            assert!(
                st["unstaged_writes"].as_u64().unwrap() > 0,
                "unstaged writes counted: {st}"
            );
            assert!(st["staging_used_bytes"].as_u64().unwrap() <= MIB, "{st}");
        }
        pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
        let st = wait_destroyed(&pool, 1);
        assert_eq!(
            blocks_under(&st, 2),
            st["content_blocks"].as_u64().unwrap(),
            "{case}: {st}"
        );
        let all = read_all(&uri, tmp.path());
        assert!(all[..a.len()] == a[..], "{case}: data before the window");
        assert!(
            all[(8 * MIB) as usize..(12 * MIB) as usize] == b[..],
            "{case}: data written in the window"
        );
    }
}

/// kill -9 during the window, right after the flip, during migration and
/// during the grace period; after each restart every byte verifies and the
/// rotation carries on from where it was.
#[test]
fn crashes_during_a_rotation_lose_nothing_and_resume() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("64M");
    set_rotation(
        &pool,
        &[
            ("grace_secs", "3"),
            ("batch_blocks", "16"),
            ("rate_mib_s", "4"),
            ("cpu_share", "0.05"),
            ("idle_after_ms", "600000"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let data = write_random(&uri, tmp.path(), 21, 0, 16 * MIB as usize);
    let check = |uri: &str, ctx: &str| {
        let all = read_all(uri, tmp.path());
        assert!(all[..data.len()] == data[..], "{ctx}: data differs");
    };

    // 1. During the window (throttled, so staging is partial).
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    std::thread::sleep(Duration::from_millis(700));
    let st = status(&pool);
    let staged = st["staged_blocks"].as_u64().unwrap();
    assert!(
        staged < st["content_blocks"].as_u64().unwrap(),
        "staging should still be running: {st}"
    );
    // A client's FLUSH makes the pipeline's records so far durable too (one
    // journal); staged copies recorded after it may be lost, and re-staged.
    qio_ok(&uri, &["flush"]);
    server.kill9();
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    check(&uri, "after a crash in the window");
    let st = status(&pool);
    assert_eq!(st["phase"], "window", "{st}");
    assert!(
        st["staged_blocks"].as_u64().unwrap() >= staged,
        "flushed staged copies survive: {st}"
    );

    // 2. Right after the flip.
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    server.kill9();
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    check(&uri, "after a crash right after the flip");
    let st = status(&pool);
    assert_eq!(st["active_version"], 2, "the flip survived: {st}");
    assert!(
        st["phase"] == "migrating" || st["phase"] == "grace" || st["phase"] == "idle",
        "{st}"
    );
    assert_eq!(key_state(&st, 2), "active");

    // 3. During migration (throttled).
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    check(&uri, "after a crash during migration");

    // 4. During the grace period, then let it finish.
    set_rotation(
        &pool,
        &[
            ("rate_mib_s", "0"),
            ("cpu_share", "1.0"),
            ("idle_after_ms", "0"),
        ],
    );
    server.kill9();
    let mut server = pool.serve();
    let _uri = server.uri("vol0");
    wait_until("grace", 60, || status(&pool)["phase"] == "grace");
    server.kill9();
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    check(&uri, "after a crash in the grace period");
    let st = wait_destroyed(&pool, 1);
    assert_eq!(blocks_under(&st, 2), st["content_blocks"].as_u64().unwrap());
    check(&uri, "at the end");
    assert!(server.stop());
    // The tables agree with each other: no leaked or doubly used slot.
    pool.keyturn_ok(&["check"]);
}

/// Scrub reads every copy and names a damaged block by volume and LBA.
#[test]
fn scrub_reports_a_damaged_block_by_volume_and_lba() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    write_random(&uri, tmp.path(), 5, 0, 64 * 4096);
    let out = pool.keyturn_ok(&["scrub", "--zone", "z1", "--json"]);
    let st: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(st["checked"], 64);
    assert_eq!(st["bad"].as_array().unwrap().len(), 0);
    assert!(server.stop());

    // Flip one bit of one data slot.
    let path = pool.path().join("data");
    let mut data = std::fs::read(&path).unwrap();
    let slot = (0..data.len() / 4096)
        .filter(|s| data[s * 4096..(s + 1) * 4096].iter().any(|&b| b != 0))
        .nth(10)
        .unwrap();
    data[slot * 4096 + 17] ^= 0x10;
    std::fs::write(&path, &data).unwrap();

    let _server = pool.serve();
    let o = pool.keyturn(&["scrub", "--zone", "z1", "--json"]);
    assert!(
        !o.status.success(),
        "a scrub that found damage exits non-zero"
    );
    let st: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let bad = st["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{st}");
    assert_eq!(bad[0]["volume"], "vol0");
    assert!(bad[0]["lba"].as_u64().unwrap() < 64);
    assert_eq!(bad[0]["copy"], "data");
    assert!(bad[0]["reason"].as_str().unwrap().contains("integrity"));
}

/// Issue 3: a KEK rotation through the running server while fio writes and
/// verifies: only wrapped keys change, and no I/O fails.
#[test]
fn kek_rotation_while_serving_under_fio() {
    require_tool("fio");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fio.json");
    let (u, o) = (uri.clone(), out.clone());
    let load = std::thread::spawn(move || fio(&u, 2, 8 * MIB, 4, &o, &[]));
    std::thread::sleep(Duration::from_millis(500));
    let before = std::fs::read_to_string(pool.path().join("keys/zone-1.json")).unwrap();
    pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    assert!(!load.is_finished(), "fio finished before the KEK rotation");
    let after = std::fs::read_to_string(pool.path().join("keys/zone-1.json")).unwrap();
    assert_ne!(before, after);
    assert!(after.contains("z1-kek-v2"));
    let (ok, text) = load.join().unwrap();
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "fio:\n{text}"
    );
    fio_verify(&uri, 2, 8 * MIB, &tmp.path().join("v.json"), "verify pass");
}

/// Dedup is per zone and can be turned off: a zone without it stores every
/// logical block's copy, and turning it on shares new writes again.
#[test]
fn dedup_can_be_turned_off_per_zone() {
    require_tool("qemu-io");
    let pool = TestPool::new();
    pool.keyturn_ok(&["zone", "create", "plain", "--no-dedup"]);
    pool.keyturn_ok(&["zone", "create", "shared"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "plain", "--size", "16M", "a"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "shared", "--size", "16M", "b"]);
    let list = pool.keyturn_ok(&["zone", "list", "--json"]);
    assert!(
        list.contains("\"dedup\": false") && list.contains("\"dedup\": true"),
        "{list}"
    );
    let mut server = pool.serve();
    for v in ["a", "b"] {
        qio_ok(&server.uri(v), &["write -P 0x33 0 1M", "flush"]);
    }
    assert!(server.stop());
    let stats = |name: &str| -> Value {
        let all: Value =
            serde_json::from_str(&pool.keyturn_ok(&["volume", "stats", "--json"])).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        stats("a")["content_blocks"],
        256,
        "no dedup: one content block per block"
    );
    assert_eq!(stats("b")["content_blocks"], 1, "dedup: one content block");
    // Never across zones: the same pattern in two zones is two sets of blocks.
    pool.keyturn_ok(&["zone", "set-dedup", "plain", "on"]);
    let server = pool.serve();
    qio_ok(
        &server.uri("a"),
        &["write -P 0x44 4M 1M", "flush", "read -P 0x33 0 1M"],
    );
    drop(server);
    assert_eq!(
        stats("a")["content_blocks"],
        257,
        "dedup on again for new writes"
    );
    let audit = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    assert!(audit.contains("zone.dedup.off") && audit.contains("zone.dedup.on"));
}

/// Pause holds the pipeline still, resume finishes it, and a window opened
/// with `--window` flips by itself when it ends.
#[test]
fn pause_resume_and_a_scheduled_flip() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    set_rotation(
        &pool,
        &[
            ("grace_secs", "0"),
            ("batch_blocks", "16"),
            ("rate_mib_s", "2"),
            ("idle_after_ms", "600000"),
        ],
    );
    let server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let data = write_random(&uri, tmp.path(), 31, 0, 4 * MIB as usize);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1", "--window", "4s"]);
    let st = status(&pool);
    let flip_at = st["flip_at_unix"].as_u64().expect("a scheduled flip");
    assert!(
        flip_at >= st["window_opened_unix"].as_u64().unwrap() + 3,
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(300));
    pool.keyturn_ok(&["rotate", "pause", "--zone", "z1"]);
    let paused = status(&pool);
    assert_eq!(paused["phase"], "paused");
    std::thread::sleep(Duration::from_millis(800));
    let later = status(&pool);
    assert_eq!(
        paused["staged_blocks"], later["staged_blocks"],
        "staging went on while paused"
    );
    assert!(
        later["staged_blocks"].as_u64().unwrap() < 1024,
        "the throttle should keep staging partial: {later}"
    );
    pool.keyturn_ok(&["rotate", "resume", "--zone", "z1"]);
    assert_eq!(status(&pool)["phase"], "window");
    // The flip comes by itself once the window ends.
    wait_until("the scheduled flip", 30, || {
        status(&pool)["active_version"] == 2
    });
    let st = wait_destroyed(&pool, 1);
    assert_eq!(blocks_under(&st, 2), st["content_blocks"].as_u64().unwrap());
    let all = read_all(&uri, tmp.path());
    assert!(all[..data.len()] == data[..]);
    // Flip without a window, abort without a window: clear conflicts.
    let o = pool.keyturn(&["rotate", "flip", "--zone", "z1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no open rotation window"));
    let o = pool.keyturn(&["rotate", "prepare", "--zone", "nope"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
}
