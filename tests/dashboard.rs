//! The dashboard page in a real headless Chromium against the running
//! server: during a throttled DEK rotation the rendered page shows the
//! zone, the key versions, the phase and the numbers the JSON API gives
//! (between a read just before and one just after the page loads), with a
//! viewer token handed over in the URL fragment; without a token, or with
//! a bad one, the page says so. A screenshot is kept as a test artifact.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `GET path` with `token`: status and JSON.
fn api(addr: &str, path: &str, token: &str) -> (u16, Value) {
    let mut r = http_agent()
        .get(format!("http://{addr}{path}"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    (
        r.status().as_u16(),
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// Headless Chromium's arguments: a fresh profile each run.
fn chromium(profile: &Path, extra: &[&str], url: &str) -> String {
    require_tool("chromium");
    let mut args = vec![
        "60".to_string(),
        "chromium".into(),
        "--headless".into(),
        "--disable-gpu".into(),
        "--no-sandbox".into(),
        "--no-first-run".into(),
        "--disable-extensions".into(),
        "--disable-dev-shm-usage".into(),
        format!("--user-data-dir={}", profile.display()),
        // Long enough for the page's fetches, short of its 5 s refresh.
        "--virtual-time-budget=3000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url.into());
    let out = Command::new("timeout")
        .args(&args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM after its scripts ran.
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    chromium(profile.path(), &["--dump-dom"], url)
}

/// The part of `dom` from the element with `attr` to the end of its row.
fn row<'a>(dom: &'a str, start: &str) -> &'a str {
    let i = dom
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in the page:\n{dom}"));
    let rest = &dom[i..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

/// The text of the cell `data-field="name"` in `row`.
fn cell(row: &str, name: &str) -> String {
    let key = format!("data-field=\"{name}\"");
    let i = row
        .find(&key)
        .unwrap_or_else(|| panic!("no field {name} in {row}"));
    let rest = &row[i..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].to_string()
}

/// The `data-value` of the cell `data-field="name"` in `row`.
fn value(row: &str, name: &str) -> f64 {
    let key = format!("data-field=\"{name}\" data-value=\"");
    let i = row
        .find(&key)
        .unwrap_or_else(|| panic!("no value of {name} in {row}"))
        + key.len();
    let end = row[i..].find('"').unwrap() + i;
    row[i..end].parse().unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn artifact_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn during_a_rotation_the_page_shows_what_the_api_gives() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    // Slow staging, so the window is still open while the page loads.
    set_toml(
        &pool,
        "rotation",
        &[
            ("rate_mib_s", "1"),
            ("cpu_share", "0.05"),
            ("batch_blocks", "16"),
            ("idle_after_ms", "600000"),
        ],
    );
    let viewer = create_token(&pool, "oncall", "viewer");
    let server = pool.serve();
    let addr = server.admin.clone().unwrap();
    // 8 MiB of distinct blocks (a pattern would dedup into one block).
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern_bytes(7, 8 << 20);
    let file = write_file(tmp.path(), "in", &data);
    let cmd = format!("write -s {} 0 {}", file.display(), data.len());
    qio_ok(&server.uri("vol0"), &[&cmd, "flush"]);
    pool.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = api(&addr, "/api/v1/zones/z1/rotation", &viewer);
        if u(&st, "staged_blocks") > 0 {
            break;
        }
        assert!(Instant::now() < end, "staging never started: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let url = format!("http://{addr}/dashboard#token={viewer}");
    let (code, before) = api(&addr, "/api/v1/zones/z1/rotation", &viewer);
    assert_eq!(code, 200, "{before}");
    let (_, health) = api(&addr, "/api/v1/key-rotation/health", &viewer);
    let dom = dump_dom(&url);
    let (_, after) = api(&addr, "/api/v1/zones/z1/rotation", &viewer);
    assert_eq!(after["phase"], "window", "still staging: {after}");

    // The zone's row: versions, phase, progress, staging, errors.
    let z = row(&dom, "<tr data-zone=\"z1\">");
    assert_eq!(cell(z, "zone"), "z1");
    assert_eq!(cell(z, "phase"), "window");
    assert_eq!(cell(z, "active_version"), "v1");
    assert_eq!(cell(z, "next_version"), "v2");
    let label = {
        let i = z.find("progress-label\">").expect("a progress label") + 16;
        z[i..i + z[i..].find('<').unwrap()].to_string()
    };
    // "12.5% staged (512/4096 blocks)"
    let (pct, counts) = label.split_once("% staged (").expect(&label);
    let (staged, total) = counts
        .trim_end_matches(" blocks)")
        .split_once('/')
        .expect(&label);
    let (staged, total): (u64, u64) = (staged.parse().unwrap(), total.parse().unwrap());
    let pct: f64 = pct.parse().unwrap();
    assert_eq!(total, u(&before, "content_blocks"), "{label}");
    assert!(total >= 2048, "8 MiB of distinct blocks: {total}");
    assert!(
        (u(&before, "staged_blocks")..=u(&after, "staged_blocks")).contains(&staged),
        "page {staged}, API {} then {}",
        before["staged_blocks"],
        after["staged_blocks"]
    );
    assert!(
        (pct - 100.0 * staged as f64 / total as f64).abs() < 0.1,
        "{label}"
    );
    let used = value(z, "staging_used");
    assert!(
        (u(&before, "staging_used_bytes") as f64..=u(&after, "staging_used_bytes") as f64)
            .contains(&used),
        "page {used}, API {before} then {after}"
    );
    let free = value(z, "staging_free");
    assert!(
        (u(&after, "staging_free_bytes") as f64..=u(&before, "staging_free_bytes") as f64)
            .contains(&free),
        "page {free}"
    );
    assert!(used > 0.0 && free > 0.0);
    assert_eq!(cell(z, "errors"), after["errors"].to_string());
    assert_eq!(
        cell(z, "unstaged_writes"),
        after["unstaged_writes"].to_string()
    );
    assert!(value(z, "rate") > 0.0, "a staging rate: {z}");

    // Blocks per DEK version: the chart's legend.
    let v1 = &after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["version"] == 1)
        .unwrap()["blocks"];
    assert!(
        dom.contains(&format!("data-version=\"1\" data-blocks=\"{v1}\"")),
        "v1 holds {v1} blocks: {dom}"
    );

    // Keys against their cryptoperiods, as the health route gives them.
    let k = row(&dom, "<tr data-zone=\"z1\" data-purpose=\"dek\">");
    let dek = health["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["zone"] == "z1" && k["purpose"] == "dek")
        .unwrap();
    assert_eq!(cell(k, "version"), format!("v{}", dek["version"]));
    assert_eq!(cell(k, "state"), dek["state"].as_str().unwrap());
    assert_eq!(
        value(k, "cryptoperiod"),
        dek["cryptoperiod_secs"].as_f64().unwrap()
    );
    assert!((value(k, "age") - dek["age_secs"].as_f64().unwrap()).abs() <= 5.0);
    // The scheduler and the audit log.
    assert!(dom.contains("data-field=\"scheduler\">running<"), "{dom}");
    assert!(dom.contains("<td>rotation.prepare</td>"), "{dom}");
    assert!(dom.contains("<td>oncall</td>") || dom.contains("<td>admin.token</td>"));

    // A screenshot of the page, kept for people to look at.
    let shot = artifact_dir().join("during-rotation.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,1400",
            "--hide-scrollbars",
        ],
        &url,
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn without_a_good_token_the_page_says_so_and_the_api_stays_closed() {
    let pool = TestPool::with_volume("16M");
    let operator = create_token(&pool, "ops", "operator");
    let server = pool.serve();
    let addr = server.admin.clone().unwrap();

    // The page's files need no token and carry a strict CSP; the data does.
    for (path, ctype) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let mut r = http_agent()
            .get(format!("http://{addr}{path}"))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert!(h("content-type").starts_with(ctype), "{path}");
        assert!(h("content-security-policy").contains("script-src 'self'"));
        let body = r.body_mut().read_to_string().unwrap();
        assert!(!body.contains(&operator) && body.len() > 500, "{path}");
    }
    let mut r = http_agent()
        .get(format!("http://{addr}/api/v1/zones"))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        r.body_mut()
            .read_to_string()
            .unwrap()
            .contains("missing bearer token")
    );

    // No token: the page asks for one and shows no data.
    let dom = dump_dom(&format!("http://{addr}/dashboard"));
    assert!(dom.contains("Enter an API token"), "{dom}");
    assert!(dom.contains("<main id=\"main\" hidden=\"\">"), "{dom}");
    assert!(!dom.contains("data-zone=\"z1\""), "{dom}");

    // A bad token: a clear error, no data.
    let dom = dump_dom(&format!("http://{addr}/dashboard#token=kt_not_a_token"));
    assert!(
        dom.contains("The server refused the token (401): wrong bearer token"),
        "{dom}"
    );
    assert!(!dom.contains("data-zone=\"z1\""), "{dom}");

    // Any role that may read works (an operator's token too).
    let dom = dump_dom(&format!("http://{addr}/dashboard#token={operator}"));
    let z = row(&dom, "<tr data-zone=\"z1\">");
    assert_eq!(cell(z, "phase"), "idle");
    assert_eq!(cell(z, "active_version"), "v1");
}
