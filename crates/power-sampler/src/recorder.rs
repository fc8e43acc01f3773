//! What an open session keeps, fed by the sampling threads: running figures
//! per device (exact, unbounded in time) and the stored series (bounded).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::energy::{DeviceStats, EnergyAccumulator};
use crate::reading::Reading;

/// A device as a session records it.
#[derive(Debug, Clone, Copy)]
pub struct RecordedDevice {
    /// The sampler that reads it, and its index there.
    pub sampler: usize,
    pub index: u16,
    /// Integrate its power (false where the power is derived from the counter).
    pub integrate: bool,
    pub counter_range_j: Option<f64>,
}

/// One stored sample: the reading and the session device it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Index into the session's devices.
    pub device: u16,
    pub reading: Reading,
}

/// A device's figures at the end of a session.
#[derive(Debug, Clone)]
pub struct DeviceOutcome {
    pub stats: DeviceStats,
    /// Mean power over the idle baseline, when one was measured and saw samples.
    pub baseline_w: Option<f64>,
}

/// Everything a closed session recorded.
#[derive(Debug)]
pub struct Recording {
    pub devices: Vec<DeviceOutcome>,
    pub series: Vec<Point>,
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Measuring idle power; nothing is stored.
    Baseline,
    Measuring {
        start: Duration,
    },
    Closed,
}

pub struct Recorder {
    state: Mutex<State>,
}

struct State {
    phase: Phase,
    devices: Vec<Slot>,
    max_gap: Duration,
    series: Vec<Point>,
    series_limit: usize,
    truncated: bool,
}

struct Slot {
    device: RecordedDevice,
    accumulator: EnergyAccumulator,
    baseline_w: Option<f64>,
}

impl Recorder {
    /// A recorder that starts at `at`, with an idle baseline first when
    /// `baseline` (then [`Recorder::begin_measurement`] ends it).
    pub fn new(
        devices: &[RecordedDevice],
        rate_hz: f64,
        at: Duration,
        baseline: bool,
        series_limit: usize,
    ) -> Self {
        // Samples further apart than two periods mean the sampler missed one.
        let max_gap = Duration::from_secs_f64(2.0 / rate_hz);
        let slots = devices
            .iter()
            .map(|device| Slot {
                device: *device,
                accumulator: EnergyAccumulator::new(
                    at,
                    max_gap,
                    device.integrate,
                    device.counter_range_j,
                ),
                baseline_w: None,
            })
            .collect();
        Self {
            state: Mutex::new(State {
                phase: if baseline {
                    Phase::Baseline
                } else {
                    Phase::Measuring { start: at }
                },
                devices: slots,
                max_gap,
                series: Vec::new(),
                series_limit,
                truncated: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere
        // while holding it leaves nothing half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the readings of one tick of sampler `sampler`.
    pub fn record(&self, sampler: usize, readings: &[Reading]) {
        let mut state = self.lock();
        let State {
            phase,
            devices,
            series,
            series_limit,
            truncated,
            ..
        } = &mut *state;
        let start = match *phase {
            Phase::Closed => return,
            Phase::Baseline => None,
            Phase::Measuring { start } => Some(start),
        };
        for reading in readings {
            let Some(slot) = devices
                .iter()
                .position(|s| s.device.sampler == sampler && s.device.index == reading.device)
            else {
                continue;
            };
            devices[slot].accumulator.push(reading);
            if start.is_some_and(|start| reading.at >= start) {
                if series.len() < *series_limit {
                    series.push(Point {
                        device: slot as u16,
                        reading: *reading,
                    });
                } else {
                    *truncated = true;
                }
            }
        }
    }

    /// Ends the idle baseline at `at`: its mean power becomes each device's
    /// baseline and measuring starts from `at`.
    pub fn begin_measurement(&self, at: Duration) {
        let mut state = self.lock();
        if state.phase != Phase::Baseline {
            return;
        }
        let max_gap = state.max_gap;
        for slot in &mut state.devices {
            let idle = slot.accumulator.finish(at);
            slot.baseline_w = (idle.samples > 0).then_some(idle.mean_w);
            slot.accumulator = EnergyAccumulator::new(
                at,
                max_gap,
                slot.device.integrate,
                slot.device.counter_range_j,
            );
        }
        state.phase = Phase::Measuring { start: at };
    }

    /// Stops recording at `at` and hands over what was recorded; later
    /// readings are ignored.
    pub fn close(&self, at: Duration) -> Recording {
        let mut state = self.lock();
        state.phase = Phase::Closed;
        Recording {
            devices: state
                .devices
                .iter()
                .map(|slot| DeviceOutcome {
                    stats: slot.accumulator.finish(at),
                    baseline_w: slot.baseline_w,
                })
                .collect(),
            series: std::mem::take(&mut state.series),
            truncated: state.truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn reading(device: u16, at: u64, power: f64) -> Reading {
        Reading {
            device,
            at: ms(at),
            power_w: Some(power),
            ..Reading::default()
        }
    }

    const GPU: RecordedDevice = RecordedDevice {
        sampler: 1,
        index: 0,
        integrate: true,
        counter_range_j: None,
    };

    #[test]
    fn baseline_then_measurement() {
        // 100 Hz: a 20 ms gap allowed. Idle at 50 W for 100 ms, then 250 W.
        let recorder = Recorder::new(&[GPU], 100.0, ms(0), true, 1000);
        for t in (0..=100).step_by(10) {
            recorder.record(1, &[reading(0, t, 50.0)]);
        }
        recorder.begin_measurement(ms(100));
        for t in (100..=300).step_by(10) {
            recorder.record(1, &[reading(0, t, 250.0)]);
        }
        let recording = recorder.close(ms(300));
        let outcome = &recording.devices[0];
        assert_eq!(outcome.baseline_w, Some(50.0));
        assert_eq!(outcome.stats.samples, 21);
        assert_eq!(
            recording.series.len(),
            21,
            "baseline samples are not stored"
        );
        let energy = outcome.stats.energy_integrated_j.unwrap();
        assert!((energy - 250.0 * 0.2).abs() < 1e-9, "{energy}");
    }

    #[test]
    fn other_devices_and_samplers_are_ignored_and_closing_stops_recording() {
        let recorder = Recorder::new(&[GPU], 100.0, ms(0), false, 1000);
        recorder.record(1, &[reading(0, 0, 1.0), reading(1, 0, 2.0)]);
        recorder.record(0, &[reading(0, 5, 3.0)]);
        let recording = recorder.close(ms(10));
        recorder.record(1, &[reading(0, 20, 4.0)]);
        assert_eq!(recording.devices[0].stats.samples, 1);
        assert_eq!(recording.series.len(), 1);
        assert_eq!(recording.series[0].reading.power_w, Some(1.0));
        assert_eq!(recorder.close(ms(30)).series.len(), 0);
    }

    #[test]
    fn a_full_series_is_marked_truncated_but_the_figures_count_everything() {
        let recorder = Recorder::new(&[GPU], 100.0, ms(0), false, 5);
        for t in (0..100).step_by(10) {
            recorder.record(1, &[reading(0, t, 10.0)]);
        }
        let recording = recorder.close(ms(90));
        assert_eq!(recording.series.len(), 5);
        assert!(recording.truncated);
        assert_eq!(recording.devices[0].stats.samples, 10);
        let energy = recording.devices[0].stats.energy_integrated_j.unwrap();
        assert!((energy - 10.0 * 0.09).abs() < 1e-9);
    }
}
