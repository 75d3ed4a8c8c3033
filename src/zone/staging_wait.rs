//! What a write in a rotation window does when the staging area is full,
//! as the zone's policy says (`staging_full`): acknowledge after the data
//! write alone (unstaged, the default), or wait for staging space up to a
//! bound (strict) and only then fall back to unstaged.
//!
//! The scheduler sets the mode from the policy; the write path reads it
//! once per write that found staging full. The wait itself lives in
//! `volume` (it sleeps without holding any lock, so other clients' writes
//! and the flip that frees space go on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Zone;
use crate::ids::{KeyVersion, Slot};
use crate::store::Staging;

/// How often a strict write looks for staging space again.
const POLL: Duration = Duration::from_millis(5);

/// The zone's staging-full mode: 0 is unstaged, else the strict bound in
/// milliseconds.
#[derive(Debug, Default)]
pub struct StagingWait {
    strict_ms: AtomicU64,
}

impl StagingWait {
    /// Sets the mode: `Some(bound)` is strict, `None` unstaged.
    pub fn set(&self, strict: Option<Duration>) {
        let ms = strict.map_or(0, |d| (d.as_millis() as u64).max(1));
        self.strict_ms.store(ms, Ordering::Relaxed);
    }

    /// The strict bound, or `None` when writes go unstaged at once.
    pub fn bound(&self) -> Option<Duration> {
        match self.strict_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// Tops `staged` up to `want` staging slots for a write in the window of
/// `next` on `zone`, waiting up to `bound`. Stops waiting early when the
/// window is gone without becoming active (an abort: a staged copy would
/// be dropped anyway). A write still short at the bound is counted, logged
/// as an ALERT and goes on with what it has (its missing copies are
/// counted unstaged by the caller). Holds no lock while it sleeps.
pub async fn wait_for_staging(
    zone: &Zone,
    staging: &Staging,
    next: KeyVersion,
    staged: &mut Vec<Slot>,
    want: usize,
    bound: Duration,
) {
    let deadline = Instant::now() + bound;
    loop {
        if staged.len() >= want {
            zone.stats.strict_waited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        {
            let meta = zone.meta.lock();
            if meta.window != Some(next) && meta.active != next {
                return;
            }
        }
        if Instant::now() >= deadline {
            zone.stats.strict_fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keyturn_rotation_strict_fallbacks_total", "zone" => zone.name.clone())
                .increment(1);
            tracing::error!(
                zone = %zone.name,
                missing = want - staged.len(),
                waited_ms = bound.as_millis() as u64,
                "ALERT: staging stayed full for a strict write; acknowledged without a staged copy"
            );
            return;
        }
        tokio::time::sleep(POLL).await;
        staged.extend(staging.alloc_foreground((want - staged.len()) as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstaged_by_default_and_strict_once_set() {
        let w = StagingWait::default();
        assert_eq!(w.bound(), None);
        w.set(Some(Duration::from_secs(2)));
        assert_eq!(w.bound(), Some(Duration::from_secs(2)));
        w.set(None);
        assert_eq!(w.bound(), None);
    }
}
