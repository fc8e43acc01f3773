//! Campaign manifests (YAML): parsing, full validation before anything runs,
//! and expansion into configurations and runs. Errors carry
//! `file:line:column` and name the field.
//!
//! The path from text to [`Plan`], one step per file:
//! 1. `limits` and `prescan`: the size, nesting and node count are
//!    checked before (and while) the YAML is parsed;
//! 2. `parse`: serde_yaml reads the `types` (with `units` for sizes
//!    and GPU counts), and every later error is placed in the text by
//!    its path in the document's `spans`;
//! 3. `validate`: what serde cannot check (names, counts, a backend's
//!    resources for its runtime, the warmup policy, the power rate);
//! 4. `expand`: the configurations and then the runs in the manifest's
//!    order, each counted against the limits before it is built, with the
//!    `placeholders` of the run checked against every configuration.

mod expand;
mod limits;
mod parse;
mod placeholders;
mod prescan;
mod spans;
mod types;
mod units;
mod validate;
mod workload;

#[cfg(test)]
mod tests;

pub use limits::{Count, Limit, LimitExceeded, ManifestLimits};
pub use parse::ManifestError;
pub(crate) use parse::{Source, parse_document};
pub(crate) use placeholders::{placeholder_names, substitute};
pub(crate) use spans::PathStep;
pub use types::{
    Backend, ConfigPoint, Cycles, CyclesUntil, DEFAULT_STABLE_CAP, DEFAULT_STABLE_WINDOW,
    DEFAULT_WORK_METRIC, FailurePolicy, Fraction, Gaps, GpuRequest, Grid, KnownWhen,
    MAX_POWER_RATE_HZ, Manifest, Mount, NamedConfig, OnFailure, Order, Placement, Plan, PlannedRun,
    Power, Resources, RunTemplate, RuntimeName, Slurm, SlurmArray, StableWarmup, Vm, Warmup,
    WarmupPolicy,
};
pub use units::{ByteSize, GpuCount};
pub(crate) use validate::{check_backend_resources, check_identifier, check_slurm, check_vm};
pub use workload::workload_name;

/// Parses and validates a manifest within the default [`ManifestLimits`]
/// and expands it into its plan.
pub fn plan(source_name: &str, text: &str) -> Result<Plan, ManifestError> {
    plan_within(source_name, text, &ManifestLimits::default())
}

/// Parses and validates a manifest and expands it into its plan, refusing
/// it as soon as it is past one of `limits`: its size before it is parsed,
/// its nesting before serde_yaml scans it, its nodes (aliases expanded)
/// before anything is built from them, its configurations and runs before
/// they are expanded.
pub fn plan_within(
    source_name: &str,
    text: &str,
    limits: &ManifestLimits,
) -> Result<Plan, ManifestError> {
    let source = Source {
        name: source_name,
        text,
    };
    let manifest = parse::parse(source, limits)?;
    let warmup = validate::check(source, &manifest)?;
    let configs = expand::configs(source, &manifest, limits)?;
    placeholders::check(&manifest.run, &configs)
        .map_err(|(path, message)| source.at(path, message))?;
    let runs = expand::runs(source, &manifest, &warmup, &configs, limits)?;
    Ok(Plan {
        manifest,
        warmup,
        configs,
        runs,
    })
}
