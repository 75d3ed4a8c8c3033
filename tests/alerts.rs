//! The Prometheus side: the alert rules pass their `promtool test rules`
//! unit tests and every alert has one, the Alertmanager example is valid
//! and routes critical alerts to the webhook as well as email, and a
//! scrape of the running server passes `promtool check metrics` and holds
//! the key, scheduler and audit metrics with the values the API reports.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn prometheus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/prometheus")
}

/// The names after `key: ` on the lines of `text` (a tiny YAML reader for
/// `alert:` and `alertname:`).
fn values_of(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix(key))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

#[test]
fn every_alert_rule_passes_its_promtool_unit_tests() {
    require_tool("promtool");
    let dir = prometheus_dir();
    let out = run_ok(
        "promtool",
        &[
            "check",
            "rules",
            dir.join("keyturn.rules.yml").to_str().unwrap(),
        ],
    );
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    let out = run(
        "promtool",
        &[
            "test",
            "rules",
            dir.join("keyturn.rules.test.yml").to_str().unwrap(),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
    // Each alert is tested firing (a non-empty exp_alerts follows it).
    let rules = std::fs::read_to_string(dir.join("keyturn.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("keyturn.rules.test.yml")).unwrap();
    let alerts = values_of(&rules, "alert:");
    assert_eq!(alerts.len(), 11, "{alerts:?}");
    let mut firing = std::collections::BTreeSet::new();
    let lines: Vec<&str> = tests.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.trim().strip_prefix("alertname: ") {
            let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
            if next == "exp_alerts:" {
                firing.insert(name.to_string());
            }
        }
    }
    for a in &alerts {
        assert!(firing.contains(a), "alert {a} has no firing unit test");
    }
    for must in [
        "KeyturnKeyOverdue",
        "KeyturnKeySeverelyOverdue",
        "KeyturnStagingFull",
        "KeyturnRotationIOErrors",
        "KeyturnRotationFailed",
        "KeyturnSchedulerDown",
        "KeyturnSchedulerPausedTooLong",
        "KeyturnAuditChainBroken",
        "KeyturnReplicationLag",
    ] {
        assert!(alerts.iter().any(|a| a == must), "no alert {must}");
    }
}

#[test]
fn the_alertmanager_example_is_valid_and_routes_by_severity() {
    require_tool("amtool");
    let config = prometheus_dir().join("alertmanager.example.yml");
    let config = config.to_str().unwrap();
    let out = run_ok("amtool", &["check-config", config]);
    assert!(
        out.contains("SUCCESS") && out.contains("2 receivers"),
        "{out}"
    );
    let route = |labels: &[&str]| {
        let mut args = vec!["config", "routes", "test", "--config.file", config];
        args.extend_from_slice(labels);
        run_ok("amtool", &args).trim().to_string()
    };
    assert_eq!(
        route(&["alertname=KeyturnAuditChainBroken", "severity=critical"]),
        "storage-pager,storage-email"
    );
    assert_eq!(
        route(&["alertname=KeyturnKeyOverdue", "severity=warning"]),
        "storage-email"
    );
}

#[test]
fn a_live_scrape_passes_promtool_check_metrics() {
    require_tool("promtool");
    let pool = TestPool::with_volume("16M");
    let server = pool.serve();
    qio_ok(&server.uri("vol0"), &["write -P 0x11 0 256k"]);
    let addr = server.admin.clone().unwrap();
    let token = std::fs::read_to_string(pool.path().join("admin.token")).unwrap();
    let agent = http_agent();
    let get = |path: &str| {
        let mut r = agent
            .get(format!("http://{addr}{path}"))
            .header("Authorization", format!("Bearer {}", token.trim()))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.body_mut().read_to_string().unwrap()
    };
    let health: Value = serde_json::from_str(&get("/api/v1/key-rotation/health")).unwrap();
    let text = get("/metrics");

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let value = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
    };
    assert_eq!(value("keyturn_scheduler_up"), 1.0);
    assert_eq!(value("keyturn_scheduler_paused"), 0.0);
    assert_eq!(value("keyturn_audit_chain_ok"), 1.0);
    assert!(value("keyturn_audit_last_id") >= 3.0);
    // The zone's DEK, KEK and MAC key.
    assert_eq!(value(r#"keyturn_keys{state="ok"}"#), 3.0);
    assert_eq!(value(r#"keyturn_keys{state="overdue"}"#), 0.0);
    let dek = &health["keys"][0];
    assert_eq!(dek["purpose"], "dek");
    assert_eq!(
        value(r#"keyturn_key_cryptoperiod_seconds{zone="z1",purpose="dek"}"#),
        dek["cryptoperiod_secs"].as_f64().unwrap()
    );
    let age = value(r#"keyturn_key_age_seconds{zone="z1",purpose="dek"}"#);
    assert!(
        (age - dek["age_secs"].as_f64().unwrap()).abs() <= 5.0,
        "{age} {dek}"
    );
    assert!(value("keyturn_next_rotation_seconds") > 80.0 * 86_400.0);
}
