//! The tables, indexes and triggers of the store, and the columns added
//! since their first release (added on open to a store from before them).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::deployments;
use crate::store::StoreResult;

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
    power_series_truncated INTEGER NOT NULL DEFAULT 0,
    provenance BLOB
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

/// Creates what a new store lacks and adds what an older one lacks, so
/// that every store opened has today's schema.
pub(super) fn create_or_migrate(connection: &mut Connection) -> StoreResult<()> {
    let counted = table_exists(connection, "run_state_counts")?;
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
        connection,
        "campaigns",
        "outcome",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    // What results need from the plan, stored at submit (empty in a
    // store from before: filled once when the orchestrator starts).
    add_column_if_missing(
        connection,
        "campaigns",
        "work_metric",
        "TEXT NOT NULL DEFAULT ''",
    )?;
    add_column_if_missing(
        connection,
        "campaigns",
        "results_layout",
        "TEXT NOT NULL DEFAULT ''",
    )?;
    add_column_if_missing(connection, "runs", "energy", "BLOB")?;
    add_column_if_missing(connection, "runs", "logs_tail", "TEXT NOT NULL DEFAULT ''")?;
    add_column_if_missing(connection, "runs", "provenance", "BLOB")?;
    add_column_if_missing(
        connection,
        "runs",
        "power_samples",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    add_column_if_missing(
        connection,
        "runs",
        "power_series_truncated",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    add_column_if_missing(
        connection,
        "hosts",
        "power_sampler",
        "TEXT NOT NULL DEFAULT ''",
    )?;
    add_column_if_missing(connection, "placements", "gpus", "TEXT NOT NULL DEFAULT ''")?;
    add_column_if_missing(connection, "replicas", "gpus", "TEXT NOT NULL DEFAULT '[]'")?;
    add_column_if_missing(
        connection,
        "replicas",
        "address",
        "TEXT NOT NULL DEFAULT ''",
    )?;
    Ok(())
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

/// The store holds agent tokens: only its owner may read it.
pub(super) fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
