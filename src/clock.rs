//! The one place calendar time is read: key ages, rotation timers (the
//! auto-flip at `flip_at_unix`, the grace period before a key is destroyed)
//! and the rotation scheduler all ask [`unix_now`].
//!
//! By default it is the system clock. As a **test facility**, `keyturn
//! serve` installs a file clock when `KEYTURN_TEST_CLOCK=FILE` is set: the
//! file holds Unix seconds that a test rewrites to move months ahead in
//! seconds. The server refuses it unless the pool's `pool.toml` says it is a
//! test pool (`[test] allow_test_clock = true`), and logs a warning when it
//! is on. Durations measured for rates and throttles (`Instant`) stay on
//! the monotonic clock: only calendar time is faked.
//!
//! Not faked: the audit log's timestamps (they record when things really
//! happened).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that names a test clock file.
pub const TEST_CLOCK_ENV: &str = "KEYTURN_TEST_CLOCK";

/// Errors setting up a clock.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The test clock file could not be read.
    #[error("test clock {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The test clock file does not hold Unix seconds.
    #[error("test clock {path}: expected Unix seconds (digits), found {found:?}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What it held (at most 40 characters).
        found: String,
    },
    /// A clock was already installed in this process.
    #[error("a clock is already installed in this process")]
    AlreadyInstalled,
}

/// Where calendar time comes from.
#[derive(Debug)]
pub enum Clock {
    /// The system clock.
    System,
    /// A test clock: Unix seconds read from a file on every call. A file
    /// being rewritten (empty, half-written) reads as the last good value.
    File {
        /// The file.
        path: PathBuf,
        /// Last value read.
        last: AtomicU64,
    },
}

impl Clock {
    /// A test clock over `path`, which must already hold Unix seconds.
    pub fn file(path: &Path) -> Result<Self, ClockError> {
        let first = read_seconds(path)?;
        Ok(Clock::File {
            path: path.to_path_buf(),
            last: AtomicU64::new(first),
        })
    }

    /// Now, in Unix seconds.
    pub fn unix_now(&self) -> u64 {
        match self {
            Clock::System => system_now(),
            Clock::File { path, last } => match read_seconds(path) {
                Ok(t) => {
                    last.store(t, Ordering::Relaxed);
                    t
                }
                Err(_) => last.load(Ordering::Relaxed),
            },
        }
    }

    /// Whether this is a test clock.
    pub fn is_test(&self) -> bool {
        matches!(self, Clock::File { .. })
    }
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_seconds(path: &Path) -> Result<u64, ClockError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClockError::Io {
        path: path.into(),
        source,
    })?;
    text.trim().parse().map_err(|_| ClockError::Parse {
        path: path.into(),
        found: text.chars().take(40).collect(),
    })
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

/// Installs the process clock (once, before serving). Without it the
/// system clock is used.
pub fn install(clock: Clock) -> Result<(), ClockError> {
    CLOCK.set(clock).map_err(|_| ClockError::AlreadyInstalled)
}

/// Now, in Unix seconds, from the installed clock.
pub fn unix_now() -> u64 {
    CLOCK.get().map_or_else(system_now, Clock::unix_now)
}

/// Whether the installed clock is a test clock.
pub fn is_test() -> bool {
    CLOCK.get().is_some_and(Clock::is_test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_clock_follows_the_file_and_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("clock");
        std::fs::write(&f, "1000\n").unwrap();
        let c = Clock::file(&f).unwrap();
        assert_eq!(c.unix_now(), 1000);
        std::fs::write(&f, "90000000").unwrap();
        assert_eq!(c.unix_now(), 90_000_000);
        std::fs::write(&f, "").unwrap();
        assert_eq!(c.unix_now(), 90_000_000);
        assert!(c.is_test());
        std::fs::write(&f, "soon").unwrap();
        assert!(matches!(Clock::file(&f), Err(ClockError::Parse { .. })));
    }
}
