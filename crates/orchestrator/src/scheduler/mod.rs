//! Runs campaigns: places each backend on a host that fits, then executes
//! the backend's runs one after another by exec into it, recording every
//! transition before acting on it. Backends (and so hosts) work in parallel.
//!
//! By job:
//! - `lifecycle`: a campaign from launch to its end: relaunch after a
//!   restart, cancel, resume, snapshot, the running state, settling a
//!   stable warmup, and the verdict on how it ended.
//! - `backend`: one worker per backend: the loop over its runs, placing
//!   it (adopt a recorded placement, choose a host, create and start its
//!   workload from the manifest), a backend that went down or was lost,
//!   and removing it at the end.
//! - `run`: one run on a placed backend: its exec, followed to its end
//!   (attached again when the stream breaks), runs found in flight after a
//!   restart, and whether a failed exit was the backend dying under it.
//! - `array`: a slurm backend's runs as the tasks of job arrays, each run's
//!   exec following its task.
//! - `leases`: the GPUs a run leases from its backend's.
//! - `output`: what a run's exec printed: bounded tails and the result line.
//! - `record`: a run's transitions in the store (running, requeue, fail,
//!   give up, cancelled) and the campaign events that publish what was
//!   written.

mod array;
mod backend;
mod leases;
mod lifecycle;
mod output;
mod record;
mod run;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_server::CancellationToken;
use tokio::sync::Semaphore;

use crate::backend_watch::BackendWatch;
use crate::config::SchedulerConfig;
use crate::deployment::Deployments;
use crate::events::CampaignEvents;
use crate::gpu_leases::GpuLeases;
use crate::hosts::{AgentClient, HostRegistry};
use crate::manifest::{ManifestLimits, Plan};
use crate::power::PowerMeter;
use crate::store::Store;

pub struct Scheduler {
    store: Arc<dyn Store>,
    hosts: Arc<HostRegistry>,
    events: Arc<CampaignEvents>,
    config: SchedulerConfig,
    /// Those the campaign's manifest was accepted within.
    manifest_limits: ManifestLimits,
    running: Mutex<HashMap<String, CancellationToken>>,
    campaign_slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// Backends placed per host, to spread backends over hosts.
    host_load: Mutex<HashMap<String, usize>>,
    gpu_leases: Arc<GpuLeases>,
    power: PowerMeter,
    /// Where backends that measure a deployment find it.
    deployments: Arc<Deployments>,
}

/// A campaign while its task runs: its plan, read once at its start, and
/// what stops it.
struct CampaignRun {
    id: String,
    plan: Plan,
    token: CancellationToken,
    stopped_by_policy: AtomicBool,
    /// The traced call that launched it (a submit from the CLI, a resume):
    /// each run is a trace of its own, linked to this one, so a slow run
    /// leads back to who asked for it. None after a restart.
    launched_by: Option<berth_server::trace_context::SpanContext>,
}

/// A backend placed on a host and running there.
struct Placed {
    host: String,
    workload_id: String,
    client: AgentClient,
    /// The host's power sampler address; empty when it has none.
    power_sampler: String,
    /// GPU indexes the orchestrator assigned to the backend.
    assigned_gpus: Vec<u32>,
    /// GPU indexes the backend can use, leased by each of its runs.
    gpus: Vec<u32>,
    /// The power-sampler devices its runs measure when the manifest names
    /// none: the GPUs of the replica a deployment backend measures; empty
    /// for every device of the host.
    power_devices: Vec<String>,
    /// What its host reported of the settings that decide a figure, asked
    /// by the first run that measures no power and kept for the others
    /// (runs that measure power ask again: temperatures change).
    provenance: tokio::sync::OnceCell<berth_proto::agent::v1::Provenance>,
    watch: BackendWatch,
    /// The endpoints of the deployment the backend measures (port name →
    /// host:port); empty for a backend of its own.
    endpoints: BTreeMap<String, String>,
    /// The exec keys of the runs a job array backend holds as its tasks;
    /// empty for any other backend.
    array_keys: std::collections::HashSet<String>,
}

/// Why a run could not go on where it was; the run is pending again.
enum Interrupted {
    /// The host's agent did not answer.
    HostLost(String),
    /// The agent answers but the backend workload is gone or stopped, or
    /// the run's exec is gone with it (the agent restarted).
    BackendLost(String),
}

impl Interrupted {
    fn reason(&self) -> &str {
        match self {
            Self::HostLost(reason) | Self::BackendLost(reason) => reason,
        }
    }
}

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        hosts: Arc<HostRegistry>,
        events: Arc<CampaignEvents>,
        config: SchedulerConfig,
        manifest_limits: ManifestLimits,
        deployments: Arc<Deployments>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            campaign_slots: Arc::new(Semaphore::new(config.max_running_campaigns.max(1))),
            power: PowerMeter::new(Duration::from_secs(5), config.max_power_samples_per_run),
            store,
            hosts,
            events,
            config,
            manifest_limits,
            running: Mutex::new(HashMap::new()),
            shutdown,
            host_load: Mutex::new(HashMap::new()),
            // One view of which GPUs runs and replicas hold.
            gpu_leases: deployments.gpu_leases(),
            deployments,
        })
    }
}

/// GPU indexes as people read them: `0,2`.
fn index_list(gpus: &[u32]) -> String {
    gpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether an agent's answer means it did not answer at all (the host is
/// lost or its engine is down) rather than refusing what it was asked.
pub(crate) fn agent_did_not_answer(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}
