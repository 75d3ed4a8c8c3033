//! Dual control through the real binary: operators, requests, approvals,
//! and a KEK rotation that needs two of them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Registers operators alice and bob, their keys in `<name>.key` in the pool directory.
fn add_operators(pool: &TestPool) {
    for who in ["alice", "bob"] {
        let key = pool.dir.path().join(format!("{who}.key"));
        bare_ok(
            pool,
            &["operator", "add", who, "--key-out", key.to_str().unwrap()],
        );
    }
}

/// Like `TestPool::new`, but `keyturn init --dual-control`.
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
    pool
}

fn bare_ok(pool: &TestPool, args: &[&str]) -> String {
    let out = pool.keyturn_bare(args);
    assert!(
        out.status.success(),
        "keyturn {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn request(dir: &Path, name: &str, expires_in: &str) -> PathBuf {
    request_for(
        dir,
        name,
        &[
            "--operation",
            "rotate-kek",
            "--zone",
            "z1",
            "--expires-in",
            expires_in,
        ],
    )
}

/// `keyturn approval-request ARGS --out DIR/NAME`.
fn request_for(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(keyturn_bin())
        .arg("approval-request")
        .args(args)
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn approve(pool: &TestPool, who: &str, req: &Path, out: &str) -> PathBuf {
    let token = pool.dir.path().join(out);
    let key = pool.dir.path().join(format!("{who}.key"));
    bare_ok(
        pool,
        &[
            "approve",
            "--operator-key",
            key.to_str().unwrap(),
            "--request",
            req.to_str().unwrap(),
            "--out",
            token.to_str().unwrap(),
        ],
    );
    token
}

fn rotate(pool: &TestPool, tokens: &[&Path]) -> Output {
    let mut args = vec!["keys", "rotate-kek", "--zone", "z1"];
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

fn kek_state(pool: &TestPool, id: &str) -> String {
    let rows: serde_json::Value =
        serde_json::from_str(&pool.keyturn_ok(&["keys", "list", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .map_or("absent".into(), |r| {
            r["state"].as_str().unwrap().to_string()
        })
}

#[test]
fn kek_rotation_needs_two_distinct_fresh_approvals() {
    let pool = dual_pool();
    let toml = std::fs::read_to_string(pool.path().join("pool.toml")).unwrap();
    assert!(
        toml.contains("[dual_control]") && toml.contains("required = true"),
        "{toml}"
    );

    for who in ["alice", "bob"] {
        let key = pool.dir.path().join(format!("{who}.key"));
        let out = bare_ok(
            &pool,
            &["operator", "add", who, "--key-out", key.to_str().unwrap()],
        );
        assert!(out.contains("op-"), "{out}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
    // Refuses to overwrite a key file.
    let alice_key = pool.dir.path().join("alice.key");
    let out = pool.keyturn_bare(&[
        "operator",
        "add",
        "carol",
        "--key-out",
        alice_key.to_str().unwrap(),
    ]);
    assert_refused(&out, "already exists");
    let list: serde_json::Value =
        serde_json::from_str(&bare_ok(&pool, &["operator", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    let req = request(pool.dir.path(), "req1.json", "1h");
    let a = approve(&pool, "alice", &req, "alice1.approval");
    let b = approve(&pool, "bob", &req, "bob1.approval");

    assert_refused(&rotate(&pool, &[]), "0 approval(s) given");
    assert_refused(&rotate(&pool, &[&a]), "1 approval(s) given");
    assert_refused(&rotate(&pool, &[&a, &a]), "approved more than once");
    assert_eq!(
        kek_state(&pool, "z1-kek-v2"),
        "absent",
        "refusals change nothing"
    );

    let out = rotate(&pool, &[&a, &b]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("KEK v2 active")
            && stdout.contains("approved by op-"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kek_state(&pool, "z1-kek-v2"), "active");

    // The same two tokens cannot rotate again.
    assert_refused(&rotate(&pool, &[&a, &b]), "already used");
    assert_eq!(kek_state(&pool, "z1-kek-v3"), "absent");

    // An expired request. It must outlive two approvals on a loaded
    // machine (with 1 s, the second approval sometimes came too late).
    let made = std::time::Instant::now();
    let req = request(pool.dir.path(), "req2.json", "4s");
    let a = approve(&pool, "alice", &req, "alice2.approval");
    let b = approve(&pool, "bob", &req, "bob2.approval");
    std::thread::sleep(std::time::Duration::from_millis(5100).saturating_sub(made.elapsed()));
    assert_refused(&rotate(&pool, &[&a, &b]), "expired");
    assert_eq!(kek_state(&pool, "z1-kek-v3"), "absent");
    // Every refused attempt is on the record: none, one, the same twice,
    // a replay, an expired request.
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    let refused = log
        .lines()
        .filter(|l| l.contains("\"kek.rotate\"") && l.contains("\"refused\""))
        .count();
    assert_eq!(refused, 5, "{log}");
}

/// An emergency DEK rotation through the running server needs two
/// approvals of exactly that operation on that zone.
#[test]
fn emergency_rotation_needs_two_approvals_through_the_server() {
    require_tool("qemu-io");
    let pool = dual_pool();
    add_operators(&pool);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", "vol0"]);
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x2e 0 1M", "flush"]);
    let emergency = |tokens: &[&Path]| {
        let mut args = vec!["rotate", "emergency", "--zone", "z1", "--reason", "drill"];
        for t in tokens {
            args.push("--approval");
            args.push(t.to_str().unwrap());
        }
        pool.keyturn(&args)
    };
    assert_refused(&emergency(&[]), "approval");
    // Approvals of another operation (a KEK rotation) do not count.
    let kek_req = request(pool.dir.path(), "kek.json", "1h");
    let a = approve(&pool, "alice", &kek_req, "a-kek.approval");
    let b = approve(&pool, "bob", &kek_req, "b-kek.approval");
    assert_refused(&emergency(&[&a, &b]), "dual control");
    // The right request, one approval: refused; two: accepted.
    let req = pool.dir.path().join("em.json");
    let out = Command::new(keyturn_bin())
        .args([
            "approval-request",
            "--operation",
            "emergency-rotation",
            "--zone",
            "z1",
        ])
        .args(["--expires-in", "1h", "--out"])
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = approve(&pool, "alice", &req, "a-em.approval");
    let b = approve(&pool, "bob", &req, "b-em.approval");
    assert_refused(&emergency(&[&a]), "approval");
    let ok = emergency(&[&a, &b]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let st: serde_json::Value =
        serde_json::from_str(&pool.keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]))
            .unwrap();
    assert_eq!(st["active_version"], 2);
    assert_eq!(st["emergency"], true);
    // Replay of the same approvals is refused.
    assert_refused(&emergency(&[&a, &b]), "dual control");
    qio_ok(&server.uri("vol0"), &["read -P 0x2e 0 1M"]);
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    let accepted = log
        .lines()
        .find(|l| l.contains("\"rotation.emergency\"") && l.contains("\"ok\""))
        .expect("an accepted emergency rotation in the audit log");
    assert!(accepted.contains("op-"), "approvers recorded: {accepted}");
    assert!(
        log.lines()
            .filter(|l| l.contains("\"rotation.emergency\"") && l.contains("\"refused\""))
            .count()
            >= 3
    );
}

fn rotate_root(pool: &TestPool, new_pass: &Path, tokens: &[&Path]) -> Output {
    let mut args = vec![
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_pass.to_str().unwrap(),
    ];
    for t in tokens {
        args.push("--approval");
        args.push(t.to_str().unwrap());
    }
    pool.keyturn(&args)
}

/// The sealed root key file pool.toml names.
fn root_path(pool: &TestPool) -> String {
    let toml = std::fs::read_to_string(pool.path().join("pool.toml")).unwrap();
    toml.lines()
        .find_map(|l| l.strip_prefix("path = "))
        .unwrap()
        .trim_matches('"')
        .to_string()
}

#[test]
fn root_rotation_needs_two_distinct_approvals_for_rotate_root() {
    let pool = dual_pool();
    add_operators(&pool);
    let new_pass = write_file(pool.dir.path(), "new-pass", b"dual control new passphrase");
    let req = request_for(
        pool.dir.path(),
        "root-req.json",
        &["--operation", "rotate-root"],
    );
    let a = approve(&pool, "alice", &req, "alice-root.approval");
    let b = approve(&pool, "bob", &req, "bob-root.approval");
    // Approvals for a KEK rotation do not rotate the root key.
    let kek_req = request(pool.dir.path(), "kek-req.json", "1h");
    let ka = approve(&pool, "alice", &kek_req, "alice-kek.approval");
    let kb = approve(&pool, "bob", &kek_req, "bob-kek.approval");

    assert_refused(&rotate_root(&pool, &new_pass, &[]), "0 approval(s) given");
    assert_refused(&rotate_root(&pool, &new_pass, &[&a]), "1 approval(s) given");
    assert_refused(
        &rotate_root(&pool, &new_pass, &[&a, &a]),
        "approved more than once",
    );
    assert_refused(
        &rotate_root(&pool, &new_pass, &[&ka, &kb]),
        "but this is rotate-root",
    );
    assert_eq!(
        root_path(&pool),
        "keys/root.sealed",
        "refusals change nothing"
    );
    assert!(!pool.path().join("keys/root-rotation.json").exists());

    let out = rotate_root(&pool, &new_pass, &[&a, &b]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("approved by op-")
            && stdout.contains("root key rotated"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root_path(&pool).starts_with("keys/root-"));
    assert!(!pool.path().join("keys/root.sealed").exists());

    // Every attempt is in the audit log, with the operators it named.
    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    let root_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"action\":\"root.rotate\""))
        .collect();
    let refused = root_lines
        .iter()
        .filter(|l| l.contains("\"outcome\":\"refused\""))
        .count();
    assert_eq!(refused, 4, "{log}");
    let ok: Vec<&&str> = root_lines
        .iter()
        .filter(|l| l.contains("\"outcome\":\"ok\""))
        .collect();
    assert_eq!(ok.len(), 1, "{log}");
    let v: serde_json::Value = serde_json::from_str(ok[0]).unwrap();
    assert_eq!(v["approvers"].as_array().unwrap().len(), 2, "{v}");
    assert!(
        root_lines
            .iter()
            .any(|l| l.contains("\"outcome\":\"refused\"") && l.contains("op-")),
        "a refusal names the operators the tokens claim: {log}"
    );

    // The same tokens cannot rotate again (and the new passphrase is needed).
    std::fs::copy(&new_pass, &pool.pass_file).unwrap();
    assert_refused(&rotate_root(&pool, &new_pass, &[&a, &b]), "already used");
}

/// Root key commands through the running server under dual control: one
/// approval, or a wrong current passphrase, is refused and recorded, and
/// changes nothing (not even the approvals: the pair then works).
#[test]
fn root_rotation_through_the_server_refuses_one_approval() {
    require_tool("qemu-io");
    let pool = dual_pool();
    add_operators(&pool);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", "vol0"]);
    let new_pass = write_file(pool.dir.path(), "new-pass", b"online dual control pass");
    let req = request_for(
        pool.dir.path(),
        "root-req.json",
        &["--operation", "rotate-root"],
    );
    let a = approve(&pool, "alice", &req, "alice-root.approval");
    let b = approve(&pool, "bob", &req, "bob-root.approval");
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x3a 0 1M", "flush"]);
    let zone_file = pool.path().join("keys/zone-1.json");
    let before = (
        std::fs::read(&zone_file).unwrap(),
        std::fs::read(pool.path().join("pool.toml")).unwrap(),
        std::fs::read(pool.path().join("keys/root.sealed")).unwrap(),
    );
    let unchanged = |what: &str| {
        let now = (
            std::fs::read(&zone_file).unwrap(),
            std::fs::read(pool.path().join("pool.toml")).unwrap(),
            std::fs::read(pool.path().join("keys/root.sealed")).unwrap(),
        );
        assert!(now == before, "{what} changed a key file or pool.toml");
        assert!(
            !pool.path().join("keys/root-rotation.json").exists(),
            "{what}"
        );
    };

    let out = rotate_root(&pool, &new_pass, &[&a]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("through the server"),
        "{out:?}"
    );
    assert_refused(&out, "1 approval(s) given");
    unchanged("one approval");
    let out = pool.keyturn(&[
        "keys",
        "change-passphrase",
        "--new-passphrase-file",
        new_pass.to_str().unwrap(),
        "--approval",
        a.to_str().unwrap(),
    ]);
    assert_refused(&out, "1 approval(s) given");
    unchanged("a passphrase change with one approval");
    // A wrong current passphrase is refused before the approvals are
    // looked at (so they are not spent).
    let wrong = write_file(pool.dir.path(), "wrong-pass", b"not the passphrase");
    let out = Command::new(keyturn_bin())
        .args(["keys", "rotate-root", "--new-passphrase-file"])
        .arg(&new_pass)
        .args(["--approval", a.to_str().unwrap(), "--approval"])
        .arg(&b)
        .arg("--pool")
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(&wrong)
        .env_remove("KEYTURN_PASSPHRASE")
        .output()
        .unwrap();
    assert_refused(&out, "wrong passphrase for root key file");
    unchanged("a wrong passphrase");
    qio_ok(&server.uri("vol0"), &["read -P 0x3a 0 1M"]);

    let log = std::fs::read_to_string(pool.path().join("audit.log")).unwrap();
    let lines = |action: &str, outcome: &str| -> Vec<String> {
        log.lines()
            .filter(|l| {
                l.contains(&format!("\"action\":\"{action}\""))
                    && l.contains(&format!("\"outcome\":\"{outcome}\""))
            })
            .map(str::to_string)
            .collect()
    };
    let refused = lines("root.rotate", "refused");
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains("op-"), "names the operator: {log}");
    assert_eq!(lines("root.reseal", "refused").len(), 1, "{log}");
    let failed = lines("root.rotate", "failed");
    assert!(
        failed.len() == 1 && failed[0].contains("wrong passphrase"),
        "{log}"
    );
    assert!(lines("root.rotate", "ok").is_empty(), "{log}");

    // The same two approvals, unspent, rotate it.
    let out = rotate_root(&pool, &new_pass, &[&a, &b]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("root key rotated"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root_path(&pool).starts_with("keys/root-"));
    qio_ok(&server.uri("vol0"), &["read -P 0x3a 0 1M"]);
}
