//! One worker per backend of a campaign: it places the backend on a host
//! (adopting its recorded placement when the workload is still there, else
//! choosing the host that fits and creating and starting the workload from
//! the manifest), then takes the backend's pending runs in order, starting
//! the backend again when it went down between runs and placing it again
//! when a run found it lost. At the end the workload is removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent::v1::{
    CreateWorkloadRequest, Gpu, RemoveWorkloadRequest, Workload, WorkloadRef, WorkloadState,
};
use berth_proto::common::v1::{self as common, WorkloadSpec};
use berth_proto::orchestrator::v1::{HostStatus, Run};
use tokio::time::Instant;
use tracing::Instrument;

use super::array;
use super::run::Unprepared;
use super::{CampaignRun, Interrupted, Placed, Scheduler, agent_did_not_answer, index_list};
use crate::backend_watch::BackendWatch;
use crate::deployment::Serving;
use crate::error::OrchestratorError;
use crate::gpu_leases;
use crate::hosts::{AgentClient, describe_status};
use crate::manifest::{Backend, Plan};
use crate::placement;
use crate::store::{Placement, StoreError};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How often a backend waiting to run (a pending SLURM allocation) is
/// looked at again.
const PENDING_POLL: Duration = Duration::from_secs(1);

/// Why a backend is not placed.
enum PlaceError {
    /// No host fits or answers now: the backend waits for one.
    Waiting(String),
    /// A host's agent answered and refused to create or start the backend's
    /// workload (no such image, a spec the engine rejects, a command that
    /// cannot start): the same spec is likely refused again.
    Refused { host: String, reason: String },
}

/// How a failed call to place a backend on `host` counts: an agent that did
/// not answer (the codes `exec_refused` takes for a lost host, and an
/// engine that is down) is waited for; any other answer is a refusal.
fn place_error(host: &str, status: &tonic::Status, reason: String) -> PlaceError {
    if agent_did_not_answer(status.code()) {
        PlaceError::Waiting(reason)
    } else {
        PlaceError::Refused {
            host: host.to_string(),
            reason,
        }
    }
}

fn waiting(error: StoreError) -> PlaceError {
    PlaceError::Waiting(error.to_string())
}

/// What the worker does after a failed try to place its backend.
enum AfterRefusal {
    /// Say why and try again after the backoff.
    Retry(String),
    /// The backend was refused too often: its runs were failed.
    GaveUp,
}

impl Scheduler {
    pub(super) async fn backend_worker(
        self: Arc<Self>,
        ctx: Arc<CampaignRun>,
        backend: String,
    ) -> Result<(), OrchestratorError> {
        self.reconcile_in_flight(&ctx, &backend).await?;
        let mut placed: Option<Placed> = None;
        let mut backoff = FIRST_BACKOFF;
        // Refused tries to start the backend, per host, since it was last placed.
        let mut refusals: HashMap<String, u32> = HashMap::new();
        let mut previous: Option<Run> = None;
        // Since when the backend has been without a run: the gap before the
        // next run counts from here.
        let mut idle_since = Instant::now();
        // What the campaign's status says while the backend's runtime fails.
        let mut runtime_wait = String::new();
        loop {
            if ctx.token.is_cancelled() {
                break;
            }
            let Some(run) = self.store.next_pending_run(&ctx.id, &backend)? else {
                break;
            };
            // Normally settled right after the run that ends its warmup or
            // cycles; this catches a restart that came between that run and
            // the settling.
            if self.settle(&ctx, &run, &backend)? {
                continue;
            }
            // A job array serves the runs it holds whatever its state (a
            // task that ended is read from what it left); any other run
            // needs an array of its own.
            let array_key = ctx
                .plan
                .backend(&backend)
                .and_then(Backend::array)
                .map(|_| array::next_key(&run));
            let mut placement = match placed.take() {
                Some(placement) => match (&array_key, placement.watch.down()) {
                    (Some(key), _) if placement.array_keys.contains(key) => placement,
                    (Some(_), _) => {
                        self.remove_backend(&ctx.id, &backend, placement).await;
                        continue;
                    }
                    (None, None) => placement,
                    (None, Some(why)) => {
                        self.went_down(&ctx.id, &placement, &why);
                        continue;
                    }
                },
                None => match self.place(&ctx, &backend, &run, &refusals).await {
                    Ok(placement) => {
                        backoff = FIRST_BACKOFF;
                        refusals.clear();
                        self.mark_running(&ctx.id)?;
                        idle_since = Instant::now();
                        placement
                    }
                    Err(error) => {
                        let message = match self.not_placed(&ctx, &backend, error, &mut refusals)? {
                            AfterRefusal::Retry(message) => message,
                            AfterRefusal::GaveUp => continue,
                        };
                        self.store.set_campaign_message(&ctx.id, &message)?;
                        self.publish(&ctx.id, message);
                        tokio::select! {
                            () = ctx.token.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.config.max_placement_backoff);
                        continue;
                    }
                },
            };
            // A runtime its host's agent says fails now (slurmrestd down):
            // the run waits, not dispatched, so it is not charged an
            // attempt for an outage the heartbeat already knows of.
            let runtime = ctx.plan.backend(&backend).map(|b| b.runtime.proto());
            if let Some(why) =
                runtime.and_then(|runtime| self.hosts.runtime_failing(&placement.host, runtime))
            {
                let message = format!("backend `{backend}` waits for its runtime: {why}");
                if message != runtime_wait {
                    self.store.set_campaign_message(&ctx.id, &message)?;
                    self.publish(&ctx.id, message.clone());
                    runtime_wait = message;
                }
                placed = Some(placement);
                tokio::select! {
                    () = ctx.token.cancelled() => break,
                    () = tokio::time::sleep(PENDING_POLL) => {}
                }
                continue;
            }
            if !runtime_wait.is_empty() {
                runtime_wait.clear();
                self.mark_running(&ctx.id)?;
            }
            let gap = gap_before(&ctx.plan, previous.as_ref(), &run).map(|gap| (idle_since, gap));
            let prepared = match self.prepare(&ctx, &run, &mut placement, gap).await {
                Ok(prepared) => prepared,
                Err(Unprepared::Stopped) => {
                    placed = Some(placement);
                    break;
                }
                // Started again at once; the gap starts over after it.
                Err(Unprepared::WentDown) => {
                    placed = Some(placement);
                    continue;
                }
            };
            let span = prepared.span.clone();
            let executed = self
                .execute(&ctx, &run, &placement, prepared)
                .instrument(span)
                .await?;
            idle_since = Instant::now();
            match executed {
                None => {
                    placed = Some(placement);
                    self.settle(&ctx, &run, &backend)?;
                }
                Some(why) => self.lost(
                    &ctx,
                    &backend,
                    (&placement.host, &placement.assigned_gpus),
                    why,
                )?,
            }
            previous = Some(run);
        }
        if let Some(placement) = placed.filter(|_| !self.shutdown.is_cancelled()) {
            self.remove_backend(&ctx.id, &backend, placement).await;
        }
        Ok(())
    }

    /// Ends the warmup or the measured cycles of the run's (config,
    /// backend) when its recorded runs say so; true when they ended.
    fn settle(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        backend: &str,
    ) -> Result<bool, OrchestratorError> {
        if run.warmup {
            self.settle_warmup(ctx, &run.config, backend)
        } else {
            self.settle_cycles(ctx, &run.config, backend)
        }
    }

    /// Counts a refusal against its host; after
    /// `scheduler.max_create_attempts` refused tries the backend's runs fail
    /// rather than wait forever for a host.
    fn not_placed(
        &self,
        ctx: &CampaignRun,
        backend: &str,
        error: PlaceError,
        refusals: &mut HashMap<String, u32>,
    ) -> Result<AfterRefusal, OrchestratorError> {
        let message = match error {
            PlaceError::Waiting(reason) => {
                format!("backend `{backend}` waits for a host: {reason}")
            }
            PlaceError::Refused { host, reason } => {
                *refusals.entry(host).or_default() += 1;
                let tries: u32 = refusals.values().sum();
                let most = self.config.max_create_attempts.max(1);
                if tries >= most {
                    self.fail_unstartable(ctx, backend, tries, &reason)?;
                    return Ok(AfterRefusal::GaveUp);
                }
                format!(
                    "backend `{backend}` was refused (try {tries} of {most}, scheduler.max_create_attempts): {reason}"
                )
            }
        };
        Ok(AfterRefusal::Retry(message))
    }

    /// What an interrupted run says about where it ran: an agent that did
    /// not answer marks its host unreachable; a backend (or agent) that lost
    /// the exec gets the backend placed again. Either way the host's load
    /// drops by the backend.
    pub(super) fn lost(
        &self,
        ctx: &CampaignRun,
        backend: &str,
        (host, assigned_gpus): (&str, &[u32]),
        why: Interrupted,
    ) -> Result<(), OrchestratorError> {
        match why {
            Interrupted::HostLost(reason) => {
                self.hosts.mark_unreachable(host, &reason);
                self.publish(
                    &ctx.id,
                    format!("host `{host}` lost ({reason}); backend `{backend}` goes to a host that answers"),
                );
            }
            Interrupted::BackendLost(reason) => {
                tracing::warn!(campaign = %ctx.id, backend, reason, "backend lost; placing it again");
                self.store.clear_placement(&ctx.id, backend)?;
                self.publish(
                    &ctx.id,
                    format!(
                        "backend `{backend}` on host `{host}` lost ({reason}); placing it again"
                    ),
                );
            }
        }
        self.release_host(host, assigned_gpus);
        Ok(())
    }

    /// A placed backend went down between runs: its recorded placement is
    /// kept, so placing it again starts the same workload (or makes a new
    /// one if it was removed).
    fn went_down(&self, campaign_id: &str, placed: &Placed, why: &str) {
        tracing::warn!(
            campaign = campaign_id,
            host = placed.host,
            why,
            "backend went down; starting it again"
        );
        self.publish(
            campaign_id,
            format!("{why}; starting it again before its next run"),
        );
        self.release_host(&placed.host, &placed.assigned_gpus);
    }

    fn count_placed(&self, host: &str) {
        *self
            .host_load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(host.to_string())
            .or_default() += 1;
    }

    fn release_host(&self, host: &str, assigned_gpus: &[u32]) {
        self.gpu_leases.unassign(host, assigned_gpus);
        if let Some(load) = self
            .host_load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(host)
        {
            *load = load.saturating_sub(1);
        }
    }

    /// Reuses the backend's recorded placement if its workload still runs,
    /// otherwise creates and starts it on the least-loaded host that fits,
    /// among those that refused it the fewest times (`refusals`).
    async fn place(
        &self,
        ctx: &CampaignRun,
        backend_name: &str,
        run: &Run,
        refusals: &HashMap<String, u32>,
    ) -> Result<Placed, PlaceError> {
        let backend = ctx.plan.backend(backend_name).ok_or_else(|| {
            PlaceError::Waiting(format!("backend `{backend_name}` is not in the manifest"))
        })?;
        let (beside, measured) = self.beside_deployment(backend)?;
        let backend = &beside;
        let recorded = self
            .store
            .placements(&ctx.id)
            .map_err(waiting)?
            .into_iter()
            .find(|p| p.backend == backend_name);
        if let Some(recorded) = recorded {
            if let Some(placed) = self.adopt(ctx, backend, &recorded, &measured, run).await? {
                return Ok(placed);
            }
            self.store
                .clear_placement(&ctx.id, backend_name)
                .map_err(waiting)?;
        }
        let host = self
            .choose_host(backend, ctx.plan.manifest.power.enabled, refusals)
            .map_err(PlaceError::Waiting)?;
        let mut client = self
            .hosts
            .client(&host)
            .await
            .map_err(|reason| PlaceError::Waiting(format!("host `{host}`: {reason}")))?;
        let mut name = backend_workload_name(&ctx.id, &backend.name, &host);
        let mut spec = workload_spec(&ctx.id, backend);
        if let (Some(array), Some(job)) = (backend.array(), spec.slurm.as_mut()) {
            job.array_tasks = self
                .array_tasks(ctx, backend, array, run)
                .map_err(waiting)?;
            // Each task is a run: without a limit of the backend's own, the
            // run's timeout is the task's (SLURM ends it TIMEOUT).
            if job.time_limit.is_none() {
                job.time_limit = ctx
                    .plan
                    .manifest
                    .run
                    .timeout
                    .and_then(|t| prost_types::Duration::try_from(t).ok());
            }
            name = array::array_workload_name(&name, run);
        }
        let host_gpus = self.hosts.gpus(&host);
        let assigned_gpus = gpu_leases::to_assign(backend)
            .filter(|_| !host_gpus.is_empty())
            .and_then(|count| self.gpu_leases.assign(&host, &host_gpus, count))
            .unwrap_or_default();
        if !assigned_gpus.is_empty() {
            spec.gpus = Some(common::GpuRequest {
                device_ids: gpu_leases::device_ids(&host_gpus, &assigned_gpus),
                ..Default::default()
            });
        }
        let created = self
            .create_backend(&mut client, &host, backend, name.clone(), spec)
            .await;
        let workload = match created {
            Ok(workload) => workload,
            Err(reason) => {
                self.gpu_leases.unassign(&host, &assigned_gpus);
                return Err(reason);
            }
        };
        let placement = Placement {
            backend: backend.name.clone(),
            host: host.clone(),
            workload_id: workload.id.clone(),
            gpus: assigned_gpus,
        };
        if let Err(error) = self.store.set_placement(&ctx.id, &placement) {
            self.gpu_leases.unassign(&host, &placement.gpus);
            return Err(waiting(error));
        }
        let gpus_note = if placement.gpus.is_empty() {
            String::new()
        } else {
            format!(" with GPU(s) {}", index_list(&placement.gpus))
        };
        tracing::info!(campaign = %ctx.id, backend = backend.name, host, workload = workload.id, gpus = ?placement.gpus, "backend placed");
        self.publish(
            &ctx.id,
            format!(
                "backend `{}` placed on host `{host}` as `{name}`{gpus_note}",
                backend.name
            ),
        );
        let array_keys = array::task_keys(workload.spec.as_ref());
        self.await_running(ctx, &mut client, &host, &backend.name, workload)
            .await;
        Ok(self.placed(
            backend,
            &placement,
            client,
            &host_gpus,
            (measured, array_keys),
        ))
    }

    /// A backend that its start left waiting (a SLURM allocation PENDING
    /// until the cluster has the resources): its runs wait for it instead
    /// of failing at their exec, and the campaign's status says what it
    /// waits for, in the cluster's words (`PENDING (Resources)`). A host
    /// that stops answering ends the wait: the backend's watch and the
    /// run's exec deal with it.
    async fn await_running(
        &self,
        ctx: &CampaignRun,
        client: &mut AgentClient,
        host: &str,
        backend: &str,
        mut workload: Workload,
    ) {
        let mut shown = String::new();
        while workload.state() == WorkloadState::Created {
            if workload.state_reason != shown {
                shown.clone_from(&workload.state_reason);
                let message = format!("backend `{backend}` on host `{host}` waits to run: {shown}");
                if let Err(error) = self.store.set_campaign_message(&ctx.id, &message) {
                    tracing::warn!(campaign = %ctx.id, %error, "could not record why a backend waits");
                }
                self.publish(&ctx.id, message);
            }
            tokio::select! {
                () = ctx.token.cancelled() => return,
                () = tokio::time::sleep(PENDING_POLL) => {}
            }
            let id = workload.id.clone();
            match client.inspect_workload(WorkloadRef { id }).await {
                Ok(now) => workload = now.into_inner(),
                Err(_) => return,
            }
        }
    }

    /// The backend as placed: itself, or for one that measures a deployment,
    /// a host environment on the host of the deployment's running replica,
    /// with what its runs get of the replica.
    fn beside_deployment(
        &self,
        backend: &Backend,
    ) -> Result<(Backend, Option<Serving>), PlaceError> {
        if backend.deployment.is_empty() {
            return Ok((backend.clone(), None));
        }
        let name = &backend.deployment;
        match self.deployments.serving(name) {
            Ok(Some(serving)) => {
                let mut beside = backend.clone();
                beside.placement.host.clone_from(&serving.host);
                Ok((beside, Some(serving)))
            }
            Ok(None) => Err(PlaceError::Waiting(format!(
                "deployment `{name}` has no running replica yet"
            ))),
            Err(reason) => Err(PlaceError::Refused {
                host: format!("deployment `{name}`"),
                reason,
            }),
        }
    }

    /// The recorded placement, if its workload is still there (started again
    /// if stopped) and where the backend must be.
    async fn adopt(
        &self,
        ctx: &CampaignRun,
        backend: &Backend,
        recorded: &Placement,
        measured: &Option<Serving>,
        run: &Run,
    ) -> Result<Option<Placed>, PlaceError> {
        if !backend.placement.host.is_empty() && backend.placement.host != recorded.host {
            return Ok(None);
        }
        let Ok(mut client) = self.hosts.client(&recorded.host).await else {
            return Ok(None);
        };
        let workload = match client
            .inspect_workload(WorkloadRef {
                id: recorded.workload_id.clone(),
            })
            .await
        {
            Ok(workload) => workload.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => {
                let reason = format!("host `{}`: {}", recorded.host, describe_status(&status));
                return Err(place_error(&recorded.host, &status, reason));
            }
        };
        let array_keys = array::task_keys(workload.spec.as_ref());
        if backend.array().is_some() {
            // An array that holds the run serves it as it is; any other is
            // done with (cancelled if it still runs) for a new one.
            if !array_keys.contains(&array::next_key(run)) {
                let removal = RemoveWorkloadRequest {
                    id: recorded.workload_id.clone(),
                    force: true,
                };
                if let Err(status) = client.remove_workload(removal).await {
                    tracing::warn!(campaign = %ctx.id, backend = backend.name, status = %describe_status(&status), "could not remove a job array whose runs are done");
                }
                return Ok(None);
            }
        } else if workload.state != WorkloadState::Running as i32 {
            let started = client
                .start_workload(WorkloadRef {
                    id: recorded.workload_id.clone(),
                })
                .await
                .map_err(|s| {
                    let reason = format!(
                        "host `{}`: restarting backend `{}`: {}",
                        recorded.host,
                        backend.name,
                        describe_status(&s)
                    );
                    place_error(&recorded.host, &s, reason)
                })?
                .into_inner();
            self.await_running(ctx, &mut client, &recorded.host, &backend.name, started)
                .await;
        }
        self.gpu_leases
            .note_assigned(&recorded.host, &recorded.gpus);
        let host_gpus = self.hosts.gpus(&recorded.host);
        Ok(Some(self.placed(
            backend,
            recorded,
            client,
            &host_gpus,
            (measured.clone(), array_keys),
        )))
    }

    /// The backend as placed by `placement` on a host with `host_gpus`,
    /// counted on its host and watched from now on.
    fn placed(
        &self,
        backend: &Backend,
        placement: &Placement,
        client: AgentClient,
        host_gpus: &[Gpu],
        (measured, array_keys): (Option<Serving>, HashSet<String>),
    ) -> Placed {
        let host = &placement.host;
        self.count_placed(host);
        let (gpus, power_devices, endpoints) = match measured {
            // Its runs are clients of the replica: what they lease and
            // measure are the replica's GPUs.
            Some(serving) => (
                serving.gpus.clone(),
                gpu_leases::power_devices(host_gpus, &serving.gpus),
                serving.endpoints,
            ),
            None => (
                gpu_leases::used_by(backend, host_gpus, &placement.gpus),
                Vec::new(),
                BTreeMap::new(),
            ),
        };
        Placed {
            watch: BackendWatch::start(client.clone(), host, &backend.name, &placement.workload_id),
            power_sampler: self.hosts.power_sampler(host),
            gpus,
            power_devices,
            assigned_gpus: placement.gpus.clone(),
            host: host.clone(),
            workload_id: placement.workload_id.clone(),
            client,
            endpoints,
            provenance: tokio::sync::OnceCell::new(),
            array_keys,
        }
    }

    /// Creates (or finds, when an earlier attempt created it) and starts the
    /// backend's workload: the workload as its start left it. A workload
    /// that does not start is removed, so a refused start leaves nothing
    /// behind on the host.
    async fn create_backend(
        &self,
        client: &mut AgentClient,
        host: &str,
        backend: &Backend,
        name: String,
        spec: WorkloadSpec,
    ) -> Result<Workload, PlaceError> {
        let workload = match client
            .create_workload(CreateWorkloadRequest {
                name: name.clone(),
                spec: Some(spec),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::AlreadyExists => client
                .inspect_workload(WorkloadRef { id: name.clone() })
                .await
                .map_err(|s| {
                    place_error(host, &s, format!("host `{host}`: {}", describe_status(&s)))
                })?
                .into_inner(),
            Err(status) => {
                let reason = format!(
                    "host `{host}`: creating backend `{}`: {}",
                    backend.name,
                    describe_status(&status)
                );
                return Err(place_error(host, &status, reason));
            }
        };
        let started = client
            .start_workload(WorkloadRef {
                id: workload.id.clone(),
            })
            .await;
        let status = match started {
            Ok(started) => return Ok(started.into_inner()),
            Err(status) => status,
        };
        let removal = RemoveWorkloadRequest {
            id: workload.id.clone(),
            force: true,
        };
        if let Err(removed) = client.remove_workload(removal).await {
            tracing::warn!(host, backend = backend.name, workload = workload.id, status = %describe_status(&removed), "could not remove a backend that did not start");
        }
        let reason = format!(
            "host `{host}`: starting backend `{}`: {}",
            backend.name,
            describe_status(&status)
        );
        Err(place_error(host, &status, reason))
    }

    /// The ready host that fits the backend, has refused it the fewest
    /// times, and has the fewest backends placed; or why there is none.
    fn choose_host(
        &self,
        backend: &Backend,
        needs_power: bool,
        refusals: &HashMap<String, u32>,
    ) -> Result<String, String> {
        let views = self.hosts.views();
        if views.is_empty() {
            return Err("no hosts are registered (RegisterHost)".into());
        }
        let candidates = placement::candidates(backend, &views);
        if candidates.is_empty() {
            return Err(format!(
                "host `{}` is not registered",
                backend.placement.host
            ));
        }
        let mut reasons = Vec::new();
        let mut fitting = Vec::new();
        for view in candidates {
            if let Some(reason) = placement::misfit(backend, needs_power, view) {
                reasons.push(reason);
            } else if view.status != HostStatus::Ready {
                reasons.push(format!(
                    "host `{}` is unreachable ({})",
                    view.record.name, view.message
                ));
            } else {
                fitting.push(view.record.name.clone());
            }
        }
        let load = self
            .host_load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fitting
            .into_iter()
            .min_by_key(|h| {
                (
                    refusals.get(h).copied().unwrap_or(0),
                    load.get(h).copied().unwrap_or(0),
                )
            })
            .ok_or_else(|| reasons.join("; "))
    }

    async fn remove_backend(&self, campaign_id: &str, backend: &str, mut placed: Placed) {
        let request = RemoveWorkloadRequest {
            id: placed.workload_id.clone(),
            force: true,
        };
        if let Err(status) = placed.client.remove_workload(request).await {
            tracing::warn!(campaign = campaign_id, backend, host = placed.host, status = %describe_status(&status), "could not remove backend");
        }
        let _ = self.store.clear_placement(campaign_id, backend);
        self.release_host(&placed.host, &placed.assigned_gpus);
    }
}

/// The backend's workload as the manifest describes it, labelled with its
/// campaign and name.
fn workload_spec(campaign_id: &str, backend: &Backend) -> WorkloadSpec {
    let labels = HashMap::from([
        ("berth.campaign".to_string(), campaign_id.to_string()),
        ("berth.backend".to_string(), backend.name.clone()),
    ]);
    backend.workload_spec(labels)
}

/// The pause the manifest asks for before `next`, after `previous`.
fn gap_before(plan: &Plan, previous: Option<&Run>, next: &Run) -> Option<Duration> {
    let gaps = &plan.manifest.gaps;
    let configured = previous.and_then(|previous| {
        if previous.cycle != next.cycle || previous.warmup != next.warmup {
            gaps.between_cycles.or(gaps.between_configs)
        } else if previous.config != next.config {
            gaps.between_configs
        } else {
            None
        }
    });
    let power = &plan.manifest.power;
    let protocol = power
        .protocol
        .as_ref()
        .filter(|_| power.enabled)
        .map(|protocol| protocol.delay_before(next));
    let gap = configured.unwrap_or_default() + protocol.unwrap_or_default();
    (!gap.is_zero()).then_some(gap)
}

/// The backend's workload name on a host: the host is part of it, so a
/// backend placed again elsewhere never meets its earlier self on an engine
/// that two hosts' agents share. Characters a workload name cannot hold
/// become `-`.
fn backend_workload_name(campaign: &str, backend: &str, host: &str) -> String {
    crate::manifest::workload_name(&format!("berth-{campaign}-{backend}-{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_hold_the_host_and_only_valid_characters() {
        assert_eq!(
            backend_workload_name("c1", "vllm", "gpu-01"),
            "berth-c1-vllm-gpu-01"
        );
        assert_eq!(
            backend_workload_name("c1", "b", "user@host:22"),
            "berth-c1-b-user-host-22"
        );
        assert_eq!(backend_workload_name("c", "b", &"h".repeat(200)).len(), 128);
    }
}
