//! Before a rotation window opens, one block of zeros is written to a free
//! staging slot: a staging device that cannot be written fails the
//! `prepare` (which the scheduler retries with backoff, then marks failed
//! and alerts) instead of opening a window whose every staged copy fails.
//! Zeros, never a pooled buffer: a pooled buffer may have held plaintext.

use super::Result;
use crate::ids::BLOCK_SIZE;
use crate::pool::PoolError;
use crate::store::Storage;
use crate::store::device::AlignedBuf;

/// Writes zeros to one free staging slot and gives the slot back. A full
/// staging area is not an error here (nothing to probe with).
pub(super) fn staging_writable(storage: &Storage) -> Result<()> {
    let Some(staging) = &storage.staging else {
        return Ok(());
    };
    let Some(slot) = staging.alloc_foreground(1).pop() else {
        return Ok(());
    };
    let result = staging.ensure_slots(slot.0 + 1).and_then(|()| {
        let offset = Storage::offset(slot);
        futures::executor::block_on(
            staging
                .device
                .write_at(offset, AlignedBuf::zeroed(BLOCK_SIZE)),
        )
        .0
    });
    staging.release_now(&[slot]);
    result.map_err(|e| {
        PoolError::Conflict(format!(
            "the staging device cannot be written ({e}); no rotation window was opened"
        ))
    })
}
