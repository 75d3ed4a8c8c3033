//! Serving NBD over tokio: listening (TCP or Unix socket), the fixed
//! newstyle handshake, and the transmission phase.
//!
//! Every connection is its own task, so a stalled or hostile client only
//! holds its own task. In transmission a connection runs three kinds of
//! task:
//!
//! - the *reader* (the connection task itself) decodes one request at a
//!   time, reads a WRITE's payload fully before anything is dispatched (so a
//!   truncated write is never applied), and starts each request;
//! - *requests* call the [`Export`] and hand their reply to the writer. A
//!   short one (a read of at most [`INLINE_READ_MAX`] bytes, a write of at most
//!   [`INLINE_WRITE_MAX`]) runs inside the connection
//!   task, interleaved with reading the next requests: a 4 KiB read from
//!   the page cache is a few microseconds of work, and a task of its own
//!   cost a spawn and, most of the time, waking another worker thread to
//!   steal it (futex calls were a tenth of the server's CPU on 4 KiB random
//!   reads). A longer one gets its own task, so that its crypto can run on
//!   another core;
//! - one *writer* task owns the socket's write half and writes each reply
//!   whole (header and payload together), in completion order: replies are
//!   matched by cookie, so they may overtake each other.
//!
//! Back-pressure: a request holds a slot permit (at most `max_in_flight` per
//! connection) and, for READ and WRITE, a byte-budget permit for its buffer,
//! from before its header is read until its reply has been written. The
//! reader stops reading while it waits for them, so a client that sends
//! faster than the export completes is throttled by TCP, and memory per
//! connection is bounded by `max_in_flight_bytes`. Over all connections,
//! buffers also take from `max_total_in_flight_bytes`; a connection with
//! nothing in flight may go beyond it by one request, so clients that hoard
//! the shared budget cannot starve a well-behaved one. A client that stops
//! reading replies is closed after `send_timeout`, which frees what it held,
//! and `max_connections` bounds how many there can be. Because every queued
//! reply holds a slot permit, the reply channel (capacity `max_in_flight`)
//! can never be full when a request sends: requests never block on a slow
//! client, and every write that was read is applied. Requests that run in
//! the connection task make progress whenever it waits for the next
//! request, for permits or for the writer, so they never wait on the
//! reader.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::access::Client;
use super::export::{Export, ExportCatalog, ExportError};
use super::handshake::{self, Negotiated, Security};
use super::metrics::NbdMetrics;
use super::proto::{
    self, BadRequestMagic, Command, Errno, HandshakeError, Request, RequestHeader, SessionParams,
};

/// Context id of `base:allocation` on a connection that selected it.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// Tunables of the NBD server. `Default` gives the values clients expect.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted, advertised as the maximum block
    /// size (`NBD_INFO_BLOCK_SIZE`). Default 32 MiB, what clients assume.
    pub max_payload: u32,
    /// Preferred block size advertised to clients. Default 4096.
    pub preferred_block_size: u32,
    /// Largest option payload read into memory during the handshake
    /// (default 64 KiB). Longer ones are drained and refused with
    /// `NBD_REP_ERR_TOO_BIG`.
    pub max_option_length: u32,
    /// Longest payload the server will read and discard to keep the stream
    /// framed (an oversized option, or a rejected WRITE). Anything longer
    /// closes the connection instead. Default 64 MiB.
    pub max_drain: u32,
    /// Requests in flight per connection before the reader stops reading.
    /// Default 64.
    pub max_in_flight: usize,
    /// READ/WRITE buffer bytes in flight per connection. Raised to at least
    /// `max_payload`. Default 128 MiB.
    pub max_in_flight_bytes: usize,
    /// READ/WRITE buffer bytes in flight over all connections together.
    /// A connection with nothing in flight may always take one request
    /// beyond it, so a well-behaved client is never starved by others
    /// that stop reading. Raised to at least `max_payload`. Default 256 MiB.
    pub max_total_in_flight_bytes: usize,
    /// Connections served at once; more are closed at accept. Default 1024.
    pub max_connections: usize,
    /// A reply that cannot be written for this long (a client that stopped
    /// reading) closes the connection and frees what it held. Default 60 s.
    pub send_timeout: Duration,
    /// Time a client gets from connecting to entering transmission (or
    /// leaving). Default 30 s.
    pub handshake_timeout: Duration,
    /// After a connection stops reading (DISC, EOF, shutdown), how long the
    /// server keeps trying to deliver the replies of requests it already
    /// executed before it drops the socket. Default 30 s.
    pub close_timeout: Duration,
    /// Description used for `NBD_INFO_DESCRIPTION` when the catalog gives
    /// an export none. Default empty.
    pub default_description: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            preferred_block_size: 4096,
            max_option_length: 64 << 10,
            max_drain: 64 << 20,
            max_in_flight: 64,
            max_in_flight_bytes: 64 << 20,
            max_total_in_flight_bytes: 256 << 20,
            max_connections: 1024,
            send_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            default_description: String::new(),
        }
    }
}

impl ServerConfig {
    /// Adjusts values that would deadlock or break the advertised limits.
    fn normalized(mut self) -> Self {
        self.max_payload = self.max_payload.max(512);
        self.preferred_block_size = self
            .preferred_block_size
            .clamp(512, self.max_payload)
            .next_power_of_two()
            .min(self.max_payload);
        self.max_in_flight = self.max_in_flight.max(1);
        // A request of max_payload bytes must always be able to get its
        // byte permits, or the reader would wait forever.
        let max_payload = usize::try_from(self.max_payload).unwrap_or(usize::MAX);
        self.max_total_in_flight_bytes = self
            .max_total_in_flight_bytes
            .max(max_payload)
            .min(Semaphore::MAX_PERMITS);
        self.max_connections = self.max_connections.max(1);
        self.max_in_flight_bytes = self
            .max_in_flight_bytes
            .max(max_payload)
            .min(Semaphore::MAX_PERMITS);
        self
    }
}

// ---------------------------------------------------------------- listening

/// The address a [`Listener`] is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP address (with the real port when bound to port 0).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listening socket, TCP or Unix.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    addr: BoundAddr,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Wraps a bound TCP listener.
    pub fn from_tcp(listener: TcpListener) -> io::Result<Self> {
        let addr = BoundAddr::Tcp(listener.local_addr()?);
        Ok(Listener {
            inner: ListenerInner::Tcp(listener),
            addr,
        })
    }

    /// Wraps a bound Unix listener.
    pub fn from_unix(listener: UnixListener) -> io::Result<Self> {
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(PathBuf::from)
            .unwrap_or_default();
        Ok(Listener {
            inner: ListenerInner::Unix(listener),
            addr: BoundAddr::Unix(path),
        })
    }

    /// The address actually bound (the real port if 0 was asked for).
    pub fn local_addr(&self) -> &BoundAddr {
        &self.addr
    }
}

/// Why [`bind`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The address string is empty.
    #[error("empty listen address")]
    Empty,
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address as given.
        addr: String,
        /// The cause.
        source: io::Error,
    },
}

/// Binds a listener from an address string: `"127.0.0.1:10809"`,
/// `"[::1]:10809"`, `"host:port"`, or a Unix socket path (anything with a
/// `/`, or prefixed `unix:`). Port 0 picks a free port; read it back with
/// [`Listener::local_addr`]. An existing file at a Unix path is not removed.
pub async fn bind(addr: &str) -> Result<Listener, BindError> {
    let err = |source| BindError::Io {
        addr: addr.to_owned(),
        source,
    };
    if addr.is_empty() {
        return Err(BindError::Empty);
    }
    if let Some(path) = addr
        .strip_prefix("unix:")
        .or(addr.contains('/').then_some(addr))
    {
        let l = UnixListener::bind(path).map_err(err)?;
        return Listener::from_unix(l).map_err(err);
    }
    let l = TcpListener::bind(addr).await.map_err(err)?;
    Listener::from_tcp(l).map_err(err)
}

// ------------------------------------------------------------------- serve

/// Serves `catalog` on `listener` until `shutdown` becomes true; then stops
/// accepting, lets every connection finish the requests it has already
/// read (connections still in the handshake are dropped), and returns.
/// Dropping the sender of `shutdown` does not shut the server down.
pub fn serve<C: ExportCatalog>(
    listener: Listener,
    catalog: Arc<C>,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send {
    serve_secured(listener, catalog, config, Security::default(), shutdown)
}

/// [`serve`] with TLS and access control.
pub fn serve_secured<C: ExportCatalog>(
    listener: Listener,
    catalog: Arc<C>,
    config: ServerConfig,
    security: Security,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send {
    // Registered now, not when the task first runs: a scrape right after
    // "ready" must already see the counters (at zero).
    let metrics = Arc::new(NbdMetrics::register());
    serve_with_metrics(
        listener,
        catalog,
        config,
        Arc::new(security),
        shutdown,
        metrics,
    )
}

async fn serve_with_metrics<C: ExportCatalog>(
    listener: Listener,
    catalog: Arc<C>,
    config: ServerConfig,
    security: Arc<Security>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<NbdMetrics>,
) {
    let config = Arc::new(config.normalized());
    let global = Arc::new(Semaphore::new(config.max_total_in_flight_bytes));
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    tracing::info!(addr = %listener.addr, "NBD server listening");
    loop {
        tokio::select! {
            _ = shutdown_signal(&mut shutdown) => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "NBD connection task failed");
                }
            }
            accepted = accept(&listener, &mut next_id) => match accepted {
                Ok(Accepted::Tcp(_, peer) | Accepted::Unix(_, peer)) if conns.len() >= config.max_connections => {
                    tracing::warn!(%peer, limit = config.max_connections, "rejected client: too many connections");
                    metrics.rejected_at_limit();
                }
                Ok(Accepted::Tcp(stream, peer)) => {
                    // Small replies (simple replies, chunks) must not wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let client = Client { addr: stream.peer_addr().ok().map(|a| a.ip()), ..Client::default() };
                    conns.spawn(connection(Box::new(stream), peer, client, catalog.clone(), config.clone(), security.clone(), global.clone(), metrics.clone(), shutdown.clone()));
                }
                Ok(Accepted::Unix(stream, peer)) => {
                    conns.spawn(connection(Box::new(stream), peer, Client::default(), catalog.clone(), config.clone(), security.clone(), global.clone(), metrics.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off rather than spin.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "NBD server shutting down");
    while let Some(done) = conns.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "NBD connection task failed");
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, Arc<str>),
    Unix(tokio::net::UnixStream, Arc<str>),
}

async fn accept(listener: &Listener, next_id: &mut u64) -> io::Result<Accepted> {
    *next_id += 1;
    Ok(match &listener.inner {
        ListenerInner::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Accepted::Tcp(s, a.to_string().into())
        }
        ListenerInner::Unix(l) => {
            let (s, _) = l.accept().await?;
            // Unix peers are unnamed; tell them apart by a counter.
            let peer = format!("{}#{}", listener.addr, next_id);
            Accepted::Unix(s, peer.into())
        }
    })
}

/// Resolves once `rx` holds `true`; never if the sender is gone first.
async fn shutdown_signal(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

// -------------------------------------------------------------- connection

/// Why a connection was dropped by the server: the peer broke the framing
/// or a MUST, vanished mid-message, or took too long.
#[derive(Debug, thiserror::Error)]
pub(super) enum Fatal {
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    BadMagic(#[from] BadRequestMagic),
    #[error("connection closed in the middle of {0}")]
    Truncated(&'static str),
    #[error("{0}")]
    Violation(String),
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// How a connection ended when the server did not drop it.
#[derive(Debug)]
enum End {
    /// ABORT, or the client left during the handshake.
    Handshake,
    /// `NBD_CMD_DISC`.
    Disc,
    /// EOF without DISC.
    Eof,
    /// The server is shutting down.
    Shutdown,
}

/// Collects what a client did wrong so that the log gets exactly one
/// warning per misbehaving client, however many bad requests it sent.
/// It also counts the client in the metrics when it is dropped.
pub(super) struct ClientLog {
    pub(super) peer: Arc<str>,
    rejected: u64,
    first: Option<String>,
    /// What access control (or the TLS handshake) refused it, for the
    /// one audit record per refused client.
    refused: Vec<String>,
    pub(super) metrics: Arc<NbdMetrics>,
}

/// At most this many refusals are kept for the audit record of a client.
const MAX_REFUSALS_KEPT: usize = 16;

impl ClientLog {
    fn new(peer: Arc<str>, metrics: Arc<NbdMetrics>) -> Self {
        ClientLog {
            peer,
            rejected: 0,
            first: None,
            refused: Vec::new(),
            metrics,
        }
    }

    /// Records something access control refused (an export name, or why
    /// the TLS handshake failed).
    pub(super) fn refuse(&mut self, what: &str) {
        let shown: String = what.chars().take(128).collect();
        self.note(format_args!("refused by access control: {shown:?}"));
        if self.refused.len() < MAX_REFUSALS_KEPT && !self.refused.contains(&shown) {
            self.refused.push(shown);
        }
    }

    /// Records a refused option or request (the connection stays open).
    pub(super) fn note(&mut self, reason: impl fmt::Display) {
        tracing::debug!(peer = %self.peer, %reason, "refused client request");
        self.rejected += 1;
        if self.first.is_none() {
            self.first = Some(reason.to_string());
        }
    }

    fn finish(self, end: Result<End, Fatal>) {
        let first = self.first.as_deref().unwrap_or("-");
        match end {
            Err(reason) => {
                self.metrics.dropped_for_protocol();
                tracing::warn!(
                peer = %self.peer, %reason, refused = self.rejected, first_refused = first,
                "dropped NBD client"
                )
            }
            Ok(end) if self.rejected > 0 => tracing::warn!(
                peer = %self.peer, refused = self.rejected, first_refused = first, ?end,
                "NBD client sent invalid options or requests"
            ),
            Ok(end) => tracing::debug!(peer = %self.peer, ?end, "NBD client disconnected"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<C>(
    stream: handshake::Io,
    peer: Arc<str>,
    mut client: Client,
    catalog: Arc<C>,
    config: Arc<ServerConfig>,
    security: Arc<Security>,
    global: Arc<Semaphore>,
    metrics: Arc<NbdMetrics>,
    mut shutdown: watch::Receiver<bool>,
) where
    C: ExportCatalog,
{
    let _open = metrics.open_connection();
    let mut log = ClientLog::new(peer, metrics);
    let negotiated = tokio::select! {
        r = tokio::time::timeout(
            config.handshake_timeout,
            handshake::negotiate(stream, &*catalog, &config, &security, &mut client, &mut log),
        ) => r.unwrap_or(Err(Fatal::Timeout(config.handshake_timeout))),
        _ = shutdown_signal(&mut shutdown) => Ok(None),
    };
    if !log.refused.is_empty()
        && let Some(gate) = &security.gate
    {
        gate.refused(&client, &log.refused);
    }
    let end = match negotiated {
        Ok(Some((session, rd, wr))) => {
            transmission(rd, wr, session, &config, global, shutdown, &mut log).await
        }
        Ok(None) => Ok(End::Handshake),
        Err(e) => Err(e),
    };
    log.finish(end);
}

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the stream ended before
/// the first byte (a clean close between messages).
pub(super) async fn read_or_eof<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<bool, Fatal> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rd.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(Fatal::Truncated(what))
            };
        }
        filled += n;
    }
    Ok(true)
}

pub(super) async fn read_full<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), Fatal> {
    if read_or_eof(rd, buf, what).await? {
        Ok(())
    } else {
        Err(Fatal::Truncated(what))
    }
}

/// Reads a WRITE payload of `len` bytes straight into a new vector's spare
/// capacity, so up to 32 MiB is not zero-filled first.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> Result<Vec<u8>, Fatal> {
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    let mut payload = Vec::with_capacity(want);
    // `take` keeps a larger spare capacity from reading into the next request.
    let mut limited = rd.take(u64::from(len));
    while payload.len() < want {
        if limited.read_buf(&mut payload).await? == 0 {
            return Err(Fatal::Truncated("write payload"));
        }
    }
    Ok(payload)
}

/// Reads and discards `len` bytes without buffering them.
pub(super) async fn drain<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: u32,
    what: &'static str,
) -> Result<(), Fatal> {
    let len = u64::from(len);
    let copied = tokio::io::copy(&mut (&mut *rd).take(len), &mut tokio::io::sink()).await?;
    if copied == len {
        Ok(())
    } else {
        Err(Fatal::Truncated(what))
    }
}

// ------------------------------------------------------------ transmission

/// Permits a request holds until its reply has been written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    /// Bytes of the budget shared by all connections, when it had room.
    _shared: Option<OwnedSemaphorePermit>,
}

/// One reply, written whole by the writer task.
struct Outgoing {
    head: Vec<u8>,
    data: Vec<u8>,
    _permits: Permits,
}

/// What the reader got from the wire.
enum Incoming {
    Eof,
    Disc,
    Request(Request, Vec<u8>, Permits),
    Rejected(proto::Rejection, Permits),
}

/// Shared by the request tasks of one connection.
struct Ctx<E> {
    export: Arc<E>,
    peer: Arc<str>,
    structured: bool,
    metrics: Arc<NbdMetrics>,
}

async fn transmission<E, R, W>(
    mut rd: R,
    wr: W,
    session: Negotiated<E>,
    config: &ServerConfig,
    global: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    log: &mut ClientLog,
) -> Result<End, Fatal>
where
    E: Export,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let params = SessionParams {
        size: session.export.size(),
        structured: session.structured,
        meta_context: session.meta_context,
        max_payload: config.max_payload,
        read_only: session.read_only,
    };
    let ctx = Arc::new(Ctx {
        export: session.export,
        peer: log.peer.clone(),
        structured: session.structured,
        metrics: log.metrics.clone(),
    });
    let (tx, rx) = mpsc::channel::<Outgoing>(config.max_in_flight);
    let mut writer = tokio::spawn(writer_loop(wr, rx, config.send_timeout));
    let mut writer_result = None;
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let budget = Arc::new(Semaphore::new(config.max_in_flight_bytes));
    let mut tasks = JoinSet::new();
    let mut local = FuturesUnordered::new();

    let end = loop {
        while let Some(done) = tasks.try_join_next() {
            report_join(&ctx.peer, done);
        }
        // Runs the requests of this task while the select waits; it never
        // completes, so it never cancels the request being read.
        let run_local = std::future::poll_fn(|cx| {
            while let std::task::Poll::Ready(Some(done)) = local.poll_next_unpin(cx) {
                report_local(&ctx.peer, done);
            }
            std::task::Poll::<()>::Pending
        });
        let incoming = tokio::select! {
            // Shutdown wins over a ready request: stop reading promptly.
            biased;
            _ = shutdown_signal(&mut shutdown) => break Ok(End::Shutdown),
            // The writer only ends early when the client stopped reading replies
            // (or the socket broke): stop reading requests too.
            done = &mut writer => {
                let stalled = matches!(&done, Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut);
                writer_result = Some(done);
                if stalled {
                    break Err(Fatal::Violation("stopped reading replies".into()));
                }
                // The client went away: like EOF, finish what was read.
                break Ok(End::Eof);
            }
            () = run_local => unreachable!("never completes"),
            r = read_request(&mut rd, &params, config, &slots, &budget, &global) => r,
        };
        match incoming {
            Ok(Incoming::Request(req, payload, permits)) => {
                let run = run_request(ctx.clone(), req, payload, permits, tx.clone());
                if runs_inline(&req.command) {
                    // A panic ends this request, as it would its own task,
                    // not the connection.
                    local.push(AssertUnwindSafe(run).catch_unwind());
                } else {
                    tasks.spawn(run);
                }
            }
            Ok(Incoming::Rejected(rej, permits)) => {
                log.note(&rej.reason);
                ctx.metrics.invalid_request();
                let head = error_reply(ctx.structured, rej.cookie, rej.errno);
                // Never blocks (see the module doc); fails only if the writer is gone.
                let _ = tx
                    .send(Outgoing {
                        head,
                        data: Vec::new(),
                        _permits: permits,
                    })
                    .await;
            }
            Ok(Incoming::Disc) => {
                ctx.metrics.finished(&Command::Disc, true);
                break Ok(End::Disc);
            }
            Ok(Incoming::Eof) => break Ok(End::Eof),
            Err(e) => break Err(e),
        }
    };

    // Every request already read is executed, whatever the reason for
    // stopping: writes the client sent before DISC or a reset are applied.
    while let Some(done) = local.next().await {
        report_local(&ctx.peer, done);
    }
    while let Some(done) = tasks.join_next().await {
        report_join(&ctx.peer, done);
    }
    drop(tx);
    let finished = match writer_result {
        Some(done) => Ok(done),
        None => tokio::time::timeout(config.close_timeout, &mut writer).await,
    };
    match finished {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::debug!(peer = %ctx.peer, error = %e, "reply not delivered"),
        Ok(Err(e)) => tracing::error!(peer = %ctx.peer, error = %e, "NBD writer task failed"),
        Err(_) => {
            // Dropping a JoinHandle would leave the task stuck on the socket.
            writer.abort();
            tracing::debug!(peer = %ctx.peer, "client not reading replies; closing");
        }
    }
    end
}

/// Reads longer than this get a task of their own (see the module doc).
const INLINE_READ_MAX: u32 = 64 << 10;

/// Writes longer than this get a task of their own: a write also tags its
/// blocks, about twice a read's CPU a block, and on one connection 64 KiB
/// random writes ran 13% slower in the connection task than in tasks of
/// their own, on two cores.
const INLINE_WRITE_MAX: u32 = 16 << 10;

/// Trims and write-zeroes longer than this get a task of their own.
const INLINE_UNMAP_MAX: u32 = 1 << 20;

/// Whether `command` runs inside the connection task.
fn runs_inline(command: &Command) -> bool {
    match *command {
        Command::Read { length, .. } => length <= INLINE_READ_MAX,
        Command::Write { length, .. } => length <= INLINE_WRITE_MAX,
        // Unmapping is metadata work, a few hundred nanoseconds a block.
        Command::Trim { length, .. } | Command::WriteZeroes { length, .. } => {
            length <= INLINE_UNMAP_MAX
        }
        // Waiting for a journal commit, or a bounded metadata walk.
        Command::Flush | Command::BlockStatus { .. } | Command::Cache { .. } | Command::Disc => {
            true
        }
    }
}

/// Logs a request run in the connection task that panicked.
fn report_local(peer: &str, done: std::thread::Result<()>) {
    if done.is_err() {
        tracing::error!(%peer, "NBD request panicked");
    }
}

fn report_join(peer: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(%peer, error = %e, "NBD request task failed");
    }
}

async fn read_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    params: &SessionParams,
    config: &ServerConfig,
    slots: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    global: &Arc<Semaphore>,
) -> Result<Incoming, Fatal> {
    // The semaphores are never closed, so acquiring cannot fail.
    let Ok(slot) = slots.clone().acquire_owned().await else {
        return Ok(Incoming::Eof);
    };
    let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
    if !read_or_eof(rd, &mut raw, "request header").await? {
        return Ok(Incoming::Eof);
    }
    let header = RequestHeader::parse(&raw)?;
    if header.kind == proto::CMD_DISC {
        // No reply to DISC, whatever its flags say.
        return Ok(Incoming::Disc);
    }
    let payload_len = header.payload_len();
    match header.validate(params) {
        Ok(req) => {
            let buffered = match req.command {
                Command::Read { length, .. } | Command::Write { length, .. } => length,
                _ => 0,
            };
            let (bytes, shared) = if buffered > 0 {
                let idle = budget.available_permits() == config.max_in_flight_bytes;
                let Ok(p) = budget.clone().acquire_many_owned(buffered).await else {
                    return Ok(Incoming::Eof);
                };
                let shared = global_bytes(global, budget, buffered, idle, config).await;
                (Some(p), shared)
            } else {
                (None, None)
            };
            let permits = Permits {
                _slot: slot,
                _bytes: bytes,
                _shared: shared,
            };
            // Validated: at most max_payload bytes.
            let payload = read_payload(rd, payload_len).await?;
            Ok(Incoming::Request(req, payload, permits))
        }
        Err(rej) => {
            if payload_len > config.max_drain {
                return Err(Fatal::Violation(format!(
                    "{}; its {payload_len}-byte payload is too large to drain",
                    rej.reason
                )));
            }
            drain(rd, payload_len, "write payload").await?;
            Ok(Incoming::Rejected(
                rej,
                Permits {
                    _slot: slot,
                    _bytes: None,
                    _shared: None,
                },
            ))
        }
    }
}

/// Takes `n` bytes of the budget shared by all connections. A connection
/// with nothing else in flight (`idle`, or once its own requests drain) goes
/// ahead without them, so others that hoard the budget cannot starve it;
/// the memory that costs is bounded by one request per connection.
async fn global_bytes(
    global: &Arc<Semaphore>,
    own: &Arc<Semaphore>,
    n: u32,
    idle: bool,
    config: &ServerConfig,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(p) = global.clone().try_acquire_many_owned(n) {
        return Some(p);
    }
    if idle {
        return None;
    }
    let own_drained = async {
        // Our own request holds `n` permits; drained means only those are out.
        let others = config.max_in_flight_bytes - n as usize;
        while own.available_permits() < others {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        p = global.clone().acquire_many_owned(n) => p.ok(),
        () = own_drained => None,
    }
}

/// What a successful command returns.
enum Done {
    Empty,
    Data(u64, Vec<u8>),
    Status(u32, Vec<proto::BlockDescriptor>),
}

async fn execute<E: Export>(
    export: &E,
    command: Command,
    payload: Vec<u8>,
) -> Result<Done, ExportError> {
    match command {
        Command::Read { offset, length } => {
            let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
            if !buf.is_empty() {
                export.read(offset, &mut buf).await?;
            }
            Ok(Done::Data(offset, buf))
        }
        Command::Write { offset, fua, .. } => {
            if !payload.is_empty() {
                export.write(offset, &payload, fua).await?;
            } else if fua {
                export.flush().await?;
            }
            Ok(Done::Empty)
        }
        Command::Flush => export.flush().await.map(|()| Done::Empty),
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            if length > 0 {
                export.trim(offset, u64::from(length), fua).await?;
            }
            Ok(Done::Empty)
        }
        // keyturn zeroes by unmapping, which is always fast, so FAST_ZERO
        // never has to fail. NO_HOLE asks for provisioned storage; with
        // copy-on-write content blocks nothing can be provisioned ahead of
        // a write anyway, so the unmap is the honest answer.
        Command::WriteZeroes {
            offset,
            length,
            fua,
            ..
        } => {
            if length > 0 {
                export.write_zeroes(offset, u64::from(length), fua).await?;
            }
            Ok(Done::Empty)
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let extents = export.block_status(offset, u64::from(length)).await?;
            Ok(Done::Status(
                BASE_ALLOCATION_ID,
                proto::block_descriptors(&extents, length, req_one),
            ))
        }
        // A hint; the export has no cache to warm.
        Command::Cache { .. } => Ok(Done::Empty),
        // Handled by the reader; never dispatched.
        Command::Disc => Ok(Done::Empty),
    }
}

fn errno_of(e: &ExportError) -> Errno {
    match e {
        ExportError::Io(_) => Errno::Io,
        ExportError::Invalid(_) => Errno::Inval,
        ExportError::NoSpace(_) => Errno::NoSpc,
        ExportError::NotSupported(_) => Errno::NotSup,
        ExportError::Shutdown => Errno::Shutdown,
    }
}

fn error_reply(structured: bool, cookie: u64, errno: Errno) -> Vec<u8> {
    if structured {
        proto::error_chunk(cookie, errno)
    } else {
        proto::simple_reply(cookie, Some(errno)).to_vec()
    }
}

async fn run_request<E: Export>(
    ctx: Arc<Ctx<E>>,
    req: Request,
    payload: Vec<u8>,
    permits: Permits,
    tx: mpsc::Sender<Outgoing>,
) {
    let cookie = req.cookie;
    let result = execute(&*ctx.export, req.command, payload).await;
    ctx.metrics.finished(&req.command, result.is_ok());
    let (head, data) = match result {
        Ok(Done::Empty) => (proto::simple_reply(cookie, None).to_vec(), Vec::new()),
        Ok(Done::Data(offset, data)) => {
            if !ctx.structured {
                (proto::simple_reply(cookie, None).to_vec(), data)
            } else if let Some(h) = proto::offset_data_header(cookie, offset, data.len()) {
                (h.to_vec(), data)
            } else {
                // A zero-length read: nothing to cover, just finish.
                (proto::none_chunk(cookie).to_vec(), Vec::new())
            }
        }
        Ok(Done::Status(id, descriptors)) => (
            proto::block_status_chunk(cookie, id, &descriptors),
            Vec::new(),
        ),
        Err(e) => {
            // The full cause stays here; the client gets only the errno.
            let errno = errno_of(&e);
            match e {
                ExportError::Shutdown => {
                    tracing::info!(peer = %ctx.peer, command = ?req.command, "export shutting down")
                }
                _ => tracing::error!(
                    peer = %ctx.peer, command = ?req.command, error = %e, errno = errno.code(),
                    "export operation failed"
                ),
            }
            (error_reply(ctx.structured, cookie, errno), Vec::new())
        }
    };
    // Fails only if the writer is gone (client vanished): the work is done.
    let _ = tx
        .send(Outgoing {
            head,
            data,
            _permits: permits,
        })
        .await;
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    send_timeout: Duration,
) -> io::Result<()> {
    let stalled = || io::Error::new(io::ErrorKind::TimedOut, "client stopped reading replies");
    while let Some(msg) = rx.recv().await {
        let send = async {
            wr.write_all(&msg.head).await?;
            if !msg.data.is_empty() {
                wr.write_all(&msg.data).await?;
            }
            if rx.is_empty() {
                wr.flush().await?;
            }
            io::Result::Ok(())
        };
        tokio::time::timeout(send_timeout, send)
            .await
            .map_err(|_| stalled())??;
        // Release the permits as soon as the bytes are handed to the socket.
        drop(msg);
    }
    wr.flush().await?;
    wr.shutdown().await
}

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
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

        async fn write_zeroes(
            &self,
            offset: u64,
            length: u64,
            _fua: bool,
        ) -> Result<(), ExportError> {
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

        async fn meta(
            &mut self,
            code: u32,
            name: &str,
            queries: &[&str],
        ) -> (Vec<(u32, String)>, u32) {
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
}
