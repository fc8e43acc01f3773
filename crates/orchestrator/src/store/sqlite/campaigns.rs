//! Campaigns: inserted with their runs in one transaction, read, listed,
//! and their state, outcome, message and results layout set.
use berth_proto::orchestrator::v1::{Campaign, CampaignOutcome, CampaignState, Run};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{now_ms, timestamp, timestamp_ms};
use crate::store::{StoreError, StoreResult};

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

pub(super) fn insert_campaign(
    db: &mut Connection,
    campaign: &Campaign,
    source_name: &str,
    results_layout: &str,
    runs: &[Run],
) -> StoreResult<()> {
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

pub(super) fn campaign(db: &Connection, id: &str) -> StoreResult<Option<Campaign>> {
    let sql = format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?1");
    Ok(db
        .query_row(&sql, [id], campaign_row)
        .optional()?
        .map(|(_, c)| c))
}

pub(super) fn results_layout(db: &Connection, id: &str) -> StoreResult<Option<String>> {
    Ok(db
        .query_row(
            "SELECT results_layout FROM campaigns WHERE id = ?1",
            [id],
            |row| row.get(0),
        )
        .optional()?)
}

pub(super) fn campaigns_without_results_layout(
    db: &Connection,
) -> StoreResult<Vec<(String, String)>> {
    let mut statement =
        db.prepare("SELECT id, manifest FROM campaigns WHERE results_layout = '' ORDER BY seq")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn set_results_layout(
    db: &Connection,
    id: &str,
    work_metric: &str,
    results_layout: &str,
) -> StoreResult<()> {
    db.execute(
        "UPDATE campaigns SET work_metric = ?2, results_layout = ?3 WHERE id = ?1",
        params![id, work_metric, results_layout],
    )?;
    Ok(())
}

pub(super) fn list_campaigns(
    db: &Connection,
    before: Option<i64>,
    limit: usize,
) -> StoreResult<Vec<(i64, Campaign)>> {
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

pub(super) fn unfinished_campaigns(db: &Connection) -> StoreResult<Vec<Campaign>> {
    let sql =
        format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE state IN (?1, ?2) ORDER BY seq");
    let mut statement = db.prepare(&sql)?;
    let rows = statement.query_map(
        params![CampaignState::Pending as i32, CampaignState::Running as i32],
        campaign_row,
    )?;
    Ok(rows.map(|r| r.map(|(_, c)| c)).collect::<Result<_, _>>()?)
}

pub(super) fn set_campaign_state(
    db: &Connection,
    id: &str,
    state: CampaignState,
    message: &str,
) -> StoreResult<()> {
    let finished = crate::store::campaign_is_terminal(state).then(now_ms);
    db.execute(
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

pub(super) fn finish_campaign(
    db: &Connection,
    id: &str,
    state: CampaignState,
    outcome: CampaignOutcome,
    message: &str,
) -> StoreResult<()> {
    db.execute(
        "UPDATE campaigns SET state = ?2, status_message = ?3, finished_ms = ?4, outcome = ?5 WHERE id = ?1",
        params![id, state as i32, message, now_ms(), outcome as i32],
    )?;
    Ok(())
}

pub(super) fn set_campaign_message(db: &Connection, id: &str, message: &str) -> StoreResult<()> {
    db.execute(
        "UPDATE campaigns SET status_message = ?2 WHERE id = ?1",
        params![id, message],
    )?;
    Ok(())
}
