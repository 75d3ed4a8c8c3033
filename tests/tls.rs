//! NBD over TLS (mutual, X.509) and per-export access control, driven with
//! real clients: nbdinfo, nbdcopy and fio (libnbd, `nbds://` URIs with a
//! `tls-certificates` directory), qemu-img and qemu-io (`tls-creds-x509`),
//! and a replication agent over `keyturns://`. Certificates are made by the
//! openssl CLI in each test: a CA, a server certificate, two clients, one
//! client of another CA and one expired client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

// ------------------------------------------------------------ certificates

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA (key and self-signed certificate) named `name` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ],
    );
}

/// A certificate for `cn` signed by `ca`, as `<out>-cert.pem` and
/// `<out>-key.pem`. `days` may be negative (expired).
fn make_cert(dir: &Path, ca: &str, cn: &str, out: &str, server: bool, days: i32) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{out}-key.pem"),
            "-out",
            &format!("{out}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let ext = if server {
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
    } else {
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:{cn}.clients.test\nextendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"
    };
    std::fs::write(dir.join(format!("{out}.ext")), ext.replace("{cn}", cn)).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{out}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{out}-cert.pem"),
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{out}.ext"),
        ],
    );
}

/// The certificates of one test.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(root: &Path) -> Self {
        require_tool("openssl");
        let dir = root.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        make_ca(&dir, "ca");
        make_ca(&dir, "other-ca");
        make_cert(&dir, "ca", "localhost", "server", true, 2);
        make_cert(&dir, "ca", "client-a", "client-a", false, 2);
        make_cert(&dir, "ca", "client-b", "client-b", false, 2);
        make_cert(&dir, "other-ca", "client-a", "stranger", false, 2);
        make_cert(&dir, "ca", "client-a", "expired", false, -1);
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// A directory as libnbd and qemu read it (`ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`) for client `who` (None: no
    /// client certificate at all).
    fn client_dir(&self, who: Option<&str>) -> String {
        let d = self.dir.join(format!("as-{}", who.unwrap_or("nobody")));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        if let Some(w) = who {
            std::fs::copy(
                self.dir.join(format!("{w}-cert.pem")),
                d.join("client-cert.pem"),
            )
            .unwrap();
            std::fs::copy(
                self.dir.join(format!("{w}-key.pem")),
                d.join("client-key.pem"),
            )
            .unwrap();
        }
        d.to_str().unwrap().to_string()
    }
}

/// Appends TOML to the pool's pool.toml.
fn add_config(pool: &TestPool, text: &str) {
    let path = pool.path().join("pool.toml");
    let mut t = std::fs::read_to_string(&path).unwrap();
    t.push_str(text);
    std::fs::write(&path, t).unwrap();
}

fn tls_section(certs: &Certs, mode: &str) -> String {
    format!(
        "\n[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nnbd = {mode:?}\nstream = true\n",
        certs.path("server-cert.pem"),
        certs.path("server-key.pem"),
        certs.path("ca-cert.pem"),
    )
}

fn nbds(server: &Server, export: &str, dir: &str) -> String {
    format!("nbds://{}/{export}?tls-certificates={dir}", server.addr())
}

fn audit_records(pool: &TestPool, action: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.to_string().contains(&format!("\"{action}\"")))
        .collect()
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// qemu's `--object` and `--image-opts` for `export` over TLS as `dir`.
fn qemu_tls(server: &Server, export: &str, dir: &str) -> (String, String) {
    (
        format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}"),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
            server.port()
        ),
    )
}

fn qemu_io_tls(server: &Server, export: &str, dir: &str, cmds: &[&str]) -> std::process::Output {
    qemu_io_tls_as(server, export, dir, false, cmds)
}

/// qemu-io over TLS, opening the image read-only when `ro`.
fn qemu_io_tls_as(
    server: &Server,
    export: &str,
    dir: &str,
    ro: bool,
    cmds: &[&str],
) -> std::process::Output {
    let (object, image) = qemu_tls(server, export, dir);
    let mut args = vec!["--object", &object, "--image-opts", &image];
    if ro {
        args.push("-r");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    run("qemu-io", &args)
}

/// A HOME for fio with the client certificate where libnbd looks for it,
/// readable by the unprivileged user fio runs as when the test is root.
struct FioHome {
    dir: tempfile::TempDir,
    as_nobody: bool,
}

impl FioHome {
    fn new(certs: &Certs, who: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("keyturn-fio")
            .tempdir()
            .unwrap();
        let pki = dir.path().join(".pki/libnbd");
        std::fs::create_dir_all(&pki).unwrap();
        for (from, to) in [
            ("ca-cert.pem".to_string(), "ca-cert.pem"),
            (format!("{who}-cert.pem"), "client-cert.pem"),
            (format!("{who}-key.pem"), "client-key.pem"),
        ] {
            std::fs::copy(certs.dir.join(from), pki.join(to)).unwrap();
        }
        let as_nobody = String::from_utf8_lossy(&run_ok("id", &["-u"]).into_bytes()).trim() == "0";
        if as_nobody {
            require_tool("setpriv");
            for d in [
                dir.path().to_path_buf(),
                dir.path().join(".pki"),
                pki.clone(),
            ] {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
            for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                std::fs::set_permissions(pki.join(f), std::fs::Permissions::from_mode(0o644))
                    .unwrap();
            }
        }
        FioHome { dir, as_nobody }
    }

    /// fio with crc32c verification over `uri`: two jobs of 8 MiB each.
    fn fio(&self, uri: &str, extra: &[&str]) -> (bool, String) {
        let out = self.dir.path().join("fio.json");
        let _ = std::fs::remove_file(&out);
        let mut args: Vec<String> = vec!["120".into()];
        if self.as_nobody {
            args.extend(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                ]
                .map(String::from),
            );
        }
        args.extend(
            [
                "fio",
                "--name=tls",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=8M",
                "--offset_increment=8M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--randrepeat=1",
                "--output-format=json",
            ]
            .map(String::from),
        );
        args.push(format!("--uri={uri}"));
        args.push(format!("--output={}", out.display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = Command::new("timeout")
            .args(&args)
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .output()
            .expect("run fio");
        let text =
            std::fs::read_to_string(&out).unwrap_or_default() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    }
}

// ------------------------------------------------------- raw NBD handshake

/// Sends the client flags and one option in plaintext; returns the option
/// reply's type, or `None` if the server closed the connection.
fn plaintext_option(addr: &str, option: u32, payload: &[u8]) -> Option<u32> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    match s.read_exact(&mut reply) {
        Ok(()) => {
            assert_eq!(reply[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
            assert_eq!(reply[8..12], option.to_be_bytes());
            Some(u32::from_be_bytes(reply[12..16].try_into().unwrap()))
        }
        Err(_) => None,
    }
}

/// STARTTLS with rustls as the client, presenting `who`'s certificate,
/// then NBD_OPT_LIST inside TLS: `Ok` with the reply type, or why it failed.
fn starttls(addr: &str, certs: &Certs, who: &str) -> Result<u32, String> {
    let ca = certs.dir.join("ca-cert.pem");
    let cert = certs.dir.join(format!("{who}-cert.pem"));
    let key = certs.dir.join(format!("{who}-key.pem"));
    let tls = keyturn::tls::ClientTls::load(&ca, Some((&cert, &key))).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&5u32.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        1,
        "STARTTLS not acknowledged"
    );
    let name = keyturn::tls::server_name("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(tls.config(), name).map_err(|e| e.to_string())?;
    let mut t = rustls::StreamOwned::new(conn, s);
    let mut list = b"IHAVEOPT".to_vec();
    list.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    t.write_all(&list).map_err(|e| e.to_string())?;
    t.read_exact(&mut reply).map_err(|e| e.to_string())?;
    Ok(u32::from_be_bytes(reply[12..16].try_into().unwrap()))
}

const NBD_OPT_EXPORT_NAME: u32 = 1;
const NBD_OPT_LIST: u32 = 3;
const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

// ------------------------------------------------------------------- tests

#[test]
fn tls_required_serves_real_clients_and_refuses_the_rest() {
    for t in ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio"] {
        require_tool(t);
    }
    let pool = TestPool::with_volume("64M");
    let certs = Certs::new(pool.dir.path());
    add_config(&pool, &tls_section(&certs, "required"));
    let server = pool.serve();
    let a = certs.client_dir(Some("client-a"));

    // nbdinfo over TLS with a client certificate.
    let info = run_ok("nbdinfo", &["--json", &nbds(&server, "vol0", &a)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(64 << 20),
        "{info}"
    );
    assert_eq!(v["TLS"].as_bool(), Some(true), "{info}");

    // nbdcopy a pattern in and out over TLS.
    let data = pattern_bytes(7, 4 << 20);
    let src = write_file(pool.dir.path(), "in.bin", &data);
    let back = pool.dir.path().join("back.bin");
    run_ok(
        "nbdcopy",
        &[src.to_str().unwrap(), &nbds(&server, "vol0", &a)],
    );
    run_ok(
        "nbdcopy",
        &[&nbds(&server, "vol0", &a), back.to_str().unwrap()],
    );
    let got = std::fs::read(&back).unwrap();
    assert_eq!(
        &got[..data.len()],
        &data[..],
        "nbdcopy over TLS read back other data"
    );

    // qemu-io writes over TLS, qemu-img reads them back over TLS.
    let w = qemu_io_tls(&server, "vol0", &a, &["write -P 0xa5 32M 1M", "flush"]);
    assert!(w.status.success(), "qemu-io over TLS: {}", out_text(&w));
    let r = qemu_io_tls(&server, "vol0", &a, &["read -P 0xa5 32M 1M"]);
    assert!(
        r.status.success()
            && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"),
        "qemu-io read back: {}",
        out_text(&r)
    );
    let (object, image) = qemu_tls(&server, "vol0", &a);
    let img = run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &image,
        ],
    );
    let img: serde_json::Value = serde_json::from_str(&img).unwrap();
    assert_eq!(img["virtual-size"].as_u64(), Some(64 << 20));

    // A full fio verify run over TLS (fio's nbd engine is libnbd, which
    // refuses tls-certificates in a URI it did not parse itself: it finds
    // the client certificate in $HOME/.pki/libnbd instead, and, for root,
    // only in /etc/pki/libnbd: so as root, fio runs as nobody).
    let home = FioHome::new(&certs, "client-a");
    let uri = format!("nbds://{}/vol0", server.addr());
    for (pass, extra) in [("write", &[][..]), ("verify-only", &["--verify_only"][..])] {
        let (ok, text) = home.fio(&uri, extra);
        assert!(
            ok && fio_errors(&text).iter().all(|&e| e == 0),
            "fio {pass} over TLS:\n{text}"
        );
    }

    // Plaintext against a TLS-required server: the prescribed error, and
    // EXPORT_NAME (which cannot be answered with an error) closes.
    let addr = server.addr();
    assert_eq!(
        plaintext_option(&addr, NBD_OPT_LIST, &[]),
        Some(NBD_REP_ERR_TLS_REQD)
    );
    assert_eq!(
        plaintext_option(&addr, NBD_OPT_STRUCTURED_REPLY, &[]),
        Some(NBD_REP_ERR_TLS_REQD)
    );
    assert_eq!(plaintext_option(&addr, NBD_OPT_EXPORT_NAME, b"vol0"), None);
    let plain = run("nbdinfo", &[&server.uri("vol0")]);
    assert!(
        !plain.status.success(),
        "plaintext nbdinfo must fail: {}",
        out_text(&plain)
    );

    // No client certificate, another CA's, an expired one: refused.
    let nobody = certs.client_dir(None);
    let stranger_dir = certs.dir.join("as-stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    std::fs::copy(
        certs.dir.join("ca-cert.pem"),
        stranger_dir.join("ca-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        certs.dir.join("stranger-cert.pem"),
        stranger_dir.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        certs.dir.join("stranger-key.pem"),
        stranger_dir.join("client-key.pem"),
    )
    .unwrap();
    let expired = certs.client_dir(Some("expired"));
    for (who, dir) in [
        ("no certificate", nobody),
        ("another CA", stranger_dir.to_str().unwrap().to_string()),
        ("expired", expired),
    ] {
        let o = run("nbdinfo", &[&nbds(&server, "vol0", &dir)]);
        assert!(
            !o.status.success(),
            "{who}: nbdinfo must be refused: {}",
            out_text(&o)
        );
        let q = qemu_io_tls(&server, "vol0", &dir, &["read 0 4k"]);
        assert!(
            !q.status.success() || String::from_utf8_lossy(&q.stdout).contains("Could not"),
            "{who}: qemu-io must be refused: {}",
            out_text(&q)
        );
    }
    // GnuTLS does not even offer a certificate the server's CA did not
    // sign; rustls does: the server must refuse it itself.
    let stranger = starttls(&addr, &certs, "stranger");
    assert!(stranger.is_err(), "another CA's certificate was accepted");
    assert!(
        starttls(&addr, &certs, "client-a").is_ok(),
        "{:?}",
        starttls(&addr, &certs, "client-a")
    );
    // The refused handshakes are audited (one record per client; qemu
    // refuses the expired and the foreign certificate itself, before it
    // connects), and the server still serves.
    let refused = audit_records(&pool, "nbd.access");
    let reasons: Vec<String> = refused.iter().map(|r| r["error"].to_string()).collect();
    assert_eq!(
        refused.len(),
        5,
        "one audit record per refused client: {reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| r.contains("TLS handshake")),
        "{reasons:?}"
    );
    for why in ["no certificates", "Expired", "UnknownIssuer"] {
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "no refusal for {why}: {reasons:?}"
        );
    }
    let r = qemu_io_tls(&server, "vol0", &a, &["read -P 0xa5 32M 1M"]);
    assert!(r.status.success(), "after refusals: {}", out_text(&r));
    let log = server.log_text();
    assert!(
        !log.contains("PRIVATE KEY"),
        "the server log shows key material"
    );
}

#[test]
fn access_control_lists_opens_and_limits_per_client() {
    for t in ["nbdinfo", "qemu-io"] {
        require_tool(t);
    }
    let pool = TestPool::new();
    pool.keyturn_ok(&["zone", "create", "z1"]);
    for v in ["vol-a", "vol-b", "vol-c", "vol-d"] {
        pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", v]);
    }
    let certs = Certs::new(pool.dir.path());
    add_config(&pool, &tls_section(&certs, "required"));
    add_config(
        &pool,
        r#"
[[access]]
exports = ["vol-a"]
clients = ["client-a"]
access = "read-write"

[[access]]
exports = ["vol-b"]
clients = ["client-a"]
access = "read-only"

[[access]]
exports = ["vol-b", "vol-c"]
clients = ["client-b.clients.test"]
access = "read-write"

[[access]]
exports = ["vol-d"]
clients = ["*"]
addresses = ["10.99.0.0/16"]
"#,
    );
    let server = pool.serve();
    let a = certs.client_dir(Some("client-a"));
    let b = certs.client_dir(Some("client-b"));

    // Client A lists only what it may open.
    let list = |dir: &str| {
        let uri = format!("nbds://{}/?tls-certificates={dir}", server.addr());
        let out = run_ok("nbdinfo", &["--list", "--json", &uri]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list(&a), ["vol-a", "vol-b"]);
    assert_eq!(list(&b), ["vol-b", "vol-c"]);

    // A opens vol-a read-write, vol-b read-only; vol-c and vol-d not at all.
    let w = qemu_io_tls(
        &server,
        "vol-a",
        &a,
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert!(w.status.success(), "{}", out_text(&w));
    let info = run_ok("nbdinfo", &["--json", &nbds(&server, "vol-b", &a)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["exports"][0]["is_read_only"].as_bool(),
        Some(true),
        "{info}"
    );
    // B writes vol-b; A's write there is refused and B's data stays.
    let wb = qemu_io_tls(&server, "vol-b", &b, &["write -P 0x33 0 64k", "flush"]);
    assert!(wb.status.success(), "{}", out_text(&wb));
    let ro = qemu_io_tls(&server, "vol-b", &a, &["write -P 0x22 0 64k"]);
    assert!(
        !ro.status.success(),
        "a read-only grant must refuse writes: {}",
        out_text(&ro)
    );
    let junk = write_file(pool.dir.path(), "junk.bin", &pattern_bytes(3, 64 << 10));
    let copy = run(
        "nbdcopy",
        &[junk.to_str().unwrap(), &nbds(&server, "vol-b", &a)],
    );
    assert!(
        !copy.status.success(),
        "nbdcopy onto a read-only grant: {}",
        out_text(&copy)
    );
    let rb = qemu_io_tls_as(&server, "vol-b", &a, true, &["read -P 0x33 0 64k"]);
    assert!(
        rb.status.success() && !String::from_utf8_lossy(&rb.stdout).contains("verification failed"),
        "{}",
        out_text(&rb)
    );
    for export in ["vol-c", "vol-d"] {
        let o = run("nbdinfo", &[&nbds(&server, export, &a)]);
        assert!(
            !o.status.success(),
            "A must not open {export}: {}",
            out_text(&o)
        );
    }
    // One audit record per refused client, naming it and what it asked for
    // (written when the client's connection ends, just after nbdinfo exits).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        let r = audit_records(&pool, "nbd.access");
        if r.len() >= 2 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (r, export) in refused.iter().zip(["vol-c", "vol-d"]) {
        let s = r.to_string();
        assert!(
            s.contains("client-a@127.0.0.1") && s.contains(export),
            "{s}"
        );
    }

    // SIGHUP reloads the rules: grant vol-c to A, and A sees it.
    let toml = pool.path().join("pool.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("exports = [\"vol-a\"]", "exports = [\"vol-a\", \"vol-c\"]"),
    )
    .unwrap();
    let pid = server.pid_now().expect("server pid").to_string();
    run_ok("kill", &["-HUP", &pid]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while list(&a) != ["vol-a", "vol-b", "vol-c"] {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload [[access]]"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn plaintext_beyond_loopback_needs_an_explicit_flag() {
    let pool = TestPool::with_volume("16M");
    // Bounded: were it to start serving, the timeout ends it (and the test fails).
    let o = Command::new("timeout")
        .args(["30"])
        .arg(keyturn_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--pool"])
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(&pool.pass_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("beyond loopback") && err.contains("--allow-plaintext"),
        "{err}"
    );
    // With the flag it serves, and says at start what that exposes.
    let out = pool.dir.path().join("serve.out");
    let log = pool.dir.path().join("serve.log");
    let child = Command::new(keyturn_bin())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--allow-plaintext",
            "--pool",
        ])
        .arg(pool.path())
        .arg("--passphrase-file")
        .arg(&pool.pass_file)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed even if the wait below fails.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    kill_when_file(&mut child.0, &out, |t| t.contains("ready: nbd://0.0.0.0:"));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("accepts plaintext clients"), "{log}");
}

#[test]
fn an_agent_replicates_over_tls() {
    require_tool("qemu-io");
    let src = TestPool::new();
    src.keyturn_ok(&["zone", "create", "z1"]);
    src.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "16M", "a"]);
    src.keyturn_ok(&["stream", "enable", "--zone", "z1"]);
    let certs = Certs::new(src.dir.path());
    add_config(&src, &tls_section(&certs, "optional"));
    let key = src.dir.path().join("agent.key");
    let public = run_ok(
        keyturn_bin().to_str().unwrap(),
        &["agent-key", "--out", key.to_str().unwrap()],
    );
    src.keyturn_ok(&[
        "stream",
        "grant",
        "--zone",
        "z1",
        "--agent",
        "dr",
        "--public-key",
        public.trim(),
    ]);
    let dst = TestPool::new();
    let server = src.serve_with(&["--stream-listen", "127.0.0.1:0"]);
    let stream = server.stream.clone().expect("stream line");
    assert!(stream.starts_with("keyturns://"), "{stream}");
    qio_ok(&server.uri("a"), &["write -P 0x5c 0 1M", "flush"]);

    let dst_path = dst.path();
    let agent = |extra: &[&str], source: &str| {
        let mut args = vec![
            "replicate",
            "--source",
            source,
            "--zone",
            "z1",
            "--to",
            dst_path.to_str().unwrap(),
            "--to-zone",
            "r1",
            "--agent",
            "dr",
            "--agent-key",
            key.to_str().unwrap(),
            "--passphrase-file",
            dst.pass_file.to_str().unwrap(),
            "--until-caught-up",
        ];
        args.extend_from_slice(extra);
        Command::new(keyturn_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run replicate")
    };
    let ca = certs.path("ca-cert.pem");
    let stranger = [
        "--tls-ca",
        ca.as_str(),
        "--tls-cert",
        &certs.path("stranger-cert.pem"),
        "--tls-key",
        &certs.path("stranger-key.pem"),
    ];
    // Plaintext to a TLS listener, and a certificate of another CA: refused.
    let plain = agent(&[], &stream.replacen("keyturns://", "keyturn://", 1));
    assert!(
        !plain.status.success(),
        "plaintext agent: {}",
        out_text(&plain)
    );
    let o = agent(&stranger, &stream);
    assert!(
        !o.status.success(),
        "agent with another CA's certificate: {}",
        out_text(&o)
    );
    // With its certificate: replicates, and the replica reads the data.
    let good = [
        "--tls-ca",
        ca.as_str(),
        "--tls-cert",
        &certs.path("client-a-cert.pem"),
        "--tls-key",
        &certs.path("client-a-key.pem"),
    ];
    let o = agent(&good, &stream);
    assert!(o.status.success(), "agent over TLS: {}", out_text(&o));
    let replica = dst.serve();
    qio_ok(&replica.uri("a"), &["read -P 0x5c 0 1M"]);
}

#[test]
fn the_admin_api_beyond_loopback_is_https_with_client_certificates() {
    require_tool("curl");
    let pool = TestPool::with_volume("16M");
    let certs = Certs::new(pool.dir.path());
    add_config(&pool, &tls_section(&certs, "required"));
    let _server = pool.serve_with(&["--admin-listen", "0.0.0.0:0"]);
    let addr = std::fs::read_to_string(pool.path().join("admin.addr")).unwrap();
    let port = addr.trim().rsplit_once(':').unwrap().1.to_string();
    let token = std::fs::read_to_string(pool.path().join("admin.token")).unwrap();
    let url = format!("https://localhost:{port}/api/v1/volumes");
    let auth = format!("Authorization: Bearer {}", token.trim());
    let ca = certs.path("ca-cert.pem");
    let curl = |extra: &[&str]| {
        let mut args = vec![
            "-sS",
            "--fail",
            "--max-time",
            "20",
            "--cacert",
            ca.as_str(),
            "-H",
            auth.as_str(),
        ];
        args.extend_from_slice(extra);
        args.push(url.as_str());
        run("curl", &args)
    };
    let ok = curl(&[
        "--cert",
        &certs.path("client-a-cert.pem"),
        "--key",
        &certs.path("client-a-key.pem"),
    ]);
    assert!(
        ok.status.success(),
        "HTTPS with a client certificate: {}",
        out_text(&ok)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("vol0"),
        "{}",
        out_text(&ok)
    );
    let no_cert = curl(&[]);
    assert!(
        !no_cert.status.success(),
        "HTTPS without a client certificate: {}",
        out_text(&no_cert)
    );
    let plain = run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-H",
            &auth,
            &format!("http://127.0.0.1:{port}/api/v1/volumes"),
        ],
    );
    assert!(
        !plain.status.success(),
        "plain HTTP to the HTTPS admin API: {}",
        out_text(&plain)
    );
}
