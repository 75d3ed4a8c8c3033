//! The rate budget of background re-encryption: bytes per second and a
//! share of one core, applied only while the zone has foreground I/O. An
//! idle zone (or an emergency) runs at full speed.

use std::time::{Duration, Instant};

use crate::config::RotationSection;
use crate::zone::Zone;

/// Paces a stream of batches.
pub struct Throttle {
    bytes_per_sec: Option<f64>,
    cpu_share: f64,
    idle_after: Duration,
    /// Whether the budget is lifted (an emergency rotation).
    pub unthrottled: bool,
    window_start: Instant,
    window_bytes: u64,
}

impl Throttle {
    /// A throttle from the pool's rotation settings.
    pub fn new(config: &RotationSection, unthrottled: bool) -> Self {
        Self {
            bytes_per_sec: (config.rate_mib_s > 0).then_some((config.rate_mib_s << 20) as f64),
            cpu_share: config.cpu_share,
            idle_after: Duration::from_millis(config.idle_after_ms),
            unthrottled,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// How long to wait after a batch of `bytes` that kept a core busy for
    /// `busy`, given that `zone` has been idle for `idle`.
    pub fn delay(&mut self, bytes: u64, busy: Duration, idle: Duration) -> Duration {
        if self.unthrottled || idle >= self.idle_after {
            self.window_start = Instant::now();
            self.window_bytes = 0;
            return Duration::ZERO;
        }
        // CPU share: a batch that took `busy` is followed by enough rest that
        // busy / (busy + rest) = share.
        let cpu = busy.mul_f64((1.0 / self.cpu_share - 1.0).max(0.0));
        let mut rate = Duration::ZERO;
        if let Some(bps) = self.bytes_per_sec {
            self.window_bytes += bytes;
            let due = Duration::from_secs_f64(self.window_bytes as f64 / bps);
            rate = due.saturating_sub(self.window_start.elapsed());
            if self.window_start.elapsed() > Duration::from_secs(1) {
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
        }
        cpu.max(rate).min(Duration::from_millis(500))
    }

    /// Whether `zone` has gone without foreground I/O long enough that the
    /// budget does not apply.
    pub fn zone_idle(&self, zone: &Zone) -> bool {
        zone.idle_for() >= self.idle_after
    }

    /// Sleeps as [`delay`](Self::delay) says, for `zone`.
    pub fn pace(&mut self, zone: &Zone, bytes: u64, busy: Duration) {
        let d = self.delay(bytes, busy, zone.idle_for());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives
    // on this stack frame for the whole call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rate_mib_s: u64, cpu_share: f64) -> RotationSection {
        RotationSection {
            rate_mib_s,
            cpu_share,
            idle_after_ms: 200,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_share_sets_the_rest_after_a_busy_batch() {
        let mut t = Throttle::new(&config(0, 0.25), false);
        let d = t.delay(1 << 20, Duration::from_millis(10), Duration::ZERO);
        assert_eq!(
            d,
            Duration::from_millis(30),
            "10 ms busy at 25% → 30 ms rest"
        );
    }

    #[test]
    fn idle_zone_and_emergency_are_not_throttled() {
        let mut t = Throttle::new(&config(1, 0.1), false);
        assert_eq!(
            t.delay(1 << 30, Duration::from_millis(50), Duration::from_secs(1)),
            Duration::ZERO
        );
        let mut t = Throttle::new(&config(1, 0.1), true);
        assert_eq!(
            t.delay(1 << 30, Duration::from_millis(50), Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn thread_cpu_time_counts_work_not_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_time() - t0;
        let t1 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t1 < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(slept < Duration::from_millis(20), "sleeping used {slept:?}");
        assert!(thread_cpu_time() - t1 >= Duration::from_millis(20));
    }

    #[test]
    fn byte_rate_limits_a_busy_zone() {
        let mut t = Throttle::new(&config(1, 1.0), false);
        let d = t.delay(512 << 10, Duration::ZERO, Duration::ZERO);
        assert!(
            d > Duration::from_millis(400) && d <= Duration::from_millis(500),
            "half a MiB at 1 MiB/s waits about half a second: {d:?}"
        );
    }
}
