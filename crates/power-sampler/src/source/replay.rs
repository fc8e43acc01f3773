//! A recorded trace played back as devices, for CI and demos. Never real
//! hardware: every answer about these devices says `replay`.
//!
//! The trace is CSV (fields may be quoted) with a header naming its columns;
//! `time_s` and `device` are required, the others optional and may be left
//! empty in a row; an error names the trace's `file:line`:
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

use super::Source;
use crate::clock::Clock;
use crate::reading::{DeviceInfo, Reading, SourceError, SourceKind};

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

/// Largest magnitude of a number in a trace: far beyond any device's watts,
/// joules or degrees, and small enough that a counter looped for as long
/// as a `Duration` lasts stays finite.
const MAX_MAGNITUDE: f64 = 1e15;

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
        let parser = Parser {
            path,
            lines: Lines::new(text),
        };
        // Rows of the wrong length are reported by `Parser::row` with both lengths.
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .comment(Some(b'#'))
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(text.as_bytes());
        let mut records = reader
            .records()
            .map(|record| {
                record.map_err(|e| parser.error(parser.line_at(e.position()), e.to_string()))
            })
            // Neither a line of blanks nor an indented comment is a row.
            .filter(|record| {
                !record.as_ref().is_ok_and(|r| {
                    r.iter().all(str::is_empty) || r.get(0).is_some_and(|f| f.starts_with('#'))
                })
            });
        let header = records
            .next()
            .ok_or_else(|| parser.error(1, "empty trace: no header".into()))??;
        let header_line = parser.line_of(&header);
        let columns = parser.columns(&header, header_line)?;
        let mut devices = Devices::default();
        for record in records {
            let record = record?;
            let number = parser.line_of(&record);
            let row = parser.row(&columns, &record, number)?;
            devices.push(&parser, number, row)?;
        }
        if devices.traces.is_empty() {
            return Err(parser.error(header_line, "no rows".into()));
        }
        Ok(Self::of_devices(path, devices))
    }

    /// The source named after the trace's file, its devices after theirs.
    fn of_devices(path: &Path, devices: Devices) -> Self {
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
        let infos = devices
            .traces
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
        Self {
            name: format!("replay:{stem}"),
            devices: infos,
            traces: devices.traces.into_iter().map(|(_, trace)| trace).collect(),
        }
    }

    /// The reading of device `index` at `at` on the trace's own clock.
    pub fn reading_at(&self, index: usize, at: Duration) -> Reading {
        self.traces[index].reading_at(at)
    }
}

/// Reads one trace's header and rows; its errors name the trace's `file:line`.
struct Parser<'a> {
    path: &'a Path,
    lines: Lines<'a>,
}

/// One row's values, before it joins its device's trace.
struct Row<'r> {
    time_ns: u64,
    device: &'r str,
    reading: Reading,
}

impl Parser<'_> {
    fn error(&self, line: u64, reason: String) -> SourceError {
        SourceError::Trace {
            path: self.path.to_path_buf(),
            line,
            reason,
        }
    }

    fn line_at(&self, position: Option<&csv::Position>) -> u64 {
        self.lines.number(position)
    }

    fn line_of(&self, record: &csv::StringRecord) -> u64 {
        self.line_at(record.position())
    }

    /// Each header cell's index in [`COLUMNS`]; `time_s` and `device` are required.
    fn columns(
        &self,
        header: &csv::StringRecord,
        header_line: u64,
    ) -> Result<Vec<usize>, SourceError> {
        let mut columns = Vec::new();
        for name in header {
            let column = COLUMNS.iter().position(|c| *c == name).ok_or_else(|| {
                self.error(
                    header_line,
                    format!("unknown column `{name}`; known: {}", COLUMNS.join(", ")),
                )
            })?;
            columns.push(column);
        }
        for required in [0, 1] {
            if !columns.contains(&required) {
                return Err(self.error(
                    header_line,
                    format!("the header lacks `{}`", COLUMNS[required]),
                ));
            }
        }
        Ok(columns)
    }

    /// A row's cells, in the header's order; an empty cell leaves its value unset.
    fn row<'r>(
        &self,
        columns: &[usize],
        record: &'r csv::StringRecord,
        number: u64,
    ) -> Result<Row<'r>, SourceError> {
        if record.len() != columns.len() {
            return Err(self.error(
                number,
                format!("{} cells, the header has {}", record.len(), columns.len()),
            ));
        }
        let mut row = Row {
            time_ns: 0,
            device: "",
            reading: Reading::default(),
        };
        for (&column, cell) in columns.iter().zip(record) {
            if cell.is_empty() {
                if column <= 1 {
                    return Err(self.error(number, format!("{} is empty", COLUMNS[column])));
                }
                continue;
            }
            self.cell(column, cell, number, &mut row)?;
        }
        Ok(row)
    }

    /// One non-empty cell of column `column` (an index in [`COLUMNS`]) into `row`.
    fn cell<'r>(
        &self,
        column: usize,
        cell: &'r str,
        number: u64,
        row: &mut Row<'r>,
    ) -> Result<(), SourceError> {
        let bad = |what: &str| {
            let what = match column {
                0 | 1 | 6 | 8 => what.to_string(),
                _ => format!("{what} within ±{MAX_MAGNITUDE:e}"),
            };
            self.error(
                number,
                format!("{}: `{cell}` is not {what}", COLUMNS[column]),
            )
        };
        // Bounded so that no reading, nor a looped counter, can
        // overflow to infinity (a fuzz find).
        let float = || {
            cell.parse::<f64>()
                .ok()
                .filter(|v| v.abs() <= MAX_MAGNITUDE)
        };
        let reading = &mut row.reading;
        match column {
            0 => {
                let seconds = float()
                    .filter(|s| *s >= 0.0)
                    .ok_or_else(|| bad("a time in seconds"))?;
                row.time_ns = (seconds * 1e9).round() as u64;
            }
            1 => {
                if !cell
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    return Err(bad("a device name (letters, digits, `_.-`)"));
                }
                row.device = cell;
            }
            2 => reading.power_w = Some(float().ok_or_else(|| bad("a number"))?),
            3 => reading.energy_j = Some(float().ok_or_else(|| bad("a number"))?),
            4 => reading.power_avg_w = Some(float().ok_or_else(|| bad("a number"))?),
            5 => reading.utilization_pct = Some(float().ok_or_else(|| bad("a number"))? as f32),
            6 => {
                reading.memory_used_bytes = Some(cell.parse().map_err(|_| bad("a count of bytes"))?)
            }
            7 => reading.temperature_c = Some(float().ok_or_else(|| bad("a number"))? as f32),
            _ => reading.sm_clock_mhz = Some(cell.parse().map_err(|_| bad("a clock in MHz"))?),
        }
        Ok(())
    }
}

/// Devices in order of first appearance, with their rows.
#[derive(Default)]
struct Devices {
    traces: Vec<(String, Trace)>,
    by_name: HashMap<String, usize>,
}

impl Devices {
    /// Adds a row to its device's trace, in which time must rise.
    fn push(&mut self, parser: &Parser<'_>, number: u64, row: Row<'_>) -> Result<(), SourceError> {
        let Row {
            time_ns,
            device,
            mut reading,
        } = row;
        let traces = &mut self.traces;
        let index = *self.by_name.entry(device.to_string()).or_insert_with(|| {
            traces.push((device.to_string(), Trace::default()));
            traces.len() - 1
        });
        let trace = &mut traces[index].1;
        if trace.times_ns.last().is_some_and(|&last| last >= time_ns) {
            return Err(parser.error(
                number,
                format!("time_s goes backwards or repeats for device `{device}`"),
            ));
        }
        reading.device =
            u16::try_from(index).map_err(|_| parser.error(number, "too many devices".into()))?;
        trace.times_ns.push(time_ns);
        trace.rows.push(reading);
        Ok(())
    }
}

/// The trace's lines (split at `\n`), to give a record's line number.
struct Lines<'a> {
    lines: Vec<&'a str>,
    /// Byte offset of the end of each line (before its `\n`).
    ends: Vec<u64>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        let lines: Vec<&str> = text.split('\n').collect();
        let mut end = 0;
        let ends = lines
            .iter()
            .enumerate()
            .map(|(index, line)| {
                end += line.len() as u64 + u64::from(index > 0);
                end
            })
            .collect();
        Self { lines, ends }
    }

    /// The line (from 1) where the record read from `position` starts. The
    /// reader gives the position where it began to read the record, before
    /// the empty and comment lines it skipped (and does not count comment
    /// lines in its own line numbers), so the record starts at the first
    /// other line from there. A binary search and the skipped lines: once
    /// a scan of every line before the record, quadratic in a trace's rows.
    fn number(&self, position: Option<&csv::Position>) -> u64 {
        let Some(position) = position else {
            return 0;
        };
        let first = self
            .ends
            // A position at a line's end is the `\n` after a `\r` the
            // reader took as the end of the previous record (CRLF traces
            // were off by one line): the record starts on the next line.
            .partition_point(|&end| end <= position.byte())
            .min(self.lines.len().saturating_sub(1));
        let skipped = |line: &str| {
            let line = line.trim_end_matches('\r');
            line.is_empty() || line.starts_with('#')
        };
        let start = (first..self.lines.len())
            .find(|&index| !skipped(self.lines[index]))
            .unwrap_or(first);
        start as u64 + 1
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
                "test.csv:3: time_s goes backwards",
            ),
            (
                "time_s,device,power_w\n0,gpu0,hot\n",
                "test.csv:2: power_w: `hot` is not a number",
            ),
            (
                "time_s,device,power_w\n0,gpu 0,1\n",
                "`gpu 0` is not a device name",
            ),
            (
                "time_s,device,power_w\n0,gpu0\n",
                "test.csv:2: 2 cells, the header has 3",
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

    #[test]
    fn a_quoted_trace_reads_like_a_plain_one_and_errors_name_file_and_line() {
        // As a CSV writer that quotes every field (berth's exports) writes it.
        let quoted = "\
  # quoted, with a blank line and comments (one indented) between rows
\"time_s\",\"device\",\"power_w\",\"energy_j\",\"temperature_c\"
\"0.00\",\"gpu0\",\"100\",\"50\",\"30\"
\"0.00\",\"cpu\",\"\",\"7\",\"\"

# the GPU again
\"0.01\",\"gpu0\",\"110\",\"51.05\",\"31\"
\"0.02\",\"gpu0\",\"120\",\"52.2\",\"32\"
\"0.02\",\"cpu\",\"\",\"8\",\"\"
";
        let (quoted, plain) = (parse(quoted).unwrap(), parse(TRACE).unwrap());
        assert_eq!(
            quoted.devices().iter().map(|d| &d.id).collect::<Vec<_>>(),
            plain.devices().iter().map(|d| &d.id).collect::<Vec<_>>()
        );
        for device in 0..2 {
            for ms in [0, 5, 10, 25, 45] {
                let at = Duration::from_millis(ms);
                assert_eq!(
                    format!("{:?}", quoted.reading_at(device, at)),
                    format!("{:?}", plain.reading_at(device, at)),
                    "device {device} at {ms} ms"
                );
            }
        }

        // Line 6 of the file, counting the comment and the blank line.
        let bad = "# c\ntime_s,device,power_w\n0,gpu0,1\n\n# c\n\"0.5\",\"gpu0\",\"1,5\"\n";
        let error = parse(bad)
            .err()
            .expect("a comma is no decimal point")
            .to_string();
        assert_eq!(
            error,
            "test.csv:6: power_w: `1,5` is not a number within ±1e15"
        );
    }

    /// Fuzz find (`replay_trace`): a counter from 1.8e308 J down to 7 J
    /// loops by -1.8e308 J, and a reading many loops on was -inf.
    #[test]
    fn numbers_past_the_magnitude_bound_are_refused() {
        let error = parse("time_s,device,power_w,energy_j\r\n0,gpu0,10,01.7976931348623157e308\r\n0.5,gpu0,20,7.\r\n")
            .err()
            .expect("refused")
            .to_string();
        assert_eq!(
            error,
            "test.csv:2: energy_j: `01.7976931348623157e308` is not a number within ±1e15"
        );
        let error = parse("time_s,device,temperature_c\n0,gpu0,1e39\n")
            .err()
            .expect("past f32")
            .to_string();
        assert!(error.contains("test.csv:2: temperature_c"), "{error}");
        // At the bound, a reading as late as a Duration goes stays finite.
        let source =
            parse("time_s,device,energy_j\n0,gpu0,-1e15\n0.000000001,gpu0,1e15\n").unwrap();
        let reading = source.reading_at(0, Duration::MAX);
        assert!(reading.energy_j.is_some_and(f64::is_finite), "{reading:?}");
    }

    /// Each record's line number was found by scanning every line before
    /// it: 200 000 rows took minutes.
    #[test]
    fn a_long_trace_parses_in_linear_time() {
        let mut text = String::from("time_s,device,power_w\n# rows\n");
        for row in 0..200_000 {
            text.push_str(&format!(
                "{}.{:03},gpu0,{}\n",
                row / 1000,
                row % 1000,
                row % 300
            ));
        }
        let started = std::time::Instant::now();
        let source = parse(&text).unwrap();
        let took = started.elapsed();
        assert_eq!(source.traces[0].rows.len(), 200_000);
        assert!(
            took < Duration::from_secs(5),
            "{} bytes took {took:?}",
            text.len()
        );
        let error = parse(&format!("{text}9999,gpu0,hot\n"))
            .err()
            .expect("bad last row")
            .to_string();
        assert_eq!(
            error,
            "test.csv:200003: power_w: `hot` is not a number within ±1e15"
        );
    }
}

/// Fuzz target `replay_trace` (seeds in `tests/fuzz_corpus/replay_trace/`).
#[cfg(test)]
mod fuzz {
    use berth_tests::fuzz;
    use proptest::prelude::*;

    use super::*;

    /// CSV's structure and the trace's columns, worth splicing in.
    const TOKENS: &[&[u8]] = &[
        b",",
        b"\"",
        b"\"\"",
        b"\n",
        b"\r\n",
        b"\r",
        b"#",
        b" ",
        b"\t",
        b"\0",
        b"\xef\xbb\xbf",
        b"time_s",
        b"device",
        b"power_w",
        b"energy_j",
        b"power_avg_w",
        b"utilization_pct",
        b"memory_used_bytes",
        b"temperature_c",
        b"sm_clock_mhz",
        b"gpu0",
        b"cpu",
        b"0",
        b"-0",
        b"0.01",
        b"-1",
        b"1e308",
        b"-1.7976931348623157e308",
        b"1.7976931348623157e308",
        b"18446744073.709553",
        b"18446744073709551615",
        b"18446744073709551616",
        b"4294967296",
        b"NaN",
        b"inf",
        b"5e-324",
    ];

    /// Times a reading is asked for: the start, inside the first loop,
    /// many loops on, and as late as a `Duration` goes.
    const TIMES: [Duration; 6] = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(15),
        Duration::from_secs(3600),
        Duration::from_secs(u64::MAX / 1_000_000_000),
        Duration::MAX,
    ];

    fn finite(value: Option<f64>) -> bool {
        value.is_none_or(f64::is_finite)
    }

    fn finite32(value: Option<f32>) -> bool {
        value.is_none_or(f32::is_finite)
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Any text: an error naming the file and a line of it, or a source
        /// whose every device reads, at any time, a reading of finite numbers.
        #[test]
        fn any_text_is_refused_at_a_line_or_replays_finite_readings(
            input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "replay_trace"), TOKENS),
        ) {
            let text = String::from_utf8_lossy(&input);
            let lines = text.split('\n').count() as u64;
            let parsed = fuzz::timed("ReplaySource::parse", || {
                ReplaySource::parse(Path::new("fuzz.csv"), &text)
            })?;
            match parsed {
                Err(SourceError::Trace { path, line, reason }) => {
                    prop_assert_eq!(path, Path::new("fuzz.csv"));
                    prop_assert!((1..=lines).contains(&line), "line {} of {}: {}", line, lines, reason);
                }
                Err(other) => prop_assert!(false, "not a trace error: {other}"),
                Ok(source) => {
                    prop_assert!(!source.devices().is_empty());
                    prop_assert_eq!(source.devices().len(), source.traces.len());
                    for (index, device) in source.devices().iter().enumerate() {
                        prop_assert!(device.id.starts_with("replay:"));
                        for at in TIMES {
                            let reading = fuzz::timed("ReplaySource::reading_at", || {
                                source.reading_at(index, at)
                            })?;
                            prop_assert_eq!(usize::from(reading.device), index);
                            prop_assert_eq!(reading.at, at);
                            prop_assert!(
                                finite(reading.power_w)
                                    && finite(reading.power_avg_w)
                                    && finite(reading.energy_j)
                                    && finite32(reading.utilization_pct)
                                    && finite32(reading.temperature_c),
                                "{} at {:?}: {:?}", device.id, at, reading
                            );
                        }
                    }
                }
            }
        }
    }
}
