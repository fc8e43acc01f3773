//! Deployments and their replicas in the SQLite store.

use berth_proto::orchestrator::v1::{DeploymentState, ReplicaState};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{SqliteStore, now_ms};
use crate::store::StoreResult;
use crate::store::codec::replica_transition;
use crate::store::deployments::{
    DeploymentRecord, DeploymentStore, DeploymentTransition, Inserted, ReplicaRecord,
    deployment_is_terminal,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    recipe TEXT NOT NULL,
    source_name TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    state INTEGER NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    stopping INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS replicas (
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    host TEXT NOT NULL,
    workload_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    ports TEXT NOT NULL,
    restarts INTEGER NOT NULL,
    in_a_row INTEGER NOT NULL,
    reason TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    gpus TEXT NOT NULL DEFAULT '[]',
    address TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deployment_transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    time_ms INTEGER NOT NULL,
    replica INTEGER,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_by_deployment ON deployment_transitions(deployment, seq);
";

/// Transitions kept per deployment; older ones are dropped as new ones come.
const TRANSITIONS_KEPT: i64 = 1000;

const DEPLOYMENT_COLUMNS: &str =
    "seq, name, recipe, source_name, replicas, state, message, created_ms, stopping, generation";
const REPLICA_COLUMNS: &str = "deployment, idx, host, workload_id, state, ports, restarts, in_a_row, reason, since_ms, generation, gpus, address";

fn deployment_row(row: &Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        seq: row.get(0)?,
        name: row.get(1)?,
        recipe_yaml: row.get(2)?,
        source_name: row.get(3)?,
        replicas: row.get(4)?,
        state: DeploymentState::try_from(row.get::<_, i32>(5)?).unwrap_or_default(),
        message: row.get(6)?,
        created_ms: row.get(7)?,
        stopping: row.get(8)?,
        generation: row.get(9)?,
    })
}

fn replica_row(row: &Row<'_>) -> rusqlite::Result<ReplicaRecord> {
    let ports: String = row.get(5)?;
    Ok(ReplicaRecord {
        deployment: row.get(0)?,
        index: row.get(1)?,
        host: row.get(2)?,
        workload_id: row.get(3)?,
        state: ReplicaState::try_from(row.get::<_, i32>(4)?).unwrap_or_default(),
        ports: serde_json::from_str(&ports).unwrap_or_default(),
        restarts: row.get(6)?,
        in_a_row: row.get(7)?,
        reason: row.get(8)?,
        since_ms: row.get(9)?,
        generation: row.get(10)?,
        gpus: serde_json::from_str(&row.get::<_, String>(11)?).unwrap_or_default(),
        address: row.get(12)?,
    })
}

fn record_transition(
    db: &Connection,
    deployment: &str,
    replica: Option<u32>,
    message: &str,
) -> rusqlite::Result<()> {
    db.execute(
        "INSERT INTO deployment_transitions (deployment, time_ms, replica, message) VALUES (?1, ?2, ?3, ?4)",
        params![deployment, now_ms(), replica, message],
    )?;
    db.execute(
        "DELETE FROM deployment_transitions WHERE deployment = ?1 AND seq <= \
         (SELECT seq FROM deployment_transitions WHERE deployment = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        params![deployment, TRANSITIONS_KEPT],
    )?;
    Ok(())
}

impl DeploymentStore for SqliteStore {
    fn insert_deployment(
        &self,
        record: &DeploymentRecord,
        replace_live: bool,
    ) -> StoreResult<Inserted> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let existing: Option<i32> = tx
            .query_row(
                "SELECT state FROM deployments WHERE name = ?1",
                [&record.name],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(state) = existing {
            let live =
                !deployment_is_terminal(DeploymentState::try_from(state).unwrap_or_default());
            if live && !replace_live {
                return Ok(Inserted::NameTaken);
            }
            if live {
                // Replaced in place: the replicas stay, adopted or replaced
                // one at a time by the reconciler under the new recipe.
                tx.execute(
                    "UPDATE deployments SET recipe = ?2, source_name = ?3, replicas = ?4, state = ?5, message = ?6, \
                     generation = generation + 1 WHERE name = ?1",
                    params![
                        record.name,
                        record.recipe_yaml,
                        record.source_name,
                        record.replicas,
                        record.state as i32,
                        record.message
                    ],
                )?;
                record_transition(&tx, &record.name, None, "updated: a new recipe")?;
                tx.commit()?;
                return Ok(Inserted::Stored);
            }
            tx.execute("DELETE FROM replicas WHERE deployment = ?1", [&record.name])?;
            tx.execute(
                "DELETE FROM deployment_transitions WHERE deployment = ?1",
                [&record.name],
            )?;
            tx.execute("DELETE FROM deployments WHERE name = ?1", [&record.name])?;
        }
        tx.execute(
            "INSERT INTO deployments (name, recipe, source_name, replicas, state, message, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                record.name,
                record.recipe_yaml,
                record.source_name,
                record.replicas,
                record.state as i32,
                record.message,
                record.created_ms
            ],
        )?;
        record_transition(&tx, &record.name, None, &record.message)?;
        tx.commit()?;
        Ok(Inserted::Stored)
    }

    fn deployment(&self, name: &str) -> StoreResult<Option<DeploymentRecord>> {
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE name = ?1");
        Ok(self
            .db()
            .query_row(&sql, [name], deployment_row)
            .optional()?)
    }

    fn list_deployments(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentRecord>> {
        let db = self.db();
        let sql = format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(
            params![before.unwrap_or(i64::MAX), limit as i64],
            deployment_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn live_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        let db = self.db();
        let sql = format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE state NOT IN (?1, ?2, ?3) ORDER BY seq"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(
            params![
                DeploymentState::Completed as i32,
                DeploymentState::Failed as i32,
                DeploymentState::Cancelled as i32
            ],
            deployment_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_deployment_state(
        &self,
        name: &str,
        state: DeploymentState,
        message: &str,
    ) -> StoreResult<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let before: Option<(i32, String)> = tx
            .query_row(
                "SELECT state, message FROM deployments WHERE name = ?1",
                [name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((before_state, before_message)) = before else {
            return Ok(false);
        };
        if before_state == state as i32 && before_message == message {
            return Ok(true);
        }
        tx.execute(
            "UPDATE deployments SET state = ?2, message = ?3 WHERE name = ?1",
            params![name, state as i32, message],
        )?;
        if before_state != state as i32 {
            let named = state.as_str_name().trim_start_matches("DEPLOYMENT_STATE_");
            record_transition(&tx, name, None, &format!("{named}: {message}"))?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn set_deployment_replicas(&self, name: &str, replicas: u32) -> StoreResult<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let changed = tx.execute(
            "UPDATE deployments SET replicas = ?2 WHERE name = ?1",
            params![name, replicas],
        )?;
        if changed > 0 {
            record_transition(&tx, name, None, &format!("scaled to {replicas} replicas"))?;
        }
        tx.commit()?;
        Ok(changed > 0)
    }

    fn request_stop(&self, name: &str) -> StoreResult<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let changed = tx.execute(
            "UPDATE deployments SET stopping = 1 WHERE name = ?1 AND stopping = 0",
            [name],
        )?;
        if changed > 0 {
            record_transition(&tx, name, None, "stop requested")?;
        }
        tx.commit()?;
        Ok(changed > 0)
    }

    fn replicas(&self, deployment: &str) -> StoreResult<Vec<ReplicaRecord>> {
        let db = self.db();
        let sql =
            format!("SELECT {REPLICA_COLUMNS} FROM replicas WHERE deployment = ?1 ORDER BY idx");
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map([deployment], replica_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_replica(&self, replica: &ReplicaRecord) -> StoreResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let before: Option<(i32, String)> = tx
            .query_row(
                "SELECT state, reason FROM replicas WHERE deployment = ?1 AND idx = ?2",
                params![replica.deployment, replica.index],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let ports = serde_json::to_string(&replica.ports).unwrap_or_else(|_| "{}".into());
        let gpus = serde_json::to_string(&replica.gpus).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "INSERT INTO replicas (deployment, idx, host, workload_id, state, ports, restarts, in_a_row, reason, since_ms, generation, gpus, address) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (deployment, idx) DO UPDATE SET host = ?3, workload_id = ?4, state = ?5, ports = ?6, \
             restarts = ?7, in_a_row = ?8, reason = ?9, since_ms = ?10, generation = ?11, gpus = ?12, address = ?13",
            params![
                replica.deployment,
                replica.index,
                replica.host,
                replica.workload_id,
                replica.state as i32,
                ports,
                replica.restarts,
                replica.in_a_row,
                replica.reason,
                replica.since_ms,
                replica.generation,
                gpus,
                replica.address
            ],
        )?;
        if let Some(message) = replica_transition(before, replica) {
            record_transition(&tx, &replica.deployment, Some(replica.index), &message)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_replica(&self, deployment: &str, index: u32) -> StoreResult<()> {
        self.db().execute(
            "DELETE FROM replicas WHERE deployment = ?1 AND idx = ?2",
            params![deployment, index],
        )?;
        Ok(())
    }

    fn deployment_transitions(
        &self,
        deployment: &str,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentTransition>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT time_ms, replica, message FROM deployment_transitions WHERE deployment = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let mut rows = statement
            .query_map(params![deployment, limit as i64], |row| {
                Ok(DeploymentTransition {
                    time_ms: row.get(0)?,
                    replica: row.get(1)?,
                    message: row.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }
}
