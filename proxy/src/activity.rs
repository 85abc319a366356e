//! Streams in flight across the whole proxy, for the SIGTERM drain.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Streams in flight across the proxy, and when that last changed: the drain waits on it.
pub struct Activity {
    active: AtomicUsize,
    last_change: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            last_change: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    pub fn started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ended(&self) {
        // Only the moment the proxy goes idle matters to the drain.
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1
            && let Ok(mut t) = self.last_change.lock()
        {
            *t = Instant::now();
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// How long no stream has been active; zero while one is.
    pub fn idle_for(&self) -> Duration {
        if self.active() > 0 {
            return Duration::ZERO;
        }
        self.last_change
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}
