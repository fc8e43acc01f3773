//! Runs campaigns: places each backend on a host that fits, then executes
//! the backend's runs one after another by exec into it, recording every
//! transition before acting on it. Backends (and so hosts) work in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{
    AttachExecRequest, CancelExecRequest, CreateWorkloadRequest, ExecOutput, ExecRequest,
    ExitReason, RemoveWorkloadRequest, WorkloadRef, WorkloadState, exec_output,
};
use berth_proto::common::v1::{self as common, EnvVar, WorkloadSpec};
use berth_proto::orchestrator::v1::{
    Campaign, CampaignEvent, CampaignOutcome, CampaignState, HostStatus, Run, RunState, WarmupEnded,
};
use berth_server::CancellationToken;
use tokio::sync::Semaphore;

use crate::backend_watch::BackendWatch;
use crate::config::SchedulerConfig;
use crate::error::OrchestratorError;
use crate::events::CampaignEvents;
use crate::gpu_leases::{self, GpuLeases, GpuUse};
use crate::hosts::{AgentClient, HostRegistry, describe_status};
use crate::manifest::{self, Backend, GpuCount, OnFailure, Plan, PlannedRun, WarmupPolicy};
use crate::placement;
use crate::power::{PowerMeter, PowerSession};
use crate::results;
use crate::store::{Placement, RunUpdate, Store, campaign_is_terminal};
use crate::warmup;

/// stdout kept per run to find its result line; older output is dropped.
const STDOUT_TAIL_BYTES: usize = 1024 * 1024;
/// stderr kept per run for the error message of a failed run.
const STDERR_TAIL_BYTES: usize = 2048;
/// stdout and stderr together kept with every run for people to read.
const LOGS_TAIL_BYTES: usize = 4096;
/// Longest result JSON line recorded.
const MAX_RESULT_BYTES: usize = 256 * 1024;
/// How long a signal-killed run waits for its backend's state to show
/// whether the backend went down with it.
const BACKEND_SETTLE: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Times one run's exec is attached again after its stream broke, before
/// the run counts as interrupted.
const MAX_REATTACHES: u32 = 3;
/// In-flight runs of one backend looked at after a restart; a backend's
/// worker runs one at a time, so more means the store was edited by hand.
const MAX_IN_FLIGHT_PER_BACKEND: usize = 64;

pub struct Scheduler {
    store: Arc<dyn Store>,
    hosts: Arc<HostRegistry>,
    events: Arc<CampaignEvents>,
    config: SchedulerConfig,
    /// Those the campaign's manifest was accepted within.
    manifest_limits: manifest::ManifestLimits,
    running: Mutex<HashMap<String, CancellationToken>>,
    campaign_slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// Backends placed per host, to spread backends over hosts.
    host_load: Mutex<HashMap<String, usize>>,
    gpu_leases: GpuLeases,
    power: PowerMeter,
}

struct CampaignRun {
    id: String,
    plan: Plan,
    token: CancellationToken,
    stopped_by_policy: AtomicBool,
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
    watch: BackendWatch,
}

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
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded => PlaceError::Waiting(reason),
        _ => PlaceError::Refused {
            host: host.to_string(),
            reason,
        },
    }
}

/// Why a run could not go on where it was; the run is pending again.
enum Interrupted {
    /// The host's agent did not answer.
    HostLost(String),
    /// The agent answers but the backend workload is gone or stopped, or
    /// the run's exec is gone with it (the agent restarted).
    BackendLost(String),
}

impl Scheduler {
    pub fn new(
        store: Arc<dyn Store>,
        hosts: Arc<HostRegistry>,
        events: Arc<CampaignEvents>,
        config: SchedulerConfig,
        manifest_limits: manifest::ManifestLimits,
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
            gpu_leases: GpuLeases::default(),
        })
    }

    /// After a restart: relaunches every unfinished campaign. Its runs that
    /// were in flight are reconciled with their agents by the backend
    /// workers (see `reconcile_in_flight`) before anything new is dispatched.
    pub fn resume_unfinished(self: &Arc<Self>) -> Result<usize, OrchestratorError> {
        let campaigns = self.store.unfinished_campaigns()?;
        for campaign in &campaigns {
            tracing::info!(campaign = %campaign.id, "resuming campaign");
            self.launch(campaign.id.clone());
        }
        Ok(campaigns.len())
    }

    /// Starts the campaign's task unless it is already running.
    pub fn launch(self: &Arc<Self>, id: String) {
        let token = {
            let mut running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if running.contains_key(&id) {
                return;
            }
            let token = self.shutdown.child_token();
            running.insert(id.clone(), token.clone());
            token
        };
        let scheduler = Arc::clone(self);
        tokio::spawn(async move {
            let result = scheduler.clone().run_campaign(&id, token).await;
            if let Err(error) = result {
                tracing::error!(campaign = %id, %error, "campaign task failed");
                let _ = scheduler.store.set_campaign_state(
                    &id,
                    CampaignState::Failed,
                    &error.to_string(),
                );
                scheduler.publish(&id, None, format!("campaign failed: {error}"));
            }
            scheduler
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Cancels a campaign: pending runs are cancelled, running ones killed.
    pub fn cancel(&self, id: &str) -> Result<Campaign, OrchestratorError> {
        let campaign = self
            .store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))?;
        let state = CampaignState::try_from(campaign.state).unwrap_or_default();
        if campaign_is_terminal(state) {
            return Err(OrchestratorError::WrongState {
                id: id.to_string(),
                state: state_name(state),
                reason: "it has already ended",
            });
        }
        self.store
            .set_campaign_state(id, CampaignState::Cancelled, "cancelled by request")?;
        self.store
            .transition_all(id, &[RunState::Pending], RunState::Cancelled)?;
        if let Some(token) = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
        {
            token.cancel();
        }
        self.publish(id, None, "campaign cancelled".into());
        self.snapshot(id)
    }

    /// Resumes a failed or cancelled campaign: its unfinished runs run again.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<Campaign, OrchestratorError> {
        let campaign = self
            .store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))?;
        let state = CampaignState::try_from(campaign.state).unwrap_or_default();
        if !matches!(state, CampaignState::Failed | CampaignState::Cancelled) {
            return Err(OrchestratorError::WrongState {
                id: id.to_string(),
                state: state_name(state),
                reason: "only a failed or cancelled campaign can be resumed",
            });
        }
        self.store.transition_all(
            id,
            &[RunState::Cancelled, RunState::Failed],
            RunState::Pending,
        )?;
        self.store
            .set_campaign_state(id, CampaignState::Pending, "resumed")?;
        self.launch(id.to_string());
        self.publish(id, None, "campaign resumed".into());
        self.snapshot(id)
    }

    /// The campaign with its run counts.
    pub fn snapshot(&self, id: &str) -> Result<Campaign, OrchestratorError> {
        let mut campaign = self
            .store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))?;
        campaign.runs = Some(self.store.run_counts(id)?);
        Ok(campaign)
    }

    fn publish(&self, id: &str, run: Option<Run>, message: String) {
        self.publish_event(id, run, None, message);
    }

    fn publish_event(
        &self,
        id: &str,
        run: Option<Run>,
        warmup_ended: Option<WarmupEnded>,
        message: String,
    ) {
        if !self.events.is_watched(id) {
            return;
        }
        match self.snapshot(id) {
            Ok(campaign) => self.events.publish(
                id,
                CampaignEvent {
                    time: Some(SystemTime::now().into()),
                    campaign: Some(campaign),
                    run,
                    message,
                    warmup_ended,
                },
            ),
            Err(error) => tracing::warn!(campaign = id, %error, "cannot publish campaign event"),
        }
    }

    async fn run_campaign(
        self: Arc<Self>,
        id: &str,
        token: CancellationToken,
    ) -> Result<(), OrchestratorError> {
        let _slot = tokio::select! {
            slot = self.campaign_slots.clone().acquire_owned() => slot.ok(),
            () = token.cancelled() => return Ok(()),
        };
        let campaign = self
            .store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))?;
        let plan =
            manifest::plan_within("manifest", &campaign.manifest_yaml, &self.manifest_limits)?;
        let ctx = Arc::new(CampaignRun {
            id: id.to_string(),
            plan,
            token,
            stopped_by_policy: AtomicBool::new(false),
        });
        let workers: Vec<_> = ctx
            .plan
            .manifest
            .backends
            .iter()
            .map(|backend| {
                tokio::spawn(
                    Arc::clone(&self).backend_worker(Arc::clone(&ctx), backend.name.clone()),
                )
            })
            .collect();
        for worker in workers {
            if let Ok(Err(error)) = worker.await {
                return Err(error);
            }
        }
        if self.shutdown.is_cancelled() {
            // Stopping the orchestrator is not the campaign's end: a restart resumes it.
            return Ok(());
        }
        let stopped_by_policy = ctx.stopped_by_policy.load(Ordering::SeqCst);
        if stopped_by_policy {
            self.store
                .transition_all(id, &[RunState::Pending], RunState::Cancelled)?;
        }
        // A user's cancel recorded the campaign's end itself.
        if stopped_by_policy || !ctx.token.is_cancelled() {
            self.finish(id, stopped_by_policy)?;
        }
        self.publish(id, None, "campaign ended".into());
        Ok(())
    }

    /// Records how an ended campaign came out, judged by its measured runs:
    /// FAILED when the failure policy stopped it or when no measured run
    /// succeeded (a campaign that measured nothing has no result to call a
    /// success), SUCCEEDED otherwise; the outcome and message say which
    /// (config, backend) pairs have no result.
    fn finish(&self, id: &str, stopped_by_policy: bool) -> Result<(), OrchestratorError> {
        let counts = self.store.run_counts(id)?;
        let first_failure = self
            .store
            .runs(id, Some(RunState::Failed), None, 1)?
            .into_iter()
            .next();
        let verdict = results::judge(
            &self.store.measured_runs(id)?,
            &counts,
            first_failure.as_ref(),
        );
        let (state, message) = if stopped_by_policy {
            (
                CampaignState::Failed,
                format!(
                    "stopped after a failed run (failure.on_failure = stop); {}",
                    verdict.message
                ),
            )
        } else if verdict.outcome == CampaignOutcome::NoResults {
            (CampaignState::Failed, verdict.message)
        } else {
            (CampaignState::Succeeded, verdict.message)
        };
        self.store
            .finish_campaign(id, state, verdict.outcome, &message)?;
        Ok(())
    }

    async fn backend_worker(
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
        loop {
            if ctx.token.is_cancelled() {
                break;
            }
            let Some(run) = self.store.next_pending_run(&ctx.id, &backend)? else {
                break;
            };
            // Normally settled right after the warmup run that ends it; this
            // catches a restart that came between that run and the settling.
            if run.warmup && self.settle_warmup(&ctx, &run.config, &backend)? {
                continue;
            }
            let mut placement = match placed.take() {
                Some(placement) => match placement.watch.down() {
                    None => placement,
                    Some(why) => {
                        self.went_down(&ctx.id, &placement, &why);
                        continue;
                    }
                },
                None => match self.place(&ctx, &backend, &refusals).await {
                    Ok(placement) => {
                        backoff = FIRST_BACKOFF;
                        refusals.clear();
                        self.mark_running(&ctx.id)?;
                        placement
                    }
                    Err(error) => {
                        let message = match error {
                            PlaceError::Waiting(reason) => {
                                format!("backend `{backend}` waits for a host: {reason}")
                            }
                            PlaceError::Refused { host, reason } => {
                                *refusals.entry(host).or_default() += 1;
                                let tries: u32 = refusals.values().sum();
                                let most = self.config.max_create_attempts.max(1);
                                if tries >= most {
                                    // Its runs fail rather than wait forever for a host.
                                    self.fail_unstartable(&ctx, &backend, tries, &reason)?;
                                    continue;
                                }
                                format!(
                                    "backend `{backend}` was refused (try {tries} of {most}, scheduler.max_create_attempts): {reason}"
                                )
                            }
                        };
                        self.store.set_campaign_message(&ctx.id, &message)?;
                        self.publish(&ctx.id, None, message);
                        tokio::select! {
                            () = ctx.token.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.config.max_placement_backoff);
                        continue;
                    }
                },
            };
            if let Some(gap) = gap_before(&ctx.plan, previous.as_ref(), &run) {
                tokio::select! {
                    () = ctx.token.cancelled() => { placed = Some(placement); break }
                    () = tokio::time::sleep(gap) => {}
                    // Started again at once; the gap starts over after it.
                    _ = placement.watch.went_down() => { placed = Some(placement); continue }
                }
            }
            match self.execute(&ctx, &run, &placement).await? {
                None => {
                    placed = Some(placement);
                    if run.warmup {
                        self.settle_warmup(&ctx, &run.config, &backend)?;
                    }
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

    /// Whether a run's failed exit was its backend dying under it (killed,
    /// OOM, restarted since the run began) rather than the run's own
    /// failure: then the run is not charged a retry, it runs again once the
    /// backend is back.
    async fn backend_died(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        client: &mut AgentClient,
        (since, exit_code): (SystemTime, i32),
    ) -> Option<String> {
        let placement = self
            .store
            .placements(&ctx.id)
            .ok()?
            .into_iter()
            .find(|p| p.backend == run.backend)?;
        // A run killed by a signal may be its backend going down, and the
        // engine reports the exec's end before the container's: look again
        // for a moment before calling it the run's own failure.
        let settle = if exit_code > 128 {
            BACKEND_SETTLE
        } else {
            Duration::ZERO
        };
        let looked = std::time::Instant::now();
        loop {
            if let Some(why) = self
                .backend_state_since(client, run, &placement.workload_id, since)
                .await
            {
                return Some(why);
            }
            if looked.elapsed() >= settle {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Why the backend workload cannot have carried the run to its end, if
    /// it cannot: gone, not running, or started again since `since`.
    async fn backend_state_since(
        &self,
        client: &mut AgentClient,
        run: &Run,
        workload_id: &str,
        since: SystemTime,
    ) -> Option<String> {
        let workload = match client
            .inspect_workload(WorkloadRef {
                id: workload_id.to_string(),
            })
            .await
        {
            Ok(workload) => workload.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Some(format!("backend workload `{workload_id}` is gone"));
            }
            Err(_) => return None,
        };
        let state = WorkloadState::try_from(workload.state).unwrap_or_default();
        if state != WorkloadState::Running {
            return Some(format!(
                "backend `{}` is {}{}",
                run.backend,
                state.as_str_name(),
                if workload.oom_killed {
                    " (OOM-killed)"
                } else {
                    ""
                }
            ));
        }
        let restarted = workload
            .started_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .is_some_and(|started| started > since);
        restarted.then(|| format!("backend `{}` restarted during the run", run.backend))
    }

    /// What an interrupted run says about where it ran: an agent that did
    /// not answer marks its host unreachable; a backend (or agent) that lost
    /// the exec gets the backend placed again. Either way the host's load
    /// drops by the backend.
    fn lost(
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
                    None,
                    format!("host `{host}` lost ({reason}); backend `{backend}` goes to a host that answers"),
                );
            }
            Interrupted::BackendLost(reason) => {
                tracing::warn!(campaign = %ctx.id, backend, reason, "backend lost; placing it again");
                self.store.clear_placement(&ctx.id, backend)?;
                self.publish(
                    &ctx.id,
                    None,
                    format!(
                        "backend `{backend}` on host `{host}` lost ({reason}); placing it again"
                    ),
                );
            }
        }
        self.release_host(host, assigned_gpus);
        Ok(())
    }

    /// After a restart, the backend's runs that were in flight: a run whose
    /// exec its agent still has (running, or ended and kept) is adopted and
    /// recorded as if it had never been left; one whose exec is gone (never
    /// sent, agent restarted, retention passed) or whose host does not
    /// answer is pending again, its attempt counted.
    async fn reconcile_in_flight(
        &self,
        ctx: &CampaignRun,
        backend: &str,
    ) -> Result<(), OrchestratorError> {
        let mut in_flight = Vec::new();
        for state in [RunState::Dispatched, RunState::Running] {
            in_flight.extend(
                self.store
                    .runs(&ctx.id, Some(state), None, MAX_IN_FLIGHT_PER_BACKEND)?
                    .into_iter()
                    .filter(|run| run.backend == backend),
            );
        }
        for run in in_flight {
            let state = RunState::try_from(run.state).unwrap_or_default();
            let attempt = run.attempts;
            let attached = match self.hosts.client(&run.host).await {
                Ok(mut client) => client
                    .attach_exec(attach_request(&exec_key(&run.id, attempt)))
                    .await
                    .map(|stream| (client, stream.into_inner()))
                    .map_err(|status| describe_status(&status)),
                Err(reason) => Err(reason),
            };
            let (client, stream) = match attached {
                Ok(attached) => attached,
                Err(reason) => {
                    let why = Interrupted::HostLost(format!(
                        "the orchestrator restarted and host `{}` no longer has the run's exec: {reason}",
                        run.host
                    ));
                    // The host's health is the heartbeats' to judge: this
                    // life of the orchestrator has placed nothing there yet.
                    self.requeue(ctx, &run, attempt, state, why)?;
                    continue;
                }
            };
            // Leased as any run's GPUs, so runs dispatched from now on keep
            // clear of it as they did before the restart.
            let _gpus = self.lease_adopted_gpus(ctx, &run).await;
            self.start_running(
                ctx,
                &run,
                format!(
                    "run {} adopted on {} after a restart (attempt {attempt})",
                    run.id, run.host
                ),
            )?;
            if let Some(why) = self
                .follow(ctx, &run, attempt, (&run.host, client), stream, None)
                .await?
            {
                self.lost(ctx, backend, (&run.host, &[]), why)?;
            }
        }
        Ok(())
    }

    /// Under a stable warmup, ends the warmup of (config, backend) once its
    /// recorded runs say so: drops its warmup runs still pending and
    /// publishes why. True when it ended.
    fn settle_warmup(
        &self,
        ctx: &CampaignRun,
        config: &str,
        backend: &str,
    ) -> Result<bool, OrchestratorError> {
        let WarmupPolicy::UntilStable(policy) = &ctx.plan.warmup else {
            return Ok(false);
        };
        let runs = self.store.warmup_runs(&ctx.id, config, backend)?;
        let Some(end) = warmup::verdict(policy, &runs) else {
            return Ok(false);
        };
        let dropped = self
            .store
            .drop_pending_warmup_runs(&ctx.id, config, backend)?;
        tracing::info!(campaign = %ctx.id, config, backend, ?end, dropped, "warmup ended");
        self.publish_event(
            &ctx.id,
            None,
            Some(end.to_proto(config, backend)),
            end.describe(policy, config, backend),
        );
        Ok(true)
    }

    fn mark_running(&self, id: &str) -> Result<(), OrchestratorError> {
        let campaign = self
            .store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))?;
        if campaign.state == CampaignState::Pending as i32 || !campaign.status_message.is_empty() {
            self.store
                .set_campaign_state(id, CampaignState::Running, "")?;
            self.publish(id, None, "campaign running".into());
        }
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
            None,
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
        refusals: &HashMap<String, u32>,
    ) -> Result<Placed, PlaceError> {
        let waiting = |error: crate::store::StoreError| PlaceError::Waiting(error.to_string());
        let backend = ctx.plan.backend(backend_name).ok_or_else(|| {
            PlaceError::Waiting(format!("backend `{backend_name}` is not in the manifest"))
        })?;
        let recorded = self
            .store
            .placements(&ctx.id)
            .map_err(waiting)?
            .into_iter()
            .find(|p| p.backend == backend_name);
        if let Some(recorded) = recorded {
            if let Some(placed) = self.adopt(backend, &recorded).await? {
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
        let name = backend_workload_name(&ctx.id, &backend.name, &host);
        let mut spec = workload_spec(&ctx.id, backend);
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
            gpus: assigned_gpus.clone(),
        };
        if let Err(error) = self.store.set_placement(&ctx.id, &placement) {
            self.gpu_leases.unassign(&host, &assigned_gpus);
            return Err(waiting(error));
        }
        self.count_placed(&host);
        let gpus_note = if assigned_gpus.is_empty() {
            String::new()
        } else {
            format!(" with GPU(s) {}", index_list(&assigned_gpus))
        };
        tracing::info!(campaign = %ctx.id, backend = backend.name, host, workload = workload.id, gpus = ?assigned_gpus, "backend placed");
        self.publish(
            &ctx.id,
            None,
            format!(
                "backend `{}` placed on host `{host}` as `{name}`{gpus_note}",
                backend.name
            ),
        );
        Ok(Placed {
            power_sampler: self.hosts.power_sampler(&host),
            gpus: gpu_leases::used_by(backend, &host_gpus, &assigned_gpus),
            assigned_gpus,
            watch: BackendWatch::start(client.clone(), &host, &backend.name, &workload.id),
            host,
            workload_id: workload.id,
            client,
        })
    }

    /// Creates (or finds, when an earlier attempt created it) and starts the
    /// backend's workload. A workload that does not start is removed, so a
    /// refused start leaves nothing behind on the host.
    async fn create_backend(
        &self,
        client: &mut AgentClient,
        host: &str,
        backend: &Backend,
        name: String,
        spec: WorkloadSpec,
    ) -> Result<berth_proto::agent::v1::Workload, PlaceError> {
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
        if let Err(status) = started {
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
            return Err(place_error(host, &status, reason));
        }
        Ok(workload)
    }

    /// The recorded placement, if its workload is still there (started again if stopped).
    async fn adopt(
        &self,
        backend: &Backend,
        recorded: &Placement,
    ) -> Result<Option<Placed>, PlaceError> {
        let Ok(mut client) = self.hosts.client(&recorded.host).await else {
            return Ok(None);
        };
        match client
            .inspect_workload(WorkloadRef {
                id: recorded.workload_id.clone(),
            })
            .await
        {
            Ok(workload) => {
                if workload.get_ref().state != WorkloadState::Running as i32 {
                    client
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
                        })?;
                }
                self.gpu_leases
                    .note_assigned(&recorded.host, &recorded.gpus);
                self.count_placed(&recorded.host);
                let host_gpus = self.hosts.gpus(&recorded.host);
                Ok(Some(Placed {
                    watch: BackendWatch::start(
                        client.clone(),
                        &recorded.host,
                        &backend.name,
                        &recorded.workload_id,
                    ),
                    host: recorded.host.clone(),
                    workload_id: recorded.workload_id.clone(),
                    client,
                    power_sampler: self.hosts.power_sampler(&recorded.host),
                    gpus: gpu_leases::used_by(backend, &host_gpus, &recorded.gpus),
                    assigned_gpus: recorded.gpus.clone(),
                }))
            }
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => {
                let reason = format!("host `{}`: {}", recorded.host, describe_status(&status));
                Err(place_error(&recorded.host, &status, reason))
            }
        }
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

    /// Executes one run. `Ok(None)`: the run reached an end state (or was
    /// taken by someone else); `Ok(Some(_))`: it is pending again.
    async fn execute(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        placed: &Placed,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let planned = PlannedRun {
            config: run.config.clone(),
            backend: run.backend.clone(),
            cycle: run.cycle,
            warmup: run.warmup,
            sequence: run.sequence,
        };
        // Held until the run ends.
        let Some(_gpus) = self.lease_gpus(ctx, run, placed).await else {
            return Ok(None);
        };
        let dispatch = RunUpdate {
            host: Some(placed.host.clone()),
            add_attempt: true,
            started_now: true,
            ..Default::default()
        };
        if !self.store.transition_run(
            &run.id,
            &[RunState::Pending],
            RunState::Dispatched,
            &dispatch,
        )? {
            return Ok(None);
        }
        let attempt = run.attempts + 1;
        self.publish_run(
            &ctx.id,
            &run.id,
            format!(
                "run {} dispatched to {} (attempt {attempt})",
                run.id, placed.host
            ),
        );
        let template = &ctx.plan.manifest.run;
        let power = &ctx.plan.manifest.power;
        let mut power_session = None;
        if power.enabled {
            match self
                .power
                .start(&placed.host, &placed.power_sampler, &run.id, power)
                .await
            {
                Ok(session) => power_session = Some(session),
                Err(reason) => {
                    let error = format!("power sampler of host `{}`: {reason}", placed.host);
                    self.fail(ctx, run, attempt, RunState::Dispatched, failure(-1, error))?;
                    return Ok(None);
                }
            }
        }
        let key = exec_key(&run.id, attempt);
        let request = ExecRequest {
            exec_key: key.clone(),
            workload_id: placed.workload_id.clone(),
            command: ctx.plan.command_for(&planned, &run.id),
            env: ctx
                .plan
                .env_for(&planned, &run.id)
                .into_iter()
                .map(|(name, value)| EnvVar { name, value })
                .collect(),
            working_dir: template.working_dir.clone(),
            timeout: template
                .timeout
                .and_then(|t| prost_types::Duration::try_from(t).ok()),
        };
        let mut client = placed.client.clone();
        let opened = tokio::select! {
            opened = client.exec(request) => opened,
            () = ctx.token.cancelled() => {
                return self.abandon(run, &[RunState::Dispatched], client, &key).await;
            }
        };
        let stream = match opened {
            Ok(stream) => stream.into_inner(),
            // The agent already runs this attempt (an earlier call reached it
            // and its answer was lost): follow it rather than run it again.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                match client.attach_exec(attach_request(&key)).await {
                    Ok(stream) => stream.into_inner(),
                    Err(status) => return self.exec_refused(ctx, run, attempt, &status),
                }
            }
            Err(status) => return self.exec_refused(ctx, run, attempt, &status),
        };
        self.start_running(
            ctx,
            run,
            format!("run {} running on {}", run.id, placed.host),
        )?;
        self.follow(
            ctx,
            run,
            attempt,
            (&placed.host, client),
            stream,
            power_session,
        )
        .await
    }

    /// The run's lease on its backend's GPUs: to itself when the campaign
    /// measures power, shared otherwise. None when the campaign was
    /// cancelled while it waited.
    async fn lease_gpus(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        placed: &Placed,
    ) -> Option<gpu_leases::GpuLease> {
        let mode = gpu_use(ctx);
        if let Some(lease) = self.gpu_leases.try_lease(&placed.host, &placed.gpus, mode) {
            return Some(lease);
        }
        self.publish(
            &ctx.id,
            None,
            format!(
                "run {} waits for GPU(s) {} of host `{}`: {}",
                run.id,
                index_list(&placed.gpus),
                placed.host,
                match mode {
                    GpuUse::Exclusive => "it measures power, and another run uses them",
                    GpuUse::Shared => "a run that measures power has them to itself",
                }
            ),
        );
        self.wait_for_lease(ctx, &placed.host, &placed.gpus, mode)
            .await
    }

    /// The lease once it is free; None when the campaign is cancelled first.
    async fn wait_for_lease(
        &self,
        ctx: &CampaignRun,
        host: &str,
        gpus: &[u32],
        mode: GpuUse,
    ) -> Option<gpu_leases::GpuLease> {
        tokio::select! {
            lease = self.gpu_leases.lease(host, gpus, mode) => Some(lease),
            () = ctx.token.cancelled() => None,
        }
    }

    /// The GPU lease of a run found in flight after a restart, from its
    /// backend's recorded placement and what its host reports.
    async fn lease_adopted_gpus(
        &self,
        ctx: &CampaignRun,
        run: &Run,
    ) -> Option<gpu_leases::GpuLease> {
        let backend = ctx.plan.backend(&run.backend)?;
        let assigned = self
            .store
            .placements(&ctx.id)
            .ok()?
            .into_iter()
            .find(|p| p.backend == run.backend && p.host == run.host)
            .map(|p| p.gpus)
            .unwrap_or_default();
        let mut host_gpus = self.hosts.gpus(&run.host);
        if host_gpus.is_empty() {
            // Right after a restart the host may not have been asked yet.
            host_gpus = self.hosts.probe(&run.host).await.ok()?.gpus;
        }
        let gpus = gpu_leases::used_by(backend, &host_gpus, &assigned);
        self.wait_for_lease(ctx, &run.host, &gpus, gpu_use(ctx))
            .await
    }

    /// Reads a running run's exec to its end and records the outcome. A
    /// broken stream is not a dead command (the exec is keyed and runs on),
    /// so it attaches again; when it cannot, the answer says whether the
    /// agent is gone (host lost) or still there without the exec (backend
    /// or agent restarted).
    async fn follow(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        (host, mut client): (&str, AgentClient),
        mut stream: tonic::Streaming<ExecOutput>,
        mut power_session: Option<PowerSession>,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let key = exec_key(&run.id, attempt);
        let requeue = |why| self.requeue(ctx, run, attempt, RunState::Running, why);
        let followed_since = SystemTime::now();
        let template = &ctx.plan.manifest.run;
        let mut stdout = Tail::new(STDOUT_TAIL_BYTES);
        let mut stderr = Tail::new(STDERR_TAIL_BYTES);
        let mut logs = Tail::new(LOGS_TAIL_BYTES);
        let mut reattached = 0;
        let exit = loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = ctx.token.cancelled() => {
                    return self.abandon(run, &[RunState::Running], client, &key).await;
                }
            };
            let lost = match message {
                Ok(Some(output)) => {
                    match output.output {
                        Some(exec_output::Output::Stdout(data)) => {
                            stdout.push(&data);
                            logs.push(&data);
                        }
                        Some(exec_output::Output::Stderr(data)) => {
                            stderr.push(&data);
                            logs.push(&data);
                        }
                        Some(exec_output::Output::Exit(exit)) => break exit,
                        Some(exec_output::Output::DroppedBytes(dropped)) => {
                            tracing::warn!(run = %run.id, host, dropped, "the agent dropped output of this run before it was read");
                        }
                        None => {}
                    }
                    continue;
                }
                Ok(None) => "exec stream ended without an exit status".to_string(),
                Err(status) => describe_status(&status),
            };
            if reattached == MAX_REATTACHES {
                let why = format!("{lost}; the stream broke again after {MAX_REATTACHES} attaches");
                return requeue(Interrupted::HostLost(why));
            }
            reattached += 1;
            match client.attach_exec(attach_request(&key)).await {
                Ok(again) => {
                    tracing::info!(run = %run.id, host, lost, "exec stream broke; attached again");
                    // The agent replays what it kept from the start.
                    stream = again.into_inner();
                    stdout = Tail::new(STDOUT_TAIL_BYTES);
                    stderr = Tail::new(STDERR_TAIL_BYTES);
                    logs = Tail::new(LOGS_TAIL_BYTES);
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    let why = format!("{lost}; host `{host}` answers but no longer has the exec");
                    return requeue(Interrupted::BackendLost(why));
                }
                Err(status) => {
                    let why = format!("{lost}; {}", describe_status(&status));
                    return requeue(Interrupted::HostLost(why));
                }
            }
        };
        let duration_ms = exit
            .duration
            .and_then(|d| Duration::try_from(d).ok())
            .map(|d| d.as_millis() as u64);
        let succeeded = exit.exit_code == 0 && exit.reason == ExitReason::Exited as i32;
        let ended = RunUpdate {
            exit_code: Some(exit.exit_code),
            duration_ms,
            logs_tail: Some(logs.text()),
            ..Default::default()
        };
        if succeeded {
            let power = match power_session.take() {
                Some(session) => match session.stop().await {
                    Ok(power) => Some(power),
                    Err(reason) => {
                        let error = format!("power session on host `{host}`: {reason}");
                        let update = RunUpdate {
                            error: Some(error),
                            ..ended
                        };
                        self.fail(ctx, run, attempt, RunState::Running, update)?;
                        return Ok(None);
                    }
                },
                None => None,
            };
            let (energy, power_series) = power.map(|p| (p.energy, p.series)).unzip();
            let (result_json, error) = match result_line(stdout.bytes()) {
                Ok(result) => (result, String::new()),
                Err(error) => (String::new(), error),
            };
            let update = RunUpdate {
                result_json: Some(result_json),
                error: Some(error),
                finished_now: true,
                energy,
                power_series,
                ..ended
            };
            self.store.transition_run(
                &run.id,
                &[RunState::Running],
                RunState::Succeeded,
                &update,
            )?;
            self.publish_run(&ctx.id, &run.id, format!("run {} succeeded", run.id));
        } else {
            if exit.reason != ExitReason::TimedOut as i32
                && let Some(why) = self
                    .backend_died(ctx, run, &mut client, (followed_since, exit.exit_code))
                    .await
            {
                let why = format!("exit code {} as {why}", exit.exit_code);
                return requeue(Interrupted::BackendLost(why));
            }
            let why = if exit.reason == ExitReason::TimedOut as i32 {
                format!(
                    "timed out after {}",
                    humantime::format_duration(template.timeout.unwrap_or_default())
                )
            } else {
                format!("exit code {}", exit.exit_code)
            };
            let error = format!("{why}: {}", String::from_utf8_lossy(stderr.bytes()).trim());
            let update = RunUpdate {
                error: Some(error),
                ..ended
            };
            self.fail(ctx, run, attempt, RunState::Running, update)?;
        }
        Ok(None)
    }

    /// The exec was refused: the backend is gone, the agent is down, or the
    /// command cannot run (which counts as a failed attempt).
    fn exec_refused(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        status: &tonic::Status,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let reason = describe_status(status);
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => self.requeue(
                ctx,
                run,
                attempt,
                RunState::Dispatched,
                Interrupted::HostLost(reason),
            ),
            tonic::Code::NotFound => self.requeue(
                ctx,
                run,
                attempt,
                RunState::Dispatched,
                Interrupted::BackendLost(reason),
            ),
            tonic::Code::FailedPrecondition
                if status.message().contains("needs a running workload") =>
            {
                self.requeue(
                    ctx,
                    run,
                    attempt,
                    RunState::Dispatched,
                    Interrupted::BackendLost(reason),
                )
            }
            _ => {
                let update = failure(-1, format!("exec refused: {reason}"));
                self.fail(ctx, run, attempt, RunState::Dispatched, update)?;
                Ok(None)
            }
        }
    }

    /// Puts an interrupted run back to pending, unless it has been
    /// dispatched `scheduler.max_run_attempts` times already: then it fails
    /// (per the failure policy) so that it cannot bounce between hosts
    /// forever. The interruption is returned either way, for the worker to
    /// deal with the host or backend.
    fn requeue(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        from: RunState,
        why: Interrupted,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let reason = match &why {
            Interrupted::HostLost(r) | Interrupted::BackendLost(r) => r.clone(),
        };
        if attempt >= self.config.max_run_attempts {
            let error = format!(
                "interrupted after {attempt} dispatches, the most scheduler.max_run_attempts allows: {reason}"
            );
            self.give_up(ctx, run, from, failure(-1, error))?;
            return Ok(Some(why));
        }
        let update = RunUpdate {
            error: Some(format!("interrupted: {reason}")),
            ..Default::default()
        };
        self.store
            .transition_run(&run.id, &[from], RunState::Pending, &update)?;
        self.publish_run(
            &run.campaign_id,
            &run.id,
            format!("run {} interrupted ({reason}); it will run again", run.id),
        );
        Ok(Some(why))
    }

    /// Stops following a run's exec because the campaign stops. A cancel
    /// kills the exec on its agent; an orchestrator shutdown leaves it
    /// running there, for the restart to adopt.
    async fn abandon(
        &self,
        run: &Run,
        from: &[RunState],
        mut client: AgentClient,
        key: &str,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        if !self.shutdown.is_cancelled() {
            let request = CancelExecRequest {
                exec_key: key.to_string(),
            };
            match client.cancel_exec(request).await {
                Ok(_) => {}
                // It never started, or it ended already: nothing to kill.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => {
                    tracing::warn!(run = %run.id, status = %describe_status(&status), "could not cancel the run's exec");
                }
            }
        }
        self.interrupted(run, from)
    }

    /// A stop that is not the campaign's end (orchestrator shutdown) leaves
    /// the run for the restart; a cancel records it cancelled.
    fn interrupted(
        &self,
        run: &Run,
        from: &[RunState],
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        if !self.shutdown.is_cancelled() {
            let update = RunUpdate {
                finished_now: true,
                error: Some("cancelled".into()),
                ..Default::default()
            };
            self.store
                .transition_run(&run.id, from, RunState::Cancelled, &update)?;
            self.publish_run(
                &run.campaign_id,
                &run.id,
                format!("run {} cancelled", run.id),
            );
        }
        Ok(None)
    }

    /// Records a failed attempt (`update` says how it ended, with its
    /// error): pending again while retries remain, else failed.
    fn fail(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        from: RunState,
        update: RunUpdate,
    ) -> Result<(), OrchestratorError> {
        let policy = &ctx.plan.manifest.failure;
        let retry = attempt <= policy.retries;
        if retry {
            let error = update.error.clone().unwrap_or_default();
            self.store
                .transition_run(&run.id, &[from], RunState::Pending, &update)?;
            self.publish_run(
                &ctx.id,
                &run.id,
                format!(
                    "run {} failed ({error}); retry {attempt} of {}",
                    run.id, policy.retries
                ),
            );
        } else {
            self.give_up(ctx, run, from, update)?;
        }
        Ok(())
    }

    /// The backend's workload was refused `tries` times, the most
    /// `scheduler.max_create_attempts` allows: its pending runs fail with the
    /// agent's reason (until the failure policy stops the campaign, which
    /// then cancels the rest).
    fn fail_unstartable(
        &self,
        ctx: &CampaignRun,
        backend: &str,
        tries: u32,
        reason: &str,
    ) -> Result<(), OrchestratorError> {
        tracing::warn!(campaign = %ctx.id, backend, tries, reason, "backend cannot be started; its runs fail");
        let error = format!(
            "backend `{backend}` could not be started ({tries} tries refused, the most scheduler.max_create_attempts allows): {reason}"
        );
        while !ctx.token.is_cancelled() {
            let Some(run) = self.store.next_pending_run(&ctx.id, backend)? else {
                break;
            };
            let update = RunUpdate {
                error: Some(error.clone()),
                ..Default::default()
            };
            self.give_up(ctx, &run, RunState::Pending, update)?;
        }
        Ok(())
    }

    /// Records the run failed for good; `failure.on_failure: stop` then
    /// stops the campaign.
    fn give_up(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        from: RunState,
        update: RunUpdate,
    ) -> Result<(), OrchestratorError> {
        let error = update.error.clone().unwrap_or_default();
        let update = RunUpdate {
            finished_now: true,
            ..update
        };
        self.store
            .transition_run(&run.id, &[from], RunState::Failed, &update)?;
        self.publish_run(&ctx.id, &run.id, format!("run {} failed: {error}", run.id));
        if ctx.plan.manifest.failure.on_failure == OnFailure::Stop {
            ctx.stopped_by_policy.store(true, Ordering::SeqCst);
            ctx.token.cancel();
        }
        Ok(())
    }

    /// Records a dispatched run running (its exec is open on the agent) and
    /// publishes `message`.
    fn start_running(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        message: String,
    ) -> Result<(), OrchestratorError> {
        self.store.transition_run(
            &run.id,
            &[RunState::Dispatched],
            RunState::Running,
            &RunUpdate::default(),
        )?;
        self.publish_run(&ctx.id, &run.id, message);
        Ok(())
    }

    fn publish_run(&self, campaign_id: &str, run_id: &str, message: String) {
        if !self.events.is_watched(campaign_id) {
            return;
        }
        let run = self.store.run(run_id).ok().flatten();
        self.publish(campaign_id, run, message);
    }
}

/// How the campaign's runs use their GPUs.
fn gpu_use(ctx: &CampaignRun) -> GpuUse {
    if ctx.plan.manifest.power.enabled {
        GpuUse::Exclusive
    } else {
        GpuUse::Shared
    }
}

fn index_list(gpus: &[u32]) -> String {
    gpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The idempotency key of one attempt of a run on its agent. Run id and
/// attempt are both recorded (`→ dispatched`) before the exec is sent, so a
/// restarted orchestrator derives the same key to attach to it.
fn exec_key(run_id: &str, attempt: u32) -> String {
    format!("{run_id}/attempt-{attempt}")
}

fn attach_request(key: &str) -> AttachExecRequest {
    AttachExecRequest {
        exec_key: key.to_string(),
    }
}

/// How an attempt that never produced an exit status failed.
fn failure(exit_code: i32, error: String) -> RunUpdate {
    RunUpdate {
        exit_code: Some(exit_code),
        error: Some(error),
        ..Default::default()
    }
}

fn state_name(state: CampaignState) -> &'static str {
    match state {
        CampaignState::Pending => "pending",
        CampaignState::Running => "running",
        CampaignState::Succeeded => "succeeded",
        CampaignState::Failed => "failed",
        CampaignState::Cancelled => "cancelled",
        CampaignState::Unspecified => "unknown",
    }
}

fn workload_spec(campaign_id: &str, backend: &Backend) -> WorkloadSpec {
    let mut labels: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    labels.insert("berth.campaign".into(), campaign_id.into());
    labels.insert("berth.backend".into(), backend.name.clone());
    WorkloadSpec {
        runtime: backend.runtime.proto() as i32,
        image: backend.image.clone(),
        command: backend.command.clone(),
        env: backend
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        working_dir: backend.working_dir.clone(),
        labels,
        mounts: backend
            .mounts
            .iter()
            .map(|m| common::Mount {
                source: m.source.clone(),
                target: m.target.clone(),
                read_only: m.read_only,
                volume: m.volume,
            })
            .collect(),
        resources: (backend.resources != manifest::Resources::default()).then(|| {
            let r = &backend.resources;
            common::Resources {
                cpu_limit: r.cpus.unwrap_or_default(),
                memory_limit_bytes: r.memory.map_or(0, |m| m.0),
                memory_reservation_bytes: r.memory_reservation.map_or(0, |m| m.0),
                cpu_reservation: r.cpu_reservation.unwrap_or_default(),
            }
        }),
        gpus: backend.gpus.as_ref().map(|g| common::GpuRequest {
            count: match g.count {
                Some(GpuCount::All) => -1,
                Some(GpuCount::Exactly(n)) => i32::try_from(n).unwrap_or(i32::MAX),
                None => 0,
            },
            device_ids: g.devices.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pause the manifest asks for before `next`, after `previous`.
fn gap_before(plan: &Plan, previous: Option<&Run>, next: &Run) -> Option<Duration> {
    let previous = previous?;
    let gaps = &plan.manifest.gaps;
    if previous.cycle != next.cycle || previous.warmup != next.warmup {
        gaps.between_cycles.or(gaps.between_configs)
    } else if previous.config != next.config {
        gaps.between_configs
    } else {
        None
    }
    .filter(|gap| !gap.is_zero())
}

/// The run's result: the last line of its stdout that is a JSON object.
fn result_line(stdout: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(stdout);
    for line in text.lines().rev() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        if let Ok(serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(line) {
            if line.len() > MAX_RESULT_BYTES {
                return Err(format!(
                    "result JSON is {} bytes; at most {MAX_RESULT_BYTES} are recorded",
                    line.len()
                ));
            }
            return Ok(line.to_string());
        }
    }
    Ok(String::new())
}

/// The last `capacity` bytes of a stream.
struct Tail {
    bytes: Vec<u8>,
    capacity: usize,
}

impl Tail {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::new(),
            capacity,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.capacity {
            let excess = self.bytes.len() - self.capacity;
            self.bytes.drain(..excess);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The tail as text, from the first whole UTF-8 character: the cut may
    /// fall inside one.
    fn text(&self) -> String {
        let start = self
            .bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
            .count();
        String::from_utf8_lossy(&self.bytes[start..]).into_owned()
    }
}

/// The backend's workload name on a host: the host is part of it, so a
/// backend placed again elsewhere never meets its earlier self on an engine
/// that two hosts' agents share. Characters a workload name cannot hold
/// become `-`.
fn backend_workload_name(campaign: &str, backend: &str, host: &str) -> String {
    let name: String = format!("berth-{campaign}-{backend}-{host}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    name
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

    #[test]
    fn result_is_last_json_object_line() {
        let out = b"warming up\n{\"a\": 1}\nprogress 50%\n{\"mib_per_s\": 812.5, \"n\": 3}\ndone\n";
        assert_eq!(
            result_line(out).unwrap(),
            "{\"mib_per_s\": 812.5, \"n\": 3}"
        );
        assert_eq!(result_line(b"no json here\n[1,2]\n").unwrap(), "");
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut tail = Tail::new(4);
        tail.push(b"abc");
        tail.push(b"defg");
        assert_eq!(tail.bytes(), b"defg");
        // "é" is two bytes; a cut after its first leaves a stray continuation byte.
        let mut tail = Tail::new(3);
        tail.push("é!!".as_bytes());
        assert_eq!(tail.text(), "!!");
    }
}
