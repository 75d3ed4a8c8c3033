//! Fault injection for device I/O, for failure tests (nbdkit's "error"
//! filter, redb's "I/O fails after k operations").
//!
//! A [`FaultPlan`] is a shared handle: attach it to a device with
//! [`Device::with_faults`](super::device::Device::with_faults), arm it from
//! the test, and read the counters afterwards. An injected fault fails the
//! operation before it reaches the engine, with `DeviceError::Io` whose
//! source is EIO. A device without a plan pays one `Option` check per
//! operation.

#![forbid(unsafe_code)]

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Which operation is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultOp {
    Read,
    Write,
    Sync,
}

/// Faults injected so far, by operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Failed reads.
    pub reads: u64,
    /// Failed writes.
    pub writes: u64,
    /// Failed syncs.
    pub syncs: u64,
}

/// A shared, thread-safe plan of faults to inject. Clones share state.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    fail_reads: AtomicU64,
    fail_writes: AtomicU64,
    fail_syncs: AtomicU64,
    write_range: Mutex<Option<Range<u64>>>,
    /// Operations left before fail-stop; `u64::MAX` when not armed. Stays
    /// at 0 once reached, so every later operation fails.
    ops_left: AtomicU64,
    ops: AtomicU64,
    injected_reads: AtomicU64,
    injected_writes: AtomicU64,
    injected_syncs: AtomicU64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            fail_reads: AtomicU64::new(0),
            fail_writes: AtomicU64::new(0),
            fail_syncs: AtomicU64::new(0),
            write_range: Mutex::new(None),
            ops_left: AtomicU64::new(u64::MAX),
            ops: AtomicU64::new(0),
            injected_reads: AtomicU64::new(0),
            injected_writes: AtomicU64::new(0),
            injected_syncs: AtomicU64::new(0),
        }
    }
}

/// Takes one from `n` if it is positive.
fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

impl FaultPlan {
    /// A plan that injects nothing until armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next `n` reads.
    pub fn fail_next_reads(&self, n: u64) {
        self.state.fail_reads.store(n, Ordering::Release);
    }

    /// Fails the next `n` writes.
    pub fn fail_next_writes(&self, n: u64) {
        self.state.fail_writes.store(n, Ordering::Release);
    }

    /// Fails the next `n` syncs (each one also poisons the device).
    pub fn fail_next_syncs(&self, n: u64) {
        self.state.fail_syncs.store(n, Ordering::Release);
    }

    /// Fails every write that overlaps `range` (byte offsets), until cleared.
    pub fn fail_writes_in(&self, range: Range<u64>) {
        *self.state.write_range.lock() = Some(range);
    }

    /// Lets the next `k` operations through, then fails every operation
    /// (fail-stop) until [`clear`](Self::clear).
    pub fn fail_after(&self, k: u64) {
        self.state.ops_left.store(k, Ordering::Release);
    }

    /// Disarms every fault; the counters are kept.
    pub fn clear(&self) {
        let s = &self.state;
        s.fail_reads.store(0, Ordering::Release);
        s.fail_writes.store(0, Ordering::Release);
        s.fail_syncs.store(0, Ordering::Release);
        *s.write_range.lock() = None;
        s.ops_left.store(u64::MAX, Ordering::Release);
    }

    /// Faults injected so far.
    pub fn injected(&self) -> FaultCounts {
        let s = &self.state;
        FaultCounts {
            reads: s.injected_reads.load(Ordering::Acquire),
            writes: s.injected_writes.load(Ordering::Acquire),
            syncs: s.injected_syncs.load(Ordering::Acquire),
        }
    }

    /// Operations seen so far, failed or not (to count a workload's
    /// operations, then rerun it with `fail_after` at each one).
    pub fn ops(&self) -> u64 {
        self.state.ops.load(Ordering::Acquire)
    }

    /// A plan for `device` from the `KEYTURN_FAULTS` environment variable,
    /// for failure tests of the real binary: a comma-separated list of
    /// `DEVICE:ACTION`, where ACTION is `fail-writes` (every write fails),
    /// `fail-reads`, `fail-next-writes=N` or `fail-next-reads=N`. `None` when
    /// nothing names `device`; unknown actions are ignored with a warning.
    pub fn from_env(device: &str) -> Option<Self> {
        let spec = std::env::var("KEYTURN_FAULTS").ok()?;
        let mut plan = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((dev, action)) = item.split_once(':') else {
                tracing::warn!(item, "KEYTURN_FAULTS: expected DEVICE:ACTION");
                continue;
            };
            if dev != device {
                continue;
            }
            let p: &mut FaultPlan = plan.get_or_insert_with(FaultPlan::new);
            let (name, n) = match action.split_once('=') {
                Some((a, n)) => (a, n.parse::<u64>().ok()),
                None => (action, None),
            };
            match (name, n) {
                ("fail-writes", None) => p.fail_writes_in(0..u64::MAX),
                ("fail-reads", None) => p.fail_next_reads(u64::MAX),
                ("fail-next-writes", Some(n)) => p.fail_next_writes(n),
                ("fail-next-reads", Some(n)) => p.fail_next_reads(n),
                _ => tracing::warn!(item, "KEYTURN_FAULTS: unknown action"),
            }
        }
        plan
    }

    /// Decides the fate of one operation: `Some(EIO)` to fail it.
    pub(crate) fn check(&self, op: FaultOp, offset: u64, len: u64) -> Option<io::Error> {
        let s = &self.state;
        s.ops.fetch_add(1, Ordering::AcqRel);
        let stopped = s
            .ops_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                if v == u64::MAX || v == 0 {
                    None
                } else {
                    Some(v - 1)
                }
            })
            == Err(0);
        let fail = stopped
            || match op {
                FaultOp::Read => take_one(&s.fail_reads),
                FaultOp::Sync => take_one(&s.fail_syncs),
                FaultOp::Write => {
                    take_one(&s.fail_writes)
                        || s.write_range
                            .lock()
                            .as_ref()
                            .is_some_and(|r| offset < r.end && offset.saturating_add(len) > r.start)
                }
            };
        if !fail {
            return None;
        }
        let counter = match op {
            FaultOp::Read => &s.injected_reads,
            FaultOp::Write => &s.injected_writes,
            FaultOp::Sync => &s.injected_syncs,
        };
        counter.fetch_add(1, Ordering::AcqRel);
        Some(io::Error::from_raw_os_error(libc::EIO))
    }
}
