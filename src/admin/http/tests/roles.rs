//! Roles and the OpenAPI document against the route table, on the fake
//! backend: every route with each role, allowed and refused; the document
//! and the table hold the same routes with the same roles; every
//! documented route answers.

use std::collections::BTreeSet;

use super::*;
use crate::admin::http::routes::ROUTES;

/// A concrete path for a route's template.
fn concrete(path: &str) -> String {
    path.replace("{zone}", "z1")
        .replace("{volume}", "vol0")
        .replace("{lba}", "0")
        .replace("{name}", "nobody")
}

fn doc() -> serde_json::Value {
    serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON")
}

#[test]
fn the_openapi_document_and_the_route_table_hold_the_same_routes() {
    let doc = doc();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let role = op["x-keyturn-role"].as_str().unwrap_or("?");
            documented.insert((method.to_uppercase(), path.clone(), role.to_string()));
        }
    }
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| {
            (
                r.method.to_string(),
                r.path.to_string(),
                r.role.name().to_string(),
            )
        })
        .collect();
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "served but not documented (or with another role)"
    );
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "documented but not served (or with another role)"
    );
}

#[test]
fn every_documented_route_answers_and_the_document_is_served() {
    let srv = start();
    let (code, ctype, body) = request(&srv, "GET", "/api/v1/openapi.json", Some(TOKEN), None);
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        doc()
    );
    for (path, ops) in doc()["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let body = (m != "GET").then_some("{}");
            let (code, _, text) = request(&srv, &m, &concrete(path), Some(TOKEN), body);
            let kind = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.kind)
                .unwrap_or_default();
            assert!(
                code != 405 && kind != "no_route",
                "{m} {path}: {code} {text}"
            );
        }
    }
}

#[test]
fn each_role_is_allowed_its_routes_and_refused_the_others() {
    let srv = start();
    for route in ROUTES {
        for (i, role) in Role::ALL.iter().enumerate() {
            let token = &srv.named[i];
            let asked = srv.fake.asked.lock().len();
            let body = (route.method != "GET").then_some("{}");
            let (code, _, text) =
                request(&srv, route.method, &concrete(route.path), Some(token), body);
            let refused = serde_json::from_str::<ErrorBody>(&text)
                .ok()
                .and_then(|e| e.required_role);
            if role.allows(route.role) {
                assert!(
                    refused.is_none() && code != 401,
                    "{} {} as {role}: {code} {text}",
                    route.method,
                    route.path
                );
            } else {
                assert_eq!(
                    code, 403,
                    "{} {} as {role}: {text}",
                    route.method, route.path
                );
                assert_eq!(refused.as_deref(), Some(route.role.name()), "{text}");
                let e = error_of(&text);
                assert_eq!(e.kind, "forbidden");
                assert!(
                    e.error.contains(&format!("needs role {}", route.role)),
                    "{}",
                    e.error
                );
                assert_eq!(
                    srv.fake.asked.lock().len(),
                    asked,
                    "a refused request reached the backend"
                );
            }
        }
    }
    // Viewers read: GET only.
    assert!(
        ROUTES
            .iter()
            .all(|r| r.method == "GET" || r.role > Role::Viewer)
    );
}

#[test]
fn tokens_are_made_used_and_revoked_through_the_api_and_name_the_actor() {
    let srv = start();
    let call = |m, p: &str, t: &str, b| request(&srv, m, p, Some(t), b);
    let (code, _, body) = call(
        "POST",
        "/api/v1/tokens",
        TOKEN,
        Some(r#"{"name": "grafana", "role": "viewer"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).unwrap();
    let grafana = made["token"].as_str().unwrap().to_string();
    assert!(grafana.starts_with("kt_"));
    let (code, _, _) = call("GET", "/api/v1/volumes", &grafana, None);
    assert_eq!(code, 200);
    let (code, _, body) = call("POST", "/api/v1/zones", &grafana, Some(r#"{"name":"z9"}"#));
    assert_eq!(
        (code, error_of(&body).required_role.as_deref()),
        (403, Some("admin"))
    );
    // The list shows names and roles, never a token or its hash.
    let (code, _, body) = call("GET", "/api/v1/tokens", TOKEN, None);
    assert_eq!(code, 200);
    assert!(
        body.contains("\"grafana\"") && !body.contains(&grafana[3..]),
        "{body}"
    );
    for (bad, want) in [
        (r#"{"name": "grafana", "role": "admin"}"#, 409),
        (r#"{"name": "bad name", "role": "admin"}"#, 400),
        (r#"{"name": "x", "role": "root"}"#, 400),
        (r#"{"name": "x"}"#, 400),
        ("{nope", 400),
    ] {
        let (code, _, body) = call("POST", "/api/v1/tokens", TOKEN, Some(bad));
        assert_eq!(code, want, "{bad}: {body}");
    }
    let (code, _, body) = call("POST", "/api/v1/tokens/grafana/revoke", TOKEN, None);
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = call("GET", "/api/v1/volumes", &grafana, None);
    assert_eq!((code, error_of(&body).kind.as_str()), (401, "unauthorized"));
    let (code, _, _) = call("POST", "/api/v1/tokens/grafana/revoke", TOKEN, None);
    assert_eq!(code, 404);
    // Backend calls run as the token's name (what the audit log records).
    call("GET", "/api/v1/volumes", &srv.named[1], None);
    call("GET", "/api/v1/volumes", TOKEN, None);
    let actors = srv.fake.actors.lock().clone();
    assert_eq!(
        actors,
        [
            Some("grafana".to_string()),
            Some("operator".into()),
            Some("admin.token".into())
        ]
    );
}

#[test]
fn the_management_routes_refuse_bad_bodies_before_the_backend() {
    let srv = start();
    for (path, body, want) in [
        (
            "/api/v1/key-rotation/schedule",
            "{}",
            "missing field `zone`",
        ),
        (
            "/api/v1/key-rotation/schedule",
            r#"{"zone": "z1", "kind": "root"}"#,
            "unknown variant",
        ),
        (
            "/api/v1/key-rotation/schedule-all",
            r#"{"zone": "z1"}"#,
            "leave `zone` out",
        ),
        ("/api/v1/key-rotation/execute", "{}", "missing field `zone`"),
        (
            "/api/v1/key-rotation/emergency-rotation",
            r#"{"zone": "z1"}"#,
            "missing field `reason`",
        ),
        (
            "/api/v1/key-rotation/cleanup",
            r#"{"dry_run": "yes"}"#,
            "bad JSON body",
        ),
        ("/api/v1/key-rotation/cleanup", "[1]", "bad JSON body"),
    ] {
        let (code, _, text) = request(&srv, "POST", path, Some(TOKEN), Some(body));
        assert_eq!(code, 400, "{path} {body}: {text}");
        assert!(
            error_of(&text).error.contains(want),
            "{path} {body}: {text}"
        );
    }
    assert!(srv.fake.asked.lock().is_empty());
    // Unknown zone: the backend's 404 comes through.
    let (code, _, text) = request(
        &srv,
        "POST",
        "/api/v1/key-rotation/emergency-rotation",
        Some(TOKEN),
        Some(r#"{"zone": "nope", "reason": "leak"}"#),
    );
    assert_eq!(
        (code, error_of(&text).kind.as_str()),
        (404, "not_found"),
        "{text}"
    );
    let (code, _, text) = request(
        &srv,
        "GET",
        "/api/v1/key-rotation/keys/nope",
        Some(TOKEN),
        None,
    );
    assert_eq!(
        (code, error_of(&text).kind.as_str()),
        (404, "not_found"),
        "{text}"
    );
    let (code, _, text) = request(
        &srv,
        "GET",
        "/api/v1/key-rotation/report",
        Some(TOKEN),
        None,
    );
    assert_eq!(
        (code, error_of(&text).kind.as_str()),
        (400, "bad_request"),
        "a report needs its period: {text}"
    );
    let (code, _, text) = request(
        &srv,
        "GET",
        "/api/v1/key-rotation/report?from=2026-01-01",
        Some(TOKEN),
        None,
    );
    assert_eq!(
        (code, error_of(&text).kind.as_str()),
        (404, "not_found"),
        "a backend without reports says so: {text}"
    );
    // Without a scheduler, health says so rather than failing.
    let (code, _, text) = request(
        &srv,
        "GET",
        "/api/v1/key-rotation/health",
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200, "{text}");
    let h: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (h["status"].as_str(), h["scheduler"]["up"].as_bool()),
        (Some("degraded"), Some(false))
    );
}
