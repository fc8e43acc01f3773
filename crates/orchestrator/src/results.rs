//! Aggregation of a campaign's runs per (config, backend): every numeric
//! top-level field of the result JSON, plus the run's duration, summarised
//! over the measured (non-warmup) succeeded runs. And the verdict on an
//! ended campaign: what its measured runs produced.
//!
//! What results need from a campaign's plan ([`ResultsLayout`] and the work
//! metric) is stored with the campaign at submit, so that results never
//! parse the manifest again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use berth_proto::orchestrator::v1::{CampaignOutcome, ConfigResult, Run, RunCounts, RunState};

use serde::{Deserialize, Serialize};

use crate::manifest::CyclesUntil;
use crate::stats;
use crate::store::MeasuredRuns;

/// Name of the metric every run has: its wall time in seconds.
pub const DURATION_METRIC: &str = "duration_s";
/// Energy of a run over all measured devices, in joules.
pub const ENERGY_METRIC: &str = "energy_j";
/// Energy of a run above the idle baseline, over all measured devices.
pub const ENERGY_NET_METRIC: &str = "energy_net_j";
/// Mean power of a run over all measured devices, in watts.
pub const POWER_METRIC: &str = "mean_power_w";
/// Energy the cluster's own accounting counted for a run (SLURM's
/// ConsumedEnergy), and berth's energy minus it.
pub const CLUSTER_ENERGY_METRIC: &str = "cluster_energy_j";
pub const ENERGY_VS_CLUSTER_METRIC: &str = "energy_vs_cluster_j";

/// Name of the energy-per-unit-of-work metric, e.g. `joules_per_tokens`.
pub fn joules_per_unit_metric(work_metric: &str) -> String {
    format!("joules_per_{work_metric}")
}

/// Name of the net energy-per-unit-of-work metric, e.g. `net_joules_per_tokens`.
pub fn net_joules_per_unit_metric(work_metric: &str) -> String {
    format!("net_joules_per_{work_metric}")
}

/// The run's wall time in seconds, once it has one.
pub fn duration_seconds(run: &Run) -> Option<f64> {
    run.duration
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// Energy of the run over all measured devices, when power was measured
/// and every device gave readings: a device without them makes the run's
/// energy unknown, not smaller.
pub fn energy_joules(run: &Run) -> Option<f64> {
    if run.energy.is_empty() {
        return None;
    }
    run.energy.iter().map(|e| e.energy_j).sum()
}

/// Energy of the run above its idle baseline over all measured devices,
/// when every device has a net figure (a baseline was measured and the
/// device gave readings); otherwise unknown, never a smaller sum.
pub fn energy_net_joules(run: &Run) -> Option<f64> {
    if run.energy.is_empty() {
        return None;
    }
    run.energy.iter().map(|e| e.energy_net_j).sum()
}

/// Energy the cluster's own accounting counted for the run, where it has
/// a record with a figure.
pub fn cluster_energy_joules(run: &Run) -> Option<f64> {
    run.cluster_accounting.as_ref()?.consumed_energy_j
}

/// berth's energy of the run minus the cluster's, where both are known.
pub fn energy_vs_cluster_joules(run: &Run) -> Option<f64> {
    Some(energy_joules(run)? - cluster_energy_joules(run)?)
}

/// A numeric top-level field of the run's result JSON.
pub fn result_field(run: &Run, name: &str) -> Option<f64> {
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&run.result_json).ok()?;
    fields.get(name)?.as_f64()
}

/// `duration_s`, or a numeric field of the result JSON.
pub fn run_metric(run: &Run, name: &str) -> Option<f64> {
    if name == DURATION_METRIC {
        duration_seconds(run)
    } else {
        result_field(run, name)
    }
}

/// A metric of a run by name, energy included: `energy_j`, `energy_net_j`,
/// `joules_per_<work_metric>`, `net_joules_per_<work_metric>`, else as
/// [`run_metric`] reads it.
pub fn metric_value(run: &Run, name: &str, work_metric: &str) -> Option<f64> {
    if name == ENERGY_METRIC {
        energy_joules(run)
    } else if name == ENERGY_NET_METRIC {
        energy_net_joules(run)
    } else if name == CLUSTER_ENERGY_METRIC {
        cluster_energy_joules(run)
    } else if name == ENERGY_VS_CLUSTER_METRIC {
        energy_vs_cluster_joules(run)
    } else if name == joules_per_unit_metric(work_metric) {
        joules_per_unit(run, work_metric)
    } else if name == net_joules_per_unit_metric(work_metric) {
        net_joules_per_unit(run, work_metric)
    } else {
        run_metric(run, name)
    }
}

/// Joules per unit of work: the run's energy over the count of work its
/// result reports in `work_metric` (e.g. tokens); `None` without energy or
/// without a positive count.
pub fn joules_per_unit(run: &Run, work_metric: &str) -> Option<f64> {
    Some(energy_joules(run)? / work_done(run, work_metric)?)
}

/// Net joules per unit of work: as [`joules_per_unit`], over the energy
/// above the idle baseline.
pub fn net_joules_per_unit(run: &Run, work_metric: &str) -> Option<f64> {
    Some(energy_net_joules(run)? / work_done(run, work_metric)?)
}

/// The positive count of work the run's result reports in `work_metric`.
fn work_done(run: &Run, work_metric: &str) -> Option<f64> {
    result_field(run, work_metric).filter(|w| *w > 0.0 && w.is_finite())
}

/// Sets the run's derived figures that travel with it (`energy_j`,
/// `joules_per_unit`) from its energy and result; `work_metric` is its
/// campaign's.
pub fn with_derived(mut run: Run, work_metric: &str) -> Run {
    run.energy_j = energy_joules(&run);
    run.joules_per_unit = joules_per_unit(&run, work_metric);
    run.energy_net_j = energy_net_joules(&run);
    run.joules_per_unit_net = net_joules_per_unit(&run, work_metric);
    run.energy_vs_cluster_j = energy_vs_cluster_joules(&run);
    run
}

/// What the results of a campaign need from its plan, stored with the
/// campaign (as JSON) when it is submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultsLayout {
    /// Whether the campaign measures power (`power.enabled`).
    pub measures_power: bool,
    /// Configurations in manifest order, each with its parameter values.
    pub configs: Vec<LayoutConfig>,
    /// Backend names in manifest order.
    pub backends: Vec<String>,
    /// `cycles: {min, max, until}`, when the manifest asks for it.
    #[serde(default)]
    pub cycles_until: Option<CyclesUntil>,
}

/// A configuration of a [`ResultsLayout`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayoutConfig {
    pub name: String,
    pub params: Vec<(String, String)>,
}

impl ResultsLayout {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

/// A row per (config, backend) of the layout, in its order; `work_metric`
/// names the `joules_per_<work_metric>` metric.
pub fn aggregate(layout: &ResultsLayout, work_metric: &str, runs: &[Run]) -> Vec<ConfigResult> {
    let per_unit_metric = joules_per_unit_metric(work_metric);
    let net_per_unit_metric = net_joules_per_unit_metric(work_metric);
    let measures_power = layout.measures_power;
    let mut rows = Vec::new();
    for config in &layout.configs {
        for backend in &layout.backends {
            let pair = runs
                .iter()
                .filter(|r| r.config == config.name && r.backend == *backend && !r.warmup);
            let runs = pair.clone();
            let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            // Result fields keep the order in which they first appear.
            let mut metric_order: Vec<String> = Vec::new();
            let (mut succeeded, mut failed, mut runs_without_energy) = (0, 0, 0);
            let mut quality_flags: HashMap<String, u64> = HashMap::new();
            for run in runs {
                match RunState::try_from(run.state).unwrap_or_default() {
                    RunState::Succeeded => succeeded += 1,
                    RunState::Failed => {
                        failed += 1;
                        continue;
                    }
                    _ => continue,
                }
                let flags: BTreeSet<&String> =
                    run.energy.iter().flat_map(|e| &e.quality_flags).collect();
                for flag in flags {
                    *quality_flags.entry(flag.clone()).or_default() += 1;
                }
                if let Some(duration) = duration_seconds(run) {
                    samples
                        .entry(DURATION_METRIC.into())
                        .or_default()
                        .push(duration);
                }
                match energy_joules(run) {
                    Some(energy) => {
                        let power: f64 = run.energy.iter().map(|e| e.mean_w).sum();
                        samples
                            .entry(ENERGY_METRIC.into())
                            .or_default()
                            .push(energy);
                        samples.entry(POWER_METRIC.into()).or_default().push(power);
                    }
                    None if measures_power => runs_without_energy += 1,
                    None => {}
                }
                let net = [
                    (ENERGY_NET_METRIC, energy_net_joules(run)),
                    (per_unit_metric.as_str(), joules_per_unit(run, work_metric)),
                    (
                        net_per_unit_metric.as_str(),
                        net_joules_per_unit(run, work_metric),
                    ),
                    (CLUSTER_ENERGY_METRIC, cluster_energy_joules(run)),
                    (ENERGY_VS_CLUSTER_METRIC, energy_vs_cluster_joules(run)),
                ];
                for (name, value) in net {
                    if let Some(value) = value {
                        samples.entry(name.to_string()).or_default().push(value);
                    }
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
            metric_order.extend([
                ENERGY_METRIC.to_string(),
                ENERGY_NET_METRIC.to_string(),
                per_unit_metric.clone(),
                net_per_unit_metric.clone(),
                POWER_METRIC.to_string(),
                CLUSTER_ENERGY_METRIC.to_string(),
                ENERGY_VS_CLUSTER_METRIC.to_string(),
                DURATION_METRIC.to_string(),
            ]);
            let metrics = metric_order
                .iter()
                .filter_map(|name| {
                    samples
                        .get(name)
                        .map(|values| stats::summarize(name, values))
                })
                .collect();
            let cycles_ended = layout.cycles_until.as_ref().and_then(|rule| {
                crate::cycles::verdict(rule, pair.clone(), work_metric)
                    .map(|end| end.to_proto(rule, &config.name, backend))
            });
            rows.push(ConfigResult {
                config: config.name.clone(),
                params: config.params.iter().cloned().collect(),
                backend: backend.clone(),
                succeeded,
                failed,
                metrics,
                runs_without_energy,
                cycles_ended,
                quality_flags,
            });
        }
    }
    rows
}

/// Pairs named in a status message before the rest are only counted.
const PAIRS_NAMED: usize = 5;

/// What an ended campaign's measured runs produced, and the status message
/// that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: CampaignOutcome,
    pub message: String,
}

/// Judges an ended campaign from its measured runs per (config, backend),
/// its run counts and its first failed run (whose error the message quotes
/// when nothing succeeded).
pub fn judge(pairs: &[MeasuredRuns], counts: &RunCounts, first_failure: Option<&Run>) -> Verdict {
    let measured: u64 = pairs.iter().map(|p| p.runs).sum();
    let succeeded: u64 = pairs.iter().map(|p| p.succeeded).sum();
    let without: Vec<&MeasuredRuns> = pairs.iter().filter(|p| p.succeeded == 0).collect();
    let failed = format!("{} of {} runs failed", counts.failed, counts.total);
    let (outcome, mut message) = if succeeded == 0 {
        (
            CampaignOutcome::NoResults,
            format!("no measured run succeeded; {failed}"),
        )
    } else if !without.is_empty() {
        let mut named: Vec<String> = without
            .iter()
            .take(PAIRS_NAMED)
            .map(|p| format!("`{}` on `{}`", p.config, p.backend))
            .collect();
        if without.len() > PAIRS_NAMED {
            named.push(format!("{} more", without.len() - PAIRS_NAMED));
        }
        (
            CampaignOutcome::MissingResults,
            format!(
                "{} of {} configurations have no succeeded measured run ({}); {failed}",
                without.len(),
                pairs.len(),
                named.join(", ")
            ),
        )
    } else if succeeded < measured {
        (CampaignOutcome::Partial, failed)
    } else if counts.failed > 0 {
        // Only warmup runs failed.
        (CampaignOutcome::Complete, failed)
    } else {
        (CampaignOutcome::Complete, String::new())
    };
    if let Some(run) = first_failure.filter(|_| outcome == CampaignOutcome::NoResults) {
        let _ = write!(message, "; first failure: run {}: {}", run.id, run.error);
    }
    Verdict { outcome, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One configuration `x` on one backend `b`.
    fn layout(measures_power: bool) -> ResultsLayout {
        ResultsLayout {
            measures_power,
            configs: vec![LayoutConfig {
                name: "x".into(),
                params: Vec::new(),
            }],
            backends: vec!["b".into()],
            cycles_until: None,
        }
    }

    #[test]
    fn a_layout_reads_back_from_its_json() {
        let layout = ResultsLayout {
            measures_power: true,
            configs: vec![LayoutConfig {
                name: "n=1".into(),
                params: vec![("n".into(), "1".into()), ("a".into(), "x".into())],
            }],
            backends: vec!["b".into(), "a".into()],
            cycles_until: Some(CyclesUntil {
                min: 3,
                max: 20,
                until: crate::manifest::KnownWhen {
                    metric: "energy_j".into(),
                    ci_below: crate::manifest::Fraction(0.02),
                },
            }),
        };
        assert_eq!(ResultsLayout::from_json(&layout.to_json()).unwrap(), layout);
        // A layout stored before `cycles_until` existed reads as without it.
        let older = r#"{"measures_power":false,"configs":[],"backends":["b"]}"#;
        assert_eq!(ResultsLayout::from_json(older).unwrap().cycles_until, None);
    }

    #[test]
    fn aggregates_numeric_fields_of_measured_runs() {
        let layout = layout(false);
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
        let rows = aggregate(&layout, "tokens", &runs);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].succeeded, rows[0].failed), (2, 1));
        let names: Vec<_> = rows[0].metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tps", "duration_s"]);
        assert_eq!(rows[0].metrics[0].mean, 15.0);
        assert_eq!(rows[0].metrics[0].n, 2);
        assert_eq!(rows[0].metrics[1].mean, 1.5);
    }

    #[test]
    fn joules_per_unit_of_work_is_aggregated() {
        let layout = layout(true);
        let run = |json: &str, joules: &[f64]| Run {
            config: "x".into(),
            backend: "b".into(),
            state: RunState::Succeeded as i32,
            result_json: json.into(),
            energy: joules
                .iter()
                .map(|j| berth_proto::orchestrator::v1::RunEnergy {
                    energy_j: Some(*j),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // Energy of every device counts: 30 J + 10 J over 100 items.
        let measured = run("{\"items\": 100, \"tokens\": 7}", &[30.0, 10.0]);
        assert_eq!(joules_per_unit(&measured, "items"), Some(0.4));
        assert_eq!(joules_per_unit(&measured, "missing"), None);
        assert_eq!(
            joules_per_unit(&run("{\"items\": 0}", &[5.0]), "items"),
            None
        );
        assert_eq!(joules_per_unit(&run("{\"items\": 10}", &[]), "items"), None);

        let derived = with_derived(measured.clone(), "items");
        assert_eq!(
            (derived.energy_j, derived.joules_per_unit),
            (Some(40.0), Some(0.4))
        );
        let rows = aggregate(
            &layout,
            "items",
            &[measured, run("{\"items\": 50}", &[40.0])],
        );
        let per_unit = rows[0]
            .metrics
            .iter()
            .find(|m| m.name == "joules_per_items")
            .expect("joules_per_items aggregated");
        assert_eq!(per_unit.n, 2);
        assert!((per_unit.mean - 0.6).abs() < 1e-12, "{per_unit:?}");
    }

    /// A succeeded run of config `x` on `b` whose result counts 10 tokens.
    fn measured_with(energy: Vec<berth_proto::orchestrator::v1::RunEnergy>) -> Run {
        Run {
            config: "x".into(),
            backend: "b".into(),
            state: RunState::Succeeded as i32,
            result_json: "{\"tokens\": 10}".into(),
            energy,
            ..Default::default()
        }
    }

    #[test]
    fn net_energy_is_aggregated_beside_gross_where_every_device_has_it() {
        use berth_proto::orchestrator::v1::RunEnergy;
        let layout = layout(true);
        let device = |gross: f64, net: Option<f64>| RunEnergy {
            energy_j: Some(gross),
            energy_net_j: net,
            ..Default::default()
        };
        // 30 J + 10 J gross, 20 J + 4 J above the baseline, over 10 tokens.
        let run = measured_with;
        let both = run(vec![device(30.0, Some(20.0)), device(10.0, Some(4.0))]);
        let derived = with_derived(both.clone(), "tokens");
        assert_eq!(
            (derived.energy_net_j, derived.joules_per_unit_net),
            (Some(24.0), Some(2.4))
        );
        // A device without a net figure leaves the run's net energy unknown.
        let partly = run(vec![device(30.0, Some(20.0)), device(10.0, None)]);
        assert_eq!(energy_net_joules(&partly), None);
        assert_eq!(
            metric_value(&both, "net_joules_per_tokens", "tokens"),
            Some(2.4)
        );
        let rows = aggregate(&layout, "tokens", &[both, partly]);
        let metric = |name: &str| rows[0].metrics.iter().find(|m| m.name == name).cloned();
        assert_eq!(metric("energy_j").unwrap().n, 2);
        let net = metric("energy_net_j").unwrap();
        assert_eq!((net.n, net.mean), (1, 24.0));
        assert_eq!(metric("net_joules_per_tokens").unwrap().mean, 2.4);
        // Quality: a run counts once per flag, whichever devices have it.
        let flagged = |flags: &[&str]| RunEnergy {
            energy_j: Some(1.0),
            quality_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        let quality = aggregate(
            &layout,
            "tokens",
            &[
                run(vec![
                    flagged(&["short_window"]),
                    flagged(&["short_window", "low_coverage"]),
                ]),
                run(vec![flagged(&[])]),
            ],
        );
        assert_eq!(
            quality[0].quality_flags,
            [
                ("short_window".to_string(), 1),
                ("low_coverage".to_string(), 1)
            ]
            .into()
        );
        // Without any baseline there is no net metric at all, not 0 J.
        let gross_only = aggregate(&layout, "tokens", &[run(vec![device(5.0, None)])]);
        assert!(
            gross_only[0]
                .metrics
                .iter()
                .all(|m| m.name != "energy_net_j")
        );
    }

    #[test]
    fn the_clusters_energy_and_the_difference_are_metrics_where_known() {
        use berth_proto::agent::v1::ExecAccounting;
        use berth_proto::orchestrator::v1::RunEnergy;
        let device = |joules: f64| RunEnergy {
            energy_j: Some(joules),
            ..Default::default()
        };
        let cluster = |joules: Option<f64>| ExecAccounting {
            accounting_id: "7.1".into(),
            consumed_energy_j: joules,
            note: String::new(),
        };
        let mut both = measured_with(vec![device(52.0)]);
        both.cluster_accounting = Some(cluster(Some(50.0)));
        let mut cluster_only = measured_with(Vec::new());
        cluster_only.cluster_accounting = Some(cluster(Some(40.0)));
        let mut no_figure = measured_with(vec![device(30.0)]);
        no_figure.cluster_accounting = Some(cluster(None));
        assert_eq!(
            with_derived(both.clone(), "tokens").energy_vs_cluster_j,
            Some(2.0)
        );
        assert_eq!(
            with_derived(cluster_only.clone(), "tokens").energy_vs_cluster_j,
            None
        );
        assert_eq!(metric_value(&no_figure, "cluster_energy_j", "tokens"), None);
        let rows = aggregate(&layout(true), "tokens", &[both, cluster_only, no_figure]);
        let metric = |name: &str| rows[0].metrics.iter().find(|m| m.name == name).cloned();
        let cluster = metric("cluster_energy_j").unwrap();
        assert_eq!((cluster.n, cluster.mean), (2, 45.0));
        let difference = metric("energy_vs_cluster_j").unwrap();
        assert_eq!((difference.n, difference.mean), (1, 2.0));
    }

    #[test]
    fn a_device_without_readings_leaves_the_run_without_energy_and_is_counted() {
        use berth_proto::orchestrator::v1::RunEnergy;
        let layout = layout(true);
        let device = |energy_j: Option<f64>, mean_w: f64| RunEnergy {
            energy_j,
            mean_w,
            ..Default::default()
        };
        let run = measured_with;
        // The second run's GPU gave no reading: its energy is unknown, not 30 J.
        let runs = [
            run(vec![device(Some(30.0), 30.0), device(Some(10.0), 10.0)]),
            run(vec![device(Some(30.0), 30.0), device(None, 0.0)]),
            run(vec![device(Some(50.0), 50.0), device(Some(10.0), 10.0)]),
        ];
        assert_eq!(energy_joules(&runs[1]), None);
        assert_eq!(joules_per_unit(&runs[1], "tokens"), None);
        let rows = aggregate(&layout, "tokens", &runs);
        assert_eq!((rows[0].succeeded, rows[0].runs_without_energy), (3, 1));
        let metric = |name: &str| rows[0].metrics.iter().find(|m| m.name == name).unwrap();
        assert_eq!(
            (metric(ENERGY_METRIC).n, metric(ENERGY_METRIC).mean),
            (2, 50.0)
        );
        assert_eq!(metric(POWER_METRIC).n, 2);
        assert_eq!(metric("joules_per_tokens").n, 2);
    }

    fn pair(config: &str, runs: u64, succeeded: u64) -> MeasuredRuns {
        MeasuredRuns {
            config: config.into(),
            backend: "b".into(),
            runs,
            succeeded,
        }
    }

    fn counts(failed: u64, total: u64) -> RunCounts {
        RunCounts {
            failed,
            total,
            succeeded: total - failed,
            ..Default::default()
        }
    }

    #[test]
    fn a_campaign_is_judged_by_its_measured_runs() {
        let failure = Run {
            id: "c/x/b/1".into(),
            error: "exit code 1: boom".into(),
            ..Default::default()
        };
        let verdict = judge(&[pair("x", 3, 3)], &counts(0, 3), None);
        assert_eq!(
            verdict,
            Verdict {
                outcome: CampaignOutcome::Complete,
                message: String::new()
            }
        );
        // A failed warmup run costs no result.
        let verdict = judge(&[pair("x", 3, 3)], &counts(1, 4), Some(&failure));
        assert_eq!(verdict.outcome, CampaignOutcome::Complete);
        assert_eq!(verdict.message, "1 of 4 runs failed");

        let verdict = judge(&[pair("x", 3, 2), pair("y", 3, 1)], &counts(3, 6), None);
        assert_eq!(verdict.outcome, CampaignOutcome::Partial);
        assert_eq!(verdict.message, "3 of 6 runs failed");

        let verdict = judge(&[pair("x", 3, 3), pair("y", 3, 0)], &counts(3, 6), None);
        assert_eq!(verdict.outcome, CampaignOutcome::MissingResults);
        assert_eq!(
            verdict.message,
            "1 of 2 configurations have no succeeded measured run (`y` on `b`); 3 of 6 runs failed"
        );
        let many: Vec<MeasuredRuns> = (0..8)
            .map(|i| pair(&format!("c{i}"), 1, u64::from(i == 0)))
            .collect();
        let verdict = judge(&many, &counts(7, 8), None);
        assert!(
            verdict.message.contains(
                "(`c1` on `b`, `c2` on `b`, `c3` on `b`, `c4` on `b`, `c5` on `b`, 2 more)"
            ),
            "{}",
            verdict.message
        );

        let verdict = judge(
            &[pair("x", 3, 0), pair("y", 3, 0)],
            &counts(6, 6),
            Some(&failure),
        );
        assert_eq!(verdict.outcome, CampaignOutcome::NoResults);
        assert_eq!(
            verdict.message,
            "no measured run succeeded; 6 of 6 runs failed; first failure: run c/x/b/1: exit code 1: boom"
        );
    }
}
