//! The orchestrator's domain metrics, beside the per-call gRPC metrics every
//! service has (berth_server::metrics): campaigns, runs, hosts and
//! deployments. Names are constants here, the crate's one place for them.
//!
//! Labels take bounded values only (states, outcomes, whether readings
//! were replayed): never a campaign, run or host name, which grow without
//! bound and would make every scrape larger.
//!
//! What changes with an event (a run's transition, a heartbeat) is counted
//! where it happens, in process-wide families ([`metrics`]): the scheduler
//! and host registry reach them without being handed them, and several
//! orchestrators in one process (the quickstart, tests) add into the same
//! ones. What is a state of the store (campaigns, hosts, deployments by
//! state) is read at each scrape by [`StateCollector`], so it cannot drift
//! from what the store says.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use berth_proto::orchestrator::v1::{
    CampaignState, DeploymentState, HostStatus, ReplicaState, RunState,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hosts::HostRegistry;
use crate::store::{RunUpdate, Store};

/// Unfinished campaigns by state (`pending`, `running`).
pub const CAMPAIGNS: &str = "berth_orchestrator_campaigns";
/// Runs entering each state (counter; `_total` in the exposition).
pub const RUN_TRANSITIONS: &str = "berth_orchestrator_run_transitions";
/// Run attempts by how they ended: `succeeded`, `failed`, `cancelled`, or
/// `retried` (pending again: interrupted, or failed with retries left).
pub const RUN_ATTEMPTS: &str = "berth_orchestrator_run_attempts";
/// How long a run's command ran on its agent, by outcome.
pub const RUN_DURATION_SECONDS: &str = "berth_orchestrator_run_duration_seconds";
/// From sending a run's exec to the agent to its stream being open.
pub const DISPATCH_SECONDS: &str = "berth_orchestrator_dispatch_seconds";
/// Registered hosts by status (`ready`, `unreachable`, `unknown`).
pub const HOSTS: &str = "berth_orchestrator_hosts";
/// Round trip of a heartbeat (the agent's Info) that was answered.
pub const HEARTBEAT_SECONDS: &str = "berth_orchestrator_heartbeat_seconds";
/// Deployments not yet ended, by state.
pub const DEPLOYMENTS: &str = "berth_orchestrator_deployments";
/// Replicas of those deployments, by state.
pub const REPLICAS: &str = "berth_orchestrator_replicas";
/// Restarts of those deployments' replicas, all together (a rise is a
/// replica restarting).
pub const REPLICA_RESTARTS: &str = "berth_orchestrator_replica_restarts";
/// Pending runs of unfinished campaigns per backend name (the scheduler's
/// queues); backends past [`MAX_QUEUE_SERIES`] names are summed under
/// `(other)`, so manifests cannot grow the series without bound.
pub const QUEUE_DEPTH: &str = "berth_orchestrator_queue_depth";
/// Backend names given a series of their own in [`QUEUE_DEPTH`].
pub const MAX_QUEUE_SERIES: usize = 64;
/// Energy of each succeeded measured run over all its devices, by whether
/// the readings were replayed from a recorded trace.
pub const RUN_ENERGY_JOULES: &str = "berth_orchestrator_run_energy_joules";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayedLabels {
    pub replayed: String,
}

/// The event-counted metrics, shared by the process.
#[derive(Debug)]
pub struct Metrics {
    run_transitions: Family<StateLabels, Counter>,
    run_attempts: Family<OutcomeLabels, Counter>,
    run_duration: Family<OutcomeLabels, Histogram>,
    dispatch: Histogram,
    heartbeat: Histogram,
    run_energy: Family<ReplayedLabels, Histogram>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    run_transitions: Family::default(),
    run_attempts: Family::default(),
    // 10 ms to about 1.5 h.
    run_duration: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.01, 2.0, 20))
    }),
    // 100 µs to about 3 s.
    dispatch: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
    heartbeat: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
    // 0.1 J to about 0.8 MJ.
    run_energy: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.1, 2.0, 24))),
});

/// The process's event-counted metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// A run's transition as the store wrote it, with what was written.
    pub fn run_recorded(&self, to: RunState, update: &RunUpdate) {
        self.run_transitions
            .get_or_create(&StateLabels {
                state: label(to.as_str_name(), "RUN_STATE_"),
            })
            .inc();
        let outcome = match to {
            RunState::Succeeded | RunState::Failed | RunState::Cancelled => {
                label(to.as_str_name(), "RUN_STATE_")
            }
            RunState::Pending => "retried".to_string(),
            RunState::Unspecified | RunState::Dispatched | RunState::Running => return,
        };
        if let Some(ms) = update.duration_ms {
            self.run_duration
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.clone(),
                })
                .observe(ms as f64 / 1000.0);
        }
        if to == RunState::Succeeded
            && let Some(energy) = update.energy.as_deref().filter(|e| !e.is_empty())
        {
            let joules: f64 = energy.iter().filter_map(|e| e.energy_j).sum();
            let replayed = energy.iter().any(|e| e.replay);
            self.run_energy
                .get_or_create(&ReplayedLabels {
                    replayed: replayed.to_string(),
                })
                .observe(joules);
        }
        self.run_attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn dispatched(&self, latency: Duration) {
        self.dispatch.observe(latency.as_secs_f64());
    }

    pub fn heartbeat(&self, latency: Duration) {
        self.heartbeat.observe(latency.as_secs_f64());
    }
}

/// Registers the orchestrator's metrics in `registry`: the process's
/// event-counted ones and a collector of the store's states.
pub fn register(registry: &mut Registry, store: Arc<dyn Store>, hosts: Arc<HostRegistry>) {
    let m = metrics();
    registry.register(
        RUN_TRANSITIONS,
        "Runs entering each state",
        m.run_transitions.clone(),
    );
    registry.register(
        RUN_ATTEMPTS,
        "Run attempts by how they ended (retried: pending again)",
        m.run_attempts.clone(),
    );
    registry.register(
        RUN_DURATION_SECONDS,
        "How long runs' commands ran on their agents, by outcome",
        m.run_duration.clone(),
    );
    registry.register(
        DISPATCH_SECONDS,
        "From sending a run's exec to its agent to its output stream being open",
        m.dispatch.clone(),
    );
    registry.register(
        HEARTBEAT_SECONDS,
        "Round trip of answered heartbeats to hosts' agents",
        m.heartbeat.clone(),
    );
    registry.register(
        RUN_ENERGY_JOULES,
        "Energy of succeeded measured runs over all their devices",
        m.run_energy.clone(),
    );
    registry.register_collector(Box::new(StateCollector { store, hosts }));
}

/// Campaigns, hosts, deployments and replicas by state, read at each scrape.
struct StateCollector {
    store: Arc<dyn Store>,
    hosts: Arc<HostRegistry>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl StateCollector {
    fn campaigns(&self) -> BTreeMap<String, i64> {
        let mut counts = zeros(
            [CampaignState::Pending, CampaignState::Running].map(|s| s.as_str_name()),
            "CAMPAIGN_STATE_",
        );
        for campaign in self.store.unfinished_campaigns().unwrap_or_default() {
            let state = CampaignState::try_from(campaign.state).unwrap_or_default();
            *counts
                .entry(label(state.as_str_name(), "CAMPAIGN_STATE_"))
                .or_default() += 1;
        }
        counts
    }

    /// Pending runs per backend name over the unfinished campaigns.
    fn queues(&self) -> BTreeMap<String, i64> {
        let mut queues: BTreeMap<String, i64> = BTreeMap::new();
        for campaign in self.store.unfinished_campaigns().unwrap_or_default() {
            let pending = self
                .store
                .pending_runs_by_backend(&campaign.id)
                .unwrap_or_default();
            for (backend, count) in pending {
                let known = queues.contains_key(&backend) || queues.len() < MAX_QUEUE_SERIES;
                let series = if known {
                    backend
                } else {
                    "(other)".to_string()
                };
                *queues.entry(series).or_default() += count as i64;
            }
        }
        queues
    }

    fn hosts(&self) -> BTreeMap<String, i64> {
        let mut counts = zeros(
            [
                HostStatus::Ready,
                HostStatus::Unreachable,
                HostStatus::Unknown,
            ]
            .map(|s| s.as_str_name()),
            "HOST_STATUS_",
        );
        for host in self.hosts.views() {
            *counts
                .entry(label(host.status.as_str_name(), "HOST_STATUS_"))
                .or_default() += 1;
        }
        counts
    }

    /// Deployments by state, replicas by state, and the replicas' restarts.
    fn deployments(&self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>, i64) {
        let mut deployments = zeros(
            [
                DeploymentState::Pending,
                DeploymentState::Starting,
                DeploymentState::Running,
            ]
            .map(|s| s.as_str_name()),
            "DEPLOYMENT_STATE_",
        );
        let mut replicas = zeros(
            [
                ReplicaState::Pending,
                ReplicaState::Starting,
                ReplicaState::Running,
                ReplicaState::Restarting,
                ReplicaState::Lost,
            ]
            .map(|s| s.as_str_name()),
            "REPLICA_STATE_",
        );
        let mut restarts = 0;
        for deployment in self.store.live_deployments().unwrap_or_default() {
            *deployments
                .entry(label(deployment.state.as_str_name(), "DEPLOYMENT_STATE_"))
                .or_default() += 1;
            for replica in self.store.replicas(&deployment.name).unwrap_or_default() {
                *replicas
                    .entry(label(replica.state.as_str_name(), "REPLICA_STATE_"))
                    .or_default() += 1;
                restarts += i64::from(replica.restarts);
            }
        }
        (deployments, replicas, restarts)
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (deployments, replicas, restarts) = self.deployments();
        encode_by(
            &mut encoder,
            CAMPAIGNS,
            "Unfinished campaigns by state",
            self.campaigns(),
            |state| StateLabels { state },
        )?;
        encode_by(
            &mut encoder,
            HOSTS,
            "Registered hosts by status",
            self.hosts(),
            |status| StatusLabels { status },
        )?;
        encode_by(
            &mut encoder,
            DEPLOYMENTS,
            "Deployments not yet ended, by state",
            deployments,
            |state| StateLabels { state },
        )?;
        encode_by(
            &mut encoder,
            REPLICAS,
            "Replicas of deployments not yet ended, by state",
            replicas,
            |state| StateLabels { state },
        )?;
        encode_by(
            &mut encoder,
            QUEUE_DEPTH,
            "Pending runs of unfinished campaigns, by backend name",
            self.queues(),
            |backend| BackendLabels { backend },
        )?;
        let gauge = Gauge::<i64>::default();
        gauge.set(restarts);
        let metric = encoder.encode_descriptor(
            REPLICA_RESTARTS,
            "Restarts of the replicas of deployments not yet ended",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Encodes `counts` as one gauge family, a series per key.
fn encode_by<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    counts: BTreeMap<String, i64>,
    labels: impl Fn(String) -> L,
) -> Result<(), std::fmt::Error> {
    let family = Family::<L, Gauge>::default();
    for (key, count) in counts {
        family.get_or_create(&labels(key)).set(count);
    }
    let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(metric)
}

/// Every state in `names` at zero, so a series exists before its first
/// member and a dashboard shows 0 rather than nothing.
fn zeros<const N: usize>(names: [&str; N], prefix: &str) -> BTreeMap<String, i64> {
    names.into_iter().map(|n| (label(n, prefix), 0)).collect()
}

/// `RUN_STATE_SUCCEEDED` → `succeeded`.
fn label(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_labels_are_short_and_lowercase() {
        assert_eq!(
            label(RunState::Succeeded.as_str_name(), "RUN_STATE_"),
            "succeeded"
        );
        assert_eq!(
            label(HostStatus::Unreachable.as_str_name(), "HOST_STATUS_"),
            "unreachable"
        );
    }
}
