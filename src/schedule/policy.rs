//! Rotation policies: per zone, how long each key lives (cryptoperiod and
//! grace), how sensitive the zone is, when rotations may flip (the
//! maintenance window), what the staging must cover, the throttle, and
//! what a write does when staging is full.
//!
//! Policies live in `policies.json` in the pool directory, a small
//! declarative document the admin API rewrites atomically and shows back
//! verbatim (pool.toml stays the operator's file: rewriting it from the API
//! would drop its comments and layout):
//!
//! ```json
//! { "default": { ...policy... }, "zones": { "z1": { ...policy... } } }
//! ```
//!
//! Durations are written as `90d`, `12h`, `30m` or `45s`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The policy file in the pool directory.
pub const POLICY_FILE: &str = "policies.json";

const DAY: u64 = 86_400;

/// Errors of policies: refused values (with what to change) and the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy is refused; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// The policy file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// File.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A duration written as `90d`, `12h`, `30m`, `45s` (or anything
/// `humantime` reads), shown back in the largest whole unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub u64);

impl Span {
    /// Whole days.
    pub const fn days(d: u64) -> Self {
        Span(d * DAY)
    }

    /// Seconds.
    pub fn secs(self) -> u64 {
        self.0
    }

    /// Parses `90d`, `12h`, `30m`, `45s`, `1h30m` or a bare number of seconds.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let s = s.trim();
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Span(n));
        }
        humantime::parse_duration(s)
            .map(|d| Span(d.as_secs()))
            .map_err(|e| {
                PolicyError::Invalid(format!(
                    "{s:?} is not a duration ({e}); write it like 90d, 12h, 30m or 45s"
                ))
            })
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        for (unit, n) in [("d", DAY), ("h", 3600), ("m", 60)] {
            if s > 0 && s.is_multiple_of(n) {
                return write!(f, "{}{unit}", s / n);
            }
        }
        write!(f, "{s}s")
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Span(n)),
            Raw::Text(t) => Span::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// How long one kind of key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifetime {
    /// How long a key is active before it is due for rotation.
    pub cryptoperiod: Span,
    /// How long the old key stays (decrypt-only) after the rotation.
    pub grace: Span,
}

impl Lifetime {
    const fn days(period: u64, grace: u64) -> Self {
        Lifetime {
            cryptoperiod: Span::days(period),
            grace: Span::days(grace),
        }
    }
}

/// Named lifetimes, after common key lifetimes.
pub const PRESETS: [(&str, Lifetime); 4] = [
    ("90d", Lifetime::days(90, 30)),
    ("180d", Lifetime::days(180, 90)),
    ("365d", Lifetime::days(365, 180)),
    ("30d", Lifetime::days(30, 7)),
];

/// The lifetime of preset `name` (`90d`, `180d`, `365d`, `30d`).
pub fn preset(name: &str) -> Result<Lifetime, PolicyError> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| *l)
        .ok_or_else(|| {
            PolicyError::Invalid(format!(
                "no preset named {name:?}; presets: {}",
                PRESETS.map(|(n, _)| n).join(", ")
            ))
        })
}

/// How sensitive a zone's data is: scales every cryptoperiod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    /// ×1.5: keys live longer.
    Low,
    /// ×1: the cryptoperiods as written.
    #[default]
    Medium,
    /// ×0.5.
    High,
    /// ×0.25.
    Critical,
}

impl Sensitivity {
    /// `period` scaled for this class.
    pub fn scale(self, period: Span) -> Span {
        let (num, den) = match self {
            Sensitivity::Low => (3, 2),
            Sensitivity::Medium => (1, 1),
            Sensitivity::High => (1, 2),
            Sensitivity::Critical => (1, 4),
        };
        // In u128: a cryptoperiod near u64::MAX (a policy may say so) must
        // saturate, not overflow.
        let scaled = u128::from(period.0) * num / den;
        Span(u64::try_from(scaled).unwrap_or(u64::MAX))
    }
}

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// Every day, Monday first.
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    /// The weekday of Unix day `day` (day 0, 1970-01-01, was a Thursday).
    pub fn of_day(day: u64) -> Self {
        Self::ALL[((day + 3) % 7) as usize]
    }
}

/// When flips may happen: from `start` (UTC, `HH:MM`) for `duration`, on
/// the listed days (the day the window starts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start time of day, UTC, `HH:MM`.
    pub start: String,
    /// Length (at most 24 h; a window may run past midnight).
    pub duration: Span,
    /// Days on which a window starts.
    pub days: Vec<Weekday>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            start: "02:00".into(),
            duration: Span(4 * 3600),
            days: Weekday::ALL.to_vec(),
        }
    }
}

impl Window {
    /// Seconds after midnight UTC the window starts.
    pub fn start_secs(&self) -> Result<u64, PolicyError> {
        let bad = || {
            PolicyError::Invalid(format!(
                "window start {:?} is not a UTC time of day; write it as HH:MM, like 02:00",
                self.start
            ))
        };
        let (h, m) = self.start.split_once(':').ok_or_else(bad)?;
        let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 3600 + m * 60)
    }

    /// The window that contains `t`, as `(start, end)` Unix seconds.
    pub fn containing(&self, t: u64) -> Option<(u64, u64)> {
        let start = self.start_secs().ok()?;
        let today = t / DAY;
        // A window of at most a day that contains t started today or yesterday.
        // Checked: `t` may be a deadline far in the future (a policy's
        // cryptoperiod can be near u64::MAX), where a window start
        // overflows and there is no window.
        (today.saturating_sub(1)..=today)
            .filter(|d| self.days.contains(&Weekday::of_day(*d)))
            .filter_map(|d| {
                let s = (d * DAY).checked_add(start)?;
                Some((s, s.saturating_add(self.duration.0)))
            })
            .find(|(s, e)| *s <= t && t < *e)
    }

    /// Whether `t` is inside a window.
    pub fn contains(&self, t: u64) -> bool {
        self.containing(t).is_some()
    }

    /// The start of the first window that starts at or after `t`.
    pub fn next_start(&self, t: u64) -> Option<u64> {
        let start = self.start_secs().ok()?;
        let today = t / DAY;
        (today..today.saturating_add(8))
            .filter(|d| self.days.contains(&Weekday::of_day(*d)))
            .filter_map(|d| d.checked_mul(DAY)?.checked_add(start))
            .find(|s| *s >= t)
    }

    /// When a flip due at `t` may happen: `t` itself inside a window, else
    /// the next window's start.
    pub fn earliest_flip(&self, t: u64) -> Option<u64> {
        if self.contains(t) {
            Some(t)
        } else {
            self.next_start(t)
        }
    }
}

/// What the staging should hold at the flip.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    /// Every content block shared by several logical blocks.
    pub shared: bool,
    /// Every hot content block.
    pub hot: bool,
    /// Percent of the rest.
    pub rest_percent: u8,
}

impl Default for Coverage {
    fn default() -> Self {
        Coverage {
            shared: true,
            hot: true,
            rest_percent: 100,
        }
    }
}

/// What a write in a rotation window does when staging is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagingFull {
    /// Acknowledge after the data write alone, counted as unstaged.
    #[default]
    Unstaged,
    /// Wait for staging space, up to `strict_wait`, then fall back to
    /// unstaged and alert.
    Strict,
}

/// What happens to a rotation the scheduler gave up on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Leave the window open; the job is retried when the scheduler is
    /// resumed or the zone released.
    #[default]
    Resume,
    /// Abort the open window (staged copies dropped, next key destroyed).
    Abort,
}

/// A zone's rotation policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The preset the lifetimes came from, if any (shown back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Data key.
    pub dek: Lifetime,
    /// Key-encryption key.
    pub kek: Lifetime,
    /// MAC key.
    pub mac: Lifetime,
    /// The root key (pool-wide: read from the default policy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Lifetime>,
    /// Scales every cryptoperiod.
    #[serde(default)]
    pub sensitivity: Sensitivity,
    /// When flips may happen.
    #[serde(default)]
    pub window: Window,
    /// What staging should hold at the flip.
    #[serde(default)]
    pub coverage: Coverage,
    /// Throttle for this zone's rotations in MiB/s (0: the pool's).
    #[serde(default)]
    pub rate_mib_s: u64,
    /// A write in a window when staging is full.
    #[serde(default)]
    pub staging_full: StagingFull,
    /// How long a strict write waits for staging space.
    #[serde(default = "default_strict_wait")]
    pub strict_wait: Span,
    /// KEK rotations re-wrap this many keys per batch.
    #[serde(default = "default_kek_batch")]
    pub kek_batch: usize,
    /// Pause between KEK re-wrap batches.
    #[serde(default)]
    pub kek_pause: Span,
    /// What happens to a rotation the scheduler gave up on.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How a raised threat level shortens the cryptoperiods.
    #[serde(default)]
    pub threat: ThreatScale,
}

/// Cryptoperiods under a raised threat level, as a percent of the
/// (sensitivity-scaled) period: `high` also applies at critical, which
/// adds an emergency rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreatScale {
    /// Percent at elevated.
    pub elevated_percent: u8,
    /// Percent at high and critical.
    pub high_percent: u8,
}

impl Default for ThreatScale {
    fn default() -> Self {
        ThreatScale {
            elevated_percent: 50,
            high_percent: 25,
        }
    }
}

impl ThreatScale {
    /// `period` shortened for `level`.
    pub fn scale(self, period: Span, level: super::threat::ThreatLevel) -> Span {
        use super::threat::ThreatLevel as L;
        let pct = match level {
            L::Normal => 100,
            L::Elevated => u64::from(self.elevated_percent),
            L::High | L::Critical => u64::from(self.high_percent),
        };
        Span((u128::from(period.0) * u128::from(pct) / 100) as u64)
    }
}

fn default_strict_wait() -> Span {
    Span(5)
}

fn default_kek_batch() -> usize {
    64
}

impl Default for Policy {
    /// The pool default: preset 90d for every key, medium sensitivity, a
    /// nightly 02:00-06:00 UTC window.
    fn default() -> Self {
        Policy::from_preset("90d").expect("built-in preset")
    }
}

/// What validation needs to know of the zone.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZoneFacts {
    /// Bytes of content the zone's rotation must re-encrypt.
    pub content_bytes: u64,
    /// Bytes per second a rotation is expected to re-encrypt.
    pub rate_bytes_per_sec: u64,
}

impl ZoneFacts {
    /// How long a rotation of the zone's data needs.
    pub fn rotation_secs(&self) -> u64 {
        self.content_bytes.div_ceil(self.rate_bytes_per_sec.max(1))
    }
}

impl Policy {
    /// Every key on preset `name`, other fields at their defaults.
    pub fn from_preset(name: &str) -> Result<Self, PolicyError> {
        let l = preset(name)?;
        Ok(Policy {
            preset: Some(name.into()),
            dek: l,
            kek: l,
            mac: l,
            root: None,
            sensitivity: Sensitivity::default(),
            window: Window::default(),
            coverage: Coverage::default(),
            rate_mib_s: 0,
            staging_full: StagingFull::default(),
            strict_wait: default_strict_wait(),
            kek_batch: default_kek_batch(),
            kek_pause: Span(0),
            on_failure: OnFailure::default(),
            threat: ThreatScale::default(),
        })
    }

    /// The DEK cryptoperiod after the sensitivity scaling.
    pub fn dek_period(&self) -> Span {
        self.sensitivity.scale(self.dek.cryptoperiod)
    }

    /// The KEK cryptoperiod after the sensitivity scaling.
    pub fn kek_period(&self) -> Span {
        self.sensitivity.scale(self.kek.cryptoperiod)
    }

    /// The MAC key cryptoperiod after the sensitivity scaling.
    pub fn mac_period(&self) -> Span {
        self.sensitivity.scale(self.mac.cryptoperiod)
    }

    /// The KEK re-wrap pause.
    pub fn kek_pause(&self) -> Duration {
        Duration::from_secs(self.kek_pause.0)
    }

    /// Checks the policy; the error says what to change.
    pub fn validate(&self, zone: &str, facts: ZoneFacts) -> Result<(), PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        for (name, l) in [("dek", self.dek), ("kek", self.kek), ("mac", self.mac)]
            .into_iter()
            .chain(self.root.map(|r| ("root", r)))
        {
            if l.cryptoperiod.0 == 0 {
                return bad(format!(
                    "{name} cryptoperiod is zero; set --{name}-cryptoperiod to a duration like 90d"
                ));
            }
            if l.grace > l.cryptoperiod {
                return bad(format!(
                    "{name} grace {} is longer than its cryptoperiod {}; set --{name}-grace to at most {}",
                    l.grace, l.cryptoperiod, l.cryptoperiod
                ));
            }
        }
        let start = self.window.start_secs()?;
        let _ = start;
        if self.window.duration.0 == 0 {
            return bad(
                "the maintenance window has zero length; set --window-duration to at least 1m (like 4h)"
                    .into(),
            );
        }
        if self.window.duration.0 > DAY {
            return bad(format!(
                "the maintenance window lasts {}, over a day; set --window-duration to at most 24h",
                self.window.duration
            ));
        }
        if self.window.days.is_empty() {
            return bad(
                "the maintenance window has no days; set --window-days, like mon,wed,sat or all"
                    .into(),
            );
        }
        if self.coverage.rest_percent > 100 {
            return bad(format!(
                "coverage rest_percent is {}; set it to 0..=100",
                self.coverage.rest_percent
            ));
        }
        if self.staging_full == StagingFull::Strict && !(1..=60).contains(&self.strict_wait.0) {
            return bad(format!(
                "strict_wait is {}; a strict write may wait 1s..=60s before it falls back",
                self.strict_wait
            ));
        }
        let t = self.threat;
        if !(1..=100).contains(&t.elevated_percent)
            || !(1..=100).contains(&t.high_percent)
            || t.high_percent > t.elevated_percent
        {
            return bad(format!(
                "threat percents are elevated {} and high {}; set both in 1..=100 with high at most elevated",
                t.elevated_percent, t.high_percent
            ));
        }
        if self.kek_batch == 0 {
            return bad("kek_batch is zero; set --kek-batch to at least 1".into());
        }
        let need = Span(facts.rotation_secs());
        let period = self.dek_period();
        if period < need {
            return bad(format!(
                "the DEK cryptoperiod after {:?} scaling is {period}, shorter than the {need} a rotation of zone {zone}'s {} MiB needs at {} MiB/s; \
                 set --dek-cryptoperiod to at least {}, lower the sensitivity, or raise the throttle",
                self.sensitivity,
                facts.content_bytes >> 20,
                facts.rate_bytes_per_sec >> 20,
                Span(need.0.div_ceil(DAY) * DAY).max(need),
            ));
        }
        Ok(())
    }
}

/// The pool's policies: a default and per-zone overrides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    /// For every zone without its own.
    #[serde(default)]
    pub default: Policy,
    /// Zones with their own.
    #[serde(default)]
    pub zones: BTreeMap<String, Policy>,
}

impl Policies {
    /// The file in pool directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(POLICY_FILE)
    }

    /// Reads the pool's policies (the defaults when there is no file).
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PolicyError::File {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(PolicyError::File {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Writes them atomically.
    pub fn save(&self, dir: &Path) -> Result<(), PolicyError> {
        let path = Self::path(dir);
        let text = serde_json::to_vec_pretty(self).map_err(|e| PolicyError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::pool::write_atomic(&path, &text).map_err(|e| PolicyError::File {
            path,
            message: e.to_string(),
        })
    }

    /// The policy of `zone`.
    pub fn of(&self, zone: &str) -> &Policy {
        self.zones.get(zone).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-07 was a Monday.
    const MON: u64 = 20_794 * DAY;

    /// Found by the `policy` fuzz target: a deadline near u64::MAX (a
    /// cryptoperiod may be that long) overflowed the window maths, and a
    /// long period overflowed the sensitivity scaling.
    #[test]
    fn window_and_scaling_saturate_at_the_end_of_time() {
        let w = Window::default();
        for t in [u64::MAX, u64::MAX - 1] {
            assert_eq!(w.next_start(t), None);
            assert_eq!(w.containing(t), None);
            assert_eq!(w.earliest_flip(t), None);
        }
        let t = u64::MAX - 2 * DAY;
        assert!(w.next_start(t).is_some_and(|s| s >= t));
        assert_eq!(Sensitivity::Low.scale(Span(u64::MAX)), Span(u64::MAX));
        assert_eq!(Sensitivity::Low.scale(Span(7)), Span(10));
        assert_eq!(
            Sensitivity::Critical.scale(Span(u64::MAX)),
            Span(u64::MAX / 4)
        );
    }

    #[test]
    fn weekdays_and_window_maths() {
        assert_eq!(Weekday::of_day(0), Weekday::Thu);
        assert_eq!(Weekday::of_day(MON / DAY), Weekday::Mon);
        let w = Window {
            start: "22:00".into(),
            duration: Span(4 * 3600),
            days: vec![Weekday::Mon, Weekday::Fri],
        };
        let start = MON + 22 * 3600;
        assert_eq!(w.next_start(MON), Some(start));
        assert_eq!(w.next_start(start), Some(start));
        assert!(!w.contains(start - 1));
        assert!(w.contains(start));
        // Past midnight into Tuesday.
        assert!(w.contains(start + 3 * 3600));
        assert_eq!(
            w.containing(start + 3 * 3600),
            Some((start, start + 4 * 3600))
        );
        assert!(!w.contains(start + 4 * 3600));
        // Next is Friday.
        assert_eq!(w.next_start(start + 1), Some(MON + 4 * DAY + 22 * 3600));
        assert_eq!(w.earliest_flip(start + 60), Some(start + 60));
        assert_eq!(w.earliest_flip(MON), Some(start));
        // Sunday 23:00: the window of Friday is long over; Monday is next.
        assert_eq!(
            w.next_start(MON + 6 * DAY + 23 * 3600),
            Some(start + 7 * DAY)
        );
    }

    #[test]
    fn presets_and_scaling() {
        let p = Policy::from_preset("30d").unwrap();
        assert_eq!(p.dek.cryptoperiod, Span::days(30));
        assert_eq!(p.dek.grace, Span::days(7));
        assert!(Policy::from_preset("7y").is_err());
        assert_eq!(
            Sensitivity::Critical.scale(Span::days(90)),
            Span(90 * DAY / 4)
        );
        assert_eq!(Sensitivity::Low.scale(Span::days(90)), Span::days(135));
        assert_eq!(Sensitivity::High.scale(Span(3)), Span(1));
    }

    #[test]
    fn spans_read_and_show() {
        assert_eq!(Span::parse("90d").unwrap(), Span::days(90));
        assert_eq!(Span::parse("4h").unwrap().0, 14_400);
        assert_eq!(Span::parse("17").unwrap().0, 17);
        assert_eq!(Span::days(90).to_string(), "90d");
        assert_eq!(Span(5400).to_string(), "90m");
        assert_eq!(Span(61).to_string(), "61s");
        assert!(Span::parse("soon").is_err());
        let p = Policy::default();
        let back: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    fn refused(p: &Policy, facts: ZoneFacts) -> String {
        match p.validate("z1", facts) {
            Err(PolicyError::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn invalid_policies_say_what_to_change() {
        let ok = ZoneFacts::default();
        assert!(Policy::default().validate("z1", ok).is_ok());
        let mut p = Policy::default();
        p.dek.grace = Span::days(120);
        let m = refused(&p, ok);
        assert!(m.contains("--dek-grace to at most 90d"), "{m}");
        let mut p = Policy::default();
        p.window.duration = Span(0);
        assert!(refused(&p, ok).contains("--window-duration"));
        let mut p = Policy::default();
        p.window.start = "25:00".into();
        assert!(refused(&p, ok).contains("HH:MM"));
        let mut p = Policy::default();
        p.window.days.clear();
        assert!(refused(&p, ok).contains("--window-days"));
        let p = Policy {
            staging_full: StagingFull::Strict,
            strict_wait: Span(0),
            ..Default::default()
        };
        assert!(refused(&p, ok).contains("strict_wait"));
        // 2 TiB at 1 MiB/s needs about 24 days; a critical 90d is 22.5 days.
        let big = ZoneFacts {
            content_bytes: 2 << 40,
            rate_bytes_per_sec: 1 << 20,
        };
        let mut p = Policy::default();
        assert!(p.validate("z1", big).is_ok());
        p.sensitivity = Sensitivity::Critical;
        let m = refused(&p, big);
        assert!(m.contains("--dek-cryptoperiod to at least 25d"), "{m}");
    }
}
