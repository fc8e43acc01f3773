//! One run on a placed backend: prepared in the gap before it (its GPUs
//! leased, its host's provenance asked), dispatched (recorded before the
//! exec is sent, with the key derived from what was recorded), its exec followed to
//! its end and attached again when the stream breaks, the outcome handed to
//! [`record`](super::record); runs found in flight after a restart are
//! attached and followed the same way. A failed exit is first checked
//! against the backend: one that died under the run interrupts it instead.

use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{
    AttachExecRequest, CancelExecRequest, DescribeExecAccountingRequest, ExecAccounting,
    ExecOutput, ExecRequest, ExitReason, ExitStatus, Provenance, WorkloadRef, WorkloadState,
    exec_output,
};
use berth_proto::common::v1::{EnvVar, Runtime};
use berth_proto::orchestrator::v1::{Run, RunState};
use berth_server::error::{has_reason, reasons};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::output::RunOutput;
use super::record::failure;
use super::{CampaignRun, Interrupted, Placed, Scheduler, agent_did_not_answer};
use crate::backend_watch::BackendWatch;
use crate::error::OrchestratorError;
use crate::gpu_leases::GpuLease;
use crate::hosts::{AgentClient, describe_status};
use crate::manifest::PlannedRun;
use crate::power::{PowerRecord, PowerSession};
use crate::store::RunUpdate;

/// How long a signal-killed run waits for its backend's state to show
/// whether the backend went down with it.
const BACKEND_SETTLE: Duration = Duration::from_secs(2);
/// Times one run's exec is attached again after its stream broke, before
/// the run counts as interrupted.
const MAX_REATTACHES: u32 = 3;
/// In-flight runs of one backend looked at after a restart; a backend's
/// worker runs one at a time, so more means the store was edited by hand.
const MAX_IN_FLIGHT_PER_BACKEND: usize = 64;
/// How long the agent may wait for a SLURM run's record to reach the
/// cluster's accounting database (it lags the step's end by a moment).
const CLUSTER_ACCOUNTING_WAIT: Duration = Duration::from_secs(5);

/// Why an exec's stream was left before its exit status.
enum Unfinished {
    /// The campaign stops.
    Stopped,
    /// The exec could not be followed any further.
    Lost(Interrupted),
}

/// How long before its gap ends a run's GPUs are leased and its host is
/// asked for its provenance: time enough for the host to answer (it reads
/// its GPUs' clocks and temperatures) before the run is due, little enough
/// that what it describes is the state the run starts in.
const PREPARE_AHEAD: Duration = Duration::from_millis(50);

/// What a run was prepared with, in the gap before it.
pub(super) struct Prepared {
    /// The run's trace (one per attempt), rooted here rather than in
    /// whatever call started the campaign's worker: the agent's calls and
    /// the power sampler's session join it through the calls' trace context.
    pub(super) span: tracing::Span,
    /// Held until the run ends.
    gpus: GpuLease,
    provenance: Provenance,
}

/// Why a run's preparation was left; the run is still pending.
pub(super) enum Unprepared {
    /// The campaign stops.
    Stopped,
    /// The backend went down.
    WentDown,
}

impl Scheduler {
    /// Prepares `run` in the `gap` before it (since when, how long) and
    /// returns when the gap is over. The gap counts from the end of the
    /// backend's previous run, so that what does not depend on the time
    /// (fetching the run, settling the previous one's cycles, the lease,
    /// the provenance) is done within it instead of after it; the pause is
    /// to a deadline fixed before that work, so the work does not lengthen
    /// the gap, and its end is slept precisely ([`TIMER_SLACK`]).
    ///
    /// The run stays pending until the gap is over: its `→ dispatched` is
    /// its start (`started_at`, which the gap is there to keep apart from
    /// the previous run's end), and a dispatched run is one whose exec may
    /// have been sent, so a backend going down in the gap, or a restart,
    /// would charge it an attempt. Its power session opens after the
    /// dispatch too: the session's window is the run's measured window, and
    /// the thermal gate before it waits for the devices as the run finds
    /// them.
    pub(super) async fn prepare(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        placed: &mut Placed,
        gap: Option<(Instant, Duration)>,
    ) -> Result<Prepared, Unprepared> {
        if let Some((since, gap)) = gap {
            let ahead = since + gap.saturating_sub(PREPARE_AHEAD);
            pause(ctx, &mut placed.watch, tokio::time::sleep_until(ahead)).await?;
        }
        let span = tracing::info_span!(
            parent: None,
            "run",
            berth.run.id = %run.id,
            berth.campaign.id = %ctx.id,
            berth.campaign.name = %ctx.plan.manifest.name,
            berth.config = %run.config,
            berth.backend = %run.backend,
            berth.host = %placed.host,
            berth.run.attempt = tracing::field::Empty,
        );
        if let Some(caller) = &ctx.launched_by {
            berth_server::trace_context::add_link(&span, caller);
        }
        // The provenance after the lease, which may wait for another run,
        // and before the power session, so that asking adds nothing to the
        // measured window: it describes the host as this run finds it.
        let leased = async {
            let gpus = self.lease_gpus(ctx, run, placed).await?;
            let provenance = provenance(placed, ctx.plan.manifest.power.enabled).await;
            Some((gpus, provenance))
        };
        let (gpus, provenance) = leased
            .instrument(span.clone())
            .await
            .ok_or(Unprepared::Stopped)?;
        if let Some((since, gap)) = gap {
            pause(ctx, &mut placed.watch, sleep_until_precisely(since + gap)).await?;
        }
        Ok(Prepared {
            span,
            gpus,
            provenance,
        })
    }

    /// Executes one prepared run, in its span (`Prepared::span`: the
    /// caller instruments the call with it). `Ok(None)`: the run reached an
    /// end state (or was taken by someone else); `Ok(Some(_))`: it is
    /// pending again.
    pub(super) async fn execute(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        placed: &Placed,
        prepared: Prepared,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let Prepared {
            gpus: _gpus,
            provenance,
            ..
        } = prepared;
        let dispatch = RunUpdate {
            host: Some(placed.host.clone()),
            add_attempt: true,
            started_now: true,
            ..Default::default()
        };
        let dispatched = self.record(
            &run.id,
            &[RunState::Pending],
            RunState::Dispatched,
            &dispatch,
            |run| {
                format!(
                    "run {} dispatched to {} (attempt {})",
                    run.id, placed.host, run.attempts
                )
            },
        )?;
        let Some(dispatched) = dispatched else {
            return Ok(None);
        };
        let attempt = dispatched.attempts;
        tracing::Span::current().record("berth.run.attempt", attempt);
        let power = &ctx.plan.manifest.power;
        let mut power_session = None;
        if power.enabled {
            match self
                .power
                .start(
                    &placed.host,
                    &placed.power_sampler,
                    &run.id,
                    power,
                    &placed.power_devices,
                )
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
        let request = exec_request(ctx, run, placed, &key);
        let mut client = placed.client.clone();
        let sent = std::time::Instant::now();
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
        crate::metrics::metrics().dispatched(sent.elapsed());
        self.start_running(
            run,
            Some(provenance),
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

    /// After a restart, the backend's runs that were in flight: a run whose
    /// exec its agent still has (running, or ended and kept) is adopted and
    /// recorded as if it had never been left; one whose exec is gone (never
    /// sent, agent restarted, retention passed) or whose host does not
    /// answer is pending again, its attempt counted.
    pub(super) async fn reconcile_in_flight(
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
                &run,
                None,
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
        stream: tonic::Streaming<ExecOutput>,
        power_session: Option<PowerSession>,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let key = exec_key(&run.id, attempt);
        let followed_since = SystemTime::now();
        let mut output = RunOutput::new();
        let exit = match read_to_exit(
            ctx,
            run,
            (host, &mut client),
            stream,
            (&key, self.config.reattach_grace),
            &mut output,
        )
        .await
        {
            Ok(exit) => exit,
            Err(Unfinished::Stopped) => {
                return self.abandon(run, &[RunState::Running], client, &key).await;
            }
            Err(Unfinished::Lost(why)) => {
                return self.requeue(ctx, run, attempt, RunState::Running, why);
            }
        };
        let ended = RunUpdate {
            exit_code: Some(exit.exit_code),
            duration_ms: exit
                .duration
                .and_then(|d| Duration::try_from(d).ok())
                .map(|d| d.as_millis() as u64),
            logs_tail: Some(output.logs_tail()),
            ..Default::default()
        };
        let timed_out = exit.reason == ExitReason::TimedOut as i32;
        if exit.exit_code == 0 && exit.reason == ExitReason::Exited as i32 {
            let power = match power_session {
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
            let cluster_accounting = self.cluster_accounting(ctx, run, &mut client, &key).await;
            let ended = RunUpdate {
                cluster_accounting,
                ..ended
            };
            self.record_success(run, ended, &output, power)?;
            return Ok(None);
        }
        // An array's task ending does not end its backend's other tasks:
        // its failure is its own.
        let in_array = ctx
            .plan
            .backend(&run.backend)
            .is_some_and(|backend| backend.array().is_some());
        if !timed_out
            && !in_array
            && let Some(why) = self
                .backend_died(ctx, run, &mut client, (followed_since, exit.exit_code))
                .await
        {
            let why = format!("exit code {} as {why}", exit.exit_code);
            return self.requeue(
                ctx,
                run,
                attempt,
                RunState::Running,
                Interrupted::BackendLost(why),
            );
        }
        let why = if timed_out {
            let timeout = ctx.plan.manifest.run.timeout.unwrap_or_default();
            format!("timed out after {}", humantime::format_duration(timeout))
        } else {
            format!("exit code {}", exit.exit_code)
        };
        let update = RunUpdate {
            error: Some(format!("{why}: {}", output.stderr_text())),
            ..ended
        };
        self.fail(ctx, run, attempt, RunState::Running, update)?;
        Ok(None)
    }

    /// The cluster's own record of a run that succeeded on a SLURM backend
    /// (its step's or array task's ConsumedEnergy), kept beside berth's
    /// measurement; None on other runtimes. Not getting it is a note in
    /// the record, never the run's failure.
    async fn cluster_accounting(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        client: &mut AgentClient,
        key: &str,
    ) -> Option<ExecAccounting> {
        let backend = ctx.plan.backend(&run.backend)?;
        if backend.runtime.proto() != Runtime::Slurm {
            return None;
        }
        let placed = self.store.placements(&ctx.id).map(|placements| {
            placements
                .into_iter()
                .find(|placement| placement.backend == run.backend)
        });
        let workload_id = match placed {
            Ok(Some(placement)) => placement.workload_id,
            Ok(None) => return Some(unasked("the backend is no longer placed".into())),
            Err(error) => return Some(unasked(format!("reading its placement: {error}"))),
        };
        let request = DescribeExecAccountingRequest {
            workload_id,
            exec_key: key.to_string(),
            wait: CLUSTER_ACCOUNTING_WAIT.try_into().ok(),
        };
        Some(match client.describe_exec_accounting(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => unasked(format!("the agent: {}", describe_status(&status))),
        })
    }

    /// Records a run that exited 0: its result line (or why it has none),
    /// and its energy and power samples when it was measured.
    fn record_success(
        &self,
        run: &Run,
        ended: RunUpdate,
        output: &RunOutput,
        power: Option<PowerRecord>,
    ) -> Result<(), OrchestratorError> {
        let _stored = tracing::info_span!("store result").entered();
        let (energy, power_series) = power.map(|p| (p.energy, p.series)).unzip();
        let (result_json, error) = match output.result() {
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
        self.record(
            &run.id,
            &[RunState::Running],
            RunState::Succeeded,
            &update,
            |run| format!("run {} succeeded", run.id),
        )?;
        Ok(())
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
        let why = match status.code() {
            code if agent_did_not_answer(code) => Interrupted::HostLost(reason),
            tonic::Code::NotFound => Interrupted::BackendLost(reason),
            tonic::Code::FailedPrecondition
                if has_reason(status, reasons::WORKLOAD_NOT_RUNNING) =>
            {
                Interrupted::BackendLost(reason)
            }
            _ => {
                let update = failure(-1, format!("exec refused: {reason}"));
                self.fail(ctx, run, attempt, RunState::Dispatched, update)?;
                return Ok(None);
            }
        };
        self.requeue(ctx, run, attempt, RunState::Dispatched, why)
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
            if let Some(why) = backend_state_since(client, run, &placement.workload_id, since).await
            {
                return Some(why);
            }
            if looked.elapsed() >= settle {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the agent runs for one attempt of a run: the manifest's command and
/// env with the run's placeholders filled in, under the attempt's key.
fn exec_request(ctx: &CampaignRun, run: &Run, placed: &Placed, key: &str) -> ExecRequest {
    let template = &ctx.plan.manifest.run;
    let (command, env) = run_command(ctx, run, &placed.endpoints);
    ExecRequest {
        exec_key: key.to_string(),
        workload_id: placed.workload_id.clone(),
        command,
        env,
        working_dir: template.working_dir.clone(),
        timeout: template
            .timeout
            .and_then(|t| prost_types::Duration::try_from(t).ok()),
    }
}

/// The run's command and env: the manifest's, its placeholders filled in.
pub(super) fn run_command(
    ctx: &CampaignRun,
    run: &Run,
    endpoints: &std::collections::BTreeMap<String, String>,
) -> (Vec<String>, Vec<EnvVar>) {
    let planned = PlannedRun {
        config: run.config.clone(),
        backend: run.backend.clone(),
        cycle: run.cycle,
        warmup: run.warmup,
        sequence: run.sequence,
    };
    let command = ctx.plan.command_for(&planned, &run.id, endpoints);
    let env = ctx
        .plan
        .env_for(&planned, &run.id, endpoints)
        .into_iter()
        .map(|(name, value)| EnvVar { name, value })
        .collect();
    (command, env)
}

/// Pause between tries to attach to an exec whose agent does not answer.
const REATTACH_PAUSE: Duration = Duration::from_millis(250);

/// A cluster accounting record saying why it has no figure.
fn unasked(note: String) -> ExecAccounting {
    ExecAccounting {
        note,
        ..Default::default()
    }
}

/// Reads an exec's stream into `output` until its exit status, attaching
/// again (up to [`MAX_REATTACHES`] times, the output starting over from the
/// agent's replay) when the stream breaks; an agent that does not answer is
/// tried again for `reattach_grace` (it may be restarting).
async fn read_to_exit(
    ctx: &CampaignRun,
    run: &Run,
    (host, client): (&str, &mut AgentClient),
    mut stream: tonic::Streaming<ExecOutput>,
    (key, reattach_grace): (&str, Duration),
    output: &mut RunOutput,
) -> Result<ExitStatus, Unfinished> {
    let mut reattached = 0;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = ctx.token.cancelled() => return Err(Unfinished::Stopped),
        };
        let lost = match message {
            Ok(Some(chunk)) => {
                match chunk.output {
                    Some(exec_output::Output::Stdout(data)) => output.stdout(&data),
                    Some(exec_output::Output::Stderr(data)) => output.stderr(&data),
                    Some(exec_output::Output::Exit(exit)) => return Ok(exit),
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
            return Err(Unfinished::Lost(Interrupted::HostLost(why)));
        }
        reattached += 1;
        let deadline = tokio::time::Instant::now() + reattach_grace;
        let attached = loop {
            match client.attach_exec(attach_request(key)).await {
                Err(status)
                    if agent_did_not_answer(status.code())
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::select! {
                        () = ctx.token.cancelled() => return Err(Unfinished::Stopped),
                        () = tokio::time::sleep(REATTACH_PAUSE) => {}
                    }
                }
                attached => break attached,
            }
        };
        match attached {
            Ok(again) => {
                tracing::info!(run = %run.id, host, lost, "exec stream broke; attached again");
                // The agent replays what it kept from the start.
                stream = again.into_inner();
                *output = RunOutput::new();
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                let why = format!("{lost}; host `{host}` answers but no longer has the exec");
                return Err(Unfinished::Lost(Interrupted::BackendLost(why)));
            }
            Err(status) => {
                let why = format!("{lost}; {}", describe_status(&status));
                return Err(Unfinished::Lost(Interrupted::HostLost(why)));
            }
        }
    }
}

/// Why the backend workload cannot have carried the run to its end, if
/// it cannot: gone, not running, or started again since `since`.
async fn backend_state_since(
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

/// The provenance of a run on `placed`: asked anew for a run that measures
/// power (its GPUs' temperature and clocks now), else the backend's, asked
/// once (one more call in every dispatch would slow trivial runs).
async fn provenance(placed: &Placed, measures_power: bool) -> Provenance {
    let describe = || async {
        let mut client = placed.client.clone();
        crate::provenance::describe(&mut client, &placed.host, &placed.workload_id).await
    };
    if measures_power {
        describe().await
    } else {
        placed.provenance.get_or_init(describe).await.clone()
    }
}

/// Waits for `sleep`, unless the campaign stops or the backend goes down
/// first.
async fn pause(
    ctx: &CampaignRun,
    watch: &mut BackendWatch,
    sleep: impl Future<Output = ()>,
) -> Result<(), Unprepared> {
    tokio::select! {
        () = ctx.token.cancelled() => Err(Unprepared::Stopped),
        () = sleep => Ok(()),
        _ = watch.went_down() => Err(Unprepared::WentDown),
    }
}

/// tokio's timer fires on the first millisecond tick after a deadline and
/// its driver sleeps in whole milliseconds, so a run would start up to 2 ms
/// after its gap (and its phase shift would blur by as much). The gap's
/// last stretch is slept by a thread instead, which the kernel wakes within
/// tens of microseconds of the deadline, never before it.
const TIMER_SLACK: Duration = Duration::from_millis(2);

async fn sleep_until_precisely(deadline: Instant) {
    if let Some(coarse) = deadline.checked_sub(TIMER_SLACK) {
        tokio::time::sleep_until(coarse).await;
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        // Left to finish its few milliseconds when the pause is abandoned.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// The idempotency key of one attempt of a run on its agent. Run id and
/// attempt are both recorded (`→ dispatched`) before the exec is sent, so a
/// restarted orchestrator derives the same key to attach to it.
pub(super) fn exec_key(run_id: &str, attempt: u32) -> String {
    format!("{run_id}/attempt-{attempt}")
}

fn attach_request(key: &str) -> AttachExecRequest {
    AttachExecRequest {
        exec_key: key.to_string(),
    }
}
