//! Rollback after a flip through the real binary (issue 15, item 5): under
//! fio verify, across kill -9 and a restart, and refused after the old key's
//! destruction, for a compromised key, and without approvals where dual
//! control applies.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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

fn status(pool: &TestPool, zone: &str) -> Value {
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", zone, "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

fn key(st: &Value, version: u64) -> (String, u64) {
    st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == version)
        .map_or((String::new(), 0), |k| {
            (
                k["state"].as_str().unwrap().to_string(),
                k["blocks"].as_u64().unwrap(),
            )
        })
}

fn rollback(pool: &TestPool, zone: &str, tokens: &[&Path]) -> Output {
    let mut args = vec!["rotate", "rollback", "--zone", zone];
    for t in tokens {
        args.push("--approval");
        args.push(t.to_str().unwrap());
    }
    pool.keyturn(&args)
}

fn assert_refused(out: &Output, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a refusal ({reason}):\n{err}"
    );
    assert!(err.contains(reason), "expected {reason:?} in:\n{err}");
}

fn audit(pool: &TestPool, action: &str, outcome: &str) -> usize {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("\"{action}\"")) && l.contains(&format!("\"{outcome}\"")))
        .count()
}

/// fio writes and verifies from two connections while the zone is
/// prepared, flipped and rolled back; then the migration back runs, the
/// server is killed with -9 in the middle of it, and after a restart every
/// block fio wrote verifies and nothing is left under the rolled-back key.
#[test]
fn rollback_after_a_flip_under_fio_verify_and_kill9() {
    require_tool("fio");
    let pool = TestPool::with_volume("64M");
    set_rotation(&pool, &[("grace_secs", "3600"), ("batch_blocks", "64")]);
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fio.json");
    let (u, o) = (uri.clone(), out.clone());
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    // Enough loops that fio still writes at the rollback, 1.4 s and two
    // commands in, on a fast host: 6 loops were done by then at about 90k
    // writes a second.
    let load = std::thread::spawn(move || fio(&u, 2, 16 * MIB, 16, &o, &[]));
    std::thread::sleep(Duration::from_millis(700));
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !load.is_finished(),
        "fio finished before the rollback; the test needs more load"
    );
    let text = pool.keyturn_ok(&["rotate", "rollback", "--zone", "z1"]);
    assert!(text.contains("rolled back from key version 2"), "{text}");
    let st = status(&pool, "z1");
    assert_eq!(st["active_version"], 1, "{st}");
    assert_eq!(st["rolled_back_from"], 2, "{st}");
    assert_eq!(key(&st, 1).0, "active", "{st}");
    assert_eq!(key(&st, 2).0, "decrypt-only", "{st}");
    let (ok, text) = load.join().unwrap();
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "fio across the rollback:\n{text}"
    );
    fio_verify(
        &uri,
        2,
        16 * MIB,
        &tmp.path().join("v1.json"),
        "verify after the rollback",
    );
    // kill -9 while (or after) migrating back, then a restart.
    server.kill9();
    let server = pool.serve();
    let uri = server.uri("vol0");
    let st = status(&pool, "z1");
    assert_eq!(st["active_version"], 1, "after kill -9: {st}");
    assert_eq!(key(&st, 1).0, "active", "{st}");
    let mut last = Value::Null;
    wait_until("the migration back to v1", 90, || {
        last = status(&pool, "z1");
        last["phase"] == "grace" && key(&last, 2).1 == 0
    });
    assert_eq!(
        key(&last, 1).1,
        last["content_blocks"].as_u64().unwrap(),
        "every block under v1 again: {last}"
    );
    assert_eq!(
        key(&last, 2).0,
        "decrypt-only",
        "v2 is kept until its grace ends: {last}"
    );
    fio_verify(
        &uri,
        2,
        16 * MIB,
        &tmp.path().join("v2.json"),
        "verify after restart",
    );
    assert_eq!(audit(&pool, "rotation.rollback", "ok"), 1);
    // The same flip cannot be rolled back twice.
    assert_refused(&rollback(&pool, "z1", &[]), "already rolled back");
}

/// No rollback once the old key is destroyed (grace over), nor to a key an
/// emergency rotation marked compromised; each refusal says why, is
/// audited, and changes nothing.
#[test]
fn rollback_refused_after_destroy_and_for_a_compromised_key() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    set_rotation(&pool, &[("grace_secs", "0"), ("batch_blocks", "64")]);
    let server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0x5c 0 2M", "flush"]);
    assert_refused(&rollback(&pool, "z1", &[]), "no flip to roll back");
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    assert_refused(&rollback(&pool, "z1", &[]), "open rotation window");
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    wait_until("v1 destroyed", 60, || {
        let st = status(&pool, "z1");
        st["phase"] == "idle" && key(&st, 1).0 == "destroyed"
    });
    assert_refused(&rollback(&pool, "z1", &[]), "was destroyed");
    pool.keyturn_ok(&["rotate", "emergency", "--zone", "z1", "--reason", "drill"]);
    assert_refused(&rollback(&pool, "z1", &[]), "compromised");
    let st = status(&pool, "z1");
    assert_eq!(st["active_version"], 3, "{st}");
    qio_ok(&uri, &["read -P 0x5c 0 2M"]);
    assert_eq!(audit(&pool, "rotation.rollback", "refused"), 4);
    assert_eq!(audit(&pool, "rotation.rollback", "ok"), 0);
}

/// `keyturn init --dual-control`, operators alice and bob, zone z1 with a
/// 16 MiB volume.
fn dual_pool() -> TestPool {
    let dir = tempfile::tempdir().expect("tempdir");
    let passphrase = format!("test-pass-{}", std::process::id());
    let pass_file = dir.path().join("passphrase");
    std::fs::write(&pass_file, &passphrase).unwrap();
    let pool = TestPool {
        dir,
        pass_file,
        passphrase,
    };
    pool.keyturn_ok(&[
        "init",
        "--dual-control",
        "--kdf-memory-kib",
        "8192",
        "--kdf-iterations",
        "1",
    ]);
    pool.keyturn_ok(&["zone", "create", "z1"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", "vol0"]);
    for who in ["alice", "bob"] {
        let key = pool.dir.path().join(format!("{who}.key"));
        let out = pool.keyturn_bare(&["operator", "add", who, "--key-out", key.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    pool
}

/// A request for `operation` on z1, approved by alice and bob.
fn approvals(pool: &TestPool, operation: &str) -> (PathBuf, PathBuf) {
    let req = pool.dir.path().join(format!("{operation}.json"));
    let out = Command::new(keyturn_bin())
        .args(["approval-request", "--operation", operation, "--zone", "z1"])
        .args(["--expires-in", "1h", "--out"])
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let approve = |who: &str| {
        let token = pool.dir.path().join(format!("{who}-{operation}.approval"));
        let key = pool.dir.path().join(format!("{who}.key"));
        let out = pool.keyturn_bare(&[
            "approve",
            "--operator-key",
            key.to_str().unwrap(),
            "--request",
            req.to_str().unwrap(),
            "--out",
            token.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        token
    };
    (approve("alice"), approve("bob"))
}

#[test]
fn rollback_needs_two_approvals_where_dual_control_applies() {
    require_tool("qemu-io");
    let pool = dual_pool();
    set_rotation(&pool, &[("grace_secs", "3600")]);
    let server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0x3d 0 1M", "flush"]);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    qio_ok(&uri, &["write -P 0x4e 1M 1M", "flush"]);
    assert_refused(&rollback(&pool, "z1", &[]), "approval");
    // Approvals of another operation do not count.
    let (a, b) = approvals(&pool, "emergency-rotation");
    assert_refused(&rollback(&pool, "z1", &[&a, &b]), "dual control");
    let (a, b) = approvals(&pool, "rollback-rotation");
    assert_refused(&rollback(&pool, "z1", &[&a]), "approval");
    assert_eq!(status(&pool, "z1")["active_version"], 2);
    let ok = rollback(&pool, "z1", &[&a, &b]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(status(&pool, "z1")["active_version"], 1);
    qio_ok(&uri, &["read -P 0x3d 0 1M", "read -P 0x4e 1M 1M"]);
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    let accepted = log
        .lines()
        .find(|l| l.contains("\"rotation.rollback\"") && l.contains("\"ok\""))
        .expect("an accepted rollback in the audit log");
    assert!(accepted.contains("op-"), "approvers recorded: {accepted}");
    assert!(audit(&pool, "rotation.rollback", "refused") >= 3);
}
