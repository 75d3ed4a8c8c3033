//! Named API tokens and roles, and the key-rotation management API,
//! through the real `keyturn serve` and CLI: tokens made on an unserved
//! and a served pool, each role allowed its routes and refused the others
//! (403 naming the role needed), revocation, the token's name in the audit
//! records, and the OpenAPI document served by the binary round-tripped
//! against the routes it answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The running server's admin API.
struct Api {
    addr: String,
    agent: ureq::Agent,
}

impl Api {
    fn of(server: &Server) -> Api {
        let agent = http_agent();
        Api {
            addr: server.admin.clone().expect("an `admin:` line"),
            agent,
        }
    }

    /// `method path` with `token` and `body`; the status and JSON answer
    /// (`Value::Null` when the answer is not JSON).
    fn call(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("http://{}{path}", self.addr);
        let auth = format!("Bearer {token}");
        let resp = match method {
            "GET" => self.agent.get(&url).header("Authorization", &auth).call(),
            "PUT" => self
                .agent
                .put(&url)
                .header("Authorization", &auth)
                .send(body.unwrap_or("")),
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send(body.unwrap_or("")),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let text = resp.body_mut().read_to_string().unwrap();
        (
            resp.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }
}

impl Api {
    /// The text of `GET /metrics`.
    fn metrics(&self, token: &str) -> String {
        let mut r = self
            .agent
            .get(format!("http://{}/metrics", self.addr))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.body_mut().read_to_string().unwrap()
    }
}

/// The value of sample `key` (name and labels as printed) in `text`.
fn sample(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
}

fn admin_token(pool: &TestPool) -> String {
    std::fs::read_to_string(pool.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// The audit log's records.
fn audit_records(pool: &TestPool) -> Vec<Value> {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn tokens_with_roles_on_an_unserved_and_a_served_pool() {
    let pool = TestPool::with_volume("16M");
    // Unserved: written to tokens.json, audited as local.
    let viewer = create_token(&pool, "grafana", "viewer");
    let stored = std::fs::read_to_string(pool.path().join("tokens.json")).unwrap();
    assert!(
        stored.contains("\"grafana\"") && !stored.contains(&viewer[3..]),
        "{stored}"
    );
    let out = pool.keyturn_bare(&["token", "create", "--name", "x", "--role", "root"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("viewer"));

    let server = pool.serve();
    let api = Api::of(&server);
    let admin = admin_token(&pool);
    // Served: through the API (the server authenticates with it at once).
    let operator = create_token(&pool, "oncall", "operator");
    let list = pool.keyturn_bare(&["token", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["role"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("grafana", "viewer"), ("oncall", "operator")]);

    // Viewer: reads, and nothing else.
    assert_eq!(api.call("GET", "/api/v1/zones", &viewer, None).0, 200);
    assert_eq!(
        api.call("GET", "/api/v1/key-rotation/health", &viewer, None)
            .0,
        200
    );
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/scheduler/pause",
        &viewer,
        None,
    );
    assert_eq!(
        (code, e["required_role"].as_str()),
        (403, Some("operator")),
        "{e}"
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("\"grafana\" has role viewer"),
        "{e}"
    );
    // Operator: rotation control, not zones or tokens.
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/scheduler/pause",
        &operator,
        None,
    );
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["paused"], true);
    let (code, e) = api.call("POST", "/api/v1/zones", &operator, Some(r#"{"name":"z2"}"#));
    assert_eq!(
        (code, e["required_role"].as_str()),
        (403, Some("admin")),
        "{e}"
    );
    let (code, _) = api.call("GET", "/api/v1/tokens", &operator, None);
    assert_eq!(code, 403);
    // The CLI acts with a named token from the environment, and says why
    // it is refused.
    let out = std::process::Command::new(keyturn_bin())
        .args(["scheduler", "resume", "--pool"])
        .arg(pool.path())
        .env("KEYTURN_API_TOKEN", &viewer)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs role operator"), "{err}");
    let out = std::process::Command::new(keyturn_bin())
        .args(["scheduler", "resume", "--json", "--pool"])
        .arg(pool.path())
        .env("KEYTURN_API_TOKEN", &operator)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Admin (the pool's token file): zones.
    let (code, e) = api.call("POST", "/api/v1/zones", &admin, Some(r#"{"name":"z2"}"#));
    assert_eq!(code, 200, "{e}");

    // Revoked: 401 at once.
    let out = pool.keyturn_bare(&["token", "revoke", "--name", "grafana"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, e) = api.call("GET", "/api/v1/zones", &viewer, None);
    assert_eq!((code, e["kind"].as_str()), (401, Some("unauthorized")));

    // Every record names who acted.
    let records = audit_records(&pool);
    let actor_of = |action: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| r["actor"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    assert_eq!(actor_of("token.create"), ["local", "admin.token"]);
    assert_eq!(actor_of("schedule.pause"), ["oncall"]);
    assert_eq!(actor_of("schedule.resume"), ["oncall"]);
    assert_eq!(actor_of("zone.create")[1..], ["admin.token"]);
    assert_eq!(actor_of("token.revoke"), ["admin.token"]);
    drop(server);
    // The revocation outlives the server.
    let again = pool.serve();
    let (code, _) = Api::of(&again).call("GET", "/api/v1/zones", &viewer, None);
    assert_eq!(code, 401);
}

#[test]
fn the_served_openapi_document_matches_the_routes_the_server_answers() {
    let pool = TestPool::with_volume("16M");
    let viewer = create_token(&pool, "viewer", "viewer");
    let server = pool.serve();
    let api = Api::of(&server);
    let (code, doc) = api.call("GET", "/api/v1/openapi.json", &viewer, None);
    assert_eq!(code, 200);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 40, "{}", paths.len());
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{zone}", "z1")
            .replace("{volume}", "vol0")
            .replace("{lba}", "0")
            .replace("{name}", "nobody");
        for (method, op) in ops.as_object().unwrap() {
            let m = method.to_uppercase();
            let role = op["x-keyturn-role"].as_str().unwrap();
            let (code, answer) = api.call(&m, &concrete, &viewer, (m != "GET").then_some("{}"));
            assert!(
                code != 405 && answer["kind"] != "no_route",
                "{m} {path} is documented but not served: {code} {answer}"
            );
            if role == "viewer" {
                assert!(answer["required_role"].is_null(), "{m} {path}: {answer}");
            } else {
                // A viewer is refused before anything happens, naming the
                // documented role.
                assert_eq!(code, 403, "{m} {path}: {answer}");
                assert_eq!(answer["required_role"].as_str(), Some(role), "{m} {path}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 50, "{checked}");
    // A route that is not documented is not served either.
    let (code, answer) = api.call("GET", "/api/v1/key-rotation/nothing", &viewer, None);
    assert_eq!((code, answer["kind"].as_str()), (404, Some("no_route")));
}

/// Polls `f` until it is true or 60 s pass.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_key_rotation_management_api_with_each_role() {
    let pool = TestPool::with_volume("16M");
    // The scheduler checks once at start: every start here is asked for.
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    doc.entry("schedule")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert("check_interval_ms".into(), toml::Value::Integer(600_000));
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    let server = pool.serve();
    let uri = server.uri("vol0");
    qio_ok(&uri, &["write -P 0x5a 0 1M"]);
    let api = Api::of(&server);
    let viewer = create_token(&pool, "v", "viewer");
    let operator = create_token(&pool, "o", "operator");
    let admin = create_token(&pool, "a", "admin");

    // Health: the scheduler runs, both keys of z1 are fresh.
    let (code, h) = api.call("GET", "/api/v1/key-rotation/health", &viewer, None);
    assert_eq!(code, 200, "{h}");
    assert_eq!(
        (h["status"].as_str(), h["scheduler"]["up"].as_bool()),
        (Some("ok"), Some(true)),
        "{h}"
    );
    let states: Vec<_> = h["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["zone"].as_str().unwrap(),
                k["purpose"].as_str().unwrap(),
                k["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("z1", "dek", "ok"),
            ("z1", "kek", "ok"),
            ("z1", "mac", "ok")
        ]
    );
    assert!(
        h["next_rotation_in_secs"].as_i64().unwrap() > 80 * 86_400,
        "{h}"
    );

    // Schedule: operators only; a bad body, an unknown zone, a second job.
    let far = 4_000_000_000u64;
    let body = format!(r#"{{"zone": "z1", "at_unix": {far}, "reason": "audit finding 7"}}"#);
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule",
        &viewer,
        Some(&body),
    );
    assert_eq!((code, e["required_role"].as_str()), (403, Some("operator")));
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule",
        &operator,
        Some(&body),
    );
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["scheduled"], serde_json::json!(["z1"]));
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule",
        &operator,
        Some(&body),
    );
    assert_eq!((code, e["kind"].as_str()), (409, Some("conflict")), "{e}");
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule",
        &operator,
        Some(r#"{"zone": "nope"}"#),
    );
    assert_eq!((code, e["kind"].as_str()), (404, Some("not_found")), "{e}");
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule",
        &operator,
        Some(r#"{"zone": "z1", "at": 5}"#),
    );
    assert_eq!(
        (code, e["kind"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let (code, s) = api.call("GET", "/api/v1/key-rotation/schedule", &viewer, None);
    assert_eq!(code, 200);
    let job = &s["jobs"][0];
    assert_eq!(
        (
            job["zone"].as_str(),
            job["priority"].as_u64(),
            job["at_unix"].as_u64()
        ),
        (Some("z1"), Some(1), Some(far)),
        "{s}"
    );
    assert_eq!(job["reason"], "requested by o: audit finding 7");
    assert_eq!(job["state"], "queued", "not started before its time: {s}");

    // Execute: it starts now, and the rotation runs to its end.
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/execute",
        &viewer,
        Some(r#"{"zone": "z1"}"#),
    );
    assert_eq!((code, e["required_role"].as_str()), (403, Some("operator")));
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/execute",
        &operator,
        Some(r#"{"zone": "nope"}"#),
    );
    assert_eq!(code, 404, "{e}");
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/execute",
        &operator,
        Some(r#"{"zone": "z1"}"#),
    );
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["started"]["state"], "running", "{e}");
    wait_for("the executed rotation to migrate", || {
        let (_, k) = api.call("GET", "/api/v1/key-rotation/keys/z1", &viewer, None);
        k["active_dek_version"] == 2
            && k["phase"] == "grace"
            && k["blocks_per_dek_version"]
                .as_array()
                .is_some_and(|v| v.iter().all(|b| b["version"] == 2 || b["blocks"] == 0))
    });
    // The inventory: versions, purposes, states, content blocks per DEK.
    let (code, k) = api.call("GET", "/api/v1/key-rotation/keys/z1", &viewer, None);
    assert_eq!(code, 200, "{k}");
    let deks: Vec<_> = k["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["purpose"] == "dek")
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_string(),
                k["content_blocks"].as_u64(),
            )
        })
        .collect();
    let blocks = k["content_blocks"].as_u64().unwrap();
    assert!(blocks >= 1, "{k}");
    assert_eq!(
        deks,
        [
            (1, "decrypt-only".to_string(), Some(0)),
            (2, "active".into(), Some(blocks))
        ],
        "{k}"
    );
    let (code, e) = api.call("GET", "/api/v1/key-rotation/keys/nope", &viewer, None);
    assert_eq!(code, 404, "{e}");

    // Cleanup: admins only; the old DEK is still in its grace period.
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/cleanup",
        &operator,
        Some(r#"{"dry_run": true}"#),
    );
    assert_eq!((code, e["required_role"].as_str()), (403, Some("admin")));
    let (code, c) = api.call(
        "POST",
        "/api/v1/key-rotation/cleanup",
        &admin,
        Some(r#"{"zone": "z1"}"#),
    );
    assert_eq!(code, 200, "{c}");
    assert_eq!(c["destroyed"], serde_json::json!([]), "{c}");
    assert_eq!(c["kept"][0]["key_id"], "z1-dek-v1", "{c}");
    assert!(
        c["kept"][0]["kept_because"]
            .as_str()
            .unwrap()
            .contains("grace period"),
        "{c}"
    );
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/cleanup",
        &admin,
        Some(r#"{"zone": "nope"}"#),
    );
    assert_eq!(code, 404, "{e}");

    // Schedule-all (KEK, at once): the scheduler starts it.
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/schedule-all",
        &operator,
        Some(r#"{"kind": "kek"}"#),
    );
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["scheduled"], serde_json::json!(["z1"]));
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/execute",
        &operator,
        Some(r#"{"zone": "z1", "kind": "kek"}"#),
    );
    assert_eq!(code, 200, "{e}");
    wait_for("the KEK rotation", || {
        let (_, k) = api.call("GET", "/api/v1/key-rotation/keys/z1", &viewer, None);
        k["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["purpose"] == "kek" && k["version"] == 2 && k["state"] == "active")
    });

    // Emergency rotation: operators; the reason is required.
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/emergency-rotation",
        &operator,
        Some(r#"{"zone": "z1"}"#),
    );
    assert_eq!(code, 400, "{e}");
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/emergency-rotation",
        &viewer,
        Some(r#"{"zone": "z1", "reason": "leak"}"#),
    );
    assert_eq!(code, 403, "{e}");
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/emergency-rotation",
        &operator,
        Some(r#"{"zone": "z1", "reason": "laptop stolen"}"#),
    );
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["emergency"], true, "{e}");
    qio_ok(&uri, &["read -P 0x5a 0 1M"]);

    // The report of today names the zone and the rotations just made.
    let (code, e) = api.call("GET", "/api/v1/key-rotation/report", &viewer, None);
    assert_eq!(
        (code, e["kind"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let day = {
        let o = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let (code, e) = api.call(
        "GET",
        &format!("/api/v1/key-rotation/report?from={day}"),
        &viewer,
        None,
    );
    assert_eq!(code, 200, "{e}");
    let zones: Vec<&str> = e["zones"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|z| z["zone"].as_str())
        .collect();
    assert!(zones.contains(&"z1"), "{e}");
    assert!(
        e["rotations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["zone"] == "z1" && r["kind"] == "dek"),
        "the DEK rotation is in the report: {e}"
    );

    // The counters saw it: one DEK and one KEK rotation asked for and started.
    let m = api.metrics(&viewer);
    for kind in ["dek", "kek"] {
        let asked = format!(r#"keyturn_rotations_scheduled_total{{kind="{kind}",by="request"}}"#);
        assert_eq!(sample(&m, &asked), 1.0, "{kind}");
        let started = format!(r#"keyturn_rotations_started_total{{kind="{kind}"}}"#);
        assert_eq!(sample(&m, &started), 1.0, "{kind}");
    }
    assert_eq!(
        sample(&m, r#"keyturn_scheduler_jobs{state="running"}"#),
        2.0
    );

    let records = audit_records(&pool);
    let by = |action: &str| {
        records
            .iter()
            .find(|r| r["action"] == action)
            .and_then(|r| r["actor"].as_str().map(String::from))
    };
    assert_eq!(by("schedule.dek.add").as_deref(), Some("o"));
    assert_eq!(by("schedule.execute").as_deref(), Some("o"));
    assert_eq!(by("schedule.kek.add").as_deref(), Some("o"));
    assert_eq!(by("key.cleanup").as_deref(), Some("a"));
    assert_eq!(by("rotation.emergency").as_deref(), Some("o"));
}

#[test]
fn cleanup_is_dual_controlled_where_the_pool_requires_it() {
    let pool = TestPool::with_volume("16M");
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    doc.entry("dual_control")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert("required".into(), toml::Value::Boolean(true));
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    let server = pool.serve();
    let api = Api::of(&server);
    let admin = admin_token(&pool);
    let (code, e) = api.call("POST", "/api/v1/key-rotation/cleanup", &admin, None);
    assert_eq!((code, e["kind"].as_str()), (403, Some("forbidden")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("destroy-key"), "{e}");
    assert!(
        e["required_role"].is_null(),
        "dual control, not the role: {e}"
    );
    let (code, e) = api.call(
        "POST",
        "/api/v1/key-rotation/cleanup",
        &admin,
        Some(r#"{"approvals": ["{\"not\": \"an approval\"}"]}"#),
    );
    assert_eq!(code, 403, "{e}");
    // A dry run destroys nothing and needs no approval.
    let (code, c) = api.call(
        "POST",
        "/api/v1/key-rotation/cleanup",
        &admin,
        Some(r#"{"dry_run": true}"#),
    );
    assert_eq!((code, c["dry_run"].as_bool()), (200, Some(true)), "{c}");
    let refused = audit_records(&pool)
        .into_iter()
        .filter(|r| r["action"] == "key.cleanup" && r["outcome"] == "refused")
        .map(|r| r["actor"].as_str().unwrap_or("-").to_string())
        .collect::<Vec<_>>();
    assert_eq!(refused, ["admin.token", "admin.token"]);
}
