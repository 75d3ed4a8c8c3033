//! Telling "no space left on device" from other I/O errors, by kind (never
//! by matching error text): a full device is the operator's to fix and
//! goes away, where EIO may be a dying disk.

#![forbid(unsafe_code)]

use std::error::Error;
use std::io;

/// Whether `e`, or an error it wraps, is "no space left on device" (or a
/// quota exceeded, which is the same to the writer).
pub fn is_no_space(e: &(dyn Error + 'static)) -> bool {
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("write on dev: {0}")]
    struct Wrapped(#[source] io::Error);

    #[test]
    fn finds_enospc_through_sources() {
        let full = Wrapped(io::Error::from_raw_os_error(28));
        assert!(is_no_space(&full));
        let eio = Wrapped(io::Error::from_raw_os_error(5));
        assert!(!is_no_space(&eio));
        let quota = io::Error::from_raw_os_error(122);
        assert!(is_no_space(&quota));
    }
}
