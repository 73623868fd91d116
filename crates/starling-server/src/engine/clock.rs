//! The engine's clock, passed in rather than read from the wall: real time in `starling
//! serve` ([`SystemClock`], on tokio's timer, so `tokio::time::pause` drives it in tests), and
//! virtual time in the simulator ([`VirtualClock`], advanced by the simulation). Deadlines are
//! durations since the clock's start.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A future that resolves when a deadline has passed.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the engine reads the time.
pub trait Clock: Send + Sync + Debug {
    /// Time since the clock started.
    fn now(&self) -> Duration;
    /// Unix milliseconds, for round records.
    fn unix_ms(&self) -> i64;
    /// A future that resolves once [`Clock::now`] reaches `at`.
    fn sleep_until(&self, at: Duration) -> Sleep;
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Real time, on tokio's timer.
#[derive(Debug)]
pub struct SystemClock {
    start: tokio::time::Instant,
    start_ms: i64,
}

impl SystemClock {
    /// A clock starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
            start_ms: wall_ms(),
        })
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
    fn unix_ms(&self) -> i64 {
        self.start_ms + self.now().as_millis() as i64
    }
    fn sleep_until(&self, at: Duration) -> Sleep {
        Box::pin(tokio::time::sleep_until(self.start + at))
    }
}

/// Virtual time: it stands still until [`VirtualClock::advance_to`] moves it.
#[derive(Debug, Clone)]
pub struct VirtualClock {
    now: Arc<watch::Sender<Duration>>,
    start_ms: i64,
}

impl Default for VirtualClock {
    fn default() -> Self {
        Self {
            now: Arc::new(watch::Sender::new(Duration::ZERO)),
            start_ms: wall_ms(),
        }
    }
}

impl VirtualClock {
    /// A virtual clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward to `t` (never backwards), waking every sleep that is due.
    pub fn advance_to(&self, t: Duration) {
        self.now.send_if_modified(|now| {
            let later = t > *now;
            if later {
                *now = t;
            }
            later
        });
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.advance_to(self.now() + by);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        *self.now.borrow()
    }
    fn unix_ms(&self) -> i64 {
        self.start_ms + self.now().as_millis() as i64
    }
    fn sleep_until(&self, at: Duration) -> Sleep {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            if rx.wait_for(|now| *now >= at).await.is_err() {
                // The clock is gone, so time never moves again.
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_virtual_sleep_ends_when_the_clock_reaches_it() {
        let clock = VirtualClock::new();
        let sleep = tokio::spawn(clock.sleep_until(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleep.is_finished());
        clock.advance_to(Duration::from_secs(10));
        sleep.await.unwrap();
        clock.advance_to(Duration::from_secs(1));
        assert_eq!(
            clock.now(),
            Duration::from_secs(10),
            "time never runs backwards"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_system_clock_follows_tokios_paused_time() {
        let clock = SystemClock::new();
        clock.sleep_until(Duration::from_secs(3600)).await;
        assert!(clock.now() >= Duration::from_secs(3600));
    }
}
