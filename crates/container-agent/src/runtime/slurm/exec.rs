//! Exec into a running job: a job step started by the cluster's `srun
//! --jobid=<id> --overlap` on the agent's host (a login node), which SLURM
//! runs on the job's first node beside whatever else the job runs. Its
//! output, exit code, timeout and cancel are those of the srun process
//! ([`process_group::run_streaming`]). srun killed outright (a cancel, a
//! timeout) cannot tell slurmd to end the step, which then stays in the
//! job: every step is named after the exec, and one left behind is found by
//! that name with `squeue` and cancelled with `scancel`. A keyed exec runs
//! the same step detached from the agent instead ([`super::detached`]).

use std::path::{Path, PathBuf};

use berth_proto::agent::v1::{ExecOutput, ExitReason, exec_output};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::job::Job;
use crate::error::AgentError;
use crate::process_group::{self, EXEC_BUFFER, HostCommand};
use crate::runtime::ExecCommand;

/// How many times a step left behind is cancelled, and how far apart.
const CANCEL_TRIES: u32 = 10;
const CANCEL_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The cluster's client programs as the agent runs them.
#[derive(Debug, Clone)]
pub struct Clients {
    pub srun: PathBuf,
    /// `SLURM_CONF` for them; empty: their own default.
    pub slurm_conf: PathBuf,
}

impl Clients {
    /// A client installed beside srun (`squeue`, `scancel`), else on PATH.
    pub(super) fn sibling(&self, program: &str) -> PathBuf {
        match self.srun.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(program),
            _ => PathBuf::from(program),
        }
    }

    pub(super) fn env(&self) -> Vec<(String, String)> {
        if self.slurm_conf.as_os_str().is_empty() {
            Vec::new()
        } else {
            vec![("SLURM_CONF".into(), self.slurm_conf.display().to_string())]
        }
    }

    /// The srun command line of an exec in `job`, as step `step_name`, with
    /// the workload's environment under the exec's own.
    pub fn step(
        &self,
        job: &Job,
        workload_env: &[(String, String)],
        exec: &ExecCommand,
        step_name: &str,
        default_dir: &Path,
    ) -> HostCommand {
        let working_dir = exec
            .command
            .working_dir
            .clone()
            .unwrap_or_else(|| default_dir.to_path_buf());
        let mut argv = vec![
            self.srun.display().to_string(),
            format!("--jobid={}", job.id),
            // Runs share the allocation with the job's own script.
            "--overlap".into(),
            "--quiet".into(),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            format!("--job-name={step_name}"),
            format!("--chdir={}", working_dir.display()),
            // The task gets srun's environment: the one set here.
            "--export=ALL".into(),
            "--".into(),
        ];
        argv.extend(exec.command.argv.iter().cloned());
        let mut env = self.env();
        env.extend(workload_env.iter().cloned());
        env.extend(exec.command.env.iter().cloned());
        HostCommand {
            argv,
            env,
            working_dir: None,
        }
    }

    /// Cancels what is left of the step named `step_name` in job `job_id`,
    /// until SLURM has not listed it twice in a row: a step whose srun was
    /// killed as it started can show up a moment later, and one killed as
    /// the cancel reached it can stay listed past the first cancel.
    pub(super) async fn cancel_step(&self, job_id: u64, step_name: &str) {
        let mut unlisted = 0;
        for _ in 0..CANCEL_TRIES {
            let steps = self.steps_named(job_id, step_name).await;
            if steps.is_empty() {
                unlisted += 1;
                if unlisted == 2 {
                    return;
                }
            } else {
                unlisted = 0;
            }
            for step in steps {
                let _ = Command::new(self.sibling("scancel"))
                    .arg(&step)
                    .envs(self.env())
                    .status()
                    .await;
            }
            tokio::time::sleep(CANCEL_EVERY).await;
        }
        tracing::warn!(
            job_id,
            step_name,
            "an exec's step is still listed after {CANCEL_TRIES} cancels"
        );
    }

    /// How array task `<job_id>_<task>` ended (`TIMEOUT`, `CANCELLED`, …),
    /// or None while it is pending or running, or when squeue cannot say
    /// now. A task slurmctld no longer knows ended long ago.
    pub(super) async fn task_ended(&self, job_id: u64, task: u32) -> Option<String> {
        let listed = Command::new(self.sibling("squeue"))
            .args([
                "-h",
                "-t",
                "all",
                "-j",
                &format!("{job_id}_{task}"),
                "-o",
                "%T %r",
            ])
            .envs(self.env())
            .output()
            .await
            .ok()?;
        if !listed.status.success() {
            let error = String::from_utf8_lossy(&listed.stderr);
            return error
                .contains("Invalid job id")
                .then(|| "forgotten by slurmctld".to_string());
        }
        let text = String::from_utf8_lossy(&listed.stdout);
        let (state, reason) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        let running = matches!(
            state,
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "RESIZING"
                | "SUSPENDED"
        );
        if running || state.is_empty() {
            return None;
        }
        Some(if reason.is_empty() || reason == "None" {
            state.to_string()
        } else {
            format!("{state} ({reason})")
        })
    }

    /// Cancels array task `<job_id>_<task>`.
    pub(super) async fn cancel_task(&self, job_id: u64, task: u32) {
        let _ = Command::new(self.sibling("scancel"))
            .arg(format!("{job_id}_{task}"))
            .envs(self.env())
            .status()
            .await;
    }

    /// The ids (`<job>.<step>`) of job `job_id`'s steps named `step_name`.
    async fn steps_named(&self, job_id: u64, step_name: &str) -> Vec<String> {
        let listed = Command::new(self.sibling("squeue"))
            .args(["-h", "-s", "-j", &job_id.to_string(), "-o", "%i %j"])
            .envs(self.env())
            .output()
            .await;
        let Ok(listed) = listed else {
            return Vec::new();
        };
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter_map(|line| {
                let (id, name) = line.trim().split_once(' ')?;
                (name == step_name).then(|| id.to_string())
            })
            .collect()
    }
}

/// Runs the step and streams its output and exit; a cancel (the receiver
/// dropped) or a timeout also cancels the step in SLURM.
pub fn run(
    clients: Clients,
    job_id: u64,
    command: HostCommand,
    step_name: String,
    timeout: Option<std::time::Duration>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let mut srun = process_group::run_streaming(&command, timeout, permit)?;
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    tokio::spawn(async move {
        let abandoned = loop {
            tokio::select! {
                message = srun.recv() => {
                    let Some(message) = message else { break true };
                    let timed_out = matches!(
                        &message.output,
                        Some(exec_output::Output::Exit(exit)) if exit.reason == ExitReason::TimedOut as i32
                    );
                    let exited = matches!(&message.output, Some(exec_output::Output::Exit(_)));
                    if timed_out {
                        // Before the caller hears of it, so a run that
                        // follows finds the step gone.
                        clients.cancel_step(job_id, &step_name).await;
                    }
                    if tx.send(message).await.is_err() {
                        break true;
                    }
                    if exited {
                        break false;
                    }
                }
                () = tx.closed() => break true,
            }
        };
        if abandoned {
            // Dropping srun's stream kills srun; the step it may have made
            // is then cancelled in SLURM.
            drop(srun);
            clients.cancel_step(job_id, &step_name).await;
        }
    });
    Ok(rx)
}
