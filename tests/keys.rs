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
    let mut child = std::process::Command::new(keyturn_bin())
        .args([
            "keys",
            "rotate-kek",
            "--zone",
            "z1",
            "--batch",
            "1",
            "--pause-ms",
            "5000",
            "--pool",
        ])
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(&pool.pass_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let keyfile = pool.path().join("keys/zone-1.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&keyfile).unwrap_or_default();
        if text.contains("\"z1-kek-v2\"") && text.contains("\"wrapped_by_kek\": 2") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation never reached its first batch"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

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
    let audit = run_ok(
        keyturn_bin().to_str().unwrap(),
        &["audit", "verify", "--pool", pool.path().to_str().unwrap()],
    );
    assert!(audit.contains("chain intact"), "{audit}");
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    assert!(
        log.contains("\"kek.rotate\"") && log.contains("\"key.destroy\""),
        "{log}"
    );
}

/// `keys destroy` / `keys compromise`: SP 800-57 transitions only, and a
/// DEK is destroyed only when the block map says nothing uses it.
#[test]
fn destroy_and_compromise_follow_the_rules_and_the_block_map() {
    use keyturn::keys::passphrase::Passphrase;
    use keyturn::keys::sealed::SealedFileProvider;
    use keyturn::keys::zone_keys::ZoneKeyFile;
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

    // A rotation at key level (the flip itself comes with the rotation
    // issue): DEK v2 active, v1 decrypt-only and still protecting the one (deduplicated) block.
    let pass = Passphrase::new(pool.passphrase.clone()).unwrap();
    let root = SealedFileProvider::open(&pool.path().join("keys/root.sealed"), &pass).unwrap();
    let path = pool.path().join("keys/zone-1.json");
    let mut file = ZoneKeyFile::load(&path).unwrap();
    file.add_dek_version(&root).unwrap();
    file.flip_dek().unwrap();
    file.save(&path).unwrap();

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
