//! Deployments and their replicas in the PostgreSQL store.

use berth_proto::orchestrator::v1::{DeploymentState, ReplicaState};
use postgres::{GenericClient, Row};

use super::pool::{PgResult, Session};
use super::{PostgresStore, now_ms, unsigned};
use crate::store::codec::replica_transition;
use crate::store::deployments::{
    DeploymentRecord, DeploymentStore, DeploymentTransition, Inserted, ReplicaRecord,
    deployment_is_terminal,
};
use crate::store::{StoreError, StoreResult};

/// Transitions kept per deployment; older ones are dropped as new ones come.
const TRANSITIONS_KEPT: i64 = 1000;

const DEPLOYMENT_COLUMNS: &str =
    "seq, name, recipe, source_name, replicas, state, message, created_ms, stopping, generation";
const REPLICA_COLUMNS: &str = "deployment, idx, host, workload_id, state, ports, restarts, in_a_row, reason, since_ms, generation, gpus, address";

fn deployment_row(row: &Row) -> Result<DeploymentRecord, StoreError> {
    Ok(DeploymentRecord {
        seq: row.get(0),
        name: row.get(1),
        recipe_yaml: row.get(2),
        source_name: row.get(3),
        replicas: unsigned(row.get(4), "deployments.replicas")?,
        state: DeploymentState::try_from(row.get::<_, i32>(5)).unwrap_or_default(),
        message: row.get(6),
        created_ms: row.get(7),
        stopping: row.get(8),
        generation: unsigned(row.get(9), "deployments.generation")?,
    })
}

fn deployment_rows(rows: &[Row]) -> PgResult<Vec<DeploymentRecord>> {
    Ok(rows.iter().map(deployment_row).collect::<Result<_, _>>()?)
}

fn replica_row(row: &Row) -> Result<ReplicaRecord, StoreError> {
    Ok(ReplicaRecord {
        deployment: row.get(0),
        index: unsigned(row.get(1), "replicas.idx")?,
        host: row.get(2),
        workload_id: row.get(3),
        state: ReplicaState::try_from(row.get::<_, i32>(4)).unwrap_or_default(),
        ports: serde_json::from_str(row.get(5)).unwrap_or_default(),
        restarts: unsigned(row.get(6), "replicas.restarts")?,
        in_a_row: unsigned(row.get(7), "replicas.in_a_row")?,
        reason: row.get(8),
        since_ms: row.get(9),
        generation: unsigned(row.get(10), "replicas.generation")?,
        gpus: serde_json::from_str(row.get(11)).unwrap_or_default(),
        address: row.get(12),
    })
}

fn record_transition(
    db: &mut impl GenericClient,
    deployment: &str,
    replica: Option<u32>,
    message: &str,
) -> PgResult<()> {
    db.execute(
        "INSERT INTO deployment_transitions (deployment, time_ms, replica, message) VALUES ($1, $2, $3, $4)",
        &[&deployment, &now_ms(), &replica.map(i64::from), &message],
    )?;
    db.execute(
        "DELETE FROM deployment_transitions WHERE deployment = $1 AND seq <= \
         (SELECT seq FROM deployment_transitions WHERE deployment = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
        &[&deployment, &TRANSITIONS_KEPT],
    )?;
    Ok(())
}

fn insert_deployment(
    db: &mut Session,
    record: &DeploymentRecord,
    replace_live: bool,
) -> PgResult<Inserted> {
    let mut tx = db.transaction()?;
    // Locked: a deployment of that name deployed at once waits for this one.
    let existing: Option<i32> = tx
        .query_opt(
            "SELECT state FROM deployments WHERE name = $1 FOR UPDATE",
            &[&record.name],
        )?
        .map(|row| row.get(0));
    if let Some(state) = existing {
        let live = !deployment_is_terminal(DeploymentState::try_from(state).unwrap_or_default());
        if live && !replace_live {
            return Ok(Inserted::NameTaken);
        }
        if live {
            // Replaced in place: the replicas stay, adopted or replaced
            // one at a time by the reconciler under the new recipe.
            tx.execute(
                "UPDATE deployments SET recipe = $2, source_name = $3, replicas = $4, state = $5, message = $6, \
                 generation = generation + 1 WHERE name = $1",
                &[
                    &record.name,
                    &record.recipe_yaml,
                    &record.source_name,
                    &i64::from(record.replicas),
                    &(record.state as i32),
                    &record.message,
                ],
            )?;
            record_transition(&mut tx, &record.name, None, "updated: a new recipe")?;
            tx.commit()?;
            return Ok(Inserted::Stored);
        }
        // Its replicas and transitions go with it (ON DELETE CASCADE).
        tx.execute("DELETE FROM deployments WHERE name = $1", &[&record.name])?;
    }
    tx.execute(
        "INSERT INTO deployments (name, recipe, source_name, replicas, state, message, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &record.name,
            &record.recipe_yaml,
            &record.source_name,
            &i64::from(record.replicas),
            &(record.state as i32),
            &record.message,
            &record.created_ms,
        ],
    )?;
    record_transition(&mut tx, &record.name, None, &record.message)?;
    tx.commit()?;
    Ok(Inserted::Stored)
}

fn set_deployment_state(
    db: &mut Session,
    name: &str,
    state: DeploymentState,
    message: &str,
) -> PgResult<bool> {
    let mut tx = db.transaction()?;
    let before = tx.query_opt(
        "SELECT state, message FROM deployments WHERE name = $1 FOR UPDATE",
        &[&name],
    )?;
    let Some(before) = before else {
        return Ok(false);
    };
    let (before_state, before_message): (i32, &str) = (before.get(0), before.get(1));
    if before_state == state as i32 && before_message == message {
        return Ok(true);
    }
    tx.execute(
        "UPDATE deployments SET state = $2, message = $3 WHERE name = $1",
        &[&name, &(state as i32), &message],
    )?;
    if before_state != state as i32 {
        let named = state.as_str_name().trim_start_matches("DEPLOYMENT_STATE_");
        record_transition(&mut tx, name, None, &format!("{named}: {message}"))?;
    }
    tx.commit()?;
    Ok(true)
}

/// Runs `change` (an UPDATE of one deployment) and, when it changed a row,
/// records `transition`, in one transaction; whether it changed one.
fn change_deployment(
    db: &mut Session,
    name: &str,
    change: &str,
    value: &(dyn postgres::types::ToSql + Sync),
    transition: &str,
) -> PgResult<bool> {
    let mut tx = db.transaction()?;
    let changed = tx.execute(change, &[&name, value])?;
    if changed > 0 {
        record_transition(&mut tx, name, None, transition)?;
    }
    tx.commit()?;
    Ok(changed > 0)
}

fn put_replica(db: &mut Session, replica: &ReplicaRecord) -> PgResult<()> {
    let mut tx = db.transaction()?;
    let before: Option<(i32, String)> = tx
        .query_opt(
            "SELECT state, reason FROM replicas WHERE deployment = $1 AND idx = $2 FOR UPDATE",
            &[&replica.deployment, &i64::from(replica.index)],
        )?
        .map(|row| (row.get(0), row.get(1)));
    let ports = serde_json::to_string(&replica.ports).unwrap_or_else(|_| "{}".into());
    let gpus = serde_json::to_string(&replica.gpus).unwrap_or_else(|_| "[]".into());
    tx.execute(
        "INSERT INTO replicas (deployment, idx, host, workload_id, state, ports, restarts, in_a_row, reason, since_ms, generation, gpus, address) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (deployment, idx) DO UPDATE SET host = $3, workload_id = $4, state = $5, ports = $6, \
         restarts = $7, in_a_row = $8, reason = $9, since_ms = $10, generation = $11, gpus = $12, address = $13",
        &[
            &replica.deployment,
            &i64::from(replica.index),
            &replica.host,
            &replica.workload_id,
            &(replica.state as i32),
            &ports,
            &i64::from(replica.restarts),
            &i64::from(replica.in_a_row),
            &replica.reason,
            &replica.since_ms,
            &i64::from(replica.generation),
            &gpus,
            &replica.address,
        ],
    )?;
    if let Some(message) = replica_transition(before, replica) {
        record_transition(&mut tx, &replica.deployment, Some(replica.index), &message)?;
    }
    tx.commit()?;
    Ok(())
}

impl DeploymentStore for PostgresStore {
    fn insert_deployment(
        &self,
        record: &DeploymentRecord,
        replace_live: bool,
    ) -> StoreResult<Inserted> {
        let record = record.clone();
        self.pool
            .call(move |db| insert_deployment(db, &record, replace_live))
    }

    fn deployment(&self, name: &str) -> StoreResult<Option<DeploymentRecord>> {
        let name = name.to_string();
        self.pool.call(move |db| {
            let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE name = $1");
            let row = db.query_opt(&sql, &[&name])?;
            Ok(row.as_ref().map(deployment_row).transpose()?)
        })
    }

    fn list_deployments(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentRecord>> {
        self.pool.call(move |db| {
            let sql = format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
            );
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            deployment_rows(&db.query(&sql, &[&before.unwrap_or(i64::MAX), &limit])?)
        })
    }

    fn live_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        self.pool.call(move |db| {
            let sql = format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE state <> ALL($1) ORDER BY seq"
            );
            let ended = [
                DeploymentState::Completed as i32,
                DeploymentState::Failed as i32,
                DeploymentState::Cancelled as i32,
            ];
            deployment_rows(&db.query(&sql, &[&&ended[..]])?)
        })
    }

    fn set_deployment_state(
        &self,
        name: &str,
        state: DeploymentState,
        message: &str,
    ) -> StoreResult<bool> {
        let (name, message) = (name.to_string(), message.to_string());
        self.pool
            .call(move |db| set_deployment_state(db, &name, state, &message))
    }

    fn set_deployment_replicas(&self, name: &str, replicas: u32) -> StoreResult<bool> {
        let name = name.to_string();
        self.pool.call(move |db| {
            change_deployment(
                db,
                &name,
                "UPDATE deployments SET replicas = $2 WHERE name = $1",
                &i64::from(replicas),
                &format!("scaled to {replicas} replicas"),
            )
        })
    }

    fn request_stop(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_string();
        self.pool.call(move |db| {
            change_deployment(
                db,
                &name,
                "UPDATE deployments SET stopping = $2 WHERE name = $1 AND NOT stopping",
                &true,
                "stop requested",
            )
        })
    }

    fn replicas(&self, deployment: &str) -> StoreResult<Vec<ReplicaRecord>> {
        let deployment = deployment.to_string();
        self.pool.call(move |db| {
            let sql = format!(
                "SELECT {REPLICA_COLUMNS} FROM replicas WHERE deployment = $1 ORDER BY idx"
            );
            let rows = db.query(&sql, &[&deployment])?;
            Ok(rows.iter().map(replica_row).collect::<Result<_, _>>()?)
        })
    }

    fn put_replica(&self, replica: &ReplicaRecord) -> StoreResult<()> {
        let replica = replica.clone();
        self.pool.call(move |db| put_replica(db, &replica))
    }

    fn delete_replica(&self, deployment: &str, index: u32) -> StoreResult<()> {
        let deployment = deployment.to_string();
        self.pool.call(move |db| {
            db.write(
                "DELETE FROM replicas WHERE deployment = $1 AND idx = $2",
                &[&deployment, &i64::from(index)],
            )?;
            Ok(())
        })
    }

    fn deployment_transitions(
        &self,
        deployment: &str,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentTransition>> {
        let deployment = deployment.to_string();
        self.pool.call(move |db| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = db.query(
                "SELECT time_ms, replica, message FROM deployment_transitions WHERE deployment = $1 \
                 ORDER BY seq DESC LIMIT $2",
                &[&deployment, &limit],
            )?;
            let mut transitions = rows
                .iter()
                .map(|row| {
                    Ok(DeploymentTransition {
                        time_ms: row.get(0),
                        replica: row
                            .get::<_, Option<i64>>(1)
                            .map(|index| unsigned(index, "deployment_transitions.replica"))
                            .transpose()?,
                        message: row.get(2),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            transitions.reverse();
            Ok(transitions)
        })
    }
}
