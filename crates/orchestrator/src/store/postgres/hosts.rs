//! Registered hosts (address, token, labels, power sampler), and the
//! placements of campaigns' backends on them (host, workload and GPUs,
//! kept to adopt them after a restart).

use super::pool::{PgResult, Session};
use crate::store::{HostRecord, Placement, StoreError};

pub(super) fn upsert_host(db: &mut Session, host: &HostRecord) -> PgResult<()> {
    let labels =
        serde_json::to_string(&host.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    db.write(
        "INSERT INTO hosts (name, address, token, labels, power_sampler) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (name) DO UPDATE SET address = $2, token = $3, labels = $4, power_sampler = $5",
        &[&host.name, &host.address, &host.token, &labels, &host.power_sampler],
    )?;
    Ok(())
}

pub(super) fn delete_host(db: &mut Session, name: &str) -> PgResult<bool> {
    Ok(db.write("DELETE FROM hosts WHERE name = $1", &[&name])? == 1)
}

pub(super) fn hosts(db: &mut Session) -> PgResult<Vec<HostRecord>> {
    let rows = db.query(
        "SELECT name, address, token, labels, power_sampler FROM hosts ORDER BY name",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|row| HostRecord {
            name: row.get(0),
            address: row.get(1),
            token: row.get(2),
            labels: serde_json::from_str(row.get(3)).unwrap_or_default(),
            power_sampler: row.get(4),
        })
        .collect())
}

pub(super) fn set_placement(
    db: &mut Session,
    campaign_id: &str,
    placement: &Placement,
) -> PgResult<()> {
    let gpus = placement
        .gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    db.write(
        "INSERT INTO placements (campaign_id, backend, host, workload_id, gpus) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (campaign_id, backend) DO UPDATE SET host = $3, workload_id = $4, gpus = $5",
        &[
            &campaign_id,
            &placement.backend,
            &placement.host,
            &placement.workload_id,
            &gpus,
        ],
    )?;
    Ok(())
}

pub(super) fn clear_placement(db: &mut Session, campaign_id: &str, backend: &str) -> PgResult<()> {
    db.write(
        "DELETE FROM placements WHERE campaign_id = $1 AND backend = $2",
        &[&campaign_id, &backend],
    )?;
    Ok(())
}

pub(super) fn placements(db: &mut Session, campaign_id: &str) -> PgResult<Vec<Placement>> {
    let rows = db.query(
        "SELECT backend, host, workload_id, gpus FROM placements WHERE campaign_id = $1",
        &[&campaign_id],
    )?;
    Ok(rows
        .iter()
        .map(|row| Placement {
            backend: row.get(0),
            host: row.get(1),
            workload_id: row.get(2),
            gpus: row
                .get::<_, &str>(3)
                .split(',')
                .filter_map(|i| i.parse().ok())
                .collect(),
        })
        .collect())
}
