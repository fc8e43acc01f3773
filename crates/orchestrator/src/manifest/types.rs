//! The manifest as written (what serde reads from the YAML, with defaults)
//! and the plan made from it: configurations, runs in order, and the
//! command and env of each run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use super::placeholders::{placeholder_names, substitute};
use super::units::{ByteSize, GpuCount};
use crate::protocol::Protocol;
use crate::results::{LayoutConfig, ResultsLayout};

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
    /// Measured repetitions of every (config, backend): a number, or as
    /// many as it takes to know the answer.
    #[serde(default)]
    pub cycles: Cycles,
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

/// Longest period a host's idle baseline may be reused for.
pub const MAX_IDLE_BASELINE_EVERY: Duration = Duration::from_secs(24 * 3600);

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
    /// With `idle_baseline`: measure it on a host (over the same devices)
    /// once per this period, and subtract that for the runs in between,
    /// instead of before every run.
    #[serde(default, with = "humantime_serde")]
    pub idle_baseline_every: Option<Duration>,
    /// Numeric result field that counts a run's work; energy per unit of it
    /// is aggregated as `joules_per_<field>`. Default: `tokens`.
    #[serde(default)]
    pub work_metric: Option<String>,
    /// Random gaps, phase-shifted starts and the rise time left out of the
    /// steady-state figure (`crate::protocol`).
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

/// Result field counted as a run's work when `power.work_metric` is not given.
pub const DEFAULT_WORK_METRIC: &str = "tokens";

impl Power {
    pub fn work_metric(&self) -> &str {
        self.work_metric.as_deref().unwrap_or(DEFAULT_WORK_METRIC)
    }
}

fn process_runtime() -> RuntimeName {
    RuntimeName::Process
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Process,
    Docker,
    Podman,
    Libvirt,
    /// SLURM batch jobs through the agent's slurmrestd (the agent on a login node).
    Slurm,
}

impl RuntimeName {
    pub fn proto(self) -> berth_proto::common::v1::Runtime {
        use berth_proto::common::v1::Runtime;
        match self {
            Self::Process => Runtime::Process,
            Self::Docker => Runtime::Docker,
            Self::Podman => Runtime::Podman,
            Self::Libvirt => Runtime::Libvirt,
            Self::Slurm => Runtime::Slurm,
        }
    }

    /// Whether its workload binds its ports itself on the machine it runs
    /// on (a host process, a SLURM job on its node), rather than having
    /// them published by an engine (containers) or answering on its own
    /// network address (VMs).
    pub fn binds_its_ports(self) -> bool {
        matches!(self, Self::Process | Self::Slurm)
    }

    /// Whether its workload is reached at an address of its own rather
    /// than its host's: a VM's (DHCP), a SLURM job's node.
    pub fn answers_on_its_own_address(self) -> bool {
        matches!(self, Self::Libvirt | Self::Slurm)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    /// Default `process`.
    #[serde(default = "process_runtime")]
    pub runtime: RuntimeName,
    /// A live deployment whose service the runs measure: the backend is
    /// then a host environment on the host of the deployment's first
    /// running replica, and runs get `{{endpoint.<port>}}` and
    /// `BERTH_ENDPOINT_<PORT>` (its `host:port`).
    #[serde(default)]
    pub deployment: String,
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
    /// The virtual machine of a `runtime: libvirt` backend: runs are exec'd
    /// into it through berth-exec-shim.
    #[serde(default)]
    pub vm: Option<Vm>,
    /// The batch job of a `runtime: slurm` backend: an allocation that
    /// runs are started in as job steps, or with `array`, job arrays whose
    /// tasks are the runs.
    #[serde(default)]
    pub slurm: Option<Slurm>,
}

impl Backend {
    /// The job arrays its runs are the tasks of, for a slurm backend that
    /// asks for them.
    pub fn array(&self) -> Option<&SlurmArray> {
        self.slurm.as_ref()?.array.as_ref()
    }
}

/// A slurm backend's job: what sbatch's options of the same names ask.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Slurm {
    #[serde(default)]
    pub partition: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub qos: String,
    /// Wall-clock limit, e.g. `2h` (whole minutes, rounded up).
    #[serde(default, with = "humantime_serde")]
    pub time_limit: Option<Duration>,
    /// Nodes; default 1.
    #[serde(default)]
    pub nodes: u32,
    /// Node features (sbatch --constraint), e.g. `a100&ib`.
    #[serde(default)]
    pub constraints: String,
    /// Generic resources per node (sbatch --gres), e.g. `gpu:a100:2`.
    #[serde(default)]
    pub gres: String,
    /// Runs as the tasks of job arrays instead of steps of one allocation:
    /// the cluster runs an array's tasks side by side as it has room.
    #[serde(default)]
    pub array: Option<SlurmArray>,
}

/// How a slurm backend's runs are grouped into job arrays.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SlurmArray {
    /// Runs per array, taken in the campaign's order; default: one cycle's
    /// (a run of each configuration).
    #[serde(default)]
    pub runs: Option<u32>,
    /// Most of an array's tasks running at once (`--array=…%N`); default:
    /// as many as the cluster allows.
    #[serde(default)]
    pub parallel: u32,
}

/// A libvirt backend's machine.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Virtual CPUs; default 1.
    #[serde(default = "one_vcpu")]
    pub vcpus: u32,
    /// Memory, e.g. `512MiB`.
    pub memory: ByteSize,
    /// Disks, the first one boots.
    pub disks: Vec<VmDisk>,
    /// libvirt network; empty: `default` (libvirt's NAT), `none`: no card.
    #[serde(default)]
    pub network: String,
    /// A host bridge instead of a libvirt network, e.g. `br0`.
    #[serde(default)]
    pub bridge: String,
    /// cloud-init user-data (YAML), written to a NoCloud seed by the agent.
    #[serde(default)]
    pub cloud_init: String,
    /// PCI addresses passed through (e.g. a GPU), free for vfio on the host.
    #[serde(default)]
    pub pci_passthrough: Vec<String>,
}

fn one_vcpu() -> u32 {
    1
}

/// A VM disk: a qcow2 `image` the agent makes a copy-on-write overlay of,
/// or a `volume` used as it is.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// Absolute path of a qcow2 base image on the agent's host.
    #[serde(default)]
    pub image: String,
    /// An absolute path, or `pool/volume` of a libvirt storage pool.
    #[serde(default)]
    pub volume: String,
    /// Size of the overlay; default the image's.
    #[serde(default)]
    pub size: Option<ByteSize>,
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

impl RunTemplate {
    /// The ports of the `{{endpoint.<port>}}` placeholders of the command
    /// and env.
    pub fn endpoint_ports(&self) -> BTreeSet<String> {
        self.command
            .iter()
            .chain(self.env.values())
            .filter_map(|template| placeholder_names(template))
            .flatten()
            .filter_map(|name| name.strip_prefix("endpoint."))
            .map(str::to_string)
            .collect()
    }
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

/// `cycles: N`, or `cycles: {min, max, until: {metric, ci_below}}`: cycles
/// go on per (config, backend) until the 95% confidence interval of
/// `metric` is narrow enough, at least `min` and at most `max` of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Cycles {
    Fixed(u32),
    UntilKnown(CyclesUntil),
}

impl Default for Cycles {
    fn default() -> Self {
        Self::Fixed(1)
    }
}

impl Cycles {
    /// The most measured runs a (config, backend) can have; all are planned
    /// up front, and those an answer known earlier does not need are dropped.
    pub fn planned(&self) -> u32 {
        match self {
            Self::Fixed(cycles) => *cycles,
            Self::UntilKnown(until) => until.max,
        }
    }

    pub fn until(&self) -> Option<&CyclesUntil> {
        match self {
            Self::Fixed(_) => None,
            Self::UntilKnown(until) => Some(until),
        }
    }
}

impl<'de> Deserialize<'de> for Cycles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CyclesVisitor;
        impl<'de> serde::de::Visitor<'de> for CyclesVisitor {
            type Value = Cycles;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of cycles, or {min, max, until: {metric, ci_below}}")
            }
            fn visit_u64<E: serde::de::Error>(self, cycles: u64) -> Result<Cycles, E> {
                u32::try_from(cycles)
                    .map(Cycles::Fixed)
                    .map_err(|_| E::custom(format!("{cycles} cycles is more than {}", u32::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, cycles: i64) -> Result<Cycles, E> {
                Err(E::custom(format!("{cycles} cycles: must be at least 1")))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Cycles, A::Error> {
                // The map's own errors (an unknown key, a wrong type) come through as they are.
                CyclesUntil::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Cycles::UntilKnown)
            }
        }
        deserializer.deserialize_any(CyclesVisitor)
    }
}

/// The cycles of `cycles: {min, max, until}`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CyclesUntil {
    #[serde(default = "default_min_cycles")]
    pub min: u32,
    pub max: u32,
    pub until: KnownWhen,
}

/// When the answer of a (config, backend) is known: the 95% CI half-width
/// of `metric` over its |mean| is under `ci_below`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KnownWhen {
    /// A numeric result field, `duration_s`, `energy_j` or
    /// `joules_per_<work metric>`; required (checked with its line).
    #[serde(default)]
    pub metric: String,
    /// `2%`, or the fraction `0.02`.
    pub ci_below: Fraction,
}

/// A fraction written as one (`0.02`) or as a percentage (`2%`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(f64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Number(fraction) => Ok(Self(fraction)),
            Written::Text(text) => text
                .trim()
                .strip_suffix('%')
                .and_then(|percent| percent.trim().parse::<f64>().ok())
                .map(|percent| Self(percent / 100.0))
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "`{text}`: a percentage (`2%`) or a fraction (`0.02`)"
                    ))
                }),
        }
    }
}

fn default_min_cycles() -> u32 {
    3
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

    /// What the campaign's results need from the plan, stored with it at
    /// submit: configurations and backends in manifest order, and whether
    /// power is measured.
    pub fn results_layout(&self) -> ResultsLayout {
        ResultsLayout {
            measures_power: self.manifest.power.enabled,
            cycles_until: self.manifest.cycles.until().cloned(),
            configs: self
                .configs
                .iter()
                .map(|c| LayoutConfig {
                    name: c.name.clone(),
                    params: c.params.clone(),
                })
                .collect(),
            backends: self
                .manifest
                .backends
                .iter()
                .map(|b| b.name.clone())
                .collect(),
        }
    }

    /// The command line of a run, placeholders replaced; `endpoints` are
    /// those of the deployment its backend measures (port name → host:port).
    pub fn command_for(
        &self,
        run: &PlannedRun,
        run_id: &str,
        endpoints: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let values = self.placeholder_values(run, run_id, endpoints);
        self.manifest
            .run
            .command
            .iter()
            .map(|arg| substitute(arg, &values).unwrap_or_else(|_| arg.clone()))
            .collect()
    }

    /// The run's environment, placeholders replaced, plus BERTH_* variables.
    pub fn env_for(
        &self,
        run: &PlannedRun,
        run_id: &str,
        endpoints: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let values = self.placeholder_values(run, run_id, endpoints);
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
        env.extend(endpoints.iter().map(|(port, address)| {
            (
                format!("BERTH_ENDPOINT_{}", port.to_uppercase()),
                address.clone(),
            )
        }));
        env
    }

    fn placeholder_values(
        &self,
        run: &PlannedRun,
        run_id: &str,
        endpoints: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut values: BTreeMap<String, String> = self
            .config(&run.config)
            .map(|c| c.params.iter().cloned().collect())
            .unwrap_or_default();
        values.insert("config".into(), run.config.clone());
        values.insert("cycle".into(), run.cycle.to_string());
        values.insert("backend".into(), run.backend.clone());
        values.insert("run_id".into(), run_id.into());
        for (port, address) in endpoints {
            values.insert(format!("endpoint.{port}"), address.clone());
        }
        values
    }
}
