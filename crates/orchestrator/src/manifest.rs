//! Campaign manifests (YAML): parsing, full validation before anything runs,
//! and expansion into configurations and runs. Errors carry
//! `file:line:column` and name the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Most runs one campaign may have.
pub const MAX_RUNS: usize = 1_000_000;

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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    /// Unmeasured runs of every (config, backend) before the first cycle.
    #[serde(default)]
    pub runs: u32,
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

/// Parses and validates a manifest and expands it into its plan.
pub fn plan(source_name: &str, text: &str) -> Result<Plan, ManifestError> {
    let at = |path: &[&str], message: String| {
        let (line, column) = locate(text, path);
        ManifestError {
            source_name: source_name.to_string(),
            line,
            column,
            message,
        }
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(at(
            &[],
            format!(
                "manifest is {} bytes; at most {MAX_MANIFEST_BYTES}",
                text.len()
            ),
        ));
    }
    let manifest: Manifest = serde_yaml::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        let message = e.to_string();
        // serde_yaml appends " at line L column C"; the prefix already says it.
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        ManifestError {
            source_name: source_name.to_string(),
            line,
            column,
            message,
        }
    })?;

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

    let configs = expand_configs(&manifest).map_err(|(path, message)| match path {
        ConfigErrorAt::Path(path) => at(&path, message),
        ConfigErrorAt::Value(value) => at_value(text, source_name, &value, 2, message),
    })?;

    // Every placeholder must resolve for every configuration.
    for config in &configs {
        let mut values: BTreeMap<String, String> = config.params.iter().cloned().collect();
        for key in ["config", "cycle", "backend", "run_id"] {
            values.insert(key.into(), String::new());
        }
        for arg in &manifest.run.command {
            substitute(arg, &values).map_err(|e| {
                at(
                    &["run", "command"],
                    format!("run.command (config `{}`): {e}", config.name),
                )
            })?;
        }
        for value in manifest.run.env.values() {
            substitute(value, &values).map_err(|e| {
                at(
                    &["run", "env"],
                    format!("run.env (config `{}`): {e}", config.name),
                )
            })?;
        }
    }

    let per_backend = configs.len() as u64 * u64::from(manifest.cycles + manifest.warmup.runs);
    let total = per_backend.saturating_mul(manifest.backends.len() as u64);
    if total > MAX_RUNS as u64 {
        return Err(at(
            &["cycles"],
            format!("the campaign would have {total} runs; at most {MAX_RUNS}"),
        ));
    }
    let runs = schedule(&manifest, &configs);
    Ok(Plan {
        manifest,
        configs,
        runs,
    })
}

enum ConfigErrorAt {
    Path(Vec<&'static str>),
    Value(String),
}

fn expand_configs(manifest: &Manifest) -> Result<Vec<ConfigPoint>, (ConfigErrorAt, String)> {
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
        let matches = |point: &[(String, String)], filter: &BTreeMap<String, serde_yaml::Value>| {
            filter.iter().all(|(k, v)| {
                point
                    .iter()
                    .any(|(pk, pv)| pk == k && scalar(v).is_ok_and(|v| &v == pv))
            })
        };
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
        if !axes.is_empty() {
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
                if points.len() > MAX_RUNS {
                    return Err((
                        ConfigErrorAt::Path(vec!["grid", "params"]),
                        format!("grid: more than {MAX_RUNS} configurations"),
                    ));
                }
            }
            for point in points {
                if !grid.exclude.iter().any(|filter| matches(&point, filter)) {
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
            configs.push(ConfigPoint {
                name: point_name(&point),
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
    match value {
        serde_yaml::Value::String(s) => Ok(s.clone()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {other:?}"
        )),
    }
}

fn schedule(manifest: &Manifest, configs: &[ConfigPoint]) -> Vec<PlannedRun> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(manifest.seed);
    let mut per_backend_order: Vec<(bool, u32, usize)> = Vec::new();
    for round in 1..=manifest.warmup.runs {
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

/// Line and column (1-based) of the key path, found by indentation-blind
/// search: each key is looked for after the previous one.
fn locate(text: &str, path: &[&str]) -> (usize, usize) {
    let mut from = 0;
    let mut found = (1, 1);
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
            found = (i + 1, indent + 1);
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
    fn bad_runtime_value_named() {
        let e = error(&BASE.replace("runtime: process", "runtime: kubernetes"));
        assert!(e.message.contains("kubernetes"), "{e}");
    }
}
