//! berth agent: one per host, the only part of berth that touches the host's
//! processes, container engines, VMs (libvirt) and SLURM jobs (slurmrestd).

pub mod config;
pub mod error;
pub mod events;
pub mod host_info;
pub mod keyed_exec;
pub mod metrics;
pub mod process_group;
pub mod provenance;
pub mod runtime;
pub mod service;
pub mod spec_limits;

use std::sync::Arc;

use berth_proto::agent::v1::container_agent_server::ContainerAgentServer;
use berth_proto::common::v1::Runtime;
use berth_server::auth::RequireBearer;
use berth_server::{ListenAddr, RunningService, ServiceHost};
use tonic::service::interceptor::InterceptedService;

pub use config::Config;
use runtime::container::{ContainerRuntime, Dialect, DockerDialect, Engine, PodmanDialect};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] berth_server::ServeError),
    #[error(transparent)]
    Listen(#[from] berth_server::ListenError),
    #[error(
        "server.listen = \"{0}\" is TCP but agent.token is empty: the agent can start root workloads, so TCP needs a token (or listen on unix:///path)"
    )]
    TcpWithoutToken(String),
    #[error(
        "engines.{engine} = \"{path}\": no engine socket there (is it mounted?); use \"auto\" to run without it when absent, or \"off\""
    )]
    EngineSocketMissing { engine: &'static str, path: String },
    #[error(transparent)]
    Config(#[from] config::InvalidField),
}

/// Binds the agent's listeners and serves in the background.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    config.agent.validate()?;
    if config.agent.token.is_empty()
        && matches!(
            ListenAddr::parse("server.listen", &config.server.listen)?,
            ListenAddr::Tcp(_)
        )
    {
        return Err(StartError::TcpWithoutToken(config.server.listen));
    }
    // A socket named explicitly must be there: an agent started without the
    // engine it was told to drive would otherwise look healthy and do nothing.
    for (engine, configured) in [
        ("docker", &config.engines.docker),
        ("podman", &config.engines.podman),
    ] {
        let path = configured.strip_prefix("unix://").unwrap_or(configured);
        if !matches!(configured.as_str(), "auto" | "off") && !std::path::Path::new(path).exists() {
            return Err(StartError::EngineSocketMissing {
                engine,
                path: path.to_string(),
            });
        }
    }
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    metrics::register(host.registry_mut());
    // NVML can take hundreds of milliseconds to load and probe: on a
    // blocking thread, while the runtimes start, and once, before serving.
    let gpus = tokio::task::spawn_blocking({
        let agent = config.agent.clone();
        move || host_info::gpus(&agent)
    });
    let events = events::EventBus::default();
    let mut info = host_info::probe_without_gpus();
    let mut runtimes: Vec<Arc<dyn runtime::WorkloadRuntime>> = vec![Arc::new(
        runtime::process::ProcessRuntime::new(events.clone(), config.agent.log_lines_per_workload),
    )];
    let engines: [(&'static dyn Dialect, &str); 2] = [
        (&DockerDialect, &config.engines.docker),
        (&PodmanDialect, &config.engines.podman),
    ];
    for (dialect, configured) in engines {
        match Engine::locate(dialect, configured) {
            Ok(socket) => {
                let engine = ContainerRuntime::start(
                    dialect,
                    socket,
                    &config.engines,
                    events.clone(),
                    info.hostname.clone(),
                )
                .await;
                runtimes.push(Arc::new(engine));
            }
            Err(why) => {
                info.unavailable_runtimes
                    .insert(dialect.runtime().as_str_name().to_string(), why);
            }
        }
    }
    let libvirt = runtime::libvirt::locate(&config.libvirt.uri).and_then(|uri| {
        runtime::libvirt::LibvirtRuntime::new(
            uri,
            &config.libvirt,
            config.engines.owner.clone(),
            events.clone(),
            config.agent.log_lines_per_workload,
        )
    });
    match libvirt {
        Ok(libvirt) => runtimes.push(Arc::new(libvirt)),
        Err(why) => {
            info.unavailable_runtimes
                .insert(Runtime::Libvirt.as_str_name().to_string(), why);
        }
    }
    match runtime::slurm::locate(&config.slurm, &config.engines.owner, events.clone()) {
        Ok(slurm) => runtimes.push(Arc::new(slurm)),
        Err(why) => {
            info.unavailable_runtimes
                .insert(Runtime::Slurm.as_str_name().to_string(), why);
        }
    }
    info.runtimes = runtimes.iter().map(|r| r.kind() as i32).collect();
    info.gpus = gpus.await.unwrap_or_else(|error| {
        tracing::warn!("no GPUs reported: GPU discovery failed: {error}");
        Vec::new()
    });
    info.labels = config.agent.labels.clone().into_iter().collect();
    let service = service::AgentService::new(
        runtimes,
        events,
        config.agent.max_concurrent_execs,
        keyed_exec::KeyedExecs::new(keyed_exec::KeyedExecLimits {
            max_entries: config.agent.max_keyed_execs,
            tail_bytes: config.agent.keyed_exec_tail_bytes,
            retention: config.agent.keyed_exec_retention,
        }),
        config.engines.max_image_bytes,
        info,
        provenance::ProvenanceProbe::new(&config.agent),
    );
    host.add_service(InterceptedService::new(
        ContainerAgentServer::new(service)
            .max_decoding_message_size(config.server.max_message_bytes),
        RequireBearer::new(&config.agent.token),
    ));
    Ok(host.spawn(None))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
    use berth_proto::agent::v1::{HostInfo, InfoRequest};

    use super::*;
    use crate::config::tests::gpu;

    fn config(dir: &tempfile::TempDir) -> Config {
        let mut config = Config::default();
        config.server.listen = format!("unix://{}", dir.path().join("agent.sock").display());
        config.server.http_listen = String::new();
        config.engines.docker = "off".into();
        config.engines.podman = "off".into();
        config.engines.state_dir = dir.path().join("state");
        config.libvirt.uri = "off".into();
        config
    }

    /// What Info answers an agent started with `config`.
    async fn info_of(config: Config) -> HostInfo {
        let listen = config.server.listen.clone();
        let _agent = start(config).await.unwrap();
        let channel = berth_server::client::connect(&listen, "", Duration::from_secs(5))
            .await
            .unwrap();
        ContainerAgentClient::new(channel)
            .info(InfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    #[tokio::test]
    async fn info_reports_the_declared_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir);
        config.agent.nvml_library = "/nonexistent/libnvidia-ml.so.1".into();
        config.agent.declared_gpus = vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")];
        let info = info_of(config).await;
        let gpus: Vec<(u32, &str, &str, u64)> = info
            .gpus
            .iter()
            .map(|g| (g.index, g.uuid.as_str(), g.name.as_str(), g.memory_bytes))
            .collect();
        assert_eq!(
            gpus,
            vec![
                (0, "GPU-a", "Test GPU", 80 << 30),
                (1, "GPU-b", "Test GPU", 80 << 30)
            ]
        );
    }

    #[tokio::test]
    async fn an_nvml_library_that_is_not_there_does_not_stop_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir);
        config.agent.nvml_library = "/nonexistent/libnvidia-ml.so.1".into();
        let info = info_of(config).await;
        assert!(info.gpus.is_empty(), "{:?}", info.gpus);
    }

    #[tokio::test]
    async fn a_gpu_declared_twice_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir);
        config.agent.declared_gpus = vec![gpu(0, "GPU-a"), gpu(1, "GPU-a")];
        let error = start(config).await.unwrap_err().to_string();
        assert!(
            error.contains("agent.declared_gpus[1].uuid") && error.contains("GPU-a"),
            "{error}"
        );
        assert!(!dir.path().join("agent.sock").exists());
    }
}
