//! Running one request against the export and building its reply.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::BASE_ALLOCATION_ID;
use super::transmission::{Ctx, Outgoing, Permits};
use crate::nbd::export::{Export, ExportError};
use crate::nbd::proto::{self, Command, Errno, Request};

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

pub(super) fn error_reply(structured: bool, cookie: u64, errno: Errno) -> Vec<u8> {
    if structured {
        proto::error_chunk(cookie, errno)
    } else {
        proto::simple_reply(cookie, Some(errno)).to_vec()
    }
}

pub(super) async fn run_request<E: Export>(
    ctx: Arc<Ctx<E>>,
    req: Request,
    payload: Vec<u8>,
    permits: Permits,
    tx: mpsc::Sender<Outgoing>,
) {
    let result = execute(&*ctx.export, req.command, payload).await;
    reply(&ctx, req, result, permits, &tx).await;
}

/// A request read from the wire, with its payload and permits.
pub(super) type Read = (Request, Vec<u8>, Permits);

/// Runs WRITEs that arrived together (none with FUA) as one batch of the
/// export, then replies to each.
pub(super) async fn run_write_batch<E: Export>(
    ctx: Arc<Ctx<E>>,
    batch: Vec<Read>,
    tx: mpsc::Sender<Outgoing>,
) {
    let writes: Vec<(u64, &[u8])> = batch
        .iter()
        .map(|(req, payload, _)| match req.command {
            Command::Write { offset, .. } => (offset, &payload[..]),
            _ => unreachable!("a write batch holds only writes"),
        })
        .collect();
    let results = ctx.export.write_batch(&writes).await;
    drop(writes);
    ctx.metrics.write_batch(batch.len());
    for ((req, _, permits), result) in batch.into_iter().zip(results) {
        reply(&ctx, req, result.map(|()| Done::Empty), permits, &tx).await;
    }
}

/// Counts a finished request and hands its reply to the writer.
async fn reply<E: Export>(
    ctx: &Ctx<E>,
    req: Request,
    result: Result<Done, ExportError>,
    permits: Permits,
    tx: &mpsc::Sender<Outgoing>,
) {
    let cookie = req.cookie;
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
