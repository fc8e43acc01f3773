//! The figures of one device over a window, kept as running sums so that a
//! session's summary stays exact however many samples it sees (its stored
//! series is bounded; these are not).

use std::time::Duration;

use crate::reading::Reading;

/// Energy between two readings of a counter. A counter with a range wraps to
/// 0 after it (RAPL's `max_energy_range_uj`), so a smaller reading means one
/// wrap; one without a range only goes down when the driver reloads, and
/// nothing is counted for that step.
pub fn counter_delta(previous: f64, current: f64, range: Option<f64>) -> f64 {
    match range {
        _ if current >= previous => current - previous,
        Some(range) => current + range - previous,
        None => 0.0,
    }
}

/// Figures of one device over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStats {
    /// From the hardware counter, when the device has one.
    pub energy_counter_j: Option<f64>,
    /// From integrating reported power with the trapezoid rule, when the
    /// device reports power.
    pub energy_integrated_j: Option<f64>,
    /// Energy over the span (counter first), divided by the span.
    pub mean_w: f64,
    pub peak_w: f64,
    pub samples: u64,
    /// Samples whose reported power or counter differ from the previous
    /// sample's (power derived from the counter does not count).
    pub distinct_readings: u64,
    /// Share of the window covered by samples no further apart than the gap
    /// allowed (0..1).
    pub coverage: f64,
    /// From the first to the last sample.
    pub span: Duration,
}

impl DeviceStats {
    /// The energy to trust: the counter's, else the integral.
    pub fn energy_j(&self) -> Option<f64> {
        self.energy_counter_j.or(self.energy_integrated_j)
    }
}

#[derive(Debug, Clone)]
pub struct EnergyAccumulator {
    window_start: Duration,
    max_gap: Duration,
    /// Integrate power: false where the power is derived from the counter
    /// (RAPL), whose integral would only repeat the counter.
    integrate: bool,
    counter_range_j: Option<f64>,
    first_at: Option<Duration>,
    last_at: Option<Duration>,
    last_power: Option<(Duration, f64)>,
    last_energy: Option<f64>,
    last_values: Option<(Option<f64>, Option<f64>)>,
    counter_j: Option<f64>,
    integrated_j: Option<f64>,
    peak_w: Option<f64>,
    samples: u64,
    distinct: u64,
    covered: Duration,
}

impl EnergyAccumulator {
    /// `max_gap`: samples further apart leave the time between them
    /// uncovered (twice the requested sampling period, in a session).
    pub fn new(
        window_start: Duration,
        max_gap: Duration,
        integrate: bool,
        counter_range_j: Option<f64>,
    ) -> Self {
        Self {
            window_start,
            max_gap,
            integrate,
            counter_range_j,
            first_at: None,
            last_at: None,
            last_power: None,
            last_energy: None,
            last_values: None,
            counter_j: None,
            integrated_j: None,
            peak_w: None,
            samples: 0,
            distinct: 0,
            covered: Duration::ZERO,
        }
    }

    /// Adds a reading; readings come in time order, and one from before the
    /// window is ignored.
    pub fn push(&mut self, reading: &Reading) {
        let at = reading.at;
        if at < self.window_start || self.last_at.is_some_and(|last| at < last) {
            return;
        }
        let gap = at - self.last_at.unwrap_or(self.window_start);
        if gap <= self.max_gap {
            self.covered += gap;
        }
        self.first_at.get_or_insert(at);
        self.last_at = Some(at);
        self.samples += 1;

        // Power derived from the counter says nothing the counter does not.
        let values = (reading.power_w.filter(|_| self.integrate), reading.energy_j);
        if self.last_values != Some(values) {
            self.distinct += 1;
        }
        self.last_values = Some(values);

        if let Some(energy) = reading.energy_j {
            let total = self.counter_j.get_or_insert(0.0);
            if let Some(previous) = self.last_energy {
                *total += counter_delta(previous, energy, self.counter_range_j);
            }
            self.last_energy = Some(energy);
        }
        if let Some(power) = reading.power_w {
            self.peak_w = Some(self.peak_w.map_or(power, |peak| peak.max(power)));
            if self.integrate {
                let total = self.integrated_j.get_or_insert(0.0);
                if let Some((previous_at, previous)) = self.last_power {
                    *total += (previous + power) / 2.0 * (at - previous_at).as_secs_f64();
                }
                self.last_power = Some((at, power));
            }
        }
    }

    /// The figures of the window ending at `window_end`.
    pub fn finish(&self, window_end: Duration) -> DeviceStats {
        let span = match (self.first_at, self.last_at) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        };
        let mut covered = self.covered;
        if let Some(last) = self.last_at {
            let tail = window_end.saturating_sub(last);
            if tail <= self.max_gap {
                covered += tail;
            }
        }
        let window = window_end.saturating_sub(self.window_start);
        let coverage = if window.is_zero() {
            0.0
        } else {
            (covered.as_secs_f64() / window.as_secs_f64()).min(1.0)
        };
        let energy = self.counter_j.or(self.integrated_j);
        let peak_w = self.peak_w.unwrap_or(0.0);
        let mean_w = match energy {
            Some(energy) if !span.is_zero() => energy / span.as_secs_f64(),
            // One sample: its power is the mean.
            _ => peak_w,
        };
        DeviceStats {
            energy_counter_j: self.counter_j,
            energy_integrated_j: self.integrated_j,
            mean_w,
            peak_w,
            samples: self.samples,
            distinct_readings: self.distinct,
            coverage,
            span,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::ReplaySource;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A linear ramp P(t) = P0 + k·t sampled every 10 ms for 1 s, with the
    /// counter holding its exact integral E(t) = E0 + P0·t + k·t²/2. The
    /// trapezoid rule is exact on a linear ramp, so both figures must equal
    /// the integral.
    fn ramp_trace() -> (String, f64, f64, f64) {
        let (p0, k, e0) = (100.0, 50.0, 1_000.0);
        let mut text = String::from("time_s,device,power_w,energy_j\n");
        for i in 0..=100 {
            let t = f64::from(i) / 100.0;
            text.push_str(&format!(
                "{t},gpu0,{},{}\n",
                p0 + k * t,
                e0 + p0 * t + k * t * t / 2.0
            ));
        }
        (text, p0, k, e0)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn counter_and_trapezoid_agree_with_the_integral_on_a_replayed_ramp() {
        let (text, p0, k, _) = ramp_trace();
        let source = ReplaySource::parse(Path::new("ramp.csv"), &text).unwrap();
        // A window from 200 ms to 700 ms, sampled on the trace's rows.
        let (start, end) = (ms(200), ms(700));
        let mut accumulator = EnergyAccumulator::new(start, ms(20), true, None);
        for t in (200..=700).step_by(10) {
            accumulator.push(&source.reading_at(0, ms(t)));
        }
        let stats = accumulator.finish(end);
        let integral = |t: f64| p0 * t + k * t * t / 2.0;
        let expected = integral(0.7) - integral(0.2);
        assert!(
            close(stats.energy_counter_j.unwrap(), expected),
            "{stats:?}"
        );
        assert!(
            close(stats.energy_integrated_j.unwrap(), expected),
            "{stats:?}"
        );
        assert_eq!(stats.samples, 51);
        assert_eq!(stats.distinct_readings, 51);
        assert_eq!(stats.span, ms(500));
        assert!(close(stats.mean_w, expected / 0.5));
        assert_eq!(stats.peak_w, p0 + k * 0.7);
        assert!(close(stats.coverage, 1.0));
    }

    #[test]
    fn oversampling_repeats_readings_and_does_not_change_the_counter() {
        let (text, _, _, e0) = ramp_trace();
        let source = ReplaySource::parse(Path::new("ramp.csv"), &text).unwrap();
        // Every 2.5 ms: four samples per row of the trace.
        let mut accumulator = EnergyAccumulator::new(Duration::ZERO, ms(5), true, None);
        let mut t = Duration::ZERO;
        while t <= ms(500) {
            accumulator.push(&source.reading_at(0, t));
            t += Duration::from_micros(2_500);
        }
        let stats = accumulator.finish(ms(500));
        assert_eq!(stats.samples, 201);
        // Rows at 0, 10, …, 500 ms: 51 distinct readings.
        assert_eq!(stats.distinct_readings, 51);
        let last_row = source.reading_at(0, ms(500)).energy_j.unwrap();
        assert!(close(stats.energy_counter_j.unwrap(), last_row - e0));
    }

    #[test]
    fn counter_wraps_at_its_range() {
        assert_eq!(counter_delta(10.0, 15.0, Some(100.0)), 5.0);
        assert_eq!(counter_delta(95.0, 3.0, Some(100.0)), 8.0);
        assert_eq!(
            counter_delta(95.0, 3.0, None),
            0.0,
            "a reset counts nothing"
        );
        let mut accumulator = EnergyAccumulator::new(Duration::ZERO, ms(100), false, Some(100.0));
        for (t, energy) in [(0, 90.0), (10, 99.0), (20, 4.0), (30, 60.0), (40, 2.0)] {
            accumulator.push(&Reading {
                at: ms(t),
                energy_j: Some(energy),
                ..Reading::default()
            });
        }
        // 9 + 5 + 56 + 42 J
        assert_eq!(accumulator.finish(ms(40)).energy_counter_j, Some(112.0));
    }

    #[test]
    fn gaps_longer_than_allowed_are_not_covered() {
        // Window 0..100 ms, gap allowed 10 ms; samples at 5, 10, 20, 60, 65 ms.
        // Covered: 0→5, 5→10, 10→20 and 60→65 (25 ms); 20→60 and 65→100 are
        // gaps. The trapezoid still bridges the gap: power 10 W over 60 ms.
        let mut accumulator = EnergyAccumulator::new(Duration::ZERO, ms(10), true, None);
        for t in [5, 10, 20, 60, 65] {
            accumulator.push(&Reading {
                at: ms(t),
                power_w: Some(10.0),
                ..Reading::default()
            });
        }
        let stats = accumulator.finish(ms(100));
        assert!(close(stats.coverage, 0.25), "{stats:?}");
        assert!(close(stats.energy_integrated_j.unwrap(), 10.0 * 0.060));
        assert_eq!(stats.energy_counter_j, None);
        assert_eq!(stats.distinct_readings, 1);
        assert_eq!(stats.span, ms(60));
    }

    #[test]
    fn readings_before_the_window_or_out_of_order_are_ignored() {
        let mut accumulator = EnergyAccumulator::new(ms(10), ms(10), true, None);
        for t in [5, 10, 20, 15] {
            accumulator.push(&Reading {
                at: ms(t),
                power_w: Some(t as f64),
                ..Reading::default()
            });
        }
        let stats = accumulator.finish(ms(20));
        assert_eq!(stats.samples, 2);
        assert_eq!(stats.peak_w, 20.0);
        assert!(close(
            stats.energy_integrated_j.unwrap(),
            (10.0 + 20.0) / 2.0 * 0.010
        ));
    }

    #[test]
    fn an_empty_window_has_no_energy() {
        let stats = EnergyAccumulator::new(Duration::ZERO, ms(10), true, None).finish(ms(50));
        assert_eq!(stats.samples, 0);
        assert_eq!(stats.energy_j(), None);
        assert_eq!(stats.coverage, 0.0);
        assert_eq!(stats.mean_w, 0.0);
    }
}
