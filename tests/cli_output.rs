//! What the command line prints, read as a person reads it: `rotate status`
//! adds up in every phase, the inspection commands work while the pool is
//! served, and the demo says where its passphrase and its binary are.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        strip_ansi_codes(&String::from_utf8_lossy(&o.stderr)),
    )
}

/// Sets `[rotation] key = value` in the pool's pool.toml.
fn set_rotation(pool: &TestPool, key: &str, value: i64) {
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    doc.entry("rotation")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), toml::Value::Integer(value));
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
}

fn status_json(pool: &TestPool) -> Value {
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `progress:` line of a text status.
fn progress_of(status: &str) -> &str {
    status
        .lines()
        .find_map(|l| l.strip_prefix("progress: "))
        .unwrap_or_else(|| panic!("no progress line in:\n{status}"))
}

/// The numbers of "P% WHAT (DONE/TOTAL blocks)": (P, DONE, TOTAL).
fn counts_of(progress: &str, what: &str) -> (f64, u64, u64) {
    let (pct, rest) = progress
        .split_once(&format!("% {what} ("))
        .unwrap_or_else(|| panic!("not a {what} line: {progress}"));
    let (done, rest) = rest.split_once('/').unwrap();
    let total = rest.split_once(" blocks)").unwrap().0;
    (
        pct.parse().unwrap(),
        done.parse().unwrap(),
        total.parse().unwrap(),
    )
}

/// Asserts that a progress line's percentage is its own count's.
fn assert_adds_up(progress: &str, what: &str, total_expected: u64) -> (u64, u64) {
    let (pct, done, total) = counts_of(progress, what);
    assert_eq!(total, total_expected, "{progress}");
    assert!(done <= total, "{progress}");
    let expect = 100.0 * done as f64 / total as f64;
    assert!(
        (pct - expect).abs() <= 0.05 + f64::EPSILON,
        "{pct}% is not {done}/{total}: {progress}"
    );
    (done, total)
}

/// One rotation of a served pool, read the way a person reads it: right
/// after the flip the migration counts add up, a finished phase gives no
/// ETA and its own rate, and the grace period's destruction is scheduled,
/// not done.
#[test]
fn rotation_status_adds_up_in_every_phase() {
    require_tool("qemu-img");
    let pool = TestPool::with_volume("64M");
    set_rotation(&pool, "grace_secs", 3600);
    let server = pool.serve();
    let tmp = tempfile::tempdir().unwrap();
    // 16 MiB of distinct blocks: 4096 content blocks.
    let src = write_file(
        tmp.path(),
        "src.bin",
        &pattern_bytes(7, (16 * MIB) as usize),
    );
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &server.uri("vol0"),
        ],
    );
    const N: u64 = 4096;
    assert_eq!(status_json(&pool)["content_blocks"], N);

    let out = pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    assert_adds_up(progress_of(&out), "staged", N);
    wait_for("staging", || status_json(&pool)["remaining_blocks"] == 0);

    // Staged: the count is whole, the rate is the staging's own, no ETA.
    let st = status_json(&pool);
    let (secs, rate) = (
        st["staging_secs"].as_f64().unwrap(),
        st["rate_bytes_per_sec"].as_f64().unwrap(),
    );
    let expect = (N * 4096) as f64 / secs;
    assert!(
        (rate - expect).abs() <= expect * 0.02,
        "the rate is not the staging's bytes over its time: {rate} vs {expect}: {st}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", "z1"]);
    let line = progress_of(&out);
    assert!(
        line.starts_with(&format!("100.0% staged ({N}/{N} blocks), done in ")),
        "{out}"
    );
    assert!(!out.contains("ETA"), "an ETA once staging is done:\n{out}");
    assert_eq!(
        status_json(&pool)["rate_bytes_per_sec"].as_f64().unwrap(),
        rate,
        "the rate of a finished phase does not drift while the window waits"
    );

    // Right after the flip: of the N staged copies to destage, the ones
    // migrated so far, and the percentage is theirs.
    let out = pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let line = progress_of(&out);
    assert_adds_up(line, "migrated", N);
    assert!(out.contains("flipped: "), "{out}");

    wait_for("the grace period", || {
        status_json(&pool)["phase"] == "grace"
    });
    let out = pool.keyturn_ok(&["rotate", "status", "--zone", "z1"]);
    let line = progress_of(&out);
    assert!(
        line.starts_with(&format!("100.0% migrated ({N}/{N} blocks), done in ")),
        "{out}"
    );
    assert!(!out.contains("ETA"), "an ETA once migrated:\n{out}");
    let destroy = out
        .lines()
        .find(|l| l.contains("destruction"))
        .unwrap_or_else(|| panic!("no destruction line:\n{out}"));
    assert!(
        destroy.starts_with("old key v1 destruction scheduled at: ")
            && (destroy.ends_with("(in 1h)") || destroy.contains("(in 59m")),
        "{destroy}"
    );
    assert!(
        !out.contains("destroyed at"),
        "a destruction an hour ahead reads as done:\n{out}"
    );
    // The key is still there, and says so.
    let keys = pool.keyturn_ok(&["keys", "list", "--zone", "z1"]);
    assert!(
        keys.lines()
            .any(|l| l.contains("z1-dek-v1") && l.contains("decrypt-only")),
        "{keys}"
    );
    drop(server);
}

/// The key inventory of a zone as JSON, with the age (which moves) left out.
fn keys_without_age(json: &str) -> Vec<Value> {
    let mut rows: Vec<Value> = serde_json::from_str(json).unwrap();
    for r in &mut rows {
        r.as_object_mut().unwrap().remove("age_days");
    }
    rows
}

/// `keys list`, `keys show` and `check` work while a server holds the
/// pool (through its API, without a passphrase) and say what they say
/// offline.
#[test]
fn inspection_commands_work_while_served_and_match_offline() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    // Offline first (the pool opened here), after some data was written.
    {
        let server = pool.serve();
        qio_ok(
            &server.uri("vol0"),
            &["write -P 0x11 0 1M", "write -P 0x22 4M 256k", "flush"],
        );
    }
    let offline = [
        pool.keyturn_ok(&["keys", "list"]),
        pool.keyturn_ok(&["keys", "list", "--zone", "z1"]),
        pool.keyturn_ok(&["keys", "show", "z1-dek-v1"]),
        pool.keyturn_ok(&["check"]),
        pool.keyturn_ok(&["check", "--json"]),
    ];
    let offline_json = pool.keyturn_ok(&["keys", "list", "--json"]);
    assert!(offline[0].contains("z1-dek-v1"), "{}", offline[0]);
    assert!(
        offline[3].starts_with("320 mapped blocks, 2 content blocks"),
        "{}",
        offline[3]
    );

    let _server = pool.serve();
    let bare = |args: &[&str]| {
        let o = pool.keyturn_bare(args);
        let (out, err) = text(&o);
        assert!(
            o.status.success(),
            "keyturn {args:?} while served:\n{out}{err}"
        );
        assert!(
            !err.contains("in use by another keyturn process"),
            "{args:?} tried the pool lock:\n{err}"
        );
        out
    };
    let online = [
        bare(&["keys", "list"]),
        bare(&["keys", "list", "--zone", "z1"]),
        bare(&["keys", "show", "z1-dek-v1"]),
        bare(&["check"]),
        bare(&["check", "--json"]),
    ];
    // The tables and the check say the same; ages are 0.0 days either way.
    for (i, (off, on)) in offline.iter().zip(&online).enumerate() {
        if i == 2 {
            continue;
        }
        assert_eq!(off, on, "command {i} differs through the server");
    }
    let show = |s: &str| keys_without_age(&format!("[{s}]"));
    assert_eq!(show(&offline[2]), show(&online[2]));
    assert_eq!(
        keys_without_age(&offline_json),
        keys_without_age(&bare(&["keys", "list", "--json"]))
    );

    // Errors come back as the offline command gives them.
    let o = pool.keyturn_bare(&["keys", "list", "--zone", "nope"]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no zone named \"nope\""),
        "{:?}",
        text(&o)
    );
    let o = pool.keyturn_bare(&["keys", "show", "z1-dek-v9"]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no key with id \"z1-dek-v9\""),
        "{:?}",
        text(&o)
    );

    // What the server does shows at once: a rotation window's next key.
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    let keys = bare(&["keys", "list", "--zone", "z1"]);
    assert!(
        keys.lines()
            .any(|l| l.contains("z1-dek-v2") && l.contains("pre-active")),
        "{keys}"
    );
}

/// A running `keyturn demo`: its process and what it printed up to its
/// ready line.
struct Demo {
    child: Child,
    printed: Vec<String>,
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
        let mut printed = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    let ready = l.starts_with("ready: nbd://");
                    printed.push(l);
                    if ready {
                        return Demo { child, printed };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("demo did not print a ready line: {printed:?}");
                }
            }
        }
    }

    /// SIGTERM, and wait for the exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keyturn ARGS --pool DIR` with no passphrase source, stdin not a terminal.
fn keyturn_no_secret(dir: &Path, args: &[&str]) -> Output {
    Command::new(keyturn_bin())
        .args(args)
        .arg("--pool")
        .arg(dir)
        .env_remove("KEYTURN_PASSPHRASE")
        .env_remove("KEYTURN_POOL")
        .stdin(Stdio::null())
        .output()
        .expect("run keyturn")
}

/// The demo names its binary as it can be run from here, the commands a
/// new user tries on it work while it serves, and once it stops a missing
/// passphrase names the file the demo keeps.
#[test]
fn demo_names_its_binary_and_where_its_passphrase_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("demo");
    let demo = Demo::start(&dir);
    let hint = |prefix: &str| -> String {
        demo.printed
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {prefix:?} hint in {:?}", demo.printed))
    };
    let rotate = hint("rotate its key: ");
    let bin = rotate.split_whitespace().next().unwrap();
    assert_eq!(
        std::fs::canonicalize(bin)
            .unwrap_or_else(|e| panic!("{bin:?} is not runnable from here: {e}")),
        std::fs::canonicalize(keyturn_bin()).unwrap(),
        "the hint names another binary: {rotate}"
    );
    assert_eq!(
        rotate,
        format!("{bin} rotate prepare --pool {} --zone demo", dir.display())
    );
    let again = hint("serve it again");
    assert!(
        again.ends_with(&format!(": {bin} demo --dir {}", dir.display())),
        "{again}"
    );

    // While it serves: no passphrase needed, no pool lock in the way.
    for args in [
        &["keys", "list"][..],
        &["check"],
        &["rotate", "status", "--zone", "demo"],
    ] {
        let o = keyturn_no_secret(&dir, args);
        let (out, err) = text(&o);
        assert!(
            o.status.success(),
            "{args:?} on the served demo:\n{out}{err}"
        );
    }
    demo.stop();

    // Stopped: the pool stays, and opening it here asks for the demo's file.
    let file = dir.join("demo.passphrase");
    assert!(file.is_file());
    let o = keyturn_no_secret(&dir, &["keys", "list"]);
    assert!(!o.status.success());
    let err = text(&o).1;
    let last = err.lines().rfind(|l| l.contains("error")).unwrap_or("");
    assert!(
        last.contains(&format!(
            "{}: add --passphrase-file {}",
            file.display(),
            file.display()
        )),
        "the error does not name the demo's passphrase file: {last}"
    );
    let o = Command::new(keyturn_bin())
        .args([
            "keys",
            "list",
            "--pool",
            dir.to_str().unwrap(),
            "--passphrase-file",
        ])
        .arg(&file)
        .env_remove("KEYTURN_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("dek"));
}
