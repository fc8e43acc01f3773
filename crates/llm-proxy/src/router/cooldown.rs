//! Cooldown of a deployment after repeated failures: more than
//! `allowed_fails` failures within a minute take it out of rotation for
//! `cooldown_time`, so a dead upstream stops costing every request a retry.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Cooldown {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    failures: u32,
    until: Option<Instant>,
}

impl Cooldown {
    /// Counts a failure; true when it starts a cooldown.
    pub fn record_failure(
        &self,
        now: Instant,
        allowed_fails: u32,
        cooldown_time: Duration,
    ) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.window_start {
            Some(start) if now.duration_since(start) < FAILURE_WINDOW => state.failures += 1,
            _ => {
                state.window_start = Some(now);
                state.failures = 1;
            }
        }
        if state.failures > allowed_fails {
            state.until = Some(now + cooldown_time);
            state.window_start = None;
            state.failures = 0;
            true
        } else {
            false
        }
    }

    /// Time left in the current cooldown, if any.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cools_down_after_allowed_fails_then_recovers() {
        let cooldown = Cooldown::default();
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        assert!(!cooldown.record_failure(t0, 1, five));
        assert_eq!(cooldown.remaining(t0), None);
        assert!(cooldown.record_failure(t0, 1, five));
        assert_eq!(
            cooldown.remaining(t0 + Duration::from_secs(1)),
            Some(Duration::from_secs(4))
        );
        assert_eq!(cooldown.remaining(t0 + five), None);
        // Failures a minute apart never add up.
        assert!(!cooldown.record_failure(t0 + Duration::from_secs(100), 1, five));
        assert!(!cooldown.record_failure(t0 + Duration::from_secs(200), 1, five));
    }
}
