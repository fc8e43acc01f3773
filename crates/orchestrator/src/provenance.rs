//! Provenance per run (issue #22): what the host reports of the settings
//! that decide an energy figure when the run starts, and where a
//! campaign's runs differ in them.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_proto::agent::v1::{GpuProvenance, Provenance, WorkloadRef};
use berth_proto::orchestrator::v1::{Run, RunState};

use crate::hosts::AgentClient;

/// How long a run waits for its host to describe itself: the answer is
/// worth a line in the results, not a delayed run.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines of `provenance_differences` at most, and values named per line:
/// a campaign over many hosts says how many more there are.
const MAX_DIFFERENCE_LINES: usize = 32;
const MAX_VALUES_PER_LINE: usize = 6;

/// What `host` reports for the workload `workload_id` now. Never fails the
/// run: what could not be asked is said in `unknown`.
pub async fn describe(client: &mut AgentClient, host: &str, workload_id: &str) -> Provenance {
    let request = WorkloadRef {
        id: workload_id.to_string(),
    };
    let why =
        match tokio::time::timeout(DESCRIBE_TIMEOUT, client.describe_provenance(request)).await {
            Ok(Ok(provenance)) => return provenance.into_inner(),
            Ok(Err(status)) => format!(
                "host `{host}` did not describe it: {} ({:?})",
                status.message(),
                status.code()
            ),
            Err(_) => format!(
                "host `{host}` did not describe it within {} s",
                DESCRIBE_TIMEOUT.as_secs()
            ),
        };
    Provenance {
        unknown: vec![why],
        ..Default::default()
    }
}

/// Where the campaign's succeeded measured runs differ in what decides an
/// energy figure: the host's settings across all of them, the image within
/// each backend (backends run different images by design). Temperatures and
/// performance states change from run to run and are not compared.
pub fn differences(runs: &[Run]) -> Vec<String> {
    // setting → value → (hosts, runs)
    let mut seen: BTreeMap<String, BTreeMap<String, (Vec<String>, u64)>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let measured = runs
        .iter()
        .filter(|run| !run.warmup && run.state() == RunState::Succeeded);
    for run in measured {
        let Some(provenance) = &run.provenance else {
            continue;
        };
        for (setting, value) in settings(run, provenance) {
            let values = seen.entry(setting.clone()).or_insert_with(|| {
                order.push(setting.clone());
                BTreeMap::new()
            });
            let (hosts, count) = values.entry(value).or_default();
            if !hosts.contains(&run.host) {
                hosts.push(run.host.clone());
            }
            *count += 1;
        }
    }
    order
        .into_iter()
        .filter_map(|setting| {
            let values = &seen[&setting];
            (values.len() > 1).then(|| describe_difference(&setting, values))
        })
        .take(MAX_DIFFERENCE_LINES)
        .collect()
}

fn describe_difference(setting: &str, values: &BTreeMap<String, (Vec<String>, u64)>) -> String {
    let mut by_count: Vec<_> = values.iter().collect();
    by_count.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = by_count
        .iter()
        .take(MAX_VALUES_PER_LINE)
        .map(|(value, (hosts, runs))| {
            let value = if value.is_empty() { "(none)" } else { value };
            format!(
                "{value} on {} ({runs} run{})",
                hosts.join(", "),
                if *runs == 1 { "" } else { "s" }
            )
        })
        .collect();
    if by_count.len() > MAX_VALUES_PER_LINE {
        parts.push(format!(
            "and {} more values",
            by_count.len() - MAX_VALUES_PER_LINE
        ));
    }
    format!("{setting}: {}", parts.join(", "))
}

/// The compared settings of one run, as (name, value) in a stable order.
fn settings(run: &Run, provenance: &Provenance) -> Vec<(String, String)> {
    let mut settings = vec![
        (
            "berth_version".to_string(),
            provenance.berth_version.clone(),
        ),
        ("kernel".into(), provenance.kernel.clone()),
        ("cpu_model".into(), provenance.cpu_model.clone()),
        ("cpu_governor".into(), provenance.cpu_governor.clone()),
        (
            "cpu_scaling_driver".into(),
            provenance.cpu_scaling_driver.clone(),
        ),
        ("cpu_min_khz".into(), optional(provenance.cpu_min_khz)),
        ("cpu_max_khz".into(), optional(provenance.cpu_max_khz)),
        (
            "cpu_energy_preference".into(),
            provenance.cpu_energy_preference.clone(),
        ),
        (
            format!("backend `{}` image", run.backend),
            provenance.image.clone(),
        ),
        (
            format!("backend `{}` image_id", run.backend),
            provenance.image_id.clone(),
        ),
        ("gpus".into(), provenance.gpus.len().to_string()),
    ];
    for (position, gpu) in provenance.gpus.iter().enumerate() {
        settings.extend(
            gpu_settings(gpu)
                .into_iter()
                .map(|(name, value)| (format!("gpus[{position}].{name}"), value)),
        );
    }
    settings
}

fn gpu_settings(gpu: &GpuProvenance) -> Vec<(&'static str, String)> {
    vec![
        ("name", gpu.name.clone()),
        ("vbios_version", gpu.vbios_version.clone()),
        ("driver_version", gpu.driver_version.clone()),
        ("nvml_version", gpu.nvml_version.clone()),
        ("cuda_driver_version", gpu.cuda_driver_version.clone()),
        ("power_limit_w", optional(gpu.power_limit_w)),
        ("default_power_limit_w", optional(gpu.default_power_limit_w)),
        ("persistence_mode", optional(gpu.persistence_mode)),
        (
            "applications_graphics_clock_mhz",
            optional(gpu.applications_graphics_clock_mhz),
        ),
        (
            "applications_memory_clock_mhz",
            optional(gpu.applications_memory_clock_mhz),
        ),
        ("ecc_enabled", optional(gpu.ecc_enabled)),
    ]
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(host: &str, backend: &str, provenance: Provenance) -> Run {
        Run {
            host: host.into(),
            backend: backend.into(),
            state: RunState::Succeeded as i32,
            provenance: Some(provenance),
            ..Default::default()
        }
    }

    fn host(power_limit_w: f64, image: &str) -> Provenance {
        Provenance {
            berth_version: "0.1.0".into(),
            kernel: "6.1.0".into(),
            cpu_governor: "performance".into(),
            image: image.into(),
            gpus: vec![GpuProvenance {
                name: "NVIDIA H100".into(),
                power_limit_w: Some(power_limit_w),
                temperature_c: Some(40.0 + power_limit_w / 100.0),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_host_at_a_lower_power_limit_is_flagged() {
        let runs = vec![
            run("host-a", "b", host(700.0, "bench:1")),
            run("host-a", "b", host(700.0, "bench:1")),
            run("host-b", "b", host(500.0, "bench:1")),
        ];
        assert_eq!(
            differences(&runs),
            ["gpus[0].power_limit_w: 700 on host-a (2 runs), 500 on host-b (1 run)"]
        );
    }

    #[test]
    fn identical_hosts_and_temperatures_are_not_differences() {
        let mut warm = host(700.0, "bench:1");
        warm.gpus[0].temperature_c = Some(80.0);
        let runs = vec![
            run("host-a", "b", host(700.0, "bench:1")),
            run("host-b", "b", warm),
        ];
        assert!(differences(&runs).is_empty());
    }

    #[test]
    fn images_are_compared_within_a_backend_only() {
        let runs = vec![
            run("host-a", "torch", host(700.0, "torch:1")),
            run("host-a", "vllm", host(700.0, "vllm:1")),
            run("host-b", "vllm", host(700.0, "vllm:2")),
        ];
        assert_eq!(
            differences(&runs),
            ["backend `vllm` image: vllm:1 on host-a (1 run), vllm:2 on host-b (1 run)"]
        );
    }

    #[test]
    fn warmups_failures_and_runs_without_provenance_are_left_out() {
        let mut warmup = run("host-b", "b", host(500.0, "bench:1"));
        warmup.warmup = true;
        let mut failed = run("host-b", "b", host(500.0, "bench:1"));
        failed.state = RunState::Failed as i32;
        let mut old = run("host-c", "b", host(500.0, "bench:1"));
        old.provenance = None;
        let runs = vec![
            run("host-a", "b", host(700.0, "bench:1")),
            warmup,
            failed,
            old,
        ];
        assert!(differences(&runs).is_empty());
    }

    #[test]
    fn many_values_are_bounded() {
        let runs: Vec<Run> = (0..20)
            .map(|i| run(&format!("h{i:02}"), "b", host(300.0 + f64::from(i), "x")))
            .collect();
        let lines = differences(&runs);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with("and 14 more values"), "{}", lines[0]);
    }
}
