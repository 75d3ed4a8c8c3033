//! The accept loop: one task per connection, the connection limit, and a
//! clean shutdown that lets connections finish what they have read.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::ServerConfig;
use super::connection::connection;
use super::listen::{Accepted, Listener, accept};
use crate::nbd::access::Client;
use crate::nbd::export::ExportCatalog;
use crate::nbd::handshake::Security;
use crate::nbd::metrics::NbdMetrics;

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

/// Resolves once `rx` holds `true`; never if the sender is gone first.
pub(super) async fn shutdown_signal(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
