//! The protocol against a model of an NVIDIA board's power sensor, as SC24
//! measured it on A100/H100 (CI has no GPU; this is the model, named as
//! such): the reading is updated every 100 ms to the mean power of only the
//! last 25 ms, and held in between. A workload whose power follows a 100 ms
//! pattern from its own start (a kernel launched every 100 ms, busy for the
//! first quarter) is then seen through the same quarter of its pattern on
//! every run when runs start in step with the sensor, as a steady
//! scheduler's runs do. The gaps and phase shifts of `Protocol::delay_before`
//! for real run ids must bring the mean over the runs to the true energy.

use std::time::Duration;

use berth_proto::orchestrator::v1::Run;

use super::{GapRange, Protocol};

const UPDATE_MS: u64 = 100;
const WINDOW_MS: u64 = 25;
const RUN_MS: u64 = 1_000;
/// Between one run's end and the next one's start, without a protocol: a
/// multiple of the update period, so every run starts in step.
const BETWEEN_MS: u64 = 200;
const IDLE_W: f64 = 50.0;

/// The workload's power `since` its start: 400 W for the first 25 ms of
/// every 100 ms, 100 W for the rest (175 W on average).
fn workload_w(since_ms: u64) -> f64 {
    if since_ms % UPDATE_MS < WINDOW_MS {
        400.0
    } else {
        100.0
    }
}

const TRUE_RUN_J: f64 = 175.0 * RUN_MS as f64 / 1000.0;

struct Timeline {
    /// [start, end) of each run, in ms.
    runs: Vec<(u64, u64)>,
}

impl Timeline {
    fn true_w(&self, t: u64) -> f64 {
        self.runs
            .iter()
            .find(|(start, end)| (*start..*end).contains(&t))
            .map_or(IDLE_W, |(start, _)| workload_w(t - start))
    }

    /// What the sensor reports at `t`: the mean of the last window before
    /// its latest update.
    fn reading_w(&self, t: u64) -> f64 {
        let update = t / UPDATE_MS * UPDATE_MS;
        let window = update.saturating_sub(WINDOW_MS)..update;
        let n = window.end - window.start;
        if n == 0 {
            return IDLE_W;
        }
        window.map(|ms| self.true_w(ms)).sum::<f64>() / n as f64
    }

    /// Each run's energy as integrating the readings over it gives (a
    /// sample every millisecond: more often than any sampler here).
    fn measured_j(&self) -> Vec<f64> {
        self.runs
            .iter()
            .map(|(start, end)| (*start..*end).map(|t| self.reading_w(t)).sum::<f64>() / 1000.0)
            .collect()
    }
}

/// `cycles` runs one after another, each after the protocol's delay.
fn schedule(protocol: &Protocol, cycles: u32) -> Timeline {
    let mut start = 1_000;
    let mut runs = Vec::new();
    for cycle in 1..=cycles {
        let run = Run {
            id: format!("c-7f3a/model/b/{cycle}"),
            cycle,
            ..Default::default()
        };
        start += protocol.delay_before(&run).as_millis() as u64;
        runs.push((start, start + RUN_MS));
        start += RUN_MS + BETWEEN_MS;
    }
    Timeline { runs }
}

fn mean_error(protocol: &Protocol, cycles: u32) -> f64 {
    let measured = schedule(protocol, cycles).measured_j();
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    (mean - TRUE_RUN_J) / TRUE_RUN_J
}

#[test]
fn runs_in_step_with_the_sensor_are_measurably_wrong() {
    let error = mean_error(&Protocol::default(), 20);
    // Every run is seen through the quarter at 100 W: 100 J for 175 J.
    assert!(error < -0.40, "naive error {:.1}%", error * 100.0);
}

#[test]
fn phase_shifted_starts_see_every_part_of_the_period() {
    let protocol = Protocol {
        phase_shift: Some(Duration::from_millis(UPDATE_MS)),
        ..Default::default()
    };
    for cycles in [4, 8, 20] {
        let error = mean_error(&protocol, cycles);
        assert!(
            error.abs() < 0.05,
            "{cycles} cycles: {:.1}% off",
            error * 100.0
        );
    }
}

#[test]
fn random_gaps_with_phase_shifts_come_within_five_percent() {
    let protocol = Protocol {
        gap: Some(GapRange {
            min: Duration::from_millis(50),
            max: Duration::from_millis(250),
        }),
        phase_shift: Some(Duration::from_millis(UPDATE_MS)),
        ..Default::default()
    };
    let error = mean_error(&protocol, 40);
    assert!(error.abs() < 0.05, "{:.1}% off", error * 100.0);
    let naive = mean_error(&Protocol::default(), 40);
    assert!(error.abs() * 5.0 < naive.abs(), "{error} vs naive {naive}");
}
