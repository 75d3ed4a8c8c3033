//! Hostile and careless clients against the real `keyturn serve`, each with
//! fio writing and verifying (crc32c) on its own connections beside it:
//! a thousand connections opened and dropped, clients that never read their
//! replies, slow-loris NBD handshakes, clients vanishing in the middle of a
//! 32 MiB write, and admin API clients sending huge headers, trickling
//! their headers or bodies, or opening connections by the hundred. Every
//! case asserts on data: fio's verify, and the bytes a new client reads.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
/// fio's regions start here: the abuses use the first 48 MiB.
const FIO_AT: u64 = 48 * MIB;
const FIO_JOBS: u32 = 2;
const FIO_REGION: u64 = 4 * MIB;

// ------------------------------------------------------------ raw NBD

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const OPT_GO: u32 = 7;
const CMD_WRITE: u16 = 1;
const CMD_READ: u16 = 0;

/// Connects and reads the 18-byte greeting.
fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    s
}

/// An option request.
fn option(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Connects and opens `vol0` with NBD_OPT_GO: ready for requests.
fn open(addr: &str) -> TcpStream {
    let mut s = greet(addr);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut p = 4u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"vol0");
    p.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&option(OPT_GO, &p)).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("GO reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        match kind {
            1 => return s, // NBD_REP_ACK
            3 => continue, // NBD_REP_INFO
            k => panic!("NBD_OPT_GO refused: {k:#x}"),
        }
    }
}

fn header(kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&length.to_be_bytes());
    m
}

/// Whether the peer closed `s` within `within` (EOF or reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ------------------------------------------------------------ harness

/// A served 64 MiB volume, and fio verifying beside the abuse.
struct Bench {
    pool: TestPool,
    server: Server,
    tmp: tempfile::TempDir,
}

/// fio runs made beside an abuse.
struct Beside {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(bool, String)>>,
}

impl Bench {
    fn new(toml: &[(&str, &str)]) -> Bench {
        require_tool("fio");
        require_tool("qemu-io");
        let pool = TestPool::with_volume("64M");
        if !toml.is_empty() {
            set_toml(&pool, "server", toml);
        }
        let server = pool.serve();
        Bench {
            pool,
            server,
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn addr(&self) -> String {
        self.server.addr()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Starts fio writing and verifying its regions, run after run, until
    /// [`Beside::finish`].
    fn fio_beside(&self) -> Beside {
        let uri = self.server.uri("vol0");
        let out = self.out("fio-beside.json");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut runs = Vec::new();
            let offset = format!("--offset={FIO_AT}");
            loop {
                runs.push(fio(&uri, FIO_JOBS, FIO_REGION, 1, &out, &[&offset]));
                if flag.load(Ordering::Acquire) {
                    return runs;
                }
            }
        });
        Beside { stop, handle }
    }

    fn rss_kib(&self) -> u64 {
        proc_field(self.pid(), "VmRSS:")
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn pid(&self) -> u32 {
        self.server.pid_now().expect("server pid")
    }

    /// The server still runs, and a verify-only fio pass on new
    /// connections finds what the last run beside wrote.
    fn assert_healthy(&mut self) {
        assert!(
            self.server.is_running(),
            "server died; log:\n{}",
            self.server.log_text()
        );
        let uri = self.server.uri("vol0");
        let (ok, text) = fio(
            &uri,
            FIO_JOBS,
            FIO_REGION,
            1,
            &self.out("fio-after.json"),
            &["--verify_only", &format!("--offset={FIO_AT}")],
        );
        assert!(
            ok && fio_errors(&text).iter().all(|&e| e == 0),
            "verify after the abuse:\n{text}"
        );
    }

    /// Waits (a few seconds at most) for the server's descriptors to come
    /// back to at most `limit`.
    fn wait_fds(&self, limit: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.fds();
            if n <= limit || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Beside {
    /// Stops after the run in progress; asserts every run passed its
    /// verify with no error; returns the runs' write bandwidth (KiB/s).
    fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Release);
        let runs = self.handle.join().expect("fio thread");
        assert!(!runs.is_empty());
        runs.iter()
            .map(|(ok, text)| {
                assert!(
                    *ok && fio_errors(text).iter().all(|&e| e == 0),
                    "fio beside the abuse failed:\n{text}"
                );
                write_bw_kib(text)
            })
            .collect()
    }
}

/// Sum of the jobs' write bandwidth (KiB/s) in fio's JSON output.
fn write_bw_kib(text: &str) -> f64 {
    fio_jobs(text)
        .iter()
        .map(|j| j["write"]["bw"].as_f64().unwrap_or(0.0))
        .sum()
}

fn proc_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a /proc status field")
}

fn report(what: &str, bw: &[f64]) {
    let mean = bw.iter().sum::<f64>() / bw.len() as f64 / 1024.0;
    eprintln!(
        "{what}: {} fio verify runs beside, mean write {mean:.1} MiB/s",
        bw.len()
    );
}

// ------------------------------------------------------------ NBD abuses

/// A thousand connections opened and dropped in a loop, in five ways:
/// before the greeting is read, after it, mid client flags, after GO
/// without NBD_CMD_DISC, and after GO with a write in flight. The server
/// ends up with the descriptors it started with, and fio beside never sees
/// an error.
#[test]
fn a_thousand_connections_opened_and_dropped() {
    let mut b = Bench::new(&[]);
    let addr = b.addr();
    let fds_before = b.fds();
    let beside = b.fio_beside();
    let block = pattern_bytes(5, 4096);
    for i in 0..1000u64 {
        match i % 5 {
            0 => drop(TcpStream::connect(&addr).expect("connect")),
            1 => drop(greet(&addr)),
            2 => {
                let mut s = greet(&addr);
                s.write_all(&[0, 0]).unwrap();
            }
            3 => drop(open(&addr)),
            _ => {
                let mut s = open(&addr);
                let mut m = header(CMD_WRITE, i, (i % 64) * 4096, 4096);
                m.extend_from_slice(&block);
                s.write_all(&m).unwrap();
            }
        }
    }
    let bw = beside.finish();
    report("1000 connections opened and dropped", &bw);
    let fds = b.wait_fds(fds_before + 4);
    assert!(
        fds <= fds_before + 4,
        "the server holds {fds} descriptors after the churn, {fds_before} before"
    );
    b.assert_healthy();
    // The writes of the clients that vanished right after sending them
    // were whole blocks: each block reads back either zeros or the block.
    let (mut s, _) = hold_export(&addr, "vol0");
    for k in 0..64u64 {
        s.write_all(&header(CMD_READ, k, k * 4096, 4096)).unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 0], "read error");
        let mut d = vec![0u8; 4096];
        s.read_exact(&mut d).unwrap();
        assert!(
            d == block || d.iter().all(|&x| x == 0),
            "block {k} is neither the write nor zeros"
        );
    }
}

/// Clients that pipeline large READs and never read a reply: the server's
/// memory stays under its bound, max_total_in_flight_bytes (256 MiB) plus
/// one request per connection beyond it, and fio beside is served.
#[test]
fn clients_never_reading_replies_stay_within_the_memory_bound() {
    const CLIENTS: u64 = 8;
    const READ: u32 = 8 << 20;
    let mut b = Bench::new(&[]);
    let addr = b.addr();
    let beside = b.fio_beside();
    // fio's own buffers are in the figure before, not in the growth.
    std::thread::sleep(Duration::from_millis(500));
    let before = b.rss_kib();
    let mut stalled = Vec::new();
    for c in 0..CLIENTS {
        let mut s = open(&addr);
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 0..32u64 {
            if s.write_all(&header(CMD_READ, c * 100 + i, 0, READ))
                .is_err()
            {
                break;
            }
        }
        stalled.push(s);
    }
    let mut peak = before;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(b.rss_kib());
    }
    let bw = beside.finish();
    report("8 clients never reading replies", &bw);
    drop(stalled);
    let bound = 256 * 1024 + CLIENTS * u64::from(READ) / 1024 + 64 * 1024;
    eprintln!(
        "RSS {before} KiB before, {peak} KiB peak with {CLIENTS} clients pinning {} MiB of READs each; bound +{bound} KiB",
        32 * READ / (1 << 20)
    );
    assert!(
        peak <= before + bound,
        "server RSS went from {before} KiB to {peak} KiB (bound +{bound} KiB)"
    );
    b.assert_healthy();
}

/// Slow-loris handshakes: clients that send their flags and then one byte
/// of an option every 300 ms are dropped once `handshake_timeout_secs`
/// has passed, however long they keep dripping, and free their
/// descriptors; fio beside never notices.
#[test]
fn slow_loris_handshakes_are_timed_out() {
    const LORIS: usize = 40;
    let mut b = Bench::new(&[("handshake_timeout_secs", "3")]);
    let addr = b.addr();
    let fds_before = b.fds();
    let beside = b.fio_beside();
    let started = Instant::now();
    let drip = option(OPT_GO, &[0u8; 64]);
    let mut loris: Vec<(TcpStream, Option<Duration>)> = (0..LORIS)
        .map(|_| {
            let mut s = greet(&addr);
            s.write_all(&3u32.to_be_bytes()).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, None)
        })
        .collect();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(8) && loris.iter().any(|l| l.1.is_none()) {
        std::thread::sleep(Duration::from_millis(300));
        for (s, closed) in loris.iter_mut().filter(|l| l.1.is_none()) {
            let mut buf = [0u8; 64];
            let gone = match s.read(&mut buf) {
                Ok(0) => true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    s.write(&drip[sent % drip.len()..][..1]).is_err()
                }
                _ => true,
            };
            if gone {
                *closed = Some(started.elapsed());
            }
        }
        sent += 1;
    }
    let bw = beside.finish();
    report("40 slow-loris handshakes", &bw);
    for (i, (_, closed)) in loris.iter().enumerate() {
        let at = closed.unwrap_or_else(|| panic!("slow-loris client {i} still open after 8 s"));
        assert!(
            at >= Duration::from_secs(2),
            "client {i} dropped after {at:?}, before the timeout"
        );
    }
    drop(loris);
    let log = strip_ansi_codes(&b.server.log_text());
    let timed_out = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("handshake not finished"))
        .count();
    assert!(
        timed_out >= LORIS,
        "expected {LORIS} handshake warnings, found {timed_out}:\n{log}"
    );
    let fds = b.wait_fds(fds_before + 4);
    assert!(
        fds <= fds_before + 4,
        "{fds} descriptors, {fds_before} before"
    );
    b.assert_healthy();
}

/// Clients vanish in the middle of a 32 MiB write (after 1 byte, half of it
/// and all but one byte of its payload): nothing of it is applied, the
/// 32 MiB written before reads back exactly, and fio beside is unharmed.
#[test]
fn disconnects_in_the_middle_of_a_32_mib_write_apply_nothing() {
    let mut b = Bench::new(&[]);
    let addr = b.addr();
    let uri = b.server.uri("vol0");
    qio_ok(&uri, &["write -P 0xa5 0 32M"]);
    let beside = b.fio_beside();
    let len = 32 * MIB as usize;
    let junk = vec![0x5au8; len];
    for (i, cut) in [1usize, len / 2, len - 1].into_iter().enumerate() {
        let mut s = open(&addr);
        let mut m = header(CMD_WRITE, i as u64, 0, len as u32);
        m.extend_from_slice(&junk[..cut]);
        s.write_all(&m).unwrap();
        // Let the server read what was sent before the client vanishes.
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
    }
    let bw = beside.finish();
    report("disconnects mid 32 MiB write", &bw);
    qio_ok(&uri, &["read -P 0xa5 0 32M"]);
    b.assert_healthy();
    let log = strip_ansi_codes(&b.server.log_text());
    assert!(
        log.matches("write payload").count() >= 3,
        "each vanished writer is logged:\n{log}"
    );
}

// ------------------------------------------------------------ admin API

/// The admin API's address and token.
fn admin(b: &Bench) -> (String, String) {
    let addr = b.server.admin.clone().expect("admin address");
    let token = std::fs::read_to_string(b.pool.path().join("admin.token")).unwrap();
    (addr, token.trim().to_string())
}

/// Sends `head` (and `body`), returns the status line's code, or None
/// when the server closed without an answer.
fn http(addr: &str, head: &str, body: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn health(addr: &str, token: &str) -> Option<u16> {
    http(
        addr,
        &format!(
            "GET /health HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
        &[],
    )
}

/// Huge headers get 431 without being buffered; clients trickling their
/// headers or their bodies are cut off after 10 s (408 for a body); 300
/// connections at once are refused beyond the cap, which frees as they
/// go. Meanwhile a well-behaved admin client is answered and fio beside
/// verifies; afterwards the server's memory and descriptors are back.
#[test]
fn admin_api_survives_huge_headers_slow_clients_and_floods() {
    let mut b = Bench::new(&[]);
    let (addr, token) = admin(&b);
    assert_eq!(health(&addr, &token), Some(200));
    let fds_before = b.fds();
    let rss_before = b.rss_kib();
    let beside = b.fio_beside();

    // 1. A 1 MiB header, and 200 headers of 8 KiB: 431, nothing kept.
    let huge = "x".repeat(MIB as usize);
    let head = format!("GET /health HTTP/1.1\r\nHost: k\r\nX-Huge: {huge}\r\n\r\n");
    assert_eq!(http(&addr, &head, &[]), Some(431), "1 MiB header");
    let many: String = (0..200)
        .map(|i| format!("X-H{i}: {}\r\n", "y".repeat(8192)))
        .collect();
    let head = format!("GET /health HTTP/1.1\r\nHost: k\r\n{many}\r\n");
    assert_eq!(http(&addr, &head, &[]), Some(431), "1.6 MiB of headers");

    // 2. Slow loris on the headers, and slow bodies: 50 of each.
    let started = Instant::now();
    let mut slow_heads: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: k\r\n").unwrap();
            s
        })
        .collect();
    let body_head = format!(
        "POST /api/v1/zones/z1/rotation/prepare HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    let slow_bodies: Vec<JoinHandle<Option<u16>>> = (0..50)
        .map(|_| {
            let (addr, head) = (addr.clone(), body_head.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s.write_all(head.as_bytes()).unwrap();
                let mut answer = Vec::new();
                let mut buf = [0u8; 1024];
                // One body byte every 500 ms, until the server answers.
                while started.elapsed() < Duration::from_secs(25) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(_) => {
                            if s.write_all(b" ").is_err() {
                                break;
                            }
                        }
                    }
                }
                let text = String::from_utf8_lossy(&answer).into_owned();
                text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
            })
        })
        .collect();
    // A well-behaved client is answered meanwhile.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            health(&addr, &token),
            Some(200),
            "health while slow clients hold connections"
        );
    }
    // The slow heads keep dripping; each is closed by the header timeout.
    let mut closed = vec![None; slow_heads.len()];
    while started.elapsed() < Duration::from_secs(20) && closed.iter().any(Option::is_none) {
        for (s, c) in slow_heads.iter_mut().zip(closed.iter_mut()) {
            if c.is_none() && s.write_all(b"X-Drip: 1\r\n").is_err() {
                *c = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for (i, c) in closed.iter().enumerate() {
        let at = c.unwrap_or_else(|| panic!("slow header client {i} still open after 20 s"));
        assert!(
            at >= Duration::from_secs(9),
            "slow header client {i} closed after {at:?}"
        );
    }
    drop(slow_heads);
    for h in slow_bodies {
        assert_eq!(h.join().unwrap(), Some(408), "slow body");
    }

    // 3. A flood: 300 connections held open. The server keeps at most its
    // cap (128) and closes the rest at once; once they go, it serves.
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = 0;
    for mut s in flood {
        if closed_within(&mut s, Duration::from_millis(20)) {
            refused += 1;
        }
    }
    assert!(refused >= 300 - 128, "only {refused} of 300 refused");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(health(&addr, &token), Some(200), "health after the flood");

    let bw = beside.finish();
    report("admin API abuse", &bw);
    let fds = b.wait_fds(fds_before + 4);
    assert!(
        fds <= fds_before + 4,
        "{fds} descriptors, {fds_before} before"
    );
    let rss = b.rss_kib();
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS {rss} KiB after, {rss_before} KiB before"
    );
    // The slow bodies never reached the backend: no rotation started.
    let st = b
        .pool
        .keyturn_ok(&["rotate", "status", "--zone", "z1", "--json"]);
    assert!(st.contains("\"idle\""), "{st}");
    b.assert_healthy();
}
