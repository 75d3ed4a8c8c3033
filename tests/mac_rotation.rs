//! MAC key rotation through the real binary (issue 15, item 6): under
//! duplicated writes the dedup ratio holds across the rotation, a kill -9
//! in the middle of the re-tag pass resumes, the old MAC key is destroyed
//! at the end, and every block verifies (fio verify and qemu-io patterns).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn set_rotation(pool: &TestPool, key: &str, value: &str) {
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let rot = doc
        .entry("rotation")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap();
    rot.insert(key.into(), value.parse::<i64>().unwrap().into());
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
}

fn mac_status(pool: &TestPool) -> Value {
    keyturn_json(pool, &["mac", "status", "--zone", "z1", "--json"])
}

/// (mapped blocks, content blocks) of vol0.
fn stats(pool: &TestPool) -> (u64, u64) {
    let v = keyturn_json(pool, &["volume", "stats", "--json"]);
    let v = v
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol0")
        .unwrap()
        .clone();
    (
        v["mapped_blocks"].as_u64().unwrap(),
        v["content_blocks"].as_u64().unwrap(),
    )
}

fn key_state(pool: &TestPool, id: &str) -> String {
    let rows = keyturn_json(pool, &["keys", "list", "--json"]);
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .map_or("absent".into(), |r| r["state"].as_str().unwrap().into())
}

fn fio_region(uri: &str, out: &std::path::Path, verify_only: bool) {
    let mut extra = vec!["--offset=32M"];
    if verify_only {
        extra.push("--verify_only");
    }
    let (ok, text) = fio(uri, 2, 8 * MIB, 1, out, &extra);
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "fio (verify_only {verify_only}):\n{text}"
    );
}

#[test]
fn mac_rotation_under_duplicated_writes_with_kill9_mid_retag() {
    require_tool("fio");
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    // One batch of 64 blocks per 100 ms tick: the pass takes seconds, so
    // the kill below lands in its middle.
    set_rotation(&pool, "batch_blocks", "64");
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    // Duplicated content (two patterns, 12 MiB) and 16 MiB that fio
    // writes with its verification headers at 32M..48M.
    qio_ok(
        &uri,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 4M 4M",
            "write -P 0x11 8M 4M",
            "flush",
        ],
    );
    fio_region(&uri, &tmp.path().join("w.json"), false);
    let (mapped0, content0) = stats(&pool);
    assert_eq!(content0, 2 + 4096, "two patterns and fio's blocks");
    assert_eq!(mapped0, 3 * 1024 + 4096);

    let st = keyturn_json(&pool, &["mac", "rotate", "--zone", "z1", "--json"]);
    assert_eq!(st["active_version"], 2, "{st}");
    assert_eq!(st["retiring_versions"], serde_json::json!([1]), "{st}");
    assert_eq!(key_state(&pool, "z1-mac-v2"), "active");
    assert_eq!(key_state(&pool, "z1-mac-v1"), "decrypt-only");
    // Copies of content still tagged under v1 share it.
    qio_ok(
        &uri,
        &["write -P 0x22 12M 4M", "write -P 0x11 16M 4M", "flush"],
    );
    assert_eq!(
        stats(&pool),
        (mapped0 + 2048, content0),
        "dedup across the rotation"
    );

    // kill -9 once the pass is part-way.
    let start = Instant::now();
    let mut at_kill = Value::Null;
    while start.elapsed() < Duration::from_secs(60) {
        at_kill = mac_status(&pool);
        if at_kill["blocks_active"].as_u64().unwrap() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();
    assert!(
        at_kill["blocks_retiring"].as_u64().unwrap() > 0,
        "the pass ended before the kill: {at_kill}"
    );
    let server = pool.serve();
    let uri = server.uri("vol0");
    let resumed = mac_status(&pool);
    assert_eq!(
        resumed["retiring_versions"],
        serde_json::json!([1]),
        "{resumed}"
    );
    assert!(
        resumed["blocks_active"].as_u64() >= at_kill["blocks_active"].as_u64(),
        "re-tagged blocks stay re-tagged: {at_kill} then {resumed}"
    );
    let start = Instant::now();
    let mut last = resumed;
    while last["retiring_versions"] != serde_json::json!([]) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the re-tag pass did not finish: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
        last = mac_status(&pool);
    }
    assert_eq!(last["blocks_retiring"], 0, "{last}");
    assert_eq!(last["blocks_active"], content0, "{last}");
    assert_eq!(key_state(&pool, "z1-mac-v1"), "destroyed");
    assert_eq!(
        stats(&pool),
        (mapped0 + 2048, content0),
        "dedup ratio unchanged"
    );
    // Every block verifies.
    fio_region(&uri, &tmp.path().join("v.json"), true);
    qio_ok(
        &uri,
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 4M",
            "read -P 0x11 8M 4M",
            "read -P 0x22 12M 4M",
            "read -P 0x11 16M 4M",
        ],
    );
    // New copies match under the new key.
    qio_ok(&uri, &["write -P 0x22 20M 4M", "flush"]);
    assert_eq!(stats(&pool), (mapped0 + 3072, content0));
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    assert!(
        log.contains("\"mac.rotate\"") && log.contains("z1-mac-v1"),
        "audited"
    );
}
