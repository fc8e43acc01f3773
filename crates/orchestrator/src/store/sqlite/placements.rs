//! Placements: the host and workload each backend of a campaign runs on,
//! with the GPUs it was given, kept to adopt them after a restart.
use rusqlite::{Connection, params};

use crate::store::{Placement, StoreResult};

pub(super) fn set_placement(
    db: &Connection,
    campaign_id: &str,
    placement: &Placement,
) -> StoreResult<()> {
    db.execute(
        "INSERT INTO placements (campaign_id, backend, host, workload_id, gpus) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(campaign_id, backend) DO UPDATE SET host = ?3, workload_id = ?4, gpus = ?5",
        params![
            campaign_id,
            placement.backend,
            placement.host,
            placement.workload_id,
            placement
                .gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ],
    )?;
    Ok(())
}

pub(super) fn clear_placement(
    db: &Connection,
    campaign_id: &str,
    backend: &str,
) -> StoreResult<()> {
    db.execute(
        "DELETE FROM placements WHERE campaign_id = ?1 AND backend = ?2",
        params![campaign_id, backend],
    )?;
    Ok(())
}

pub(super) fn placements(db: &Connection, campaign_id: &str) -> StoreResult<Vec<Placement>> {
    let mut statement = db.prepare(
        "SELECT backend, host, workload_id, gpus FROM placements WHERE campaign_id = ?1",
    )?;
    let rows = statement.query_map([campaign_id], |row| {
        let gpus: String = row.get(3)?;
        Ok(Placement {
            backend: row.get(0)?,
            host: row.get(1)?,
            workload_id: row.get(2)?,
            gpus: gpus.split(',').filter_map(|i| i.parse().ok()).collect(),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
