//! The admin API and metrics of the real `keyturn serve`, and the CLI
//! commands that use them.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The running server's admin address, token, and an HTTP agent.
struct Api {
    addr: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn of(pool: &TestPool, server: &Server) -> Api {
        let addr = server
            .admin
            .clone()
            .expect("an `admin:` line before `ready:`");
        let token = std::fs::read_to_string(pool.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let agent = http_agent();
        Api { addr, token, agent }
    }

    /// GET or POST `path` with `token` (`None`: no Authorization header);
    /// returns the status, content type and body.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let url = format!("http://{}{path}", self.addr);
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = if method == "GET" {
            let mut r = self.agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        } else {
            let mut r = self.agent.post(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or(""))
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = resp.body_mut().read_to_string().unwrap();
        (resp.status().as_u16(), ctype, text)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (code, _, body) = self.call("GET", path, Some(&self.token), None);
        (code, body)
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (code, _, body) = self.call("POST", path, Some(&self.token), Some(body));
        (code, body)
    }

    /// Every sample of the Prometheus text, as `name{labels}` → value.
    fn metrics(&self) -> Vec<(String, f64)> {
        let (code, ctype, text) = self.call("GET", "/metrics", Some(&self.token), None);
        assert_eq!(code, 200, "{text}");
        assert_eq!(ctype, "text/plain; version=0.0.4");
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }
}

/// The value of the sample `key` (name and labels as printed).
fn sample(samples: &[(String, f64)], key: &str) -> f64 {
    samples
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:?}"))
}

/// Asserts `body` is the JSON error body with this kind; returns its message.
fn error_kind(body: &str, kind: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["kind"], kind, "{body}");
    v["error"].as_str().unwrap().to_string()
}

fn stderr(o: &Output) -> String {
    strip_ansi_codes(&String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_route_needs_the_token() {
    let pool = TestPool::with_volume("16M");
    let mode = std::fs::metadata(pool.path().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "init writes the token with mode 0600");
    let mut server = pool.serve();
    let api = Api::of(&pool, &server);
    assert_eq!(api.token.len(), 64, "32 random bytes, hex");
    // The token with its last digit changed (never equal to it).
    let last = if api.token.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &api.token[..63]);
    for path in [
        "/health",
        "/metrics",
        "/api/v1/zones",
        "/api/v1/volumes",
        "/api/v1/zones/z1/rotation",
    ] {
        for token in [None, Some(wrong.as_str()), Some("")] {
            let (code, ctype, body) = api.call("GET", path, token, None);
            assert_eq!(code, 401, "GET {path} with {token:?}: {body}");
            assert!(ctype.starts_with("application/json"), "{ctype}");
            error_kind(&body, "unauthorized");
        }
        let (code, _, body) = api.call("GET", path, Some(&api.token), None);
        assert_ne!(code, 401, "GET {path} with the token: {body}");
    }
    let (code, _, body) = api.call("POST", "/api/v1/zones/z1/rotation/flip", Some(&wrong), None);
    assert_eq!(code, 401, "{body}");

    let (code, body) = api.get("/health");
    assert_eq!(code, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok", "{body}");
    assert_eq!(health["problems"], serde_json::json!([]));
    let (code, body) = api.get("/api/v1/zones");
    assert_eq!((code, body.as_str()), (200, r#"["z1"]"#));

    assert!(server.stop());
    let log = server.log_text();
    assert!(
        log.contains("admin API request refused"),
        "refusals are logged"
    );
    assert!(!log.contains(&api.token), "the token reached the log");
}

#[test]
fn metrics_count_the_nbd_io_done() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("64M");
    let server = pool.serve();
    let api = Api::of(&pool, &server);
    let before = api.metrics();
    let get = |s: &[(String, f64)], k: &str| sample(s, k);
    for k in [
        "keyturn_nbd_written_bytes_total",
        "keyturn_nbd_read_bytes_total",
        r#"keyturn_nbd_requests_total{command="write"}"#,
    ] {
        assert_eq!(get(&before, k), 0.0, "{k} before any I/O");
    }
    // 3 MiB written in three requests, 2 MiB read in two, one flush.
    qio_ok(
        &server.uri("vol0"),
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 1M 1M",
            "write -P 0x33 8M 1M",
            "flush",
            "read -P 0x31 0 1M",
            "read -P 0x33 8M 1M",
        ],
    );
    let after = api.metrics();
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(delta("keyturn_nbd_written_bytes_total"), (3 * MIB) as f64);
    assert_eq!(delta("keyturn_nbd_read_bytes_total"), (2 * MIB) as f64);
    assert_eq!(delta(r#"keyturn_nbd_requests_total{command="write"}"#), 3.0);
    assert_eq!(delta(r#"keyturn_nbd_requests_total{command="read"}"#), 2.0);
    assert!(delta(r#"keyturn_nbd_requests_total{command="flush"}"#) >= 1.0);
    assert_eq!(delta(r#"keyturn_nbd_errors_total{command="write"}"#), 0.0);
    assert_eq!(delta(r#"keyturn_nbd_errors_total{command="read"}"#), 0.0);
    assert_eq!(
        get(&after, "keyturn_nbd_connections"),
        0.0,
        "qemu-io has gone"
    );
    assert_eq!(
        get(
            &after,
            r#"keyturn_nbd_rejected_clients_total{reason="protocol"}"#
        ),
        0.0
    );

    // A client that breaks the protocol is counted, and so is its connection while open.
    let port = server.port();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let open = api.metrics();
    assert_eq!(get(&open, "keyturn_nbd_connections"), 1.0);
    s.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mut dropped = 0.0;
    for _ in 0..100 {
        let m = api.metrics();
        dropped = get(
            &m,
            r#"keyturn_nbd_rejected_clients_total{reason="protocol"}"#,
        );
        if dropped > 0.0 && get(&m, "keyturn_nbd_connections") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(dropped, 1.0);
}

/// Sends a request head with no body and returns the answer.
fn raw_head(addr: &str, head: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"}") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn bad_requests_get_json_errors() {
    let pool = TestPool::with_volume("16M");
    let server = pool.serve();
    let api = Api::of(&pool, &server);

    let (code, body) = api.get("/api/v1/zones/nope/rotation");
    assert_eq!(code, 404, "{body}");
    assert!(error_kind(&body, "not_found").contains("nope"), "{body}");
    let (code, body) = api.post("/api/v1/zones/nope/scrub", "");
    assert_eq!(code, 404, "{body}");
    error_kind(&body, "not_found");

    let (code, body) = api.get("/api/v1/nothing/here");
    assert_eq!(code, 404, "{body}");
    error_kind(&body, "no_route");

    let prepare = "/api/v1/zones/z1/rotation/prepare";
    for bad in ["{", r#"{"window_secs": "soon"}"#, r#"{"window": 5}"#, "[]"] {
        let (code, body) = api.post(prepare, bad);
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(
            error_kind(&body, "bad_request").contains("bad JSON body"),
            "{body}"
        );
    }
    let (code, body) = api.post("/api/v1/zones/z1/rotation/emergency", "{}");
    assert_eq!(code, 400, "{body}");
    assert!(
        error_kind(&body, "bad_request").contains("reason"),
        "{body}"
    );

    let head = format!(
        "POST {prepare} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        api.token,
        2 * MIB
    );
    // Refused from the declared length, before the body is sent.
    let answer = raw_head(&api.addr, &head);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""kind":"payload_too_large""#), "{answer}");

    // The server is unharmed.
    assert_eq!(api.get("/health").0, 200);
}

#[test]
fn the_admin_api_listens_on_loopback_only() {
    let pool = TestPool::with_volume("16M");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        pool.keyturn(&args)
    };
    for addr in ["0.0.0.0:0", "192.0.2.1:10810", "[::]:0"] {
        let o = serve(&["--admin-listen", addr]);
        assert!(!o.status.success(), "served with the admin API on {addr}");
        let err = stderr(&o);
        assert!(err.contains("not a loopback address"), "{addr}: {err}");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("ready"),
            "{addr}"
        );
    }
    // A taken admin port: nothing is served, and no admin.addr is left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let o = serve(&["--admin-listen", &port]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot listen on {port} for the admin API")),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ready"));
    assert!(!pool.path().join("admin.addr").exists());
    // The same from pool.toml.
    let toml = pool.path().join("pool.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:10810\""), "{text}");
    std::fs::write(&toml, text.replace("127.0.0.1:10810", "0.0.0.0:10810")).unwrap();
    let o = serve(&[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("not a loopback address") && err.contains("[admin] listen"),
        "{err}"
    );
    assert!(!pool.path().join("admin.addr").exists());
}

#[test]
fn cli_finds_the_server_by_admin_addr_and_falls_back_to_the_pool() {
    require_tool("qemu-io");
    let pool = TestPool::with_volume("16M");
    let mut server = pool.serve_with(&["--admin-listen", "127.0.0.1:0"]);
    let addr_file = pool.path().join("admin.addr");
    let written = std::fs::read_to_string(&addr_file).unwrap();
    assert_eq!(Some(written.trim().to_string()), server.admin);
    qio_ok(&server.uri("vol0"), &["write -P 0x5a 0 1M", "flush"]);

    // Through the API: no passphrase is given, so the pool cannot be opened here.
    let o = pool.keyturn_bare(&["volume", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats[0]["name"], "vol0");
    assert_eq!(stats[0]["zone"], "z1");
    assert_eq!(stats[0]["size"], 16 * MIB);
    assert_eq!(stats[0]["mapped_blocks"], 256, "1 MiB in 4 KiB blocks");
    let table =
        String::from_utf8_lossy(&pool.keyturn_bare(&["volume", "stats"]).stdout).into_owned();
    assert!(table.contains("vol0") && table.contains("256"), "{table}");

    // The server's errors are the CLI's messages.
    let o = pool.keyturn_bare(&["rotate", "status", "--zone", "nope"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(r#"no zone named "nope""#),
        "{}",
        stderr(&o)
    );
    // rotate-kek goes through the API while served (offline, the pool lock would refuse it).
    let o = pool.keyturn(&["keys", "rotate-kek", "--zone", "nope"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(r#"no zone named "nope""#) && !err.contains("in use"),
        "{err}"
    );

    assert!(server.stop());
    assert!(
        !addr_file.exists(),
        "admin.addr is removed at a clean shutdown"
    );

    // No server: the pool is opened here, and the numbers are the same.
    let o = pool.keyturn(&["volume", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("opening it here"), "{}", stderr(&o));
    let local: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(local, stats);
    // Without a server and without a passphrase, it cannot.
    let o = pool.keyturn_bare(&["volume", "stats", "--json"]);
    assert!(!o.status.success());
    // Rotation needs the server.
    let o = pool.keyturn_bare(&["rotate", "flip", "--zone", "z1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no keyturn server is answering for pool") && err.contains("keyturn serve"),
        "{err}"
    );
}

#[test]
fn a_stale_admin_addr_after_kill_9_means_no_server() {
    let pool = TestPool::with_volume("16M");
    let mut server = pool.serve();
    let addr_file = pool.path().join("admin.addr");
    server.kill9();
    assert!(addr_file.exists(), "nothing removed it");
    let o = pool.keyturn_bare(&["rotate", "pause", "--zone", "z1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let addr = std::fs::read_to_string(&addr_file).unwrap();
    assert!(
        err.contains("no keyturn server is answering") && err.contains(addr.trim()),
        "{err}"
    );
    // A new server overwrites it.
    let server = pool.serve();
    let now = std::fs::read_to_string(&addr_file).unwrap();
    assert_eq!(Some(now.trim().to_string()), server.admin);
}

#[test]
fn serve_creates_a_missing_token_and_refuses_a_world_readable_one() {
    let pool = TestPool::with_volume("16M");
    let token = pool.path().join("admin.token");
    std::fs::remove_file(&token).unwrap();
    let mut server = pool.serve();
    let made = std::fs::read_to_string(&token).unwrap();
    assert_eq!(made.trim().len(), 64);
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Api::of(&pool, &server).get("/health").0, 200);
    assert!(server.stop());

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = pool.keyturn(&["serve", "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(made.trim()), "the token is in the error");
}

/// Two pools on one host: a CLI command on a pool whose server is down must
/// not stop at another pool's server found at the configured address (it
/// refuses this pool's token): no server runs for this pool, so the command
/// opens it here, as it would with nothing listening.
#[test]
fn another_pools_server_at_the_configured_address_means_no_server() {
    let a = TestPool::with_volume("16M");
    let b = TestPool::with_volume("16M");
    let mut server_a = a.serve();
    let addr_a = server_a.admin.clone().expect("admin address");
    let toml = b.path().join("pool.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:10810\""), "{text}");
    std::fs::write(&toml, text.replace("127.0.0.1:10810", &addr_a)).unwrap();

    let o = b.keyturn(&["volume", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("opening it here"), "{}", stderr(&o));
    let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats[0]["name"], "vol0");
    assert_eq!(
        stats[0]["mapped_blocks"], 0,
        "pool b's own volume, untouched"
    );
    // Operator commands that only a server can run say that none runs.
    let o = b.keyturn_bare(&["rotate", "flip", "--zone", "z1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no keyturn server is answering for pool"),
        "{}",
        stderr(&o)
    );
    // Pool a's server is unaffected and still answers for pool a.
    let o = a.keyturn_bare(&["volume", "stats", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("opening it here"), "{}", stderr(&o));
    assert!(server_a.stop());
}
