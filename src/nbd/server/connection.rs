//! One connection's life: the handshake under its timeout, then
//! transmission, and one log line (and audit record) for what the client
//! did wrong.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use super::ServerConfig;
use super::serve::shutdown_signal;
use super::transmission::transmission;
use crate::nbd::access::Client;
use crate::nbd::export::ExportCatalog;
use crate::nbd::handshake::{self, Security};
use crate::nbd::metrics::NbdMetrics;
use crate::nbd::proto::{BadRequestMagic, HandshakeError};

/// Why a connection was dropped by the server: the peer broke the framing
/// or a MUST, vanished mid-message, or took too long.
#[derive(Debug, thiserror::Error)]
pub(in crate::nbd) enum Fatal {
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
pub(super) enum End {
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
pub(in crate::nbd) struct ClientLog {
    pub(in crate::nbd) peer: Arc<str>,
    rejected: u64,
    first: Option<String>,
    /// What access control (or the TLS handshake) refused it, for the
    /// one audit record per refused client.
    refused: Vec<String>,
    pub(in crate::nbd) metrics: Arc<NbdMetrics>,
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
    pub(in crate::nbd) fn refuse(&mut self, what: &str) {
        let shown: String = what.chars().take(128).collect();
        self.note(format_args!("refused by access control: {shown:?}"));
        if self.refused.len() < MAX_REFUSALS_KEPT && !self.refused.contains(&shown) {
            self.refused.push(shown);
        }
    }

    /// Records a refused option or request (the connection stays open).
    pub(in crate::nbd) fn note(&mut self, reason: impl fmt::Display) {
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
pub(super) async fn connection<C>(
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
