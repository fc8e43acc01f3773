//! Deployments: long-lived services from recipes, kept running across hosts
//! as Nomad and Kubernetes keep theirs. The desired state (recipe, replica
//! count, stop) is stored first; one reconciler task per live deployment
//! then converges the actual state to it and stores every transition.
//!
//! By job:
//! - `recipe`: the recipe (YAML), parsed within the manifest limits and
//!   validated with `file:line:column`;
//! - `reconcile`: the loop of one deployment: place missing replicas,
//!   follow each one (workload state, health check), restart with capped
//!   backoff, move off a lost host, scale down, stop, and judge the
//!   deployment's state;
//! - `replica`: one replica on its host's agent: host choice, ports,
//!   create and start, start again, stop and remove;
//! - `health`: the HTTP, gRPC, TCP and exec checks;
//! - `logs`: a deployment's replicas' logs, merged.

mod health;
mod logs;
pub mod recipe;
mod reconcile;
mod replica;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_proto::orchestrator::v1::{
    Deployment, DeploymentEvent, DeploymentState, DeploymentTransition, Endpoint, Replica,
    ReplicaState,
};
use berth_server::CancellationToken;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

use crate::error::OrchestratorError;
use crate::gpu_leases::GpuLeases;
use crate::hosts::HostRegistry;
use crate::manifest::ManifestLimits;
use crate::store::Store;
use crate::store::deployments::{
    DeploymentRecord, Inserted, ReplicaRecord, deployment_is_terminal,
};
pub use logs::LogLines;
use recipe::{Recipe, RecipeLimits};

/// `[deployments]`: how replicas are kept running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentsConfig {
    /// Replicas one recipe may ask for.
    pub max_replicas: u32,
    /// Longest pause of a reconciler between two looks at its replicas
    /// (a recipe's health interval makes it shorter).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// A replica whose host has not answered this long is placed on
    /// another host (one that owns GPUs only once its host is deregistered).
    #[serde(with = "humantime_serde")]
    pub host_lost_grace: Duration,
    /// Longest wait for one call to an agent (inspect, create, start); a
    /// host that takes longer did not answer.
    #[serde(with = "humantime_serde")]
    pub agent_timeout: Duration,
    /// Host ports allocated to replicas whose recipe leaves them to berth.
    pub port_range_start: u16,
    pub port_range_end: u16,
}

impl Default for DeploymentsConfig {
    fn default() -> Self {
        Self {
            max_replicas: 1000,
            reconcile_interval: Duration::from_secs(5),
            host_lost_grace: Duration::from_secs(30),
            agent_timeout: Duration::from_secs(10),
            port_range_start: 20_000,
            port_range_end: 29_999,
        }
    }
}

const EVENTS_PER_DEPLOYMENT: usize = 256;
/// Transitions a deployment's snapshot carries (the store keeps more).
const HISTORY_SHOWN: usize = 20;

/// A deployment's recipe as parsed, with the row (`seq`) and generation it
/// was parsed for.
struct ParsedRecipe {
    seq: i64,
    generation: u32,
    recipe: Arc<Recipe>,
}

/// A running replica of a deployment, as a campaign backend reaches it.
#[derive(Clone)]
pub struct Serving {
    pub host: String,
    pub endpoints: BTreeMap<String, String>,
    /// Indexes of the host's GPUs the replica holds.
    pub gpus: Vec<u32>,
}

pub struct Deployments {
    store: Arc<dyn Store>,
    hosts: Arc<HostRegistry>,
    config: DeploymentsConfig,
    manifest_limits: ManifestLimits,
    /// The reconciler of each live deployment, woken by a change of its
    /// desired state.
    reconcilers: Mutex<HashMap<String, Arc<Notify>>>,
    events: Mutex<HashMap<String, broadcast::Sender<DeploymentEvent>>>,
    /// Host ports handed to replicas, per host (those recorded and those
    /// being placed), so that two replicas never get the same one.
    ports_in_use: Mutex<HashMap<String, Vec<u16>>>,
    /// The GPUs replicas hold, shared with the campaigns' runs.
    gpu_leases: Arc<GpuLeases>,
    /// Each live deployment's recipe, parsed once per (deployment row,
    /// generation): snapshots and reconcile passes read it many times.
    recipes: Mutex<HashMap<String, ParsedRecipe>>,
    shutdown: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

impl Deployments {
    pub fn new(
        store: Arc<dyn Store>,
        hosts: Arc<HostRegistry>,
        config: DeploymentsConfig,
        manifest_limits: ManifestLimits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            hosts,
            config,
            manifest_limits,
            gpu_leases: Arc::default(),
            reconcilers: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
            ports_in_use: Mutex::new(HashMap::new()),
            recipes: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// The GPUs replicas hold, for the campaigns' runs to lease around.
    pub fn gpu_leases(&self) -> Arc<GpuLeases> {
        Arc::clone(&self.gpu_leases)
    }

    fn recipe_limits(&self) -> RecipeLimits {
        RecipeLimits {
            max_replicas: self.config.max_replicas,
        }
    }

    /// The stored deployment's recipe, parsed the first time it is asked
    /// for (a new deployment of the name, or an update, is a new row or
    /// generation and parsed again).
    fn stored_recipe(
        &self,
        record: &DeploymentRecord,
    ) -> Result<Arc<Recipe>, crate::manifest::ManifestError> {
        if let Some(parsed) = lock(&self.recipes).get(&record.name)
            && (parsed.seq, parsed.generation) == (record.seq, record.generation)
        {
            return Ok(Arc::clone(&parsed.recipe));
        }
        let recipe = Arc::new(recipe::parse(
            &record.source_name,
            &record.recipe_yaml,
            &self.manifest_limits,
            self.recipe_limits(),
        )?);
        let parsed = ParsedRecipe {
            seq: record.seq,
            generation: record.generation,
            recipe: Arc::clone(&recipe),
        };
        lock(&self.recipes).insert(record.name.clone(), parsed);
        Ok(recipe)
    }

    /// Starts a reconciler for every live deployment: after a restart its
    /// replicas that still run are adopted, not started again.
    pub fn resume(self: &Arc<Self>) -> Result<(), OrchestratorError> {
        for record in self.store.live_deployments()? {
            for replica in self.store.replicas(&record.name)? {
                self.note_held(&replica);
            }
            self.launch(&record.name);
        }
        Ok(())
    }

    /// Starts the deployment's reconciler, or wakes it when it runs.
    fn launch(self: &Arc<Self>, name: &str) {
        let mut reconcilers = lock(&self.reconcilers);
        if let Some(wake) = reconcilers.get(name) {
            wake.notify_one();
            return;
        }
        let wake = Arc::new(Notify::new());
        reconcilers.insert(name.to_string(), Arc::clone(&wake));
        drop(reconcilers);
        let this = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move { this.reconcile_until_ended(&name, &wake).await });
    }

    /// Whether the reconciler of a deployment that ended may stop: it is
    /// forgotten unless the name was deployed again meanwhile, checked under
    /// the lock [`Self::launch`] takes, so that no new deployment is left
    /// without a reconciler.
    fn may_retire(&self, name: &str) -> bool {
        let mut reconcilers = lock(&self.reconcilers);
        let live_again = self
            .store
            .deployment(name)
            .ok()
            .flatten()
            .is_some_and(|record| !deployment_is_terminal(record.state));
        if !live_again {
            reconcilers.remove(name);
            lock(&self.recipes).remove(name);
        }
        !live_again
    }

    fn wake(&self, name: &str) {
        if let Some(wake) = lock(&self.reconcilers).get(name) {
            wake.notify_one();
        }
    }

    /// Validates a recipe, refuses one no host can take, stores it and
    /// starts keeping it running. With `update`, a live deployment of the
    /// same name takes the new recipe and its replicas are replaced one at
    /// a time, each old one removed only once its successor is healthy.
    pub fn deploy(
        self: &Arc<Self>,
        source_name: &str,
        recipe_yaml: &str,
        update: bool,
        validate_only: bool,
    ) -> Result<Deployment, OrchestratorError> {
        let source_name = if source_name.is_empty() {
            "recipe"
        } else {
            source_name
        };
        let recipe = recipe::parse(
            source_name,
            recipe_yaml,
            &self.manifest_limits,
            self.recipe_limits(),
        )?;
        replica::check_placeable(&recipe, &self.hosts.views())?;
        let record = DeploymentRecord {
            name: recipe.name.clone(),
            recipe_yaml: recipe_yaml.to_string(),
            source_name: source_name.to_string(),
            replicas: recipe.replicas,
            state: DeploymentState::Pending,
            message: format!("deployed from {source_name}"),
            created_ms: now_ms(),
            stopping: false,
            generation: 1,
            seq: 0,
        };
        if validate_only {
            return Ok(self.snapshot_of(&record, &recipe, &[]));
        }
        if update
            && let Some(live) = self.store.deployment(&recipe.name)?
            && live.stopping
            && !deployment_is_terminal(live.state)
        {
            return Err(OrchestratorError::DeploymentEnded {
                name: recipe.name,
                state: "stopping",
            });
        }
        if self.store.insert_deployment(&record, update)? == Inserted::NameTaken {
            return Err(OrchestratorError::DeploymentExists(recipe.name));
        }
        tracing::info!(deployment = %recipe.name, replicas = recipe.replicas, "deployment stored");
        self.launch(&recipe.name);
        self.snapshot(&recipe.name)
    }

    pub fn scale(
        self: &Arc<Self>,
        name: &str,
        replicas: u32,
    ) -> Result<Deployment, OrchestratorError> {
        if replicas > self.config.max_replicas {
            return Err(OrchestratorError::InvalidArgument {
                field: "replicas",
                reason: format!(
                    "{replicas} is more than deployments.max_replicas ({})",
                    self.config.max_replicas
                ),
            });
        }
        let record = self.live(name)?;
        if !self.store.set_deployment_replicas(&record.name, replicas)? {
            return Err(OrchestratorError::DeploymentNotFound(name.to_string()));
        }
        self.wake(name);
        self.snapshot(name)
    }

    pub fn stop(self: &Arc<Self>, name: &str) -> Result<Deployment, OrchestratorError> {
        let record = self.live(name)?;
        self.store.request_stop(&record.name)?;
        self.launch(name);
        self.snapshot(name)
    }

    /// The deployment if it has not ended.
    fn live(&self, name: &str) -> Result<DeploymentRecord, OrchestratorError> {
        let record = self
            .store
            .deployment(name)?
            .ok_or_else(|| OrchestratorError::DeploymentNotFound(name.to_string()))?;
        if deployment_is_terminal(record.state) {
            return Err(OrchestratorError::DeploymentEnded {
                name: name.to_string(),
                state: state_name(record.state),
            });
        }
        Ok(record)
    }

    /// The deployment as stored now, with its replicas.
    pub fn snapshot(&self, name: &str) -> Result<Deployment, OrchestratorError> {
        let record = self
            .store
            .deployment(name)?
            .ok_or_else(|| OrchestratorError::DeploymentNotFound(name.to_string()))?;
        Ok(self.describe(&record))
    }

    /// A stored deployment as the API shows it.
    pub fn describe(&self, record: &DeploymentRecord) -> Deployment {
        let replicas = self.store.replicas(&record.name).unwrap_or_default();
        match self.stored_recipe(record) {
            Ok(recipe) => self.snapshot_of(record, &recipe, &replicas),
            // A recipe this orchestrator's limits no longer accept: shown as stored.
            Err(_) => Deployment {
                name: record.name.clone(),
                state: record.state as i32,
                replicas: record.replicas,
                status_message: record.message.clone(),
                created_at: timestamp(record.created_ms),
                recipe_yaml: record.recipe_yaml.clone(),
                ..Default::default()
            },
        }
    }

    fn snapshot_of(
        &self,
        record: &DeploymentRecord,
        recipe: &Recipe,
        replicas: &[ReplicaRecord],
    ) -> Deployment {
        let views = self.hosts.views();
        let address_of = |host: &str| {
            views
                .iter()
                .find(|v| v.record.name == host)
                .map(|v| replica::endpoint_host(&v.record.address))
                .unwrap_or_default()
        };
        let replica_status: Vec<Replica> = replicas
            .iter()
            .map(|r| Replica {
                index: r.index,
                host: r.host.clone(),
                workload_id: r.workload_id.clone(),
                state: r.state as i32,
                endpoints: endpoints(recipe, r, &address_of(&r.host)),
                restarts: r.restarts,
                reason: r.reason.clone(),
                since: timestamp(r.since_ms),
                generation: r.generation,
                gpus: r.gpus.clone(),
            })
            .collect();
        Deployment {
            name: record.name.clone(),
            state: record.state as i32,
            replicas: record.replicas,
            ready_replicas: replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running)
                .count() as u32,
            replica_status,
            status_message: record.message.clone(),
            created_at: timestamp(record.created_ms),
            runtime: recipe
                .runtime
                .proto()
                .as_str_name()
                .trim_start_matches("RUNTIME_")
                .to_lowercase(),
            recipe_yaml: record.recipe_yaml.clone(),
            generation: record.generation,
            history: self
                .store
                .deployment_transitions(&record.name, HISTORY_SHOWN)
                .unwrap_or_default()
                .into_iter()
                .map(|t| DeploymentTransition {
                    time: timestamp(t.time_ms),
                    replica: t.replica,
                    message: t.message,
                })
                .collect(),
        }
    }

    /// Refuses a campaign backend naming a deployment that is not live, or
    /// whose recipe lacks a port the runs' `{{endpoint.<port>}}` name.
    pub fn check_measurable(
        &self,
        backend: &str,
        name: &str,
        ports: &std::collections::BTreeSet<String>,
    ) -> Result<(), OrchestratorError> {
        let record = self.live(name)?;
        let recipe = self.stored_recipe(&record)?;
        match ports.iter().find(|port| recipe.port(port).is_none()) {
            Some(port) => Err(OrchestratorError::InvalidArgument {
                field: "run",
                reason: format!(
                    "{{{{endpoint.{port}}}}}: deployment `{name}` (backend `{backend}`) has no port `{port}`"
                ),
            }),
            None => Ok(()),
        }
    }

    /// Where a campaign reaches the deployment: the host of its first
    /// running replica and that replica's endpoints (port name →
    /// host:port); `None` while none runs; why not when it cannot (no such
    /// deployment, or it ended).
    pub fn serving(&self, name: &str) -> Result<Option<Serving>, String> {
        let record = self.live(name).map_err(|error| error.to_string())?;
        let deployment = self.describe(&record);
        Ok(deployment
            .replica_status
            .into_iter()
            .find(|r| r.state == ReplicaState::Running as i32)
            .map(|replica| Serving {
                gpus: replica.gpus,
                host: replica.host,
                endpoints: replica
                    .endpoints
                    .into_iter()
                    .map(|e| (e.name, e.address))
                    .collect(),
            }))
    }

    pub fn list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Deployment)>, OrchestratorError> {
        Ok(self
            .store
            .list_deployments(before, limit)?
            .into_iter()
            .map(|record| {
                let mut deployment = self.describe(&record);
                deployment.recipe_yaml.clear();
                deployment.history.clear();
                (record.seq, deployment)
            })
            .collect())
    }

    pub fn subscribe(&self, name: &str) -> broadcast::Receiver<DeploymentEvent> {
        lock(&self.events)
            .entry(name.to_string())
            .or_insert_with(|| broadcast::channel(EVENTS_PER_DEPLOYMENT).0)
            .subscribe()
    }

    /// Sends the deployment as it now is to its watchers, if it has any.
    fn publish(&self, name: &str, replica: Option<u32>, message: String) {
        let mut events = lock(&self.events);
        let Some(sender) = events.get(name) else {
            return;
        };
        if sender.receiver_count() == 0 {
            events.remove(name);
            return;
        }
        let sender = sender.clone();
        drop(events);
        if let Ok(deployment) = self.snapshot(name) {
            let _ = sender.send(DeploymentEvent {
                time: Some(SystemTime::now().into()),
                deployment: Some(deployment),
                replica,
                message,
            });
        }
    }

    /// An agent call within `deployments.agent_timeout`: past it, the call
    /// counts as a host that did not answer (DEADLINE_EXCEEDED).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let limit = self.config.agent_timeout;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {} (deployments.agent_timeout)",
                humantime::format_duration(limit)
            )))
        })
    }

    /// Counts what a placed replica holds on its host (its ports, its
    /// GPUs) as taken.
    fn note_held(&self, replica: &ReplicaRecord) {
        if replica.host.is_empty() {
            return;
        }
        lock(&self.ports_in_use)
            .entry(replica.host.clone())
            .or_default()
            .extend(replica.ports.values());
        self.gpu_leases
            .note_replica(&replica.host, &replica.gpus, &replica.deployment);
    }

    /// Frees what a replica held on its host.
    fn release_held(&self, replica: &ReplicaRecord) {
        if let Some(used) = lock(&self.ports_in_use).get_mut(&replica.host) {
            for port in replica.ports.values() {
                if let Some(at) = used.iter().position(|p| p == port) {
                    used.swap_remove(at);
                }
            }
        }
        self.gpu_leases
            .release_replica(&replica.host, &replica.gpus, &replica.deployment);
    }
}

/// The replica's endpoints: each recipe port on the replica's own address
/// (a VM's, a SLURM job's node's), or else on its host's; none for one
/// whose own address is not known yet.
fn endpoints(recipe: &Recipe, replica: &ReplicaRecord, host_address: &str) -> Vec<Endpoint> {
    if replica.host.is_empty()
        || (recipe.runtime.answers_on_its_own_address() && replica.address.is_empty())
    {
        return Vec::new();
    }
    let address = if replica.address.is_empty() {
        host_address
    } else {
        replica.address.as_str()
    };
    recipe
        .ports
        .iter()
        .filter_map(|port| {
            let host_port = *replica.ports.get(&port.name)?;
            Some(Endpoint {
                name: port.name.clone(),
                protocol: port.protocol.as_str().to_string(),
                host: address.to_string(),
                port: u32::from(host_port),
                address: format!("{address}:{host_port}"),
            })
        })
        .collect()
}

pub fn state_name(state: DeploymentState) -> &'static str {
    match state {
        DeploymentState::Unspecified => "unspecified",
        DeploymentState::Pending => "pending",
        DeploymentState::Starting => "starting",
        DeploymentState::Running => "running",
        DeploymentState::Completed => "completed",
        DeploymentState::Failed => "failed",
        DeploymentState::Cancelled => "cancelled",
        DeploymentState::Building => "building",
    }
}
