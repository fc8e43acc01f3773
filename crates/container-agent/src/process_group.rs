//! Host processes in their own process group, so that a cancel, a timeout or
//! the end of a command kills everything it started and leaves nothing behind.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus as ProtoExit, exec_output};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::error::AgentError;

/// Output chunks larger than this are split; a gRPC message stays small.
pub(crate) const CHUNK_BYTES: usize = 32 * 1024;
/// Messages buffered per exec before the reader waits for the client.
pub(crate) const EXEC_BUFFER: usize = 64;

/// A command line to run on the host.
#[derive(Debug, Clone, Default)]
pub struct HostCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
}

impl HostCommand {
    /// Spawns it as the leader of a new process group with piped output.
    pub fn spawn(&self) -> Result<Child, AgentError> {
        let (program, args) = self.argv.split_first().ok_or(AgentError::InvalidArgument {
            field: "command",
            reason: "must name a program".to_string(),
        })?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            command.current_dir(dir);
        }
        command.spawn().map_err(|e| AgentError::SpawnFailed {
            command: program.clone(),
            reason: e.to_string(),
        })
    }
}

/// Sends `signal` to the whole group led by `pid`; a group already gone is fine.
pub fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Kills `pid` and every process descended from it. A process exec'd into a
/// container leads no process group of its own, so `killpg` cannot reach what
/// it started: the tree is read from /proc and frozen (SIGSTOP) as it is
/// collected so that nothing forks away, then killed. Needs the host's pid
/// namespace, where engines report exec pids.
pub fn kill_tree(pid: u32) -> std::io::Result<usize> {
    let root = i32::try_from(pid).map_err(std::io::Error::other)?;
    if !std::path::Path::new(&format!("/proc/{root}")).exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "pid {root} is not visible here (the agent must share the engine's pid namespace)"
            ),
        ));
    }
    let mut tree = std::collections::BTreeSet::from([root]);
    let _ = nix::sys::signal::kill(Pid::from_raw(root), Signal::SIGSTOP);
    loop {
        let parents = parent_map();
        let before = tree.len();
        for (child, parent) in parents {
            if tree.contains(&parent) && tree.insert(child) {
                let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::SIGSTOP);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    for pid in &tree {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    Ok(tree.len())
}

/// (pid, parent pid) of every process in /proc.
fn parent_map() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Exit code as shells report it: 128 + N for a signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs `command` and streams its output and exit status. Dropping the
/// receiver kills the command's process group; so does the timeout.
pub fn run_streaming(
    command: &HostCommand,
    timeout: Option<Duration>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let mut child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| AgentError::Internal("spawned process has no pid".into()))?;
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(forward(out, tx.clone(), true)));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(forward(err, tx.clone(), false)));
    tokio::spawn(async move {
        let _permit = permit;
        let started = Instant::now();
        let deadline = async {
            match timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let (status, timed_out) = tokio::select! {
            status = child.wait() => (status, false),
            () = deadline => {
                signal_group(pid, Signal::SIGKILL);
                (child.wait().await, true)
            }
            () = tx.closed() => {
                // The caller went away (cancelled call): kill and stop.
                signal_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                return;
            }
        };
        // Whatever the command left running in its group goes too; it also
        // closes the pipes those processes held, so the readers finish.
        signal_group(pid, Signal::SIGKILL);
        for reader in [stdout, stderr].into_iter().flatten() {
            let _ = reader.await;
        }
        let exit = match status {
            Ok(status) => ProtoExit {
                exit_code: exit_code(status),
                reason: if timed_out {
                    ExitReason::TimedOut
                } else if status.signal().is_some() {
                    ExitReason::Signaled
                } else {
                    ExitReason::Exited
                } as i32,
                duration: prost_types::Duration::try_from(started.elapsed()).ok(),
            },
            Err(error) => {
                tracing::warn!(%error, pid, "waiting for exec'd process failed");
                ProtoExit {
                    exit_code: -1,
                    reason: ExitReason::Signaled as i32,
                    duration: None,
                }
            }
        };
        let _ = tx
            .send(ExecOutput {
                output: Some(exec_output::Output::Exit(exit)),
            })
            .await;
    });
    Ok(rx)
}

async fn forward(mut pipe: impl AsyncRead + Unpin, tx: mpsc::Sender<ExecOutput>, is_stdout: bool) {
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !send_output(&tx, &buffer[..n], is_stdout).await {
                    return;
                }
            }
        }
    }
}

/// Sends an exec's output (a pipe's read, an engine's or shim's frame, a
/// guest agent's answer) as stdout or stderr, in gRPC-sized chunks; false
/// when the caller is gone.
pub(crate) async fn send_output(tx: &mpsc::Sender<ExecOutput>, data: &[u8], stdout: bool) -> bool {
    for chunk in data.chunks(CHUNK_BYTES) {
        let output = if stdout {
            exec_output::Output::Stdout(chunk.to_vec())
        } else {
            exec_output::Output::Stderr(chunk.to_vec())
        };
        if tx
            .send(ExecOutput {
                output: Some(output),
            })
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn permit() -> tokio::sync::OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    fn sh(script: &str) -> HostCommand {
        HostCommand {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }

    async fn collect(mut rx: mpsc::Receiver<ExecOutput>) -> (Vec<u8>, Vec<u8>, ProtoExit) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(message) = rx.recv().await {
            match message.output.unwrap() {
                exec_output::Output::Stdout(d) => out.extend(d),
                exec_output::Output::Stderr(d) => err.extend(d),
                exec_output::Output::Exit(exit) => return (out, err, exit),
                exec_output::Output::DroppedBytes(n) => panic!("{n} bytes dropped"),
            }
        }
        panic!("stream ended without an exit status");
    }

    #[tokio::test]
    async fn streams_output_and_exit_code() {
        let rx = run_streaming(&sh("echo out; echo err >&2; exit 3"), None, permit()).unwrap();
        let (out, err, exit) = collect(rx).await;
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(exit.exit_code, 3);
        assert_eq!(exit.reason, ExitReason::Exited as i32);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let marker = dir.path().join("marker");
        // A background child that outlives the timeout, were it left alive:
        // it writes the marker 1.5 s after it starts. The leader waits for it
        // to have started, then sleeps past the 600 ms timeout.
        let script = format!(
            "sh -c 'echo $$ > {pid}; sleep 1.5; echo leaked > {marker}' & \
             while [ ! -s {pid} ]; do sleep 0.01; done; sleep 30",
            pid = pid_file.display(),
            marker = marker.display(),
        );
        let started = Instant::now();
        let rx = run_streaming(&sh(&script), Some(Duration::from_millis(600)), permit()).unwrap();
        let (_, _, exit) = collect(rx).await;
        assert_eq!(exit.reason, ExitReason::TimedOut as i32);
        assert_eq!(exit.exit_code, 128 + 9);
        let background: i32 = std::fs::read_to_string(&pid_file)
            .expect("the background child started before the timeout")
            .trim()
            .parse()
            .unwrap();
        // Dead (or a zombie its new parent has yet to reap), not sleeping.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{background}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() {
            assert!(
                Instant::now() < deadline,
                "the background child {background} outlived the timeout"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the time it would have written the marker: nothing written.
        let written_by = started + Duration::from_millis(2500);
        tokio::time::sleep(written_by.saturating_duration_since(Instant::now())).await;
        assert!(
            !marker.exists(),
            "the background child wrote its marker after the timeout: it was not killed"
        );
    }

    #[tokio::test]
    async fn dropping_the_stream_kills_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; sleep 30 & sleep 30", pid_file.display());
        let mut rx = run_streaming(&sh(&script), None, permit()).unwrap();
        // The file exists (empty) before the pid is in it.
        while std::fs::read_to_string(&pid_file).map_or(true, |s| !s.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(rx.try_recv());
        drop(rx);
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = async {
            while nix::sys::signal::killpg(Pid::from_raw(pid), None).is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("process group still alive after cancel");
    }

    #[tokio::test]
    async fn kill_tree_reaches_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // `setsid` would escape killpg; kill_tree follows parent links instead.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sh -c 'echo $$ > {}; sleep 30' & wait",
                pid_file.display()
            ))
            .spawn()
            .unwrap();
        while std::fs::read_to_string(&pid_file).map_or(true, |s| !s.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grandchild: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(kill_tree(child.id().unwrap()).unwrap() >= 3);
        let _ = child.wait().await;
        let gone = async {
            while std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("grandchild survived");
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let command = HostCommand {
            argv: vec!["/nonexistent/berth-x".into()],
            ..Default::default()
        };
        let error = run_streaming(&command, None, permit())
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/berth-x"), "{error}");
    }
}
