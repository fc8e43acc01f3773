//! The orchestrator's state: campaigns, runs, hosts and backend placements.
//! Every state change goes through here before it is acted on. Run
//! transitions are compare-and-set, so replaying one after a crash cannot
//! record a result twice.

mod codec;
pub mod deployments;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;

use std::collections::BTreeMap;

pub use deployments::DeploymentStore;

use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, Run, RunCounts, RunPowerSample, RunState,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Database(String),
    #[error("state store holds a value it cannot read: {0}")]
    Corrupt(String),
    /// The PostgreSQL store failed: `url` is `store.url` with its password
    /// hidden.
    #[error("store.url {url}: {reason}")]
    Postgres { url: String, reason: String },
    /// The database was migrated by a newer orchestrator: this one would
    /// not know its tables.
    #[error(
        "store.url {url}: the database's schema is version {found}, newer than the {supported} this \
         orchestrator knows: run the berth-orchestrator that migrated it (or a newer one), or point \
         store.url at another database"
    )]
    NewerSchema {
        url: String,
        found: i64,
        supported: i64,
    },
    /// This orchestrator led under `term`, and another took the leader
    /// lease over: its writes are refused, so two never schedule at once.
    #[error(
        "store.url {url}: this orchestrator's leader lease (term {term}) was taken over by another \
         orchestrator: its writes are refused"
    )]
    Fenced { url: String, term: i64 },
}

impl StoreError {
    /// Whether the message already names the setting that chose the store
    /// (`store.url`); SQLite's errors are named `store.path` by the caller.
    pub fn names_its_setting(&self) -> bool {
        matches!(
            self,
            Self::Postgres { .. } | Self::NewerSchema { .. } | Self::Fenced { .. }
        )
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Database(error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A host as registered: the token stays here and is never returned by the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    pub address: String,
    pub token: String,
    pub labels: BTreeMap<String, String>,
    /// The host's power sampler address; empty when it has none.
    pub power_sampler: String,
}

/// Where a campaign's backend runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub backend: String,
    pub host: String,
    pub workload_id: String,
    /// GPU indexes assigned to the backend on its host (`gpus: {count: N}`).
    pub gpus: Vec<u32>,
}

/// Fields a run transition may set; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct RunUpdate {
    pub host: Option<String>,
    pub add_attempt: bool,
    pub exit_code: Option<i32>,
    pub result_json: Option<String>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    pub started_now: bool,
    pub finished_now: bool,
    pub energy: Option<Vec<berth_proto::orchestrator::v1::RunEnergy>>,
    pub logs_tail: Option<String>,
    /// The run's power samples, written with the transition (replacing any
    /// stored before) only when it happens.
    pub power_series: Option<PowerSeries>,
    /// What the run's host reported of the settings that decide its energy
    /// figure, when the run started.
    pub provenance: Option<berth_proto::agent::v1::Provenance>,
    /// The cluster's own record of the run (a SLURM step's ConsumedEnergy),
    /// written with the energy records.
    pub cluster_accounting: Option<berth_proto::agent::v1::ExecAccounting>,
}

/// A run transition as it was written: the run with its new state and
/// fields, and its campaign's run counts right after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transitioned {
    pub run: Run,
    pub counts: RunCounts,
}

/// The samples of a run's power session, as many as were kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PowerSeries {
    pub samples: Vec<RunPowerSample>,
    /// True when the session had more samples than these.
    pub truncated: bool,
}

/// The warmup runs, or the measured runs, of one (config, backend).
#[derive(Debug, Clone, Copy)]
pub struct RunPair<'a> {
    pub campaign_id: &'a str,
    pub config: &'a str,
    pub backend: &'a str,
    pub warmup: bool,
}

/// The measured (non-warmup) runs of one (config, backend) and how many of
/// them succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasuredRuns {
    pub config: String,
    pub backend: String,
    pub runs: u64,
    pub succeeded: u64,
}

/// A stored power sample and its position in the run's series, the cursor
/// of the next page.
pub type StoredPowerSample = (u64, RunPowerSample);

/// Campaigns, runs, hosts and placements; and deployments ([`DeploymentStore`]).
pub trait Store: DeploymentStore {
    /// Records a campaign and all its runs at once, with its work metric
    /// (`campaign.work_metric`) and what its results need from its plan
    /// (`results_layout`, kept as given: see `results::ResultsLayout`).
    fn insert_campaign(
        &self,
        campaign: &Campaign,
        source_name: &str,
        results_layout: &str,
        runs: &[Run],
    ) -> StoreResult<()>;
    fn campaign(&self, id: &str) -> StoreResult<Option<Campaign>>;
    /// The results layout stored with the campaign; empty for a campaign
    /// recorded before there was one and not yet given one; `None` for an
    /// unknown campaign.
    fn results_layout(&self, id: &str) -> StoreResult<Option<String>>;
    /// Id and manifest of every campaign without a results layout (recorded
    /// before there was one).
    fn campaigns_without_results_layout(&self) -> StoreResult<Vec<(String, String)>>;
    /// Stores the work metric and results layout of a campaign recorded
    /// without them.
    fn set_results_layout(
        &self,
        id: &str,
        work_metric: &str,
        results_layout: &str,
    ) -> StoreResult<()>;
    /// Newest first; `before` is a cursor from a previous page.
    fn list_campaigns(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<(i64, Campaign)>>;
    /// Campaigns that are pending or running (to resume after a restart).
    fn unfinished_campaigns(&self) -> StoreResult<Vec<Campaign>>;
    /// Sets the state and message; the outcome is cleared (a campaign that
    /// is not ending, or is cancelled, has none).
    fn set_campaign_state(&self, id: &str, state: CampaignState, message: &str) -> StoreResult<()>;
    /// Ends a campaign whose runs were judged: state, outcome and message at once.
    fn finish_campaign(
        &self,
        id: &str,
        state: CampaignState,
        outcome: CampaignOutcome,
        message: &str,
    ) -> StoreResult<()>;
    fn set_campaign_message(&self, id: &str, message: &str) -> StoreResult<()>;
    fn run_counts(&self, campaign_id: &str) -> StoreResult<RunCounts>;
    /// The campaign's pending runs per backend (its backends' queues), by
    /// backend name. This default pages through the pending runs; a store
    /// that can count them in one query does.
    fn pending_runs_by_backend(&self, campaign_id: &str) -> StoreResult<BTreeMap<String, u64>> {
        let mut queues = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.runs(campaign_id, Some(RunState::Pending), after, 10_000)?;
            let Some(last) = page.last() else {
                return Ok(queues);
            };
            after = Some(last.sequence);
            for run in &page {
                *queues.entry(run.backend.clone()).or_default() += 1;
            }
        }
    }
    /// Runs by sequence after `after_sequence`, optionally of one state.
    fn runs(
        &self,
        campaign_id: &str,
        state: Option<RunState>,
        after_sequence: Option<u32>,
        limit: usize,
    ) -> StoreResult<Vec<Run>>;
    fn run(&self, id: &str) -> StoreResult<Option<Run>>;
    /// Per (config, backend), in the order of their first run: the measured
    /// runs and how many succeeded.
    fn measured_runs(&self, campaign_id: &str) -> StoreResult<Vec<MeasuredRuns>>;
    /// The warmup runs (`warmup`) or measured runs of one (config,
    /// backend), by sequence.
    fn runs_of_pair(&self, pair: RunPair<'_>) -> StoreResult<Vec<Run>>;
    /// Removes the pending warmup runs (`warmup`) or measured runs of one
    /// (config, backend) that a stable warmup, or an answer known, no
    /// longer needs; returns how many.
    fn drop_pending_runs(&self, pair: RunPair<'_>) -> StoreResult<usize>;
    /// The first pending run of a backend, by sequence.
    fn next_pending_run(&self, campaign_id: &str, backend: &str) -> StoreResult<Option<Run>>;
    /// Moves a run to `to` if its state is one of `from`; `None` if it was
    /// not. The state and everything in `update` (its power series included)
    /// are written in one transaction: all of them or none. What was written
    /// comes back, read in that same transaction: the run as it now is and
    /// its campaign's counts, for the caller to act on and publish without
    /// reading them again.
    fn transition_run(
        &self,
        id: &str,
        from: &[RunState],
        to: RunState,
        update: &RunUpdate,
    ) -> StoreResult<Option<Transitioned>>;
    /// A run's stored power samples in order, after position `after`,
    /// optionally of one device; empty when it has none.
    fn power_series(
        &self,
        run_id: &str,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredPowerSample>>;
    /// Moves every run of the campaign in one of `from` states to `to`.
    fn transition_all(
        &self,
        campaign_id: &str,
        from: &[RunState],
        to: RunState,
    ) -> StoreResult<usize>;
    fn upsert_host(&self, host: &HostRecord) -> StoreResult<()>;
    fn delete_host(&self, name: &str) -> StoreResult<bool>;
    fn hosts(&self) -> StoreResult<Vec<HostRecord>>;
    fn set_placement(&self, campaign_id: &str, placement: &Placement) -> StoreResult<()>;
    fn clear_placement(&self, campaign_id: &str, backend: &str) -> StoreResult<()>;
    fn placements(&self, campaign_id: &str) -> StoreResult<Vec<Placement>>;
}

pub fn is_terminal(state: RunState) -> bool {
    matches!(
        state,
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

pub fn campaign_is_terminal(state: CampaignState) -> bool {
    matches!(
        state,
        CampaignState::Succeeded | CampaignState::Failed | CampaignState::Cancelled
    )
}
