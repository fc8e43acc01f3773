//! Aggregation of a campaign's runs per (config, backend): every numeric
//! top-level field of the result JSON, plus the run's duration, summarised
//! over the measured (non-warmup) succeeded runs.

use std::collections::BTreeMap;

use berth_proto::orchestrator::v1::{ConfigResult, Run, RunState};

use crate::manifest::Plan;
use crate::stats;

/// Name of the metric every run has: its wall time in seconds.
pub const DURATION_METRIC: &str = "duration_s";
/// Energy of a run over all measured devices, in joules.
pub const ENERGY_METRIC: &str = "energy_j";
/// Mean power of a run over all measured devices, in watts.
pub const POWER_METRIC: &str = "mean_power_w";

pub fn aggregate(plan: &Plan, runs: &[Run]) -> Vec<ConfigResult> {
    let mut rows = Vec::new();
    for config in &plan.configs {
        for backend in &plan.manifest.backends {
            let runs = runs
                .iter()
                .filter(|r| r.config == config.name && r.backend == backend.name && !r.warmup);
            let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            // Result fields keep the order in which they first appear.
            let mut metric_order: Vec<String> = Vec::new();
            let (mut succeeded, mut failed) = (0, 0);
            for run in runs {
                match RunState::try_from(run.state).unwrap_or_default() {
                    RunState::Succeeded => succeeded += 1,
                    RunState::Failed => {
                        failed += 1;
                        continue;
                    }
                    _ => continue,
                }
                if let Some(duration) = run.duration {
                    samples
                        .entry(DURATION_METRIC.into())
                        .or_default()
                        .push(duration.seconds as f64 + f64::from(duration.nanos) / 1e9);
                }
                if !run.energy.is_empty() {
                    let energy: f64 = run.energy.iter().map(|e| e.energy_j).sum();
                    let power: f64 = run.energy.iter().map(|e| e.mean_w).sum();
                    samples
                        .entry(ENERGY_METRIC.into())
                        .or_default()
                        .push(energy);
                    samples.entry(POWER_METRIC.into()).or_default().push(power);
                }
                if let Ok(serde_json::Value::Object(fields)) =
                    serde_json::from_str(&run.result_json)
                {
                    for (key, value) in fields {
                        if let Some(number) = value.as_f64() {
                            if !samples.contains_key(&key) {
                                metric_order.push(key.clone());
                            }
                            samples.entry(key).or_default().push(number);
                        }
                    }
                }
            }
            metric_order.extend([ENERGY_METRIC, POWER_METRIC, DURATION_METRIC].map(String::from));
            let metrics = metric_order
                .iter()
                .filter_map(|name| {
                    samples
                        .get(name)
                        .map(|values| stats::summarize(name, values))
                })
                .collect();
            rows.push(ConfigResult {
                config: config.name.clone(),
                params: config.params.iter().cloned().collect(),
                backend: backend.name.clone(),
                succeeded,
                failed,
                metrics,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_numeric_fields_of_measured_runs() {
        let plan = crate::manifest::plan(
            "t",
            "name: t\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: x}]\nrun: {command: [true]}\ncycles: 3\n",
        )
        .unwrap();
        let run = |json: &str, state: RunState, warmup: bool| Run {
            config: "x".into(),
            backend: "b".into(),
            state: state as i32,
            warmup,
            result_json: json.into(),
            duration: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        let runs = [
            run(
                "{\"tps\": 10, \"label\": \"x\"}",
                RunState::Succeeded,
                false,
            ),
            run("{\"tps\": 20}", RunState::Succeeded, false),
            run("{\"tps\": 999}", RunState::Succeeded, true),
            run("", RunState::Failed, false),
        ];
        let rows = aggregate(&plan, &runs);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].succeeded, rows[0].failed), (2, 1));
        let names: Vec<_> = rows[0].metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tps", "duration_s"]);
        assert_eq!(rows[0].metrics[0].mean, 15.0);
        assert_eq!(rows[0].metrics[0].n, 2);
        assert_eq!(rows[0].metrics[1].mean, 1.5);
    }
}
