//! The measurement protocol of a campaign that measures power
//! (`power.protocol`), after Yang et al., "Part-time Power Measurements"
//! (SC24): NVIDIA boards update their power reading every ~100 ms but
//! average only part of that period, so runs that always start at the same
//! point of the sensor's cycle see the same part of it. A random gap before
//! each measured run and starts shifted by a fraction of the update period
//! spread the runs over the cycle; the power of the first `rise_time` of a
//! run (clocks and power ramping up) is left out of its steady-state figure;
//! a thermal gate waits for the devices to cool before a measured run.

use std::time::Duration;

use berth_proto::orchestrator::v1::Run;
use serde::Deserialize;

/// Starts are shifted by this many fractions of the update period in turn.
pub const PHASES: u32 = 4;
/// Longest gap or shift a manifest may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// A pause before each measured run, drawn in `[min, max]` from the
    /// run's id (the same after a restart).
    #[serde(default)]
    pub gap: Option<GapRange>,
    /// The sensor's update period (e.g. `100ms`): cycle k starts
    /// `(k - 1) mod 4` quarters of it later.
    #[serde(default, with = "humantime_serde")]
    pub phase_shift: Option<Duration>,
    /// Readings in a run's first `rise_time` are left out of its
    /// steady-state power and energy (reported beside the whole run's).
    #[serde(default, with = "humantime_serde")]
    pub rise_time: Option<Duration>,
    /// Before a measured run, wait until every device that reports a
    /// temperature is at or under `below_c`, for at most `max_wait`.
    #[serde(default)]
    pub thermal_gate: Option<ThermalGate>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThermalGate {
    pub below_c: f64,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GapRange {
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Protocol {
    /// The protocol's pause before `run`: none for a warmup run.
    pub fn delay_before(&self, run: &Run) -> Duration {
        if run.warmup {
            return Duration::ZERO;
        }
        let gap = self.gap.map_or(Duration::ZERO, |range| {
            let span = range.max.saturating_sub(range.min).as_nanos() as u64;
            let drawn = if span == 0 {
                0
            } else {
                fnv1a(run.id.as_bytes()) % (span + 1)
            };
            range.min + Duration::from_nanos(drawn)
        });
        let shift = self.phase_shift.map_or(Duration::ZERO, |period| {
            period * (run.cycle.saturating_sub(1) % PHASES) / PHASES
        });
        gap + shift
    }

    /// What contradicts itself, as (key under `power.protocol`, why).
    pub fn check(&self) -> Result<(), (&'static [&'static str], String)> {
        if let Some(range) = self.gap {
            if range.min > range.max {
                return Err((&["gap", "min"], format!("{range:?}: min is above max")));
            }
            if range.max > MAX_DELAY {
                return Err((
                    &["gap", "max"],
                    format!("{:?} is more than {MAX_DELAY:?}", range.max),
                ));
            }
        }
        if let Some(gate) = self.thermal_gate
            && !(gate.below_c > 0.0 && gate.below_c < 150.0)
        {
            return Err((
                &["thermal_gate", "below_c"],
                format!("{} °C must be above 0 and under 150", gate.below_c),
            ));
        }
        let durations: [(&'static [&'static str], Option<Duration>); 3] = [
            (&["phase_shift"], self.phase_shift),
            (&["rise_time"], self.rise_time),
            (
                &["thermal_gate", "max_wait"],
                self.thermal_gate.map(|gate| gate.max_wait),
            ),
        ];
        for (path, value) in durations {
            if let Some(value) = value
                && (value.is_zero() || value > MAX_DELAY)
            {
                return Err((
                    path,
                    format!("{value:?} must be above 0 and at most {MAX_DELAY:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// FNV-1a: a hash that stays the same across builds and restarts (std's
/// hasher is seeded per process).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod sensor_model;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, cycle: u32, warmup: bool) -> Run {
        Run {
            id: id.into(),
            cycle,
            warmup,
            ..Default::default()
        }
    }

    #[test]
    fn gaps_are_drawn_in_range_the_same_each_time_and_spread() {
        let protocol = Protocol {
            gap: Some(GapRange {
                min: Duration::from_millis(50),
                max: Duration::from_millis(150),
            }),
            ..Default::default()
        };
        let delays: Vec<Duration> = (1..=50)
            .map(|cycle| protocol.delay_before(&run(&format!("c/x/b/{cycle}"), cycle, false)))
            .collect();
        assert!(
            delays
                .iter()
                .all(|d| (Duration::from_millis(50)..=Duration::from_millis(150)).contains(d))
        );
        let again = protocol.delay_before(&run("c/x/b/7", 7, false));
        assert_eq!(again, delays[6], "the same run, the same gap");
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 40, "{delays:?}");
        assert_eq!(
            protocol.delay_before(&run("c/x/b/w1", 1, true)),
            Duration::ZERO
        );
    }

    #[test]
    fn starts_shift_by_quarters_of_the_update_period() {
        let protocol = Protocol {
            phase_shift: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        let shifts: Vec<u128> = (1..=6)
            .map(|cycle| protocol.delay_before(&run("r", cycle, false)).as_millis())
            .collect();
        assert_eq!(shifts, [0, 25, 50, 75, 0, 25]);
    }

    #[test]
    fn contradictions_name_their_key() {
        let gap = |min, max| Protocol {
            gap: Some(GapRange {
                min: Duration::from_millis(min),
                max: Duration::from_millis(max),
            }),
            ..Default::default()
        };
        assert_eq!(gap(200, 100).check().unwrap_err().0, ["gap", "min"]);
        assert_eq!(gap(0, 3_600_000).check().unwrap_err().0, ["gap", "max"]);
        assert!(gap(100, 100).check().is_ok());
        let zero_rise = Protocol {
            rise_time: Some(Duration::ZERO),
            ..Default::default()
        };
        assert_eq!(zero_rise.check().unwrap_err().0, ["rise_time"]);
    }
}
