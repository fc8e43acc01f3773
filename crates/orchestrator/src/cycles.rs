//! Cycles until the answer is known (`cycles: {min, max, until}`): whether
//! a (config, backend) has been measured enough, judged only from its
//! recorded measured runs so that a restarted orchestrator, and the results
//! of an ended campaign, reach the same verdict as the scheduler did.

use berth_proto::orchestrator::v1::{CyclesEnded, Run, RunState};

use crate::manifest::CyclesUntil;
use crate::results::metric_value;
use crate::stats::summarize;

/// Why the measured cycles of a (config, backend) are over.
#[derive(Debug, Clone, PartialEq)]
pub enum CyclesEnd {
    /// The 95% CI half-width over |mean| fell under `ci_below` after at
    /// least `min` runs.
    Known { ci_relative: f64, runs: u32 },
    /// `max` runs ended first; `ci_relative` is the last one computed, if any.
    CapReached { ci_relative: Option<f64>, runs: u32 },
}

/// The verdict on the measured runs of one (config, backend), in any order;
/// `None` while its cycles must go on. `work_metric` is the campaign's.
pub fn verdict<'a>(
    rule: &CyclesUntil,
    measured: impl IntoIterator<Item = &'a Run>,
    work_metric: &str,
) -> Option<CyclesEnd> {
    let mut ended = 0u32;
    let mut values = Vec::new();
    for run in measured {
        match RunState::try_from(run.state).unwrap_or_default() {
            RunState::Succeeded => {
                ended += 1;
                values.extend(metric_value(run, &rule.until.metric, work_metric));
            }
            RunState::Failed => ended += 1,
            _ => {}
        }
    }
    let summary = summarize(&rule.until.metric, &values);
    let ci_relative = summary
        .ci95_half_width
        .filter(|_| summary.mean != 0.0)
        .map(|half_width| half_width / summary.mean.abs());
    match ci_relative {
        Some(ci_relative) if ended >= rule.min && ci_relative < rule.until.ci_below.0 => {
            Some(CyclesEnd::Known {
                ci_relative,
                runs: ended,
            })
        }
        _ if ended >= rule.max => Some(CyclesEnd::CapReached {
            ci_relative,
            runs: ended,
        }),
        _ => None,
    }
}

impl CyclesEnd {
    pub fn to_proto(&self, rule: &CyclesUntil, config: &str, backend: &str) -> CyclesEnded {
        let (known, ci_relative, runs) = match *self {
            Self::Known { ci_relative, runs } => (true, Some(ci_relative), runs),
            Self::CapReached { ci_relative, runs } => (false, ci_relative, runs),
        };
        CyclesEnded {
            config: config.to_string(),
            backend: backend.to_string(),
            runs,
            known,
            metric: rule.until.metric.clone(),
            ci_relative,
            ci_below: rule.until.ci_below.0,
        }
    }

    /// What a person reads in the campaign's events.
    pub fn describe(&self, rule: &CyclesUntil, config: &str, backend: &str) -> String {
        let metric = &rule.until.metric;
        let target = rule.until.ci_below.0 * 100.0;
        match *self {
            Self::Known { ci_relative, runs } => format!(
                "cycles of {config} on {backend} stopped after {runs} runs: the 95% CI of {metric} is ±{:.2}% < {target}%",
                ci_relative * 100.0
            ),
            Self::CapReached {
                ci_relative: Some(ci_relative),
                runs,
            } => format!(
                "cycles of {config} on {backend} reached cycles.max ({runs} runs): the 95% CI of {metric} is still ±{:.2}% (target {target}%)",
                ci_relative * 100.0
            ),
            Self::CapReached {
                ci_relative: None,
                runs,
            } => format!(
                "cycles of {config} on {backend} reached cycles.max ({runs} runs) without two values of {metric} to judge"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Fraction, KnownWhen};

    fn rule() -> CyclesUntil {
        CyclesUntil {
            min: 3,
            max: 6,
            until: KnownWhen {
                metric: "v".into(),
                ci_below: Fraction(0.02),
            },
        }
    }

    fn run(state: RunState, value: f64) -> Run {
        Run {
            state: state as i32,
            result_json: format!("{{\"v\": {value}}}"),
            ..Default::default()
        }
    }

    fn succeeded(values: &[f64]) -> Vec<Run> {
        values
            .iter()
            .map(|v| run(RunState::Succeeded, *v))
            .collect()
    }

    #[test]
    fn a_quiet_metric_stops_at_min_and_not_before() {
        assert_eq!(
            verdict(&rule(), &succeeded(&[100.0, 100.0]), "tokens"),
            None
        );
        match verdict(&rule(), &succeeded(&[100.0, 100.5, 99.5]), "tokens") {
            // sd 0.5, t(2) 4.303: half-width 1.242 over 100.
            Some(CyclesEnd::Known {
                ci_relative,
                runs: 3,
            }) => {
                assert!((ci_relative - 4.303 * 0.5 / 3f64.sqrt() / 100.0).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_noisy_metric_runs_to_max() {
        let noisy = [10.0, 200.0, 50.0, 120.0, 5.0];
        assert_eq!(verdict(&rule(), &succeeded(&noisy), "tokens"), None);
        let noisy = succeeded(&[10.0, 200.0, 50.0, 120.0, 5.0, 90.0]);
        match verdict(&rule(), &noisy, "tokens") {
            Some(CyclesEnd::CapReached {
                ci_relative: Some(ci),
                runs: 6,
            }) => assert!(ci > 0.02),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn energy_and_energy_per_unit_of_work_are_judged_as_measured() {
        let measured = |joules: f64, tokens: f64| Run {
            state: RunState::Succeeded as i32,
            result_json: format!("{{\"tokens\": {tokens}}}"),
            energy: vec![berth_proto::orchestrator::v1::RunEnergy {
                energy_j: Some(joules),
                ..Default::default()
            }],
            ..Default::default()
        };
        // The energy wanders by 10%, the energy per token not at all.
        let runs = [
            measured(100.0, 100.0),
            measured(110.0, 110.0),
            measured(90.0, 90.0),
        ];
        let mut rule = rule();
        rule.until.metric = "energy_j".into();
        assert_eq!(verdict(&rule, &runs, "tokens"), None);
        rule.until.metric = "joules_per_tokens".into();
        assert!(matches!(
            verdict(&rule, &runs, "tokens"),
            Some(CyclesEnd::Known { runs: 3, .. })
        ));
        // A run without energy gives no value: with two values left the
        // interval is still computed, over them.
        let mut without = runs.to_vec();
        without[0].energy.clear();
        assert!(matches!(
            verdict(&rule, &without, "tokens"),
            Some(CyclesEnd::Known { runs: 3, .. })
        ));
    }

    #[test]
    fn failed_runs_count_towards_the_cap_but_give_no_value() {
        let mut runs = succeeded(&[1.0]);
        runs.extend((0..5).map(|_| run(RunState::Failed, 0.0)));
        match verdict(&rule(), &runs, "tokens") {
            Some(CyclesEnd::CapReached {
                ci_relative: None,
                runs: 6,
            }) => {}
            other => panic!("{other:?}"),
        }
        let end = verdict(&rule(), &runs, "tokens").unwrap();
        assert!(
            end.describe(&rule(), "c", "b")
                .contains("without two values of v")
        );
        // Pending and running runs are not yet an answer.
        let pending: Vec<Run> = (0..6).map(|_| run(RunState::Pending, 1.0)).collect();
        assert_eq!(verdict(&rule(), &pending, "tokens"), None);
    }
}
