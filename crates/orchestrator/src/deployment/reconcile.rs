//! The reconciler of one deployment: each pass reads the desired state from
//! the store, looks at every replica (its workload on its host, then its
//! health check) and acts on what differs, storing each replica's new state
//! and reason before the next pass. A pass never waits on anything but
//! calls bounded by timeouts, so a stop or scale is acted on at the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{
    ListImagesRequest, ListWorkloadsRequest, LogsRequest, RemoveWorkloadRequest, WorkloadRef,
    WorkloadState,
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
use crate::scheduler::agent_did_not_answer;
use crate::store::deployments::{ReplicaRecord, deployment_is_terminal};

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
        for surplus in replicas.iter().filter(|r| r.index >= record.replicas) {
            if let Err(reason) = self.remove_replica(&recipe, surplus).await {
                tracing::warn!(
                    deployment = name,
                    replica = surplus.index,
                    reason,
                    "scaled-down replica not removed; the sweep retries"
                );
            }
            self.release_held(surplus);
            self.store.delete_replica(name, surplus.index)?;
            followed.remove(&surplus.index);
            self.publish(
                name,
                Some(surplus.index),
                format!("replica {} removed: scaled down", surplus.index),
            );
        }
        replicas.retain(|r| r.index < record.replicas);
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
        let peers = Peers::new(&replicas, false);
        // Boxed up front: a closure in `map` would need to be general over
        // the borrows' lifetimes, which the compiler cannot prove for a
        // spawned (Send) task.
        let follows: Vec<_> = currents
            .iter()
            .cloned()
            .zip(states)
            .map(|(current, (_, state))| {
                Box::pin(self.follow(&recipe, record.generation, current, &peers, state))
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

    /// Places the replica on the host that fits and starts it there, made
    /// from the recipe of `generation`.
    async fn place(
        &self,
        recipe: &Recipe,
        generation: u32,
        replica: ReplicaRecord,
        peers: &Peers,
        state: &mut Followed,
    ) -> ReplicaRecord {
        let host = match peers.choose(self, recipe, &replica, &state.avoid) {
            Ok(host) => host,
            Err(reason) => return with_reason(replica, &format!("waiting for a host: {reason}")),
        };
        let mut client = match self.hosts.client(&host).await {
            Ok(client) => client,
            Err(reason) => {
                return with_reason(replica, &format!("waiting for host `{host}`: {reason}"));
            }
        };
        let mut placed = replica.clone();
        placed.host.clone_from(&host);
        placed.workload_id.clear();
        placed.generation = generation;
        placed.ports = match self.ports_for(recipe, &host, replica.index) {
            Ok(ports) => ports,
            Err(reason) => return with_reason(replica, &format!("waiting for a port: {reason}")),
        };
        if let Some(request) = &recipe.gpus {
            let host_gpus = self.hosts.gpus(&host);
            match self
                .gpu_leases
                .hold_for_replica(&host, &host_gpus, request, &recipe.name)
            {
                Ok(gpus) => placed.gpus = gpus,
                Err(reason) => {
                    self.release_held(&placed);
                    return with_reason(replica, &format!("waiting for GPUs: {reason}"));
                }
            }
        }
        if let Err(not_placed) = self.import_image(recipe, &mut client, &placed).await {
            self.release_held(&placed);
            return match not_placed {
                NotPlaced::Waiting(reason) => with_reason(replica, &format!("waiting: {reason}")),
                NotPlaced::Refused(reason) => self.count_failure(recipe, replica, state, &reason),
            };
        }
        match self
            .create_replica(recipe, &mut client, &host, &placed)
            .await
        {
            Ok(workload) => {
                *state = Followed {
                    avoid: std::mem::take(&mut state.avoid),
                    ..Followed::default()
                };
                placed.workload_id = workload.id;
                placed.state = ReplicaState::Starting;
                placed.since_ms = now_ms();
                placed.reason = format!("started on host `{host}` as `{}`", workload.name);
                placed
            }
            Err(NotPlaced::Waiting(reason)) => {
                self.release_held(&placed);
                with_reason(replica, &format!("waiting: {reason}"))
            }
            Err(NotPlaced::Refused(reason)) => {
                self.release_held(&placed);
                self.count_failure(recipe, replica, state, &reason)
            }
        }
    }

    /// Imports the recipe's image archive into the engine of the replica's
    /// host when it lacks the image, the replica (and the deployment)
    /// Building meanwhile.
    async fn import_image(
        &self,
        recipe: &Recipe,
        client: &mut AgentClient,
        replica: &ReplicaRecord,
    ) -> Result<(), NotPlaced> {
        let Some(import) = &recipe.import else {
            return Ok(());
        };
        let host = &replica.host;
        let listed = self
            .bounded(client.list_images(ListImagesRequest {
                page_size: 1000,
                page_token: String::new(),
            }))
            .await
            .map_err(|s| {
                NotPlaced::Waiting(format!(
                    "host `{host}`: listing images: {}",
                    describe_status(&s)
                ))
            })?
            .into_inner();
        let present = listed
            .images
            .iter()
            .flat_map(|image| &image.references)
            .any(|reference| reference.ends_with(&recipe.image));
        if present {
            return Ok(());
        }
        let mut building = replica.clone();
        building.state = ReplicaState::Building;
        building.since_ms = now_ms();
        building.reason = format!(
            "importing {} as `{}` into host `{host}`'s engine",
            import.archive, recipe.image
        );
        let stored = self.store.put_replica(&building).and_then(|()| {
            self.store.set_deployment_state(
                &recipe.name,
                DeploymentState::Building,
                &building.reason,
            )
        });
        if let Err(error) = stored {
            return Err(NotPlaced::Waiting(error.to_string()));
        }
        self.publish(&recipe.name, Some(replica.index), building.reason.clone());
        let started = Instant::now();
        let chunks = super::replica::archive_chunks(recipe, import)
            .await
            .map_err(NotPlaced::Refused)?;
        client.import_image(chunks).await.map_err(|s| {
            NotPlaced::Refused(format!(
                "host `{host}`: importing {}: {}",
                import.archive,
                describe_status(&s)
            ))
        })?;
        tracing::info!(deployment = %recipe.name, host, archive = import.archive, took = ?started.elapsed(), "image imported");
        Ok(())
    }

    /// Starts a replica that went down again, on its host; one whose
    /// workload is gone is created again.
    async fn start_again(
        &self,
        recipe: &Recipe,
        generation: u32,
        replica: ReplicaRecord,
        peers: &Peers,
        state: &mut Followed,
    ) -> ReplicaRecord {
        if replica.workload_id.is_empty() {
            return self.place(recipe, generation, replica, peers, state).await;
        }
        let mut client = match self.hosts.client(&replica.host).await {
            Ok(client) => client,
            Err(reason) => return self.host_silent(recipe, replica, state, &reason),
        };
        match self.bounded(start(&mut client, &replica.workload_id)).await {
            Ok(_) => {
                state.failed_checks = 0;
                state.host_silent_since = None;
                let mut started = replica;
                started.state = ReplicaState::Starting;
                started.since_ms = now_ms();
                started.reason = format!("started again (restart {})", started.restarts);
                started
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                let mut gone = replica;
                gone.workload_id.clear();
                // Placed again, on the same host when it still fits.
                self.place(recipe, generation, gone, peers, state).await
            }
            Err(status) if agent_did_not_answer(status.code()) => {
                self.host_silent(recipe, replica, state, &describe_status(&status))
            }
            Err(status) => {
                let reason = format!(
                    "host `{}`: starting again: {}",
                    replica.host,
                    describe_status(&status)
                );
                self.count_failure(recipe, replica, state, &reason)
            }
        }
    }

    /// Looks at a started replica: its workload, then its health check.
    async fn look_at(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
    ) -> ReplicaRecord {
        let mut client = match self.hosts.client(&replica.host).await {
            Ok(client) => client,
            Err(reason) => return self.host_silent(recipe, replica, state, &reason),
        };
        let inspected = self
            .bounded(client.inspect_workload(WorkloadRef {
                id: replica.workload_id.clone(),
            }))
            .await;
        let workload = match inspected {
            Ok(workload) => workload.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return self
                    .went_down(
                        recipe,
                        replica,
                        state,
                        &mut client,
                        "its workload is gone".into(),
                        None,
                        false,
                    )
                    .await;
            }
            Err(status) if agent_did_not_answer(status.code()) => {
                return self.host_silent(recipe, replica, state, &describe_status(&status));
            }
            Err(status) => {
                tracing::warn!(deployment = %recipe.name, replica = replica.index, status = %describe_status(&status), "inspect refused");
                return replica;
            }
        };
        state.host_silent_since = None;
        if workload.state != WorkloadState::Running as i32 {
            let last_words = self.last_lines(&mut client, &replica.workload_id).await;
            let why = match workload.exit_code {
                Some(code) if workload.oom_killed => format!("was OOM-killed (exit code {code})"),
                Some(code) => format!("exited with code {code}"),
                None => format!(
                    "is {}",
                    WorkloadState::try_from(workload.state)
                        .map_or("in an unknown state", |s| s.as_str_name())
                ),
            };
            let why = if last_words.is_empty() {
                why
            } else {
                format!("{why} (its last words: {last_words})")
            };
            return self
                .went_down(
                    recipe,
                    replica,
                    state,
                    &mut client,
                    why,
                    workload.exit_code,
                    false,
                )
                .await;
        }
        let Some(check) = &recipe.health else {
            return self.healthy(recipe, replica, "running (the recipe has no health check)");
        };
        let address = endpoint_address(self, &replica, check.port.as_str());
        let target = Target {
            address: address.as_ref().map(|(host, port)| (host.as_str(), *port)),
            client: &mut client,
            workload_id: &replica.workload_id,
        };
        match health::check(check, target).await {
            Ok(()) => {
                state.failed_checks = 0;
                self.healthy(recipe, replica, "running and healthy")
            }
            Err(why) => {
                let starting = replica.state == ReplicaState::Starting
                    && elapsed_since(replica.since_ms) < check.start_period;
                if starting {
                    return replica;
                }
                state.failed_checks += 1;
                if state.failed_checks < check.retries {
                    return replica;
                }
                let why = format!(
                    "unhealthy: {} failed checks in a row, the last: {why}",
                    state.failed_checks
                );
                self.went_down(recipe, replica, state, &mut client, why, None, true)
                    .await
            }
        }
    }

    /// The last lines a workload printed, joined and cut short, to say why
    /// it exited; empty when its agent has none to give.
    async fn last_lines(&self, client: &mut AgentClient, workload_id: &str) -> String {
        const LINES: u32 = 3;
        const MOST_CHARS: usize = 400;
        let request = LogsRequest {
            workload_id: workload_id.to_string(),
            follow: false,
            tail: LINES,
            since: None,
        };
        let read = async {
            let mut stream = client.logs(request).await?.into_inner();
            let mut lines = Vec::new();
            while let Some(line) = stream.message().await? {
                lines.push(line.line);
            }
            Ok(lines)
        };
        let lines = self.bounded(read).await.unwrap_or_default();
        let joined = lines.join(" | ");
        match joined.char_indices().nth(MOST_CHARS) {
            Some((cut, _)) => format!("{}…", &joined[..cut]),
            None => joined,
        }
    }

    /// A replica that runs and passes its check: Running, and its restarts
    /// in a row forgotten once it has run `restart.reset_after`.
    fn healthy(&self, recipe: &Recipe, replica: ReplicaRecord, reason: &str) -> ReplicaRecord {
        let mut next = replica;
        if next.state != ReplicaState::Running {
            next.state = ReplicaState::Running;
            next.since_ms = now_ms();
            next.reason = reason.to_string();
        } else if next.in_a_row > 0 && elapsed_since(next.since_ms) >= recipe.restart.reset_after {
            next.in_a_row = 0;
        }
        next
    }

    /// A replica whose workload exited, is gone or is unhealthy: completed,
    /// failed or restarted after its backoff, as its restart policy says.
    #[allow(clippy::too_many_arguments)]
    async fn went_down(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        client: &mut AgentClient,
        why: String,
        exit_code: Option<i32>,
        still_running: bool,
    ) -> ReplicaRecord {
        let policy = recipe.restart.policy;
        let mut next = replica;
        next.since_ms = now_ms();
        if exit_code == Some(0) && policy != RestartPolicy::Always {
            next.state = ReplicaState::Completed;
            next.reason = format!("{why}: done (restart policy {policy:?})");
            return next;
        }
        if policy == RestartPolicy::Never {
            next.state = ReplicaState::Failed;
            next.reason = format!("{why} (restart policy never)");
            return next;
        }
        if still_running {
            let stop = berth_proto::agent::v1::StopWorkloadRequest {
                id: next.workload_id.clone(),
                timeout: prost_types::Duration::try_from(recipe.stop_grace).ok(),
            };
            if let Err(status) = client.stop_workload(stop).await {
                tracing::warn!(deployment = %recipe.name, replica = next.index, status = %describe_status(&status), "could not stop an unhealthy replica");
            }
        }
        state.failed_checks = 0;
        self.count_failure(recipe, next, state, &why)
    }

    /// One more restart in a row: Restarting after the backoff, or Failed
    /// past `restart.max_restarts`.
    fn count_failure(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        why: &str,
    ) -> ReplicaRecord {
        let restart = &recipe.restart;
        let mut next = replica;
        next.in_a_row += 1;
        next.since_ms = now_ms();
        if next.in_a_row > restart.max_restarts {
            next.state = ReplicaState::Failed;
            next.reason = format!(
                "{why}; gave up after {} restarts in a row (restart.max_restarts)",
                restart.max_restarts
            );
            return next;
        }
        let backoff = restart.backoff_before(next.in_a_row);
        state.not_before = Some(Instant::now() + backoff);
        if !next.workload_id.is_empty() {
            next.restarts += 1;
            next.state = ReplicaState::Restarting;
        }
        next.reason = format!(
            "{why}; try {} of {} in {}",
            next.in_a_row,
            restart.max_restarts,
            humantime::format_duration(backoff)
        );
        next
    }

    /// The replica's host does not answer: after `host_lost_grace` (or at
    /// once when the host was deregistered) the replica is Lost and placed
    /// elsewhere; one that owns GPUs waits for the host to be deregistered,
    /// since its first copy may still hold them.
    fn host_silent(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        reason: &str,
    ) -> ReplicaRecord {
        let host = replica.host.clone();
        let silent_for = state
            .host_silent_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        let registered = self.hosts.views().iter().any(|v| v.record.name == host);
        if registered && silent_for < self.config.host_lost_grace {
            return replica;
        }
        if registered && recipe.owns_gpus() {
            return with_reason(
                replica,
                &format!(
                    "host `{host}` does not answer; a replica that owns GPUs moves only once its host is deregistered"
                ),
            );
        }
        self.release_held(&replica);
        state.host_silent_since = None;
        state.avoid.push(host.clone());
        let mut next = replica;
        next.state = ReplicaState::Lost;
        next.restarts += 1;
        next.since_ms = now_ms();
        next.reason = if registered {
            format!(
                "host `{host}` has not answered for {} ({reason}); placing the replica elsewhere",
                humantime::format_duration(self.config.host_lost_grace)
            )
        } else {
            format!("host `{host}` was deregistered; placing the replica elsewhere")
        };
        next
    }

    /// Removes a replica's workload and records it Stopped.
    async fn retire(
        &self,
        recipe: &Recipe,
        replica: &ReplicaRecord,
        why: &str,
    ) -> Result<bool, OrchestratorError> {
        let removed = self.remove_replica(recipe, replica).await;
        let mut next = replica.clone();
        let done = match removed {
            Ok(()) => {
                self.release_held(replica);
                next.state = ReplicaState::Stopped;
                next.reason = format!("removed: {why}");
                true
            }
            Err(reason) => {
                next.reason = format!("not removed yet ({why}): {reason}");
                false
            }
        };
        next.since_ms = now_ms();
        self.store.put_replica(&next)?;
        self.publish(&recipe.name, Some(replica.index), next.reason);
        Ok(done)
    }

    /// Stops every replica; the deployment is Cancelled once all are
    /// removed (a host that does not answer is tried again next pass, and
    /// given up when it is deregistered).
    async fn stop_all(
        &self,
        recipe: &Recipe,
        replicas: &[ReplicaRecord],
    ) -> Result<Pass, OrchestratorError> {
        let mut left = 0;
        let registered: Vec<String> = self
            .hosts
            .views()
            .into_iter()
            .map(|v| v.record.name)
            .collect();
        // All at once: each may take its stop grace period. A replica whose
        // host was deregistered is given up with its host.
        let retiring = replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Stopped)
            .filter(|r| r.host.is_empty() || registered.contains(&r.host))
            .map(|replica| self.retire(recipe, replica, "the deployment was stopped"));
        for retired in futures::future::join_all(retiring).await {
            left += usize::from(!retired?);
        }
        if left > 0 {
            self.set_state(
                &recipe.name,
                DeploymentState::Starting,
                &format!("stopping: {left} replica(s) not removed yet"),
            )?;
            return Ok(Pass::Again(self.config.reconcile_interval));
        }
        self.set_state(
            &recipe.name,
            DeploymentState::Cancelled,
            "stopped: every replica removed",
        )?;
        Ok(Pass::Ended)
    }

    /// Removes the deployment's workloads that no replica records (nor is
    /// an update's successor), on every host that answers.
    async fn sweep(&self, recipe: &Recipe, replicas: &[ReplicaRecord], successors: &[&str]) {
        let known: Vec<&str> = replicas
            .iter()
            .map(|r| r.workload_id.as_str())
            .chain(successors.iter().copied())
            .collect();
        for view in self.hosts.views() {
            if view.status != HostStatus::Ready {
                continue;
            }
            let Ok(mut client) = self.hosts.client(&view.record.name).await else {
                continue;
            };
            let mut page_token = String::new();
            loop {
                let listed = self
                    .bounded(client.list_workloads(ListWorkloadsRequest {
                        page_size: 1000,
                        page_token: page_token.clone(),
                    }))
                    .await;
                let Ok(page) = listed else {
                    break;
                };
                let page = page.into_inner();
                for workload in page.workloads {
                    let ours = workload
                        .spec
                        .as_ref()
                        .and_then(|s| s.labels.get(DEPLOYMENT_LABEL))
                        .is_some_and(|d| *d == recipe.name);
                    if ours && !known.contains(&workload.id.as_str()) {
                        tracing::warn!(deployment = %recipe.name, host = %view.record.name, workload = %workload.id, "removing a workload no replica records");
                        let removal = RemoveWorkloadRequest {
                            id: workload.id,
                            force: true,
                        };
                        let _ = self.bounded(client.remove_workload(removal)).await;
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
    }

    /// One step of an update: while every replica runs, the first one of an
    /// older generation gets a successor from the current recipe, placed
    /// beside it; once the successor is healthy the old workload is removed
    /// and the successor takes the replica's place. A successor that does
    /// not come up is removed and tried again after the backoff, at most
    /// `restart.max_restarts` times; then the replica keeps its generation.
    /// Returns how the update stands, for the deployment's message.
    async fn roll(
        &self,
        recipe: &Recipe,
        generation: u32,
        replicas: &mut [ReplicaRecord],
        followed: &mut HashMap<u32, Followed>,
    ) -> Result<Option<String>, OrchestratorError> {
        let outdated = replicas
            .iter()
            .filter(|r| r.generation < generation && !r.workload_id.is_empty())
            .count();
        if outdated == 0 {
            return Ok(None);
        }
        let progress = format!(
            "updating to generation {generation}: {} of {} replaced",
            replicas.len() - outdated,
            replicas.len()
        );
        let settled = replicas
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Running | ReplicaState::Completed));
        let Some(slot) = replicas
            .iter()
            .position(|r| r.generation < generation && r.state == ReplicaState::Running)
            .filter(|_| settled)
        else {
            return Ok(Some(progress));
        };
        let old = replicas[slot].clone();
        let state = followed.entry(old.index).or_default();
        if state.update_failures > recipe.restart.max_restarts {
            return Ok(Some(format!(
                "the update to generation {generation} was given up for replica {} after {} tries; deploy again to retry",
                old.index, state.update_failures
            )));
        }
        if state.waiting() {
            return Ok(Some(progress));
        }
        let (successor, mut successor_state) = match state.successor.take() {
            Some(pair) => *pair,
            None => {
                let mut fresh = old.clone();
                fresh.state = ReplicaState::Pending;
                let mut successor_state = Followed::default();
                // It runs beside the replica it replaces, which counts.
                let peers = Peers::new(replicas, true);
                let placed = self
                    .place(recipe, generation, fresh, &peers, &mut successor_state)
                    .await;
                if placed.state != ReplicaState::Starting {
                    return Ok(Some(self.update_failed(recipe, state, &placed, generation)));
                }
                (placed, successor_state)
            }
        };
        let looked = self.look_at(recipe, successor, &mut successor_state).await;
        match looked.state {
            ReplicaState::Starting => {
                state.successor = Some(Box::new((looked, successor_state)));
                Ok(Some(progress))
            }
            ReplicaState::Running => {
                if let Err(reason) = self.remove_replica(recipe, &old).await {
                    tracing::warn!(deployment = %recipe.name, replica = old.index, reason, "the replaced workload was not removed; the sweep retries");
                }
                self.release_held(&old);
                let mut updated = looked;
                updated.restarts = old.restarts;
                updated.in_a_row = 0;
                updated.reason = format!("updated to generation {generation}, running and healthy");
                self.store.put_replica(&updated)?;
                self.publish(&recipe.name, Some(updated.index), updated.reason.clone());
                state.update_failures = 0;
                replicas[slot] = updated;
                Ok(Some(progress))
            }
            _ => {
                if let Err(reason) = self.remove_replica(recipe, &looked).await {
                    tracing::warn!(deployment = %recipe.name, replica = old.index, reason, "a failed successor was not removed; the sweep retries");
                }
                self.release_held(&looked);
                Ok(Some(self.update_failed(recipe, state, &looked, generation)))
            }
        }
    }

    /// A successor that did not come up: counted, and tried again after the
    /// backoff.
    fn update_failed(
        &self,
        recipe: &Recipe,
        state: &mut Followed,
        successor: &ReplicaRecord,
        generation: u32,
    ) -> String {
        state.update_failures += 1;
        let backoff = recipe.restart.backoff_before(state.update_failures);
        state.not_before = Some(Instant::now() + backoff);
        let message = format!(
            "replica {} to generation {generation}: try {} failed: {}",
            successor.index, state.update_failures, successor.reason
        );
        tracing::warn!(deployment = %recipe.name, message, "update step failed");
        message
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
