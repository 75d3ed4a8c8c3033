//! Shared harness for integration tests: make a pool with the real
//! `keyturn` binary, serve it, and run real NBD clients against it.
#![allow(dead_code)]

pub mod pair;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The keyturn binary under test.
pub fn keyturn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyturn"))
}

/// Fails the test (never skips) when a client tool is missing:
/// `tools/test.sh` installs them.
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{name} is not installed; run the tests through tools/test.sh, which installs it"
    );
}

/// Runs a command with a time limit; returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let mut full = vec!["120", cmd];
    full.extend_from_slice(args);
    Command::new("timeout")
        .args(&full)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pool in a temporary directory, with its passphrase in a file.
pub struct TestPool {
    pub dir: tempfile::TempDir,
    pub pass_file: PathBuf,
    pub passphrase: String,
}

impl TestPool {
    /// `keyturn init` with a cheap KDF cost (tests only).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let passphrase = format!("test-pass-{}", std::process::id());
        let pass_file = dir.path().join("passphrase");
        std::fs::write(&pass_file, &passphrase).unwrap();
        let pool = Self {
            dir,
            pass_file,
            passphrase,
        };
        pool.keyturn_ok(&["init", "--kdf-memory-kib", "8192", "--kdf-iterations", "1"]);
        pool
    }

    /// The pool directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// `keyturn <args> --pool DIR --passphrase-file F`, stdin not a terminal.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(keyturn_bin());
        c.args(args)
            .arg("--pool")
            .arg(self.path())
            .arg("--passphrase-file")
            .arg(&self.pass_file)
            .env_remove("KEYTURN_PASSPHRASE")
            .stdin(Stdio::null());
        c
    }

    /// Runs `keyturn <args> --pool DIR --passphrase-file F`.
    pub fn keyturn(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run keyturn")
    }

    /// Starts `keyturn <args> --pool DIR --passphrase-file F` in the
    /// background, output discarded: for killing it mid-way.
    pub fn spawn_keyturn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keyturn")
    }

    /// Runs `keyturn <args> --pool DIR` without any passphrase source, stdin
    /// not a terminal: for commands that need none (operator commands, the
    /// admin API's).
    pub fn keyturn_bare(&self, args: &[&str]) -> Output {
        Command::new(keyturn_bin())
            .args(args)
            .arg("--pool")
            .arg(self.path())
            .env_remove("KEYTURN_PASSPHRASE")
            .stdin(Stdio::null())
            .output()
            .expect("run keyturn")
    }

    /// Like [`TestPool::keyturn`], asserting success; returns stdout.
    pub fn keyturn_ok(&self, args: &[&str]) -> String {
        let out = self.keyturn(args);
        assert!(
            out.status.success(),
            "keyturn {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A pool with zone `z1` and one volume `vol0` of `size`.
    pub fn with_volume(size: &str) -> Self {
        let pool = Self::new();
        pool.keyturn_ok(&["zone", "create", "z1"]);
        pool.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", size, "vol0"]);
        pool
    }

    /// Starts `keyturn serve` on a free port (and optionally a Unix socket).
    pub fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    /// Starts `keyturn serve` with extra arguments.
    pub fn serve_with(&self, extra: &[&str]) -> Server {
        self.serve_env(extra, &[])
    }

    /// Starts `keyturn serve` with extra arguments and environment variables.
    pub fn serve_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = self
            .dir
            .path()
            .join(format!("server-{}.log", rand_suffix()));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(keyturn_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            .arg("--pool")
            .arg(self.path())
            .arg("--passphrase-file")
            .arg(&self.pass_file)
            .env("KEYTURN_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn keyturn serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut base = None;
        let mut unix = None;
        let mut admin = None;
        let mut stream = None;
        while base.is_none() || (extra.contains(&"--unix") && unix.is_none()) {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("admin: http://") {
                        admin = Some(rest.trim_end_matches('/').to_string());
                    }
                    if let Some(rest) = line.strip_prefix("stream: ") {
                        stream = Some(rest.to_string());
                    }
                    if let Some(rest) = line.strip_prefix("ready: ") {
                        if rest.starts_with("nbd://") {
                            base = Some(rest.trim_end_matches('/').to_string());
                        } else {
                            unix = Some(rest.to_string());
                        }
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "keyturn serve did not become ready; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Server {
            child: Some(child),
            base: base.unwrap(),
            unix,
            admin,
            stream,
            log,
        }
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

/// A running `keyturn serve`.
pub struct Server {
    child: Option<Child>,
    /// `nbd://127.0.0.1:PORT`
    pub base: String,
    /// `nbd+unix:///EXPORT?socket=PATH` when a Unix socket was asked for.
    pub unix: Option<String>,
    /// `host:port` of the admin API, from the `admin:` line (printed before `ready:`).
    pub admin: Option<String>,
    /// `keyturn://host:port` of the stream listener, from the `stream:` line.
    pub stream: Option<String>,
    /// Server log (stderr).
    pub log: PathBuf,
}

impl Server {
    /// The URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("{}/{export}", self.base)
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("nbd://").to_string()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr().rsplit(':').next().unwrap().parse().unwrap()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: kill(1) by pid through the command line.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            for _ in 0..300 {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        false
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills `child` (SIGKILL, as a crash would) as soon as `file` holds text
/// for which `ready` is true; fails the test if that takes over 30 s. For
/// stopping a batched key rotation between two of its atomic saves.
pub fn kill_when_file(child: &mut Child, file: &Path, ready: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready(&std::fs::read_to_string(file).unwrap_or_default()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never reached the awaited state",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Every file under `dir`, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ------------------------------------------------------------------------
// Helpers for tests/interop.rs, bad_input.rs, cli.rs, at_rest.rs.

impl Server {
    /// The server's process id while it runs (for /proc checks).
    pub fn pid_now(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Runs `qemu-io -f raw -c CMD... URI` (time-limited); returns its output.
/// qemu-io exits non-zero when any command fails, including a `read -P`
/// whose pattern does not match.
pub fn qio_run(uri: &str, cmds: &[&str]) -> Output {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// Like [`qio_run`], asserting that every command succeeded (and that no
/// pattern check failed); returns stdout.
pub fn qio_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qio_run(uri, cmds);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !stdout.contains("verification failed")
            && !stdout.contains("failed:"),
        "qemu-io {cmds:?} on {uri} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Removes ANSI colour escapes (the server's log may be coloured).
pub fn strip_ansi_codes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Offsets of every occurrence of `needle` in `hay`.
pub fn find_bytes(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return Vec::new();
    }
    let first = needle[0];
    let mut hits = Vec::new();
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => break,
            Some(p) => {
                let at = i + p;
                if &hay[at..at + needle.len()] == needle {
                    hits.push(at);
                }
                i = at + 1;
            }
        }
    }
    hits
}

/// fio over NBD: `jobs` connections, each writing its own region with
/// crc32c verification, `loops` times. Returns (success, output).
pub fn fio(
    uri: &str,
    jobs: u32,
    region: u64,
    loops: u32,
    out: &Path,
    extra: &[&str],
) -> (bool, String) {
    let args = [
        "--name=rot".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        format!("--numjobs={jobs}"),
        format!("--size={region}"),
        format!("--offset_increment={region}"),
        format!("--loops={loops}"),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--verify_state_save=0".into(),
        "--randrepeat=1".into(),
        "--group_reporting=0".into(),
        "--output-format=json".into(),
        format!("--output={}", out.display()),
    ];
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    let o = run("fio", &all);
    let text =
        std::fs::read_to_string(out).unwrap_or_default() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

/// A verify-only pass of [`fio`] over the regions an earlier run of `jobs`
/// jobs wrote, on new connections: panics, saying `what`, on any error.
pub fn fio_verify(uri: &str, jobs: u32, region: u64, out: &Path, what: &str) {
    let (ok, text) = fio(uri, jobs, region, 1, out, &["--verify_only"]);
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "{what}:\n{text}"
    );
}

/// The jobs of fio's JSON output (the first JSON document in `text`).
pub fn fio_jobs(text: &str) -> Vec<serde_json::Value> {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no fio JSON:\n{text}"));
    let mut de =
        serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
    let doc = de.next().unwrap().unwrap();
    doc["jobs"].as_array().unwrap().clone()
}

/// The `error` of each fio job in its JSON output.
pub fn fio_errors(text: &str) -> Vec<i64> {
    fio_jobs(text)
        .iter()
        .map(|j| j["error"].as_i64().unwrap())
        .collect()
}

/// Opens `export` on the NBD server at `addr` with NBD_OPT_EXPORT_NAME and
/// keeps the connection: while the stream lives, a client has the export
/// open. Returns the stream and the export's size.
pub fn hold_export(addr: &str, export: &str) -> (std::net::TcpStream, u64) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Client flags: fixed newstyle, no zeroes; then NBD_OPT_EXPORT_NAME.
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&1u32.to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    s.write_all(&msg).expect("send");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("export {export:?} was not opened: {e}"));
    (s, u64::from_be_bytes(reply[..8].try_into().unwrap()))
}

/// Sets `key = value` in `[table]` of the pool's pool.toml.
pub fn set_toml(pool: &TestPool, table: &str, settings: &[(&str, &str)]) {
    let path = pool.path().join("pool.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let t = doc
        .entry(table)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap();
    for (k, v) in settings {
        let value = format!("x = {v}").parse::<toml::Table>().unwrap()["x"].clone();
        t.insert((*k).into(), value);
    }
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
}

/// Polls `f` every 100 ms until it holds; panics, naming `what`, after
/// `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `keyturn ARGS` (which must succeed) with its output parsed as JSON.
pub fn keyturn_json(pool: &TestPool, args: &[&str]) -> serde_json::Value {
    let out = pool.keyturn_ok(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The pool's audit log, one JSON value per record.
pub fn audit_records(pool: &TestPool) -> Vec<serde_json::Value> {
    std::fs::read_to_string(pool.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An HTTP client for the admin API: no proxy, a generous timeout, and
/// error statuses returned rather than raised (tests assert on them).
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// The admin token `keyturn init` wrote into the pool.
pub fn admin_token(pool: &TestPool) -> String {
    std::fs::read_to_string(pool.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `GET /metrics` of the running server (with the pool's admin token), as
/// Prometheus text; panics unless the answer is 200.
pub fn scrape_metrics(pool: &TestPool, server: &Server) -> String {
    let addr = server.admin.clone().expect("an `admin:` line");
    let mut r = http_agent()
        .get(format!("http://{addr}/metrics"))
        .header("Authorization", format!("Bearer {}", admin_token(pool)))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET /metrics");
    r.body_mut().read_to_string().unwrap()
}

/// `keyturn token create` printing JSON; returns the token.
pub fn create_token(pool: &TestPool, name: &str, role: &str) -> String {
    let out = pool.keyturn_bare(&["token", "create", "--name", name, "--role", role, "--json"]);
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["role"].as_str()),
        (Some(name), Some(role))
    );
    v["token"].as_str().unwrap().to_string()
}

/// Unix seconds of the real clock.
pub fn real_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
