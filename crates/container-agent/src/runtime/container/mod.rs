//! The `docker` and `podman` runtimes: workloads are containers on an engine
//! reached through its Docker-compatible API socket (bollard). Both engines
//! share this code; what differs lives behind [`engine::Dialect`].
//!
//! The engine is the source of truth for state; the agent keeps only what
//! the engine does not: which containers are its own, their health verdicts
//! and how often it restarted them.

mod engine;
mod exec;
pub(crate) mod exec_shim;
mod health;
mod images;
mod inspect;
mod logs;
pub(super) mod spec;
mod stats;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::agent::v1::{
    ExecOutput, Health, Image, ImportImageMetadata, LogLine, Workload, WorkloadState, WorkloadStats,
};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use engine::status_of;
pub use engine::{Dialect, DockerDialect, Engine, EngineVersions, PodmanDialect};
use inspect::{ContainerDetails, ContainerSummary, LABEL_OWNER};
// The libvirt runtime keeps the spec in a domain's metadata the same way.
pub(crate) use inspect::{decode_spec, encode_spec};

use super::{ExecCommand, WorkloadRuntime, validate_name};
use crate::config::{EnginesConfig, Leftovers};
use crate::error::AgentError;
use crate::events::EventBus;

#[derive(Clone)]
pub struct ContainerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    owner: String,
    hostname: String,
    events: EventBus,
    restart_backoff_max: Duration,
    images: images::Records,
    owned: Mutex<HashMap<String, Owned>>,
    exec_shim: Option<exec_shim::ExecShim>,
}

/// What the agent knows about one of its containers beyond the engine's view.
struct Owned {
    name: String,
    /// The agent's health verdict, when it runs a health check.
    health: Option<Health>,
    agent_restarts: u32,
    monitor: Option<AbortHandle>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }
}

impl ContainerRuntime {
    /// Sets the runtime up on `socket`: adopts or sweeps this owner's
    /// leftovers and watches the engine's events. An engine that does not
    /// answer yet is not fatal: calls report UNAVAILABLE until it does.
    pub async fn start(
        dialect: &'static dyn Dialect,
        socket: PathBuf,
        config: &EnginesConfig,
        events: EventBus,
        hostname: String,
    ) -> Self {
        let images_file = config
            .state_dir
            .join(format!("{}-images.json", dialect.name()));
        let runtime = Self {
            inner: Arc::new(Inner {
                engine: Arc::new(Engine::new(dialect, socket)),
                owner: config.owner.clone(),
                hostname,
                events,
                restart_backoff_max: config.restart_backoff_max,
                images: images::Records::load(images_file),
                owned: Mutex::new(HashMap::new()),
                exec_shim: exec_shim::ExecShim::new(&config.exec_shim, &config.state_dir),
            }),
        };
        if let Err(error) = runtime.take_back_leftovers(config.leftovers).await {
            tracing::warn!(engine = dialect.name(), %error, "could not look for leftover containers");
        }
        watch::spawn(runtime.clone());
        runtime
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owned>> {
        self.inner
            .owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The engine id of an owned container named by id, id prefix or name.
    fn resolve(&self, id_or_name: &str) -> Option<(String, String)> {
        let owned = self.owned();
        owned
            .iter()
            .find(|(id, o)| *id == id_or_name || o.name == id_or_name)
            .or_else(|| {
                (id_or_name.len() >= 12)
                    .then(|| owned.iter().find(|(id, _)| id.starts_with(id_or_name)))
                    .flatten()
            })
            .map(|(id, o)| (id.clone(), o.name.clone()))
    }

    fn resolve_or_404(&self, id: &str) -> Result<(String, String), AgentError> {
        self.resolve(id)
            .ok_or_else(|| AgentError::WorkloadNotFound(id.to_string()))
    }

    async fn details(&self, id: &str) -> Result<Option<ContainerDetails>, AgentError> {
        self.engine()
            .get_json("inspect", &format!("/containers/{id}/json"))
            .await
    }

    fn to_workload(&self, details: &ContainerDetails) -> Workload {
        let owned = self.owned();
        let mine = owned.get(&details.id);
        details.workload(
            mine.and_then(|o| o.health),
            mine.map_or(0, |o| o.agent_restarts),
            &self.inner.hostname,
        )
    }

    async fn current(&self, id: &str) -> Result<Workload, AgentError> {
        match self.details(id).await? {
            Some(details) => Ok(self.to_workload(&details)),
            None => {
                self.owned().remove(id);
                Err(AgentError::WorkloadNotFound(id.to_string()))
            }
        }
    }

    /// This owner's containers on the engine, from an earlier life of the agent.
    async fn take_back_leftovers(&self, leftovers: Leftovers) -> Result<(), AgentError> {
        let filter = format!(r#"{{"label":["{LABEL_OWNER}={}"]}}"#, self.inner.owner);
        let query = format!("/containers/json?all=1&filters={}", percent_encode(&filter));
        let found: Vec<ContainerSummary> = self
            .engine()
            .get_json("list", &query)
            .await?
            .unwrap_or_default();
        for summary in found {
            // The engine filtered by label already; checking again costs nothing
            // and guards the one rule that matters: never touch others' containers.
            if summary.labels.get(LABEL_OWNER) != Some(&self.inner.owner) {
                continue;
            }
            match leftovers {
                Leftovers::Sweep => {
                    tracing::info!(id = %summary.id, "sweeping leftover container");
                    let docker = self.engine().client().await?;
                    let options = RemoveContainerOptionsBuilder::new()
                        .force(true)
                        .v(true)
                        .build();
                    if let Err(e) = docker.remove_container(&summary.id, Some(options)).await {
                        tracing::warn!(id = %summary.id, error = %e, "could not sweep leftover container");
                    }
                }
                Leftovers::Adopt => {
                    let Some(details) = self.details(&summary.id).await? else {
                        continue;
                    };
                    tracing::info!(id = %summary.id, state = %summary.state, "adopting leftover container");
                    self.track(
                        &details.id,
                        &details.workload_name(),
                        details.spec().as_ref(),
                    );
                    if details.running() {
                        self.watch_health(&details.id);
                    }
                }
            }
        }
        Ok(())
    }

    fn track(&self, id: &str, name: &str, spec: Option<&WorkloadSpec>) {
        let health = spec
            .and_then(|s| s.health_check.as_ref())
            .map(|_| Health::Starting);
        self.owned().insert(
            id.to_string(),
            Owned {
                name: name.to_string(),
                health,
                agent_restarts: 0,
                monitor: None,
            },
        );
    }

    /// Starts the health loop of a container whose spec has a health check.
    fn watch_health(&self, id: &str) {
        let runtime = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let Ok(Some(details)) = runtime.details(&id).await else {
                return;
            };
            let Some(check) = details.spec().and_then(|s| s.health_check) else {
                return;
            };
            let handle = health::spawn(runtime.clone(), id.clone(), details.workload_name(), check);
            if let Some(owned) = runtime.owned().get_mut(&id) {
                if let Some(old) = owned.monitor.replace(handle) {
                    old.abort();
                }
                owned.health = Some(Health::Starting);
            } else {
                handle.abort();
            }
        });
    }

    fn stop_watching_health(&self, id: &str) {
        if let Some(monitor) = self.owned().get_mut(id).and_then(|o| o.monitor.take()) {
            monitor.abort();
        }
    }

    /// Publishes an event about an owned container.
    fn publish(&self, event: berth_proto::agent::v1::WorkloadEvent) {
        self.inner.events.publish_event(event);
    }
}

/// Percent-encoding for a query value (the engine's JSON filters).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tonic::async_trait]
impl WorkloadRuntime for ContainerRuntime {
    fn kind(&self) -> Runtime {
        self.engine().dialect.runtime()
    }

    fn validate(&self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        spec::validate(spec)
    }

    async fn create(&self, name: &str, spec: WorkloadSpec) -> Result<Workload, AgentError> {
        validate_name(name)?;
        let versions = self.engine().versions().await?;
        let mut config = spec::container_config(
            name,
            &spec,
            &self.inner.owner,
            self.engine().dialect,
            versions,
        )?;
        if let Some(shim) = &self.inner.exec_shim {
            let mounts = shim.mounts(name).map_err(|e| {
                AgentError::Internal(format!("exec shim directory for `{name}`: {e}"))
            })?;
            if let Some(host) = config.host_config.as_mut() {
                host.mounts.get_or_insert_with(Vec::new).extend(mounts);
            }
        }
        let docker = self.engine().client().await?;
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let created = match docker.create_container(Some(options), config).await {
            Ok(created) => created,
            Err(e) => {
                let text = e.to_string();
                // Docker answers 404 "No such image"; podman 404 or 500 "image not known".
                return Err(
                    if status_of(&e) == Some(404)
                        || text.contains("No such image")
                        || text.contains("image not known")
                    {
                        AgentError::ImageNotFound(spec.image)
                    } else if status_of(&e) == Some(409) {
                        AgentError::NameTaken(name.to_string())
                    } else if status_of(&e) == Some(400) {
                        AgentError::InvalidArgument {
                            field: "spec",
                            reason: text,
                        }
                    } else {
                        self.engine().error("create", e).await
                    },
                );
            }
        };
        self.track(&created.id, name, Some(&spec));
        self.current(&created.id).await
    }

    async fn start(&self, id: &str) -> Result<Workload, AgentError> {
        let (id, name) = self.resolve_or_404(id)?;
        let docker = self.engine().client().await?;
        match docker
            .start_container(
                &id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(304) => {} // already running
            Err(e) => return Err(self.engine().error("start", e).await),
        }
        if let Some(shim) = &self.inner.exec_shim {
            shim.launch(&docker, &id, &name).await;
        }
        self.watch_health(&id);
        self.current(&id).await
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<Workload, AgentError> {
        let (id, _) = self.resolve_or_404(id)?;
        // A stop is wanted: the health loop must not take it for a failure.
        self.stop_watching_health(&id);
        let docker = self.engine().client().await?;
        let seconds = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::new().t(seconds).build();
        match docker.stop_container(&id, Some(options)).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(304) => {} // already stopped
            Err(e) => return Err(self.engine().error("stop", e).await),
        }
        self.current(&id).await
    }

    async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let (id, name) = self.resolve_or_404(id)?;
        if !force && self.current(&id).await?.state == WorkloadState::Running as i32 {
            return Err(AgentError::WrongState {
                name,
                state: "running",
                reason: "stop it first or remove with force",
            });
        }
        self.stop_watching_health(&id);
        let docker = self.engine().client().await?;
        let options = RemoveContainerOptionsBuilder::new()
            .force(force)
            .v(true)
            .build();
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(self.engine().error("remove", e).await),
        }
        if let Some(shim) = &self.inner.exec_shim {
            shim.remove(&name);
        }
        self.owned().remove(&id);
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Option<Workload>, AgentError> {
        let Some((id, _)) = self.resolve(id) else {
            return Ok(None);
        };
        match self.current(&id).await {
            Ok(workload) => Ok(Some(workload)),
            Err(AgentError::WorkloadNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn image_id(&self, id: &str) -> Result<Option<String>, AgentError> {
        let Some((id, _)) = self.resolve(id) else {
            return Ok(None);
        };
        Ok(self
            .details(&id)
            .await?
            .map(|details| details.image)
            .filter(|image| !image.is_empty()))
    }

    async fn list(&self) -> Result<Vec<Workload>, AgentError> {
        let ids: Vec<String> = self.owned().keys().cloned().collect();
        let mut workloads = Vec::with_capacity(ids.len());
        for id in ids {
            match self.current(&id).await {
                Ok(workload) => workloads.push(workload),
                Err(AgentError::WorkloadNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(workloads)
    }

    async fn exec(
        &self,
        id: &str,
        exec: ExecCommand,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        let (id, name) = self.resolve_or_404(id)?;
        if let Some(shim) = &self.inner.exec_shim {
            if let Some(stream) = shim.connect(&name).await {
                return Ok(exec_shim::run(stream, exec, Some(permit)));
            }
            if shim.due_for_relaunch(&name) {
                let runtime = self.clone();
                let (id, name) = (id.clone(), name.clone());
                tokio::spawn(async move {
                    if let (Some(shim), Ok(docker)) =
                        (&runtime.inner.exec_shim, runtime.engine().client().await)
                    {
                        shim.launch(&docker, &id, &name).await;
                    }
                });
            }
        }
        exec::start(self.engine().clone(), &id, &name, exec, Some(permit)).await
    }

    async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<mpsc::Receiver<LogLine>, AgentError> {
        let (id, _) = self.resolve_or_404(id)?;
        logs::stream(self.engine(), &id, tail, follow).await
    }

    async fn stats(
        &self,
        id: &str,
        interval: Option<Duration>,
    ) -> Result<mpsc::Receiver<WorkloadStats>, AgentError> {
        let (id, _) = self.resolve_or_404(id)?;
        stats::stream(self.engine(), &id, interval).await
    }

    async fn import_image(
        &self,
        metadata: ImportImageMetadata,
        data: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> Result<Image, AgentError> {
        images::import(self.engine(), &self.inner.images, metadata, data).await
    }

    async fn list_images(&self) -> Result<Vec<Image>, AgentError> {
        images::list(self.engine(), &self.inner.images).await
    }

    async fn remove_image(&self, image: &str) -> Result<(), AgentError> {
        images::remove(self.engine(), &self.inner.images, image).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_are_percent_encoded() {
        assert_eq!(
            super::percent_encode(r#"{"label":["a=b"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
    }
}
