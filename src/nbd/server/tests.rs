use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::*;
use crate::nbd::export::{Export, ExportCatalog, ExportError};
use crate::nbd::export::{ExportInfo, Extent};
use crate::nbd::proto::*;
use std::sync::Mutex;
use tokio::net::TcpStream;

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Reads at this offset are slowed down, to force out-of-order replies.
const SLOW_OFFSET: u64 = 8 * BLOCK;

/// An in-memory export that tracks which 4 KiB blocks hold data.
struct MemExport {
    data: Mutex<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
}

impl MemExport {
    fn new() -> Self {
        MemExport {
            data: Mutex::new(vec![0; SIZE as usize]),
            allocated: Mutex::new(vec![false; (SIZE / BLOCK) as usize]),
        }
    }

    fn mark(&self, offset: u64, length: u64, allocated: bool) {
        let mut a = self.allocated.lock().unwrap();
        if allocated {
            for b in offset / BLOCK..(offset + length).div_ceil(BLOCK) {
                a[b as usize] = true;
            }
        } else {
            // Only whole blocks become holes.
            for b in offset.div_ceil(BLOCK)..(offset + length) / BLOCK {
                a[b as usize] = false;
            }
        }
    }

    fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if offset == SLOW_OFFSET {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        if offset == SIZE - BLOCK && data.first() == Some(&0xee) {
            return Err(ExportError::Io("injected failure".into()));
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        self.mark(offset, data.len() as u64, true);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), ExportError> {
        self.write_zeroes(offset, length, false).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _fua: bool) -> Result<(), ExportError> {
        self.data.lock().unwrap()[offset as usize..(offset + length) as usize].fill(0);
        self.mark(offset, length, false);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, ExportError> {
        let a = self.allocated.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < offset + length {
            let end = ((pos / BLOCK + 1) * BLOCK).min(offset + length);
            let hole = !a[(pos / BLOCK) as usize];
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += end - pos,
                _ => out.push(Extent {
                    length: end - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

struct Catalog(Arc<MemExport>);

impl ExportCatalog for Catalog {
    type Export = MemExport;
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol0".into(),
            description: "test volume".into(),
        }]
    }
    fn open(&self, name: &str) -> Option<Arc<MemExport>> {
        (name == "vol0").then(|| self.0.clone())
    }
}

struct Server {
    addr: SocketAddr,
    export: Arc<MemExport>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: ServerConfig) -> Server {
    let listener = bind("127.0.0.1:0").await.unwrap();
    let BoundAddr::Tcp(addr) = listener.local_addr().clone() else {
        panic!("not tcp")
    };
    assert_ne!(addr.port(), 0);
    let export = Arc::new(MemExport::new());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Catalog(export.clone())),
        config,
        rx,
    ));
    Server {
        addr,
        export,
        stop,
        task,
    }
}

/// A raw NBD client speaking bytes, for exercising the server.
struct Client {
    s: TcpStream,
}

#[derive(Debug, PartialEq)]
enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
        }
    }

    /// Greeting, then client flags.
    async fn greet(addr: SocketAddr, cflags: u32) -> Client {
        let mut c = Client::connect(addr).await;
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).await.unwrap();
        assert_eq!(g, server_greeting());
        c.s.write_all(&cflags.to_be_bytes()).await.unwrap();
        c
    }

    async fn send_opt(&mut self, code: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (opt, kind, d)
    }

    /// Sends INFO or GO; returns (size, flags, block sizes, final reply type).
    async fn info(&mut self, code: u32, name: &str, reqs: &[u16]) -> (u64, u16, Vec<u32>, u32) {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            p.extend_from_slice(&r.to_be_bytes());
        }
        self.send_opt(code, &p).await;
        let (mut size, mut flags, mut block) = (0, 0, vec![]);
        loop {
            let (opt, kind, d) = self.opt_reply().await;
            assert_eq!(opt, code);
            if kind != REP_INFO {
                return (size, flags, block, kind);
            }
            match u16::from_be_bytes([d[0], d[1]]) {
                INFO_EXPORT => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                INFO_BLOCK_SIZE => {
                    block = d[2..]
                        .chunks(4)
                        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                        .collect()
                }
                _ => {}
            }
        }
    }

    async fn meta(&mut self, code: u32, name: &str, queries: &[&str]) -> (Vec<(u32, String)>, u32) {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        self.send_opt(code, &p).await;
        let mut ctxs = vec![];
        loop {
            let (_, kind, d) = self.opt_reply().await;
            if kind != REP_META_CONTEXT {
                return (ctxs, kind);
            }
            let id = u32::from_be_bytes(d[0..4].try_into().unwrap());
            ctxs.push((id, String::from_utf8(d[4..].to_vec()).unwrap()));
        }
    }

    /// A full handshake with GO.
    async fn open(addr: SocketAddr, structured: bool) -> Client {
        let mut c = Client::greet(addr, 3).await;
        if structured {
            c.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(c.opt_reply().await.1, REP_ACK);
            let (ctx, kind) = c
                .meta(OPT_SET_META_CONTEXT, "vol0", &[BASE_ALLOCATION])
                .await;
            assert_eq!((ctx.len(), kind), (1, REP_ACK));
        }
        let (size, _, _, kind) = c.info(OPT_GO, "vol0", &[]).await;
        assert_eq!((size, kind), (SIZE, REP_ACK));
        c
    }

    async fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one reply; `read_len` is the data length of a simple READ reply.
    async fn reply(&mut self, read_len: usize) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.unwrap();
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).await.unwrap();
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).await.unwrap();
                Reply::Simple {
                    cookie,
                    error,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).await.unwrap();
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).await.unwrap();
                Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    payload,
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(0, CMD_WRITE, 1, offset, data.len() as u32, data)
            .await;
        match self.reply(0).await {
            Reply::Simple {
                cookie: 1, error, ..
            } => error,
            Reply::Chunk {
                kind: REPLY_TYPE_ERROR,
                payload,
                ..
            } => u32::from_be_bytes(payload[0..4].try_into().unwrap()),
            r => panic!("unexpected {r:?}"),
        }
    }

    /// A READ on a simple-reply connection.
    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 2, offset, len, &[]).await;
        match self.reply(len as usize).await {
            Reply::Simple {
                cookie: 2,
                error: 0,
                data,
            } => Ok(data),
            Reply::Simple {
                cookie: 2, error, ..
            } => Err(error),
            r => panic!("unexpected {r:?}"),
        }
    }

    /// Waits until the server closes the connection (EOF or reset).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match self.s.read(&mut b).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await;
        r.unwrap_or(false)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Proof that the server still serves correct data after abuse.
async fn second_client_reads(srv: &Server) {
    let mut c = Client::open(srv.addr, false).await;
    let expect = srv.export.snapshot(0, 8192);
    assert_eq!(c.read(0, 8192).await.unwrap(), expect);
    assert_eq!(c.write(0, &expect).await, 0);
}

#[tokio::test]
async fn handshake_options() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::greet(srv.addr, 1).await;
    // Unknown option: ERR_UNSUP, parsing continues.
    c.send_opt(0x7654321, b"\x00\x01\x02\x03").await;
    assert_eq!(
        c.opt_reply().await,
        (
            0x7654321,
            RepError::Unsup.code(),
            b"option not supported".to_vec()
        )
    );
    // LIST.
    c.send_opt(OPT_LIST, &[]).await;
    let (_, kind, d) = c.opt_reply().await;
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&d[4..8], b"vol0");
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    // LIST with payload.
    c.send_opt(OPT_LIST, b"junk").await;
    assert_eq!(c.opt_reply().await.1, RepError::Invalid.code());
    // STARTTLS refused.
    c.send_opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.1, RepError::Policy.code());
    // Meta context before structured replies.
    let (_, kind) = c
        .meta(OPT_SET_META_CONTEXT, "vol0", &[BASE_ALLOCATION])
        .await;
    assert_eq!(kind, RepError::Invalid.code());
    // Unknown export.
    assert_eq!(
        c.info(OPT_INFO, "nope", &[]).await.3,
        RepError::Unknown.code()
    );
    // STRUCTURED_REPLY with payload, then properly.
    c.send_opt(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.opt_reply().await.1, RepError::Invalid.code());
    c.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    let (ctxs, kind) = c.meta(OPT_LIST_META_CONTEXT, "vol0", &["base:"]).await;
    assert_eq!(
        (ctxs, kind),
        (vec![(0, BASE_ALLOCATION.to_string())], REP_ACK)
    );
    let (ctxs, kind) = c
        .meta(
            OPT_SET_META_CONTEXT,
            "vol0",
            &[BASE_ALLOCATION, "x-nope:foo"],
        )
        .await;
    assert_eq!(
        (ctxs, kind),
        (vec![(1, BASE_ALLOCATION.to_string())], REP_ACK)
    );
    // INFO and GO agree.
    let info = c
        .info(OPT_INFO, "vol0", &[INFO_BLOCK_SIZE, INFO_NAME])
        .await;
    let go = c.info(OPT_GO, "vol0", &[INFO_BLOCK_SIZE, INFO_NAME]).await;
    assert_eq!(info, go);
    assert_eq!(info.0, SIZE);
    assert_eq!(info.2, vec![1, 4096, 32 << 20]);
    assert_eq!(info.1, transmission_flags(true));
    assert_eq!(info.3, REP_ACK);
    // Transmission works, with block status.
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 8192, &[]).await;
    let Reply::Chunk {
        kind,
        flags,
        payload,
        ..
    } = c.reply(0).await
    else {
        panic!()
    };
    assert_eq!((kind, flags), (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE));
    assert_eq!(&payload[..], &[0, 0, 0, 1, 0, 0, 0x20, 0, 0, 0, 0, 3]);
}

#[tokio::test]
async fn abort_and_bad_flags() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::greet(srv.addr, 1).await;
    c.send_opt(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    assert!(c.closed().await);
    // Unknown client flag: dropped.
    let mut c = Client::greet(srv.addr, 1 | 1 << 7).await;
    assert!(c.closed().await);
    // Non-fixed newstyle: refused.
    let mut c = Client::greet(srv.addr, 0).await;
    assert!(c.closed().await);
    // Bad option magic.
    let mut c = Client::greet(srv.addr, 1).await;
    c.s.write_all(&[0x55; 16]).await.unwrap();
    assert!(c.closed().await);
    second_client_reads(&srv).await;
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let srv = start(ServerConfig::default()).await;
    for cflags in [1u32, 3] {
        let mut c = Client::greet(srv.addr, cflags).await;
        c.send_opt(OPT_EXPORT_NAME, b"vol0").await;
        let mut r = vec![0u8; if cflags == 3 { 10 } else { 134 }];
        c.s.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), SIZE);
        assert_eq!(u16::from_be_bytes([r[8], r[9]]), transmission_flags(false));
        assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);
    }
    // Unknown export through EXPORT_NAME: the server must close.
    let mut c = Client::greet(srv.addr, 1).await;
    c.send_opt(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn oversized_options() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::greet(srv.addr, 1).await;
    // Over the option limit but drainable: ERR_TOO_BIG, still framed.
    c.send_opt(0x4444, &vec![0u8; 100 << 10]).await;
    assert_eq!(c.opt_reply().await.1, RepError::TooBig.code());
    c.send_opt(OPT_LIST, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_SERVER);
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    // An absurd length: closed without reading (or allocating) it.
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    assert!(c.closed().await);
    // A GO whose inner name length lies.
    let mut c = Client::greet(srv.addr, 1).await;
    c.send_opt(OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).await;
    assert_eq!(c.opt_reply().await.1, RepError::Invalid.code());
    second_client_reads(&srv).await;
}

#[tokio::test]
async fn simple_read_write_and_commands() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, false).await;
    let d = pattern(1, 65536);
    assert_eq!(c.write(4096, &d).await, 0);
    assert_eq!(c.read(4096, 65536).await.unwrap(), d);
    // Unaligned, 1 byte, last byte.
    assert_eq!(c.write(SIZE - 1, &[7]).await, 0);
    assert_eq!(c.read(SIZE - 3, 3).await.unwrap(), vec![0, 0, 7]);
    // Zero-length requests succeed and do not disconnect.
    assert_eq!(c.read(0, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(c.write(0, &[]).await, 0);
    for (kind, flags) in [
        (CMD_FLUSH, 0),
        (CMD_TRIM, CMD_FLAG_FUA),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
        (CMD_CACHE, 0),
    ] {
        c.request(flags, kind, 9, 8192, 4096, &[]).await;
        assert_eq!(
            c.reply(0).await,
            Reply::Simple {
                cookie: 9,
                error: 0,
                data: vec![]
            }
        );
    }
    assert_eq!(srv.export.snapshot(8192, 4096), vec![0; 4096]);
    assert_eq!(srv.export.snapshot(4096, 4096), d[..4096]);
    // Block status without structured replies: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 4096, &[]).await;
    assert_eq!(
        c.reply(0).await,
        Reply::Simple {
            cookie: 3,
            error: 22,
            data: vec![]
        }
    );
    // Export errors are reported, not fatal.
    assert_eq!(c.write(SIZE - BLOCK, &[0xee; 16]).await, 5);
    assert_eq!(c.read(0, 16).await.unwrap().len(), 16);
}

#[tokio::test]
async fn structured_reads_and_block_status() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, true).await;
    let d = pattern(2, 10000);
    assert_eq!(c.write(5000, &d).await, 0);
    c.request(CMD_FLAG_DF, CMD_READ, 11, 5000, 10000, &[]).await;
    let Reply::Chunk {
        flags,
        kind,
        cookie,
        payload,
    } = c.reply(0).await
    else {
        panic!()
    };
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 11)
    );
    assert_eq!(u64::from_be_bytes(payload[0..8].try_into().unwrap()), 5000);
    assert_eq!(&payload[8..], &d[..]);
    // Zero-length structured read: a NONE chunk.
    c.request(0, CMD_READ, 12, 0, 0, &[]).await;
    assert_eq!(
        c.reply(0).await,
        Reply::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            cookie: 12,
            payload: vec![]
        }
    );
    // Out of range read: structured error, no data.
    c.request(0, CMD_READ, 13, SIZE - 512, 1024, &[]).await;
    let Reply::Chunk {
        kind,
        cookie,
        payload,
        ..
    } = c.reply(0).await
    else {
        panic!()
    };
    assert_eq!((kind, cookie), (REPLY_TYPE_ERROR, 13));
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    // Block status: blocks 1..=3 hold data, the rest is hole+zero.
    c.request(0, CMD_BLOCK_STATUS, 14, 0, 32768, &[]).await;
    let Reply::Chunk { kind, payload, .. } = c.reply(0).await else {
        panic!()
    };
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
    let ext: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext, vec![(4096, 3), (12288, 0), (16384, 3)]);
    // REQ_ONE: one extent, not beyond the request.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 15, 100, 5000, &[])
        .await;
    let Reply::Chunk { payload, .. } = c.reply(0).await else {
        panic!()
    };
    assert_eq!(payload.len(), 12);
    assert_eq!(&payload[4..12], &[0, 0, 0x0f, 0x9c, 0, 0, 0, 3]);
    // Beyond the end: error.
    c.request(0, CMD_BLOCK_STATUS, 16, SIZE, 4096, &[]).await;
    let Reply::Chunk { kind, .. } = c.reply(0).await else {
        panic!()
    };
    assert_eq!(kind, REPLY_TYPE_ERROR);
}

#[tokio::test]
async fn replies_out_of_order() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, false).await;
    c.request(0, CMD_READ, 100, SLOW_OFFSET, 512, &[]).await;
    c.request(0, CMD_READ, 200, 0, 512, &[]).await;
    let Reply::Simple { cookie: first, .. } = c.reply(512).await else {
        panic!()
    };
    let Reply::Simple { cookie: second, .. } = c.reply(512).await else {
        panic!()
    };
    assert_eq!((first, second), (200, 100));
}

#[tokio::test]
async fn bad_requests_keep_connection() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, false).await;
    let tail = srv.export.snapshot(SIZE - 4096, 4096);
    // Write crossing the end: ENOSPC, payload drained, tail intact.
    assert_eq!(c.write(SIZE - 512, &[0xaa; 1024]).await, 28);
    assert_eq!(c.read(SIZE - 4096, 4096).await.unwrap(), tail);
    assert_eq!(c.read(SIZE - 512, 1024).await, Err(22));
    assert_eq!(c.read(u64::MAX - 511, 1024).await, Err(22));
    // Over the max payload: EINVAL, drained.
    let big = vec![0x33u8; (32 << 20) + 1];
    assert_eq!(c.write(0, &big).await, 22);
    assert_eq!(c.read(0, (32 << 20) + 1).await, Err(22));
    // Unknown command and bad flags.
    c.request(0, 0x4242, 5, 0, 512, &[]).await;
    assert_eq!(
        c.reply(0).await,
        Reply::Simple {
            cookie: 5,
            error: 22,
            data: vec![]
        }
    );
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 6, 0, 512, &[]).await;
    assert_eq!(
        c.reply(0).await,
        Reply::Simple {
            cookie: 6,
            error: 22,
            data: vec![]
        }
    );
    assert_eq!(c.read(0, 512).await.unwrap(), srv.export.snapshot(0, 512));
    second_client_reads(&srv).await;
}

#[tokio::test]
async fn garbage_and_truncation_close_only_that_client() {
    let srv = start(ServerConfig::default()).await;
    // Bad request magic.
    let mut c = Client::open(srv.addr, false).await;
    c.s.write_all(&[0x42; 28]).await.unwrap();
    assert!(c.closed().await);
    // An absurd write length: closed, not drained for gigabytes.
    let mut c = Client::open(srv.addr, false).await;
    c.request(0, CMD_WRITE, 1, 0, u32::MAX, &[]).await;
    assert!(c.closed().await);
    // A truncated write is not applied.
    let mut c = Client::open(srv.addr, false).await;
    c.request(0, CMD_WRITE, 1, 65536, 4096, &[0x99; 1000]).await;
    c.s.shutdown().await.unwrap();
    assert!(c.closed().await);
    drop(c);
    // A truncated header.
    let mut c = Client::open(srv.addr, false).await;
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(srv.export.snapshot(65536, 4096), vec![0; 4096]);
    second_client_reads(&srv).await;
}

#[tokio::test]
async fn disc_finishes_preceding_write() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, false).await;
    let d = pattern(3, 65536);
    c.request(0, CMD_WRITE, 1, 131072, 65536, &d).await;
    c.request(0, CMD_DISC, 2, 0, 0, &[]).await;
    // A polite client half-closes and drains.
    c.s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest.len(), 16, "only the write's reply, none for DISC");
    assert_eq!(srv.export.snapshot(131072, 65536), d);
}

#[tokio::test]
async fn stalled_handshake_does_not_block_and_times_out() {
    let srv = start(ServerConfig {
        handshake_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await;
    let mut stalled = Client::connect(srv.addr).await;
    second_client_reads(&srv).await;
    assert!(stalled.closed().await);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_and_returns() {
    let srv = start(ServerConfig::default()).await;
    let mut c = Client::open(srv.addr, false).await;
    c.request(0, CMD_READ, 7, SLOW_OFFSET, 512, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.stop.send(true).unwrap();
    // The in-flight read still gets its reply, then the server closes.
    assert_eq!(
        c.reply(512).await,
        Reply::Simple {
            cookie: 7,
            error: 0,
            data: vec![0; 512]
        }
    );
    assert!(c.closed().await);
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(srv.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_with_client_not_reading_replies() {
    let srv = start(ServerConfig {
        close_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut c = Client::open(srv.addr, false).await;
    // Far more reply bytes than socket buffers hold, never read.
    for i in 0..100 {
        c.request(0, CMD_READ, i, 0, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .expect("serve returns despite a stuck client")
        .unwrap();
}

#[tokio::test]
async fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = bind(path.to_str().unwrap()).await.unwrap();
    assert_eq!(listener.local_addr(), &BoundAddr::Unix(path.clone()));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Catalog(Arc::new(MemExport::new()))),
        ServerConfig::default(),
        rx,
    ));
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(g, server_greeting());
    drop(s);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn bind_addresses() {
    assert!(matches!(bind("").await, Err(BindError::Empty)));
    let l = bind("[::1]:0").await;
    // IPv6 loopback may be missing in some sandboxes.
    if let Ok(l) = l {
        assert!(matches!(l.local_addr(), BoundAddr::Tcp(a) if a.is_ipv6() && a.port() != 0));
    }
    assert!(bind("127.0.0.1:notaport").await.is_err());
}
