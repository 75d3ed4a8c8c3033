//! The shared black-box NBD conformance kit (`../shared/nbd-kit`, or the
//! directory in `KEYTURN_NBD_KIT`) against the real `keyturn serve`, with the
//! strict profile for our own server: every SHOULD-level warning is a
//! failure, block sizes must be advertised, TRIM must read back as zeros,
//! and every flag keyturn claims must be there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{TestPool, keyturn_bin, require_tool};

/// Where the kit is; a missing kit fails the test.
fn kit_dir() -> PathBuf {
    let dir = std::env::var_os("KEYTURN_NBD_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nbd-kit"));
    assert!(
        dir.join("run-all.sh").is_file() && dir.join("restart-persistence.sh").is_file(),
        "the NBD conformance kit is not at {} (set KEYTURN_NBD_KIT to its directory; tools/test.sh sets it to ../shared/nbd-kit)",
        dir.display()
    );
    dir
}

/// The client tools the kit drives.
fn require_kit_tools() {
    for t in [
        "python3", "qemu-io", "qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy", "fio", "timeout",
    ] {
        require_tool(t);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The kit's summary line (`NAME: N passed, N failed...`): the number failed and passed.
fn summary(output: &str, name: &str) -> Option<(u64, u64)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{name}: ")))?;
    let num = |word: &str| -> Option<u64> {
        let before = line.split(&format!(" {word}")).next()?;
        before.rsplit([' ', ',']).next()?.parse().ok()
    };
    Some((num("passed")?, num("failed")?))
}

/// Every kit log in `dir` that has a FAIL line, with those lines.
fn failing_checks(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let t = std::fs::read_to_string(&p).unwrap_or_default();
        let bad: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("FAIL") || l.trim_start().starts_with('|'))
            .collect();
        if !bad.is_empty() {
            out.push_str(&format!("--- {}\n{}\n", p.display(), bad.join("\n")));
        }
    }
    out
}

#[test]
fn nbd_kit_run_all_strict() {
    let kit = kit_dir();
    require_kit_tools();
    let pool = TestPool::with_volume("1G");
    let mut server = pool.serve();
    let results = pool.dir.path().join("kit-results");
    let uri = server.uri("vol0");
    let t = Instant::now();
    let out = Command::new("timeout")
        .args([
            "600",
            kit.join("run-all.sh").to_str().unwrap(),
            &uri,
            "1073741824",
        ])
        .env("STRICT", "1")
        .env("REQUIRE_BLOCK_SIZE", "1")
        .env("TRIM_READS_ZERO", "1")
        .env(
            "REQUIRE_FLAGS",
            "can_flush,can_fua,can_trim,can_zero,can_multi_conn,structured,base_allocation",
        )
        .env("RESULTS_DIR", &results)
        .env("SCRIPT_TIMEOUT", "300")
        .output()
        .expect("run run-all.sh");
    let output = text(&out);
    println!("{output}\n(run-all took {:?})", t.elapsed());
    let server_log = server.log.clone();
    let context = || {
        format!(
            "kit output:\n{output}\nfailed checks:\n{}\nserver log tail:\n{}",
            failing_checks(&results),
            tail(
                &std::fs::read_to_string(&server_log).unwrap_or_default(),
                30
            )
        )
    };
    assert!(
        out.status.success(),
        "run-all.sh exited with {}\n{}",
        out.status,
        context()
    );
    let (passed, failed) =
        summary(&output, "nbd-kit").unwrap_or_else(|| panic!("no summary line\n{}", context()));
    assert_eq!(failed, 0, "{}", context());
    assert_eq!(
        passed,
        6,
        "expected all 6 kit scripts to run and pass\n{}",
        context()
    );
    assert!(
        server.is_running(),
        "the server died during the kit run\n{}",
        context()
    );
    assert!(
        server.stop(),
        "the server did not stop cleanly after the kit\n{}",
        context()
    );
}

/// Kills the server the kit left running (by its pid file), and waits for it to go.
struct PidFileGuard(PathBuf);

impl PidFileGuard {
    fn kill(&self) {
        let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            return;
        };
        // Only the pid this test's START command wrote, and only if it is keyturn.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "keyturn" {
            return;
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        // Not our child, so no wait(): poll until every thread is gone. The
        // leader turns zombie while other threads (a kernel I/O worker, one
        // in fdatasync) may still be exiting and holding the pool's lock, so
        // a zombie counts as gone only once it is alone.
        let alive = || {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "));
            threads > 1 || (threads == 1 && !zombie)
        };
        let t = Instant::now();
        while alive() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn nbd_kit_restart_persistence() {
    let kit = kit_dir();
    require_kit_tools();
    let pool = TestPool::with_volume("256M");
    let port = free_port();
    let pid_file = pool.dir.path().join("server.pid");
    let log = pool.dir.path().join("server.log");
    let guard = PidFileGuard(pid_file.clone());
    let start = format!(
        "KEYTURN_LOG=info {bin} serve --listen 127.0.0.1:{port} --pool {pool} --passphrase-file {pass} >>{log} 2>&1 </dev/null & echo $! >{pid}",
        bin = shell_quote(&keyturn_bin()),
        pool = shell_quote(&pool.path()),
        pass = shell_quote(&pool.pass_file),
        log = shell_quote(&log),
        pid = shell_quote(&pid_file),
    );
    let stop = format!("kill -KILL $(cat {})", shell_quote(&pid_file));
    let uri = format!("nbd://127.0.0.1:{port}/vol0");
    let t = Instant::now();
    let out = Command::new("timeout")
        .args([
            "180",
            kit.join("restart-persistence.sh").to_str().unwrap(),
            &uri,
            "268435456",
            &start,
            &stop,
        ])
        .env("RESTART_WAIT", "30")
        .output()
        .expect("run restart-persistence.sh");
    let output = text(&out);
    println!("{output}\n(restart-persistence took {:?})", t.elapsed());
    let context = || {
        format!(
            "kit output:\n{output}\nserver log tail:\n{}",
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30)
        )
    };
    // The kit leaves the server running; end it before judging, so a failed
    // assertion never leaves a stray server behind.
    guard.kill();
    assert!(
        out.status.success(),
        "restart-persistence.sh exited with {}\n{}",
        out.status,
        context()
    );
    let (passed, failed) = summary(&output, "restart-persistence")
        .unwrap_or_else(|| panic!("no summary line\n{}", context()));
    assert_eq!(failed, 0, "{}", context());
    assert!(passed >= 10, "only {passed} checks passed\n{}", context());
    // After all those SIGKILLs the pool still opens offline and lists its volume.
    let listed = pool.keyturn_ok(&["volume", "list", "--json"]);
    assert!(
        listed.contains("\"vol0\""),
        "volume list after the kit: {listed}"
    );
}
