//! The NBD server: protocol (sans-I/O) and connection handling. Knows
//! nothing of keys or storage: it serves anything that implements
//! [`export::Export`].

pub mod export;
