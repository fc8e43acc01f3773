//! Runs: their rows, their counts per state (kept by the schema's
//! triggers), reads in the orders the scheduler needs, transitions as
//! compare-and-set on the state that return the run as written with its
//! campaign's counts, and the power series written with a transition.
use berth_proto::agent::v1::Provenance;
use berth_proto::orchestrator::v1::{Run, RunCounts, RunState};
use postgres::types::ToSql;
use postgres::{Row, Transaction};
use prost::Message;

use super::pool::{Failure, PgResult, Session};
use super::{decode_energy, encode_energy, now_ms, timestamp, unsigned};
use crate::store::codec::{count_state, power_sample, to_nanos};
use crate::store::{
    MeasuredRuns, PowerSeries, RunPair, RunUpdate, StoreError, StoredPowerSample, Transitioned,
};

const RUN_COLUMNS: &str = "id, campaign_id, sequence, config, params, backend, cycle, warmup, state, host, attempts, \
                           exit_code, result_json, duration_ms, error, started_ms, finished_ms, energy, logs_tail, \
                           power_samples, power_series_truncated, provenance";

/// Power samples inserted by one statement: bounds the arrays of one message.
const SAMPLES_PER_INSERT: usize = 10_000;

fn run_row(row: &Row) -> Result<Run, StoreError> {
    let params: String = row.get(4);
    let duration_ms: Option<i64> = row.get(13);
    let (energy, cluster_accounting) =
        decode_energy(&row.get::<_, Option<Vec<u8>>>(17).unwrap_or_default());
    Ok(Run {
        id: row.get(0),
        campaign_id: row.get(1),
        sequence: unsigned(row.get(2), "runs.sequence")?,
        config: row.get(3),
        params: serde_json::from_str(&params).unwrap_or_default(),
        backend: row.get(5),
        cycle: unsigned(row.get(6), "runs.cycle")?,
        warmup: row.get(7),
        state: row.get(8),
        host: row.get(9),
        attempts: unsigned(row.get(10), "runs.attempts")?,
        exit_code: row.get(11),
        result_json: row.get(12),
        duration: duration_ms.map(|ms| prost_types::Duration {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        error: row.get(14),
        started_at: timestamp(row.get(15)),
        finished_at: timestamp(row.get(16)),
        energy,
        cluster_accounting,
        logs_tail: row.get(18),
        power_samples: unsigned(row.get(19), "runs.power_samples")?,
        power_series_truncated: row.get(20),
        // Derived where runs leave the service (`results::with_derived`).
        energy_j: None,
        joules_per_unit: None,
        energy_net_j: None,
        joules_per_unit_net: None,
        energy_vs_cluster_j: None,
        // Encoded as the message (as the SQLite store does).
        provenance: row
            .get::<_, Option<Vec<u8>>>(21)
            .and_then(|bytes| Provenance::decode(bytes.as_slice()).ok()),
    })
}

fn run_rows(rows: &[Row]) -> PgResult<Vec<Run>> {
    Ok(rows.iter().map(run_row).collect::<Result<_, _>>()?)
}

fn states(states: &[RunState]) -> Vec<i32> {
    states.iter().map(|s| *s as i32).collect()
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The campaign's runs per state, as the triggers keep them.
pub(super) fn run_counts(db: &mut Session, campaign_id: &str) -> PgResult<RunCounts> {
    let read_counts =
        db.prepared("SELECT state, runs FROM run_state_counts WHERE campaign_id = $1")?;
    let rows = db.query(&read_counts, &[&campaign_id])?;
    let mut counts = RunCounts::default();
    for row in rows {
        let count: u64 = unsigned(row.get(1), "run_state_counts.runs")?;
        count_state(&mut counts, row.get(0), count);
    }
    Ok(counts)
}

pub(super) fn runs(
    db: &mut Session,
    campaign_id: &str,
    state: Option<RunState>,
    after_sequence: Option<u32>,
    limit: usize,
) -> PgResult<Vec<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = $1 AND sequence > $2 AND ($3 = 0 OR state = $3) \
         ORDER BY sequence LIMIT $4"
    );
    let after = after_sequence.map_or(-1, i64::from);
    let state = state.map_or(0, |s| s as i32);
    run_rows(&db.query(&sql, &[&campaign_id, &after, &state, &sql_limit(limit)])?)
}

pub(super) fn run(db: &mut Session, id: &str) -> PgResult<Option<Run>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
    Ok(db
        .query_opt(&sql, &[&id])?
        .as_ref()
        .map(run_row)
        .transpose()?)
}

pub(super) fn measured_runs(db: &mut Session, campaign_id: &str) -> PgResult<Vec<MeasuredRuns>> {
    let rows = db.query(
        "SELECT config, backend, COUNT(*), COUNT(*) FILTER (WHERE state = $2) FROM runs \
         WHERE campaign_id = $1 AND NOT warmup GROUP BY config, backend ORDER BY MIN(sequence)",
        &[&campaign_id, &(RunState::Succeeded as i32)],
    )?;
    rows.iter()
        .map(|row| {
            Ok(MeasuredRuns {
                config: row.get(0),
                backend: row.get(1),
                runs: unsigned(row.get(2), "runs of a pair")?,
                succeeded: unsigned(row.get(3), "runs of a pair succeeded")?,
            })
        })
        .collect()
}

/// A [`RunPair`] that can go to a connection's thread.
pub(super) struct OwnedPair {
    campaign_id: String,
    config: String,
    backend: String,
    warmup: bool,
}

impl From<RunPair<'_>> for OwnedPair {
    fn from(pair: RunPair<'_>) -> Self {
        Self {
            campaign_id: pair.campaign_id.to_string(),
            config: pair.config.to_string(),
            backend: pair.backend.to_string(),
            warmup: pair.warmup,
        }
    }
}

pub(super) fn runs_of_pair(db: &mut Session, pair: &OwnedPair) -> PgResult<Vec<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = $1 AND backend = $2 AND config = $3 AND warmup = $4 \
         ORDER BY sequence"
    );
    run_rows(&db.query(
        &sql,
        &[&pair.campaign_id, &pair.backend, &pair.config, &pair.warmup],
    )?)
}

pub(super) fn drop_pending_runs(db: &mut Session, pair: &OwnedPair) -> PgResult<usize> {
    let dropped = db.write(
        "DELETE FROM runs WHERE campaign_id = $1 AND backend = $2 AND config = $3 AND warmup = $4 AND state = $5",
        &[
            &pair.campaign_id,
            &pair.backend,
            &pair.config,
            &pair.warmup,
            &(RunState::Pending as i32),
        ],
    )?;
    Ok(dropped as usize)
}

pub(super) fn next_pending_run(
    db: &mut Session,
    campaign_id: &str,
    backend: &str,
) -> PgResult<Option<Run>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = $1 AND backend = $2 AND state = $3 \
         ORDER BY sequence LIMIT 1"
    );
    let next_run = db.prepared(&sql)?;
    let row = db.query_opt(
        &next_run,
        &[&campaign_id, &backend, &(RunState::Pending as i32)],
    )?;
    Ok(row.as_ref().map(run_row).transpose()?)
}

/// SQLSTATE of the schema's `transition_run` when the lease moved on.
const FENCED_STATE: &str = "BF001";

const TRANSITION_SQL: &str = "SELECT * FROM transition_run($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                              $10, $11, $12, $13, $14, $15, $16, $17, $18)";

/// The compare-and-set, by the schema's `transition_run`: the UPDATE
/// applies only to a run whose state is in `from`; a transaction that races
/// it for the same run waits for this one to commit, then finds the state
/// moved and updates nothing. The fence and the counts are in the call's
/// transaction, so without a power series a transition is one round trip
/// (the dispatch path); with one, the samples join that transaction.
pub(super) fn transition_run(
    db: &mut Session,
    id: &str,
    from: &[RunState],
    to: RunState,
    update: &RunUpdate,
) -> PgResult<Option<Transitioned>> {
    let call = db.prepared(TRANSITION_SQL)?;
    let term = db.fence_term();
    let series = update.power_series.as_ref();
    let (from, to) = (states(from), to as i32);
    let add_attempts = i64::from(update.add_attempt);
    let duration_ms = update
        .duration_ms
        .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
    let now = now_ms();
    let energy = encode_energy(update);
    let samples = series.map(|s| s.samples.len() as i64);
    let truncated = series.map(|s| s.truncated);
    let provenance = update.provenance.as_ref().map(Message::encode_to_vec);
    let params: [&(dyn ToSql + Sync); 18] = [
        &term,
        &id,
        &from,
        &to,
        &update.host,
        &add_attempts,
        &update.exit_code,
        &update.result_json,
        &duration_ms,
        &update.error,
        &update.started_now,
        &update.finished_now,
        &now,
        &energy,
        &update.logs_tail,
        &samples,
        &truncated,
        &provenance,
    ];
    let fenced = |error: postgres::Error| match error.code() {
        Some(code) if code.code() == FENCED_STATE => Failure::Fenced { term },
        _ => Failure::Sql(error),
    };
    let row = match series {
        None => db.query_opt(&call, &params).map_err(fenced)?,
        Some(series) => {
            // The call fences the transaction itself.
            let mut tx = db.unfenced().transaction()?;
            let row = tx.query_opt(&call, &params).map_err(fenced)?;
            if row.is_some() {
                insert_power_series(&mut tx, id, series)?;
                tx.commit()?;
            }
            row
        }
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let run = run_row(&row)?;
    let count_states: Vec<i32> = row.get(22);
    let count_runs: Vec<i64> = row.get(23);
    let mut counts = RunCounts::default();
    for (state, runs) in count_states.into_iter().zip(count_runs) {
        count_state(&mut counts, state, unsigned(runs, "run_state_counts.runs")?);
    }
    Ok(Some(Transitioned { run, counts }))
}

pub(super) fn transition_all(
    db: &mut Session,
    campaign_id: &str,
    from: &[RunState],
    to: RunState,
) -> PgResult<usize> {
    let moved = db.write(
        "UPDATE runs SET state = $2 WHERE campaign_id = $1 AND state = ANY($3)",
        &[&campaign_id, &(to as i32), &states(from)],
    )?;
    Ok(moved as usize)
}

/// Replaces the run's samples, as arrays of columns unnested by the server:
/// one statement per batch instead of one per sample.
fn insert_power_series(
    tx: &mut Transaction<'_>,
    run_id: &str,
    series: &PowerSeries,
) -> PgResult<()> {
    tx.execute(
        "DELETE FROM run_power_samples WHERE run_id = $1",
        &[&run_id],
    )?;
    let insert = tx.prepare(
        "INSERT INTO run_power_samples (run_id, position, device, time_ns, elapsed_ns, power_w, energy_j) \
         SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], \
                                  $6::double precision[], $7::double precision[])",
    )?;
    for (batch_index, batch) in series.samples.chunks(SAMPLES_PER_INSERT).enumerate() {
        let first = (batch_index * SAMPLES_PER_INSERT) as i64;
        let positions: Vec<i64> = (first..first + batch.len() as i64).collect();
        let devices: Vec<&str> = batch.iter().map(|s| s.device.as_str()).collect();
        let times: Vec<Option<i64>> = batch
            .iter()
            .map(|s| s.time.map(|t| to_nanos(t.seconds, t.nanos)))
            .collect();
        let elapsed: Vec<Option<i64>> = batch
            .iter()
            .map(|s| s.elapsed.map(|d| to_nanos(d.seconds, d.nanos)))
            .collect();
        let power: Vec<Option<f64>> = batch.iter().map(|s| s.power_w).collect();
        let energy: Vec<Option<f64>> = batch.iter().map(|s| s.energy_j).collect();
        tx.execute(
            &insert,
            &[
                &run_id, &positions, &devices, &times, &elapsed, &power, &energy,
            ],
        )?;
    }
    Ok(())
}

fn power_sample_row(row: &Row) -> Result<StoredPowerSample, StoreError> {
    Ok((
        unsigned(row.get(0), "run_power_samples.position")?,
        power_sample(row.get(1), row.get(2), row.get(3), row.get(4), row.get(5)),
    ))
}

pub(super) fn power_series(
    db: &mut Session,
    run_id: &str,
    device: Option<&str>,
    after: Option<u64>,
    limit: usize,
) -> PgResult<Vec<StoredPowerSample>> {
    let after = after.map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
    let rows = db.query(
        "SELECT position, device, time_ns, elapsed_ns, power_w, energy_j FROM run_power_samples \
         WHERE run_id = $1 AND position > $2 AND ($3::text IS NULL OR device = $3) ORDER BY position LIMIT $4",
        &[&run_id, &after, &device, &sql_limit(limit)],
    )?;
    Ok(rows
        .iter()
        .map(power_sample_row)
        .collect::<Result<_, _>>()?)
}
