//! Campaigns: inserted with their runs in one transaction (the runs in
//! batches of arrays), read, listed, and their state, outcome, message and
//! results layout set.
use berth_proto::orchestrator::v1::{Campaign, CampaignOutcome, CampaignState, Run};
use postgres::Row;

use super::pool::{PgResult, Session};
use super::{now_ms, timestamp, timestamp_ms};
use crate::store::StoreError;

const CAMPAIGN_COLUMNS: &str =
    "seq, id, name, state, status_message, manifest, created_ms, finished_ms, outcome, work_metric";

/// Runs inserted by one statement: bounds the arrays of one message.
const RUNS_PER_INSERT: usize = 5_000;

fn campaign_row(row: &Row) -> (i64, Campaign) {
    (
        row.get(0),
        Campaign {
            id: row.get(1),
            name: row.get(2),
            state: row.get(3),
            status_message: row.get(4),
            manifest_yaml: row.get(5),
            created_at: timestamp(row.get(6)),
            finished_at: timestamp(row.get(7)),
            outcome: row.get(8),
            runs: None,
            work_metric: row.get(9),
        },
    )
}

pub(super) fn insert_campaign(
    db: &mut Session,
    campaign: &Campaign,
    source_name: &str,
    results_layout: &str,
    runs: &[Run],
) -> PgResult<()> {
    let mut tx = db.transaction()?;
    tx.execute(
        "INSERT INTO campaigns (id, name, state, status_message, manifest, source_name, created_ms, work_metric, results_layout) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &campaign.id,
            &campaign.name,
            &campaign.state,
            &campaign.status_message,
            &campaign.manifest_yaml,
            &source_name,
            &timestamp_ms(&campaign.created_at).unwrap_or_else(now_ms),
            &campaign.work_metric,
            &results_layout,
        ],
    )?;
    let insert = tx.prepare(
        "INSERT INTO runs (id, campaign_id, sequence, config, params, backend, cycle, warmup, state) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], \
                              $7::bigint[], $8::boolean[], $9::integer[])",
    )?;
    for batch in runs.chunks(RUNS_PER_INSERT) {
        let params = batch
            .iter()
            .map(|run| serde_json::to_string(&run.params))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let column = |field: fn(&Run) -> String| batch.iter().map(field).collect::<Vec<_>>();
        tx.execute(
            &insert,
            &[
                &column(|r| r.id.clone()),
                &column(|r| r.campaign_id.clone()),
                &batch
                    .iter()
                    .map(|r| i64::from(r.sequence))
                    .collect::<Vec<_>>(),
                &column(|r| r.config.clone()),
                &params,
                &column(|r| r.backend.clone()),
                &batch.iter().map(|r| i64::from(r.cycle)).collect::<Vec<_>>(),
                &batch.iter().map(|r| r.warmup).collect::<Vec<_>>(),
                &batch.iter().map(|r| r.state).collect::<Vec<_>>(),
            ],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn campaign(db: &mut Session, id: &str) -> PgResult<Option<Campaign>> {
    // Prepared once: a watched campaign is read at every event.
    let read = db.prepared(&format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1"
    ))?;
    Ok(db.query_opt(&read, &[&id])?.map(|row| campaign_row(&row).1))
}

pub(super) fn results_layout(db: &mut Session, id: &str) -> PgResult<Option<String>> {
    Ok(db
        .query_opt("SELECT results_layout FROM campaigns WHERE id = $1", &[&id])?
        .map(|row| row.get(0)))
}

pub(super) fn campaigns_without_results_layout(
    db: &mut Session,
) -> PgResult<Vec<(String, String)>> {
    Ok(db
        .query(
            "SELECT id, manifest FROM campaigns WHERE results_layout = '' ORDER BY seq",
            &[],
        )?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

pub(super) fn set_results_layout(
    db: &mut Session,
    id: &str,
    work_metric: &str,
    results_layout: &str,
) -> PgResult<()> {
    db.write(
        "UPDATE campaigns SET work_metric = $2, results_layout = $3 WHERE id = $1",
        &[&id, &work_metric, &results_layout],
    )?;
    Ok(())
}

pub(super) fn list_campaigns(
    db: &mut Session,
    before: Option<i64>,
    limit: usize,
) -> PgResult<Vec<(i64, Campaign)>> {
    let sql = format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
    );
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(db
        .query(&sql, &[&before.unwrap_or(i64::MAX), &limit])?
        .iter()
        .map(campaign_row)
        .collect())
}

pub(super) fn unfinished_campaigns(db: &mut Session) -> PgResult<Vec<Campaign>> {
    let sql =
        format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE state IN ($1, $2) ORDER BY seq");
    Ok(db
        .query(
            &sql,
            &[
                &(CampaignState::Pending as i32),
                &(CampaignState::Running as i32),
            ],
        )?
        .iter()
        .map(|row| campaign_row(row).1)
        .collect())
}

pub(super) fn set_campaign_state(
    db: &mut Session,
    id: &str,
    state: CampaignState,
    message: &str,
) -> PgResult<()> {
    let finished = crate::store::campaign_is_terminal(state).then(now_ms);
    db.write(
        "UPDATE campaigns SET state = $2, status_message = $3, finished_ms = $4, outcome = $5 WHERE id = $1",
        &[
            &id,
            &(state as i32),
            &message,
            &finished,
            &(CampaignOutcome::Unspecified as i32),
        ],
    )?;
    Ok(())
}

pub(super) fn finish_campaign(
    db: &mut Session,
    id: &str,
    state: CampaignState,
    outcome: CampaignOutcome,
    message: &str,
) -> PgResult<()> {
    db.write(
        "UPDATE campaigns SET state = $2, status_message = $3, finished_ms = $4, outcome = $5 WHERE id = $1",
        &[&id, &(state as i32), &message, &now_ms(), &(outcome as i32)],
    )?;
    Ok(())
}

pub(super) fn set_campaign_message(db: &mut Session, id: &str, message: &str) -> PgResult<()> {
    db.write(
        "UPDATE campaigns SET status_message = $2 WHERE id = $1",
        &[&id, &message],
    )?;
    Ok(())
}
