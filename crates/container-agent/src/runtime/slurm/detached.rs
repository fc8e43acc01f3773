//! Keyed execs (every campaign run) that outlive the agent: srun runs
//! under a small shell in a process group of its own, with no pipe to the
//! agent, writing the step's stdout and stderr to files and its exit code
//! to a file when it ends, all in a directory of the exec's own
//! (`<root>/<job id>/<key hash>/`, with the key, the shell's pid and the
//! deadline beside them). The agent streams those files as they grow. A
//! restarted agent finds the directory by the key ([`reattach`]) and
//! streams the output from the start, then the rest, then the exit, so a
//! run in flight when the agent was killed is adopted rather than run
//! again. A cancel or the timeout kills the shell's group and cancels the
//! step by its name. An array task's directory ([`super::array`]) is
//! followed the same way, its liveness read from SLURM, its cancel a
//! `scancel` of the task.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus, exec_output};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::accounting::Accounted;
use super::exec::Clients;
use crate::error::AgentError;
use crate::process_group::{self, CHUNK_BYTES, EXEC_BUFFER, HostCommand};

/// How often the output files are read for more, and the exit looked for.
const POLL: Duration = Duration::from_millis(20);
/// How often an array task's state is read from SLURM while it is followed.
const TASK_POLL: Duration = Duration::from_secs(1);
/// Exit code of an exec whose shell vanished without writing its exit
/// (killed from outside): 128 + SIGKILL, as it was in effect killed.
const VANISHED: i32 = 137;

/// A job step to run: srun's command line and the step's name.
pub struct Step {
    pub job_id: u64,
    pub name: String,
    pub command: HostCommand,
}

/// Runs `step` detached, in a directory for `key` under `root`, and
/// streams it.
pub fn start(
    clients: Clients,
    root: &Path,
    key: &str,
    step: Step,
    timeout: Option<Duration>,
    permit: OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let Step {
        job_id,
        name: step_name,
        command: step,
    } = step;
    let dir = root.join(job_id.to_string()).join(key_hash(key));
    if dir.join("key").exists() {
        return Err(AgentError::ExecKeyTaken(key.to_string()));
    }
    let io =
        |e: std::io::Error| AgentError::Internal(format!("exec directory {}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::write(dir.join("key"), key).map_err(io)?;
    if let Some(timeout) = timeout {
        let deadline = SystemTime::now() + timeout;
        let seconds = deadline
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        std::fs::write(dir.join("deadline"), seconds.to_string()).map_err(io)?;
    }
    let (program, args) = step.argv.split_first().ok_or(AgentError::InvalidArgument {
        field: "command",
        reason: "must name a program".to_string(),
    })?;
    // The exit file appears whole (a rename), once srun has ended.
    let script = r#"d=$1; shift; "$@" >"$d/out" 2>"$d/err"; echo $? >"$d/exit.tmp"; mv "$d/exit.tmp" "$d/exit""#;
    let child = Command::new("sh")
        .args(["-c", script, "berth-step"])
        .arg(&dir)
        .arg(program)
        .args(args)
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| AgentError::SpawnFailed {
            command: program.clone(),
            reason: e.to_string(),
        })?;
    // The shell's pid and start time: what tells it from a later process
    // given the same pid, from the fork on (its command line is empty, then
    // the agent's, until its exec is through).
    let pid = child.id();
    let started = start_time(pid);
    // Reaped by a thread, so it leaves no zombie while the agent lives.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let started = started.ok_or_else(|| {
        AgentError::Internal(format!("the exec's shell (pid {pid}) ended as it started"))
    })?;
    std::fs::write(dir.join("pid"), format!("{pid} {started}")).map_err(io)?;
    Ok(follow(clients, dir, job_id, step_name, permit))
}

/// The exec started with `key` by this or an earlier agent, when its
/// directory is under `root`: streamed from its first byte.
pub fn reattach(
    clients: Clients,
    root: &Path,
    key: &str,
    step_name: String,
    permit: OwnedSemaphorePermit,
) -> Option<mpsc::Receiver<ExecOutput>> {
    let (job_id, dir) = locate(root, key)?;
    Some(follow(clients, dir, job_id, step_name, permit))
}

/// What the exec of `key` under `root` is to SLURM (a step named
/// `step_name`, or an array task), for its accounting record; None when no
/// exec of that key is there.
pub fn accounted(root: &Path, key: &str, step_name: String) -> Option<Accounted> {
    let (job_id, dir) = locate(root, key)?;
    Some(match task_index(&dir) {
        Some(task) => Accounted::Task { job_id, task },
        None => Accounted::Step {
            job_id,
            name: step_name,
        },
    })
}

/// The job and directory of the exec of `key` under `root`.
fn locate(root: &Path, key: &str) -> Option<(u64, PathBuf)> {
    let name = key_hash(key);
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|job| {
            let job_id = job.file_name().to_str()?.parse::<u64>().ok()?;
            let dir = job.path().join(&name);
            let written = std::fs::read_to_string(dir.join("key")).ok()?;
            (written == key).then_some((job_id, dir))
        })
        .next()
}

/// The task of job array `job_id` whose exec key is `key` (its directory
/// made at create): streamed from its first byte, whether it has run yet
/// or not.
pub fn attach_task(
    clients: Clients,
    root: &Path,
    job_id: u64,
    key: &str,
    permit: OwnedSemaphorePermit,
) -> Option<mpsc::Receiver<ExecOutput>> {
    let dir = root.join(job_id.to_string()).join(key_hash(key));
    let written = std::fs::read_to_string(dir.join("key")).ok()?;
    (written == key && task_index(&dir).is_some())
        .then(|| follow(clients, dir, job_id, String::new(), permit))
}

/// `key`'s FNV-1a hash in hex: its directory's name (the key itself is
/// in the directory's `key` file), and part of its step's name.
pub(super) fn key_hash(key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Streams the exec in `dir` until its exit, its deadline, or the
/// receiver going (which kills it).
fn follow(
    clients: Clients,
    dir: PathBuf,
    job_id: u64,
    step_name: String,
    permit: OwnedSemaphorePermit,
) -> mpsc::Receiver<ExecOutput> {
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut out = Tail::new(dir.join("out"), true);
        let mut err = Tail::new(dir.join("err"), false);
        let deadline = std::fs::read_to_string(dir.join("deadline"))
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(|since_epoch| UNIX_EPOCH + since_epoch);
        // An array task's own state, read from SLURM now and then: it
        // runs on a node, where no pid of it can be looked at.
        let task = task_index(&dir);
        let mut task_checked = std::time::Instant::now();
        let exit = loop {
            if !(out.send_more(&tx).await && err.send_more(&tx).await) {
                kill(&clients, &dir, job_id, &step_name).await;
                return;
            }
            if let Some(code) = read_exit(&dir) {
                // What was written before the exit file.
                if !(out.send_more(&tx).await && err.send_more(&tx).await) {
                    return;
                }
                break exit_status(code, ExitReason::Exited);
            }
            if deadline.is_some_and(|d| SystemTime::now() >= d) {
                kill(&clients, &dir, job_id, &step_name).await;
                break exit_status(VANISHED, ExitReason::TimedOut);
            }
            if let Some(task) = task {
                if task_checked.elapsed() >= TASK_POLL {
                    task_checked = std::time::Instant::now();
                    if let Some(ended) = clients.task_ended(job_id, task).await
                        && read_exit(&dir).is_none()
                    {
                        let said = format!(
                            "berth: SLURM ended array task {job_id}_{task} before it wrote its exit: {ended}\n"
                        );
                        let _ = process_group::send_output(&tx, said.as_bytes(), false).await;
                        let reason = if ended.starts_with("TIMEOUT") {
                            ExitReason::TimedOut
                        } else {
                            ExitReason::Signaled
                        };
                        break exit_status(VANISHED, reason);
                    }
                }
            } else if shell_pid(&dir).is_none() && read_exit(&dir).is_none() {
                let _ = process_group::send_output(
                    &tx,
                    b"berth: the exec's srun was killed from outside the agent\n",
                    false,
                )
                .await;
                break exit_status(VANISHED, ExitReason::Signaled);
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = tx.closed() => {
                    kill(&clients, &dir, job_id, &step_name).await;
                    return;
                }
            }
        };
        let _ = tx
            .send(ExecOutput {
                output: Some(exec_output::Output::Exit(exit)),
            })
            .await;
    });
    rx
}

fn exit_status(code: i32, reason: ExitReason) -> ExitStatus {
    ExitStatus {
        exit_code: code,
        reason: reason as i32,
        duration: None,
    }
}

/// The index of the array task whose directory `dir` is; None for a
/// detached step's.
fn task_index(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(super::array::TASK_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn read_exit(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The exec's shell, while it runs: its pid, when the process of that pid
/// started when the shell did (a pid is reused once its process is gone)
/// and has not ended (a zombie not reaped yet).
fn shell_pid(dir: &Path) -> Option<u32> {
    let written = std::fs::read_to_string(dir.join("pid")).ok()?;
    let (pid, started) = written.trim().split_once(' ')?;
    let pid: u32 = pid.parse().ok()?;
    let started: u64 = started.parse().ok()?;
    (start_time(pid) == Some(started)).then_some(pid)
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat`'s
/// 22nd field), unless it is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces and parentheses.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields 4 to 21 lie between the state (3) and the start time (22).
    fields.nth(18)?.parse().ok()
}

/// Kills the exec's shell and srun, then cancels the step srun leaves; an
/// array task is cancelled in SLURM.
async fn kill(clients: &Clients, dir: &Path, job_id: u64, step_name: &str) {
    if let Some(task) = task_index(dir) {
        clients.cancel_task(job_id, task).await;
        return;
    }
    if let Some(pid) = shell_pid(dir) {
        process_group::signal_group(pid, Signal::SIGKILL);
    }
    clients.cancel_step(job_id, step_name).await;
}

/// One output file, read as it grows.
struct Tail {
    path: PathBuf,
    offset: u64,
    stdout: bool,
}

impl Tail {
    fn new(path: PathBuf, stdout: bool) -> Self {
        Self {
            path,
            offset: 0,
            stdout,
        }
    }

    /// Sends what was written since the last read; false when the
    /// receiver is gone.
    async fn send_more(&mut self, tx: &mpsc::Sender<ExecOutput>) -> bool {
        let Ok(mut file) = tokio::fs::File::open(&self.path).await else {
            return true;
        };
        if file
            .seek(std::io::SeekFrom::Start(self.offset))
            .await
            .is_err()
        {
            return true;
        }
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            match file.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    self.offset += n as u64;
                    if !process_group::send_output(tx, &buffer[..n], self.stdout).await {
                        return false;
                    }
                }
            }
        }
    }
}
