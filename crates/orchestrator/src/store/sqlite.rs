//! The default store: one SQLite file in WAL mode.

mod deployments;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, Run, RunCounts, RunEnergy, RunPowerSample, RunState,
};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    HostRecord, MeasuredRuns, Placement, PowerSeries, RunUpdate, Store, StoreError, StoreResult,
    StoredPowerSample, Transitioned,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS campaigns (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state INTEGER NOT NULL,
    status_message TEXT NOT NULL DEFAULT '',
    manifest TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    outcome INTEGER NOT NULL DEFAULT 0,
    work_metric TEXT NOT NULL DEFAULT '',
    results_layout TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    sequence INTEGER NOT NULL,
    config TEXT NOT NULL,
    params TEXT NOT NULL,
    backend TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    warmup INTEGER NOT NULL,
    state INTEGER NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    result_json TEXT NOT NULL DEFAULT '',
    duration_ms INTEGER,
    error TEXT NOT NULL DEFAULT '',
    started_ms INTEGER,
    finished_ms INTEGER,
    energy BLOB,
    logs_tail TEXT NOT NULL DEFAULT '',
    power_samples INTEGER NOT NULL DEFAULT 0,
    power_series_truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_campaign ON runs(campaign_id, sequence);
CREATE INDEX IF NOT EXISTS runs_by_backend_state ON runs(campaign_id, backend, state, sequence);
CREATE TABLE IF NOT EXISTS run_power_samples (
    run_id TEXT NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    device TEXT NOT NULL,
    time_ns INTEGER,
    elapsed_ns INTEGER,
    power_w REAL,
    energy_j REAL,
    PRIMARY KEY (run_id, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    token TEXT NOT NULL,
    labels TEXT NOT NULL,
    power_sampler TEXT NOT NULL DEFAULT ''
);
-- Runs per (campaign, state), kept by triggers in the same transaction as
-- the change: a campaign's counts are read on every event, and counting its
-- runs each time made dispatch O(runs) per run.
CREATE TABLE IF NOT EXISTS run_state_counts (
    campaign_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    runs INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS run_counted AFTER INSERT ON runs BEGIN
    INSERT INTO run_state_counts (campaign_id, state, runs) VALUES (new.campaign_id, new.state, 1)
        ON CONFLICT (campaign_id, state) DO UPDATE SET runs = runs + 1;
END;
CREATE TRIGGER IF NOT EXISTS run_recounted AFTER UPDATE OF state ON runs
    WHEN old.state != new.state BEGIN
    UPDATE run_state_counts SET runs = runs - 1
        WHERE campaign_id = old.campaign_id AND state = old.state;
    INSERT INTO run_state_counts (campaign_id, state, runs) VALUES (new.campaign_id, new.state, 1)
        ON CONFLICT (campaign_id, state) DO UPDATE SET runs = runs + 1;
END;
CREATE TRIGGER IF NOT EXISTS run_uncounted AFTER DELETE ON runs BEGIN
    UPDATE run_state_counts SET runs = runs - 1
        WHERE campaign_id = old.campaign_id AND state = old.state;
END;
CREATE TABLE IF NOT EXISTS placements (
    campaign_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    host TEXT NOT NULL,
    workload_id TEXT NOT NULL,
    PRIMARY KEY (campaign_id, backend)
);
";

pub struct SqliteStore {
    connection: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("{}: {e}", dir.display())))?;
        }
        let mut connection = Connection::open(path)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        // WAL: readers do not block the writer; NORMAL sync survives a kill
        // of the process (not necessarily of the machine) with no loss.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let counted = table_exists(&connection, "run_state_counts")?;
        let schema = connection.transaction()?;
        schema.execute_batch(SCHEMA)?;
        schema.execute_batch(deployments::SCHEMA)?;
        if !counted {
            // A store from before the counts table: count what it holds.
            schema.execute(
                "INSERT INTO run_state_counts (campaign_id, state, runs) \
                 SELECT campaign_id, state, COUNT(*) FROM runs GROUP BY campaign_id, state",
                [],
            )?;
        }
        schema.commit()?;
        // Columns added after the first release of the schema.
        add_column_if_missing(
            &connection,
            "campaigns",
            "outcome",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        // What results need from the plan, stored at submit (empty in a
        // store from before: filled once when the orchestrator starts).
        add_column_if_missing(
            &connection,
            "campaigns",
            "work_metric",
            "TEXT NOT NULL DEFAULT ''",
        )?;
        add_column_if_missing(
            &connection,
            "campaigns",
            "results_layout",
            "TEXT NOT NULL DEFAULT ''",
        )?;
        add_column_if_missing(&connection, "runs", "energy", "BLOB")?;
        add_column_if_missing(&connection, "runs", "logs_tail", "TEXT NOT NULL DEFAULT ''")?;
        add_column_if_missing(
            &connection,
            "runs",
            "power_samples",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        add_column_if_missing(
            &connection,
            "runs",
            "power_series_truncated",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        add_column_if_missing(
            &connection,
            "hosts",
            "power_sampler",
            "TEXT NOT NULL DEFAULT ''",
        )?;
        add_column_if_missing(
            &connection,
            "placements",
            "gpus",
            "TEXT NOT NULL DEFAULT ''",
        )?;
        restrict_permissions(path);
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn table_exists(connection: &Connection, table: &str) -> StoreResult<bool> {
    Ok(connection
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn add_column_if_missing(
    connection: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> StoreResult<()> {
    let mut statement =
        connection.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
    let columns = statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if !columns.iter().any(|c| c == column) {
        connection.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
        ))?;
    }
    Ok(())
}

/// Energy records as length-delimited protobuf messages, one after another.
fn encode_energy(energy: &[RunEnergy]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for record in energy {
        let _ = record.encode_length_delimited(&mut bytes);
    }
    bytes
}

fn decode_energy(mut bytes: &[u8]) -> Vec<RunEnergy> {
    let mut energy = Vec::new();
    while !bytes.is_empty() {
        match RunEnergy::decode_length_delimited(&mut bytes) {
            Ok(record) => energy.push(record),
            Err(_) => break,
        }
    }
    energy
}

/// The store holds agent tokens: only its owner may read it.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.map(|ms| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn timestamp_ms(ts: &Option<prost_types::Timestamp>) -> Option<i64> {
    ts.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
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

fn insert_power_series(
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

const CAMPAIGN_COLUMNS: &str =
    "seq, id, name, state, status_message, manifest, created_ms, finished_ms, outcome, work_metric";

fn campaign_row(row: &Row<'_>) -> rusqlite::Result<(i64, Campaign)> {
    Ok((
        row.get(0)?,
        Campaign {
            id: row.get(1)?,
            name: row.get(2)?,
            state: row.get(3)?,
            status_message: row.get(4)?,
            manifest_yaml: row.get(5)?,
            created_at: timestamp(row.get(6)?),
            finished_at: timestamp(row.get(7)?),
            outcome: row.get(8)?,
            runs: None,
            work_metric: row.get(9)?,
        },
    ))
}

const RUN_COLUMNS: &str = "id, campaign_id, sequence, config, params, backend, cycle, warmup, state, host, attempts, \
                           exit_code, result_json, duration_ms, error, started_ms, finished_ms, energy, logs_tail, \
                           power_samples, power_series_truncated";

fn run_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let params: String = row.get(4)?;
    let duration_ms: Option<i64> = row.get(13)?;
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
        energy: decode_energy(&row.get::<_, Option<Vec<u8>>>(17)?.unwrap_or_default()),
        logs_tail: row.get(18)?,
        power_samples: row.get(19)?,
        power_series_truncated: row.get(20)?,
        // Derived where runs leave the service (`results::with_derived`).
        energy_j: None,
        joules_per_unit: None,
    })
}

/// The campaign's runs per state, as the triggers keep them.
fn run_counts(db: &Connection, campaign_id: &str) -> StoreResult<RunCounts> {
    let mut statement =
        db.prepare_cached("SELECT state, runs FROM run_state_counts WHERE campaign_id = ?1")?;
    let mut counts = RunCounts::default();
    let rows = statement.query_map([campaign_id], |row| {
        Ok((row.get::<_, i32>(0)?, row.get::<_, u64>(1)?))
    })?;
    for row in rows {
        let (state, count) = row?;
        counts.total += count;
        match RunState::try_from(state).unwrap_or_default() {
            RunState::Pending => counts.pending = count,
            RunState::Dispatched => counts.dispatched = count,
            RunState::Running => counts.running = count,
            RunState::Succeeded => counts.succeeded = count,
            RunState::Failed => counts.failed = count,
            RunState::Cancelled => counts.cancelled = count,
            RunState::Unspecified => {}
        }
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

impl Store for SqliteStore {
    fn insert_campaign(
        &self,
        campaign: &Campaign,
        source_name: &str,
        results_layout: &str,
        runs: &[Run],
    ) -> StoreResult<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO campaigns (id, name, state, status_message, manifest, source_name, created_ms, work_metric, results_layout) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                campaign.id,
                campaign.name,
                campaign.state,
                campaign.status_message,
                campaign.manifest_yaml,
                source_name,
                timestamp_ms(&campaign.created_at).unwrap_or_else(now_ms),
                campaign.work_metric,
                results_layout
            ],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO runs (id, campaign_id, sequence, config, params, backend, cycle, warmup, state) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for run in runs {
                let params = serde_json::to_string(&run.params)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                insert.execute(params![
                    run.id,
                    run.campaign_id,
                    run.sequence,
                    run.config,
                    params,
                    run.backend,
                    run.cycle,
                    run.warmup,
                    run.state
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn campaign(&self, id: &str) -> StoreResult<Option<Campaign>> {
        let db = self.db();
        let sql = format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?1");
        Ok(db
            .query_row(&sql, [id], campaign_row)
            .optional()?
            .map(|(_, c)| c))
    }

    fn results_layout(&self, id: &str) -> StoreResult<Option<String>> {
        Ok(self
            .db()
            .query_row(
                "SELECT results_layout FROM campaigns WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn campaigns_without_results_layout(&self) -> StoreResult<Vec<(String, String)>> {
        let db = self.db();
        let mut statement = db
            .prepare("SELECT id, manifest FROM campaigns WHERE results_layout = '' ORDER BY seq")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_results_layout(
        &self,
        id: &str,
        work_metric: &str,
        results_layout: &str,
    ) -> StoreResult<()> {
        self.db().execute(
            "UPDATE campaigns SET work_metric = ?2, results_layout = ?3 WHERE id = ?1",
            params![id, work_metric, results_layout],
        )?;
        Ok(())
    }

    fn list_campaigns(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<(i64, Campaign)>> {
        let db = self.db();
        let sql = format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(
            params![before.unwrap_or(i64::MAX), limit as i64],
            campaign_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn unfinished_campaigns(&self) -> StoreResult<Vec<Campaign>> {
        let db = self.db();
        let sql = format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE state IN (?1, ?2) ORDER BY seq"
        );
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(
            params![CampaignState::Pending as i32, CampaignState::Running as i32],
            campaign_row,
        )?;
        Ok(rows.map(|r| r.map(|(_, c)| c)).collect::<Result<_, _>>()?)
    }

    fn set_campaign_state(&self, id: &str, state: CampaignState, message: &str) -> StoreResult<()> {
        let finished = super::campaign_is_terminal(state).then(now_ms);
        self.db().execute(
            "UPDATE campaigns SET state = ?2, status_message = ?3, finished_ms = ?4, outcome = ?5 WHERE id = ?1",
            params![
                id,
                state as i32,
                message,
                finished,
                CampaignOutcome::Unspecified as i32
            ],
        )?;
        Ok(())
    }

    fn finish_campaign(
        &self,
        id: &str,
        state: CampaignState,
        outcome: CampaignOutcome,
        message: &str,
    ) -> StoreResult<()> {
        self.db().execute(
            "UPDATE campaigns SET state = ?2, status_message = ?3, finished_ms = ?4, outcome = ?5 WHERE id = ?1",
            params![id, state as i32, message, now_ms(), outcome as i32],
        )?;
        Ok(())
    }

    fn set_campaign_message(&self, id: &str, message: &str) -> StoreResult<()> {
        self.db().execute(
            "UPDATE campaigns SET status_message = ?2 WHERE id = ?1",
            params![id, message],
        )?;
        Ok(())
    }

    fn run_counts(&self, campaign_id: &str) -> StoreResult<RunCounts> {
        run_counts(&self.db(), campaign_id)
    }

    fn runs(
        &self,
        campaign_id: &str,
        state: Option<RunState>,
        after_sequence: Option<u32>,
        limit: usize,
    ) -> StoreResult<Vec<Run>> {
        let db = self.db();
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ?1 AND sequence > ?2 AND (?3 = 0 OR state = ?3) \
             ORDER BY sequence LIMIT ?4"
        );
        let mut statement = db.prepare_cached(&sql)?;
        let after = after_sequence.map_or(-1, i64::from);
        let state = state.map_or(0, |s| s as i32);
        let rows =
            statement.query_map(params![campaign_id, after, state, limit as i64], run_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn run(&self, id: &str) -> StoreResult<Option<Run>> {
        let db = self.db();
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1");
        Ok(db.query_row(&sql, [id], run_row).optional()?)
    }

    fn measured_runs(&self, campaign_id: &str) -> StoreResult<Vec<MeasuredRuns>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT config, backend, COUNT(*), SUM(state = ?2) FROM runs \
             WHERE campaign_id = ?1 AND warmup = 0 GROUP BY config, backend ORDER BY MIN(sequence)",
        )?;
        let rows =
            statement.query_map(params![campaign_id, RunState::Succeeded as i32], |row| {
                Ok(MeasuredRuns {
                    config: row.get(0)?,
                    backend: row.get(1)?,
                    runs: row.get(2)?,
                    succeeded: row.get(3)?,
                })
            })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn warmup_runs(&self, campaign_id: &str, config: &str, backend: &str) -> StoreResult<Vec<Run>> {
        let db = self.db();
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE campaign_id = ?1 AND backend = ?2 AND config = ?3 AND warmup = 1 \
             ORDER BY sequence"
        );
        let mut statement = db.prepare_cached(&sql)?;
        let rows = statement.query_map(params![campaign_id, backend, config], run_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn drop_pending_warmup_runs(
        &self,
        campaign_id: &str,
        config: &str,
        backend: &str,
    ) -> StoreResult<usize> {
        Ok(self.db().execute(
            "DELETE FROM runs WHERE campaign_id = ?1 AND backend = ?2 AND config = ?3 AND warmup = 1 AND state = ?4",
            params![campaign_id, backend, config, RunState::Pending as i32],
        )?)
    }

    fn next_pending_run(&self, campaign_id: &str, backend: &str) -> StoreResult<Option<Run>> {
        let db = self.db();
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

    fn transition_run(
        &self,
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
                power_series_truncated = COALESCE(?15, power_series_truncated)
             WHERE id = ?1 AND state IN ({})
             RETURNING {RUN_COLUMNS}",
            state_list(from)
        );
        let series = update.power_series.as_ref();
        let mut db = self.db();
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
                    update.energy.as_deref().map(encode_energy),
                    update.logs_tail,
                    series.map(|s| s.samples.len() as i64),
                    series.map(|s| s.truncated)
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

    fn power_series(
        &self,
        run_id: &str,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredPowerSample>> {
        let db = self.db();
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

    fn transition_all(
        &self,
        campaign_id: &str,
        from: &[RunState],
        to: RunState,
    ) -> StoreResult<usize> {
        let sql = format!(
            "UPDATE runs SET state = ?2 WHERE campaign_id = ?1 AND state IN ({})",
            state_list(from)
        );
        Ok(self.db().execute(&sql, params![campaign_id, to as i32])?)
    }

    fn upsert_host(&self, host: &HostRecord) -> StoreResult<()> {
        let labels =
            serde_json::to_string(&host.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.db().execute(
            "INSERT INTO hosts (name, address, token, labels, power_sampler) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET address = ?2, token = ?3, labels = ?4, power_sampler = ?5",
            params![host.name, host.address, host.token, labels, host.power_sampler],
        )?;
        Ok(())
    }

    fn delete_host(&self, name: &str) -> StoreResult<bool> {
        Ok(self
            .db()
            .execute("DELETE FROM hosts WHERE name = ?1", [name])?
            == 1)
    }

    fn hosts(&self) -> StoreResult<Vec<HostRecord>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT name, address, token, labels, power_sampler FROM hosts ORDER BY name",
        )?;
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

    fn set_placement(&self, campaign_id: &str, placement: &Placement) -> StoreResult<()> {
        self.db().execute(
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

    fn clear_placement(&self, campaign_id: &str, backend: &str) -> StoreResult<()> {
        self.db().execute(
            "DELETE FROM placements WHERE campaign_id = ?1 AND backend = ?2",
            params![campaign_id, backend],
        )?;
        Ok(())
    }

    fn placements(&self, campaign_id: &str) -> StoreResult<Vec<Placement>> {
        let db = self.db();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::{Pending, Running, Succeeded};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    fn campaign(id: &str) -> Campaign {
        Campaign {
            id: id.into(),
            name: "t".into(),
            state: CampaignState::Pending as i32,
            ..Default::default()
        }
    }

    /// A store holding campaign `c1` with `runs`.
    fn store_with(runs: &[Run]) -> (tempfile::TempDir, SqliteStore) {
        let (dir, store) = store();
        store
            .insert_campaign(&campaign("c1"), "m", "", runs)
            .unwrap();
        (dir, store)
    }

    /// `transition_run` from one state; whether the run moved.
    fn moved(
        store: &SqliteStore,
        id: &str,
        from: RunState,
        to: RunState,
        update: &RunUpdate,
    ) -> bool {
        store
            .transition_run(id, &[from], to, update)
            .unwrap()
            .is_some()
    }

    fn run(id: &str, sequence: u32) -> Run {
        Run {
            id: id.into(),
            campaign_id: "c1".into(),
            sequence,
            config: "a".into(),
            backend: "b".into(),
            cycle: 1,
            state: RunState::Pending as i32,
            ..Default::default()
        }
    }

    #[test]
    fn result_is_recorded_once() {
        let (_dir, store) = store_with(&[run("r1", 0), run("r2", 1)]);
        let done = RunUpdate {
            result_json: Some("{\"x\":1}".into()),
            finished_now: true,
            ..Default::default()
        };
        assert!(moved(&store, "r1", Pending, Running, &RunUpdate::default()));
        assert!(moved(&store, "r1", Running, Succeeded, &done));
        // A replay of the same outcome (e.g. after a crash) changes nothing.
        let replay = RunUpdate {
            result_json: Some("{\"x\":2}".into()),
            ..Default::default()
        };
        assert!(!moved(&store, "r1", Running, Succeeded, &replay));
        assert_eq!(store.run("r1").unwrap().unwrap().result_json, "{\"x\":1}");
        let counts = store.run_counts("c1").unwrap();
        assert_eq!((counts.succeeded, counts.pending, counts.total), (1, 1, 2));
        assert_eq!(store.next_pending_run("c1", "b").unwrap().unwrap().id, "r2");
    }

    #[test]
    fn a_transition_returns_what_it_wrote_and_the_counts_after_it() {
        let (_dir, store) = store_with(&[run("r1", 0), run("r2", 1)]);
        let dispatch = RunUpdate {
            host: Some("h1".into()),
            add_attempt: true,
            started_now: true,
            ..Default::default()
        };
        let written = store
            .transition_run("r1", &[Pending], RunState::Dispatched, &dispatch)
            .unwrap()
            .unwrap();
        assert_eq!(written.run, store.run("r1").unwrap().unwrap());
        assert_eq!(written.counts, store.run_counts("c1").unwrap());
        assert_eq!(
            (
                written.run.state,
                written.run.host.as_str(),
                written.run.attempts
            ),
            (RunState::Dispatched as i32, "h1", 1)
        );
        assert_eq!(
            (
                written.counts.dispatched,
                written.counts.pending,
                written.counts.total
            ),
            (1, 1, 2)
        );
        let done = succeeded_with(series(&["gpu0"], 2));
        let written = store
            .transition_run("r1", &[RunState::Dispatched], Succeeded, &done)
            .unwrap()
            .unwrap();
        assert_eq!(written.run, store.run("r1").unwrap().unwrap());
        assert_eq!(written.run.power_samples, 2);
        assert_eq!(written.counts, store.run_counts("c1").unwrap());
        // Nothing moved, nothing returned.
        assert!(
            store
                .transition_run("r1", &[Pending], Running, &RunUpdate::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn unneeded_warmup_runs_are_dropped_and_logs_kept() {
        let (_dir, store) = store();
        let warmup = |id: &str, sequence| Run {
            warmup: true,
            ..run(id, sequence)
        };
        store
            .insert_campaign(
                &campaign("c1"),
                "m",
                "",
                &[
                    warmup("w1", 0),
                    warmup("w2", 1),
                    warmup("w3", 2),
                    run("m1", 3),
                ],
            )
            .unwrap();
        let done = RunUpdate {
            logs_tail: Some("warming up\n".into()),
            ..Default::default()
        };
        moved(&store, "w1", Pending, Succeeded, &done);
        assert_eq!(store.drop_pending_warmup_runs("c1", "a", "b").unwrap(), 2);
        let left = store.warmup_runs("c1", "a", "b").unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].logs_tail, "warming up\n");
        assert_eq!(store.next_pending_run("c1", "b").unwrap().unwrap().id, "m1");
        let counts = store.run_counts("c1").unwrap();
        assert_eq!((counts.succeeded, counts.pending, counts.total), (1, 1, 2));
    }

    #[test]
    fn counts_follow_every_change_and_an_older_store_is_counted_on_open() {
        let (dir, store) = store_with(&[run("r1", 0), run("r2", 1), run("r3", 2)]);
        moved(&store, "r1", Pending, Running, &RunUpdate::default());
        moved(&store, "r1", Running, Succeeded, &RunUpdate::default());
        // Same state again: counted once.
        store
            .transition_run("r2", &[Pending], Pending, &RunUpdate::default())
            .unwrap();
        store
            .transition_all("c1", &[Pending], RunState::Cancelled)
            .unwrap();
        let expect = |store: &SqliteStore| {
            let counts = store.run_counts("c1").unwrap();
            assert_eq!(
                (
                    counts.succeeded,
                    counts.cancelled,
                    counts.pending,
                    counts.total
                ),
                (1, 2, 0, 3),
                "{counts:?}"
            );
        };
        expect(&store);
        // A store written before the counts table existed.
        store
            .db()
            .execute_batch(
                "DROP TRIGGER run_counted; DROP TRIGGER run_recounted; DROP TRIGGER run_uncounted; \
                 DROP TABLE run_state_counts;",
            )
            .unwrap();
        drop(store);
        expect(&SqliteStore::open(&dir.path().join("state.db")).unwrap());
    }

    #[test]
    fn measured_runs_are_counted_per_pair_and_the_outcome_kept_until_cleared() {
        let (_dir, store) = store();
        let at = |id: &str, sequence, config: &str, warmup| Run {
            config: config.into(),
            warmup,
            ..run(id, sequence)
        };
        store
            .insert_campaign(
                &campaign("c1"),
                "m",
                "",
                &[
                    at("w", 0, "x", true),
                    at("x1", 1, "x", false),
                    at("y1", 2, "y", false),
                    at("x2", 3, "x", false),
                ],
            )
            .unwrap();
        for id in ["w", "x1"] {
            moved(&store, id, Pending, Succeeded, &RunUpdate::default());
        }
        moved(
            &store,
            "y1",
            Pending,
            RunState::Failed,
            &RunUpdate::default(),
        );
        let pair = |config: &str, runs, succeeded| MeasuredRuns {
            config: config.into(),
            backend: "b".into(),
            runs,
            succeeded,
        };
        // The warmup run is not measured.
        assert_eq!(
            store.measured_runs("c1").unwrap(),
            [pair("x", 2, 1), pair("y", 1, 0)]
        );

        store
            .finish_campaign(
                "c1",
                CampaignState::Failed,
                CampaignOutcome::NoResults,
                "nothing",
            )
            .unwrap();
        let ended = store.campaign("c1").unwrap().unwrap();
        assert_eq!(ended.outcome, CampaignOutcome::NoResults as i32);
        assert!(ended.finished_at.is_some());
        // Resumed: no outcome until it ends again.
        store
            .set_campaign_state("c1", CampaignState::Pending, "resumed")
            .unwrap();
        let resumed = store.campaign("c1").unwrap().unwrap();
        assert_eq!(resumed.outcome, CampaignOutcome::Unspecified as i32);
    }

    fn series(devices: &[&str], per_device: u64) -> PowerSeries {
        let samples = (0..per_device)
            .flat_map(|i| {
                devices.iter().map(move |device| RunPowerSample {
                    device: (*device).into(),
                    time: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: (i * 5_000_000) as i32,
                    }),
                    elapsed: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: (i * 5_000_000) as i32,
                    }),
                    power_w: Some(100.0 + i as f64),
                    energy_j: None,
                })
            })
            .collect();
        PowerSeries {
            samples,
            truncated: false,
        }
    }

    fn succeeded_with(series: PowerSeries) -> RunUpdate {
        RunUpdate {
            finished_now: true,
            power_series: Some(series),
            ..Default::default()
        }
    }

    #[test]
    fn power_series_is_written_with_the_transition_only() {
        let (_dir, store) = store_with(&[run("r1", 0), run("r2", 1)]);
        let stored = series(&["gpu0"], 3);
        let update = succeeded_with(stored.clone());
        // Not in a `from` state: neither the state nor the samples change.
        assert!(!moved(&store, "r1", Running, Succeeded, &update));
        assert!(store.power_series("r1", None, None, 10).unwrap().is_empty());
        assert_eq!(store.run("r1").unwrap().unwrap().power_samples, 0);

        assert!(moved(&store, "r1", Pending, Succeeded, &update));
        let read: Vec<RunPowerSample> = store
            .power_series("r1", None, None, 10)
            .unwrap()
            .into_iter()
            .map(|(_, sample)| sample)
            .collect();
        assert_eq!(read, stored.samples);
        let run = store.run("r1").unwrap().unwrap();
        assert_eq!((run.power_samples, run.power_series_truncated), (3, false));
        // A run without power has an empty series, not an error.
        assert!(store.power_series("r2", None, None, 10).unwrap().is_empty());
    }

    #[test]
    fn replayed_transition_neither_duplicates_nor_mixes_samples() {
        let (_dir, store) = store_with(&[run("r1", 0)]);
        let first = series(&["gpu0"], 4);
        let mut replay = series(&["gpu1"], 9);
        replay.truncated = true;
        for update in [succeeded_with(first), succeeded_with(replay)] {
            moved(&store, "r1", Pending, Succeeded, &update);
        }
        let read = store.power_series("r1", None, None, 100).unwrap();
        assert_eq!(read.len(), 4);
        assert!(read.iter().all(|(_, s)| s.device == "gpu0"));
        let run = store.run("r1").unwrap().unwrap();
        assert_eq!((run.power_samples, run.power_series_truncated), (4, false));
    }

    #[test]
    fn power_series_pages_by_position_and_filters_by_device() {
        let (_dir, store) = store_with(&[run("r1", 0)]);
        let update = succeeded_with(series(&["gpu0", "gpu1"], 5));
        moved(&store, "r1", Pending, Succeeded, &update);
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = store.power_series("r1", Some("gpu1"), after, 2).unwrap();
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            pages.push(page.len());
        }
        assert_eq!(pages, [2, 2, 1]);
        let all = store.power_series("r1", None, Some(7), 100).unwrap();
        assert_eq!(
            all.iter()
                .map(|(position, _)| *position)
                .collect::<Vec<_>>(),
            [8, 9]
        );
    }

    #[test]
    fn a_database_from_before_power_series_gains_them_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .insert_campaign(&campaign("c1"), "m", "", &[run("r1", 0)])
                .unwrap();
            store
                .db()
                .execute_batch(
                    "DROP TABLE run_power_samples;
                     ALTER TABLE runs DROP COLUMN power_samples;
                     ALTER TABLE runs DROP COLUMN power_series_truncated;",
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.run("r1").unwrap().unwrap().power_samples, 0);
        let update = succeeded_with(series(&["gpu0"], 2));
        assert!(moved(&store, "r1", Pending, Succeeded, &update));
        assert_eq!(store.power_series("r1", None, None, 10).unwrap().len(), 2);
    }

    #[test]
    fn a_database_from_before_results_layouts_gains_them_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            let old = Campaign {
                manifest_yaml: "name: t".into(),
                ..campaign("c1")
            };
            store.insert_campaign(&old, "m", "", &[]).unwrap();
            store
                .db()
                .execute_batch(
                    "ALTER TABLE campaigns DROP COLUMN work_metric;
                     ALTER TABLE campaigns DROP COLUMN results_layout;",
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let new = Campaign {
            work_metric: "items".into(),
            ..campaign("c2")
        };
        store.insert_campaign(&new, "m", "{}", &[]).unwrap();
        assert_eq!(
            store.campaigns_without_results_layout().unwrap(),
            [("c1".to_string(), "name: t".to_string())]
        );
        assert_eq!(store.campaign("c1").unwrap().unwrap().work_metric, "");
        store
            .set_results_layout("c1", "tokens", "{\"a\":1}")
            .unwrap();
        assert!(store.campaigns_without_results_layout().unwrap().is_empty());
        assert_eq!(store.campaign("c1").unwrap().unwrap().work_metric, "tokens");
        assert_eq!(store.campaign("c2").unwrap().unwrap().work_metric, "items");
        assert_eq!(
            store.results_layout("c1").unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(store.results_layout("c2").unwrap().as_deref(), Some("{}"));
        assert_eq!(store.results_layout("c3").unwrap(), None);
    }

    #[test]
    fn survives_reopen_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .insert_campaign(
                    &campaign("c1"),
                    "m",
                    "",
                    &[run("r1", 0), run("r2", 1), run("r3", 2)],
                )
                .unwrap();
            store
                .insert_campaign(&campaign("c2"), "m", "", &[])
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let page = store.list_campaigns(None, 1).unwrap();
        assert_eq!(page[0].1.id, "c2");
        let next = store.list_campaigns(Some(page[0].0), 10).unwrap();
        assert_eq!(
            next.iter().map(|(_, c)| c.id.as_str()).collect::<Vec<_>>(),
            ["c1"]
        );
        let runs = store.runs("c1", None, Some(0), 10).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r2", "r3"]
        );
        assert_eq!(store.unfinished_campaigns().unwrap().len(), 2);
    }
}
