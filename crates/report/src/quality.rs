//! How far the energy figures can be trusted: per (configuration, backend)
//! and device, the runs' coverage (the fraction of the run the samples
//! span) and sample counts, and the runs flagged: low coverage, too few
//! samples, shorter than the sensor's update period (its reading then
//! cannot have followed the run), or no energy at all.

use std::collections::BTreeMap;

use berth_proto::orchestrator::v1::Run;

use super::ReportData;
use super::html::{section, table};
use super::metrics::{duration_seconds, is_measured};
use super::power::device_facts;
use crate::number;

/// Coverage under which a run's energy is flagged.
const MIN_COVERAGE: f64 = 0.9;
/// Samples under which a run's energy is flagged (two make one interval).
const MIN_SAMPLES: u64 = 3;
/// Flagged runs named per row; the rest are counted.
const NAMED_FLAGS: usize = 3;

struct Row<'a> {
    runs: usize,
    coverage_sum: f64,
    coverage_min: f64,
    samples_min: u64,
    flagged: Vec<(&'a str, String)>,
}

pub fn render(data: &ReportData) -> String {
    let note = format!(
        "Measured runs. Flagged: coverage under {:.0}%, fewer than {MIN_SAMPLES} samples, a run shorter than its device's update period (median time between changes of the reading, from the plotted series), or no energy.",
        MIN_COVERAGE * 100.0
    );
    let measured: Vec<&Run> = data.runs.iter().filter(|r| is_measured(r)).collect();
    if !measured.iter().any(|r| !r.energy.is_empty()) {
        return section(
            "quality",
            "Measurement quality",
            &note,
            "<p class=\"no-data\">no data: no measured run carries energy (the campaign does not measure power, or no run got that far).</p>",
        );
    }
    // The update period of each device, from the series the report fetched.
    let mut periods: BTreeMap<String, f64> = BTreeMap::new();
    for (_, samples) in &data.series {
        for facts in device_facts(samples) {
            if let Some(period) = facts.update_period_s {
                let entry = periods.entry(facts.device).or_insert(period);
                *entry = entry.max(period);
            }
        }
    }
    let mut rows: BTreeMap<(u32, &str, &str, String), Row<'_>> = BTreeMap::new();
    let mut order: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for run in measured {
        let rank = order.len() as u32;
        let rank = *order.entry((&run.config, &run.backend)).or_insert(rank);
        let duration = duration_seconds(run).unwrap_or(0.0);
        if run.energy.is_empty() || run.energy_j.is_none() {
            let row = rows
                .entry((rank, &run.config, &run.backend, "(all)".into()))
                .or_default();
            row.runs += 1;
            row.flagged.push((&run.id, "no energy".into()));
        }
        for energy in &run.energy {
            let row = rows
                .entry((rank, &run.config, &run.backend, energy.device.clone()))
                .or_default();
            row.runs += 1;
            row.coverage_sum += energy.coverage;
            row.coverage_min = row.coverage_min.min(energy.coverage);
            row.samples_min = row.samples_min.min(energy.samples);
            let period = periods.get(&energy.device).copied();
            let why = if energy.coverage < MIN_COVERAGE {
                Some(format!("coverage {:.0}%", energy.coverage * 100.0))
            } else if energy.samples < MIN_SAMPLES {
                Some(format!("{} samples", energy.samples))
            } else {
                period.filter(|p| duration < *p).map(|period| {
                    format!(
                        "{} s run, {} s update period",
                        number(duration),
                        number(period)
                    )
                })
            };
            row.flagged.extend(why.map(|why| (run.id.as_str(), why)));
        }
    }
    let body = rows.into_iter().map(|((_, config, backend, device), row)| {
        let mut flags: Vec<String> = row
            .flagged
            .iter()
            .take(NAMED_FLAGS)
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        if row.flagged.len() > NAMED_FLAGS {
            flags.push(format!("… {} more", row.flagged.len() - NAMED_FLAGS));
        }
        let measured = row.runs - row.flagged.len().min(row.runs);
        let has_energy = row.coverage_min.is_finite();
        (
            vec![
                format!("{config} · {backend}"),
                device.clone(),
                row.runs.to_string(),
                if has_energy {
                    format!("{:.0}%", row.coverage_min * 100.0)
                } else {
                    "—".into()
                },
                if has_energy {
                    format!("{:.0}%", row.coverage_sum / (row.runs as f64) * 100.0)
                } else {
                    "—".into()
                },
                if has_energy {
                    row.samples_min.to_string()
                } else {
                    "—".into()
                },
                periods
                    .get(&device)
                    .map(|p| number(p * 1000.0))
                    .unwrap_or_else(|| "—".into()),
                measured.to_string(),
                flags.join("; "),
            ],
            if row.flagged.is_empty() { "" } else { "flag" },
        )
    });
    let html = table(
        &[
            "configuration",
            "device",
            "runs",
            "min coverage",
            "mean coverage",
            "min samples",
            "update period (ms)",
            "runs not flagged",
            "flagged runs",
        ],
        body,
    );
    section("quality", "Measurement quality", &note, &html)
}

/// An empty row: its minimums start above any value.
impl Default for Row<'_> {
    fn default() -> Self {
        Self {
            runs: 0,
            coverage_sum: 0.0,
            coverage_min: f64::INFINITY,
            samples_min: u64::MAX,
            flagged: Vec::new(),
        }
    }
}
