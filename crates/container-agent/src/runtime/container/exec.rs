//! Exec into a running container: output streamed as the engine hands it
//! over, the exit code at the end, a timeout, and a cancel (the caller drops
//! the stream) that kills the exec'd process and everything it started.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus, exec_output};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::engine::{Engine, status_of};
use crate::error::AgentError;
use crate::process_group::{EXEC_BUFFER, HostCommand, kill_tree, send_output};
use crate::runtime::ExecCommand;

/// How long to wait for the engine to see an exec's process gone.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// Exit code reported for a command berth killed (128 + SIGKILL).
const KILLED: i32 = 137;
/// How long a kill waits for the engine to report a running exec's pid.
const KILL_PID_WAIT: Duration = Duration::from_secs(2);

/// The exec's output as the engine streams it.
type EngineOutput = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Starts `exec` in `container` and streams its output and exit status.
pub async fn start(
    engine: Arc<Engine>,
    container: &str,
    name: &str,
    exec: ExecCommand,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let docker = engine.client().await?;
    let exec_id = create(&engine, &docker, container, name, exec.command).await?;
    let output = match docker.start_exec(&exec_id, None).await {
        Ok(StartExecResults::Attached { output, .. }) => output,
        Ok(StartExecResults::Detached) => {
            return Err(AgentError::Internal(
                "engine started the exec detached".into(),
            ));
        }
        Err(e) => return Err(engine.error("exec", e).await),
    };
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        follow(docker, exec_id, output, tx, exec.timeout).await;
    });
    Ok(rx)
}

/// Creates the exec in the engine; returns its id. A container that is
/// not running or not there is told apart from the engine failing.
async fn create(
    engine: &Engine,
    docker: &Docker,
    container: &str,
    name: &str,
    command: HostCommand,
) -> Result<String, AgentError> {
    let options = CreateExecOptions {
        cmd: Some(command.argv),
        env: Some(
            command
                .env
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        working_dir: command
            .working_dir
            .map(|d| d.to_string_lossy().into_owned()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    match docker.create_exec(container, options).await {
        Ok(created) => Ok(created.id),
        // Docker answers 409, podman 500 with "not running"/"state improper".
        Err(e)
            if status_of(&e) == Some(409)
                || e.to_string().contains("not running")
                || e.to_string().contains("state improper") =>
        {
            Err(AgentError::NotRunning {
                name: name.to_string(),
                state: "not running",
            })
        }
        Err(e) if status_of(&e) == Some(404) => Err(AgentError::WorkloadNotFound(name.to_string())),
        Err(e) => Err(engine.error("exec", e).await),
    }
}

/// Forwards the exec's output until it ends, its timeout passes (kill) or
/// the caller goes away (kill, no exit status); then sends the exit status.
async fn follow(
    docker: Docker,
    exec_id: String,
    mut output: EngineOutput,
    tx: mpsc::Sender<ExecOutput>,
    timeout: Option<Duration>,
) {
    let started = Instant::now();
    let deadline = async {
        match timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let timed_out = loop {
        tokio::select! {
            chunk = output.next() => match chunk {
                Some(Ok(LogOutput::StdOut { message })) => {
                    if !send_output(&tx, &message, true).await {
                        kill(&docker, &exec_id).await;
                        return;
                    }
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    if !send_output(&tx, &message, false).await {
                        kill(&docker, &exec_id).await;
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::warn!(%error, "exec output stream broke");
                    break false;
                }
                None => break false,
            },
            () = &mut deadline => {
                kill(&docker, &exec_id).await;
                break true;
            }
            () = tx.closed() => {
                // The caller went away (cancelled call): kill and stop.
                kill(&docker, &exec_id).await;
                return;
            }
        }
    };
    let code = exit_code(&docker, &exec_id).await;
    let exit = ExitStatus {
        exit_code: if timed_out {
            code.unwrap_or(KILLED)
        } else {
            code.unwrap_or(-1)
        },
        // A container exit code cannot tell `exit 137` from SIGKILL, so
        // only what berth itself killed is reported as anything but EXITED.
        reason: if timed_out {
            ExitReason::TimedOut
        } else {
            ExitReason::Exited
        } as i32,
        duration: prost_types::Duration::try_from(started.elapsed()).ok(),
    };
    let _ = tx
        .send(ExecOutput {
            output: Some(exec_output::Output::Exit(exit)),
        })
        .await;
}

/// The exit code, once the engine says the exec stopped running (its
/// `ExitCode` is empty until then, even after the output ended).
async fn exit_code(docker: &Docker, exec_id: &str) -> Option<i32> {
    let deadline = Instant::now() + EXIT_WAIT;
    let mut pause = Duration::from_millis(1);
    while Instant::now() < deadline {
        match docker.inspect_exec(exec_id).await {
            Ok(inspect) if inspect.running != Some(true) => {
                return inspect.exit_code.and_then(|c| i32::try_from(c).ok());
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, exec_id, "inspecting exec failed");
                return None;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    None
}

/// Kills the exec'd process tree through its host pid, which the engine
/// reports while the exec runs.
async fn kill(docker: &Docker, exec_id: &str) {
    // The engine can report a started exec as running before it knows its
    // pid (seen on Docker 20.10 under load): ask again for a moment.
    let deadline = Instant::now() + KILL_PID_WAIT;
    let pid = loop {
        match docker.inspect_exec(exec_id).await {
            Ok(inspect) if inspect.running == Some(true) => {
                match inspect.pid.and_then(|p| u32::try_from(p).ok()) {
                    Some(pid) if pid > 0 => break Some(pid),
                    _ if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break None,
                }
            }
            Ok(_) => return, // already gone
            Err(error) => {
                tracing::warn!(%error, exec_id, "cannot find the exec's process to kill it");
                return;
            }
        }
    };
    if pid.is_none() {
        tracing::warn!(
            exec_id,
            "the engine never gave the exec's pid; it was not killed"
        );
    }
    if let Some(pid) = pid {
        match kill_tree(pid) {
            Ok(count) => tracing::debug!(exec_id, pid, count, "killed exec'd processes"),
            Err(error) => tracing::warn!(%error, exec_id, pid, "killing exec'd process failed"),
        }
    }
}
