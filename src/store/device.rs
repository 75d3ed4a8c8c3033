//! Block device and file I/O through io_uring (with a plain-syscall
//! backend for comparison and fallback), on 4 KiB-aligned buffers.

use std::path::Path;

/// Errors from device I/O. Carries the operation, device and offset.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An I/O operation failed.
    #[error("{op} on {device} at offset {offset}: {source}")]
    Io {
        /// Operation ("read", "write", "sync", "open", "grow").
        op: &'static str,
        /// Device path.
        device: String,
        /// Byte offset (0 for whole-device operations).
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operation ran past the end of a fixed-size device.
    #[error("{op} on {device} at offset {offset} length {len} is past its end ({size} bytes)")]
    OutOfRange {
        /// Operation.
        op: &'static str,
        /// Device path.
        device: String,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The I/O engine has stopped.
    #[error("the I/O engine has stopped")]
    EngineStopped,
}

/// A heap buffer aligned to 4096 bytes, its length a multiple of 4096, for
/// O_DIRECT I/O. Zero-filled on allocation.
pub struct AlignedBuf {
    _todo: (),
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a multiple of 4096).
    pub fn zeroed(len: usize) -> Self {
        let _ = len;
        todo!()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        todo!()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        todo!()
    }
}

/// Options for opening a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Create the file if it does not exist.
    pub create: bool,
    /// Try O_DIRECT, and fall back to buffered I/O where the filesystem refuses it.
    pub direct: bool,
}

/// An open device: a regular file (grown on demand) or a raw block device.
/// Cheap to clone; all clones share one open file and one I/O engine.
#[derive(Clone)]
pub struct Device {
    _todo: (),
}

impl Device {
    /// Opens `path`, submitting its I/O through `engine`.
    pub fn open(path: &Path, opts: &DeviceOptions, engine: &Engine) -> Result<Self, DeviceError> {
        let _ = (path, opts, engine);
        todo!()
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. The buffer comes back
    /// whatever the outcome. Reading past the end of a file yields zeros.
    pub async fn read_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        let _ = (offset, buf);
        todo!()
    }

    /// Writes all of `buf` at `offset`. The buffer comes back whatever the outcome.
    pub async fn write_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        let _ = (offset, buf);
        todo!()
    }

    /// fdatasync: every completed write is durable.
    pub async fn sync(&self) -> Result<(), DeviceError> {
        todo!()
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        todo!()
    }

    /// Grows a regular file to at least `len` bytes (sparse); fails on a
    /// block device smaller than `len`.
    pub fn ensure_size(&self, len: u64) -> Result<(), DeviceError> {
        let _ = len;
        todo!()
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        todo!()
    }
}

/// Settings of the I/O engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// io_uring submission queue entries.
    pub queue_depth: u32,
    /// Use the plain-syscall backend instead of io_uring.
    pub sync_backend: bool,
}

/// The I/O engine: one io_uring (driven by its own thread) shared by every device.
#[derive(Clone)]
pub struct Engine {
    _todo: (),
}

impl Engine {
    /// Starts the engine.
    pub fn start(config: &EngineConfig) -> Result<Self, DeviceError> {
        let _ = config;
        todo!()
    }
}
