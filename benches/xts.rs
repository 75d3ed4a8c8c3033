//! XTS throughput, one core: a 256 KiB buffer (L2-resident, like
//! shared/bench/xts-speed.sh) encrypted or decrypted in place one data unit at
//! a time, several timed reps, median and best MB/s (10^6 bytes/s, the unit of
//! `openssl speed`).
//!
//! `cargo bench --bench xts` runs every available backend at 4096 and 512
//! byte units, both directions. Options (after `--`), for tools/bench-xts.sh:
//! `--unit N` (repeatable), `--op enc|dec` (repeatable), `--reps N`,
//! `--secs S` (per rep), `--backend dispatched|all|vaes-avx2|aes-ni|portable`,
//! `--clock cpu|wall`. Each result is also printed as one `RESULT ...` line
//! for scripts.
//!
//! Clock: by default bytes are divided by the time this thread was on a CPU
//! (`/proc/thread-self/schedstat`), which is what `openssl speed` does by
//! default (user CPU time), so time lost to other tenants on this shared
//! 2-core box counts against neither side. `--clock wall` divides by elapsed
//! time instead (compare with `openssl speed -elapsed`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use keyturn::crypto::xts::{Backend, Xts};
use keyturn::keys::secret::DataKey;
use rand::RngCore;

const BUF: usize = 256 * 1024;

struct Opts {
    units: Vec<usize>,
    ops: Vec<&'static str>,
    reps: usize,
    secs: f64,
    backend: String,
    wall: bool,
}

fn parse() -> Opts {
    let mut o = Opts {
        units: vec![],
        ops: vec![],
        reps: 7,
        secs: 0.4,
        backend: "all".into(),
        wall: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--unit" => o.units.push(val().parse().expect("--unit N")),
            "--op" => o.ops.push(match val().as_str() {
                "enc" => "enc",
                "dec" => "dec",
                other => panic!("--op enc|dec, not {other}"),
            }),
            "--reps" => o.reps = val().parse().expect("--reps N"),
            "--secs" => o.secs = val().parse().expect("--secs S"),
            "--backend" => o.backend = val(),
            "--clock" => {
                o.wall = match val().as_str() {
                    "wall" => true,
                    "cpu" => false,
                    other => panic!("--clock cpu|wall, not {other}"),
                }
            }
            _ => {} // `cargo bench` adds `--bench`; ignore what we don't know
        }
    }
    if o.units.is_empty() {
        o.units = vec![4096, 512];
    }
    if o.ops.is_empty() {
        o.ops = vec!["enc", "dec"];
    }
    o
}

/// Nanoseconds this thread has run on a CPU, if the kernel reports it.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One rep: passes over the buffer until `secs` of wall time have gone by;
/// MB/s over CPU time (or wall time if `wall` or CPU time is unavailable).
fn rep(
    x: &Xts,
    buf: &mut [u8],
    unit: usize,
    dec: bool,
    secs: f64,
    wall: bool,
    tweak: &mut u64,
) -> f64 {
    let budget = Duration::from_secs_f64(secs);
    let cpu0 = cpu_ns();
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < budget {
        for u in buf.chunks_exact_mut(unit) {
            if dec {
                x.decrypt_in_place(*tweak, u);
            } else {
                x.encrypt_in_place(*tweak, u);
            }
            *tweak = tweak.wrapping_add(1);
        }
        black_box(&mut *buf);
        bytes += buf.len() as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let secs = match (wall, cpu0, cpu_ns()) {
        (false, Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => elapsed,
    };
    bytes as f64 / secs / 1e6
}

/// The optimised build is what gets measured, and the unit tests run
/// unoptimised: check `x` against the portable backend here too, so a
/// miscompiled fast path cannot post a number.
fn self_check(key: &DataKey, x: &Xts) {
    let reference = Xts::with_backend(key, Backend::Portable).expect("portable");
    let mut pt = vec![0u8; 4096 + 48];
    rand::thread_rng().fill_bytes(&mut pt);
    for len in [16, 48, 512, 4096, 4096 + 48] {
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        x.encrypt(0xfeed_f00d, &pt[..len], &mut a);
        reference.encrypt(0xfeed_f00d, &pt[..len], &mut b);
        assert!(
            a == b,
            "{} disagrees with portable (len {len})",
            x.backend().name()
        );
        x.decrypt_in_place(0xfeed_f00d, &mut a);
        assert!(a == pt[..len], "{} decrypt (len {len})", x.backend().name());
    }
}

fn main() {
    let o = parse();
    let key = DataKey::generate();
    let dispatched = Xts::new(&key).backend();
    let backends: Vec<Backend> = match o.backend.as_str() {
        "dispatched" => vec![dispatched],
        "all" => vec![Backend::Vaes, Backend::AesNi, Backend::Portable],
        name => vec![
            [Backend::Vaes, Backend::AesNi, Backend::Portable]
                .into_iter()
                .find(|b| b.name() == name)
                .unwrap_or_else(|| panic!("unknown backend {name}")),
        ],
    };
    let clock = if o.wall || cpu_ns().is_none() {
        "wall"
    } else {
        "thread cpu"
    };
    println!(
        "xts bench: buffer {} KiB, {} reps x {:.2} s, MB/s per {clock} second; Xts::new dispatches to {}",
        BUF / 1024,
        o.reps,
        o.secs,
        dispatched.name()
    );
    println!(
        "{:<10} {:>5} {:>3} {:>12} {:>10}",
        "backend", "unit", "op", "median MB/s", "best MB/s"
    );

    let mut buf = vec![0u8; BUF];
    rand::thread_rng().fill_bytes(&mut buf);
    let mut tweak = 0u64;
    for b in backends {
        let Some(x) = Xts::with_backend(&key, b) else {
            println!("{:<10} (not available on this CPU)", b.name());
            continue;
        };
        self_check(&key, &x);
        for &unit in &o.units {
            assert!(
                unit >= 16 && unit.is_multiple_of(16) && BUF.is_multiple_of(unit),
                "bad --unit {unit}"
            );
            for &op in &o.ops {
                let dec = op == "dec";
                // Warm-up: page in the buffer, settle the clock.
                rep(&x, &mut buf, unit, dec, o.secs.min(0.1), o.wall, &mut tweak);
                let mut r: Vec<f64> = (0..o.reps)
                    .map(|_| rep(&x, &mut buf, unit, dec, o.secs, o.wall, &mut tweak))
                    .collect();
                r.sort_by(f64::total_cmp);
                let median = r[r.len() / 2];
                let best = r[r.len() - 1];
                println!(
                    "{:<10} {unit:>5} {op:>3} {median:>12.0} {best:>10.0}",
                    b.name()
                );
                println!(
                    "RESULT backend={} dispatched={} unit={unit} op={op} median_mbs={median:.0} best_mbs={best:.0}",
                    b.name(),
                    b == dispatched
                );
            }
        }
    }
}
