//! A workload spec as a SLURM batch job (the v0.0.38 submit body), and a
//! job as slurmrestd describes it read back as a berth workload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use berth_proto::agent::v1::{Workload, WorkloadState};
use berth_proto::common::v1::{SlurmArrayTask, WorkloadSpec};
use serde_json::{Map, Value, json};

use super::array::{self, ArrayTasks};
use super::container::ContainerRuntime;
use crate::error::AgentError;

/// Workload ids are the job id behind this prefix.
pub const ID_PREFIX: &str = "slurm-";
/// Longest text a SLURM field of the spec may hold.
const MAX_FIELD_BYTES: usize = 1024;
/// Most nodes one job may ask for.
const MAX_NODES: u32 = 100_000;

/// The job's comment marks it as this agent's: `berth:<owner>`.
pub fn owner_mark(owner: &str) -> String {
    format!("berth:{owner}")
}

/// What the runtime's settings add to a spec to make it a job.
pub struct Submission<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub default_partition: &'a str,
    pub output_dir: &'a Path,
    /// Where keyed execs and array tasks keep their output and exit.
    pub exec_root: &'a Path,
    /// What the nodes run an image with.
    pub container: ContainerRuntime,
}

/// Checks the spec's SLURM settings, naming the first field that is wrong;
/// an image and its binds against the nodes' `container` runtime.
pub fn validate(spec: &WorkloadSpec, container: ContainerRuntime) -> Result<(), AgentError> {
    let invalid =
        |field: &'static str, reason: String| AgentError::InvalidArgument { field, reason };
    container.validate(spec)?;
    let host_only: [(&'static str, bool); 4] = [
        ("spec.ports", !spec.ports.is_empty()),
        ("spec.ulimits", !spec.ulimits.is_empty()),
        ("spec.health_check", spec.health_check.is_some()),
        ("spec.vm", spec.vm.is_some()),
    ];
    if let Some((field, _)) = host_only.into_iter().find(|(_, given)| *given) {
        return Err(invalid(
            field,
            "the slurm runtime cannot honour it: a job sees the nodes' files and network as they are".into(),
        ));
    }
    if let Some(gpus) = &spec.gpus {
        if !gpus.device_ids.is_empty() || !gpus.cdi_devices.is_empty() {
            return Err(invalid(
                "spec.gpus",
                "SLURM chooses a job's GPUs: ask for a count (or slurm.gres), not devices".into(),
            ));
        }
        if gpus.count < 0 {
            return Err(invalid(
                "spec.gpus.count",
                "`all` has no meaning on a cluster: ask for a count".into(),
            ));
        }
    }
    if let Some(resources) = &spec.resources
        && !(resources.cpu_limit.is_finite() && resources.cpu_limit >= 0.0)
    {
        return Err(invalid(
            "spec.resources.cpu_limit",
            format!("{} is not a number of CPUs", resources.cpu_limit),
        ));
    }
    let Some(slurm) = &spec.slurm else {
        return Ok(());
    };
    array::validate(spec, &slurm.array_tasks)?;
    for (field, value) in [
        ("spec.slurm.partition", &slurm.partition),
        ("spec.slurm.account", &slurm.account),
        ("spec.slurm.qos", &slurm.qos),
        ("spec.slurm.constraints", &slurm.constraints),
        ("spec.slurm.gres", &slurm.gres),
    ] {
        if value.len() > MAX_FIELD_BYTES || value.chars().any(char::is_control) {
            return Err(invalid(
                field,
                format!("at most {MAX_FIELD_BYTES} bytes with no control characters"),
            ));
        }
    }
    if slurm.nodes > MAX_NODES {
        return Err(invalid(
            "spec.slurm.nodes",
            format!("{} is more than {MAX_NODES}", slurm.nodes),
        ));
    }
    if let Some(limit) = &slurm.time_limit
        && (limit.seconds < 0 || limit.nanos < 0 || (limit.seconds == 0 && limit.nanos == 0))
    {
        return Err(invalid(
            "spec.slurm.time_limit",
            "must be positive (absent: the partition's default)".into(),
        ));
    }
    Ok(())
}

/// The body of `POST job/submit`: the job held, so that create and start
/// stay two steps (start releases it).
pub fn submit_body(spec: &WorkloadSpec, submission: &Submission<'_>) -> Value {
    let slurm = spec.slurm.clone().unwrap_or_default();
    let mut job = Map::new();
    let mut set = |key: &str, value: Value| {
        job.insert(key.to_string(), value);
    };
    set("name", json!(submission.name));
    set("comment", json!(owner_mark(submission.owner)));
    set("hold", json!(true));
    // A job the cluster requeues would run its command a second time.
    set("requeue", json!(false));
    let partition = if slurm.partition.is_empty() {
        submission.default_partition
    } else {
        &slurm.partition
    };
    for (key, value) in [
        ("partition", partition),
        ("account", &slurm.account),
        ("qos", &slurm.qos),
        ("constraints", &slurm.constraints),
    ] {
        if !value.is_empty() {
            set(key, json!(value));
        }
    }
    if let Some(limit) = &slurm.time_limit {
        let seconds = u64::try_from(limit.seconds).unwrap_or(0) + u64::from(limit.nanos > 0);
        set("time_limit", json!(seconds.div_ceil(60).max(1)));
    }
    if slurm.nodes > 0 {
        set("nodes", json!([slurm.nodes, slurm.nodes]));
    }
    if let Some(resources) = &spec.resources {
        if resources.cpu_limit > 0.0 {
            set("cpus_per_task", json!(resources.cpu_limit.ceil() as u64));
        }
        if resources.memory_limit_bytes > 0 {
            set(
                "memory_per_node",
                json!(resources.memory_limit_bytes.div_ceil(1 << 20)),
            );
        }
    }
    let gpus = spec.gpus.as_ref().map_or(0, |g| g.count);
    if !slurm.gres.is_empty() {
        set("gres", json!(slurm.gres));
    } else if gpus > 0 {
        set("gres", json!(format!("gpu:{gpus}")));
    }
    let working_dir = if spec.working_dir.is_empty() {
        submission.output_dir.display().to_string()
    } else {
        spec.working_dir.clone()
    };
    set("current_working_directory", json!(working_dir));
    // An array's tasks each have their own: `%A_%a` is `<job>_<task>`.
    let id = if slurm.array_tasks.is_empty() {
        "%j"
    } else {
        "%A_%a"
    };
    let output = |stream: &str| {
        submission
            .output_dir
            .join(format!("{}.{id}.{stream}", submission.name))
            .display()
            .to_string()
    };
    // What the job's environment hands a command run in an image.
    let spec_env = || spec.env.iter().map(|var| var.name.as_str());
    let script = if slurm.array_tasks.is_empty() {
        let command = if spec.command.is_empty() {
            Vec::new()
        } else {
            submission.container.wrap(spec, &spec.command, spec_env())
        };
        script(&command)
    } else {
        set(
            "array",
            json!(array::array_option(
                slurm.array_tasks.len(),
                slurm.array_parallelism
            )),
        );
        let tasks: Vec<_> = slurm
            .array_tasks
            .iter()
            .map(|task| {
                let names = spec_env().chain(task.env.iter().map(|var| var.name.as_str()));
                SlurmArrayTask {
                    command: submission.container.wrap(spec, &task.command, names),
                    ..task.clone()
                }
            })
            .collect();
        array::script(&tasks, submission.exec_root)
    };
    set("standard_output", json!(output("out")));
    set("standard_error", json!(output("err")));
    // A job gets this environment and nothing of the agent's.
    let mut environment = Map::new();
    environment.insert("PATH".into(), json!("/usr/local/bin:/usr/bin:/bin"));
    for var in &spec.env {
        environment.insert(var.name.clone(), json!(var.value));
    }
    set("environment", Value::Object(environment));
    json!({ "script": script, "job": job })
}

/// The batch script: the command, or (with none) a shell that holds the
/// allocation until the job is cancelled or its time runs out, for runs to
/// be started in as steps.
fn script(command: &[String]) -> String {
    if command.is_empty() {
        return "#!/bin/sh\n# berth: an allocation that runs are started in (srun --overlap)\nexec sleep infinity\n".into();
    }
    let quoted: Vec<String> = command.iter().map(|arg| shell_quote(arg)).collect();
    format!("#!/bin/sh\nexec {}\n", quoted.join(" "))
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The field a refused submission is about, from SLURM's error number (the
/// ones slurm_errno.h gives each field) or its text.
pub fn refused_field(number: i64, message: &str) -> &'static str {
    let message = message.to_ascii_lowercase();
    match number {
        2000 | 2001 | 2003 | 2015 | 2070 | 2101 => "spec.slurm.partition",
        2045 => "spec.slurm.account",
        2066 => "spec.slurm.qos",
        2051 => "spec.slurm.time_limit",
        2006 => "spec.slurm.nodes",
        2029 | 2031 => "spec.slurm.constraints",
        2044 => "spec.resources.memory_limit_bytes",
        2072 | 2102 | 2115 | 2119 => "spec.slurm.gres",
        _ if message.contains("partition") => "spec.slurm.partition",
        _ if message.contains("account") => "spec.slurm.account",
        _ if message.contains("qos") => "spec.slurm.qos",
        _ if message.contains("memory") => "spec.resources.memory_limit_bytes",
        _ if message.contains("time limit") => "spec.slurm.time_limit",
        _ if message.contains("feature") || message.contains("constraint") => {
            "spec.slurm.constraints"
        }
        _ if message.contains("gres") || message.contains("generic resource") => "spec.slurm.gres",
        _ => "spec",
    }
}

/// The spec's value at `field`, to say what was refused.
pub fn field_value(spec: &WorkloadSpec, field: &str, default_partition: &str) -> String {
    let slurm = spec.slurm.clone().unwrap_or_default();
    let value = match field {
        "spec.slurm.partition" if slurm.partition.is_empty() => default_partition.to_string(),
        "spec.slurm.partition" => slurm.partition,
        "spec.slurm.account" => slurm.account,
        "spec.slurm.qos" => slurm.qos,
        "spec.slurm.constraints" => slurm.constraints,
        "spec.slurm.gres" => slurm.gres,
        "spec.slurm.nodes" => slurm.nodes.to_string(),
        "spec.slurm.time_limit" => slurm
            .time_limit
            .map(|t| format!("{}s", t.seconds))
            .unwrap_or_default(),
        "spec.resources.memory_limit_bytes" => spec
            .resources
            .as_ref()
            .map(|r| format!("{} bytes", r.memory_limit_bytes))
            .unwrap_or_default(),
        _ => return "the job".into(),
    };
    if value.is_empty() {
        "the default".into()
    } else {
        format!("`{value}`")
    }
}

/// A job as slurmrestd describes it (`GET job/{id}`, `GET jobs`).
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub name: String,
    pub comment: String,
    pub state: String,
    pub reason: String,
    /// The batch script's wait status (`exit_code`), as waitpid gives it.
    pub wait_status: i64,
    pub nodes: String,
    /// The node the batch script runs on (its first); empty before it runs.
    pub batch_host: String,
    pub standard_output: String,
    pub standard_error: String,
    pub submit_time: u64,
    pub start_time: u64,
    pub working_dir: String,
    /// A job array's tasks; its state is then theirs, merged.
    pub array: Option<ArrayTasks>,
}

impl Job {
    pub fn from_json(job: &Value) -> Option<Self> {
        let text = |key: &str| job[key].as_str().unwrap_or_default().to_string();
        let time = |key: &str| job[key].as_u64().unwrap_or(0);
        Some(Self {
            id: job["job_id"].as_u64()?,
            name: text("name"),
            comment: text("comment"),
            state: text("job_state"),
            reason: text("state_reason"),
            wait_status: job["exit_code"].as_i64().unwrap_or(0),
            nodes: text("nodes"),
            batch_host: text("batch_host"),
            standard_output: text("standard_output"),
            standard_error: text("standard_error"),
            submit_time: time("submit_time"),
            start_time: time("start_time"),
            working_dir: text("current_working_directory"),
            array: None,
        })
    }

    /// The jobs slurmrestd's records describe: a record per plain job, and
    /// the records of one array (a task each, and its pending tasks) merged
    /// into one job of the array's id.
    pub fn from_records(records: &[Value]) -> Vec<Self> {
        let mut jobs = Vec::new();
        let mut arrays: BTreeMap<u64, Vec<(Self, Option<u32>)>> = BTreeMap::new();
        for record in records {
            let Some(job) = Self::from_json(record) else {
                continue;
            };
            match record["array_job_id"].as_u64().filter(|id| *id > 0) {
                Some(array_id) => {
                    let task = record["array_task_id"]
                        .as_u64()
                        .and_then(|t| u32::try_from(t).ok());
                    arrays.entry(array_id).or_default().push((job, task));
                }
                None => jobs.push(job),
            }
        }
        jobs.extend(
            arrays
                .into_iter()
                .filter_map(|(id, records)| Self::merged(id, records)),
        );
        jobs
    }

    /// An array's records as one job: held or running while any task is,
    /// else pending while any is, else ended as its first task that did not
    /// complete (or COMPLETED).
    fn merged(id: u64, records: Vec<(Self, Option<u32>)>) -> Option<Self> {
        let mut tasks = ArrayTasks::default();
        for (job, task) in &records {
            match task {
                Some(index) => {
                    tasks.started.insert(*index, job.state.clone());
                }
                None => tasks.rest = Some(job.state.clone()),
            }
        }
        let (first, _) = records.first()?;
        let by_state = |wanted: &dyn Fn(&Self) -> bool| {
            records
                .iter()
                .filter(|(job, _)| wanted(job))
                .min_by_key(|(_, task)| task.unwrap_or(u32::MAX))
                .map(|(job, _)| job)
        };
        let leading = by_state(&|job| job.held())
            .or_else(|| by_state(&|job| job.workload_state() == WorkloadState::Running))
            .or_else(|| by_state(&|job| !job.finished()))
            .or_else(|| by_state(&|job| job.state != "COMPLETED"))
            .unwrap_or(first);
        // A pending record's start time is SLURM's guess of it.
        let start_time = records
            .iter()
            .filter(|(job, task)| task.is_some() && job.state != "PENDING")
            .map(|(job, _)| job.start_time)
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(0);
        Some(Self {
            id,
            start_time,
            array: Some(tasks),
            ..leading.clone()
        })
    }

    pub fn workload_id(&self) -> String {
        format!("{ID_PREFIX}{}", self.id)
    }

    /// Held by the agent since create, not yet started.
    pub fn held(&self) -> bool {
        self.state == "PENDING" && self.reason.starts_with("JobHeld")
    }

    /// Whether SLURM is done with it (it will not run again).
    pub fn finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
        )
    }

    pub fn workload_state(&self) -> WorkloadState {
        match self.state.as_str() {
            // COMPLETING: the job's processes are being ended; it is not
            // done (its end state, e.g. TIMEOUT, follows).
            "RUNNING" | "CONFIGURING" | "COMPLETING" => WorkloadState::Running,
            "PENDING" => WorkloadState::Created,
            "CANCELLED" | "SUSPENDED" | "STOPPED" => WorkloadState::Stopped,
            "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING" => WorkloadState::Restarting,
            _ => WorkloadState::Exited,
        }
    }

    /// SLURM's own state and its reason, e.g. `PENDING (Resources)`.
    pub fn state_reason(&self) -> String {
        let state = if self.reason.is_empty() || self.reason == "None" {
            self.state.clone()
        } else {
            format!("{} ({})", self.state, self.reason)
        };
        match &self.array {
            Some(tasks) => format!("{state}; array tasks: {}", tasks.summary()),
            None => state,
        }
    }

    /// The exit code as shells give it (128 + N for a signal).
    pub fn exit_code(&self) -> i32 {
        let status = i32::try_from(self.wait_status).unwrap_or(-1);
        if status & 0x7f != 0 {
            128 + (status & 0x7f)
        } else {
            (status >> 8) & 0xff
        }
    }

    /// A job's output file: SLURM's `%j` (job id) and `%x` (name) filled in.
    pub fn output_path(&self, pattern: &str) -> Option<PathBuf> {
        if pattern.is_empty() {
            return None;
        }
        let path = pattern
            .replace("%j", &self.id.to_string())
            .replace("%x", &self.name);
        let path = PathBuf::from(path);
        Some(if path.is_absolute() {
            path
        } else {
            Path::new(&self.working_dir).join(path)
        })
    }

    pub fn workload(&self, spec: Option<WorkloadSpec>) -> Workload {
        let time = |seconds: u64| {
            (seconds > 0).then(|| (UNIX_EPOCH + Duration::from_secs(seconds)).into())
        };
        let state = self.workload_state();
        Workload {
            id: self.workload_id(),
            name: self.name.clone(),
            spec,
            state: state as i32,
            health: berth_proto::agent::v1::Health::None as i32,
            created_at: time(self.submit_time),
            started_at: if self.held() {
                None
            } else {
                time(self.start_time)
            },
            exit_code: matches!(state, WorkloadState::Exited | WorkloadState::Stopped)
                .then(|| self.exit_code()),
            oom_killed: self.state == "OUT_OF_MEMORY",
            state_reason: self.state_reason(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::common::v1::{EnvVar, GpuRequest, Resources, SlurmSpec};

    use super::*;

    fn submission() -> Submission<'static> {
        Submission {
            name: "bench",
            owner: "berth-agent",
            default_partition: "batch",
            output_dir: Path::new("/scratch/berth"),
            exec_root: Path::new("/scratch/berth/.berth/exec"),
            container: ContainerRuntime::Off,
        }
    }

    #[test]
    fn a_spec_becomes_a_held_job() {
        let spec = WorkloadSpec {
            command: vec!["python".into(), "it's.py".into()],
            env: vec![EnvVar {
                name: "MODE".into(),
                value: "fast".into(),
            }],
            resources: Some(Resources {
                cpu_limit: 1.5,
                memory_limit_bytes: 3 << 29,
                ..Default::default()
            }),
            gpus: Some(GpuRequest {
                count: 2,
                ..Default::default()
            }),
            slurm: Some(SlurmSpec {
                account: "proj1".into(),
                time_limit: Some(prost_types::Duration {
                    seconds: 61,
                    nanos: 0,
                }),
                nodes: 2,
                constraints: "a100".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        validate(&spec, ContainerRuntime::Off).unwrap();
        let body = submit_body(&spec, &submission());
        let job = &body["job"];
        assert_eq!(body["script"], "#!/bin/sh\nexec 'python' 'it'\\''s.py'\n");
        assert_eq!(job["hold"], true);
        assert_eq!(job["partition"], "batch");
        assert_eq!(job["account"], "proj1");
        assert_eq!(job["time_limit"], 2);
        assert_eq!(job["nodes"], json!([2, 2]));
        assert_eq!(job["cpus_per_task"], 2);
        assert_eq!(job["memory_per_node"], 1536);
        assert_eq!(job["gres"], "gpu:2");
        assert_eq!(job["constraints"], "a100");
        assert_eq!(job["comment"], "berth:berth-agent");
        assert_eq!(job["environment"]["MODE"], "fast");
        assert_eq!(job["standard_output"], "/scratch/berth/bench.%j.out");
        assert_eq!(job["current_working_directory"], "/scratch/berth");
    }

    #[test]
    fn what_a_job_cannot_have_is_named() {
        let field = |spec: WorkloadSpec| match validate(&spec, ContainerRuntime::Off) {
            Err(
                AgentError::InvalidArgument { field, .. } | AgentError::Unsupported { field, .. },
            ) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(WorkloadSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            "spec.image"
        );
        assert_eq!(
            field(WorkloadSpec {
                gpus: Some(GpuRequest {
                    count: -1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "spec.gpus.count"
        );
        assert_eq!(
            field(WorkloadSpec {
                slurm: Some(SlurmSpec {
                    partition: "a\nb".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "spec.slurm.partition"
        );
    }

    #[test]
    fn an_array_s_records_are_one_job_in_its_tasks_state() {
        let record = |id: u64, task: Option<u64>, state: &str, reason: &str, status: i64| {
            json!({
                "job_id": id, "array_job_id": 7, "array_task_id": task,
                "array_task_string": if task.is_none() { "2-4%2" } else { "" },
                "name": "sweep", "comment": "berth:a", "job_state": state,
                "state_reason": reason, "exit_code": status, "start_time": id * 10,
            })
        };
        let plain =
            json!({"job_id": 3, "array_job_id": 0, "name": "alloc", "job_state": "RUNNING"});
        let running = [
            record(7, None, "PENDING", "JobArrayTaskLimit", 0),
            record(9, Some(1), "RUNNING", "None", 0),
            record(8, Some(0), "COMPLETED", "None", 0),
            plain,
        ];
        let jobs = Job::from_records(&running);
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        let array = jobs.iter().find(|j| j.id == 7).unwrap();
        assert_eq!(array.workload_state(), WorkloadState::Running);
        assert_eq!(array.start_time, 80, "the first task's start");
        assert_eq!(
            array.state_reason(),
            "RUNNING; array tasks: 1 COMPLETED, 1 RUNNING, the rest PENDING"
        );
        let ended = [
            record(7, Some(2), "COMPLETED", "None", 0),
            record(9, Some(1), "FAILED", "NonZeroExitCode", 3 << 8),
            record(8, Some(0), "COMPLETED", "None", 0),
        ];
        let array = Job::from_records(&ended).remove(0);
        assert!(array.finished());
        assert_eq!(
            array.state, "FAILED",
            "the first task that did not complete"
        );
        assert_eq!(array.exit_code(), 3);
        let held = [record(7, None, "PENDING", "JobHeldUser", 0)];
        assert!(Job::from_records(&held)[0].held());
    }

    #[test]
    fn job_states_keep_slurms_reason() {
        let job = |state: &str, reason: &str, status: i64| Job {
            id: 7,
            name: "bench".into(),
            comment: String::new(),
            state: state.into(),
            reason: reason.into(),
            wait_status: status,
            nodes: String::new(),
            batch_host: String::new(),
            standard_output: "out/%x.%j.out".into(),
            standard_error: String::new(),
            submit_time: 1,
            start_time: 2,
            working_dir: "/w".into(),
            array: None,
        };
        let pending = job("PENDING", "Resources", 0).workload(None);
        assert_eq!(pending.state, WorkloadState::Created as i32);
        assert_eq!(pending.state_reason, "PENDING (Resources)");
        let timeout = job("TIMEOUT", "TimeLimit", 15).workload(None);
        assert_eq!(timeout.state, WorkloadState::Exited as i32);
        assert_eq!(timeout.state_reason, "TIMEOUT (TimeLimit)");
        assert_eq!(timeout.exit_code, Some(128 + 15));
        assert_eq!(job("FAILED", "NonZeroExitCode", 3 << 8).exit_code(), 3);
        assert_eq!(job("RUNNING", "None", 0).state_reason(), "RUNNING");
        let completing = job("COMPLETING", "TimeLimit", 0);
        assert_eq!(completing.workload_state(), WorkloadState::Running);
        assert!(!completing.finished());
        assert!(job("PENDING", "JobHeldUser", 0).held());
        assert_eq!(
            job("RUNNING", "None", 0).output_path("out/%x.%j.out"),
            Some(PathBuf::from("/w/out/bench.7.out"))
        );
    }
}
