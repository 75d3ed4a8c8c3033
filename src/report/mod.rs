//! Key-rotation reports for a period: per zone its keys (ages, states,
//! blocks per DEK version, overdue against the zone's policy), the
//! rotations in the period with durations and outcomes, the approvals given,
//! and the audit chain's verification result. Built from the key inventory
//! and the audit log alone, so the report can be checked against the log.
//!
//! [`build`] gives the data (JSON for `GET /api/v1/key-rotation/report`);
//! [`render`] formats it as Markdown or HTML; [`scheduled`] writes daily
//! and weekly reports to a directory.

pub mod render;
pub mod scheduled;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::admin::KeyInfo;
use crate::audit::{self, LOG_FILE, Outcome, Record};
use crate::schedule::policy::Policies;
use crate::schedule::queue::KeyAge;

/// Errors building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The audit log could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The period is empty or reversed.
    #[error("the period ends ({to}) before it starts ({from})")]
    Period {
        /// Start.
        from: String,
        /// End.
        to: String,
    },
}

/// A report (see the module docs).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Start of the period (inclusive), RFC 3339.
    pub from: String,
    /// End of the period (exclusive), RFC 3339.
    pub to: String,
    /// When the report was made.
    pub generated: String,
    /// Per zone.
    pub zones: Vec<ZoneReport>,
    /// Rotations with an event in the period, in order of start.
    pub rotations: Vec<Rotation>,
    /// Operations approved (with approvers) in the period.
    pub approvals: Vec<ApprovalGiven>,
    /// The audit chain's check.
    pub audit: AuditCheck,
}

/// One zone's keys.
#[derive(Clone, Debug, Serialize)]
pub struct ZoneReport {
    /// Zone name.
    pub zone: String,
    /// Its keys, as the inventory lists them.
    pub keys: Vec<KeyInfo>,
    /// Content blocks per DEK version (versions with material).
    pub blocks_per_version: BTreeMap<u32, u64>,
    /// Active keys past their cryptoperiod: (key id, urgency).
    pub overdue: Vec<Overdue>,
}

/// A key due or past its cryptoperiod.
#[derive(Clone, Debug, Serialize)]
pub struct Overdue {
    /// Key id.
    pub key: String,
    /// `due`, `overdue`, `severely_overdue`, `missing` or `emergency`.
    pub urgency: String,
    /// Its age in days.
    pub age_days: f64,
    /// The policy's cryptoperiod in days.
    pub period_days: f64,
}

/// One rotation, as the audit log tells it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rotation {
    /// Zone (none for the root key).
    pub zone: Option<String>,
    /// `dek`, `kek` or `root`.
    pub kind: &'static str,
    /// The new key, when recorded.
    pub key: Option<String>,
    /// First event's time.
    pub started: String,
    /// Last event's time (the end, when it ended).
    pub ended: Option<String>,
    /// Milliseconds from start to end (for one-step rotations, the recorded duration).
    pub duration_ms: Option<u64>,
    /// `completed`, `in-progress` (flipped, migrating, or window open),
    /// `aborted`, `failed` or `refused`.
    pub outcome: &'static str,
    /// Audit event ids of its records.
    pub events: Vec<u64>,
}

impl Rotation {
    /// Whether it did not complete: aborted, failed or refused.
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, "aborted" | "failed" | "refused")
    }
}

/// An approved (or refused) dual-controlled operation.
#[derive(Clone, Debug, Serialize)]
pub struct ApprovalGiven {
    /// Audit event id.
    pub event: u64,
    /// Time.
    pub time: String,
    /// Action.
    pub action: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Zone.
    pub zone: Option<String>,
    /// Approving operator ids.
    pub approvers: Vec<String>,
}

/// The audit chain's state when the report was made.
#[derive(Clone, Debug, Serialize)]
pub struct AuditCheck {
    /// Whether the chain (and, when `signed`, its signatures) verified.
    pub ok: bool,
    /// Records in the log.
    pub records: u64,
    /// Whether signatures were checked (the pool has a signing key).
    pub signed: bool,
    /// What failed, naming the first record.
    pub problem: Option<String>,
}

fn ms(t: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(t).ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

fn days(secs: u64) -> f64 {
    secs as f64 / 86_400.0
}

/// Builds the report of the pool in `pool_dir` for `[from, to)`, from
/// `keys` (its inventory: `Pool::key_inventory` or `GET keys`) and its
/// audit log. Reads the log, its digests and the policies; needs no secret.
pub fn build(
    pool_dir: &Path,
    keys: Vec<KeyInfo>,
    from: SystemTime,
    to: SystemTime,
    now: SystemTime,
) -> Result<Report, ReportError> {
    let (from_s, to_s) = (audit::rfc3339(from), audit::rfc3339(to));
    if to < from {
        return Err(ReportError::Period {
            from: from_s,
            to: to_s,
        });
    }
    let log_path = pool_dir.join(LOG_FILE);
    let data = match std::fs::read(&log_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(ReportError::Io {
                path: log_path,
                source,
            });
        }
    };
    // Records that do not parse are the audit check's business; the report
    // reads what it can.
    let records: Vec<Record> = data
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    let rotations = rotations(&records, &from_s, &to_s);
    let approvals = records
        .iter()
        .filter(|r| r.time >= from_s && r.time < to_s && !r.approvers.is_empty())
        .map(|r| ApprovalGiven {
            event: r.id,
            time: r.time.clone(),
            action: r.action.clone(),
            outcome: r.outcome,
            zone: r.zone.clone(),
            approvers: r.approvers.clone(),
        })
        .collect();
    let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let policies = Policies::load(pool_dir).unwrap_or_default();
    let mut zones: BTreeMap<String, ZoneReport> = BTreeMap::new();
    for k in keys {
        let z = zones.entry(k.zone.clone()).or_insert_with(|| ZoneReport {
            zone: k.zone.clone(),
            keys: Vec::new(),
            blocks_per_version: BTreeMap::new(),
            overdue: Vec::new(),
        });
        if k.purpose == "dek"
            && let Some(b) = k.content_blocks
        {
            z.blocks_per_version.insert(k.version, b);
        }
        let period = match k.purpose.as_str() {
            "dek" => Some(policies.of(&k.zone).dek_period()),
            "kek" => Some(policies.of(&k.zone).kek_period()),
            "mac" => Some(policies.of(&k.zone).mac_period()),
            _ => None,
        };
        let age = match k.state.as_str() {
            "active" => Some(KeyAge::ActiveSince(
                k.activated_unix.unwrap_or(k.created_unix),
            )),
            "compromised" => Some(KeyAge::Compromised),
            _ => None,
        };
        if let (Some(period), Some(age)) = (period, age)
            && let Some(u) = age.urgency(period, now_secs)
        {
            z.overdue.push(Overdue {
                key: k.id.clone(),
                urgency: serde_json::to_value(u)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                age_days: k.age_days,
                period_days: days(period.secs()),
            });
        }
        z.keys.push(k);
    }
    Ok(Report {
        from: from_s,
        to: to_s,
        generated: audit::rfc3339(now),
        zones: zones.into_values().collect(),
        rotations,
        approvals,
        audit: audit_check(pool_dir),
    })
}

/// The audit check: signatures with the pool's own key when it has one
/// (an auditor re-checks with a key obtained separately), else the chain.
fn audit_check(pool_dir: &Path) -> AuditCheck {
    match audit::sign::public_key(pool_dir) {
        Ok(key) => match audit::signed::verify_pool(pool_dir, &key) {
            Ok(r) => AuditCheck {
                ok: true,
                records: r.records,
                signed: true,
                problem: None,
            },
            Err(e) => AuditCheck {
                ok: false,
                records: 0,
                signed: true,
                problem: Some(e.to_string()),
            },
        },
        Err(_) => match audit::verify(pool_dir) {
            Ok(r) => AuditCheck {
                ok: true,
                records: r.records,
                signed: false,
                problem: None,
            },
            Err(e) => AuditCheck {
                ok: false,
                records: 0,
                signed: false,
                problem: Some(e.to_string()),
            },
        },
    }
}

/// Rotations told by the records up to `to`, kept when one of their events
/// falls in `[from, to)`.
fn rotations(records: &[Record], from: &str, to: &str) -> Vec<Rotation> {
    let mut done: Vec<Rotation> = Vec::new();
    // Open DEK rotations by zone.
    let mut open: BTreeMap<String, Rotation> = BTreeMap::new();
    let one_step = |r: &Record, kind: &'static str| Rotation {
        zone: r.zone.clone(),
        kind,
        key: r.key_id.clone(),
        started: r.time.clone(),
        ended: Some(r.time.clone()),
        duration_ms: Some(r.duration_ms),
        outcome: match r.outcome {
            Outcome::Ok => "completed",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        },
        events: vec![r.id],
    };
    for r in records.iter().filter(|r| r.time.as_str() < to) {
        let zone = r.zone.clone().unwrap_or_default();
        match (r.action.as_str(), r.outcome) {
            ("kek.rotate", _) => done.push(one_step(r, "kek")),
            ("root.rotate", _) => done.push(one_step(r, "root")),
            ("rotation.prepare", Outcome::Ok) => {
                if let Some(prev) = open.remove(&zone) {
                    done.push(prev);
                }
                open.insert(
                    zone,
                    Rotation {
                        zone: r.zone.clone(),
                        kind: "dek",
                        key: r.key_id.clone(),
                        started: r.time.clone(),
                        ended: None,
                        duration_ms: None,
                        outcome: "in-progress",
                        events: vec![r.id],
                    },
                );
            }
            ("rotation.flip" | "rotation.emergency" | "rotation.migrated", Outcome::Ok) => {
                let rot = open.entry(zone).or_insert_with(|| Rotation {
                    // Opened before the log shows (or an emergency flip).
                    zone: r.zone.clone(),
                    kind: "dek",
                    key: r.key_id.clone(),
                    started: r.time.clone(),
                    ended: None,
                    duration_ms: None,
                    outcome: "in-progress",
                    events: Vec::new(),
                });
                rot.events.push(r.id);
                if rot.key.is_none() {
                    rot.key = r.key_id.clone();
                }
                if r.action == "rotation.migrated" {
                    rot.outcome = "completed";
                    end(rot, &r.time);
                    let rot = open.remove(r.zone.as_deref().unwrap_or_default());
                    done.extend(rot);
                }
            }
            ("rotation.abort", Outcome::Ok) => {
                if let Some(mut rot) = open.remove(&zone) {
                    rot.outcome = "aborted";
                    rot.events.push(r.id);
                    end(&mut rot, &r.time);
                    done.push(rot);
                }
            }
            (a, Outcome::Failed | Outcome::Refused)
                if a.starts_with("rotation.") || a == "schedule.failed" =>
            {
                let mut rot = one_step(r, "dek");
                rot.duration_ms = None;
                done.push(rot);
            }
            _ => {}
        }
    }
    done.extend(open.into_values());
    done.retain(|r| r.started.as_str() >= from || r.ended.as_deref().is_some_and(|e| e >= from));
    done.sort_by(|a, b| a.started.cmp(&b.started));
    done
}

fn end(rot: &mut Rotation, time: &str) {
    rot.ended = Some(time.to_string());
    rot.duration_ms = match (ms(&rot.started), ms(time)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
}
