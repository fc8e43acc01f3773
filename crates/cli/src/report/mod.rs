//! `berth report <campaign>`: one self-contained HTML file (inline SVG, one
//! inline stylesheet, no script, nothing fetched) that reads the same
//! offline and printed. Everything comes over the orchestrator's gRPC API
//! (GetCampaign, ListRuns, ListHosts, GetRunPowerSeries): the report sees a
//! campaign as any client does.
//!
//! Each section is its own module and returns its HTML; a section with
//! nothing to show says so in place of its plot ("no data: why").

mod comparison;
mod distributions;
pub mod html;
pub mod metrics;
mod pareto;
mod power;
mod quality;
pub mod stats;
mod summary;
pub mod svg;
mod timeline;

use berth_proto::orchestrator::v1::{Campaign, Host, ListHostsRequest, Run, RunPowerSample};

use crate::compare::{Comparison, compare, groups};
use crate::{CliError, Client};

/// Runs whose power series are plotted: one per (configuration, backend),
/// at most this many (each is fetched and drawn; the quality table covers
/// every run from what ListRuns says of it).
pub const MAX_SERIES: usize = 6;

/// What a report is made of, as fetched.
#[derive(Debug, Default)]
pub struct ReportData {
    pub campaign: Campaign,
    /// The hosts its runs ran on, as the orchestrator knows them now.
    pub hosts: Vec<Host>,
    pub runs: Vec<Run>,
    /// Stored power samples of the runs [`series_runs`] chose, by run id.
    pub series: Vec<(String, Vec<RunPowerSample>)>,
    /// When the data was read (RFC 3339).
    pub generated_at: String,
    /// `--against A`: A's id and this campaign compared with it.
    pub against: Option<(String, Comparison)>,
}

/// The runs whose power series the report shows: per (configuration,
/// backend), the first measured run that stored samples.
pub fn series_runs(runs: &[Run]) -> Vec<&Run> {
    let mut chosen: Vec<&Run> = Vec::new();
    for run in runs
        .iter()
        .filter(|r| metrics::is_measured(r) && r.power_samples > 0)
    {
        if chosen.len() == MAX_SERIES {
            break;
        }
        if !chosen
            .iter()
            .any(|c| c.config == run.config && c.backend == run.backend)
        {
            chosen.push(run);
        }
    }
    chosen
}

/// Reads the campaign, its runs, its hosts and the chosen power series;
/// with `against`, that campaign's runs too, to compare with.
pub async fn fetch(
    client: &mut Client,
    id: &str,
    against: Option<&str>,
) -> Result<ReportData, CliError> {
    let campaign = crate::get_campaign(client, id).await?;
    let runs = crate::export::fetch_runs(client, id).await?;
    let hosts = client
        .list_hosts(ListHostsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .hosts
        .into_iter()
        .filter(|h| runs.iter().any(|r| r.host == h.name))
        .collect();
    let mut series = Vec::new();
    for run in series_runs(&runs) {
        let samples = crate::series::fetch_series(client, &run.id, "").await?;
        series.push((run.id.clone(), samples));
    }
    let against = match against {
        Some(a) => {
            let mine = metrics::Groups::of(&runs, &campaign.work_metric);
            Some((a.to_string(), compare(&groups(client, a).await?, &mine)))
        }
        None => None,
    };
    Ok(ReportData {
        campaign,
        hosts,
        runs,
        series,
        against,
        generated_at: prost_types::Timestamp::from(std::time::SystemTime::now()).to_string(),
    })
}

/// The report as one HTML document.
pub fn render(data: &ReportData) -> String {
    let groups = metrics::Groups::of(&data.runs, &data.campaign.work_metric);
    let body = [
        summary::render(data),
        data.against
            .as_ref()
            .map(|(a, comparison)| comparison::render(a, comparison))
            .unwrap_or_default(),
        distributions::render(&groups),
        timeline::render(data),
        power::render(data),
        pareto::render(&groups, &data.campaign.work_metric),
        quality::render(data),
        summary::manifest(data),
    ]
    .concat();
    let title = format!(
        "berth report: {} ({})",
        data.campaign.name, data.campaign.id
    );
    html::page(&title, &body)
}

/// Seconds since the Unix epoch.
pub fn epoch(time: &prost_types::Timestamp) -> f64 {
    time.seconds as f64 + f64::from(time.nanos) / 1e9
}

/// A metric's axis title with its unit, read from the name's suffix.
pub fn axis_title(metric: &str) -> String {
    const UNITS: [(&str, &str); 7] = [
        ("_per_s", "per second"),
        ("_ms", "ms"),
        ("_us", "µs"),
        ("_s", "s"),
        ("_j", "J"),
        ("_w", "W"),
        ("_bytes", "bytes"),
    ];
    let unit = if metric.starts_with("joules_per_") {
        Some("J")
    } else {
        UNITS
            .iter()
            .find(|(suffix, _)| metric.ends_with(suffix))
            .map(|(_, unit)| *unit)
    };
    match unit {
        Some(unit) => format!("{metric} ({unit})"),
        None => metric.to_string(),
    }
}
