//! The change stream through NATS JetStream: a real three-node nats-server
//! cluster on loopback, the source publishing to it, `keyturn replicate
//! --source nats://...` consuming from it.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::*;
use common::*;

/// A three-node JetStream cluster, killed on drop.
struct Cluster {
    nodes: Vec<Child>,
    client_ports: Vec<u16>,
    store: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP GET on loopback; the status line and body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Cluster {
    /// Three nodes on fresh ports. A port picked free may be taken by
    /// another test before nats-server binds it: the cluster then never
    /// becomes healthy, and it is started again on other ports.
    fn start() -> Self {
        require_tool("nats-server");
        let mut logs = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(c) => return c,
                Err(l) => logs = l,
            }
        }
        panic!("the NATS cluster did not become healthy:\n{logs}");
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let http_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        let mut store = Vec::new();
        for i in 0..3 {
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let sd = dir.path().join(format!("n{i}"));
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: kt, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                client_ports[i],
                http_ports[i],
                sd.display(),
                route_ports[i],
                routes.join(", ")
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            nodes.push(
                Command::new("nats-server")
                    .args(["-c", path.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start nats-server"),
            );
            store.push(sd);
        }
        let mut cluster = Self {
            nodes,
            client_ports,
            store,
            _dir: dir,
        };
        // Ready when every node says JetStream is healthy (a meta leader is elected).
        let deadline = Instant::now() + Duration::from_secs(30);
        for &p in &http_ports {
            loop {
                let ok = http_get(p, "/healthz").is_some_and(|r| {
                    r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200")
                });
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    for i in 0..3 {
                        cluster.kill(i);
                    }
                    let mut logs = String::new();
                    for i in 0..3 {
                        let l =
                            std::fs::read_to_string(cluster._dir.path().join(format!("n{i}.log")))
                                .unwrap_or_default();
                        let tail: Vec<&str> = l.lines().rev().take(15).collect();
                        logs += &format!(
                            "node n{i}:\n{}\n",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                    return Err(logs);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(cluster)
    }

    fn url(&self) -> String {
        let a: Vec<String> = self
            .client_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("nats://{}", a.join(","))
    }

    fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

fn nats_pair(cluster: &Cluster) -> Pair {
    let mut pair = Pair::new();
    // Three copies of each zone's JetStream stream: one node may go.
    let toml = pair.src.path().join("pool.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let at = text
        .find("[stream.nats]")
        .expect("pool.toml has [stream.nats]");
    let (head, tail) = text.split_at(at);
    assert!(tail.contains("replicas = 1"), "{tail}");
    std::fs::write(
        &toml,
        format!("{head}{}", tail.replacen("replicas = 1", "replicas = 3", 1)),
    )
    .unwrap();
    pair.nats = Some(cluster.url());
    pair
}

fn scan_for(dirs: &[&Path], needle: &[u8]) -> usize {
    let mut scanned = 0;
    for d in dirs {
        for f in all_files(d) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            scanned += bytes.len();
            assert!(
                find_bytes(&bytes, needle).is_empty(),
                "plaintext canary found in {}",
                f.display()
            );
        }
    }
    scanned
}

#[test]
fn a_replica_follows_through_a_three_node_jetstream_cluster() {
    require_tool("fio");
    let mut cluster = Cluster::start();
    let pair = nats_pair(&cluster);
    let server = pair.serve();
    let mut agent = pair.spawn_agent(&server);
    let out = pair.src.dir.path().to_path_buf();
    let uris = [server.uri("a"), server.uri("b")];
    let fios: Vec<_> = uris
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let u = u.clone();
            let o = out.join(format!("fio-{i}.json"));
            std::thread::spawn(move || fio_json(&u, &o, &["--io_size=24M"]))
        })
        .collect();
    // One node of three dies while records flow: publishing and the
    // agent's consumer go on through the other two.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    cluster.kill(0);
    for f in fios {
        let (ok, text) = f.join().unwrap();
        assert!(
            ok && fio_errors(&text).iter().all(|&e| e == 0),
            "fio: {text}"
        );
    }
    // A canary block, then everything reaches the replica through NATS.
    let canary = b"KEYTURN-NATS-CANARY-41d2e8-".repeat(4096 / 27 + 1);
    let canary_file = write_file(&out, "canary", &canary[..4096]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 16384 4096", canary_file.display()),
            "-c",
            "flush",
            &server.uri("b"),
        ],
    );
    let seq = pair.wait_caught_up(&server);
    // The agent reports how far it is durable: the source's lag gauge for
    // it (through NATS) comes down to zero.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = pair.src_metrics(&server);
        let lag = metric(
            &text,
            r#"keyturn_stream_consumer_lag_records{zone="z1",consumer="dr"}"#,
        );
        if lag == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "lag {lag:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    term(&mut agent);
    let st = pair.replica_status();
    assert_eq!(
        st["full_syncs"],
        1,
        "one full sync, no resync: {st}\n{}",
        pair.agent_logs()
    );
    assert_eq!(st["applied_seq"].as_u64(), Some(seq), "{st}");
    assert!(
        st["source"].as_str().unwrap_or("").starts_with("nats://"),
        "{st}"
    );
    // The source's stream says JetStream has every record (consumer `nats`).
    let status: serde_json::Value = serde_json::from_str(
        &pair
            .src
            .keyturn_ok(&["stream", "status", "--zone", "z1", "--json"]),
    )
    .unwrap();
    assert_eq!(status["consumers"]["nats"].as_u64(), Some(seq), "{status}");

    pair.assert_equal(&server);

    // The replica, served by itself, passes fio's verify-only pass.
    let replica = pair.dst.serve();
    for (i, v) in ["a", "b"].iter().enumerate() {
        let (ok, text) = fio_json(
            &replica.uri(v),
            &out.join(format!("v-{i}.json")),
            &["--io_size=24M", "--verify_only"],
        );
        assert!(
            ok && fio_errors(&text).iter().all(|&e| e == 0),
            "replica verify of {v}: {text}"
        );
    }
    drop(replica);
    // No plaintext in what the nodes store.
    let scanned = scan_for(
        &[&cluster.store[0], &cluster.store[1], &cluster.store[2]],
        &canary[..64],
    );
    assert!(
        scanned > 2 * 4096,
        "the JetStream stores were scanned ({scanned} bytes)"
    );
}

#[test]
fn a_nats_agent_without_a_grant_or_a_stream_is_refused_clearly() {
    let cluster = Cluster::start();
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400)
        .to_string();
    let mut pair = Pair::with(Some(&tomorrow), &[]);
    pair.nats = Some(cluster.url());
    // Before the source publishes, there is no JetStream stream to read.
    let server0 = pair.src.serve();
    let o = pair.replicate(&server0, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "no stream: the agent must fail");
    assert!(err.contains("does not publish zone"), "clear error: {err}");
    drop(server0);

    let server = pair.serve();
    qio_ok(&server.uri("a"), &["write -P 0x33 0 65536", "flush"]);
    // A grant that starts tomorrow opens none of today's records.
    let o = pair.replicate(&server, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an agent without a grant must fail");
    assert!(
        err.contains("outside this agent's grant"),
        "clear error: {err}"
    );
    // An agent the source does not know gets no answer but a refusal.
    let mut args = pair.agent_args(&server, &["--until-caught-up"]);
    let i = args.iter().position(|a| a == "--agent").unwrap();
    args[i + 1] = "stranger".into();
    let o = Command::new(keyturn_bin()).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not registered"),
        "clear error: {err}"
    );
}
