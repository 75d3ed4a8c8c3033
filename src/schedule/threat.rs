//! Threat input: a threat level per zone or for the whole pool, raised and
//! cleared through the admin API (`POST /api/v1/threat`), the CLI
//! (`keyturn threat`), or a watched feed file of JSON lines.
//!
//! A raised level shortens the zone's cryptoperiods by its policy's factor
//! (see [`super::policy::ThreatScale`]); critical also asks for one
//! emergency DEK rotation of every zone it covers. The state lives in
//! `threat.json` in the pool directory, replaced atomically at each change:
//!
//! ```json
//! { "pool": null,
//!   "zones": { "z1": { "level": "high", "reason": "CVE-2026-1234",
//!                      "since_unix": 1796000000, "source": "api", "handled": [] } },
//!   "feed_offset": 0 }
//! ```
//!
//! A feed line is the same JSON as the API's body:
//! `{"zone": "z1", "level": "critical", "reason": "key exposed in a dump"}`
//! (`"all": true` instead of a zone for the whole pool; level `normal` clears).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The threat state file in the pool directory.
pub const THREAT_FILE: &str = "threat.json";
/// Longest reason kept.
const MAX_REASON: usize = 500;

/// A threat level; higher is worse.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ThreatLevel {
    /// No raised threat.
    #[default]
    Normal,
    /// Cryptoperiods shortened by the policy's elevated factor.
    Elevated,
    /// Shortened by the high factor.
    High,
    /// Shortened by the high factor, and an emergency DEK rotation.
    Critical,
}

impl ThreatLevel {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            ThreatLevel::Normal => "normal",
            ThreatLevel::Elevated => "elevated",
            ThreatLevel::High => "high",
            ThreatLevel::Critical => "critical",
        }
    }

    /// As a number for the metric (0 normal … 3 critical).
    pub fn number(self) -> f64 {
        self as u8 as f64
    }
}

/// A raised level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Raised {
    /// The level.
    pub level: ThreatLevel,
    /// Why.
    pub reason: String,
    /// Since when (Unix seconds).
    pub since_unix: u64,
    /// Who raised it: `api` or `feed`.
    pub source: String,
    /// Zones whose emergency rotation this (critical) level already ran.
    #[serde(default)]
    pub handled: BTreeSet<String>,
}

/// A change of level, as the API, the CLI and a feed line send it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreatChange {
    /// One zone…
    #[serde(default)]
    pub zone: Option<String>,
    /// …or the whole pool.
    #[serde(default)]
    pub all: bool,
    /// The new level (`normal` clears).
    pub level: ThreatLevel,
    /// Why (recorded in the audit log).
    pub reason: String,
}

/// Errors of threat input: a refused change, or the state file.
#[derive(Debug, thiserror::Error)]
pub enum ThreatError {
    /// The change is refused; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The state file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// File.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl ThreatChange {
    /// Checks the change: one zone or all, a reason of printable text.
    pub fn validate(&self) -> Result<(), ThreatError> {
        let bad = |m: &str| Err(ThreatError::Invalid(m.into()));
        match (&self.zone, self.all) {
            (Some(_), true) => return bad("give a zone or all, not both"),
            (None, false) => return bad("give a zone (--zone Z) or the whole pool (--all)"),
            _ => {}
        }
        let r = self.reason.trim();
        if r.is_empty() {
            return bad("a threat change needs a reason (--reason TEXT)");
        }
        if r.chars().count() > MAX_REASON {
            return bad("the reason is over 500 characters");
        }
        if r.chars().any(char::is_control) {
            return bad("the reason holds control characters");
        }
        Ok(())
    }
}

/// The pool's threat levels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThreatState {
    /// Pool-wide.
    pub pool: Option<Raised>,
    /// Per zone.
    pub zones: BTreeMap<String, Raised>,
    /// Bytes of the feed file already read.
    pub feed_offset: u64,
}

/// One level change that happened, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The zone, or `None` for the pool.
    pub zone: Option<String>,
    /// From.
    pub from: ThreatLevel,
    /// To.
    pub to: ThreatLevel,
}

impl ThreatState {
    /// The file in pool directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(THREAT_FILE)
    }

    /// Reads it (normal everywhere when there is no file).
    pub fn load(dir: &Path) -> Result<Self, ThreatError> {
        let path = Self::path(dir);
        let err = |m: String| ThreatError::File {
            path: path.clone(),
            message: m,
        };
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Writes it atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ThreatError> {
        let path = Self::path(dir);
        let err = |m: String| ThreatError::File {
            path: path.clone(),
            message: m,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        crate::pool::write_atomic(&path, &text).map_err(|e| err(e.to_string()))
    }

    /// The level that applies to `zone` (the higher of its own and the
    /// pool's), with the entry that sets it.
    pub fn of(&self, zone: &str) -> Option<&Raised> {
        [self.pool.as_ref(), self.zones.get(zone)]
            .into_iter()
            .flatten()
            .max_by_key(|r| r.level)
    }

    /// The level of `zone`.
    pub fn level(&self, zone: &str) -> ThreatLevel {
        self.of(zone).map_or(ThreatLevel::Normal, |r| r.level)
    }

    /// Whether `zone` is under a critical level whose emergency rotation
    /// has not run yet.
    pub fn emergency_due(&self, zone: &str) -> bool {
        [self.pool.as_ref(), self.zones.get(zone)]
            .into_iter()
            .flatten()
            .any(|r| r.level == ThreatLevel::Critical && !r.handled.contains(zone))
    }

    /// Notes that `zone`'s emergency rotation ran for every critical level
    /// that covers it.
    pub fn mark_handled(&mut self, zone: &str) {
        for r in [self.pool.as_mut(), self.zones.get_mut(zone)]
            .into_iter()
            .flatten()
        {
            if r.level == ThreatLevel::Critical {
                r.handled.insert(zone.to_string());
            }
        }
    }

    /// Applies a (validated) change; `--all` with `normal` clears the pool
    /// and every zone. Returns the transitions (none when nothing changed
    /// level: the reason is still updated).
    pub fn apply(&mut self, c: &ThreatChange, now: u64, source: &str) -> Vec<Transition> {
        let raised = |level| Raised {
            level,
            reason: c.reason.trim().to_string(),
            since_unix: now,
            source: source.into(),
            handled: BTreeSet::new(),
        };
        let mut out = Vec::new();
        let mut set = |slot: &mut Option<Raised>, zone: Option<String>| {
            let from = slot.as_ref().map_or(ThreatLevel::Normal, |r| r.level);
            *slot = (c.level != ThreatLevel::Normal).then(|| {
                let mut r = raised(c.level);
                // The same critical level again does not rotate again.
                if from == c.level
                    && let Some(old) = slot.as_ref()
                {
                    r.handled = old.handled.clone();
                    r.since_unix = old.since_unix;
                }
                r
            });
            if from != c.level {
                out.push(Transition {
                    zone,
                    from,
                    to: c.level,
                });
            }
        };
        match &c.zone {
            Some(z) => {
                let mut slot = self.zones.remove(z);
                set(&mut slot, Some(z.clone()));
                if let Some(r) = slot {
                    self.zones.insert(z.clone(), r);
                }
            }
            None => {
                set(&mut self.pool, None);
                if c.level == ThreatLevel::Normal {
                    for (z, r) in std::mem::take(&mut self.zones) {
                        out.push(Transition {
                            zone: Some(z),
                            from: r.level,
                            to: ThreatLevel::Normal,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Reads the complete lines a feed file gained since `offset`: returns the
/// parsed changes (or why a line was refused) and the new offset. A file
/// shorter than `offset` was replaced: read from its start.
pub fn read_feed(
    path: &Path,
    offset: u64,
) -> std::io::Result<(Vec<Result<ThreatChange, String>>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = if len < offset { 0 } else { offset };
    // At most 1 MiB a check: a huge feed is read over several checks.
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(start))?;
    f.take(1 << 20).read_to_end(&mut buf)?;
    let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
        return Ok((Vec::new(), start));
    };
    let out = buf[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(|l| {
            serde_json::from_slice::<ThreatChange>(l)
                .map_err(|e| format!("not a threat change ({e})"))
                .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
        })
        .collect();
    Ok((out, start + end as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(zone: Option<&str>, level: ThreatLevel) -> ThreatChange {
        ThreatChange {
            zone: zone.map(Into::into),
            all: zone.is_none(),
            level,
            reason: "test".into(),
        }
    }

    #[test]
    fn levels_combine_and_critical_rotates_once() {
        let mut s = ThreatState::default();
        let t = s.apply(&change(Some("z1"), ThreatLevel::High), 10, "api");
        assert_eq!(t.len(), 1);
        assert_eq!(s.level("z1"), ThreatLevel::High);
        assert_eq!(s.level("z2"), ThreatLevel::Normal);
        s.apply(&change(None, ThreatLevel::Critical), 11, "feed");
        assert_eq!(s.level("z1"), ThreatLevel::Critical);
        assert!(s.emergency_due("z1") && s.emergency_due("z2"));
        s.mark_handled("z1");
        assert!(!s.emergency_due("z1") && s.emergency_due("z2"));
        // Critical again: no transition, and z1 is not rotated again.
        assert!(
            s.apply(&change(None, ThreatLevel::Critical), 12, "api")
                .is_empty()
        );
        assert!(!s.emergency_due("z1"));
        // Clearing all clears zones too.
        let t = s.apply(&change(None, ThreatLevel::Normal), 13, "api");
        assert_eq!(t.len(), 2);
        assert_eq!(s.level("z1"), ThreatLevel::Normal);
    }

    #[test]
    fn changes_are_validated() {
        let mut c = change(Some("z1"), ThreatLevel::High);
        assert!(c.validate().is_ok());
        c.all = true;
        assert!(c.validate().is_err());
        c.all = false;
        c.reason = " ".into();
        assert!(c.validate().unwrap_err().to_string().contains("--reason"));
        c.reason = "a\u{7}b".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_feed_is_read_by_complete_lines_and_bad_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("feed");
        std::fs::write(
            &f,
            "{\"zone\":\"z1\",\"level\":\"high\",\"reason\":\"r\"}\nnot json\n{\"all\":true,\"lev",
        )
        .unwrap();
        let (lines, off) = read_feed(&f, 0).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].is_ok() && lines[1].is_err());
        let (lines, off2) = read_feed(&f, off).unwrap();
        assert!(lines.is_empty() && off2 == off, "a partial line waits");
        std::fs::write(
            &f,
            "{\"all\":true,\"level\":\"normal\",\"reason\":\"ok\"}\n",
        )
        .unwrap();
        let (lines, _) = read_feed(&f, off).unwrap();
        assert_eq!(lines.len(), 1, "a shorter file is read from its start");
    }
}
