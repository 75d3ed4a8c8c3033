//! The embedded stream transport: agents connect over TCP, say who they
//! are, and receive a zone's records from a sequence number on.
//!
//! Frames both ways: `[u32 LE length n][u8 type][n-1 bytes]`.
//! ```text
//! agent → source                          source → agent
//! 1 HELLO   {"agent","zone"}              64 WELCOME  {"stream_id","first_seq","last_seq","volumes",...}
//! 2 KEYS    {"windows":[[set,window]..]}  66 KEYS     {"keys":[hand-out..],"refused":[{key_id,reason}..]}
//! 3 ACK     u64 applied sequence          65 RECORD   a record
//! 4 FETCH   u64 sequence                  68 FETCHED  a record (to resolve a reference)
//! 5 SNAPSHOT {"volume","first","count"}   69 CHUNK    a sealed snapshot chunk
//! 6 FOLLOW  u64 first sequence wanted     67 ERROR    {"error","kind"} and the connection closes
//! 7 DIGEST  {"volume","first","count",    70 DIGESTS  plaintext digests, sealed to the agent's key
//!            "chunk_blocks"}
//! ```
//! Digests (BLAKE3 of each chunk's plaintext) are for `verify-replica`:
//! each side hashes its own plaintext and only hashes cross, sealed so
//! that only the registered agent's key holder reads them.
//! Records are sent only up to the last durable one, in order; a FOLLOW
//! from a sequence no longer kept gets ERROR kind "behind-retention".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ZoneStream;
use super::grant::{Agent, HandOut, hand_out};
use super::record::{WindowId, key_id};
use crate::crypto::tag::Tag;
use crate::ids::VolumeId;

/// Frame types.
pub mod kind {
    /// Agent: who it is.
    pub const HELLO: u8 = 1;
    /// Agent: window keys wanted.
    pub const KEYS: u8 = 2;
    /// Agent: applied through.
    pub const ACK: u8 = 3;
    /// Agent: one record again.
    pub const FETCH: u8 = 4;
    /// Agent: a chunk of a volume for a full sync.
    pub const SNAPSHOT: u8 = 5;
    /// Agent: send records from this sequence on.
    pub const FOLLOW: u8 = 6;
    /// Agent: plaintext digests of volumes.
    pub const DIGEST: u8 = 7;
    /// Source: digests, sealed to the agent.
    pub const DIGESTS: u8 = 70;
    /// Source: hello answered.
    pub const WELCOME: u8 = 64;
    /// Source: a record.
    pub const RECORD: u8 = 65;
    /// Source: window keys.
    pub const KEYS_REPLY: u8 = 66;
    /// Source: an error; the connection closes.
    pub const ERROR: u8 = 67;
    /// Source: a fetched record.
    pub const FETCHED: u8 = 68;
    /// Source: a snapshot chunk.
    pub const CHUNK: u8 = 69;
}

/// Largest snapshot chunk on the TCP transport, blocks.
pub const SNAPSHOT_BLOCKS: u32 = 256;

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = super::record::MAX_RECORD_LEN + 1024;

/// A volume as the source describes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeDesc {
    /// Source volume id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// HELLO.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Registered agent name.
    pub agent: String,
    /// Zone name.
    pub zone: String,
}

/// WELCOME.
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// Stream id (hex).
    pub stream_id: String,
    /// Source zone id (window key ids name it).
    pub zone_id: u32,
    /// Oldest record kept.
    pub first_seq: u64,
    /// Last durable record.
    pub last_seq: u64,
    /// The zone's volumes now.
    pub volumes: Vec<VolumeDesc>,
    /// Window length, seconds.
    pub window_secs: u64,
}

/// SNAPSHOT.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReq {
    /// Source volume id.
    pub volume: u32,
    /// First block.
    pub first: u64,
    /// Blocks (at most 256).
    pub count: u32,
}

/// DIGEST request: chunks of `chunk_blocks` blocks over `[first,
/// first+count)` of one volume, or over every volume when `volume` is none.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestReq {
    /// Source volume id (none: every volume, whole).
    pub volume: Option<u32>,
    /// First block.
    pub first: u64,
    /// Blocks (ignored for every volume).
    pub count: u64,
    /// Blocks per digest (1..=256).
    pub chunk_blocks: u32,
}

/// One volume's digests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeDigests {
    /// Source volume id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// First block digested.
    pub first: u64,
    /// Blocks per digest.
    pub chunk_blocks: u32,
    /// BLAKE3 of each chunk's plaintext, hex.
    pub digests: Vec<String>,
}

/// DIGESTS, once opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Digests {
    /// The stream's last durable record before hashing began.
    pub seq_before: u64,
    /// And after it ended: equal means no write came between.
    pub seq_after: u64,
    /// Per volume.
    pub volumes: Vec<VolumeDigests>,
}

/// KEYS request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysReq {
    /// Windows as (set, window).
    pub windows: Vec<(u32, u32)>,
}

/// A refused window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    /// Key id.
    pub key_id: String,
    /// Why.
    pub reason: String,
}

/// KEYS reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeysReply {
    /// Keys handed out.
    pub keys: Vec<HandOut>,
    /// Windows refused.
    pub refused: Vec<Refused>,
}

/// ERROR.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Message.
    pub error: String,
    /// Kind: "unknown-agent", "unknown-zone", "behind-retention", "bad-request", "broken".
    pub kind: String,
}

/// Blocks read for a snapshot: tags (`None` for zeros) and plaintext.
pub type Blocks = (Vec<Option<Tag>>, crate::crypto::wipe::Wiped);

/// What the transport needs from the pool.
pub trait StreamSource: Send + Sync + 'static {
    /// The zone's stream, if it streams.
    fn stream(&self, zone: &str) -> Option<Arc<ZoneStream>>;
    /// A registered agent of the zone.
    fn agent(&self, zone: &str, name: &str) -> Option<Agent>;
    /// The zone's volumes.
    fn volumes(&self, zone: &str) -> Vec<VolumeDesc>;
    /// Reads blocks of a volume of the zone, with their tags.
    fn read_blocks<'a>(
        &'a self,
        zone: &'a str,
        volume: u32,
        first: u64,
        count: u32,
    ) -> Pin<Box<dyn Future<Output = Result<Blocks, String>> + Send + 'a>>;
    /// The zones that stream now.
    fn streaming_zones(&self) -> Vec<String>;
    /// Records key hand-outs and refusals in the audit log.
    fn audit_keys(&self, zone: &str, agent: &str, given: &[String], refused: &[Refused]);
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    head[4] = kind;
    w.write_all(&head).await?;
    w.write_all(body).await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    let mut body = vec![0u8; n - 1];
    r.read_exact(&mut body).await?;
    Ok(Some((head[4], body)))
}

/// A JSON body.
pub(super) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data")
}

async fn refuse<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    kind: &str,
    error: String,
) -> std::io::Result<()> {
    tracing::info!(kind, %error, "stream: refusing an agent request");
    write_frame(
        w,
        kind::ERROR,
        &json(&ErrorMsg {
            error,
            kind: kind.into(),
        }),
    )
    .await
}

/// The TLS handshake, bounded in time like the hello, then the agent.
async fn serve_tls_agent(
    source: Arc<dyn StreamSource>,
    sock: TcpStream,
    tls: &crate::tls::ServerTls,
) -> std::io::Result<()> {
    let accept = tls.acceptor().accept(sock);
    let stream = tokio::time::timeout(std::time::Duration::from_secs(10), accept)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        .inspect_err(
            |e| tracing::warn!(error = %e, "stream agent refused: TLS handshake failed"),
        )?;
    serve_agent(source, stream).await
}

fn u64_body(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Serves one agent connection (plain TCP or TLS) until it closes.
pub async fn serve_agent<S>(source: Arc<dyn StreamSource>, sock: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(sock);
    // The hello must come quickly: a silent peer does not keep a task.
    let hello =
        match tokio::time::timeout(std::time::Duration::from_secs(10), read_frame(&mut rd)).await {
            Ok(Ok(Some((kind::HELLO, b)))) => serde_json::from_slice::<Hello>(&b).ok(),
            _ => None,
        };
    let Some(hello) = hello else {
        return refuse(
            &mut wr,
            "bad-request",
            "expected HELLO {\"agent\", \"zone\"}".into(),
        )
        .await;
    };
    let Some(stream) = source.stream(&hello.zone) else {
        return refuse(
            &mut wr,
            "unknown-zone",
            format!("zone {:?} does not stream (or does not exist)", hello.zone),
        )
        .await;
    };
    let Some(_) = source.agent(&hello.zone, &hello.agent) else {
        return refuse(
            &mut wr,
            "unknown-agent",
            format!(
                "agent {:?} is not registered for zone {:?}",
                hello.agent, hello.zone
            ),
        )
        .await;
    };
    let welcome = Welcome {
        stream_id: stream.id().to_hex(),
        zone_id: stream.zone().0,
        first_seq: stream.first_kept(),
        last_seq: stream.last_visible(),
        volumes: source.volumes(&hello.zone),
        window_secs: stream.keys().lock().window_secs(),
    };
    write_frame(&mut wr, kind::WELCOME, &json(&welcome)).await?;

    // Requests arrive on their own task, so records keep flowing while one waits.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = read_frame(&mut rd).await {
            if tx.send(f).await.is_err() {
                break;
            }
        }
    });
    let mut visible = stream.subscribe();
    let mut next: Option<u64> = None;
    let mut cursor: Option<super::Cursor> = None;
    let result = loop {
        // Send what is durable, in batches, before waiting again.
        if let Some(n) = next {
            let last = *visible.borrow_and_update();
            if n <= last {
                let s = stream.clone();
                let mut c = cursor.take();
                let (batch, c) =
                    tokio::task::spawn_blocking(move || (s.read_at(&mut c, n, last, 4 << 20), c))
                        .await
                        .map_err(std::io::Error::other)?;
                cursor = c;
                match batch {
                    Ok(recs) if !recs.is_empty() => {
                        for r in &recs {
                            write_frame(&mut wr, kind::RECORD, r).await?;
                        }
                        next = Some(n + recs.len() as u64);
                        continue;
                    }
                    Ok(_) | Err(_) => {
                        break refuse(&mut wr, "behind-retention", format!(
                            "record {n} of zone {:?} is no longer kept (oldest kept: {}); a full resync is needed",
                            hello.zone, stream.first_kept())).await;
                    }
                }
            }
        }
        tokio::select! {
            changed = visible.changed() => if changed.is_err() { break Ok(()) },
            req = rx.recv() => {
                let Some((k, body)) = req else { break Ok(()) };
                match k {
                    kind::FOLLOW => {
                        let Some(from) = u64_body(&body) else {
                            break refuse(&mut wr, "bad-request", "FOLLOW takes a u64".into()).await;
                        };
                        let first = stream.first_kept();
                        if from < first {
                            break refuse(&mut wr, "behind-retention", format!(
                                "record {from} of zone {:?} is no longer kept (oldest kept: {first}); a full resync is needed",
                                hello.zone)).await;
                        }
                        if let Some(b) = stream.broken() {
                            break refuse(&mut wr, "broken", b).await;
                        }
                        next = Some(from.max(1));
                    }
                    kind::ACK => {
                        if let Some(seq) = u64_body(&body) {
                            stream.ack(&hello.agent, seq);
                        }
                    }
                    kind::FETCH => {
                        let Some(seq) = u64_body(&body).filter(|s| *s <= stream.last_visible()) else {
                            break refuse(&mut wr, "bad-request", "FETCH of a record not yet durable".into()).await;
                        };
                        let s = stream.clone();
                        match tokio::task::spawn_blocking(move || s.read(seq, seq, 1)).await.map_err(std::io::Error::other)? {
                            Ok(r) if r.len() == 1 => write_frame(&mut wr, kind::FETCHED, &r[0]).await?,
                            _ => break refuse(&mut wr, "behind-retention", format!("record {seq} is no longer kept")).await,
                        }
                    }
                    kind::KEYS | kind::DIGEST | kind::SNAPSHOT => {
                        let (k, b) = answer(source.as_ref(), &hello.zone, &hello.agent, k, &body, SNAPSHOT_BLOCKS).await;
                        write_frame(&mut wr, k, &b).await?;
                        if k == kind::ERROR {
                            break Ok(());
                        }
                    }
                    other => break refuse(&mut wr, "bad-request", format!("unknown request type {other}")).await,
                }
            }
        }
    };
    reader.abort();
    result
}

/// An ERROR reply, logged.
pub(super) fn refusal(kind: &str, error: String) -> (u8, Vec<u8>) {
    tracing::info!(kind, %error, "stream: refusing an agent request");
    let m = ErrorMsg {
        error,
        kind: kind.into(),
    };
    (kind::ERROR, serde_json::to_vec(&m).expect("plain data"))
}

/// One stateless request of an agent (HELLO, KEYS, SNAPSHOT of at most
/// `max_blocks`, DIGEST), answered alike on every transport: the reply's
/// type and body, an ERROR body when refused.
pub(super) async fn answer(
    source: &dyn StreamSource,
    zone: &str,
    agent_name: &str,
    k: u8,
    body: &[u8],
    max_blocks: u32,
) -> (u8, Vec<u8>) {
    let Some(stream) = source.stream(zone) else {
        return refusal(
            "unknown-zone",
            format!("zone {zone:?} does not stream (or does not exist)"),
        );
    };
    let Some(agent) = source.agent(zone, agent_name) else {
        return refusal(
            "unknown-agent",
            format!("agent {agent_name:?} is not registered for zone {zone:?}"),
        );
    };
    match k {
        kind::HELLO => {
            let ok = serde_json::from_slice::<Hello>(body)
                .is_ok_and(|h| h.zone == zone && h.agent == agent_name);
            if !ok {
                return refusal(
                    "bad-request",
                    "HELLO names another zone or agent than its subject and header".into(),
                );
            }
            let w = Welcome {
                stream_id: stream.id().to_hex(),
                zone_id: stream.zone().0,
                first_seq: stream.first_kept(),
                last_seq: stream.last_visible(),
                volumes: source.volumes(zone),
                window_secs: stream.keys().lock().window_secs(),
            };
            (kind::WELCOME, json(&w))
        }
        kind::KEYS => {
            let Ok(req) = serde_json::from_slice::<KeysReq>(body) else {
                return refusal(
                    "bad-request",
                    "KEYS takes {\"windows\": [[set, window], ...]}".into(),
                );
            };
            let reply = keys_for(&stream, &agent, &req);
            let given: Vec<String> = reply.keys.iter().map(|k| k.key_id.clone()).collect();
            source.audit_keys(zone, agent_name, &given, &reply.refused);
            (kind::KEYS_REPLY, json(&reply))
        }
        kind::SNAPSHOT => {
            let Ok(req) = serde_json::from_slice::<SnapshotReq>(body) else {
                return refusal(
                    "bad-request",
                    "SNAPSHOT takes {\"volume\", \"first\", \"count\"}".into(),
                );
            };
            if req.count == 0 || req.count > max_blocks {
                return refusal(
                    "bad-request",
                    format!("a snapshot chunk is 1-{max_blocks} blocks here"),
                );
            }
            match source
                .read_blocks(zone, req.volume, req.first, req.count)
                .await
            {
                Ok((tags, plain)) => match stream.seal_snapshot(
                    VolumeId(req.volume),
                    crate::ids::Lba(req.first),
                    &tags,
                    &plain,
                ) {
                    Ok(chunk) => (kind::CHUNK, chunk),
                    Err(e) => refusal("broken", e.to_string()),
                },
                Err(e) => refusal("bad-request", e),
            }
        }
        kind::DIGEST => {
            let Ok(req) = serde_json::from_slice::<DigestReq>(body) else {
                return refusal(
                    "bad-request",
                    "DIGEST takes {\"volume\", \"first\", \"count\", \"chunk_blocks\"}".into(),
                );
            };
            match digests(source, zone, &stream, &req).await {
                Ok(d) => match agent.public_bytes() {
                    Ok(public) => {
                        let sealed = super::grant::seal_to(
                            &public,
                            "keyturn digests",
                            &serde_json::to_vec(&d).expect("plain data"),
                        );
                        (kind::DIGESTS, json(&sealed))
                    }
                    Err(_) => refusal("unknown-agent", "the agent's public key is unusable".into()),
                },
                Err(e) => refusal("bad-request", e),
            }
        }
        other => refusal(
            "bad-request",
            format!("request type {other} is not served over NATS (records come from JetStream)"),
        ),
    }
}

/// Hashes a volume range in chunks.
pub async fn digest_range<F, Fut>(
    first: u64,
    end: u64,
    chunk_blocks: u32,
    mut read: F,
) -> Result<Vec<String>, String>
where
    F: FnMut(u64, u32) -> Fut,
    Fut: Future<Output = Result<crate::crypto::wipe::Wiped, String>>,
{
    let mut out = Vec::new();
    let mut b = first;
    while b < end {
        let n = (end - b).min(u64::from(chunk_blocks)) as u32;
        let plain = read(b, n).await?;
        out.push(blake3::hash(&plain).to_hex().to_string());
        b += u64::from(n);
    }
    Ok(out)
}

/// Digests of a zone's volumes (or one volume's range).
pub(super) async fn digests(
    source: &dyn StreamSource,
    zone: &str,
    stream: &ZoneStream,
    req: &DigestReq,
) -> Result<Digests, String> {
    if req.chunk_blocks == 0 || req.chunk_blocks > 256 {
        return Err("chunk_blocks is 1..=256".into());
    }
    let seq_before = stream.last_visible();
    let mut volumes = Vec::new();
    for v in source.volumes(zone) {
        if req.volume.is_some_and(|id| id != v.id) {
            continue;
        }
        let blocks = v.size / crate::ids::BLOCK_SIZE as u64;
        let (first, end) = match req.volume {
            Some(_) => (
                req.first.min(blocks),
                req.first.saturating_add(req.count).min(blocks),
            ),
            None => (0, blocks),
        };
        let digests = digest_range(first, end, req.chunk_blocks, |b, n| async move {
            source.read_blocks(zone, v.id, b, n).await.map(|(_, p)| p)
        })
        .await?;
        volumes.push(VolumeDigests {
            id: v.id,
            name: v.name,
            size: v.size,
            first,
            chunk_blocks: req.chunk_blocks,
            digests,
        });
    }
    Ok(Digests {
        seq_before,
        seq_after: stream.last_visible(),
        volumes,
    })
}

/// The window keys of `req` this agent's grant covers, sealed to it.
pub(super) fn keys_for(stream: &ZoneStream, agent: &Agent, req: &KeysReq) -> KeysReply {
    let mut reply = KeysReply {
        keys: Vec::new(),
        refused: Vec::new(),
    };
    let Ok(public) = agent.public_bytes() else {
        return reply;
    };
    let keys = stream.keys().lock();
    for &(set, window) in req.windows.iter().take(256) {
        let w = WindowId { set, window };
        let id = key_id(stream.zone().0, w);
        let start = keys.window_start(w);
        if !agent.grants(start) {
            reply.refused.push(Refused {
                key_id: id,
                reason: "outside this agent's grant".into(),
            });
            continue;
        }
        match keys.key(w) {
            Some(k) => reply.keys.push(hand_out(&public, &id, k.expose())),
            None => reply.refused.push(Refused {
                reason: keys.missing_reason(w).into(),
                key_id: id,
            }),
        }
    }
    reply
}

/// Accepts agents on `listener` until the task is dropped.
pub async fn run(listener: tokio::net::TcpListener, source: Arc<dyn StreamSource>) {
    run_secured(listener, source, None).await
}

/// [`run`], with TLS when `tls` is given: agents must then start TLS at
/// once (`keyturns://`), and, when the certificates name a client CA,
/// present a certificate that chains to it.
pub async fn run_secured(
    listener: tokio::net::TcpListener,
    source: Arc<dyn StreamSource>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let _ = sock.set_nodelay(true);
                let source = source.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let served = match tls {
                        None => serve_agent(source, sock).await,
                        Some(tls) => serve_tls_agent(source, sock, &tls).await,
                    };
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "stream connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "stream listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
