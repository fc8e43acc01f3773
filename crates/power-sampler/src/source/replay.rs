//! A recorded trace played back as devices, for CI and demos. Never real
//! hardware: every answer about these devices says `replay`.
//!
//! The trace is CSV with a header naming its columns; `time_s` and `device`
//! are required, the others optional and may be left empty in a row:
//!
//! ```text
//! # lines starting with '#' are comments
//! time_s,device,power_w,energy_j,power_avg_w,utilization_pct,memory_used_bytes,temperature_c,sm_clock_mhz
//! 0.000,gpu0,61.5,1000.000,,0,1048576,34,1410
//! ```
//!
//! A device reads as its latest row at or before the time asked (a recorded
//! sensor says nothing new between its readings). The trace loops: each
//! device's last row closes its loop, its time being the loop's length and its
//! energy the counter at the end, so the counter keeps rising across loops.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{DeviceInfo, Reading, Source, SourceError, SourceKind};
use crate::clock::Clock;

const COLUMNS: [&str; 9] = [
    "time_s",
    "device",
    "power_w",
    "energy_j",
    "power_avg_w",
    "utilization_pct",
    "memory_used_bytes",
    "temperature_c",
    "sm_clock_mhz",
];

pub struct ReplaySource {
    name: String,
    devices: Vec<DeviceInfo>,
    traces: Vec<Trace>,
}

/// One device's rows, in time order.
#[derive(Default)]
struct Trace {
    times_ns: Vec<u64>,
    rows: Vec<Reading>,
}

impl Trace {
    /// The reading at `at` since the trace started, looping.
    fn reading_at(&self, at: Duration) -> Reading {
        let first = self.times_ns[0];
        let last = self.times_ns[self.times_ns.len() - 1];
        let length = last - first;
        let now = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        // A one-row trace has no length: it holds its row.
        let (loops, offset) = now
            .checked_div(length)
            .zip(now.checked_rem(length))
            .unwrap_or((0, 0));
        let index = self.times_ns.partition_point(|&t| t <= first + offset) - 1;
        let mut reading = self.rows[index];
        if let (Some(energy), Some(start), Some(end)) = (
            reading.energy_j,
            self.rows[0].energy_j,
            self.rows[self.rows.len() - 1].energy_j,
        ) {
            reading.energy_j = Some(energy + loops as f64 * (end - start));
        }
        reading.at = at;
        reading
    }
}

impl ReplaySource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let text = std::fs::read_to_string(path).map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses a trace; `path` names it in errors and in device names.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SourceError> {
        let error = |line: usize, reason: String| SourceError::Parse {
            path: path.to_path_buf(),
            reason: format!("line {line}: {reason}"),
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
        let (header_line, header) = lines
            .next()
            .ok_or_else(|| error(1, "empty trace: no header".into()))?;
        let mut columns = Vec::new();
        for name in header.split(',').map(str::trim) {
            let column = COLUMNS.iter().position(|c| *c == name).ok_or_else(|| {
                error(
                    header_line,
                    format!("unknown column `{name}`; known: {}", COLUMNS.join(", ")),
                )
            })?;
            columns.push(column);
        }
        for required in [0, 1] {
            if !columns.contains(&required) {
                return Err(error(
                    header_line,
                    format!("the header lacks `{}`", COLUMNS[required]),
                ));
            }
        }

        // Devices in order of first appearance, with their rows.
        let mut traces: Vec<(String, Trace)> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (number, line) in lines {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != columns.len() {
                return Err(error(
                    number,
                    format!("{} cells, the header has {}", cells.len(), columns.len()),
                ));
            }
            let mut time_ns = 0;
            let mut device = "";
            let mut reading = Reading::default();
            for (&column, &cell) in columns.iter().zip(&cells) {
                let bad = |what: &str| {
                    error(
                        number,
                        format!("{}: `{cell}` is not {what}", COLUMNS[column]),
                    )
                };
                if cell.is_empty() {
                    if column <= 1 {
                        return Err(error(number, format!("{} is empty", COLUMNS[column])));
                    }
                    continue;
                }
                let float = || cell.parse::<f64>().ok().filter(|v| v.is_finite());
                match column {
                    0 => {
                        let seconds = float()
                            .filter(|s| *s >= 0.0)
                            .ok_or_else(|| bad("a time in seconds"))?;
                        time_ns = (seconds * 1e9).round() as u64;
                    }
                    1 => {
                        if !cell
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                        {
                            return Err(bad("a device name (letters, digits, `_.-`)"));
                        }
                        device = cell;
                    }
                    2 => reading.power_w = Some(float().ok_or_else(|| bad("a number"))?),
                    3 => reading.energy_j = Some(float().ok_or_else(|| bad("a number"))?),
                    4 => reading.power_avg_w = Some(float().ok_or_else(|| bad("a number"))?),
                    5 => {
                        reading.utilization_pct =
                            Some(float().ok_or_else(|| bad("a number"))? as f32)
                    }
                    6 => {
                        reading.memory_used_bytes =
                            Some(cell.parse().map_err(|_| bad("a count of bytes"))?)
                    }
                    7 => {
                        reading.temperature_c = Some(float().ok_or_else(|| bad("a number"))? as f32)
                    }
                    _ => {
                        reading.sm_clock_mhz =
                            Some(cell.parse().map_err(|_| bad("a clock in MHz"))?)
                    }
                }
            }
            let index = *by_name.entry(device.to_string()).or_insert_with(|| {
                traces.push((device.to_string(), Trace::default()));
                traces.len() - 1
            });
            let trace = &mut traces[index].1;
            if trace.times_ns.last().is_some_and(|&last| last >= time_ns) {
                return Err(error(
                    number,
                    format!("time_s goes backwards or repeats for device `{device}`"),
                ));
            }
            reading.device =
                u16::try_from(index).map_err(|_| error(number, "too many devices".into()))?;
            trace.times_ns.push(time_ns);
            trace.rows.push(reading);
        }
        if traces.is_empty() {
            return Err(error(header_line, "no rows".into()));
        }

        let file_name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stem = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let devices = traces
            .iter()
            .map(|(device, trace)| DeviceInfo {
                id: format!("replay:{device}"),
                name: format!("replay of {file_name}: {device}"),
                kind: SourceKind::Replay,
                has_energy_counter: trace.rows.iter().any(|r| r.energy_j.is_some()),
                has_power: trace.rows.iter().any(|r| r.power_w.is_some()),
                counter_range_j: None,
            })
            .collect();
        Ok(Self {
            name: format!("replay:{stem}"),
            devices,
            traces: traces.into_iter().map(|(_, trace)| trace).collect(),
        })
    }

    /// The reading of device `index` at `at` on the trace's own clock.
    pub fn reading_at(&self, index: usize, at: Duration) -> Reading {
        self.traces[index].reading_at(at)
    }
}

impl Source for ReplaySource {
    fn kind(&self) -> SourceKind {
        SourceKind::Replay
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn read(&mut self, clock: &Clock, out: &mut Vec<Reading>, _: &mut Vec<SourceError>) {
        let at = clock.now();
        out.extend(self.traces.iter().map(|trace| trace.reading_at(at)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ReplaySource, SourceError> {
        ReplaySource::parse(Path::new("test.csv"), text)
    }

    const TRACE: &str = "\
# two devices, rows at 10 ms
time_s,device,power_w,energy_j,temperature_c
0.00,gpu0,100,50,30
0.00,cpu,,7,
0.01,gpu0,110,51.05,31
0.02,gpu0,120,52.2,32
0.02,cpu,,8,
";

    #[test]
    fn reads_the_latest_row_and_loops_with_a_rising_counter() {
        let source = parse(TRACE).unwrap();
        let ids: Vec<&str> = source.devices().iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["replay:gpu0", "replay:cpu"]);
        assert!(source.devices()[0].has_power && source.devices()[0].has_energy_counter);
        assert!(!source.devices()[1].has_power);

        let at = |ms: u64| source.reading_at(0, Duration::from_millis(ms));
        assert_eq!(at(0).power_w, Some(100.0));
        assert_eq!(at(9).power_w, Some(100.0), "held until the next row");
        assert_eq!(at(10).power_w, Some(110.0));
        assert_eq!(at(10).temperature_c, Some(31.0));
        // The loop is 20 ms long; one loop later the counter is 2.2 J higher.
        assert_eq!(at(20).power_w, Some(100.0));
        assert_eq!(at(30).energy_j, Some(51.05 + (52.2 - 50.0)));
        assert_eq!(at(30).at, Duration::from_millis(30));
        assert_eq!(
            source.reading_at(1, Duration::from_millis(45)).energy_j,
            Some(7.0 + 2.0)
        );
    }

    #[test]
    fn bad_traces_name_line_and_value() {
        let cases = [
            ("time_s,device,watts\n", "unknown column `watts`"),
            ("device,power_w\n", "lacks `time_s`"),
            (
                "time_s,device\n0,gpu0\n0,gpu0\n",
                "line 3: time_s goes backwards",
            ),
            (
                "time_s,device,power_w\n0,gpu0,hot\n",
                "line 2: power_w: `hot` is not a number",
            ),
            (
                "time_s,device,power_w\n0,gpu 0,1\n",
                "`gpu 0` is not a device name",
            ),
            (
                "time_s,device,power_w\n0,gpu0\n",
                "line 2: 2 cells, the header has 3",
            ),
            ("time_s,device\n", "no rows"),
            ("", "empty trace"),
        ];
        for (text, expected) in cases {
            let error = parse(text).err().expect(text).to_string();
            assert!(
                error.contains(expected) && error.contains("test.csv"),
                "{error}"
            );
        }
    }
}
