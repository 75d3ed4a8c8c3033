//! Storage: devices (io_uring), the write-ahead journal, memory-mapped
//! tables and slot allocators.

pub mod alloc;
pub mod bufpool;
pub mod device;
pub mod fault;
pub mod journal;
pub mod table;
mod uring;

use std::fs::File;

use parking_lot::Mutex;

use crate::ids::{BLOCK_SIZE, Slot};
use alloc::IdAllocator;
use device::{Device, DeviceError};

/// How much a growable data file is extended at a time.
const GROW_STEP: u64 = 256 << 20;

/// The data device with its slot allocator.
pub struct Storage {
    /// The data device.
    pub data: Device,
    /// A plain handle on the same file, for fdatasync from the committer thread.
    data_sync: File,
    /// Which slots are in use.
    pub slots: Mutex<IdAllocator>,
    /// Recycled I/O buffers.
    pub bufs: bufpool::BufPool,
    /// Whether the device is a regular file we may grow.
    growable: bool,
}

impl Storage {
    /// Wraps an open data device. `limit` bounds the slots (a raw device's size).
    pub fn new(data: Device, data_sync: File, growable: bool) -> Self {
        let limit = if growable {
            u64::MAX
        } else {
            data.size() / BLOCK_SIZE as u64
        };
        Self {
            data,
            data_sync,
            slots: Mutex::new(IdAllocator::new(limit)),
            bufs: bufpool::BufPool::default(),
            growable,
        }
    }

    /// Byte offset of a slot.
    pub fn offset(slot: Slot) -> u64 {
        slot.0 * BLOCK_SIZE as u64
    }

    /// Makes sure slots below `end` exist on the device, growing a file in steps.
    pub fn ensure_slots(&self, end: u64) -> Result<(), DeviceError> {
        let need = end * BLOCK_SIZE as u64;
        if need <= self.data.size() || !self.growable {
            return Ok(());
        }
        self.data.ensure_size(need.div_ceil(GROW_STEP) * GROW_STEP)
    }

    /// fdatasync of the data device, for the journal committer.
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.data_sync.sync_data()
    }
}
