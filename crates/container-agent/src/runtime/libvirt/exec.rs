//! Exec inside a VM through the berth exec shim running in the guest
//! (`berth-exec-shim --serial PORT`), with no network and no guest agent:
//! every domain with a files directory gets a virtio-serial port named
//! [`SHIM_PORT`] whose host side is a unix socket, [`SHIM_SOCKET`] in that
//! directory, bound by qemu. The agent connects once per exec and speaks the
//! shim's frames (the same as in containers); the shim answers an
//! `ACCEPTED` frame first, so a VM whose guest runs no shim (or has not
//! booted yet) is told apart from a command that prints nothing.
//!
//! The port is one byte stream, taken by one connection at a time: execs
//! into one VM run one after another, in the order they came. At most
//! [`MAX_WAITING`] wait behind the running one; more are refused with
//! RESOURCE_EXHAUSTED rather than queued without end. Closing the connection before the exit frame (a cancel, a timeout) makes
//! the guest see the port close, and the shim kills the command's process
//! group.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use berth_exec_shim::protocol::{self, FrameKind};
use berth_proto::agent::v1::{ExecOutput, ExitReason, exec_output};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::error::AgentError;
use crate::process_group::EXEC_BUFFER;
use crate::runtime::ExecCommand;
use crate::runtime::container::exec_shim;

/// The virtio-serial port's name in the guest
/// (/sys/class/virtio-ports/*/name, /dev/virtio-ports/<name> with udev).
pub const SHIM_PORT: &str = "dev.berth.shim";
/// The port's host side, in the VM's files directory.
pub const SHIM_SOCKET: &str = "shim.sock";
/// How long an exec waits for the guest's shim to accept its request.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);
/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Execs that may wait for a VM's port while another one runs.
pub const MAX_WAITING: usize = 4;
/// The exit code [`exec_shim::stream_exec`] (and the guest agent's exec)
/// reports when the way to the guest broke before the command's exit: no
/// command exits with it.
pub const BROKEN: i32 = -1;
/// Exit code of a command that went down with its VM: 128 + SIGKILL, as
/// the command was in effect killed.
const KILLED_WITH_VM: i32 = 137;

/// Why an exec's port broke before its exit, as the runtime found out.
pub enum Broken {
    /// The VM went down (or libvirt could not be asked): the command is gone.
    VmDown(String),
    /// The VM still runs: what served the exec in the guest went away.
    VmRuns(String),
}

/// The shim socket of a VM whose files are in `files_dir`, when its path
/// fits in a unix socket address.
pub fn socket_path(files_dir: &Path) -> Option<PathBuf> {
    let path = files_dir.join(SHIM_SOCKET);
    (path.as_os_str().len() <= MAX_SOCKET_PATH).then_some(path)
}

/// One exec at a time per VM, and a bounded queue behind it.
#[derive(Default)]
pub struct ExecLanes(Mutex<HashMap<String, Lane>>);

#[derive(Clone)]
struct Lane {
    /// The running exec and the ones waiting: 1 + [`MAX_WAITING`] permits.
    admitted: Arc<Semaphore>,
    /// The port: one permit, handed out in the order asked (tokio's
    /// semaphore is fair).
    port: Arc<Semaphore>,
}

/// An exec's place in its VM's lane (its admission and the port), held
/// until the exec ends.
type InLane = (OwnedSemaphorePermit, OwnedSemaphorePermit);

impl ExecLanes {
    /// Waits for the VM's port, or refuses at once when the queue is full.
    async fn enter(&self, uuid: &str, name: &str) -> Result<InLane, AgentError> {
        let lane = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(uuid.to_string())
            .or_insert_with(|| Lane {
                admitted: Arc::new(Semaphore::new(1 + MAX_WAITING)),
                port: Arc::new(Semaphore::new(1)),
            })
            .clone();
        let admitted =
            lane.admitted
                .try_acquire_owned()
                .map_err(|_| AgentError::ExecQueueFull {
                    name: name.to_string(),
                    waiting: MAX_WAITING,
                })?;
        // Neither semaphore is ever closed.
        let port = lane
            .port
            .acquire_owned()
            .await
            .expect("an exec lane is never closed");
        Ok((admitted, port))
    }

    /// Forgets a removed domain.
    pub fn remove(&self, uuid: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uuid);
    }
}

/// Runs `exec` in the guest of domain `name` (`uuid`) through its shim
/// socket `socket`.
pub async fn run(
    lanes: &ExecLanes,
    uuid: &str,
    name: &str,
    socket: &Path,
    exec: ExecCommand,
    permit: OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let lane = lanes.enter(uuid, name).await?;
    let unavailable = |reason: String| AgentError::EngineUnavailable {
        engine: "libvirt",
        socket: socket.display().to_string(),
        reason: format!("VM `{name}`: {reason}"),
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| unavailable(format!("cannot reach the exec shim's port: {e}")))?;
    let request = exec_shim::request_of(&exec);
    let accepted = async {
        stream.write_all(&request.encode()).await?;
        // Whole frames the shim sent after an earlier exec's agent went away
        // may still be in the port: they come before this exec's ACCEPTED.
        let mut stale = 0usize;
        loop {
            let mut header = [0; 5];
            stream.read_exact(&mut header).await?;
            match protocol::parse_header(header)? {
                (FrameKind::Accepted, _) => return Ok::<usize, std::io::Error>(stale),
                (_, length) => {
                    let mut payload = vec![0; length];
                    stream.read_exact(&mut payload).await?;
                    stale += 1;
                }
            }
        }
    };
    match tokio::time::timeout(ACCEPT_WAIT, accepted).await {
        Ok(Ok(stale)) => {
            if stale > 0 {
                tracing::debug!(vm = name, stale, "dropped frames of an earlier exec");
            }
        }
        Ok(Err(error)) => {
            return Err(unavailable(format!(
                "the exec shim's port broke before the request was accepted: {error}"
            )));
        }
        Err(_) => {
            return Err(unavailable(format!(
                "no berth-exec-shim accepted the request within {} s: the guest has not booted yet, \
                 or its image does not run `berth-exec-shim --serial <port>` on the virtio-serial port `{SHIM_PORT}`",
                ACCEPT_WAIT.as_secs()
            )));
        }
    }
    Ok(exec_shim::stream_exec(stream, exec, (permit, lane), false))
}

/// `output`, with an exit whose way to the guest broke explained: `why` names the
/// cause on stderr (the one channel an exec stream has past its start), and
/// a command that went down with its VM exits 137, signalled, which the
/// orchestrator checks against the backend's state.
pub fn explained<W>(
    mut output: mpsc::Receiver<ExecOutput>,
    why: impl FnOnce() -> W + Send + 'static,
) -> mpsc::Receiver<ExecOutput>
where
    W: Future<Output = Broken> + Send,
{
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    // At most one exit comes.
    let mut why = Some(why);
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = output.recv() => message,
                // The caller went away: dropping `output` is the kill.
                () = tx.closed() => return,
            };
            let Some(mut message) = message else {
                return;
            };
            if let Some(exec_output::Output::Exit(exit)) = &mut message.output
                && exit.exit_code == BROKEN
                && let Some(why) = why.take()
            {
                let note = match why().await {
                    Broken::VmDown(note) => {
                        exit.exit_code = KILLED_WITH_VM;
                        exit.reason = ExitReason::Signaled as i32;
                        note
                    }
                    Broken::VmRuns(note) => note,
                };
                let note = ExecOutput {
                    output: Some(exec_output::Output::Stderr(
                        format!("berth: {note}\n").into(),
                    )),
                };
                if tx.send(note).await.is_err() {
                    return;
                }
            }
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_exec_runs_a_few_wait_and_more_are_refused() {
        let lanes = Arc::new(ExecLanes::default());
        let running = lanes.enter("vm", "vm1").await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..MAX_WAITING {
            let lanes = lanes.clone();
            waiting.push(tokio::spawn(async move {
                lanes.enter("vm", "vm1").await.map(drop)
            }));
        }
        tokio::task::yield_now().await;
        let refused = lanes.enter("vm", "vm1").await.unwrap_err();
        assert!(matches!(refused, AgentError::ExecQueueFull { .. }));
        assert!(
            refused
                .to_string()
                .contains("VM `vm1` runs one exec at a time")
        );
        // Another VM has a lane of its own.
        drop(lanes.enter("other", "vm2").await.unwrap());
        drop(running);
        for waiter in waiting {
            waiter.await.unwrap().unwrap();
        }
        drop(lanes.enter("vm", "vm1").await.unwrap());
    }
}
