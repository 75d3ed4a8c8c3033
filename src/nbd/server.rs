//! Serving NBD over tokio: listening (TCP or Unix socket), the fixed
//! newstyle handshake, and the transmission phase.
//!
//! Every connection is its own task, so a stalled or hostile client only
//! holds its own task.
//!
//! - `listen`: binding and accepting;
//! - `serve`: the accept loop and shutdown;
//! - `limits`: the tunables ([`ServerConfig`]);
//! - `connection`: one connection's life, handshake then transmission;
//! - `wire`: exact reads and drains;
//! - `transmission`: the reader, the writer and back-pressure;
//! - `request`: one request against the export, and its reply.

#![forbid(unsafe_code)]

mod connection;
mod limits;
mod listen;
mod request;
mod serve;
mod transmission;
mod wire;

pub(super) use connection::{ClientLog, Fatal};
pub use limits::ServerConfig;
pub use listen::{BindError, BoundAddr, Listener, bind};
pub use serve::{serve, serve_secured};
pub(super) use wire::{drain, read_full, read_or_eof};

/// Context id of `base:allocation` on a connection that selected it.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz;

#[cfg(test)]
mod tests;
