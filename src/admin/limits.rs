//! What a careless or hostile HTTP client of the admin API may hold, and
//! the accept loop that enforces it.
//!
//! `axum::serve` sets no timer, so hyper's header-read timeout never fires
//! there: a client dripping one header byte at a time (slow loris) or
//! sitting idle on a kept-alive connection holds its task forever, and
//! nothing bounds how many such clients there are. This loop serves the
//! same router over HTTP/1.1 with:
//!
//! - at most [`MAX_CONNECTIONS`] connections at once; one more is closed at
//!   once (with a warning), so a flood costs a socket, not a task and a
//!   buffer each;
//! - [`HEADER_TIMEOUT`] to send a request's whole head, counted from the
//!   first read of it (so an idle kept-alive connection is closed too);
//! - heads of at most [`MAX_HEAD_BYTES`] (431 beyond, then close);
//! - [`BODY_TIMEOUT`] to send a body, enforced where bodies are read
//!   (`body_bytes` in `http.rs`: 408 beyond).
//!
//! So one connection holds at most about `MAX_HEAD_BYTES` of head plus
//! `MAX_BODY` of body, for at most `HEADER_TIMEOUT + BODY_TIMEOUT` plus the
//! time its request takes.

#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Connections served at once; the dashboard and a few operators' tools
/// need a handful.
pub const MAX_CONNECTIONS: usize = 128;

/// Time a client has to send a request's line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send a request's body, once its head is read.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers) in bytes; a bearer
/// token and a few headers need well under 1 KiB.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

/// Longest wait for requests in flight when the server stops.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves `app` on `listener` under the limits above until `stop`
/// completes, then lets each connection finish its request in flight
/// (for at most [`CLOSE_TIMEOUT`]) and returns.
pub async fn serve<L>(mut listener: L, app: Router, stop: impl Future<Output = ()>)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (closing, close_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
            // Reap finished connections as we go, so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                ?peer,
                limit = MAX_CONNECTIONS,
                "admin API: refused a client: too many connections"
            );
            drop(io);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut close = close_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { drop(close.wait_for(|c| *c).await) } => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_TIMEOUT, conn).await.unwrap_or(Ok(()))
                }
            };
            // A header timeout, an oversized head or a reset: the client's
            // doing, answered (where HTTP allows) and closed by hyper.
            if let Err(e) = result {
                tracing::debug!(?peer, error = %e, "admin API: connection ended");
            }
        });
    }
    let _ = closing.send(true);
    while conns.join_next().await.is_some() {}
}
