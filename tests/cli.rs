//! The command line, end to end: init, zone, volume, serve, demo.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The last line of stderr: the `keyturn: error:` line, without the log.
fn error_line(o: &Output) -> String {
    let e = strip_ansi_codes(&stderr(o));
    e.lines()
        .rfind(|l| l.contains("error"))
        .unwrap_or("")
        .to_string()
}

/// Asserts a keyturn run failed (not by timeout) and its error says `want`.
fn assert_fails_with(o: &Output, want: &[&str], what: &str) {
    assert!(
        !o.status.success(),
        "{what}: succeeded but should not:\n{}{}",
        stdout(o),
        stderr(o)
    );
    assert_ne!(o.status.code(), Some(124), "{what}: timed out");
    let err = error_line(o).to_lowercase();
    for w in want {
        assert!(
            err.contains(&w.to_lowercase()),
            "{what}: error does not mention {w:?}: {err:?}\nfull stderr:\n{}",
            stderr(o)
        );
    }
}

/// `keyturn ARGS` with no passphrase source at all, stdin not a terminal.
fn keyturn_plain(args: &[&str]) -> Output {
    let bin = keyturn_bin();
    let mut full = vec!["30", bin.to_str().unwrap()];
    full.extend_from_slice(args);
    Command::new("timeout")
        .args(&full)
        .env_remove("KEYTURN_PASSPHRASE")
        .env_remove("KEYTURN_POOL")
        .stdin(Stdio::null())
        .output()
        .expect("run keyturn")
}

fn volume_list_json(pool: &TestPool) -> Vec<Value> {
    let text = pool.keyturn_ok(&["volume", "list", "--json"]);
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("volume list --json: {e}\n{text}"));
    v.as_array().expect("array").clone()
}

fn volume_entry(pool: &TestPool, name: &str) -> Option<Value> {
    volume_list_json(pool)
        .into_iter()
        .find(|v| v["name"] == name)
}

/// Number of non-zero 4 KiB blocks in a file (slots holding ciphertext).
fn nonzero_blocks(path: &Path) -> usize {
    static ZERO: [u8; 4096] = [0; 4096];
    let d = std::fs::read(path).unwrap();
    d.chunks(4096).filter(|c| *c != &ZERO[..c.len()]).count()
}

#[test]
fn init_creates_a_pool_and_refuses_to_overwrite_it() {
    let pool = TestPool::new();
    let p = pool.path();
    for f in [
        "pool.toml",
        "catalog.json",
        "keys/root.sealed",
        "journal",
        "data",
        "staging",
    ] {
        assert!(p.join(f).exists(), "init did not create {f}");
    }
    let sealed_before = std::fs::read(p.join("keys/root.sealed")).unwrap();
    let o = pool.keyturn(&["init", "--kdf-memory-kib", "8192", "--kdf-iterations", "1"]);
    assert!(
        !o.status.success(),
        "second init over an existing pool succeeded"
    );
    assert_eq!(
        std::fs::read(p.join("keys/root.sealed")).unwrap(),
        sealed_before,
        "second init changed the root key"
    );
    // The pool still opens.
    let v = volume_list_json(&pool);
    assert!(v.is_empty(), "fresh pool has volumes: {v:?}");
}

#[test]
fn wrong_passphrase_is_refused_and_nothing_is_served() {
    let pool = TestPool::with_volume("16M");
    let wrong = write_file(pool.dir.path(), "wrong-pass", b"not-the-passphrase");
    let o = run(
        keyturn_bin().to_str().unwrap(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            pool.path().to_str().unwrap(),
            "--passphrase-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert_fails_with(&o, &["wrong passphrase"], "serve with a wrong passphrase");
    assert!(
        !stdout(&o).contains("ready"),
        "server announced readiness: {}",
        stdout(&o)
    );
    assert!(
        !stderr(&o).contains("not-the-passphrase"),
        "the passphrase was echoed"
    );
    // Other commands too, and the right passphrase still works afterwards.
    let o = run(
        keyturn_bin().to_str().unwrap(),
        &[
            "volume",
            "list",
            "--pool",
            pool.path().to_str().unwrap(),
            "--passphrase-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert_fails_with(
        &o,
        &["wrong passphrase"],
        "volume list with a wrong passphrase",
    );
    assert!(volume_entry(&pool, "vol0").is_some());
}

#[test]
fn missing_passphrase_without_a_terminal_is_a_clear_error() {
    let pool = TestPool::with_volume("16M");
    let dir = pool.path();
    for args in [
        vec!["volume", "list", "--pool", dir.to_str().unwrap()],
        vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            dir.to_str().unwrap(),
        ],
    ] {
        let o = keyturn_plain(&args);
        assert_fails_with(
            &o,
            &["passphrase", "KEYTURN_PASSPHRASE"],
            &format!("{args:?} without a passphrase"),
        );
        assert!(
            !stdout(&o).contains("ready"),
            "{args:?} served without a passphrase"
        );
    }
    // Control: the same command with the environment variable works.
    let o = Command::new("timeout")
        .args([
            "30",
            keyturn_bin().to_str().unwrap(),
            "volume",
            "list",
            "--json",
            "--pool",
            dir.to_str().unwrap(),
        ])
        .env("KEYTURN_PASSPHRASE", &pool.passphrase)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "KEYTURN_PASSPHRASE not accepted: {}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("\"vol0\""));
}

#[test]
fn zones_create_list_and_duplicates() {
    let pool = TestPool::new();
    pool.keyturn_ok(&["zone", "create", "alpha"]);
    pool.keyturn_ok(&["zone", "create", "beta"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "beta", "--size", "1M", "b1"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "beta", "--size", "1M", "b2"]);

    let text = pool.keyturn_ok(&["zone", "list"]);
    let row = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("zone {name} not listed:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("alpha")[2], "0", "{text}");
    assert_eq!(row("beta")[2], "2", "{text}");

    let json: Value = serde_json::from_str(&pool.keyturn_ok(&["zone", "list", "--json"])).unwrap();
    let zones = json.as_array().expect("array");
    let names: Vec<&str> = zones.iter().filter_map(|z| z["name"].as_str()).collect();
    assert_eq!(names, ["alpha", "beta"], "{json:#}");
    assert_ne!(
        zones[0]["id"], zones[1]["id"],
        "zone ids not distinct: {json:#}"
    );

    let o = pool.keyturn(&["zone", "create", "alpha"]);
    assert_fails_with(&o, &["already exists"], "duplicate zone");
    let o = pool.keyturn(&["zone", "create", "bad name!"]);
    assert_fails_with(&o, &["invalid zone name"], "invalid zone name");
    let o = pool.keyturn(&["volume", "create", "--zone", "gamma", "--size", "1M", "g1"]);
    assert_fails_with(&o, &["no zone named"], "volume in a missing zone");
    // Nothing changed by the failures.
    let json: Value = serde_json::from_str(&pool.keyturn_ok(&["zone", "list", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json:#}");
}

#[test]
fn volume_create_rejects_bad_sizes() {
    let pool = TestPool::new();
    pool.keyturn_ok(&["zone", "create", "z1"]);
    for (size, want) in [
        ("0", "multiple of 4096"),
        ("1000", "multiple of 4096"),
        ("10X", "unit"),
        ("-5", "invalid size"),
        ("abc", "size"),
        ("4097", "multiple of 4096"),
        ("99999999999T", "too large"),
    ] {
        let size_arg = format!("--size={size}");
        let o = pool.keyturn(&["volume", "create", "--zone", "z1", &size_arg, "v"]);
        assert_fails_with(&o, &[want], &format!("size {size:?}"));
    }
    assert!(
        volume_list_json(&pool).is_empty(),
        "a bad size created a volume"
    );
    // Good sizes, in several spellings.
    for (size, bytes, name) in [
        ("8192", 8192u64, "a"),
        ("4K", 4096, "b"),
        ("3M", 3 * MIB, "c"),
        ("1GiB", 1 << 30, "d"),
    ] {
        pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", size, name]);
        assert_eq!(
            volume_entry(&pool, name).unwrap()["size"].as_u64(),
            Some(bytes),
            "size {size}"
        );
    }
    let o = pool.keyturn(&["volume", "create", "--zone", "z1", "--size", "1M", "a"]);
    assert_fails_with(&o, &["already exists"], "duplicate volume");
}

#[test]
fn volume_list_shows_size_and_allocated_bytes() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "8M", "other"]);
    let v = volume_entry(&pool, "vol0").unwrap();
    assert_eq!(v["size"].as_u64(), Some(64 * MIB), "{v}");
    assert_eq!(v["allocated_bytes"].as_u64(), Some(0), "{v}");
    assert_eq!(v["zone"], "z1", "{v}");

    let tmp = tempfile::tempdir().unwrap();
    let src = write_file(tmp.path(), "src", &pattern_bytes(3, MIB as usize));
    let mut server = pool.serve();
    let s = src.to_str().unwrap();
    // 1 MiB of distinct blocks, one more block far away, one byte in a third
    // block, and a block written then discarded.
    qio_ok(
        &server.uri("vol0"),
        &[
            &format!("write -s {s} 0 1M"),
            &format!("write -s {s} 10M 4K"),
            "write -P 7 20000001 1",
            "write -P 9 30M 4K",
            "discard 30M 4K",
            "flush",
        ],
    );
    qio_ok(&server.uri("other"), &[&format!("write -s {s} 0 8K")]);
    assert!(server.stop(), "serve did not exit cleanly");

    let v = volume_entry(&pool, "vol0").unwrap();
    assert_eq!(v["allocated_bytes"].as_u64(), Some(MIB + 2 * 4096), "{v}");
    let o = volume_entry(&pool, "other").unwrap();
    assert_eq!(o["allocated_bytes"].as_u64(), Some(8192), "{o}");
    assert_eq!(o["size"].as_u64(), Some(8 * MIB), "{o}");
    // The text listing agrees.
    let text = pool.keyturn_ok(&["volume", "list"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("vol0 "))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "vol0",
            "z1",
            &(64 * MIB).to_string(),
            &(MIB + 8192).to_string()
        ],
        "{text}"
    );
}

#[test]
fn delete_frees_the_volume_space_for_reuse() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let data = pool.path().join("data");
    let tmp = tempfile::tempdir().unwrap();
    let blocks = 2048; // 8 MiB of distinct 4 KiB blocks (no dedup)
    let write = |vol: &str, seed: u64| {
        let src = write_file(
            tmp.path(),
            &format!("src-{seed}"),
            &pattern_bytes(seed, 8 * MIB as usize),
        );
        let mut server = pool.serve();
        qio_ok(
            &server.uri(vol),
            &[&format!("write -s {} 0 8M", src.display()), "flush"],
        );
        assert!(server.stop());
    };

    write("vol0", 1);
    assert_eq!(
        volume_entry(&pool, "vol0").unwrap()["allocated_bytes"].as_u64(),
        Some(8 * MIB)
    );
    let used_1 = nonzero_blocks(&data);
    assert!(
        used_1 >= blocks,
        "8 MiB written but only {used_1} data blocks in use"
    );

    let out = pool.keyturn_ok(&["volume", "delete", "vol0"]);
    assert!(out.contains("deleted volume vol0"), "{out}");
    assert!(
        volume_entry(&pool, "vol0").is_none(),
        "vol0 still listed after delete"
    );
    let o = pool.keyturn(&["volume", "delete", "vol0"]);
    assert_fails_with(&o, &["no volume named"], "deleting twice");

    // The same amount again, into a new volume: the freed slots are reused,
    // so no more of the data device is in use than before.
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "64M", "vol1"]);
    write("vol1", 2);
    let used_2 = nonzero_blocks(&data);
    assert!(
        used_2 <= used_1,
        "data device use grew from {used_1} to {used_2} blocks: the deleted volume's space was not reused"
    );

    // Control: without a delete the same write does need new space.
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "64M", "vol2"]);
    write("vol2", 3);
    let used_3 = nonzero_blocks(&data);
    assert!(
        used_3 >= used_2 + blocks,
        "writing 8 MiB to a new volume used only {} new blocks",
        used_3 - used_2
    );

    // vol1's data is intact after all that.
    let server = pool.serve();
    let src = tmp.path().join("src-2");
    let out = tmp.path().join("vol1.bin");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri("vol1"),
            out.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&out).unwrap();
    assert!(
        got[..8 * MIB as usize] == std::fs::read(&src).unwrap()[..],
        "vol1 data damaged"
    );
    assert!(got[8 * MIB as usize..].iter().all(|&b| b == 0));
}

/// Zones and volumes change while the pool is served, through the
/// server's admin API: a new volume is an export at once; a served volume
/// is deleted only with --online, never while a client has it open, and a
/// deleted one is no longer an export. A second server of the same pool is
/// refused.
#[test]
fn volumes_come_and_go_while_served() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let pool = TestPool::with_volume("64M");
    let mut server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0x3c 0 2M", "flush"]);
    let exports = |server: &Server| run_ok("nbdinfo", &["--list", "--json", &server.uri("")]);

    // No passphrase needed: the server does the work.
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "8M", "v2"]);
    pool.keyturn_ok(&["zone", "create", "--no-dedup", "z2"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "1M", "v3"]);
    let o = pool.keyturn(&["volume", "create", "--zone", "z1", "--size", "1M", "v2"]);
    assert_fails_with(&o, &["v2", "exists"], "a second v2");
    let o = pool.keyturn(&["volume", "create", "--zone", "nope", "--size", "1M", "v4"]);
    assert_fails_with(&o, &["nope"], "a volume in no zone");
    assert!(exports(&server).contains("\"v2\""), "{}", exports(&server));
    qio_ok(&server.uri("v2"), &["write -P 0x5a 4M 1M", "flush"]);
    qio_ok(&server.uri("v2"), &["read -P 0x5a 4M 1M", "read -P 0 0 4M"]);
    let zones: Value = serde_json::from_str(&pool.keyturn_ok(&["zone", "list", "--json"])).unwrap();
    let z2 = zones
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["name"] == "z2")
        .expect("z2 listed");
    assert_eq!(
        (&z2["volumes"], &z2["dedup"]),
        (&Value::from(1), &Value::from(false))
    );

    // Served, no client: refused without --online, and nothing changes.
    let o = pool.keyturn(&["volume", "delete", "vol0"]);
    assert_fails_with(&o, &["vol0", "in use", "--online"], "delete while served");
    let o = pool.keyturn(&["volume", "delete", "nope"]);
    assert_fails_with(&o, &["no volume named"], "delete of no volume");
    // A client holds vol0: even --online is refused, and changes nothing.
    let (held, size) = hold_export(&server.addr(), "vol0");
    assert_eq!(size, 64 * MIB);
    let o = pool.keyturn(&["volume", "delete", "--online", "vol0"]);
    assert_fails_with(
        &o,
        &["vol0", "being served"],
        "delete while a client has it",
    );
    qio_ok(&uri, &["read -P 0x3c 0 2M"]);
    drop(held);
    // Once the client is gone (the server notices the closed socket).
    let mut deleted = false;
    for _ in 0..100 {
        let o = pool.keyturn(&["volume", "delete", "--online", "vol0"]);
        if o.status.success() {
            deleted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(deleted, "vol0 could not be deleted after its client left");
    assert!(
        !exports(&server).contains("\"vol0\""),
        "{}",
        exports(&server)
    );
    assert!(
        !qio_run(&uri, &["read 0 4k"]).status.success(),
        "a deleted volume still opens"
    );
    let names: Vec<Value> = volume_list_json(&pool)
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [Value::from("v2"), Value::from("v3")]);

    // A second server on the same pool is refused, serving nothing.
    let dir = pool.path();
    let o = run(
        keyturn_bin().to_str().unwrap(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            dir.to_str().unwrap(),
            "--passphrase-file",
            pool.pass_file.to_str().unwrap(),
        ],
    );
    assert_fails_with(&o, &["in use"], "second serve of the same pool");
    assert!(
        !stdout(&o).contains("ready"),
        "a second server became ready"
    );
    assert!(server.is_running());
    assert!(server.stop());
    // The changes outlive the server; offline, the same commands work.
    let names: Vec<Value> = volume_list_json(&pool)
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [Value::from("v2"), Value::from("v3")]);
    pool.keyturn_ok(&["volume", "delete", "v3"]);
    let server = pool.serve();
    qio_ok(&server.uri("v2"), &["read -P 0x5a 4M 1M"]);
}

/// A running `keyturn demo`.
struct Demo {
    child: Child,
    uri: String,
}

impl Demo {
    fn start(dir: &Path) -> Demo {
        let mut child = Command::new(keyturn_bin())
            .args([
                "demo",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .env_remove("KEYTURN_PASSPHRASE")
            .env_remove("KEYTURN_POOL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    if let Some(base) = l.strip_prefix("ready: nbd://") {
                        let uri = format!("nbd://{}vol0", base);
                        return Demo { child, uri };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("demo did not print a ready line");
                }
            }
        }
    }

    /// SIGTERM; whether it exited 0.
    fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..300 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

#[test]
fn demo_keeps_its_data_across_restarts() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("demo");
    let demo = Demo::start(&dir);
    assert_eq!(
        run_ok("nbdinfo", &["--size", &demo.uri]).trim(),
        (1u64 << 30).to_string()
    );
    qio_ok(
        &demo.uri,
        &[
            "write -P 0xd7 123456 1M",
            "write -P 0xd8 1073737728 4096",
            "flush",
        ],
    );
    assert!(demo.stop(), "demo did not exit cleanly on SIGTERM");
    assert!(dir.join("demo.passphrase").exists());

    let demo = Demo::start(&dir);
    qio_ok(
        &demo.uri,
        &[
            "read -P 0xd7 123456 1M",
            "read -P 0 0 123456",
            "read -P 0xd8 1073737728 4096",
            "read -P 0 1200000 1M",
        ],
    );
    assert!(demo.stop());
}

#[test]
fn help_of_every_subcommand() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[],
            &[
                "init", "zone", "volume", "serve", "demo", "rotate", "scrub", "--log",
            ],
        ),
        (
            &["rotate"],
            &[
                "prepare",
                "flip",
                "pause",
                "resume",
                "abort",
                "emergency",
                "rollback",
                "status",
            ],
        ),
        (&["rotate", "rollback"], &["--zone", "--approval"]),
        (&["mac"], &["rotate", "status"]),
        (&["mac", "rotate"], &["--pool", "--zone", "--json"]),
        (
            &["rotate", "prepare"],
            &["--pool", "--zone", "--at", "--window"],
        ),
        (
            &["rotate", "emergency"],
            &["--zone", "--reason", "--approval"],
        ),
        (&["rotate", "status"], &["--zone", "--json", "--watch"]),
        (&["scrub"], &["--pool", "--zone", "--json"]),
        (&["volume", "stats"], &["--pool", "--json"]),
        (
            &["init"],
            &[
                "--pool",
                "--passphrase-file",
                "--data",
                "--staging",
                "--kdf-memory-kib",
                "--kdf-iterations",
                "--listen",
            ],
        ),
        (&["zone"], &["create", "list"]),
        (
            &["zone", "create"],
            &["--pool", "--passphrase-file", "<NAME>"],
        ),
        (&["zone", "list"], &["--pool", "--json"]),
        (&["volume"], &["create", "list", "delete", "stats"]),
        (
            &["volume", "create"],
            &["--pool", "--zone", "--size", "<NAME>"],
        ),
        (&["volume", "list"], &["--pool", "--json"]),
        (&["volume", "delete"], &["--pool", "<NAME>"]),
        (
            &["serve"],
            &[
                "--pool",
                "--passphrase-file",
                "--listen",
                "--unix",
                "--profile",
                "--admin-listen",
            ],
        ),
        (
            &["demo"],
            &["--dir", "--listen", "--unix", "--admin-listen"],
        ),
    ];
    for (sub, opts) in cases {
        let mut args: Vec<&str> = sub.to_vec();
        args.push("--help");
        let o = keyturn_plain(&args);
        assert!(
            o.status.success(),
            "keyturn {args:?} exited {}: {}",
            o.status,
            stderr(&o)
        );
        let text = stdout(&o);
        assert!(
            text.contains("Usage:"),
            "keyturn {args:?}: no usage:\n{text}"
        );
        for opt in *opts {
            assert!(
                text.contains(opt),
                "keyturn {args:?} does not mention {opt}:\n{text}"
            );
        }
    }
    let o = keyturn_plain(&["--version"]);
    assert!(
        o.status.success() && stdout(&o).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&o)
    );
    // And an unknown subcommand fails.
    let o = keyturn_plain(&["frobnicate"]);
    assert!(!o.status.success());
}

#[test]
fn serve_profiles_known_and_unknown() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    {
        let mut server = pool.serve_with(&["--profile", "nvme-server"]);
        qio_ok(
            &server.uri("vol0"),
            &[
                "write -P 0x4e 4095 8194",
                "read -P 0x4e 4095 8194",
                "read -P 0 0 4095",
            ],
        );
        assert!(server.stop());
    }
    // A profile given as a file path works too.
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("hw-profiles/ci-2core.toml");
    {
        let server = pool.serve_with(&["--profile", file.to_str().unwrap()]);
        qio_ok(&server.uri("vol0"), &["read -P 0x4e 4095 8194"]);
    }
    let dir = pool.path();
    let o = run(
        keyturn_bin().to_str().unwrap(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--profile",
            "nope",
            "--pool",
            dir.to_str().unwrap(),
            "--passphrase-file",
            pool.pass_file.to_str().unwrap(),
        ],
    );
    assert_fails_with(&o, &["nope", "profile"], "unknown profile");
    assert!(
        !stdout(&o).contains("ready"),
        "served with an unknown profile"
    );
}
