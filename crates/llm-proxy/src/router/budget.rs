//! A budget per period: a deployment's own (LiteLLM's
//! `litellm_params.max_budget` per `budget_duration`), and a key's for one
//! model (LiteLLM's `model_max_budget`). As with a key's whole budget, the
//! most an attempt can cost is reserved before it is sent and what it cost
//! is charged when it ends, so concurrent requests, retries and fallbacks
//! cannot spend past it; once a deployment's is spent the router skips the
//! deployment until its period ends. Kept in memory: a restarted proxy
//! starts a new period (as LiteLLM does without Redis).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::litellm_config::BudgetLimit;

#[derive(Debug)]
pub struct PeriodBudget {
    limit: BudgetLimit,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    spent: f64,
    reserved: f64,
}

/// Why an attempt was not let through.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetRefusal {
    /// Spent; the period ends in this long (None: no period, spent for good).
    Spent { ends_in: Option<Duration> },
    /// What the attempt may cost does not fit in what is left.
    TooSmall { worst: f64, left: f64 },
}

impl BudgetRefusal {
    /// Why a budget of `max_usd` refused, for the client, and when it can
    /// take a request again, when that is known.
    pub fn explain(self, max_usd: f64) -> (String, Option<Duration>) {
        match self {
            Self::Spent { ends_in } => (format!("${max_usd:.6} is spent for this period"), ends_in),
            Self::TooSmall { worst, left } => (
                format!(
                    "has ${left:.6} left, and this request may cost up to ${worst:.6}; ask for fewer max_tokens"
                ),
                None,
            ),
        }
    }
}

impl PeriodBudget {
    pub fn new(limit: BudgetLimit, now: Instant) -> Self {
        Self {
            limit,
            window: Mutex::new(Window {
                started: now,
                spent: 0.0,
                reserved: 0.0,
            }),
        }
    }

    fn window(&self, now: Instant) -> std::sync::MutexGuard<'_, Window> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(period) = self.limit.period {
            let elapsed = now.saturating_duration_since(window.started);
            if elapsed >= period {
                // Periods follow each other from the first: a new one
                // starts at a multiple of the period, not at this request.
                let periods = (elapsed.as_secs_f64() / period.as_secs_f64()).floor();
                window.started += period.mul_f64(periods);
                window.spent = 0.0;
            }
        }
        window
    }

    /// How long until it can take a request again; None when it can.
    pub fn spent_for(&self, now: Instant) -> Option<Duration> {
        let window = self.window(now);
        (window.spent + window.reserved >= self.limit.max_usd).then(|| {
            self.limit.period.map_or(Duration::MAX, |period| {
                (window.started + period).saturating_duration_since(now)
            })
        })
    }

    /// Reserves the most an attempt can cost (`worst`; None: unbounded,
    /// then all that is left, so such attempts run one at a time); the USD
    /// reserved, to give to [`PeriodBudget::settle`].
    pub fn reserve(&self, worst: Option<f64>, now: Instant) -> Result<f64, BudgetRefusal> {
        let mut window = self.window(now);
        let left = self.limit.max_usd - window.spent - window.reserved;
        if left <= 0.0 {
            return Err(BudgetRefusal::Spent {
                ends_in: self
                    .limit
                    .period
                    .map(|period| (window.started + period).saturating_duration_since(now)),
            });
        }
        let take = match worst {
            Some(worst) if worst > left => return Err(BudgetRefusal::TooSmall { worst, left }),
            Some(worst) => worst,
            None => left,
        };
        window.reserved += take;
        Ok(take)
    }

    /// Ends an attempt: its reservation given back, `cost` spent (0 for an
    /// attempt that failed before the upstream charged anything).
    pub fn settle(&self, reserved: f64, cost: f64, now: Instant) {
        let mut window = self.window(now);
        window.reserved = (window.reserved - reserved).max(0.0);
        window.spent += cost;
    }

    pub fn max_usd(&self) -> f64 {
        self.limit.max_usd
    }

    /// USD spent in the current period.
    #[cfg(test)]
    pub(crate) fn spent(&self, now: Instant) -> f64 {
        self.window(now).spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_usd: f64, period: Option<Duration>) -> (PeriodBudget, Instant) {
        let now = Instant::now();
        (PeriodBudget::new(BudgetLimit { max_usd, period }, now), now)
    }

    #[test]
    fn reservations_cannot_overspend_and_the_spent_budget_is_skipped() {
        let (budget, now) = budget(1.0, None);
        let first = budget.reserve(Some(0.6), now).unwrap();
        // The second fits only what the first has not reserved.
        assert_eq!(
            budget.reserve(Some(0.6), now),
            Err(BudgetRefusal::TooSmall {
                worst: 0.6,
                left: 0.4
            })
        );
        budget.settle(first, 0.7, now);
        assert_eq!(budget.spent_for(now), None);
        let second = budget.reserve(None, now).unwrap();
        assert!((second - 0.3).abs() < 1e-12, "{second}");
        budget.settle(second, 0.35, now);
        assert_eq!(budget.spent_for(now), Some(Duration::MAX));
        assert_eq!(
            budget.reserve(Some(0.01), now),
            Err(BudgetRefusal::Spent { ends_in: None })
        );
    }

    #[test]
    fn a_new_period_starts_from_nothing_at_a_multiple_of_the_period() {
        let period = Duration::from_secs(60);
        let (budget, start) = budget(1.0, Some(period));
        let reserved = budget.reserve(Some(1.0), start).unwrap();
        budget.settle(reserved, 1.0, start);
        let later = start + Duration::from_secs(45);
        assert_eq!(budget.spent_for(later), Some(Duration::from_secs(15)));
        let next = start + Duration::from_secs(150);
        assert_eq!(budget.spent_for(next), None);
        assert_eq!(budget.spent(next), 0.0);
        assert_eq!(
            budget.reserve(Some(2.0), next),
            Err(BudgetRefusal::TooSmall {
                worst: 2.0,
                left: 1.0
            })
        );
    }

    #[test]
    fn a_failed_attempt_gives_its_reservation_back() {
        let (budget, now) = budget(0.5, None);
        let reserved = budget.reserve(None, now).unwrap();
        assert!(budget.spent_for(now).is_some(), "all of it reserved");
        budget.settle(reserved, 0.0, now);
        assert_eq!(budget.spent_for(now), None);
    }
}
