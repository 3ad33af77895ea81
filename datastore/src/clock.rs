//! The clock seam. Lease logic measures time only with [`Clock`]: `CLOCK_BOOTTIME`
//! (monotonic, and counting suspend) in production, a hand-driven clock in tests. Wall
//! time never enters lease decisions (clippy `disallowed-methods` bans `SystemTime::now`
//! in this crate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A monotonic clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Time since an arbitrary fixed point.
    fn now(&self) -> Duration;
    /// Sleeps for `d` of this clock's time.
    fn sleep(&self, d: Duration);
}

/// `CLOCK_BOOTTIME`: the same value in every process of a host.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootClock;

impl Clock for BootClock {
    fn now(&self) -> Duration {
        boottime()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Reads `CLOCK_BOOTTIME`.
pub fn boottime() -> Duration {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
}

/// A clock tests move by hand; `sleep` advances it.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}
