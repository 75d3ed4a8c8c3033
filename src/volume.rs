//! Volumes: one NBD export each. Turns byte ranges into logical blocks,
//! does read-modify-write for unaligned requests, orders overlapping
//! requests with a range lock, and maps blocks to content blocks.
//!
//! A write never touches a slot that a durable record points to: it
//! encrypts into freshly allocated slots, waits for the device writes, and
//! only then, under the zone lock, moves the map and appends one journal
//! frame. The replaced content blocks are freed after that frame is durable.

use std::ops::Range;
use std::sync::Arc;

use crate::ids::{BLOCK_SHIFT, BLOCK_SIZE, Cbid, Lba, VolumeId};
use crate::nbd::export::ExportError;
use crate::store::Storage;
use crate::store::journal::{CbRecord, Journal, LiveCopy};
use crate::zone::Zone;

mod apply;
mod batch;
mod export;
mod place;
mod range_lock;
mod read;
mod record;
mod unmap;
mod write;

pub use range_lock::{RangeGuard, RangeLock};
pub(crate) use record::{Freed, free_after, free_slots_after};

const BS: u64 = BLOCK_SIZE as u64;

/// Where one logical block's data is.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Located {
    cbid: Cbid,
    record: CbRecord,
    live: LiveCopy,
}

/// A volume being served.
pub struct Volume {
    /// Numeric id.
    pub id: VolumeId,
    /// Export name.
    pub name: String,
    size: u64,
    zone: Arc<Zone>,
    storage: Arc<Storage>,
    journal: Arc<Journal>,
    locks: RangeLock,
}

fn io_err(what: impl std::fmt::Display) -> ExportError {
    ExportError::Io(what.to_string())
}

impl Volume {
    /// A volume of `size` bytes in `zone`.
    pub fn new(
        id: VolumeId,
        name: String,
        size: u64,
        zone: Arc<Zone>,
        storage: Arc<Storage>,
        journal: Arc<Journal>,
    ) -> Self {
        Self {
            id,
            name,
            size,
            zone,
            storage,
            journal,
            locks: RangeLock::default(),
        }
    }

    /// The zone this volume belongs to.
    pub fn zone(&self) -> &Arc<Zone> {
        &self.zone
    }

    fn block_range(offset: u64, len: u64) -> Range<u64> {
        (offset >> BLOCK_SHIFT)..(offset + len).div_ceil(BS)
    }

    /// Fail-stop: once a journal commit failed (a full metadata directory,
    /// say), no later write could ever be made durable, so none is
    /// acknowledged; reads go on. A restart recovers from the journal.
    fn check_writable(&self) -> Result<(), ExportError> {
        match self.journal.durable().error {
            Some(e) => Err(io_err(format!(
                "{e}; writes are refused until the server restarts"
            ))),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} is past the end ({})",
                self.size
            ))),
        }
    }

    /// Looks up where each block of `blocks` lives.
    fn locate(&self, blocks: Range<u64>) -> Result<Vec<Option<Located>>, ExportError> {
        let meta = self.zone.meta.lock();
        let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
        blocks
            .map(|b| {
                let Some(cbid) = map.get(Lba(b)) else {
                    return Ok(None);
                };
                match meta.cb(cbid) {
                    Some(record) => Ok(Some(Located {
                        cbid,
                        record,
                        live: meta.live(&record),
                    })),
                    None => Err(io_err(format!(
                        "volume {} block {b} maps to content block {cbid}, which has no record",
                        self.name
                    ))),
                }
            })
            .collect()
    }
}
