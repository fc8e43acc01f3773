//! The PostgreSQL store's tables, as numbered migrations: `schema_version`
//! holds how many were applied; opening a database applies the ones it
//! lacks, and refuses one migrated past what this build knows.

use super::pool::{Failure, PgResult, Session};
use crate::store::StoreError;

/// Every migration, in order; the schema's version is how many were
/// applied. Append only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// The version this build migrates to.
pub(super) const SUPPORTED: i64 = MIGRATIONS.len() as i64;

/// Held (for the migrating transaction) so that orchestrators opening one
/// database at once migrate it one after the other: "berth" in ASCII.
const MIGRATION_LOCK: i64 = 0x0062_6572_7468;

/// Version 1: the tables of the SQLite store as of its last column, in
/// PostgreSQL's types; run counts kept by statement triggers.
const V1: &str = "
CREATE TABLE campaigns (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state INTEGER NOT NULL,
    status_message TEXT NOT NULL DEFAULT '',
    manifest TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    outcome INTEGER NOT NULL DEFAULT 0,
    work_metric TEXT NOT NULL DEFAULT '',
    results_layout TEXT NOT NULL DEFAULT ''
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    sequence BIGINT NOT NULL,
    config TEXT NOT NULL,
    params TEXT NOT NULL,
    backend TEXT NOT NULL,
    cycle BIGINT NOT NULL,
    warmup BOOLEAN NOT NULL,
    state INTEGER NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    attempts BIGINT NOT NULL DEFAULT 0,
    exit_code INTEGER,
    result_json TEXT NOT NULL DEFAULT '',
    duration_ms BIGINT,
    error TEXT NOT NULL DEFAULT '',
    started_ms BIGINT,
    finished_ms BIGINT,
    energy BYTEA,
    logs_tail TEXT NOT NULL DEFAULT '',
    power_samples BIGINT NOT NULL DEFAULT 0,
    power_series_truncated BOOLEAN NOT NULL DEFAULT FALSE,
    provenance BYTEA
);
CREATE INDEX runs_by_campaign ON runs(campaign_id, sequence);
CREATE INDEX runs_by_backend_state ON runs(campaign_id, backend, state, sequence);
CREATE TABLE run_power_samples (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    device TEXT NOT NULL,
    time_ns BIGINT,
    elapsed_ns BIGINT,
    power_w DOUBLE PRECISION,
    energy_j DOUBLE PRECISION,
    PRIMARY KEY (run_id, position)
);
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    token TEXT NOT NULL,
    labels TEXT NOT NULL,
    power_sampler TEXT NOT NULL DEFAULT ''
);
-- Runs per (campaign, state), kept by the triggers below in the statement
-- that changes runs: a campaign's counts are read on every event.
CREATE TABLE run_state_counts (
    campaign_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    runs BIGINT NOT NULL,
    PRIMARY KEY (campaign_id, state)
);
-- One upsert per statement (not per row: a campaign's 10,000 runs inserted
-- or cancelled at once would update one count row 10,000 times), its rows
-- in key order so that two transactions lock count rows in the same order.
CREATE FUNCTION recount_run_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO run_state_counts (campaign_id, state, runs)
            SELECT campaign_id, state, COUNT(*) FROM added_runs
            GROUP BY campaign_id, state ORDER BY campaign_id, state
        ON CONFLICT (campaign_id, state) DO UPDATE SET runs = run_state_counts.runs + EXCLUDED.runs;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO run_state_counts (campaign_id, state, runs)
            SELECT campaign_id, state, -COUNT(*) FROM removed_runs
            GROUP BY campaign_id, state ORDER BY campaign_id, state
        ON CONFLICT (campaign_id, state) DO UPDATE SET runs = run_state_counts.runs + EXCLUDED.runs;
    ELSE
        INSERT INTO run_state_counts (campaign_id, state, runs)
            SELECT campaign_id, state, SUM(change) FROM (
                SELECT campaign_id, state, -1 AS change FROM old_runs
                UNION ALL
                SELECT campaign_id, state, 1 AS change FROM new_runs
            ) changes
            GROUP BY campaign_id, state HAVING SUM(change) <> 0 ORDER BY campaign_id, state
        ON CONFLICT (campaign_id, state) DO UPDATE SET runs = run_state_counts.runs + EXCLUDED.runs;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER runs_counted AFTER INSERT ON runs REFERENCING NEW TABLE AS added_runs
    FOR EACH STATEMENT EXECUTE FUNCTION recount_run_states();
CREATE TRIGGER runs_recounted AFTER UPDATE ON runs REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION recount_run_states();
CREATE TRIGGER runs_uncounted AFTER DELETE ON runs REFERENCING OLD TABLE AS removed_runs
    FOR EACH STATEMENT EXECUTE FUNCTION recount_run_states();
CREATE TABLE placements (
    campaign_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    host TEXT NOT NULL,
    workload_id TEXT NOT NULL,
    gpus TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (campaign_id, backend)
);
CREATE TABLE deployments (
    seq BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    recipe TEXT NOT NULL,
    source_name TEXT NOT NULL,
    replicas BIGINT NOT NULL,
    state INTEGER NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    created_ms BIGINT NOT NULL,
    stopping BOOLEAN NOT NULL DEFAULT FALSE,
    generation BIGINT NOT NULL DEFAULT 1
);
CREATE TABLE replicas (
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    host TEXT NOT NULL,
    workload_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    ports TEXT NOT NULL,
    restarts BIGINT NOT NULL,
    in_a_row BIGINT NOT NULL,
    reason TEXT NOT NULL,
    since_ms BIGINT NOT NULL,
    generation BIGINT NOT NULL DEFAULT 1,
    gpus TEXT NOT NULL DEFAULT '[]',
    address TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, idx)
);
CREATE TABLE deployment_transitions (
    seq BIGSERIAL PRIMARY KEY,
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    time_ms BIGINT NOT NULL,
    replica BIGINT,
    message TEXT NOT NULL
);
CREATE INDEX transitions_by_deployment ON deployment_transitions(deployment, seq);
";

/// Version 2: the leader lease of orchestrators sharing the database (one
/// row: who leads, under which term, until when by the database's clock).
const V2: &str = "
CREATE TABLE leader_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
";

/// Version 3: a run's transition as one call, so that it costs one round
/// trip instead of five (BEGIN, the fence, the UPDATE, the counts, COMMIT):
/// the fence, the compare-and-set and the counts the triggers just kept, in
/// the call's own transaction. A fenced call fails with SQLSTATE `BF001`;
/// a run whose state is not in `p_from` gives no row. The columns are those
/// of the runs table as the store reads them, then the counts as two arrays.
const V3: &str = "
CREATE FUNCTION transition_run(
    p_term BIGINT, p_id TEXT, p_from INTEGER[], p_to INTEGER, p_host TEXT, p_add_attempts BIGINT,
    p_exit_code INTEGER, p_result_json TEXT, p_duration_ms BIGINT, p_error TEXT,
    p_set_started BOOLEAN, p_set_finished BOOLEAN, p_now_ms BIGINT, p_energy BYTEA,
    p_logs_tail TEXT, p_power_samples BIGINT, p_power_series_truncated BOOLEAN, p_provenance BYTEA)
RETURNS TABLE (
    o_id TEXT, o_campaign_id TEXT, o_sequence BIGINT, o_config TEXT, o_params TEXT, o_backend TEXT,
    o_cycle BIGINT, o_warmup BOOLEAN, o_state INTEGER, o_host TEXT, o_attempts BIGINT,
    o_exit_code INTEGER, o_result_json TEXT, o_duration_ms BIGINT, o_error TEXT, o_started_ms BIGINT,
    o_finished_ms BIGINT, o_energy BYTEA, o_logs_tail TEXT, o_power_samples BIGINT,
    o_power_series_truncated BOOLEAN, o_provenance BYTEA, o_count_states INTEGER[], o_count_runs BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    changed runs%ROWTYPE;
BEGIN
    IF p_term <> 0 THEN
        PERFORM 1 FROM leader_lease WHERE leader_lease.id = 1 AND leader_lease.term = p_term FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the leader lease moved past term %', p_term USING ERRCODE = 'BF001';
        END IF;
    END IF;
    UPDATE runs SET state = p_to,
        host = COALESCE(p_host, runs.host),
        attempts = runs.attempts + p_add_attempts,
        exit_code = COALESCE(p_exit_code, runs.exit_code),
        result_json = COALESCE(p_result_json, runs.result_json),
        duration_ms = COALESCE(p_duration_ms, runs.duration_ms),
        error = COALESCE(p_error, runs.error),
        started_ms = CASE WHEN p_set_started THEN p_now_ms ELSE runs.started_ms END,
        finished_ms = CASE WHEN p_set_finished THEN p_now_ms ELSE runs.finished_ms END,
        energy = COALESCE(p_energy, runs.energy),
        logs_tail = COALESCE(p_logs_tail, runs.logs_tail),
        power_samples = COALESCE(p_power_samples, runs.power_samples),
        power_series_truncated = COALESCE(p_power_series_truncated, runs.power_series_truncated),
        provenance = COALESCE(p_provenance, runs.provenance)
    WHERE runs.id = p_id AND runs.state = ANY(p_from)
    RETURNING runs.* INTO changed;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT changed.id, changed.campaign_id, changed.sequence, changed.config,
        changed.params, changed.backend, changed.cycle, changed.warmup, changed.state, changed.host,
        changed.attempts, changed.exit_code, changed.result_json, changed.duration_ms, changed.error,
        changed.started_ms, changed.finished_ms, changed.energy, changed.logs_tail,
        changed.power_samples, changed.power_series_truncated, changed.provenance,
        COALESCE(array_agg(counts.state ORDER BY counts.state), '{}'),
        COALESCE(array_agg(counts.runs ORDER BY counts.state), '{}')
    FROM run_state_counts counts WHERE counts.campaign_id = changed.campaign_id;
END
$$;
";

/// Brings the database to [`SUPPORTED`], in one transaction; refuses a
/// database of a newer version.
pub(super) fn migrate(db: &mut Session) -> PgResult<()> {
    let mut tx = db.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: Option<i64> = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map(|row| row.get(0));
    let applied = found.unwrap_or(0);
    if applied > SUPPORTED {
        return Err(Failure::NewerSchema {
            found: applied,
            supported: SUPPORTED,
        });
    }
    let Ok(applied) = usize::try_from(applied) else {
        return Err(Failure::Store(StoreError::Corrupt(format!(
            "schema_version holds {applied}"
        ))));
    };
    for migration in &MIGRATIONS[applied..] {
        tx.batch_execute(migration)?;
    }
    if found.is_none() {
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&SUPPORTED],
        )?;
    } else {
        tx.execute("UPDATE schema_version SET version = $1", &[&SUPPORTED])?;
    }
    tx.commit()?;
    Ok(())
}
