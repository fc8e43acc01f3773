//! `berth report B --against A`: the comparison of `berth compare A B` as a
//! section: a row per (configuration, metric) with B/A and its 95% interval
//! around the line of no change, largest change first, and the table.

use std::fmt::Write as _;

use super::html::{escape, section, table};
use super::svg::{Key, Plot, YAxis, no_data};
use crate::compare::{self, Comparison};

pub fn render(against: &str, comparison: &Comparison) -> String {
    let note = format!(
        "This campaign (B) against {against} (A): per configuration and metric both measured, B's mean over A's with its 95% interval; bold rows differ significantly (p < 0.05: Welch's t-test, or a bootstrap where a side has fewer than 5 runs)."
    );
    let title = "B/A per configuration and metric";
    let plotted: Vec<_> = comparison
        .changes
        .iter()
        .filter(|c| c.ratio.is_some())
        .collect();
    let mut html = if plotted.is_empty() {
        no_data(
            title,
            "no configuration and metric measured by both campaigns",
        )
    } else {
        let (mut low, mut high) = (1.0f64, 1.0f64);
        for change in &plotted {
            let r = change.ratio.expect("filtered");
            let (a, b) = r.ci95.unwrap_or((r.ratio, r.ratio));
            low = low.min(a.min(r.ratio));
            high = high.max(b.max(r.ratio));
        }
        let pad = (high - low) * 0.05;
        let rows = plotted
            .iter()
            .map(|c| format!("{} · {}", c.label, c.metric))
            .collect();
        let mut plot = Plot::new(
            title,
            "B/A (1 = no change)",
            low - pad,
            high + pad,
            YAxis::Categories(rows),
            0.0,
        );
        let (mut significant, mut other, mut bars) = (Vec::new(), Vec::new(), String::new());
        for (i, change) in plotted.iter().enumerate() {
            let r = change.ratio.expect("filtered");
            let y = plot.row(i);
            let point = (plot.x.px(r.ratio), y);
            if change.significant() {
                significant.push(point);
            } else {
                other.push(point);
            }
            if let Some((a, b)) = r.ci95 {
                let _ = write!(bars, "M{:.1} {y:.1}H{:.1}", plot.x.px(a), plot.x.px(b));
            }
        }
        let one = plot.x.px(1.0);
        plot.path(
            "baseline",
            &format!("M{one:.1} 34V{:.1}", plot.row(plotted.len() - 1) + 11.0),
        );
        plot.path("ci", &bars);
        plot.dots("other-dot", other);
        plot.dots("front-dot", significant);
        plot.legend("front-dot", "significant", Key::Dot);
        plot.legend("other-dot", "not significant", Key::Dot);
        plot.legend("ci", "95% CI", Key::Line);
        plot.finish()
    };
    let rows = comparison.changes.iter().map(|change| {
        let class = if change.significant() {
            "significant"
        } else {
            ""
        };
        (compare::cells(change), class)
    });
    html.push_str(&table(&compare::COLUMNS, rows));
    for (side, only) in [("A", &comparison.only_a), ("B", &comparison.only_b)] {
        if !only.is_empty() {
            let _ = write!(html, "<p>Only in {side}: {}</p>", escape(&only.join(", ")));
        }
    }
    section("comparison", "Comparison", &note, &html)
}
