//! keyturn: an encrypted userspace block device served over NBD.
//!
//! Modules follow the way data travels (see `../shared/DESIGN.md`):
//! [`nbd`] (protocol only) → [`volume`] (LBA map, read-modify-write) →
//! [`zone`] (content blocks, keys in use) → [`crypto`] (pure functions) →
//! [`store`] (devices, journal, tables, allocators). [`keys`] holds the key
//! hierarchy; [`audit`] is the tamper-evident audit log; [`pool`] ties a pool
//! directory together; [`admin`] is the admin HTTP API (served by
//! `keyturn serve`, implemented for the pool in `pool/admin.rs`) and its
//! metrics; [`cli`] is the edge.

pub mod actor;
pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod nbd;
pub mod pool;
pub mod replica;
pub mod report;
pub mod rotation;
pub mod schedule;
pub mod scrub;
pub mod store;
pub mod stream;
pub mod tls;
pub mod volume;
pub mod zone;
