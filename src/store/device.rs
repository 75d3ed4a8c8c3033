//! Block device and file I/O through io_uring (with a plain-syscall
//! backend for comparison and fallback), on 4 KiB-aligned buffers.
//!
//! An [`Engine`] runs the I/O: one io_uring driven by its own thread (see
//! `uring.rs`, the only unsafe code here), or a small pool of threads doing
//! pread/pwrite/fdatasync. A [`Device`] is an open file or block device whose
//! async operations go through an engine. Every operation owns its
//! [`AlignedBuf`] and hands it back when done, so a dropped future never
//! leaves the kernel writing into freed memory.
//!
//! # Size
//! A device's size only changes through [`Device::ensure_size`]; writes past
//! it are refused with [`DeviceError::OutOfRange`]. Writes never extend a
//! file themselves, so growing cannot race with them and never truncates
//! data that a write just placed past the old end.
//!
//! # Fail-stop
//! After a failed sync the device is poisoned: every later sync and write
//! fails with [`DeviceError::Poisoned`] until the device is reopened and the
//! journal recovered. The kernel may have dropped the dirty pages whose
//! writeback failed, so a later fdatasync succeeding would prove nothing
//! (redb and PostgreSQL's fsync lesson). Reads still work.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

#[cfg(test)]
use super::fault::FaultCounts;
use super::fault::{FaultOp, FaultPlan};
pub use super::uring::AlignedBuf;
use super::uring::{self, OpKind, PAGE, Request, Waker};

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
    /// An earlier sync failed, so nothing written since the last good sync
    /// can be called durable; the device refuses writes and syncs until it
    /// is reopened and recovered.
    #[error("{op} on {device} refused: an earlier sync failed (fail-stop); reopen and recover")]
    Poisoned {
        /// Operation ("write" or "sync").
        op: &'static str,
        /// Device path.
        device: String,
    },
    /// The I/O engine has stopped.
    #[error("the I/O engine has stopped")]
    EngineStopped,
}

/// Options for opening a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Create the file if it does not exist.
    pub create: bool,
    /// Try O_DIRECT, and fall back to buffered I/O where the filesystem refuses it.
    pub direct: bool,
    /// On a buffered device, also open an O_DIRECT handle for
    /// [`Device::write_at_uncached`]; skipped where O_DIRECT is refused.
    pub uncached_writes: bool,
}

/// An open device: a regular file (grown on demand) or a raw block device.
/// Cheap to clone; all clones share one open file and one I/O engine.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
    /// Fault injection, for failure tests; `None` costs one branch per op.
    faults: Option<FaultPlan>,
}

struct DeviceInner {
    /// For error messages.
    name: String,
    /// Shared with every in-flight request, which keeps the descriptor
    /// open until the kernel is done with it.
    file: Arc<File>,
    /// An O_DIRECT handle on the same file, for writes that should not
    /// fill the page cache; `None` when `file` is already direct or the
    /// filesystem refuses O_DIRECT.
    uncached: Option<Arc<File>>,
    engine: Engine,
    direct: bool,
    block_device: bool,
    /// Authoritative size: only `ensure_size` changes it, under `grow`.
    size: AtomicU64,
    grow: Mutex<()>,
    /// Set by the first failed sync; never cleared.
    poisoned: AtomicBool,
    /// Writes completed so far (see [`Device::completed_writes`]).
    completed_writes: AtomicU64,
}

/// The system calls that `open` makes, replaceable in tests so that the
/// O_DIRECT fallback can be exercised on a filesystem that accepts O_DIRECT.
struct OpenSys {
    open: fn(&Path, &DeviceOptions, bool) -> io::Result<File>,
    /// One aligned read, to see whether O_DIRECT I/O really works.
    probe: fn(&File) -> io::Result<()>,
}

const REAL_SYS: OpenSys = OpenSys {
    open: sys_open,
    probe: sys_probe,
};

fn sys_open(path: &Path, opts: &DeviceOptions, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(opts.create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn sys_probe(file: &File) -> io::Result<()> {
    let mut buf = AlignedBuf::zeroed(PAGE);
    loop {
        match file.read_at(&mut buf, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r.map(drop),
        }
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl Device {
    /// Opens `path`, submitting its I/O through `engine`.
    pub fn open(path: &Path, opts: &DeviceOptions, engine: &Engine) -> Result<Self, DeviceError> {
        Self::open_with(path, opts, engine, &REAL_SYS)
    }

    fn open_with(
        path: &Path,
        opts: &DeviceOptions,
        engine: &Engine,
        sys: &OpenSys,
    ) -> Result<Self, DeviceError> {
        let name = path.display().to_string();
        let io_err = |source| DeviceError::Io {
            op: "open",
            device: name.clone(),
            offset: 0,
            source,
        };
        let mut direct = opts.direct;
        let mut file = match (sys.open)(path, opts, direct) {
            Err(e) if direct && is_einval(&e) => {
                direct = false;
                (sys.open)(path, opts, false).map_err(io_err)?
            }
            r => r.map_err(io_err)?,
        };
        if direct {
            match (sys.probe)(&file) {
                Ok(()) => {}
                Err(e) if is_einval(&e) => {
                    direct = false;
                    file = (sys.open)(path, opts, false).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        if opts.direct && !direct {
            tracing::info!(device = %name, "O_DIRECT refused; using buffered I/O");
        }
        let uncached = if opts.uncached_writes && !direct {
            let reopen = DeviceOptions {
                create: false,
                ..opts.clone()
            };
            // Optional: without it, uncached writes are buffered writes.
            match (sys.open)(path, &reopen, true).and_then(|f| (sys.probe)(&f).map(|()| f)) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    if !is_einval(&e) {
                        tracing::warn!(device = %name, error = %e, "no O_DIRECT handle for uncached writes");
                    }
                    None
                }
            }
        } else {
            None
        };
        let meta = file.metadata().map_err(io_err)?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            // Seeking is harmless: all I/O is positional.
            (&file).seek(SeekFrom::End(0)).map_err(io_err)?
        } else {
            meta.len()
        };
        Ok(Self {
            inner: Arc::new(DeviceInner {
                name,
                file: Arc::new(file),
                uncached,
                engine: engine.clone(),
                direct,
                block_device,
                size: AtomicU64::new(size),
                grow: Mutex::new(()),
                poisoned: AtomicBool::new(false),
                completed_writes: AtomicU64::new(0),
            }),
            faults: None,
        })
    }

    /// This device with faults injected according to `plan` (for failure
    /// tests). The result shares the open file, size and poisoning with
    /// `self`; only operations made through it see the faults.
    pub fn with_faults(&self, plan: FaultPlan) -> Self {
        Self {
            inner: self.inner.clone(),
            faults: Some(plan),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. The buffer comes back
    /// whatever the outcome. Reading past the end of a file yields zeros.
    pub async fn read_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        if let Err(e) = self.check_read(offset, buf.len()) {
            return (Err(e), buf);
        }
        let mut buf = buf;
        // Buffered I/O: data in the page cache needs no trip through the ring.
        if !self.inner.direct
            && !buf.is_empty()
            && uring::read_cached(&self.inner.file, offset, &mut buf)
        {
            return (Ok(()), buf);
        }
        self.run(OpKind::Read, offset, buf).await
    }

    /// An injected read fault, or a read past the end of a block device.
    fn check_read(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        if let Some(e) = self.inject(FaultOp::Read, offset, len) {
            return Err(self.io_err("read", offset, e));
        }
        if self.inner.block_device {
            self.check_range("read", offset, len)?;
        }
        Ok(())
    }

    /// Like [`read_at`](Self::read_at), for bulk background reads: never
    /// tries the page cache inline (on a range that is only partly cached,
    /// that copies a part on the calling thread and then reads it all again
    /// through the ring), and with `uncached`, a buffered device reads
    /// through its O_DIRECT handle when it has one. The kernel writes back
    /// dirty cached pages of the range before a direct read.
    pub async fn read_at_bulk(
        &self,
        offset: u64,
        buf: AlignedBuf,
        uncached: bool,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        if let Err(e) = self.check_read(offset, buf.len()) {
            return (Err(e), buf);
        }
        match self.inner.uncached.as_ref().filter(|_| uncached) {
            Some(file) => self.run_on(file, OpKind::Read, offset, buf).await,
            None => self.run(OpKind::Read, offset, buf).await,
        }
    }

    /// Writes all of `buf` at `offset`. The buffer comes back whatever the outcome.
    ///
    /// The range must lie within [`size`](Self::size) (grow a file with
    /// [`ensure_size`](Self::ensure_size) first), else `OutOfRange`.
    pub async fn write_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        self.write_through(&self.inner.file, offset, buf).await
    }

    /// Like [`write_at`](Self::write_at), but the data does not stay in the
    /// page cache: a buffered device writes it through its O_DIRECT handle
    /// when it has one (see [`DeviceOptions::uncached_writes`]). For bulk
    /// writes nobody is about to read: the page-cache copy is CPU, and it is
    /// made on one kernel worker per file, which caps buffered bulk writes.
    ///
    /// The kernel writes back and drops any cached pages of the range
    /// before a direct write, so buffered reads and writes of the same
    /// range, before or after, stay coherent with it.
    pub async fn write_at_uncached(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        let file = self.inner.uncached.as_ref().unwrap_or(&self.inner.file);
        self.write_through(file, offset, buf).await
    }

    /// Whether [`write_at_uncached`](Self::write_at_uncached) bypasses the
    /// page cache (a direct device, or a buffered one with its O_DIRECT handle).
    pub fn writes_uncached(&self) -> bool {
        self.inner.direct || self.inner.uncached.is_some()
    }

    async fn write_through(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        if let Err(e) = self.check_poisoned("write") {
            return (Err(e), buf);
        }
        if let Some(e) = self.inject(FaultOp::Write, offset, buf.len()) {
            return (Err(self.io_err("write", offset, e)), buf);
        }
        if let Err(e) = self.check_range("write", offset, buf.len()) {
            return (Err(e), buf);
        }
        let done = match self.write_inline(file, offset, &buf) {
            Some(result) => (result, buf),
            None => self.run_on(file, OpKind::Write, offset, buf).await,
        };
        self.inner.completed_writes.fetch_add(1, Ordering::AcqRel);
        done
    }

    /// Writes `buf` with `pwrite` on the calling thread, when the engine
    /// allows it (see [`EngineConfig::inline_write_bytes`]): a buffered
    /// write to the page-cache file, small enough, with an inline slot free.
    /// `None` means "go through the engine".
    fn write_inline(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: &[u8],
    ) -> Option<Result<(), DeviceError>> {
        if self.inner.direct || !Arc::ptr_eq(file, &self.inner.file) {
            return None;
        }
        let core = &self.inner.engine.core;
        let _slot = core.inline.enter(buf.len())?;
        // Held across the write, as a queued request would be: shutdown
        // waits for it, and nothing is written once the engine has stopped.
        let running = core.tx.read();
        if running.is_none() {
            return Some(Err(DeviceError::EngineStopped));
        }
        Some(
            file.write_all_at(buf, offset)
                .map_err(|e| self.io_err("write", offset, e)),
        )
    }

    /// How many writes have completed (successfully or not) on this device.
    /// Counted after each completion, so an fdatasync that starts after
    /// reading N covers every write counted in N: a committer that finds
    /// the count unchanged since its last sync may skip the next one.
    pub fn completed_writes(&self) -> u64 {
        self.inner.completed_writes.load(Ordering::Acquire)
    }

    /// fdatasync: every completed write is durable.
    ///
    /// Writes still in flight when this is called may or may not be covered.
    /// The first failure poisons the device (see the module doc).
    pub async fn sync(&self) -> Result<(), DeviceError> {
        self.check_poisoned("sync")?;
        let result = match self.inject(FaultOp::Sync, 0, 0) {
            Some(e) => Err(self.io_err("sync", 0, e)),
            None => self.run(OpKind::Sync, 0, AlignedBuf::zeroed(0)).await.0,
        };
        match result {
            Err(e @ DeviceError::Io { .. }) => {
                self.inner.poisoned.store(true, Ordering::SeqCst);
                tracing::error!(device = %self.inner.name, error = %e, "sync failed; device is fail-stopped");
                Err(e)
            }
            Err(e) => Err(e),
            // A sync that overlapped a failed one must not report success:
            // the failure may have consumed the error for pages it covered.
            Ok(()) => self.check_poisoned("sync"),
        }
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Grows a regular file to at least `len` bytes (sparse); fails on a
    /// block device smaller than `len`.
    ///
    /// A file grows to `len` rounded up to a multiple of 4096, so O_DIRECT
    /// reads never meet a partial block at its end. It never shrinks.
    pub fn ensure_size(&self, len: u64) -> Result<(), DeviceError> {
        let inner = &self.inner;
        let size = self.size();
        if len <= size {
            return Ok(());
        }
        let out_of_range = || DeviceError::OutOfRange {
            op: "grow",
            device: inner.name.clone(),
            offset: 0,
            len,
            size,
        };
        if inner.block_device {
            return Err(out_of_range());
        }
        let target = len
            .checked_next_multiple_of(PAGE as u64)
            .ok_or_else(out_of_range)?;
        let _guard = inner.grow.lock();
        // Re-read under the lock: a concurrent call may have grown it, and
        // set_len must never shrink the file.
        let current = inner
            .file
            .metadata()
            .map_err(|e| self.io_err("grow", 0, e))?
            .len();
        if target > current {
            inner
                .file
                .set_len(target)
                .map_err(|e| self.io_err("grow", 0, e))?;
        }
        inner.size.fetch_max(target.max(current), Ordering::AcqRel);
        Ok(())
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Whether an earlier sync failed (see [`DeviceError::Poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::SeqCst)
    }

    fn inject(&self, op: FaultOp, offset: u64, len: usize) -> Option<io::Error> {
        self.faults
            .as_ref()
            .and_then(|plan| plan.check(op, offset, len as u64))
    }

    fn check_poisoned(&self, op: &'static str) -> Result<(), DeviceError> {
        if self.is_poisoned() {
            return Err(DeviceError::Poisoned {
                op,
                device: self.inner.name.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<(), DeviceError> {
        let size = self.size();
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                op,
                device: self.inner.name.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> DeviceError {
        DeviceError::Io {
            op,
            device: self.inner.name.clone(),
            offset,
            source,
        }
    }

    /// Hands one request to the engine and awaits its completion.
    async fn run(
        &self,
        kind: OpKind,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        self.run_on(&self.inner.file, kind, offset, buf).await
    }

    async fn run_on(
        &self,
        file: &Arc<File>,
        kind: OpKind,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Result<(), DeviceError>, AlignedBuf) {
        let len = buf.len();
        let (reply, done) = oneshot::channel();
        let req = Request {
            kind,
            file: file.clone(),
            offset,
            buf,
            reply,
        };
        if let Err(req) = self.inner.engine.core.submit(req) {
            return (Err(DeviceError::EngineStopped), req.buf);
        }
        match done.await {
            Ok(c) => {
                let op = match kind {
                    OpKind::Read => "read",
                    OpKind::Write => "write",
                    OpKind::Sync => "sync",
                };
                (c.result.map_err(|e| self.io_err(op, offset, e)), c.buf)
            }
            // Only if the engine thread died mid-request: its buffer went
            // with it, so the caller gets a fresh one of the same size.
            Err(_) => (Err(DeviceError::EngineStopped), AlignedBuf::zeroed(len)),
        }
    }
}

/// Settings of the I/O engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// io_uring submission queue entries. The syscall backend runs this
    /// many threads (at most 64).
    pub queue_depth: u32,
    /// Use the plain-syscall backend instead of io_uring.
    pub sync_backend: bool,
    /// Writes of at most this many bytes to a buffered device are made
    /// with `pwrite` on the calling thread instead of through the engine;
    /// 0 sends every write through the engine.
    ///
    /// Why: ext4 cannot write to the page cache without possibly blocking
    /// (it refuses `RWF_NOWAIT` for buffered writes), so io_uring hands
    /// every such write to an io-wq worker, and its completion comes back
    /// through the driver thread: two thread hand-offs, which cost more
    /// than the copy of a few pages. Measured here, 4 KiB random writes
    /// went from about 60k to 70k IOPS with one inline writer (docs/benchmarks.md).
    pub inline_write_bytes: usize,
    /// At most this many inline writes at once; the others go through the
    /// engine. A buffered write can block in the kernel (dirty-page
    /// throttling, a filesystem journal commit), so the server allows one
    /// fewer than its worker threads: a blocked write never holds every
    /// worker, and the rest keep serving other requests.
    pub inline_writers: usize,
}

impl EngineConfig {
    /// `queue_depth` entries, io_uring, every write through the engine.
    pub fn new(queue_depth: u32) -> Self {
        Self {
            queue_depth,
            sync_backend: false,
            inline_write_bytes: 0,
            inline_writers: 0,
        }
    }
}

/// Admission of inline writes (see [`EngineConfig::inline_write_bytes`]).
struct InlineWrites {
    max_bytes: usize,
    slots: usize,
    busy: AtomicUsize,
    /// Slots ever taken, so tests can tell which way a write went.
    #[cfg(test)]
    taken: AtomicU64,
}

impl InlineWrites {
    fn new(config: &EngineConfig) -> Self {
        Self {
            max_bytes: config.inline_write_bytes,
            slots: config.inline_writers,
            busy: AtomicUsize::new(0),
            #[cfg(test)]
            taken: AtomicU64::new(0),
        }
    }

    /// A slot for an inline write of `len` bytes, released on drop; `None`
    /// when the write is too long or every slot is taken.
    fn enter(&self, len: usize) -> Option<InlineSlot<'_>> {
        if len == 0 || len > self.max_bytes {
            return None;
        }
        self.busy
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.slots).then_some(n + 1)
            })
            .ok()?;
        #[cfg(test)]
        self.taken.fetch_add(1, Ordering::Relaxed);
        Some(InlineSlot(&self.busy))
    }
}

struct InlineSlot<'a>(&'a AtomicUsize);

impl Drop for InlineSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Which backend an [`Engine`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One io_uring, driven by its own thread.
    IoUring,
    /// pread/pwrite/fdatasync on a pool of threads.
    Syscalls,
}

/// The I/O engine: one io_uring (driven by its own thread) shared by every device.
///
/// The engine stops when [`shutdown`](Self::shutdown) is called or the last
/// handle (devices hold one) is dropped: requests already submitted are
/// finished, later ones fail with [`DeviceError::EngineStopped`].
#[derive(Clone)]
pub struct Engine {
    core: Arc<EngineCore>,
}

impl Engine {
    /// Starts the engine. If io_uring cannot be set up, falls back to the
    /// syscall backend with a warning.
    pub fn start(config: &EngineConfig) -> Result<Self, DeviceError> {
        let core = if config.sync_backend {
            EngineCore::start_syscalls(config)
        } else {
            EngineCore::start_uring(config).or_else(|e| {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "io_uring unavailable; using the syscall backend");
                }
                EngineCore::start_syscalls(config)
            })
        };
        let core = core.map_err(|source| DeviceError::Io {
            op: "start",
            device: String::new(),
            offset: 0,
            source,
        })?;
        Ok(Self {
            core: Arc::new(core),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.core.backend
    }

    /// Stops taking requests, waits for those already taken to finish, and
    /// joins the engine's threads. Blocks; idempotent.
    pub fn shutdown(&self) {
        self.core.shutdown();
    }
}

struct EngineCore {
    /// `None` once shut down. Senders hold the read lock while sending, so
    /// no request can enter the channel after `shutdown` took the sender:
    /// every request sent is either served or handed back by `submit`.
    tx: RwLock<Option<Sender<Request>>>,
    /// io_uring only: wakes the driver thread.
    waker: Option<Arc<Waker>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    backend: Backend,
    inline: InlineWrites,
}

impl EngineCore {
    fn start_uring(config: &EngineConfig) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (thread, waker) = uring::spawn(config.queue_depth, rx)?;
        Ok(Self {
            tx: RwLock::new(Some(tx)),
            waker: Some(waker),
            threads: Mutex::new(vec![thread]),
            backend: Backend::IoUring,
            inline: InlineWrites::new(config),
        })
    }

    fn start_syscalls(config: &EngineConfig) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let n = config.queue_depth.clamp(1, 64);
        let mut threads = Vec::new();
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("keyturn-io-{i}"))
                .spawn(move || syscall_worker(&rx));
            match spawned {
                Ok(t) => threads.push(t),
                // Dropping `tx` ends the threads already started.
                Err(e) if threads.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(Self {
            tx: RwLock::new(Some(tx)),
            waker: None,
            threads: Mutex::new(threads),
            backend: Backend::Syscalls,
            inline: InlineWrites::new(config),
        })
    }

    /// Queues `req`, or hands it back if the engine has stopped.
    fn submit(&self, req: Request) -> Result<(), Request> {
        {
            let tx = self.tx.read();
            let Some(tx) = tx.as_ref() else {
                return Err(req);
            };
            // Fails only if the engine's threads are gone.
            tx.send(req).map_err(|e| e.into_inner())?;
        }
        if let Some(waker) = &self.waker {
            waker.wake_if_sleeping();
        }
        Ok(())
    }

    fn shutdown(&self) {
        // Dropping the last sender disconnects the channel: the threads
        // finish what is queued and in flight, then exit.
        drop(self.tx.write().take());
        if let Some(waker) = &self.waker {
            waker.wake();
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me && t.join().is_err() {
                tracing::error!("an I/O engine thread panicked");
            }
        }
    }
}

impl Drop for EngineCore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A thread of the syscall backend.
fn syscall_worker(rx: &Receiver<Request>) {
    while let Ok(mut req) = rx.recv() {
        let result = match req.kind {
            OpKind::Read => read_full(&req.file, &mut req.buf, req.offset),
            OpKind::Write => req.file.write_all_at(&req.buf, req.offset),
            OpKind::Sync => req.file.sync_data(),
        };
        req.complete(result);
    }
}

/// Fills `buf` from `offset`; what lies past the end of the file reads as zeros.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! One suite, run against both backends (cloud-hypervisor's lesson).

    use std::time::Duration;

    use super::*;

    fn uring() -> EngineConfig {
        EngineConfig::new(64)
    }

    fn syscalls() -> EngineConfig {
        EngineConfig {
            sync_backend: true,
            ..EngineConfig::new(8)
        }
    }

    fn engine(cfg: &EngineConfig) -> Engine {
        let engine = Engine::start(cfg).expect("engine starts");
        // The io_uring suite must not silently test the fallback.
        let want = if cfg.sync_backend {
            Backend::Syscalls
        } else {
            Backend::IoUring
        };
        assert_eq!(engine.backend(), want);
        engine
    }

    const RW: DeviceOptions = DeviceOptions {
        create: true,
        direct: true,
        uncached_writes: false,
    };

    /// A buffer of `len` bytes whose content depends on `seed` and position.
    fn pattern(len: usize, seed: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes(),
            );
        }
        buf
    }

    async fn round_trip(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.ensure_size(64 << 20).expect("grow");
        let cases = [
            (0, 4096),
            (4096, 16384),
            (1 << 20, 1 << 20),
            ((40 << 20) + 8192, 3 * 4096),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let (r, _) = dev.write_at(offset, pattern(len, i as u64)).await;
            r.expect("write");
        }
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let (r, buf) = dev.read_at(offset, AlignedBuf::zeroed(len)).await;
            r.expect("read");
            assert!(buf[..] == pattern(len, i as u64)[..], "data at {offset}");
        }
        dev.sync().await.expect("sync");
    }

    async fn concurrent(cfg: EngineConfig) {
        const TASKS: u64 = 8;
        const PER_TASK: u64 = 125; // 1000 writes, then 1000 reads
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.ensure_size(TASKS * PER_TASK * 4096).expect("grow");
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                let mut inflight = Vec::new();
                for i in 0..PER_TASK {
                    let block = i * TASKS + t;
                    let dev = dev.clone();
                    inflight.push(tokio::spawn(async move {
                        dev.write_at(block * 4096, pattern(4096, block)).await.0
                    }));
                }
                for f in inflight {
                    f.await.expect("join").expect("write");
                }
                let mut inflight = Vec::new();
                for i in 0..PER_TASK {
                    let block = i * TASKS + t;
                    let dev = dev.clone();
                    inflight.push(tokio::spawn(async move {
                        let (r, buf) = dev.read_at(block * 4096, AlignedBuf::zeroed(4096)).await;
                        r.expect("read");
                        assert!(buf[..] == pattern(4096, block)[..], "block {block}");
                    }));
                }
                for f in inflight {
                    f.await.expect("join");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }

    /// Writes laid end to end (the copy-on-write allocator's pattern), sent
    /// concurrently from several tasks in a shuffled order, more of them and
    /// more bytes than one merged write may carry: every byte lands.
    async fn adjacent_writes(cfg: EngineConfig) {
        const TASKS: usize = 4;
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        // 600 extents of 1 to 3 blocks from block 1: about 4.7 MiB.
        let mut extents = Vec::new();
        let mut block = 1u64;
        for i in 0..600u64 {
            let blocks = 1 + i * 7 % 3;
            extents.push((block * 4096, blocks as usize * 4096, i));
            block += blocks;
        }
        dev.ensure_size(block * 4096).expect("grow");
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for i in (1..extents.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            extents.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let mine: Vec<_> = extents.iter().copied().skip(t).step_by(TASKS).collect();
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                let writes: Vec<_> = mine
                    .into_iter()
                    .map(|(offset, len, seed)| {
                        let dev = dev.clone();
                        tokio::spawn(async move { dev.write_at(offset, pattern(len, seed)).await })
                    })
                    .collect();
                for w in writes {
                    let (r, buf) = w.await.expect("join");
                    r.expect("write");
                    assert!(buf.len() >= 4096, "the buffer comes back");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let (r, all) = dev
            .read_at(0, AlignedBuf::zeroed(block as usize * 4096))
            .await;
        r.expect("read");
        assert!(all[..4096].iter().all(|&b| b == 0), "block 0 untouched");
        for (offset, len, seed) in extents {
            let at = offset as usize;
            assert!(
                all[at..at + len] == pattern(len, seed)[..],
                "extent at {offset}"
            );
        }
    }

    /// A queue depth of 2 leaves one slot for I/O: every request waits for
    /// the one before it (back-pressure).
    async fn concurrent_tiny_queue(cfg: EngineConfig) {
        concurrent(EngineConfig {
            queue_depth: 2,
            ..cfg
        })
        .await;
    }

    async fn read_past_eof_is_zero(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.ensure_size(8192).expect("grow");
        let (r, _) = dev.write_at(4096, pattern(4096, 7)).await;
        r.expect("write");
        // Stale bytes in a reused buffer must not survive past EOF.
        let mut garbage = AlignedBuf::zeroed(16384);
        garbage.fill(0xEE);
        let (r, buf) = dev.read_at(4096, garbage).await;
        r.expect("read across EOF");
        assert!(buf[..4096] == pattern(4096, 7)[..]);
        assert!(buf[4096..].iter().all(|&b| b == 0));
        let mut garbage = AlignedBuf::zeroed(4096);
        garbage.fill(0xEE);
        let (r, buf) = dev.read_at(1 << 30, garbage).await;
        r.expect("read past EOF");
        assert!(buf.iter().all(|&b| b == 0));
    }

    async fn ensure_size_grows(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        let dev = Device::open(&path, &RW, &engine(&cfg)).expect("open");
        assert_eq!(dev.size(), 0);
        let (r, _) = dev.write_at(0, AlignedBuf::zeroed(4096)).await;
        assert!(
            matches!(r, Err(DeviceError::OutOfRange { op: "write", .. })),
            "{r:?}"
        );
        dev.ensure_size(10_000).expect("grow");
        assert_eq!(dev.size(), 12288, "rounded up to whole blocks");
        dev.ensure_size(4096).expect("no shrink");
        assert_eq!(dev.size(), 12288);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 12288);
        let (r, _) = dev.write_at(8192, pattern(4096, 1)).await;
        r.expect("write within size");
        dev.ensure_size(1 << 30).expect("grow sparse");
        assert_eq!(dev.size(), 1 << 30);
        let (r, buf) = dev.read_at(8192, AlignedBuf::zeroed(4096)).await;
        r.expect("read");
        assert!(buf[..] == pattern(4096, 1)[..], "growing kept data");
    }

    async fn sync_succeeds(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.sync().await.expect("sync of an empty file");
        dev.ensure_size(4096).expect("grow");
        let (r, _) = dev.write_at(0, pattern(4096, 3)).await;
        r.expect("write");
        dev.sync().await.expect("sync");
        assert!(!dev.is_poisoned());
    }

    async fn dropped_futures(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.ensure_size(256 * 4096).expect("grow");
        for i in 0..256u64 {
            // Polled once (so submitted), then dropped at once.
            let _ = tokio::time::timeout(
                Duration::ZERO,
                dev.read_at(i * 4096, AlignedBuf::zeroed(4096)),
            )
            .await;
            let _ = tokio::time::timeout(Duration::ZERO, dev.write_at(i * 4096, pattern(4096, i)))
                .await;
            let _ = tokio::time::timeout(Duration::ZERO, dev.sync()).await;
        }
        // The engine carries on, and later writes win over the dropped ones.
        for i in 0..256u64 {
            let (r, _) = dev.write_at(i * 4096, pattern(4096, i + 1000)).await;
            r.expect("write");
        }
        for i in 0..256u64 {
            let (r, buf) = dev.read_at(i * 4096, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(buf[..] == pattern(4096, i + 1000)[..]);
        }
    }

    async fn tmpfs_direct(cfg: EngineConfig) {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        // Linux 6.6+ accepts O_DIRECT on tmpfs; older kernels refuse it. Either
        // way the device must work; the refusal path is `direct_fallback`.
        dev.ensure_size(8192).expect("grow");
        let (r, _) = dev.write_at(4096, pattern(4096, 9)).await;
        r.expect("write");
        let (r, buf) = dev.read_at(4096, AlignedBuf::zeroed(4096)).await;
        r.expect("read");
        assert!(buf[..] == pattern(4096, 9)[..]);
        dev.sync().await.expect("sync");
    }

    async fn direct_fallback(cfg: EngineConfig) {
        fn refuse_open(path: &Path, opts: &DeviceOptions, direct: bool) -> io::Result<File> {
            if direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                sys_open(path, opts, false)
            }
        }
        fn refuse_io(_: &File) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let engine = engine(&cfg);
        let cases = [
            (
                "open",
                OpenSys {
                    open: refuse_open,
                    probe: sys_probe,
                },
            ),
            (
                "probe",
                OpenSys {
                    open: sys_open,
                    probe: refuse_io,
                },
            ),
        ];
        for (what, sys) in cases {
            let dev = Device::open_with(&dir.path().join(what), &RW, &engine, &sys).expect("open");
            assert!(!dev.is_direct(), "{what} refused O_DIRECT");
            dev.ensure_size(4096).expect("grow");
            let (r, _) = dev.write_at(0, pattern(4096, 5)).await;
            r.expect("write");
            let (r, buf) = dev.read_at(0, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(buf[..] == pattern(4096, 5)[..]);
        }
        // On ext4 the real probe passes.
        let disk = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&disk.path().join("dev"), &RW, &engine).expect("open");
        assert!(dev.is_direct());
        let buffered = DeviceOptions {
            create: true,
            direct: false,
            uncached_writes: false,
        };
        let dev = Device::open(&disk.path().join("dev"), &buffered, &engine).expect("open");
        assert!(!dev.is_direct());
    }

    async fn uncached_writes(cfg: EngineConfig) {
        let engine = engine(&cfg);
        let opts = DeviceOptions {
            create: true,
            direct: false,
            uncached_writes: true,
        };
        let read = |dev: Device, at: u64| async move {
            let (r, buf) = dev.read_at(at, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            buf
        };
        // ext4 takes O_DIRECT: a buffered device with a direct handle.
        let disk = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&disk.path().join("dev"), &opts, &engine).expect("open");
        assert!(!dev.is_direct() && dev.writes_uncached());
        dev.ensure_size(4 * 4096).expect("grow");
        // A dirty cached page, then an uncached write over it: the read
        // (from the page cache if anything is left there) sees the new data.
        let (r, _) = dev.write_at(0, pattern(4096, 1)).await;
        r.expect("buffered write");
        assert!(read(dev.clone(), 0).await[..] == pattern(4096, 1)[..]);
        let (r, _) = dev.write_at_uncached(0, pattern(4096, 2)).await;
        r.expect("uncached write");
        assert!(read(dev.clone(), 0).await[..] == pattern(4096, 2)[..]);
        // And the other way round: a buffered write over an uncached one.
        let (r, _) = dev.write_at_uncached(8192, pattern(8192, 3)).await;
        r.expect("uncached write");
        let (r, _) = dev.write_at(12288, pattern(4096, 4)).await;
        r.expect("buffered write");
        assert!(read(dev.clone(), 8192).await[..] == pattern(8192, 3)[..4096]);
        assert!(read(dev.clone(), 12288).await[..] == pattern(4096, 4)[..]);
        // Bulk reads, direct and through the ring, see the dirty cached page
        // and the uncached one alike.
        for uncached in [true, false] {
            let (r, buf) = dev
                .read_at_bulk(8192, AlignedBuf::zeroed(8192), uncached)
                .await;
            r.expect("bulk read");
            assert!(
                buf[..4096] == pattern(8192, 3)[..4096],
                "uncached={uncached}"
            );
            assert!(buf[4096..] == pattern(4096, 4)[..], "uncached={uncached}");
        }
        let before = dev.completed_writes();
        let (r, _) = dev.write_at_uncached(4096, pattern(4096, 5)).await;
        r.expect("uncached write");
        assert_eq!(
            dev.completed_writes(),
            before + 1,
            "counted for the commit's sync"
        );
        dev.sync().await.expect("sync");
        drop(dev);
        let on_disk = std::fs::read(disk.path().join("dev")).expect("read file");
        assert!(on_disk[..4096] == pattern(4096, 2)[..]);
        assert!(on_disk[4096..8192] == pattern(4096, 5)[..]);
        assert!(on_disk[12288..] == pattern(4096, 4)[..]);

        // Where O_DIRECT is refused, uncached writes are buffered writes.
        fn refuse_open(path: &Path, opts: &DeviceOptions, direct: bool) -> io::Result<File> {
            if direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                sys_open(path, opts, false)
            }
        }
        let sys = OpenSys {
            open: refuse_open,
            probe: sys_probe,
        };
        let dev =
            Device::open_with(&disk.path().join("refused"), &opts, &engine, &sys).expect("open");
        assert!(!dev.writes_uncached());
        dev.ensure_size(4096).expect("grow");
        let (r, _) = dev.write_at_uncached(0, pattern(4096, 6)).await;
        r.expect("write");
        assert!(read(dev.clone(), 0).await[..] == pattern(4096, 6)[..]);
    }

    /// Small buffered writes made on the calling thread land like any
    /// other: concurrent writes of every size, inline and through the
    /// engine, read back and reach the file; nothing is written inline
    /// once the engine has stopped.
    async fn inline_writes(cfg: EngineConfig) {
        const TASKS: u64 = 8;
        const PER_TASK: u64 = 32;
        let cfg = EngineConfig {
            inline_write_bytes: 16384,
            inline_writers: 1,
            ..cfg
        };
        let engine = engine(&cfg);
        let buffered = DeviceOptions {
            create: true,
            direct: false,
            uncached_writes: false,
        };
        let disk = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&disk.path().join("dev"), &buffered, &engine).expect("open");
        assert!(!dev.is_direct());
        // Write i of task t: 1 to 5 blocks (4 and 8 KiB inline when a slot
        // is free, 20 KiB always through the engine) in its own 20 KiB cell.
        let cell = |t: u64, i: u64| (t * PER_TASK + i) * 5 * 4096;
        let len = |t: u64, i: u64| (((t + i) % 5 + 1) * 4096) as usize;
        dev.ensure_size(cell(TASKS, 0)).expect("grow");
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let (r, buf) = dev
                        .write_at(cell(t, i), pattern(len(t, i), t << 32 | i))
                        .await;
                    r.expect("write");
                    assert_eq!(buf.len(), len(t, i), "the buffer comes back");
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        let taken = engine.core.inline.taken.load(Ordering::Relaxed);
        assert!(taken > 0, "some writes went inline");
        assert!(
            taken < TASKS * PER_TASK,
            "20 KiB writes never go inline ({taken})"
        );
        assert_eq!(engine.core.inline.busy.load(Ordering::Relaxed), 0);
        assert_eq!(dev.completed_writes(), TASKS * PER_TASK);
        dev.sync().await.expect("sync");
        let on_disk = std::fs::read(disk.path().join("dev")).expect("read file");
        for t in 0..TASKS {
            for i in 0..PER_TASK {
                let at = cell(t, i) as usize;
                let want = pattern(len(t, i), t << 32 | i);
                assert!(on_disk[at..at + want.len()] == want[..], "write {t}/{i}");
                let (r, buf) = dev
                    .read_at(cell(t, i), AlignedBuf::zeroed(want.len()))
                    .await;
                r.expect("read");
                assert!(buf[..] == want[..], "read {t}/{i}");
            }
        }
        tokio::task::spawn_blocking({
            let engine = engine.clone();
            move || engine.shutdown()
        })
        .await
        .expect("shutdown");
        let (r, _) = dev.write_at(0, pattern(4096, 99)).await;
        assert!(matches!(r, Err(DeviceError::EngineStopped)), "{r:?}");
        let on_disk = std::fs::read(disk.path().join("dev")).expect("read file");
        assert!(on_disk[..4096] == pattern(4096, 0)[..], "nothing written");
    }

    #[test]
    fn inline_slots_are_bounded_and_released() {
        let inline = InlineWrites::new(&EngineConfig {
            inline_write_bytes: 8192,
            inline_writers: 2,
            ..EngineConfig::new(8)
        });
        assert!(inline.enter(0).is_none(), "nothing to write");
        assert!(inline.enter(8193).is_none(), "too long");
        let a = inline.enter(8192).expect("first slot");
        let b = inline.enter(4096).expect("second slot");
        assert!(inline.enter(4096).is_none(), "both taken");
        drop(a);
        let c = inline.enter(4096).expect("released on drop");
        drop((b, c));
        assert_eq!(inline.busy.load(Ordering::Relaxed), 0);
        let none = InlineWrites::new(&EngineConfig::new(8));
        assert!(none.enter(4096).is_none(), "off by default");
    }

    fn is_eio(r: &Result<(), DeviceError>) -> bool {
        matches!(r, Err(DeviceError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO))
    }

    async fn faults(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        plain.ensure_size(16 * 4096).expect("grow");
        let plan = FaultPlan::new();
        let dev = plain.with_faults(plan.clone());

        plan.fail_next_writes(2);
        plan.fail_next_reads(1);
        assert!(is_eio(&dev.write_at(0, pattern(4096, 1)).await.0));
        assert!(is_eio(&dev.write_at(0, pattern(4096, 1)).await.0));
        dev.write_at(0, pattern(4096, 1))
            .await
            .0
            .expect("third write");
        assert!(is_eio(&dev.read_at(0, AlignedBuf::zeroed(4096)).await.0));
        let (r, buf) = dev.read_at(0, AlignedBuf::zeroed(4096)).await;
        r.expect("second read");
        assert!(buf[..] == pattern(4096, 1)[..]);
        assert_eq!(
            plan.injected(),
            FaultCounts {
                reads: 1,
                writes: 2,
                syncs: 0
            }
        );

        // A failing range catches overlapping writes only.
        plan.fail_writes_in(8192..12288);
        assert!(is_eio(
            &dev.write_at(4096, AlignedBuf::zeroed(8192)).await.0
        ));
        dev.write_at(12288, AlignedBuf::zeroed(4096))
            .await
            .0
            .expect("write after the range");
        // The device without the plan sees no faults.
        plain
            .write_at(8192, AlignedBuf::zeroed(4096))
            .await
            .0
            .expect("unfaulted write");
        plan.clear();

        // Fail-stop after k operations.
        let before = plan.ops();
        plan.fail_after(2);
        dev.read_at(0, AlignedBuf::zeroed(4096))
            .await
            .0
            .expect("op 1");
        dev.read_at(0, AlignedBuf::zeroed(4096))
            .await
            .0
            .expect("op 2");
        for _ in 0..3 {
            assert!(is_eio(&dev.read_at(0, AlignedBuf::zeroed(4096)).await.0));
        }
        assert_eq!(plan.ops() - before, 5);
        plan.clear();

        // A failed sync poisons every view of the device for good.
        plan.fail_next_syncs(1);
        assert!(is_eio(&dev.sync().await));
        assert_eq!(plan.injected().syncs, 1);
        assert!(plain.is_poisoned());
        for d in [&dev, &plain] {
            assert!(matches!(
                d.sync().await,
                Err(DeviceError::Poisoned { op: "sync", .. })
            ));
            let (r, _) = d.write_at(0, AlignedBuf::zeroed(4096)).await;
            assert!(matches!(r, Err(DeviceError::Poisoned { op: "write", .. })));
            d.read_at(0, AlignedBuf::zeroed(4096))
                .await
                .0
                .expect("reads still work");
        }
        assert_eq!(
            plan.injected().syncs,
            1,
            "later syncs fail without injection"
        );
    }

    async fn shutdown_in_flight(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = engine(&cfg);
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine).expect("open");
        dev.ensure_size(512 * 4096).expect("grow");
        let mut ops = Vec::new();
        for i in 0..512u64 {
            let dev = dev.clone();
            ops.push(tokio::spawn(async move {
                let (r, buf) = if i % 2 == 0 {
                    dev.write_at(i * 4096, pattern(4096, i)).await
                } else {
                    dev.read_at(i * 4096, AlignedBuf::zeroed(4096)).await
                };
                assert_eq!(buf.len(), 4096, "the buffer comes back");
                match r {
                    Ok(()) | Err(DeviceError::EngineStopped) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }));
        }
        tokio::task::yield_now().await;
        tokio::task::spawn_blocking(move || engine.shutdown())
            .await
            .expect("shutdown");
        for op in ops {
            tokio::time::timeout(Duration::from_secs(10), op)
                .await
                .expect("no op hangs")
                .expect("op");
        }
        let (r, buf) = dev.write_at(0, pattern(4096, 0)).await;
        assert!(matches!(r, Err(DeviceError::EngineStopped)));
        assert_eq!(buf.len(), 4096);
        assert!(matches!(dev.sync().await, Err(DeviceError::EngineStopped)));
        assert!(!dev.is_poisoned(), "a sync that never ran poisons nothing");
    }

    /// Dropping every handle stops the engine's threads after finishing
    /// what is in flight.
    async fn drop_engine(cfg: EngineConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::open(&dir.path().join("dev"), &RW, &engine(&cfg)).expect("open");
        dev.ensure_size(4096).expect("grow");
        let op = tokio::spawn({
            let dev = dev.clone();
            async move { dev.write_at(0, pattern(4096, 2)).await.0 }
        });
        op.await.expect("join").expect("write");
        tokio::task::spawn_blocking(move || drop(dev))
            .await
            .expect("drop");
    }

    macro_rules! suite {
        ($($name:ident),* $(,)?) => {
            mod io_uring {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(super::uring()).await;
                    }
                )*
            }
            mod syscalls {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(super::syscalls()).await;
                    }
                )*
            }
        };
    }

    suite!(
        round_trip,
        concurrent,
        adjacent_writes,
        concurrent_tiny_queue,
        read_past_eof_is_zero,
        ensure_size_grows,
        sync_succeeds,
        dropped_futures,
        tmpfs_direct,
        direct_fallback,
        uncached_writes,
        inline_writes,
        faults,
        shutdown_in_flight,
        drop_engine,
    );

    #[test]
    fn aligned_buf() {
        for len in [0, 1, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len.div_ceil(4096) * 4096);
            assert_eq!(buf.as_ptr() as usize % 4096, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
        assert_eq!(
            format!("{:?}", AlignedBuf::zeroed(1)),
            "AlignedBuf { len: 4096 }"
        );
    }
}
