//! `berth`, the command line for people: run the quickstart, submit and
//! watch campaigns, print their results, manage hosts, keep deployments
//! running.

pub mod compare;
pub mod deployments;
pub mod export;
pub mod output;
pub mod quickstart;
pub mod report;
pub mod series;

use std::io::{IsTerminal, Write};
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
        } => submit(&mut client, &file, validate, watch).await,
        Command::Watch { id } => watch_until_done(&mut client, &id).await,
        Command::Results {
            id,
            format,
            runs,
            output,
        } => {
            let format = results_output(format, runs, output.is_some())?;
            let bytes = results(&mut client, id, format).await?;
            write_output(output, &bytes)
        }
        Command::Series {
            run_id,
            device,
            format,
            output,
        } => {
            let samples = series::fetch_series(&mut client, &run_id, &device).await?;
            write_output(output, &series::encode(&samples, format)?)
        }
        Command::Report {
            id,
            output,
            against,
        } => {
            let data = report::fetch(&mut client, &id, against.as_deref()).await?;
            write_output(output, report::render(&data).as_bytes())
        }
        Command::Compare { a, b, fail_on } => compare::run(&mut client, &a, &b, &fail_on).await,
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
            let request = RegisterHostRequest {
                name,
                address,
                token,
                labels,
                power_sampler: power_sampler.unwrap_or_default(),
            };
            let host = client.register_host(request).await?.into_inner();
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

/// `berth submit`: sends the manifest; prints the campaign's id (or, with
/// `--validate`, how many runs it would have) and watches it if asked.
async fn submit(
    client: &mut Client,
    file: &std::path::Path,
    validate: bool,
    watch: bool,
) -> Result<(), CliError> {
    let text = std::fs::read_to_string(file).map_err(|source| CliError::File {
        path: file.to_path_buf(),
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
        watch_until_done(client, &campaign.id).await?;
    }
    Ok(())
}

/// `berth results`: every run, or the aggregate per (config, backend), encoded.
async fn results(
    client: &mut Client,
    id: String,
    format: ResultsOutput,
) -> Result<Vec<u8>, CliError> {
    Ok(match format {
        ResultsOutput::Runs(format) => {
            let campaign = client
                .get_campaign(GetCampaignRequest { id: id.clone() })
                .await?
                .into_inner();
            let runs = export::fetch_runs(client, &id).await?;
            export::RunTable::new(&campaign, &runs).encode(format)?
        }
        ResultsOutput::Aggregate(format) => {
            let results = client
                .get_results(GetResultsRequest { id })
                .await?
                .into_inner();
            output::results(&results, format)?
        }
    })
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

/// What `berth results` writes, from its flags.
enum ResultsOutput {
    Aggregate(output::ResultsFormat),
    Runs(export::RunsFormat),
}

fn results_output(format: Format, runs: bool, to_file: bool) -> Result<ResultsOutput, CliError> {
    use export::RunsFormat;
    use output::ResultsFormat;
    match (format, runs) {
        (Format::Table, false) => Ok(ResultsOutput::Aggregate(ResultsFormat::Table)),
        (Format::Json, false) => Ok(ResultsOutput::Aggregate(ResultsFormat::Json)),
        (Format::Csv, false) => Ok(ResultsOutput::Aggregate(ResultsFormat::Csv)),
        (Format::Parquet, false) => Err(CliError::Usage(
            "--format parquet is a per-run export: add --runs --output FILE".into(),
        )),
        (Format::Table, true) => Err(CliError::Usage(
            "--runs exports every run: choose --format csv, json or parquet".into(),
        )),
        (Format::Json, true) => Ok(ResultsOutput::Runs(RunsFormat::Json)),
        (Format::Csv, true) => Ok(ResultsOutput::Runs(RunsFormat::Csv)),
        (Format::Parquet, true) if to_file => Ok(ResultsOutput::Runs(RunsFormat::Parquet)),
        (Format::Parquet, true) => Err(CliError::Usage(
            "--format parquet writes binary: give --output FILE".into(),
        )),
    }
}

/// Prints a line per finished run until the campaign ends, under a
/// progress bar with an ETA when stdout is a terminal; fails, saying why,
/// unless the campaign succeeded with every run: a green exit means every
/// run gave its result.
pub async fn watch_until_done(client: &mut Client, id: &str) -> Result<(), CliError> {
    let mut events = client
        .watch_campaign(WatchCampaignRequest { id: id.to_string() })
        .await?
        .into_inner();
    let terminal = std::io::stdout().is_terminal();
    let mut progress = output::Progress::default();
    let mut last_status = String::new();
    let mut campaign = None;
    while let Some(event) = events.message().await? {
        progress.observe(&event);
        let line = output::progress_line(&event, &mut last_status);
        if terminal {
            // Clear the bar, print the line above it, draw the bar again.
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "\r\x1b[2K");
            if let Some(line) = line {
                let _ = writeln!(stdout, "{line}");
            }
            let _ = write!(stdout, "{}", progress.bar());
            let _ = stdout.flush();
        } else if let Some(line) = line {
            println!("{line}");
        }
        campaign = event.campaign;
    }
    if terminal {
        println!();
    }
    let campaign = campaign.ok_or_else(|| {
        CliError::Usage(format!("campaign {id}: the watch ended before any event"))
    })?;
    ended_well(campaign)
}

/// Ok for a campaign that succeeded with no failed run; otherwise the error
/// that says how it ended and why.
fn ended_well(campaign: Campaign) -> Result<(), CliError> {
    if campaign.state == CampaignState::Succeeded as i32
        && campaign.runs.is_some_and(|r| r.failed == 0)
    {
        Ok(())
    } else {
        Err(CliError::CampaignFailed {
            id: campaign.id,
            state: output::campaign_state(campaign.state).to_string(),
            outcome: output::campaign_outcome(campaign.outcome),
            message: campaign.status_message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(state: CampaignState, outcome: CampaignOutcome, failed: u64) -> Campaign {
        Campaign {
            id: "c1".into(),
            state: state as i32,
            outcome: outcome as i32,
            status_message: "no measured run succeeded; 3 of 3 runs failed".into(),
            runs: Some(RunCounts {
                failed,
                total: 3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_campaign_whose_every_run_succeeded_ends_well() {
        assert!(
            ended_well(ended(
                CampaignState::Succeeded,
                CampaignOutcome::Complete,
                0
            ))
            .is_ok()
        );
        let error = ended_well(ended(CampaignState::Failed, CampaignOutcome::NoResults, 3))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "campaign c1 ended failed (no results): no measured run succeeded; 3 of 3 runs failed"
        );
        let partial = ended_well(ended(CampaignState::Succeeded, CampaignOutcome::Partial, 1));
        assert!(
            partial
                .unwrap_err()
                .to_string()
                .starts_with("campaign c1 ended succeeded (partial): "),
        );
    }
}
