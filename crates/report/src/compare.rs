//! Campaign B against campaign A: per (configuration, backend) present in
//! both and per metric both measured, the ratio of B's mean to A's with its
//! 95% interval and Welch's t-test, ranked by the size of the change; the
//! pairs only one side has are listed. `berth compare` prints it and gates
//! CI on it; the report draws it (`--against`).

use crate::metrics::{Group, Groups};
use crate::number;
use crate::stats::{FEW_RUNS, Ratio, Summary, bootstrap_p, ratio, significant, summarize, welch};

/// One metric of one (configuration, backend) in both campaigns.
#[derive(Debug)]
pub struct Change {
    /// The configuration's name for people (with its backend when there are several).
    pub label: String,
    pub metric: String,
    pub a: Summary,
    pub b: Summary,
    /// Absent when A's mean is 0 or the means' signs differ.
    pub ratio: Option<Ratio>,
    /// Absent when a side has a single run.
    pub test: Option<Test>,
}

/// A significance test's two-sided p-value, and which test gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Test {
    pub p: f64,
    pub method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    Welch,
    /// Fewer than [`FEW_RUNS`] runs on a side.
    Bootstrap,
}

impl Test {
    /// Welch's t-test, or the bootstrap when a side has fewer than
    /// [`FEW_RUNS`] runs.
    fn of(a: &[f64], b: &[f64], sa: &Summary, sb: &Summary) -> Option<Test> {
        if a.len().min(b.len()) < FEW_RUNS {
            bootstrap_p(a, b).map(|p| Test {
                p,
                method: Method::Bootstrap,
            })
        } else {
            welch(sa, sb).map(|w| Test {
                p: w.p,
                method: Method::Welch,
            })
        }
    }
}

impl Change {
    pub fn significant(&self) -> bool {
        self.test.is_some_and(|t| significant(t.p))
    }

    pub fn verdict(&self) -> &'static str {
        match self.test {
            None => "too few runs",
            Some(_) if !self.significant() => "no significant change",
            Some(t) if t.method == Method::Bootstrap && self.b.mean > self.a.mean => {
                "higher (significant, bootstrap: few runs)"
            }
            Some(t) if t.method == Method::Bootstrap => "lower (significant, bootstrap: few runs)",
            Some(_) if self.b.mean > self.a.mean => "higher (significant)",
            Some(_) => "lower (significant)",
        }
    }

    /// How big the change is, for ranking: |ln(B/A)|.
    fn size(&self) -> f64 {
        self.ratio.map_or(0.0, |r| r.ratio.ln().abs())
    }
}

#[derive(Debug, Default)]
pub struct Comparison {
    /// Largest change first.
    pub changes: Vec<Change>,
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
}

fn same_pair(x: &Group, y: &Group) -> bool {
    x.config == y.config && x.backend == y.backend
}

pub fn compare(a: &Groups, b: &Groups) -> Comparison {
    let mut comparison = Comparison::default();
    for group_a in &a.groups {
        let Some(group_b) = b.groups.iter().find(|g| same_pair(g, group_a)) else {
            comparison.only_a.push(a.label(group_a));
            continue;
        };
        for (metric, values_a) in &group_a.values {
            let Some(values_b) = group_b.values.get(metric) else {
                continue;
            };
            let (Some(sa), Some(sb)) = (summarize(values_a), summarize(values_b)) else {
                continue;
            };
            comparison.changes.push(Change {
                label: a.label(group_a),
                metric: metric.clone(),
                a: sa,
                b: sb,
                ratio: ratio(&sa, &sb),
                test: Test::of(values_a, values_b, &sa, &sb),
            });
        }
    }
    comparison.only_b = b
        .groups
        .iter()
        .filter(|g| !a.groups.iter().any(|x| same_pair(x, g)))
        .map(|g| b.label(g))
        .collect();
    comparison
        .changes
        .sort_by(|x, y| y.size().total_cmp(&x.size()));
    comparison
}

fn interval(ratio: Option<Ratio>) -> String {
    match ratio.and_then(|r| r.ci95) {
        Some((low, high)) => format!("{}–{}", number(low), number(high)),
        None => "—".into(),
    }
}

/// A p-value for people: tiny ones are bounded, not shown as 0.
pub fn p_value(p: f64) -> String {
    if p < 1e-4 {
        "<0.0001".into()
    } else {
        number(p)
    }
}

/// The columns of a comparison, in the terminal and in the report.
pub const COLUMNS: [&str; 8] = [
    "configuration",
    "metric",
    "A mean (n)",
    "B mean (n)",
    "B/A",
    "95% CI of B/A",
    "p (Welch; bootstrap < 5 runs)",
    "verdict",
];

/// A change's cells under [`COLUMNS`].
pub fn cells(change: &Change) -> Vec<String> {
    vec![
        change.label.clone(),
        change.metric.clone(),
        format!("{} ({})", number(change.a.mean), change.a.n),
        format!("{} ({})", number(change.b.mean), change.b.n),
        change
            .ratio
            .map(|r| number(r.ratio))
            .unwrap_or_else(|| "—".into()),
        interval(change.ratio),
        change
            .test
            .map(|t| p_value(t.p))
            .unwrap_or_else(|| "—".into()),
        change.verdict().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn one(values: &[f64]) -> Groups {
        Groups {
            groups: vec![Group {
                config: "c".into(),
                backend: "b".into(),
                values: BTreeMap::from([("latency_ms".to_string(), values.to_vec())]),
            }],
            metrics: vec!["latency_ms".into()],
        }
    }

    #[test]
    fn few_runs_are_judged_by_the_bootstrap_and_one_run_not_at_all() {
        let change = |a: &[f64], b: &[f64]| compare(&one(a), &one(b)).changes.remove(0);
        let slower = change(&[100.0, 101.0, 99.0], &[120.0, 121.0, 119.0]);
        assert_eq!(slower.test.map(|t| t.method), Some(Method::Bootstrap));
        assert_eq!(
            slower.verdict(),
            "higher (significant, bootstrap: few runs)"
        );
        let five = [100.0, 101.0, 99.0, 100.5, 99.5];
        let many = change(&five, &five.map(|v| v * 1.2));
        assert_eq!(many.test.map(|t| t.method), Some(Method::Welch));
        assert_eq!(many.verdict(), "higher (significant)");
        assert_eq!(change(&[100.0], &[120.0]).verdict(), "too few runs");
    }
}
