//! Threat input through the real binary: a raised level shortens the
//! plan (API, CLI and the feed file), critical starts one emergency
//! rotation, and under dual control the scheduler files the approval
//! request, alerts, and runs the rotation once approvals arrive.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;

const DAY: u64 = 86_400;

fn rotation(pool: &TestPool, zone: &str) -> Value {
    keyturn_json(pool, &["rotate", "status", "--zone", zone, "--json"])
}

fn plan(pool: &TestPool, zone: &str) -> Value {
    keyturn_json(pool, &["rotate", "plan", "--zone", zone, "--json"])
}

fn levels(pool: &TestPool) -> Value {
    keyturn_json(pool, &["threat", "show", "--json"])["levels"].clone()
}

#[test]
fn a_raised_threat_shortens_the_plan_and_critical_rotates_once() {
    let pool = TestPool::new();
    for z in ["z1", "z2"] {
        pool.keyturn_ok(&["zone", "create", z]);
    }
    set_toml(&pool, "test", &[("allow_test_clock", "true")]);
    set_toml(
        &pool,
        "schedule",
        &[
            ("check_interval_ms", "200"),
            ("threat_feed", "\"threat.feed\""),
        ],
    );
    let clock = pool.dir.path().join("clock");
    std::fs::write(&clock, real_now().to_string()).unwrap();
    let _server = pool.serve_env(&[], &[("KEYTURN_TEST_CLOCK", clock.to_str().unwrap())]);
    let since = plan(&pool, "z1")["active_dek_since_unix"].as_u64().unwrap();
    assert_eq!(plan(&pool, "z1")["inputs"]["deadline"], since + 90 * DAY);

    // A refused change says what to give.
    let out = pool.keyturn(&[
        "threat", "raise", "--zone", "z1", "--level", "high", "--reason", " ",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reason"));
    let out = pool.keyturn(&[
        "threat", "raise", "--zone", "nope", "--level", "high", "--reason", "x",
    ]);
    assert!(!out.status.success());

    // High: a quarter of the cryptoperiod (the policy's default factor).
    pool.keyturn_ok(&[
        "threat",
        "raise",
        "--zone",
        "z1",
        "--level",
        "high",
        "--reason",
        "CVE-2026-0001",
    ]);
    let p = plan(&pool, "z1");
    assert_eq!(p["threat_level"], "high", "{p}");
    assert_eq!(p["inputs"]["deadline"], since + 90 * DAY / 4, "{p}");
    // z2's DEK is its own age (created a moment after z1's, maybe a second).
    let p2 = plan(&pool, "z2");
    let since2 = p2["active_dek_since_unix"].as_u64().unwrap();
    assert_eq!(p2["inputs"]["deadline"], since2 + 90 * DAY, "{p2}");
    assert_eq!(levels(&pool)["z1"], "high");

    // Critical on z2: one emergency rotation, at once.
    pool.keyturn_ok(&[
        "threat",
        "raise",
        "--zone",
        "z2",
        "--level",
        "critical",
        "--reason",
        "key in a dump",
    ]);
    let mut st = Value::Null;
    wait_until("the emergency rotation of z2", 30, || {
        st = rotation(&pool, "z2");
        st["active_version"] == 2
    });
    assert_eq!(st["emergency"], true, "{st}");
    assert_eq!(rotation(&pool, "z1")["active_version"], 1);
    // Raised again: not rotated again.
    pool.keyturn_ok(&[
        "threat", "raise", "--zone", "z2", "--level", "critical", "--reason", "still",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rotation(&pool, "z2")["active_version"], 2);

    // The feed: a pool-wide level, a bad line skipped, z1 cleared by the CLI.
    pool.keyturn_ok(&["threat", "clear", "--zone", "z1", "--reason", "patched"]);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pool.path().join("threat.feed"))
        .unwrap();
    writeln!(
        f,
        "{{\"all\":true,\"level\":\"elevated\",\"reason\":\"feed: campaign\"}}"
    )
    .unwrap();
    writeln!(f, "this is not json").unwrap();
    drop(f);
    wait_until("the feed to raise the pool's level", 20, || {
        levels(&pool)["z1"] == "elevated"
    });
    assert_eq!(levels(&pool)["z2"], "critical", "the higher level applies");
    assert_eq!(
        plan(&pool, "z1")["inputs"]["deadline"],
        since + 90 * DAY / 2
    );

    let events = audit_records(&pool);
    let of = |a: &str| -> Vec<&Value> { events.iter().filter(|e| e["action"] == a).collect() };
    let raised = of("threat.raise");
    assert_eq!(
        raised.len(),
        3,
        "z1 high, z2 critical, all elevated: {raised:?}"
    );
    assert!(
        raised
            .iter()
            .any(|e| e["actor"] == "feed" && e["zone"].is_null())
    );
    assert_eq!(of("threat.clear").len(), 1);
    assert_eq!(of("threat.feed").len(), 1, "the bad line is refused");
    let em = of("rotation.emergency");
    assert_eq!(em.len(), 1);
    assert!(
        em[0]["error"]
            .as_str()
            .unwrap()
            .contains("threat level critical: key in a dump"),
        "{}",
        em[0]
    );
    // 30 days on, outside the window: z1 (elevated: 45 days) is not due,
    // and a high level on z1 makes it due at once (22.5 days).
    std::fs::write(&clock, (since + 30 * DAY).to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let sched = keyturn_json(&pool, &["scheduler", "schedule", "--json"]);
    assert!(
        !sched["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["zone"] == "z1"),
        "{sched}"
    );
    pool.keyturn_ok(&[
        "threat", "raise", "--zone", "z1", "--level", "high", "--reason", "again",
    ]);
    wait_until("z1 to be queued under the shortened period", 20, || {
        keyturn_json(&pool, &["scheduler", "schedule", "--json"])["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["zone"] == "z1" && j["kind"] == "dek")
    });
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

#[test]
fn a_critical_threat_under_dual_control_waits_for_approvals() {
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("passphrase");
    std::fs::write(&pass_file, "threat-test-pass").unwrap();
    let pool = TestPool {
        dir,
        pass_file,
        passphrase: "threat-test-pass".into(),
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
    for who in ["alice", "bob"] {
        let key = pool.dir.path().join(format!("{who}.key"));
        bare_ok(
            &pool,
            &["operator", "add", who, "--key-out", key.to_str().unwrap()],
        );
    }
    set_toml(&pool, "schedule", &[("check_interval_ms", "200")]);
    let server = pool.serve();
    pool.keyturn_ok(&[
        "threat",
        "raise",
        "--zone",
        "z1",
        "--level",
        "critical",
        "--reason",
        "HSM audit finding",
    ]);
    let mut job = Value::Null;
    wait_until("the emergency to wait for approvals", 20, || {
        let s = keyturn_json(&pool, &["scheduler", "schedule", "--json"]);
        job = s["jobs"][0].clone();
        job["state"] == "awaiting_approval"
    });
    let request = PathBuf::from(job["approval_request"].as_str().unwrap());
    assert!(request.exists(), "{job}");
    assert_eq!(
        rotation(&pool, "z1")["active_version"],
        1,
        "rotated without approvals"
    );
    assert!(
        scrape_metrics(&pool, &server)
            .lines()
            .any(|l| l.starts_with("keyturn_schedule_alerts_total{kind=\"approval_needed\"} ")),
        "no alert metric"
    );
    assert!(
        server
            .log_text()
            .contains("ALERT: an emergency rotation waits")
    );
    let status = keyturn_json(&pool, &["scheduler", "status", "--json"]);
    assert_eq!(status["awaiting_approval"], 1, "{status}");

    // One approval is not enough; two are.
    let token = |who: &str| {
        let out = pool.dir.path().join(format!("{who}.tok"));
        let key = pool.dir.path().join(format!("{who}.key"));
        bare_ok(
            &pool,
            &[
                "approve",
                "--operator-key",
                key.to_str().unwrap(),
                "--request",
                request.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        out
    };
    let (a, b) = (token("alice"), token("bob"));
    let out = pool.keyturn(&[
        "threat",
        "approve",
        "--zone",
        "z1",
        "--approval",
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("approval"));
    assert_eq!(rotation(&pool, "z1")["active_version"], 1);
    pool.keyturn_ok(&[
        "threat",
        "approve",
        "--zone",
        "z1",
        "--approval",
        a.to_str().unwrap(),
        "--approval",
        b.to_str().unwrap(),
    ]);
    let st = rotation(&pool, "z1");
    assert_eq!(st["active_version"], 2, "{st}");
    assert_eq!(st["emergency"], true, "{st}");
    let events = audit_records(&pool);
    let em: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "rotation.emergency" && e["outcome"] == "ok")
        .collect();
    assert_eq!(em.len(), 1);
    assert_eq!(em[0]["approvers"].as_array().unwrap().len(), 2, "{}", em[0]);
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "schedule.approval.requested")
    );
    wait_until("the job to leave the schedule", 30, || {
        keyturn_json(&pool, &["scheduler", "schedule", "--json"])["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
}
