//! The NBD server: protocol (sans-I/O) and connection handling. Knows
//! nothing of keys or storage: it serves anything that implements
//! [`export::Export`].

#![forbid(unsafe_code)]

pub mod access;
pub mod export;
mod handshake;
mod metrics;
pub mod proto;
pub mod server;

pub use export::{Export, ExportCatalog, ExportError, ExportInfo, Extent};
pub use handshake::Security;
pub use server::{BindError, BoundAddr, Listener, ServerConfig, bind, serve, serve_secured};
