//! A stopped session's series as a file: CSV (one header line, one sample
//! per line, every field quoted) or Parquet (one row group, uncompressed),
//! with the same columns.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use berth_server::parquet_columns::{write_optional, write_required};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type,
};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::series::{SampleRow, SeriesView};

/// The columns, in order; absent readings are empty (CSV) or null (Parquet).
pub const COLUMNS: [&str; 11] = [
    "device",
    "time",
    "elapsed_s",
    "power_w",
    "power_avg_w",
    "energy_j",
    "utilization_pct",
    "memory_used_bytes",
    "temperature_c",
    "sm_clock_mhz",
    "replay",
];

const PARQUET_SCHEMA: &str = "message sample {
    required binary device (STRING);
    required int64 time (TIMESTAMP(NANOS,true));
    required double elapsed_s;
    optional double power_w;
    optional double power_avg_w;
    optional double energy_j;
    optional float utilization_pct;
    optional int64 memory_used_bytes (INTEGER(64,false));
    optional float temperature_c;
    optional int32 sm_clock_mhz (INTEGER(32,false));
    required boolean replay;
}";

fn unix_nanos(row: &SampleRow<'_>) -> i64 {
    row.time
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// CSV with RFC 3339 times (nanoseconds, UTC), every field quoted.
pub fn csv(series: &SeriesView<'_>) -> Result<Vec<u8>, csv::Error> {
    fn cell<T: ToString>(value: Option<T>) -> String {
        value.map(|v| v.to_string()).unwrap_or_default()
    }
    let mut writer = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .from_writer(Vec::new());
    writer.write_record(COLUMNS)?;
    for row in series.rows(None, 0) {
        let r = row.reading;
        writer.write_record([
            row.device.to_string(),
            humantime::format_rfc3339_nanos(row.time).to_string(),
            row.elapsed.as_secs_f64().to_string(),
            cell(r.power_w),
            cell(r.power_avg_w),
            cell(r.energy_j),
            cell(r.utilization_pct),
            cell(r.memory_used_bytes),
            cell(r.temperature_c),
            cell(r.sm_clock_mhz),
            row.replay.to_string(),
        ])?;
    }
    writer
        .into_inner()
        .map_err(|error| csv::Error::from(error.into_error()))
}

pub fn parquet(series: &SeriesView<'_>) -> Result<Vec<u8>, ParquetError> {
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
    let properties = Arc::new(WriterProperties::builder().build());
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, properties)?;
    let mut group = writer.next_row_group()?;
    let rows: Vec<SampleRow<'_>> = series.rows(None, 0).collect();
    let mut index = 0;
    while let Some(mut column) = group.next_column()? {
        let rows = rows.iter();
        match COLUMNS[index] {
            "device" => write_required::<ByteArrayType>(
                &mut column,
                rows.map(|r| ByteArray::from(r.device)).collect(),
            ),
            "time" => write_required::<Int64Type>(&mut column, rows.map(unix_nanos).collect()),
            "elapsed_s" => write_required::<DoubleType>(
                &mut column,
                rows.map(|r| r.elapsed.as_secs_f64()).collect(),
            ),
            "power_w" => write_optional::<DoubleType>(&mut column, rows.map(|r| r.reading.power_w)),
            "power_avg_w" => {
                write_optional::<DoubleType>(&mut column, rows.map(|r| r.reading.power_avg_w))
            }
            "energy_j" => {
                write_optional::<DoubleType>(&mut column, rows.map(|r| r.reading.energy_j))
            }
            "utilization_pct" => {
                write_optional::<FloatType>(&mut column, rows.map(|r| r.reading.utilization_pct))
            }
            // Parquet's unsigned integers are stored in the signed physical type.
            "memory_used_bytes" => write_optional::<Int64Type>(
                &mut column,
                rows.map(|r| r.reading.memory_used_bytes.map(|b| b as i64)),
            ),
            "temperature_c" => {
                write_optional::<FloatType>(&mut column, rows.map(|r| r.reading.temperature_c))
            }
            "sm_clock_mhz" => write_optional::<Int32Type>(
                &mut column,
                rows.map(|r| r.reading.sm_clock_mhz.map(|c| c as i32)),
            ),
            _ => write_required::<BoolType>(&mut column, rows.map(|r| r.replay).collect()),
        }?;
        column.close()?;
        index += 1;
    }
    group.close()?;
    writer.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    use super::*;
    use crate::clock::Clock;
    use crate::reading::Reading;
    use crate::recorder::Point;

    fn points() -> Vec<Point> {
        let full = Reading {
            device: 0,
            at: Duration::from_millis(1_010),
            power_w: Some(312.5),
            power_avg_w: Some(300.25),
            energy_j: Some(1_234.567),
            utilization_pct: Some(97.0),
            memory_used_bytes: Some(80_000_000_000),
            temperature_c: Some(61.0),
            sm_clock_mhz: Some(1_980),
        };
        let sparse = Reading {
            device: 1,
            at: Duration::from_millis(1_020),
            energy_j: Some(42.0),
            ..Reading::default()
        };
        vec![
            Point {
                device: 0,
                reading: full,
            },
            Point {
                device: 1,
                reading: sparse,
            },
        ]
    }

    fn view<'a>(points: &'a [Point], clock: Clock) -> SeriesView<'a> {
        SeriesView::new(
            vec![("replay:gpu0", true), ("rapl:package-0", false)],
            points,
            Duration::from_millis(1_000),
            clock,
        )
    }

    #[test]
    fn csv_has_a_header_and_empty_cells_for_missing_readings() {
        let points = points();
        let bytes = csv(&view(&points, Clock::start())).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines.iter().all(|l| l.starts_with('"') && l.ends_with('"')),
            "every field quoted:\n{text}"
        );
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        assert_eq!(reader.headers().unwrap(), COLUMNS.as_slice());
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        let full: Vec<&str> = records[0].iter().collect();
        assert_eq!(full[0], "replay:gpu0");
        assert!(full[1].ends_with('Z'), "{}", full[1]);
        assert_eq!(
            &full[2..],
            [
                "0.01",
                "312.5",
                "300.25",
                "1234.567",
                "97",
                "80000000000",
                "61",
                "1980",
                "true"
            ]
        );
        let sparse: Vec<&str> = records[1].iter().collect();
        assert_eq!(
            &sparse[2..],
            ["0.02", "", "", "42", "", "", "", "", "false"]
        );
    }

    #[test]
    fn parquet_reads_back_with_nulls() {
        let points = points();
        let clock = Clock::start();
        let bytes = parquet(&view(&points, clock)).unwrap();
        let reader = SerializedFileReader::new(Bytes::from(bytes)).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
        let rows: Vec<Vec<(String, Field)>> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| row.unwrap().into_columns())
            .collect();
        let names: Vec<&str> = rows[0].iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, COLUMNS);
        let expected_time = clock
            .wall(points[0].reading.at)
            .duration_since(UNIX_EPOCH)
            .unwrap();
        assert_eq!(rows[0][1].1, Field::Long(expected_time.as_nanos() as i64));
        assert_eq!(rows[0][3].1, Field::Double(312.5));
        assert_eq!(rows[0][7].1, Field::ULong(80_000_000_000));
        assert_eq!(rows[0][9].1, Field::UInt(1_980));
        assert_eq!(rows[1][0].1, Field::Str("rapl:package-0".into()));
        assert_eq!(rows[1][3].1, Field::Null);
        assert_eq!(rows[1][5].1, Field::Double(42.0));
        assert_eq!(rows[1][10].1, Field::Bool(false));
    }
}
