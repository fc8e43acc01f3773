//! Execs through the berth exec shim (`crates/exec-shim`) when
//! `engines.exec_shim` names its static binary: every container the agent
//! creates gets the binary and a socket directory of its own bind-mounted;
//! each start of the container launches the shim with one engine exec; each
//! exec then goes to the shim over the socket (a fork in the container, ~1 ms)
//! instead of the engine (create + start + inspect, ~40 ms on Docker 20.10).
//!
//! The shim runs as an engine exec would: the container's user, namespaces,
//! cgroup and environment. When the socket does not answer (the container
//! restarted, the shim could not start), the exec goes to the engine as
//! without a shim, and the shim is launched again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_exec_shim::protocol::{self, FrameKind, Request};
use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus, exec_output};
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions};
use bollard::models::{Mount, MountType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::process_group::EXEC_BUFFER;
use crate::process_group::send_output;
use crate::runtime::ExecCommand;

/// Where the shim's binary and socket directory are mounted in a container.
const BINARY_IN_CONTAINER: &str = "/.berth/exec-shim";
const DIR_IN_CONTAINER: &str = "/.berth/run";
const SOCKET: &str = "exec.sock";
/// How long a start waits for the launched shim's socket to answer.
const LAUNCH_WAIT: Duration = Duration::from_secs(2);
/// Least time between two launches of one container's shim.
const RELAUNCH_EVERY: Duration = Duration::from_secs(2);
/// Exit code reported for a command berth killed (128 + SIGKILL).
const KILLED: i32 = 137;

pub struct ExecShim {
    binary: PathBuf,
    /// Host directory holding one socket directory per container name.
    sockets: PathBuf,
    launched: Mutex<HashMap<String, Instant>>,
}

impl ExecShim {
    /// The shim of `binary` (None: engine execs only), with socket
    /// directories under `state_dir`.
    pub fn new(binary: &Path, state_dir: &Path) -> Option<Self> {
        if binary.as_os_str().is_empty() {
            return None;
        }
        Some(Self {
            binary: binary.to_path_buf(),
            sockets: state_dir.join("exec-shim"),
            launched: Mutex::default(),
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.sockets.join(name)
    }

    /// The binds a new container `name` gets, its socket directory made
    /// (owner-only: whoever can reach the socket can run commands in the
    /// container).
    pub fn mounts(&self, name: &str) -> std::io::Result<Vec<Mount>> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.dir(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let bind = |source: &Path, target: &str, read_only: bool| Mount {
            source: Some(source.to_string_lossy().into_owned()),
            target: Some(target.to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        Ok(vec![
            bind(&self.binary, BINARY_IN_CONTAINER, true),
            bind(&dir, DIR_IN_CONTAINER, false),
        ])
    }

    /// Starts the shim in a running container (a detached engine exec) and
    /// waits a moment for its socket; a failure leaves execs to the engine.
    pub async fn launch(&self, docker: &Docker, container: &str, name: &str) {
        self.launched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), Instant::now());
        let socket = format!("{DIR_IN_CONTAINER}/{SOCKET}");
        let options = CreateExecOptions {
            cmd: Some(vec![BINARY_IN_CONTAINER.to_string(), socket]),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            ..Default::default()
        };
        let started = match docker.create_exec(container, options).await {
            Ok(exec) => {
                docker
                    .start_exec(
                        &exec.id,
                        Some(StartExecOptions {
                            detach: true,
                            ..Default::default()
                        }),
                    )
                    .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = started {
            tracing::warn!(container = name, %error, "could not start the exec shim; execs go to the engine");
            return;
        }
        let deadline = Instant::now() + LAUNCH_WAIT;
        while Instant::now() < deadline {
            if self.connect(name).await.is_some() {
                tracing::debug!(container = name, "exec shim serving");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(
            container = name,
            "the exec shim did not answer; execs go to the engine"
        );
    }

    /// Whether the container's shim should be launched again now (it did
    /// not answer, and was not launched in the last few seconds).
    pub fn due_for_relaunch(&self, name: &str) -> bool {
        let mut launched = self
            .launched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = launched
            .get(name)
            .is_none_or(|at| at.elapsed() >= RELAUNCH_EVERY);
        if due {
            launched.insert(name.to_string(), Instant::now());
        }
        due
    }

    /// A connection to the container's shim, if it serves.
    pub async fn connect(&self, name: &str) -> Option<UnixStream> {
        UnixStream::connect(self.dir(name).join(SOCKET)).await.ok()
    }

    /// Forgets a removed container.
    pub fn remove(&self, name: &str) {
        self.launched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        let _ = std::fs::remove_dir_all(self.dir(name));
    }
}

/// Runs `exec` through a connected shim and streams its output and exit
/// status. A timeout or the caller going away closes the connection, and
/// the shim kills the command's process group.
pub fn run(
    stream: UnixStream,
    exec: ExecCommand,
    permit: Option<OwnedSemaphorePermit>,
) -> mpsc::Receiver<ExecOutput> {
    let request = request_of(&exec);
    stream_exec(stream, Some(request), exec.timeout, permit, false)
}

/// The shim's request for `exec`.
pub(crate) fn request_of(exec: &ExecCommand) -> Request {
    Request {
        argv: exec.command.argv.clone(),
        env: exec.command.env.clone(),
        working_dir: exec
            .command
            .working_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// [`run`], with the request already sent when `request` is None (a VM's
/// shim, which the caller first hears accept it). On a VM's serial port
/// (`serial`) a timeout or the caller going away sends a
/// [`protocol::CANCEL`] before closing: a keyed exec outlives a closed
/// port. `guard` (exec permits) is held until the exec ends.
pub(crate) fn stream_exec(
    mut stream: UnixStream,
    request: Option<Request>,
    timeout: Option<Duration>,
    guard: impl Send + 'static,
    serial: bool,
) -> mpsc::Receiver<ExecOutput> {
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    tokio::spawn(async move {
        let _guard = guard;
        let started = Instant::now();
        let deadline = async {
            match timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let ended = async {
            if let Some(request) = &request {
                stream.write_all(&request.encode()).await?;
            }
            loop {
                let mut header = [0; 5];
                stream.read_exact(&mut header).await?;
                let (kind, length) = protocol::parse_header(header)?;
                let mut payload = vec![0; length];
                stream.read_exact(&mut payload).await?;
                match kind {
                    FrameKind::Stdout | FrameKind::Stderr => {
                        if !send_output(&tx, &payload, kind == FrameKind::Stdout).await {
                            return Err(std::io::Error::other("the caller went away"));
                        }
                    }
                    // Only a shim on a VM's serial port sends them, first.
                    FrameKind::Accepted | FrameKind::UnknownKey => {}
                    FrameKind::Exit => {
                        // parse_header made sure it is 4 bytes long.
                        let code: [u8; 4] = payload.try_into().unwrap_or_default();
                        return Ok(i32::from_be_bytes(code));
                    }
                }
            }
        };
        let (exit_code, reason) = tokio::select! {
            ended = ended => match ended {
                Ok(code) => (code, ExitReason::Exited),
                Err(error) => {
                    tracing::warn!(%error, "exec through the shim broke");
                    (-1, ExitReason::Exited)
                }
            },
            () = &mut deadline => {
                if serial {
                    let _ = stream.write_all(&[protocol::CANCEL]).await;
                }
                (KILLED, ExitReason::TimedOut)
            }
            // The caller went away (a cancelled call): closing the
            // connection (after a cancel, on a serial port) is the kill.
            () = tx.closed() => {
                if serial {
                    let _ = stream.write_all(&[protocol::CANCEL]).await;
                }
                return;
            }
        };
        // Closed before the exit is reported: a timed-out command is dead by then.
        drop(stream);
        let exit = ExitStatus {
            exit_code,
            reason: reason as i32,
            duration: prost_types::Duration::try_from(started.elapsed()).ok(),
        };
        let _ = tx
            .send(ExecOutput {
                output: Some(exec_output::Output::Exit(exit)),
            })
            .await;
    });
    rx
}
