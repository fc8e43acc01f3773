//! The reconciler of one deployment: each pass reads the desired state from
//! the store, looks at every replica (its workload on its host, then its
//! health check) and acts on what differs, storing each replica's new state
//! and reason before the next pass. A pass never waits on anything but
//! calls bounded by timeouts, so a stop or scale is acted on at the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{
    ListImagesRequest, ListWorkloadsRequest, LogsRequest, RemoveWorkloadRequest, Workload,
    WorkloadRef, WorkloadState,
};
use berth_proto::orchestrator::v1::{DeploymentState, HostStatus, ReplicaState};
use futures::StreamExt;
use tokio::sync::Notify;

use super::health::{self, Target};
use super::recipe::{Recipe, RestartPolicy};
use super::replica::{DEPLOYMENT_LABEL, NotPlaced, elapsed_since, endpoint_host, start};
use super::{Deployments, now_ms};
use crate::error::OrchestratorError;
use crate::hosts::{AgentClient, describe_status};
use crate::manifest::RuntimeName;
use crate::scheduler::agent_did_not_answer;
use crate::store::deployments::{DeploymentRecord, ReplicaRecord, deployment_is_terminal};

mod place;
mod retire;
mod roll;
mod watch;

/// How often a deployment's hosts are searched for workloads of it that no
/// replica records (left by a lost host that came back, or by a crash
/// between a create and its record) to remove them.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The pause between looks while a replica is starting.
const STARTING_LOOK: Duration = Duration::from_millis(200);

/// Replicas a pass follows at once (looked at, started, placed): the
/// agent calls in flight per deployment.
const FOLLOWED_AT_ONCE: usize = 16;

/// The deployment's replicas as this pass has placed them so far. Replicas
/// followed at the same time choose their hosts from it one after another,
/// so that `spread` and fixed host ports see each other's choices.
struct Peers {
    replicas: std::sync::Mutex<Vec<ReplicaRecord>>,
    /// Whether a replica's own record counts among its peers: it does for
    /// an update's successor, which runs beside the replica it replaces.
    beside_itself: bool,
}

impl Peers {
    fn new(replicas: &[ReplicaRecord], beside_itself: bool) -> Self {
        Self {
            replicas: std::sync::Mutex::new(replicas.to_vec()),
            beside_itself,
        }
    }

    /// The host for `replica`, counted as its from now on in this pass.
    fn choose(
        &self,
        deployments: &Deployments,
        recipe: &Recipe,
        replica: &ReplicaRecord,
        avoid: &[String],
    ) -> Result<String, String> {
        let mut replicas = super::lock(&self.replicas);
        let except = (!self.beside_itself).then_some(replica.index);
        let host = deployments.choose_host(recipe, &replicas, except, avoid)?;
        if !self.beside_itself {
            match replicas.iter_mut().find(|r| r.index == replica.index) {
                Some(own) => own.host.clone_from(&host),
                None => {
                    let mut own = replica.clone();
                    own.host.clone_from(&host);
                    replicas.push(own);
                }
            }
        }
        Ok(host)
    }
}

/// What the reconciler keeps of a replica between passes. Lost with a
/// restart of the orchestrator, which only delays a verdict.
#[derive(Default)]
struct Followed {
    /// Failed health checks in a row.
    failed_checks: u32,
    /// Since when its host has not answered.
    host_silent_since: Option<Instant>,
    /// When it may be started (or placed) again.
    not_before: Option<Instant>,
    /// Hosts it was lost on, not to be placed on again soon.
    avoid: Vec<String>,
    /// Its replacement while the deployment is updated: started beside it,
    /// and followed as a replica of its own until healthy.
    successor: Option<Box<(ReplicaRecord, Followed)>>,
    /// Failed tries to replace it with the current generation.
    update_failures: u32,
}

impl Followed {
    fn waiting(&self) -> bool {
        self.not_before.is_some_and(|at| Instant::now() < at)
    }
}

/// What a pass says about the deployment.
enum Pass {
    /// Look again after this pause (or when woken).
    Again(Duration),
    Ended,
}

impl Deployments {
    pub(super) async fn reconcile_until_ended(self: &Arc<Self>, name: &str, wake: &Notify) {
        let mut followed: HashMap<u32, Followed> = HashMap::new();
        let mut last_sweep: Option<Instant> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let pause = match self.pass(name, &mut followed, &mut last_sweep).await {
                Ok(Pass::Again(pause)) => pause,
                Ok(Pass::Ended) if self.may_retire(name) => return,
                Ok(Pass::Ended) => {
                    followed.clear();
                    continue;
                }
                Err(error) => {
                    tracing::warn!(deployment = name, %error, "reconcile pass failed");
                    self.config.reconcile_interval
                }
            };
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn pass(
        &self,
        name: &str,
        followed: &mut HashMap<u32, Followed>,
        last_sweep: &mut Option<Instant>,
    ) -> Result<Pass, OrchestratorError> {
        let Some(record) = self.store.deployment(name)? else {
            return Ok(Pass::Ended);
        };
        if deployment_is_terminal(record.state) {
            return Ok(Pass::Ended);
        }
        let recipe = match self.stored_recipe(&record) {
            Ok(recipe) => recipe,
            Err(error) => {
                let message = format!("its stored recipe is refused now: {error}");
                self.set_state(name, DeploymentState::Failed, &message)?;
                return Ok(Pass::Ended);
            }
        };
        let mut replicas = self.store.replicas(name)?;
        if record.stopping {
            for (successor, _) in followed
                .values_mut()
                .filter_map(|f| f.successor.take())
                .map(|b| *b)
            {
                let _ = self.remove_replica(&recipe, &successor).await;
                self.release_held(&successor);
            }
            return self.stop_all(&recipe, &replicas).await;
        }
        self.scale_down(&recipe, &replicas, record.replicas, followed)
            .await?;
        self.follow_all(&recipe, &record, &mut replicas, followed)
            .await?;
        let rolling = self
            .roll(&recipe, record.generation, &mut replicas, followed)
            .await?;
        if last_sweep.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL) {
            *last_sweep = Some(Instant::now());
            let successors: Vec<&str> = followed
                .values()
                .filter_map(|f| f.successor.as_ref().map(|s| s.0.workload_id.as_str()))
                .collect();
            self.sweep(&recipe, &replicas, &successors).await;
        }
        let (state, mut message) = judge(&replicas, record.replicas);
        if let Some(rolling) = rolling {
            message = format!("{message}; {rolling}");
        }
        if state == DeploymentState::Failed {
            for replica in replicas.iter().filter(|r| r.state != ReplicaState::Failed) {
                self.retire(&recipe, replica, "the deployment failed")
                    .await?;
            }
            for replica in replicas.iter().filter(|r| r.state == ReplicaState::Failed) {
                let _ = self.remove_replica(&recipe, replica).await;
                self.release_held(replica);
            }
        }
        self.set_state(name, state, &message)?;
        if deployment_is_terminal(state) {
            return Ok(Pass::Ended);
        }
        let mut pause = self.config.reconcile_interval;
        if let Some(health) = &recipe.health {
            pause = pause.min(health.interval);
        }
        if replicas.iter().any(|r| r.state == ReplicaState::Starting) {
            // A replica just started is looked at soon, not a whole health
            // interval later: that is most of the time a restart takes.
            pause = pause.min(STARTING_LOOK);
        }
        let now = Instant::now();
        for state in followed.values() {
            if let Some(at) = state.not_before.filter(|at| *at > now) {
                pause = pause.min(at - now);
            }
        }
        Ok(Pass::Again(pause.max(Duration::from_millis(50))))
    }

    /// Removes the replicas past `desired` (a scale down).
    async fn scale_down(
        &self,
        recipe: &Recipe,
        replicas: &[ReplicaRecord],
        desired: u32,
        followed: &mut HashMap<u32, Followed>,
    ) -> Result<(), OrchestratorError> {
        for surplus in replicas.iter().filter(|r| r.index >= desired) {
            if let Err(reason) = self.remove_replica(recipe, surplus).await {
                tracing::warn!(
                    deployment = %recipe.name,
                    replica = surplus.index,
                    reason,
                    "scaled-down replica not removed; the sweep retries"
                );
            }
            self.release_held(surplus);
            self.store.delete_replica(&recipe.name, surplus.index)?;
            followed.remove(&surplus.index);
            self.publish(
                &recipe.name,
                Some(surplus.index),
                format!("replica {} removed: scaled down", surplus.index),
            );
        }
        Ok(())
    }

    /// Follows every replica of the deployment, `FOLLOWED_AT_ONCE` at a
    /// time, and stores and publishes what changed, in index order.
    async fn follow_all(
        &self,
        recipe: &Recipe,
        record: &DeploymentRecord,
        replicas: &mut Vec<ReplicaRecord>,
        followed: &mut HashMap<u32, Followed>,
    ) -> Result<(), OrchestratorError> {
        replicas.retain(|r| r.index < record.replicas);
        let name = record.name.as_str();
        let currents: Vec<ReplicaRecord> = (0..record.replicas)
            .map(|index| {
                replicas
                    .iter()
                    .find(|r| r.index == index)
                    .cloned()
                    .unwrap_or_else(|| {
                        let mut fresh = ReplicaRecord::pending(name, index, "to be placed");
                        fresh.generation = record.generation;
                        fresh
                    })
            })
            .collect();
        for index in 0..record.replicas {
            followed.entry(index).or_default();
        }
        let mut states: Vec<(&u32, &mut Followed)> = followed
            .iter_mut()
            .filter(|(index, _)| **index < record.replicas)
            .collect();
        states.sort_unstable_by_key(|(index, _)| **index);
        let peers = Peers::new(replicas, false);
        // Boxed up front: a closure in `map` would need to be general over
        // the borrows' lifetimes, which the compiler cannot prove for a
        // spawned (Send) task.
        let follows: Vec<_> = currents
            .iter()
            .cloned()
            .zip(states)
            .map(|(current, (_, state))| {
                Box::pin(self.follow(recipe, record.generation, current, &peers, state))
            })
            .collect();
        let nexts: Vec<ReplicaRecord> = futures::stream::iter(follows)
            .buffered(FOLLOWED_AT_ONCE)
            .collect()
            .await;
        for (current, next) in currents.into_iter().zip(nexts) {
            let index = current.index;
            let stored = replicas.iter().any(|r| r.index == index);
            if next != current || !stored {
                self.store.put_replica(&next)?;
                if next.state != current.state || next.reason != current.reason {
                    self.publish(
                        name,
                        Some(index),
                        format!("replica {index}: {}", next.reason),
                    );
                }
            }
            match replicas.iter_mut().find(|r| r.index == index) {
                Some(slot) => *slot = next,
                None => replicas.push(next),
            }
        }
        Ok(())
    }

    fn set_state(
        &self,
        name: &str,
        state: DeploymentState,
        message: &str,
    ) -> Result<(), OrchestratorError> {
        let before = self.store.deployment(name)?.map(|r| (r.state, r.message));
        self.store.set_deployment_state(name, state, message)?;
        if before
            .as_ref()
            .is_none_or(|(s, m)| *s != state || m != message)
        {
            if before.as_ref().is_none_or(|(s, _)| *s != state) {
                tracing::info!(
                    deployment = name,
                    state = super::state_name(state),
                    message,
                    "deployment state"
                );
            }
            self.publish(name, None, message.to_string());
        }
        Ok(())
    }

    /// The replica's next record, from a look at it.
    async fn follow(
        &self,
        recipe: &Recipe,
        generation: u32,
        replica: ReplicaRecord,
        peers: &Peers,
        state: &mut Followed,
    ) -> ReplicaRecord {
        match replica.state {
            ReplicaState::Completed | ReplicaState::Failed | ReplicaState::Stopped => replica,
            _ if state.waiting() => replica,
            // Building: an import cut short by a restart; placed again.
            ReplicaState::Pending
            | ReplicaState::Lost
            | ReplicaState::Building
            | ReplicaState::Unspecified => {
                self.place(recipe, generation, replica, peers, state).await
            }
            ReplicaState::Restarting => {
                self.start_again(recipe, generation, replica, peers, state)
                    .await
            }
            ReplicaState::Starting | ReplicaState::Running => {
                self.look_at(recipe, replica, state).await
            }
        }
    }
}

fn with_reason(replica: ReplicaRecord, reason: &str) -> ReplicaRecord {
    let mut next = replica;
    next.reason = reason.to_string();
    next
}

/// The host address and port a health check of `port_name` reaches.
fn endpoint_address(
    deployments: &Deployments,
    replica: &ReplicaRecord,
    port_name: &str,
) -> Option<(String, u16)> {
    let port = *replica.ports.get(port_name)?;
    if !replica.address.is_empty() {
        return Some((replica.address.clone(), port));
    }
    let view = deployments
        .hosts
        .views()
        .into_iter()
        .find(|v| v.record.name == replica.host)?;
    Some((endpoint_host(&view.record.address), port))
}

/// The deployment's state from its replicas'.
fn judge(replicas: &[ReplicaRecord], desired: u32) -> (DeploymentState, String) {
    if let Some(failed) = replicas.iter().find(|r| r.state == ReplicaState::Failed) {
        return (
            DeploymentState::Failed,
            format!("replica {} failed: {}", failed.index, failed.reason),
        );
    }
    let count = |state: ReplicaState| replicas.iter().filter(|r| r.state == state).count() as u32;
    let (running, completed) = (count(ReplicaState::Running), count(ReplicaState::Completed));
    if desired > 0 && completed == desired {
        return (DeploymentState::Completed, "every replica completed".into());
    }
    if running + completed == desired {
        return (
            DeploymentState::Running,
            format!("{running} of {desired} replicas running"),
        );
    }
    let first_not_running = replicas
        .iter()
        .find(|r| !matches!(r.state, ReplicaState::Running | ReplicaState::Completed));
    let detail = first_not_running
        .map(|r| format!("; replica {}: {}", r.index, r.reason))
        .unwrap_or_default();
    let state = if replicas.iter().all(|r| r.workload_id.is_empty()) {
        DeploymentState::Pending
    } else {
        DeploymentState::Starting
    };
    (
        state,
        format!("{running} of {desired} replicas running{detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(index: u32, state: ReplicaState) -> ReplicaRecord {
        let mut replica = ReplicaRecord::pending("web", index, "why");
        replica.state = state;
        if state != ReplicaState::Pending {
            replica.workload_id = format!("w{index}");
        }
        replica
    }

    #[test]
    fn a_deployment_is_as_its_replicas_are() {
        use ReplicaState as R;
        let judged = |replicas: &[ReplicaRecord], desired| judge(replicas, desired).0;
        assert_eq!(
            judged(&[replica(0, R::Pending)], 1),
            DeploymentState::Pending
        );
        assert_eq!(
            judged(&[replica(0, R::Running), replica(1, R::Starting)], 2),
            DeploymentState::Starting
        );
        assert_eq!(
            judged(&[replica(0, R::Running), replica(1, R::Running)], 2),
            DeploymentState::Running
        );
        assert_eq!(
            judged(&[replica(0, R::Running), replica(1, R::Failed)], 2),
            DeploymentState::Failed
        );
        assert_eq!(
            judged(&[replica(0, R::Completed)], 1),
            DeploymentState::Completed
        );
        assert_eq!(judged(&[], 0), DeploymentState::Running);
        let (_, message) = judge(&[replica(0, R::Running), replica(1, R::Restarting)], 2);
        assert_eq!(message, "1 of 2 replicas running; replica 1: why");
    }
}
