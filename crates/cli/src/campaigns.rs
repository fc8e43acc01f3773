//! The campaign commands: `berth submit`, `watch`, `results`, `campaigns`,
//! `cancel` and `resume`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use berth_proto::orchestrator::v1::*;

use crate::{CliError, Client, Format, export, output, write_output};

/// `berth submit`: sends the manifest; prints the campaign's id (or, with
/// `--validate`, how many runs it would have) and watches it if asked.
pub async fn submit(
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

/// `berth results`: the format from the flags, then the export, to the file
/// or stdout.
pub async fn results(
    client: &mut Client,
    id: String,
    format: Format,
    runs: bool,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    let format = results_output(format, runs, output.is_some())?;
    let bytes = encode_results(client, id, format).await?;
    write_output(output, &bytes)
}

/// Every run, or the aggregate per (config, backend), encoded.
async fn encode_results(
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

/// `berth campaigns`: every campaign, newest first.
pub async fn list(client: &mut Client) -> Result<(), CliError> {
    let campaigns = client
        .list_campaigns(ListCampaignsRequest::default())
        .await?
        .into_inner();
    print!("{}", output::campaigns(&campaigns.campaigns));
    Ok(())
}

/// The line `berth cancel` and `berth resume` answer with.
fn print_state(campaign: &Campaign) {
    println!("{} {}", campaign.id, output::campaign_state(campaign.state));
}

/// `berth cancel`: prints the campaign's id and its state after.
pub async fn cancel(client: &mut Client, id: String) -> Result<(), CliError> {
    let campaign = client.cancel_campaign(CancelCampaignRequest { id }).await?;
    print_state(&campaign.into_inner());
    Ok(())
}

/// `berth resume`: prints the campaign's id and its state after.
pub async fn resume(client: &mut Client, id: String) -> Result<(), CliError> {
    let campaign = client.resume_campaign(ResumeCampaignRequest { id }).await?;
    print_state(&campaign.into_inner());
    Ok(())
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
