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
//! RESOURCE_EXHAUSTED rather than queued without end.
//!
//! An exec without a key is killed when its connection closes before the
//! exit frame (the guest sees the port close). A keyed exec outlives its
//! connection, and so the agent (a kill -9, a restart): the shim keeps
//! running it for `libvirt.exec_detach_grace`, with its exit and the last
//! MiB of its output, and the key is written to the VM's files directory
//! ([`KEYS_FILE`]), where a new agent looks for it on AttachExec and attaches
//! through the shim ([`Ask::Attach`]). A cancel or a timeout sends the shim
//! a cancel byte before closing.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use berth_exec_shim::protocol::{self, FrameKind, Message};
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

/// What the agent asks a VM's shim over its port.
pub enum Ask {
    /// Run a command (keyed when the exec has a key: it then outlives this
    /// agent process).
    Run(ExecCommand, Duration),
    /// Attach to the keyed exec an earlier agent process started.
    Attach(String),
}

/// Runs `ask` in the guest of domain `name` (`uuid`) through its shim
/// socket `socket`, whose VM keeps its files in `files_dir`. `None`: the
/// shim keeps no exec of an attach's key.
pub async fn run(
    lanes: &ExecLanes,
    (uuid, name): (&str, &str),
    (socket, files_dir): (&Path, &Path),
    ask: Ask,
    permit: OwnedSemaphorePermit,
) -> Result<Option<mpsc::Receiver<ExecOutput>>, AgentError> {
    let lane = lanes.enter(uuid, name).await?;
    let unavailable = |reason: String| AgentError::EngineUnavailable {
        engine: "libvirt",
        socket: socket.display().to_string(),
        reason: format!("VM `{name}`: {reason}"),
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| unavailable(format!("cannot reach the exec shim's port: {e}")))?;
    let (message, timeout) = match ask {
        Ask::Run(exec, detach_grace) => {
            let request = exec_shim::request_of(&exec);
            let message = match exec.key {
                Some(key) => {
                    // Execs into one VM are one at a time from here on, so the
                    // file is read and written by one of them at once.
                    note_key(files_dir, &key).map_err(|e| {
                        unavailable(format!(
                            "cannot record the exec key in {}: {e}",
                            files_dir.display()
                        ))
                    })?;
                    Message::Keyed {
                        key,
                        request,
                        timeout: exec.timeout,
                        detach_grace,
                    }
                }
                None => Message::Exec(request),
            };
            (message, exec.timeout)
        }
        // The timeout is the shim's to enforce now: the agent that had it is gone.
        Ask::Attach(key) => (Message::Attach { key }, None),
    };
    let accepted = async {
        stream.write_all(&message.encode()).await?;
        // Whole frames the shim sent after an earlier exec's agent went away
        // may still be in the port: they come before this exec's ACCEPTED.
        let mut stale = 0usize;
        loop {
            let mut header = [0; 5];
            stream.read_exact(&mut header).await?;
            match protocol::parse_header(header)? {
                (FrameKind::Accepted, _) => return Ok::<_, std::io::Error>((true, stale)),
                (FrameKind::UnknownKey, _) => return Ok((false, stale)),
                (_, length) => {
                    let mut payload = vec![0; length];
                    stream.read_exact(&mut payload).await?;
                    stale += 1;
                }
            }
        }
    };
    match tokio::time::timeout(ACCEPT_WAIT, accepted).await {
        Ok(Ok((accepted, stale))) => {
            if stale > 0 {
                tracing::debug!(vm = name, stale, "dropped frames of an earlier exec");
            }
            if !accepted {
                return Ok(None);
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
    Ok(Some(exec_shim::stream_exec(
        stream,
        None,
        timeout,
        (permit, lane),
        true,
    )))
}

/// The exec keys sent to a VM's shim, newest last, one a line (keys hold
/// no control characters), in its files directory: where a restarted agent
/// looks for the VM that runs a key.
const KEYS_FILE: &str = "exec-keys";
/// Keys remembered per VM: more than its shim keeps execs.
const MAX_KEYS: usize = 32;

/// Records that `key` was sent to the shim of the VM with `files_dir`.
fn note_key(files_dir: &Path, key: &str) -> std::io::Result<()> {
    let path = files_dir.join(KEYS_FILE);
    let kept = std::fs::read_to_string(&path).unwrap_or_default();
    let mut keys: Vec<&str> = kept.lines().filter(|k| *k != key).collect();
    keys.push(key);
    let keys = &keys[keys.len().saturating_sub(MAX_KEYS)..];
    // Whole or not at all: a reader never sees half a rewrite.
    let new = files_dir.join(format!("{KEYS_FILE}.new"));
    std::fs::write(&new, keys.join("\n") + "\n")?;
    std::fs::rename(new, path)
}

/// Whether `key` was sent to the shim of the VM with `files_dir`.
pub fn has_key(files_dir: &Path, key: &str) -> bool {
    std::fs::read_to_string(files_dir.join(KEYS_FILE))
        .is_ok_and(|kept| kept.lines().any(|k| k == key))
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

    #[test]
    fn exec_keys_are_found_again_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_key(dir.path(), "k"));
        for n in 0..MAX_KEYS + 5 {
            note_key(dir.path(), &format!("camp/run {n}")).unwrap();
        }
        note_key(dir.path(), "camp/run 10").unwrap();
        assert!(has_key(dir.path(), "camp/run 10"));
        assert!(has_key(dir.path(), &format!("camp/run {}", MAX_KEYS + 4)));
        assert!(!has_key(dir.path(), "camp/run 4"));
        let kept = std::fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
        assert_eq!(kept.lines().count(), MAX_KEYS);
        assert!(kept.ends_with("camp/run 10\n"));
    }

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
