//! A pool whose root key lives in a KMIP server: PyKMIP's `pykmip-server`,
//! started here with certificates made by openssl, reached over mutual TLS.
//! Init, serve under fio verify, KEK rotation through the running server,
//! restart; the KMS stopped while serving (I/O goes on, a KEK rotation waits
//! and alerts, then completes once the KMS is back) and at start (a clear
//! refusal).

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The pykmip-server that tools/test.sh installs (a venv under target/),
/// or one on PATH.
fn pykmip_server() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYTURN_PYKMIP_SERVER") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pykmip-venv/bin/pykmip-server");
    if venv.exists() {
        return venv;
    }
    require_tool("pykmip-server");
    "pykmip-server".into()
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// ECDSA P-256: PyKMIP's TLS 1.2 suites and rustls meet on ECDHE-ECDSA-GCM.
fn make_certs(dir: &Path) {
    require_tool("openssl");
    let p = |n: &str| dir.join(n).display().to_string();
    let key = |n: &str| {
        run_ok(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &p(n),
            ],
        )
    };
    key("ca.key");
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("ca.key"),
            "-subj",
            "/CN=keyturn test KMS CA",
            "-days",
            "2",
            "-out",
            &p("ca.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        ),
        (
            "client",
            "keyturn",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        ),
    ] {
        key(&format!("{name}.key"));
        run_ok(
            "openssl",
            &[
                "req",
                "-new",
                "-key",
                &p(&format!("{name}.key")),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &p(&format!("{name}.csr")),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run_ok(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}.pem")),
            ],
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PyKMIP server on a loopback port, with its sqlite database in `dir`
/// (so keys survive a stop and start).
struct Kms {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Kms {
    fn new(dir: &Path) -> Self {
        make_certs(dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let port = free_port();
        let d = |n: &str| dir.join(n).display().to_string();
        let conf = format!(
            "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={}\nkey_path={}\n\
             ca_path={}\nauth_suite=TLS1.2\npolicy_path={}\nenable_tls_client_auth=True\n\
             tls_cipher_suites=\n    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n    \
             TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\nlogging_level=INFO\ndatabase_path={}\n",
            d("server.pem"),
            d("server.key"),
            d("ca.pem"),
            d("policies"),
            d("pykmip.db"),
        );
        std::fs::write(dir.join("server.conf"), conf).unwrap();
        let mut kms = Self {
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        kms.start();
        kms
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn start(&mut self) {
        let child = Command::new(pykmip_server())
            .arg("-f")
            .arg(self.dir.join("server.conf"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("start pykmip-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "pykmip-server did not listen on {}:\n{}\n{}",
                self.addr(),
                self.log(),
                std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Nothing may answer on the port any more.
        assert!(TcpStream::connect(self.addr()).is_err());
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `keyturn init --root-key kmip` against `kms`; zone z1 with volume vol0.
fn kmip_pool(kms: &Kms) -> TestPool {
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("passphrase");
    // Never read for a KMIP pool; the harness passes it to every command.
    std::fs::write(&pass_file, "unused").unwrap();
    let pool = TestPool {
        dir,
        pass_file,
        passphrase: "unused".into(),
    };
    let d = |n: &str| kms.dir.join(n).display().to_string();
    let out = pool.keyturn_ok(&[
        "init",
        "--root-key",
        "kmip",
        "--kmip-url",
        &kms.addr(),
        "--kmip-ca",
        &d("ca.pem"),
        "--kmip-cert",
        &d("client.pem"),
        "--kmip-key",
        &d("client.key"),
        "--kmip-retry-secs",
        "120",
    ]);
    assert!(out.contains("created pool"), "{out}");
    pool.keyturn_ok(&["zone", "create", "z1"]);
    pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "32M", "vol0"]);
    pool
}

fn pool_toml(pool: &TestPool) -> toml::Value {
    toml::from_str(&std::fs::read_to_string(pool.path().join("pool.toml")).unwrap()).unwrap()
}

/// KEK versions of zone 1 that still hold key material.
fn live_keks(pool: &TestPool) -> Vec<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.path().join("keys/zone-1.json")).unwrap())
            .unwrap();
    let mut out: Vec<u64> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["purpose"] == "kek" && k["state"] != "destroyed")
        .map(|k| k["version"].as_u64().unwrap())
        .collect();
    out.sort();
    out
}

/// Starts `keyturn ARGS --pool DIR` (the KMS unlocks the root key: no
/// passphrase) with its output piped, to read once it has ended.
fn spawn_piped(pool: &TestPool, args: &[&str]) -> std::process::Child {
    Command::new(keyturn_bin())
        .args(args)
        .arg("--pool")
        .arg(pool.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The value of metric `name` (no labels) in a scrape of the server.
fn metric(server: &Server, pool: &TestPool, name: &str) -> Option<f64> {
    let text = scrape_metrics(pool, server);
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

const JOBS: u32 = 2;
const REGION: u64 = 4 << 20;

#[test]
fn kmip_root_key_serves_rotates_and_rides_out_a_kms_outage() {
    require_tool("fio");
    let kms_dir = tempfile::tempdir().unwrap();
    let mut kms = Kms::new(kms_dir.path());
    let pool = kmip_pool(&kms);

    // pool.toml names the KMS and the key's identifier, never key bytes.
    let toml = pool_toml(&pool);
    let root = &toml["root_key"];
    assert_eq!(root["provider"].as_str(), Some("kmip"));
    assert_eq!(root["addr"].as_str(), Some(kms.addr().as_str()));
    let key_id = root["key_id"].as_str().unwrap().to_string();
    assert!(!key_id.is_empty());
    // The KMS made the key and did the wrapping: its log shows the Create
    // and the Encrypts.
    let log = kms.log();
    assert!(log.contains("Processing operation: Create"), "{log}");
    assert!(log.contains("Processing operation: Encrypt"), "{log}");

    // Serve under fio verify.
    let mut server = pool.serve();
    let out = pool.dir.path().join("fio.json");
    let (ok, text) = fio(&server.uri("vol0"), JOBS, REGION, 1, &out, &[]);
    assert!(ok && fio_errors(&text).iter().all(|&e| e == 0), "{text}");
    assert_eq!(metric(&server, &pool, "keyturn_kms_up"), Some(1.0));

    // KEK rotation through the running server.
    assert_eq!(live_keks(&pool), vec![1]);
    let rotated = pool.keyturn_ok(&["keys", "rotate-kek", "--zone", "z1"]);
    assert_eq!(live_keks(&pool), vec![2], "{rotated}");
    fio_verify(
        &server.uri("vol0"),
        JOBS,
        REGION,
        &out,
        "after the KEK rotation",
    );

    // Restart: the KEK is unwrapped by the KMS again.
    assert!(server.stop());
    let mut server = pool.serve();
    fio_verify(&server.uri("vol0"), JOBS, REGION, &out, "after a restart");

    // The KMS goes away while serving: I/O goes on from the keys in memory.
    kms.stop();
    let (ok, text) = fio(&server.uri("vol0"), JOBS, REGION, 1, &out, &[]);
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "I/O with the KMS down: {text}"
    );
    // A KEK rotation needs the root key: it waits and alerts.
    let mut rotation = spawn_piped(&pool, &["keys", "rotate-kek", "--zone", "z1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log_text().contains("ALERT: KMIP server unreachable") {
        assert!(
            Instant::now() < deadline,
            "no ALERT in the server log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        rotation.try_wait().unwrap().is_none(),
        "the rotation must wait for the KMS, not fail"
    );
    assert_eq!(metric(&server, &pool, "keyturn_kms_up"), Some(0.0));
    assert!(metric(&server, &pool, "keyturn_kms_errors_total").unwrap_or(0.0) >= 1.0);
    assert!(
        server.log_text().contains(&kms.addr()),
        "the alert names the KMS"
    );
    fio_verify(
        &server.uri("vol0"),
        JOBS,
        REGION,
        &out,
        "while the rotation waits",
    );
    assert_eq!(live_keks(&pool), vec![2], "nothing rotated without the KMS");

    // The KMS comes back: the rotation completes.
    kms.start();
    let done = rotation.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "the rotation fails once the KMS is back:\n{}\n{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(live_keks(&pool), vec![3]);
    assert_eq!(metric(&server, &pool, "keyturn_kms_up"), Some(1.0));
    assert!(server.log_text().contains("KMIP server is back"));
    fio_verify(
        &server.uri("vol0"),
        JOBS,
        REGION,
        &out,
        "after the KMS came back",
    );
    assert!(server.stop());

    // The KMS down at start: a clear refusal to serve, naming it.
    kms.stop();
    let mut serve = spawn_piped(&pool, &["serve", "--listen", "127.0.0.1:0"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while serve.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = serve.kill();
            panic!("keyturn serve did not refuse with the KMS down");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = serve.wait_with_output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("the KMIP server at {} is unreachable", kms.addr())),
        "{err}"
    );
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("ready:"));

    // And with the KMS back, the pool serves its data again.
    kms.start();
    let server = pool.serve();
    fio_verify(&server.uri("vol0"), JOBS, REGION, &out, "after all of it");
}
