//! Campaign manifests (YAML): parsing, full validation before anything runs,
//! and expansion into configurations and runs. Errors carry
//! `file:line:column` and name the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

mod limits;
mod prescan;

pub use limits::{Count, Limit, LimitExceeded, ManifestLimits};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.source_name, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ManifestError {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Campaign name.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Long-running workloads runs are exec'd into.
    pub backends: Vec<Backend>,
    /// Configurations generated as the product of parameter values.
    #[serde(default)]
    pub grid: Option<Grid>,
    /// Configurations listed by name.
    #[serde(default)]
    pub configs: Vec<NamedConfig>,
    /// What one run executes.
    pub run: RunTemplate,
    /// Measured repetitions of every (config, backend).
    #[serde(default = "one")]
    pub cycles: u32,
    #[serde(default)]
    pub order: Order,
    /// Seed of the `shuffled` order.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub warmup: Warmup,
    #[serde(default)]
    pub gaps: Gaps,
    #[serde(default)]
    pub failure: FailurePolicy,
    #[serde(default)]
    pub power: Power,
}

/// Highest power sampling rate a manifest may ask for.
pub const MAX_POWER_RATE_HZ: f64 = 10_000.0;

/// Energy measurement around every run, by the host's power sampler.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Power {
    #[serde(default)]
    pub enabled: bool,
    /// Samples per second; 0 means the sampler's default.
    #[serde(default)]
    pub rate_hz: f64,
    /// Device ids (e.g. `nvml:0`); empty means every device of the host.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Idle power measured before each run and reported as a baseline.
    #[serde(default, with = "humantime_serde")]
    pub idle_baseline: Option<Duration>,
    /// Numeric result field that counts a run's work; energy per unit of it
    /// is aggregated as `joules_per_<field>`. Default: `tokens`.
    #[serde(default)]
    pub work_metric: Option<String>,
}

/// Result field counted as a run's work when `power.work_metric` is not given.
pub const DEFAULT_WORK_METRIC: &str = "tokens";

impl Power {
    pub fn work_metric(&self) -> &str {
        self.work_metric.as_deref().unwrap_or(DEFAULT_WORK_METRIC)
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Process,
    Docker,
    Podman,
    Libvirt,
}

impl RuntimeName {
    pub fn proto(self) -> berth_proto::common::v1::Runtime {
        use berth_proto::common::v1::Runtime;
        match self {
            Self::Process => Runtime::Process,
            Self::Docker => Runtime::Docker,
            Self::Podman => Runtime::Podman,
            Self::Libvirt => Runtime::Libvirt,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub runtime: RuntimeName,
    /// Container image (container runtimes).
    #[serde(default)]
    pub image: String,
    /// Main command; for the process runtime, empty means a host environment.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub placement: Placement,
    /// CPU and memory limits and reservations of the backend workload.
    #[serde(default)]
    pub resources: Resources,
    /// GPUs given to the backend workload.
    #[serde(default)]
    pub gpus: Option<GpuRequest>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

impl Backend {
    /// Fewest GPUs a host needs for this backend: the placement's minimum,
    /// or what the backend asks for when that is more.
    pub fn gpus_needed(&self) -> u32 {
        let requested = match &self.gpus {
            None => 0,
            Some(request) if !request.devices.is_empty() => request.devices.len() as u32,
            Some(GpuRequest {
                count: Some(GpuCount::All),
                ..
            }) => 1,
            Some(request) => match request.count {
                Some(GpuCount::Exactly(n)) => n,
                _ => 0,
            },
        };
        requested.max(self.placement.gpus)
    }

    /// Least memory a host needs for this backend, in bytes: the placement's
    /// minimum, or the backend's memory reservation when that is more.
    pub fn memory_needed(&self) -> u64 {
        let placement = self.placement.memory.map_or(0, |m| m.0);
        let reserved = self.resources.memory_reservation.map_or(0, |m| m.0);
        placement.max(reserved)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Labels a host must have.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A host by name.
    #[serde(default)]
    pub host: String,
    /// Fewest GPUs the host must have.
    #[serde(default)]
    pub gpus: u32,
    /// Least physical memory the host must have, e.g. `16GiB`.
    #[serde(default)]
    pub memory: Option<ByteSize>,
}

/// CPU and memory limits and reservations of a backend workload.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU limit in cores, e.g. 1.5.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// CPU reservation in cores.
    #[serde(default)]
    pub cpu_reservation: Option<f64>,
    /// Memory limit, e.g. `8GiB`.
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Memory reservation (soft limit); the host must have at least this much.
    #[serde(default)]
    pub memory_reservation: Option<ByteSize>,
}

/// GPUs given to a backend workload: a count (or `all`), or device ids.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    #[serde(default)]
    pub count: Option<GpuCount>,
    /// Device indexes or UUIDs.
    #[serde(default)]
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(try_from = "NumberOrText")]
pub enum GpuCount {
    Exactly(u32),
    /// Every GPU of the host.
    All,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Host path, or a volume name when `volume` is true.
    pub source: String,
    /// Absolute path inside the workload.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub volume: bool,
}

/// A size in bytes, written as a number of bytes or with a unit:
/// `512MiB`, `16GiB`, `2GB` (powers of 1000), `1.5GiB`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(try_from = "NumberOrText")]
pub struct ByteSize(pub u64);

/// A YAML scalar that is either a whole number or text, parsed further by
/// `TryFrom`. Read by a visitor (not `untagged`) so that an error points at
/// the scalar's own line.
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for NumberOrText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumberOrText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number or text")
            }

            fn visit_u64<E>(self, n: u64) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Number(n))
            }

            fn visit_str<E>(self, text: &str) -> Result<NumberOrText, E> {
                Ok(NumberOrText::Text(text.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl TryFrom<NumberOrText> for GpuCount {
    type Error = String;

    fn try_from(value: NumberOrText) -> Result<Self, String> {
        match value {
            NumberOrText::Number(n) => u32::try_from(n)
                .map(Self::Exactly)
                .map_err(|_| format!("{n} GPUs is too many")),
            NumberOrText::Text(text) if text == "all" => Ok(Self::All),
            NumberOrText::Text(text) => Err(format!(
                "invalid GPU count `{text}`: expected a number or `all`"
            )),
        }
    }
}

impl TryFrom<NumberOrText> for ByteSize {
    type Error = String;

    fn try_from(value: NumberOrText) -> Result<Self, String> {
        match value {
            NumberOrText::Number(n) => Ok(Self(n)),
            NumberOrText::Text(text) => parse_byte_size(&text).map(Self),
        }
    }
}

fn parse_byte_size(text: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 9] = [
        ("B", 1),
        ("KB", 1000),
        ("MB", 1000_u64.pow(2)),
        ("GB", 1000_u64.pow(3)),
        ("TB", 1000_u64.pow(4)),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
    ];
    let invalid = || {
        format!(
            "invalid size `{text}`: expected bytes or a number with a unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|(_, m)| *m)
            .ok_or_else(invalid)?
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes.round() as u64)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Parameter → values; order is kept and names the configurations.
    pub params: serde_yaml::Mapping,
    /// Extra combinations added to the product.
    #[serde(default)]
    pub include: Vec<BTreeMap<String, serde_yaml::Value>>,
    /// Combinations removed from the product (a partial match removes).
    #[serde(default)]
    pub exclude: Vec<BTreeMap<String, serde_yaml::Value>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedConfig {
    pub name: String,
    #[serde(default)]
    pub params: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunTemplate {
    /// Command and arguments; `{{param}}`, `{{config}}`, `{{cycle}}`,
    /// `{{backend}}` and `{{run_id}}` are replaced. The run's result is the last line of its
    /// stdout that is a JSON object.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: String,
    /// Kills a run that takes longer.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Cycle by cycle, every config once per cycle.
    #[default]
    Interleaved,
    /// Config by config, all its cycles in a row.
    Grouped,
    /// Like interleaved, configs shuffled within each cycle from `seed`.
    Shuffled,
}

/// Unmeasured runs of every (config, backend) before the first cycle: a
/// fixed number (`runs`), or as many as it takes for the coefficient of
/// variation of the last `last` values of `metric` to fall under `cv_below`,
/// at most `max_runs`. Validated into a [`WarmupPolicy`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    #[serde(default)]
    pub runs: u32,
    #[serde(default)]
    pub cv_below: Option<f64>,
    #[serde(default)]
    pub last: Option<u32>,
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub max_runs: Option<u32>,
}

/// Values of `warmup.last` and `warmup.max_runs` when the manifest leaves them out.
pub const DEFAULT_STABLE_WINDOW: u32 = 3;
pub const DEFAULT_STABLE_CAP: u32 = 10;

/// How many warmup runs a (config, backend) gets.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmupPolicy {
    /// Exactly this many (0: no warmup).
    Fixed(u32),
    UntilStable(StableWarmup),
}

impl WarmupPolicy {
    /// The most warmup runs a (config, backend) can have; all are planned up
    /// front, and those a stable warmup does not need are dropped.
    pub fn max_runs(&self) -> u32 {
        match self {
            Self::Fixed(runs) => *runs,
            Self::UntilStable(stable) => stable.max_runs,
        }
    }
}

/// Warm up until the coefficient of variation of the last `window` values
/// of `metric` is under `cv_below`, or `max_runs` warmup runs have ended.
#[derive(Debug, Clone, PartialEq)]
pub struct StableWarmup {
    pub cv_below: f64,
    pub window: u32,
    /// A numeric field of the result JSON, or `duration_s`.
    pub metric: String,
    pub max_runs: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gaps {
    #[serde(default, with = "humantime_serde")]
    pub between_configs: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub between_cycles: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Record the failure and go on with the other runs.
    #[default]
    Continue,
    /// Cancel the rest of the campaign.
    Stop,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailurePolicy {
    /// Extra attempts of a failed run.
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// One configuration: a name and its parameter values, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPoint {
    pub name: String,
    pub params: Vec<(String, String)>,
}

/// One run to record, in schedule order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRun {
    pub config: String,
    pub backend: String,
    /// From 1 for measured runs; warmup runs have `warmup` set and count from 1.
    pub cycle: u32,
    pub warmup: bool,
    pub sequence: u32,
}

impl PlannedRun {
    pub fn id(&self, campaign_id: &str) -> String {
        let cycle = if self.warmup {
            format!("w{}", self.cycle)
        } else {
            self.cycle.to_string()
        };
        format!("{campaign_id}/{}/{}/{cycle}", self.config, self.backend)
    }
}

/// A validated manifest with its configurations and runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub manifest: Manifest,
    pub warmup: WarmupPolicy,
    pub configs: Vec<ConfigPoint>,
    pub runs: Vec<PlannedRun>,
}

impl Plan {
    pub fn config(&self, name: &str) -> Option<&ConfigPoint> {
        self.configs.iter().find(|c| c.name == name)
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.manifest.backends.iter().find(|b| b.name == name)
    }

    /// The command line of a run, placeholders replaced.
    pub fn command_for(&self, run: &PlannedRun, run_id: &str) -> Vec<String> {
        let values = self.placeholder_values(run, run_id);
        self.manifest
            .run
            .command
            .iter()
            .map(|arg| substitute(arg, &values).unwrap_or_else(|_| arg.clone()))
            .collect()
    }

    /// The run's environment, placeholders replaced, plus BERTH_* variables.
    pub fn env_for(&self, run: &PlannedRun, run_id: &str) -> Vec<(String, String)> {
        let values = self.placeholder_values(run, run_id);
        let mut env: Vec<(String, String)> = self
            .manifest
            .run
            .env
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    substitute(v, &values).unwrap_or_else(|_| v.clone()),
                )
            })
            .collect();
        env.push(("BERTH_RUN_ID".into(), run_id.into()));
        env.push(("BERTH_CONFIG".into(), run.config.clone()));
        env.push(("BERTH_CYCLE".into(), run.cycle.to_string()));
        env.push((
            "BERTH_WARMUP".into(),
            if run.warmup { "1" } else { "0" }.into(),
        ));
        env
    }

    fn placeholder_values(&self, run: &PlannedRun, run_id: &str) -> BTreeMap<String, String> {
        let mut values: BTreeMap<String, String> = self
            .config(&run.config)
            .map(|c| c.params.iter().cloned().collect())
            .unwrap_or_default();
        values.insert("config".into(), run.config.clone());
        values.insert("cycle".into(), run.cycle.to_string());
        values.insert("backend".into(), run.backend.clone());
        values.insert("run_id".into(), run_id.into());
        values
    }
}

/// Every placeholder of the run's command and env must have a value in
/// every configuration. The names are found once; a configuration is then
/// checked in time linear in its parameters (no name past its first missing
/// one is looked up), and only the first one missing a name is substituted
/// again to say which template lacks what.
fn check_placeholders(
    run: &RunTemplate,
    configs: &[ConfigPoint],
) -> Result<(), (&'static [&'static str], String)> {
    let templates = || {
        let command = run
            .command
            .iter()
            .map(|t| (&["run", "command"][..], "run.command", t));
        command.chain(
            run.env
                .values()
                .map(|t| (&["run", "env"][..], "run.env", t)),
        )
    };
    let mut needed = BTreeSet::new();
    let mut unclosed = false;
    for (_, _, template) in templates() {
        match placeholder_names(template) {
            Some(names) => needed.extend(names.filter(|n| !BUILTIN_PLACEHOLDERS.contains(n))),
            None => unclosed = true,
        }
    }
    let lacking = |config: &&ConfigPoint| {
        needed
            .iter()
            .any(|name| !config.params.iter().any(|(key, _)| key == name))
    };
    let first_wrong = if unclosed {
        configs.first()
    } else {
        configs.iter().find(lacking)
    };
    let Some(config) = first_wrong else {
        return Ok(());
    };
    let mut values: BTreeMap<String, String> = config.params.iter().cloned().collect();
    for key in BUILTIN_PLACEHOLDERS {
        values.insert(key.into(), String::new());
    }
    for (path, field, template) in templates() {
        substitute(template, &values)
            .map_err(|e| (path, format!("{field} (config `{}`): {e}", config.name)))?;
    }
    Ok(())
}

/// Placeholders every run has, besides its configuration's parameters.
const BUILTIN_PLACEHOLDERS: [&str; 4] = ["config", "cycle", "backend", "run_id"];

/// The names of the `{{name}}` placeholders of `template`, as [`substitute`]
/// reads them; `None` when a `{{` is not closed.
fn placeholder_names(template: &str) -> Option<impl Iterator<Item = &str>> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        names.push(after[..close].trim());
        rest = &after[close + 2..];
    }
    Some(names.into_iter())
}

/// Replaces `{{name}}` with its value. Single braces are literal, so shell
/// scripts and JSON need no escaping.
fn substitute(template: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed `{{{{` in `{template}`"))?;
        let name = after[..close].trim();
        let value = values
            .get(name)
            .ok_or_else(|| format!("unknown placeholder `{{{{{name}}}}}` in `{template}`"))?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

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
    let error_at = |(line, column): (usize, usize), message: String| ManifestError {
        source_name: source_name.to_string(),
        line,
        column,
        message,
    };
    let at = |path: &[&str], message: String| error_at(locate(text, path), message);
    if text.len() > limits.max_bytes {
        let exceeded = LimitExceeded::new(
            Limit::Bytes,
            "manifest size",
            Count::Exactly(text.len() as u64),
            "bytes",
            limits.max_bytes as u64,
        );
        return Err(error_at((1, 1), exceeded.to_string()));
    }
    prescan::check(text, limits.max_depth, limits.max_nodes).map_err(|stop| {
        let exceeded = match stop.past {
            prescan::Past::Depth => LimitExceeded::new(
                Limit::Depth,
                "YAML nesting",
                Count::MoreThan(limits.max_depth as u64),
                "levels",
                limits.max_depth as u64,
            ),
            prescan::Past::Nodes => LimitExceeded::new(
                Limit::Nodes,
                "YAML nodes",
                Count::MoreThan(limits.max_nodes as u64),
                "nodes",
                limits.max_nodes as u64,
            ),
        };
        error_at((stop.line, stop.column), exceeded.to_string())
    })?;
    let yaml_error = |error: serde_yaml::Error| {
        let message = error.to_string();
        // serde_yaml appends " at line L column C"; the prefix already says it.
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        error_at(yaml_location(&error), message)
    };
    limits::check_document(text, limits).map_err(|error| match error {
        limits::DocumentError::Limit(exceeded, at) => {
            error_at(yaml_location(&at), exceeded.to_string())
        }
        limits::DocumentError::AliasRepetition(at) => error_at(
            yaml_location(&at),
            format!(
                "YAML aliases: followed more than 100 times per YAML event (serde_yaml's repetition limit); expanded, the manifest may hold at most {} nodes (manifest.max_nodes)",
                limits.max_nodes
            ),
        ),
        limits::DocumentError::Yaml(error) => yaml_error(error),
    })?;
    let manifest: Manifest = serde_yaml::from_str(text).map_err(yaml_error)?;

    if manifest.name.trim().is_empty() {
        return Err(at(&["name"], "name: must not be empty".into()));
    }
    if manifest.cycles == 0 {
        return Err(at(&["cycles"], "cycles: must be at least 1".into()));
    }
    if manifest.backends.is_empty() {
        return Err(at(
            &["backends"],
            "backends: at least one backend is needed".into(),
        ));
    }
    let mut backend_names = BTreeSet::new();
    for backend in &manifest.backends {
        check_identifier(&backend.name)
            .map_err(|e| at(&["backends", "name"], format!("backends.name: {e}")))?;
        if !backend_names.insert(backend.name.as_str()) {
            return Err(at_value(
                text,
                source_name,
                &backend.name,
                2,
                format!("backends: duplicate backend name `{}`", backend.name),
            ));
        }
        if backend.runtime != RuntimeName::Process
            && backend.image.is_empty()
            && backend.runtime != RuntimeName::Libvirt
        {
            return Err(at(
                &["backends", "image"],
                format!(
                    "backends[{}].image: a container backend needs an image",
                    backend.name
                ),
            ));
        }
        check_backend_resources(backend).map_err(|(path, message)| {
            at_backend(text, source_name, &backend.name, path, message)
        })?;
    }
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
    if manifest.run.command.is_empty() || manifest.run.command[0].is_empty() {
        return Err(at(
            &["run", "command"],
            "run.command: must name a program".into(),
        ));
    }

    let configs = expand_configs(&manifest, limits).map_err(|(path, message)| match path {
        ConfigErrorAt::Path(path) => at(&path, message),
        ConfigErrorAt::Value(value) => at_value(text, source_name, &value, 2, message),
    })?;
    check_placeholders(&manifest.run, &configs).map_err(|(path, message)| at(path, message))?;

    let runs_per_pair = u64::from(manifest.cycles) + u64::from(warmup.max_runs());
    let runs = Count::product([
        configs.len() as u64,
        manifest.backends.len() as u64,
        runs_per_pair,
    ]);
    if runs.exceeds(limits.max_runs) {
        let what = format!(
            "runs ({} configurations × {} backends × ({} cycles + {} warmup runs))",
            configs.len(),
            manifest.backends.len(),
            manifest.cycles,
            warmup.max_runs()
        );
        let exceeded = LimitExceeded::new(Limit::Runs, what, runs, "runs", limits.max_runs);
        return Err(at(&["cycles"], exceeded.to_string()));
    }
    let runs = schedule(&manifest, warmup.max_runs(), &configs);
    Ok(Plan {
        manifest,
        warmup,
        configs,
        runs,
    })
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

/// A result field name: a top-level key of the run's result JSON.
fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{name}` must be a result field name (1 to 64 characters, no spaces)"
        ));
    }
    Ok(())
}

/// Resources, GPUs and mounts of a backend, or the key at fault and why.
fn check_backend_resources(backend: &Backend) -> Result<(), (&'static [&'static str], String)> {
    let name = &backend.name;
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
                    "backends[{name}].{key}: the process runtime cannot honour {key} (host processes share the host's CPUs, memory, GPUs and files)"
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
                format!(
                    "backends[{name}].resources.{key}: {cores} must be a number of cores above 0"
                ),
            ));
        }
    }
    if let (Some(limit), Some(reservation)) = (resources.memory, resources.memory_reservation)
        && reservation > limit
    {
        return Err((
            &["resources", "memory_reservation"],
            format!(
                "backends[{name}].resources.memory_reservation: {} bytes is above the memory limit of {} bytes",
                reservation.0, limit.0
            ),
        ));
    }
    if let Some(gpus) = &backend.gpus {
        match (gpus.count, gpus.devices.is_empty()) {
            (Some(_), false) => {
                return Err((
                    &["gpus"],
                    format!("backends[{name}].gpus: give either count or devices, not both"),
                ));
            }
            (None, true) | (Some(GpuCount::Exactly(0)), true) => {
                return Err((
                    &["gpus"],
                    format!("backends[{name}].gpus: give a count above 0 (or `all`) or devices"),
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
                    "backends[{name}].mounts: the mount on `{}` needs a source",
                    mount.target
                ),
            ));
        }
        if !mount.target.starts_with('/') {
            return Err((
                &["mounts"],
                format!(
                    "backends[{name}].mounts: target `{}` must be an absolute path",
                    mount.target
                ),
            ));
        }
    }
    Ok(())
}

/// An error at the key `path` of the backend named `backend` (not of the
/// first backend that has such a key).
fn at_backend(
    text: &str,
    source_name: &str,
    backend: &str,
    path: &[&str],
    message: String,
) -> ManifestError {
    let entry = at_value(text, source_name, backend, 1, String::new());
    let lines: Vec<&str> = text.lines().collect();
    let leading = |line: &str| line.len() - line.trim_start().len();
    let key_indent = |line: &str| line.len() - line.trim_start().trim_start_matches("- ").len();
    let found = lines
        .get(entry.line.saturating_sub(1))
        .and_then(|entry_line| {
            // The backend's own keys share the indent of its `name:` key; it ends
            // where a line is indented no deeper than its list item.
            let (item, own) = (leading(entry_line), key_indent(entry_line));
            let within = lines
                .iter()
                .enumerate()
                .skip(entry.line)
                .take_while(|(_, line)| line.trim().is_empty() || leading(line) > item);
            let (first, rest) = path.split_first()?;
            let (index, _) = within.into_iter().find(|(_, line)| {
                key_indent(line) == own
                    && line
                        .trim_start()
                        .strip_prefix(first)
                        .is_some_and(|after| after.trim_start().starts_with(':'))
            })?;
            locate_from(text, index + 1, rest).or(Some((index + 1, own + 1)))
        });
    let (line, column) = found.unwrap_or((entry.line, entry.column));
    ManifestError {
        source_name: source_name.to_string(),
        line,
        column,
        message,
    }
}

enum ConfigErrorAt {
    Path(Vec<&'static str>),
    Value(String),
}

fn expand_configs(
    manifest: &Manifest,
    limits: &ManifestLimits,
) -> Result<Vec<ConfigPoint>, (ConfigErrorAt, String)> {
    let mut configs = Vec::new();
    if let Some(grid) = &manifest.grid {
        let mut axes: Vec<(String, Vec<String>)> = Vec::new();
        for (key, values) in &grid.params {
            let key = scalar(key).map_err(|e| {
                (
                    ConfigErrorAt::Path(vec!["grid", "params"]),
                    format!("grid.params: key {e}"),
                )
            })?;
            let list = values.as_sequence().ok_or_else(|| {
                (
                    ConfigErrorAt::Path(vec!["grid", "params"]),
                    format!("grid.params.{key}: expected a list of values"),
                )
            })?;
            if list.is_empty() {
                return Err((
                    ConfigErrorAt::Path(vec!["grid", "params"]),
                    format!("grid.params.{key}: empty list of values"),
                ));
            }
            let values = list
                .iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    (
                        ConfigErrorAt::Path(vec!["grid", "params"]),
                        format!("grid.params.{key}: {e}"),
                    )
                })?;
            axes.push((key, values));
        }
        if axes.is_empty() && grid.include.is_empty() {
            return Err((
                ConfigErrorAt::Path(vec!["grid"]),
                "grid: empty grid (no params and no include)".into(),
            ));
        }
        let keys: BTreeSet<&str> = axes.iter().map(|(k, _)| k.as_str()).collect();
        // An include may add parameters; an exclude naming an unknown one is a typo.
        for filter in &grid.exclude {
            if let Some(unknown) = filter.keys().find(|k| !keys.contains(k.as_str())) {
                return Err((
                    ConfigErrorAt::Path(vec!["grid", "exclude"]),
                    format!(
                        "grid.exclude: unknown parameter `{unknown}` (parameters: {})",
                        keys.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let combinations = check_grid_size(manifest, grid, &axes, limits)?;
        // Each exclude as (axis, value) pairs, compared without allocating;
        // one holding a value that is no scalar matches nothing.
        let excludes: Vec<Option<Vec<(usize, String)>>> = grid
            .exclude
            .iter()
            .map(|filter| {
                filter
                    .iter()
                    .map(|(key, value)| {
                        let axis = axes.iter().position(|(axis, _)| axis == key)?;
                        scalar(value).ok().map(|value| (axis, value))
                    })
                    .collect()
            })
            .collect();
        let excluded = |point: &[(String, String)]| {
            excludes
                .iter()
                .flatten()
                .any(|filter| filter.iter().all(|(axis, value)| point[*axis].1 == *value))
        };
        if combinations > 0 {
            let mut points: Vec<Vec<(String, String)>> = vec![Vec::new()];
            for (key, values) in &axes {
                points = points
                    .into_iter()
                    .flat_map(|point| {
                        values.iter().map(move |value| {
                            let mut next = point.clone();
                            next.push((key.clone(), value.clone()));
                            next
                        })
                    })
                    .collect();
            }
            for point in points {
                if !excluded(&point) {
                    configs.push(ConfigPoint {
                        name: point_name(&point),
                        params: point,
                    });
                }
            }
        }
        for extra in &grid.include {
            let mut point = extra
                .iter()
                .map(|(k, v)| scalar(v).map(|v| (k.clone(), v)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    (
                        ConfigErrorAt::Path(vec!["grid", "include"]),
                        format!("grid.include: {e}"),
                    )
                })?;
            // Grid parameters first, in grid order, so names read alike.
            point.sort_by_key(|(k, _)| {
                axes.iter()
                    .position(|(axis, _)| axis == k)
                    .unwrap_or(usize::MAX)
            });
            let name = point_name(&point);
            if name.len() > limits.max_config_name_bytes {
                let exceeded = LimitExceeded::new(
                    Limit::ConfigNameBytes,
                    "grid.include: a configuration name",
                    Count::Exactly(name.len() as u64),
                    "bytes",
                    limits.max_config_name_bytes as u64,
                );
                return Err((
                    ConfigErrorAt::Path(vec!["grid", "include"]),
                    exceeded.to_string(),
                ));
            }
            configs.push(ConfigPoint {
                name,
                params: point,
            });
        }
        if configs.is_empty() {
            return Err((
                ConfigErrorAt::Path(vec!["grid", "exclude"]),
                "grid: every combination is excluded".into(),
            ));
        }
    }
    for named in &manifest.configs {
        check_identifier(&named.name).map_err(|e| {
            (
                ConfigErrorAt::Value(named.name.clone()),
                format!("configs.name: {e}"),
            )
        })?;
        let params = named
            .params
            .iter()
            .map(|(k, v)| scalar(v).map(|v| (k.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                (
                    ConfigErrorAt::Value(named.name.clone()),
                    format!("configs[{}].params: {e}", named.name),
                )
            })?;
        configs.push(ConfigPoint {
            name: named.name.clone(),
            params,
        });
    }
    if configs.is_empty() {
        return Err((
            ConfigErrorAt::Path(vec!["run"]),
            "the campaign has no configurations: give `grid.params` or `configs`".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for config in &configs {
        if !seen.insert(config.name.as_str()) {
            return Err((
                ConfigErrorAt::Value(config.name.clone()),
                format!("duplicate config name `{}`", config.name),
            ));
        }
    }
    Ok(configs)
}

/// The grid's combinations, refused before any is built when they, the
/// configurations with the includes and named configs, their names or the
/// exclude comparisons would pass `limits`.
fn check_grid_size(
    manifest: &Manifest,
    grid: &Grid,
    axes: &[(String, Vec<String>)],
    limits: &ManifestLimits,
) -> Result<u64, (ConfigErrorAt, String)> {
    let at_params = |exceeded: LimitExceeded| {
        (
            ConfigErrorAt::Path(vec!["grid", "params"]),
            exceeded.to_string(),
        )
    };
    let combinations = if axes.is_empty() {
        Count::Exactly(0)
    } else {
        Count::product(axes.iter().map(|(_, values)| values.len() as u64))
    };
    let extra = grid.include.len() as u64 + manifest.configs.len() as u64;
    let configurations = match combinations {
        Count::Exactly(n) => n
            .checked_add(extra)
            .map_or(Count::MoreThan(u64::MAX), Count::Exactly),
        more => more,
    };
    let within = match combinations {
        Count::Exactly(n) if !configurations.exceeds(limits.max_configurations) => Some(n),
        _ => None,
    };
    let Some(combinations) = within else {
        // The sizes of the first axes are enough to see where the count comes from.
        let mut sizes: Vec<String> = axes
            .iter()
            .take(12)
            .map(|(_, v)| v.len().to_string())
            .collect();
        if axes.len() > 12 {
            sizes.push(format!("… ({} parameters)", axes.len()));
        }
        let mut what = format!("grid.params ({} values)", sizes.join(" × "));
        if extra > 0 {
            what.push_str(&format!(" plus {extra} included and named"));
        }
        return Err(at_params(LimitExceeded::new(
            Limit::Configurations,
            what,
            configurations,
            "configurations",
            limits.max_configurations,
        )));
    };
    // `key=value,…`, with each parameter's longest value.
    let longest_name = axes
        .iter()
        .map(|(key, values)| key.len() + 1 + values.iter().map(String::len).max().unwrap_or(0))
        .sum::<usize>()
        + axes.len().saturating_sub(1);
    if longest_name > limits.max_config_name_bytes {
        return Err(at_params(LimitExceeded::new(
            Limit::ConfigNameBytes,
            "grid.params: the longest configuration name (`param=value,…`)",
            Count::Exactly(longest_name as u64),
            "bytes",
            limits.max_config_name_bytes as u64,
        )));
    }
    let checks = Count::product([combinations, grid.exclude.len() as u64]);
    if checks.exceeds(limits.max_exclude_checks) {
        let what = format!(
            "grid.exclude ({} entries × {combinations} combinations)",
            grid.exclude.len()
        );
        return Err((
            ConfigErrorAt::Path(vec!["grid", "exclude"]),
            LimitExceeded::new(
                Limit::ExcludeChecks,
                what,
                checks,
                "comparisons",
                limits.max_exclude_checks,
            )
            .to_string(),
        ));
    }
    Ok(combinations)
}

fn point_name(point: &[(String, String)]) -> String {
    point
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Names become parts of run ids and workload names: keep them plain.
fn check_identifier(name: &str) -> Result<(), String> {
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

fn scalar(value: &serde_yaml::Value) -> Result<String, String> {
    // Names what was found without printing it: it may be large.
    let found = match value {
        serde_yaml::Value::String(s) => return Ok(s.clone()),
        serde_yaml::Value::Number(n) => return Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => return Ok(b.to_string()),
        serde_yaml::Value::Null => "null",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a map",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    };
    Err(format!(
        "expected a string, number or boolean, found {found}"
    ))
}

fn schedule(manifest: &Manifest, warmup_runs: u32, configs: &[ConfigPoint]) -> Vec<PlannedRun> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(manifest.seed);
    let mut per_backend_order: Vec<(bool, u32, usize)> = Vec::new();
    for round in 1..=warmup_runs {
        per_backend_order.extend((0..configs.len()).map(|c| (true, round, c)));
    }
    match manifest.order {
        Order::Interleaved | Order::Shuffled => {
            for cycle in 1..=manifest.cycles {
                let mut indexes: Vec<usize> = (0..configs.len()).collect();
                if manifest.order == Order::Shuffled {
                    indexes.shuffle(&mut rng);
                }
                per_backend_order.extend(indexes.into_iter().map(|c| (false, cycle, c)));
            }
        }
        Order::Grouped => {
            for c in 0..configs.len() {
                per_backend_order.extend((1..=manifest.cycles).map(|cycle| (false, cycle, c)));
            }
        }
    }
    let mut runs = Vec::with_capacity(per_backend_order.len() * manifest.backends.len());
    for (warmup, cycle, config) in per_backend_order {
        for backend in &manifest.backends {
            runs.push(PlannedRun {
                config: configs[config].name.clone(),
                backend: backend.name.clone(),
                cycle,
                warmup,
                sequence: runs.len() as u32,
            });
        }
    }
    runs
}

/// Where serde_yaml places an error; the start when it does not say.
fn yaml_location(error: &serde_yaml::Error) -> (usize, usize) {
    error
        .location()
        .map_or((1, 1), |location| (location.line(), location.column()))
}

/// Line and column (1-based) of the key path, found by indentation-blind
/// search: each key is looked for after the previous one.
fn locate(text: &str, path: &[&str]) -> (usize, usize) {
    locate_from(text, 0, path).unwrap_or((1, 1))
}

/// Like [`locate`], from line index `from`; `None` when the first key is not found.
fn locate_from(text: &str, from: usize, path: &[&str]) -> Option<(usize, usize)> {
    let mut from = from;
    let mut found = None;
    for key in path {
        let hit = text.lines().enumerate().skip(from).find_map(|(i, line)| {
            let trimmed = line.trim_start().trim_start_matches("- ");
            let indent = line.len() - trimmed.len();
            trimmed
                .strip_prefix(key)
                .filter(|rest| rest.trim_start().starts_with(':'))
                .map(|_| (i, indent))
        });
        if let Some((i, indent)) = hit {
            from = i + 1;
            found = Some((i + 1, indent + 1));
        }
    }
    found
}

/// Position of the `nth` line holding `value` as a YAML value (for duplicates).
fn at_value(
    text: &str,
    source_name: &str,
    value: &str,
    nth: usize,
    message: String,
) -> ManifestError {
    let (line, column) = text
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let (_, after) = line.split_once(':')?;
            let after = after.trim().trim_matches(['"', '\'']);
            (after == value).then(|| (i + 1, line.find(value).unwrap_or(0) + 1))
        })
        .nth(nth - 1)
        .unwrap_or((1, 1));
    ManifestError {
        source_name: source_name.to_string(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name: t
backends:
  - name: local
    runtime: process
grid:
  params:
    size: [1, 2]
    algo: [a, b]
run:
  command: [echo, '{{size}}', '{{ algo }}']
cycles: 2
";

    #[test]
    fn expands_grid_and_cycles() {
        let plan = plan("t.yaml", BASE).unwrap();
        let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "size=1,algo=a",
                "size=1,algo=b",
                "size=2,algo=a",
                "size=2,algo=b"
            ]
        );
        assert_eq!(plan.runs.len(), 8);
        assert_eq!(plan.runs[4].cycle, 2);
        let run = &plan.runs[1];
        assert_eq!(plan.command_for(run, "id"), ["echo", "1", "b"]);
        assert_eq!(run.id("c1"), "c1/size=1,algo=b/local/1");
    }

    #[test]
    fn grouped_shuffled_and_warmup_orders() {
        let grouped = plan("t", &format!("{BASE}order: grouped\nwarmup: {{runs: 1}}\n")).unwrap();
        let order: Vec<_> = grouped
            .runs
            .iter()
            .map(|r| (r.warmup, r.cycle, r.config.as_str()))
            .collect();
        assert_eq!(order[..5].iter().filter(|r| r.0).count(), 4);
        assert_eq!(order[4], (false, 1, "size=1,algo=a"));
        assert_eq!(order[5], (false, 2, "size=1,algo=a"));
        let a = plan("t", &format!("{BASE}order: shuffled\nseed: 7\n")).unwrap();
        let b = plan("t", &format!("{BASE}order: shuffled\nseed: 7\n")).unwrap();
        assert_eq!(a.runs, b.runs, "same seed, same order");
        let mut per_cycle: Vec<_> = a.runs[..4].iter().map(|r| r.config.clone()).collect();
        per_cycle.sort();
        assert_eq!(per_cycle.len(), 4, "each config once per cycle");
    }

    #[test]
    fn exclude_and_include() {
        let text = BASE.replace(
            "run:",
            "  exclude: [{size: 2}]\n  include: [{size: 9, algo: z}]\nrun:",
        );
        let plan = plan("t", &text).unwrap();
        let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["size=1,algo=a", "size=1,algo=b", "size=9,algo=z"]);
    }

    fn error(text: &str) -> ManifestError {
        plan("campaign.yaml", text).unwrap_err()
    }

    #[test]
    fn malformed_yaml_has_file_line_column() {
        let e = error("name: t\nbackends: [\n");
        assert_eq!(e.source_name, "campaign.yaml");
        assert!(e.line >= 2, "{e}");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e = error(&BASE.replace(
            "    runtime: process",
            "    runtime: process\n    imagee: x",
        ));
        assert!(e.message.contains("imagee"), "{e}");
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn zero_cycles_and_empty_grid_rejected() {
        let e = error(&BASE.replace("cycles: 2", "cycles: 0"));
        assert!(e.message.contains("cycles"), "{e}");
        assert_eq!(e.line, 11);
        let e = error(&BASE.replace("    size: [1, 2]\n    algo: [a, b]\n", "    size: []\n"));
        assert!(e.message.contains("empty"), "{e}");
        let e = error(&BASE.replace(
            "  params:\n    size: [1, 2]\n    algo: [a, b]\n",
            "  params: {}\n",
        ));
        assert!(e.message.contains("empty grid"), "{e}");
    }

    #[test]
    fn duplicate_config_name_rejected_with_line() {
        let text = "name: t\nbackends: [{name: l, runtime: process}]\nconfigs:\n  - name: fast\n  - name: fast\nrun: {command: [true]}\n";
        let e = error(text);
        assert!(e.message.contains("duplicate config name `fast`"), "{e}");
        assert_eq!(e.line, 5);
    }

    #[test]
    fn unknown_placeholder_rejected() {
        let e = error(&BASE.replace("'{{ algo }}'", "'{{algorithm}}'"));
        assert!(e.message.contains("{{algorithm}}"), "{e}");
    }

    #[test]
    fn power_rate_out_of_range_rejected() {
        let e = error(&format!("{BASE}power: {{enabled: true, rate_hz: 50000}}\n"));
        assert!(
            e.message.contains("power.rate_hz") && e.message.contains("50000"),
            "{e}"
        );
        let ok = plan(
            "t",
            &format!("{BASE}power:\n  enabled: true\n  rate_hz: 100\n  idle_baseline: 2s\n"),
        )
        .unwrap();
        assert_eq!(
            ok.manifest.power.idle_baseline,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn single_braces_are_literal() {
        let values = BTreeMap::from([("n".to_string(), "3".to_string())]);
        assert_eq!(
            substitute("awk 'BEGIN { print {{n}} }'", &values).unwrap(),
            "awk 'BEGIN { print 3 }'"
        );
        assert!(substitute("{{n", &values).is_err());
    }

    #[test]
    fn stable_warmup_plans_its_cap_and_defaults() {
        let plan = plan(
            "t",
            &format!("{BASE}warmup:\n  cv_below: 0.05\n  metric: tps\n  max_runs: 4\n"),
        )
        .unwrap();
        assert_eq!(
            plan.warmup,
            WarmupPolicy::UntilStable(StableWarmup {
                cv_below: 0.05,
                window: DEFAULT_STABLE_WINDOW,
                metric: "tps".into(),
                max_runs: 4,
            })
        );
        // 4 configs × (4 warmup runs planned up front + 2 cycles).
        assert_eq!(plan.runs.len(), 24);
        assert_eq!(plan.runs.iter().filter(|r| r.warmup).count(), 16);
        let defaults = super::plan("t", &format!("{BASE}warmup: {{cv_below: 0.1}}\n")).unwrap();
        match defaults.warmup {
            WarmupPolicy::UntilStable(stable) => {
                assert_eq!(stable.metric, "duration_s");
                assert_eq!(
                    (stable.window, stable.max_runs),
                    (DEFAULT_STABLE_WINDOW, DEFAULT_STABLE_CAP)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stable_warmup_example_is_valid() {
        let text = include_str!("../../../examples/campaigns/stable-warmup.yaml");
        let plan = plan("stable-warmup.yaml", text).unwrap();
        assert!(matches!(plan.warmup, WarmupPolicy::UntilStable(_)));
    }

    #[test]
    fn incoherent_stable_warmups_rejected_at_their_line() {
        // BASE has 11 lines; `warmup:` is line 12.
        let cases = [
            ("  cv_below: 0.05\n  runs: 2\n", 14, "warmup.runs"),
            (
                "  last: 3\n",
                13,
                "warmup.last: applies only with warmup.cv_below",
            ),
            ("  cv_below: 0\n", 13, "warmup.cv_below: 0 must be above 0"),
            ("  cv_below: 0.05\n  last: 1\n", 14, "at least 2 values"),
            (
                "  cv_below: 0.05\n  last: 5\n  max_runs: 4\n",
                15,
                "warmup.max_runs: 4 is fewer than warmup.last (5)",
            ),
            ("  cv_below: 0.05\n  metric: ''\n", 14, "warmup.metric"),
        ];
        for (warmup, line, expected) in cases {
            let e = error(&format!("{BASE}warmup:\n{warmup}"));
            assert!(e.message.contains(expected), "{warmup}: {e}");
            assert_eq!(e.line, line, "{warmup}: {e}");
        }
    }

    const CONTAINERS: &str = "name: t
backends:
  - name: small
    runtime: docker
    image: busybox
  - name: llm
    runtime: docker
    image: vllm
    placement:
      gpus: 2
      memory: 16GiB
    resources:
      cpus: 4
      memory: 32GiB
      memory_reservation: 8GiB
    gpus:
      count: all
    mounts:
      - {source: /models, target: /models, read_only: true}
configs: [{name: a}]
run: {command: [true]}
";

    #[test]
    fn placement_resources_gpus_and_mounts_parse() {
        let plan = plan("t", CONTAINERS).unwrap();
        let llm = plan.backend("llm").unwrap();
        assert_eq!(llm.placement.memory, Some(ByteSize(16 << 30)));
        assert_eq!(llm.resources.memory_reservation, Some(ByteSize(8 << 30)));
        assert_eq!(llm.gpus.as_ref().unwrap().count, Some(GpuCount::All));
        assert!(llm.mounts[0].read_only);
        assert_eq!((llm.gpus_needed(), llm.memory_needed()), (2, 16 << 30));
        let small = plan.backend("small").unwrap();
        assert_eq!((small.gpus_needed(), small.memory_needed()), (0, 0));
        assert_eq!(parse_byte_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_byte_size("512"), Ok(512));
        assert!(parse_byte_size("16 parsecs").is_err());
        assert!(parse_byte_size("GiB").is_err());
    }

    #[test]
    fn bad_resources_rejected_at_the_backend_line() {
        // serde_yaml places a value's own errors at the start of its mapping.
        let cases = [
            ("memory: 16GiB", "memory: lots", 10, "invalid size `lots`"),
            ("count: all", "count: many", 17, "invalid GPU count `many`"),
            (
                "count: all",
                "count: 1\n      devices: ['0']",
                16,
                "backends[llm].gpus: give either count or devices",
            ),
            (
                "target: /models",
                "target: models",
                18,
                "must be an absolute path",
            ),
            (
                "cpus: 4",
                "cpus: -1",
                13,
                "backends[llm].resources.cpus: -1",
            ),
            (
                "memory_reservation: 8GiB",
                "memory_reservation: 64GiB",
                15,
                "above the memory limit",
            ),
        ];
        for (from, to, line, expected) in cases {
            let e = error(&CONTAINERS.replace(from, to));
            assert!(e.message.contains(expected), "{to}: {e}");
            assert_eq!(e.line, line, "{to}: {e}");
        }
        let e = error(&BASE.replace(
            "    runtime: process",
            "    runtime: process\n    mounts: [{source: /a, target: /a}]",
        ));
        assert!(
            e.message
                .contains("backends[local].mounts: the process runtime"),
            "{e}"
        );
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn work_metric_defaults_to_tokens() {
        assert_eq!(
            plan("t", BASE).unwrap().manifest.power.work_metric(),
            "tokens"
        );
        let custom = plan("t", &format!("{BASE}power: {{work_metric: images}}\n")).unwrap();
        assert_eq!(custom.manifest.power.work_metric(), "images");
        let e = error(&format!("{BASE}power:\n  work_metric: 'two words'\n"));
        assert_eq!(e.line, 13, "{e}");
    }

    #[test]
    fn bad_runtime_value_named() {
        let e = error(&BASE.replace("runtime: process", "runtime: kubernetes"));
        assert!(e.message.contains("kubernetes"), "{e}");
    }

    /// A limit error: names the limit and its config field.
    fn past(limits: &ManifestLimits, text: &str, limit: Limit) -> ManifestError {
        let e = plan_within("campaign.yaml", text, limits).unwrap_err();
        let field = format!("manifest.{}", limit.field());
        let env = format!("BERTH_MANIFEST__{}", limit.field().to_ascii_uppercase());
        assert!(
            e.message.contains(&field) && e.message.contains(&env),
            "{e}"
        );
        e
    }

    fn grid(params: usize, values: usize) -> String {
        let list: Vec<String> = (0..values).map(|v| v.to_string()).collect();
        let params: String = (0..params)
            .map(|p| format!("    p{p}: [{}]\n", list.join(", ")))
            .collect();
        BASE.replace("    size: [1, 2]\n    algo: [a, b]\n", &params)
            .replace("'{{size}}', '{{ algo }}'", "'{{p0}}'")
    }

    #[test]
    fn grid_sizes_refused_before_expansion() {
        let limits = ManifestLimits::default();
        // The 408 bytes: 10^10 configurations, counted, not built.
        let e = past(&limits, &grid(10, 10), Limit::Configurations);
        assert!(e.message.contains("10000000000 configurations"), "{e}");
        assert_eq!((e.line, e.column), (6, 3), "{e}");
        // Past what a u64 holds.
        let e = past(&limits, &grid(30, 10), Limit::Configurations);
        assert!(e.message.contains("more than 18446744073709551615"), "{e}");
        // Within a raised limit, the same grid expands.
        let small = ManifestLimits {
            max_configurations: 3,
            ..ManifestLimits::default()
        };
        past(&small, BASE, Limit::Configurations);
        assert_eq!(plan_within("t", BASE, &limits).unwrap().configs.len(), 4);
    }

    #[test]
    fn runs_counted_with_warmup_and_backends() {
        let limits = ManifestLimits {
            max_runs: 15,
            ..ManifestLimits::default()
        };
        // 4 configurations × 1 backend × (2 cycles + 2 warmup runs) = 16.
        let text = format!("{BASE}warmup: {{runs: 2}}\n");
        let e = past(&limits, &text, Limit::Runs);
        assert!(e.message.contains(": 16 runs; at most 15"), "{e}");
        let e = past(
            &ManifestLimits::default(),
            &BASE.replace("cycles: 2", "cycles: 4000000000"),
            Limit::Runs,
        );
        assert!(e.message.contains("16000000000 runs"), "{e}");
    }

    #[test]
    fn size_depth_nodes_and_scalars_limited() {
        let limits = ManifestLimits::default();
        let big = format!("{BASE}description: '{}'\n", "x".repeat(2 << 20));
        let e = past(&limits, &big, Limit::Bytes);
        assert!(e.message.contains(&format!("{} bytes", big.len())), "{e}");

        // The 200 KB of brackets, refused where it gets too deep.
        let nested = format!("{BASE}n: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let e = past(&limits, &nested, Limit::Depth);
        assert_eq!((e.line, e.column), (12, 36), "{e}");
        // Block nesting is counted while the document is walked.
        let block: String = (0..40)
            .map(|i| format!("{}- \n", " ".repeat(i * 2)))
            .collect();
        past(&limits, &format!("{BASE}n:\n{block}"), Limit::Depth);

        // Aliases of aliases of a scalar: many jumps, few nodes.
        let nine = |name: &str| vec![format!("*{name}"); 9].join(", ");
        let laughs = format!(
            "    a: &a lol\n    b: &b [{}]\n    c: &c [{}]\n    d: &d [{}]\n    e: &e [{}]\n    f: [{}]\n",
            nine("a"),
            nine("b"),
            nine("c"),
            nine("d"),
            nine("e")
        );
        let bomb = BASE.replace("    algo: [a, b]\n", &laughs);
        // Past serde_yaml's own limit on following aliases before max_nodes.
        let e = error(&bomb);
        assert!(
            e.message
                .starts_with("YAML aliases: followed more than 100 times"),
            "{e}"
        );
        let few = ManifestLimits {
            max_nodes: 1000,
            ..ManifestLimits::default()
        };
        past(&few, &bomb, Limit::Nodes);

        let long = BASE.replace("[a, b]", &format!("[a, {}]", "b".repeat(70_000)));
        past(&limits, &long, Limit::ScalarBytes);
    }

    #[test]
    fn names_and_exclude_comparisons_limited() {
        let limits = ManifestLimits::default();
        let long = BASE.replace("[a, b]", &format!("[a, {}]", "b".repeat(300)));
        let e = past(&limits, &long, Limit::ConfigNameBytes);
        assert!(e.message.contains("312 bytes"), "{e}");
        let include = BASE.replace(
            "    algo: [a, b]\n",
            &format!(
                "    algo: [a, b]\n  include:\n    - {{size: 3, algo: {}}}\n",
                "c".repeat(300)
            ),
        );
        past(&limits, &include, Limit::ConfigNameBytes);

        let few = ManifestLimits {
            max_exclude_checks: 7,
            ..ManifestLimits::default()
        };
        let excludes = BASE.replace(
            "    algo: [a, b]\n",
            "    algo: [a, b]\n  exclude:\n    - {size: 1}\n    - {algo: b}\n",
        );
        let e = past(&few, &excludes, Limit::ExcludeChecks);
        assert!(
            e.message
                .contains("2 entries × 4 combinations): 8 comparisons"),
            "{e}"
        );
        let plan = plan_within("t", &excludes, &limits).unwrap();
        let names: Vec<_> = plan.configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["size=2,algo=a"]);
    }

    #[test]
    fn placeholders_checked_once_per_configuration() {
        // A placeholder only an include defines is missing from the grid's
        // configurations: the first of them is named.
        let text = BASE
            .replace("'{{ algo }}'", "'{{ algo }}', '{{extra}}'")
            .replace(
                "    algo: [a, b]\n",
                "    algo: [a, b]\n  include:\n    - {size: 3, extra: x}\n",
            );
        let e = error(&text);
        assert!(
            e.message.starts_with(
                "run.command (config `size=1,algo=a`): unknown placeholder `{{extra}}`"
            ),
            "{e}"
        );
        let e = error(&BASE.replace("'{{ algo }}'", "'{{ algo'"));
        assert!(e.message.contains("unclosed"), "{e}");
    }

    #[test]
    fn non_scalar_values_named_not_printed() {
        let e = error(&BASE.replace("[a, b]", &format!("[a, [{}]]", vec!["x"; 1000].join(", "))));
        assert!(e.message.ends_with("found a list"), "{e}");
    }
}
