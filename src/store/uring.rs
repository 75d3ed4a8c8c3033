//! The unsafe island of the store: 4 KiB-aligned buffers and the io_uring
//! driver thread.
//!
//! # Ownership
//! Every request carries its buffer and an `Arc<File>` by value. The driver
//! moves the request into its in-flight table before the SQE that points into
//! the buffer is pushed, and takes it out only when that SQE's CQE has been
//! reaped. So neither the memory nor the file descriptor can go away while the
//! kernel may use them, whatever happens to the future that asked for the I/O:
//! a dropped future only drops the `oneshot::Receiver`, and the driver then
//! drops the buffer itself after the completion.
//!
//! # Wake-up
//! The driver sleeps in `io_uring_enter(GETEVENTS, min_complete = 1)` and
//! keeps a read of an eventfd armed in the ring at all times, so a write to
//! the eventfd is a completion that ends the wait. Senders write the eventfd
//! only when the driver announced that it may sleep (the `sleeping` flag),
//! using a Dekker-style handshake, with a SeqCst fence on each side:
//!
//! - driver: `sleeping = true; fence; if channel non-empty { don't sleep }`
//! - sender: `send; fence; if swap(sleeping, false) { write eventfd }`
//!
//! Either the driver's check sees the message, or the sender's swap sees the
//! flag and writes the eventfd (which completes the armed read, before or
//! during the wait). A spurious write costs one extra loop, nothing more.
//!
//! # Write combining
//! Each time the driver drains the channel it sorts the writes it took by
//! file and offset, and chains writes whose ranges touch exactly (the next
//! one starts where the previous ends) into one vectored write: one SQE,
//! one trip through io-wq, for up to [`MAX_GROUP`] requests and
//! [`MAX_GROUP_BYTES`] bytes. The copy-on-write allocator hands out
//! consecutive slots, so concurrent small writes are mostly adjacent. Only
//! requests already queued are merged; nothing waits for a partner. The
//! ring never ordered requests against each other (callers wait for a
//! write's completion before a sync that must cover it), so sending a batch
//! in another order changes nothing they can observe.
//!
//! A merged write lives in one in-flight slot that owns every member
//! request and the iovec array; its members complete together, when the
//! whole range is written (a short write resubmits the rest) or with the
//! same error. A member whose future was dropped is written all the same.
//!
//! # Ring setup
//! The ring is created by the driver thread, with SINGLE_ISSUER,
//! COOP_TASKRUN and DEFER_TASKRUN where the kernel has them (completions are
//! then posted only when the driver enters the kernel to wait, which is
//! the only place it looks for them), else without.
//!
//! # Back-pressure
//! At most `sq_entries - 1` operations are in flight (one SQE is kept for the
//! eventfd read); a merged write is one operation. The driver takes at most
//! one request per free slot from the channel, so a batch fits whatever gets
//! merged. Beyond that, requests wait in the channel until completions free
//! slots. Because the CQ ring holds twice the SQ entries, it can never
//! overflow either.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};

use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::{IoUring, opcode, register::Restriction, types};
use tokio::sync::oneshot;

/// Reads from the page cache without blocking: `preadv2(RWF_NOWAIT)`.
/// Returns `true` when all of `buf` was filled from cached pages, `false`
/// when some of it is not cached (EAGAIN) or the read came up short (end of
/// file, or partly cached): the caller then goes through the ring, which
/// waits for the device and zero-fills past the end.
///
/// This is what io_uring itself tries first, minus the two thread hand-offs
/// to and from the ring's thread, which dominate a cached 4 KiB read.
pub(super) fn read_cached(file: &File, offset: u64, buf: &mut [u8]) -> bool {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return false;
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live, exclusively borrowed slice, for
    // exactly its length; the call is synchronous, so the kernel is done with
    // the memory when it returns. The descriptor belongs to `file`, which the
    // caller keeps open for the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    usize::try_from(n).is_ok_and(|n| n == buf.len())
}

/// Alignment and granularity of [`AlignedBuf`], and of O_DIRECT I/O.
pub const PAGE: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; PAGE]);

// Pages are laid end to end with no padding; `AlignedBuf`'s byte view relies on it.
const _: () = assert!(size_of::<Page>() == PAGE && align_of::<Page>() == PAGE);

/// A heap buffer aligned to 4096 bytes, its length a multiple of 4096, for
/// O_DIRECT I/O. Zero-filled on allocation.
///
/// Moving an `AlignedBuf` never moves its bytes (they live on the heap),
/// which is what lets the I/O engine hand their address to the kernel.
pub struct AlignedBuf {
    pages: Vec<Page>,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a multiple of 4096).
    pub fn zeroed(len: usize) -> Self {
        let mut pages = Vec::new();
        pages.resize(len.div_ceil(PAGE), Page([0; PAGE]));
        Self { pages }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is a `repr(C)` wrapper of `[u8; 4096]` whose size
        // equals its alignment (checked above), so `pages` is one contiguous
        // run of `len * 4096` initialised bytes; the slice borrows `self`.
        // An empty Vec's dangling pointer is non-null and aligned.
        unsafe {
            std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.pages.len() * PAGE)
        }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the slice borrows `self` mutably, so it
        // is the only reference to these bytes.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pages.as_mut_ptr().cast::<u8>(),
                self.pages.len() * PAGE,
            )
        }
    }
}

/// Prints the length only: buffers hold plaintext and key material.
impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len())
            .finish()
    }
}

/// What a request asks of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpKind {
    /// Fill the whole buffer from `offset`; past end of file, zeros.
    Read,
    /// Write the whole buffer at `offset`.
    Write,
    /// fdatasync.
    Sync,
}

/// One I/O request. It owns everything the kernel touches.
pub(super) struct Request {
    pub kind: OpKind,
    pub file: Arc<File>,
    pub offset: u64,
    /// The data; empty for `Sync`.
    pub buf: AlignedBuf,
    pub reply: oneshot::Sender<Completion>,
}

/// The outcome of a request, with its buffer handed back.
pub(super) struct Completion {
    pub result: io::Result<()>,
    pub buf: AlignedBuf,
}

impl Request {
    /// Answers the request. A dropped receiver is fine: the buffer is then
    /// dropped here, after the kernel is done with it.
    pub fn complete(self, result: io::Result<()>) {
        let _ = self.reply.send(Completion {
            result,
            buf: self.buf,
        });
    }
}

/// The largest length put in one SQE; longer buffers go in several steps,
/// like a short read or write.
const MAX_CHUNK: usize = 1 << 30;
/// How many times one request is resubmitted after EAGAIN or EINTR.
const MAX_RETRIES: u32 = 64;
/// `user_data` of the eventfd read. Slot indices are far below it.
const WAKE_TOKEN: u64 = u64::MAX;
/// Most requests one merged write carries.
const MAX_GROUP: usize = 64;
/// Most bytes one merged write carries. A longer request goes alone.
/// Merging pays for small writes, where the per-SQE cost dominates; large
/// ones already amortise it, and keeping them apart lets io-wq copy them
/// into the page cache in parallel.
const MAX_GROUP_BYTES: usize = 256 << 10;

// One iovec per member: a merged write stays within IOV_MAX.
const _: () = assert!(MAX_GROUP <= 1024);

/// Wakes the driver thread; shared by the engine handle and the driver.
pub(super) struct Waker {
    eventfd: File,
    sleeping: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Self {
            eventfd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Called after a request was sent: wakes the driver if it may be
    /// asleep. See the module doc for why the fence makes this race-free.
    pub fn wake_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Unconditionally completes the armed eventfd read.
    pub fn wake(&self) {
        // EAGAIN means the counter is saturated, so the read is already
        // ready: ignoring the error loses no wake-up.
        let _ = (&self.eventfd).write(&1u64.to_ne_bytes());
    }
}

/// An operation in the in-flight table: one request, or a merged write.
struct InFlight {
    /// The request; for a merged write, the member with the lowest offset.
    req: Request,
    /// The other members of a merged write, in offset order, each starting
    /// where the one before ends. Empty for a lone request.
    merged: Vec<Request>,
    /// The iovecs of a merged write's SQE, one per member still (partly)
    /// unwritten. Rebuilt before each push, and neither touched nor freed
    /// while `in_kernel`, so the kernel may read it until the CQE.
    iov: Vec<libc::iovec>,
    /// Bytes of the whole operation: every member's buffer.
    len: usize,
    /// Bytes already transferred (for resubmitting short reads and writes).
    done: usize,
    retries: u32,
    /// Whether an SQE for this slot may be in the kernel's hands, i.e. the
    /// buffer must not be freed or reused.
    in_kernel: bool,
}

/// Builds a ring for `queue_depth` entries, restricted to the operations
/// the driver uses (firecracker's lesson), or unrestricted if the kernel
/// refuses restrictions; with the single-issuer task-run flags where the
/// kernel has them. Call it on the thread that will submit: a
/// SINGLE_ISSUER ring belongs to the thread that enabled it.
fn build_ring(queue_depth: u32) -> io::Result<IoUring> {
    let restricted = |tuned: bool| -> io::Result<IoUring> {
        let mut builder = IoUring::builder();
        builder.setup_r_disabled();
        if tuned {
            builder
                .setup_single_issuer()
                .setup_coop_taskrun()
                .setup_defer_taskrun();
        }
        let ring = builder.build(queue_depth)?;
        let mut res = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ];
        ring.submitter().register_restrictions(&mut res)?;
        ring.submitter().register_enable_rings()?;
        Ok(ring)
    };
    let e = match restricted(true) {
        Ok(ring) => return Ok(ring),
        Err(e) => e,
    };
    tracing::debug!(error = %e, "io_uring SINGLE_ISSUER/DEFER_TASKRUN unavailable");
    match restricted(false) {
        Ok(ring) => Ok(ring),
        Err(e) => {
            tracing::debug!(error = %e, "io_uring restrictions unavailable; using an unrestricted ring");
            IoUring::new(queue_depth)
        }
    }
}

/// Starts the driver thread, which creates the ring and serves `rx` until
/// every sender is gone, then finishes what is in flight and exits. Fails
/// if the ring cannot be created.
pub(super) fn spawn(
    queue_depth: u32,
    rx: Receiver<Request>,
) -> io::Result<(std::thread::JoinHandle<()>, Arc<Waker>)> {
    let waker = Arc::new(Waker::new()?);
    let (setup_tx, setup_rx) = std::sync::mpsc::sync_channel(1);
    let driver_waker = waker.clone();
    let handle = std::thread::Builder::new()
        .name("keyturn-uring".into())
        .spawn(move || {
            let ring = match build_ring(queue_depth.clamp(2, 4096)) {
                Ok(ring) => ring,
                Err(e) => {
                    let _ = setup_tx.send(Err(e));
                    return;
                }
            };
            let _ = setup_tx.send(Ok(()));
            Driver::new(ring, rx, driver_waker).run();
        })?;
    let setup = setup_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the io_uring thread died during setup")));
    match setup {
        Ok(()) => Ok((handle, waker)),
        Err(e) => {
            let _ = handle.join();
            Err(e)
        }
    }
}

struct Driver {
    ring: IoUring,
    rx: Receiver<Request>,
    waker: Arc<Waker>,
    /// The in-flight table; `user_data` is the index.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Occupied slots.
    ops: usize,
    cap: usize,
    /// Slots whose next SQE is still to be pushed (the SQ was full, or a
    /// short transfer or EAGAIN needs a resubmission).
    ready: VecDeque<usize>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Every sender is gone: take no more requests.
    disconnected: bool,
    /// Reaped (user_data, result) pairs; reused to avoid allocating.
    cqes: Vec<(u64, i32)>,
    /// Requests taken from the channel by `fill`; empty between calls.
    batch: Vec<Request>,
    /// The writes of `batch`, sorted for merging; empty between calls.
    writes: Vec<Request>,
}

impl Driver {
    fn new(ring: IoUring, rx: Receiver<Request>, waker: Arc<Waker>) -> Self {
        let cap = (ring.params().sq_entries() as usize)
            .saturating_sub(1)
            .max(1);
        Self {
            ring,
            rx,
            waker,
            slots: Vec::with_capacity(cap),
            free: Vec::new(),
            ops: 0,
            cap,
            ready: VecDeque::new(),
            wake_buf: Box::new(0),
            wake_armed: false,
            disconnected: false,
            cqes: Vec::with_capacity(cap * 2),
            batch: Vec::with_capacity(cap),
            writes: Vec::with_capacity(cap),
        }
    }

    fn run(mut self) {
        loop {
            self.fill();
            if self.disconnected && self.ops == 0 {
                break;
            }
            let want = self.prepare_wait();
            let entered = self.ring.submit_and_wait(want);
            self.waker.sleeping.store(false, Ordering::Relaxed);
            if let Err(e) = entered {
                match e.raw_os_error() {
                    // Interrupted, or the kernel is short of resources or
                    // CQ space: reap what is there and try again.
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        tracing::error!(error = %e, "io_uring_enter failed; the I/O engine stops");
                        self.abandon(e);
                        return;
                    }
                }
            }
            self.reap();
        }
        self.disarm_wake();
    }

    /// Decides how many completions to wait for, announcing a possible
    /// sleep to senders first.
    fn prepare_wait(&mut self) -> usize {
        if !self.ready.is_empty() {
            // The SQ was full: submit and come back to push the rest.
            return 0;
        }
        if !self.wake_armed && !self.disconnected && self.ops == 0 {
            // Nothing could end a wait (the eventfd read did not fit in the
            // SQ): submit, and arm it on the next turn.
            return 0;
        }
        if self.disconnected || self.ops >= self.cap {
            // Completions will come (ops > 0), and no request may be taken
            // before one does, so senders need not wake us.
            return 1;
        }
        self.waker.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.rx.is_empty() {
            1
        } else {
            // A request slipped in after `fill` drained the channel.
            self.waker.sleeping.store(false, Ordering::Relaxed);
            0
        }
    }

    /// Pushes the eventfd read, pending resubmissions and new requests,
    /// until the SQ or the in-flight table is full.
    fn fill(&mut self) {
        if !self.wake_armed && !self.disconnected {
            let entry = opcode::Read::new(
                types::Fd(self.waker.eventfd.as_raw_fd()),
                std::ptr::from_mut::<u64>(&mut self.wake_buf).cast::<u8>(),
                8,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: the target is the boxed `wake_buf`, which outlives the
            // read: `disarm_wake` waits for its CQE (or leaks the box) before
            // the driver is dropped. The eventfd is kept open by `waker`.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.wake_armed = true;
            }
        }
        while let Some(&idx) = self.ready.front() {
            if !self.push_slot(idx) {
                return;
            }
            self.ready.pop_front();
        }
        while !self.disconnected && self.ops < self.cap {
            // One request per free slot: merging only ever needs fewer.
            let room = self.cap - self.ops;
            let mut batch = std::mem::take(&mut self.batch);
            let mut drained = false;
            while batch.len() < room {
                match self.rx.try_recv() {
                    Ok(req) if req.kind != OpKind::Sync && req.buf.is_empty() => {
                        req.complete(Ok(()));
                    }
                    Ok(req) => batch.push(req),
                    Err(TryRecvError::Empty) => {
                        drained = true;
                        break;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.disconnected = true;
                        break;
                    }
                }
            }
            self.start_batch(&mut batch);
            self.batch = batch;
            if drained || !self.ready.is_empty() {
                return;
            }
        }
    }

    /// Starts every request of `batch` (leaving it empty), adjacent writes
    /// merged. Each request is in the in-flight table before any SQE
    /// pointing at it is pushed; what does not fit in the SQ waits in
    /// `ready`.
    fn start_batch(&mut self, batch: &mut Vec<Request>) {
        let mut writes = std::mem::take(&mut self.writes);
        for req in batch.drain(..) {
            if req.kind == OpKind::Write {
                writes.push(req);
            } else {
                self.start(req, Vec::new());
            }
        }
        writes.sort_unstable_by_key(|r| (Arc::as_ptr(&r.file).addr(), r.offset));
        let mut sorted = writes.drain(..).peekable();
        while let Some(first) = sorted.next() {
            let mut merged = Vec::new();
            let mut bytes = first.buf.len();
            let mut end = first.offset.checked_add(bytes as u64);
            while let Some(next) = sorted.next_if(|r| {
                Arc::ptr_eq(&r.file, &first.file)
                    && Some(r.offset) == end
                    && merged.len() + 1 < MAX_GROUP
                    && bytes + r.buf.len() <= MAX_GROUP_BYTES
            }) {
                bytes += next.buf.len();
                end = next.offset.checked_add(next.buf.len() as u64);
                merged.push(next);
            }
            self.start(first, merged);
        }
        drop(sorted);
        self.writes = writes;
    }

    /// Puts one operation in the table and pushes its SQE, or queues it in
    /// `ready` if the SQ is full (or earlier ones already wait there).
    fn start(&mut self, req: Request, merged: Vec<Request>) {
        let idx = self.insert(req, merged);
        if !self.ready.is_empty() || !self.push_slot(idx) {
            self.ready.push_back(idx);
        }
    }

    fn insert(&mut self, req: Request, merged: Vec<Request>) -> usize {
        let len = req.buf.len() + merged.iter().map(|r| r.buf.len()).sum::<usize>();
        let iov = if merged.is_empty() {
            Vec::new()
        } else {
            Vec::with_capacity(merged.len() + 1)
        };
        let slot = InFlight {
            req,
            merged,
            iov,
            len,
            done: 0,
            retries: 0,
            in_kernel: false,
        };
        self.ops += 1;
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// Pushes the next SQE of slot `idx`; false if the SQ is full.
    fn push_slot(&mut self, idx: usize) -> bool {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            debug_assert!(false, "ready slot {idx} is empty");
            return true;
        };
        debug_assert!(!slot.in_kernel, "slot {idx} pushed twice");
        let fd = types::Fd(slot.req.file.as_raw_fd());
        let offset = slot.req.offset + slot.done as u64;
        let chunk = u32::try_from((slot.len - slot.done).min(MAX_CHUNK)).unwrap_or(u32::MAX);
        let entry = match slot.req.kind {
            OpKind::Read => {
                let ptr = slot.req.buf[slot.done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, chunk).offset(offset).build()
            }
            OpKind::Write if slot.merged.is_empty() => {
                let ptr = slot.req.buf[slot.done..].as_ptr();
                opcode::Write::new(fd, ptr, chunk).offset(offset).build()
            }
            OpKind::Write => {
                let members = std::iter::once(&slot.req).chain(&slot.merged);
                unwritten_iovecs(&mut slot.iov, members.map(|r| &r.buf[..]), slot.done);
                // At most MAX_GROUP (<= IOV_MAX) entries.
                let n = u32::try_from(slot.iov.len()).unwrap_or(u32::MAX);
                opcode::Writev::new(fd, slot.iov.as_ptr(), n)
                    .offset(offset)
                    .build()
            }
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the SQE points at `chunk` bytes inside the slot's buffer
        // (`done + chunk <= len`), or, for a merged write, at the slot's
        // iovec array, whose entries cover exactly the unwritten bytes of the
        // members' buffers (`unwritten_iovecs`); and at the slot's open file.
        // The slot, and so every member's buffer (a heap allocation that
        // does not move when the request does), the iovec array's heap
        // allocation and the `Arc<File>`, stays in the table until this
        // SQE's CQE is reaped (`in_kernel`); nothing reads or writes the
        // buffers, or touches the iovecs, meanwhile. `abandon` leaks all of
        // them rather than freeing them while the kernel may hold them.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return false;
        }
        slot.in_kernel = true;
        true
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, res) in &cqes {
            self.on_cqe(user_data, res);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE_TOKEN {
            // Reading resets the eventfd counter; re-armed by `fill`.
            self.wake_armed = false;
            if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                tracing::warn!(errno = -res, "io_uring eventfd read failed");
            }
            return;
        }
        let Ok(idx) = usize::try_from(user_data) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            debug_assert!(false, "completion for empty slot {idx}");
            return;
        };
        slot.in_kernel = false;
        let len = slot.len;
        let outcome = if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                None
            } else {
                Some(Err(io::Error::from_raw_os_error(errno)))
            }
        } else {
            let n = usize::try_from(res).unwrap_or(0);
            match slot.req.kind {
                OpKind::Sync => Some(Ok(())),
                // End of file: the rest of the buffer reads as zeros.
                OpKind::Read if n == 0 => {
                    let done = slot.done;
                    slot.req.buf[done..].fill(0);
                    Some(Ok(()))
                }
                OpKind::Write if n == 0 => Some(Err(io::Error::from(io::ErrorKind::WriteZero))),
                OpKind::Read | OpKind::Write => {
                    slot.done += n;
                    if slot.done >= len { Some(Ok(())) } else { None }
                }
            }
        };
        match outcome {
            Some(result) => self.complete(idx, result),
            None => self.ready.push_back(idx),
        }
    }

    fn complete(&mut self, idx: usize, result: io::Result<()>) {
        if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
            self.ops -= 1;
            self.free.push(idx);
            for member in slot.merged {
                member.complete(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(same_error(e)),
                });
            }
            slot.req.complete(result);
        }
    }

    /// The ring is unusable: answer every request with `err`. A buffer an
    /// SQE may still point to is leaked, not freed, and the caller gets a
    /// fresh one instead: the kernel might yet write into the old one.
    fn abandon(&mut self, err: io::Error) {
        let error = || io::Error::new(err.kind(), format!("io_uring failed: {err}"));
        for slot in self.slots.drain(..).flatten() {
            let InFlight {
                req,
                merged,
                iov,
                in_kernel,
                ..
            } = slot;
            if in_kernel {
                std::mem::forget(iov);
            }
            for mut req in std::iter::once(req).chain(merged) {
                if in_kernel {
                    let len = req.buf.len();
                    std::mem::forget(std::mem::replace(&mut req.buf, AlignedBuf::zeroed(len)));
                }
                req.complete(Err(error()));
            }
        }
        self.ops = 0;
        if self.wake_armed {
            // Same reasoning as for the buffers.
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
        // Requests still queued never reached the kernel.
        while let Ok(req) = self.rx.try_recv() {
            req.complete(Err(error()));
        }
    }

    /// Before the ring is dropped, completes the armed eventfd read so the
    /// kernel holds no pointer into `wake_buf`.
    fn disarm_wake(&mut self) {
        for _ in 0..16 {
            if !self.wake_armed {
                return;
            }
            self.waker.wake();
            if self.ring.submit_and_wait(1).is_ok() {
                self.reap();
            }
        }
        if self.wake_armed {
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
    }
}

/// Fills `iov` with the parts of `bufs`, laid end to end, that come after
/// the first `skip` bytes: where a merged write resumes after a short one.
fn unwritten_iovecs<'a>(
    iov: &mut Vec<libc::iovec>,
    bufs: impl Iterator<Item = &'a [u8]>,
    mut skip: usize,
) {
    iov.clear();
    for buf in bufs {
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let rest = &buf[skip..];
        skip = 0;
        iov.push(libc::iovec {
            // The kernel only reads through it: the op is a write.
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        });
    }
}

/// `e` again, for the other members of a merged write.
fn same_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    //! The engine itself, fed directly: requests queued before the driver
    //! starts are all taken by its first `fill`, so merging is certain.
    //! The device suite (`device.rs`) covers the same paths through the
    //! public API on both backends.

    use std::os::unix::fs::FileExt;

    use super::*;

    fn pattern(len: usize, seed: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed as u8).wrapping_mul(31) ^ (i / 7) as u8;
        }
        buf
    }

    fn request(
        kind: OpKind,
        file: &Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> (Request, oneshot::Receiver<Completion>) {
        let (reply, done) = oneshot::channel();
        let req = Request {
            kind,
            file: file.clone(),
            offset,
            buf,
            reply,
        };
        (req, done)
    }

    /// Queues `reqs`, then runs a driver until it has served them all.
    fn serve_queued(reqs: Vec<Request>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        for req in reqs {
            assert!(tx.send(req).is_ok());
        }
        drop(tx);
        let (driver, _waker) = spawn(64, rx).expect("driver starts");
        driver.join().expect("driver thread");
    }

    fn errno(c: &Completion) -> Option<i32> {
        c.result.as_ref().err().and_then(io::Error::raw_os_error)
    }

    /// Adjacent writes queued out of order, two of them with their futures
    /// dropped, among a read, a sync, a write elsewhere and an empty write:
    /// everything is written, every kept request answered with its buffer.
    #[test]
    fn merged_writes_land_with_dropped_members() {
        let tmp = tempfile::tempfile().expect("tempfile");
        tmp.set_len(1 << 20).expect("size");
        let file = Arc::new(tmp);
        // 20 extents of 1 or 2 pages laid end to end from page 3.
        let mut extents = Vec::new();
        let mut page = 3;
        for i in 0..20u64 {
            let pages = 1 + usize::from(i % 3 == 0);
            extents.push((page * PAGE as u64, pages * PAGE, i));
            page += pages as u64;
        }
        let mut order: Vec<usize> = (0..extents.len()).collect();
        order.reverse();
        order.swap(2, 11);
        order.swap(5, 17);
        let lone = (page + 10) * PAGE as u64;
        let mut reqs = Vec::new();
        let mut replies = Vec::new();
        let (req, rx) = request(OpKind::Read, &file, 0, AlignedBuf::zeroed(PAGE));
        reqs.push(req);
        replies.push((rx, PAGE));
        for (n, &i) in order.iter().enumerate() {
            let (offset, len, seed) = extents[i];
            let (req, rx) = request(OpKind::Write, &file, offset, pattern(len, seed));
            reqs.push(req);
            if n == 4 || n == 13 {
                drop(rx);
            } else {
                replies.push((rx, len));
            }
        }
        for (kind, offset, buf) in [
            (OpKind::Write, lone, pattern(PAGE, 99)),
            (OpKind::Write, 0, AlignedBuf::zeroed(0)),
            (OpKind::Sync, 0, AlignedBuf::zeroed(0)),
        ] {
            let len = buf.len();
            let (req, rx) = request(kind, &file, offset, buf);
            reqs.push(req);
            replies.push((rx, len));
        }
        serve_queued(reqs);
        for (rx, len) in replies {
            let c = rx.blocking_recv().expect("answered");
            c.result.expect("ok");
            assert_eq!(c.buf.len(), len, "the buffer comes back");
        }
        for (offset, len, seed) in extents.into_iter().chain([(lone, PAGE, 99)]) {
            let mut got = vec![0; len];
            file.read_exact_at(&mut got, offset).expect("read back");
            assert!(got[..] == pattern(len, seed)[..], "extent at {offset}");
        }
    }

    /// A merged write the kernel refuses fails every member.
    #[test]
    fn merged_write_error_reaches_every_member() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![0; 8 * PAGE]).expect("create");
        let file = Arc::new(File::open(&path).expect("read-only open"));
        let (reqs, replies): (Vec<_>, Vec<_>) = [2u64, 0, 1, 3]
            .into_iter()
            .map(|i| request(OpKind::Write, &file, i * PAGE as u64, pattern(PAGE, i)))
            .unzip();
        serve_queued(reqs);
        for rx in replies {
            let c = rx.blocking_recv().expect("answered");
            assert_eq!(errno(&c), Some(libc::EBADF));
            assert_eq!(c.buf.len(), PAGE);
        }
    }

    /// A short merged write resumes at the first unwritten byte, here in
    /// the middle of a member, and members complete only with the whole
    /// group. A memfd sealed against growth writes up to its size, then
    /// fails: the group at pages 4..10 of a 7-page file is written short
    /// (pages 4..7), and its resubmission fails with EPERM, which every
    /// member gets, even the one that was written in full.
    #[test]
    fn short_merged_write_resumes_then_fails_together() {
        // SAFETY: memfd_create reads a NUL-terminated string; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"keyturn-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(7 * PAGE as u64).expect("size");
        // SAFETY: F_ADD_SEALS takes an integer argument.
        let sealed = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
        assert_eq!(sealed, 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
        let file = Arc::new(file);
        let members = [(4, 1), (5, 4), (9, 1)]; // (first page, pages)
        let (reqs, replies): (Vec<_>, Vec<_>) = members
            .iter()
            .map(|&(page, pages)| {
                let buf = pattern(pages * PAGE, page);
                request(OpKind::Write, &file, page * PAGE as u64, buf)
            })
            .unzip();
        serve_queued(reqs);
        for rx in replies {
            let c = rx.blocking_recv().expect("answered");
            assert_eq!(errno(&c), Some(libc::EPERM));
        }
        let mut got = vec![0; 3 * PAGE];
        file.read_exact_at(&mut got, 4 * PAGE as u64)
            .expect("read back");
        assert!(got[..PAGE] == pattern(PAGE, 4)[..], "first member written");
        assert!(
            got[PAGE..] == pattern(4 * PAGE, 5)[..2 * PAGE],
            "second member written up to the size limit"
        );
    }

    #[test]
    fn unwritten_iovecs_skip_what_was_written() {
        let bufs: [&[u8]; 3] = [&[1; 10], &[2; 20], &[3; 5]];
        let mut iov = Vec::new();
        let lens = |iov: &[libc::iovec]| iov.iter().map(|v| v.iov_len).collect::<Vec<_>>();
        for (skip, want) in [
            (0, vec![10, 20, 5]),
            (4, vec![6, 20, 5]),
            (10, vec![20, 5]),
            (29, vec![1, 5]),
            (34, vec![1]),
            (35, vec![]),
        ] {
            unwritten_iovecs(&mut iov, bufs.iter().copied(), skip);
            assert_eq!(lens(&iov), want, "skip {skip}");
        }
        unwritten_iovecs(&mut iov, bufs.iter().copied(), 12);
        assert_eq!(iov[0].iov_base.cast_const(), bufs[1][2..].as_ptr().cast());
    }

    /// The ring refuses operations outside the allowed set (here a NOP),
    /// which shows the restrictions are in force on this kernel.
    #[test]
    fn ring_is_restricted() {
        let mut ring = build_ring(4).expect("ring");
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP carries no pointers.
        unsafe { ring.submission().push(&nop) }.expect("push");
        ring.submit_and_wait(1).expect("submit");
        let cqe = ring.completion().next().expect("a completion");
        assert_eq!((cqe.user_data(), cqe.result()), (7, -libc::EACCES));
    }
}
