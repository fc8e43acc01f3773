//! Plots as inline SVG, written by hand: a frame with a linear x axis and a
//! linear or categorical y axis (ticks, grid, tick labels, axis titles with
//! units), a legend, and marks drawn as few `<path>` elements as possible —
//! dots are zero-length subpaths with round caps, so a thousand runs are one
//! element, and the page stays small and quick to render. Styles are CSS
//! classes of the page (html.rs), so the plots print as they show.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::html::escape;

/// Plot width in pixels: fits a 1280-pixel window with the page's margins.
pub const WIDTH: f64 = 1120.0;
const LEFT: f64 = 76.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 48.0;
/// Room for category names on the left of a categorical plot.
const CATEGORY_LEFT: f64 = 220.0;
/// Height of one category's row.
pub const ROW: f64 = 22.0;

/// A linear mapping from values to pixels.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    min: f64,
    max: f64,
    from: f64,
    to: f64,
}

impl Scale {
    /// `min..max` onto `from..to`; an empty or unbounded range is widened so
    /// that a single value sits in the middle.
    fn new(min: f64, max: f64, from: f64, to: f64) -> Self {
        let (min, max) = match (min.is_finite(), max.is_finite()) {
            (true, true) if max > min => (min, max),
            (true, true) => {
                let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
                (min - pad, min + pad)
            }
            _ => (0.0, 1.0),
        };
        Self { min, max, from, to }
    }

    pub fn px(&self, value: f64) -> f64 {
        self.from + (value - self.min) / (self.max - self.min) * (self.to - self.from)
    }

    /// Round tick values within the range: steps of 1, 2 or 5 × 10^k.
    fn ticks(&self, wanted: f64) -> Vec<f64> {
        let rough = (self.max - self.min) / wanted;
        let power = 10f64.powf(rough.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * power)
            .find(|s| *s >= rough)
            .unwrap_or(10.0 * power);
        let first = (self.min / step).ceil() as i64;
        let last = (self.max / step).floor() as i64;
        (first..=last).map(|i| i as f64 * step).collect()
    }
}

/// A tick's label: no more decimals than its step needs.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 9.0) as usize;
    let text = format!("{value:.decimals$}");
    if text == "-0" { "0".into() } else { text }
}

/// The y axis: values, or one row per named category (top to bottom).
pub enum YAxis {
    Linear { label: String, min: f64, max: f64 },
    Categories(Vec<String>),
}

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    Dot,
    Line,
    Box,
}

pub struct Plot {
    title: String,
    height: f64,
    left: f64,
    pub x: Scale,
    y: YAxisScale,
    x_label: String,
    legend: Vec<(String, String, Key)>,
    body: String,
}

enum YAxisScale {
    Linear { scale: Scale, label: String },
    Categories(Vec<String>),
}

impl Plot {
    /// A plot `height` pixels tall (categorical: as tall as its rows need)
    /// with x from `x_min` to `x_max`.
    pub fn new(title: &str, x_label: &str, x_min: f64, x_max: f64, y: YAxis, height: f64) -> Self {
        let (left, height) = match &y {
            YAxis::Categories(rows) => {
                (CATEGORY_LEFT, TOP + BOTTOM + ROW * rows.len().max(1) as f64)
            }
            YAxis::Linear { .. } => (LEFT, height),
        };
        let y = match y {
            YAxis::Linear { label, min, max } => YAxisScale::Linear {
                scale: Scale::new(min, max, height - BOTTOM, TOP),
                label,
            },
            YAxis::Categories(rows) => YAxisScale::Categories(rows),
        };
        Self {
            title: title.to_string(),
            height,
            left,
            x: Scale::new(x_min, x_max, left, WIDTH - RIGHT),
            y,
            x_label: x_label.to_string(),
            legend: Vec::new(),
            body: String::new(),
        }
    }

    /// The plot area's width in pixels (the resolution of downsampling).
    pub fn pixels(&self) -> usize {
        (WIDTH - RIGHT - self.left) as usize
    }

    /// The pixel row of a value on a linear y axis (the middle on a categorical one).
    pub fn y(&self, value: f64) -> f64 {
        match &self.y {
            YAxisScale::Linear { scale, .. } => scale.px(value),
            YAxisScale::Categories(_) => (TOP + self.height - BOTTOM) / 2.0,
        }
    }

    /// The pixel row of the middle of category `index`.
    pub fn row(&self, index: usize) -> f64 {
        TOP + ROW * (index as f64 + 0.5)
    }

    pub fn legend(&mut self, class: &str, label: &str, key: Key) {
        self.legend
            .push((class.to_string(), label.to_string(), key));
    }

    /// A path of class `class` (skipped when it draws nothing).
    pub fn path(&mut self, class: &str, d: &str) {
        if !d.is_empty() {
            let _ = write!(self.body, r#"<path class="{class}" d="{d}"/>"#);
        }
    }

    /// Dots at pixel positions, one element; dots landing on the same pixel
    /// are drawn once (a 10,000-run plot has at most as many dots as pixels).
    pub fn dots(&mut self, class: &str, points: impl IntoIterator<Item = (f64, f64)>) {
        let mut seen = HashSet::new();
        let mut d = String::new();
        for (x, y) in points {
            if x.is_finite() && y.is_finite() && seen.insert((x.round() as i64, y.round() as i64)) {
                let _ = write!(d, "M{x:.0} {y:.0}h0");
            }
        }
        self.path(class, &d);
    }

    /// A line through pixel positions.
    pub fn line(&mut self, class: &str, points: impl IntoIterator<Item = (f64, f64)>) {
        let mut d = String::new();
        for (i, (x, y)) in points.into_iter().enumerate() {
            let _ = write!(d, "{}{x:.1} {y:.1}", if i == 0 { 'M' } else { 'L' });
        }
        self.path(class, &d);
    }

    /// Text at a pixel position (`anchor`: start, middle or end).
    pub fn text(&mut self, x: f64, y: f64, anchor: &str, class: &str, text: &str) {
        let _ = write!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" class="{class}">{}</text>"#,
            escape(text)
        );
    }

    /// The SVG element: frame, grid, ticks, axis titles, marks, legend.
    pub fn finish(self) -> String {
        let (width, height) = (WIDTH, self.height);
        let (top, bottom) = (TOP, height - BOTTOM);
        let (left, right) = (self.left, WIDTH - RIGHT);
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"><title>{}</title>"#,
            escape(&self.title)
        );
        let _ = write!(
            svg,
            r#"<text x="{left}" y="20" class="plot-title">{}</text>"#,
            escape(&self.title)
        );
        // Grid and tick labels.
        let mut grid = String::new();
        let x_ticks = self.x.ticks(8.0);
        let x_step = x_ticks
            .get(1)
            .zip(x_ticks.first())
            .map_or(1.0, |(b, a)| b - a);
        for tick in &x_ticks {
            let px = self.x.px(*tick);
            let _ = write!(grid, "M{px:.1} {top}V{bottom}");
            let _ = write!(
                svg,
                r#"<text x="{px:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
                bottom + 16.0,
                tick_label(*tick, x_step)
            );
        }
        match &self.y {
            YAxisScale::Linear { scale, label } => {
                let ticks = scale.ticks(6.0);
                let step = ticks.get(1).zip(ticks.first()).map_or(1.0, |(b, a)| b - a);
                for tick in &ticks {
                    let py = scale.px(*tick);
                    let _ = write!(grid, "M{left} {py:.1}H{right}");
                    let _ = write!(
                        svg,
                        r#"<text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"#,
                        left - 6.0,
                        py + 4.0,
                        tick_label(*tick, step)
                    );
                }
                let middle = (top + bottom) / 2.0;
                let _ = write!(
                    svg,
                    r#"<text x="16" y="{middle:.1}" text-anchor="middle" transform="rotate(-90 16 {middle:.1})" class="axis-label">{}</text>"#,
                    escape(label)
                );
            }
            YAxisScale::Categories(rows) => {
                for (i, name) in rows.iter().enumerate() {
                    let py = self.row(i);
                    let _ = write!(grid, "M{left} {py:.1}H{right}");
                    let _ = write!(
                        svg,
                        r#"<text x="{}" y="{:.1}" text-anchor="end" class="axis-label category">{}</text>"#,
                        left - 8.0,
                        py + 4.0,
                        escape(name)
                    );
                }
            }
        }
        let _ = write!(svg, r#"<path class="grid" d="{grid}"/>"#);
        let _ = write!(
            svg,
            r#"<path class="axis" d="M{left} {top}V{bottom}H{right}"/>"#
        );
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle" class="axis-label">{}</text>"#,
            (left + right) / 2.0,
            height - 8.0,
            escape(&self.x_label)
        );
        svg.push_str(&self.body);
        // Legend, right-aligned above the plot area.
        let mut x = right;
        for (class, label, key) in self.legend.iter().rev() {
            x -= 14.0 + 7.0 * label.chars().count() as f64;
            let mark = match key {
                Key::Dot => format!(r#"<path class="{class}" d="M{x} 16h0"/>"#),
                Key::Line => format!(r#"<path class="{class}" d="M{} 16h12"/>"#, x - 6.0),
                Key::Box => format!(r#"<path class="{class}" d="M{} 11h10v10h-10z"/>"#, x - 5.0),
            };
            svg.push_str(&mark);
            let _ = write!(
                svg,
                r#"<text x="{}" y="20" class="legend">{}</text>"#,
                x + 10.0,
                escape(label)
            );
            x -= 12.0;
        }
        svg.push_str("</svg>");
        svg
    }
}

/// A plot that has nothing to show, saying why, so the page never has a gap
/// or a broken element where a plot would be.
pub fn no_data(title: &str, why: &str) -> String {
    let height = 90.0;
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot no-data" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img"><title>{title}</title><text x="{LEFT}" y="20" class="plot-title">{title}</text><path class="axis" d="M{LEFT} 30H{}V80H{LEFT}z"/><text x="{}" y="60" text-anchor="middle" class="no-data">no data: {why}</text></svg>"#,
        WIDTH - RIGHT,
        WIDTH / 2.0,
        title = escape(title),
        why = escape(why),
    )
}

/// A series thinned for display: per pixel column, its lowest and highest
/// points in their order, so spikes and dips survive that averaging or
/// striding would lose. `points` are sorted by x; at most two points per
/// pixel come back.
pub fn min_max_per_pixel(
    points: &[(f64, f64)],
    x_min: f64,
    x_max: f64,
    pixels: usize,
) -> Vec<(f64, f64)> {
    if points.len() <= 2 * pixels || x_max <= x_min || pixels == 0 {
        return points.to_vec();
    }
    let per_pixel = pixels as f64 / (x_max - x_min);
    let column = |x: f64| (((x - x_min) * per_pixel) as usize).min(pixels - 1);
    let mut thinned = Vec::with_capacity(2 * pixels);
    let mut start = 0;
    while start < points.len() {
        let current = column(points[start].0);
        let mut end = start;
        let (mut low, mut high) = (start, start);
        while end < points.len() && column(points[end].0) == current {
            if points[end].1 < points[low].1 {
                low = end;
            }
            if points[end].1 > points[high].1 {
                high = end;
            }
            end += 1;
        }
        let (first, second) = (low.min(high), low.max(high));
        thinned.push(points[first]);
        if second != first {
            thinned.push(points[second]);
        }
        start = end;
    }
    thinned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_at_most_two_points_per_pixel_and_every_extreme() {
        // 100 Hz for 10 minutes: a flat 100 W with one 1-sample spike and one dip.
        let mut points: Vec<(f64, f64)> = (0..60_000).map(|i| (i as f64 / 100.0, 100.0)).collect();
        points[12_345].1 = 400.0;
        points[40_000].1 = 5.0;
        let thinned = min_max_per_pixel(&points, 0.0, 600.0, 1000);
        assert!(thinned.len() <= 2000, "{}", thinned.len());
        assert!(thinned.contains(&points[12_345]) && thinned.contains(&points[40_000]));
        assert!(
            thinned.windows(2).all(|w| w[0].0 <= w[1].0),
            "time order kept"
        );
        assert_eq!(thinned.first(), points.first());
    }

    #[test]
    fn short_series_and_degenerate_ranges_pass_unchanged() {
        let points = vec![(0.0, 1.0), (1.0, 2.0), (2.0, 0.5)];
        assert_eq!(min_max_per_pixel(&points, 0.0, 2.0, 1000), points);
        assert_eq!(min_max_per_pixel(&points, 1.0, 1.0, 1), points);
        assert!(min_max_per_pixel(&[], 0.0, 1.0, 10).is_empty());
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let scale = Scale::new(0.13, 9.7, 0.0, 100.0);
        assert_eq!(scale.ticks(5.0), [2.0, 4.0, 6.0, 8.0]);
        let single = Scale::new(5.0, 5.0, 0.0, 100.0);
        assert_eq!(single.px(5.0), 50.0);
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
    }

    #[test]
    fn a_plot_has_axis_labels_and_one_path_for_all_dots() {
        let mut plot = Plot::new(
            "t",
            "x (s)",
            0.0,
            10.0,
            YAxis::Linear {
                label: "power (W)".into(),
                min: 0.0,
                max: 100.0,
            },
            300.0,
        );
        let points: Vec<(f64, f64)> = (0..1000)
            .map(|i| (plot.x.px(f64::from(i % 10)), plot.y(50.0)))
            .collect();
        plot.dots("dot", points);
        let svg = plot.finish();
        assert_eq!(svg.matches(r#"class="dot""#).count(), 1);
        assert_eq!(
            svg.matches("h0").count(),
            10,
            "duplicates on one pixel drawn once"
        );
        assert!(svg.contains(">power (W)</text>") && svg.contains(">x (s)</text>"));
    }
}
