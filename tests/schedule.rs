//! The rotation scheduler through the real binary, with the test clock
//! (`KEYTURN_TEST_CLOCK`) moved months ahead in seconds: a due DEK rotates
//! inside its maintenance window and not before, a severely overdue one
//! bypasses the window, three due zones under a cap of two never rotate
//! three at once, and a kill -9 in the middle of a scheduled rotation
//! loses nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DAY: u64 = 86_400;
const MIB: u64 = 1 << 20;

/// The test clock file: Unix seconds, replaced atomically.
struct TestClock(PathBuf);

impl TestClock {
    fn new(pool: &TestPool) -> Self {
        let c = TestClock(pool.dir.path().join("clock"));
        c.set(real_now());
        c
    }

    fn set(&self, t: u64) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, t.to_string()).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    fn env(&self) -> (&'static str, &str) {
        ("KEYTURN_TEST_CLOCK", self.0.to_str().unwrap())
    }
}

/// A test pool whose scheduler checks every 200 ms and may use the clock.
fn test_pool(zones: &[&str], size: &str) -> (TestPool, TestClock) {
    let pool = TestPool::new();
    for z in zones {
        pool.keyturn_ok(&["zone", "create", z]);
        pool.keyturn_ok(&[
            "volume",
            "create",
            "--zone",
            z,
            "--size",
            size,
            &format!("{z}-vol"),
        ]);
    }
    set_toml(&pool, "test", &[("allow_test_clock", "true")]);
    set_toml(&pool, "schedule", &[("check_interval_ms", "200")]);
    let clock = TestClock::new(&pool);
    (pool, clock)
}

fn serve(pool: &TestPool, clock: &TestClock) -> Server {
    pool.serve_env(&[], &[clock.env()])
}

/// Every zone: a 2 h window at 02:00 UTC, DEK 90d (30d grace), KEK a year
/// (so only DEKs are due in these tests).
fn set_policy(pool: &TestPool, zone: &str) {
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        zone,
        "--preset",
        "90d",
        "--kek-cryptoperiod",
        "365d",
        "--kek-grace",
        "30d",
        // These tests are about data keys: the MAC key outlives them.
        "--mac-cryptoperiod",
        "365d",
        "--mac-grace",
        "30d",
        "--window-start",
        "02:00",
        "--window-duration",
        "2h",
        "--window-days",
        "all",
    ]);
}

fn rotation(pool: &TestPool, zone: &str) -> Value {
    keyturn_json(pool, &["rotate", "status", "--zone", zone, "--json"])
}

fn schedule(pool: &TestPool) -> Value {
    keyturn_json(pool, &["scheduler", "schedule", "--json"])
}

fn jobs(s: &Value) -> Vec<Value> {
    s["jobs"].as_array().cloned().unwrap_or_default()
}

/// `GET path` of the admin API with the pool's admin token, as JSON.
fn api_get(pool: &TestPool, server: &Server, path: &str) -> Value {
    let addr = server.admin.clone().expect("an `admin:` line");
    let mut r = http_agent()
        .get(format!("http://{addr}{path}"))
        .header("Authorization", format!("Bearer {}", admin_token(pool)))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

/// The start of the UTC day `days` days after `t`.
fn midnight_after(t: u64, days: u64) -> u64 {
    (t + days * DAY) / DAY * DAY
}

fn count(events: &[Value], action: &str, zone: &str) -> usize {
    events
        .iter()
        .filter(|e| e["action"] == action && e["zone"] == zone)
        .count()
}

#[test]
fn the_test_clock_is_refused_on_a_pool_that_does_not_allow_it() {
    let pool = TestPool::new();
    let clock = TestClock(pool.dir.path().join("clock"));
    clock.set(real_now());
    let out = Command::new(keyturn_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--pool"])
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(&pool.pass_file)
        .env("KEYTURN_TEST_CLOCK", &clock.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served with a test clock: {err}");
    assert!(err.contains("allow_test_clock = true"), "{err}");
}

#[test]
fn a_due_dek_rotates_inside_its_window_and_not_before() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let t0 = real_now();
    let server = serve(&pool, &clock);
    assert!(server.log_text().contains("TEST CLOCK ON"));
    set_policy(&pool, "z1");
    // A policy that cannot be kept is refused with what to change.
    let out = pool.keyturn(&["policy", "set", "--zone", "z1", "--dek-grace", "120d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--dek-grace to at most 90d"),
        "{err}"
    );
    let p = keyturn_json(&pool, &["policy", "show", "--zone", "z1", "--json"]);
    assert_eq!(p["policy"]["dek"]["grace"], "30d", "{p}");
    assert_eq!(p["source"], "zone");

    // 95 days on, half past midnight: due, but the window opens at 02:00.
    let day = midnight_after(t0, 95);
    clock.set(day + 1800);
    wait_until("the due DEK to be queued", 20, || {
        jobs(&schedule(&pool))
            .iter()
            .any(|j| j["zone"] == "z1" && j["kind"] == "dek" && j["urgency"] == "due")
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = schedule(&pool);
    let j = &jobs(&s)[0];
    assert_eq!(j["state"], "queued", "started outside the window: {s}");
    let st = rotation(&pool, "z1");
    assert_eq!(st["phase"], "idle", "{st}");
    assert_eq!(st["active_version"], 1);

    // 02:10: inside the window.
    clock.set(day + 2 * 3600 + 600);
    let mut st = Value::Null;
    wait_until("the scheduled rotation to flip and finish", 60, || {
        st = rotation(&pool, "z1");
        st["active_version"] == 2 && st["phase"] == "grace"
    });
    let flipped = st["flipped_unix"].as_u64().unwrap();
    assert!(
        (day + 2 * 3600..day + 4 * 3600).contains(&flipped),
        "flipped at {flipped}, outside the window {}..{}",
        day + 2 * 3600,
        day + 4 * 3600
    );
    // The old key waits out the policy's 30-day grace, on the test clock.
    let destroy = st["destroy_at_unix"].as_u64().unwrap();
    assert!(destroy >= day + 2 * 3600 + 30 * DAY - 60, "{st}");
    wait_until("the job to leave the schedule", 20, || {
        jobs(&schedule(&pool)).is_empty()
    });
    let events = audit_records(&pool);
    assert_eq!(count(&events, "schedule.dek.start", "z1"), 1);
    assert_eq!(count(&events, "schedule.dek.done", "z1"), 1);
    // Not due again for another 90 days.
    clock.set(day + 3 * 3600);
    std::thread::sleep(Duration::from_secs(1));
    assert!(jobs(&schedule(&pool)).is_empty());
}

#[test]
fn a_severely_overdue_dek_bypasses_the_window_and_pause_holds_it() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let t0 = real_now();
    let _server = serve(&pool, &clock);
    set_policy(&pool, "z1");
    pool.keyturn_ok(&["scheduler", "pause"]);
    // 140 days (over 150% of 90): severely overdue, at 00:30, outside the window.
    let day = midnight_after(t0, 140);
    clock.set(day + 1800);
    wait_until("the severe DEK to be queued", 20, || {
        jobs(&schedule(&pool))
            .iter()
            .any(|j| j["zone"] == "z1" && j["urgency"] == "severely_overdue")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rotation(&pool, "z1")["active_version"],
        1,
        "started while paused"
    );
    let status = keyturn_json(&pool, &["scheduler", "status", "--json"]);
    assert_eq!(status["paused"], true, "{status}");
    // On hold, a resume still starts nothing in the zone.
    pool.keyturn_ok(&["policy", "hold", "--zone", "z1"]);
    pool.keyturn_ok(&["scheduler", "resume"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rotation(&pool, "z1")["active_version"],
        1,
        "started while held"
    );
    pool.keyturn_ok(&["policy", "release", "--zone", "z1"]);
    let mut st = Value::Null;
    wait_until("the severe rotation", 60, || {
        st = rotation(&pool, "z1");
        // The flip time is saved just after the flip record: wait for both.
        st["active_version"] == 2 && st["flipped_unix"].is_u64()
    });
    let flipped = st["flipped_unix"].as_u64().unwrap();
    assert!(
        flipped < day + 2 * 3600,
        "waited for the window: flipped at {flipped}"
    );
    let events = audit_records(&pool);
    for a in [
        "schedule.pause",
        "schedule.resume",
        "schedule.hold",
        "schedule.release",
    ] {
        assert!(
            events.iter().any(|e| e["action"] == a),
            "no {a} in the audit log"
        );
    }
}

/// Writes `mib` MiB with fio's verification pattern to `zone`'s volume.
fn fill(server: &Server, zone: &str, mib: u64, out: &Path) {
    let (ok, text) = fio(
        &server.uri(&format!("{zone}-vol")),
        1,
        mib * MIB,
        1,
        out,
        &[],
    );
    assert!(ok && fio_errors(&text).iter().all(|&e| e == 0), "{text}");
}

/// Rotations throttled to 1 MiB/s even on idle volumes, so that one takes
/// seconds.
fn slow_rotation(pool: &TestPool) {
    set_toml(
        pool,
        "rotation",
        &[
            ("rate_mib_s", "1"),
            ("idle_after_ms", "86400000"),
            ("batch_blocks", "64"),
        ],
    );
}

#[test]
fn three_due_zones_under_a_cap_of_two_never_rotate_three_at_once() {
    require_tool("fio");
    let zones = ["z1", "z2", "z3"];
    let (pool, clock) = test_pool(&zones, "16M");
    slow_rotation(&pool);
    let t0 = real_now();
    let server = serve(&pool, &clock);
    for z in zones {
        set_policy(&pool, z);
        fill(
            &server,
            z,
            3,
            &pool.dir.path().join(format!("fio-{z}.json")),
        );
    }
    let day = midnight_after(t0, 95);
    let mut max_running = 0;
    let mut max_busy = 0;
    let mut now = day + 2 * 3600 + 60;
    wait_until("all three zones to rotate", 180, || {
        // Time goes on (5 s a poll): each rotation flips after its planned
        // staging time, inside the window.
        now += 5;
        clock.set(now);
        let s = schedule(&pool);
        let running = jobs(&s).iter().filter(|j| j["state"] == "running").count();
        max_running = max_running.max(running);
        let states: Vec<Value> = zones.iter().map(|z| rotation(&pool, z)).collect();
        let busy = states
            .iter()
            .filter(|st| ["window", "migrating", "paused"].contains(&st["phase"].as_str().unwrap()))
            .count();
        max_busy = max_busy.max(busy);
        states
            .iter()
            .all(|st| st["active_version"] == 2 && st["phase"] == "grace")
    });
    assert!(
        max_running <= 2,
        "{max_running} scheduled rotations ran at once"
    );
    assert!(max_busy <= 2, "{max_busy} zones were rotating at once");
    // The audit log in order: windows opened minus migrations finished never exceeds 2.
    let mut open = 0i64;
    let mut peak = 0;
    for e in audit_records(&pool) {
        match e["action"].as_str() {
            Some("rotation.prepare") => open += 1,
            Some("rotation.migrated") => open -= 1,
            _ => {}
        }
        peak = peak.max(open);
    }
    assert_eq!(peak, 2, "peak of concurrent rotations in the audit log");
    assert!(now < day + 4 * 3600, "the rotations outran the window");
    drop(server);
}

#[test]
fn kill_9_in_a_scheduled_rotation_resumes_and_loses_nothing() {
    require_tool("fio");
    let (pool, clock) = test_pool(&["z1"], "64M");
    slow_rotation(&pool);
    let t0 = real_now();
    let mut server = serve(&pool, &clock);
    set_policy(&pool, "z1");
    let region = 12 * MIB;
    let out = pool.dir.path().join("fio.json");
    fill(&server, "z1", 12, &out);
    // Severely overdue: starts at once.
    clock.set(midnight_after(t0, 140) + 1800);
    wait_until("the rotation to be migrating", 60, || {
        let st = rotation(&pool, "z1");
        st["phase"] == "migrating" && st["migrated_blocks"].as_u64().unwrap() > 0
    });
    server.kill9();
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(pool.path().join("schedule.json")).unwrap()).unwrap();
    assert_eq!(jobs(&on_disk)[0]["state"], "running", "{on_disk}");

    let server = serve(&pool, &clock);
    let mut st = Value::Null;
    wait_until("the rotation to finish after the restart", 120, || {
        st = rotation(&pool, "z1");
        st["phase"] == "grace"
    });
    assert_eq!(st["active_version"], 2, "{st}");
    assert_eq!(st["remaining_blocks"], 0, "{st}");
    wait_until("the job to leave the schedule", 20, || {
        jobs(&schedule(&pool)).is_empty()
    });
    // One rotation, not two: the restart followed it rather than starting another.
    let events = audit_records(&pool);
    assert_eq!(count(&events, "rotation.prepare", "z1"), 1);
    assert_eq!(count(&events, "schedule.dek.start", "z1"), 1);
    fio_verify(
        &server.uri("z1-vol"),
        1,
        region,
        &out,
        "data after kill -9 and the resumed rotation",
    );
}

#[test]
fn a_due_kek_is_rewrapped_by_the_scheduler_without_waiting_for_the_window() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let t0 = real_now();
    let _server = serve(&pool, &clock);
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        "z1",
        "--preset",
        "365d",
        "--kek-cryptoperiod",
        "30d",
        "--kek-grace",
        "7d",
        "--kek-batch",
        "1",
        "--kek-pause",
        "1s",
    ]);
    let p = keyturn_json(&pool, &["policy", "show", "--zone", "z1", "--json"]);
    assert_eq!(p["policy"]["kek_pause"], "1s", "{p}");
    assert_eq!(
        p["policy"]["preset"],
        Value::Null,
        "a changed preset is no longer the preset: {p}"
    );
    // A zone created while serving has a rotation and is looked at.
    pool.keyturn_ok(&["zone", "create", "z2"]);
    assert_eq!(rotation(&pool, "z2")["phase"], "idle");
    wait_until("the scheduler to look at both zones", 20, || {
        keyturn_json(&pool, &["scheduler", "status", "--json"])["last_check"]["zones"] == 2
    });
    // 40 days on, at noon: outside the DEK window, which a KEK does not need.
    clock.set(midnight_after(t0, 40) + 12 * 3600);
    let kek_v2_active = || {
        let keys = keyturn_json(&pool, &["keys", "list", "--zone", "z1", "--json"]);
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == "z1-kek-v2" && k["state"] == "active")
    };
    wait_until("the scheduled KEK rotation", 60, kek_v2_active);
    wait_until("the job to leave the schedule", 20, || {
        jobs(&schedule(&pool)).is_empty()
    });
    let st = rotation(&pool, "z1");
    assert_eq!(st["active_version"], 1, "the DEK is not due: {st}");
    let events = audit_records(&pool);
    assert_eq!(count(&events, "schedule.kek.start", "z1"), 1);
    assert_eq!(count(&events, "schedule.kek.done", "z1"), 1);
    assert_eq!(count(&events, "kek.rotate", "z1"), 1);
}

#[test]
fn a_due_mac_key_is_rotated_retagged_and_destroyed_by_the_scheduler() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let t0 = real_now();
    let server = serve(&pool, &clock);
    let uri = server.uri("z1-vol");
    // Content shared three times and content of its own.
    qio_ok(
        &uri,
        &[
            "write -P 0x31 0 1M",
            "write -P 0x31 1M 1M",
            "write -P 0x31 2M 1M",
            "write -P 0x32 3M 1M",
            "flush",
        ],
    );
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        "z1",
        "--preset",
        "365d",
        "--mac-cryptoperiod",
        "30d",
        "--mac-grace",
        "7d",
    ]);
    let mac = || keyturn_json(&pool, &["mac", "status", "--zone", "z1", "--json"]);
    assert_eq!(mac()["active_version"], 1);
    // 20 days on: not due; 40 days on (noon, outside any DEK window): due.
    clock.set(t0 + 20 * DAY);
    wait_until("a check at day 20", 20, || {
        keyturn_json(&pool, &["scheduler", "status", "--json"])["last_check"]["at_unix"].as_u64()
            >= Some(t0 + 20 * DAY)
    });
    assert!(jobs(&schedule(&pool)).is_empty(), "{}", schedule(&pool));
    let health = api_get(&pool, &server, "/api/v1/key-rotation/health");
    let mac_health = health["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["zone"] == "z1" && k["purpose"] == "mac")
        .cloned()
        .unwrap_or_else(|| panic!("health lists the MAC key: {health}"));
    assert_eq!(mac_health["state"], "ok", "{mac_health}");
    clock.set(midnight_after(t0, 40) + 12 * 3600);
    wait_until("the re-tag pass to end", 60, || {
        let st = mac();
        st["active_version"] == 2 && st["retiring_versions"] == serde_json::json!([])
    });
    wait_until("the job to leave the schedule", 20, || {
        jobs(&schedule(&pool)).is_empty()
    });
    let st = mac();
    assert_eq!(st["blocks_retiring"], 0, "{st}");
    assert_eq!(st["blocks_active"], 2, "two distinct contents: {st}");
    let keys = keyturn_json(&pool, &["keys", "list", "--zone", "z1", "--json"]);
    let state = |id: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .map(|k| k["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state("z1-mac-v1").as_deref(), Some("destroyed"), "{keys}");
    assert_eq!(state("z1-mac-v2").as_deref(), Some("active"), "{keys}");
    assert_eq!(
        rotation(&pool, "z1")["active_version"],
        1,
        "the DEK is not due"
    );
    let events = audit_records(&pool);
    assert_eq!(count(&events, "schedule.mac.start", "z1"), 1);
    assert_eq!(count(&events, "schedule.mac.done", "z1"), 1);
    assert_eq!(count(&events, "mac.rotate", "z1"), 1);
    // Every block reads back, and new copies still share the re-tagged content.
    qio_ok(
        &uri,
        &[
            "read -P 0x31 0 3M",
            "read -P 0x32 3M 1M",
            "write -P 0x31 4M 1M",
            "flush",
        ],
    );
    assert_eq!(mac()["blocks_active"], 2, "dedup under the new MAC key");
}

#[test]
fn a_root_key_past_its_lifetime_is_alerted_once_per_step_until_rotated() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let t0 = real_now();
    let server = serve(&pool, &clock);
    // The zone's own keys are not what this test is about.
    pool.keyturn_ok(&["policy", "hold", "--zone", "z1"]);
    let root = || api_get(&pool, &server, "/api/v1/key-rotation/health");
    let checked_at = |t: u64| {
        wait_until("a check at the clock's time", 20, || {
            keyturn_json(&pool, &["scheduler", "status", "--json"])["last_check"]["at_unix"]
                .as_u64()
                >= Some(t)
        })
    };
    // The default root key lifetime is a year: at 300 days it is fine.
    clock.set(t0 + 300 * DAY);
    checked_at(t0 + 300 * DAY);
    let h = root();
    assert_eq!(h["root_key"]["state"], "ok", "{h}");
    assert_eq!(h["root_key"]["cryptoperiod_secs"], 365 * DAY, "{h}");
    let due_in = h["root_key"]["due_in_secs"].as_i64().unwrap();
    assert!((64 * DAY as i64..=65 * DAY as i64).contains(&due_in), "{h}");
    // At 400 days: due, one alert however many checks see it.
    clock.set(t0 + 400 * DAY);
    checked_at(t0 + 400 * DAY);
    std::thread::sleep(Duration::from_secs(1));
    let h = root();
    assert_eq!(h["root_key"]["state"], "due", "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["problems"].to_string().contains("the root key is due"),
        "{h}"
    );
    let alerts = |pool: &TestPool| {
        audit_records(pool)
            .iter()
            .filter(|e| e["action"] == "schedule.root.due")
            .count()
    };
    assert_eq!(alerts(&pool), 1);
    assert!(
        server
            .log_text()
            .contains("ALERT: the root key is past its cryptoperiod"),
        "{}",
        server.log_text()
    );
    // Past 150%: alerted again, once.
    clock.set(t0 + 560 * DAY);
    checked_at(t0 + 560 * DAY);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(root()["root_key"]["state"], "severely_overdue");
    assert_eq!(alerts(&pool), 2);
    // The operator rotates it (on the real clock): ok again.
    let new_pass = write_file(pool.dir.path(), "new-pass", b"the next root passphrase");
    pool.keyturn_ok(&[
        "keys",
        "rotate-root",
        "--new-passphrase-file",
        new_pass.to_str().unwrap(),
    ]);
    clock.set(real_now() + DAY);
    checked_at(real_now() + DAY);
    let h = root();
    assert_eq!(h["root_key"]["state"], "ok", "{h}");
    assert!(
        h["root_key"]["age_secs"].as_u64().unwrap() <= DAY + 60,
        "{h}"
    );
    assert_eq!(alerts(&pool), 2);
}

// ------------------------------------------------------------ predictive window

/// The test clock running at real speed from `base` (the staging pipeline
/// works in real time, so plans of real throughput need calendar time to
/// pass at the same pace), until dropped.
struct RunningClock {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningClock {
    fn start(clock: &TestClock, base: u64) -> Self {
        let path = clock.0.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let c = TestClock(path);
            let t0 = Instant::now();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                c.set(base + t0.elapsed().as_secs());
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RunningClock {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RunningClock {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The zone's active DEK activation time.
fn dek_since(pool: &TestPool, zone: &str) -> u64 {
    let p = keyturn_json(pool, &["rotate", "plan", "--zone", zone, "--json"]);
    p["active_dek_since_unix"].as_u64().unwrap()
}

/// `HH:MM` of the minute of day of `t`, moved by `offset` seconds.
fn hhmm(t: u64, offset: i64) -> String {
    let s = ((t % DAY) as i64 / 60 * 60 + offset).rem_euclid(DAY as i64);
    format!("{:02}:{:02}", s / 3600, s % 3600 / 60)
}

#[test]
fn the_window_opens_early_enough_for_throttled_staging_to_meet_the_target() {
    require_tool("fio");
    let (pool, clock) = test_pool(&["z1"], "32M");
    slow_rotation(&pool);
    let server = serve(&pool, &clock);
    fill(&server, "z1", 6, &pool.dir.path().join("fio.json"));
    // Critical sensitivity: a quarter of 90 days, and a 40% margin. The
    // maintenance window holds the deadline, so the flip is at the deadline.
    let deadline = dek_since(&pool, "z1") + 90 * DAY / 4;
    set_policy(&pool, "z1");
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        "z1",
        "--sensitivity",
        "critical",
        "--window-start",
        &hhmm(deadline, -3600),
        "--window-duration",
        "2h",
    ]);
    clock.set(deadline - 30);
    let plan = keyturn_json(&pool, &["rotate", "plan", "--zone", "z1", "--json"]);
    let (i, p) = (&plan["inputs"], &plan["prediction"]);
    assert_eq!(i["deadline"], deadline, "{plan}");
    assert_eq!(i["rate_source"], "pool_throttle", "{plan}");
    assert_eq!(
        i["census"]["rest"], 1536,
        "6 MiB of unshared, cold blocks: {plan}"
    );
    assert_eq!(p["flip_at"], deadline, "{plan}");
    // 6 MiB at 1 MiB/s is 6 s, plus 40%.
    assert_eq!(p["staging_secs"], 6, "{plan}");
    assert_eq!(p["open_at"], deadline - 6 - 3, "{plan}");
    let text = pool.keyturn_ok(&["rotate", "plan", "--zone", "z1"]);
    assert!(
        text.contains("window opens") && text.contains("1536"),
        "{text}"
    );

    let _running = RunningClock::start(&clock, deadline - 30);
    let mut st = Value::Null;
    wait_until("the planned rotation to flip", 60, || {
        st = rotation(&pool, "z1");
        st["active_version"] == 2 && st["flipped_unix"].is_u64()
    });
    let opened = st["window_opened_unix"].as_u64().unwrap();
    let flipped = st["flipped_unix"].as_u64().unwrap();
    assert!(
        (deadline - 12..=deadline - 6).contains(&opened),
        "the window opened at deadline{:+} s",
        opened as i64 - deadline as i64
    );
    assert!(
        (deadline..=deadline + 1).contains(&flipped),
        "flipped at deadline{:+} s",
        flipped as i64 - deadline as i64
    );
    let mut rec = Value::Null;
    wait_until("the coverage record of the flip", 20, || {
        rec = schedule(&pool)["flips"]["z1"].clone();
        rec.is_object()
    });
    assert_eq!(rec["met"], true, "{rec}");
    assert_eq!(rec["achieved_percent"], 100.0, "{rec}");
    assert_eq!(rec["target_blocks"], 1536, "{rec}");
    assert!(rec["predicted_percent"].as_f64().unwrap() >= 100.0, "{rec}");
    let events = audit_records(&pool);
    let cov: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "schedule.dek.coverage")
        .collect();
    assert_eq!(cov.len(), 1);
    assert_eq!(cov[0]["outcome"], "ok", "{}", cov[0]);
    assert_eq!(cov[0]["count"], 1536, "{}", cov[0]);
    wait_until("the migration to finish", 60, || {
        rotation(&pool, "z1")["phase"] == "grace"
    });
    fio_verify(
        &server.uri("z1-vol"),
        1,
        6 * MIB,
        &pool.dir.path().join("fio.json"),
        "data after the planned rotation",
    );
}

#[test]
fn a_doubled_write_rate_mid_window_moves_the_flip_and_the_target_is_still_met() {
    require_tool("fio");
    let (pool, clock) = test_pool(&["z1"], "64M");
    slow_rotation(&pool);
    let t0 = real_now();
    let server = serve(&pool, &clock);
    set_policy(&pool, "z1");
    fill(&server, "z1", 8, &pool.dir.path().join("fill.json"));
    // Overdue (95 days): the flip may move up to the end of today's window.
    // Planned without writes: 8 s of staging and 2 s of margin before 02:00.
    let w = midnight_after(t0, 95) + 2 * 3600;
    let _running = RunningClock::start(&clock, w - 15);
    // Writes of 512 KiB/s on their own regions.
    let writer = |name: &str| {
        let uri = server.uri("z1-vol");
        let out = pool.dir.path().join(format!("{name}.json"));
        let offset = if name == "w1" {
            "--offset=32M"
        } else {
            "--offset=48M"
        };
        std::thread::spawn(move || {
            fio(
                &uri,
                1,
                8 * MIB,
                1,
                &out,
                &[offset, "--rate=512k", "--time_based", "--runtime=10"],
            )
        })
    };
    wait_until("the window to open", 40, || {
        rotation(&pool, "z1")["phase"] == "window"
    });
    let first_flip = jobs(&schedule(&pool))[0]["flip_at_unix"].as_u64().unwrap();
    assert_eq!(first_flip, w, "planned to flip at the window's start");
    // Writes start in the window, and their rate doubles a second later.
    let w1 = writer("w1");
    std::thread::sleep(Duration::from_secs(1));
    let w2 = writer("w2");
    let mut st = Value::Null;
    wait_until("the flip", 60, || {
        st = rotation(&pool, "z1");
        st["active_version"] == 2 && st["flipped_unix"].is_u64()
    });
    let flipped = st["flipped_unix"].as_u64().unwrap();
    let events = audit_records(&pool);
    let replans = count(&events, "schedule.dek.replan", "z1");
    assert!(replans >= 1, "no re-plan moved the flip");
    assert!(
        flipped > first_flip,
        "flipped at {flipped}, first planned {first_flip}"
    );
    assert!(flipped < w + 3600, "flipped after the window");
    let mut rec = Value::Null;
    wait_until("the coverage record of the flip", 20, || {
        rec = schedule(&pool)["flips"]["z1"].clone();
        rec.is_object()
    });
    // Met, or flipped at the latest moment and migration finishes the rest.
    let plan = keyturn_json(&pool, &["rotate", "plan", "--zone", "z1", "--json"]);
    assert!(
        rec["met"] == true || flipped >= w + 3600 - 1,
        "missed the target without reaching the window's end: {rec} {plan}"
    );
    for h in [w1, w2] {
        let (ok, text) = h.join().unwrap();
        assert!(ok && fio_errors(&text).iter().all(|&e| e == 0), "{text}");
    }
    wait_until("the migration to finish", 60, || {
        let st = rotation(&pool, "z1");
        st["phase"] == "grace" && st["remaining_blocks"] == 0
    });
    fio_verify(
        &server.uri("z1-vol"),
        1,
        8 * MIB,
        &pool.dir.path().join("fill.json"),
        "data after the re-planned rotation",
    );
}

#[test]
fn heat_survives_a_restart_and_the_plan_still_sees_hot_blocks() {
    let (pool, clock) = test_pool(&["z1"], "16M");
    let mut server = serve(&pool, &clock);
    let uri = server.uri("z1-vol");
    // 32 distinct blocks; the first 16 read ten times: hot.
    let writes: Vec<String> = (0..32)
        .map(|i| format!("write -P {} {} 4k", i + 1, i * 4096))
        .collect();
    qio_ok(&uri, &writes.iter().map(String::as_str).collect::<Vec<_>>());
    for _ in 0..10 {
        qio_ok(&uri, &["read 0 64k"]);
    }
    let hot = |pool: &TestPool| -> u64 {
        let p = keyturn_json(pool, &["rotate", "plan", "--zone", "z1", "--json"]);
        p["inputs"]["census"]["hot"].as_u64().unwrap()
    };
    assert_eq!(hot(&pool), 16);
    assert!(server.stop(), "clean stop");
    let _server = serve(&pool, &clock);
    assert_eq!(hot(&pool), 16, "heat lost in the restart");
}

#[test]
fn an_emergency_preempts_the_cap_and_the_queue() {
    require_tool("fio");
    let zones = ["z1", "z2", "z3"];
    let (pool, clock) = test_pool(&zones, "16M");
    slow_rotation(&pool);
    set_toml(&pool, "schedule", &[("max_concurrent", "1")]);
    let t0 = real_now();
    let server = serve(&pool, &clock);
    for z in zones {
        set_policy(&pool, z);
    }
    for z in ["z1", "z2"] {
        fill(
            &server,
            z,
            2,
            &pool.dir.path().join(format!("fio-{z}.json")),
        );
    }
    // Inside the window, with the clock standing still: z1 takes the one
    // slot and waits for its flip; z2 and z3 queue behind it.
    clock.set(midnight_after(t0, 95) + 2 * 3600 + 60);
    wait_until("z1 to run and the others to queue", 30, || {
        let s = jobs(&schedule(&pool));
        s.len() == 3
            && s.iter().filter(|j| j["state"] == "running").count() == 1
            && s.iter()
                .any(|j| j["zone"] == "z1" && j["state"] == "running")
    });
    pool.keyturn_ok(&[
        "threat", "raise", "--zone", "z3", "--level", "critical", "--reason", "drill",
    ]);
    let mut st = Value::Null;
    wait_until("the emergency rotation of z3", 30, || {
        st = rotation(&pool, "z3");
        st["active_version"] == 2
    });
    assert_eq!(st["emergency"], true, "{st}");
    let s = schedule(&pool);
    let state = |z: &str| {
        jobs(&s)
            .into_iter()
            .find(|j| j["zone"] == z)
            .map(|j| j["state"].clone())
    };
    assert_eq!(rotation(&pool, "z1")["phase"], "window", "z1 kept its slot");
    assert_eq!(state("z1"), Some("running".into()), "{s}");
    assert_eq!(
        state("z2"),
        Some("queued".into()),
        "z2 stays behind the cap: {s}"
    );
    assert_eq!(rotation(&pool, "z2")["active_version"], 1);
}
