//! `berth`, the command line for people: run the quickstart, submit and
//! watch campaigns, print their results, manage hosts.

pub mod output;
pub mod quickstart;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::{AuthChannel, error_chain};
use clap::{Parser, Subcommand, ValueEnum};

pub type Client = OrchestratorClient<AuthChannel>;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Run LLM and AI workloads across GPU hosts, measured"
)]
pub struct Cli {
    /// Orchestrator address (http://host:port or unix:///path).
    #[arg(
        long,
        global = true,
        env = "BERTH_ORCHESTRATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub orchestrator: String,
    /// Name of the environment variable holding the orchestrator's token.
    #[arg(long, global = true, default_value = "BERTH_TOKEN")]
    pub token_env: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Starts an orchestrator and a local agent, runs the quickstart campaign, prints its results.
    Quickstart {
        /// Where the quickstart keeps its state (default: <data dir>/quickstart).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Another campaign manifest to run instead of the built-in quickstart.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Submits a campaign manifest (YAML).
    Submit {
        file: PathBuf,
        /// Only validate the manifest.
        #[arg(long)]
        validate: bool,
        /// Watch the campaign until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Shows a campaign's progress as runs finish, until it ends.
    Watch { id: String },
    /// Prints a campaign's results per configuration.
    Results {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Lists campaigns, newest first.
    Campaigns,
    /// Cancels a campaign.
    Cancel { id: String },
    /// Resumes a failed or cancelled campaign.
    Resume { id: String },
    /// Lists registered hosts, or registers and removes them.
    Hosts {
        #[command(subcommand)]
        action: Option<HostsAction>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsAction {
    /// Registers a host by its agent's address.
    Add {
        name: String,
        /// unix:///path/agent.sock or http://host:port
        address: String,
        /// Placement labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The host's power sampler, http://host:port (for campaigns that measure power).
        #[arg(long)]
        power_sampler: Option<String>,
        /// Name of the environment variable holding the agent's token.
        #[arg(long)]
        agent_token_env: Option<String>,
    },
    /// Forgets a host.
    Remove { name: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connect(#[from] berth_server::client::ConnectError),
    #[error("{}", describe(.0))]
    Rpc(#[from] tonic::Status),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("campaign {id} ended {state}: {message}")]
    CampaignFailed {
        id: String,
        state: String,
        message: String,
    },
    #[error(transparent)]
    Quickstart(#[from] quickstart::QuickstartError),
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("berth: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth: error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

pub async fn connect(address: &str, token_env: &str) -> Result<Client, CliError> {
    let token = std::env::var(token_env).unwrap_or_default();
    let channel = berth_server::client::connect(address, &token, Duration::from_secs(5)).await?;
    Ok(OrchestratorClient::new(channel))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Quickstart { data_dir, manifest } = cli.command {
        return quickstart::run(data_dir, manifest).await;
    }
    let mut client = connect(&cli.orchestrator, &cli.token_env).await?;
    match cli.command {
        Command::Quickstart { .. } => Ok(()),
        Command::Submit {
            file,
            validate,
            watch,
        } => {
            let text = std::fs::read_to_string(&file).map_err(|source| CliError::File {
                path: file.clone(),
                source,
            })?;
            let request = SubmitCampaignRequest {
                manifest_yaml: text,
                source_name: file.display().to_string(),
                validate_only: validate,
            };
            let campaign = client.submit_campaign(request).await?.into_inner();
            let runs = campaign.runs.map(|r| r.total).unwrap_or_default();
            if validate {
                println!("{}: valid, {runs} runs", file.display());
                return Ok(());
            }
            println!("{}", campaign.id);
            if watch {
                watch_until_done(&mut client, &campaign.id).await?;
            }
            Ok(())
        }
        Command::Watch { id } => watch_until_done(&mut client, &id).await,
        Command::Results { id, format } => {
            let results = client
                .get_results(GetResultsRequest { id })
                .await?
                .into_inner();
            print!("{}", output::results(&results, format));
            Ok(())
        }
        Command::Campaigns => {
            let campaigns = client
                .list_campaigns(ListCampaignsRequest::default())
                .await?
                .into_inner();
            print!("{}", output::campaigns(&campaigns.campaigns));
            Ok(())
        }
        Command::Cancel { id } => {
            let campaign = client
                .cancel_campaign(CancelCampaignRequest { id })
                .await?
                .into_inner();
            println!("{} {}", campaign.id, output::campaign_state(campaign.state));
            Ok(())
        }
        Command::Resume { id } => {
            let campaign = client
                .resume_campaign(ResumeCampaignRequest { id })
                .await?
                .into_inner();
            println!("{} {}", campaign.id, output::campaign_state(campaign.state));
            Ok(())
        }
        Command::Hosts { action: None } => {
            let hosts = client
                .list_hosts(ListHostsRequest::default())
                .await?
                .into_inner();
            print!("{}", output::hosts(&hosts.hosts));
            Ok(())
        }
        Command::Hosts {
            action:
                Some(HostsAction::Add {
                    name,
                    address,
                    labels,
                    power_sampler,
                    agent_token_env,
                }),
        } => {
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| CliError::Usage(format!("--label {l}: expected KEY=VALUE")))
                })
                .collect::<Result<_, _>>()?;
            let token = agent_token_env
                .map(|var| std::env::var(var).unwrap_or_default())
                .unwrap_or_default();
            let host = client
                .register_host(RegisterHostRequest {
                    name,
                    address,
                    token,
                    labels,
                    power_sampler: power_sampler.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print!("{}", output::hosts(&[host]));
            Ok(())
        }
        Command::Hosts {
            action: Some(HostsAction::Remove { name }),
        } => {
            client
                .deregister_host(DeregisterHostRequest { name })
                .await?;
            Ok(())
        }
    }
}

/// Prints a line per finished run until the campaign ends; fails if it did
/// not succeed.
pub async fn watch_until_done(client: &mut Client, id: &str) -> Result<(), CliError> {
    let mut events = client
        .watch_campaign(WatchCampaignRequest { id: id.to_string() })
        .await?
        .into_inner();
    let mut last_status = String::new();
    let mut campaign = None;
    while let Some(event) = events.message().await? {
        if let Some(line) = output::progress_line(&event, &mut last_status) {
            println!("{line}");
        }
        campaign = event.campaign;
    }
    let campaign = campaign.ok_or_else(|| {
        CliError::Usage(format!("campaign {id}: the watch ended before any event"))
    })?;
    if campaign.state == CampaignState::Succeeded as i32
        && campaign.runs.is_some_and(|r| r.failed == 0)
    {
        Ok(())
    } else {
        Err(CliError::CampaignFailed {
            id: campaign.id,
            state: output::campaign_state(campaign.state).to_string(),
            message: campaign.status_message,
        })
    }
}
