//! Per metric, a row per (configuration, backend) with every measured run's
//! value as a dot, the mean as a tick and its 95% confidence interval as a
//! bar: the distribution, not only the mean; and the numbers in a table.

use super::axis_title;
use super::html::{section, table};
use super::metrics::Groups;
use super::stats::{Summary, summarize};
use super::svg::{Key, Plot, YAxis, no_data};
use crate::number;

/// Vertical spread of a row's dots (pixels either side of its line), so
/// that equal values side by side stay visible.
const JITTER: f64 = 6.0;

pub fn render(groups: &Groups) -> String {
    let note = "Measured runs only (succeeded, not warmup): each dot a run, the tick the mean, the bar its 95% confidence interval (Student's t).";
    if groups.metrics.is_empty() {
        return section(
            "metrics",
            "Metrics",
            note,
            &no_data(
                "Metrics",
                "no measured run succeeded with a numeric result or duration",
            ),
        );
    }
    let mut html = String::new();
    let mut rows = Vec::new();
    for metric in &groups.metrics {
        html.push_str(&plot(groups, metric));
        for group in &groups.groups {
            let summary = group.values.get(metric).and_then(|v| summarize(v));
            rows.push((
                vec![
                    groups.label(group),
                    metric.clone(),
                    summary
                        .map(|s| s.n.to_string())
                        .unwrap_or_else(|| "0".into()),
                    summary
                        .map(|s| number(s.mean))
                        .unwrap_or_else(|| "no data".into()),
                    optional(summary.and_then(|s| s.std_dev)),
                    optional(summary.and_then(|s| s.ci95)),
                ],
                "",
            ));
        }
    }
    html.push_str(&table(
        &["configuration", "metric", "n", "mean", "sd", "95% CI ±"],
        rows,
    ));
    section("metrics", "Metrics", note, &html)
}

fn optional(value: Option<f64>) -> String {
    value.map(number).unwrap_or_else(|| "—".into())
}

fn plot(groups: &Groups, metric: &str) -> String {
    let summaries: Vec<Option<(Summary, &[f64])>> = groups
        .groups
        .iter()
        .map(|g| {
            let values = g.values.get(metric)?;
            Some((summarize(values)?, values.as_slice()))
        })
        .collect();
    // The range covers every value and every interval.
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for (summary, values) in summaries.iter().flatten() {
        let ci = summary.ci95.unwrap_or(0.0);
        for v in values
            .iter()
            .copied()
            .chain([summary.mean - ci, summary.mean + ci])
        {
            low = low.min(v);
            high = high.max(v);
        }
    }
    let title = format!("{metric} per configuration");
    if low > high {
        return no_data(&title, "no measured run reported this metric");
    }
    let pad = (high - low) * 0.05;
    let labels = groups.groups.iter().map(|g| groups.label(g)).collect();
    let mut plot = Plot::new(
        &title,
        &axis_title(metric),
        low - pad,
        high + pad,
        YAxis::Categories(labels),
        0.0,
    );
    let (mut dots, mut means, mut cis) = (Vec::new(), String::new(), String::new());
    for (row, entry) in summaries.iter().enumerate() {
        let y = plot.row(row);
        let Some((summary, values)) = entry else {
            plot.text(plot.x.px(low), y + 4.0, "start", "no-data", "no data");
            continue;
        };
        for (i, value) in values.iter().enumerate() {
            // A fixed pattern, not random: the same data draws the same plot.
            let offset = ((i * 7) % 5) as f64 / 2.0 - 1.0;
            dots.push((plot.x.px(*value), y + offset * JITTER));
        }
        let mean = plot.x.px(summary.mean);
        means.push_str(&format!("M{mean:.1} {:.1}V{:.1}", y - 9.0, y + 9.0));
        if let Some(ci) = summary.ci95 {
            let (a, b) = (plot.x.px(summary.mean - ci), plot.x.px(summary.mean + ci));
            cis.push_str(&format!(
                "M{a:.1} {y:.1}H{b:.1}M{a:.1} {:.1}V{:.1}M{b:.1} {:.1}V{:.1}",
                y - 4.0,
                y + 4.0,
                y - 4.0,
                y + 4.0
            ));
        }
    }
    plot.dots("dot", dots);
    plot.path("ci", &cis);
    plot.path("mean", &means);
    plot.legend("dot", "run", Key::Dot);
    plot.legend("mean", "mean", Key::Line);
    plot.legend("ci", "95% CI", Key::Line);
    plot.finish()
}
