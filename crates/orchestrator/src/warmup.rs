//! Warmup until stable (`warmup.cv_below`): whether a (config, backend) has
//! warmed up enough, judged only from its recorded warmup runs so that a
//! restarted orchestrator reaches the same verdict as the one that stopped.

use berth_proto::orchestrator::v1::{Run, RunState, WarmupEnded};

use crate::manifest::StableWarmup;
use crate::results::run_metric;
use crate::stats::coefficient_of_variation;

/// Why the warmup of a (config, backend) is over.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmupEnd {
    /// The coefficient of variation of the last values fell under the threshold.
    Converged { cv: f64, runs: u32 },
    /// `max_runs` warmup runs ended first; `cv` is the last one computed, if any.
    CapReached { cv: Option<f64>, runs: u32 },
}

/// The verdict on the warmup of one (config, backend) from its warmup runs
/// in schedule order; `None` while it must go on.
pub fn verdict(policy: &StableWarmup, warmup_runs: &[Run]) -> Option<WarmupEnd> {
    let state = |run: &Run| RunState::try_from(run.state).unwrap_or_default();
    let ended = warmup_runs
        .iter()
        .filter(|r| matches!(state(r), RunState::Succeeded | RunState::Failed))
        .count() as u32;
    let values: Vec<f64> = warmup_runs
        .iter()
        .filter(|r| state(r) == RunState::Succeeded)
        .filter_map(|r| run_metric(r, &policy.metric))
        .collect();
    let window = policy.window as usize;
    let cv = values
        .len()
        .checked_sub(window)
        .and_then(|start| coefficient_of_variation(&values[start..]));
    match cv {
        Some(cv) if cv < policy.cv_below => Some(WarmupEnd::Converged { cv, runs: ended }),
        _ if ended >= policy.max_runs => Some(WarmupEnd::CapReached { cv, runs: ended }),
        _ => None,
    }
}

impl WarmupEnd {
    pub fn to_proto(&self, config: &str, backend: &str) -> WarmupEnded {
        let (converged, cv, runs) = match *self {
            Self::Converged { cv, runs } => (true, Some(cv), runs),
            Self::CapReached { cv, runs } => (false, cv, runs),
        };
        WarmupEnded {
            config: config.to_string(),
            backend: backend.to_string(),
            runs,
            converged,
            cv,
        }
    }

    /// What a person reads in the campaign's events.
    pub fn describe(&self, policy: &StableWarmup, config: &str, backend: &str) -> String {
        let metric = &policy.metric;
        let window = policy.window;
        match *self {
            Self::Converged { cv, runs } => format!(
                "warmup of {config} on {backend} converged after {runs} runs: CV of the last {window} {metric} values is {cv:.4} < {}",
                policy.cv_below
            ),
            Self::CapReached { cv: Some(cv), runs } => format!(
                "warmup of {config} on {backend} reached its cap of {runs} runs: CV of the last {window} {metric} values is still {cv:.4} (threshold {})",
                policy.cv_below
            ),
            Self::CapReached { cv: None, runs } => format!(
                "warmup of {config} on {backend} reached its cap of {runs} runs without {window} values of {metric} to compare"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> StableWarmup {
        StableWarmup {
            cv_below: 0.05,
            window: 3,
            metric: "v".into(),
            max_runs: 5,
        }
    }

    fn run(state: RunState, value: Option<f64>) -> Run {
        Run {
            warmup: true,
            state: state as i32,
            result_json: value.map(|v| format!("{{\"v\": {v}}}")).unwrap_or_default(),
            ..Default::default()
        }
    }

    fn succeeded(values: &[f64]) -> Vec<Run> {
        values
            .iter()
            .map(|v| run(RunState::Succeeded, Some(*v)))
            .collect()
    }

    #[test]
    fn goes_on_until_the_window_is_full_and_stable() {
        assert_eq!(verdict(&policy(), &[]), None);
        assert_eq!(verdict(&policy(), &succeeded(&[100.0, 100.0])), None);
        // The first value is far off; the last three agree.
        let runs = succeeded(&[10.0, 100.0, 101.0, 99.0]);
        match verdict(&policy(), &runs) {
            Some(WarmupEnd::Converged { cv, runs: 4 }) => assert!((cv - 0.01).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        assert_eq!(verdict(&policy(), &succeeded(&[10.0, 100.0, 101.0])), None);
    }

    #[test]
    fn pending_runs_do_not_count_and_the_cap_ends_it() {
        let mut runs = succeeded(&[1.0, 2.0, 3.0, 4.0]);
        runs.push(run(RunState::Pending, None));
        assert_eq!(verdict(&policy(), &runs), None);
        runs[4] = run(RunState::Succeeded, Some(5.0));
        match verdict(&policy(), &runs) {
            Some(WarmupEnd::CapReached {
                cv: Some(cv),
                runs: 5,
            }) => {
                assert!((cv - 0.25).abs() < 1e-9, "{cv}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_runs_and_missing_values_count_towards_the_cap_only() {
        let runs = vec![
            run(RunState::Failed, None),
            run(RunState::Succeeded, None),
            run(RunState::Succeeded, Some(3.0)),
            run(RunState::Failed, None),
            run(RunState::Succeeded, Some(3.0)),
        ];
        let end = verdict(&policy(), &runs).unwrap();
        assert_eq!(end, WarmupEnd::CapReached { cv: None, runs: 5 });
        assert!(
            end.describe(&policy(), "c", "b")
                .contains("without 3 values of v")
        );
    }

    #[test]
    fn duration_is_the_default_metric() {
        let policy = StableWarmup {
            metric: crate::results::DURATION_METRIC.into(),
            ..policy()
        };
        let runs: Vec<Run> = (0..3)
            .map(|_| Run {
                state: RunState::Succeeded as i32,
                duration: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect();
        assert_eq!(
            verdict(&policy, &runs),
            Some(WarmupEnd::Converged { cv: 0.0, runs: 3 })
        );
    }
}
