//! Runs: their rows, their counts per state (kept by triggers), reads in
//! the orders the scheduler needs, and transitions as compare-and-set on
//! the state that return the run as written with its campaign's counts.
use berth_proto::agent::v1::Provenance;
use berth_proto::orchestrator::v1::{Run, RunCounts, RunState};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::power::insert_power_series;
use super::{now_ms, timestamp};
use crate::store::codec::{count_state, decode_energy, encode_energy};
use crate::store::{MeasuredRuns, RunPair, RunUpdate, StoreResult, Transitioned};

const RUN_COLUMNS: &str = "id, campaign_id, sequence, config, params, backend, cycle, warmup, state, host, attempts, \
                           exit_code, result_json, duration_ms, error, started_ms, finished_ms, energy, logs_tail, \
                           power_samples, power_series_truncated, provenance";

fn run_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let params: String = row.get(4)?;
    let duration_ms: Option<i64> = row.get(13)?;
    let (energy, cluster_accounting) =
        decode_energy(&row.get::<_, Option<Vec<u8>>>(17)?.unwrap_or_default());
    Ok(Run {
        id: row.get(0)?,
        campaign_id: row.get(1)?,
        sequence: row.get(2)?,
        config: row.get(3)?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        backend: row.get(5)?,
        cycle: row.get(6)?,
        warmup: row.get(7)?,
        state: row.get(8)?,
        host: row.get(9)?,
        attempts: row.get(10)?,
        exit_code: row.get(11)?,
        result_json: row.get(12)?,
        duration: duration_ms.map(|ms| prost_types::Duration {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        error: row.get(14)?,
        started_at: timestamp(row.get(15)?),
        finished_at: timestamp(row.get(16)?),
        energy,
        cluster_accounting,
        logs_tail: row.get(18)?,
        power_samples: row.get(19)?,
        power_series_truncated: row.get(20)?,
        provenance: row
            .get::<_, Option<Vec<u8>>>(21)?
            .and_then(|bytes| Provenance::decode(bytes.as_slice()).ok()),
        // Derived where runs leave the service (`results::with_derived`).
        energy_j: None,
        joules_per_unit: None,
        energy_net_j: None,
        joules_per_unit_net: None,
        energy_vs_cluster_j: None,
    })
}

/// The campaign's runs per state, as the triggers keep them.
pub(super) fn run_counts(db: &Connection, campaign_id: &str) -> StoreResult<RunCounts> {
    let mut statement =
        db.prepare_cached("SELECT state, runs FROM run_state_counts WHERE campaign_id = ?1")?;
    let mut counts = RunCounts::default();
    let rows = statement.query_map([campaign_id], |row| {
        Ok((row.get::<_, i32>(0)?, row.get::<_, u64>(1)?))
    })?;
    for row in rows {
        let (state, count) = row?;
        count_state(&mut counts, state, count);
    }
    Ok(counts)
}

fn state_list(states: &[RunState]) -> String {
    states
        .iter()
        .map(|s| (*s as i32).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn pending_runs_by_backend(
    db: &Connection,
    campaign_id: &str,
) -> StoreResult<std::collections::BTreeMap<String, u64>> {
    let mut statement = db.prepare_cached(
        "SELECT backend, COUNT(*) FROM runs WHERE campaign_id = ?1 AND state = ?2 GROUP BY backend",
    )?;
    let rows = statement.query_map(params![campaign_id, RunState::Pending as i32], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    let mut queues = std::collections::BTreeMap::new();
    for row in rows {
        let (backend, count) = row?;
        queues.insert(backend, count.max(0) as u64);
    }
    Ok(queues)
}

pub(super) fn runs(
    db: &Connection,
    campaign_id: &str,
    state: Option<RunState>,
    after_sequence: Option<u32>,
    limit: usize,
) -> StoreResult<Vec<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ?1 AND sequence > ?2 AND (?3 = 0 OR state = ?3) \
         ORDER BY sequence LIMIT ?4"
    );
    let mut statement = db.prepare_cached(&sql)?;
    let after = after_sequence.map_or(-1, i64::from);
    let state = state.map_or(0, |s| s as i32);
    let rows = statement.query_map(params![campaign_id, after, state, limit as i64], run_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn run(db: &Connection, id: &str) -> StoreResult<Option<Run>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1");
    Ok(db.query_row(&sql, [id], run_row).optional()?)
}

pub(super) fn measured_runs(db: &Connection, campaign_id: &str) -> StoreResult<Vec<MeasuredRuns>> {
    let mut statement = db.prepare(
        "SELECT config, backend, COUNT(*), SUM(state = ?2) FROM runs \
         WHERE campaign_id = ?1 AND warmup = 0 GROUP BY config, backend ORDER BY MIN(sequence)",
    )?;
    let rows = statement.query_map(params![campaign_id, RunState::Succeeded as i32], |row| {
        Ok(MeasuredRuns {
            config: row.get(0)?,
            backend: row.get(1)?,
            runs: row.get(2)?,
            succeeded: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn runs_of_pair(db: &Connection, pair: RunPair<'_>) -> StoreResult<Vec<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ?1 AND backend = ?2 AND config = ?3 AND warmup = ?4 \
         ORDER BY sequence"
    );
    let mut statement = db.prepare_cached(&sql)?;
    let rows = statement.query_map(
        params![pair.campaign_id, pair.backend, pair.config, pair.warmup],
        run_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn drop_pending_runs(db: &Connection, pair: RunPair<'_>) -> StoreResult<usize> {
    Ok(db.execute(
        "DELETE FROM runs WHERE campaign_id = ?1 AND backend = ?2 AND config = ?3 AND warmup = ?4 AND state = ?5",
        params![
            pair.campaign_id,
            pair.backend,
            pair.config,
            pair.warmup,
            RunState::Pending as i32
        ],
    )?)
}

pub(super) fn next_pending_run(
    db: &Connection,
    campaign_id: &str,
    backend: &str,
) -> StoreResult<Option<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ?1 AND backend = ?2 AND state = ?3 ORDER BY sequence LIMIT 1"
    );
    let mut statement = db.prepare_cached(&sql)?;
    Ok(statement
        .query_row(
            params![campaign_id, backend, RunState::Pending as i32],
            run_row,
        )
        .optional()?)
}

pub(super) fn transition_run(
    db: &mut Connection,
    id: &str,
    from: &[RunState],
    to: RunState,
    update: &RunUpdate,
) -> StoreResult<Option<Transitioned>> {
    let now = now_ms();
    let sql = format!(
        "UPDATE runs SET state = ?2,
            host = COALESCE(?3, host),
            attempts = attempts + ?4,
            exit_code = COALESCE(?5, exit_code),
            result_json = COALESCE(?6, result_json),
            duration_ms = COALESCE(?7, duration_ms),
            error = COALESCE(?8, error),
            started_ms = CASE WHEN ?9 THEN ?11 ELSE started_ms END,
            finished_ms = CASE WHEN ?10 THEN ?11 ELSE finished_ms END,
            energy = COALESCE(?12, energy),
            logs_tail = COALESCE(?13, logs_tail),
            power_samples = COALESCE(?14, power_samples),
            power_series_truncated = COALESCE(?15, power_series_truncated),
            provenance = COALESCE(?16, provenance)
         WHERE id = ?1 AND state IN ({})
         RETURNING {RUN_COLUMNS}",
        state_list(from)
    );
    let series = update.power_series.as_ref();
    let tx = db.transaction()?;
    let run = tx
        .query_row(
            &sql,
            params![
                id,
                to as i32,
                update.host,
                i32::from(update.add_attempt),
                update.exit_code,
                update.result_json,
                update.duration_ms.map(|d| d as i64),
                update.error,
                update.started_now,
                update.finished_now,
                now,
                encode_energy(update),
                update.logs_tail,
                series.map(|s| s.samples.len() as i64),
                series.map(|s| s.truncated),
                update.provenance.as_ref().map(Message::encode_to_vec)
            ],
            run_row,
        )
        .optional()?;
    let Some(run) = run else {
        return Ok(None);
    };
    if let Some(series) = series {
        insert_power_series(&tx, id, series)?;
    }
    let counts = run_counts(&tx, &run.campaign_id)?;
    tx.commit()?;
    Ok(Some(Transitioned { run, counts }))
}

pub(super) fn transition_all(
    db: &Connection,
    campaign_id: &str,
    from: &[RunState],
    to: RunState,
) -> StoreResult<usize> {
    let sql = format!(
        "UPDATE runs SET state = ?2 WHERE campaign_id = ?1 AND state IN ({})",
        state_list(from)
    );
    Ok(db.execute(&sql, params![campaign_id, to as i32])?)
}
