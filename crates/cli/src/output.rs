//! What the CLI prints: tables for people, JSON and CSV for programs.

use std::fmt::Write as _;
use std::time::Duration;

use berth_proto::orchestrator::v1::{
    Campaign, CampaignEvent, CampaignOutcome, CampaignResults, CyclesEnded, Host, HostStatus,
    RunState,
};

// The report shows them the same way as the terminal does.
pub use berth_report::{campaign_outcome, campaign_state, number};

/// Records as CSV with every field quoted, so that a value holding a comma,
/// a quote or a line break stays one field for any reader.
pub(crate) fn csv_records<R>(records: impl IntoIterator<Item = R>) -> Result<Vec<u8>, csv::Error>
where
    R: IntoIterator,
    R::Item: AsRef<[u8]>,
{
    let mut writer = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .from_writer(Vec::new());
    for record in records {
        writer.write_record(record)?;
    }
    writer
        .into_inner()
        .map_err(|error| csv::Error::from(error.into_error()))
}

fn run_state(state: i32) -> &'static str {
    match RunState::try_from(state).unwrap_or_default() {
        RunState::Pending => "pending",
        RunState::Dispatched => "dispatched",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
        RunState::Unspecified => "unknown",
    }
}

/// A line for an event worth showing: a run that ended, the end of a
/// warmup, or a new status.
pub fn progress_line(event: &CampaignEvent, last_status: &mut String) -> Option<String> {
    if event.warmup_ended.is_some() {
        return Some(event.message.clone());
    }
    let campaign = event.campaign.as_ref()?;
    let counts = campaign.runs.unwrap_or_default();
    let done = counts.succeeded + counts.failed + counts.cancelled;
    if let Some(run) = &event.run {
        let state = RunState::try_from(run.state).unwrap_or_default();
        let retried = state == RunState::Pending && !run.error.is_empty();
        if !matches!(
            state,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        ) && !retried
        {
            return None;
        }
        let cycle = if run.warmup {
            format!("warmup {}", run.cycle)
        } else {
            format!("cycle {}", run.cycle)
        };
        let mut line = format!(
            "[{done:>3}/{}] {} on {} ({cycle}): ",
            counts.total, run.config, run.backend
        );
        if retried {
            let _ = write!(line, "will run again: {}", run.error);
            return Some(line);
        }
        line.push_str(run_state(run.state));
        if let Some(duration) = run.duration {
            let _ = write!(
                line,
                " in {} s",
                number(duration.seconds as f64 + f64::from(duration.nanos) / 1e9)
            );
        }
        if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&run.result_json) {
            for (key, value) in fields.iter().filter(|(_, v)| v.is_number()).take(4) {
                let _ = write!(
                    line,
                    "  {key}={}",
                    value.as_f64().map(number).unwrap_or_default()
                );
            }
        }
        if state == RunState::Failed {
            let _ = write!(line, ": {}", run.error);
        }
        return Some(line);
    }
    let status = format!(
        "{}: {}",
        campaign_state(campaign.state),
        campaign.status_message
    );
    if status == *last_status {
        return None;
    }
    *last_status = status;
    let mut line = format!(
        "campaign {} ({}) {}",
        campaign.id,
        campaign.name,
        campaign_state(campaign.state)
    );
    if !campaign.status_message.is_empty() {
        let _ = write!(line, ": {}", campaign.status_message);
    }
    Some(line)
}

/// Progress of a watched campaign: runs ended out of all, an estimate of
/// the time left from the mean duration of the runs seen to end, and the
/// main metric of the last runs that succeeded.
#[derive(Debug, Default)]
pub struct Progress {
    done: u64,
    total: u64,
    seconds_run: f64,
    runs_timed: u32,
    /// The metric the sparkline follows, chosen at the first run that succeeded.
    metric: Option<String>,
    recent: std::collections::VecDeque<f64>,
}

/// Width of the bar between its brackets, in characters.
const BAR_WIDTH: usize = 30;
/// Runs the sparkline shows.
const SPARK_RUNS: usize = 24;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Values as a line of block characters from lowest to highest (all
/// alike: the middle one).
pub fn sparkline(values: impl IntoIterator<Item = f64> + Clone) -> String {
    let (low, high) = values
        .clone()
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    values
        .into_iter()
        .map(|v| {
            let level = if high > low {
                ((v - low) / (high - low) * 7.0).round() as usize
            } else {
                3
            };
            SPARKS[level.min(7)]
        })
        .collect()
}

impl Progress {
    pub fn observe(&mut self, event: &CampaignEvent) {
        if let Some(counts) = event.campaign.as_ref().and_then(|c| c.runs) {
            self.done = counts.succeeded + counts.failed + counts.cancelled;
            self.total = counts.total;
        }
        let ended = event.run.as_ref().filter(|run| {
            matches!(
                RunState::try_from(run.state).unwrap_or_default(),
                RunState::Succeeded | RunState::Failed
            )
        });
        if let Some(duration) = ended.and_then(|run| run.duration) {
            self.seconds_run += duration.seconds as f64 + f64::from(duration.nanos) / 1e9;
            self.runs_timed += 1;
        }
        let succeeded = event
            .run
            .as_ref()
            .filter(|run| run.state == RunState::Succeeded as i32);
        if let Some(run) = succeeded {
            self.follow(run, event.campaign.as_ref().map_or("", |c| &c.work_metric));
        }
    }

    /// Adds the run's value of the followed metric: the campaign's
    /// throughput when the run reports its work, else its first metric.
    fn follow(&mut self, run: &berth_proto::orchestrator::v1::Run, work_metric: &str) {
        let metrics = berth_report::metrics::run_metrics(run, work_metric);
        let throughput = berth_report::metrics::throughput(work_metric);
        let metric = self.metric.get_or_insert_with(|| {
            metrics
                .iter()
                .find(|(name, _)| *name == throughput)
                .or(metrics.first())
                .map(|(name, _)| name.clone())
                .unwrap_or_default()
        });
        if let Some((_, value)) = metrics.iter().find(|(name, _)| name == metric) {
            if self.recent.len() == SPARK_RUNS {
                self.recent.pop_front();
            }
            self.recent.push_back(*value);
        }
    }

    /// Mean run duration so far × runs left; `None` before any run was timed.
    pub fn eta(&self) -> Option<Duration> {
        if self.runs_timed == 0 {
            return None;
        }
        let left = self.total.saturating_sub(self.done) as f64;
        Some(Duration::from_secs_f64(
            self.seconds_run / f64::from(self.runs_timed) * left,
        ))
    }

    /// `[#########---------]  12/24  50%  ETA 1m05s  tokens_per_s ▃▅▇█▆ 245.3`
    pub fn bar(&self) -> String {
        let fraction = if self.total == 0 {
            0.0
        } else {
            self.done as f64 / self.total as f64
        };
        let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
        let eta = self.eta().map_or_else(|| "--".to_string(), format_eta);
        let mut bar = format!(
            "[{}{}] {:>4}/{}  {:>3.0}%  ETA {eta}",
            "#".repeat(filled),
            "-".repeat(BAR_WIDTH - filled),
            self.done,
            self.total,
            fraction * 100.0
        );
        if let (Some(metric), Some(last)) = (&self.metric, self.recent.back()) {
            let spark = sparkline(self.recent.iter().copied());
            let _ = write!(bar, "  {metric} {spark} {}", number(*last));
        }
        bar
    }
}

fn format_eta(eta: Duration) -> String {
    let seconds = eta.as_secs_f64().round() as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// How aggregated results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    Table,
    Json,
    Csv,
}

pub fn results(results: &CampaignResults, format: ResultsFormat) -> Result<Vec<u8>, csv::Error> {
    match format {
        ResultsFormat::Table => Ok(results_table(results).into_bytes()),
        ResultsFormat::Json => Ok(results_json(results).into_bytes()),
        ResultsFormat::Csv => results_csv(results),
    }
}

/// How `cycles.until` ended a row: `known: energy_j ±1.2% < 2%`, or
/// `cycles.max: energy_j ±4.0% ≥ 2%`.
fn cycles_ended(ended: &CyclesEnded) -> String {
    let target = number(ended.ci_below * 100.0);
    let interval = ended.ci_relative.map_or_else(
        || "no interval".to_string(),
        |ci| format!("±{}%", number(ci * 100.0)),
    );
    if ended.known {
        format!("known: {} {interval} < {target}%", ended.metric)
    } else {
        format!("cycles.max: {} {interval}, target {target}%", ended.metric)
    }
}

/// A spread that one value does not have: `n/a` rather than a 0 that would
/// read as certainty.
fn spread(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), number)
}

/// The metric columns: every metric name in first-seen order.
fn metric_names(results: &CampaignResults) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for row in &results.results {
        for metric in &row.metrics {
            if !names.contains(&metric.name) {
                names.push(metric.name.clone());
            }
        }
    }
    names
}

pub fn results_table(results: &CampaignResults) -> String {
    let names = metric_names(results);
    let mut header = vec!["config".to_string(), "backend".to_string(), "n".to_string()];
    header.extend(names.iter().map(|n| format!("{n} (mean ± 95% CI)")));
    let mut rows = vec![header];
    for row in &results.results {
        let mut cells = vec![
            row.config.clone(),
            row.backend.clone(),
            row.succeeded.to_string(),
        ];
        let mut lacking = Vec::new();
        if row.failed > 0 {
            lacking.push(format!("{} failed", row.failed));
        }
        if row.runs_without_energy > 0 {
            lacking.push(format!("{} without energy", row.runs_without_energy));
        }
        let mut flags: Vec<_> = row.quality_flags.iter().collect();
        flags.sort();
        lacking.extend(
            flags
                .into_iter()
                .map(|(flag, runs)| format!("{runs} {flag}")),
        );
        if let Some(ended) = &row.cycles_ended {
            lacking.push(cycles_ended(ended));
        }
        if !lacking.is_empty() {
            cells[2] = format!("{} ({})", row.succeeded, lacking.join(", "));
        }
        for name in &names {
            cells.push(
                row.metrics
                    .iter()
                    .find(|m| &m.name == name)
                    .map(|m| format!("{} ± {}", number(m.mean), spread(m.ci95_half_width)))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        rows.push(cells);
    }
    let mut out = String::new();
    if let Some(campaign) = &results.campaign {
        let _ = write!(
            out,
            "campaign {} ({}): {}",
            campaign.id,
            campaign.name,
            campaign_state(campaign.state)
        );
        if let Some(outcome) = campaign_outcome(campaign.outcome) {
            let _ = write!(out, " ({outcome})");
        }
        if !campaign.status_message.is_empty() {
            let _ = write!(out, ": {}", campaign.status_message);
        }
        out.push('\n');
    }
    out.push_str(&aligned(&rows));
    if !results.provenance_differences.is_empty() {
        out.push_str("\nprovenance differs between runs (their figures may not compare):\n");
        for line in &results.provenance_differences {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// Rows as left-aligned columns, the first (the header) underlined.
pub(crate) fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(
                out,
                "{}",
                widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
        }
    }
    out
}

fn results_json(results: &CampaignResults) -> String {
    let rows: Vec<serde_json::Value> = results
        .results
        .iter()
        .map(|row| {
            let metrics: serde_json::Map<String, serde_json::Value> = row
                .metrics
                .iter()
                .map(|m| {
                    let summary = serde_json::json!({
                        "n": m.n, "mean": m.mean, "std_dev": m.std_dev,
                        "ci95_half_width": m.ci95_half_width, "min": m.min, "max": m.max,
                    });
                    (m.name.clone(), summary)
                })
                .collect();
            let cycles_ended = row.cycles_ended.as_ref().map(|ended| {
                serde_json::json!({
                    "known": ended.known, "runs": ended.runs, "metric": ended.metric,
                    "ci_relative": ended.ci_relative, "ci_below": ended.ci_below,
                })
            });
            serde_json::json!({
                "config": row.config, "params": row.params, "backend": row.backend,
                "succeeded": row.succeeded, "failed": row.failed,
                "runs_without_energy": row.runs_without_energy, "metrics": metrics,
                "cycles_ended": cycles_ended, "quality_flags": row.quality_flags,
            })
        })
        .collect();
    let campaign = results.campaign.as_ref();
    let outcome = campaign
        .map(|c| CampaignOutcome::try_from(c.outcome).unwrap_or_default())
        .filter(|o| *o != CampaignOutcome::Unspecified)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("CAMPAIGN_OUTCOME_")
                .to_lowercase()
        });
    let document = serde_json::json!({
        "campaign": campaign.map(|c| c.id.clone()),
        "name": campaign.map(|c| c.name.clone()),
        "state": campaign.map(|c| campaign_state(c.state)),
        "outcome": outcome,
        "status_message": campaign.map(|c| c.status_message.clone()),
        "results": rows,
        "provenance_differences": results.provenance_differences,
    });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&document).unwrap_or_default()
    )
}

/// A line per (config, backend, metric); a spread one value does not have
/// is an empty field, as is every absent value in the CSV exports.
fn results_csv(results: &CampaignResults) -> Result<Vec<u8>, csv::Error> {
    let header = [
        "config",
        "backend",
        "metric",
        "n",
        "mean",
        "std_dev",
        "ci95_half_width",
        "min",
        "max",
        "runs_without_energy",
    ]
    .map(String::from);
    let optional = |value: Option<f64>| value.map(|v| v.to_string()).unwrap_or_default();
    let rows = results.results.iter().flat_map(|row| {
        row.metrics.iter().map(move |m| {
            [
                row.config.clone(),
                row.backend.clone(),
                m.name.clone(),
                m.n.to_string(),
                m.mean.to_string(),
                optional(m.std_dev),
                optional(m.ci95_half_width),
                m.min.to_string(),
                m.max.to_string(),
                row.runs_without_energy.to_string(),
            ]
        })
    });
    csv_records(std::iter::once(header).chain(rows))
}

pub fn campaigns(campaigns: &[Campaign]) -> String {
    let mut out = String::new();
    for campaign in campaigns {
        let counts = campaign.runs.unwrap_or_default();
        let _ = writeln!(
            out,
            "{}  {:<10} {:>5}/{:<5} {}  {}",
            campaign.id,
            campaign_state(campaign.state),
            counts.succeeded + counts.failed + counts.cancelled,
            counts.total,
            campaign.name,
            campaign.status_message
        );
    }
    out
}

pub fn hosts(hosts: &[Host]) -> String {
    let mut out = String::new();
    for host in hosts {
        let status = match HostStatus::try_from(host.status).unwrap_or_default() {
            HostStatus::Ready => "ready",
            HostStatus::Unreachable => "unreachable",
            _ => "unknown",
        };
        let _ = writeln!(
            out,
            "{:<16} {:<12} {} cpus={} memory={}MiB gpus={} {}",
            host.name,
            status,
            host.address,
            host.cpus,
            host.memory_bytes / (1024 * 1024),
            host.gpu_count,
            host.status_message
        );
        for gpu in &host.gpus {
            let _ = writeln!(
                out,
                "  gpu {:<3} {} {}MiB {}",
                gpu.index,
                gpu.name,
                gpu.memory_bytes / (1024 * 1024),
                gpu.uuid
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::common::v1::MetricSummary;
    use berth_proto::orchestrator::v1::{CampaignState, ConfigResult};

    #[test]
    fn sparkline_spans_lowest_to_highest() {
        assert_eq!(sparkline([1.0, 8.0, 4.5, 8.0]), "▁█▅█");
        assert_eq!(sparkline([3.0, 3.0]), "▄▄");
        assert_eq!(sparkline(std::iter::empty::<f64>()), "");
    }

    fn event(done: u64, total: u64, ended_run_seconds: Option<i64>) -> CampaignEvent {
        CampaignEvent {
            campaign: Some(Campaign {
                runs: Some(berth_proto::orchestrator::v1::RunCounts {
                    succeeded: done,
                    total,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            run: ended_run_seconds.map(|seconds| berth_proto::orchestrator::v1::Run {
                state: RunState::Succeeded as i32,
                duration: Some(prost_types::Duration { seconds, nanos: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn progress_bar_and_eta_follow_finished_runs() {
        let mut progress = Progress::default();
        progress.observe(&event(0, 10, None));
        assert_eq!(progress.eta(), None);
        assert!(
            progress.bar().ends_with("0/10    0%  ETA --"),
            "{}",
            progress.bar()
        );
        progress.observe(&event(1, 10, Some(2)));
        progress.observe(&event(2, 10, Some(4)));
        // Mean 3 s × 8 runs left.
        assert_eq!(progress.eta(), Some(Duration::from_secs(24)));
        let bar = progress.bar();
        assert!(
            bar.starts_with(&format!("[{}{}]", "#".repeat(6), "-".repeat(24))),
            "{bar}"
        );
        assert!(bar.contains("2/10   20%  ETA 24s"), "{bar}");
        // The runs' only metric is their duration: 2 s then 4 s.
        assert!(bar.ends_with("ETA 24s  duration_s ▁█ 4.000"), "{bar}");
        assert_eq!(format_eta(Duration::from_secs(3725)), "1h02m");
        assert_eq!(format_eta(Duration::from_secs(65)), "1m05s");
    }

    #[test]
    fn table_has_a_row_per_config_with_mean_and_ci() {
        let metric = |name: &str, mean: f64| MetricSummary {
            name: name.into(),
            n: 3,
            mean,
            ci95_half_width: Some(1.5),
            ..Default::default()
        };
        let results = CampaignResults {
            campaign: None,
            results: vec![
                ConfigResult {
                    config: "a".into(),
                    backend: "b".into(),
                    succeeded: 3,
                    metrics: vec![metric("tps", 10.0)],
                    ..Default::default()
                },
                ConfigResult {
                    config: "c".into(),
                    backend: "b".into(),
                    succeeded: 3,
                    metrics: vec![metric("tps", 20.0)],
                    quality_flags: [("short_window".to_string(), 2)].into(),
                    cycles_ended: Some(CyclesEnded {
                        known: true,
                        runs: 3,
                        metric: "tps".into(),
                        ci_relative: Some(0.0075),
                        ci_below: 0.02,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            provenance_differences: Vec::new(),
        };
        let table = results_table(&results);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.contains("10.00 ± 1.500"), "{table}");
        assert!(
            table.contains("3 (2 short_window, known: tps ±0.7500% < 2.000%)"),
            "{table}"
        );
        let json = results_json(&results);
        assert!(json.contains("\"known\": true"), "{json}");
        let csv = String::from_utf8(results_csv(&results).unwrap()).unwrap();
        assert!(csv.contains("\"c\",\"b\",\"tps\",\"3\",\"20\","), "{csv}");
        let differing = CampaignResults {
            provenance_differences: vec![
                "gpus[0].power_limit_w: 700 on host-a (2 runs), 500 on host-b (1 run)".into(),
            ],
            ..results
        };
        let table = results_table(&differing);
        assert!(
            table.ends_with(
                "provenance differs between runs (their figures may not compare):\n  \
                 gpus[0].power_limit_w: 700 on host-a (2 runs), 500 on host-b (1 run)\n"
            ),
            "{table}"
        );
        assert!(results_json(&differing).contains("\"provenance_differences\": ["));
    }

    /// One run of `a`: its interval is undefined; two runs of `b`, one of
    /// them without energy; the config name holds a comma and a quote.
    fn single_and_lacking() -> CampaignResults {
        CampaignResults {
            campaign: Some(Campaign {
                id: "c1".into(),
                name: "t".into(),
                state: CampaignState::Succeeded as i32,
                outcome: CampaignOutcome::Partial as i32,
                status_message: "1 of 4 runs failed".into(),
                ..Default::default()
            }),
            results: vec![
                ConfigResult {
                    config: "prompt=a, \"quoted\"".into(),
                    backend: "b".into(),
                    succeeded: 1,
                    failed: 1,
                    metrics: vec![MetricSummary {
                        name: "tps".into(),
                        n: 1,
                        mean: 10.0,
                        min: 10.0,
                        max: 10.0,
                        std_dev: None,
                        ci95_half_width: None,
                    }],
                    ..Default::default()
                },
                ConfigResult {
                    config: "b".into(),
                    backend: "b".into(),
                    succeeded: 2,
                    runs_without_energy: 1,
                    metrics: vec![MetricSummary {
                        name: "energy_j".into(),
                        n: 1,
                        mean: 30.0,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            provenance_differences: Vec::new(),
        }
    }

    #[test]
    fn the_interval_of_one_value_is_undefined_and_runs_without_energy_are_counted() {
        let results = single_and_lacking();
        let table = results_table(&results);
        assert!(
            table.starts_with("campaign c1 (t): succeeded (partial): 1 of 4 runs failed\n"),
            "{table}"
        );
        assert!(table.contains("10.00 ± n/a"), "{table}");
        assert!(table.contains("1 (1 failed)"), "{table}");
        assert!(table.contains("2 (1 without energy)"), "{table}");

        let json: serde_json::Value = serde_json::from_str(&results_json(&results)).unwrap();
        assert_eq!(json["outcome"], "partial");
        let tps = &json["results"][0]["metrics"]["tps"];
        assert_eq!(tps["ci95_half_width"], serde_json::Value::Null);
        assert_eq!(tps["std_dev"], serde_json::Value::Null);
        assert_eq!(json["results"][1]["runs_without_energy"], 1);
    }

    #[test]
    fn results_csv_quotes_every_field_and_reads_back() {
        let results = single_and_lacking();
        let bytes = results_csv(&results).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.lines().all(|l| l.starts_with('"') && l.ends_with('"')),
            "{text}"
        );
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header[0], "config");
        assert_eq!(header[9], "runs_without_energy");
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        // The comma and the quotes come back as they were, in one field.
        assert_eq!(&rows[0][0], "prompt=a, \"quoted\"");
        assert_eq!((&rows[0][5], &rows[0][6]), ("", ""), "undefined spread");
        assert_eq!((&rows[1][2], &rows[1][9]), ("energy_j", "1"));
    }

    #[test]
    fn hosts_list_their_gpus() {
        let host = Host {
            name: "gpu-01".into(),
            address: "ssh://berth@gpu-01/run/berth/agent.sock".into(),
            status: HostStatus::Ready as i32,
            cpus: 64,
            memory_bytes: 512 << 30,
            gpu_count: 1,
            gpus: vec![berth_proto::agent::v1::Gpu {
                index: 0,
                uuid: "GPU-5a3c".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: 80 << 30,
                power_device: "nvml:0".into(),
            }],
            ..Default::default()
        };
        let text = hosts(&[host]);
        assert!(text.starts_with("gpu-01           ready"), "{text}");
        assert!(text.contains("gpus=1"), "{text}");
        assert!(
            text.contains("  gpu 0   NVIDIA H100 80GB HBM3 81920MiB GPU-5a3c"),
            "{text}"
        );
    }
}
