//! Accuracy of the predictive window, in a simulation (the planner is the
//! real one, [`predict`]; the zone, its staging and its writes are
//! simulated, minute by minute).
//!
//! Each of `--rotations N` (default 40) rotations of one zone: 10 million
//! content blocks (38 GiB; 5% shared, 10% hot), target all shared and hot blocks
//! and 80% of the rest; a 4 h window at 02:00 with the deadline at 05:00
//! (so the flip is at 05:00 and only the opening time can be chosen). The
//! true staging rate drifts from window to window (×0.93..×1.07) and
//! minute to minute (±10%); foreground writes of 2-10 MiB/s take half
//! their rate from staging, and in one rotation in four they double at a
//! random moment of the window. The planner knows only what the scheduler
//! would: the rate learned from earlier windows (the first window uses the
//! throttle, set 20% off the truth) and the write rate at each check. It
//! re-plans every minute; the window opens at the first check at or after
//! the planned opening.
//!
//! Reported: the share of rotations whose target was met at the flip, and
//! per rotation how much longer the window was than needed (from its
//! opening to the moment the target was reached).
//!
//! `cargo bench --bench predict [-- --rotations N --seed S]`.

use keyturn::schedule::policy::{Coverage, Sensitivity, Span, Weekday, Window};
use keyturn::schedule::predict::{Inputs, Learned, RateSource, achieved, predict};
use keyturn::zone::classes::ClassCensus;

const DAY: u64 = 86_400;
const MIB: f64 = 1048576.0;
const BLOCK: f64 = 4096.0;
const STEP: u64 = 60;

/// xorshift64*: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

fn main() {
    let (mut rotations, mut seed) = (40usize, 7u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rotations" => rotations = args.next().and_then(|v| v.parse().ok()).expect("N"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("S"),
            _ => {}
        }
    }
    let mut rng = Rng(seed.max(1));
    let window = Window {
        start: "02:00".into(),
        duration: Span(4 * 3600),
        days: Weekday::ALL.to_vec(),
    };
    let coverage = Coverage {
        shared: true,
        hot: true,
        rest_percent: 80,
    };
    let (shared, hot, rest) = (500_000u64, 1_000_000u64, 8_500_000u64);
    let mut base = 20.0 * MIB;
    let mut learned = Learned::default();
    let (mut met, mut ratios) = (0usize, Vec::new());
    for r in 0..rotations {
        base *= rng.range(0.93, 1.07);
        let day = (20_794 + r as u64 * 90) * DAY;
        let deadline = day + 5 * 3600;
        let mut writes = rng.range(2.0, 10.0) * MIB;
        let doubles_at = (rng.next() < 0.25).then(|| deadline - rng.range(0.0, 3600.0) as u64);
        let mut census = ClassCensus {
            shared,
            hot,
            rest,
            ..Default::default()
        };
        let (rate, source, rate_writes) = if learned.windows > 0 {
            (
                learned.bytes_per_sec,
                RateSource::Learned,
                learned.write_bytes_per_sec,
            )
        } else {
            (base * 1.2, RateSource::PoolThrottle, 0.0)
        };
        let inputs = |now: u64, census: ClassCensus, writes: f64, open: Option<u64>| Inputs {
            now,
            deadline,
            census,
            coverage,
            rate_bytes_per_sec: rate,
            rate_source: source,
            rate_write_bytes_per_sec: rate_writes,
            write_bytes_per_sec: writes,
            staging_free_bytes: 4 << 30,
            sensitivity: Sensitivity::Medium,
            min_margin_secs: 120,
            window: window.clone(),
            open_flip_at: open,
        };
        // Before the window: check every minute from a day ahead.
        let mut now = deadline - DAY;
        let mut flip = 0;
        while now < deadline {
            let p = predict(&inputs(now, census, writes, None));
            if p.open_at <= now {
                flip = p.flip_at;
                break;
            }
            now += STEP;
        }
        let opened = now;
        let (mut staged_bytes, mut reached, mut doubled) = (0.0f64, None, false);
        // What the scheduler learns: the rate while there was work, and
        // the write rate then.
        let (mut rate_sum, mut writes_sum, mut steps) = (0.0, 0.0, 0u32);
        let mut t = opened;
        while t < flip {
            if !doubled && doubles_at.is_some_and(|d| t >= d) {
                writes *= 2.0;
                doubled = true;
            }
            let true_rate = (base * rng.range(0.9, 1.1) - 0.5 * writes).max(base / 4.0);
            let before = staged_bytes;
            let total = (shared + hot + rest) as f64 * BLOCK;
            if staged_bytes < total {
                rate_sum += true_rate;
                writes_sum += writes;
                steps += 1;
            }
            staged_bytes = (staged_bytes + true_rate * STEP as f64).min(total);
            // The pipeline's order: shared, hot, then the rest.
            let mut n = (staged_bytes / BLOCK) as u64;
            census.staged_shared = n.min(shared);
            n -= census.staged_shared;
            census.staged_hot = n.min(hot);
            n -= census.staged_hot;
            census.staged_rest = n.min(rest);
            if reached.is_none() && achieved(&census, &coverage).1 {
                // Interpolate inside the minute.
                let need = (shared + hot + rest * 80 / 100) as f64 * BLOCK;
                let frac = ((need - before) / (staged_bytes - before)).clamp(0.0, 1.0);
                reached = Some(t as f64 + frac * STEP as f64);
            }
            t += STEP;
            // Re-plan: the flip can move later only up to the deadline.
            let p = predict(&inputs(t, census, writes, Some(flip)));
            flip = flip.max(p.flip_at);
        }
        let ok = achieved(&census, &coverage).1;
        met += usize::from(ok);
        let secs = (flip - opened) as f64;
        let n = f64::from(steps.max(1));
        learned.fold(rate_sum / n, writes_sum / n, flip);
        let ratio = reached.map(|at| secs / (at - opened as f64));
        if let Some(x) = ratio {
            ratios.push(x);
        }
        println!(
            "rotation {r:2}: true {:.1} MiB/s, planned with {:.1} ({source:?}), writes {:.1} MiB/s{}; window {:.0} min, target {} {}",
            base / MIB,
            rate / MIB,
            writes / MIB,
            if doubles_at.is_some() {
                " (doubled)"
            } else {
                ""
            },
            secs / 60.0,
            if ok { "met" } else { "MISSED" },
            ratio.map_or("-".into(), |x| format!("{:.2}x needed", x)),
        );
    }
    ratios.sort_by(f64::total_cmp);
    let within = ratios.iter().filter(|x| **x <= 1.25).count();
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    let max = ratios.last().copied().unwrap_or(0.0);
    println!(
        "{rotations} rotations: target met at the flip in {met} ({:.0}%); window length / needed: median {median:.2}, max {max:.2}, within 1.25x in {within} of {}",
        100.0 * met as f64 / rotations as f64,
        ratios.len()
    );
    println!(
        "RESULT rotations={rotations} met_percent={:.1} median_ratio={median:.2} max_ratio={max:.2} within_125_percent={:.1}",
        100.0 * met as f64 / rotations as f64,
        100.0 * within as f64 / ratios.len().max(1) as f64
    );
}
