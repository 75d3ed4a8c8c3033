//! Zone change streams and the replication agent, end to end: a real
//! source server with its stream listener, `keyturn replicate` into a
//! replica pool, fio and qemu-io as clients, `verify-replica` and fio's
//! verify-only pass on the replica as the judges.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::*;
use common::*;

fn rotation_phase(pool: &TestPool) -> String {
    let st: serde_json::Value =
        serde_json::from_str(&pool.keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]))
            .unwrap();
    st["phase"].as_str().unwrap().to_string()
}

#[test]
fn a_replica_follows_fio_and_a_dek_rotation_and_verifies() {
    require_tool("fio");
    let pair = Pair::new();
    let server = pair.serve();
    let mut agent = pair.spawn_agent(&server);
    let out = pair.src.dir.path();
    // fio on both volumes, and a DEK rotation of the source in the middle.
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
    std::thread::sleep(Duration::from_millis(500));
    pair.src.keyturn_ok(&["rotate", "prepare", "--zone", "z1"]);
    std::thread::sleep(Duration::from_millis(500));
    pair.src.keyturn_ok(&["rotate", "flip", "--zone", "z1"]);
    for f in fios {
        let (ok, text) = f.join().unwrap();
        assert!(
            ok && fio_errors(&text).iter().all(|&e| e == 0),
            "fio: {text}"
        );
    }
    // Migration ends (grace or idle) with the agent still following.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !["grace", "idle"].contains(&rotation_phase(&pair.src).as_str()) {
        assert!(Instant::now() < deadline, "migration did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let seq = pair.wait_caught_up(&server);
    term(&mut agent);
    let st = pair.replica_status();
    assert_eq!(
        st["full_syncs"], 1,
        "one full sync, and no resync for the rotation: {st}"
    );
    assert_eq!(st["applied_seq"].as_u64(), Some(seq));
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
    // And a changed block is found at its LBA.
    drop(replica);
    let replica = pair.dst.serve();
    qio_ok(&replica.uri("b"), &["write -P 0x5c 40960 4096"]);
    drop(replica);
    let (code, text) = pair.verify(&server);
    assert_eq!(code, 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["volume"].as_str(), v["lba"].as_u64()),
        (Some("b"), Some(10)),
        "{text}"
    );
}

#[test]
fn the_agent_killed_at_random_points_resumes_without_gap_or_double_apply() {
    require_tool("fio");
    let pair = Pair::new();
    let server = pair.serve();
    let out = pair.src.dir.path().join("fio.json");
    let uri = server.uri("a");
    let load = std::thread::spawn(move || {
        fio(
            &uri,
            1,
            VOL,
            1,
            &out,
            &["--io_size=48M", "--rate_iops=3000"],
        )
    });
    let mut rng = now_ns() as u64 | 1;
    let mut kills = 0;
    while kills < 5 {
        let mut agent = pair.spawn_agent(&server);
        // xorshift: a different point each time, each run.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(300 + rng % 1200));
        let _ = agent.kill();
        let _ = agent.wait();
        kills += 1;
    }
    let (ok, text) = load.join().unwrap();
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "fio: {text}"
    );
    let mut agent = pair.spawn_agent(&server);
    let flushed = pair.wait_caught_up(&server);
    // Nothing writes any more: the agent reaches the source's last record
    // and stays there (no record skipped, none applied twice: the data
    // check below); that record covers at least every flushed write.
    let last = loop {
        let last = pair.source_last_seq();
        wait_until("the agent at the source's last record", 120, || {
            pair.replica_status()["applied_seq"].as_u64() >= Some(last)
        });
        if pair.source_last_seq() == last {
            break last;
        }
    };
    if last != flushed {
        eprintln!("records after the flush's: {flushed} then {last}");
    }
    term(&mut agent);
    let st = pair.replica_status();
    assert_eq!(
        st["applied_seq"].as_u64(),
        Some(last),
        "replica {st}; source's last record {last}, {flushed} after the flush"
    );
    assert!(last >= flushed, "{last} < {flushed}");
    pair.assert_equal(&server);
    let replica = pair.dst.serve();
    let (ok, text) = fio_json(
        &replica.uri("a"),
        &pair.src.dir.path().join("v.json"),
        &["--io_size=48M", "--verify_only"],
    );
    assert!(
        ok && fio_errors(&text).iter().all(|&e| e == 0),
        "replica after 5 kills: {text}"
    );
}

#[test]
fn a_source_killed_under_load_keeps_every_flushed_write_in_stream_and_replica() {
    let pair = Pair::new();
    let mut server = pair.serve();
    let mut agent = pair.spawn_agent(&server);
    // Writes of distinct patterns, each batch flushed; a batch counts once
    // qemu-io returned (every write in it acknowledged, then flushed).
    let uri = server.uri("a");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done_w = done.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for batch in 0u64.. {
            let cmds: Vec<String> = (0..8)
                .map(|i| {
                    let n = batch * 8 + i;
                    format!("write -P {} {} 4096", 1 + n % 250, (n % 16000) * 4096)
                })
                .chain(["flush".to_string()])
                .collect();
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            if !qio_run(&uri, &refs).status.success() {
                break;
            }
            acked.push(batch);
            done_w.store(acked.len(), std::sync::atomic::Ordering::Release);
            if batch > 400 {
                break;
            }
        }
        acked
    });
    // The kill lands mid-load: a few batches in (however slow the host),
    // then a moment more.
    wait_until("four acknowledged batches", 60, || {
        done.load(std::sync::atomic::Ordering::Acquire) >= 4
    });
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 3,
        "some batches were acknowledged before the kill"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let server = pair.serve();
    // Every acknowledged-and-flushed batch is in the stream ...
    assert!(
        pair.source_last_seq() >= acked.len() as u64 * 8,
        "stream lost flushed writes"
    );
    // ... and on the replica, equal to the source.
    pair.replicate_ok(&server, &["--until-caught-up"]);
    pair.assert_equal(&server);
    // The last write of each block wins: read the expected patterns back.
    let mut last: std::collections::BTreeMap<u64, u64> = Default::default();
    for b in &acked {
        for i in 0..8 {
            let n = b * 8 + i;
            last.insert(n % 16000, 1 + n % 250);
        }
    }
    let replica = pair.dst.serve();
    let cmds: Vec<String> = last
        .iter()
        .map(|(blk, p)| format!("read -P {p} {} 4096", blk * 4096))
        .collect();
    // Blocks written again by an unacknowledged batch may hold that batch's data.
    let unacked_next: Vec<u64> = (0..8)
        .map(|i| (acked.len() as u64 * 8 + i) % 16000)
        .collect();
    let refs: Vec<&str> = cmds
        .iter()
        .zip(last.keys())
        .filter(|(_, b)| !unacked_next.contains(b))
        .map(|(c, _)| c.as_str())
        .collect();
    qio_ok(&replica.uri("a"), &refs);
}

#[test]
fn grants_shredding_and_no_plaintext_in_the_stream() {
    // Two-second windows, so a test can shred one that has ended.
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400)
        .to_string();
    let pair = Pair::with(Some(&tomorrow), &[("set_secs", "60"), ("window_secs", "2")]);
    let server = pair.serve();
    // A grant for windows a day from now: today's data is not this agent's.
    let o = pair.replicate(&server, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an agent without a grant must fail");
    assert!(
        err.contains("outside this agent's grant"),
        "clear error: {err}"
    );
    assert!(
        err.contains("cannot be read by this agent"),
        "clear error: {err}"
    );

    // Granted every window: it syncs.
    pair.src.keyturn_ok(&[
        "stream",
        "grant",
        "--zone",
        "z1",
        "--agent",
        "dr",
        "--public-key",
        &pair.public,
    ]);
    pair.replicate_ok(&server, &["--until-caught-up"]);

    // Records in one window, with a canary block, then that window ends.
    let canary = b"KEYTURN-STREAM-CANARY-7f3a9c-".repeat(4096 / 29 + 1);
    let canary_file = write_file(pair.src.dir.path(), "canary", &canary[..4096]);
    // The canary's write and flush must fall inside one window (a boundary
    // passing mid-write would put its record in the window after the one
    // shredded below): write it again until they do.
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let window_start = loop {
        let before = now_ms();
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -s {} 8192 4096", canary_file.display()),
                "-c",
                "flush",
                &server.uri("a"),
            ],
        );
        if before / 2000 == now_ms() / 2000 {
            break before / 2000 * 2;
        }
    };
    let keys: serde_json::Value = serde_json::from_str(
        &pair
            .src
            .keyturn_ok(&["stream", "keys", "--zone", "z1", "--json"]),
    )
    .unwrap();
    let window = keys
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["windows"].as_array().unwrap().clone())
        .find(|w| w["start_unix"].as_u64().unwrap() == window_start)
        .unwrap_or_else(|| panic!("no window starts at {window_start}: {keys}"));
    let id = window["key_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(3));
    pair.src
        .keyturn_ok(&["stream", "shred", "--zone", "z1", "--window", &id]);
    let keys = pair.src.keyturn_ok(&["stream", "keys", "--zone", "z1"]);
    assert!(
        keys.lines()
            .any(|l| l.contains(&id) && l.contains("shredded")),
        "{keys}"
    );
    // A window yet to come cannot be shredded (one a minute ahead: the
    // window open now may end before the command runs).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let zone_part = id.split_once("-stream-s").unwrap().0;
    let open = format!("{zone_part}-stream-s{}-w0", now / 60 + 1);
    let o = pair
        .src
        .keyturn(&["stream", "shred", "--zone", "z1", "--window", &open]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("still open"),
        "{o:?}"
    );

    // The shredded window's records can no longer be read by the agent.
    let o = pair.replicate(&server, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("shredded"),
        "a shredded window is unreadable: {err}"
    );
    let audit = std::fs::read_to_string(pair.src.path().join("audit.log")).unwrap();
    for action in ["stream.grant", "stream.shred", "stream.key-handout"] {
        assert!(audit.contains(action), "{action} is audited");
    }
    assert!(
        audit.contains("\"actor\":\"dr\""),
        "the agent is named in the audit log"
    );
    // No plaintext in the stream's files.
    let mut scanned = 0;
    for f in all_files(&pair.src.path().join("streams")) {
        let bytes = std::fs::read(&f).unwrap();
        scanned += bytes.len();
        assert!(
            find_bytes(&bytes, &canary[..64]).is_empty(),
            "canary found in {}",
            f.display()
        );
    }
    assert!(
        scanned > 4096,
        "the stream files were scanned ({scanned} bytes)"
    );
}

#[test]
fn a_consumer_behind_retention_is_told_and_resyncs() {
    let pair = Pair::new();
    // Keep at most 1 MiB of stream, in 1 MiB segments.
    let toml = pair.src.path().join("pool.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let text = text
        .replace("retention_mib = 4096", "retention_mib = 1")
        .replace("segment_mib = 64", "segment_mib = 1");
    assert!(
        text.contains("retention_mib = 1"),
        "pool.toml has a [stream] section: {text}"
    );
    std::fs::write(&toml, text).unwrap();
    let server = pair.serve();
    qio_ok(&server.uri("a"), &["write -P 1 0 1M", "flush"]);
    pair.replicate_ok(&server, &["--until-caught-up"]);
    // 8 MiB more, while the agent is away: retention drops what it needs.
    // Distinct data (equal blocks would go as references and take no room).
    for i in 0..8u64 {
        let f = write_file(
            pair.src.dir.path(),
            &format!("r{i}"),
            &pattern_bytes(i, 1 << 20),
        );
        let cmd = format!("write -s {} {} 1M", f.display(), i << 20);
        qio_ok(&server.uri("b"), &[cmd.as_str(), "flush"]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st: serde_json::Value = serde_json::from_str(
            &pair
                .src
                .keyturn_ok(&["stream", "status", "--zone", "z1", "--json"]),
        )
        .unwrap();
        if st["first_seq"].as_u64().unwrap() > 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retention did not drop old records: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = pair.replicate(&server, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("behind the source's retention"),
        "the agent says why it resyncs: {err}"
    );
    let st = pair.replica_status();
    assert_eq!(st["full_syncs"], 1, "this run did one full sync: {st}");
    pair.assert_equal(&server);
}

/// What the man in the middle does to the source's frames.
#[derive(Clone, Copy)]
enum Tamper {
    /// Flip a byte in the payload of the n-th record.
    FlipPayload(usize),
    /// Drop the n-th record.
    Drop(usize),
    /// Ask for another zone's stream instead.
    OtherZone,
}

/// A proxy between agent and source that tampers with records; returns
/// its `keyturn://` address.
fn tampering_proxy(source: &str, how: Tamper) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let source = source.trim_start_matches("keyturn://").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(agent) = conn else { return };
            let Ok(up) = TcpStream::connect(&source) else {
                return;
            };
            let (mut a_rd, mut a_wr) = (agent.try_clone().unwrap(), agent);
            let (mut u_rd, mut u_wr) = (up.try_clone().unwrap(), up);
            std::thread::spawn(move || {
                while let Some((k, mut body)) = frame(&mut a_rd) {
                    if k == 1 && matches!(how, Tamper::OtherZone) {
                        body = String::from_utf8(body)
                            .unwrap()
                            .replace("\"z1\"", "\"z2\"")
                            .into_bytes();
                    }
                    if send(&mut u_wr, k, &body).is_err() {
                        return;
                    }
                }
            });
            std::thread::spawn(move || {
                let mut records = 0;
                while let Some((k, mut body)) = frame(&mut u_rd) {
                    if k == 65 {
                        records += 1;
                        match how {
                            Tamper::FlipPayload(n) if records == n => {
                                let last = body.len() - 20;
                                body[last] ^= 0x40;
                            }
                            Tamper::Drop(n) if records == n => continue,
                            _ => {}
                        }
                    }
                    if send(&mut a_wr, k, &body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("keyturn://{addr}")
}

fn frame(r: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h).ok()?;
    let n = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
    let mut b = vec![0u8; n - 1];
    r.read_exact(&mut b).ok()?;
    Some((h[4], b))
}

fn send(w: &mut TcpStream, k: u8, b: &[u8]) -> std::io::Result<()> {
    let mut h = ((b.len() + 1) as u32).to_le_bytes().to_vec();
    h.push(k);
    w.write_all(&h)?;
    w.write_all(b)
}

#[test]
fn tampered_missing_and_foreign_records_are_refused_and_never_applied() {
    let pair = Pair::new();
    pair.src.keyturn_ok(&["zone", "create", "z2"]);
    pair.src
        .keyturn_ok(&["volume", "create", "--zone", "z2", "--size", "64M", "c"]);
    pair.src.keyturn_ok(&["stream", "enable", "--zone", "z2"]);
    pair.src.keyturn_ok(&[
        "stream",
        "grant",
        "--zone",
        "z2",
        "--agent",
        "dr",
        "--public-key",
        &pair.public,
    ]);
    let server = pair.serve();
    let real = server.stream.clone().unwrap();
    pair.replicate_ok(&server, &["--until-caught-up"]);

    for i in 0..6 {
        qio_ok(
            &server.uri("a"),
            &[&format!("write -P {} {} 64k", 9 + i, i * 65536), "flush"],
        );
    }
    let cases = [
        (Tamper::FlipPayload(2), "failed authentication"),
        (Tamper::Drop(2), "out of sequence"),
        (Tamper::OtherZone, "another zone"),
    ];
    for (how, says) in cases {
        let before = pair.replica_status()["applied_seq"].as_u64().unwrap();
        let proxy = tampering_proxy(&real, how);
        let mut args = pair.agent_args(&server, &["--until-caught-up"]);
        let at = args.iter().position(|a| a == &real).unwrap();
        args[at] = proxy;
        let o = Command::new(keyturn_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a bad record must stop the agent");
        assert!(err.contains(says), "error says {says:?}: {err}");
        let applied = pair.replica_status()["applied_seq"].as_u64().unwrap();
        match how {
            // The first record was good and applied; the second never was.
            Tamper::FlipPayload(_) | Tamper::Drop(_) => {
                assert_eq!(applied, before + 1, "only the good record was applied")
            }
            Tamper::OtherZone => assert_eq!(applied, before, "nothing of another zone was applied"),
        }
    }
    // Through the real source, everything applies and matches.
    pair.replicate_ok(&server, &["--until-caught-up"]);
    let (code, out) = pair.verify(&server);
    assert_eq!(code, 0, "{out}");

    // Provenance of a block the last write changed: its key and record.
    let last = pair.source_last_seq();
    let b: serde_json::Value = serde_json::from_str(&pair.src.keyturn_ok(&[
        "block",
        "show",
        "--volume",
        "a",
        "--lba",
        &(5 * 16).to_string(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(b["mapped"], true, "{b}");
    assert_eq!(b["dek_key_id"], "z1-dek-v1", "{b}");
    assert_eq!(b["dek_state"], "active", "{b}");
    assert_eq!(b["stream_op"], "write", "{b}");
    let rec = b["stream_record"].as_u64().unwrap();
    assert!(
        rec > last - 6 && rec <= last,
        "record {rec} is one of the six writes before {last}: {b}"
    );
    assert!(
        b["stream_window_key"]
            .as_str()
            .unwrap()
            .starts_with("z1-stream-s"),
        "{b}"
    );
    let unmapped: serde_json::Value = serde_json::from_str(
        &pair
            .src
            .keyturn_ok(&["block", "show", "--volume", "a", "--lba", "10000", "--json"]),
    )
    .unwrap();
    assert_eq!(unmapped["mapped"], false, "{unmapped}");
    assert!(unmapped["stream_record"].is_null(), "{unmapped}");

    // The stream's metrics: the zone's last record and the agent's lag.
    let text = pair.src_metrics(&server);
    let sample =
        |name: &str| metric(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert_eq!(sample("keyturn_stream_last_seq{zone=\"z1\"}"), last as f64);
    assert_eq!(
        sample("keyturn_stream_consumer_lag_records{zone=\"z1\",consumer=\"dr\"}"),
        0.0
    );
}

#[test]
fn ended_key_sets_are_archived_then_destroyed_and_audited() {
    // Two-second sets, kept one second after they end.
    let pair = Pair::with(
        None,
        &[
            ("set_secs", "2"),
            ("window_secs", "2"),
            ("key_retention_secs", "1"),
        ],
    );
    let server = pair.serve();
    // The replica syncs first, so that it needs the records written next.
    pair.replicate_ok(&server, &["--until-caught-up"]);
    qio_ok(&server.uri("a"), &["write -P 0x61 0 8192", "flush"]);
    let first_set = {
        let keys: serde_json::Value = serde_json::from_str(
            &pair
                .src
                .keyturn_ok(&["stream", "keys", "--zone", "z1", "--json"]),
        )
        .unwrap();
        keys.as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["set"].as_u64())
            .max()
            .expect("a set exists")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys: serde_json::Value = serde_json::from_str(
            &pair
                .src
                .keyturn_ok(&["stream", "keys", "--zone", "z1", "--json"]),
        )
        .unwrap();
        let state = keys
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["set"].as_u64() == Some(first_set))
            .map(|s| s["state"].as_str().unwrap_or("").to_string());
        let audit = std::fs::read_to_string(pair.src.path().join("audit.log")).unwrap();
        let audited = audit.lines().any(|l| {
            l.contains("stream.keyset-destroy") && l.contains(&format!("-stream-s{first_set}\""))
        });
        if state.as_deref() == Some("destroyed") && audited {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "set {first_set} not destroyed and audited: state {state:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Its records can no longer be opened by anyone.
    let o = pair.replicate(&server, &["--until-caught-up"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("destroyed"),
        "records of a destroyed set are unreadable: {err}"
    );
}
