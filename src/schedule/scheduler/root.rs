//! The root key's lifetime. The scheduler does not rotate the root key
//! itself: a sealed file needs the operator's new passphrase, a PKCS#11
//! rotation the PIN at hand and approvals, and a KMIP key is re-keyed by
//! its KMS. So when the root key reaches its cryptoperiod (the default
//! policy's `root`, a year when unset) the scheduler raises an alert, audits
//! `schedule.root.due` once per step of urgency, and reports the key in
//! health like any other.
//!
//! The root key's age comes from the audit log, which every pool has: the
//! time of the last `root.rotate` that succeeded, else of `pool.init`. The
//! log is read once from its start, then only what was appended since.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

use super::super::policy::{Lifetime, Policies, Span};
use super::super::queue::{KeyAge, Urgency};
use crate::audit::AuditEvent;
use crate::pool::Pool;

/// The root key's cryptoperiod when the default policy sets none.
pub(super) const DEFAULT_ROOT_PERIOD: Span = Span(365 * 86_400);

/// What the scheduler knows of the root key.
#[derive(Debug, Default)]
pub(super) struct RootWatch {
    /// Bytes of the audit log read so far.
    offset: u64,
    /// When the root key in use was made (Unix seconds).
    since: Option<u64>,
    /// The urgency last alerted, so an alert is raised once per step.
    alerted: Option<Urgency>,
}

/// The fields of an audit record this needs.
#[derive(Deserialize)]
struct Line {
    time: String,
    action: String,
    outcome: String,
}

impl RootWatch {
    /// Reads what the audit log gained since the last call.
    fn refresh(&mut self, pool_dir: &Path) {
        let path = pool_dir.join("audit.log");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Replaced (a restore): read it again.
            *self = RootWatch::default();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut text = String::new();
        if f.read_to_string(&mut text).is_err() {
            return;
        }
        // Only whole lines: a record being appended is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text[..whole].lines() {
            let Ok(l) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            let made =
                l.outcome == "ok" && matches!(l.action.as_str(), "pool.init" | "root.rotate");
            if made && let Ok(t) = crate::audit::export::parse_time(&l.time) {
                let t = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.since = Some(t);
                self.alerted = None;
            }
        }
        self.offset += whole as u64;
    }

    /// The root key's cryptoperiod under `policies`.
    pub(super) fn period(policies: &Policies) -> Span {
        policies
            .default
            .root
            .map_or(DEFAULT_ROOT_PERIOD, |l: Lifetime| l.cryptoperiod)
    }

    /// The root key's age now (from the audit log), `None` when the log
    /// names no creation (a pool made before the log existed).
    pub(super) fn age(&mut self, pool_dir: &Path) -> Option<KeyAge> {
        self.refresh(pool_dir);
        self.since.map(KeyAge::ActiveSince)
    }

    /// One check: alert and audit when the root key became due, or more
    /// urgent, since the last alert.
    pub(super) fn check(&mut self, pool: &Pool, policies: &Policies, now: u64) {
        let Some(age) = self.age(pool.dir()) else {
            return;
        };
        let period = Self::period(policies);
        let urgency = age.urgency(period, now);
        if urgency.is_none() || urgency <= self.alerted {
            return;
        }
        self.alerted = urgency;
        let since = match age {
            KeyAge::ActiveSince(t) => t,
            _ => 0,
        };
        tracing::error!(
            age_days = now.saturating_sub(since) / 86_400,
            cryptoperiod_days = period.secs() / 86_400,
            "ALERT: the root key is past its cryptoperiod; rotate it with `keyturn keys rotate-root` \
             (the scheduler does not rotate the root key: it needs the operator's new secret)"
        );
        let _ = pool.record(
            AuditEvent::ok("schedule.root.due")
                .actor("scheduler")
                .count(now.saturating_sub(since) / 86_400),
        );
    }
}

impl super::Scheduler {
    /// The root key in `GET health`: its state, age and cryptoperiod.
    pub(super) fn root_health(&self, pool: &Pool, now: u64) -> serde_json::Value {
        let period = RootWatch::period(&self.policies.lock());
        let age = self.root.lock().age(pool.dir());
        let since = match age {
            Some(KeyAge::ActiveSince(t)) => Some(t),
            _ => None,
        };
        serde_json::json!({
            "state": match age {
                Some(a) => super::manage::state_name(a.urgency(period, now)),
                None => "unknown",
            },
            "age_secs": since.map(|t| now.saturating_sub(t)),
            "cryptoperiod_secs": period.secs(),
            "due_in_secs": since.map(|t| t as i64 + period.secs() as i64 - now as i64),
            "rotated_by": "operator (keyturn keys rotate-root)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_root_rotation_or_the_init_dates_the_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let rec = |time: &str, action: &str, outcome: &str| {
            format!(r#"{{"id":1,"time":"{time}","action":"{action}","outcome":"{outcome}"}}"#)
        };
        let mut text = rec("2026-01-01T00:00:00.000Z", "pool.init", "ok") + "\n";
        std::fs::write(&log, &text).unwrap();
        let mut w = RootWatch::default();
        let jan1 = 1_767_225_600;
        assert_eq!(w.age(dir.path()), Some(KeyAge::ActiveSince(jan1)));
        // A failed rotation does not renew it; a half-written line waits.
        text += &(rec("2026-03-01T00:00:00.000Z", "root.rotate", "failed") + "\n");
        text += &rec("2026-04-01T00:00:00.000Z", "root.rotate", "ok");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(w.age(dir.path()), Some(KeyAge::ActiveSince(jan1)));
        text += "\n";
        std::fs::write(&log, &text).unwrap();
        let apr1 = jan1 + (31 + 28 + 31) * 86_400;
        assert_eq!(w.age(dir.path()), Some(KeyAge::ActiveSince(apr1)));
        let p = Span(30 * 86_400);
        assert_eq!(
            KeyAge::ActiveSince(apr1).urgency(p, apr1 + 31 * 86_400),
            Some(Urgency::Due)
        );
    }
}
