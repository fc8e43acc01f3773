//! The power over a run, from its stored series (GetRunPowerSeries): a line
//! per device (thinned to the lowest and highest reading per pixel), the
//! run's window, its idle baseline when one was measured; and per device the
//! energy three ways: as recorded with the run, the hardware counter's rise
//! over the samples, and the samples' power integrated (trapezoids).

use berth_proto::orchestrator::v1::{Run, RunPowerSample};

use super::ReportData;
use super::html::{escape, section, table};
use super::metrics::{duration_seconds, seconds};
use super::svg::{Key, Plot, YAxis, min_max_per_pixel, no_data};
use crate::number;

const HEIGHT: f64 = 320.0;
/// Line classes, one per device in turn (html.rs styles four).
const SERIES_CLASSES: [&str; 4] = ["s0", "s1", "s2", "s3"];

/// What one device's samples of a run say.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFacts {
    pub device: String,
    pub samples: usize,
    /// Distinct power readings: a sensor that updates slower than it is
    /// read repeats itself.
    pub distinct: usize,
    /// The counter's rise from the first sample to the last, when it has one.
    pub counter_j: Option<f64>,
    /// The power integrated over the samples, when they carry power.
    pub integrated_j: Option<f64>,
    /// The median time between changes of the reading: how often the
    /// sensor really updates.
    pub update_period_s: Option<f64>,
    /// (elapsed seconds, watts), in time order.
    pub points: Vec<(f64, f64)>,
}

/// Per device (in the order first seen), what its samples say.
pub fn device_facts(samples: &[RunPowerSample]) -> Vec<DeviceFacts> {
    let mut devices: Vec<(&str, Vec<&RunPowerSample>)> = Vec::new();
    for sample in samples {
        match devices.iter_mut().find(|(d, _)| *d == sample.device) {
            Some((_, list)) => list.push(sample),
            None => devices.push((&sample.device, vec![sample])),
        }
    }
    devices
        .into_iter()
        .map(|(device, list)| facts(device, &list))
        .collect()
}

fn facts(device: &str, samples: &[&RunPowerSample]) -> DeviceFacts {
    let elapsed = |s: &RunPowerSample| s.elapsed.as_ref().map(seconds);
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((elapsed(s)?, s.power_w?)))
        .collect();
    let counters: Vec<f64> = samples.iter().filter_map(|s| s.energy_j).collect();
    let counter_j = (counters.len() > 1).then(|| counters[counters.len() - 1] - counters[0]);
    let integrated_j = (points.len() > 1).then(|| {
        points
            .windows(2)
            .map(|w| (w[0].1 + w[1].1) / 2.0 * (w[1].0 - w[0].0))
            .sum()
    });
    let mut distinct: Vec<u64> = points.iter().map(|(_, w)| w.to_bits()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut changes: Vec<f64> = Vec::new();
    let mut last_change: Option<(f64, f64)> = None;
    for &(t, w) in &points {
        match last_change {
            Some((since, value)) if value != w => {
                changes.push(t - since);
                last_change = Some((t, w));
            }
            None => last_change = Some((t, w)),
            Some(_) => {}
        }
    }
    changes.sort_by(f64::total_cmp);
    DeviceFacts {
        device: device.to_string(),
        samples: samples.len(),
        distinct: distinct.len(),
        counter_j,
        integrated_j,
        update_period_s: changes.get(changes.len() / 2).copied(),
        points,
    }
}

pub fn render(data: &ReportData) -> String {
    let note = "One run per configuration (its first measured run that stored samples). The shaded band is the run's window; the dashed line the idle baseline measured before it, when there is one.";
    let mut html = String::new();
    if data.series.is_empty() {
        let why = if data.runs.iter().any(|r| !r.energy.is_empty()) {
            "no measured run stored power samples"
        } else {
            "the campaign's runs carry no power data (it does not measure power, or no run got that far)"
        };
        html.push_str(&no_data("Power over a run", why));
    }
    for (run_id, samples) in &data.series {
        let Some(run) = data.runs.iter().find(|r| r.id == *run_id) else {
            continue;
        };
        html.push_str(&run_section(run, samples));
    }
    section("power", "Power over a run", note, &html)
}

fn run_section(run: &Run, samples: &[RunPowerSample]) -> String {
    let devices = device_facts(samples);
    let title = format!("Power during {}", run.id);
    let duration = duration_seconds(run).unwrap_or(0.0);
    let x_max = devices
        .iter()
        .filter_map(|d| d.points.last().map(|p| p.0))
        .fold(duration, f64::max);
    let y_max = devices
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    if devices.iter().all(|d| d.points.is_empty()) {
        return no_data(&title, "its samples carry no power readings");
    }
    let mut plot = Plot::new(
        &title,
        "time since the run's power session opened (s)",
        0.0,
        x_max,
        YAxis::Linear {
            label: "power (W)".into(),
            min: 0.0,
            max: y_max * 1.1,
        },
        HEIGHT,
    );
    let (top, bottom) = (plot.y(y_max * 1.1), plot.y(0.0));
    let (x0, x1) = (plot.x.px(0.0), plot.x.px(duration));
    plot.path(
        "window",
        &format!("M{x0:.1} {top:.1}H{x1:.1}V{bottom:.1}H{x0:.1}z"),
    );
    plot.legend("window", "run window", Key::Box);
    for (i, device) in devices.iter().enumerate() {
        let class = SERIES_CLASSES[i % SERIES_CLASSES.len()];
        let thinned = min_max_per_pixel(&device.points, 0.0, x_max, plot.pixels());
        let pixels: Vec<(f64, f64)> = thinned
            .iter()
            .map(|&(t, w)| (plot.x.px(t), plot.y(w)))
            .collect();
        plot.line(class, pixels);
        plot.legend(class, &device.device, Key::Line);
    }
    // The idle baseline: the energy above it is recorded per device; the
    // difference over the run's duration is the baseline's power.
    let baseline: Vec<f64> = run
        .energy
        .iter()
        .filter_map(|e| Some((e.energy_j? - e.energy_net_j?) / duration))
        .filter(|w| w.is_finite())
        .collect();
    for watts in &baseline {
        let y = plot.y(*watts);
        plot.path(
            "baseline",
            &format!("M{x0:.1} {y:.1}H{:.1}", plot.x.px(x_max)),
        );
    }
    if !baseline.is_empty() {
        plot.legend("baseline", "idle baseline", Key::Line);
    }
    let optional = |v: Option<f64>| v.map(number).unwrap_or_else(|| "—".into());
    let rows = devices.iter().map(|device| {
        let recorded = run.energy.iter().find(|e| e.device == device.device);
        let difference = device
            .counter_j
            .zip(device.integrated_j)
            .filter(|(c, _)| *c != 0.0)
            .map(|(c, i)| format!("{:+.1}%", (i - c) / c * 100.0));
        (
            vec![
                device.device.clone(),
                recorded.map(|e| e.method.clone()).unwrap_or_default(),
                optional(recorded.and_then(|e| e.energy_j)),
                optional(device.counter_j),
                optional(device.integrated_j),
                difference.unwrap_or_else(|| "—".into()),
                recorded
                    .map(|e| format!("{:.0}%", e.coverage * 100.0))
                    .unwrap_or_default(),
                device.samples.to_string(),
                device.distinct.to_string(),
                optional(device.update_period_s.map(|s| s * 1000.0)),
                recorded
                    .map(|e| if e.replay { "replayed" } else { "measured" }.to_string())
                    .unwrap_or_default(),
            ],
            "",
        )
    });
    format!(
        "<h3>{}</h3>{}{}",
        escape(&run.id),
        plot.finish(),
        table(
            &[
                "device",
                "method",
                "recorded J",
                "counter J",
                "integrated J",
                "integrated vs counter",
                "coverage",
                "samples",
                "distinct readings",
                "update period (ms)",
                "source",
            ],
            rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(device: &str, t: f64, watts: f64, counter: f64) -> RunPowerSample {
        RunPowerSample {
            device: device.into(),
            elapsed: Some(prost_types::Duration {
                seconds: t.trunc() as i64,
                nanos: (t.fract() * 1e9).round() as i32,
            }),
            power_w: Some(watts),
            energy_j: Some(counter),
            ..Default::default()
        }
    }

    #[test]
    fn facts_integrate_power_read_the_counter_and_find_the_update_period() {
        // Read every 10 ms, but the sensor updates every 50 ms: 100 W, then 200 W.
        let samples: Vec<RunPowerSample> = (0..=20)
            .map(|i| {
                let t = f64::from(i) * 0.01;
                let watts = if (i / 5) % 2 == 0 { 100.0 } else { 200.0 };
                sample("gpu0", t, watts, 1000.0 + 30.0 * t)
            })
            .collect();
        let facts = device_facts(&samples);
        assert_eq!(facts.len(), 1);
        let gpu = &facts[0];
        assert_eq!((gpu.samples, gpu.distinct), (21, 2));
        assert!((gpu.counter_j.unwrap() - 6.0).abs() < 1e-9);
        assert!(
            (gpu.update_period_s.unwrap() - 0.05).abs() < 1e-9,
            "{gpu:?}"
        );
        // Trapezoids over 0.2 s of 100/200 W steps.
        assert!((gpu.integrated_j.unwrap() - 30.0).abs() < 1e-9, "{gpu:?}");
    }
}
