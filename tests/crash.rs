//! Crash safety of the real `keyturn serve` under `kill -9`.
//!
//! The contract (DESIGN invariants 4, 5 and 7, and NBD's FLUSH/FUA rules):
//! * every write whose reply arrived before a FLUSH was sent, once that
//!   FLUSH has been answered, survives a crash — and so does every write
//!   answered with FUA;
//! * a write that was not flushed reads back, after a crash, as one of the
//!   versions that were written to that block (old or new), never torn,
//!   never as an I/O error;
//! * after recovery no slot is claimed twice and none is leaked: the
//!   allocation the server reports equals the blocks that read non-zero.
//!
//! The writer is a raw NBD client in this file (fixed newstyle, `NBD_OPT_GO`,
//! simple replies) so it knows exactly which replies it saw before each
//! FLUSH. Every block it writes is self-validating: a header with the LBA
//! and a generation (one per write request, unique for the whole test),
//! a pattern derived from both, and a crc32c over the block. A verifier
//! reads the region back and classifies every block.
//!
//! Randomness is seeded; the seed is printed and can be fixed with
//! `KEYTURN_CRASH_SEED=N`.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, TestPool, require_tool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
const BS64: u64 = BS as u64;

// ---------------------------------------------------------------- raw NBD client

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_FLAG_FUA: u16 = 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// A plain NBD client: fixed newstyle, `NBD_OPT_GO`, simple replies.
struct Nbd {
    sock: TcpStream,
    size: u64,
    flags: u16,
    cookie: u64,
}

fn request_header(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Parses a simple reply header: `(error, cookie)`.
fn parse_reply(r: &[u8; 16]) -> io::Result<(u32, u64)> {
    let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(proto_err(format!("bad reply magic {magic:#x}")));
    }
    Ok((
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    ))
}

impl Nbd {
    fn connect(addr: &str, export: &str) -> io::Result<Nbd> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if u64::from_be_bytes(g[0..8].try_into().unwrap()) != NBDMAGIC
            || u64::from_be_bytes(g[8..16].try_into().unwrap()) != IHAVEOPT
        {
            return Err(proto_err("not a newstyle NBD greeting"));
        }
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        if hflags & 1 == 0 {
            return Err(proto_err("server is not fixed newstyle"));
        }
        let cflags: u32 = 1 | u32::from(hflags & 2);
        s.write_all(&cflags.to_be_bytes())?;
        // NBD_OPT_GO with no information requests.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = None;
        let mut flags = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[0..8].try_into().unwrap()) != OPTION_REPLY_MAGIC {
                return Err(proto_err("bad option reply magic"));
            }
            let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            if rtype & (1 << 31) != 0 {
                return Err(proto_err(format!(
                    "NBD_OPT_GO refused: reply type {rtype:#x}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            if rtype == REP_INFO
                && len >= 12
                && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT
            {
                size = Some(u64::from_be_bytes(body[2..10].try_into().unwrap()));
                flags = u16::from_be_bytes([body[10], body[11]]);
            }
            if rtype == REP_ACK {
                break;
            }
        }
        let size = size.ok_or_else(|| proto_err("NBD_OPT_GO gave no NBD_INFO_EXPORT"))?;
        Ok(Nbd {
            sock: s,
            size,
            flags,
            cookie: 1,
        })
    }

    /// One request, waiting for its reply. Returns the NBD error (0 = ok) and read data.
    fn cmd(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        let mut msg = request_header(kind, flags, self.cookie, offset, len).to_vec();
        msg.extend_from_slice(payload);
        self.sock.write_all(&msg)?;
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r)?;
        let (err, cookie) = parse_reply(&r)?;
        if cookie != self.cookie {
            return Err(proto_err(format!(
                "reply cookie {cookie} for request {}",
                self.cookie
            )));
        }
        let mut data = Vec::new();
        if kind == CMD_READ && err == 0 {
            data = vec![0u8; len as usize];
            self.sock.read_exact(&mut data)?;
        }
        Ok((err, data))
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        match self.cmd(CMD_READ, 0, offset, len as u32, &[]) {
            Ok((0, d)) => Ok(d),
            Ok((e, _)) => Err(format!("READ {offset}+{len} failed with NBD error {e}")),
            Err(e) => Err(format!("READ {offset}+{len}: connection failed: {e}")),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let (err, _) = self
            .cmd(CMD_WRITE, flags, offset, data.len() as u32, data)
            .expect("WRITE: connection failed");
        assert_eq!(
            err,
            0,
            "WRITE {offset}+{} (fua={fua}) failed with NBD error {err}",
            data.len()
        );
    }

    fn flush(&mut self) {
        let (err, _) = self
            .cmd(CMD_FLUSH, 0, 0, 0, &[])
            .expect("FLUSH: connection failed");
        assert_eq!(err, 0, "FLUSH failed with NBD error {err}");
    }

    fn trim(&mut self, offset: u64, len: u32) {
        let (err, _) = self
            .cmd(CMD_TRIM, 0, offset, len, &[])
            .expect("TRIM: connection failed");
        assert_eq!(err, 0, "TRIM {offset}+{len} failed with NBD error {err}");
    }

    /// Polite end: NBD_CMD_DISC, then half-close and wait for the server to close.
    fn disconnect(mut self) {
        let _ = self.sock.write_all(&request_header(CMD_DISC, 0, 0, 0, 0));
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 64];
        while matches!(self.sock.read(&mut sink), Ok(n) if n > 0) {}
    }
}

// ---------------------------------------------------------------- self-validating blocks

const REC_MAGIC: &[u8; 8] = b"KTCRASH1";

/// A block that names its own LBA and generation and carries a crc32c over itself.
fn record_block(lba: u64, generation: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BS);
    out[0..8].copy_from_slice(REC_MAGIC);
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    out[16..24].copy_from_slice(&generation.to_le_bytes());
    let mut x = (lba.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    for chunk in out[24..BS - 4].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&out[..BS - 4]);
    out[BS - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// What a block read back holds.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Zero,
    Record { lba: u64, generation: u64 },
    Garbage,
}

fn classify(b: &[u8]) -> Seen {
    if b.iter().all(|&x| x == 0) {
        return Seen::Zero;
    }
    let crc = u32::from_le_bytes(b[BS - 4..].try_into().unwrap());
    if &b[0..8] != REC_MAGIC || crc32c::crc32c(&b[..BS - 4]) != crc {
        return Seen::Garbage;
    }
    Seen::Record {
        lba: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        generation: u64::from_le_bytes(b[16..24].try_into().unwrap()),
    }
}

// ---------------------------------------------------------------- the model

/// What the test knows about a region of the volume, across crashes.
struct Model {
    /// First LBA of the region.
    first: u64,
    /// Blocks in the region.
    blocks: u64,
    /// Per block: the oldest generation it may hold (0 = none required).
    /// Raised by completed FLUSHes, FUA replies, and by what a read after
    /// recovery saw (recovered state must itself be stable).
    floor: Vec<u64>,
    /// Per block: every generation ever sent to it, ascending (writes to
    /// one block are never in flight together, so higher is newer).
    sent: Vec<Vec<u64>>,
    /// Generations that were TRIMs (the block reads as zeros afterwards).
    trims: std::collections::HashSet<u64>,
    /// Next generation to hand out.
    next_gen: u64,
}

impl Model {
    fn new(first: u64, blocks: u64) -> Self {
        Self {
            first,
            blocks,
            floor: vec![0; blocks as usize],
            sent: vec![Vec::new(); blocks as usize],
            trims: Default::default(),
            next_gen: 1,
        }
    }
}

/// Result of reading a region back after a crash.
struct Verified {
    /// Blocks that read non-zero.
    nonzero: u64,
    /// Blocks holding exactly their floor generation / a newer one.
    at_floor: u64,
    newer: u64,
}

/// Reads the model's region through a fresh connection and checks every
/// block against the contract. On success, raises each floor to what was
/// read (recovered state must not change across a later crash).
fn verify_region(addr: &str, model: &mut Model, ctx: &str) -> Verified {
    let mut c = Nbd::connect(addr, "vol0")
        .unwrap_or_else(|e| panic!("{ctx}: cannot connect for read-back: {e}"));
    assert!(
        c.size >= (model.first + model.blocks) * BS64,
        "{ctx}: export size {} after restart does not cover the region",
        c.size
    );
    let mut problems = Vec::new();
    let mut seen_gens = vec![0u64; model.blocks as usize];
    let (mut nonzero, mut at_floor, mut newer) = (0, 0, 0);
    let chunk = 64u64;
    let mut b = 0;
    while b < model.blocks {
        let n = chunk.min(model.blocks - b);
        let lba0 = model.first + b;
        let data = match c.read(lba0 * BS64, (n * BS64) as usize) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!(
                    "lba {lba0}..{}: {e} (reads after a crash must not fail)",
                    lba0 + n
                ));
                // The connection may be unusable after an error; reconnect.
                c = Nbd::connect(addr, "vol0").unwrap_or_else(|e| panic!("{ctx}: reconnect: {e}"));
                b += n;
                continue;
            }
        };
        for i in 0..n {
            let idx = (b + i) as usize;
            let lba = lba0 + i;
            let blk = &data[(i * BS64) as usize..((i + 1) * BS64) as usize];
            let floor = model.floor[idx];
            match classify(blk) {
                Seen::Zero => {
                    // Zeros are fine if nothing is durable yet, or if a TRIM
                    // at least as new as the durable version was sent.
                    let trim = model.sent[idx]
                        .iter()
                        .copied()
                        .find(|g| *g >= floor && model.trims.contains(g));
                    match trim {
                        Some(t) => seen_gens[idx] = t,
                        None if floor == 0 => {}
                        None => problems.push(format!(
                            "lba {lba}: reads zeros, but generation {floor} was durable (flushed/FUA or seen after an earlier recovery) and no later TRIM was sent"
                        )),
                    }
                }
                Seen::Garbage => problems.push(format!(
                    "lba {lba}: torn or foreign block (bad magic or crc); first bytes {:02x?}",
                    &blk[..32]
                )),
                Seen::Record { lba: l, generation } => {
                    nonzero += 1;
                    if l != lba {
                        problems.push(format!("lba {lba}: holds the block written to lba {l} (generation {generation})"));
                    } else if model.sent[idx].binary_search(&generation).is_err() {
                        problems.push(format!(
                            "lba {lba}: holds generation {generation}, never written there"
                        ));
                    } else if generation < floor {
                        problems.push(format!(
                            "lba {lba}: holds generation {generation}, older than durable generation {floor} (flushed data lost)"
                        ));
                    } else {
                        seen_gens[idx] = generation;
                        if generation == floor {
                            at_floor += 1;
                        } else {
                            newer += 1;
                        }
                    }
                }
            }
        }
        b += n;
    }
    c.disconnect();
    assert!(
        problems.is_empty(),
        "{ctx}: {} block(s) break the crash contract; first ones:\n  {}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    for (f, g) in model.floor.iter_mut().zip(seen_gens) {
        *f = (*f).max(g);
    }
    Verified {
        nonzero,
        at_floor,
        newer,
    }
}

// ---------------------------------------------------------------- the pipelined writer

#[derive(Clone, Copy)]
struct LoadCfg {
    iodepth: usize,
    /// Send a FLUSH after this many writes (0: never).
    flush_every: u32,
    /// Every write carries NBD_CMD_FLAG_FUA.
    fua: bool,
    /// Largest write, in blocks.
    max_run: u64,
    /// One request in this many is a TRIM of its range instead of a write (0: none).
    trim_one_in: u32,
}

#[derive(Default, Debug)]
struct LoadStats {
    writes_sent: u64,
    writes_acked: u64,
    flushes_acked: u64,
    errors: Vec<String>,
}

enum Pending {
    Write {
        idx: u64,
        n: u64,
        generation: u64,
        fua: bool,
    },
    Flush {
        snapshot: Vec<u64>,
    },
}

struct Shared {
    model: Model,
    /// Per block: newest generation whose reply has been seen.
    acked: Vec<u64>,
    /// Per block: newest generation known durable (FLUSH covered it, or FUA reply).
    durable: Vec<u64>,
    busy: Vec<bool>,
    inflight: HashMap<u64, Pending>,
    since_flush: u32,
    dead: bool,
    stats: LoadStats,
}

/// A writer keeping `iodepth` requests in flight until the connection dies.
struct Load {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str, model: Model, cfg: LoadCfg, seed: u64) -> Load {
        let c = Nbd::connect(addr, "vol0").expect("writer connects");
        assert!(
            c.flags & TF_SEND_FLUSH != 0 && c.flags & TF_SEND_FUA != 0,
            "server must offer FLUSH and FUA"
        );
        let blocks = model.blocks as usize;
        let shared = Arc::new((
            Mutex::new(Shared {
                model,
                acked: vec![0; blocks],
                durable: vec![0; blocks],
                busy: vec![false; blocks],
                inflight: HashMap::new(),
                since_flush: 0,
                dead: false,
                stats: LoadStats::default(),
            }),
            Condvar::new(),
        ));
        let mut rd = c.sock.try_clone().unwrap();
        rd.set_read_timeout(None).unwrap();
        let mut wr = c.sock;
        let sh = shared.clone();
        let sender = thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut cookie = 1000u64;
            let mut buf = Vec::new();
            loop {
                let (lock, cv) = &*sh;
                let mut st = lock.lock().unwrap();
                while !st.dead && st.inflight.len() >= cfg.iodepth {
                    st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
                }
                if st.dead {
                    return;
                }
                cookie += 1;
                buf.clear();
                if cfg.flush_every > 0 && st.since_flush >= cfg.flush_every {
                    st.since_flush = 0;
                    let snapshot = st.acked.clone();
                    st.inflight.insert(cookie, Pending::Flush { snapshot });
                    buf.extend_from_slice(&request_header(CMD_FLUSH, 0, cookie, 0, 0));
                } else {
                    let blocks = st.model.blocks;
                    let mut pick = None;
                    for _ in 0..32 {
                        let idx = rng.gen_range(0..blocks);
                        let n = rng.gen_range(1..=cfg.max_run).min(blocks - idx);
                        if (idx..idx + n).all(|i| !st.busy[i as usize]) {
                            pick = Some((idx, n));
                            break;
                        }
                    }
                    let Some((idx, n)) = pick else {
                        drop(st);
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    let trim = cfg.trim_one_in > 0 && rng.gen_range(0..cfg.trim_one_in) == 0;
                    let generation = st.model.next_gen;
                    st.model.next_gen += 1;
                    if trim {
                        st.model.trims.insert(generation);
                    }
                    for i in idx..idx + n {
                        st.busy[i as usize] = true;
                        st.model.sent[i as usize].push(generation);
                    }
                    st.inflight.insert(
                        cookie,
                        Pending::Write {
                            idx,
                            n,
                            generation,
                            fua: cfg.fua,
                        },
                    );
                    st.since_flush += 1;
                    st.stats.writes_sent += 1;
                    let first = st.model.first;
                    drop(st);
                    let flags = if cfg.fua { CMD_FLAG_FUA } else { 0 };
                    buf.extend_from_slice(&request_header(
                        if trim { CMD_TRIM } else { CMD_WRITE },
                        flags,
                        cookie,
                        (first + idx) * BS64,
                        (n * BS64) as u32,
                    ));
                    if !trim {
                        let at = buf.len();
                        buf.resize(at + (n * BS64) as usize, 0);
                        for i in 0..n {
                            let s = at + (i * BS64) as usize;
                            record_block(first + idx + i, generation, &mut buf[s..s + BS]);
                        }
                    }
                    if wr.write_all(&buf).is_err() {
                        let mut st = lock.lock().unwrap();
                        st.dead = true;
                        cv.notify_all();
                        return;
                    }
                    continue;
                }
                drop(st);
                if wr.write_all(&buf).is_err() {
                    let mut st = lock.lock().unwrap();
                    st.dead = true;
                    cv.notify_all();
                    return;
                }
            }
        });
        let sh = shared.clone();
        let receiver = thread::spawn(move || {
            let (lock, cv) = &*sh;
            loop {
                let mut r = [0u8; 16];
                let parsed = rd.read_exact(&mut r).and_then(|()| parse_reply(&r));
                let mut st = lock.lock().unwrap();
                let Ok((err, cookie)) = parsed else {
                    st.dead = true;
                    cv.notify_all();
                    return;
                };
                match st.inflight.remove(&cookie) {
                    None => {
                        st.stats
                            .errors
                            .push(format!("reply for unknown cookie {cookie}"));
                        st.dead = true;
                        cv.notify_all();
                        return;
                    }
                    Some(Pending::Write {
                        idx,
                        n,
                        generation,
                        fua,
                    }) => {
                        for i in idx..idx + n {
                            st.busy[i as usize] = false;
                        }
                        if err != 0 {
                            st.stats.errors.push(format!(
                                "WRITE or TRIM of blocks {idx}+{n} failed with NBD error {err}"
                            ));
                        } else {
                            st.stats.writes_acked += 1;
                            for i in idx..idx + n {
                                let i = i as usize;
                                st.acked[i] = st.acked[i].max(generation);
                                if fua {
                                    st.durable[i] = st.durable[i].max(generation);
                                }
                            }
                        }
                    }
                    Some(Pending::Flush { snapshot }) => {
                        if err != 0 {
                            st.stats
                                .errors
                                .push(format!("FLUSH failed with NBD error {err}"));
                        } else {
                            st.stats.flushes_acked += 1;
                            let st = &mut *st;
                            for (d, s) in st.durable.iter_mut().zip(&snapshot) {
                                *d = (*d).max(*s);
                            }
                        }
                    }
                }
                cv.notify_all();
            }
        });
        Load {
            shared,
            threads: vec![sender, receiver],
        }
    }

    fn stats_now(&self) -> (u64, u64) {
        let st = self.shared.0.lock().unwrap();
        (st.stats.writes_acked, st.stats.flushes_acked)
    }

    /// Waits for both threads (call after the server died) and folds what
    /// became durable into the model's floors.
    fn finish(self) -> (Model, LoadStats) {
        for t in self.threads {
            t.join().expect("writer thread panicked");
        }
        let shared = Arc::try_unwrap(self.shared)
            .ok()
            .expect("threads are done")
            .0
            .into_inner()
            .unwrap();
        let mut model = shared.model;
        for (f, d) in model.floor.iter_mut().zip(&shared.durable) {
            *f = (*f).max(*d);
        }
        (model, shared.stats)
    }
}

/// Runs the writer against `server` and SIGKILLs the server after `delay`.
/// Returns the updated model and what the writer saw.
fn load_then_kill9(
    server: &mut Server,
    model: Model,
    cfg: LoadCfg,
    seed: u64,
    delay: Duration,
) -> (Model, LoadStats) {
    let load = Load::start(&server.addr(), model, cfg, seed);
    thread::sleep(delay);
    let (acked, _flushed) = load.stats_now();
    server.kill9();
    let (model, stats) = load.finish();
    assert!(
        stats.errors.is_empty(),
        "the server answered errors before it was killed: {:?}\nlog tail:\n{}",
        &stats.errors[..stats.errors.len().min(10)],
        tail(&server.log_text(), 30)
    );
    assert!(
        acked > 0,
        "no write was acknowledged in {delay:?} (stats {stats:?})"
    );
    (model, stats)
}

// ---------------------------------------------------------------- helpers

fn seed_from_env(test: &str) -> u64 {
    let seed = std::env::var("KEYTURN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: seed {seed} (rerun with KEYTURN_CRASH_SEED={seed})");
    seed
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `keyturn volume list --json`: allocated bytes of vol0. The server must be stopped.
fn allocated_bytes(pool: &TestPool) -> u64 {
    let out = pool.keyturn_ok(&["volume", "list", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume list --json: {e}: {out}"));
    v.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "vol0"))
        .and_then(|x| x["allocated_bytes"].as_u64())
        .unwrap_or_else(|| panic!("no allocated_bytes for vol0 in {out}"))
}

fn table_records(path: &Path, record: usize) -> Vec<(u64, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() >= 4096 && &bytes[..8] == b"KTTABLE1",
        "{} is not a table",
        path.display()
    );
    bytes[4096..]
        .chunks_exact(record)
        .enumerate()
        .filter(|(_, r)| r.iter().any(|&b| b != 0))
        .map(|(i, r)| (i as u64, r.to_vec()))
        .collect()
}

/// Offline consistency check of a stopped pool, after `keyturn volume list`
/// has opened it (replay + checkpoint), so the tables hold the whole state:
/// every mapped block points to a live content block, refcounts equal the
/// references, no live content block is unreferenced (leak), no slot is
/// claimed twice, and `allocated_bytes` equals `expect_blocks` blocks.
/// Layouts: `store/table.rs` (header), `zone/mod.rs` (64-byte CB records,
/// 8-byte map records holding CBID+1).
fn check_pool(pool: &TestPool, expect_blocks: u64, ctx: &str) {
    let allocated = allocated_bytes(pool);
    assert_eq!(
        allocated,
        expect_blocks * BS64,
        "{ctx}: `volume list` reports {allocated} allocated bytes, but {expect_blocks} blocks read non-zero"
    );
    let cat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.path().join("catalog.json")).unwrap()).unwrap();
    let vol = cat["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol0")
        .unwrap();
    let (vid, zid) = (vol["id"].as_u64().unwrap(), vol["zone"].as_u64().unwrap());
    let map = table_records(&pool.path().join(format!("tables/vol-{vid}.map")), 8);
    let cbs = table_records(&pool.path().join(format!("tables/zone-{zid}.cb")), 64);
    let mut refs: HashMap<u64, u32> = HashMap::new();
    for (_, r) in &map {
        let cbid = u64::from_le_bytes(r[..8].try_into().unwrap()) - 1;
        *refs.entry(cbid).or_default() += 1;
    }
    let mut problems = Vec::new();
    let mut slots: HashMap<u64, u64> = HashMap::new();
    let mut live = 0u64;
    for (cbid, r) in &cbs {
        let slot = u64::from_le_bytes(r[0..8].try_into().unwrap());
        let refcount = u32::from_le_bytes(r[12..16].try_into().unwrap());
        if refcount == 0 {
            continue;
        }
        live += 1;
        if let Some(other) = slots.insert(slot, *cbid) {
            problems.push(format!(
                "slot {slot} is claimed by content blocks {other} and {cbid} (double allocation)"
            ));
        }
        let n = refs.remove(cbid).unwrap_or(0);
        if n == 0 {
            problems.push(format!(
                "content block {cbid} (slot {slot}) is live but no block maps to it (leak)"
            ));
        } else if n != refcount {
            problems.push(format!(
                "content block {cbid}: refcount {refcount}, but {n} blocks map to it"
            ));
        }
    }
    for (cbid, n) in refs {
        problems.push(format!(
            "{n} block(s) map to content block {cbid}, which has no live record"
        ));
    }
    assert!(
        problems.is_empty(),
        "{ctx}: pool tables are inconsistent ({} mapped, {live} live content blocks):\n  {}",
        map.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_eq!(
        map.len() as u64,
        expect_blocks,
        "{ctx}: map table has {} entries",
        map.len()
    );
}

/// The journal's current header (the valid one of its two slots with the
/// higher generation): `(generation, checkpoint sequence, frame region)`.
fn journal_header(dir: &Path) -> (u64, u64, u64) {
    let j = std::fs::read(dir.join("journal")).unwrap();
    (0..2)
        .filter_map(|s| {
            let h = &j[s * 4096..s * 4096 + 64];
            let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
            let crc = u32::from_le_bytes(h[32..36].try_into().unwrap());
            (&h[..8] == b"KTJRNL04" && crc32c::crc32c(&h[..32]) == crc)
                .then(|| (word(8), word(16), word(24)))
        })
        .max()
        .expect("journal has a valid header")
}

/// The journal header generation.
fn journal_generation(pool: &TestPool) -> u64 {
    journal_header(&pool.path()).0
}

fn write_profile(pool: &TestPool, commit_interval_ms: u64, checkpoint_mib: u64) -> String {
    let text = format!(
        "name = \"crash-test\"\ndescription = \"tiny checkpoints for crash tests\"\n\
         [io]\nqueue_depth = 256\ndirect = true\n\
         [server]\nworker_threads = 2\nmax_inflight_per_conn = 64\n\
         [journal]\ncommit_interval_ms = {commit_interval_ms}\ncheckpoint_mib = {checkpoint_mib}\n\
         [batch]\nmax_run_blocks = 256\n"
    );
    let p = pool.dir.path().join("crash-profile.toml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// `ci-2core` with long writes sent past the page cache (runs of 128 KiB
/// or more with O_DIRECT), as profiles for fast disks do.
fn uncached_profile(pool: &TestPool) -> String {
    let base = include_str!("../hw-profiles/ci-2core.toml");
    let text = base.replace("uncached_write_kib = 0", "uncached_write_kib = 128");
    assert_ne!(text, base, "ci-2core sets uncached_write_kib = 0");
    let p = pool.dir.path().join("uncached-profile.toml");
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// Restarts the server; the pool must open after any crash.
fn restart(pool: &TestPool, extra: &[&str]) -> Server {
    pool.serve_with(extra)
}

// ---------------------------------------------------------------- tests

/// (a) Kill -9 at random moments under a pipelined write load with periodic
/// FLUSH; after each restart every flushed write is there (or a newer one),
/// every block is a whole version, no read fails.
#[test]
fn flushed_writes_survive_kill9_at_random_points() {
    let seed = seed_from_env("flushed_writes_survive_kill9_at_random_points");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let mut server = pool.serve();
    // 16 MiB region in the middle of the volume.
    let mut model = Model::new(8192, 4096);
    let cfg = LoadCfg {
        iodepth: 32,
        flush_every: 48,
        fua: false,
        max_run: 8,
        trim_one_in: 12,
    };
    let mut total_flushes = 0;
    for iter in 0..5 {
        let delay = Duration::from_millis(rng.gen_range(150..1200));
        let (m, stats) = load_then_kill9(&mut server, model, cfg, rng.r#gen(), delay);
        model = m;
        total_flushes += stats.flushes_acked;
        let t = Instant::now();
        server = restart(&pool, &[]);
        let v = verify_region(
            &server.addr(),
            &mut model,
            &format!("seed {seed}, iteration {iter} (killed after {delay:?})"),
        );
        println!(
            "iteration {iter}: killed after {delay:?}: {} writes acked, {} flushes acked; restart+verify {:?}; {} blocks non-zero, {} at the durable version, {} newer",
            stats.writes_acked,
            stats.flushes_acked,
            t.elapsed(),
            v.nonzero,
            v.at_floor,
            v.newer
        );
    }
    assert!(
        total_flushes > 0,
        "no FLUSH completed in 5 iterations: the test proved nothing"
    );
    // Recovery is stable: one more crash of an idle server changes nothing.
    server.kill9();
    server = restart(&pool, &[]);
    let v = verify_region(
        &server.addr(),
        &mut model,
        &format!("seed {seed}, idle kill after the last iteration"),
    );
    assert!(
        server.stop(),
        "clean stop failed:\n{}",
        tail(&server.log_text(), 20)
    );
    check_pool(&pool, v.nonzero, &format!("seed {seed}"));
}

/// (a1) Kill -9 in the middle of coalesced batches: short writes at QD32
/// on one connection, which the server reads together and applies as
/// batches (one device write and one journal frame each; the metrics must
/// show batches before the kill). After each restart every flushed write is
/// there, and no request is half there: a multi-block write whose
/// generation shows in one of its blocks shows in all of them (or a newer
/// write replaced some), whether or not it was acknowledged.
#[test]
fn kill9_mid_coalesced_batches_keeps_requests_whole() {
    let seed = seed_from_env("kill9_mid_coalesced_batches_keeps_requests_whole");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let mut server = pool.serve();
    // 4 MiB region: requests of 1-4 blocks (at most 16 KiB: all batchable).
    let mut model = Model::new(16384, 1024);
    let cfg = LoadCfg {
        iodepth: 32,
        flush_every: 40,
        fua: false,
        max_run: 4,
        trim_one_in: 0,
    };
    let mut batched_before_kills = 0.0;
    for iter in 0..4 {
        let delay = Duration::from_millis(rng.gen_range(300..1200));
        let load = Load::start(&server.addr(), model, cfg, rng.r#gen());
        thread::sleep(delay);
        let metrics = common::scrape_metrics(&pool, &server);
        let (acked, _) = load.stats_now();
        server.kill9();
        let (m, stats) = load.finish();
        model = m;
        assert!(
            stats.errors.is_empty(),
            "errors before the kill: {:?}",
            &stats.errors[..stats.errors.len().min(10)]
        );
        assert!(acked > 0, "no write acknowledged in {delay:?}");
        let batches = metric_value(&metrics, "keyturn_nbd_write_batches_total");
        batched_before_kills += batches;
        server = restart(&pool, &[]);
        let ctx = format!("seed {seed}, iteration {iter} (killed after {delay:?})");
        let seen = read_generations(&server.addr(), &model, &ctx);
        check_requests_whole(&model, &seen, &ctx);
        let v = verify_region(&server.addr(), &mut model, &ctx);
        println!(
            "iteration {iter}: killed after {delay:?} with {batches} batches so far: {} writes acked, {} flushes acked; {} blocks non-zero, {} at the durable version, {} newer",
            stats.writes_acked, stats.flushes_acked, v.nonzero, v.at_floor, v.newer
        );
    }
    assert!(
        batched_before_kills > 0.0,
        "the server applied no write batch: the test proved nothing"
    );
    assert!(server.stop(), "clean stop failed");
}

/// The value of an unlabelled counter in Prometheus text (0 when absent).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The generation each block of the model's region holds (0: zeros).
/// Torn blocks are left to `verify_region` to name.
fn read_generations(addr: &str, model: &Model, ctx: &str) -> Vec<u64> {
    let mut c = Nbd::connect(addr, "vol0").unwrap_or_else(|e| panic!("{ctx}: connect: {e}"));
    let data = c
        .read(model.first * BS64, (model.blocks * BS64) as usize)
        .unwrap_or_else(|e| panic!("{ctx}: read-back failed: {e}"));
    c.disconnect();
    data.chunks_exact(BS)
        .map(|b| match classify(b) {
            Seen::Record { generation, .. } => generation,
            _ => 0,
        })
        .collect()
}

/// No write request is half applied: for each generation seen in some
/// block, every block that generation was sent to holds it or a newer one.
fn check_requests_whole(model: &Model, seen: &[u64], ctx: &str) {
    let mut blocks_of: HashMap<u64, Vec<usize>> = HashMap::new();
    for (idx, gens) in model.sent.iter().enumerate() {
        for &g in gens {
            blocks_of.entry(g).or_default().push(idx);
        }
    }
    let mut problems = Vec::new();
    let mut multi = 0;
    for (g, blocks) in &blocks_of {
        if blocks.len() < 2 || !blocks.iter().any(|&i| seen[i] == *g) {
            continue;
        }
        multi += 1;
        for &i in blocks {
            if seen[i] < *g {
                problems.push(format!(
                    "write {g} to blocks {blocks:?} is half there: lba {} holds generation {}",
                    model.first + i as u64,
                    seen[i]
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{ctx}: {} problem(s); first:\n  {}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n  ")
    );
    assert!(
        multi > 0,
        "{ctx}: no multi-block write was seen: the check proved nothing"
    );
}

/// (a2) The same contract for long writes sent past the page cache
/// (`uncached_write_kib = 128` on the buffered profile): runs of up to 384
/// KiB, some over the threshold and some under, flushed and FUA, killed
/// mid-stream.
#[test]
fn long_uncached_writes_survive_kill9() {
    let seed = seed_from_env("long_uncached_writes_survive_kill9");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let profile = uncached_profile(&pool);
    let serve = |pool: &TestPool| pool.serve_with(&["--profile", &profile]);
    let mut server = serve(&pool);
    let mut model = Model::new(4096, 8192);
    let mut acked = 0;
    for iter in 0..4 {
        let cfg = LoadCfg {
            iodepth: 16,
            flush_every: 6,
            fua: iter % 2 == 1,
            max_run: 96,
            trim_one_in: 16,
        };
        let delay = Duration::from_millis(rng.gen_range(150..900));
        let (m, stats) = load_then_kill9(&mut server, model, cfg, rng.r#gen(), delay);
        model = m;
        acked += stats.flushes_acked + if cfg.fua { stats.writes_acked } else { 0 };
        server = serve(&pool);
        let v = verify_region(
            &server.addr(),
            &mut model,
            &format!("seed {seed}, long-run iteration {iter} (killed after {delay:?})"),
        );
        println!(
            "long-run iteration {iter}: killed after {delay:?}: {} writes acked, {} flushes acked; {} blocks non-zero, {} at the durable version, {} newer",
            stats.writes_acked, stats.flushes_acked, v.nonzero, v.at_floor, v.newer
        );
    }
    assert!(
        acked > 0,
        "nothing was made durable: the test proved nothing"
    );
    let v = verify_region(&server.addr(), &mut model, &format!("seed {seed}, final"));
    assert!(
        server.stop(),
        "clean stop failed:\n{}",
        tail(&server.log_text(), 20)
    );
    check_pool(&pool, v.nonzero, &format!("seed {seed}"));
}

/// (b) Writes answered with FUA survive kill -9 with no FLUSH at all.
#[test]
fn fua_writes_survive_kill9() {
    let seed = seed_from_env("fua_writes_survive_kill9");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let mut server = pool.serve();

    // A single FUA write, then kill at once: nothing else could have made it durable.
    {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        let mut blk = vec![0u8; BS];
        record_block(100, 7, &mut blk);
        c.write(100 * BS64, &blk, true);
        server.kill9();
        server = restart(&pool, &[]);
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        let got = c.read(100 * BS64, BS).unwrap();
        assert_eq!(
            classify(&got),
            Seen::Record {
                lba: 100,
                generation: 7
            },
            "a FUA write was lost by kill -9"
        );
        c.disconnect();
    }

    // Pipelined FUA writes, killed at random moments.
    let mut model = Model::new(16384, 2048);
    let cfg = LoadCfg {
        iodepth: 16,
        flush_every: 0,
        fua: true,
        max_run: 4,
        trim_one_in: 10,
    };
    for iter in 0..3 {
        let delay = Duration::from_millis(rng.gen_range(100..700));
        let (m, stats) = load_then_kill9(&mut server, model, cfg, rng.r#gen(), delay);
        model = m;
        server = restart(&pool, &[]);
        let v = verify_region(
            &server.addr(),
            &mut model,
            &format!("seed {seed}, FUA iteration {iter}"),
        );
        println!(
            "FUA iteration {iter}: killed after {delay:?}: {} FUA writes acked; {} blocks non-zero ({} newer than acknowledged)",
            stats.writes_acked, v.nonzero, v.newer
        );
        assert!(v.at_floor > 0, "no acknowledged FUA write was checked");
    }
}

/// (c1) Four crash/restart cycles with fio write+verify in between; at the
/// end fio verifies every region, the random-writer region is consistent, and
/// the server's allocation matches what reads back non-zero.
#[test]
fn crash_cycles_then_fio_verify_and_exact_allocation() {
    require_tool("fio");
    let seed = seed_from_env("crash_cycles_then_fio_verify_and_exact_allocation");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let region = 4u64 << 20; // per cycle, fio
    let fio = |server: &Server, i: u64, verify_only: bool| {
        let uri = server.uri("vol0");
        let offset = (64u64 << 20) + i * region;
        let args = [
            "60".to_string(),
            "fio".into(),
            format!("--name=cycle{i}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            format!("--offset={offset}"),
            format!("--size={region}"),
            "--verify=crc32c".into(),
            "--verify_fatal=1".into(),
            "--randrepeat=1".into(),
            format!("--randseed={}", 1000 + i),
            "--verify_state_save=0".into(),
            "--end_fsync=1".into(),
            if verify_only {
                "--verify_only=1".into()
            } else {
                "--do_verify=1".into()
            },
        ];
        let out = Command::new("timeout")
            .args(&args)
            .output()
            .expect("run fio");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success()
                && !text.contains("verify: bad")
                && !text.contains("crc32c: verify failed"),
            "fio cycle {i} (verify_only={verify_only}) failed ({}):\n{}\nserver log tail:\n{}",
            out.status,
            tail(&text, 30),
            tail(&server.log_text(), 20)
        );
    };
    let mut model = Model::new(0, 2048);
    let cfg = LoadCfg {
        iodepth: 32,
        flush_every: 64,
        fua: false,
        max_run: 8,
        trim_one_in: 16,
    };
    let mut server = pool.serve();
    for cycle in 0..4 {
        for prev in 0..cycle {
            fio(&server, prev, true);
        }
        fio(&server, cycle, false);
        let delay = Duration::from_millis(rng.gen_range(100..600));
        let (m, _) = load_then_kill9(&mut server, model, cfg, rng.r#gen(), delay);
        model = m;
        server = restart(&pool, &[]);
        verify_region(
            &server.addr(),
            &mut model,
            &format!("seed {seed}, cycle {cycle}"),
        );
    }
    for i in 0..4 {
        fio(&server, i, true);
    }
    let v = verify_region(&server.addr(), &mut model, &format!("seed {seed}, final"));
    assert!(server.stop(), "clean stop failed");
    // fio wrote every block of its regions once per cycle (random map, no repeats).
    let fio_blocks = 4 * region / BS64;
    check_pool(
        &pool,
        fio_blocks + v.nonzero,
        &format!("seed {seed}, after 4 crash cycles"),
    );
}

/// (c2) No double allocation and no leak across crashes: N blocks written,
/// crash, all overwritten and flushed, crash — still N blocks allocated and
/// the new data reads back; all trimmed and flushed, crash — 0 allocated.
#[test]
fn allocation_stays_exact_across_overwrite_and_trim_crashes() {
    let pool = TestPool::with_volume("256M");
    let n = 1024u64;
    let first = 4096u64;
    let write_all = |server: &Server, generation: u64| {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        // Mixed request sizes so slots come in runs and singles.
        let mut lba = first;
        let mut k = 1;
        while lba < first + n {
            let len = k.min(first + n - lba);
            let mut buf = vec![0u8; (len * BS64) as usize];
            for i in 0..len {
                record_block(
                    lba + i,
                    generation,
                    &mut buf[(i * BS64) as usize..((i + 1) * BS64) as usize],
                );
            }
            c.write(lba * BS64, &buf, false);
            lba += len;
            k = k % 16 + 1;
        }
        c.flush();
        c.disconnect();
    };
    let check_all = |server: &Server, generation: Option<u64>, ctx: &str| {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        let data = c
            .read(first * BS64, (n * BS64) as usize)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        for i in 0..n {
            let blk = &data[(i * BS64) as usize..((i + 1) * BS64) as usize];
            let want = generation.map_or(Seen::Zero, |g| Seen::Record {
                lba: first + i,
                generation: g,
            });
            assert_eq!(classify(blk), want, "{ctx}: lba {}", first + i);
        }
        c.disconnect();
    };

    let mut server = pool.serve();
    write_all(&server, 1);
    server.kill9();
    server = restart(&pool, &[]);
    check_all(&server, Some(1), "after first crash");
    write_all(&server, 2);
    server.kill9();
    server = restart(&pool, &[]);
    check_all(&server, Some(2), "after overwrite + crash");
    // Once more, so reused slots get overwritten again.
    write_all(&server, 3);
    server.kill9();
    server = restart(&pool, &[]);
    check_all(&server, Some(3), "after second overwrite + crash");
    assert!(server.stop());
    check_pool(&pool, n, "after overwrites and crashes");

    server = pool.serve();
    {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        c.trim(first * BS64, (n * BS64) as u32);
        c.flush();
        c.disconnect();
    }
    server.kill9();
    server = restart(&pool, &[]);
    check_all(&server, None, "after trim + flush + crash");
    assert!(server.stop());
    check_pool(&pool, 0, "after trimming everything");

    // And the space is reusable: write again, crash, all there, N allocated.
    server = pool.serve();
    write_all(&server, 4);
    server.kill9();
    server = restart(&pool, &[]);
    check_all(&server, Some(4), "after rewrite of trimmed blocks + crash");
    assert!(server.stop());
    check_pool(&pool, n, "after rewrite");
}

/// (d) With a 1 MiB checkpoint threshold and a 5 ms commit interval the
/// journal is checkpointed (a new generation) many times under load; kill -9
/// lands before, during or after checkpoints; all flushed data survives.
#[test]
fn journal_recovery_across_checkpoints() {
    let seed = seed_from_env("journal_recovery_across_checkpoints");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = TestPool::with_volume("256M");
    let profile = write_profile(&pool, 5, 1);
    let extra = ["--profile", profile.as_str()];
    let mut server = restart(&pool, &extra);
    let g0 = journal_generation(&pool);
    let mut starts = 1;
    // Single-block writes over a small region: many frames, many overwrites
    // (CbFree entries), so the journal passes 1 MiB quickly.
    let mut model = Model::new(1024, 1024);
    let cfg = LoadCfg {
        iodepth: 32,
        flush_every: 32,
        fua: false,
        max_run: 1,
        trim_one_in: 8,
    };
    // Checkpoints so far: every start moves the generation on by two too.
    let checkpointed = |starts: u64| journal_generation(&pool) - g0 - 2 * (starts - 1);
    // Three rounds, and more (up to eight) on a machine too loaded to have
    // pushed the journal past two checkpoints by then.
    let mut iter = 0;
    while iter < 3 || (checkpointed(starts) < 2 && iter < 8) {
        let delay = Duration::from_millis(rng.gen_range(1200..2200));
        let (m, stats) = load_then_kill9(&mut server, model, cfg, rng.r#gen(), delay);
        model = m;
        let gen_at_kill = journal_generation(&pool);
        server = restart(&pool, &extra);
        starts += 1;
        let v = verify_region(
            &server.addr(),
            &mut model,
            &format!("seed {seed}, checkpoint iteration {iter}"),
        );
        println!(
            "checkpoint iteration {iter}: killed after {delay:?} ({} writes, {} flushes acked), journal generation at kill {gen_at_kill}; {} non-zero",
            stats.writes_acked, stats.flushes_acked, v.nonzero
        );
        iter += 1;
    }
    let checkpoints = checkpointed(starts);
    println!(
        "journal generations: {g0} -> {} over {starts} starts: {checkpoints} checkpoints under load",
        journal_generation(&pool)
    );
    assert!(
        checkpoints >= 2,
        "the load did not push the journal past its 1 MiB checkpoint threshold at least twice ({checkpoints}); the test proved nothing"
    );
    let v = verify_region(&server.addr(), &mut model, "final");
    assert!(server.stop());
    check_pool(
        &pool,
        v.nonzero,
        &format!("seed {seed}, after checkpoint crashes"),
    );
}

/// Walks the frames of the journal's current generation in its region's
/// file; returns `(that file, generation, end of the last valid frame,
/// [(start, len) of each frame])`.
fn journal_frames(dir: &Path) -> (PathBuf, u64, usize, Vec<(usize, usize)>) {
    let (generation, checkpoint, region) = journal_header(dir);
    let path = dir.join(if region == 0 { "journal" } else { "journal.1" });
    let j = std::fs::read(&path).unwrap();
    let mut pos = 8192usize;
    let mut expect = checkpoint + 1;
    let mut frames = Vec::new();
    while pos + 24 <= j.len() {
        let len = u32::from_le_bytes(j[pos..pos + 4].try_into().unwrap()) as usize;
        let fgen = u64::from_le_bytes(j[pos + 8..pos + 16].try_into().unwrap());
        let seq = u64::from_le_bytes(j[pos + 16..pos + 24].try_into().unwrap());
        if fgen != generation || seq != expect || pos + 24 + len > j.len() {
            break;
        }
        frames.push((pos, 24 + len));
        pos += 24 + len;
        expect += 1;
    }
    (path, generation, pos, frames)
}

/// (e) A damaged journal tail: after a clean stop, garbage after the last
/// valid frame, a torn frame (right generation and sequence, short payload,
/// bad crc), and finally a corrupted last frame. The server must start each
/// time, keep every earlier flushed write, and never fail a read.
#[test]
fn damaged_journal_tail_is_tolerated() {
    let pool = TestPool::with_volume("256M");
    let write_gen = |server: &Server, lbas: std::ops::Range<u64>, generation: u64| {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        for lba in lbas {
            let mut blk = vec![0u8; BS];
            record_block(lba, generation, &mut blk);
            c.write(lba * BS64, &blk, false);
        }
        c.flush();
        c.disconnect();
    };
    let expect = |server: &Server, lbas: std::ops::Range<u64>, allowed: &[u64], ctx: &str| {
        let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
        for lba in lbas {
            let got = c
                .read(lba * BS64, BS)
                .unwrap_or_else(|e| panic!("{ctx}: lba {lba}: {e}"));
            let ok = match classify(&got) {
                Seen::Record { lba: l, generation } => l == lba && allowed.contains(&generation),
                Seen::Zero => allowed.contains(&0),
                Seen::Garbage => false,
            };
            assert!(
                ok,
                "{ctx}: lba {lba} reads {:?}, allowed generations {allowed:?}",
                classify(&got)
            );
        }
        c.disconnect();
    };

    let mut server = pool.serve();
    write_gen(&server, 0..64, 1);
    write_gen(&server, 64..128, 2);
    assert!(server.stop());

    // 1. Random garbage where the next frame would go (and past the end).
    let (jpath, _, end, frames) = journal_frames(&pool.path());
    assert!(
        frames.len() >= 2,
        "expected journal frames after a clean stop, found {}",
        frames.len()
    );
    let garbage = common::pattern_bytes(99, 64 << 10);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&jpath)
            .unwrap();
        f.write_all_at(&garbage, end as u64).unwrap();
    }
    server = pool.serve();
    expect(&server, 0..64, &[1], "garbage after the last frame");
    expect(&server, 64..128, &[2], "garbage after the last frame");
    write_gen(&server, 128..192, 3);
    assert!(server.stop());

    // 2. A torn frame: valid header (generation, next sequence) whose payload was cut short.
    let (jpath, generation, end, frames) = journal_frames(&pool.path());
    let j = std::fs::read(&jpath).unwrap();
    assert!(!frames.is_empty(), "no frames after restart + writes");
    let (lstart, llen) = *frames.last().unwrap();
    let last_seq = u64::from_le_bytes(j[lstart + 16..lstart + 24].try_into().unwrap());
    let mut torn = Vec::new();
    torn.extend_from_slice(&(llen as u32 * 4).to_le_bytes());
    torn.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
    torn.extend_from_slice(&generation.to_le_bytes());
    torn.extend_from_slice(&(last_seq + 1).to_le_bytes());
    torn.extend_from_slice(&j[lstart + 24..lstart + llen]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&jpath)
            .unwrap();
        f.write_all_at(&torn, end as u64).unwrap();
        f.set_len((end + torn.len()) as u64).unwrap();
    }
    server = pool.serve();
    expect(&server, 0..192, &[1, 2, 3], "torn frame at the tail");
    expect(&server, 128..192, &[3], "torn frame at the tail");
    write_gen(&server, 192..256, 4);
    assert!(server.stop());

    // 3. The last frame itself damaged (one flipped byte in its payload): it
    // is dropped, so its blocks read old (zeros here) or new, never an error,
    // and everything in earlier frames is intact.
    let (jpath, _, _, frames) = journal_frames(&pool.path());
    let j = std::fs::read(&jpath).unwrap();
    let (lstart, llen) = *frames.last().unwrap();
    let mut j2 = j.clone();
    j2[lstart + llen - 5] ^= 0x5a;
    std::fs::write(&jpath, &j2).unwrap();
    server = pool.serve();
    assert!(server.is_running());
    expect(&server, 0..64, &[1], "last frame corrupted");
    expect(&server, 64..128, &[2], "last frame corrupted");
    expect(&server, 128..192, &[3], "last frame corrupted");
    expect(&server, 192..256, &[0, 4], "last frame corrupted");
    // Still writable and consistent afterwards.
    write_gen(&server, 256..260, 5);
    server.kill9();
    server = pool.serve();
    expect(
        &server,
        256..260,
        &[5],
        "write after recovery from a corrupted tail",
    );
    let mut c = Nbd::connect(&server.addr(), "vol0").unwrap();
    let all = c.read(0, (260 * BS64) as usize).unwrap();
    let nonzero = all.chunks(BS).filter(|b| b.iter().any(|&x| x != 0)).count() as u64;
    c.disconnect();
    assert!(server.stop());
    check_pool(&pool, nonzero, "after journal tail damage");
}
