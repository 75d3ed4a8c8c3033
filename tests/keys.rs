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
        dek["content_blocks"], 1280,
        "4 MiB + 1 MiB of data in 4 KiB blocks: {dek}"
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

    let rows: serde_json::Value =
        serde_json::from_str(&pool.keyturn_ok(&["keys", "list", "--json"])).unwrap();
    let get = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
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
