//! Key backup and restore through the real binary: fio writes (crc32c
//! verify) to two volumes in two zones, a KEK is destroyed, the keys are
//! backed up under dual control, the data device is copied, and a restore
//! into a fresh pool directory serves both volumes back to fio's verify-only
//! pass. Without approvals both are refused (and recorded); the destroyed
//! key stays destroyed; the backup file holds no key or name in the clear.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

const REGION: u64 = 8 << 20;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn bare_ok(pool: &TestPool, args: &[&str]) -> String {
    let out = pool.keyturn_bare(args);
    assert!(
        out.status.success(),
        "keyturn {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two operators' approvals of `operation` (with `--key key`), signed
/// against `pool`'s registry.
fn approvals(pool: &TestPool, operation: &str, key: Option<&str>, tag: &str) -> Vec<PathBuf> {
    let req = pool.dir.path().join(format!("{tag}.req"));
    let mut args = vec![
        "approval-request",
        "--operation",
        operation,
        "--out",
        req.to_str().unwrap(),
    ];
    if let Some(k) = key {
        args.extend(["--key", k]);
    }
    let o = Command::new(keyturn_bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    ["alice", "bob"]
        .iter()
        .map(|who| {
            let token = pool.dir.path().join(format!("{tag}-{who}.approval"));
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
        })
        .collect()
}

fn with_approvals<'a>(mut args: Vec<&'a str>, tokens: &'a [PathBuf]) -> Vec<&'a str> {
    for t in tokens {
        args.push("--approval");
        args.push(t.to_str().unwrap());
    }
    args
}

fn audit_records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn key_row(pool: &TestPool, id: &str) -> Value {
    let rows: Value = serde_json::from_str(&pool.keyturn_ok(&["keys", "list", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no key {id}: {rows}"))
        .clone()
}

#[test]
fn backup_and_restore_bring_every_volume_back_under_dual_control() {
    require_tool("fio");
    let src = TestPool::with_volume("32M");
    src.keyturn_ok(&["zone", "create", "z2"]);
    src.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "32M", "vol1"]);
    for who in ["alice", "bob"] {
        let key = src.dir.path().join(format!("{who}.key"));
        bare_ok(
            &src,
            &["operator", "add", who, "--key-out", key.to_str().unwrap()],
        );
    }
    // A KEK rotation destroys KEK v1 of z1 (nothing is under it any more).
    src.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    assert_eq!(key_row(&src, "z1-kek-v1")["state"], "destroyed");

    // fio writes both volumes with crc32c verification data.
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut server = src.serve();
        for vol in ["vol0", "vol1"] {
            let (ok, out) = fio(
                &server.uri(vol),
                1,
                REGION,
                1,
                &tmp.path().join(format!("{vol}.w.json")),
                &[],
            );
            assert!(
                ok && fio_errors(&out).iter().all(|&e| e == 0),
                "fio write {vol}:\n{out}"
            );
        }
        assert!(server.stop(), "server stops cleanly");
    }

    // Backup without approvals: refused, nothing written, recorded.
    let bpass = src.dir.path().join("backup.pass");
    std::fs::write(&bpass, "backup passphrase, kept apart").unwrap();
    let file = src.dir.path().join("keys.backup");
    let base = vec![
        "keys",
        "backup",
        "--to",
        file.to_str().unwrap(),
        "--backup-passphrase-file",
        bpass.to_str().unwrap(),
        "--kdf-memory-kib",
        "8192",
        "--kdf-iterations",
        "1",
    ];
    let o = src.keyturn(&base);
    assert!(
        !o.status.success() && text(&o).contains("approval"),
        "{}",
        text(&o)
    );
    assert!(!file.exists());
    let tokens = approvals(&src, "backup-keys", None, "backup");
    let out = src.keyturn_ok(&with_approvals(base.clone(), &tokens));
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no backup id in {out}"))
        .to_string();
    assert_eq!(id.len(), 16, "{out}");
    // Never in plaintext: no key id, zone name or wrapped key member shows,
    // neither in the envelope nor in the sealed bytes. (Not searched in the
    // ciphertext's base64 text: a short name like "vol0" turns up in random
    // base64 now and then, and did.)
    let mut envelope: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let sealed = envelope
        .as_object_mut()
        .unwrap()
        .remove("ciphertext")
        .expect("a ciphertext member");
    let sealed = {
        use base64ct::{Base64, Encoding};
        Base64::decode_vec(sealed.as_str().unwrap()).unwrap()
    };
    let envelope = envelope.to_string();
    for needle in ["z1-dek", "z1-kek", "\"wrapped\"", "vol0", "catalog"] {
        assert!(
            !envelope.contains(needle),
            "{needle} in the backup's envelope"
        );
        assert!(
            !sealed.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} in the backup's sealed bytes"
        );
    }
    let rec = audit_records(&src.path());
    let backups: Vec<&Value> = rec
        .iter()
        .filter(|r| r["action"] == "keys.backup")
        .collect();
    assert_eq!(backups.len(), 2, "{backups:?}");
    assert_eq!(backups[0]["outcome"], "refused");
    assert_eq!(backups[1]["outcome"], "ok");
    assert_eq!(backups[1]["approvers"].as_array().unwrap().len(), 2);
    assert_eq!(backups[1]["key_id"], format!("backup-{id}"));

    // Another host: a fresh directory, the data device copied.
    let dst = TestPool {
        dir: tempfile::tempdir().unwrap(),
        pass_file: PathBuf::new(),
        passphrase: "restored pool passphrase".into(),
    };
    let pass_file = dst.dir.path().join("passphrase");
    std::fs::write(&pass_file, &dst.passphrase).unwrap();
    let dst = TestPool { pass_file, ..dst };
    let data = dst.dir.path().join("data.copy");
    std::fs::copy(src.path().join("data"), &data).unwrap();
    let restore = vec![
        "keys",
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--backup-passphrase-file",
        bpass.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--kdf-memory-kib",
        "8192",
        "--kdf-iterations",
        "1",
    ];
    // Without approvals: refused, no pool made, the refusal recorded there.
    let o = dst.keyturn(&restore);
    assert!(
        !o.status.success() && text(&o).contains("approval"),
        "{}",
        text(&o)
    );
    assert!(!dst.path().join("pool.toml").exists());
    let refused = audit_records(&dst.path());
    assert_eq!(refused.last().unwrap()["action"], "keys.restore");
    assert_eq!(refused.last().unwrap()["outcome"], "refused");
    // Approvals of a backup-keys request do not restore.
    let o = dst.keyturn(&with_approvals(restore.clone(), &tokens));
    assert!(!o.status.success(), "{}", text(&o));
    let tokens = approvals(&src, "restore-keys", Some(&id), "restore");
    dst.keyturn_ok(&with_approvals(restore.clone(), &tokens));

    // Every volume verifies with fio's verify-only pass.
    {
        let server = dst.serve();
        for vol in ["vol0", "vol1"] {
            fio_verify(
                &server.uri(vol),
                1,
                REGION,
                &tmp.path().join(format!("{vol}.v.json")),
                vol,
            );
        }
    }
    // The destroyed key stays destroyed: its state, and no bytes anywhere.
    let row = key_row(&dst, "z1-kek-v1");
    assert_eq!(row["state"], "destroyed", "{row}");
    let zone_file: Value =
        serde_json::from_slice(&std::fs::read(dst.path().join("keys/zone-1.json")).unwrap())
            .unwrap();
    let kek1 = zone_file["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "z1-kek-v1")
        .unwrap();
    assert!(kek1.get("wrapped").is_none(), "{kek1}");
    assert_eq!(key_row(&dst, "z1-kek-v2")["state"], "active");
    // The restore is recorded, signed, in the new pool's chain.
    let rec = audit_records(&dst.path());
    let ok = rec
        .iter()
        .find(|r| r["action"] == "keys.restore" && r["outcome"] == "ok")
        .unwrap();
    assert_eq!(ok["key_id"], format!("backup-{id}"));
    assert_eq!(ok["approvers"].as_array().unwrap().len(), 2);
    let pubkey = dst.dir.path().join("audit.pub");
    let o = Command::new(keyturn_bin())
        .args([
            "audit",
            "public-key",
            "--pool",
            dst.path().to_str().unwrap(),
            "--out",
            pubkey.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(keyturn_bin())
        .args([
            "audit",
            "verify",
            "--pool",
            dst.path().to_str().unwrap(),
            "--public-key",
            pubkey.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    // The refused attempt's record was written before the pool had a key:
    // the signature made when the key came covers it too.
    assert!(o.status.success(), "{}", text(&o));
}
