//! `berth quickstart`: an orchestrator and a local agent in this process,
//! the quickstart campaign run through them, its results printed.

use std::path::PathBuf;
use std::time::Duration;

use berth_proto::orchestrator::v1::{
    GetResultsRequest, RegisterHostRequest, SubmitCampaignRequest,
};

use crate::campaigns::watch_until_done;
use crate::{CliError, connect, output};

/// The built-in campaign (the same file as examples/campaigns/quickstart.yaml).
pub const QUICKSTART_MANIFEST: &str = include_str!("../../../examples/campaigns/quickstart.yaml");
const QUICKSTART_SOURCE: &str = "examples/campaigns/quickstart.yaml";

#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the agent: {0}")]
    Agent(#[from] berth_container_agent::StartError),
    #[error("starting the orchestrator: {0}")]
    Orchestrator(#[from] berth_orchestrator::StartError),
}

pub async fn run(data_dir: Option<PathBuf>, manifest: Option<PathBuf>) -> Result<(), CliError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let dir = data_dir.unwrap_or_else(|| berth_server::config::data_dir().join("quickstart"));
    std::fs::create_dir_all(&dir).map_err(|source| QuickstartError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let (text, source) = match manifest {
        Some(path) => (
            std::fs::read_to_string(&path).map_err(|source| CliError::File {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (
            QUICKSTART_MANIFEST.to_string(),
            QUICKSTART_SOURCE.to_string(),
        ),
    };

    let socket = dir.join("agent.sock");
    let mut agent_config = berth_container_agent::Config::default();
    agent_config.server.listen = format!("unix://{}", socket.display());
    agent_config.server.http_listen = String::new();
    let agent = berth_container_agent::start(agent_config)
        .await
        .map_err(QuickstartError::from)?;

    let mut orchestrator_config = berth_orchestrator::Config::default();
    orchestrator_config.server.listen = "127.0.0.1:0".into();
    orchestrator_config.server.http_listen = String::new();
    orchestrator_config.store.path = dir.join("state.db");
    orchestrator_config.scheduler.heartbeat_interval = Duration::from_secs(1);
    let orchestrator = berth_orchestrator::start(orchestrator_config)
        .await
        .map_err(QuickstartError::from)?;
    println!(
        "berth quickstart: orchestrator on {}, agent on {}, state in {}",
        orchestrator.grpc_addr,
        agent.grpc_addr,
        dir.display()
    );

    let outcome = drive(
        &orchestrator.grpc_uri(),
        &format!("unix://{}", socket.display()),
        text,
        source,
    )
    .await;
    let _ = orchestrator.stop().await;
    let _ = agent.stop().await;
    outcome
}

async fn drive(
    orchestrator: &str,
    agent: &str,
    manifest_yaml: String,
    source_name: String,
) -> Result<(), CliError> {
    let mut client = connect(orchestrator, "BERTH_TOKEN").await?;
    client
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address: agent.to_string(),
            token: String::new(),
            labels: Default::default(),
            power_sampler: String::new(),
        })
        .await?;
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml,
            source_name,
            validate_only: false,
        })
        .await?
        .into_inner();
    let total = campaign.runs.map(|r| r.total).unwrap_or_default();
    println!("campaign {} ({}): {total} runs", campaign.id, campaign.name);
    let watched = watch_until_done(&mut client, &campaign.id).await;
    let results = client
        .get_results(GetResultsRequest {
            id: campaign.id.clone(),
        })
        .await?
        .into_inner();
    println!();
    print!("{}", output::results_table(&results));
    watched
}
