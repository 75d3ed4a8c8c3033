//! Storage: devices (io_uring), the write-ahead journal, memory-mapped
//! tables and slot allocators.

pub mod alloc;
mod backing;
pub mod bufpool;
pub mod device;
pub mod durable;
pub mod fault;
pub mod full;
pub mod journal;
pub mod powerloss;
pub mod table;
mod uring;

use std::fs::File;

use parking_lot::Mutex;

use crate::ids::{BLOCK_SIZE, Slot};
use alloc::IdAllocator;
use device::{Device, DeviceError};

/// How much a growable data file is extended at a time.
const GROW_STEP: u64 = 256 << 20;

/// The staging device: fast storage for copies under the next DEK during
/// a rotation window, with its own slot allocator bounded by the configured
/// capacity.
pub struct Staging {
    /// The device.
    pub device: Device,
    /// For fdatasync from the committer thread.
    sync: SyncHandle,
    /// Which staging slots are in use.
    pub slots: Mutex<IdAllocator>,
    /// Slots the staging pipeline leaves free for foreground writes.
    pub reserve: u64,
    /// Capacity in slots.
    pub capacity: u64,
    growable: bool,
}

impl Staging {
    /// Wraps an open staging device with `capacity` slots, `reserve` of them
    /// kept for foreground writes.
    pub fn new(device: Device, sync: File, growable: bool, capacity: u64, reserve: u64) -> Self {
        let capacity = if growable {
            capacity
        } else {
            capacity.min(device.size() / BLOCK_SIZE as u64)
        };
        Self {
            device,
            sync: SyncHandle::new(sync),
            slots: Mutex::new(IdAllocator::new(capacity)),
            reserve: reserve.min(capacity),
            capacity,
            growable,
        }
    }

    /// Takes up to `want` slots for foreground writes (which may use the
    /// reserve). Fewer (or none) when the area is full.
    pub fn alloc_foreground(&self, want: u64) -> Vec<Slot> {
        self.alloc(want, 0)
    }

    /// Takes up to `want` slots for the staging pipeline, leaving the
    /// reserve free.
    pub fn alloc_background(&self, want: u64) -> Vec<Slot> {
        self.alloc(want, self.reserve)
    }

    fn alloc(&self, want: u64, keep: u64) -> Vec<Slot> {
        let mut a = self.slots.lock();
        let free = self.capacity.saturating_sub(a.used());
        let mut n = want.min(free.saturating_sub(keep));
        let mut out = Vec::with_capacity(n as usize);
        while n > 0 {
            let Some((f, c)) = a.alloc_run(n) else { break };
            out.extend((f..f + c).map(Slot));
            n -= c;
        }
        out
    }

    /// Returns slots nothing durable points to.
    pub fn release_now(&self, slots: &[Slot]) {
        let mut a = self.slots.lock();
        for s in slots {
            a.release_now(s.0, 1);
        }
    }

    /// Slots in use (including frees not yet durable).
    pub fn used(&self) -> u64 {
        self.slots.lock().used()
    }

    /// Makes sure slots below `end` exist on the device.
    pub fn ensure_slots(&self, end: u64) -> Result<(), DeviceError> {
        let need = end * BLOCK_SIZE as u64;
        if need <= self.device.size() || !self.growable {
            return Ok(());
        }
        self.device.ensure_size(
            (need.div_ceil(GROW_STEP) * GROW_STEP)
                .min(self.capacity * BLOCK_SIZE as u64)
                .max(need),
        )
    }
}

/// Punches every free run of `slots` below the device's end, in chunks
/// reserved from the allocator while they are punched.
fn discard(slots: &Mutex<IdAllocator>, file: &File, size: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const CHUNK: u64 = 1 << 16;
    let end = size / BLOCK_SIZE as u64;
    let mut total = 0;
    let mut from = 0;
    while from < end {
        let to = (from + CHUNK).min(end);
        let a = slots.lock();
        let runs = a.free_runs(from..to);
        for &(f, c) in &runs {
            let len = (c * BLOCK_SIZE as u64) as libc::off_t;
            let off = (f * BLOCK_SIZE as u64) as libc::off_t;
            // SAFETY: fallocate on an fd we own, with no memory arguments.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            total += c;
        }
        drop(a);
        from = to;
    }
    durable::sync_data(file)?;
    Ok(total)
}

/// The data device with its slot allocator.
pub struct Storage {
    /// The data device.
    pub data: Device,
    /// For fdatasync from the committer thread.
    data_sync: SyncHandle,
    /// Which slots are in use.
    pub slots: Mutex<IdAllocator>,
    /// Recycled I/O buffers.
    pub bufs: bufpool::BufPool,
    /// Whether the device is a regular file we may grow.
    growable: bool,
    /// The staging device, if the pool has one open.
    pub staging: Option<Staging>,
    /// Foreground writes of at least this many contiguous blocks bypass the
    /// page cache (see [`Storage::with_uncached_runs`]).
    uncached_run_blocks: usize,
    /// Most blocks one data or staging I/O carries.
    max_run_blocks: usize,
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
            data_sync: SyncHandle::new(data_sync),
            slots: Mutex::new(IdAllocator::new(limit)),
            bufs: bufpool::BufPool::default(),
            growable,
            staging: None,
            uncached_run_blocks: usize::MAX,
            max_run_blocks: usize::MAX,
        }
    }

    /// Adds the staging device.
    pub fn with_staging(mut self, staging: Staging) -> Self {
        self.staging = Some(staging);
        self
    }

    /// Sends foreground data-device writes of at least `kib` KiB in one run
    /// past the page cache ([`Device::write_at_uncached`]); 0 keeps them all
    /// buffered. Streaming writes then cost no page-cache copy and no
    /// writeback at commit, while small writes stay cached for the reads
    /// that follow them.
    pub fn with_uncached_runs(mut self, kib: u64) -> Self {
        let blocks = kib * 1024 / BLOCK_SIZE as u64;
        self.uncached_run_blocks = if kib == 0 {
            usize::MAX
        } else {
            usize::try_from(blocks.max(1)).unwrap_or(usize::MAX)
        };
        self
    }

    /// Caps the blocks one foreground device I/O carries (a profile's
    /// `[batch] max_run_blocks`; at least 1).
    pub fn with_max_run(mut self, blocks: u64) -> Self {
        self.max_run_blocks = usize::try_from(blocks.max(1)).unwrap_or(usize::MAX);
        self
    }

    /// Most blocks one foreground device I/O carries.
    pub fn max_run_blocks(&self) -> usize {
        self.max_run_blocks
    }

    /// Writes a run of `blocks` new content blocks at `slot` of the data
    /// device, past the page cache when the run is long enough.
    pub async fn write_data_run(
        &self,
        slot: Slot,
        blocks: usize,
        buf: device::AlignedBuf,
    ) -> (Result<(), DeviceError>, device::AlignedBuf) {
        if blocks >= self.uncached_run_blocks {
            self.data.write_at_uncached(Self::offset(slot), buf).await
        } else {
            self.data.write_at(Self::offset(slot), buf).await
        }
    }

    /// Reads `buf.len()` bytes at `slot` of the device `place` names; a
    /// missing staging device is an error (ENODEV), not a panic.
    pub async fn read_copy(
        &self,
        place: journal::Place,
        slot: Slot,
        buf: device::AlignedBuf,
    ) -> (Result<(), DeviceError>, device::AlignedBuf) {
        match self.device(place) {
            Some(dev) => dev.read_at(Self::offset(slot), buf).await,
            None => (
                Err(DeviceError::Io {
                    op: "read",
                    device: "staging".into(),
                    offset: 0,
                    source: std::io::Error::from_raw_os_error(libc::ENODEV),
                }),
                buf,
            ),
        }
    }

    /// [`read_copy`](Self::read_copy) for the rotation pipeline's bulk reads
    /// (see [`Device::read_at_bulk`]).
    pub async fn read_copy_bulk(
        &self,
        place: journal::Place,
        slot: Slot,
        buf: device::AlignedBuf,
        uncached: bool,
    ) -> (Result<(), DeviceError>, device::AlignedBuf) {
        match self.device(place) {
            Some(dev) => dev.read_at_bulk(Self::offset(slot), buf, uncached).await,
            None => self.read_copy(place, slot, buf).await,
        }
    }

    /// The device a copy lives on.
    pub fn device(&self, place: journal::Place) -> Option<&Device> {
        match place {
            journal::Place::Data => Some(&self.data),
            journal::Place::Staging => self.staging.as_ref().map(|s| &s.device),
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

    /// Discards the free slots of the data and staging devices (punches
    /// holes in files), so ciphertext under a destroyed key does not linger
    /// in freed slots. Free runs are reserved while they are punched, so no
    /// write can land in them meanwhile. Returns the slots discarded.
    pub fn discard_free(&self) -> std::io::Result<u64> {
        let mut total = discard(&self.slots, &self.data_sync.file, self.data.size())?;
        if let Some(s) = &self.staging {
            total += discard(&s.slots, &s.sync.file, s.device.size())?;
        }
        Ok(total)
    }

    /// fdatasync of the data and staging devices, for the journal committer
    /// (a frame never becomes durable before the data it points to). A
    /// device with no write completed since its last sync is skipped: a
    /// commit of metadata alone (a flip, a trim, rotation records whose
    /// copies were synced by an earlier commit) costs one fdatasync, of the
    /// journal, instead of three.
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.data_sync.sync_if_written(&self.data)?;
        if let Some(s) = &self.staging {
            s.sync.sync_if_written(&s.device)?;
        }
        Ok(())
    }
}

/// A plain handle on a device's file for fdatasync from the committer
/// thread, and how many of the device's writes the last sync covered.
struct SyncHandle {
    file: File,
    synced: std::sync::atomic::AtomicU64,
}

impl SyncHandle {
    fn new(file: File) -> Self {
        Self {
            file,
            // Nothing is known to be synced at open: the first sync runs.
            synced: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// fdatasync, unless no write of `device` completed since the last one.
    /// Returns whether it synced.
    fn sync_if_written(&self, device: &Device) -> std::io::Result<bool> {
        use std::sync::atomic::Ordering;
        // Read before the sync: writes completed by now are covered by it.
        let writes = device.completed_writes();
        if self.synced.load(Ordering::Acquire) == writes {
            return Ok(false);
        }
        durable::sync_data(&self.file)?;
        self.synced.store(writes, Ordering::Release);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::device::{AlignedBuf, DeviceOptions, Engine, EngineConfig};
    use super::*;

    #[test]
    fn sync_runs_only_after_a_completed_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let engine = Engine::start(&EngineConfig::new(8)).unwrap();
        let opts = DeviceOptions {
            create: true,
            direct: false,
            uncached_writes: false,
        };
        let dev = Device::open(&path, &opts, &engine).unwrap();
        dev.ensure_size(1 << 20).unwrap();
        let handle = SyncHandle::new(File::open(&path).unwrap());
        assert!(handle.sync_if_written(&dev).unwrap(), "the first sync runs");
        assert!(
            !handle.sync_if_written(&dev).unwrap(),
            "nothing written since"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (r, _) = rt.block_on(dev.write_at(0, AlignedBuf::zeroed(4096)));
        r.unwrap();
        assert!(handle.sync_if_written(&dev).unwrap(), "a write completed");
        assert!(!handle.sync_if_written(&dev).unwrap());
    }
}
