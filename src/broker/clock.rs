//! The broker's time, handed to it: wall-clock milliseconds for everything
//! that must outlive a restart, a monotonic reading for uptime.
//!
//! Boundary: the broker and its sessions read time only through the
//! [`Clock`] given to [`Broker`](super::Broker) (and sessions only as `now`
//! arguments), so a test can set it with [`ManualClock`] instead of
//! waiting. Connection timers (keep-alive, publish rate) use tokio's
//! clock, which tests pause; they are not the broker's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Wall-clock time in Unix milliseconds. Message expiry, session expiry
    /// and will delays are stored and must survive a restart, so they are
    /// wall-clock, not `Instant`.
    fn now_ms(&self) -> u64;

    /// Time since a fixed origin, never going backwards: for durations
    /// within one run (uptime), which a wall-clock step must not bend.
    fn monotonic(&self) -> Duration;
}

/// The operating system's clocks.
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock { origin: Instant::now() }
    }

    /// The system's wall clock in Unix milliseconds.
    pub fn unix_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemClock::unix_ms()
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told: for tests.
pub struct ManualClock {
    now_ms: AtomicU64,
    monotonic_ms: AtomicU64,
}

impl ManualClock {
    /// A clock reading `unix_ms`.
    pub fn at(unix_ms: u64) -> ManualClock {
        ManualClock { now_ms: AtomicU64::new(unix_ms), monotonic_ms: AtomicU64::new(0) }
    }

    /// Time passes: both readings move by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = by.as_millis() as u64;
        self.now_ms.fetch_add(ms, Ordering::Relaxed);
        self.monotonic_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The wall clock is set (as NTP may step it); the monotonic reading
    /// does not move.
    pub fn set(&self, unix_ms: u64) {
        self.now_ms.store(unix_ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.monotonic_ms.load(Ordering::Relaxed))
    }
}

/// Tokio's clock, with the wall clock read once when it is made: it
/// follows a paused tokio clock (`#[tokio::test(start_paused = true)]`,
/// `tokio::time::advance`), so a test of a whole server waits for an expiry
/// or a will delay without waiting; unpaused, it runs as the system's
/// monotonic clock. For tests: it does not follow wall-clock steps.
pub struct TokioClock {
    wall_at_origin_ms: u64,
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> TokioClock {
        TokioClock { wall_at_origin_ms: SystemClock::unix_ms(), origin: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.wall_at_origin_ms + self.origin.elapsed().as_millis() as u64
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(1_000);
        assert_eq!((clock.now_ms(), clock.monotonic()), (1_000, Duration::ZERO));
        clock.advance(Duration::from_millis(1_500));
        assert_eq!((clock.now_ms(), clock.monotonic()), (2_500, Duration::from_millis(1_500)));
        clock.set(500);
        assert_eq!((clock.now_ms(), clock.monotonic()), (500, Duration::from_millis(1_500)));
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_a_paused_tokio_clock() {
        let clock = TokioClock::new();
        let start = clock.now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms() - start, 90_000);
        assert_eq!(clock.monotonic(), Duration::from_secs(90));
    }
}
