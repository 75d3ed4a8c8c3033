//! The transmission phase of one connection.
//!
//! A connection runs three kinds of task:
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

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::pin::Pin;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::ServerConfig;
use super::connection::{ClientLog, End, Fatal};
use super::request::{error_reply, run_request, run_write_batch};
use super::serve::shutdown_signal;
use super::wire::{drain, read_or_eof, read_payload};
use crate::nbd::export::Export;
use crate::nbd::handshake::Negotiated;
use crate::nbd::metrics::NbdMetrics;
use crate::nbd::proto::{self, Command, Request, RequestHeader, SessionParams};

/// Permits a request holds until its reply has been written.
pub(super) struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    /// Bytes of the budget shared by all connections, when it had room.
    _shared: Option<OwnedSemaphorePermit>,
}

/// One reply, written whole by the writer task.
pub(super) struct Outgoing {
    pub(super) head: Vec<u8>,
    pub(super) data: Vec<u8>,
    pub(super) _permits: Permits,
}

/// What the reader got from the wire.
enum Incoming {
    Eof,
    Disc,
    Request(Request, Vec<u8>, Permits),
    Rejected(proto::Rejection, Permits),
}

/// Shared by the request tasks of one connection.
pub(super) struct Ctx<E> {
    pub(super) export: Arc<E>,
    pub(super) peer: Arc<str>,
    pub(super) structured: bool,
    pub(super) metrics: Arc<NbdMetrics>,
}

pub(super) async fn transmission<E, R, W>(
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
    R: AsyncBufRead + Unpin,
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
            Ok(Incoming::Request(req, payload, permits)) if batches(&req.command) => {
                let mut batch = vec![(req, payload, permits)];
                let mut bytes = batch_bytes(&req.command);
                while batch.len() < BATCH_MAX_WRITES
                    && let Some(next) =
                        take_buffered_write(&mut rd, &params, &slots, &budget, &global)
                {
                    bytes += batch_bytes(&next.0.command);
                    batch.push(next);
                    if bytes >= BATCH_MAX_BYTES {
                        break;
                    }
                }
                let run = if batch.len() == 1 {
                    let (req, payload, permits) = batch.pop().expect("one");
                    Either::Left(run_request(ctx.clone(), req, payload, permits, tx.clone()))
                } else {
                    Either::Right(run_write_batch(ctx.clone(), batch, tx.clone()))
                };
                local.push(AssertUnwindSafe(run).catch_unwind());
            }
            Ok(Incoming::Request(req, payload, permits)) => {
                let run = run_request(ctx.clone(), req, payload, permits, tx.clone());
                if runs_inline(&req.command) {
                    // A panic ends this request, as it would its own task,
                    // not the connection.
                    local.push(AssertUnwindSafe(Either::Left(run)).catch_unwind());
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

/// Most WRITEs in one batch.
const BATCH_MAX_WRITES: usize = 64;

/// A batch stops growing once its payloads reach this many bytes.
const BATCH_MAX_BYTES: u32 = 256 << 10;

/// Whether `command` may start or join a batch of writes: a short WRITE
/// without FUA (a FUA write wants its own commit at once).
fn batches(command: &Command) -> bool {
    matches!(*command, Command::Write { length, fua: false, .. } if length > 0 && length <= INLINE_WRITE_MAX)
}

fn batch_bytes(command: &Command) -> u32 {
    match *command {
        Command::Write { length, .. } => length,
        _ => 0,
    }
}

/// The next request, if it is a WRITE that [`batches`], is already whole
/// in the read buffer, and its permits are free right now. Never waits and
/// consumes nothing otherwise, so whatever is left is read the usual way:
/// a batch only gathers what the client has already sent, and never holds
/// the requests it has while waiting for more.
fn take_buffered_write<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    params: &SessionParams,
    slots: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    global: &Arc<Semaphore>,
) -> Option<(Request, Vec<u8>, Permits)> {
    // fill_buf returns what is buffered without reading; on an empty buffer
    // it tries the socket once. Cancelling it consumes nothing.
    let Some(Ok(buf)) = rd.fill_buf().now_or_never() else {
        return None;
    };
    let raw: &[u8; proto::REQUEST_HEADER_LEN] =
        buf.get(..proto::REQUEST_HEADER_LEN)?.try_into().ok()?;
    let req = RequestHeader::parse(raw).ok()?.validate(params).ok()?;
    if !batches(&req.command) {
        return None;
    }
    let length = batch_bytes(&req.command);
    let whole = proto::REQUEST_HEADER_LEN + length as usize;
    let payload = buf.get(proto::REQUEST_HEADER_LEN..whole)?.to_vec();
    let permits = Permits {
        _slot: slots.clone().try_acquire_owned().ok()?,
        _bytes: Some(budget.clone().try_acquire_many_owned(length).ok()?),
        _shared: Some(global.clone().try_acquire_many_owned(length).ok()?),
    };
    Pin::new(&mut *rd).consume(whole);
    Some((req, payload, permits))
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
