//! `keyturn audit verify` on a real pool: the log the commands write
//! verifies, and an edited, deleted or reordered record is named.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::Value;

/// `keyturn audit verify --pool DIR [--json]` with no passphrase source at
/// all: verifying must not need the key.
fn verify(pool: &Path, json: bool) -> Output {
    let mut cmd = Command::new(keyturn_bin());
    cmd.args(["audit", "verify", "--pool"]).arg(pool);
    if json {
        cmd.arg("--json");
    }
    cmd.env_remove("KEYTURN_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .expect("run keyturn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn verify_json(pool: &Path) -> (bool, Value) {
    let o = verify(pool, true);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}):\n{}", text(&o)));
    assert_eq!(v["ok"].as_bool(), Some(o.status.success()), "{}", text(&o));
    (o.status.success(), v)
}

fn log_lines(pool: &Path) -> Vec<String> {
    std::fs::read_to_string(pool.join("audit.log"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(pool: &Path, lines: &[String]) {
    std::fs::write(pool.join("audit.log"), lines.join("\n") + "\n").unwrap();
}

/// Asserts verify fails and names `line` and `id` (text and JSON).
fn assert_broken(pool: &Path, line: u64, id: u64, kind: &str) {
    let o = verify(pool, false);
    assert!(
        !o.status.success(),
        "verify passed a broken log:\n{}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains(&format!("line {line}")) && t.contains(&format!("event id {id}")),
        "verify does not name line {line} / event {id}:\n{t}"
    );
    let (ok, v) = verify_json(pool);
    assert!(!ok);
    assert_eq!(v["line"], line, "{v}");
    assert_eq!(v["id"], id, "{v}");
    assert_eq!(v["kind"], kind, "{v}");
}

/// A pool with two zones, three volumes (one deleted): its records are
/// pool.init, zone.create + 3 key.create per zone, 3 volume.create, 1 volume.delete.
fn busy_pool() -> TestPool {
    let pool = TestPool::new();
    pool.keyturn_ok(&["zone", "create", "z1"]);
    pool.keyturn_ok(&["zone", "create", "z2"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", "a"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "16M", "b"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "8M", "c"]);
    pool.keyturn_ok(&["volume", "delete", "c"]);
    pool
}

const RECORDS: u64 = 1 + 2 * 4 + 3 + 1;

#[test]
fn commands_are_recorded_and_verify() {
    let pool = busy_pool();
    // A refused command is recorded as failed.
    assert!(
        !pool
            .keyturn(&["volume", "create", "--zone", "nope", "--size", "4M", "d"])
            .status
            .success()
    );
    let o = verify(&pool.path(), false);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{} records", RECORDS + 1)),
        "{}",
        text(&o)
    );
    let (ok, v) = verify_json(&pool.path());
    assert!(ok);
    assert_eq!(v["records"], RECORDS + 1);
    assert_eq!(v["last_id"], RECORDS + 1);

    let recs: Vec<Value> = log_lines(&pool.path())
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "pool.init",
            "zone.create",
            "key.create",
            "key.create",
            "key.create",
            "zone.create",
            "key.create",
            "key.create",
            "key.create",
            "volume.create",
            "volume.create",
            "volume.create",
            "volume.delete",
            "volume.create",
        ]
    );
    let key_ids: Vec<&str> = recs[2..5]
        .iter()
        .map(|r| r["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(key_ids, ["z1-kek-v1", "z1-dek-v1", "z1-mac-v1"]);
    assert_eq!(recs[1]["zone"], "z1");
    assert_eq!(recs[1]["count"], 3);
    assert_eq!(recs[12]["volume"], "c");
    let last = &recs[13];
    assert_eq!(last["outcome"], "failed");
    assert!(last["error"].as_str().unwrap().contains("nope"), "{last}");
    assert_eq!(last["prev"], recs[12]["hash"]);
    assert!(
        recs.iter()
            .all(|r| r["time"].as_str().unwrap().ends_with('Z'))
    );

    // Serving records start and stop.
    let mut server = pool.serve();
    assert!(server.stop(), "server did not stop cleanly");
    let lines = log_lines(&pool.path());
    assert!(lines[lines.len() - 2].contains("\"serve.start\""));
    assert!(lines[lines.len() - 1].contains("\"serve.stop\""));
    assert!(verify(&pool.path(), false).status.success());
}

#[test]
fn an_edited_byte_is_named() {
    let pool = busy_pool();
    let mut lines = log_lines(&pool.path());
    // Record 10 is the first volume.create: change one byte of its size.
    assert!(lines[9].contains("\"volume.create\""), "{}", lines[9]);
    lines[9] = lines[9].replacen("\"count\":4096", "\"count\":4097", 1);
    write_lines(&pool.path(), &lines);
    assert_broken(&pool.path(), 10, 10, "edited");
    // Appending to a log broken in its middle is allowed (only the tail is
    // checked at open), but the break stays visible.
    pool.keyturn_ok(&["zone", "create", "z3"]);
    assert_broken(&pool.path(), 10, 10, "edited");
}

#[test]
fn a_deleted_line_is_named() {
    let pool = busy_pool();
    let mut lines = log_lines(&pool.path());
    lines.remove(4);
    write_lines(&pool.path(), &lines);
    // Line 5 now holds event 6, whose prev is event 5's hash.
    assert_broken(&pool.path(), 5, 6, "deleted");
}

#[test]
fn reordered_lines_are_named() {
    let pool = busy_pool();
    let mut lines = log_lines(&pool.path());
    lines.swap(9, 10);
    write_lines(&pool.path(), &lines);
    assert_broken(&pool.path(), 10, 11, "reordered");
}

#[test]
fn a_cut_tail_is_named_and_changes_are_refused() {
    let pool = busy_pool();
    let mut lines = log_lines(&pool.path());
    lines.truncate(lines.len() - 2);
    write_lines(&pool.path(), &lines);
    let n = lines.len() as u64;
    assert_broken(&pool.path(), n + 1, n + 1, "truncated");
    // The pool still opens (its data stays available) but a change that
    // would go unrecorded, or fork the chain, is refused.
    let o = pool.keyturn(&["zone", "create", "z3"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("audit log"), "{}", text(&o));
    pool.keyturn_ok(&["volume", "list"]);
}

#[test]
fn verify_of_a_missing_log_fails() {
    let dir = tempfile::tempdir().unwrap();
    let o = verify(dir.path(), false);
    assert!(!o.status.success());
    assert!(text(&o).contains("no audit log"), "{}", text(&o));
}

/// A SIGTERM sent the moment the server prints its first line (a service
/// manager or a script stopping a server it just started) stops it
/// cleanly: exit status 0 and a `serve.stop` record, every time. The
/// signal handlers used to be installed only after the ready line, and a
/// signal in between killed the process with the default action.
#[test]
fn sigterm_right_after_ready_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    const CYCLES: usize = 10;
    let pool = TestPool::new();
    for i in 0..CYCLES {
        let mut child = Command::new(keyturn_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--pool"])
            .arg(pool.path())
            .arg("--passphrase-file")
            .arg(&pool.pass_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keyturn serve");
        // Kept open until the child exits: its later lines must not meet EPIPE.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        assert!(first.starts_with("admin: "), "cycle {i}: {first:?}");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) takes no pointers; the pid is our own child,
        // not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        drop(stdout);
        assert!(status.success(), "cycle {i}: {status}");
    }
    let stops = log_lines(&pool.path())
        .iter()
        .filter(|l| l.contains("\"serve.stop\"") && l.contains("\"ok\""))
        .count();
    assert_eq!(stops, CYCLES, "one clean serve.stop per cycle");
}
