//! A campaign's report: one self-contained HTML page (inline SVG, one
//! inline stylesheet, no script, nothing fetched) that reads the same
//! offline and printed. Input is plain data, the orchestrator's proto types
//! ([`ReportData`]); output the page as a string. `berth report` fills it
//! over the gRPC API; the orchestrator's `GET /campaigns/{id}/report` from
//! its store: both pages come from [`render`], so they cannot drift apart.
//!
//! Each section is its own module and returns its HTML; a section with
//! nothing to show says so in place of its plot ("no data: why").

pub mod compare;
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

use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, Host, Run, RunPowerSample,
};

use crate::compare::Comparison;

/// Runs whose power series are plotted: one per (configuration, backend),
/// at most this many (each is fetched and drawn; the quality table covers
/// every run from what ListRuns says of it).
pub const MAX_SERIES: usize = 6;

/// What a report is made of, as read from the orchestrator.
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
    /// What the reader bounded and left out (runs, samples), each said in a
    /// banner at the top: a page must not pass for the whole campaign when
    /// it is not.
    pub omitted: Vec<String>,
}

impl ReportData {
    /// The campaign's data read now; of `hosts`, those its runs ran on.
    pub fn new(
        campaign: Campaign,
        hosts: impl IntoIterator<Item = Host>,
        runs: Vec<Run>,
        series: Vec<(String, Vec<RunPowerSample>)>,
    ) -> Self {
        let hosts = hosts
            .into_iter()
            .filter(|h| runs.iter().any(|r| r.host == h.name))
            .collect();
        Self {
            campaign,
            hosts,
            runs,
            series,
            generated_at: prost_types::Timestamp::from(std::time::SystemTime::now()).to_string(),
            against: None,
            omitted: Vec::new(),
        }
    }
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

/// A campaign state for people.
pub fn campaign_state(state: i32) -> &'static str {
    match CampaignState::try_from(state).unwrap_or_default() {
        CampaignState::Pending => "pending",
        CampaignState::Running => "running",
        CampaignState::Succeeded => "succeeded",
        CampaignState::Failed => "failed",
        CampaignState::Cancelled => "cancelled",
        CampaignState::Unspecified => "unknown",
    }
}

/// What an ended campaign's measured runs produced; `None` before it was judged.
pub fn campaign_outcome(outcome: i32) -> Option<&'static str> {
    match CampaignOutcome::try_from(outcome).unwrap_or_default() {
        CampaignOutcome::Complete => Some("complete"),
        CampaignOutcome::Partial => Some("partial"),
        CampaignOutcome::MissingResults => Some("missing results"),
        CampaignOutcome::NoResults => Some("no results"),
        CampaignOutcome::Unspecified => None,
    }
}

/// Four significant digits: enough to compare, short enough to read.
pub fn number(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 6) as usize;
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(number(612.345), "612.3");
        assert_eq!(number(0.0123456), "0.01235");
        assert_eq!(number(12345.6), "12346");
    }
}
