//! Pure cryptographic functions: AES-256-XTS for content blocks and keyed
//! BLAKE3 tags. No I/O here.

pub mod tag;
pub mod wipe;
pub mod xts;
