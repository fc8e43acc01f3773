//! Measurement quality per run and device, judged from the samples the
//! orchestrator stores with the run: how often the sensor really updated,
//! how many updates the run's window spans, whether the energy counter and
//! the integrated power agree, and flags for what makes a figure doubtful.
//! A power sensor updates every ~100 ms on most NVIDIA boards but may
//! average only part of that period (Yang et al., SC24): a run spanning
//! few updates is measured on a fraction of its time.

use std::time::Duration;

use berth_proto::orchestrator::v1::{RunEnergy, RunPowerSample};

use crate::store::PowerSeries;

/// Fewer sensor update periods than this in a run's window: `short_window`.
pub const MIN_WINDOW_PERIODS: f64 = 10.0;
/// Samples covering less of the run than this: `low_coverage`.
pub const MIN_COVERAGE: f64 = 0.9;
/// Fewer distinct power values than this: `few_readings`.
pub const MIN_DISTINCT_READINGS: u64 = 3;
/// Counter and integrated energy further apart than this: `counter_integration_gap`.
pub const MAX_COUNTER_GAP: f64 = 0.05;

pub const SHORT_WINDOW: &str = "short_window";
pub const LOW_COVERAGE: &str = "low_coverage";
pub const FEW_READINGS: &str = "few_readings";
pub const COUNTER_INTEGRATION_GAP: &str = "counter_integration_gap";
pub const PARTIAL_SERIES: &str = "partial_series";
/// The thermal gate's `max_wait` passed before the devices cooled.
pub const HOT_START: &str = "hot_start";

/// Sets each device's quality figures and flags from its samples in
/// `series`, and with a `rise_time` its steady-state power and energy.
pub fn assess(energy: &mut [RunEnergy], series: &PowerSeries, rise_time: Option<Duration>) {
    for device in energy.iter_mut() {
        let samples: Vec<&RunPowerSample> = series
            .samples
            .iter()
            .filter(|s| s.device == device.device)
            .collect();
        assess_device(device, &samples, series.truncated);
        if let Some(rise_time) = rise_time {
            steady_state(device, &samples, rise_time.as_secs_f64());
        }
    }
}

/// The device's power and energy over its readings after `rise_seconds`.
fn steady_state(device: &mut RunEnergy, samples: &[&RunPowerSample], rise_seconds: f64) {
    let steady: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((elapsed(s)?, s.power_w?)))
        .filter(|(at, _)| *at >= rise_seconds)
        .collect();
    if steady.is_empty() {
        return;
    }
    device.steady_mean_w = Some(steady.iter().map(|(_, w)| w).sum::<f64>() / steady.len() as f64);
    device.energy_steady_j = Some(
        steady
            .windows(2)
            .map(|pair| pair[0].1 * (pair[1].0 - pair[0].0))
            .sum(),
    );
}

fn elapsed(sample: &RunPowerSample) -> Option<f64> {
    let e = sample.elapsed.as_ref()?;
    Some(e.seconds as f64 + f64::from(e.nanos) / 1e9)
}

fn assess_device(device: &mut RunEnergy, samples: &[&RunPowerSample], truncated: bool) {
    let readings: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((elapsed(s)?, s.power_w?)))
        .collect();
    // When the value changed: the sensor's updates as the sampler saw them.
    let changes: Vec<f64> = readings
        .windows(2)
        .filter(|pair| pair[0].1 != pair[1].1)
        .map(|pair| pair[1].0)
        .collect();
    device.distinct_readings = if readings.is_empty() {
        0
    } else {
        changes.len() as u64 + 1
    };
    let mut gaps: Vec<f64> = changes.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    device.update_period_s = gaps.get(gaps.len() / 2).copied().filter(|p| *p > 0.0);
    let window = match (readings.first(), readings.last()) {
        (Some(first), Some(last)) => last.0 - first.0,
        _ => 0.0,
    };
    device.window_periods = device.update_period_s.map(|period| window / period);
    device.counter_vs_integrated = counter_gap(samples, &readings);

    let mut flags = Vec::new();
    if device
        .window_periods
        .is_some_and(|w| w < MIN_WINDOW_PERIODS)
    {
        flags.push(SHORT_WINDOW);
    }
    if device.coverage < MIN_COVERAGE {
        flags.push(LOW_COVERAGE);
    }
    if device.distinct_readings < MIN_DISTINCT_READINGS {
        flags.push(FEW_READINGS);
    }
    if device
        .counter_vs_integrated
        .is_some_and(|gap| gap.abs() > MAX_COUNTER_GAP)
    {
        flags.push(COUNTER_INTEGRATION_GAP);
    }
    if truncated {
        flags.push(PARTIAL_SERIES);
    }
    device.quality_flags = flags.into_iter().map(str::to_string).collect();
}

/// (integrated power − counter rise) / counter rise over the samples, for a
/// device whose samples carry its energy counter.
fn counter_gap(samples: &[&RunPowerSample], readings: &[(f64, f64)]) -> Option<f64> {
    let counters: Vec<f64> = samples.iter().filter_map(|s| s.energy_j).collect();
    let rise = counters.last()? - counters.first()?;
    if rise <= 0.0 || readings.len() < 2 {
        return None;
    }
    // Each reading stands for the interval up to the next one.
    let integrated: f64 = readings
        .windows(2)
        .map(|pair| pair[0].1 * (pair[1].0 - pair[0].0))
        .sum();
    Some((integrated - rise) / rise)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device read every 10 ms whose sensor updates every `period_ms`:
    /// the value steps between 100 W and 200 W at each update; its counter
    /// follows the power exactly.
    fn series(device: &str, samples: usize, period_ms: usize) -> Vec<RunPowerSample> {
        let mut energy = 0.0;
        (0..samples)
            .map(|i| {
                let power = if (i * 10 / period_ms).is_multiple_of(2) {
                    100.0
                } else {
                    200.0
                };
                let sample = RunPowerSample {
                    device: device.into(),
                    elapsed: Some(
                        prost_types::Duration {
                            seconds: 0,
                            nanos: (i * 10_000_000) as i32,
                        }
                        .normalized(),
                    ),
                    power_w: Some(power),
                    energy_j: Some(energy),
                    ..Default::default()
                };
                energy += power * 0.01;
                sample
            })
            .collect()
    }

    fn device(name: &str, coverage: f64) -> RunEnergy {
        RunEnergy {
            device: name.into(),
            coverage,
            ..Default::default()
        }
    }

    #[test]
    fn the_update_period_and_window_are_seen_and_a_short_window_flagged() {
        // 2 s read every 10 ms, updates every 100 ms: 20 periods, no flag.
        let long = PowerSeries {
            samples: series("gpu0", 200, 100),
            truncated: false,
        };
        let mut energy = vec![device("gpu0", 1.0)];
        assess(&mut energy, &long, None);
        let gpu = &energy[0];
        assert_eq!(gpu.distinct_readings, 20);
        assert!((gpu.update_period_s.unwrap() - 0.1).abs() < 1e-9, "{gpu:?}");
        assert!((gpu.window_periods.unwrap() - 19.9).abs() < 1e-6, "{gpu:?}");
        assert!(gpu.counter_vs_integrated.unwrap().abs() < 1e-9, "{gpu:?}");
        assert!(gpu.quality_flags.is_empty(), "{gpu:?}");
        // 0.3 s: 3 periods.
        let short = PowerSeries {
            samples: series("gpu0", 30, 100),
            truncated: true,
        };
        let mut energy = vec![device("gpu0", 0.5)];
        assess(&mut energy, &short, None);
        assert_eq!(
            energy[0].quality_flags,
            [SHORT_WINDOW, LOW_COVERAGE, PARTIAL_SERIES]
        );
    }

    #[test]
    fn the_rise_time_is_left_out_of_the_steady_state_figures() {
        // 1 s read every 10 ms: 300 W for the first 200 ms, then 100 W.
        let samples: Vec<RunPowerSample> = (0..100)
            .map(|i| RunPowerSample {
                device: "gpu0".into(),
                elapsed: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: i * 10_000_000,
                }),
                power_w: Some(if i < 20 { 300.0 } else { 100.0 }),
                ..Default::default()
            })
            .collect();
        let series = PowerSeries {
            samples,
            truncated: false,
        };
        let mut energy = vec![device("gpu0", 1.0)];
        assess(&mut energy, &series, Some(Duration::from_millis(200)));
        assert_eq!(energy[0].steady_mean_w, Some(100.0));
        // 79 intervals of 10 ms at 100 W.
        assert!((energy[0].energy_steady_j.unwrap() - 79.0).abs() < 1e-9);
        let mut without = vec![device("gpu0", 1.0)];
        assess(&mut without, &series, None);
        assert_eq!(without[0].steady_mean_w, None);
        let mut past_the_run = vec![device("gpu0", 1.0)];
        assess(&mut past_the_run, &series, Some(Duration::from_secs(5)));
        assert_eq!(past_the_run[0].energy_steady_j, None);
    }

    #[test]
    fn a_steady_reading_and_a_disagreeing_counter_are_flagged() {
        let mut samples = series("gpu0", 100, 10_000);
        // The counter rises twice as fast as the power says.
        for (i, sample) in samples.iter_mut().enumerate() {
            sample.energy_j = Some(i as f64 * 2.0);
        }
        let mut energy = vec![device("gpu0", 1.0), device("rapl:0", 1.0)];
        assess(
            &mut energy,
            &PowerSeries {
                samples,
                truncated: false,
            },
            None,
        );
        let gpu = &energy[0];
        assert_eq!((gpu.distinct_readings, gpu.update_period_s), (1, None));
        assert!(
            (gpu.counter_vs_integrated.unwrap() + 0.5).abs() < 1e-9,
            "{gpu:?}"
        );
        assert_eq!(gpu.quality_flags, [FEW_READINGS, COUNTER_INTEGRATION_GAP]);
        // A device without samples has nothing to judge but says so.
        assert_eq!(energy[1].distinct_readings, 0);
        assert_eq!(energy[1].quality_flags, [FEW_READINGS]);
    }
}
