//! The key hierarchy: root key → per-zone KEK versions → per-zone DEKs and
//! MAC key. Only wrapped keys are ever stored.

pub mod secret;
