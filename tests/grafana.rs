//! The Grafana dashboard (`tools/grafana/keyturn.json`) queries only metrics
//! that a real server exports: a served pool with a change stream, a
//! caught-up replication agent and a scheduled KEK rotation is scraped, and
//! every `keyturn_*` name in the dashboard's queries is in the scrape.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pair::Pair;
use common::*;
use serde_json::Value;

/// Every `keyturn_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("keyturn_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every query expression of the dashboard (panels' targets and variables).
fn queries(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in doc["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in doc["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_one_the_server_exports() {
    require_tool("qemu-io");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/grafana/keyturn.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is JSON");
    let exprs = queries(&doc);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for must in [
        "keyturn_key_age_seconds",
        "keyturn_key_cryptoperiod_seconds",
        "keyturn_rotation_progress_percent",
        "keyturn_rotation_staging_used_bytes",
        "keyturn_rotation_rate_bytes_per_second",
        "keyturn_rotation_errors",
        "keyturn_stream_consumer_lag_records",
    ] {
        assert!(wanted.contains(must), "the dashboard has no {must}");
    }

    // A served pool with a stream, one agent caught up, a KEK rotation run
    // by the scheduler (so its counters and histogram exist).
    let pair = Pair::new();
    set_toml(&pair.src, "schedule", &[("check_interval_ms", "200")]);
    let server = pair.serve();
    qio_ok(&server.uri("a"), &["write -P 0x21 0 64k", "flush"]);
    // The first run is a full sync; the second applies records and acks them.
    pair.replicate_ok(&server, &["--until-caught-up"]);
    qio_ok(&server.uri("a"), &["write -P 0x22 64k 64k", "flush"]);
    pair.replicate_ok(&server, &["--until-caught-up"]);
    let addr = server.admin.clone().unwrap();
    let r = http_agent()
        .post(format!("http://{addr}/api/v1/key-rotation/schedule"))
        .header(
            "Authorization",
            format!("Bearer {}", admin_token(&pair.src)),
        )
        .send(r#"{"zone": "z1", "kind": "kek", "reason": "grafana test"}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let scrape = || scrape_metrics(&pair.src, &server);
    let end = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = scrape();
        if t.contains("keyturn_rotations_completed_total{kind=\"kek\"}")
            && t.contains("keyturn_stream_consumer_lag_records{")
        {
            break t;
        }
        assert!(
            Instant::now() < end,
            "no completed KEK rotation or no agent lag in the scrape:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Sample names only (comments name metrics that may have no sample).
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the server does not export: {missing:?}\n--- scrape ---\n{text}"
    );
}
