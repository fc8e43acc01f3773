//! berth agent: one per host, the only part of berth that touches the host's
//! processes, container engines and VMs (libvirt).

pub mod config;
pub mod error;
pub mod events;
pub mod host_info;
pub mod keyed_exec;
pub mod process_group;
pub mod runtime;
pub mod service;

use std::sync::Arc;

use berth_proto::agent::v1::container_agent_server::ContainerAgentServer;
use berth_proto::common::v1::Runtime;
use berth_server::auth::RequireBearer;
use berth_server::{ListenAddr, RunningService, ServiceHost};

pub use config::Config;
use runtime::container::{ContainerRuntime, Dialect, DockerDialect, Engine, PodmanDialect};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] berth_server::ServeError),
    #[error(
        "server.listen = \"{0}\" is TCP but agent.token is empty: the agent can start root workloads, so TCP needs a token (or listen on unix:///path)"
    )]
    TcpWithoutToken(String),
    #[error(
        "engines.{engine} = \"{path}\": no engine socket there (is it mounted?); use \"auto\" to run without it when absent, or \"off\""
    )]
    EngineSocketMissing { engine: &'static str, path: String },
}

/// Binds the agent's listeners and serves in the background.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
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
    let events = events::EventBus::default();
    let mut info = host_info::probe();
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
        )
    });
    match libvirt {
        Ok(libvirt) => runtimes.push(Arc::new(libvirt)),
        Err(why) => {
            info.unavailable_runtimes
                .insert(Runtime::Libvirt.as_str_name().to_string(), why);
        }
    }
    info.runtimes = runtimes.iter().map(|r| r.kind() as i32).collect();
    info.labels = config.agent.labels.clone().into_iter().collect();
    info.unavailable_runtimes.insert(
        Runtime::Slurm.as_str_name().to_string(),
        "not built into this agent yet".to_string(),
    );
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
    );
    host.add_service(ContainerAgentServer::with_interceptor(
        service,
        RequireBearer::new(&config.agent.token),
    ));
    Ok(host.spawn(None))
}
