//! A scheduled DEK rotation whose start fails, through the real binary
//! with the test clock: the staging device fails its writes
//! (`KEYTURN_FAULTS`, the store's fault injection), so `prepare` is
//! refused; the scheduler retries with exponential backoff up to
//! `[schedule] max_attempts`, then marks the job failed, logs an ALERT,
//! counts it and audits it. `scheduler resume` retries it; with the device
//! healthy again it runs, under the policy's throttle.

mod common;
#[path = "common/sched.rs"]
mod sched;

use common::*;
use sched::*;
use serde_json::Value;

const DAY: u64 = 86_400;

fn dek_job(pool: &TestPool) -> Option<Value> {
    schedule(pool)["jobs"].as_array().and_then(|j| {
        j.iter()
            .find(|j| j["zone"] == "z1" && j["kind"] == "dek")
            .cloned()
    })
}

#[test]
fn a_failing_rotation_backs_off_then_fails_alerted_and_audited_and_resume_runs_it_throttled() {
    let pool = TestPool::with_volume("8M");
    let clock = TestClock::new(&pool);
    set_toml(
        &pool,
        "schedule",
        &[
            ("check_interval_ms", "200"),
            ("max_attempts", "3"),
            ("retry_base_secs", "60"),
            ("retry_max_secs", "3600"),
        ],
    );
    // Migration throttled even while the volume is idle, so the rotation
    // is seen under way.
    set_toml(
        &pool,
        "rotation",
        &[("idle_after_ms", "86400000"), ("batch_blocks", "64")],
    );
    // The first three staging writes fail: the probe of each of the three
    // attempts. The fourth (after resume) succeeds.
    let server = pool.serve_env(
        &[],
        &[
            clock.env(),
            ("KEYTURN_FAULTS", "staging:fail-next-writes=3"),
        ],
    );
    // Always in the window; the policy's throttle is 1 MiB/s.
    pool.keyturn_ok(&[
        "policy",
        "set",
        "--zone",
        "z1",
        "--preset",
        "90d",
        "--kek-cryptoperiod",
        "365d",
        "--kek-grace",
        "30d",
        "--window-start",
        "00:00",
        "--window-duration",
        "24h",
        "--window-days",
        "all",
        "--rate-mib-s",
        "1",
    ]);
    let (ok, text) = fio(
        &server.uri("vol0"),
        1,
        4 << 20,
        1,
        &pool.dir.path().join("fio.json"),
        &[],
    );
    assert!(ok && fio_errors(&text).iter().all(|&e| e == 0), "{text}");
    assert_eq!(rotation(&pool, "z1")["throttle_source"], "pool");

    let t0 = real_now() + 91 * DAY;
    clock.set(t0);
    wait_until("the first failed start", 30, || {
        dek_job(&pool).is_some_and(|j| j["attempts"] == 1)
    });
    let j = dek_job(&pool).unwrap();
    assert_eq!(j["state"], "queued", "{j}");
    assert!(
        j["last_error"]
            .as_str()
            .unwrap()
            .contains("staging device cannot be written"),
        "{j}"
    );
    // Backoff: 60 s after the first failure, 120 s after the second.
    let first_at = j["next_try_unix"].as_u64().unwrap() - 60;
    assert!(first_at >= t0, "{j}");
    clock.set(first_at + 59);
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(
        dek_job(&pool).unwrap()["attempts"],
        1,
        "retried before its time"
    );
    clock.set(first_at + 60);
    wait_until("the second failed start", 30, || {
        dek_job(&pool).is_some_and(|j| j["attempts"] == 2)
    });
    let j = dek_job(&pool).unwrap();
    let second_at = j["next_try_unix"].as_u64().unwrap() - 120;
    assert!(second_at >= first_at + 60, "{j}");
    clock.set(second_at + 120);
    wait_until("the job to fail for good", 30, || {
        dek_job(&pool).is_some_and(|j| j["state"] == "failed")
    });
    let j = dek_job(&pool).unwrap();
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(rotation(&pool, "z1")["phase"], "idle");
    let status = keyturn_json(&pool, &["scheduler", "status", "--json"]);
    assert_eq!(status["failed"], 1, "{status}");

    // Alerted, counted, audited.
    let log = server.log_text();
    assert!(
        log.contains("ALERT: scheduled rotation failed for good"),
        "{log}"
    );
    let m = scrape_metrics(&pool, &server);
    assert_eq!(
        metric(&m, "keyturn_rotations_failed_total{kind=\"dek\"}"),
        Some(1.0),
        "{m}"
    );
    let events = audit_records(&pool);
    let failed_starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "schedule.dek.start" && e["zone"] == "z1")
        .collect();
    assert_eq!(failed_starts.len(), 3, "{failed_starts:?}");
    assert!(
        failed_starts.iter().all(|e| e["outcome"] != "ok"),
        "{failed_starts:?}"
    );
    let gave_up: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "schedule.failed" && e["zone"] == "z1")
        .collect();
    assert_eq!(gave_up.len(), 1, "{events:?}");
    assert_eq!(gave_up[0]["count"], 3, "{:?}", gave_up[0]);

    // Resume retries it; the device writes again, so it runs, with the
    // policy's throttle on its staging and migration.
    pool.keyturn_ok(&["scheduler", "resume"]);
    wait_until("the rotation to start", 30, || {
        dek_job(&pool).is_some_and(|j| j["state"] == "running")
    });
    let s = rotation(&pool, "z1");
    assert_ne!(s["phase"], "idle", "{s}");
    assert_eq!(s["throttle_mib_s"], 1, "{s}");
    assert_eq!(s["throttle_source"], "policy", "{s}");
    let events = audit_records(&pool);
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "schedule.dek.start" && e["outcome"] == "ok"),
        "no successful start audited"
    );
    // The test clock stands still: move it past the planned flip.
    let flip_at = dek_job(&pool).unwrap()["flip_at_unix"].as_u64().unwrap();
    clock.set(flip_at + 1);
    wait_until("the scheduled rotation to end", 60, || {
        dek_job(&pool).is_none()
    });
    fio_verify(
        &server.uri("vol0"),
        1,
        4 << 20,
        &pool.dir.path().join("verify.json"),
        "after the retried rotation",
    );
}
