//! One monotonic clock for every source and session, so that readings of
//! different sources and the session windows compare directly; wall-clock
//! times are derived from it and never go backwards when the system clock is
//! stepped.

use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    wall_at_epoch: SystemTime,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            epoch: Instant::now(),
            wall_at_epoch: SystemTime::now(),
        }
    }

    /// Monotonic time since the clock started.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The wall-clock time of a monotonic instant.
    pub fn wall(&self, at: Duration) -> SystemTime {
        self.wall_at_epoch + at
    }
}
