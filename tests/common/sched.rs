//! Helpers for the scheduler's policy tests (included with `#[path]` by
//! the test files that need them): the test clock file, rotation and
//! schedule status, and one metric out of a scrape.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

use super::common::{TestPool, keyturn_json, real_now, set_toml};

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

/// `keyturn rotate status --zone Z --json`.
pub fn rotation(pool: &TestPool, zone: &str) -> Value {
    keyturn_json(pool, &["rotate", "status", "--zone", zone, "--json"])
}

/// `keyturn scheduler schedule --json`.
pub fn schedule(pool: &TestPool) -> Value {
    keyturn_json(pool, &["scheduler", "schedule", "--json"])
}

/// The value of the metric line that starts with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
