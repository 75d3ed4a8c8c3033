//! Scheduled reports: with `[reports] dir` set, the server writes the
//! report of each past day (UTC) and week (Monday 00:00 UTC to the next)
//! into that directory, at its first check after the period ends, in each
//! configured format (`daily-2026-12-06.json`, `weekly-2026-11-30.html`).
//!
//! `POOL/reports.json` records, per kind, the end of the last period
//! reported. It is replaced atomically after the report files are durable
//! and the `report.daily` / `report.weekly` audit record is made, so a
//! period is written once across restarts; a crash between the files and
//! the state rewrites the same files at the next start (and audits again).
//! The first check of a pool with no state reports nothing: it marks the
//! period under way as the first to report, so no report covers time before
//! reports were turned on. After a stop of several periods only the last
//! complete period is written (`keyturn report --from --to` makes any
//! other).
//!
//! Calendar time comes from [`crate::clock`] (the test clock in tests);
//! the report's contents come from the audit log, whose times are the
//! system clock's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::render::{self, Format};
use crate::audit::AuditEvent;
use crate::config::ReportsSection;
use crate::pool::Pool;

/// The state file, in the pool directory.
pub const STATE_FILE: &str = "reports.json";

const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;

/// Errors writing a scheduled report.
#[derive(Debug, thiserror::Error)]
pub enum ScheduledError {
    /// A file could not be read or written.
    #[error("{}: {message}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key inventory or the report could not be made.
    #[error("cannot make the report: {0}")]
    Build(String),
}

/// A daily or a weekly report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One UTC day.
    Daily,
    /// One week, Monday 00:00 UTC to the next.
    Weekly,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Daily => "daily",
            Kind::Weekly => "weekly",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Kind::Daily => "report.daily",
            Kind::Weekly => "report.weekly",
        }
    }

    /// Start of the period that holds `t` (Unix seconds).
    pub fn period_start(self, t: u64) -> u64 {
        match self {
            Kind::Daily => t - t % DAY,
            // 1970-01-01 was a Thursday: day d is a Monday when (d + 3) % 7 == 0.
            Kind::Weekly => {
                let day = t / DAY;
                (day - (day + 3) % 7) * DAY
            }
        }
    }

    fn len(self) -> u64 {
        match self {
            Kind::Daily => DAY,
            Kind::Weekly => WEEK,
        }
    }
}

/// `reports.json`: per kind, the end of the last period reported (or the
/// start of the first one to report).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    daily_done_until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weekly_done_until: Option<u64>,
}

impl State {
    fn slot(&mut self, kind: Kind) -> &mut Option<u64> {
        match kind {
            Kind::Daily => &mut self.daily_done_until,
            Kind::Weekly => &mut self.weekly_done_until,
        }
    }

    fn load(path: &Path) -> Result<Self, ScheduledError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ScheduledError::File {
                path: path.into(),
                message: format!("not a reports state file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(ScheduledError::File {
                path: path.into(),
                message: e.to_string(),
            }),
        }
    }

    fn save(&self, path: &Path) -> Result<(), ScheduledError> {
        let text = serde_json::to_vec_pretty(self).expect("plain data");
        crate::pool::write_atomic(path, &text).map_err(|e| ScheduledError::File {
            path: path.into(),
            message: e.to_string(),
        })
    }
}

/// What one kind of report needs at time `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing: the last complete period is reported.
    Nothing,
    /// No state yet: the period under way (starting at the value) is the
    /// first to report.
    Start(u64),
    /// Report `[from, to)`.
    Report {
        /// Start (Unix seconds).
        from: u64,
        /// End, exclusive.
        to: u64,
    },
}

/// What `kind` needs at `now`, given the end of the last period reported.
pub fn due(kind: Kind, done_until: Option<u64>, now: u64) -> Due {
    let current = kind.period_start(now);
    match done_until {
        None => Due::Start(current),
        Some(d) if d >= current => Due::Nothing,
        Some(_) => Due::Report {
            from: current - kind.len(),
            to: current,
        },
    }
}

/// The file name of a report of `kind` starting at `from`, in `format`.
pub fn file_name(kind: Kind, from: u64, format: Format) -> String {
    let date = crate::audit::rfc3339(UNIX_EPOCH + Duration::from_secs(from));
    format!("{}-{}.{}", kind.name(), &date[..10], format.extension())
}

/// Writes the scheduled reports of one served pool.
pub struct Reporter {
    pool: Weak<Pool>,
    settings: ReportsSection,
    dir: PathBuf,
    state_path: PathBuf,
    interval: Duration,
    shutdown: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reporter {
    /// Starts the reporter's thread when `[reports] dir` is set (checking
    /// every `[schedule] check_interval_ms`); `None` otherwise.
    pub fn start(pool: &Arc<Pool>) -> Result<Option<Arc<Self>>, ScheduledError> {
        let settings = pool.config().reports.clone();
        let Some(dir) = settings.dir.clone() else {
            return Ok(None);
        };
        let dir = if dir.is_absolute() {
            dir
        } else {
            pool.dir().join(dir)
        };
        let r = Arc::new(Reporter {
            pool: Arc::downgrade(pool),
            settings,
            dir,
            state_path: pool.dir().join(STATE_FILE),
            interval: Duration::from_millis(pool.config().schedule.check_interval_ms),
            shutdown: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        // A damaged state file is refused now, not at the first period's end.
        State::load(&r.state_path)?;
        let me = r.clone();
        let handle = std::thread::Builder::new()
            .name("keyturn-reports".into())
            .spawn(move || me.run())
            .map_err(|e| ScheduledError::File {
                path: r.dir.clone(),
                message: format!("cannot start the reports thread: {e}"),
            })?;
        *r.thread.lock() = Some(handle);
        tracing::info!(dir = %r.dir.display(), daily = r.settings.daily, weekly = r.settings.weekly, "scheduled reports on");
        Ok(Some(r))
    }

    /// Stops the thread (a report being written is finished first).
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }

    fn run(&self) {
        while !self.shutdown.load(Ordering::Acquire) {
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            if let Err(e) = self.check(&pool, crate::clock::unix_now()) {
                // Retried at the next check; the state still says what is missing.
                tracing::error!(error = %e, "ALERT: a scheduled report could not be written");
            }
            drop(pool);
            let end = Instant::now() + self.interval;
            while Instant::now() < end && !self.shutdown.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20).min(self.interval));
            }
        }
    }

    /// One check at `now`: writes the reports whose period has ended.
    /// Returns the files written.
    pub fn check(&self, pool: &Pool, now: u64) -> Result<Vec<PathBuf>, ScheduledError> {
        let mut state = State::load(&self.state_path)?;
        let mut written = Vec::new();
        let kinds = [
            (Kind::Daily, self.settings.daily),
            (Kind::Weekly, self.settings.weekly),
        ];
        for (kind, _) in kinds.into_iter().filter(|(_, on)| *on) {
            match due(kind, *state.slot(kind), now) {
                Due::Nothing => {}
                Due::Start(at) => {
                    *state.slot(kind) = Some(at);
                    state.save(&self.state_path)?;
                }
                Due::Report { from, to } => {
                    let started = Instant::now();
                    let files = match self.write(pool, kind, from, to) {
                        Ok(f) => f,
                        Err(e) => {
                            let event = AuditEvent::failed(kind.action(), &e);
                            if let Err(a) = pool.record(event) {
                                tracing::warn!(error = %a, "report failure not audited");
                            }
                            return Err(e);
                        }
                    };
                    let event = AuditEvent::ok(kind.action())
                        .count(files.len() as u64)
                        .duration(started.elapsed());
                    pool.record(event)
                        .map_err(|e| ScheduledError::Build(format!("cannot audit it: {e}")))?;
                    *state.slot(kind) = Some(to);
                    state.save(&self.state_path)?;
                    tracing::info!(
                        kind = kind.name(),
                        from,
                        to,
                        files = files.len(),
                        "scheduled report written"
                    );
                    written.extend(files);
                }
            }
        }
        Ok(written)
    }

    /// Builds the report of `[from, to)` and writes one durable file per format.
    fn write(
        &self,
        pool: &Pool,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> Result<Vec<PathBuf>, ScheduledError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| ScheduledError::File {
            path: self.dir.clone(),
            message: format!("cannot make the reports directory: {e}"),
        })?;
        let keys = pool
            .key_inventory(None)
            .map_err(|e| ScheduledError::Build(e.to_string()))?;
        let at = |t: u64| UNIX_EPOCH + Duration::from_secs(t);
        let report = super::build(pool.dir(), keys, at(from), at(to), SystemTime::now())
            .map_err(|e| ScheduledError::Build(e.to_string()))?;
        let mut files = Vec::new();
        for &format in &self.settings.format {
            let path = self.dir.join(file_name(kind, from, format));
            let text = render::render(&report, format);
            crate::pool::write_atomic(&path, text.as_bytes()).map_err(|e| {
                ScheduledError::File {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            files.push(path);
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-07 is a Monday.
    const MON: u64 = 1_796_601_600;

    #[test]
    fn periods_start_at_midnight_and_on_mondays() {
        assert_eq!(
            crate::audit::rfc3339(UNIX_EPOCH + Duration::from_secs(MON)),
            "2026-12-07T00:00:00.000Z"
        );
        let t = MON + 3 * DAY + 5 * 3600;
        assert_eq!(Kind::Daily.period_start(t), MON + 3 * DAY);
        assert_eq!(Kind::Weekly.period_start(t), MON);
        assert_eq!(Kind::Weekly.period_start(MON), MON);
        assert_eq!(Kind::Weekly.period_start(MON - 1), MON - WEEK);
    }

    #[test]
    fn a_period_is_due_once_after_it_ends() {
        let noon = MON + DAY / 2;
        assert_eq!(due(Kind::Daily, None, noon), Due::Start(MON));
        assert_eq!(due(Kind::Daily, Some(MON), noon), Due::Nothing);
        assert_eq!(
            due(Kind::Daily, Some(MON), MON + DAY + 1),
            Due::Report {
                from: MON,
                to: MON + DAY
            }
        );
        assert_eq!(
            due(Kind::Daily, Some(MON + DAY), MON + DAY + 1),
            Due::Nothing
        );
        // After a long stop: the last complete day only.
        assert_eq!(
            due(Kind::Daily, Some(MON), MON + 5 * DAY + 7),
            Due::Report {
                from: MON + 4 * DAY,
                to: MON + 5 * DAY
            }
        );
        assert_eq!(due(Kind::Weekly, Some(MON), MON + 6 * DAY), Due::Nothing);
        assert_eq!(
            due(Kind::Weekly, Some(MON), MON + WEEK),
            Due::Report {
                from: MON,
                to: MON + WEEK
            }
        );
    }

    #[test]
    fn files_are_named_by_kind_and_first_day() {
        assert_eq!(
            file_name(Kind::Daily, MON - DAY, Format::Md),
            "daily-2026-12-06.md"
        );
        assert_eq!(
            file_name(Kind::Weekly, MON, Format::Html),
            "weekly-2026-12-07.html"
        );
    }
}
