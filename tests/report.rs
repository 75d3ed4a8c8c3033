//! `keyturn report` over a period with two rotations that completed (a DEK
//! rotation of z1 through flip and migration, a KEK rotation of z1) and one
//! that failed (a DEK rotation of z2, aborted), checked against the audit
//! log: the same rotations, outcomes, event ids and durations, the keys and
//! blocks per version the inventory lists, and the audit chain verified.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn records(pool: &TestPool) -> Vec<Value> {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ms(t: &Value) -> u64 {
    let t = humantime::parse_rfc3339(t.as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn report_lists_rotations_as_the_audit_log_records_them() {
    let pool = TestPool::with_volume("16M");
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x5a 0 4M"]);
    pool.keyturn_ok(&["zone", "create", "z2"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "16M", "vol1"]);

    // Completed: a DEK rotation of z1, flipped and migrated.
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let start = Instant::now();
    while !records(&pool)
        .iter()
        .any(|r| r["action"] == "rotation.migrated")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "migration did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Completed: a KEK rotation of z1.
    pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    // Failed: a DEK rotation of z2, aborted.
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z2"]);
    pool.keyturn_ok(&["rotate", "abort", "--zone", "z2"]);

    let out = pool.keyturn_ok(&["report", "--from", "2020-01-01", "--format", "json"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    let log = records(&pool);
    let by_id = |id: &Value| log.iter().find(|x| x["id"] == *id).unwrap().clone();

    let rots = r["rotations"].as_array().unwrap();
    let summary: Vec<(String, String, String)> = rots
        .iter()
        .map(|x| {
            (
                x["zone"].as_str().unwrap().to_string(),
                x["kind"].as_str().unwrap().to_string(),
                x["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = |z: &str, k: &str, o: &str| (z.to_string(), k.to_string(), o.to_string());
    assert_eq!(
        summary,
        vec![
            want("z1", "dek", "completed"),
            want("z1", "kek", "completed"),
            want("z2", "dek", "aborted"),
        ],
        "{r:#}"
    );
    // Against the log: the DEK rotation's events, in order, and its duration.
    let dek = &rots[0];
    let actions: Vec<String> = dek["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| by_id(id)["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions,
        ["rotation.prepare", "rotation.flip", "rotation.migrated"]
    );
    let (first, last) = (by_id(&dek["events"][0]), by_id(&dek["events"][2]));
    assert_eq!(dek["started"], first["time"]);
    assert_eq!(dek["ended"], last["time"]);
    assert_eq!(
        dek["duration_ms"].as_u64().unwrap(),
        ms(&last["time"]) - ms(&first["time"])
    );
    assert_eq!(dek["key"], "z1-dek-v2");
    // The KEK rotation: its record's duration and new key.
    let kek = by_id(&rots[1]["events"][0]);
    assert_eq!(
        (kek["action"].as_str(), kek["outcome"].as_str()),
        (Some("kek.rotate"), Some("ok"))
    );
    assert_eq!(rots[1]["duration_ms"], kek["duration_ms"]);
    assert_eq!(rots[1]["key"], "z1-kek-v2");
    // The aborted one ends at the abort record.
    let abort = by_id(&rots[2]["events"][1]);
    assert_eq!(abort["action"], "rotation.abort");
    assert_eq!(rots[2]["ended"], abort["time"]);
    // As many rotations of each kind as the log has starts.
    let count = |a: &str| log.iter().filter(|x| x["action"] == a).count();
    assert_eq!(count("rotation.prepare") + count("kek.rotate"), rots.len());

    // Keys and blocks per version match the inventory.
    let keys: Value = serde_json::from_str(&pool.keyturn_ok(&["keys", "list", "--json"])).unwrap();
    let z1 = r["zones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["zone"] == "z1")
        .unwrap();
    for k in keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["zone"] == "z1")
    {
        let mine = z1["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == k["id"])
            .unwrap();
        assert_eq!(mine["state"], k["state"], "{}", k["id"]);
        if k["purpose"] == "dek" && !k["content_blocks"].is_null() {
            assert_eq!(
                z1["blocks_per_version"][k["version"].to_string()],
                k["content_blocks"],
                "{z1}"
            );
        }
    }
    // 4 MiB of one pattern: one content block (dedup), now under v2.
    assert_eq!(
        z1["blocks_per_version"],
        serde_json::json!({"1": 0, "2": 1}),
        "{z1}"
    );
    assert!(
        z1["overdue"].as_array().unwrap().is_empty(),
        "fresh keys are not due: {z1}"
    );
    assert_eq!(r["audit"]["ok"], true, "{}", r["audit"]);
    assert_eq!(r["audit"]["signed"], true);
    assert_eq!(r["audit"]["records"], log.len() as u64);

    // A period after all of it has no rotations; Markdown and HTML say the same.
    let later = pool.keyturn_ok(&["report", "--from", "2100-01-01", "--to", "2100-01-02"]);
    let later: Value = serde_json::from_str(&later).unwrap();
    assert!(later["rotations"].as_array().unwrap().is_empty(), "{later}");
    let md = pool.keyturn_ok(&["report", "--from", "2020-01-01", "--format", "md"]);
    assert!(
        md.contains("| z2 | dek | z2-dek-v2 |") && md.contains("| aborted |"),
        "{md}"
    );
    let html = pool.keyturn_ok(&["report", "--from", "2020-01-01", "--format", "html"]);
    assert!(
        html.contains("<td>aborted</td>") && html.contains("class=\"ok\""),
        "{html}"
    );
}
