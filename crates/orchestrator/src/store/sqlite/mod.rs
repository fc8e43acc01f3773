//! The default store: one SQLite file in WAL mode. [`Store`] is
//! implemented here by handing each call to the module of its job, with the
//! connection: `schema` (tables, triggers, the columns added since),
//! `campaigns`, `runs` (rows, counts per state, transitions), `power` (runs'
//! power samples and energy), `hosts`, `placements` (where a campaign's
//! backends run) and `deployments` ([`DeploymentStore`](super::DeploymentStore)).

mod campaigns;
mod deployments;
mod hosts;
mod placements;
mod power;
mod runs;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, Run, RunCounts, RunState,
};
use rusqlite::Connection;

use super::codec::{now_ms, timestamp, timestamp_ms};
use super::{
    HostRecord, MeasuredRuns, Placement, RunPair, RunUpdate, Store, StoreError, StoreResult,
    StoredPowerSample, Transitioned,
};

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
        schema::create_or_migrate(&mut connection)?;
        schema::restrict_permissions(path);
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

impl Store for SqliteStore {
    fn insert_campaign(
        &self,
        campaign: &Campaign,
        source_name: &str,
        results_layout: &str,
        runs: &[Run],
    ) -> StoreResult<()> {
        campaigns::insert_campaign(&mut self.db(), campaign, source_name, results_layout, runs)
    }

    fn campaign(&self, id: &str) -> StoreResult<Option<Campaign>> {
        campaigns::campaign(&self.db(), id)
    }

    fn results_layout(&self, id: &str) -> StoreResult<Option<String>> {
        campaigns::results_layout(&self.db(), id)
    }

    fn campaigns_without_results_layout(&self) -> StoreResult<Vec<(String, String)>> {
        campaigns::campaigns_without_results_layout(&self.db())
    }

    fn set_results_layout(
        &self,
        id: &str,
        work_metric: &str,
        results_layout: &str,
    ) -> StoreResult<()> {
        campaigns::set_results_layout(&self.db(), id, work_metric, results_layout)
    }

    fn list_campaigns(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<(i64, Campaign)>> {
        campaigns::list_campaigns(&self.db(), before, limit)
    }

    fn unfinished_campaigns(&self) -> StoreResult<Vec<Campaign>> {
        campaigns::unfinished_campaigns(&self.db())
    }

    fn set_campaign_state(&self, id: &str, state: CampaignState, message: &str) -> StoreResult<()> {
        campaigns::set_campaign_state(&self.db(), id, state, message)
    }

    fn finish_campaign(
        &self,
        id: &str,
        state: CampaignState,
        outcome: CampaignOutcome,
        message: &str,
    ) -> StoreResult<()> {
        campaigns::finish_campaign(&self.db(), id, state, outcome, message)
    }

    fn set_campaign_message(&self, id: &str, message: &str) -> StoreResult<()> {
        campaigns::set_campaign_message(&self.db(), id, message)
    }

    fn run_counts(&self, campaign_id: &str) -> StoreResult<RunCounts> {
        runs::run_counts(&self.db(), campaign_id)
    }

    fn pending_runs_by_backend(&self, campaign_id: &str) -> StoreResult<BTreeMap<String, u64>> {
        runs::pending_runs_by_backend(&self.db(), campaign_id)
    }

    fn runs(
        &self,
        campaign_id: &str,
        state: Option<RunState>,
        after_sequence: Option<u32>,
        limit: usize,
    ) -> StoreResult<Vec<Run>> {
        runs::runs(&self.db(), campaign_id, state, after_sequence, limit)
    }

    fn run(&self, id: &str) -> StoreResult<Option<Run>> {
        runs::run(&self.db(), id)
    }

    fn measured_runs(&self, campaign_id: &str) -> StoreResult<Vec<MeasuredRuns>> {
        runs::measured_runs(&self.db(), campaign_id)
    }

    fn runs_of_pair(&self, pair: RunPair<'_>) -> StoreResult<Vec<Run>> {
        runs::runs_of_pair(&self.db(), pair)
    }

    fn drop_pending_runs(&self, pair: RunPair<'_>) -> StoreResult<usize> {
        runs::drop_pending_runs(&self.db(), pair)
    }

    fn next_pending_run(&self, campaign_id: &str, backend: &str) -> StoreResult<Option<Run>> {
        runs::next_pending_run(&self.db(), campaign_id, backend)
    }

    fn transition_run(
        &self,
        id: &str,
        from: &[RunState],
        to: RunState,
        update: &RunUpdate,
    ) -> StoreResult<Option<Transitioned>> {
        runs::transition_run(&mut self.db(), id, from, to, update)
    }

    fn power_series(
        &self,
        run_id: &str,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredPowerSample>> {
        power::power_series(&self.db(), run_id, device, after, limit)
    }

    fn transition_all(
        &self,
        campaign_id: &str,
        from: &[RunState],
        to: RunState,
    ) -> StoreResult<usize> {
        runs::transition_all(&self.db(), campaign_id, from, to)
    }

    fn upsert_host(&self, host: &HostRecord) -> StoreResult<()> {
        hosts::upsert_host(&self.db(), host)
    }

    fn delete_host(&self, name: &str) -> StoreResult<bool> {
        hosts::delete_host(&self.db(), name)
    }

    fn hosts(&self) -> StoreResult<Vec<HostRecord>> {
        hosts::hosts(&self.db())
    }

    fn set_placement(&self, campaign_id: &str, placement: &Placement) -> StoreResult<()> {
        placements::set_placement(&self.db(), campaign_id, placement)
    }

    fn clear_placement(&self, campaign_id: &str, backend: &str) -> StoreResult<()> {
        placements::clear_placement(&self.db(), campaign_id, backend)
    }

    fn placements(&self, campaign_id: &str) -> StoreResult<Vec<Placement>> {
        placements::placements(&self.db(), campaign_id)
    }
}
