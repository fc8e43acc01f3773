//! The campaign at a glance: its state and outcome, when it ran, its hosts
//! (with their GPUs) and backends, the runs that failed or were retried and
//! why; and, at the end of the page, the manifest as submitted.

use std::collections::BTreeMap;

use berth_proto::orchestrator::v1::{CampaignState, RunState};

use super::html::{escape, section, table};
use super::{ReportData, epoch};
use crate::{campaign_outcome, campaign_state, number};

/// Rows of the failed-or-retried table past which the rest are counted, not listed.
const MAX_TROUBLE_ROWS: usize = 200;
/// A run's error is cut to this many characters in the table.
const MAX_ERROR_CHARS: usize = 300;

/// The page's heading, the banner of a campaign not ended, and the summary section.
pub fn render(data: &ReportData) -> String {
    let campaign = &data.campaign;
    let mut heading = format!(
        "<h1>{} <small>({})</small></h1>",
        escape(&campaign.name),
        escape(&campaign.id)
    );
    let counts = campaign.runs.unwrap_or_default();
    let state = CampaignState::try_from(campaign.state).unwrap_or_default();
    if matches!(state, CampaignState::Pending | CampaignState::Running) {
        let ended = counts.succeeded + counts.failed + counts.cancelled;
        heading.push_str(&format!(
            r#"<p class="banner">This campaign is still {}: the report shows what exists at {} ({ended} of {} runs ended).</p>"#,
            campaign_state(campaign.state),
            escape(&data.generated_at),
            counts.total
        ));
    }
    for omitted in &data.omitted {
        heading.push_str(&format!(r#"<p class="banner">{}</p>"#, escape(omitted)));
    }
    let time =
        |t: Option<&prost_types::Timestamp>| t.map(|t| t.to_string()).unwrap_or_else(|| "—".into());
    let duration = match (&campaign.created_at, &campaign.finished_at) {
        (Some(start), Some(end)) => format!("{} s", number(epoch(end) - epoch(start))),
        _ => "not ended".into(),
    };
    let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
    for run in &data.runs {
        *backends.entry(&run.backend).or_default() += 1;
    }
    let backends = backends
        .iter()
        .map(|(name, runs)| format!("{name} ({runs} runs)"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        ("state", campaign_state(campaign.state).to_string()),
        (
            "outcome",
            campaign_outcome(campaign.outcome)
                .unwrap_or("not judged")
                .to_string(),
        ),
        (
            "status",
            if campaign.status_message.is_empty() {
                "—".into()
            } else {
                campaign.status_message.clone()
            },
        ),
        ("submitted", time(campaign.created_at.as_ref())),
        ("finished", time(campaign.finished_at.as_ref())),
        ("duration", duration),
        (
            "runs",
            format!(
                "{} total: {} succeeded, {} failed, {} cancelled, {} pending or running",
                counts.total,
                counts.succeeded,
                counts.failed,
                counts.cancelled,
                counts.pending + counts.dispatched + counts.running
            ),
        ),
        ("work metric", campaign.work_metric.clone()),
        ("backends", backends),
        ("report generated", data.generated_at.clone()),
    ];
    let mut html = table(
        &[],
        rows.into_iter().map(|(k, v)| (vec![k.to_string(), v], "")),
    );
    html.push_str(&hosts(data));
    html.push_str(&trouble(data));
    heading
        + &section(
            "summary",
            "Summary",
            "The campaign as the orchestrator recorded it.",
            &html,
        )
}

/// The manifest as submitted, last: long, and read only when wanted.
pub fn manifest(data: &ReportData) -> String {
    section(
        "manifest",
        "Manifest",
        "As submitted.",
        &format!("<pre>{}</pre>", escape(&data.campaign.manifest_yaml)),
    )
}

fn hosts(data: &ReportData) -> String {
    if data.hosts.is_empty() {
        return "<p>No run was placed on a host that is still registered.</p>".into();
    }
    let rows = data.hosts.iter().map(|host| {
        let gpus = host
            .gpus
            .iter()
            .map(|g| format!("{} ({} GiB)", g.name, g.memory_bytes >> 30))
            .collect::<Vec<_>>()
            .join(", ");
        let runs = data.runs.iter().filter(|r| r.host == host.name).count();
        (
            vec![
                host.name.clone(),
                host.cpus.to_string(),
                format!("{} GiB", host.memory_bytes >> 30),
                if gpus.is_empty() { "none".into() } else { gpus },
                if host.power_sampler.is_empty() {
                    "no".into()
                } else {
                    "yes".into()
                },
                runs.to_string(),
            ],
            "",
        )
    });
    format!(
        "<h3>Hosts</h3>{}",
        table(
            &["host", "CPUs", "memory", "GPUs", "power sampler", "runs"],
            rows
        )
    )
}

/// Runs that failed, were cancelled or needed more than one attempt.
fn trouble(data: &ReportData) -> String {
    let troubled: Vec<_> = data
        .runs
        .iter()
        .filter(|r| {
            r.attempts > 1
                || matches!(
                    RunState::try_from(r.state),
                    Ok(RunState::Failed | RunState::Cancelled)
                )
        })
        .collect();
    if troubled.is_empty() {
        return "<h3>Failed and retried runs</h3><p>None: every run that ended succeeded at its first attempt.</p>".into();
    }
    let rows = troubled.iter().take(MAX_TROUBLE_ROWS).map(|run| {
        let state = RunState::try_from(run.state).unwrap_or_default();
        let error: String = if run.error.is_empty() && state == RunState::Succeeded {
            // The run keeps its last attempt's outcome only.
            format!(
                "succeeded at attempt {}; the earlier attempts' errors are not kept",
                run.attempts
            )
        } else {
            run.error.chars().take(MAX_ERROR_CHARS).collect()
        };
        (
            vec![
                run.id.clone(),
                state
                    .as_str_name()
                    .trim_start_matches("RUN_STATE_")
                    .to_ascii_lowercase(),
                run.attempts.to_string(),
                run.host.clone(),
                run.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                error,
            ],
            if state == RunState::Succeeded {
                ""
            } else {
                "flag"
            },
        )
    });
    let mut html = format!(
        "<h3>Failed and retried runs</h3>{}",
        table(
            &["run", "state", "attempts", "host", "exit code", "reason"],
            rows
        )
    );
    if troubled.len() > MAX_TROUBLE_ROWS {
        html.push_str(&format!(
            "<p>… and {} more (berth results {} --runs lists them all).</p>",
            troubled.len() - MAX_TROUBLE_ROWS,
            escape(&data.campaign.id)
        ));
    }
    html
}
