//! The PostgreSQL store, chosen by `store.url = "postgres://…"`: the same
//! tables and guarantees as the SQLite one (a run transition is a
//! compare-and-set on its state in a transaction, run counts are kept by
//! triggers in the statement that changes runs), for a database operators
//! already run and back up.
//!
//! Every call is a job run on one of a bounded number of connections, each
//! on a thread of its own (`pool`, which says why); each module of a job
//! takes the connection: `schema` (numbered migrations), `campaigns`,
//! `runs` (rows, counts, transitions, power series), `hosts` (hosts and
//! placements) and `deployments`. `copy` moves a SQLite store's state in
//! (`berth-orchestrator store copy`).

mod campaigns;
pub mod copy;
mod deployments;
mod hosts;
mod lease;
mod pool;
mod runs;
mod schema;
#[cfg(test)]
mod tests;

use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, Run, RunCounts, RunState,
};

use super::codec::{decode_energy, encode_energy, now_ms, timestamp, timestamp_ms};
use super::{
    HostRecord, MeasuredRuns, Placement, RunPair, RunUpdate, Store, StoreError, StoreResult,
    StoredPowerSample, Transitioned,
};
pub use lease::LeaseHolder;
use pool::Pool;

pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` or `postgresql://` URL) with at
    /// most `max_connections` connections, and brings its schema up to
    /// date. Safe to call on a tokio runtime: the connections live on
    /// threads of their own.
    pub fn open(url: &str, max_connections: usize) -> StoreResult<Self> {
        let shown = pool::redact(url);
        if !is_postgres_url(url) {
            return Err(StoreError::Postgres {
                url: shown,
                reason: "not a postgres:// or postgresql:// URL".into(),
            });
        }
        let config: postgres::Config =
            url.parse()
                .map_err(|e: postgres::Error| StoreError::Postgres {
                    url: shown.clone(),
                    reason: format!("not a PostgreSQL URL: {e}"),
                })?;
        let store = Self {
            pool: Pool::start(config, shown, max_connections),
        };
        store.pool.call(schema::migrate)?;
        Ok(store)
    }

    /// `store.url` with its password hidden.
    pub fn url(&self) -> &str {
        self.pool.url()
    }
}

/// Whether `url` names a PostgreSQL database (what selects this store).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A value the schema keeps non-negative, read back into its unsigned type.
fn unsigned<T: TryFrom<i64>>(value: i64, what: &str) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} = {value}")))
}

impl Store for PostgresStore {
    fn insert_campaign(
        &self,
        campaign: &Campaign,
        source_name: &str,
        results_layout: &str,
        runs: &[Run],
    ) -> StoreResult<()> {
        let (campaign, source_name, results_layout, runs) = (
            campaign.clone(),
            source_name.to_string(),
            results_layout.to_string(),
            runs.to_vec(),
        );
        self.pool.call(move |db| {
            campaigns::insert_campaign(db, &campaign, &source_name, &results_layout, &runs)
        })
    }

    fn campaign(&self, id: &str) -> StoreResult<Option<Campaign>> {
        let id = id.to_string();
        self.pool.call(move |db| campaigns::campaign(db, &id))
    }

    fn results_layout(&self, id: &str) -> StoreResult<Option<String>> {
        let id = id.to_string();
        self.pool.call(move |db| campaigns::results_layout(db, &id))
    }

    fn campaigns_without_results_layout(&self) -> StoreResult<Vec<(String, String)>> {
        self.pool.call(campaigns::campaigns_without_results_layout)
    }

    fn set_results_layout(
        &self,
        id: &str,
        work_metric: &str,
        results_layout: &str,
    ) -> StoreResult<()> {
        let (id, work_metric, results_layout) = (
            id.to_string(),
            work_metric.to_string(),
            results_layout.to_string(),
        );
        self.pool
            .call(move |db| campaigns::set_results_layout(db, &id, &work_metric, &results_layout))
    }

    fn list_campaigns(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<(i64, Campaign)>> {
        self.pool
            .call(move |db| campaigns::list_campaigns(db, before, limit))
    }

    fn unfinished_campaigns(&self) -> StoreResult<Vec<Campaign>> {
        self.pool.call(campaigns::unfinished_campaigns)
    }

    fn set_campaign_state(&self, id: &str, state: CampaignState, message: &str) -> StoreResult<()> {
        let (id, message) = (id.to_string(), message.to_string());
        self.pool
            .call(move |db| campaigns::set_campaign_state(db, &id, state, &message))
    }

    fn finish_campaign(
        &self,
        id: &str,
        state: CampaignState,
        outcome: CampaignOutcome,
        message: &str,
    ) -> StoreResult<()> {
        let (id, message) = (id.to_string(), message.to_string());
        self.pool
            .call(move |db| campaigns::finish_campaign(db, &id, state, outcome, &message))
    }

    fn set_campaign_message(&self, id: &str, message: &str) -> StoreResult<()> {
        let (id, message) = (id.to_string(), message.to_string());
        self.pool
            .call(move |db| campaigns::set_campaign_message(db, &id, &message))
    }

    fn run_counts(&self, campaign_id: &str) -> StoreResult<RunCounts> {
        let campaign_id = campaign_id.to_string();
        self.pool.call(move |db| runs::run_counts(db, &campaign_id))
    }

    fn runs(
        &self,
        campaign_id: &str,
        state: Option<RunState>,
        after_sequence: Option<u32>,
        limit: usize,
    ) -> StoreResult<Vec<Run>> {
        let campaign_id = campaign_id.to_string();
        self.pool
            .call(move |db| runs::runs(db, &campaign_id, state, after_sequence, limit))
    }

    fn run(&self, id: &str) -> StoreResult<Option<Run>> {
        let id = id.to_string();
        self.pool.call(move |db| runs::run(db, &id))
    }

    fn measured_runs(&self, campaign_id: &str) -> StoreResult<Vec<MeasuredRuns>> {
        let campaign_id = campaign_id.to_string();
        self.pool
            .call(move |db| runs::measured_runs(db, &campaign_id))
    }

    fn runs_of_pair(&self, pair: RunPair<'_>) -> StoreResult<Vec<Run>> {
        let pair = runs::OwnedPair::from(pair);
        self.pool.call(move |db| runs::runs_of_pair(db, &pair))
    }

    fn drop_pending_runs(&self, pair: RunPair<'_>) -> StoreResult<usize> {
        let pair = runs::OwnedPair::from(pair);
        self.pool.call(move |db| runs::drop_pending_runs(db, &pair))
    }

    fn next_pending_run(&self, campaign_id: &str, backend: &str) -> StoreResult<Option<Run>> {
        let (campaign_id, backend) = (campaign_id.to_string(), backend.to_string());
        self.pool
            .call(move |db| runs::next_pending_run(db, &campaign_id, &backend))
    }

    fn transition_run(
        &self,
        id: &str,
        from: &[RunState],
        to: RunState,
        update: &RunUpdate,
    ) -> StoreResult<Option<Transitioned>> {
        let (id, from, update) = (id.to_string(), from.to_vec(), update.clone());
        self.pool
            .call(move |db| runs::transition_run(db, &id, &from, to, &update))
    }

    fn power_series(
        &self,
        run_id: &str,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredPowerSample>> {
        let (run_id, device) = (run_id.to_string(), device.map(str::to_string));
        self.pool
            .call(move |db| runs::power_series(db, &run_id, device.as_deref(), after, limit))
    }

    fn transition_all(
        &self,
        campaign_id: &str,
        from: &[RunState],
        to: RunState,
    ) -> StoreResult<usize> {
        let (campaign_id, from) = (campaign_id.to_string(), from.to_vec());
        self.pool
            .call(move |db| runs::transition_all(db, &campaign_id, &from, to))
    }

    fn upsert_host(&self, host: &HostRecord) -> StoreResult<()> {
        let host = host.clone();
        self.pool.call(move |db| hosts::upsert_host(db, &host))
    }

    fn delete_host(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_string();
        self.pool.call(move |db| hosts::delete_host(db, &name))
    }

    fn hosts(&self) -> StoreResult<Vec<HostRecord>> {
        self.pool.call(hosts::hosts)
    }

    fn set_placement(&self, campaign_id: &str, placement: &Placement) -> StoreResult<()> {
        let (campaign_id, placement) = (campaign_id.to_string(), placement.clone());
        self.pool
            .call(move |db| hosts::set_placement(db, &campaign_id, &placement))
    }

    fn clear_placement(&self, campaign_id: &str, backend: &str) -> StoreResult<()> {
        let (campaign_id, backend) = (campaign_id.to_string(), backend.to_string());
        self.pool
            .call(move |db| hosts::clear_placement(db, &campaign_id, &backend))
    }

    fn placements(&self, campaign_id: &str) -> StoreResult<Vec<Placement>> {
        let campaign_id = campaign_id.to_string();
        self.pool
            .call(move |db| hosts::placements(db, &campaign_id))
    }
}
