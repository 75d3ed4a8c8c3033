//! The replication agent: follows a source zone's change stream and keeps a
//! replica zone's volumes equal to it, under the replica zone's own keys.
//!
//! A new replica first copies every volume (a full sync, started at the
//! stream's last durable record S), then applies records from S+1 on. A
//! block the copy read before a later write is rewritten when that write's
//! record is applied, so the replica is exact from the moment it has
//! applied every record written during the copy.
//!
//! Every record is checked before it is applied: its stream id (another
//! zone's records are refused), its sequence (the next one, never a gap or
//! a repeat), and its GCM tag under the window key (a record outside the
//! agent's grant cannot be opened at all). Its data and the applied
//! sequence go into the replica pool's journal in one frame, so a crash of
//! the agent at any point resumes at the next record: no gap, no double
//! apply.
//!
//! `POOL/replicas/zone-<id>.json` holds what the agent knows of the source
//! (stream id, volume names, whether the full sync finished), and
//! `zone-<id>.status.json` its progress for `keyturn replica status`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::tag::Tag;
use crate::crypto::wipe::Wiped;
use crate::ids::{BLOCK_SIZE, VolumeId};
use crate::nbd::export::{Export, ExportCatalog};
use crate::pool::Pool;
use crate::stream::grant::AgentKey;
use crate::stream::record::{self, BlockRef, Body, Sealed, WindowId};
use crate::stream::serve::{self, ErrorMsg, KeysReply, KeysReq, SnapshotReq, Welcome, kind};

mod connect;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Talking to the source failed.
    #[error("source {addr}: {message}")]
    Source {
        /// Address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The source refused a request.
    #[error("source refused: {error} ({kind})")]
    Refused {
        /// Message.
        error: String,
        /// Kind.
        kind: String,
    },
    /// A record the agent will not apply.
    #[error("record refused, nothing applied: {0}")]
    BadRecord(String),
    /// A window key the agent may not have.
    #[error(
        "window key {key_id} was refused to agent {agent}: {reason}; records of that window cannot be read by this agent"
    )]
    NoKey {
        /// Key id.
        key_id: String,
        /// Agent.
        agent: String,
        /// Why.
        reason: String,
    },
    /// The replica pool.
    #[error("replica pool: {0}")]
    Pool(String),
}

impl From<crate::pool::PoolError> for ReplicaError {
    fn from(e: crate::pool::PoolError) -> Self {
        ReplicaError::Pool(e.to_string())
    }
}

mod nats;

/// Where the agent reads the stream from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The source server's stream listener, `HOST:PORT`.
    Keyturn(String),
    /// A NATS cluster the source publishes to: servers (comma-separated
    /// `HOST:PORT`s) and the subject prefix.
    Nats {
        /// Servers.
        servers: String,
        /// Subject prefix (`[stream.nats] prefix` at the source).
        prefix: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Keyturn(a) => write!(f, "keyturn://{a}"),
            Source::Nats { servers, .. } => write!(f, "nats://{servers}"),
        }
    }
}

/// What the agent is asked to do.
#[derive(Debug)]
pub struct AgentConfig {
    /// Where the stream comes from.
    pub source: Source,
    /// Source zone.
    pub zone: String,
    /// Registered agent name.
    pub agent: String,
    /// The agent's X25519 key.
    pub key: AgentKey,
    /// Replica zone in the local pool.
    pub replica_zone: String,
    /// Stop once this record is applied.
    pub until_seq: Option<u64>,
    /// Stop once every record durable at connection time is applied.
    pub until_caught_up: bool,
    /// Speak TLS to the source (`keyturns://`).
    pub tls: Option<crate::tls::ClientTls>,
}

/// What the agent keeps about its source.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Source zone.
    pub source_zone: String,
    /// Source stream id.
    pub stream_id: String,
    /// Source volume id → name.
    pub volumes: BTreeMap<u32, String>,
    /// Whether the full sync finished (records are applied from then on).
    pub synced: bool,
}

/// Progress, for `keyturn replica status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Replica zone.
    pub zone: String,
    /// Source zone.
    pub source_zone: String,
    /// Source address.
    pub source: String,
    /// "syncing", "following", "stopped" or "failed".
    pub phase: String,
    /// Last record applied (durable in the replica pool).
    pub applied_seq: u64,
    /// Last durable record at the source, as last heard.
    pub source_seq: u64,
    /// Records behind.
    pub lag_records: u64,
    /// Bytes of records received but not yet applied (approximate).
    pub lag_bytes: u64,
    /// Seconds between the last applied record's time and now.
    pub lag_seconds: f64,
    /// Median of that lag over the last 10,000 records applied.
    pub lag_p50_seconds: f64,
    /// 99th percentile of that lag over the last 10,000 records applied.
    pub lag_p99_seconds: f64,
    /// Records applied per second over the last interval.
    pub apply_rate: f64,
    /// Records applied since start.
    pub records_applied: u64,
    /// Full syncs done since start.
    pub full_syncs: u64,
    /// Last error.
    pub error: Option<String>,
    /// When written, unix ms.
    pub updated_ms: u64,
}

fn state_path(pool: &Path, zone: crate::ids::ZoneId) -> PathBuf {
    pool.join("replicas").join(format!("zone-{}.json", zone.0))
}

/// The status file of replica zone `zone` of the pool in `dir`.
pub fn status_path(pool: &Path, zone: crate::ids::ZoneId) -> PathBuf {
    pool.join("replicas")
        .join(format!("zone-{}.status.json", zone.0))
}

/// Reads the status file an agent keeps (the agent holds the pool, so
/// status is read from here, not from the pool).
pub fn read_status(pool_dir: &Path, zone: crate::ids::ZoneId) -> Option<ReplicaStatus> {
    serde_json::from_slice(&std::fs::read(status_path(pool_dir, zone)).ok()?).ok()
}

/// A connection to the source's stream listener. Frames are read on their
/// own task, so that waiting for one can be cancelled without losing part
/// of a frame.
/// A frame from the reader task: `None` at a clean end.
type FrameResult = std::io::Result<Option<(u8, Vec<u8>)>>;

struct Conn {
    addr: String,
    frames: tokio::sync::mpsc::Receiver<FrameResult>,
    reader: tokio::task::JoinHandle<()>,
    wr: connect::Wr,
    /// Records that arrived while the agent waited for another answer.
    held: VecDeque<Vec<u8>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn err(&self, e: impl std::fmt::Display) -> ReplicaError {
        ReplicaError::Source {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }

    async fn send(&mut self, k: u8, body: &[u8]) -> Result<(), ReplicaError> {
        let r = serve::write_frame(&mut self.wr, k, body).await;
        r.map_err(|e| self.err(e))
    }

    async fn recv(&mut self) -> Result<(u8, Vec<u8>), ReplicaError> {
        let next = self.frames.recv().await.unwrap_or(Ok(None));
        match next {
            Ok(Some((kind::ERROR, b))) => {
                let m: ErrorMsg = serde_json::from_slice(&b).map_err(|e| self.err(e))?;
                Err(ReplicaError::Refused {
                    error: m.error,
                    kind: m.kind,
                })
            }
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(self.err("connection closed")),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The answer of type `want`, holding records that come first.
    async fn answer(&mut self, want: u8) -> Result<Vec<u8>, ReplicaError> {
        loop {
            let (k, b) = self.recv().await?;
            if k == want {
                return Ok(b);
            }
            if k == kind::RECORD {
                self.held.push_back(b);
                continue;
            }
            return Err(self.err(format!("unexpected frame type {k}")));
        }
    }

    async fn next_record(&mut self) -> Result<Vec<u8>, ReplicaError> {
        if let Some(r) = self.held.pop_front() {
            return Ok(r);
        }
        self.answer(kind::RECORD).await
    }
}

/// The agent's link to its source, by transport.
enum Link {
    Tcp(Conn),
    Nats(Box<nats::NatsLink>),
}

impl Link {
    fn err(&self, e: impl std::fmt::Display) -> ReplicaError {
        match self {
            Link::Tcp(c) => c.err(e),
            Link::Nats(n) => ReplicaError::Source {
                addr: n.addr(),
                message: e.to_string(),
            },
        }
    }

    /// A request and its answer of type `want`.
    async fn call(&mut self, k: u8, body: &[u8], want: u8) -> Result<Vec<u8>, ReplicaError> {
        match self {
            Link::Tcp(c) => {
                c.send(k, body).await?;
                c.answer(want).await
            }
            Link::Nats(n) => n.call(k, body, want).await,
        }
    }

    /// Records from `from` on.
    async fn follow(&mut self, from: u64) -> Result<(), ReplicaError> {
        match self {
            Link::Tcp(c) => c.send(kind::FOLLOW, &from.to_le_bytes()).await,
            Link::Nats(n) => n.follow(from).await,
        }
    }

    /// The next record (cancel-safe).
    async fn next_record(&mut self) -> Result<Vec<u8>, ReplicaError> {
        match self {
            Link::Tcp(c) => c.next_record().await,
            Link::Nats(n) => n.next_record().await,
        }
    }

    /// Tells the source what is durable in the replica. Over NATS the
    /// source only shows it (JetStream, not the source, keeps records).
    async fn ack(&mut self, durable: u64) -> Result<(), ReplicaError> {
        match self {
            Link::Tcp(c) => c.send(kind::ACK, &durable.to_le_bytes()).await,
            Link::Nats(n) => n.ack(durable).await,
        }
    }

    /// Record `seq` again.
    async fn fetch(&mut self, seq: u64) -> Result<Vec<u8>, ReplicaError> {
        match self {
            Link::Tcp(c) => {
                c.send(kind::FETCH, &seq.to_le_bytes()).await?;
                c.answer(kind::FETCHED).await
            }
            Link::Nats(n) => n.fetch(seq).await,
        }
    }

    /// Bytes received and not yet applied.
    fn held_bytes(&self) -> u64 {
        match self {
            Link::Tcp(c) => c.held.iter().map(|r| r.len() as u64).sum(),
            Link::Nats(_) => 0,
        }
    }

    /// Blocks per snapshot chunk.
    fn snapshot_blocks(&self) -> u32 {
        match self {
            Link::Tcp(_) => 256,
            Link::Nats(n) => n.snapshot_blocks(),
        }
    }
}

/// The agent.
pub struct Agent {
    pool: Arc<Pool>,
    cfg: AgentConfig,
    zone_id: crate::ids::ZoneId,
    state: ReplicaState,
    keys: HashMap<WindowId, Zeroizing<[u8; 32]>>,
    /// Blocks the current window carried, for references (bounded).
    carried: HashMap<Tag, Wiped>,
    carried_window: Option<WindowId>,
    status: ReplicaStatus,
    last_status: Instant,
    rate_mark: (Instant, u64),
    /// The source zone's id (window key ids name it).
    source_zone: u32,
    /// Lag of recently applied records, seconds (a ring).
    lags: VecDeque<f64>,
}

/// Distinct blocks remembered for references (64 MiB).
const CARRIED_MAX: usize = 16384;

impl Agent {
    /// An agent applying to `pool`'s zone `cfg.replica_zone` (created if missing).
    pub fn new(pool: Arc<Pool>, cfg: AgentConfig) -> Result<Self, ReplicaError> {
        if pool.zone_id(&cfg.replica_zone).is_err() {
            pool.create_zone(&cfg.replica_zone)?;
        }
        let zone_id = pool.zone_id(&cfg.replica_zone)?;
        let path = state_path(pool.dir(), zone_id);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ReplicaError::Pool(format!("{}: {e}", path.display())))?,
            Err(_) => ReplicaState::default(),
        };
        if !state.source_zone.is_empty() && state.source_zone != cfg.zone {
            return Err(ReplicaError::Pool(format!(
                "replica zone {:?} follows source zone {:?}, not {:?}",
                cfg.replica_zone, state.source_zone, cfg.zone
            )));
        }
        let status = ReplicaStatus {
            zone: cfg.replica_zone.clone(),
            source_zone: cfg.zone.clone(),
            source: cfg.source.to_string(),
            phase: "starting".into(),
            applied_seq: pool.applied(&cfg.replica_zone)?,
            ..Default::default()
        };
        Ok(Self {
            pool,
            cfg,
            zone_id,
            state,
            keys: HashMap::new(),
            carried: HashMap::new(),
            carried_window: None,
            status,
            last_status: Instant::now() - Duration::from_secs(10),
            rate_mark: (Instant::now(), 0),
            source_zone: 0,
            lags: VecDeque::new(),
        })
    }

    fn save_state(&self) -> Result<(), ReplicaError> {
        let path = state_path(self.pool.dir(), self.zone_id);
        std::fs::create_dir_all(path.parent().expect("has a parent"))
            .map_err(|e| ReplicaError::Pool(e.to_string()))?;
        crate::pool::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&self.state).expect("plain data"),
        )
        .map_err(|e| ReplicaError::Pool(e.to_string()))
    }

    fn write_status(&mut self, force: bool) {
        if !force && self.last_status.elapsed() < Duration::from_millis(500) {
            return;
        }
        let now = Instant::now();
        let dt = now.duration_since(self.rate_mark.0).as_secs_f64();
        if dt > 0.5 {
            self.status.apply_rate = (self.status.records_applied - self.rate_mark.1) as f64 / dt;
            self.rate_mark = (now, self.status.records_applied);
        }
        self.last_status = now;
        self.status.lag_records = self
            .status
            .source_seq
            .saturating_sub(self.status.applied_seq);
        if !self.lags.is_empty() {
            let mut v: Vec<f64> = self.lags.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
            self.status.lag_p50_seconds = q(0.5);
            self.status.lag_p99_seconds = q(0.99);
        }
        self.status.updated_ms = crate::stream::now_ms();
        crate::admin::metrics::set_replica_gauges(&self.status);
        let path = status_path(self.pool.dir(), self.zone_id);
        let _ = std::fs::create_dir_all(path.parent().expect("has a parent"));
        let _ = crate::pool::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&self.status).expect("plain data"),
        );
    }

    async fn connect(&mut self) -> Result<(Link, Welcome), ReplicaError> {
        let mut c = match &self.cfg.source {
            Source::Keyturn(addr) => Link::Tcp(connect_tcp(addr, self.cfg.tls.as_ref()).await?),
            Source::Nats { servers, prefix } => Link::Nats(Box::new(
                nats::NatsLink::connect(servers, prefix, &self.cfg.zone, &self.cfg.agent).await?,
            )),
        };
        let hello = serde_json::to_vec(&serve::Hello {
            agent: self.cfg.agent.clone(),
            zone: self.cfg.zone.clone(),
        })
        .expect("plain data");
        let w = c.call(kind::HELLO, &hello, kind::WELCOME).await?;
        let w: Welcome = serde_json::from_slice(&w).map_err(|e| c.err(e))?;
        if !self.state.stream_id.is_empty() && self.state.stream_id != w.stream_id {
            return Err(ReplicaError::BadRecord(format!(
                "the source serves stream {} but this replica follows stream {} (another zone, or a stream made anew): refusing",
                w.stream_id, self.state.stream_id
            )));
        }
        self.status.source_seq = w.last_seq;
        self.source_zone = w.zone_id;
        Ok((c, w))
    }

    /// Runs until the configured stop, or an error. A source that is behind
    /// retention for this replica starts a full resync.
    ///
    /// An agent without a stop condition is a daemon: when the source
    /// cannot be reached (a NATS node or the source server went away) it
    /// says so in its status and connects again, waiting up to 30 s between
    /// attempts. Refusals and bad records still end it.
    pub async fn run(&mut self) -> Result<ReplicaStatus, ReplicaError> {
        let daemon = self.cfg.until_seq.is_none() && !self.cfg.until_caught_up;
        let mut backoff = Duration::from_secs(1);
        let r = loop {
            let applied = self.status.applied_seq;
            match self.run_inner().await {
                Err(e @ ReplicaError::Source { .. }) if daemon => {
                    if self.status.applied_seq > applied {
                        backoff = Duration::from_secs(1);
                    }
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "replica: the source is unreachable; connecting again");
                    self.status.phase = "reconnecting".into();
                    self.status.error = Some(e.to_string());
                    self.write_status(true);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                other => break other,
            }
        };
        self.status.phase = if r.is_ok() { "stopped" } else { "failed" }.into();
        if let Err(e) = &r {
            self.status.error = Some(e.to_string());
        }
        self.write_status(true);
        r.map(|()| self.status.clone())
    }

    async fn run_inner(&mut self) -> Result<(), ReplicaError> {
        loop {
            let (mut c, welcome) = self.connect().await?;
            if !self.state.synced {
                self.full_sync(&mut c, &welcome).await?;
            }
            let target = self
                .cfg
                .until_seq
                .or(self.cfg.until_caught_up.then_some(welcome.last_seq));
            match self.follow(&mut c, target).await {
                Err(ReplicaError::Refused { kind, error }) if kind == "behind-retention" => {
                    tracing::warn!(%error, "replica is behind the source's retention: full resync");
                    self.state.synced = false;
                    self.save_state()?;
                }
                other => return other,
            }
        }
    }

    async fn key(&mut self, c: &mut Link, w: WindowId) -> Result<[u8; 32], ReplicaError> {
        if let Some(k) = self.keys.get(&w) {
            return Ok(**k);
        }
        let req = serde_json::to_vec(&KeysReq {
            windows: vec![(w.set, w.window)],
        })
        .expect("plain data");
        let b = c.call(kind::KEYS, &req, kind::KEYS_REPLY).await?;
        let reply: KeysReply = serde_json::from_slice(&b).map_err(|e| c.err(e))?;
        if let Some(r) = reply.refused.first() {
            return Err(ReplicaError::NoKey {
                key_id: r.key_id.clone(),
                agent: self.cfg.agent.clone(),
                reason: r.reason.clone(),
            });
        }
        let h = reply.keys.first().ok_or_else(|| c.err("empty key reply"))?;
        if h.key_id != record::key_id(self.source_zone, w) {
            return Err(ReplicaError::BadRecord(format!(
                "the source handed out {} for another window",
                h.key_id
            )));
        }
        let k = self
            .cfg
            .key
            .open(h)
            .map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
        self.keys.insert(w, k.clone());
        Ok(*k)
    }

    async fn open(
        &mut self,
        c: &mut Link,
        bytes: Vec<u8>,
    ) -> Result<(Sealed, Wiped), ReplicaError> {
        let rec =
            record::decode(bytes.into()).map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
        if rec.header.stream.to_hex() != self.state.stream_id {
            return Err(ReplicaError::BadRecord(format!(
                "record {} belongs to stream {}, not {} (another zone's record)",
                rec.header.seq, rec.header.stream, self.state.stream_id
            )));
        }
        let key = self.key(c, rec.header.window).await?;
        let plain = rec
            .open(self.source_zone, &key)
            .map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
        Ok((rec, plain))
    }

    fn volume(&self, source_id: u32) -> Result<Arc<crate::volume::Volume>, ReplicaError> {
        let name = self.state.volumes.get(&source_id).ok_or_else(|| {
            ReplicaError::BadRecord(format!(
                "record for source volume {source_id}, which the replica does not know"
            ))
        })?;
        ExportCatalog::open(self.pool.as_ref(), name)
            .ok_or_else(|| ReplicaError::Pool(format!("replica volume {name:?} is missing")))
    }

    fn ensure_volume(&mut self, id: u32, name: &str, size: u64) -> Result<(), ReplicaError> {
        let existing = self
            .pool
            .catalog()
            .volumes
            .into_iter()
            .find(|v| v.name == name);
        match existing {
            Some(v) if v.zone == self.zone_id && v.size == size => {}
            Some(v) if v.zone == self.zone_id => {
                // Same name, other size: the source re-created it.
                self.pool.delete_volume(&v.name)?;
                self.pool
                    .create_volume(name, &self.cfg.replica_zone, size)?;
            }
            Some(_) => {
                return Err(ReplicaError::Pool(format!(
                    "a volume named {name:?} exists in another zone of the replica pool"
                )));
            }
            None => {
                self.pool
                    .create_volume(name, &self.cfg.replica_zone, size)?;
            }
        }
        self.state.volumes.insert(id, name.to_string());
        Ok(())
    }

    async fn full_sync(&mut self, c: &mut Link, w: &Welcome) -> Result<(), ReplicaError> {
        tracing::info!(zone = %self.cfg.zone, from = w.last_seq, volumes = w.volumes.len(), "replica: full sync");
        self.status.phase = "syncing".into();
        self.write_status(true);
        self.state = ReplicaState {
            source_zone: self.cfg.zone.clone(),
            stream_id: w.stream_id.clone(),
            volumes: BTreeMap::new(),
            synced: false,
        };
        // Replica volumes the source no longer has.
        let keep: Vec<&str> = w.volumes.iter().map(|v| v.name.as_str()).collect();
        for v in self.pool.catalog().volumes {
            if v.zone == self.zone_id && !keep.contains(&v.name.as_str()) {
                self.pool.delete_volume(&v.name)?;
            }
        }
        for v in &w.volumes {
            self.ensure_volume(v.id, &v.name, v.size)?;
        }
        self.save_state()?;
        for v in &w.volumes {
            let vol = self.volume(v.id)?;
            let blocks = v.size / BLOCK_SIZE as u64;
            let mut first = 0u64;
            while first < blocks {
                let count = (blocks - first).min(u64::from(c.snapshot_blocks())) as u32;
                let req = serde_json::to_vec(&SnapshotReq {
                    volume: v.id,
                    first,
                    count,
                })
                .expect("plain data");
                let chunk = c.call(kind::SNAPSHOT, &req, kind::CHUNK).await?;
                let rec = record::decode(chunk.into())
                    .map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
                if rec.header.stream.to_hex() != self.state.stream_id
                    || rec.header.volume != VolumeId(v.id)
                    || rec.header.lba.0 != first
                    || rec.header.count != count
                {
                    return Err(ReplicaError::BadRecord(format!(
                        "snapshot chunk for volume {} at {first} does not match its request",
                        v.name
                    )));
                }
                let key = self.key(c, rec.header.window).await?;
                let payload = rec
                    .open(self.source_zone, &key)
                    .map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
                let Body::Write(blocks_ref) = &rec.body else {
                    return Err(ReplicaError::BadRecord(
                        "a snapshot chunk is a write".into(),
                    ));
                };
                let plain = assemble(blocks_ref, &payload, |_, _| None)?;
                vol.write(first * BLOCK_SIZE as u64, &plain, false)
                    .await
                    .map_err(|e| ReplicaError::Pool(format!("writing {}: {e}", v.name)))?;
                first += u64::from(count);
                self.write_status(false);
            }
        }
        self.pool.mark_applied(&self.cfg.replica_zone, w.last_seq)?;
        self.state.synced = true;
        self.save_state()?;
        self.status.applied_seq = w.last_seq;
        self.status.full_syncs += 1;
        tracing::info!(zone = %self.cfg.zone, at = w.last_seq, "replica: full sync done");
        Ok(())
    }

    async fn follow(&mut self, c: &mut Link, target: Option<u64>) -> Result<(), ReplicaError> {
        self.status.phase = "following".into();
        self.status.error = None;
        let mut applied = self.pool.applied(&self.cfg.replica_zone)?;
        self.status.applied_seq = applied;
        if target.is_some_and(|t| applied >= t) {
            return Ok(());
        }
        c.follow(applied + 1).await?;
        let mut last_ack = Instant::now();
        loop {
            let bytes = tokio::select! {
                r = c.next_record() => r?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    self.ack(c, &mut last_ack, true).await?;
                    self.write_status(false);
                    continue;
                }
            };
            self.status.lag_bytes = c.held_bytes();
            let (rec, payload) = self.open(c, bytes).await?;
            let seq = rec.header.seq;
            if seq != applied + 1 {
                return Err(ReplicaError::BadRecord(format!(
                    "record {seq} is out of sequence (expected {})",
                    applied + 1
                )));
            }
            self.apply(c, &rec, &payload).await?;
            applied = seq;
            self.status.applied_seq = seq;
            self.status.source_seq = self.status.source_seq.max(seq);
            self.status.records_applied += 1;
            self.status.lag_seconds =
                (crate::stream::now_ms().saturating_sub(rec.header.time_ms)) as f64 / 1000.0;
            if self.lags.len() == 10_000 {
                self.lags.pop_front();
            }
            self.lags.push_back(self.status.lag_seconds);
            self.ack(c, &mut last_ack, false).await?;
            self.write_status(false);
            if target.is_some_and(|t| applied >= t) {
                self.ack(c, &mut last_ack, true).await?;
                return Ok(());
            }
        }
    }

    /// Acknowledges what is durable in the replica, at most every 200 ms.
    async fn ack(
        &mut self,
        c: &mut Link,
        last: &mut Instant,
        now: bool,
    ) -> Result<(), ReplicaError> {
        if !now && last.elapsed() < Duration::from_millis(200) {
            return Ok(());
        }
        *last = Instant::now();
        self.pool.sync()?;
        let durable = self.pool.applied(&self.cfg.replica_zone)?;
        c.ack(durable).await
    }

    async fn apply(
        &mut self,
        c: &mut Link,
        rec: &Sealed,
        payload: &[u8],
    ) -> Result<(), ReplicaError> {
        let seq = rec.header.seq;
        let window = rec.header.window;
        if self.carried_window != Some(window) {
            self.carried_window = Some(window);
            self.carried.clear();
        }
        match &rec.body {
            Body::Write(blocks) => {
                // Remember what this record carries, then resolve references.
                let mut k = 0;
                for b in blocks {
                    if let BlockRef::Payload(t) = b {
                        if self.carried.len() < CARRIED_MAX {
                            self.carried.insert(
                                *t,
                                Wiped::from(payload[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE].to_vec()),
                            );
                        }
                        k += 1;
                    }
                }
                let mut fetched: HashMap<Tag, Wiped> = HashMap::new();
                for b in blocks {
                    if let BlockRef::Reference {
                        tag,
                        seq: from,
                        block,
                    } = *b
                        && !self.carried.contains_key(&tag)
                        && !fetched.contains_key(&tag)
                    {
                        fetched.insert(tag, self.fetch_block(c, from, block, tag).await?);
                    }
                }
                let plain = assemble(blocks, payload, |t, _| {
                    self.carried
                        .get(t)
                        .or_else(|| fetched.get(t))
                        .map(|b| b.to_vec())
                })?;
                let vol = self.volume(rec.header.volume.0)?;
                vol.apply_write(rec.header.lba.0, &plain, seq)
                    .await
                    .map_err(|e| ReplicaError::Pool(format!("applying record {seq}: {e}")))?;
            }
            Body::Unmap(runs) => {
                let vol = self.volume(rec.header.volume.0)?;
                vol.apply_unmap(runs, rec.header.op == record::Op::Zero, seq)
                    .await
                    .map_err(|e| ReplicaError::Pool(format!("applying record {seq}: {e}")))?;
            }
            Body::VolumeCreated { name, size } => {
                self.ensure_volume(rec.header.volume.0, name, *size)?;
                self.save_state()?;
                self.pool.mark_applied(&self.cfg.replica_zone, seq)?;
            }
            Body::VolumeDeleted { name } => {
                if self
                    .pool
                    .catalog()
                    .volumes
                    .iter()
                    .any(|v| v.name == *name && v.zone == self.zone_id)
                {
                    self.pool.delete_volume(name)?;
                }
                self.state.volumes.remove(&rec.header.volume.0);
                self.save_state()?;
                self.pool.mark_applied(&self.cfg.replica_zone, seq)?;
            }
        }
        Ok(())
    }

    /// A block an earlier record carried, fetched from the source again.
    async fn fetch_block(
        &mut self,
        c: &mut Link,
        seq: u64,
        block: u32,
        tag: Tag,
    ) -> Result<Wiped, ReplicaError> {
        let b = c.fetch(seq).await?;
        let (rec, payload) = self.open(c, b).await?;
        let Body::Write(blocks) = &rec.body else {
            return Err(ReplicaError::BadRecord(format!(
                "record {seq} carries no blocks"
            )));
        };
        let mut k = 0usize;
        for (i, b) in blocks.iter().enumerate() {
            if let BlockRef::Payload(t) = b {
                if i as u32 == block {
                    if *t != tag {
                        return Err(ReplicaError::BadRecord(format!(
                            "block {block} of record {seq} is not the referenced content"
                        )));
                    }
                    return Ok(Wiped::from(
                        payload[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE].to_vec(),
                    ));
                }
                k += 1;
            }
        }
        Err(ReplicaError::BadRecord(format!(
            "record {seq} has no payload block {block}"
        )))
    }
}

/// The plaintext of a write record's blocks: payload blocks in order,
/// zeros, and references through `resolve`.
fn assemble(
    blocks: &[BlockRef],
    payload: &[u8],
    resolve: impl Fn(&Tag, usize) -> Option<Vec<u8>>,
) -> Result<Wiped, ReplicaError> {
    let mut out = Wiped::from(vec![0u8; blocks.len() * BLOCK_SIZE]);
    let mut k = 0;
    for (i, b) in blocks.iter().enumerate() {
        let dst = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
        match b {
            BlockRef::Zero => {}
            BlockRef::Payload(_) => {
                dst.copy_from_slice(&payload[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
                k += 1;
            }
            BlockRef::Reference { tag, seq, block } => {
                let b = resolve(tag, i).ok_or_else(|| {
                    ReplicaError::BadRecord(format!(
                        "reference to block {block} of record {seq} could not be resolved"
                    ))
                })?;
                dst.copy_from_slice(&b);
            }
        }
    }
    Ok(out)
}

/// Opens a connection (TCP, or TLS over it) to a source's stream listener.
async fn connect_tcp(
    addr: &str,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<Conn, ReplicaError> {
    let (mut rd, wr) = connect::open(addr, tls)
        .await
        .map_err(|e| ReplicaError::Source {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    let (tx, frames) = tokio::sync::mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let f = serve::read_frame(&mut rd).await;
            let end = !matches!(f, Ok(Some(_)));
            if tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    Ok(Conn {
        addr: addr.to_string(),
        frames,
        reader,
        wr,
        held: VecDeque::new(),
    })
}

/// Parses `keyturn://HOST:PORT` (or a bare `HOST:PORT`), or
/// `nats://HOST:PORT[,HOST:PORT...]` with the NATS subject prefix.
pub fn parse_source(s: &str, nats_prefix: &str) -> Result<Source, String> {
    if let Some(rest) = s.strip_prefix("nats://") {
        let servers: Vec<&str> = rest
            .trim_end_matches('/')
            .split(',')
            .map(|a| a.trim().strip_prefix("nats://").unwrap_or(a.trim()))
            .collect();
        if servers.iter().any(|a| a.is_empty() || !a.contains(':')) {
            return Err(format!(
                "{s:?} is not a NATS address (nats://HOST:PORT[,HOST:PORT...])"
            ));
        }
        return Ok(Source::Nats {
            servers: servers.join(","),
            prefix: nats_prefix.to_string(),
        });
    }
    let addr = s
        .strip_prefix("keyturn://")
        .unwrap_or(s)
        .trim_end_matches('/');
    if addr.is_empty() || !addr.contains(':') || addr.contains("://") {
        return Err(format!(
            "{s:?} is not a source address (keyturn://HOST:PORT or nats://HOST:PORT)"
        ));
    }
    Ok(Source::Keyturn(addr.to_string()))
}

/// What `verify-replica` found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Verdict {
    /// Every volume's plaintext is equal on both sides at record `seq`.
    Equal {
        /// Stream record both sides are at.
        seq: u64,
        /// Volumes compared.
        volumes: Vec<String>,
        /// Bytes compared per side.
        bytes: u64,
    },
    /// A volume differs; `lba` is the first differing block.
    Differs {
        /// Stream record both sides are at.
        seq: u64,
        /// Volume.
        volume: String,
        /// First differing block.
        lba: u64,
    },
    /// The volume sets differ (names or sizes).
    VolumesDiffer {
        /// What differs.
        detail: String,
    },
    /// The two sides are not at one stream record, so no comparison means
    /// anything.
    NotComparable {
        /// The source's last durable record (while hashing, if it moved: the later one).
        source_seq: u64,
        /// Whether writes reached the source while it hashed.
        source_moved: bool,
        /// The replica's applied record.
        replica_seq: u64,
    },
}

/// Compares a replica zone with its source at one stream record: each side
/// hashes its own plaintext in 1 MiB chunks, only the hashes cross (sealed
/// to the agent's key), and a differing chunk is narrowed to its first
/// differing block. The replica pool must not be written meanwhile (its
/// agent stopped: the pool lock sees to it), and the source must receive no
/// writes while it hashes, or the verdict is "not comparable".
pub async fn verify(pool: Arc<Pool>, cfg: AgentConfig) -> Result<Verdict, ReplicaError> {
    let mut agent = Agent::new(pool.clone(), cfg)?;
    let applied = pool.applied(&agent.cfg.replica_zone)?;
    let (mut c, _welcome) = agent.connect().await?;
    let all = agent.digests(&mut c, None, 0, 0, 256).await?;
    if all.seq_before != all.seq_after || all.seq_after != applied {
        return Ok(Verdict::NotComparable {
            source_seq: all.seq_after,
            source_moved: all.seq_before != all.seq_after,
            replica_seq: applied,
        });
    }
    let mut names = Vec::new();
    let mut bytes = 0;
    let replica: Vec<_> = pool
        .catalog()
        .volumes
        .into_iter()
        .filter(|v| v.zone == agent.zone_id)
        .map(|v| (v.name, v.size))
        .collect();
    let mut source: Vec<_> = all
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.size))
        .collect();
    let mut mine = replica.clone();
    source.sort();
    mine.sort();
    if source != mine {
        return Ok(Verdict::VolumesDiffer {
            detail: format!("source volumes {source:?}, replica volumes {mine:?}"),
        });
    }
    for v in &all.volumes {
        let vol = ExportCatalog::open(pool.as_ref(), &v.name)
            .ok_or_else(|| ReplicaError::Pool(format!("replica volume {:?} is missing", v.name)))?;
        let end = v.size / BLOCK_SIZE as u64;
        let local = local_digests(&vol, 0, end, 256).await?;
        bytes += v.size;
        names.push(v.name.clone());
        let Some(chunk) = local.iter().zip(&v.digests).position(|(a, b)| a != b) else {
            continue;
        };
        let first = chunk as u64 * 256;
        let count = (end - first).min(256);
        let theirs = agent.digests(&mut c, Some(v.id), first, count, 1).await?;
        let mine = local_digests(&vol, first, first + count, 1).await?;
        let theirs = theirs
            .volumes
            .first()
            .map(|d| d.digests.clone())
            .unwrap_or_default();
        let k = mine
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Ok(Verdict::Differs {
            seq: applied,
            volume: v.name.clone(),
            lba: first + k as u64,
        });
    }
    Ok(Verdict::Equal {
        seq: applied,
        volumes: names,
        bytes,
    })
}

async fn local_digests(
    vol: &crate::volume::Volume,
    first: u64,
    end: u64,
    chunk: u32,
) -> Result<Vec<String>, ReplicaError> {
    serve::digest_range(first, end, chunk, |b, n| async move {
        let mut buf = Wiped::from(vec![0u8; n as usize * BLOCK_SIZE]);
        vol.read(b * BLOCK_SIZE as u64, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok(buf)
    })
    .await
    .map_err(ReplicaError::Pool)
}

impl Agent {
    async fn digests(
        &mut self,
        c: &mut Link,
        volume: Option<u32>,
        first: u64,
        count: u64,
        chunk_blocks: u32,
    ) -> Result<serve::Digests, ReplicaError> {
        let req = serde_json::to_vec(&serve::DigestReq {
            volume,
            first,
            count,
            chunk_blocks,
        })
        .expect("plain data");
        let b = c.call(kind::DIGEST, &req, kind::DIGESTS).await?;
        let sealed: crate::stream::grant::HandOut =
            serde_json::from_slice(&b).map_err(|e| c.err(e))?;
        let plain = self
            .cfg
            .key
            .open_sealed(&sealed)
            .map_err(|e| ReplicaError::BadRecord(e.to_string()))?;
        serde_json::from_slice(&plain).map_err(|e| c.err(e))
    }
}
