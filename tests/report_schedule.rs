//! Scheduled reports (`[reports]` in pool.toml) through the real server on
//! the test clock: the day's report appears in the directory at the first
//! check after midnight, holds the day's KEK rotation, is audited once, is
//! not written again by later checks or after a restart, and the week's
//! report follows the next Monday.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DAY: u64 = 86_400;

/// `YYYY-MM-DD` of Unix time `t` (UTC), by the civil-from-days algorithm.
fn date(t: u64) -> String {
    let z = (t / DAY) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn set_clock(file: &Path, t: u64) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, t.to_string()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn audit_count(pool: &TestPool, action: &str) -> usize {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["action"] == action && r["outcome"] == "ok")
        .count()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn daily_and_weekly_reports_are_written_once_after_their_period_ends() {
    let pool = TestPool::with_volume("16M");
    set_toml(&pool, "test", &[("allow_test_clock", "true")]);
    set_toml(&pool, "schedule", &[("check_interval_ms", "200")]);
    set_toml(
        &pool,
        "reports",
        &[
            ("dir", "\"reports\""),
            ("daily", "true"),
            ("weekly", "true"),
            ("format", "[\"json\", \"md\"]"),
        ],
    );
    let clock = pool.dir.path().join("clock");
    let t0 = real_now();
    set_clock(&clock, t0);
    let env = [("KEYTURN_TEST_CLOCK", clock.to_str().unwrap())];
    let mut server = pool.serve_env(&[], &env);
    let dir = pool.path().join("reports");
    let state = pool.path().join("reports.json");
    // The first check marks today as the first day to report; nothing yet.
    wait_for("reports.json", || state.exists());
    let today = t0 - t0 % DAY;
    let s: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(s["daily_done_until"], today, "{s}");
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));

    // Something to report: a KEK rotation today (audit times are real).
    pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);

    // Just after midnight, the day's report appears.
    set_clock(&clock, today + DAY + 5);
    let day = date(today);
    let json = dir.join(format!("daily-{day}.json"));
    wait_for("the daily report", || {
        json.exists() && audit_count(&pool, "report.daily") == 1
    });
    assert!(dir.join(format!("daily-{day}.md")).exists());
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["from"], format!("{day}T00:00:00.000Z"), "{r}");
    assert_eq!(
        r["to"],
        format!("{}T00:00:00.000Z", date(today + DAY)),
        "{r}"
    );
    let kek: Vec<&Value> = r["rotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == "kek" && x["zone"] == "z1")
        .collect();
    assert_eq!(kek.len(), 1, "{r}");
    assert_eq!(kek[0]["outcome"], "completed", "{r}");
    let md = std::fs::read_to_string(dir.join(format!("daily-{day}.md"))).unwrap();
    assert!(md.contains("z1") && md.contains("kek"), "{md}");
    let modified = std::fs::metadata(&json).unwrap().modified().unwrap();

    // Later checks and a restart write it no more.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(server.stop());
    let mut server = pool.serve_env(&[], &env);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(audit_count(&pool, "report.daily"), 1);
    assert_eq!(
        std::fs::metadata(&json).unwrap().modified().unwrap(),
        modified
    );
    let before = files(&dir);
    assert_eq!(before.len(), 2, "{before:?}");

    // The next Monday: the week's report (of the week holding t0) and the
    // Sunday's daily report.
    let day_n = today / DAY;
    let monday = (day_n - (day_n + 3) % 7 + 7) * DAY;
    set_clock(&clock, monday + 5);
    let week = dir.join(format!("weekly-{}.json", date(monday - 7 * DAY)));
    wait_for("the weekly report", || {
        week.exists() && audit_count(&pool, "report.weekly") == 1
    });
    let w: Value = serde_json::from_slice(&std::fs::read(&week).unwrap()).unwrap();
    assert_eq!(w["to"], format!("{}T00:00:00.000Z", date(monday)), "{w}");
    if monday > today + DAY {
        // Not the day already reported: the day before Monday.
        wait_for("Sunday's report", || {
            dir.join(format!("daily-{}.json", date(monday - DAY)))
                .exists()
        });
    }
    assert!(server.stop());
}
