//! CPU cost of one scheduler check's planning for 1,000 zones: building
//! each zone's view (its policy looked up by name), cloning the schedule
//! (the scheduler compares before and after to know whether to save it),
//! [`plan`] and the comparison. Key ages are given, as the scheduler has
//! them once it has read the zones' key files; those reads and each zone's
//! rotation status are I/O and are not in this figure.
//!
//! The mix: every zone has its own policy (a 2 h window at 02:00 UTC); one
//! in ten has a due DEK, one in fifty a severely overdue one, one in a
//! hundred an old KEK; the check runs at 00:30, outside the window, so the
//! due ones stay queued from check to check (the steady state of a large
//! pool), and the cap (2) is reached at the first check.
//!
//! `cargo bench --bench schedule [-- --checks N]`: prints the median and
//! the 99th percentile of this thread's CPU time per check, and a
//! `RESULT` line.

use std::hint::black_box;

use keyturn::schedule::policy::{Policies, Policy, Span, Weekday, Window};
use keyturn::schedule::queue::{KeyAge, Schedule, ZoneView, plan};

const ZONES: usize = 1000;
const DAY: u64 = 86_400;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    let mut checks = 2000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--checks" {
            checks = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--checks N");
        }
    }
    let now = 20_794 * DAY + 1800;
    let names: Vec<String> = (0..ZONES).map(|i| format!("zone-{i:04}")).collect();
    let mut policies = Policies::default();
    for n in &names {
        let mut p = Policy::from_preset("90d").expect("preset");
        p.window = Window {
            start: "02:00".into(),
            duration: Span(2 * 3600),
            days: Weekday::ALL.to_vec(),
        };
        policies.zones.insert(n.clone(), p);
    }
    let ages: Vec<(KeyAge, KeyAge)> = (0..ZONES)
        .map(|i| {
            let dek_days = if i % 50 == 0 {
                140
            } else if i % 10 == 0 {
                95
            } else {
                (i % 80) as u64
            };
            let kek_days = if i % 100 == 7 { 100 } else { 10 };
            (
                KeyAge::ActiveSince(now - dek_days * DAY),
                KeyAge::ActiveSince(now - kek_days * DAY),
            )
        })
        .collect();
    let mut schedule = Schedule::default();
    let mut samples = Vec::with_capacity(checks);
    for _ in 0..checks {
        let t = thread_cpu_ns();
        let views: Vec<ZoneView<'_>> = names
            .iter()
            .zip(&ages)
            .map(|(n, (dek, kek))| ZoneView {
                name: n,
                policy: policies.of(n),
                dek: *dek,
                kek: *kek,
                mac: *kek,
                rotation_secs: 600,
                dek_busy: false,
                dek_period: policies.of(n).dek_period(),
                kek_period: policies.of(n).kek_period(),
                mac_period: policies.of(n).mac_period(),
                threat_emergency: false,
                dek_plan: None,
            })
            .collect();
        let before = schedule.clone();
        let starts = plan(&mut schedule, &views, now, 2);
        let changed = schedule != before;
        black_box((starts, changed));
        samples.push(thread_cpu_ns() - t);
    }
    samples.sort_unstable();
    let median = samples[samples.len() / 2] as f64 / 1e3;
    let p99 = samples[samples.len() * 99 / 100] as f64 / 1e3;
    println!(
        "{ZONES} zones, {} jobs in the schedule ({} running): CPU per check median {median:.1} us, p99 {p99:.1} us ({checks} checks)",
        schedule.jobs.len(),
        schedule.running()
    );
    println!("RESULT zones={ZONES} median_us={median:.1} p99_us={p99:.1}");
}
