//! `berth series <run-id>`: the power samples stored with a run, fetched a
//! page at a time with GetRunPowerSeries, as CSV or JSON with the same
//! fields: device, time (RFC 3339), elapsed_s (since the run's power session
//! opened), power_w and energy_j (empty or null when the device has none);
//! every CSV field quoted.

use berth_proto::orchestrator::v1::{GetRunPowerSeriesRequest, RunPowerSample};
use clap::ValueEnum;
use serde_json::{Value, json};

use std::path::PathBuf;

use crate::output::csv_records;
use crate::{CliError, Client, write_output};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SeriesFormat {
    Csv,
    Json,
}

/// Samples asked for per GetRunPowerSeries call (the most the orchestrator gives).
const PAGE_SIZE: u32 = 1000;

/// `berth series`: the run's samples, encoded, to the file or stdout.
pub async fn print(
    client: &mut Client,
    run_id: &str,
    device: &str,
    format: SeriesFormat,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    let samples = fetch_series(client, run_id, device).await?;
    write_output(output, &encode(&samples, format)?)
}

/// Every stored sample of the run, of one device when `device` is not empty.
pub async fn fetch_series(
    client: &mut Client,
    run_id: &str,
    device: &str,
) -> Result<Vec<RunPowerSample>, CliError> {
    let mut samples = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_run_power_series(GetRunPowerSeriesRequest {
                run_id: run_id.to_string(),
                device: device.to_string(),
                page_size: PAGE_SIZE,
                page_token,
            })
            .await?
            .into_inner();
        samples.extend(page.samples);
        if page.next_page_token.is_empty() {
            return Ok(samples);
        }
        page_token = page.next_page_token;
    }
}

fn elapsed_seconds(sample: &RunPowerSample) -> Option<f64> {
    sample
        .elapsed
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn time(sample: &RunPowerSample) -> Option<String> {
    sample.time.map(|t| t.to_string())
}

pub fn encode(samples: &[RunPowerSample], format: SeriesFormat) -> Result<Vec<u8>, csv::Error> {
    match format {
        SeriesFormat::Csv => csv(samples),
        SeriesFormat::Json => Ok(json(samples).into_bytes()),
    }
}

fn csv(samples: &[RunPowerSample]) -> Result<Vec<u8>, csv::Error> {
    fn cell<T: ToString>(value: Option<T>) -> String {
        value.map(|v| v.to_string()).unwrap_or_default()
    }
    let header = ["device", "time", "elapsed_s", "power_w", "energy_j"].map(String::from);
    let rows = samples.iter().map(|sample| {
        [
            sample.device.clone(),
            cell(time(sample)),
            cell(elapsed_seconds(sample)),
            cell(sample.power_w),
            cell(sample.energy_j),
        ]
    });
    csv_records(std::iter::once(header).chain(rows))
}

fn json(samples: &[RunPowerSample]) -> String {
    let rows: Vec<Value> = samples
        .iter()
        .map(|sample| {
            json!({
                "device": sample.device,
                "time": time(sample),
                "elapsed_s": elapsed_seconds(sample),
                "power_w": sample.power_w,
                "energy_j": sample.energy_j,
            })
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<RunPowerSample> {
        vec![
            RunPowerSample {
                device: "replay:gpu0".into(),
                time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                elapsed: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                power_w: Some(120.5),
                energy_j: None,
            },
            RunPowerSample {
                device: "a,b".into(),
                energy_j: Some(3.0),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn csv_has_a_line_per_sample_and_empty_cells_for_absent_values() {
        let csv = String::from_utf8(encode(&samples(), SeriesFormat::Csv).unwrap()).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                r#""device","time","elapsed_s","power_w","energy_j""#,
                r#""replay:gpu0","2023-11-14T22:13:20Z","1.5","120.5","""#,
                r#""a,b","","","","3""#,
            ]
        );
    }

    #[test]
    fn json_has_the_same_fields_with_nulls() {
        let rows: Vec<Value> =
            serde_json::from_slice(&encode(&samples(), SeriesFormat::Json).unwrap()).unwrap();
        assert_eq!(rows[0]["elapsed_s"], 1.5);
        assert_eq!(rows[0]["energy_j"], Value::Null);
        assert_eq!(rows[1]["energy_j"], 3.0);
    }
}
