//! berth agent: one per host, the only part of berth that touches the host's
//! processes (and, with later runtimes, its container engines and VMs).

pub mod config;
pub mod error;
pub mod events;
pub mod host_info;
pub mod process_group;
pub mod runtime;
pub mod service;

use std::sync::Arc;

use berth_proto::agent::v1::container_agent_server::ContainerAgentServer;
use berth_proto::common::v1::Runtime;
use berth_server::auth::RequireBearer;
use berth_server::{ListenAddr, RunningService, ServiceHost};

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] berth_server::ServeError),
    #[error(
        "server.listen = \"{0}\" is TCP but agent.token is empty: the agent can start root workloads, so TCP needs a token (or listen on unix:///path)"
    )]
    TcpWithoutToken(String),
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
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    let events = events::EventBus::default();
    let process: Arc<dyn runtime::WorkloadRuntime> = Arc::new(
        runtime::process::ProcessRuntime::new(events.clone(), config.agent.log_lines_per_workload),
    );
    let mut info = host_info::probe();
    info.runtimes = vec![Runtime::Process as i32];
    info.labels = config.agent.labels.clone().into_iter().collect();
    for runtime in [
        Runtime::Docker,
        Runtime::Podman,
        Runtime::Libvirt,
        Runtime::Slurm,
    ] {
        info.unavailable_runtimes.insert(
            runtime.as_str_name().to_string(),
            "not built into this agent yet".to_string(),
        );
    }
    let service = service::AgentService::new(
        vec![process],
        events,
        config.agent.max_concurrent_execs,
        info,
    );
    host.add_service(ContainerAgentServer::with_interceptor(
        service,
        RequireBearer::new(&config.agent.token),
    ));
    Ok(host.spawn(None))
}
