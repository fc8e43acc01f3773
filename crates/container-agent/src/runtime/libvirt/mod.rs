//! The `libvirt` runtime: workloads are virtual machines (libvirt domains)
//! on the hypervisor at `libvirt.uri`. libvirt is the source of truth: a
//! domain is this agent's when its `<metadata>` carries berth's element with
//! this agent's owner, so a restarted agent finds its VMs again.
//!
//! Exec goes to the berth exec shim in the guest over a virtio-serial port
//! (`exec.rs`), or to the qemu guest agent in images without the shim
//! (`guest_agent.rs`); logs are the guest's serial console (`console.rs`);
//! stats and the guest's IP addresses come from libvirt (`stats.rs`,
//! [`addresses`]); changes made outside the agent from libvirt's lifecycle
//! events (`watch.rs`).

mod console;
mod define;
mod disks;
pub(super) mod domain_xml;
mod exec;
mod ffi;
mod guest_agent;
mod stats;
mod view;
pub(super) mod vm_spec;
mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::agent::v1::{EventKind, ExecOutput, LogLine, Workload, WorkloadStats};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use tokio::sync::mpsc;

use super::{ExecCommand, WorkloadRuntime, validate_name};
use crate::config::LibvirtConfig;
use crate::error::AgentError;
use crate::events::EventBus;
use domain_xml::Nic;
use ffi::{AddressSource, Connection, Domain, VirError, code};
use view::{DomainView, metadata_of, view_of};

const RUNTIME: &str = "RUNTIME_LIBVIRT";
/// The daemon sockets `auto` looks for: the monolithic libvirtd's, then the
/// modular QEMU daemon's.
const SYSTEM_SOCKETS: [&str; 2] = ["/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"];
/// How often a stop checks whether the guest has shut down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// How long an exec whose port broke waits for libvirt to show its domain
/// down: qemu closes the port as it exits, a moment before libvirtd
/// records why.
const BROKEN_EXEC_SETTLE: Duration = Duration::from_secs(2);
/// Stats samples buffered for a slow reader.
const STATS_BUFFER: usize = 16;

/// The URI `libvirt.uri` stands for, or why the runtime is off.
pub fn locate(configured: &str) -> Result<String, String> {
    match configured {
        "off" => Err("libvirt.uri = \"off\"".to_string()),
        "auto" => {
            if let Ok(uri) = std::env::var("LIBVIRT_DEFAULT_URI")
                && !uri.is_empty()
            {
                return Ok(uri);
            }
            SYSTEM_SOCKETS
                .iter()
                .any(|socket| std::path::Path::new(socket).exists())
                .then(|| "qemu:///system".to_string())
                .ok_or_else(|| {
                    format!(
                        "libvirt.uri = \"auto\" found no libvirt daemon (no {}); set libvirt.uri, e.g. qemu:///session",
                        SYSTEM_SOCKETS.join(" or ")
                    )
                })
        }
        uri => Ok(uri.to_string()),
    }
}

/// The daemon behind `uri` and its socket, for errors: libvirt names the
/// socket only when it cannot connect, not when a connection breaks. `None`
/// for drivers without a daemon (`test:///`).
fn daemon_of(uri: &str) -> Option<String> {
    if let Some(socket) = uri
        .split_once('?')
        .and_then(|(_, query)| query.split('&').find_map(|p| p.strip_prefix("socket=")))
    {
        return Some(format!("the libvirt daemon on {socket}"));
    }
    let (scheme, path) = uri.split_once("://")?;
    if scheme == "test" {
        return None;
    }
    Some(match path.trim_start_matches('/') {
        "system" => match SYSTEM_SOCKETS
            .iter()
            .find(|socket| std::path::Path::new(socket).exists())
        {
            Some(socket) if socket.ends_with("virtqemud-sock") => format!("virtqemud on {socket}"),
            _ => format!("libvirtd on {}", SYSTEM_SOCKETS[0]),
        },
        "session" => {
            "the session daemon (libvirtd --session) on $XDG_RUNTIME_DIR/libvirt/libvirt-sock"
                .to_string()
        }
        _ => "the libvirt daemon".to_string(),
    })
}

#[derive(Clone)]
pub struct LibvirtRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    library: &'static ffi::Library,
    uri: String,
    owner: String,
    disk_dir: PathBuf,
    domain_type: String,
    events: EventBus,
    /// Opened on first use and again after the daemon went away.
    connection: Mutex<Option<Arc<Connection>>>,
    seen: Mutex<watch::Seen>,
    exec_lanes: exec::ExecLanes,
    /// `libvirt.exec_detach_grace`.
    exec_detach_grace: Duration,
    consoles: console::Consoles,
}

impl Inner {
    fn unavailable(&self, why: impl std::fmt::Display) -> AgentError {
        let daemon = daemon_of(&self.uri).map_or(String::new(), |d| format!(" ({d})"));
        AgentError::RuntimeUnavailable(RUNTIME, format!("libvirt at {}{daemon}: {why}", self.uri))
    }

    /// The open connection, or a new one when there is none or it broke.
    fn connect(&self) -> Result<Arc<Connection>, AgentError> {
        let mut cached = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(connection) = cached.as_ref().filter(|c| c.is_alive()) {
            return Ok(connection.clone());
        }
        *cached = None;
        let connection = Arc::new(
            self.library
                .open(&self.uri)
                .map_err(|e| self.unavailable(e))?,
        );
        *cached = Some(connection.clone());
        Ok(connection)
    }

    fn forget(&self, broken: &Arc<Connection>) {
        let mut cached = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cached.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            *cached = None;
        }
    }

    fn seen(&self) -> MutexGuard<'_, watch::Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The console journal of a VM with a files directory, followed from
    /// now on (a restarted agent follows its running VMs again from its
    /// first poll).
    fn console(&self, view: &DomainView) -> Option<Arc<console::Journal>> {
        let dir = view.metadata.files_dir.as_deref()?;
        Some(self.consoles.journal(&view.uuid, dir))
    }
}

fn failed(action: &'static str) -> impl Fn(VirError) -> AgentError {
    move |error| AgentError::Engine {
        engine: "libvirt",
        action,
        message: error.message,
    }
}

impl LibvirtRuntime {
    /// The runtime on `uri`, or why libvirt cannot be used on this host (the
    /// library does not load). The daemon is reached on first use: calls
    /// answer UNAVAILABLE while it does not answer.
    pub fn new(
        uri: String,
        config: &LibvirtConfig,
        owner: String,
        events: EventBus,
        log_lines: usize,
    ) -> Result<Self, String> {
        let library = ffi::library()?;
        let runtime = Self {
            inner: Arc::new(Inner {
                library,
                uri,
                owner,
                disk_dir: config.disk_dir.clone(),
                domain_type: config.domain_type.clone(),
                events,
                connection: Mutex::new(None),
                seen: Mutex::new(watch::Seen::default()),
                exec_lanes: exec::ExecLanes::default(),
                exec_detach_grace: config.exec_detach_grace,
                consoles: console::Consoles::new(log_lines),
            }),
        };
        watch::spawn(Arc::downgrade(&runtime.inner), config.poll_interval);
        Ok(runtime)
    }

    /// Runs `call` with the connection on a blocking thread (libvirt calls
    /// block). A call whose connection broke answers UNAVAILABLE, whatever
    /// libvirt said, and the next call connects again.
    async fn with_connection<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Connection) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let connection = inner.connect()?;
            let result = call(&connection);
            if !connection.is_alive() {
                inner.forget(&connection);
                return Err(inner.unavailable(
                    "the connection to the daemon was lost (stopped or restarted?); the next call reconnects",
                ));
            }
            result
        })
        .await
        .map_err(|e| AgentError::Internal(format!("libvirt call panicked: {e}")))?
    }

    /// The domain named by `id` (a name or UUID) when it is this agent's;
    /// `Ok(None)` when there is no such domain.
    async fn find(&self, id: &str) -> Result<Option<DomainView>, AgentError> {
        let id = id.to_string();
        let owner = self.inner.owner.clone();
        let uri = self.inner.uri.clone();
        self.with_connection(move |connection| {
            let mut domain = connection.lookup_by_name(&id).map_err(failed("look up"))?;
            if domain.is_none() && uuid::Uuid::parse_str(&id).is_ok() {
                domain = connection.lookup_by_uuid(&id).map_err(failed("look up"))?;
            }
            let Some(domain) = domain else {
                return Ok(None);
            };
            match metadata_of(&domain)? {
                Some(metadata) if metadata.owner == owner => Ok(Some(view_of(&domain, metadata)?)),
                found => Err(AgentError::NotOwned(format!(
                    "libvirt domain `{id}` on {uri} is not this agent's: {}",
                    match found {
                        Some(metadata) => format!(
                            "berth owner `{}`, not `{owner}` (engines.owner)",
                            metadata.owner
                        ),
                        None => "it has no berth metadata (it was not created through berth)"
                            .to_string(),
                    }
                ))),
            }
        })
        .await
    }

    async fn find_or_404(&self, id: &str) -> Result<DomainView, AgentError> {
        self.find(id)
            .await?
            .ok_or_else(|| AgentError::WorkloadNotFound(id.to_string()))
    }

    /// All of this agent's domains.
    async fn owned_domains(&self) -> Result<Vec<DomainView>, AgentError> {
        let owner = self.inner.owner.clone();
        self.with_connection(move |connection| {
            let mut views = Vec::new();
            for domain in connection.list_domains().map_err(failed("list"))? {
                let view = match metadata_of(&domain) {
                    Ok(Some(metadata)) if metadata.owner == owner => view_of(&domain, metadata),
                    Ok(_) => continue,
                    Err(error) => Err(error),
                };
                match view {
                    Ok(view) => views.push(view),
                    // A domain undefined between the list and these reads is gone.
                    Err(_) if domain.info().is_err() => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(views)
        })
        .await
    }

    /// Runs `action` on the domain with that UUID; libvirt's own error
    /// comes back as it is, for the caller to tell apart.
    async fn on_domain(
        &self,
        uuid: &str,
        action: impl FnOnce(&Domain<'_>) -> Result<(), VirError> + Send + 'static,
        describe: &'static str,
    ) -> Result<Result<(), VirError>, AgentError> {
        let uuid = uuid.to_string();
        self.with_connection(move |connection| {
            let domain = connection
                .lookup_by_uuid(&uuid)
                .map_err(failed(describe))?
                .ok_or_else(|| AgentError::WorkloadNotFound(uuid.clone()))?;
            Ok(action(&domain))
        })
        .await
    }

    async fn current(&self, uuid: &str) -> Result<Workload, AgentError> {
        Ok(self.find_or_404(uuid).await?.workload())
    }

    fn publish(&self, view: &DomainView, kind: EventKind, message: String) {
        self.inner
            .events
            .publish(&view.uuid, &view.name, kind, message);
    }
}

/// Why a defined domain did not start: its host lacks something it needs
/// (a network, a PCI device, KVM) more often than libvirt broke.
fn start_error(error: VirError) -> AgentError {
    match error.code {
        code::NO_NETWORK
        | code::CONFIG_UNSUPPORTED
        | code::OPERATION_FAILED
        | code::OPERATION_INVALID
        | code::INVALID_ARG => AgentError::Unsupported {
            field: "spec.vm",
            reason: format!("libvirt could not start the domain: {}", error.message),
        },
        _ => failed("start")(error),
    }
}

#[tonic::async_trait]
impl WorkloadRuntime for LibvirtRuntime {
    fn kind(&self) -> Runtime {
        Runtime::Libvirt
    }

    fn validate(&self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        vm_spec::validate(spec).map(|_| ())
    }

    async fn create(&self, name: &str, spec: WorkloadSpec) -> Result<Workload, AgentError> {
        validate_name(name)?;
        self.define(name, spec).await
    }

    async fn start(&self, id: &str) -> Result<Workload, AgentError> {
        let view = self.find_or_404(id).await?;
        if view.active() {
            return Ok(view.workload());
        }
        let _busy = watch::Busy::new(&self.inner, &view.uuid);
        let started_at = SystemTime::now();
        self.on_domain(
            &view.uuid,
            move |domain| {
                domain.start()?;
                // Dates this run; libvirt drops it with the live definition.
                if let Err(error) = domain.set_live_metadata(
                    &domain_xml::run_xml(started_at),
                    domain_xml::PREFIX,
                    domain_xml::RUN_NAMESPACE,
                ) {
                    tracing::debug!(%error, "could not record the domain's start time");
                }
                Ok(())
            },
            "start",
        )
        .await?
        .map_err(start_error)?;
        if let Some(journal) = self.inner.console(&view) {
            journal.restarted();
        }
        self.inner.seen().note(&view.uuid, &view.name, true);
        self.publish(
            &view,
            EventKind::Started,
            "libvirt domain started".to_string(),
        );
        self.current(&view.uuid).await
    }

    /// Asks the guest to shut down (ACPI) and waits up to `timeout`, then
    /// powers it off.
    async fn stop(&self, id: &str, timeout: Duration) -> Result<Workload, AgentError> {
        let view = self.find_or_404(id).await?;
        if !view.active() {
            return Ok(view.workload());
        }
        let _busy = watch::Busy::new(&self.inner, &view.uuid);
        let mut graceful = false;
        if !timeout.is_zero() {
            match self
                .on_domain(&view.uuid, |d| d.shutdown(), "shut down")
                .await?
            {
                Ok(()) => {
                    let deadline = Instant::now() + timeout;
                    while Instant::now() < deadline {
                        if !self.find_or_404(&view.uuid).await?.active() {
                            graceful = true;
                            break;
                        }
                        tokio::time::sleep(SHUTDOWN_POLL).await;
                    }
                }
                Err(error) => {
                    tracing::info!(domain = %view.name, %error, "graceful shutdown refused; destroying");
                }
            }
        }
        if !graceful {
            match self
                .on_domain(&view.uuid, |d| d.destroy(), "destroy")
                .await?
            {
                Ok(()) => {}
                // It went down by itself in the meantime.
                Err(error) if error.code == code::OPERATION_INVALID => {}
                Err(error) => return Err(failed("destroy")(error)),
            }
        }
        self.inner.seen().note(&view.uuid, &view.name, false);
        let message = if graceful {
            "the guest shut down".to_string()
        } else if timeout.is_zero() {
            "powered off (destroyed)".to_string()
        } else {
            format!("powered off (destroyed): the guest did not shut down within {timeout:?}")
        };
        self.publish(&view, EventKind::Stopped, message);
        self.current(&view.uuid).await
    }

    /// Undefines the domain and removes the overlays and seed the agent made
    /// for it; base images, volumes and user seeds stay.
    async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let view = self.find_or_404(id).await?;
        if view.active() && !force {
            return Err(AgentError::WrongState {
                name: view.name,
                state: "running",
                reason: "stop it first or remove with force",
            });
        }
        let _busy = watch::Busy::new(&self.inner, &view.uuid);
        let active = view.active();
        self.on_domain(
            &view.uuid,
            move |domain| {
                if active {
                    match domain.destroy() {
                        Err(error) if error.code != code::OPERATION_INVALID => return Err(error),
                        _ => {}
                    }
                }
                domain.undefine()
            },
            "undefine",
        )
        .await?
        .map_err(failed("undefine"))?;
        if let Some(dir) = &view.metadata.files_dir {
            disks::remove_files_dir(dir, &self.inner.disk_dir);
        }
        self.inner.seen().forget(&view.uuid);
        self.inner.exec_lanes.remove(&view.uuid);
        self.inner.consoles.remove(&view.uuid);
        self.publish(
            &view,
            EventKind::Removed,
            "libvirt domain undefined".to_string(),
        );
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Option<Workload>, AgentError> {
        let Some(view) = self.find(id).await? else {
            return Ok(None);
        };
        let mut workload = view.workload();
        (workload.ip_addresses, workload.ip_addresses_note) = self.addresses(&view).await?;
        Ok(Some(workload))
    }

    async fn list(&self) -> Result<Vec<Workload>, AgentError> {
        Ok(self
            .owned_domains()
            .await?
            .iter()
            .map(DomainView::workload)
            .collect())
    }

    async fn exec(
        &self,
        id: &str,
        exec: ExecCommand,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        let view = self.find_or_404(id).await?;
        if !view.active() {
            return Err(AgentError::NotRunning {
                state: view.down_cause(),
                name: view.name,
            });
        }
        let Some((socket, files_dir)) = view
            .metadata
            .files_dir
            .clone()
            .and_then(|dir| Some((exec::socket_path(&dir)?, dir)))
        else {
            return Err(view.no_files_dir("Exec"));
        };
        // The shim when the guest has its port open, or has neither port
        // open yet (still booting: the shim's wait says so); the guest agent
        // when only its port is open.
        let ports = self.connected_ports(&view).await?;
        let (output, via) = if !ports.iter().any(|p| p == exec::SHIM_PORT)
            && ports.iter().any(|p| p == guest_agent::PORT)
        {
            let output = guest_agent::run(self.clone(), view.clone(), exec, permit).await?;
            (output, "the qemu guest agent")
        } else {
            let ask = exec::Ask::Run(exec, self.inner.exec_detach_grace);
            match exec::run(
                &self.inner.exec_lanes,
                (&view.uuid, &view.name),
                (&socket, &files_dir),
                ask,
                permit,
            )
            .await
            {
                Ok(Some(output)) => (output, "the exec shim's port"),
                Ok(None) => {
                    return Err(AgentError::Internal(format!(
                        "the exec shim of VM `{}` answered a run as an attach",
                        view.name
                    )));
                }
                // The port is qemu's: it breaks when the VM went down since
                // the lookup, which is then the error to report.
                Err(error @ AgentError::EngineUnavailable { .. }) => {
                    return Err(match self.down_cause(&view, Duration::ZERO).await {
                        Ok(Some(cause)) => AgentError::NotRunning {
                            name: view.name,
                            state: cause,
                        },
                        _ => error,
                    });
                }
                Err(error) => return Err(error),
            }
        };
        Ok(self.explained(output, view, via))
    }

    /// Asks the shim of each running VM whose files directory records `key`.
    async fn reattach(
        &self,
        key: &str,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<mpsc::Receiver<ExecOutput>>, AgentError> {
        let views = self.owned_domains().await?;
        let Some((view, files_dir, socket)) = views.into_iter().find_map(|view| {
            let dir = view.metadata.files_dir.clone()?;
            let socket = exec::socket_path(&dir)?;
            (view.active() && exec::has_key(&dir, key)).then_some((view, dir, socket))
        }) else {
            return Ok(None);
        };
        let output = exec::run(
            &self.inner.exec_lanes,
            (&view.uuid, &view.name),
            (&socket, &files_dir),
            exec::Ask::Attach(key.to_string()),
            permit,
        )
        .await?;
        Ok(output.map(|output| self.explained(output, view, "the exec shim's port")))
    }

    /// The guest's serial console, as the agent read it.
    async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<mpsc::Receiver<LogLine>, AgentError> {
        let view = self.find_or_404(id).await?;
        let journal = self
            .inner
            .console(&view)
            .ok_or_else(|| view.no_files_dir("Logs"))?;
        Ok(journal.lines(tail, follow))
    }

    /// Samples over `interval` (one over [`stats::SINGLE_SAMPLE_WINDOW`]
    /// when none): the first comes one interval after the call, since CPU
    /// use is measured between two readings. The stream ends when the
    /// domain stops.
    async fn stats(
        &self,
        id: &str,
        interval: Option<Duration>,
    ) -> Result<mpsc::Receiver<WorkloadStats>, AgentError> {
        let view = self.find_or_404(id).await?;
        let mut before = self.read_stats(&view).await?;
        let (tx, rx) = mpsc::channel(STATS_BUFFER);
        let runtime = self.clone();
        tokio::spawn(async move {
            let period = interval.unwrap_or(stats::SINGLE_SAMPLE_WINDOW);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = tx.closed() => return,
                }
                let now = match runtime.read_stats(&view).await {
                    Ok(now) => now,
                    Err(error) => {
                        tracing::debug!(vm = %view.name, %error, "VM stats stream ended");
                        return;
                    }
                };
                if tx.send(stats::sample(&before, &now)).await.is_err() || interval.is_none() {
                    return;
                }
                before = now;
            }
        });
        Ok(rx)
    }
}

impl LibvirtRuntime {
    /// `output`, its exit explained when the way to the guest broke
    /// ([`exec::explained`]).
    fn explained(
        &self,
        output: mpsc::Receiver<ExecOutput>,
        view: DomainView,
        via: &'static str,
    ) -> mpsc::Receiver<ExecOutput> {
        let runtime = self.clone();
        exec::explained(output, move || async move {
            let name = &view.name;
            match runtime.down_cause(&view, BROKEN_EXEC_SETTLE).await {
                Ok(Some(cause)) => exec::Broken::VmDown(format!(
                    "libvirt domain `{name}` went down while the exec ran: {cause}"
                )),
                Ok(None) => exec::Broken::VmRuns(format!(
                    "{via} in libvirt domain `{name}` broke before the command's exit, \
                     and the domain still runs: the guest's berth-exec-shim or qemu-ga died or restarted"
                )),
                Err(error) => exec::Broken::VmDown(format!(
                    "{via} in libvirt domain `{name}` broke before the command's exit, \
                     and libvirt cannot say why: {error}"
                )),
            }
        })
    }

    /// One reading of a running domain's counters.
    async fn read_stats(&self, view: &DomainView) -> Result<stats::Reading, AgentError> {
        let (uuid, name) = (view.uuid.clone(), view.name.clone());
        self.with_connection(move |connection| {
            let domain = connection
                .lookup_by_uuid(&uuid)
                .map_err(failed("read stats"))?
                .ok_or_else(|| AgentError::WorkloadNotFound(name.clone()))?;
            if !domain
                .info()
                .map_err(failed("read stats"))?
                .state
                .is_active()
            {
                return Err(AgentError::NotRunning {
                    name,
                    state: "not running",
                });
            }
            let values = domain.stats(stats::GROUPS).map_err(failed("read stats"))?;
            Ok(stats::Reading::new(values))
        })
        .await
    }

    /// The virtio-serial ports the guest of `view` has open.
    async fn connected_ports(&self, view: &DomainView) -> Result<Vec<String>, AgentError> {
        let (uuid, name) = (view.uuid.clone(), view.name.clone());
        self.with_connection(move |connection| {
            let domain = connection
                .lookup_by_uuid(&uuid)
                .map_err(failed("look up"))?
                .ok_or(AgentError::WorkloadNotFound(name))?;
            Ok(guest_agent::connected_ports(
                &domain.xml().map_err(failed("read the domain XML"))?,
            ))
        })
        .await
    }

    /// Why the domain of `view` is down ([`view::down_cause`]), once libvirt
    /// shows it down within `settle`; `None` while it still runs.
    async fn down_cause(
        &self,
        view: &DomainView,
        settle: Duration,
    ) -> Result<Option<&'static str>, AgentError> {
        let deadline = Instant::now() + settle;
        loop {
            let uuid = view.uuid.clone();
            let info = self
                .with_connection(move |connection| {
                    match connection
                        .lookup_by_uuid(&uuid)
                        .map_err(failed("look up"))?
                    {
                        Some(domain) => domain.info().map(Some).map_err(failed("look up")),
                        None => Ok(None),
                    }
                })
                .await?;
            match info {
                None => return Ok(Some("undefined (the domain is gone)")),
                Some(info) if !info.state.is_active() => {
                    return Ok(Some(view::down_cause(info.state, info.reason)));
                }
                Some(_) if Instant::now() >= deadline => return Ok(None),
                Some(_) => tokio::time::sleep(SHUTDOWN_POLL).await,
            }
        }
    }

    /// The guest's IP addresses from its network's DHCP leases, else from
    /// the host's ARP table (a bridge, or a network without DHCP); none,
    /// with why, when neither knows one. libvirt failing to say is a note,
    /// not an error: inspecting the VM still works.
    async fn addresses(&self, view: &DomainView) -> Result<(Vec<String>, String), AgentError> {
        let nic = view
            .metadata
            .spec
            .as_ref()
            .and_then(|spec| spec.vm.as_ref())
            .map_or(Nic::None, Nic::of);
        if nic == Nic::None {
            return Ok((
                Vec::new(),
                "the VM has no network card (vm.network = \"none\")".to_string(),
            ));
        }
        if !view.active() {
            return Ok((Vec::new(), String::new()));
        }
        let uuid = view.uuid.clone();
        self.with_connection(move |connection| {
            let Some(domain) = connection
                .lookup_by_uuid(&uuid)
                .map_err(failed("read addresses"))?
            else {
                return Ok((Vec::new(), "the domain is gone".to_string()));
            };
            let mut why = Vec::new();
            for source in [AddressSource::Lease, AddressSource::Arp] {
                match domain.interfaces(source) {
                    Ok(interfaces) => {
                        let addresses: Vec<String> = interfaces
                            .into_iter()
                            .flat_map(|interface| interface.addresses)
                            .collect();
                        if !addresses.is_empty() {
                            return Ok((addresses, String::new()));
                        }
                    }
                    Err(error) => why.push(format!("{source:?}: {error}")),
                }
            }
            let mut note = "no DHCP lease or ARP entry for the guest's network card yet \
                (still booting, it asks for no address, or its network has no DHCP)"
                .to_string();
            if !why.is_empty() {
                note.push_str(&format!("; libvirt said {}", why.join("; ")));
            }
            Ok((Vec::new(), note))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_daemon_behind_a_uri() {
        assert!(
            daemon_of("qemu:///system")
                .unwrap()
                .contains("/run/libvirt/")
        );
        assert_eq!(
            daemon_of("qemu+unix:///system?socket=/tmp/s").unwrap(),
            "the libvirt daemon on /tmp/s"
        );
        assert!(daemon_of("qemu:///session").unwrap().contains("session"));
        assert_eq!(daemon_of("test:///default"), None);
    }

    #[test]
    fn uris_are_located() {
        assert!(locate("off").is_err());
        assert_eq!(locate("test:///x.xml").unwrap(), "test:///x.xml");
    }

    #[test]
    fn start_errors_name_the_cause() {
        let error = VirError {
            code: code::NO_NETWORK,
            message: "Network not found: no network with matching name 'default'".to_string(),
        };
        assert!(matches!(start_error(error), AgentError::Unsupported { .. }));
    }
}
