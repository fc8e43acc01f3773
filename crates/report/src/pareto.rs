//! Throughput against energy per unit of work, a point per (configuration,
//! backend) at its means, with the Pareto front: the configurations no other
//! beats on both (more units per second for fewer joules per unit).

use super::axis_title;
use super::html::{section, table};
use super::metrics::{Groups, joules_per_unit, throughput};
use super::stats::summarize;
use super::svg::{Key, Plot, YAxis, no_data};
use crate::number;

const HEIGHT: f64 = 420.0;

/// The indices of `points` (x: cost, y: gain) on the Pareto front, by
/// increasing cost: a point is on it when every cheaper point gains less.
pub fn front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    // Equal cost: the higher gain first, so the lower is dominated.
    order.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[b].1.total_cmp(&points[a].1))
    });
    let mut best = f64::NEG_INFINITY;
    order
        .into_iter()
        .filter(|&i| {
            let on_front = points[i].1 > best;
            best = best.max(points[i].1);
            on_front
        })
        .collect()
}

pub fn render(groups: &Groups, work_metric: &str) -> String {
    let (cost, gain) = (joules_per_unit(work_metric), throughput(work_metric));
    let note = format!(
        "Each point a configuration at its means: {gain} (units of work per second) against {cost}. The line joins the Pareto front."
    );
    let mean = |group: &super::metrics::Group, metric: &str| {
        group
            .values
            .get(metric)
            .and_then(|v| summarize(v))
            .map(|s| s.mean)
    };
    let points: Vec<(String, f64, f64)> = groups
        .groups
        .iter()
        .filter_map(|g| Some((groups.label(g), mean(g, &cost)?, mean(g, &gain)?)))
        .collect();
    let title = "Throughput against energy per unit of work";
    if points.is_empty() {
        let why = format!(
            "no configuration has both {cost} (needs power measured) and {gain} (needs the result's numeric `{work_metric}`)"
        );
        return section("pareto", title, &note, &no_data(title, &why));
    }
    let xy: Vec<(f64, f64)> = points.iter().map(|(_, x, y)| (*x, *y)).collect();
    let on_front = front(&xy);
    let bounds = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    };
    let (x_lo, x_hi) = bounds(&mut xy.iter().map(|p| p.0));
    let (y_lo, y_hi) = bounds(&mut xy.iter().map(|p| p.1));
    let (x_pad, y_pad) = ((x_hi - x_lo) * 0.1, (y_hi - y_lo) * 0.1);
    let mut plot = Plot::new(
        title,
        &axis_title(&cost),
        x_lo - x_pad,
        x_hi + x_pad,
        YAxis::Linear {
            label: axis_title(&gain),
            min: y_lo - y_pad,
            max: y_hi + y_pad,
        },
        HEIGHT,
    );
    let pixel = |(x, y): (f64, f64)| (plot.x.px(x), plot.y(y));
    // The front as a staircase: from each point across to the next's cost, then up.
    let mut steps = Vec::new();
    for pair in on_front.windows(2) {
        let (a, b) = (xy[pair[0]], xy[pair[1]]);
        steps.extend([pixel(a), pixel((b.0, a.1))]);
    }
    steps.extend(on_front.last().map(|&i| pixel(xy[i])));
    let front_dots: Vec<_> = on_front.iter().map(|&i| pixel(xy[i])).collect();
    let other_dots: Vec<_> = (0..xy.len())
        .filter(|i| !on_front.contains(i))
        .map(|i| pixel(xy[i]))
        .collect();
    let labels: Vec<_> = points
        .iter()
        .map(|(name, x, y)| (pixel((*x, *y)), name.clone()))
        .collect();
    plot.line("front", steps);
    plot.dots("other-dot", other_dots);
    plot.dots("front-dot", front_dots);
    for ((px, py), name) in labels {
        plot.text(px + 8.0, py - 8.0, "start", "point-label", &name);
    }
    plot.legend("front-dot", "Pareto front", Key::Dot);
    plot.legend("other-dot", "dominated", Key::Dot);
    let rows = points.iter().enumerate().map(|(i, (name, x, y))| {
        (
            vec![
                name.clone(),
                number(*y),
                number(*x),
                if on_front.contains(&i) { "yes" } else { "no" }.to_string(),
            ],
            "",
        )
    });
    let html = format!(
        "{}{}",
        plot.finish(),
        table(&["configuration", &gain, &cost, "on the front"], rows)
    );
    section("pareto", title, &note, &html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_undominated_points() {
        // (joules per unit, units per second)
        let points = [
            (1.0, 10.0),
            (2.0, 30.0),
            (1.5, 5.0),
            (3.0, 25.0),
            (2.0, 20.0),
            (4.0, 40.0),
        ];
        assert_eq!(front(&points), [0, 1, 5]);
        assert!(front(&[]).is_empty());
    }
}
