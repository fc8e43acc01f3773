//! `berth compare <A> <B>`: the comparison (berth_report::compare) as a
//! table. With `--fail-on metric:+5%` it fails (for CI) when that metric
//! moved significantly past the threshold in the named direction in any
//! configuration.

use std::str::FromStr;

use berth_report::compare::{COLUMNS, Change, Comparison, cells, compare, p_value};
use berth_report::metrics::Groups;

use crate::output::aligned;
use crate::{CliError, Client};

/// `--fail-on metric:+5%`: a rise of the metric past 5% is a regression
/// (`-5%`: a fall past 5%, for metrics where more is better).
#[derive(Debug, Clone, PartialEq)]
pub struct FailOn {
    pub metric: String,
    /// Signed fraction: +0.05 for "+5%".
    pub threshold: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "--fail-on {0}: expected METRIC:+N% (a rise past N% fails) or METRIC:-N% (a fall past N% fails)"
)]
pub struct FailOnSyntax(String);

impl FromStr for FailOn {
    type Err = FailOnSyntax;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || FailOnSyntax(text.to_string());
        let (metric, limit) = text.rsplit_once(':').ok_or_else(error)?;
        let sign = match limit.chars().next() {
            Some('+') => 1.0,
            Some('-') => -1.0,
            _ => return Err(error()),
        };
        let percent: f64 = limit[1..]
            .strip_suffix('%')
            .ok_or_else(error)?
            .trim()
            .parse()
            .map_err(|_| error())?;
        if metric.is_empty() || !percent.is_finite() || percent < 0.0 {
            return Err(error());
        }
        Ok(FailOn {
            metric: metric.to_string(),
            threshold: sign * percent / 100.0,
        })
    }
}

impl FailOn {
    /// Whether the change regresses past the threshold, and significantly.
    fn regressed_by(&self, change: &Change) -> bool {
        let Some(r) = change.ratio else { return false };
        let moved = r.ratio - 1.0;
        change.significant()
            && if self.threshold >= 0.0 {
                moved > self.threshold
            } else {
                moved < self.threshold
            }
    }
}

/// The regressions the `--fail-on` rules find, as lines for people. A rule
/// naming a metric no shared configuration measured is an error: a typo
/// must not pass a CI gate silently.
pub fn regressions(comparison: &Comparison, rules: &[FailOn]) -> Result<Vec<String>, CliError> {
    let mut found = Vec::new();
    for rule in rules {
        let changes: Vec<&Change> = comparison
            .changes
            .iter()
            .filter(|c| c.metric == rule.metric)
            .collect();
        if changes.is_empty() {
            return Err(CliError::Usage(format!(
                "--fail-on {}: no configuration of both campaigns measured {}",
                rule.metric, rule.metric
            )));
        }
        for change in changes.into_iter().filter(|c| rule.regressed_by(c)) {
            let ratio = change.ratio.map_or(1.0, |r| r.ratio);
            found.push(format!(
                "{} {}: {:+.1}% (limit {:+.1}%, p {})",
                change.label,
                change.metric,
                (ratio - 1.0) * 100.0,
                rule.threshold * 100.0,
                change.test.map(|t| p_value(t.p)).unwrap_or_default()
            ));
        }
    }
    Ok(found)
}

/// The comparison as a table for a terminal.
pub fn table(comparison: &Comparison, a_id: &str, b_id: &str) -> String {
    let mut rows = vec![COLUMNS.map(String::from).to_vec()];
    rows.extend(comparison.changes.iter().map(cells));
    let mut out = format!("A: {a_id}\nB: {b_id}\n");
    out.push_str(&aligned(&rows));
    for (side, only) in [("A", &comparison.only_a), ("B", &comparison.only_b)] {
        if !only.is_empty() {
            out.push_str(&format!("only in {side}: {}\n", only.join(", ")));
        }
    }
    out
}

/// A campaign's measured values per (configuration, backend), read over the API.
pub async fn groups(client: &mut Client, id: &str) -> Result<Groups, CliError> {
    let campaign = crate::get_campaign(client, id).await?;
    let runs = crate::export::fetch_runs(client, id).await?;
    Ok(Groups::of(&runs, &campaign.work_metric))
}

/// `berth compare`: prints the table; fails when a `--fail-on` rule finds a regression.
pub async fn run(client: &mut Client, a: &str, b: &str, rules: &[FailOn]) -> Result<(), CliError> {
    let comparison = compare(&groups(client, a).await?, &groups(client, b).await?);
    print!("{}", table(&comparison, a, b));
    let found = regressions(&comparison, rules)?;
    if found.is_empty() {
        Ok(())
    } else {
        Err(CliError::Regressed(found))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use berth_report::metrics::Group;

    use super::*;

    fn groups(pairs: &[(&str, &[f64])]) -> Groups {
        Groups {
            groups: pairs
                .iter()
                .map(|(config, values)| Group {
                    config: config.to_string(),
                    backend: "b".into(),
                    values: BTreeMap::from([("latency_ms".to_string(), values.to_vec())]),
                })
                .collect(),
            metrics: vec!["latency_ms".into()],
        }
    }

    #[test]
    fn a_twenty_percent_slowdown_is_flagged_and_ranked_first() {
        let noise = [100.0, 103.0, 98.0, 101.0, 99.0];
        let slower: Vec<f64> = noise.iter().map(|v| v * 1.2).collect();
        let a = groups(&[("same", &noise), ("slow", &noise), ("gone", &noise)]);
        let b = groups(&[("same", &noise), ("slow", &slower), ("new", &noise)]);
        let comparison = compare(&a, &b);
        assert_eq!(comparison.changes[0].label, "slow");
        assert!(comparison.changes[0].significant());
        assert_eq!(comparison.changes[0].verdict(), "higher (significant)");
        assert!(!comparison.changes[1].significant());
        assert_eq!(
            (comparison.only_a.as_slice(), comparison.only_b.as_slice()),
            (&["gone".to_string()][..], &["new".to_string()][..])
        );

        let rule = |text: &str| vec![text.parse::<FailOn>().unwrap()];
        assert_eq!(
            regressions(&comparison, &rule("latency_ms:+5%"))
                .unwrap()
                .len(),
            1
        );
        assert!(
            regressions(&comparison, &rule("latency_ms:+25%"))
                .unwrap()
                .is_empty()
        );
        assert!(
            regressions(&comparison, &rule("latency_ms:-5%"))
                .unwrap()
                .is_empty()
        );
        assert!(
            regressions(&comparison, &rule("energy_j:+5%")).is_err(),
            "unknown metric"
        );
        let table = table(&comparison, "A", "B");
        assert!(
            table.contains("only in A: gone") && table.contains("only in B: new"),
            "{table}"
        );
    }

    #[test]
    fn fail_on_parses_signed_percentages() {
        assert_eq!(
            "energy_j:+5%".parse(),
            Ok(FailOn {
                metric: "energy_j".into(),
                threshold: 0.05
            })
        );
        assert_eq!("a:b:-2.5%".parse::<FailOn>().unwrap().threshold, -0.025);
        for bad in ["energy_j", "energy_j:5%", "energy_j:+5", ":+5%", "x:+abc%"] {
            assert!(bad.parse::<FailOn>().is_err(), "{bad}");
        }
    }
}
