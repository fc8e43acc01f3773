//! A manifest's configurations (the grid's product minus its excludes,
//! plus its includes, and the named configs) and its runs in the manifest's
//! order (interleaved, grouped, or shuffled per cycle from a seed). Every
//! count is checked against the limits before what it counts is built, and
//! building stops when the request's CPU budget is spent
//! (`berth_server::budget`).

use std::collections::{BTreeMap, BTreeSet};

use berth_server::budget::{self, BudgetError};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::limits::{Count, Limit, LimitExceeded, ManifestLimits};
use super::parse::{ManifestError, Source};
use super::types::{ConfigPoint, Grid, Manifest, Order, PlannedRun, WarmupPolicy};
use super::validate::check_identifier;

/// The manifest's configurations, each error at the key or value at fault.
pub(super) fn configs(
    source: Source<'_>,
    manifest: &Manifest,
    limits: &ManifestLimits,
) -> Result<Vec<ConfigPoint>, ManifestError> {
    expand_configs(manifest, limits).map_err(|(at, message)| match at {
        ConfigErrorAt::Path(path) => source.at(&path, message),
        ConfigErrorAt::Value(value) => source.at_value(&value, 2, message),
    })
}

/// The campaign's runs in order: every configuration × backend ×
/// (warmup runs + cycles), refused before they are built when there are
/// more than `limits` allow.
pub(super) fn runs(
    source: Source<'_>,
    manifest: &Manifest,
    warmup: &WarmupPolicy,
    configs: &[ConfigPoint],
    limits: &ManifestLimits,
) -> Result<Vec<PlannedRun>, ManifestError> {
    let runs_per_pair = u64::from(manifest.cycles.planned()) + u64::from(warmup.max_runs());
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
            manifest.cycles.planned(),
            warmup.max_runs()
        );
        let exceeded = LimitExceeded::new(Limit::Runs, what, runs, "runs", limits.max_runs);
        return Err(source.at(&["cycles"], exceeded.to_string()));
    }
    schedule(manifest, warmup.max_runs(), configs)
        .map_err(|error| source.at(&["cycles"], error.to_string()))
}

/// Where a configuration error is: at a key path, or at the second line
/// holding a value (a duplicate name).
enum ConfigErrorAt {
    Path(Vec<&'static str>),
    Value(String),
}

type ConfigError = (ConfigErrorAt, String);

fn expand_configs(
    manifest: &Manifest,
    limits: &ManifestLimits,
) -> Result<Vec<ConfigPoint>, ConfigError> {
    let mut configs = match &manifest.grid {
        Some(grid) => grid_configs(manifest, grid, limits)?,
        None => Vec::new(),
    };
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

/// The grid's configurations: its product minus its excludes, then its
/// includes.
fn grid_configs(
    manifest: &Manifest,
    grid: &Grid,
    limits: &ManifestLimits,
) -> Result<Vec<ConfigPoint>, ConfigError> {
    let axes = grid_axes(grid)?;
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
    let mut configs = if combinations > 0 {
        product(grid, &axes)?
    } else {
        Vec::new()
    };
    for extra in &grid.include {
        configs.push(included(extra, &axes, limits)?);
    }
    if configs.is_empty() {
        return Err((
            ConfigErrorAt::Path(vec!["grid", "exclude"]),
            "grid: every combination is excluded".into(),
        ));
    }
    Ok(configs)
}

/// The grid's parameters and their values, in order.
fn grid_axes(grid: &Grid) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
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
    Ok(axes)
}

/// Every combination of the axes' values that no exclude matches (a
/// partial match excludes), in grid order. Each combination built and
/// each compared with the excludes costs the request's CPU budget.
fn product(grid: &Grid, axes: &[(String, Vec<String>)]) -> Result<Vec<ConfigPoint>, ConfigError> {
    let out_of_budget = |error: BudgetError| {
        (
            ConfigErrorAt::Path(vec!["grid", "params"]),
            error.to_string(),
        )
    };
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
    let mut points: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (key, values) in axes {
        let mut longer = Vec::with_capacity(points.len() * values.len());
        for point in &points {
            for value in values {
                budget::check().map_err(out_of_budget)?;
                let mut next = point.clone();
                next.push((key.clone(), value.clone()));
                longer.push(next);
            }
        }
        points = longer;
    }
    let mut configs = Vec::with_capacity(points.len());
    for point in points {
        budget::check().map_err(out_of_budget)?;
        if !excluded(&point) {
            configs.push(ConfigPoint {
                name: point_name(&point),
                params: point,
            });
        }
    }
    Ok(configs)
}

/// One of the grid's includes, its grid parameters first.
fn included(
    extra: &BTreeMap<String, serde_yaml::Value>,
    axes: &[(String, Vec<String>)],
    limits: &ManifestLimits,
) -> Result<ConfigPoint, ConfigError> {
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
    Ok(ConfigPoint {
        name,
        params: point,
    })
}

/// The grid's combinations, refused before any is built when they, the
/// configurations with the includes and named configs, their names or the
/// exclude comparisons would pass `limits`.
fn check_grid_size(
    manifest: &Manifest,
    grid: &Grid,
    axes: &[(String, Vec<String>)],
    limits: &ManifestLimits,
) -> Result<u64, ConfigError> {
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

/// The runs in the manifest's order; each run built costs the request's
/// CPU budget.
fn schedule(
    manifest: &Manifest,
    warmup_runs: u32,
    configs: &[ConfigPoint],
) -> Result<Vec<PlannedRun>, BudgetError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(manifest.seed);
    let mut per_backend_order: Vec<(bool, u32, usize)> = Vec::new();
    for round in 1..=warmup_runs {
        per_backend_order.extend((0..configs.len()).map(|c| (true, round, c)));
    }
    match manifest.order {
        Order::Interleaved | Order::Shuffled => {
            for cycle in 1..=manifest.cycles.planned() {
                let mut indexes: Vec<usize> = (0..configs.len()).collect();
                if manifest.order == Order::Shuffled {
                    indexes.shuffle(&mut rng);
                }
                per_backend_order.extend(indexes.into_iter().map(|c| (false, cycle, c)));
            }
        }
        Order::Grouped => {
            for c in 0..configs.len() {
                per_backend_order
                    .extend((1..=manifest.cycles.planned()).map(|cycle| (false, cycle, c)));
            }
        }
    }
    let mut runs = Vec::with_capacity(per_backend_order.len() * manifest.backends.len());
    for (warmup, cycle, config) in per_backend_order {
        for backend in &manifest.backends {
            budget::check()?;
            runs.push(PlannedRun {
                config: configs[config].name.clone(),
                backend: backend.name.clone(),
                cycle,
                warmup,
                sequence: runs.len() as u32,
            });
        }
    }
    Ok(runs)
}
