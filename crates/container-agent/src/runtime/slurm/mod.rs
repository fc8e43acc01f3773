//! The `slurm` runtime: a workload is a SLURM batch job submitted through
//! slurmrestd (OpenAPI v0.0.38, [`rest`]); execs are job steps started in
//! it with srun ([`exec`]). Create submits the job held (so a partition,
//! account or size SLURM refuses is an error of the create, naming the
//! field), start releases it and waits up to `slurm.start_wait` for it to
//! run; stop and a forced remove cancel it. A workload without a command
//! is an allocation that holds its nodes until cancelled or out of time,
//! for runs to be started in.
//!
//! The jobs are the state: a job is this agent's when its comment is
//! `berth:<engines.owner>` and the agent keeps its spec in
//! `slurm.output_dir/.berth/<job id>.spec` (removing a workload removes
//! that file), so a restarted agent finds its workloads, running or ended,
//! by asking slurmrestd.

mod accounting;
mod array;
pub mod container;
mod detached;
pub mod error;
mod exec;
pub(crate) mod job;
mod logs;
mod rest;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{
    EventKind, ExecAccounting, ExecOutput, LogLine, LogStream, Workload, WorkloadState,
};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use hyper::Method;
use prost::Message;
use serde_json::json;
use tokio::sync::{mpsc, watch};

pub use array::MAX_TASKS as MAX_ARRAY_TASKS;
pub use error::SlurmError;
use job::{ID_PREFIX, Job, Submission};

use super::{ExecCommand, WorkloadRuntime, validate_name};
use crate::config::SlurmConfig;
use crate::error::AgentError;
use crate::events::EventBus;

/// Longest time Stop waits past its timeout for SLURM to end the job.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How often a job is looked at while start or stop waits for it.
const WAIT_STEP: Duration = Duration::from_millis(200);
/// The characters of an exec's key its step's name shows.
const MAX_STEP_KEY_CHARS: usize = 32;

#[derive(Clone)]
pub struct SlurmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    rest: rest::RestClient,
    clients: exec::Clients,
    mark: String,
    owner: String,
    default_partition: String,
    output_dir: PathBuf,
    container: container::ContainerRuntime,
    start_wait: Duration,
    poll_interval: Duration,
    events: EventBus,
}

/// The runtime for `config`, or why it is off (its `rest_url` is `off`, or
/// a setting is unusable). slurmrestd is not asked yet: one that is down
/// makes calls UNAVAILABLE until it is back.
pub fn locate(config: &SlurmConfig, owner: &str, events: EventBus) -> Result<SlurmRuntime, String> {
    if config.rest_url == "off" {
        return Err("slurm.rest_url is \"off\"".into());
    }
    let rest = rest::RestClient::new(config)?;
    let runtime = SlurmRuntime {
        inner: Arc::new(Inner {
            rest,
            clients: exec::Clients {
                srun: config.srun.clone(),
                slurm_conf: config.slurm_conf.clone(),
            },
            mark: job::owner_mark(owner),
            owner: owner.to_string(),
            default_partition: config.default_partition.clone(),
            output_dir: config.output_dir.clone(),
            container: config.container_runtime,
            start_wait: config.start_wait,
            poll_interval: config.poll_interval,
            events,
        }),
    };
    tokio::spawn(watch_jobs(Arc::downgrade(&runtime.inner)));
    Ok(runtime)
}

impl Inner {
    /// Where keyed execs keep their output and exit, a directory per job.
    fn exec_root(&self) -> PathBuf {
        self.output_dir.join(".berth").join("exec")
    }

    fn spec_path(&self, job_id: u64) -> PathBuf {
        self.output_dir
            .join(".berth")
            .join(format!("{job_id}.spec"))
    }

    /// The spec the job was created from; None for a job that is not this
    /// agent's (or was removed).
    fn spec(&self, job: &Job) -> Option<WorkloadSpec> {
        if job.comment != self.mark {
            return None;
        }
        let bytes = std::fs::read(self.spec_path(job.id)).ok()?;
        WorkloadSpec::decode(bytes.as_slice()).ok()
    }

    /// Every job of this agent's that SLURM still knows, with its spec.
    async fn jobs(&self) -> Result<Vec<(Job, WorkloadSpec)>, AgentError> {
        let answer = self.rest.call(Method::GET, "jobs", None).await?;
        if !answer.ok() {
            return Err(self.failed("listing jobs", &answer).into());
        }
        let records = answer.body["jobs"].as_array().cloned().unwrap_or_default();
        Ok(Job::from_records(&records)
            .into_iter()
            .filter_map(|job| {
                let spec = self.spec(&job)?;
                Some((job, spec))
            })
            .collect())
    }

    /// Job `job_id` when SLURM knows it.
    async fn job(&self, job_id: u64) -> Result<Option<Job>, AgentError> {
        let answer = self
            .rest
            .call(Method::GET, &format!("job/{job_id}"), None)
            .await?;
        if !answer.ok() {
            // 2017: "Invalid job id specified", a job slurmctld forgot.
            if answer.errors().iter().any(|(n, _)| *n == 2017) {
                return Ok(None);
            }
            return Err(self
                .failed(&format!("reading job {job_id}"), &answer)
                .into());
        }
        // An array's records (a task each) come together under its id.
        let records = answer.body["jobs"].as_array().cloned().unwrap_or_default();
        Ok(Job::from_records(&records)
            .into_iter()
            .find(|job| job.id == job_id))
    }

    /// The workload `id` (`slurm-<job id>`) or named `id`: its job and spec.
    async fn find(&self, id: &str) -> Result<Option<(Job, WorkloadSpec)>, AgentError> {
        if let Some(job_id) = id.strip_prefix(ID_PREFIX).and_then(|n| n.parse().ok()) {
            return Ok(self
                .job(job_id)
                .await?
                .and_then(|job| Some((job.clone(), self.spec(&job)?))));
        }
        // The newest job of that name: older ones are ended workloads the
        // name was used for before.
        Ok(self
            .jobs()
            .await?
            .into_iter()
            .filter(|(job, _)| job.name == id)
            .max_by_key(|(job, _)| job.id))
    }

    /// The address SLURM reaches `node` at (its NodeAddr), or why it is not
    /// known.
    async fn node_address(&self, node: &str) -> Result<String, String> {
        if node.is_empty() {
            return Err("SLURM names no batch host for the job yet".into());
        }
        let answer = self
            .rest
            .call(Method::GET, &format!("node/{node}"), None)
            .await
            .map_err(|e| format!("reading node `{node}`: {e}"))?;
        if !answer.ok() {
            return Err(self
                .failed(&format!("reading node `{node}`"), &answer)
                .to_string());
        }
        let found = &answer.body["nodes"][0];
        [&found["address"], &found["hostname"]]
            .into_iter()
            .filter_map(|field| field.as_str())
            .find(|address| !address.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("slurmrestd gives no address for node `{node}`"))
    }

    /// The job array `id` (`slurm-<job id>`) names, from the spec this
    /// agent keeps of it: an exec into an array needs nothing of SLURM's
    /// (its thousand task records), only the task's directory.
    fn array_id(&self, id: &str) -> Option<u64> {
        let job_id = id.strip_prefix(ID_PREFIX)?.parse().ok()?;
        let bytes = std::fs::read(self.spec_path(job_id)).ok()?;
        let spec = WorkloadSpec::decode(bytes.as_slice()).ok()?;
        spec.slurm
            .is_some_and(|slurm| !slurm.array_tasks.is_empty())
            .then_some(job_id)
    }

    /// An exec into job array `job_id`: following its task of the exec's
    /// key, whatever its state (it runs the command it was created with).
    fn attach_task(
        &self,
        job_id: u64,
        key: Option<&str>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        let no_task = |reason: String| AgentError::InvalidArgument {
            field: "exec_key",
            reason,
        };
        let key = key.ok_or_else(|| {
            no_task(format!(
                "job array {job_id} runs the commands it was created with: exec into it by a task's key"
            ))
        })?;
        detached::attach_task(self.clients.clone(), &self.exec_root(), job_id, key, permit)
            .ok_or_else(|| {
                no_task(format!(
                    "job array {job_id} has no task with exec key `{key}`"
                ))
            })
    }

    async fn find_or_404(&self, id: &str) -> Result<(Job, WorkloadSpec), AgentError> {
        self.find(id)
            .await?
            .ok_or_else(|| AgentError::WorkloadNotFound(id.to_string()))
    }

    fn failed(&self, action: &str, answer: &rest::Answer) -> SlurmError {
        SlurmError::Failed {
            url: self.rest.url().to_string(),
            action: action.to_string(),
            message: answer.error_text(),
        }
    }

    /// Polls the job until `done` holds or `limit` passes: its last state.
    async fn wait_for(
        &self,
        job: Job,
        limit: Duration,
        done: impl Fn(&Job) -> bool,
    ) -> Result<Job, AgentError> {
        let deadline = Instant::now() + limit;
        let mut job = job;
        while !done(&job) && Instant::now() < deadline {
            tokio::time::sleep(WAIT_STEP).await;
            match self.job(job.id).await? {
                Some(now) => job = now,
                None => break,
            }
        }
        Ok(job)
    }

    /// Refuses a job no node of its partition could ever hold (more memory
    /// or CPUs per node than the largest has): SLURM takes such a job held
    /// and would leave it pending for good once released.
    async fn check_fits(&self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        let Some(resources) = &spec.resources else {
            return Ok(());
        };
        let memory_mb = resources.memory_limit_bytes.div_ceil(1 << 20);
        let cpus = resources.cpu_limit.ceil() as u64;
        if memory_mb == 0 && cpus == 0 {
            return Ok(());
        }
        let partition = spec
            .slurm
            .as_ref()
            .map(|s| s.partition.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or(&self.default_partition);
        let answer = self.rest.call(Method::GET, "nodes", None).await?;
        // Without the node list, SLURM judges the job when it schedules it.
        let nodes: Vec<(u64, u64)> = answer.body["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|node| {
                partition.is_empty()
                    || node["partitions"]
                        .as_array()
                        .is_some_and(|parts| parts.iter().any(|p| p.as_str() == Some(partition)))
            })
            .map(|node| {
                (
                    node["real_memory"].as_u64().unwrap_or(0),
                    node["cpus"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let Some(largest_memory) = nodes.iter().map(|(memory, _)| *memory).max() else {
            return Ok(());
        };
        let most_cpus = nodes.iter().map(|(_, cpus)| *cpus).max().unwrap_or(0);
        let within = if partition.is_empty() {
            "the cluster".to_string()
        } else {
            format!("partition `{partition}`")
        };
        if memory_mb > largest_memory {
            return Err(SlurmError::Refused {
                field: "spec.resources.memory_limit_bytes",
                value: format!("{memory_mb} MiB per node"),
                message: format!(
                    "no node of {within} has that much memory: the largest has {largest_memory} MiB"
                ),
            }
            .into());
        }
        if cpus > most_cpus {
            return Err(SlurmError::Refused {
                field: "spec.resources.cpu_limit",
                value: format!("{cpus} CPUs per task"),
                message: format!("no node of {within} has that many: the largest has {most_cpus}"),
            }
            .into());
        }
        Ok(())
    }

    fn publish(&self, job: &Job, kind: EventKind, message: String) {
        self.events
            .publish(&job.workload_id(), &job.name, kind, message);
    }
}

/// Publishes an event for each change of a job's state SLURM makes on its
/// own (it starts, ends, times out), read every `slurm.poll_interval`
/// until the runtime is dropped. These reads also keep what Info says of
/// slurmrestd current (`failing`): an agent with no job pings instead, at
/// its first look and while slurmrestd does not answer.
async fn watch_jobs(inner: std::sync::Weak<Inner>) {
    // Jobs' workload states at the last look (an event is a change of
    // those, not of SLURM's finer states); None before the first, whose
    // jobs the agent found rather than saw change (no events for them).
    let mut seen: Option<HashMap<u64, WorkloadState>> = None;
    loop {
        let Some(runtime) = inner.upgrade() else {
            return;
        };
        let every = runtime.poll_interval;
        // An agent with no job of its own does not ask (a cluster's job
        // list is large).
        let has_jobs = std::fs::read_dir(runtime.output_dir.join(".berth")).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().ends_with(".spec"))
        });
        if !has_jobs {
            if seen.is_none() || runtime.rest.unreachable().is_some() {
                let _ = runtime.rest.ping().await;
            }
            seen = Some(HashMap::new());
        } else if let Ok(jobs) = runtime.jobs().await {
            let mut now = HashMap::new();
            for (job, _) in jobs {
                let state = job.workload_state();
                // A job new since the last look was submitted (held) then.
                let before = seen
                    .as_ref()
                    .map(|seen| seen.get(&job.id).copied().unwrap_or(WorkloadState::Created));
                if before.is_some_and(|before| before != state)
                    && let Some((kind, message)) = event_of(&job)
                {
                    runtime.publish(&job, kind, message);
                }
                now.insert(job.id, state);
            }
            seen = Some(now);
        }
        drop(runtime);
        tokio::time::sleep(every).await;
    }
}

/// The event a job's new state is, if any.
fn event_of(job: &Job) -> Option<(EventKind, String)> {
    let what = job.state_reason();
    match job.workload_state() {
        WorkloadState::Running => Some((
            EventKind::Started,
            format!("job {} on {}: {what}", job.id, job.nodes),
        )),
        WorkloadState::Stopped => Some((EventKind::Stopped, format!("job {}: {what}", job.id))),
        WorkloadState::Exited if job.state == "OUT_OF_MEMORY" => {
            Some((EventKind::OomKilled, format!("job {}: {what}", job.id)))
        }
        WorkloadState::Exited => Some((
            EventKind::Died,
            format!("job {}: {what}, exit code {}", job.id, job.exit_code()),
        )),
        _ => None,
    }
}

fn state_name(state: WorkloadState) -> &'static str {
    match state {
        WorkloadState::Created => "pending",
        WorkloadState::Running => "running",
        WorkloadState::Stopped => "stopped",
        WorkloadState::Exited => "exited",
        WorkloadState::Restarting => "requeued",
        WorkloadState::Removing | WorkloadState::Unspecified => "unknown",
    }
}

/// A step name SLURM takes, unique to the exec: for a keyed exec, the
/// key's readable start and its hash (so a restarted agent names it alike).
fn step_name(key: Option<&str>) -> String {
    let Some(key) = key else {
        return format!("berth-exec-{}", uuid::Uuid::new_v4().simple());
    };
    let readable: String = key
        .chars()
        .take(MAX_STEP_KEY_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("berth-exec-{readable}-{}", detached::key_hash(key))
}

#[tonic::async_trait]
impl WorkloadRuntime for SlurmRuntime {
    fn kind(&self) -> Runtime {
        Runtime::Slurm
    }

    fn validate(&self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        job::validate(spec, self.inner.container)
    }

    fn failing(&self) -> Option<String> {
        self.inner.rest.unreachable()
    }

    async fn create(&self, name: &str, spec: WorkloadSpec) -> Result<Workload, AgentError> {
        validate_name(name)?;
        self.validate(&spec)?;
        let inner = &self.inner;
        if inner
            .jobs()
            .await?
            .iter()
            .any(|(job, _)| job.name == name && !job.finished())
        {
            return Err(AgentError::NameTaken(name.to_string()));
        }
        inner.check_fits(&spec).await?;
        let spec_dir = inner.output_dir.join(".berth");
        std::fs::create_dir_all(&spec_dir).map_err(|e| AgentError::FileNotFound {
            field: format!("slurm.output_dir ({e})"),
            path: spec_dir.display().to_string(),
        })?;
        let body = job::submit_body(
            &spec,
            &Submission {
                name,
                owner: &inner.owner,
                default_partition: &inner.default_partition,
                output_dir: &inner.output_dir,
                exec_root: &inner.exec_root(),
                container: inner.container,
            },
        );
        let answer = inner
            .rest
            .call(Method::POST, "job/submit", Some(&body))
            .await?;
        // A held job comes with error 2042 ("Job is in held state") beside
        // its id: the id says it was submitted.
        let Some(job_id) = answer.body["job_id"]
            .as_u64()
            .filter(|_| answer.status.is_success())
        else {
            let (number, message) = answer
                .errors()
                .into_iter()
                .next()
                .unwrap_or((0, answer.error_text()));
            let field = job::refused_field(number, &message);
            return Err(SlurmError::Refused {
                field,
                value: job::field_value(&spec, field, &inner.default_partition),
                message: format!("{message} (error {number})"),
            }
            .into());
        };
        let tasks = spec
            .slurm
            .as_ref()
            .map_or(&[][..], |slurm| &slurm.array_tasks[..]);
        let kept = std::fs::write(inner.spec_path(job_id), spec.encode_to_vec())
            .and_then(|()| array::make_task_dirs(&inner.exec_root(), job_id, tasks));
        if let Err(error) = kept {
            let _ = inner
                .rest
                .call(Method::DELETE, &format!("job/{job_id}"), None)
                .await;
            return Err(AgentError::Internal(format!(
                "job {job_id} submitted, then cancelled: its spec could not be kept in {}: {error}",
                spec_dir.display()
            )));
        }
        let job = inner.job(job_id).await?.ok_or_else(|| {
            AgentError::Internal(format!(
                "job {job_id} was submitted but SLURM does not know it"
            ))
        })?;
        inner.publish(
            &job,
            EventKind::Created,
            format!("submitted as job {job_id}, held"),
        );
        Ok(job.workload(Some(spec)))
    }

    async fn start(&self, id: &str) -> Result<Workload, AgentError> {
        let inner = &self.inner;
        let (job, spec) = inner.find_or_404(id).await?;
        if job.finished() {
            return Err(AgentError::WrongState {
                state: state_name(job.workload_state()),
                name: job.name,
                reason: "a job that ended does not run again; remove it and create it anew",
            });
        }
        if job.held() {
            let answer = inner
                .rest
                .call(
                    Method::POST,
                    &format!("job/{}", job.id),
                    Some(&json!({"hold": false})),
                )
                .await?;
            // Releasing an array answers an error for its tasks that are
            // no longer held ("Job has already finished") beside releasing
            // the others: the job as it is now says whether it worked.
            let released = answer.ok()
                || (job.array.is_some() && inner.job(job.id).await?.is_some_and(|now| !now.held()));
            if !released {
                return Err(inner
                    .failed(&format!("releasing job {}", job.id), &answer)
                    .into());
            }
        }
        let job = inner
            .wait_for(job, inner.start_wait, |job| job.state != "PENDING")
            .await?;
        Ok(job.workload(Some(spec)))
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<Workload, AgentError> {
        let inner = &self.inner;
        let (job, spec) = inner.find_or_404(id).await?;
        if job.finished() {
            return Ok(job.workload(Some(spec)));
        }
        let answer = inner
            .rest
            .call(Method::DELETE, &format!("job/{}", job.id), None)
            .await?;
        if !answer.ok() {
            return Err(inner
                .failed(&format!("cancelling job {}", job.id), &answer)
                .into());
        }
        let job = inner
            .wait_for(job, timeout + STOP_GRACE, Job::finished)
            .await?;
        Ok(job.workload(Some(spec)))
    }

    async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let inner = &self.inner;
        let (job, _) = inner.find_or_404(id).await?;
        if !job.finished() {
            if !force {
                return Err(AgentError::WrongState {
                    state: state_name(job.workload_state()),
                    name: job.name,
                    reason: "stop it first or remove with force",
                });
            }
            let answer = inner
                .rest
                .call(Method::DELETE, &format!("job/{}", job.id), None)
                .await?;
            if !answer.ok() {
                return Err(inner
                    .failed(&format!("cancelling job {}", job.id), &answer)
                    .into());
            }
        }
        // Its keyed execs' output and exits go with it.
        let _ = std::fs::remove_dir_all(inner.exec_root().join(job.id.to_string()));
        match std::fs::remove_file(inner.spec_path(job.id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "job {} cancelled, but its spec {} stays: {e}",
                    job.id,
                    inner.spec_path(job.id).display()
                )));
            }
        }
        inner.publish(&job, EventKind::Removed, format!("job {} removed", job.id));
        Ok(())
    }

    /// The job as a workload; a running one with the address of the node
    /// its batch script runs on (where a deployment's replica answers).
    async fn inspect(&self, id: &str) -> Result<Option<Workload>, AgentError> {
        let Some((job, spec)) = self.inner.find(id).await? else {
            return Ok(None);
        };
        let mut workload = job.workload(Some(spec));
        if job.workload_state() == WorkloadState::Running {
            match self.inner.node_address(&job.batch_host).await {
                Ok(address) => workload.ip_addresses = vec![address],
                Err(why) => workload.ip_addresses_note = why,
            }
        }
        Ok(Some(workload))
    }

    async fn list(&self) -> Result<Vec<Workload>, AgentError> {
        Ok(self
            .inner
            .jobs()
            .await?
            .into_iter()
            .map(|(job, spec)| job.workload(Some(spec)))
            .collect())
    }

    async fn exec(
        &self,
        id: &str,
        exec: ExecCommand,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        let inner = &self.inner;
        if let Some(array_id) = inner.array_id(id) {
            return inner.attach_task(array_id, exec.key.as_deref(), permit);
        }
        let (job, spec) = inner.find_or_404(id).await?;
        let state = job.workload_state();
        if state != WorkloadState::Running {
            return Err(AgentError::NotRunning {
                name: job.name,
                state: state_name(state),
            });
        }
        let workload_env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        let default_dir = if spec.working_dir.is_empty() {
            inner.output_dir.clone()
        } else {
            PathBuf::from(&spec.working_dir)
        };
        let step = step_name(exec.key.as_deref());
        // In the workload's image, the step sees srun's environment: the
        // workload's and the exec's variables.
        let mut exec = exec;
        let names: Vec<String> = workload_env
            .iter()
            .chain(&exec.command.env)
            .map(|(name, _)| name.clone())
            .collect();
        exec.command.argv =
            inner
                .container
                .wrap(&spec, &exec.command.argv, names.iter().map(String::as_str));
        let command = inner
            .clients
            .step(&job, &workload_env, &exec, &step, &default_dir);
        match &exec.key {
            // Outlives the agent, to be attached again by its key.
            Some(key) => detached::start(
                inner.clients.clone(),
                &inner.exec_root(),
                key,
                detached::Step {
                    job_id: job.id,
                    name: step,
                    command,
                },
                exec.timeout,
                permit,
            ),
            None => exec::run(
                inner.clients.clone(),
                job.id,
                command,
                step,
                exec.timeout,
                permit,
            ),
        }
    }

    async fn reattach(
        &self,
        key: &str,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<mpsc::Receiver<ExecOutput>>, AgentError> {
        Ok(detached::reattach(
            self.inner.clients.clone(),
            &self.inner.exec_root(),
            key,
            step_name(Some(key)),
            permit,
        ))
    }

    async fn exec_accounting(
        &self,
        key: &str,
        wait: Duration,
    ) -> Result<Option<ExecAccounting>, AgentError> {
        // Found by its key in the agent's own files: nothing is asked of
        // slurmrestd (an array's thousand task records).
        let inner = &self.inner;
        let Some(what) = detached::accounted(&inner.exec_root(), key, step_name(Some(key))) else {
            return Ok(None);
        };
        Ok(Some(inner.clients.accounting(&what, wait).await))
    }

    fn keeps_exec_accounting(&self) -> bool {
        true
    }

    async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<mpsc::Receiver<LogLine>, AgentError> {
        let inner = &self.inner;
        let (job, _) = inner.find_or_404(id).await?;
        let path = |pattern: &str| job.output_path(pattern).unwrap_or_default();
        let files = [
            (path(&job.standard_output), LogStream::Stdout),
            (path(&job.standard_error), LogStream::Stderr),
        ];
        let (finished_tx, finished) = watch::channel(job.finished());
        if follow && !job.finished() {
            let runtime = self.clone();
            let job_id = job.id;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(runtime.inner.poll_interval) => {}
                        () = finished_tx.closed() => return,
                    }
                    let ended = match runtime.inner.job(job_id).await {
                        Ok(job) => job.is_none_or(|job| job.finished()),
                        Err(_) => false,
                    };
                    if ended {
                        let _ = finished_tx.send(true);
                        return;
                    }
                }
            });
        }
        Ok(logs::stream(files, tail, follow, finished))
    }
}
