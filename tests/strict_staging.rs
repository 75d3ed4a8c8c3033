//! The policy's `staging_full` choice through the real binary, with a
//! staging area of 1 MiB that the pipeline fills in an open window:
//! unstaged (the default) acknowledges at once and counts the write;
//! strict with a 1 s bound falls back after it, counted, alerted and in
//! the metrics; strict with a long bound waits (the write is not
//! acknowledged) until the flip's destaging frees space, and is then
//! staged. Every byte written reads back.

mod common;
#[path = "common/sched.rs"]
mod sched;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sched::*;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

fn status_u64(pool: &TestPool, key: &str) -> u64 {
    rotation(pool, "z1")[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing"))
}

/// Zone z1's policy: strict staging-full mode, waiting up to `wait`.
fn set_strict_wait(pool: &TestPool, wait: &str) {
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        "z1",
        "--staging-full",
        "strict",
        "--strict-wait",
        wait,
    ]);
}

#[test]
fn strict_writes_wait_for_staging_and_fall_back_after_the_bound() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let pool = TestPool::with_volume("8M");
    set_toml(
        &pool,
        "rotation",
        &[("staging_capacity_mib", "1"), ("staging_reserve_mib", "0")],
    );
    let server = pool.serve();
    let uri = server.uri("vol0");
    let dir = pool.dir.path();
    // Unique content (no dedup): 2 MiB, twice the staging area.
    let base = pattern_bytes(1, 2 * MIB);
    let base_file = write_file(dir, "base", &base);
    qio_ok(&uri, &[&format!("write -s {} 0 2M", base_file.display())]);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    wait_until("the pipeline to fill staging", 30, || {
        rotation(&pool, "z1")["staging_free_bytes"] == 0
    });

    // Default (unstaged): acknowledged without waiting, 16 blocks counted.
    let a = pattern_bytes(2, 64 * KIB);
    let a_file = write_file(dir, "a", &a);
    qio_ok(&uri, &[&format!("write -s {} 4M 64k", a_file.display())]);
    assert_eq!(status_u64(&pool, "unstaged_writes"), 16);
    assert_eq!(status_u64(&pool, "strict_fallbacks"), 0);

    // Strict, 1 s bound: falls back after it, counted and alerted.
    set_strict_wait(&pool, "1s");
    let b = pattern_bytes(3, 64 * KIB);
    let b_file = write_file(dir, "b", &b);
    qio_ok(&uri, &[&format!("write -s {} 5M 64k", b_file.display())]);
    assert_eq!(status_u64(&pool, "strict_fallbacks"), 1);
    assert_eq!(status_u64(&pool, "unstaged_writes"), 32);
    assert_eq!(status_u64(&pool, "strict_waited_writes"), 0);
    let m = scrape_metrics(&pool, &server);
    assert_eq!(
        metric(&m, "keyturn_rotation_strict_fallbacks_total{zone=\"z1\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "keyturn_rotation_strict_fallbacks{zone=\"z1\"}"),
        Some(1.0)
    );
    let log = server.log_text();
    assert!(
        log.contains("ALERT: staging stayed full for a strict write"),
        "{log}"
    );

    // Strict, 30 s bound: the write waits while staging is full...
    set_strict_wait(&pool, "30s");
    let c = pattern_bytes(4, 64 * KIB);
    let c_file = write_file(dir, "c", &c);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} 6M 64k", c_file.display()))
        .arg(&uri)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "a strict write was acknowledged while staging was full"
    );
    assert_eq!(status_u64(&pool, "unstaged_writes"), 32);
    // ...until the flip's destaging frees space: then it is staged.
    pool.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{out:?}"
    );
    assert_eq!(status_u64(&pool, "strict_waited_writes"), 1);
    assert_eq!(status_u64(&pool, "strict_fallbacks"), 1);
    assert_eq!(status_u64(&pool, "unstaged_writes"), 32);

    wait_until("the migration to end", 60, || {
        let s = rotation(&pool, "z1");
        s["phase"] == "idle" || s["phase"] == "grace"
    });
    // Every byte reads back, under the new key.
    let image = dir.join("image.raw");
    run_ok("nbdcopy", &[&uri, image.to_str().unwrap()]);
    let got = std::fs::read(&image).unwrap();
    assert_eq!(got.len(), 8 * MIB);
    assert!(got[..2 * MIB] == base[..], "base region differs");
    assert!(
        got[4 * MIB..4 * MIB + 64 * KIB] == a[..],
        "unstaged write differs"
    );
    assert!(
        got[5 * MIB..5 * MIB + 64 * KIB] == b[..],
        "fallback write differs"
    );
    assert!(
        got[6 * MIB..6 * MIB + 64 * KIB] == c[..],
        "strict write differs"
    );
    assert!(got[2 * MIB..4 * MIB].iter().all(|&x| x == 0));
}
