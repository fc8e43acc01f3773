//! Per-minute request and token counting, shared by the router (a
//! deployment's `rpm`/`tpm`) and by virtual keys (their rpm/tpm limits).
//!
//! A sliding window of the last minute in one-second slots: a request or a
//! token counts from its second until 61 s after its second began, so every
//! 60 s span (wherever it starts) holds at most the limit, with no burst of
//! twice the limit across a boundary as a fixed window (LiteLLM's) allows.
//! The price of the slots is a Retry-After up to a second longer than
//! needed. 60 slots under one mutex: constant memory, a few dozen
//! additions per check.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Slots of one second each; a slot counts for `SLOTS + 1` seconds from
/// its start (see the module's comment).
const SLOTS: u64 = 60;

#[derive(Debug, Default)]
pub struct MinuteWindow {
    state: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    /// The instant second 0 began (the first use).
    base: Option<Instant>,
    /// By second modulo `SLOTS`.
    slots: Vec<Slot>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    second: u64,
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

impl Slots {
    /// Seconds since `base`, and the time since that second began.
    fn second(&mut self, now: Instant) -> (u64, Duration) {
        let base = *self.base.get_or_insert(now);
        let since = now.saturating_duration_since(base);
        (
            since.as_secs(),
            Duration::from_nanos(u64::from(since.subsec_nanos())),
        )
    }

    /// The slots that still count at `second`, oldest first.
    fn live(&self, second: u64) -> Vec<Slot> {
        let mut live: Vec<Slot> = self
            .slots
            .iter()
            .filter(|s| (s.requests > 0 || s.tokens > 0) && s.second + SLOTS >= second)
            .copied()
            .collect();
        live.sort_unstable_by_key(|s| s.second);
        live
    }

    /// When `count` of the live slots falls below `limit`: the wait from now.
    fn wait(
        live: &[Slot],
        count: impl Fn(&Slot) -> u64,
        limit: u64,
        now: (u64, Duration),
    ) -> Duration {
        let mut total: u64 = live.iter().map(&count).fold(0, u64::saturating_add);
        for slot in live {
            total = total.saturating_sub(count(slot));
            if total < limit {
                // The slot stops counting SLOTS + 1 seconds after its start.
                let free_at = Duration::from_secs(slot.second + SLOTS + 1);
                let now = Duration::from_secs(now.0) + now.1;
                return free_at.saturating_sub(now).max(Duration::from_millis(1));
            }
        }
        Duration::from_secs(SLOTS + 1)
    }

    fn fits(&mut self, now: Instant, rpm: Option<u64>, tpm: Option<u64>) -> Result<u64, Exceeded> {
        let at = self.second(now);
        let live = self.live(at.0);
        let sum = |count: fn(&Slot) -> u64| live.iter().map(count).fold(0, u64::saturating_add);
        if let Some(limit) = rpm.filter(|&limit| sum(|s| s.requests) >= limit) {
            return Err(Exceeded::Requests(Self::wait(
                &live,
                |s| s.requests,
                limit,
                at,
            )));
        }
        if let Some(limit) = tpm.filter(|&limit| sum(|s| s.tokens) >= limit) {
            return Err(Exceeded::Tokens(Self::wait(&live, |s| s.tokens, limit, at)));
        }
        Ok(at.0)
    }

    /// The slot of `second`, emptied if it held an older second.
    fn slot(&mut self, second: u64) -> &mut Slot {
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); SLOTS as usize + 1];
        }
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(second % len) as usize];
        if slot.second != second {
            *slot = Slot {
                second,
                ..Slot::default()
            };
        }
        slot
    }
}

impl MinuteWindow {
    /// Whether one more request fits under `rpm` and `tpm` (None: unlimited).
    pub fn check(&self, now: Instant, rpm: Option<u64>, tpm: Option<u64>) -> Result<(), Exceeded> {
        self.lock().fits(now, rpm, tpm).map(drop)
    }

    /// [`check`](Self::check), and count the request when it fits.
    pub fn admit(&self, now: Instant, rpm: Option<u64>, tpm: Option<u64>) -> Result<(), Exceeded> {
        let mut slots = self.lock();
        let second = slots.fits(now, rpm, tpm)?;
        slots.slot(second).requests += 1;
        Ok(())
    }

    /// Requests and tokens counted in the last minute, as of `now`.
    pub fn used(&self, now: Instant) -> (u64, u64) {
        let mut slots = self.lock();
        let (second, _) = slots.second(now);
        slots.live(second).iter().fold((0, 0), |(r, t), s| {
            (r.saturating_add(s.requests), t.saturating_add(s.tokens))
        })
    }

    /// Adds the tokens of a finished request to the current second.
    pub fn add_tokens(&self, now: Instant, tokens: u64) {
        let mut slots = self.lock();
        let (second, _) = slots.second(now);
        let slot = slots.slot(second);
        slot.tokens = slot.tokens.saturating_add(tokens);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn requests_and_tokens_per_minute() {
        let window = MinuteWindow::default();
        let t0 = Instant::now();
        assert!(window.admit(t0, Some(2), Some(100)).is_ok());
        assert!(window.admit(t0, Some(2), Some(100)).is_ok());
        let later = t0 + Duration::from_secs(20);
        // Second 0's requests count until second 61.
        assert_eq!(
            window.admit(later, Some(2), Some(100)),
            Err(Exceeded::Requests(Duration::from_secs(41)))
        );
        window.add_tokens(later, 150);
        assert_eq!(
            window.check(later, None, Some(100)),
            Err(Exceeded::Tokens(Duration::from_secs(61)))
        );
        let next = t0 + Duration::from_secs(61);
        assert!(window.admit(next, Some(2), None).is_ok());
        assert!(
            window.check(next, None, Some(100)).is_err(),
            "second 20's tokens still count"
        );
        assert!(
            window
                .check(t0 + Duration::from_secs(81), None, Some(100))
                .is_ok()
        );
    }

    #[test]
    fn no_burst_across_a_minute_boundary() {
        // A fixed window admitted 2 × rpm between 59.9 s and 60.1 s.
        let window = MinuteWindow::default();
        let t0 = Instant::now();
        window.add_tokens(t0, 0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let admitted = (0..10)
            .map(|_| at(59_900))
            .chain((0..10).map(|_| at(60_100)))
            .filter(|&now| window.admit(now, Some(10), None).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    proptest! {
        /// Any arrival times: no 60 s span holds more admitted requests
        /// than the limit, and a refusal's Retry-After is at most 61 s.
        #[test]
        fn every_minute_holds_at_most_the_limit(
            mut gaps_ms in proptest::collection::vec(0u64..5_000, 1..400),
            rpm in 1u64..20,
        ) {
            let window = MinuteWindow::default();
            let t0 = Instant::now();
            let mut now = 0;
            let mut admitted = Vec::new();
            for gap in gaps_ms.drain(..) {
                now += gap;
                match window.admit(t0 + Duration::from_millis(now), Some(rpm), None) {
                    Ok(()) => admitted.push(now),
                    Err(exceeded) => prop_assert!(exceeded.retry_after() <= Duration::from_secs(61)),
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                let within = admitted[i..].iter().take_while(|&&t| t < start + 60_000).count();
                prop_assert!(within as u64 <= rpm, "{within} requests within 60 s of {start} ms");
            }
        }
    }
}
