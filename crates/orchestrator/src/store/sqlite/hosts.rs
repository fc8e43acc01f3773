//! Registered hosts: their address, token, labels and power sampler.
use rusqlite::{Connection, params};

use crate::store::{HostRecord, StoreError, StoreResult};

pub(super) fn upsert_host(db: &Connection, host: &HostRecord) -> StoreResult<()> {
    let labels =
        serde_json::to_string(&host.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    db.execute(
        "INSERT INTO hosts (name, address, token, labels, power_sampler) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name) DO UPDATE SET address = ?2, token = ?3, labels = ?4, power_sampler = ?5",
        params![host.name, host.address, host.token, labels, host.power_sampler],
    )?;
    Ok(())
}

pub(super) fn delete_host(db: &Connection, name: &str) -> StoreResult<bool> {
    Ok(db.execute("DELETE FROM hosts WHERE name = ?1", [name])? == 1)
}

pub(super) fn hosts(db: &Connection) -> StoreResult<Vec<HostRecord>> {
    let mut statement =
        db.prepare("SELECT name, address, token, labels, power_sampler FROM hosts ORDER BY name")?;
    let rows = statement.query_map([], |row| {
        let labels: String = row.get(3)?;
        Ok(HostRecord {
            name: row.get(0)?,
            address: row.get(1)?,
            token: row.get(2)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            power_sampler: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
