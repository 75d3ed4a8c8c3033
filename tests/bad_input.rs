//! Hostile and broken clients: a raw NBD client over std TcpStream sends
//! each abuse; afterwards the server must still be running and serve a
//! NEW client the exact data written before the abuse.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

// Wire constants (src/nbd/proto.rs, and the NBD protocol document).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const SIZE: u64 = 64 << 20;
const MIB: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A minimal NBD client: fixed newstyle, simple replies only.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting; no client flags sent yet.
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_ne!(
            u16::from_be_bytes([g[16], g[17]]) & 1,
            0,
            "server is not fixed newstyle"
        );
        r
    }

    /// Connects and sends the client flags: ready for options.
    fn options(addr: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    /// Connects and completes NBD_OPT_GO to `vol0`; returns the client and the size.
    fn go(addr: &str) -> (Raw, u64) {
        let mut r = Raw::options(addr);
        let size = r.opt_go("vol0");
        (r, size)
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Sends, tolerating a server that already closed.
    fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    fn option(&mut self, code: u32, payload: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC,
            "option reply magic"
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(len <= 64 << 10, "absurd option reply length {len}");
        (opt, kind, self.read_n(len))
    }

    fn opt_go(&mut self, name: &str) -> u64 {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &p);
        let mut size = None;
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == INFO_EXPORT {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    }
                }
                REP_ACK => break,
                other => panic!(
                    "NBD_OPT_GO answered with {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        size.expect("NBD_INFO_EXPORT in the GO replies")
    }

    fn header(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(28);
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        m
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// READ; Ok(data) or Err(errno). An error reply carries no payload.
    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(&Self::header(0, CMD_READ, cookie, offset, len));
        let (err, c) = self.reply();
        assert_eq!(c, cookie, "reply cookie");
        if err != 0 {
            Err(err)
        } else {
            Ok(self.read_n(len as usize))
        }
    }

    /// WRITE; Ok or Err(errno).
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> Result<(), u32> {
        let mut m = Self::header(0, CMD_WRITE, cookie, offset, data.len() as u32);
        m.extend_from_slice(data);
        self.send(&m);
        let (err, c) = self.reply();
        assert_eq!(c, cookie, "reply cookie");
        if err != 0 { Err(err) } else { Ok(()) }
    }

    fn disc(mut self) {
        self.send_lossy(&Self::header(0, CMD_DISC, 0, 0, 0));
    }

    /// Whether the server closed the connection (EOF or reset) within the timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false;
                }
                Err(e) => panic!("unexpected socket error: {e}"),
            }
        }
    }
}

/// Data that must survive every abuse: an ASCII marker (so a leak into the
/// log would be visible) at the start and at the tail of the export.
fn marker_block(tag: &str, len: usize) -> Vec<u8> {
    let unit = format!("KT-BAD-INPUT-DATA-{tag}-0123456789abcdef|");
    unit.as_bytes().iter().copied().cycle().take(len).collect()
}

struct Fixture {
    _pool: TestPool,
    server: Server,
    addr: String,
    head: Vec<u8>,
    tail: Vec<u8>,
}

const TAIL_AT: u64 = SIZE - 64 * 1024;

impl Fixture {
    fn new() -> Fixture {
        let pool = TestPool::with_volume("64M");
        let server = pool.serve();
        let addr = server.addr();
        let head = [marker_block("HEAD", 3 * MIB / 2), pattern_bytes(7, MIB / 2)].concat();
        let tail = marker_block("TAIL", 64 * 1024);
        let (mut c, size) = Raw::go(&addr);
        assert_eq!(size, SIZE);
        c.write(1, 0, &head).expect("write head");
        c.write(2, TAIL_AT, &tail).expect("write tail");
        c.disc();
        let f = Fixture {
            _pool: pool,
            server,
            addr,
            head,
            tail,
        };
        f.check_data();
        f
    }

    /// A NEW client reads back exactly what was written.
    fn check_data(&self) {
        let (mut c, size) = Raw::go(&self.addr);
        assert_eq!(size, SIZE);
        let got = c.read(10, 0, self.head.len() as u32).expect("read head");
        assert!(got == self.head, "head data changed");
        let got = c
            .read(11, TAIL_AT, self.tail.len() as u32)
            .expect("read tail");
        assert!(got == self.tail, "tail data changed");
        // Never written: zeros.
        let got = c.read(12, 8 << 20, 4096).expect("read unwritten");
        assert!(got.iter().all(|&b| b == 0), "unwritten block is not zero");
        c.disc();
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.server.pid_now().expect("server pid");
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// The server runs, serves correct data, and has not blown up its memory.
    fn assert_healthy(&mut self) {
        assert!(
            self.server.is_running(),
            "server died; log:\n{}",
            self.server.log_text()
        );
        self.check_data();
        let rss = self.rss_kib();
        assert!(rss < 500 * 1024, "server RSS {rss} KiB");
    }

    /// Warning lines in the server log, colour codes removed.
    fn warnings(&self) -> Vec<String> {
        strip_ansi_codes(&self.server.log_text())
            .lines()
            .filter(|l| l.contains(" WARN "))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the log holds `n` warnings (the server logs when it drops a client).
    fn wait_warnings(&self, n: usize) -> Vec<String> {
        for _ in 0..100 {
            let w = self.warnings();
            if w.len() >= n {
                return w;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.warnings()
    }

    /// The log never holds the data written (nor any part of the markers).
    fn assert_log_clean(&self) {
        let log = self.server.log_text();
        for needle in ["KT-BAD-INPUT", "BAD-INPUT-DATA", "0123456789abcdef|"] {
            assert!(
                !log.contains(needle),
                "data bytes in the server log ({needle}):\n{log}"
            );
        }
    }
}

// ----------------------------------------------------------------- abuses
// Each returns what its warning line must mention (None: no warning expected).

fn abuse_bad_request_magic(addr: &str) -> Option<&'static str> {
    let (mut c, _) = Raw::go(addr);
    let mut h = Raw::header(0, CMD_READ, 5, 0, 4096);
    h[0..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    c.send(&h);
    assert!(
        c.closed_by_server(),
        "server kept a connection whose request magic was wrong"
    );
    Some("bad request magic")
}

fn abuse_garbage_before_handshake(addr: &str) -> Vec<&'static str> {
    // Garbage instead of client flags.
    let mut c = Raw::connect(addr);
    c.send_lossy(b"GARBAGE GARBAGE GARBAGE GARBAGE \x00\xff\x13\x37 not nbd at all");
    assert!(c.closed_by_server(), "garbage client flags accepted");
    // Valid flags, then garbage instead of an option header.
    let mut c = Raw::options(addr);
    c.send_lossy(&[0xa5; 64]);
    assert!(c.closed_by_server(), "garbage option header accepted");
    vec!["unknown client flags", "bad option magic"]
}

fn abuse_truncated_options(addr: &str) -> Vec<&'static str> {
    // Half an option header, then close.
    let mut c = Raw::options(addr);
    c.send(&IHAVEOPT.to_be_bytes());
    drop(c);
    // A GO header claiming 100 payload bytes, 10 sent, then close.
    let mut c = Raw::options(addr);
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&100u32.to_be_bytes());
    m.extend_from_slice(&[0u8; 10]);
    c.send(&m);
    drop(c);
    vec!["option header", "option payload"]
}

fn abuse_absurd_option_length(addr: &str, f: &Fixture) -> Vec<&'static str> {
    let before = f.rss_kib();
    let mut c = Raw::options(addr);
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    c.send(&m);
    // Keep sending for a while: a server that buffers would grow.
    let chunk = vec![0x42u8; MIB];
    for _ in 0..16 {
        if c.s.write_all(&chunk).is_err() {
            break;
        }
    }
    // Either the connection is closed, or it is answered with an error.
    let mut hdr = [0u8; 20];
    match c.s.read_exact(&mut hdr) {
        Err(_) => {}
        Ok(()) => {
            let kind = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
            assert_ne!(
                kind & (1 << 31),
                0,
                "absurd option answered without an error ({kind:#x})"
            );
        }
    }
    let after = f.rss_kib();
    assert!(
        after < 500 * 1024 && after < before + 200 * 1024,
        "server RSS grew from {before} to {after} KiB"
    );

    // A merely too-large option (1 MiB) is drained, refused with TOO_BIG,
    // and the handshake goes on.
    let mut c = Raw::options(addr);
    c.option(OPT_GO, &vec![0u8; MIB]);
    let (opt, kind, _) = c.option_reply();
    assert_eq!(
        (opt, kind),
        (OPT_GO, REP_ERR_TOO_BIG),
        "1 MiB option not refused with NBD_REP_ERR_TOO_BIG"
    );
    assert_eq!(c.opt_go("vol0"), SIZE);
    let got = c.read(3, TAIL_AT, 4096).expect("read after TOO_BIG");
    assert_eq!(got, f.tail[..4096]);
    c.disc();
    vec!["4294967280-byte payload", "1048576-byte payload"]
}

fn abuse_unknown_option(addr: &str, f: &Fixture) -> Option<&'static str> {
    let mut c = Raw::options(addr);
    for code in [0x4242u32, 0xffff_fff0] {
        c.option(code, b"whatever");
        let (opt, kind, _) = c.option_reply();
        assert_eq!(opt, code, "reply names another option");
        assert_eq!(
            kind, REP_ERR_UNSUP,
            "unknown option {code:#x} not answered NBD_REP_ERR_UNSUP"
        );
    }
    // The handshake continues.
    assert_eq!(c.opt_go("vol0"), SIZE);
    let got = c.read(4, 0, 4096).expect("read after unknown options");
    assert_eq!(got, f.head[..4096]);
    c.disc();
    None
}

fn abuse_unknown_command(addr: &str, f: &Fixture) -> Option<&'static str> {
    let (mut c, _) = Raw::go(addr);
    c.send(&Raw::header(0, 0x55, 0x1234, 0, 4096));
    let (err, cookie) = c.reply();
    assert_eq!(
        (err, cookie),
        (EINVAL, 0x1234),
        "unknown command not answered EINVAL"
    );
    // Still works.
    assert_eq!(
        c.read(5, 4096, 4096).expect("read after unknown command"),
        f.head[4096..8192]
    );
    c.disc();
    Some("unknown command")
}

fn abuse_out_of_range(addr: &str, f: &Fixture) -> Option<&'static str> {
    let (mut c, _) = Raw::go(addr);
    // Reads past the end: error, and no payload (the next reply is framed right).
    for (cookie, off, len) in [
        (20u64, SIZE - 4096, 8192u32),
        (21, SIZE, 1),
        (22, u64::MAX - 100, 4096),
    ] {
        assert_eq!(
            c.read(cookie, off, len),
            Err(EINVAL),
            "read {off}+{len} past the end"
        );
    }
    // Writes past the end: ENOSPC (or EINVAL), nothing applied.
    let junk = vec![0xEEu8; 8192];
    for (cookie, off, len) in [
        (23u64, SIZE - 4096, 8192usize),
        (24, SIZE, 4096),
        (25, u64::MAX - 100, 4096),
    ] {
        let r = c.write(cookie, off, &junk[..len]);
        assert!(
            matches!(r, Err(ENOSPC) | Err(EINVAL)),
            "write {off}+{len} past the end: {r:?}"
        );
    }
    // The connection is usable and the tail is untouched.
    let got = c.read(26, SIZE - 8192, 8192).expect("read the tail");
    assert_eq!(
        got,
        f.tail[f.tail.len() - 8192..],
        "tail changed by a write past the end"
    );
    c.disc();
    Some("outside export")
}

fn abuse_too_long(addr: &str, f: &Fixture) -> Vec<&'static str> {
    // READ over 32 MiB: error (or close), never 33 MiB of payload.
    let (mut c, _) = Raw::go(addr);
    c.send(&Raw::header(0, CMD_READ, 30, 0, (32 << 20) + 4096));
    let mut h = [0u8; 16];
    if c.s.read_exact(&mut h).is_ok() {
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_ne!(err, 0, "READ over 32 MiB accepted");
        // No payload followed: the next request is answered in frame.
        assert_eq!(
            c.read(31, 0, 4096).expect("read after oversized read"),
            f.head[..4096]
        );
    }
    drop(c);
    // WRITE over 32 MiB with its payload: refused, not applied.
    let (mut c, _) = Raw::go(addr);
    let big = vec![0xEEu8; (32 << 20) + 4096];
    let mut m = Raw::header(0, CMD_WRITE, 32, 0, big.len() as u32);
    m.extend_from_slice(&big);
    c.send_lossy(&m);
    let mut h = [0u8; 16];
    if c.s.read_exact(&mut h).is_ok() {
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_ne!(err, 0, "WRITE over 32 MiB accepted");
        assert_eq!(
            c.read(33, 0, 4096).expect("read after oversized write"),
            f.head[..4096]
        );
    }
    drop(c);
    // WRITE header declaring 4 GiB - 1: the server must not wait for or buffer it.
    let (mut c, _) = Raw::go(addr);
    c.send(&Raw::header(0, CMD_WRITE, 34, 0, u32::MAX));
    c.send_lossy(&vec![0xEEu8; MIB]);
    drop(c);
    vec![
        "exceeds the maximum payload",
        "exceeds the maximum payload",
        "too large to drain",
    ]
}

fn abuse_vanishing_writer(addr: &str, f: &Fixture) -> Option<&'static str> {
    let (mut c, _) = Raw::go(addr);
    let mut m = Raw::header(0, CMD_WRITE, 40, 0, MIB as u32);
    m.extend_from_slice(&[0xEEu8; 1000]);
    c.send(&m);
    // Give the server time to read what was sent, then vanish.
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    // The same bytes were written before; they must be intact.
    let (mut c, _) = Raw::go(addr);
    let got = c
        .read(41, 0, MIB as u32)
        .expect("read after vanished writer");
    assert!(
        got == f.head[..MIB],
        "a truncated write was (partly) applied"
    );
    c.disc();
    Some("write payload")
}

fn abuse_stalled_handshakes(addr: &str, f: &Fixture) -> Vec<&'static str> {
    // 50 clients that connect and stall mid-handshake (half their flags sent).
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut c = Raw::connect(addr);
        c.send(&[0, 0]);
        stalled.push(c);
    }
    // Another client still works, reading and writing.
    let (mut c, _) = Raw::go(addr);
    assert_eq!(
        c.read(50, TAIL_AT, 4096).expect("read while others stall"),
        f.tail[..4096]
    );
    let fresh = pattern_bytes(99, 64 * 1024);
    c.write(51, 16 << 20, &fresh)
        .expect("write while others stall");
    assert_eq!(c.read(52, 16 << 20, fresh.len() as u32).unwrap(), fresh);
    c.disc();
    drop(stalled);
    vec!["client flags"; 50]
}

fn abuse_bad_go_options(addr: &str, f: &Fixture) -> Option<&'static str> {
    const REP_ERR_INVALID: u32 = (1 << 31) | 3;
    const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
    let mut c = Raw::options(addr);
    let go = |name: &[u8]| {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name);
        p.extend_from_slice(&0u16.to_be_bytes());
        p
    };
    // An export that does not exist.
    c.option(OPT_GO, &go(b"no-such-volume"));
    assert_eq!(
        c.option_reply().1,
        REP_ERR_UNKNOWN,
        "GO to a missing export"
    );
    // A name with a NUL byte, and a name length pointing past the payload.
    c.option(OPT_GO, &go(b"vol\0"));
    assert_eq!(
        c.option_reply().1,
        REP_ERR_INVALID,
        "GO with a NUL in the name"
    );
    let mut p = go(b"vol0");
    p[0..4].copy_from_slice(&1000u32.to_be_bytes());
    c.option(OPT_GO, &p);
    assert_eq!(
        c.option_reply().1,
        REP_ERR_INVALID,
        "GO with a name length past the payload"
    );
    // The handshake goes on and the right export works.
    assert_eq!(c.opt_go("vol0"), SIZE);
    assert_eq!(
        c.read(6, 0, 4096).expect("read after bad GOs"),
        f.head[..4096]
    );
    c.disc();
    Some("unknown export")
}

fn abuse_bad_write_flags(addr: &str, f: &Fixture) -> Option<&'static str> {
    let (mut c, _) = Raw::go(addr);
    // A WRITE with an undefined flag: refused, its payload skipped (the
    // next request must still be framed), nothing applied.
    let mut m = Raw::header(0x8000, CMD_WRITE, 60, 0, 8192);
    m.extend_from_slice(&Raw::header(0, CMD_READ, 61, 0, 4096).repeat(8192 / 28 + 1)[..8192]);
    c.send(&m);
    let (err, cookie) = c.reply();
    assert_eq!((err, cookie), (EINVAL, 60), "WRITE with an undefined flag");
    assert_eq!(
        c.read(62, 0, 8192).expect("read after bad-flag write"),
        f.head[..8192],
        "bad-flag write applied"
    );
    // Zero-length requests at the very end are valid.
    assert_eq!(c.read(63, SIZE, 0), Ok(Vec::new()));
    assert_eq!(c.write(64, SIZE, &[]), Ok(()));
    c.disc();
    Some("not valid for WRITE")
}

fn abuse_reply_reader_stalls(addr: &str, f: &Fixture) -> Option<&'static str> {
    // Pipelines 256 reads of 1 MiB and never reads a reply.
    let (mut c, _) = Raw::go(addr);
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..256u64 {
        if c.s
            .write_all(&Raw::header(0, CMD_READ, 100 + i, 0, MIB as u32))
            .is_err()
        {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss = f.rss_kib();
    assert!(
        rss < 500 * 1024,
        "server RSS {rss} KiB with one client not reading replies"
    );
    // Others are served meanwhile.
    let (mut o, _) = Raw::go(addr);
    assert_eq!(
        o.read(7, TAIL_AT, 4096)
            .expect("read while another client stalls"),
        f.tail[..4096]
    );
    o.disc();
    drop(c);
    None
}

// ------------------------------------------------------------------ tests

/// Runs one abuse against a fresh server and checks the aftermath.
fn check_one(expect: Vec<&'static str>, f: &mut Fixture) {
    f.assert_healthy();
    let w = f.wait_warnings(expect.len());
    assert_eq!(
        w.len(),
        expect.len(),
        "expected one warning per rejected client {expect:?}, got:\n{}",
        w.join("\n")
    );
    for e in &expect {
        assert!(
            w.iter().any(|l| l.contains(e)),
            "no warning mentions {e:?}:\n{}",
            w.join("\n")
        );
    }
    f.assert_log_clean();
}

#[test]
fn bad_request_magic_drops_only_that_client() {
    let mut f = Fixture::new();
    let e = abuse_bad_request_magic(&f.addr);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn garbage_before_handshake_is_dropped() {
    let mut f = Fixture::new();
    let e = abuse_garbage_before_handshake(&f.addr);
    check_one(e, &mut f);
}

#[test]
fn truncated_option_then_close() {
    let mut f = Fixture::new();
    let e = abuse_truncated_options(&f.addr);
    check_one(e, &mut f);
}

#[test]
fn absurd_option_length_is_not_allocated() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_absurd_option_length(&addr, &f);
    check_one(e, &mut f);
}

#[test]
fn unknown_option_is_unsupported_and_handshake_continues() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_unknown_option(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn unknown_command_is_einval_and_connection_survives() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_unknown_command(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn read_and_write_past_the_end_fail_cleanly() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_out_of_range(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn requests_over_32_mib_are_refused() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_too_long(&addr, &f);
    check_one(e, &mut f);
}

#[test]
fn vanished_writer_applies_nothing() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_vanishing_writer(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn stalled_handshakes_do_not_block_others() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_stalled_handshakes(&addr, &f);
    check_one(e, &mut f);
}

#[test]
fn invalid_go_options_are_refused_and_handshake_continues() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_bad_go_options(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn write_with_bad_flags_is_refused_and_framing_kept() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_bad_write_flags(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

#[test]
fn client_not_reading_replies_is_bounded() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let e = abuse_reply_reader_stalls(&addr, &f);
    check_one(e.into_iter().collect(), &mut f);
}

/// Every abuse in a row on one server: still running, data intact, exactly
/// one warning per rejected client.
#[test]
fn every_abuse_in_a_row_on_one_server() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let mut expect: Vec<&'static str> = Vec::new();
    expect.extend(abuse_bad_request_magic(&addr));
    f.assert_healthy();
    expect.extend(abuse_garbage_before_handshake(&addr));
    f.assert_healthy();
    expect.extend(abuse_truncated_options(&addr));
    f.assert_healthy();
    expect.extend(abuse_absurd_option_length(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_unknown_option(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_unknown_command(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_out_of_range(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_too_long(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_vanishing_writer(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_bad_go_options(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_bad_write_flags(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_reply_reader_stalls(&addr, &f));
    f.assert_healthy();
    expect.extend(abuse_stalled_handshakes(&addr, &f));
    check_one(expect, &mut f);
    assert!(f.server.is_running());
}

/// Memory must be bounded for the server as a whole, not only per
/// connection: a handful of clients that pipeline large READs and never read
/// the replies must not pin hundreds of MiB each.
#[test]
fn clients_not_reading_replies_do_not_exhaust_memory() {
    let mut f = Fixture::new();
    let addr = f.addr.clone();
    let before = f.rss_kib();
    let mut stalled = Vec::new();
    for k in 0..6u64 {
        let (mut c, _) = Raw::go(&addr);
        c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 0..16u64 {
            if c.s
                .write_all(&Raw::header(0, CMD_READ, k * 100 + i, 0, 8 << 20))
                .is_err()
            {
                break;
            }
        }
        stalled.push(c);
    }
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(f.rss_kib());
    }
    // Others are still served.
    let (mut o, _) = Raw::go(&addr);
    assert_eq!(
        o.read(7, TAIL_AT, 4096).expect("read while others stall"),
        f.tail[..4096]
    );
    o.disc();
    drop(stalled);
    assert!(
        peak < 500 * 1024,
        "server RSS went from {before} KiB to {peak} KiB with 6 clients that do not read their replies \
         (each may pin max_in_flight_bytes = 128 MiB of read buffers; there is no server-wide bound)"
    );
    f.assert_healthy();
}
