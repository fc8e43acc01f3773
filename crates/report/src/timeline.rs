//! Who ran what when: a lane per host (per host and backend when there are
//! several backends), a bar per run from its start to its end, coloured by
//! how it ended, warmups in their own colour, retried runs outlined; gaps
//! between bars are time the host spent on no run of this campaign.

use std::fmt::Write as _;

use berth_proto::orchestrator::v1::{Run, RunState};

use super::html::section;
use super::svg::{Key, Plot, ROW, YAxis, no_data};
use super::{ReportData, epoch};

/// Bars are at least this wide, so that a short run still shows.
const MIN_BAR: f64 = 1.0;

pub fn render(data: &ReportData) -> String {
    let note = "Each bar a run, from its start to its end (the last attempt), on the host it ran on; x is seconds since the campaign's first run started.";
    section("timeline", "Run timeline", note, &plot(data))
}

/// A run's lane name.
fn lane(run: &Run, several_backends: bool) -> String {
    let host = if run.host.is_empty() {
        "(no host)"
    } else {
        &run.host
    };
    if several_backends {
        format!("{host} · {}", run.backend)
    } else {
        host.to_string()
    }
}

fn plot(data: &ReportData) -> String {
    let started: Vec<(&Run, f64)> = data
        .runs
        .iter()
        .filter_map(|r| Some((r, epoch(r.started_at.as_ref()?))))
        .collect();
    let title = "Runs over time";
    let Some(origin) = started.iter().map(|(_, t)| *t).reduce(f64::min) else {
        return no_data(title, "no run has started");
    };
    let several_backends = data.runs.iter().any(|r| r.backend != data.runs[0].backend);
    let mut lanes: Vec<String> = Vec::new();
    let mut bars = Vec::with_capacity(started.len());
    let mut end_max = 0.0f64;
    for (run, start) in &started {
        let name = lane(run, several_backends);
        let index = lanes.iter().position(|l| *l == name).unwrap_or_else(|| {
            lanes.push(name);
            lanes.len() - 1
        });
        let end = run
            .finished_at
            .as_ref()
            .map(epoch)
            .or_else(|| Some(start + super::metrics::duration_seconds(run)?))
            .unwrap_or(*start);
        end_max = end_max.max(end - origin);
        bars.push((*run, index, start - origin, end - origin));
    }
    let mut plot = Plot::new(
        title,
        "time since the first run started (s)",
        0.0,
        end_max.max(1e-3),
        YAxis::Categories(lanes),
        0.0,
    );
    let classes = [
        "run-ok",
        "run-failed",
        "run-cancelled",
        "run-warmup",
        "run-retried",
    ];
    let mut paths = vec![String::new(); classes.len()];
    let half = ROW * 0.35;
    for (run, index, start, end) in bars {
        let (x0, x1) = (plot.x.px(start), plot.x.px(end));
        let width = (x1 - x0).max(MIN_BAR);
        let y = plot.row(index) - half;
        let class = match RunState::try_from(run.state).unwrap_or_default() {
            _ if run.warmup => 3,
            RunState::Failed => 1,
            RunState::Cancelled => 2,
            _ => 0,
        };
        let bar = format!(
            "M{x0:.1} {y:.1}h{width:.1}v{:.1}h{:.1}z",
            2.0 * half,
            -width
        );
        paths[class].push_str(&bar);
        if run.attempts > 1 {
            let _ = write!(paths[4], "{bar}");
        }
    }
    for (class, d) in classes.iter().zip(&paths) {
        plot.path(class, d);
    }
    for (class, label) in
        classes
            .iter()
            .zip(["succeeded", "failed", "cancelled", "warmup", "retried"])
    {
        plot.legend(class, label, Key::Box);
    }
    plot.finish()
}
