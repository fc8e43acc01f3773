//! What serde cannot check about a manifest it read: non-empty names and
//! counts, backend names unique and plain, a container backend's image,
//! resources, GPUs and mounts that make sense for its runtime, a coherent
//! warmup, metric names, the power rate and the run's program. Each error
//! points at the key at fault.

use std::collections::BTreeSet;

use super::parse::{ManifestError, Source};
use super::spans::PathStep;
use super::types::{
    Backend, Cycles, CyclesUntil, DEFAULT_STABLE_CAP, DEFAULT_STABLE_WINDOW,
    MAX_IDLE_BASELINE_EVERY, MAX_POWER_RATE_HZ, Manifest, Power, Resources, RuntimeName,
    StableWarmup, Warmup, WarmupPolicy,
};
use super::units::GpuCount;
use crate::results::{
    ENERGY_METRIC, ENERGY_NET_METRIC, joules_per_unit_metric, net_joules_per_unit_metric,
};

/// Checks the manifest and returns its warmup policy.
pub(super) fn check(
    source: Source<'_>,
    manifest: &Manifest,
) -> Result<WarmupPolicy, ManifestError> {
    let at = |path: &[&str], message: String| source.at(path, message);
    if manifest.name.trim().is_empty() {
        return Err(at(&["name"], "name: must not be empty".into()));
    }
    if manifest.cycles == Cycles::Fixed(0) {
        return Err(at(&["cycles"], "cycles: must be at least 1".into()));
    }
    if manifest.backends.is_empty() {
        return Err(at(
            &["backends"],
            "backends: at least one backend is needed".into(),
        ));
    }
    check_backends(source, manifest)?;
    let warmup = warmup_policy(&manifest.warmup)
        .map_err(|(key, message)| at(&["warmup", key], format!("warmup.{key}: {message}")))?;
    if let Some(metric) = &manifest.power.work_metric {
        check_metric_name(metric)
            .map_err(|e| at(&["power", "work_metric"], format!("power.work_metric: {e}")))?;
    }
    let rate = manifest.power.rate_hz;
    if !(0.0..=MAX_POWER_RATE_HZ).contains(&rate) {
        return Err(at(
            &["power", "rate_hz"],
            format!(
                "power.rate_hz: {rate} is out of range (0 to {MAX_POWER_RATE_HZ}; 0 is the sampler's default)"
            ),
        ));
    }
    if let Some(every) = manifest.power.idle_baseline_every {
        let field = &["power", "idle_baseline_every"];
        if manifest.power.idle_baseline.is_none() {
            return Err(at(
                field,
                "power.idle_baseline_every: says how often the idle baseline is measured; set power.idle_baseline too".into(),
            ));
        }
        if every.is_zero() || every > MAX_IDLE_BASELINE_EVERY {
            return Err(at(
                field,
                format!(
                    "power.idle_baseline_every: {every:?} must be above 0 and at most {MAX_IDLE_BASELINE_EVERY:?}"
                ),
            ));
        }
    }
    if let Some(protocol) = &manifest.power.protocol {
        let at_protocol = |path: &[&str], message: String| {
            let path: Vec<&str> = ["power", "protocol"]
                .into_iter()
                .chain(path.iter().copied())
                .collect();
            at(&path, format!("{}: {message}", path.join(".")))
        };
        if !manifest.power.enabled {
            return Err(at_protocol(
                &[],
                "applies only with power.enabled: true".into(),
            ));
        }
        protocol
            .check()
            .map_err(|(path, message)| at_protocol(path, message))?;
    }
    if let Some(until) = manifest.cycles.until() {
        check_cycles_until(until, &manifest.power).map_err(|(path, message)| {
            let path: Vec<&str> = std::iter::once("cycles")
                .chain(path.iter().copied())
                .collect();
            at(&path, format!("cycles.{}: {message}", path[1..].join(".")))
        })?;
    }
    if manifest.run.command.is_empty() || manifest.run.command[0].is_empty() {
        return Err(at(
            &["run", "command"],
            "run.command: must name a program".into(),
        ));
    }
    Ok(warmup)
}

/// Every backend: a plain name, unique, an image where its runtime needs
/// one, and resources it can have; each error at the key of that backend.
fn check_backends(source: Source<'_>, manifest: &Manifest) -> Result<(), ManifestError> {
    let mut backend_names = BTreeSet::new();
    for (index, backend) in manifest.backends.iter().enumerate() {
        let at = |path: &[&str], message: String| {
            let steps: Vec<PathStep<'_>> = [PathStep::Key("backends"), PathStep::Index(index)]
                .into_iter()
                .chain(path.iter().map(|key| PathStep::Key(key)))
                .collect();
            source.at_path(&steps, message)
        };
        check_identifier(&backend.name)
            .map_err(|e| at(&["name"], format!("backends.name: {e}")))?;
        if !backend_names.insert(backend.name.as_str()) {
            return Err(at(
                &["name"],
                format!("backends: duplicate backend name `{}`", backend.name),
            ));
        }
        if matches!(backend.runtime, RuntimeName::Docker | RuntimeName::Podman)
            && backend.image.is_empty()
        {
            return Err(at(
                &["image"],
                format!(
                    "backends[{}].image: a container backend needs an image",
                    backend.name
                ),
            ));
        }
        check_backend_resources(backend, &format!("backends[{}]", backend.name))
            .map_err(|(path, message)| at(path, message))?;
        check_vm(backend, &format!("backends[{}]", backend.name))
            .map_err(|(path, message)| at(path, message))?;
        check_slurm(backend, &format!("backends[{}]", backend.name))
            .map_err(|(path, message)| at(path, message))?;
        check_slurm_array(manifest, backend).map_err(|(path, message)| at(path, message))?;
        if !backend.deployment.is_empty() {
            check_deployment_backend(backend).map_err(|(path, message)| at(path, message))?;
        }
    }
    let endpoints_used = !manifest.run.endpoint_ports().is_empty();
    if let Some(backend) = manifest
        .backends
        .iter()
        .find(|b| endpoints_used && b.deployment.is_empty())
    {
        return Err(source.at(
            &["run"],
            format!(
                "run: {{{{endpoint.<port>}}}} needs every backend to name a deployment; backend `{}` names none",
                backend.name
            ),
        ));
    }
    Ok(())
}

/// A backend that measures a deployment is a host environment next to it:
/// what its workload would be is the deployment's.
fn check_deployment_backend(backend: &Backend) -> Result<(), (&'static [&'static str], String)> {
    let name = &backend.name;
    let own_workload: [(&'static [&'static str], bool); 5] = [
        (&["runtime"], backend.runtime != RuntimeName::Process),
        (&["image"], !backend.image.is_empty()),
        (&["command"], !backend.command.is_empty()),
        (&["env"], !backend.env.is_empty()),
        (
            &["placement"],
            !backend.placement.host.is_empty() || !backend.placement.labels.is_empty(),
        ),
    ];
    match own_workload.into_iter().find(|(_, given)| *given) {
        Some((path, _)) => Err((
            path,
            format!(
                "backends[{name}].{}: a backend that names a deployment runs next to it; its workload and host are the deployment's",
                path[0]
            ),
        )),
        None => Ok(()),
    }
}

/// The warmup policy of `warmup`, or the key at fault and why.
fn warmup_policy(warmup: &Warmup) -> Result<WarmupPolicy, (&'static str, String)> {
    let Some(cv_below) = warmup.cv_below else {
        let stray = [
            ("last", warmup.last.is_some()),
            ("metric", warmup.metric.is_some()),
            ("max_runs", warmup.max_runs.is_some()),
        ];
        if let Some((key, _)) = stray.into_iter().find(|(_, given)| *given) {
            return Err((key, "applies only with warmup.cv_below".into()));
        }
        return Ok(WarmupPolicy::Fixed(warmup.runs));
    };
    if warmup.runs > 0 {
        return Err((
            "runs",
            "a fixed number of runs and cv_below exclude each other; cap the warmup with max_runs"
                .into(),
        ));
    }
    if !(cv_below.is_finite() && cv_below > 0.0) {
        return Err((
            "cv_below",
            format!("{cv_below} must be above 0 (e.g. 0.05 for 5%)"),
        ));
    }
    let window = warmup.last.unwrap_or(DEFAULT_STABLE_WINDOW);
    if window < 2 {
        return Err((
            "last",
            format!("{window}: a coefficient of variation needs at least 2 values"),
        ));
    }
    let max_runs = warmup.max_runs.unwrap_or(DEFAULT_STABLE_CAP);
    if max_runs < window {
        return Err((
            "max_runs",
            format!(
                "{max_runs} is fewer than warmup.last ({window}): the warmup could never converge"
            ),
        ));
    }
    let metric = warmup
        .metric
        .clone()
        .unwrap_or_else(|| crate::results::DURATION_METRIC.to_string());
    check_metric_name(&metric).map_err(|e| ("metric", e))?;
    Ok(WarmupPolicy::UntilStable(StableWarmup {
        cv_below,
        window,
        metric,
        max_runs,
    }))
}

/// `cycles: {min, max, until}`, or the key at fault (under `cycles`) and
/// why. An energy metric needs the campaign to measure power, and the per
/// unit of work one must be of the campaign's work metric.
fn check_cycles_until(
    until: &CyclesUntil,
    power: &Power,
) -> Result<(), (&'static [&'static str], String)> {
    if until.min < 2 {
        return Err((
            &["min"],
            format!(
                "{}: a confidence interval needs at least 2 values",
                until.min
            ),
        ));
    }
    if until.max < until.min {
        return Err((
            &["max"],
            format!("{} is below cycles.min ({})", until.max, until.min),
        ));
    }
    let ci_below = until.until.ci_below.0;
    if !(ci_below.is_finite() && ci_below > 0.0 && ci_below < 1.0) {
        return Err((
            &["until", "ci_below"],
            format!("{ci_below} must be above 0 and below 1 (e.g. `2%` or 0.02)"),
        ));
    }
    let metric = until.until.metric.as_str();
    if metric.is_empty() {
        return Err((
            &["until", "metric"],
            "the metric whose interval decides is needed (a result field, duration_s, energy_j or joules_per_<work metric>)".into(),
        ));
    }
    check_metric_name(metric).map_err(|e| (&["until", "metric"][..], e))?;
    let work = power.work_metric();
    let per_unit = [
        joules_per_unit_metric(work),
        net_joules_per_unit_metric(work),
    ];
    let per_unit_named = metric.starts_with("joules_per_") || metric.starts_with("net_joules_per_");
    let net = metric == ENERGY_NET_METRIC || metric.starts_with("net_joules_per_");
    let energy = net || metric == ENERGY_METRIC || per_unit_named;
    if energy && !power.enabled {
        return Err((
            &["until", "metric"],
            format!("`{metric}` is measured only with power.enabled: true"),
        ));
    }
    if net && power.idle_baseline.is_none() {
        return Err((
            &["until", "metric"],
            format!("`{metric}` is above the idle baseline: it needs power.idle_baseline"),
        ));
    }
    if per_unit_named && !per_unit.iter().any(|m| m == metric) {
        return Err((
            &["until", "metric"],
            format!(
                "`{metric}`: energy per unit of work is `{}` or `{}` (power.work_metric is `{work}`)",
                per_unit[0], per_unit[1]
            ),
        ));
    }
    Ok(())
}

/// A result field name: a top-level key of the run's result JSON.
fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{name}` must be a result field name (1 to 64 characters, no spaces)"
        ));
    }
    Ok(())
}

/// Smallest VM memory the agent's guests boot in.
const MIN_VM_MEMORY: u64 = 64 << 20;
/// Most virtual CPUs a VM is given.
const MAX_VCPUS: u32 = 256;

/// A libvirt backend's (or recipe's) `vm:` (and only a libvirt workload
/// has one), or the key at fault and why; `what` starts every message.
pub(crate) fn check_vm(
    backend: &Backend,
    what: &str,
) -> Result<(), (&'static [&'static str], String)> {
    let Some(vm) = &backend.vm else {
        if backend.runtime == RuntimeName::Libvirt {
            return Err((
                &["runtime"],
                format!("{what}: runtime: libvirt needs a `vm:` section (memory, disks, vcpus)"),
            ));
        }
        return Ok(());
    };
    if backend.runtime != RuntimeName::Libvirt {
        return Err((
            &["vm"],
            format!("{what}.vm: only a `runtime: libvirt` backend runs a VM"),
        ));
    }
    let container_only: [(&'static [&'static str], bool); 3] = [
        (&["image"], !backend.image.is_empty()),
        (&["mounts"], !backend.mounts.is_empty()),
        (&["gpus"], backend.gpus.is_some()),
    ];
    if let Some((path, _)) = container_only.into_iter().find(|(_, given)| *given) {
        return Err((
            path,
            format!(
                "{what}.{}: a VM boots its disks and takes host devices by vm.pci_passthrough",
                path[0]
            ),
        ));
    }
    if !(1..=MAX_VCPUS).contains(&vm.vcpus) {
        return Err((
            &["vm", "vcpus"],
            format!("{what}.vm.vcpus: {} must be 1 to {MAX_VCPUS}", vm.vcpus),
        ));
    }
    if vm.memory.0 < MIN_VM_MEMORY {
        return Err((
            &["vm", "memory"],
            format!(
                "{what}.vm.memory: {} bytes is less than the 64 MiB a guest boots in",
                vm.memory.0
            ),
        ));
    }
    if vm.disks.is_empty() {
        return Err((
            &["vm", "disks"],
            format!("{what}.vm.disks: at least one disk (the first boots)"),
        ));
    }
    for (slot, disk) in vm.disks.iter().enumerate() {
        let disk_what = format!("{what}.vm.disks[{slot}]");
        match (disk.image.is_empty(), disk.volume.is_empty()) {
            (true, true) | (false, false) => {
                return Err((
                    &["vm", "disks"],
                    format!("{disk_what}: exactly one of `image` (a qcow2 base) and `volume`"),
                ));
            }
            (false, true) if !disk.image.starts_with('/') => {
                return Err((
                    &["vm", "disks"],
                    format!(
                        "{disk_what}.image: `{}` must be an absolute path on the agent's host",
                        disk.image
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Most nodes a slurm backend's job may ask for.
const MAX_SLURM_NODES: u32 = 100_000;

/// A slurm backend's (or recipe's) `slurm:` (and only a slurm one has one),
/// or the key at fault and why; `what` starts every message.
pub(crate) fn check_slurm(
    backend: &Backend,
    what: &str,
) -> Result<(), (&'static [&'static str], String)> {
    if backend.runtime != RuntimeName::Slurm {
        if backend.slurm.is_some() {
            return Err((
                &["slurm"],
                format!("{what}.slurm: only a `runtime: slurm` backend is a SLURM job"),
            ));
        }
        return Ok(());
    }
    // An image runs in the nodes' container runtime, its mounts bound
    // there (the agent's `slurm.container_runtime` says which, or refuses).
    let not_on_a_cluster: [(&'static [&'static str], bool, &str); 3] = [
        (
            &["mounts"],
            backend.image.is_empty() && !backend.mounts.is_empty(),
            "a job sees the nodes' files as they are: mounts bind them into an image",
        ),
        (
            &["mounts"],
            backend.mounts.iter().any(|m| m.volume),
            "a cluster's jobs bind the nodes' paths, not named volumes",
        ),
        (
            &["gpus"],
            backend.gpus.is_some(),
            "SLURM gives a job its GPUs: ask with slurm.gres (e.g. `gpu:2`)",
        ),
    ];
    if let Some((path, _, why)) = not_on_a_cluster.into_iter().find(|(_, given, _)| *given) {
        return Err((path, format!("{what}.{}: {why}", path[0])));
    }
    let Some(job) = &backend.slurm else {
        return Ok(());
    };
    if job.nodes > MAX_SLURM_NODES {
        return Err((
            &["slurm", "nodes"],
            format!(
                "{what}.slurm.nodes: {} is more than {MAX_SLURM_NODES}",
                job.nodes
            ),
        ));
    }
    if job.time_limit.is_some_and(|limit| limit.is_zero()) {
        return Err((
            &["slurm", "time_limit"],
            format!(
                "{what}.slurm.time_limit: must be positive (leave it out for the partition's default)"
            ),
        ));
    }
    let texts: [(&'static [&'static str], &String); 5] = [
        (&["slurm", "partition"], &job.partition),
        (&["slurm", "account"], &job.account),
        (&["slurm", "qos"], &job.qos),
        (&["slurm", "constraints"], &job.constraints),
        (&["slurm", "gres"], &job.gres),
    ];
    if let Some((path, _)) = texts
        .into_iter()
        .find(|(_, value)| value.len() > 1024 || value.chars().any(char::is_control))
    {
        return Err((
            path,
            format!(
                "{what}.slurm.{}: at most 1024 characters, no control characters",
                path[1]
            ),
        ));
    }
    Ok(())
}

/// A slurm backend's `array:` against the rest of the manifest: its tasks
/// are the runs, run side by side as the cluster decides, so what needs a
/// run's own moment (power measured per run, gaps, warmup or cycles decided
/// as they go, a retry in the same array) is refused.
fn check_slurm_array(
    manifest: &Manifest,
    backend: &Backend,
) -> Result<(), (&'static [&'static str], String)> {
    let Some(array) = backend.slurm.as_ref().and_then(|job| job.array.as_ref()) else {
        return Ok(());
    };
    let what = format!("backends[{}].slurm.array", backend.name);
    if array
        .runs
        .is_some_and(|runs| runs == 0 || runs as usize > MAX_ARRAY_RUNS)
    {
        return Err((
            &["slurm", "array", "runs"],
            format!("{what}.runs: must be 1 to {MAX_ARRAY_RUNS} (SLURM's default MaxArraySize)"),
        ));
    }
    let gaps = &manifest.gaps;
    let side_by_side: [(bool, &str); 6] = [
        (
            !backend.command.is_empty(),
            "an array's tasks are the runs: the backend has no command of its own",
        ),
        (
            manifest.power.enabled,
            "the tasks run side by side, so power cannot be measured per run: measure with steps (leave array out)",
        ),
        (
            gaps.between_configs.is_some_and(|g| !g.is_zero())
                || gaps.between_cycles.is_some_and(|g| !g.is_zero()),
            "the tasks start as the cluster decides: gaps between runs need steps (leave array out)",
        ),
        (
            manifest.warmup.cv_below.is_some(),
            "a warmup until stable is decided run by run: give warmup.runs, or use steps",
        ),
        (
            manifest.cycles.until().is_some(),
            "cycles until known are decided run by run: give a number of cycles, or use steps",
        ),
        (
            manifest.failure.retries > 0,
            "a failed task is not retried in its array: failure.retries needs steps (leave array out)",
        ),
    ];
    match side_by_side.into_iter().find(|(refused, _)| *refused) {
        Some((_, why)) => Err((&["slurm", "array"], format!("{what}: {why}"))),
        None => Ok(()),
    }
}

/// Most runs of one job array: SLURM's default `MaxArraySize` (1001) allows
/// task indexes 0 to 1000.
pub(crate) const MAX_ARRAY_RUNS: usize = 1000;

/// Resources, GPUs and mounts of a backend (or of a deployment recipe's
/// workload), or the key at fault and why; `what` starts every message
/// (`backends[vllm]`, `recipe`).
pub(crate) fn check_backend_resources(
    backend: &Backend,
    what: &str,
) -> Result<(), (&'static [&'static str], String)> {
    if backend.runtime == RuntimeName::Process {
        // The agent refuses these for host processes; say so before anything starts.
        let unsupported: [(&[&str], bool); 3] = [
            (&["resources"], backend.resources != Resources::default()),
            (&["gpus"], backend.gpus.is_some()),
            (&["mounts"], !backend.mounts.is_empty()),
        ];
        if let Some((path, _)) = unsupported.into_iter().find(|(_, given)| *given) {
            let key = path[0];
            return Err((
                path,
                format!(
                    "{what}.{key}: the process runtime cannot honour {key} (host processes share the host's CPUs, memory, GPUs and files)"
                ),
            ));
        }
    }
    let resources = &backend.resources;
    let cpu_fields: [(&[&str], Option<f64>); 2] = [
        (&["resources", "cpus"], resources.cpus),
        (&["resources", "cpu_reservation"], resources.cpu_reservation),
    ];
    for (path, cores) in cpu_fields {
        if let Some(cores) = cores.filter(|c| !(c.is_finite() && *c > 0.0)) {
            let key = path[1];
            return Err((
                path,
                format!("{what}.resources.{key}: {cores} must be a number of cores above 0"),
            ));
        }
    }
    if let (Some(limit), Some(reservation)) = (resources.memory, resources.memory_reservation)
        && reservation > limit
    {
        return Err((
            &["resources", "memory_reservation"],
            format!(
                "{what}.resources.memory_reservation: {} bytes is above the memory limit of {} bytes",
                reservation.0, limit.0
            ),
        ));
    }
    if let Some(gpus) = &backend.gpus {
        match (gpus.count, gpus.devices.is_empty()) {
            (Some(_), false) => {
                return Err((
                    &["gpus"],
                    format!("{what}.gpus: give either count or devices, not both"),
                ));
            }
            (None, true) | (Some(GpuCount::Exactly(0)), true) => {
                return Err((
                    &["gpus"],
                    format!("{what}.gpus: give a count above 0 (or `all`) or devices"),
                ));
            }
            _ => {}
        }
    }
    for mount in &backend.mounts {
        if mount.source.is_empty() {
            return Err((
                &["mounts"],
                format!(
                    "{what}.mounts: the mount on `{}` needs a source",
                    mount.target
                ),
            ));
        }
        if !mount.target.starts_with('/') {
            return Err((
                &["mounts"],
                format!(
                    "{what}.mounts: target `{}` must be an absolute path",
                    mount.target
                ),
            ));
        }
    }
    Ok(())
}

/// Names become parts of run ids and workload names: keep them plain.
pub(crate) fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("`{name}` must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | ','))
    {
        return Err(format!(
            "`{name}` may hold only letters, digits and - _ . = ,"
        ));
    }
    Ok(())
}
