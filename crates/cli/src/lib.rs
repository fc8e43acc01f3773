//! `berth`, the command line for people: run the quickstart, submit and
//! watch campaigns, print their results, manage hosts, keep deployments
//! running.

pub mod campaigns;
pub mod compare;
pub mod deployments;
pub mod export;
pub mod hosts;
pub mod output;
pub mod quickstart;
pub mod report;
pub mod series;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::{AuthChannel, error_chain};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::Instrument as _;

pub type Client = OrchestratorClient<AuthChannel>;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Run LLM and AI workloads across GPU hosts, measured"
)]
pub struct Cli {
    /// Orchestrator address (http://host:port or unix:///path), or several
    /// separated by commas (orchestrators sharing one PostgreSQL database):
    /// the first that answers and leads is used.
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
    /// Prints a campaign's results per configuration, or exports every run.
    Results {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Every run (params, cycle, warmup, state, timings, exit code,
        /// metrics, energy) instead of the aggregate; csv, json or parquet.
        #[arg(long)]
        runs: bool,
        /// Write to this file instead of stdout (needed for parquet).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Prints the power samples stored with a run (of a campaign that measures power).
    Series {
        run_id: String,
        /// Only this device, e.g. nvml:0.
        #[arg(long, default_value = "")]
        device: String,
        #[arg(long, value_enum, default_value_t = series::SeriesFormat::Csv)]
        format: series::SeriesFormat,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Writes a campaign's report: one self-contained HTML file with plots
    /// (summary, metrics per configuration, run timeline, power over runs,
    /// throughput against energy, measurement quality).
    Report {
        id: String,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Add a section comparing this campaign (B) with campaign A, as `berth compare A B`.
        #[arg(long, value_name = "A")]
        against: Option<String>,
    },
    /// Compares campaign B with campaign A: per configuration and metric the
    /// ratio B/A with its 95% CI and Welch's t-test, largest change first.
    Compare {
        a: String,
        b: String,
        /// Fail (exit 1) when METRIC rises (+N%) or falls (-N%) significantly
        /// past N% in any configuration, e.g. energy_j:+5%, tokens_per_s:-5%.
        #[arg(long = "fail-on", value_name = "METRIC:±N%")]
        fail_on: Vec<compare::FailOn>,
    },
    /// Lists campaigns, newest first.
    Campaigns,
    /// Cancels a campaign.
    Cancel { id: String },
    /// Resumes a failed or cancelled campaign.
    Resume { id: String },
    /// Deploys a recipe (YAML) and keeps its replicas running.
    Deploy {
        file: PathBuf,
        /// Follow it until every replica runs (non-zero exit if it fails).
        #[arg(long)]
        watch: bool,
        /// Replace the live deployment of the same name, one replica at a
        /// time (each old one removed once its successor is healthy).
        #[arg(long)]
        update: bool,
    },
    /// Lists deployments, newest first.
    Deployments,
    /// Shows a deployment: its replicas, states, endpoints, restarts and reasons.
    Deployment { name: String },
    /// Changes a deployment's number of replicas.
    Scale { name: String, replicas: u32 },
    /// Stops a deployment and removes its replicas from their hosts.
    Stop { name: String },
    /// Prints a deployment's logs, each line with its replica and host.
    Logs {
        name: String,
        /// Only this replica's.
        #[arg(long)]
        replica: Option<u32>,
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
        /// The last N lines of each replica (0: all the agent keeps).
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
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
    /// Per-run export only (`--runs --output FILE`).
    Parquet,
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
    /// The watched campaign ended, but not with every run succeeded.
    #[error("campaign {id} ended {state}{}: {message}", outcome.map(|o| format!(" ({o})")).unwrap_or_default())]
    CampaignFailed {
        id: String,
        state: String,
        /// What its measured runs produced, when it was judged.
        outcome: Option<&'static str>,
        message: String,
    },
    /// The watched deployment ended before every replica ran.
    #[error("deployment {name} ended {state}: {message}")]
    DeploymentEnded {
        name: String,
        state: String,
        message: String,
    },
    #[error(transparent)]
    Quickstart(#[from] quickstart::QuickstartError),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("no campaign {0} on this orchestrator (berth campaigns lists them)")]
    UnknownCampaign(String),
    /// `berth compare --fail-on` found significant regressions.
    #[error("regressed past --fail-on: {}", .0.join("; "))]
    Regressed(Vec<String>),
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

pub fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let subcommand = matches.subcommand_name().unwrap_or("berth").to_string();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("berth: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(traced(cli, &subcommand)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth: error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Connects to the orchestrator at `addresses`: one address, or several
/// separated by commas (orchestrators sharing one PostgreSQL database, of
/// which one leads). Of several, the first that answers and leads is used;
/// when none leads (a failover under way), the first that answers, which
/// serves reads and answers writes naming the leader.
pub async fn connect(addresses: &str, token_env: &str) -> Result<Client, CliError> {
    let token = std::env::var(token_env).unwrap_or_default();
    let addresses: Vec<&str> = addresses
        .split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .collect();
    let mut first_answering = None;
    let mut last_error = None;
    for address in &addresses {
        let channel =
            match berth_server::client::connect(address, &token, Duration::from_secs(5)).await {
                Ok(channel) => channel,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
        let mut client = OrchestratorClient::new(channel);
        if addresses.len() == 1 || leads(&mut client).await {
            return Ok(client);
        }
        first_answering.get_or_insert(client);
    }
    match (first_answering, last_error) {
        (Some(client), _) => Ok(client),
        (None, Some(error)) => Err(error.into()),
        (None, None) => Err(CliError::Usage(
            "--orchestrator (BERTH_ORCHESTRATOR): no address given".into(),
        )),
    }
}

/// Whether the orchestrator leads: asked with a write that changes
/// nothing, validating an empty manifest, which a follower refuses as not
/// the leader before looking at it and the leader refuses as invalid.
async fn leads(client: &mut Client) -> bool {
    let validation = SubmitCampaignRequest {
        validate_only: true,
        ..Default::default()
    };
    match client.submit_campaign(validation).await {
        Ok(_) => true,
        Err(status) => {
            !berth_server::error::has_reason(&status, berth_orchestrator::role::NOT_LEADER)
                && status.code() != tonic::Code::Unavailable
        }
    }
}

/// The command in a span `berth <subcommand>` exported over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OpenTelemetry's variable): the
/// orchestrator's calls are its children, and the runs of a campaign it
/// submits link to it. The quickstart runs its own services and logs.
async fn traced(cli: Cli, subcommand: &str) -> Result<(), CliError> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    if endpoint.is_empty() || matches!(cli.command, Command::Quickstart { .. }) {
        return run(cli).await;
    }
    let config = berth_server::config::ServerConfig {
        otlp_endpoint: endpoint,
        ..Default::default()
    };
    let _telemetry = berth_server::telemetry::init("berth-cli", &config)
        .map_err(|error| CliError::Usage(format!("OTEL_EXPORTER_OTLP_ENDPOINT: {error}")))?;
    let span = tracing::info_span!("berth", otel.name = %format!("berth {subcommand}"));
    run(cli).instrument(span).await
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
        } => campaigns::submit(&mut client, &file, validate, watch).await,
        Command::Watch { id } => campaigns::watch_until_done(&mut client, &id).await,
        Command::Results {
            id,
            format,
            runs,
            output,
        } => campaigns::results(&mut client, id, format, runs, output).await,
        Command::Series {
            run_id,
            device,
            format,
            output,
        } => series::print(&mut client, &run_id, &device, format, output).await,
        Command::Report {
            id,
            output,
            against,
        } => {
            let data = report::fetch(&mut client, &id, against.as_deref()).await?;
            write_output(output, berth_report::render(&data).as_bytes())
        }
        Command::Compare { a, b, fail_on } => compare::run(&mut client, &a, &b, &fail_on).await,
        Command::Campaigns => campaigns::list(&mut client).await,
        Command::Cancel { id } => campaigns::cancel(&mut client, id).await,
        Command::Resume { id } => campaigns::resume(&mut client, id).await,
        Command::Deploy {
            file,
            watch,
            update,
        } => deployments::deploy(&mut client, &file, watch, update).await,
        Command::Deployments => deployments::list(&mut client).await,
        Command::Deployment { name } => deployments::show(&mut client, name).await,
        Command::Scale { name, replicas } => deployments::scale(&mut client, name, replicas).await,
        Command::Stop { name } => deployments::stop(&mut client, name).await,
        Command::Logs {
            name,
            replica,
            follow,
            tail,
        } => deployments::logs(&mut client, name, replica, follow, tail).await,
        Command::Hosts { action: None } => hosts::list(&mut client).await,
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
            hosts::add(
                &mut client,
                name,
                address,
                &labels,
                power_sampler,
                agent_token_env,
            )
            .await
        }
        Command::Hosts {
            action: Some(HostsAction::Remove { name }),
        } => hosts::remove(&mut client, name).await,
    }
}

/// The campaign `id`; an unknown id is said plainly, not as a gRPC status.
pub async fn get_campaign(client: &mut Client, id: &str) -> Result<Campaign, CliError> {
    match client
        .get_campaign(GetCampaignRequest { id: id.to_string() })
        .await
    {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == tonic::Code::NotFound => {
            Err(CliError::UnknownCampaign(id.to_string()))
        }
        Err(status) => Err(status.into()),
    }
}

/// Writes an export to the file, or to stdout when there is none.
fn write_output(output: Option<PathBuf>, bytes: &[u8]) -> Result<(), CliError> {
    match output {
        Some(path) => {
            std::fs::write(&path, bytes).map_err(|source| CliError::File { path, source })
        }
        None => std::io::stdout()
            .write_all(bytes)
            .map_err(|source| CliError::File {
                path: "stdout".into(),
                source,
            }),
    }
}
