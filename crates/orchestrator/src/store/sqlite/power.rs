//! What runs measured: each run's power samples (written with the run's
//! transition, read back a page at a time) and its energy records.
use rusqlite::{Connection, Row, params};

use crate::store::codec::{power_sample, to_nanos};
use crate::store::{PowerSeries, StoreResult, StoredPowerSample};

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
    Ok((
        row.get::<_, i64>(0)? as u64,
        power_sample(
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
        ),
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
