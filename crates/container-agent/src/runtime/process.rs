//! The `process` runtime: workloads are host processes. A workload with a
//! command is a long-running host process (a host service); one without is a
//! host environment (env, working dir) that runs are exec'd into.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{
    EventKind, ExecOutput, Health, LogLine, LogStream, Workload, WorkloadState,
};
use berth_proto::common::v1::{RestartPolicy, Runtime, WorkloadSpec};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc, watch};

use super::{ExecCommand, WorkloadRuntime, validate_name};
use crate::error::AgentError;
use crate::events::EventBus;
use crate::process_group::{self, HostCommand};

/// Longest log line kept; longer lines are cut (a log is for people).
const MAX_LOG_LINE: usize = 16 * 1024;
const LOG_FOLLOW_BUFFER: usize = 256;

#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    workloads: Mutex<BTreeMap<String, Entry>>,
    events: EventBus,
    log_capacity: usize,
}

struct Entry {
    workload: Workload,
    main: Option<MainProcess>,
    logs: VecDeque<LogLine>,
    log_followers: broadcast::Sender<LogLine>,
}

struct MainProcess {
    pid: u32,
    stop_requested: bool,
    exited: watch::Receiver<bool>,
}

impl ProcessRuntime {
    pub fn new(events: EventBus, log_capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                workloads: Mutex::new(BTreeMap::new()),
                events,
                log_capacity,
            }),
        }
    }

    fn with_entry<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let mut workloads = self.inner.lock();
        let key =
            find_key(&workloads, id).ok_or_else(|| AgentError::WorkloadNotFound(id.to_string()))?;
        let entry = workloads
            .get_mut(&key)
            .ok_or_else(|| AgentError::WorkloadNotFound(id.to_string()))?;
        f(entry)
    }

    fn spawn_main(&self, id: &str) -> Result<Workload, AgentError> {
        let (command, name) = self.with_entry(id, |entry| {
            Ok((
                host_command(&entry.workload.spec.clone().unwrap_or_default(), None, &[]),
                entry.workload.name.clone(),
            ))
        })?;
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| AgentError::Internal("spawned process has no pid".into()))?;
        let (exited_tx, exited_rx) = watch::channel(false);
        let workload = self.with_entry(id, |entry| {
            entry.main = Some(MainProcess {
                pid,
                stop_requested: false,
                exited: exited_rx,
            });
            set_running(&mut entry.workload);
            Ok(entry.workload.clone())
        })?;
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|out| self.spawn_log_reader(workload.id.clone(), out, LogStream::Stdout)),
            child
                .stderr
                .take()
                .map(|err| self.spawn_log_reader(workload.id.clone(), err, LogStream::Stderr)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let runtime = self.clone();
        let workload_id = workload.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            for reader in readers {
                let _ = reader.await;
            }
            let code = status.map(process_group::exit_code).unwrap_or(-1);
            let stopped = runtime
                .with_entry(&workload_id, |entry| {
                    let stopped = entry.main.as_ref().is_some_and(|m| m.stop_requested);
                    entry.main = None;
                    entry.workload.state = if stopped {
                        WorkloadState::Stopped
                    } else {
                        WorkloadState::Exited
                    } as i32;
                    entry.workload.exit_code = Some(code);
                    Ok(stopped)
                })
                .unwrap_or(true);
            let _ = exited_tx.send(true);
            let (kind, message) = if stopped {
                (EventKind::Stopped, format!("stopped (exit code {code})"))
            } else {
                (
                    EventKind::Died,
                    format!("main process exited with code {code}"),
                )
            };
            runtime
                .inner
                .events
                .publish(&workload_id, &name, kind, message);
        });
        Ok(workload)
    }

    fn spawn_log_reader(
        &self,
        workload_id: String,
        pipe: impl AsyncRead + Unpin + Send + 'static,
        stream: LogStream,
    ) -> tokio::task::JoinHandle<()> {
        let runtime = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match lines.read_until(b'\n', &mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text =
                            String::from_utf8_lossy(&buffer[..buffer.len().min(MAX_LOG_LINE)]);
                        let line = LogLine {
                            time: Some(SystemTime::now().into()),
                            stream: stream as i32,
                            line: text.trim_end_matches(['\n', '\r']).to_string(),
                        };
                        let capacity = runtime.inner.log_capacity;
                        let _ = runtime.with_entry(&workload_id, |entry| {
                            if entry.logs.len() >= capacity {
                                entry.logs.pop_front();
                            }
                            entry.logs.push_back(line.clone());
                            let _ = entry.log_followers.send(line);
                            Ok(())
                        });
                    }
                }
            }
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.workloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn find_key(workloads: &BTreeMap<String, Entry>, id_or_name: &str) -> Option<String> {
    if workloads.contains_key(id_or_name) {
        return Some(id_or_name.to_string());
    }
    workloads
        .iter()
        .find(|(_, e)| e.workload.name == id_or_name)
        .map(|(k, _)| k.clone())
}

fn set_running(workload: &mut Workload) {
    workload.state = WorkloadState::Running as i32;
    workload.started_at = Some(SystemTime::now().into());
    workload.exit_code = None;
}

/// The workload's command (or an exec's) with the workload's env and dir.
fn host_command(
    spec: &WorkloadSpec,
    exec: Option<&HostCommand>,
    extra_env: &[(String, String)],
) -> HostCommand {
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    env.extend(extra_env.iter().cloned());
    let working_dir = exec
        .and_then(|e| e.working_dir.clone())
        .or_else(|| (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone().into()));
    HostCommand {
        argv: exec
            .map(|e| e.argv.clone())
            .unwrap_or_else(|| spec.command.clone()),
        env,
        working_dir,
    }
}

fn state_name(state: i32) -> &'static str {
    match WorkloadState::try_from(state).unwrap_or_default() {
        WorkloadState::Created => "created",
        WorkloadState::Running => "running",
        WorkloadState::Stopped => "stopped",
        WorkloadState::Exited => "exited",
        WorkloadState::Restarting => "restarting",
        WorkloadState::Removing => "removing",
        WorkloadState::Unspecified => "unknown",
    }
}

fn unsupported(field: &'static str, what: &str) -> AgentError {
    AgentError::InvalidArgument {
        field,
        reason: format!(
            "the process runtime cannot honour {what}; use the docker, podman or libvirt runtime"
        ),
    }
}

#[tonic::async_trait]
impl WorkloadRuntime for ProcessRuntime {
    fn kind(&self) -> Runtime {
        Runtime::Process
    }

    fn validate(&self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        if !spec.image.is_empty() {
            return Err(unsupported(
                "spec.image",
                "an image (it runs host commands)",
            ));
        }
        if !spec.mounts.is_empty() {
            return Err(unsupported(
                "spec.mounts",
                "mounts (host processes see the host's files)",
            ));
        }
        if !spec.ports.is_empty() {
            return Err(unsupported(
                "spec.ports",
                "published ports (host processes bind host ports)",
            ));
        }
        if spec
            .resources
            .as_ref()
            .is_some_and(|r| *r != Default::default())
        {
            return Err(unsupported("spec.resources", "CPU or memory limits"));
        }
        if !spec.ulimits.is_empty() {
            return Err(unsupported("spec.ulimits", "ulimits"));
        }
        if spec.gpus.as_ref().is_some_and(|g| *g != Default::default()) {
            return Err(unsupported("spec.gpus", "a GPU request"));
        }
        if spec.health_check.is_some() {
            return Err(unsupported("spec.health_check", "a health check"));
        }
        if spec.vm.is_some() {
            return Err(unsupported("spec.vm", "VM settings"));
        }
        match RestartPolicy::try_from(spec.restart_policy).unwrap_or_default() {
            RestartPolicy::Unspecified | RestartPolicy::No => Ok(()),
            _ => Err(unsupported("spec.restart_policy", "a restart policy")),
        }
    }

    async fn create(&self, name: &str, spec: WorkloadSpec) -> Result<Workload, AgentError> {
        validate_name(name)?;
        self.validate(&spec)?;
        let workload = {
            let mut workloads = self.inner.lock();
            if workloads.values().any(|e| e.workload.name == name) {
                return Err(AgentError::NameTaken(name.to_string()));
            }
            let id = format!("proc-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let health = if spec.health_check.is_some() {
                Health::Starting
            } else {
                Health::None
            };
            let workload = Workload {
                id: id.clone(),
                name: name.to_string(),
                spec: Some(spec),
                state: WorkloadState::Created as i32,
                health: health as i32,
                created_at: Some(SystemTime::now().into()),
                ..Default::default()
            };
            workloads.insert(
                id,
                Entry {
                    workload: workload.clone(),
                    main: None,
                    logs: VecDeque::new(),
                    log_followers: broadcast::channel(LOG_FOLLOW_BUFFER).0,
                },
            );
            workload
        };
        self.inner
            .events
            .publish(&workload.id, name, EventKind::Created, "created".into());
        Ok(workload)
    }

    async fn start(&self, id: &str) -> Result<Workload, AgentError> {
        let (current, has_command) = self.with_entry(id, |entry| {
            let has_command = entry
                .workload
                .spec
                .as_ref()
                .is_some_and(|s| !s.command.is_empty());
            Ok((entry.workload.clone(), has_command))
        })?;
        if current.state == WorkloadState::Running as i32 {
            return Ok(current);
        }
        let workload = if has_command {
            self.spawn_main(&current.id)?
        } else {
            self.with_entry(&current.id, |entry| {
                set_running(&mut entry.workload);
                Ok(entry.workload.clone())
            })?
        };
        self.inner.events.publish(
            &workload.id,
            &workload.name,
            EventKind::Started,
            "started".into(),
        );
        Ok(workload)
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<Workload, AgentError> {
        let main = self.with_entry(id, |entry| {
            Ok(entry.main.as_mut().map(|main| {
                main.stop_requested = true;
                (main.pid, main.exited.clone())
            }))
        })?;
        match main {
            Some((pid, mut exited)) => {
                process_group::signal_group(pid, Signal::SIGTERM);
                let graceful = tokio::time::timeout(timeout, exited.wait_for(|done| *done))
                    .await
                    .map(|_| ());
                if graceful.is_err() {
                    process_group::signal_group(pid, Signal::SIGKILL);
                    let _ = exited.wait_for(|done| *done).await.map(|_| ());
                }
            }
            None => {
                let stopped = self.with_entry(id, |entry| {
                    let was_running = entry.workload.state == WorkloadState::Running as i32;
                    if was_running {
                        entry.workload.state = WorkloadState::Stopped as i32;
                    }
                    Ok(was_running.then(|| entry.workload.clone()))
                })?;
                if let Some(workload) = stopped {
                    self.inner.events.publish(
                        &workload.id,
                        &workload.name,
                        EventKind::Stopped,
                        "stopped".into(),
                    );
                }
            }
        }
        self.with_entry(id, |entry| Ok(entry.workload.clone()))
    }

    async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let workload = self.with_entry(id, |entry| Ok(entry.workload.clone()))?;
        if workload.state == WorkloadState::Running as i32 {
            if !force {
                return Err(AgentError::WrongState {
                    name: workload.name,
                    state: "running",
                    reason: "stop it first or remove with force",
                });
            }
            self.stop(&workload.id, Duration::ZERO).await?;
        }
        self.inner.lock().remove(&workload.id);
        self.inner.events.publish(
            &workload.id,
            &workload.name,
            EventKind::Removed,
            "removed".into(),
        );
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Option<Workload>, AgentError> {
        let workloads = self.inner.lock();
        Ok(find_key(&workloads, id)
            .and_then(|key| workloads.get(&key))
            .map(|e| e.workload.clone()))
    }

    async fn list(&self) -> Result<Vec<Workload>, AgentError> {
        Ok(self
            .inner
            .lock()
            .values()
            .map(|e| e.workload.clone())
            .collect())
    }

    async fn exec(
        &self,
        id: &str,
        exec: ExecCommand,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        let command = self.with_entry(id, |entry| {
            if entry.workload.state != WorkloadState::Running as i32 {
                return Err(AgentError::NotRunning {
                    name: entry.workload.name.clone(),
                    state: state_name(entry.workload.state),
                });
            }
            let spec = entry.workload.spec.clone().unwrap_or_default();
            Ok(host_command(&spec, Some(&exec.command), &exec.command.env))
        })?;
        process_group::run_streaming(&command, exec.timeout, permit)
    }

    async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<mpsc::Receiver<LogLine>, AgentError> {
        let (kept, mut followers) = self.with_entry(id, |entry| {
            let skip = if tail == 0 {
                0
            } else {
                entry.logs.len().saturating_sub(tail)
            };
            Ok((
                entry.logs.iter().skip(skip).cloned().collect::<Vec<_>>(),
                entry.log_followers.subscribe(),
            ))
        })?;
        let (tx, rx) = mpsc::channel(LOG_FOLLOW_BUFFER);
        tokio::spawn(async move {
            for line in kept {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                tokio::select! {
                    received = followers.recv() => match received {
                        Ok(line) => if tx.send(line).await.is_err() { return },
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
}
