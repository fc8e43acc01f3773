//! Per-minute request and token counting, shared by the router (a
//! deployment's `rpm`/`tpm`) and by virtual keys (their rpm/tpm limits).
//!
//! A fixed window that starts at the first request after the previous one
//! ended: simple, cheap under a mutex, and it gives an exact Retry-After
//! (the end of the window). It admits at most twice the limit across a
//! window boundary, which is what LiteLLM's per-minute counters allow too.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct MinuteWindow {
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    start: Option<Instant>,
    requests: u64,
    tokens: u64,
}

/// Which per-minute limit is reached, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Requests(Duration),
    Tokens(Duration),
}

impl Exceeded {
    pub fn retry_after(self) -> Duration {
        match self {
            Self::Requests(d) | Self::Tokens(d) => d,
        }
    }
}

impl Counts {
    fn fits(&self, rpm: Option<u64>, tpm: Option<u64>, left: Duration) -> Result<(), Exceeded> {
        if rpm.is_some_and(|limit| self.requests >= limit) {
            return Err(Exceeded::Requests(left));
        }
        if tpm.is_some_and(|limit| self.tokens >= limit) {
            return Err(Exceeded::Tokens(left));
        }
        Ok(())
    }

    fn roll(&mut self, now: Instant) -> Duration {
        match self.start {
            Some(start) if now.duration_since(start) < WINDOW => WINDOW - now.duration_since(start),
            _ => {
                *self = Counts {
                    start: Some(now),
                    requests: 0,
                    tokens: 0,
                };
                WINDOW
            }
        }
    }
}

impl MinuteWindow {
    /// Whether one more request fits under `rpm` and `tpm` (None: unlimited).
    pub fn check(&self, now: Instant, rpm: Option<u64>, tpm: Option<u64>) -> Result<(), Exceeded> {
        self.with(now, |counts, left| counts.fits(rpm, tpm, left))
    }

    /// [`check`](Self::check), and count the request when it fits.
    pub fn admit(&self, now: Instant, rpm: Option<u64>, tpm: Option<u64>) -> Result<(), Exceeded> {
        self.with(now, |counts, left| {
            counts.fits(rpm, tpm, left)?;
            counts.requests += 1;
            Ok(())
        })
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Counts, Duration) -> T) -> T {
        let mut counts = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let left = counts.roll(now);
        f(&mut counts, left)
    }

    /// Adds the tokens of a finished request to the current window.
    pub fn add_tokens(&self, now: Instant, tokens: u64) {
        self.with(now, |counts, _| {
            counts.tokens = counts.tokens.saturating_add(tokens);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_tokens_per_minute() {
        let window = MinuteWindow::default();
        let t0 = Instant::now();
        assert!(window.admit(t0, Some(2), Some(100)).is_ok());
        assert!(window.admit(t0, Some(2), Some(100)).is_ok());
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            window.admit(later, Some(2), Some(100)),
            Err(Exceeded::Requests(Duration::from_secs(40)))
        );
        window.add_tokens(later, 150);
        assert_eq!(
            window.check(later, None, Some(100)),
            Err(Exceeded::Tokens(Duration::from_secs(40)))
        );
        let next = t0 + Duration::from_secs(61);
        assert!(window.admit(next, Some(2), Some(100)).is_ok());
    }
}
