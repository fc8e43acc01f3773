//! Per-run exports (`berth results <id> --runs`): every run of a campaign,
//! fetched a page at a time with ListRuns, as CSV, JSON or Parquet with the
//! same columns: the run's identity and outcome, then `param.<name>` for
//! each configuration parameter and `result.<field>` for each numeric field
//! of the result JSON, then its energy, then its provenance (`provenance.*`
//! and `gpu<N>.*`: what its host reported when it started). The figures derived from a run
//! (its energy over all devices, joules per unit of work) come from the
//! orchestrator with the run; the work metric with the campaign.

use std::sync::Arc;

use berth_proto::agent::v1::{GpuProvenance, Provenance};
use berth_proto::orchestrator::v1::{Campaign, ListRunsRequest, Run, RunState};
use berth_server::parquet_columns::write_optional;
use parquet::basic::{LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use crate::output::csv_records;
use crate::{CliError, Client};

/// File formats of a per-run export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsFormat {
    Csv,
    Json,
    Parquet,
}

/// Runs asked for per ListRuns call (the most the orchestrator gives).
const PAGE_SIZE: u32 = 1000;

/// Every run of the campaign, in schedule order.
pub async fn fetch_runs(client: &mut Client, campaign_id: &str) -> Result<Vec<Run>, CliError> {
    let mut runs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_runs(ListRunsRequest {
                campaign_id: campaign_id.to_string(),
                page_size: PAGE_SIZE,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return Ok(runs);
        }
        page_token = page.next_page_token;
    }
}

/// One column's cells, a cell per run; `None` is empty (CSV) or null.
enum Cells {
    Text(Vec<Option<String>>),
    Integer(Vec<Option<i64>>),
    Number(Vec<Option<f64>>),
    Flag(Vec<Option<bool>>),
    /// Milliseconds since the Unix epoch, UTC.
    Time(Vec<Option<i64>>),
}

struct Column {
    name: String,
    cells: Cells,
}

/// GPUs exported per run at most: a column group each.
const MAX_EXPORTED_GPUS: usize = 16;

/// What the run's host reported of the settings that decide its energy
/// figure (`provenance.*`, and a group of `gpu<N>.*` per GPU position).
fn provenance_columns(runs: &[Run]) -> Vec<Column> {
    let text = |name: &str, cell: &dyn Fn(&Provenance) -> String| Column {
        name: format!("provenance.{name}"),
        cells: Cells::Text(
            runs.iter()
                .map(|r| r.provenance.as_ref().map(cell))
                .collect(),
        ),
    };
    let mut columns = vec![
        text("berth_version", &|p| p.berth_version.clone()),
        text("kernel", &|p| p.kernel.clone()),
        text("cpu_model", &|p| p.cpu_model.clone()),
        text("cpu_governor", &|p| p.cpu_governor.clone()),
        text("image", &|p| p.image.clone()),
        text("image_id", &|p| p.image_id.clone()),
        text("unknown", &|p| p.unknown.join("; ")),
    ];
    let gpus = runs
        .iter()
        .filter_map(|r| r.provenance.as_ref())
        .map(|p| p.gpus.len())
        .max()
        .unwrap_or(0)
        .min(MAX_EXPORTED_GPUS);
    for position in 0..gpus {
        let gpu = |run: &Run| {
            run.provenance
                .as_ref()
                .and_then(|p| p.gpus.get(position))
                .cloned()
        };
        let name = |field: &str| format!("gpu{position}.{field}");
        let texts = |field: &str, cell: fn(&GpuProvenance) -> String| Column {
            name: name(field),
            cells: Cells::Text(runs.iter().map(|r| gpu(r).map(|g| cell(&g))).collect()),
        };
        let numbers = |field: &str, cell: fn(&GpuProvenance) -> Option<f64>| Column {
            name: name(field),
            cells: Cells::Number(runs.iter().map(|r| gpu(r).and_then(|g| cell(&g))).collect()),
        };
        let flags = |field: &str, cell: fn(&GpuProvenance) -> Option<bool>| Column {
            name: name(field),
            cells: Cells::Flag(runs.iter().map(|r| gpu(r).and_then(|g| cell(&g))).collect()),
        };
        columns.extend([
            texts("name", |g| g.name.clone()),
            texts("uuid", |g| g.uuid.clone()),
            texts("driver_version", |g| g.driver_version.clone()),
            numbers("power_limit_w", |g| g.power_limit_w),
            numbers("applications_graphics_clock_mhz", |g| {
                g.applications_graphics_clock_mhz.map(f64::from)
            }),
            numbers("temperature_c", |g| g.temperature_c),
            flags("persistence_mode", |g| g.persistence_mode),
            flags("ecc_enabled", |g| g.ecc_enabled),
        ]);
    }
    columns
}

/// The runs of a campaign as columns.
pub struct RunTable {
    columns: Vec<Column>,
    rows: usize,
}

fn millis(timestamp: Option<&prost_types::Timestamp>) -> Option<i64> {
    timestamp.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn rfc3339(ms: i64) -> String {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
    .to_string()
}

/// The run's wall time in seconds, once it has one.
fn duration_seconds(run: &Run) -> Option<f64> {
    run.duration
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn state_name(state: i32) -> String {
    RunState::try_from(state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("RUN_STATE_")
        .to_lowercase()
}

/// Names in the order they are first seen over all runs.
fn first_seen<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for name in names {
        if !seen.contains(name) {
            seen.push(name.clone());
        }
    }
    seen
}

impl RunTable {
    pub fn encode(&self, format: RunsFormat) -> Result<Vec<u8>, CliError> {
        match format {
            RunsFormat::Csv => Ok(self.csv()?),
            RunsFormat::Json => Ok(self.json().into_bytes()),
            RunsFormat::Parquet => Ok(self.parquet()?),
        }
    }

    /// The campaign's runs; the energy-per-work column is named after the
    /// campaign's work metric (the manifest's `power.work_metric`).
    pub fn new(campaign: &Campaign, runs: &[Run]) -> Self {
        let results: Vec<serde_json::Map<String, serde_json::Value>> = runs
            .iter()
            .map(|run| serde_json::from_str(&run.result_json).unwrap_or_default())
            .collect();
        let text = |name: &str, cell: &dyn Fn(&Run) -> Option<String>| Column {
            name: name.into(),
            cells: Cells::Text(runs.iter().map(cell).collect()),
        };
        let integer = |name: &str, cell: &dyn Fn(&Run) -> Option<i64>| Column {
            name: name.into(),
            cells: Cells::Integer(runs.iter().map(cell).collect()),
        };
        let number = |name: &str, cell: &dyn Fn(&Run) -> Option<f64>| Column {
            name: name.into(),
            cells: Cells::Number(runs.iter().map(cell).collect()),
        };
        let time = |name: &str, cell: &dyn Fn(&Run) -> Option<i64>| Column {
            name: name.into(),
            cells: Cells::Time(runs.iter().map(cell).collect()),
        };
        let mut columns = vec![
            text("run_id", &|r| Some(r.id.clone())),
            text("config", &|r| Some(r.config.clone())),
            text("backend", &|r| Some(r.backend.clone())),
            integer("cycle", &|r| Some(i64::from(r.cycle))),
            Column {
                name: "warmup".into(),
                cells: Cells::Flag(runs.iter().map(|r| Some(r.warmup)).collect()),
            },
            text("state", &|r| Some(state_name(r.state))),
            text("host", &|r| Some(r.host.clone())),
            integer("attempts", &|r| Some(i64::from(r.attempts))),
            integer("exit_code", &|r| r.exit_code.map(i64::from)),
            time("started_at", &|r| millis(r.started_at.as_ref())),
            time("finished_at", &|r| millis(r.finished_at.as_ref())),
            number("duration_s", &duration_seconds),
            text("error", &|r| Some(r.error.clone())),
        ];
        for param in first_seen(runs.iter().flat_map(|r| r.params.keys())) {
            columns.push(text(&format!("param.{param}"), &|r| {
                r.params.get(&param).cloned()
            }));
        }
        let numeric_fields = first_seen(
            results
                .iter()
                .flat_map(|fields| fields.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k)),
        );
        for field in numeric_fields {
            columns.push(Column {
                name: format!("result.{field}"),
                cells: Cells::Number(
                    results
                        .iter()
                        .map(|fields| fields.get(&field).and_then(serde_json::Value::as_f64))
                        .collect(),
                ),
            });
        }
        columns.push(number("energy_j", &|r| r.energy_j));
        columns.push(number("energy_net_j", &|r| r.energy_net_j));
        columns.push(number(
            &format!("joules_per_{}", campaign.work_metric),
            &|r| r.joules_per_unit,
        ));
        columns.push(number(
            &format!("net_joules_per_{}", campaign.work_metric),
            &|r| r.joules_per_unit_net,
        ));
        if runs.iter().any(|r| r.cluster_accounting.is_some()) {
            let cluster = |r: &Run| r.cluster_accounting.clone().unwrap_or_default();
            columns.push(text("cluster_accounting_id", &|r| {
                Some(cluster(r).accounting_id)
            }));
            columns.push(number("cluster_energy_j", &|r| {
                cluster(r).consumed_energy_j
            }));
            columns.push(number("energy_vs_cluster_j", &|r| r.energy_vs_cluster_j));
            columns.push(text("cluster_accounting_note", &|r| Some(cluster(r).note)));
        }
        columns.extend(provenance_columns(runs));
        columns.push(text("result_json", &|r| Some(r.result_json.clone())));
        Self {
            columns,
            rows: runs.len(),
        }
    }

    /// A header line, then a line per run, every field quoted; times in
    /// RFC 3339, absent values empty.
    pub fn csv(&self) -> Result<Vec<u8>, csv::Error> {
        let header: Vec<String> = self.columns.iter().map(|c| c.name.clone()).collect();
        let rows = (0..self.rows).map(|row| {
            self.columns
                .iter()
                .map(|column| match &column.cells {
                    Cells::Text(cells) => cells[row].clone(),
                    Cells::Integer(cells) => cells[row].map(|v| v.to_string()),
                    Cells::Number(cells) => cells[row].map(|v| v.to_string()),
                    Cells::Flag(cells) => cells[row].map(|v| v.to_string()),
                    Cells::Time(cells) => cells[row].map(rfc3339),
                })
                .map(Option::unwrap_or_default)
                .collect::<Vec<String>>()
        });
        csv_records(std::iter::once(header).chain(rows))
    }

    /// An array with an object per run; times in RFC 3339, absent values null.
    pub fn json(&self) -> String {
        use serde_json::Value;
        let rows: Vec<Value> = (0..self.rows)
            .map(|row| {
                let object = self
                    .columns
                    .iter()
                    .map(|column| {
                        let value = match &column.cells {
                            Cells::Text(cells) => cells[row].clone().map(Value::from),
                            Cells::Integer(cells) => cells[row].map(Value::from),
                            Cells::Number(cells) => cells[row].map(Value::from),
                            Cells::Flag(cells) => cells[row].map(Value::from),
                            Cells::Time(cells) => cells[row].map(|ms| Value::from(rfc3339(ms))),
                        };
                        (column.name.clone(), value.unwrap_or(Value::Null))
                    })
                    .collect();
                Value::Object(object)
            })
            .collect();
        format!(
            "{}\n",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        )
    }

    /// One row group, uncompressed; every column optional; times as
    /// TIMESTAMP(MILLIS, UTC).
    pub fn parquet(&self) -> Result<Vec<u8>, ParquetError> {
        let fields = self
            .columns
            .iter()
            .map(|column| {
                let (physical, logical) = match column.cells {
                    Cells::Text(_) => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
                    Cells::Integer(_) => (PhysicalType::INT64, None),
                    Cells::Number(_) => (PhysicalType::DOUBLE, None),
                    Cells::Flag(_) => (PhysicalType::BOOLEAN, None),
                    Cells::Time(_) => (
                        PhysicalType::INT64,
                        Some(LogicalType::timestamp(true, TimeUnit::MILLIS)),
                    ),
                };
                Type::primitive_type_builder(&column.name, physical)
                    .with_repetition(Repetition::OPTIONAL)
                    .with_logical_type(logical)
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schema = Arc::new(
            Type::group_type_builder("run")
                .with_fields(fields)
                .build()?,
        );
        let properties = Arc::new(WriterProperties::builder().build());
        let mut out = Vec::new();
        let mut writer = SerializedFileWriter::new(&mut out, schema, properties)?;
        let mut group = writer.next_row_group()?;
        let mut columns = self.columns.iter();
        while let Some(mut writer) = group.next_column()? {
            let Some(column) = columns.next() else { break };
            match &column.cells {
                Cells::Text(cells) => write_optional::<ByteArrayType>(
                    &mut writer,
                    cells.iter().map(|c| c.as_deref().map(ByteArray::from)),
                ),
                Cells::Integer(cells) | Cells::Time(cells) => {
                    write_optional::<Int64Type>(&mut writer, cells.iter().copied())
                }
                Cells::Number(cells) => {
                    write_optional::<DoubleType>(&mut writer, cells.iter().copied())
                }
                Cells::Flag(cells) => {
                    write_optional::<BoolType>(&mut writer, cells.iter().copied())
                }
            }?;
            writer.close()?;
        }
        group.close()?;
        writer.close()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    use super::*;

    fn runs() -> Vec<Run> {
        vec![
            Run {
                id: "c1/n=1/b/w1".into(),
                config: "n=1".into(),
                backend: "b".into(),
                cycle: 1,
                warmup: true,
                state: RunState::Succeeded as i32,
                params: [
                    ("n".to_string(), "1".to_string()),
                    ("prompt".to_string(), "say \"hi\", twice".to_string()),
                ]
                .into(),
                result_json: r#"{"tokens": 10, "note": "a, \"b\""}"#.into(),
                exit_code: Some(0),
                started_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 250_000_000,
                }),
                duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                energy: vec![berth_proto::orchestrator::v1::RunEnergy {
                    energy_j: Some(20.0),
                    ..Default::default()
                }],
                // As the orchestrator derives them: 20 J over 10 tokens,
                // 15 J of it above the idle baseline.
                energy_j: Some(20.0),
                joules_per_unit: Some(2.0),
                energy_net_j: Some(15.0),
                joules_per_unit_net: Some(1.5),
                provenance: Some(Provenance {
                    kernel: "6.1.0".into(),
                    cpu_governor: "performance".into(),
                    gpus: vec![GpuProvenance {
                        name: "NVIDIA H100".into(),
                        power_limit_w: Some(700.0),
                        persistence_mode: Some(true),
                        ..Default::default()
                    }],
                    unknown: vec!["cpu frequency policy: none".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            Run {
                id: "c1/n=1/b/1".into(),
                config: "n=1".into(),
                backend: "b".into(),
                cycle: 1,
                state: RunState::Failed as i32,
                error: "exit code 3".into(),
                ..Default::default()
            },
        ]
    }

    /// A campaign whose work metric is `tokens`.
    fn campaign() -> Campaign {
        Campaign {
            work_metric: "tokens".into(),
            ..Default::default()
        }
    }

    #[test]
    fn csv_and_json_have_a_row_per_run_with_the_same_columns() {
        let table = RunTable::new(&campaign(), &runs());
        let csv = table.csv().unwrap();
        let text = String::from_utf8(csv.clone()).unwrap();
        assert!(
            text.lines().all(|l| l.starts_with('"') && l.ends_with('"')),
            "every field quoted:\n{text}"
        );
        let mut reader = csv::Reader::from_reader(csv.as_slice());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(
            header[..6],
            ["run_id", "config", "backend", "cycle", "warmup", "state"]
        );
        let energy = header.iter().position(|h| h == "energy_j").unwrap();
        assert_eq!(
            header[energy - 1..energy + 4],
            [
                "result.tokens",
                "energy_j",
                "energy_net_j",
                "joules_per_tokens",
                "net_joules_per_tokens",
            ]
        );
        // Then the provenance: the host's, a group per GPU, the result last.
        assert_eq!(header[energy + 4], "provenance.berth_version");
        assert!(
            header.iter().any(|h| h == "gpu0.power_limit_w"),
            "{header:?}"
        );
        assert_eq!(header.last().unwrap(), "result_json");
        // Parameters come before, in the order the runs' maps give them.
        for param in ["param.n", "param.prompt"] {
            assert!(header.iter().any(|h| h == param), "{header:?}");
        }
        let rows: Vec<std::collections::HashMap<String, String>> = reader
            .records()
            .map(|record| {
                header
                    .iter()
                    .cloned()
                    .zip(record.unwrap().iter().map(String::from))
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert_eq!(
            (rows[0]["warmup"].as_str(), rows[0]["state"].as_str()),
            ("true", "succeeded")
        );
        assert_eq!(rows[0]["started_at"], "2023-11-14T22:13:20.250Z");
        assert_eq!(rows[0]["duration_s"], "1.5");
        assert_eq!(
            (
                rows[0]["result.tokens"].as_str(),
                rows[0]["energy_j"].as_str(),
                rows[0]["joules_per_tokens"].as_str()
            ),
            ("10", "20", "2")
        );
        assert_eq!(
            (
                rows[0]["energy_net_j"].as_str(),
                rows[0]["net_joules_per_tokens"].as_str()
            ),
            ("15", "1.5")
        );
        assert_eq!(
            (
                rows[0]["provenance.cpu_governor"].as_str(),
                rows[0]["gpu0.power_limit_w"].as_str(),
                rows[0]["gpu0.persistence_mode"].as_str(),
                rows[0]["provenance.unknown"].as_str(),
            ),
            ("performance", "700", "true", "cpu frequency policy: none")
        );
        // A run without provenance (recorded before) has empty fields.
        assert_eq!(rows[1]["provenance.kernel"], "");
        // A value with a comma and quotes comes back as it was, in one field.
        assert_eq!(rows[0]["param.prompt"], "say \"hi\", twice");
        assert_eq!(
            rows[0]["result_json"],
            r#"{"tokens": 10, "note": "a, \"b\""}"#
        );
        // Absent values are empty fields.
        assert_eq!(
            (rows[1]["exit_code"].as_str(), rows[1]["energy_j"].as_str()),
            ("", "")
        );

        let json: serde_json::Value = serde_json::from_str(&table.json()).unwrap();
        assert_eq!(json[1]["state"], "failed");
        assert_eq!(json[1]["result.tokens"], serde_json::Value::Null);
        assert_eq!(json[0]["joules_per_tokens"], 2.0);
    }

    #[test]
    fn the_clusters_energy_is_a_column_beside_berths_only_where_a_run_has_it() {
        let plain = RunTable::new(&campaign(), &runs()).json();
        assert!(!plain.contains("cluster_energy_j"), "{plain}");
        let mut runs = runs();
        runs[0].cluster_accounting = Some(berth_proto::agent::v1::ExecAccounting {
            accounting_id: "12.3".into(),
            consumed_energy_j: Some(18.0),
            note: String::new(),
        });
        runs[0].energy_vs_cluster_j = Some(2.0);
        runs[1].cluster_accounting = Some(berth_proto::agent::v1::ExecAccounting {
            note: "sacct: Slurm accounting storage is disabled".into(),
            ..Default::default()
        });
        let json: serde_json::Value =
            serde_json::from_str(&RunTable::new(&campaign(), &runs).json()).unwrap();
        assert_eq!(json[0]["energy_j"], 20.0);
        assert_eq!(json[0]["cluster_energy_j"], 18.0);
        assert_eq!(json[0]["energy_vs_cluster_j"], 2.0);
        assert_eq!(json[0]["cluster_accounting_id"], "12.3");
        assert_eq!(json[1]["cluster_energy_j"], serde_json::Value::Null);
        assert_eq!(
            json[1]["cluster_accounting_note"],
            "sacct: Slurm accounting storage is disabled"
        );
    }

    #[test]
    fn parquet_reads_back() {
        let bytes = RunTable::new(&campaign(), &runs()).parquet().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.parquet");
        std::fs::write(&path, bytes).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
        let rows: Vec<_> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| row.unwrap())
            .collect();
        let field = |row: usize, name: &str| {
            rows[row]
                .get_column_iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, f)| f.clone())
                .unwrap()
        };
        assert_eq!(field(0, "warmup"), Field::Bool(true));
        assert_eq!(field(0, "result.tokens"), Field::Double(10.0));
        assert_eq!(field(1, "exit_code"), Field::Null);
        assert_eq!(field(1, "state"), Field::Str("failed".into()));
        assert_eq!(field(0, "gpu0.power_limit_w"), Field::Double(700.0));
        assert_eq!(field(1, "gpu0.name"), Field::Null);
    }
}
