//! What runs measured: each run's power samples (written with the run's
//! transition, read back a page at a time) and its energy records.
use berth_proto::orchestrator::v1::{RunEnergy, RunPowerSample};
use prost::Message;
use rusqlite::{Connection, Row, params};

use crate::store::{PowerSeries, StoreResult, StoredPowerSample};

/// Energy records as length-delimited protobuf messages, one after another.
pub(super) fn encode_energy(energy: &[RunEnergy]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for record in energy {
        let _ = record.encode_length_delimited(&mut bytes);
    }
    bytes
}

pub(super) fn decode_energy(mut bytes: &[u8]) -> Vec<RunEnergy> {
    let mut energy = Vec::new();
    while !bytes.is_empty() {
        match RunEnergy::decode_length_delimited(&mut bytes) {
            Ok(record) => energy.push(record),
            Err(_) => break,
        }
    }
    energy
}

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Seconds and nanoseconds (of a timestamp or a duration) as nanoseconds;
/// i64 holds them until the year 2262.
fn to_nanos(seconds: i64, nanos: i32) -> i64 {
    seconds
        .saturating_mul(NANOS_PER_SECOND)
        .saturating_add(i64::from(nanos))
}

fn from_nanos(total: i64) -> (i64, i32) {
    (
        total.div_euclid(NANOS_PER_SECOND),
        total.rem_euclid(NANOS_PER_SECOND) as i32,
    )
}

pub(super) fn insert_power_series(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    series: &PowerSeries,
) -> StoreResult<()> {
    tx.execute("DELETE FROM run_power_samples WHERE run_id = ?1", [run_id])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO run_power_samples (run_id, position, device, time_ns, elapsed_ns, power_w, energy_j) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for (position, sample) in series.samples.iter().enumerate() {
        insert.execute(params![
            run_id,
            position as i64,
            sample.device,
            sample.time.map(|t| to_nanos(t.seconds, t.nanos)),
            sample.elapsed.map(|d| to_nanos(d.seconds, d.nanos)),
            sample.power_w,
            sample.energy_j
        ])?;
    }
    Ok(())
}

fn power_sample_row(row: &Row<'_>) -> rusqlite::Result<StoredPowerSample> {
    let time_ns: Option<i64> = row.get(2)?;
    let elapsed_ns: Option<i64> = row.get(3)?;
    Ok((
        row.get::<_, i64>(0)? as u64,
        RunPowerSample {
            device: row.get(1)?,
            time: time_ns.map(|ns| {
                let (seconds, nanos) = from_nanos(ns);
                prost_types::Timestamp { seconds, nanos }
            }),
            elapsed: elapsed_ns.map(|ns| {
                let (seconds, nanos) = from_nanos(ns);
                prost_types::Duration { seconds, nanos }
            }),
            power_w: row.get(4)?,
            energy_j: row.get(5)?,
        },
    ))
}

pub(super) fn power_series(
    db: &Connection,
    run_id: &str,
    device: Option<&str>,
    after: Option<u64>,
    limit: usize,
) -> StoreResult<Vec<StoredPowerSample>> {
    let mut statement = db.prepare_cached(
        "SELECT position, device, time_ns, elapsed_ns, power_w, energy_j FROM run_power_samples \
         WHERE run_id = ?1 AND position > ?2 AND (?3 IS NULL OR device = ?3) ORDER BY position LIMIT ?4",
    )?;
    let after = after.map_or(-1, |p| p as i64);
    let rows = statement.query_map(
        params![run_id, after, device, limit as i64],
        power_sample_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
