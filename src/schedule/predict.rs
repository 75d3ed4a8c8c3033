//! The predictive window: when a DEK rotation's window must open so that
//! staging covers the policy's target by the flip.
//!
//! A pure function of its [`Inputs`], so it is tested and benchmarked
//! without a pool. The flip comes first: the latest moment inside a
//! maintenance window at or before the key's deadline (the end of its
//! cryptoperiod, shortened by a raised threat level); for a key already
//! past its deadline, the earliest moment in the next window that leaves
//! room for staging. The window opens the predicted staging time plus a
//! margin before that:
//!
//! - **work**: the blocks the pipeline stages before the target is met. It
//!   stages shared blocks first, then hot ones, then the rest, so the work
//!   is every unstaged shared and hot block plus the share of the rest the
//!   target asks for;
//! - **rate**: the zone's staging throughput learned from earlier windows
//!   (else its throttle, else the assumed rate). Foreground writes take
//!   staging bandwidth: a write rate above the one the rate was learned
//!   under slows it byte for byte, to at most a quarter of it;
//! - **capacity**: writes in the window also take staging space; what is
//!   left bounds what the pipeline can stage;
//! - **margin**: a share of the staging time by sensitivity (10 % low,
//!   15 % medium, 25 % high, 40 % critical), at least two scheduler checks
//!   (none when nothing is left to stage).
//!
//! While the window is open the scheduler re-plans at each check from what
//! is staged by then and the rates as they are; the flip only moves later,
//! and never past the window's end or the deadline.

use serde::{Deserialize, Serialize};

use super::policy::{Coverage, Sensitivity, Window};
use crate::zone::classes::ClassCensus;

const DAY: u64 = 86_400;
const BLOCK: f64 = 4096.0;

/// Where the staging rate of a plan came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    /// Measured in the zone's earlier windows.
    Learned,
    /// The pool's `[rotation] rate_mib_s` throttle.
    PoolThrottle,
    /// The zone policy's `rate_mib_s`.
    PolicyThrottle,
    /// `[schedule] assumed_rate_mib_s`.
    Assumed,
}

/// A zone's staging throughput learned from its windows (persisted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Learned {
    /// Staged bytes per second under the throttle, smoothed over windows.
    pub bytes_per_sec: f64,
    /// The foreground write rate it was measured under.
    pub write_bytes_per_sec: f64,
    /// Windows measured.
    pub windows: u32,
    /// When it last changed (Unix seconds).
    pub updated_unix: u64,
}

impl Learned {
    /// Folds one window's measurement in (half weight to the newest).
    pub fn fold(&mut self, bytes_per_sec: f64, write_bytes_per_sec: f64, now: u64) {
        if self.windows == 0 {
            self.bytes_per_sec = bytes_per_sec;
            self.write_bytes_per_sec = write_bytes_per_sec;
        } else {
            self.bytes_per_sec = (self.bytes_per_sec + bytes_per_sec) / 2.0;
            self.write_bytes_per_sec = (self.write_bytes_per_sec + write_bytes_per_sec) / 2.0;
        }
        self.windows += 1;
        self.updated_unix = now;
    }
}

/// Everything a plan is made from (shown by `keyturn rotate plan`).
#[derive(Clone, Debug, Serialize)]
pub struct Inputs {
    /// Now (Unix seconds).
    pub now: u64,
    /// When the active DEK's (threat-scaled) cryptoperiod ends.
    pub deadline: u64,
    /// Content blocks by class, and staged so far.
    pub census: ClassCensus,
    /// The policy's coverage target.
    pub coverage: Coverage,
    /// Staging throughput, bytes per second.
    pub rate_bytes_per_sec: f64,
    /// Where it came from.
    pub rate_source: RateSource,
    /// The write rate the rate was learned under (0 unless learned).
    pub rate_write_bytes_per_sec: f64,
    /// The zone's foreground write rate now, bytes per second.
    pub write_bytes_per_sec: f64,
    /// Free staging capacity, bytes.
    pub staging_free_bytes: u64,
    /// The zone's sensitivity (sets the margin).
    pub sensitivity: Sensitivity,
    /// The least margin, seconds (two scheduler checks).
    pub min_margin_secs: u64,
    /// The maintenance window.
    pub window: Window,
    /// The flip already set when a window is open (then the plan only
    /// moves it later).
    pub open_flip_at: Option<u64>,
}

/// A plan for one DEK rotation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// Blocks the target asks to have staged at the flip.
    pub target_blocks: u64,
    /// Of those, staged already.
    pub target_staged: u64,
    /// Blocks the pipeline must still stage to meet the target.
    pub work_blocks: u64,
    /// Staging rate after the write load, bytes per second.
    pub effective_bytes_per_sec: f64,
    /// Predicted staging time of the work, seconds.
    pub staging_secs: u64,
    /// Margin added, seconds.
    pub margin_secs: u64,
    /// When to flip (Unix seconds).
    pub flip_at: u64,
    /// When the window must open (Unix seconds; at most now once late).
    pub open_at: u64,
    /// The latest the flip may move to (window end, deadline).
    pub latest_flip: u64,
    /// The deadline has passed (or no window comes before it).
    pub overdue: bool,
    /// Blocks staging can still take, after the writes' share.
    pub capacity_blocks: u64,
    /// The target needs more staging space than is free.
    pub capacity_limited: bool,
    /// Predicted share of the target staged at the flip, percent.
    pub predicted_coverage_percent: f64,
    /// Whether the target is predicted to be met.
    pub meets_target: bool,
}

/// What the target asks of each class: (required, staged) per class, in
/// the pipeline's order.
fn requirements(c: &ClassCensus, cov: &Coverage) -> [(u64, u64, u64); 3] {
    let rest_need = (c.rest * u64::from(cov.rest_percent)).div_ceil(100);
    // (blocks in the class, staged, required by the target)
    [
        (
            c.shared,
            c.staged_shared,
            if cov.shared { c.shared } else { 0 },
        ),
        (c.hot, c.staged_hot, if cov.hot { c.hot } else { 0 }),
        (c.rest, c.staged_rest, rest_need),
    ]
}

/// Coverage of the target: (percent of the target staged, whether every
/// class meets its requirement), for a census.
pub fn achieved(c: &ClassCensus, cov: &Coverage) -> (f64, bool, u64, u64) {
    let req = requirements(c, cov);
    let target: u64 = req.iter().map(|r| r.2).sum();
    let staged: u64 = req.iter().map(|r| r.1.min(r.2)).sum();
    let met = req.iter().all(|r| r.1 >= r.2);
    let pct = if target == 0 {
        100.0
    } else {
        100.0 * staged as f64 / target as f64
    };
    (pct, met, target, staged)
}

fn margin_share(s: Sensitivity) -> f64 {
    match s {
        Sensitivity::Low => 0.10,
        Sensitivity::Medium => 0.15,
        Sensitivity::High => 0.25,
        Sensitivity::Critical => 0.40,
    }
}

/// The latest instant at or before `t` inside a maintenance window.
pub fn latest_in_window(w: &Window, t: u64) -> Option<u64> {
    if w.contains(t) {
        return Some(t);
    }
    let start = w.start_secs().ok()?;
    let today = t / DAY;
    (today.saturating_sub(8)..=today)
        .filter(|d| w.days.contains(&super::policy::Weekday::of_day(*d)))
        .map(|d| d * DAY + start + w.duration.0)
        .filter(|end| *end >= 1 && end - 1 <= t)
        .map(|end| end - 1)
        .max()
}

/// The plan.
pub fn predict(i: &Inputs) -> Prediction {
    let req = requirements(&i.census, &i.coverage);
    let target: u64 = req.iter().map(|r| r.2).sum();
    let target_staged: u64 = req.iter().map(|r| r.1.min(r.2)).sum();
    // The pipeline stages shared and hot blocks before the rest, whatever
    // the target says, so they are work before the rest is.
    let work = (req[0].0 - req[0].1.min(req[0].0))
        + (req[1].0 - req[1].1.min(req[1].0))
        + req[2].2.saturating_sub(req[2].1);
    let base = i.rate_bytes_per_sec.max(1.0);
    let extra_writes = (i.write_bytes_per_sec - i.rate_write_bytes_per_sec).max(0.0);
    let rate = (base - extra_writes).max(base / 4.0);
    let staging_secs = (work as f64 * BLOCK / rate).ceil() as u64;
    // Nothing left to stage needs no margin: the flip may be now.
    let margin = if work == 0 {
        0
    } else {
        ((staging_secs as f64 * margin_share(i.sensitivity)).ceil() as u64).max(i.min_margin_secs)
    };
    let lead = staging_secs + margin;
    let now = i.now;
    let w = &i.window;

    let before_deadline = (i.deadline > now)
        .then(|| latest_in_window(w, i.deadline))
        .flatten();
    let (flip, latest, overdue) = match i.open_flip_at {
        Some(f) => {
            let latest = match before_deadline {
                Some(l) if l >= f => l,
                _ => w.containing(f).map_or(f, |(_, e)| e - 1),
            };
            let overdue = before_deadline.is_none();
            ((now + lead).min(latest).max(f), latest, overdue)
        }
        None => match before_deadline.filter(|l| *l >= now) {
            Some(l) => (l, l, false),
            None => {
                let (s, e) = w
                    .containing(now)
                    .or_else(|| w.next_start(now).map(|s| (s, s + w.duration.0)))
                    .unwrap_or((now, now + 1));
                let (s, last) = (s.max(now), e - 1);
                ((now + lead).clamp(s, last.max(s)), last.max(s), true)
            }
        },
    };
    let open_at = flip.saturating_sub(lead).max(now.min(flip));
    let open_at = if i.open_flip_at.is_some() {
        now
    } else {
        open_at
    };

    // What can be staged by the flip, in the pipeline's order.
    let secs = flip.saturating_sub(now.max(open_at)) as f64;
    let writes_bytes = i.write_bytes_per_sec * flip.saturating_sub(now) as f64;
    let capacity = ((i.staging_free_bytes as f64 - writes_bytes).max(0.0) / BLOCK) as u64;
    let mut doable = ((rate * secs / BLOCK) as u64).min(capacity);
    let mut covered = 0u64;
    let mut met = true;
    for (n, staged, need) in req {
        let todo = n.saturating_sub(staged);
        let more = doable.min(todo);
        doable -= more;
        let have = staged + more;
        covered += have.min(need);
        met &= have >= need;
    }
    let pct = if target == 0 {
        100.0
    } else {
        100.0 * covered as f64 / target as f64
    };
    Prediction {
        target_blocks: target,
        target_staged,
        work_blocks: work,
        effective_bytes_per_sec: rate,
        staging_secs,
        margin_secs: margin,
        flip_at: flip,
        open_at,
        latest_flip: latest,
        overdue,
        capacity_blocks: capacity,
        capacity_limited: work > capacity,
        predicted_coverage_percent: pct,
        meets_target: met,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::policy::{Span, Weekday};

    // Monday 2026-12-07 00:00 UTC.
    const MON: u64 = 20_794 * DAY;
    const MIB: f64 = 1048576.0;

    fn inputs(now: u64, deadline: u64, rest: u64) -> Inputs {
        Inputs {
            now,
            deadline,
            census: ClassCensus {
                shared: 100,
                hot: 200,
                rest,
                ..Default::default()
            },
            coverage: Coverage {
                shared: true,
                hot: true,
                rest_percent: 50,
            },
            rate_bytes_per_sec: MIB,
            rate_source: RateSource::Learned,
            rate_write_bytes_per_sec: 0.0,
            write_bytes_per_sec: 0.0,
            staging_free_bytes: 1 << 30,
            sensitivity: Sensitivity::Medium,
            min_margin_secs: 1,
            window: Window {
                start: "02:00".into(),
                duration: Span(2 * 3600),
                days: Weekday::ALL.to_vec(),
            },
            open_flip_at: None,
        }
    }

    #[test]
    fn flips_at_the_last_window_moment_before_the_deadline_and_opens_early_enough() {
        // Deadline Tuesday noon: the last window before it ends Tuesday 04:00.
        let i = inputs(MON, MON + DAY + 12 * 3600, 1000);
        let p = predict(&i);
        assert_eq!(p.flip_at, MON + DAY + 4 * 3600 - 1);
        assert!(!p.overdue);
        // 100 shared + 200 hot + 500 of the rest = 800 blocks = 3.125 MiB at 1 MiB/s.
        assert_eq!(p.target_blocks, 800);
        assert_eq!(p.work_blocks, 800);
        assert_eq!(p.staging_secs, 4);
        assert_eq!(p.margin_secs, 1);
        assert_eq!(p.open_at, p.flip_at - 5);
        assert!(p.meets_target);
        assert_eq!(p.predicted_coverage_percent, 100.0);
    }

    #[test]
    fn an_overdue_key_flips_in_the_next_window_after_staging() {
        let mut i = inputs(MON + 3600, MON - DAY, 100_000);
        i.census.rest = 100_000; // 50,300 blocks of work: about 197 s.
        let p = predict(&i);
        assert!(p.overdue);
        assert_eq!(
            p.flip_at,
            MON + 2 * 3600,
            "the window's start comes after the lead"
        );
        assert_eq!(p.open_at, p.flip_at - p.staging_secs - p.margin_secs);
        // Inside the window: now plus the lead.
        let i = inputs(MON + 2 * 3600 + 60, MON - DAY, 100_000);
        let p = predict(&i);
        assert_eq!(p.flip_at, i.now + p.staging_secs + p.margin_secs);
        assert_eq!(p.latest_flip, MON + 4 * 3600 - 1);
    }

    #[test]
    fn writes_slow_staging_and_a_replan_moves_the_flip_later_but_not_past_the_window() {
        let mut i = inputs(MON + 2 * 3600, MON - DAY, 20_000);
        i.open_flip_at = Some(MON + 2 * 3600 + 30);
        let calm = predict(&i);
        i.write_bytes_per_sec = 0.5 * MIB;
        let busy = predict(&i);
        assert!(busy.effective_bytes_per_sec < calm.effective_bytes_per_sec);
        assert!(busy.flip_at > calm.flip_at);
        // Writes far above the rate: a quarter of it at worst.
        i.write_bytes_per_sec = 10.0 * MIB;
        assert_eq!(predict(&i).effective_bytes_per_sec, MIB / 4.0);
        // A huge zone cannot be staged in the window: the flip stays at its end.
        i.census.rest = 100_000_000;
        let p = predict(&i);
        assert_eq!(p.flip_at, MON + 4 * 3600 - 1);
        assert!(!p.meets_target);
        assert!(p.predicted_coverage_percent < 10.0);
        // Never earlier than the flip already set.
        i.census.rest = 0;
        i.open_flip_at = Some(MON + 3 * 3600);
        assert_eq!(predict(&i).flip_at, MON + 3 * 3600);
    }

    #[test]
    fn staging_space_bounds_the_coverage() {
        let mut i = inputs(MON, MON + DAY + 12 * 3600, 1000);
        i.staging_free_bytes = 400 * 4096;
        let p = predict(&i);
        assert!(p.capacity_limited);
        assert_eq!(p.capacity_blocks, 400);
        assert!(!p.meets_target);
        assert_eq!(p.predicted_coverage_percent, 50.0);
    }

    #[test]
    fn achieved_coverage_counts_each_class_against_its_requirement() {
        let c = ClassCensus {
            shared: 10,
            hot: 10,
            rest: 100,
            staged_shared: 10,
            staged_hot: 10,
            staged_rest: 40,
        };
        let cov = Coverage {
            shared: true,
            hot: true,
            rest_percent: 50,
        };
        let (pct, met, target, staged) = achieved(&c, &cov);
        assert_eq!((target, staged, met), (70, 60, false));
        assert!((pct - 600.0 / 7.0).abs() < 1e-9);
        let c = ClassCensus {
            staged_rest: 55,
            ..c
        };
        assert!(achieved(&c, &cov).1);
    }

    #[test]
    fn the_latest_window_moment_before_a_time() {
        let w = inputs(0, 0, 0).window;
        assert_eq!(latest_in_window(&w, MON + 3 * 3600), Some(MON + 3 * 3600));
        assert_eq!(
            latest_in_window(&w, MON + 12 * 3600),
            Some(MON + 4 * 3600 - 1)
        );
        assert_eq!(
            latest_in_window(&w, MON + 3600),
            Some(MON - DAY + 4 * 3600 - 1)
        );
    }
}
