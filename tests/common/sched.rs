//! Helpers for the scheduler's policy tests (included with `#[path]` by
//! the test files that need them, so `common/mod.rs` stays as it is): the
//! pool.toml editor, the test clock file, JSON output, the admin API's
//! metrics and the audit log.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::common::{Server, TestPool, set_toml};

/// Unix seconds of the real clock.
pub fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The test clock file (`KEYTURN_TEST_CLOCK`): Unix seconds, replaced atomically.
pub struct TestClock(pub PathBuf);

impl TestClock {
    /// A clock at the real time, in the pool's temporary directory; allows
    /// it in pool.toml.
    pub fn new(pool: &TestPool) -> Self {
        set_toml(pool, "test", &[("allow_test_clock", "true")]);
        let c = TestClock(pool.dir.path().join("clock"));
        c.set(real_now());
        c
    }

    /// Moves the clock to `t`.
    pub fn set(&self, t: u64) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, t.to_string()).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    /// The environment variable that hands it to `keyturn serve`.
    pub fn env(&self) -> (&'static str, &str) {
        ("KEYTURN_TEST_CLOCK", self.0.to_str().unwrap())
    }
}

/// `keyturn ARGS` parsed as JSON.
pub fn json(pool: &TestPool, args: &[&str]) -> Value {
    let out = pool.keyturn_ok(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `keyturn rotate status --zone Z --json`.
pub fn rotation(pool: &TestPool, zone: &str) -> Value {
    json(pool, &["rotate", "status", "--zone", zone, "--json"])
}

/// `keyturn scheduler schedule --json`.
pub fn schedule(pool: &TestPool) -> Value {
    json(pool, &["scheduler", "schedule", "--json"])
}

/// Polls `f` every 100 ms for up to `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The audit log's records.
pub fn audit(pool: &TestPool) -> Vec<Value> {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Metrics of the running server, as Prometheus text.
pub fn metrics(pool: &TestPool, server: &Server) -> String {
    let addr = server.admin.clone().expect("admin address");
    let token = std::fs::read_to_string(pool.path().join("admin.token")).unwrap();
    let agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    agent
        .get(format!("http://{addr}/metrics"))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The value of the metric line that starts with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
