//! Shared/exclusive locks on ranges of logical blocks.

use std::ops::Range;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Shared/exclusive locks on ranges of logical blocks, so overlapping
/// requests (and read-modify-write of a partly written block) serialise
/// while disjoint ones run in parallel.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, Range<u64>, bool)>>,
    next: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Waits until `blocks` is free of conflicting holders, then holds it.
    pub async fn lock(&self, blocks: Range<u64>, exclusive: bool) -> RangeGuard<'_> {
        self.lock_all(std::slice::from_ref(&blocks), exclusive)
            .await
    }

    /// Waits until every range of `ranges` is free of conflicting holders,
    /// then holds them all under one guard. All at once, never one by one,
    /// so two holders of several ranges can never wait for each other.
    /// The ranges must not overlap each other.
    pub async fn lock_all(&self, ranges: &[Range<u64>], exclusive: bool) -> RangeGuard<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before checking, so a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock();
                let conflict = held.iter().any(|(_, r, ex)| {
                    (exclusive || *ex) && ranges.iter().any(|b| r.start < b.end && b.start < r.end)
                });
                if !conflict {
                    held.extend(ranges.iter().map(|b| (id, b.clone(), exclusive)));
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.held.lock().retain(|(id, _, _)| *id != self.id);
        self.lock.released.notify_waiters();
    }
}
