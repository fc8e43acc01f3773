//! Each run's metrics as the report and `berth compare` see them, from what
//! ListRuns returns (never the orchestrator's internals): the numeric fields
//! of its result JSON, its wall time, its energy and joules per unit of work
//! (gross, and net of the idle baseline where one was measured) as the
//! orchestrator derived them, and its throughput (units of work per
//! second). Values are gathered per (configuration, backend) over the
//! measured runs: succeeded, not warmup.

use std::collections::BTreeMap;

use berth_proto::orchestrator::v1::{Run, RunState};

pub const DURATION: &str = "duration_s";
pub const ENERGY: &str = "energy_j";
pub const ENERGY_NET: &str = "energy_net_j";
/// The cluster's own count of a run's energy (SLURM's ConsumedEnergy), and
/// berth's energy minus it.
pub const CLUSTER_ENERGY: &str = "cluster_energy_j";
pub const ENERGY_VS_CLUSTER: &str = "energy_vs_cluster_j";

pub fn seconds(duration: &prost_types::Duration) -> f64 {
    duration.seconds as f64 + f64::from(duration.nanos) / 1e9
}

pub fn duration_seconds(run: &Run) -> Option<f64> {
    run.duration.as_ref().map(seconds)
}

/// The metric naming joules per unit of the campaign's work metric.
pub fn joules_per_unit(work_metric: &str) -> String {
    format!("joules_per_{work_metric}")
}

/// The metric naming net joules (above the idle baseline) per unit of work.
pub fn net_joules_per_unit(work_metric: &str) -> String {
    format!("net_joules_per_{work_metric}")
}

/// The metric naming units of the campaign's work metric per second.
pub fn throughput(work_metric: &str) -> String {
    format!("{work_metric}_per_s")
}

/// The run's metrics by name; fields of its result that are not numbers
/// (strings, lists, objects) are no metric and are left out.
pub fn run_metrics(run: &Run, work_metric: &str) -> Vec<(String, f64)> {
    let mut metrics: Vec<(String, f64)> = Vec::new();
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&run.result_json) {
        metrics.extend(
            fields
                .iter()
                .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
                .filter(|(_, value)| value.is_finite()),
        );
    }
    let duration = duration_seconds(run);
    let work = metrics
        .iter()
        .find(|(name, _)| name == work_metric)
        .map(|(_, v)| *v);
    let rate = throughput(work_metric);
    if let (Some(work), Some(duration)) = (work, duration)
        && duration > 0.0
        && !metrics.iter().any(|(name, _)| *name == rate)
    {
        metrics.push((rate, work / duration));
    }
    metrics.extend(duration.map(|d| (DURATION.to_string(), d)));
    metrics.extend(run.energy_j.map(|e| (ENERGY.to_string(), e)));
    metrics.extend(run.energy_net_j.map(|e| (ENERGY_NET.to_string(), e)));
    metrics.extend(
        run.joules_per_unit
            .map(|j| (joules_per_unit(work_metric), j)),
    );
    metrics.extend(
        run.joules_per_unit_net
            .map(|j| (net_joules_per_unit(work_metric), j)),
    );
    metrics.extend(
        run.cluster_accounting
            .as_ref()
            .and_then(|cluster| cluster.consumed_energy_j)
            .map(|e| (CLUSTER_ENERGY.to_string(), e)),
    );
    metrics.extend(
        run.energy_vs_cluster_j
            .map(|e| (ENERGY_VS_CLUSTER.to_string(), e)),
    );
    metrics
}

/// A run that counts in the results: succeeded and not a warmup.
pub fn is_measured(run: &Run) -> bool {
    run.state == RunState::Succeeded as i32 && !run.warmup
}

/// The measured values of one (configuration, backend).
#[derive(Debug, Default)]
pub struct Group {
    pub config: String,
    pub backend: String,
    pub values: BTreeMap<String, Vec<f64>>,
}

/// Every (configuration, backend) of a campaign's runs, in the order their
/// first run was scheduled, with the metric names in the order first seen.
#[derive(Debug, Default)]
pub struct Groups {
    pub groups: Vec<Group>,
    pub metrics: Vec<String>,
}

impl Groups {
    /// Groups every run's (config, backend), measured or not, so that a pair
    /// whose runs all failed still shows (with no values).
    pub fn of(runs: &[Run], work_metric: &str) -> Self {
        let mut index: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        let mut groups = Groups::default();
        let mut ordered: Vec<&Run> = runs.iter().collect();
        ordered.sort_by_key(|run| run.sequence);
        for run in ordered {
            let slot = *index
                .entry((run.config.as_str(), run.backend.as_str()))
                .or_insert_with(|| {
                    groups.groups.push(Group {
                        config: run.config.clone(),
                        backend: run.backend.clone(),
                        values: BTreeMap::new(),
                    });
                    groups.groups.len() - 1
                });
            if !is_measured(run) {
                continue;
            }
            for (name, value) in run_metrics(run, work_metric) {
                if !groups.metrics.contains(&name) {
                    groups.metrics.push(name.clone());
                }
                groups.groups[slot]
                    .values
                    .entry(name)
                    .or_default()
                    .push(value);
            }
        }
        groups
    }

    /// Whether the runs used more than one backend (labels then name it).
    pub fn several_backends(&self) -> bool {
        self.groups
            .iter()
            .any(|g| g.backend != self.groups[0].backend)
    }

    /// A group's name for people: its configuration, and its backend when
    /// there are several.
    pub fn label(&self, group: &Group) -> String {
        if self.several_backends() {
            format!("{} · {}", group.config, group.backend)
        } else {
            group.config.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: &str, sequence: u32, result: &str, state: RunState) -> Run {
        Run {
            config: config.into(),
            backend: "b".into(),
            sequence,
            result_json: result.into(),
            state: state as i32,
            duration: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            energy_j: Some(50.0),
            joules_per_unit: Some(0.5),
            energy_net_j: Some(30.0),
            joules_per_unit_net: Some(0.3),
            ..Default::default()
        }
    }

    #[test]
    fn numeric_fields_become_metrics_and_others_do_not() {
        let metrics = run_metrics(
            &run(
                "c",
                0,
                r#"{"tokens": 100, "model": "x", "list": [1], "ok": true}"#,
                RunState::Succeeded,
            ),
            "tokens",
        );
        let names: Vec<&str> = metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "tokens",
                "tokens_per_s",
                "duration_s",
                "energy_j",
                "energy_net_j",
                "joules_per_tokens",
                "net_joules_per_tokens"
            ]
        );
        assert_eq!(metrics[1].1, 50.0);
        assert!(
            run_metrics(&run("c", 0, "not json", RunState::Succeeded), "tokens")
                .iter()
                .all(|(n, _)| n != "tokens")
        );
    }

    #[test]
    fn groups_keep_schedule_order_and_only_measured_values() {
        let mut warmup = run("a", 0, r#"{"x": 9}"#, RunState::Succeeded);
        warmup.warmup = true;
        let runs = vec![
            run("b", 2, r#"{"x": 2}"#, RunState::Succeeded),
            warmup,
            run("a", 1, r#"{"x": 1}"#, RunState::Succeeded),
            run("c", 3, r#"{"x": 3}"#, RunState::Failed),
        ];
        let groups = Groups::of(&runs, "tokens");
        let names: Vec<&str> = groups.groups.iter().map(|g| g.config.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(groups.groups[0].values["x"], [1.0]);
        assert!(groups.groups[2].values.is_empty());
        assert!(!groups.several_backends());
    }
}
