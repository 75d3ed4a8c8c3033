//! Key inspection and KEK rotation through the real binary.

mod common;

use common::*;

fn sha(path: &std::path::Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `keys list --json`, by key id.
fn key_rows(pool: &TestPool) -> std::collections::HashMap<String, serde_json::Value> {
    let rows: serde_json::Value =
        serde_json::from_str(&pool.keyturn_ok(&["keys", "list", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

#[test]
fn kek_rotation_rewraps_keys_and_leaves_data_untouched() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(
        &uri,
        &["write -P 0x6b 0 4M", "write -P 0x2c 8M 1M", "flush"],
    );
    assert!(server.stop());

    let list = pool.keyturn_ok(&["keys", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    let dek = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "z1-dek-v1")
        .unwrap();
    assert_eq!(dek["state"], "active");
    assert_eq!(dek["wrapped_by_kek"], 1);
    assert_eq!(
        dek["content_blocks"], 2,
        "4 MiB + 1 MiB of two patterns: dedup stores each 4 KiB block once: {dek}"
    );

    let data = pool.path().join("data");
    let map = pool.path().join("tables").join("vol-1.map");
    let cb = pool.path().join("tables").join("zone-1.cb");
    let before = [sha(&data), sha(&map), sha(&cb)];
    let keyfile = std::fs::read_to_string(pool.path().join("keys/zone-1.json")).unwrap();

    let out = pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1", "--batch", "1"]);
    assert!(
        out.contains("KEK v2 active") && out.contains("2 keys re-wrapped"),
        "{out}"
    );
    assert_eq!(
        [sha(&data), sha(&map), sha(&cb)],
        before,
        "a KEK rotation must not touch volume data or the map"
    );
    let after = std::fs::read_to_string(pool.path().join("keys/zone-1.json")).unwrap();
    assert_ne!(keyfile, after, "the wrapped keys changed");

    let rows = key_rows(&pool);
    let get = |id: &str| rows[id].clone();
    assert_eq!(get("z1-kek-v1")["state"], "destroyed");
    assert_eq!(get("z1-kek-v2")["state"], "active");
    assert_eq!(get("z1-dek-v1")["wrapped_by_kek"], 2);
    assert_eq!(get("z1-mac-v1")["wrapped_by_kek"], 2);
    let show = pool.keyturn_ok(&["keys", "show", "z1-kek-v1"]);
    assert!(show.contains("destroyed_unix"), "{show}");

    // The data still reads back under the re-wrapped keys.
    let server = pool.serve();
    qio_ok(
        &server.uri("vol0"),
        &["read -P 0x6b 0 4M", "read -P 0x2c 8M 1M", "read -P 0 4M 4M"],
    );
    let bad = pool.keyturn(&["keys", "rotate-kek", "--zone", "nope"]);
    assert!(
        !bad.status.success(),
        "the pool is in use, or the zone does not exist"
    );
}

#[test]
fn key_listing_filters_by_zone_and_rejects_unknown() {
    let pool = TestPool::with_volume("16M");
    pool.keyturn_ok(&["zone", "create", "z2"]);
    let text = pool.keyturn_ok(&["keys", "list", "--zone", "z2"]);
    assert!(
        text.contains("z2-dek-v1") && !text.contains("z1-dek-v1"),
        "{text}"
    );
    let out = pool.keyturn(&["keys", "list", "--zone", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no zone named"));
    let out = pool.keyturn(&["keys", "show", "z9-dek-v1"]);
    assert!(!out.status.success());
}

#[test]
fn kek_rotation_killed_mid_rewrap_resumes_and_keeps_every_key_readable() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x71 0 2M", "flush"]);
    assert!(server.stop());

    // One key per batch and a long pause: the kill lands between two atomic
    // saves, with the DEK re-wrapped under KEK v2 and the MAC key not yet.
    let mut child = pool.spawn_keyturn(&[
        "keys",
        "rotate-kek",
        "--zone",
        "z1",
        "--batch",
        "1",
        "--pause-ms",
        "5000",
    ]);
    kill_when_file(&mut child, &pool.path().join("keys/zone-1.json"), |text| {
        text.contains("\"z1-kek-v2\"") && text.contains("\"wrapped_by_kek\": 2")
    });

    // Half re-wrapped: KEK v2 is pre-active, and the pool still opens and serves.
    let rows = key_rows(&pool);
    let get = |id: &str| rows[id].clone();
    assert_eq!(get("z1-kek-v2")["state"], "pre-active");
    assert_eq!(get("z1-kek-v1")["state"], "active");
    let wrapped_by: Vec<u64> = ["z1-dek-v1", "z1-mac-v1"]
        .iter()
        .map(|id| get(id)["wrapped_by_kek"].as_u64().unwrap())
        .collect();
    assert!(
        wrapped_by.contains(&1) && wrapped_by.contains(&2),
        "one key re-wrapped, one not: {wrapped_by:?}"
    );
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), &["read -P 0x71 0 2M"]);
    assert!(server.stop());

    // Running it again finishes the same rotation: no KEK v3.
    let out = pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    assert!(
        out.contains("KEK v2 active")
            && out.contains("(resumed)")
            && out.contains("1 keys re-wrapped"),
        "{out}"
    );
    assert!(!key_rows(&pool).contains_key("z1-kek-v3"));
    let server = pool.serve();
    qio_ok(
        &server.uri("vol0"),
        &["read -P 0x71 0 2M", "read -P 0 2M 2M"],
    );
    // The audit chain holds the failed-then-resumed rotation.
    audited(&pool, &["kek.rotate", "key.destroy"]);
}

/// Checks the audit chain is intact and records each of `actions`;
/// returns the log.
fn audited(pool: &TestPool, actions: &[&str]) -> String {
    let audit = run_ok(
        keyturn_bin().to_str().unwrap(),
        &["audit", "verify", "--pool", pool.path().to_str().unwrap()],
    );
    assert!(audit.contains("chain intact"), "{audit}");
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    for a in actions {
        assert!(
            log.contains(&format!("\"action\":\"{a}\"")),
            "no {a} in {log}"
        );
    }
    log
}

/// `keys destroy` / `keys compromise`: SP 800-57 transitions only, and a
/// DEK is destroyed only when the block map says nothing uses it.
#[test]
fn destroy_and_compromise_follow_the_rules_and_the_block_map() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x41 0 1M", "flush"]);
    assert!(server.stop());

    let err = |args: &[&str]| {
        let out = pool.keyturn(args);
        assert!(!out.status.success(), "{args:?} should be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["keys", "destroy", "z1-dek-v1"]).contains("cannot go from active to destroyed"));
    assert!(err(&["keys", "compromise", "z1-dek-v1"]).contains("exactly one active DEK"));
    assert!(err(&["keys", "destroy", "z1-kek-v1"]).contains("cannot go from active to destroyed"));
    assert!(err(&["keys", "destroy", "z1-dek-v7"]).contains("no key named"));

    // A rotation whose migration is paused right after its flip: DEK v2
    // active, v1 decrypt-only and still protecting the one (deduplicated)
    // block.
    let path = pool.path().join("keys/zone-1.json");
    let server = pool.serve();
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    pool.keyturn_ok(&["rotate", "pause", "--zone", "z1"]);
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    drop(server);

    let e = err(&["keys", "destroy", "z1-dek-v1"]);
    assert!(
        e.contains("1 content blocks are still encrypted under it"),
        "{e}"
    );
    // Overwrite the data: the new blocks are under v2, v1 protects nothing.
    let mut server = pool.serve();
    qio_ok(
        &server.uri("vol0"),
        &["read -P 0x41 0 1M", "write -P 0x42 0 1M", "flush"],
    );
    assert!(server.stop());
    let rows = key_rows(&pool);
    let blocks = |id: &str| rows[id]["content_blocks"].clone();
    assert_eq!(
        (blocks("z1-dek-v1"), blocks("z1-dek-v2")),
        (0.into(), 1.into())
    );
    let out = pool.keyturn_ok(&["keys", "destroy", "z1-dek-v1"]);
    assert!(out.contains("now destroyed"), "{out}");
    let text = std::fs::read_to_string(&path).unwrap();
    let v1 = text
        .split("\"id\"")
        .find(|r| r.contains("z1-dek-v1"))
        .unwrap();
    assert!(
        !v1.contains("\"wrapped\""),
        "the wrapped bytes are erased: {v1}"
    );
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &["read -P 0x42 0 1M"]);
    drop(server);
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    assert!(
        log.contains("\"key.destroy\"") && log.contains("\"failed\"") && log.contains("\"ok\""),
        "{log}"
    );
}

/// `keyturn ARGS --pool DIR --passphrase-file FILE`.
fn keyturn_with_pass(
    pool: &TestPool,
    pass_file: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(keyturn_bin())
        .args(args)
        .arg("--pool")
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(pass_file)
        .env_remove("KEYTURN_PASSPHRASE")
        .env_remove("KEYTURN_NEW_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn assert_wrong_passphrase(out: &std::process::Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("wrong passphrase for root key file"),
        "expected a wrong-passphrase refusal:\n{err}"
    );
}

/// The sealed root key file pool.toml names.
fn root_file(pool: &TestPool) -> String {
    let toml = std::fs::read_to_string(pool.path().join("pool.toml")).unwrap();
    let v: toml::Value = toml::from_str(&toml).unwrap();
    v["root_key"]["path"].as_str().unwrap().to_string()
}

/// A pool with zones z1 (volume vol0, 32 MiB, written by `qemu_cmds`) and
/// z2: two KEKs for a root key rotation to re-wrap.
fn two_zone_pool(qemu_cmds: &[&str]) -> TestPool {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("32M");
    pool.keyturn_ok(&["zone", "create", "z2"]);
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), qemu_cmds);
    assert!(server.stop());
    pool
}

#[test]
fn root_rotation_sealed_file_keeps_data_and_retires_the_old_passphrase() {
    use keyturn::keys::passphrase::Passphrase;
    use keyturn::keys::sealed::SealedFileProvider;
    use keyturn::keys::zone_keys::ZoneKeyFile;
    let pool = two_zone_pool(&["write -P 0x3c 0 2M", "write -P 0xc3 16M 1M", "flush"]);

    // An open after the server checkpoints the journal into the tables;
    // the checksums are taken after that.
    pool.keyturn_ok(&["keys", "list"]);
    let data = pool.path().join("data");
    let map = pool.path().join("tables").join("vol-1.map");
    let before = [sha(&data), sha(&map)];
    let backup = pool.dir.path().join("root.sealed.backup");
    std::fs::copy(pool.path().join("keys/root.sealed"), &backup).unwrap();
    let old_pass_file = pool.dir.path().join("old-passphrase");
    std::fs::copy(&pool.pass_file, &old_pass_file).unwrap();
    let new_pass = "the new root passphrase";
    let new_file = write_file(pool.dir.path(), "new-passphrase", new_pass.as_bytes());

    let out = pool.keyturn_ok(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_file.to_str().unwrap(),
        "--batch",
        "1",
    ]);
    assert!(
        out.contains("root key rotated: sealed-file:keys/root.sealed -> sealed-file:keys/root-")
            && out.contains("2 KEKs re-wrapped")
            && out.contains("old root key destroyed"),
        "{out}"
    );
    assert_eq!(
        [sha(&data), sha(&map)],
        before,
        "volume data and map untouched"
    );
    assert!(
        !pool.path().join("keys/root.sealed").exists(),
        "old sealed file gone"
    );
    assert!(!pool.path().join("keys/root-rotation.json").exists());
    let new_root = root_file(&pool);
    assert!(
        new_root.starts_with("keys/root-") && pool.path().join(&new_root).exists(),
        "{new_root}"
    );

    // The old passphrase no longer opens the pool; the new one does.
    assert_wrong_passphrase(&pool.keyturn(&["keys", "list"]));
    std::fs::write(&pool.pass_file, new_pass).unwrap();
    let rows = key_rows(&pool);
    for id in ["z1-kek-v1", "z2-kek-v1"] {
        assert_eq!(
            rows[id]["wrapped_by_root"],
            format!("sealed-file:{new_root}"),
            "{id}: {}",
            rows[id]
        );
    }
    let server = pool.serve();
    qio_ok(
        &server.uri("vol0"),
        &[
            "read -P 0x3c 0 2M",
            "read -P 0xc3 16M 1M",
            "read -P 0 2M 1M",
        ],
    );
    drop(server);

    // A backup of the old file, with the old passphrase, unwraps nothing.
    let old = SealedFileProvider::open(&backup, &Passphrase::new(pool.passphrase.clone()).unwrap())
        .unwrap();
    for z in 1..=2 {
        let f = ZoneKeyFile::load(&pool.path().join(format!("keys/zone-{z}.json"))).unwrap();
        assert!(
            f.unlock(&old).is_err(),
            "zone {z} unlocked by the old root key"
        );
    }
    // Nothing to resume: a second run starts a new rotation, which the old
    // passphrase cannot.
    assert_wrong_passphrase(&keyturn_with_pass(
        &pool,
        &old_pass_file,
        &[
            "keys",
            "rotate-root",
            "--new-passphrase-file",
            new_file.to_str().unwrap(),
        ],
    ));

    let log = audited(&pool, &["root.rotate", "key.destroy"]);
    let line = |action: &str| {
        log.lines()
            .find(|l| l.contains(&format!("\"action\":\"{action}\"")) && l.contains("\"ok\""))
            .unwrap_or_else(|| panic!("no {action} in {log}"))
            .to_string()
    };
    assert!(line("root.rotate").contains("\"count\":2"), "{log}");
    assert!(
        line("key.destroy").contains("sealed-file:keys/root.sealed"),
        "{log}"
    );
}

#[test]
fn root_rotation_killed_mid_rewrap_resumes_with_both_passphrases_in_their_place() {
    let pool = two_zone_pool(&["write -P 0x5e 0 1M", "flush"]);
    let new_pass = "another new passphrase";
    let new_file = write_file(pool.dir.path(), "new-passphrase", new_pass.as_bytes());

    // One KEK per save and a long pause: the kill lands after zone 1's KEK
    // moved to the new root key and before zone 2's did.
    let mut child = pool.spawn_keyturn(&[
        "keys",
        "rotate-root",
        "--batch",
        "1",
        "--pause-ms",
        "5000",
        "--new-passphrase-file",
        new_file.to_str().unwrap(),
    ]);
    kill_when_file(&mut child, &pool.path().join("keys/zone-1.json"), |text| {
        text.contains("wrapped_by_root")
    });

    // Half done: pool.toml still names the old file, the new passphrase is
    // refused, and the old one opens the pool with every key.
    assert_eq!(root_file(&pool), "keys/root.sealed");
    assert!(pool.path().join("keys/root-rotation.json").exists());
    assert_wrong_passphrase(&keyturn_with_pass(&pool, &new_file, &["keys", "list"]));
    let rows = key_rows(&pool);
    let new_id = rows["z1-kek-v1"]["wrapped_by_root"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(new_id.starts_with("sealed-file:keys/root-"), "{new_id}");
    assert!(
        rows["z2-kek-v1"]["wrapped_by_root"].is_null(),
        "{}",
        rows["z2-kek-v1"]
    );
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), &["read -P 0x5e 0 1M"]);
    assert!(server.stop());

    // The same command again finishes the same rotation.
    let out = pool.keyturn_ok(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_file.to_str().unwrap(),
    ]);
    assert!(
        out.contains("resuming the root key rotation")
            && out.contains("1 KEKs re-wrapped (resumed)")
            && out.contains(&format!("-> {new_id};")),
        "{out}"
    );
    assert_wrong_passphrase(&pool.keyturn(&["keys", "list"]));
    std::fs::write(&pool.pass_file, new_pass).unwrap();
    let server = pool.serve();
    qio_ok(
        &server.uri("vol0"),
        &["read -P 0x5e 0 1M", "read -P 0 1M 1M"],
    );
    drop(server);
    audited(&pool, &["root.rotate", "key.destroy"]);
}

#[test]
fn change_passphrase_reseals_without_rewrapping() {
    let pool = TestPool::with_volume("4M");
    let zone_file = pool.path().join("keys/zone-1.json");
    let before = std::fs::read(&zone_file).unwrap();
    let new_file = write_file(pool.dir.path(), "new-passphrase", b"changed passphrase");
    let old_pass_file = pool.dir.path().join("old-passphrase");
    std::fs::copy(&pool.pass_file, &old_pass_file).unwrap();
    let help = pool.keyturn_ok(&["keys", "change-passphrase", "--help"]);
    assert!(
        help.contains("rotate-root") && help.contains("no KEK is re-wrapped"),
        "{help}"
    );
    let out = pool.keyturn_ok(&[
        "keys",
        "change-passphrase",
        "--new-passphrase-file",
        new_file.to_str().unwrap(),
    ]);
    assert!(out.contains("sealed under the new passphrase"), "{out}");
    assert_eq!(
        std::fs::read(&zone_file).unwrap(),
        before,
        "no KEK re-wrapped"
    );
    assert_eq!(root_file(&pool), "keys/root.sealed", "same file");
    assert_wrong_passphrase(&keyturn_with_pass(&pool, &old_pass_file, &["keys", "list"]));
    let out = keyturn_with_pass(&pool, &new_file, &["keys", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    audited(&pool, &["root.reseal"]);
}

#[test]
fn rotate_root_help_says_what_it_does() {
    let out = std::process::Command::new(keyturn_bin())
        .args(["keys", "rotate-root", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "running server",
        "--new-passphrase-file",
        "--new-key-label",
        "--batch",
        "--approval",
        "change-passphrase",
        "resumes",
    ] {
        assert!(help.contains(want), "{want:?} missing from:\n{help}");
    }
}

const MIB: u64 = 1 << 20;

/// `GET /api/v1/root` of the pool's running server.
fn root_status(pool: &TestPool) -> keyturn::admin::RootStatus {
    keyturn::admin::client::AdminClient::for_pool(&pool.path())
        .unwrap()
        .root_status()
        .unwrap()
}

/// `rotate status --zone ZONE --json`, through the running server.
fn dek_phase(pool: &TestPool, zone: &str) -> String {
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", zone, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["phase"].as_str().unwrap().to_string()
}

/// Zone key files (of zones 1..=zones) with a KEK that names a root key.
fn keks_moved(pool: &TestPool, zones: u32) -> usize {
    (1..=zones)
        .filter(|z| {
            std::fs::read_to_string(pool.path().join(format!("keys/zone-{z}.json")))
                .unwrap()
                .contains("wrapped_by_root")
        })
        .count()
}

/// Root key rotation of a sealed file while the server runs and fio writes
/// and verifies through NBD: no I/O error, no verify error; afterwards the
/// running server makes new keys under the new root key (a KEK rotation, a
/// DEK rotation with its flip and migration); after a restart the new
/// passphrase opens the pool and every byte reads back, the old one is
/// refused, and neither passphrase is in any log or output.
#[test]
fn root_rotation_online_under_fio_then_kek_and_dek_rotations_and_a_restart() {
    require_tool("fio");
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    pool.keyturn_ok(&["zone", "create", "z2"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "16M", "vol1"]);
    let old_pass_file = pool.dir.path().join("old-passphrase");
    std::fs::copy(&pool.pass_file, &old_pass_file).unwrap();
    let new_pass = format!("online-root-pass-{}", std::process::id());
    let new_file = write_file(pool.dir.path(), "new-passphrase", new_pass.as_bytes());
    let mut outputs = String::new();

    let mut server = pool.serve();
    let mut logs = vec![server.log.clone()];
    let (vol0, vol1) = (server.uri("vol0"), server.uri("vol1"));
    qio_ok(
        &vol1,
        &["write -P 0x4d 0 2M", "write -P 0xd4 8M 1M", "flush"],
    );
    let st = root_status(&pool);
    assert_eq!(
        (st.provider.as_str(), st.root_id.as_str()),
        ("sealed-file", "sealed-file:keys/root.sealed")
    );
    assert!(st.rotation.is_none() && !st.busy, "{st:?}");

    let tmp = tempfile::tempdir().unwrap();
    let (u, o) = (vol0.clone(), tmp.path().join("fio.json"));
    let load = std::thread::spawn(move || fio(&u, 2, 8 * MIB, 10, &o, &[]));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = pool.keyturn_ok(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_file.to_str().unwrap(),
        "--batch",
        "1",
        "--pause-ms",
        "200",
    ]);
    assert!(
        !load.is_finished(),
        "fio finished before the root key rotation; the test needs more load"
    );
    outputs.push_str(&out);
    assert!(
        out.contains("through the server at")
            && out.contains(
                "root key rotated: sealed-file:keys/root.sealed -> sealed-file:keys/root-"
            )
            && out.contains("2 KEKs re-wrapped")
            && out.contains("old root key destroyed"),
        "{out}"
    );
    let new_root = root_file(&pool);
    let st = root_status(&pool);
    assert_eq!(st.root_id, format!("sealed-file:{new_root}"));
    assert!(
        st.rotation.is_none() && st.description.contains(&new_root),
        "{st:?}"
    );
    assert!(!pool.path().join("keys/root.sealed").exists());
    assert!(!pool.path().join("keys/root-rotation.json").exists());

    // The running pool goes on making keys, under the new root key: a KEK
    // rotation and a whole DEK rotation of the zone fio is writing to.
    let out = pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    assert!(out.contains("KEK v2 active"), "{out}");
    outputs.push_str(&out);
    outputs.push_str(&pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]));
    outputs.push_str(&pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]));
    let start = std::time::Instant::now();
    while !["grace", "idle"].contains(&dek_phase(&pool, "z1").as_str()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "the DEK rotation never finished migrating"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let (ok, text) = load.join().unwrap();
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "fio:\n{text}"
    );
    // A verify pass over fio's regions on new connections.
    fio_verify(
        &vol0,
        2,
        8 * MIB,
        &tmp.path().join("v1.json"),
        "verify pass",
    );
    qio_ok(
        &vol1,
        &["read -P 0x4d 0 2M", "read -P 0xd4 8M 1M", "read -P 0 2M 6M"],
    );
    assert!(server.stop());

    // The old passphrase is refused, clearly, by every command and by serve.
    assert_wrong_passphrase(&keyturn_with_pass(&pool, &old_pass_file, &["keys", "list"]));
    assert_wrong_passphrase(&keyturn_with_pass(
        &pool,
        &old_pass_file,
        &["serve", "--listen", "127.0.0.1:0"],
    ));
    // The new one opens it: the metadata checks out and every byte reads
    // back.
    std::fs::write(&pool.pass_file, &new_pass).unwrap();
    let out = pool.keyturn_ok(&["check"]);
    assert!(!out.contains("problem"), "{out}");
    let rows = key_rows(&pool);
    assert_eq!(rows["z1-kek-v1"]["state"], "destroyed");
    assert_eq!(rows["z1-kek-v2"]["state"], "active");
    assert_eq!(rows["z1-dek-v2"]["state"], "active");
    assert_eq!(
        rows["z2-kek-v1"]["wrapped_by_root"],
        format!("sealed-file:{new_root}")
    );
    let mut server = pool.serve();
    logs.push(server.log.clone());
    let vol0 = server.uri("vol0");
    fio_verify(
        &vol0,
        2,
        8 * MIB,
        &tmp.path().join("v2.json"),
        "verify after restart",
    );
    qio_ok(
        &server.uri("vol1"),
        &["read -P 0x4d 0 2M", "read -P 0xd4 8M 1M"],
    );
    assert!(server.stop());

    let log = audited(
        &pool,
        &["root.rotate", "key.destroy", "kek.rotate", "rotation.flip"],
    );
    let ok: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"action\":\"root.rotate\"") && l.contains("\"ok\""))
        .collect();
    assert!(ok.len() == 1 && ok[0].contains("\"count\":2"), "{log}");
    // Neither passphrase went through a log or an answer in the clear.
    let mut texts = outputs;
    for l in &logs {
        texts.push_str(&std::fs::read_to_string(l).unwrap());
    }
    assert!(texts.contains("root key rotated"), "the scan has text");
    for (what, p) in [
        ("old", pool.passphrase.as_str()),
        ("new", new_pass.as_str()),
    ] {
        assert!(!texts.contains(p), "the {what} passphrase leaked");
    }
}

/// kill -9 of the server in the middle of an online root key re-wrap: one
/// KEK per save and a long pause, so the kill lands after the first of four
/// KEKs moved. The restarted server opens with the old passphrase (both
/// root keys), serves, rotates a KEK meanwhile (under the new root key), and
/// the same command resumes the rotation through it; then only the new
/// passphrase opens the pool and every byte reads back.
#[test]
fn root_rotation_online_killed_mid_rewrap_resumes_through_the_restarted_server() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("32M");
    for z in ["z2", "z3", "z4"] {
        pool.keyturn_ok(&["zone", "create", z]);
    }
    let new_file = write_file(
        pool.dir.path(),
        "new-passphrase",
        b"resumed online root pass",
    );
    let new = new_file.to_str().unwrap();
    let mut server = pool.serve();
    let reads = ["read -P 0x6e 0 2M", "read -P 0xe6 4M 1M", "read -P 0 2M 2M"];
    qio_ok(
        &server.uri("vol0"),
        &["write -P 0x6e 0 2M", "write -P 0xe6 4M 1M", "flush"],
    );

    let mut cli = pool.spawn_keyturn(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new,
        "--batch",
        "1",
        "--pause-ms",
        "4000",
    ]);
    let start = std::time::Instant::now();
    while keks_moved(&pool, 4) == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the rotation never saved a batch"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Mid re-wrap, as the server sees it.
    let st = root_status(&pool);
    let rot = st.rotation.clone().expect("a rotation in progress");
    assert_eq!(
        (rot.phase.as_str(), rot.keks, rot.keks_rewrapped, st.busy),
        ("rewrap", 4, 1, true),
        "{st:?}"
    );
    assert!(st.description.contains("rotation in progress"), "{st:?}");
    server.kill9();
    assert!(
        !cli.wait().unwrap().success(),
        "the command reports the server's death"
    );
    assert_eq!(keks_moved(&pool, 4), 1, "killed between two saves");
    assert_eq!(root_file(&pool), "keys/root.sealed");
    assert!(pool.path().join("keys/root-rotation.json").exists());

    // The new passphrase does not open the pool yet; the old one does, and
    // the server unwraps with both root keys.
    assert_wrong_passphrase(&keyturn_with_pass(
        &pool,
        &new_file,
        &["serve", "--listen", "127.0.0.1:0"],
    ));
    let mut server = pool.serve();
    qio_ok(&server.uri("vol0"), &reads);
    let st = root_status(&pool);
    let rot = st.rotation.clone().expect("still recorded");
    assert_eq!(
        (rot.phase.as_str(), rot.keks_rewrapped, st.busy),
        ("rewrap", 1, false),
        "{st:?}"
    );
    // A KEK rotation meanwhile: its new KEK is under the new root key
    // already, so nothing is left to re-wrap in that zone.
    let out = pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z3"]);
    assert!(out.contains("KEK v2 active"), "{out}");
    assert_eq!(keks_moved(&pool, 4), 2);

    // The same command resumes the same rotation through the server.
    let out = pool.keyturn_ok(&["keys", "rotate-root", "--new-passphrase-file", new]);
    assert!(
        out.contains("resuming the root key rotation")
            && out.contains("through the server at")
            && out.contains(&format!("-> {};", rot.new_root))
            && out.contains("2 KEKs re-wrapped (resumed)")
            && out.contains("4 KEKs of 4 zones unwrap under the new root key"),
        "{out}"
    );
    qio_ok(&server.uri("vol0"), &reads);
    let st = root_status(&pool);
    assert!(
        st.rotation.is_none() && st.root_id == rot.new_root,
        "{st:?}"
    );
    assert!(server.stop());
    assert!(!pool.path().join("keys/root-rotation.json").exists());
    assert!(!pool.path().join("keys/root.sealed").exists());

    assert_wrong_passphrase(&pool.keyturn(&["keys", "list"]));
    std::fs::copy(&new_file, &pool.pass_file).unwrap();
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &reads);
    drop(server);
    let log = audited(&pool, &["root.rotate", "key.destroy"]);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"action\":\"root.rotate\"") && l.contains("\"ok\""))
            .count(),
        1,
        "{log}"
    );
}
