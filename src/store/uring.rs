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
//! # Back-pressure
//! At most `sq_entries - 1` operations are in flight (one SQE is kept for the
//! eventfd read). Beyond that, requests wait in the channel until completions
//! free slots. Because the CQ ring holds twice the SQ entries, it can never
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

/// An operation in the in-flight table.
struct InFlight {
    req: Request,
    /// Bytes already transferred (for resubmitting short reads and writes).
    done: usize,
    retries: u32,
    /// Whether an SQE for this slot may be in the kernel's hands, i.e. the
    /// buffer must not be freed or reused.
    in_kernel: bool,
}

/// Builds a ring for `queue_depth` entries, restricted to the operations
/// the driver uses (firecracker's lesson), or unrestricted if the kernel
/// refuses restrictions.
fn build_ring(queue_depth: u32) -> io::Result<IoUring> {
    let restricted = || -> io::Result<IoUring> {
        let ring = IoUring::builder().setup_r_disabled().build(queue_depth)?;
        let mut res = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ];
        ring.submitter().register_restrictions(&mut res)?;
        ring.submitter().register_enable_rings()?;
        Ok(ring)
    };
    match restricted() {
        Ok(ring) => Ok(ring),
        Err(e) => {
            tracing::debug!(error = %e, "io_uring restrictions unavailable; using an unrestricted ring");
            IoUring::new(queue_depth)
        }
    }
}

/// Creates the ring and starts the driver thread, which serves `rx` until
/// every sender is gone, then finishes what is in flight and exits.
pub(super) fn spawn(
    queue_depth: u32,
    rx: Receiver<Request>,
) -> io::Result<(std::thread::JoinHandle<()>, Arc<Waker>)> {
    let ring = build_ring(queue_depth.clamp(2, 4096))?;
    let waker = Arc::new(Waker::new()?);
    let cap = (ring.params().sq_entries() as usize)
        .saturating_sub(1)
        .max(1);
    let driver = Driver {
        ring,
        rx,
        waker: waker.clone(),
        slots: Vec::with_capacity(cap),
        free: Vec::new(),
        ops: 0,
        cap,
        ready: VecDeque::new(),
        wake_buf: Box::new(0),
        wake_armed: false,
        disconnected: false,
        cqes: Vec::with_capacity(cap * 2),
    };
    let handle = std::thread::Builder::new()
        .name("keyturn-uring".into())
        .spawn(move || driver.run())?;
    Ok((handle, waker))
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
}

impl Driver {
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
            match self.rx.try_recv() {
                Ok(req) => {
                    if req.kind != OpKind::Sync && req.buf.is_empty() {
                        req.complete(Ok(()));
                        continue;
                    }
                    let idx = self.insert(req);
                    if !self.push_slot(idx) {
                        self.ready.push_back(idx);
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.disconnected = true,
            }
        }
    }

    fn insert(&mut self, req: Request) -> usize {
        let slot = InFlight {
            req,
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
        let fd = types::Fd(slot.req.file.as_raw_fd());
        let offset = slot.req.offset + slot.done as u64;
        let len = slot.req.buf.len();
        let chunk = u32::try_from((len - slot.done).min(MAX_CHUNK)).unwrap_or(u32::MAX);
        let entry = match slot.req.kind {
            OpKind::Read => {
                let ptr = slot.req.buf[slot.done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, chunk).offset(offset).build()
            }
            OpKind::Write => {
                let ptr = slot.req.buf[slot.done..].as_ptr();
                opcode::Write::new(fd, ptr, chunk).offset(offset).build()
            }
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the SQE points at `chunk` bytes inside the slot's buffer
        // (`done + chunk <= len`) and at the slot's open file. The slot, and
        // so the buffer's heap allocation and the `Arc<File>`, stays in the
        // table until this SQE's CQE is reaped (`in_kernel`), and nothing
        // reads or writes the buffer meanwhile.
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
        let len = slot.req.buf.len();
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
            slot.req.complete(result);
        }
    }

    /// The ring is unusable: answer every request with `err`. A buffer an
    /// SQE may still point to is leaked, not freed, and the caller gets a
    /// fresh one instead: the kernel might yet write into the old one.
    fn abandon(&mut self, err: io::Error) {
        let error = || io::Error::new(err.kind(), format!("io_uring failed: {err}"));
        for slot in self.slots.drain(..).flatten() {
            let mut req = slot.req;
            if slot.in_kernel {
                let len = req.buf.len();
                std::mem::forget(std::mem::replace(&mut req.buf, AlignedBuf::zeroed(len)));
            }
            req.complete(Err(error()));
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

#[cfg(test)]
mod tests {
    use super::*;

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
