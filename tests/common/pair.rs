//! A source pool and a replica pool with a registered agent: what the
//! change stream tests (TCP and NATS) share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub const VOL: u64 = 64 << 20;

/// A source pool (zone z1, volumes `a` and `b`, streaming on) and a replica
/// pool, with an agent key registered for all windows.
pub struct Pair {
    pub src: TestPool,
    pub dst: TestPool,
    pub key: PathBuf,
    pub public: String,
    /// The NATS cluster the source publishes to (`nats://...`), when the
    /// agent reads from NATS instead of the stream listener.
    pub nats: Option<String>,
}

impl Pair {
    pub fn new() -> Self {
        Self::with(None, &[])
    }

    /// `from`: the grant's first window; `stream`: pool.toml `[stream]`
    /// settings to replace before streaming starts.
    pub fn with(from: Option<&str>, stream: &[(&str, &str)]) -> Self {
        let src = TestPool::new();
        let toml = src.path().join("pool.toml");
        let mut text = std::fs::read_to_string(&toml).unwrap();
        for (k, v) in stream {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{k} = ")))
                .unwrap_or_else(|| panic!("no {k} in pool.toml"))
                .to_string();
            text = text.replace(&line, &format!("{k} = {v}"));
        }
        std::fs::write(&toml, text).unwrap();
        src.keyturn_ok(&["zone", "create", "z1"]);
        for v in ["a", "b"] {
            src.keyturn_ok(&["volume", "create", "--zone", "z1", "--size", "64M", v]);
        }
        src.keyturn_ok(&["stream", "enable", "--zone", "z1"]);
        let dst = TestPool::new();
        let key = src.dir.path().join("agent.key");
        let out = run_ok(
            keyturn_bin().to_str().unwrap(),
            &["agent-key", "--out", key.to_str().unwrap()],
        );
        let public = out.trim().to_string();
        assert_eq!(public.len(), 64, "agent-key prints the public key: {out}");
        let mut grant = vec![
            "stream",
            "grant",
            "--zone",
            "z1",
            "--agent",
            "dr",
            "--public-key",
            &public,
        ];
        if let Some(f) = from {
            grant.extend(["--from", f]);
        }
        src.keyturn_ok(&grant);
        Self {
            src,
            dst,
            key,
            public,
            nats: None,
        }
    }

    pub fn serve(&self) -> Server {
        match &self.nats {
            Some(url) => self.src.serve_with(&["--nats", url]),
            None => self.src.serve_with(&["--stream-listen", "127.0.0.1:0"]),
        }
    }

    /// Where the agent reads the stream: the NATS cluster, or the server's listener.
    pub fn source(&self, server: &Server) -> String {
        match &self.nats {
            Some(url) => url.clone(),
            None => server.stream.clone().expect("stream listener"),
        }
    }

    pub fn agent_args(&self, server: &Server, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "replicate",
            "--source",
            &self.source(server),
            "--zone",
            "z1",
            "--to",
            self.dst.path().to_str().unwrap(),
            "--to-zone",
            "r1",
            "--agent",
            "dr",
            "--agent-key",
            self.key.to_str().unwrap(),
            "--passphrase-file",
            self.dst.pass_file.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs the agent to completion (`--until-caught-up` or `--until-seq`).
    pub fn replicate(&self, server: &Server, extra: &[&str]) -> std::process::Output {
        Command::new(keyturn_bin())
            .args(self.agent_args(server, extra))
            .env("KEYTURN_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run replicate")
    }

    pub fn replicate_ok(&self, server: &Server, extra: &[&str]) -> String {
        let o = self.replicate(server, extra);
        assert!(
            o.status.success(),
            "replicate failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts the agent in the background, following.
    pub fn spawn_agent(&self, server: &Server) -> Child {
        let log =
            std::fs::File::create(self.dst.dir.path().join(format!("agent-{}.log", now_ns())))
                .unwrap();
        Command::new(keyturn_bin())
            .args(self.agent_args(server, &[]))
            .env("KEYTURN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn replicate")
    }

    pub fn source_last_seq(&self) -> u64 {
        let st: serde_json::Value = serde_json::from_str(
            &self
                .src
                .keyturn_ok(&["stream", "status", "--zone", "z1", "--json"]),
        )
        .unwrap();
        st["last_seq"].as_u64().unwrap()
    }

    pub fn replica_status(&self) -> serde_json::Value {
        let o = Command::new(keyturn_bin())
            .args([
                "replica",
                "status",
                "--pool",
                self.dst.path().to_str().unwrap(),
                "--zone",
                "r1",
                "--json",
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// The source server's `GET /metrics`.
    pub fn src_metrics(&self, server: &Server) -> String {
        let token = std::fs::read_to_string(self.src.path().join("admin.token")).unwrap();
        let url = format!("http://{}/metrics", server.admin.as_deref().unwrap());
        ureq::get(&url)
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    }

    /// The last 40 lines above DEBUG of every agent log, for a failure's message.
    pub fn agent_logs(&self) -> String {
        let mut logs = String::new();
        for f in all_files(self.dst.dir.path()) {
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
            {
                logs.push_str(&tail_above_debug(
                    &std::fs::read_to_string(&f).unwrap_or_default(),
                ));
                logs.push('\n');
            }
        }
        logs
    }

    /// Waits until the running agent has applied everything the source has.
    /// A FLUSH first: a record is served once its write's journal frame is
    /// durable, so without one the last writes may become visible later.
    pub fn wait_caught_up(&self, server: &Server) -> u64 {
        qio_ok(&server.uri("a"), &["flush"]);
        let target = self.source_last_seq();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = self.replica_status();
            if st["applied_seq"].as_u64().unwrap_or(0) >= target {
                return target;
            }
            if Instant::now() >= deadline || st["phase"] == "failed" {
                let logs = self.agent_logs();
                panic!(
                    "agent did not catch up to {target}: {st}\nagent log:\n{logs}\nserver log:\n{}",
                    tail_above_debug(&std::fs::read_to_string(&server.log).unwrap_or_default())
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn verify(&self, server: &Server) -> (i32, String) {
        let o = Command::new(keyturn_bin())
            .args([
                "verify-replica",
                "--source",
                &self.source(server),
                "--zone",
                "z1",
                "--replica",
                self.dst.path().to_str().unwrap(),
                "--replica-zone",
                "r1",
                "--agent",
                "dr",
                "--agent-key",
                self.key.to_str().unwrap(),
                "--passphrase-file",
                self.dst.pass_file.to_str().unwrap(),
                "--json",
            ])
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    pub fn assert_equal(&self, server: &Server) {
        let (code, out) = self.verify(server);
        assert_eq!(code, 0, "verify-replica: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["result"], "equal", "{out}");
        assert_eq!(v["bytes"].as_u64(), Some(2 * VOL), "{out}");
    }
}

pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn term(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            assert!(st.success(), "agent exited {st} on SIGTERM");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("agent did not stop on SIGTERM");
}

pub fn fio_json(uri: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    fio(uri, 1, VOL, 1, out, extra)
}

/// The last 40 log lines above DEBUG, in order.
fn tail_above_debug(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A sample's value in Prometheus text (`name{labels}` exactly).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
