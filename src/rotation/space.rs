//! A rotation that runs out of room: the staging or data device's
//! filesystem (or a block device) answers ENOSPC. The pipeline or migrator
//! then stops its pass rather than failing batch after batch, the status
//! says which device is full (`waiting_for_space`), and the next pass (a
//! second later) tries again: the first batch that is written clears the
//! wait, so the rotation resumes by itself once space returns.

#![forbid(unsafe_code)]

use std::error::Error;

use parking_lot::Mutex;

/// Why a rotation's worker is waiting for space, if it is.
#[derive(Default, Debug)]
pub struct SpaceWait {
    reason: Mutex<Option<String>>,
}

impl SpaceWait {
    /// Notes that writing to `device` ("staging" or "data") failed for
    /// want of space; logs once per wait.
    pub fn full(&self, device: &str, error: &dyn Error) {
        let mut r = self.reason.lock();
        if r.is_none() {
            tracing::warn!(device, %error, "rotation waits for space on the {device} device");
        }
        *r = Some(format!(
            "the {device} device is full ({error}); the rotation waits and resumes when space returns"
        ));
    }

    /// A batch was written: space is back.
    pub fn written(&self) {
        if self.reason.lock().take().is_some() {
            tracing::info!("rotation resumes: space returned");
        }
    }

    /// Whether the worker is waiting.
    pub fn waiting(&self) -> bool {
        self.reason.lock().is_some()
    }

    /// What the status reports.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_written_batch_ends_the_wait() {
        let w = SpaceWait::default();
        assert!(!w.waiting());
        w.full("staging", &io::Error::from_raw_os_error(28));
        assert!(w.waiting());
        assert!(w.reason().unwrap().contains("staging device is full"));
        w.written();
        assert!(w.reason().is_none());
    }
}
