//! One store test suite, two backends: every test here runs on a SQLite
//! file (`on_sqlite::…`) and on a real PostgreSQL 15 (`on_postgres::…`,
//! started per test by `berth_tests::postgres`; skipped loudly when it is
//! missing, a failure under CI=true). What only one backend has (SQLite's
//! columns added on open, PostgreSQL's URL and schema version) is tested
//! beside it.

use std::collections::BTreeMap;

use RunState::{Pending, Running, Succeeded};
use berth_proto::agent::v1::ExecAccounting;
use berth_proto::orchestrator::v1::{
    Campaign, CampaignOutcome, CampaignState, DeploymentState, ReplicaState, Run, RunEnergy,
    RunPowerSample, RunState,
};

use super::deployments::{DeploymentRecord, Inserted, ReplicaRecord};
use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{MeasuredRuns, PowerSeries, RunPair, RunUpdate, Store};

/// Where a test's state lives; `open` opens a store on it, again after a
/// "restart".
pub(crate) trait Backend {
    fn open(&self) -> Box<dyn Store>;
}

pub(crate) struct Sqlite(pub tempfile::TempDir);

impl Sqlite {
    pub(crate) fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    pub(crate) fn path(&self) -> std::path::PathBuf {
        self.0.path().join("state.db")
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Box<dyn Store> {
        Box::new(SqliteStore::open(&self.path()).unwrap())
    }
}

pub(crate) struct Postgres(pub berth_tests::postgres::Postgres);

impl Postgres {
    /// None when PostgreSQL is missing (the test returns: skipped, or
    /// failed under CI=true).
    pub(crate) fn start() -> Option<Self> {
        berth_tests::postgres::require_postgres().map(Self)
    }
}

impl Backend for Postgres {
    fn open(&self) -> Box<dyn Store> {
        Box::new(PostgresStore::open(&self.0.url(), 4).unwrap())
    }
}

/// Each test twice: `on_sqlite::name` and `on_postgres::name`.
macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $test() {
                    super::$test(&super::Sqlite::new());
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $test() {
                    let Some(backend) = super::Postgres::start() else {
                        return;
                    };
                    super::$test(&backend);
                }
            )*
        }
    };
}

store_suite!(
    result_is_recorded_once,
    a_transition_raced_from_many_threads_is_applied_once,
    a_transition_returns_what_it_wrote_and_the_counts_after_it,
    unneeded_warmup_runs_are_dropped_and_logs_kept,
    counts_follow_every_change,
    measured_runs_are_counted_per_pair_and_the_outcome_kept_until_cleared,
    power_series_is_written_with_the_transition_only,
    replayed_transition_neither_duplicates_nor_mixes_samples,
    power_series_pages_by_position_and_filters_by_device,
    a_long_power_series_is_stored_whole,
    results_layouts_are_stored_and_filled_later,
    survives_reopen_and_pages,
    hosts_and_placements_are_kept,
    a_live_deployment_name_is_taken_an_ended_one_is_replaced,
    every_change_of_replica_state_or_reason_is_one_transition,
    pending_runs_are_counted_per_backend,
    the_clusters_accounting_is_kept_beside_the_devices_energy,
);

pub(crate) fn campaign(id: &str) -> Campaign {
    Campaign {
        id: id.into(),
        name: "t".into(),
        state: CampaignState::Pending as i32,
        ..Default::default()
    }
}

/// A store on `backend` holding campaign `c1` with `runs`.
fn store_with(backend: &dyn Backend, runs: &[Run]) -> Box<dyn Store> {
    let store = backend.open();
    store
        .insert_campaign(&campaign("c1"), "m", "", runs)
        .unwrap();
    store
}

/// `transition_run` from one state; whether the run moved.
pub(crate) fn moved(
    store: &dyn Store,
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

pub(crate) fn run(id: &str, sequence: u32) -> Run {
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

fn result_is_recorded_once(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0), run("r2", 1)]);
    let store = store.as_ref();
    let done = RunUpdate {
        result_json: Some("{\"x\":1}".into()),
        finished_now: true,
        ..Default::default()
    };
    assert!(moved(store, "r1", Pending, Running, &RunUpdate::default()));
    assert!(moved(store, "r1", Running, Succeeded, &done));
    // A replay of the same outcome (e.g. after a crash) changes nothing.
    let replay = RunUpdate {
        result_json: Some("{\"x\":2}".into()),
        ..Default::default()
    };
    assert!(!moved(store, "r1", Running, Succeeded, &replay));
    assert_eq!(store.run("r1").unwrap().unwrap().result_json, "{\"x\":1}");
    let counts = store.run_counts("c1").unwrap();
    assert_eq!((counts.succeeded, counts.pending, counts.total), (1, 1, 2));
    assert_eq!(store.next_pending_run("c1", "b").unwrap().unwrap().id, "r2");
}

/// Threads (on connections of their own, for PostgreSQL) race to record
/// the same run's result: one does, the others find it moved.
fn a_transition_raced_from_many_threads_is_applied_once(backend: &dyn Backend) {
    const RACERS: usize = 8;
    let store = store_with(backend, &[run("r1", 0)]);
    let store = store.as_ref();
    assert!(moved(store, "r1", Pending, Running, &RunUpdate::default()));
    let barrier = std::sync::Barrier::new(RACERS);
    let wins: usize = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..RACERS)
            .map(|racer| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let done = RunUpdate {
                        result_json: Some(format!("{{\"racer\":{racer}}}")),
                        add_attempt: true,
                        ..Default::default()
                    };
                    barrier.wait();
                    usize::from(moved(store, "r1", Running, Succeeded, &done))
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).sum()
    });
    assert_eq!(wins, 1);
    let run = store.run("r1").unwrap().unwrap();
    assert_eq!(run.attempts, 1, "one update applied: {run:?}");
    let counts = store.run_counts("c1").unwrap();
    assert_eq!((counts.succeeded, counts.running, counts.total), (1, 0, 1));
}

fn a_transition_returns_what_it_wrote_and_the_counts_after_it(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0), run("r2", 1)]);
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

fn unneeded_warmup_runs_are_dropped_and_logs_kept(backend: &dyn Backend) {
    let warmup = |id: &str, sequence| Run {
        warmup: true,
        ..run(id, sequence)
    };
    let store = store_with(
        backend,
        &[
            warmup("w1", 0),
            warmup("w2", 1),
            warmup("w3", 2),
            run("m1", 3),
        ],
    );
    let store = store.as_ref();
    let done = RunUpdate {
        logs_tail: Some("warming up\n".into()),
        ..Default::default()
    };
    moved(store, "w1", Pending, Succeeded, &done);
    let pair = |warmup| RunPair {
        campaign_id: "c1",
        config: "a",
        backend: "b",
        warmup,
    };
    assert_eq!(store.drop_pending_runs(pair(true)).unwrap(), 2);
    let left = store.runs_of_pair(pair(true)).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].logs_tail, "warming up\n");
    assert_eq!(store.next_pending_run("c1", "b").unwrap().unwrap().id, "m1");
    let counts = store.run_counts("c1").unwrap();
    assert_eq!((counts.succeeded, counts.pending, counts.total), (1, 1, 2));
    // Measured runs an answer known early no longer needs go the same way,
    // and only those.
    assert_eq!(store.runs_of_pair(pair(false)).unwrap().len(), 1);
    assert_eq!(store.drop_pending_runs(pair(false)).unwrap(), 1);
    assert_eq!(store.runs_of_pair(pair(true)).unwrap().len(), 1);
    assert_eq!(store.next_pending_run("c1", "b").unwrap(), None);
    let counts = store.run_counts("c1").unwrap();
    assert_eq!((counts.succeeded, counts.pending, counts.total), (1, 0, 1));
}

/// `c1`'s counts: 1 succeeded, 2 cancelled, 0 pending, of 3.
pub(crate) fn assert_counted_after_changes(store: &dyn Store) {
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
}

/// Runs r1–r3 of `c1` moved so that [`assert_counted_after_changes`] holds.
pub(crate) fn change_three_runs(store: &dyn Store) {
    moved(store, "r1", Pending, Running, &RunUpdate::default());
    moved(store, "r1", Running, Succeeded, &RunUpdate::default());
    // Same state again: counted once.
    store
        .transition_run("r2", &[Pending], Pending, &RunUpdate::default())
        .unwrap();
    store
        .transition_all("c1", &[Pending], RunState::Cancelled)
        .unwrap();
}

fn counts_follow_every_change(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0), run("r2", 1), run("r3", 2)]);
    change_three_runs(store.as_ref());
    assert_counted_after_changes(store.as_ref());
    // Another campaign's runs are counted apart.
    store
        .insert_campaign(&campaign("c2"), "m", "", &[run_of("c2", "s1", 0)])
        .unwrap();
    assert_counted_after_changes(store.as_ref());
    assert_eq!(store.run_counts("c2").unwrap().pending, 1);
}

fn run_of(campaign_id: &str, id: &str, sequence: u32) -> Run {
    Run {
        campaign_id: campaign_id.into(),
        ..run(id, sequence)
    }
}

/// The backends' queues, as the queue-depth metric reads them.
fn pending_runs_are_counted_per_backend(backend: &dyn Backend) {
    let on = |id: &str, sequence, backend: &str| Run {
        backend: backend.into(),
        ..run(id, sequence)
    };
    let store = store_with(
        backend,
        &[
            on("a1", 0, "a"),
            on("a2", 1, "a"),
            on("b1", 2, "b"),
            on("a3", 3, "a"),
        ],
    );
    let store = store.as_ref();
    moved(store, "a1", Pending, Running, &RunUpdate::default());
    let expected: BTreeMap<String, u64> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
    assert_eq!(store.pending_runs_by_backend("c1").unwrap(), expected);
    moved(store, "b1", Pending, Running, &RunUpdate::default());
    let expected: BTreeMap<String, u64> = [("a".to_string(), 2)].into();
    assert_eq!(store.pending_runs_by_backend("c1").unwrap(), expected);
    assert!(store.pending_runs_by_backend("nope").unwrap().is_empty());
}

fn measured_runs_are_counted_per_pair_and_the_outcome_kept_until_cleared(backend: &dyn Backend) {
    let at = |id: &str, sequence, config: &str, warmup| Run {
        config: config.into(),
        warmup,
        ..run(id, sequence)
    };
    let store = store_with(
        backend,
        &[
            at("w", 0, "x", true),
            at("x1", 1, "x", false),
            at("y1", 2, "y", false),
            at("x2", 3, "x", false),
        ],
    );
    let store = store.as_ref();
    for id in ["w", "x1"] {
        moved(store, id, Pending, Succeeded, &RunUpdate::default());
    }
    moved(
        store,
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
    assert_eq!(resumed.status_message, "resumed");
    store.set_campaign_message("c1", "waiting").unwrap();
    assert_eq!(
        store.campaign("c1").unwrap().unwrap().status_message,
        "waiting"
    );
}

pub(crate) fn series(devices: &[&str], per_device: u64) -> PowerSeries {
    let samples = (0..per_device)
        .flat_map(|i| {
            devices.iter().map(move |device| RunPowerSample {
                device: (*device).into(),
                time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000 + (i / 200) as i64,
                    nanos: ((i % 200) * 5_000_000) as i32,
                }),
                elapsed: Some(prost_types::Duration {
                    seconds: (i / 200) as i64,
                    nanos: ((i % 200) * 5_000_000) as i32,
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

pub(crate) fn succeeded_with(series: PowerSeries) -> RunUpdate {
    RunUpdate {
        finished_now: true,
        power_series: Some(series),
        ..Default::default()
    }
}

fn power_series_is_written_with_the_transition_only(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0), run("r2", 1)]);
    let store = store.as_ref();
    let stored = series(&["gpu0"], 3);
    let update = succeeded_with(stored.clone());
    // Not in a `from` state: neither the state nor the samples change.
    assert!(!moved(store, "r1", Running, Succeeded, &update));
    assert!(store.power_series("r1", None, None, 10).unwrap().is_empty());
    assert_eq!(store.run("r1").unwrap().unwrap().power_samples, 0);

    assert!(moved(store, "r1", Pending, Succeeded, &update));
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

/// The cluster's record of a run is written with its result and read back
/// apart from the devices' energy (which it is not part of), with or
/// without devices, its figure absent where the cluster had none.
fn the_clusters_accounting_is_kept_beside_the_devices_energy(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0), run("r2", 1), run("r3", 2)]);
    let store = store.as_ref();
    let gpu = RunEnergy {
        device: "rapl:package-0".into(),
        energy_j: Some(151.5),
        method: "counter".into(),
        ..Default::default()
    };
    let slurm = ExecAccounting {
        accounting_id: "12.3".into(),
        consumed_energy_j: Some(150.0),
        note: String::new(),
    };
    let unrecorded = ExecAccounting {
        note: "sacct: Slurm accounting storage is disabled".into(),
        ..Default::default()
    };
    let cases = [
        ("r1", Some(vec![gpu.clone()]), Some(slurm)),
        ("r2", None, Some(unrecorded)),
        ("r3", Some(vec![gpu]), None),
    ];
    for (id, energy, cluster_accounting) in cases.clone() {
        let update = RunUpdate {
            energy,
            cluster_accounting,
            finished_now: true,
            ..Default::default()
        };
        assert!(moved(store, id, Pending, Succeeded, &update));
    }
    for (id, energy, cluster_accounting) in cases {
        let read = store.run(id).unwrap().unwrap();
        assert_eq!(read.energy, energy.unwrap_or_default(), "{id}");
        assert_eq!(read.cluster_accounting, cluster_accounting, "{id}");
    }
}

fn replayed_transition_neither_duplicates_nor_mixes_samples(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0)]);
    let store = store.as_ref();
    let first = series(&["gpu0"], 4);
    let mut replay = series(&["gpu1"], 9);
    replay.truncated = true;
    for update in [succeeded_with(first), succeeded_with(replay)] {
        moved(store, "r1", Pending, Succeeded, &update);
    }
    let read = store.power_series("r1", None, None, 100).unwrap();
    assert_eq!(read.len(), 4);
    assert!(read.iter().all(|(_, s)| s.device == "gpu0"));
    let run = store.run("r1").unwrap().unwrap();
    assert_eq!((run.power_samples, run.power_series_truncated), (4, false));
}

fn power_series_pages_by_position_and_filters_by_device(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0)]);
    let store = store.as_ref();
    let update = succeeded_with(series(&["gpu0", "gpu1"], 5));
    moved(store, "r1", Pending, Succeeded, &update);
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

/// More samples than one batch of inserts: every one stored, in order.
fn a_long_power_series_is_stored_whole(backend: &dyn Backend) {
    let store = store_with(backend, &[run("r1", 0)]);
    let store = store.as_ref();
    let long = series(&["gpu0", "gpu1"], 12_500);
    assert!(moved(
        store,
        "r1",
        Pending,
        Succeeded,
        &succeeded_with(long.clone())
    ));
    let read = store.power_series("r1", None, None, 100_000).unwrap();
    assert_eq!(read.len(), 25_000);
    assert!(read.iter().enumerate().all(|(i, (p, _))| *p == i as u64));
    assert_eq!(read[24_999].1, long.samples[24_999]);
    assert_eq!(store.run("r1").unwrap().unwrap().power_samples, 25_000);
}

fn results_layouts_are_stored_and_filled_later(backend: &dyn Backend) {
    let store = backend.open();
    let old = Campaign {
        manifest_yaml: "name: t".into(),
        ..campaign("c1")
    };
    store.insert_campaign(&old, "m", "", &[]).unwrap();
    let new = Campaign {
        work_metric: "items".into(),
        ..campaign("c2")
    };
    store.insert_campaign(&new, "m", "{}", &[]).unwrap();
    assert_eq!(
        store.campaigns_without_results_layout().unwrap(),
        [("c1".to_string(), "name: t".to_string())]
    );
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

fn survives_reopen_and_pages(backend: &dyn Backend) {
    {
        let store = backend.open();
        let mut first = run("r1", 0);
        first.params = std::collections::HashMap::from([("n".to_string(), "4".to_string())]);
        store
            .insert_campaign(
                &campaign("c1"),
                "m",
                "",
                &[first, run("r2", 1), run("r3", 2)],
            )
            .unwrap();
        store
            .insert_campaign(&campaign("c2"), "m", "", &[])
            .unwrap();
    }
    let store = backend.open();
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
    assert_eq!(store.run("r1").unwrap().unwrap().params["n"], "4");
    assert_eq!(
        store.runs("c1", Some(Pending), None, 1).unwrap()[0].id,
        "r1"
    );
    assert_eq!(store.unfinished_campaigns().unwrap().len(), 2);
}

fn hosts_and_placements_are_kept(backend: &dyn Backend) {
    let store = backend.open();
    let host = super::HostRecord {
        name: "gpu-01".into(),
        address: "http://10.0.0.1:7701".into(),
        token: "secret".into(),
        labels: BTreeMap::from([("gpu".to_string(), "h100".to_string())]),
        power_sampler: String::new(),
    };
    store.upsert_host(&host).unwrap();
    let moved_host = super::HostRecord {
        address: "http://10.0.0.2:7701".into(),
        ..host
    };
    store.upsert_host(&moved_host).unwrap();
    assert_eq!(store.hosts().unwrap(), [moved_host]);
    let placement = super::Placement {
        backend: "b".into(),
        host: "gpu-01".into(),
        workload_id: "w1".into(),
        gpus: vec![0, 3],
    };
    store.set_placement("c1", &placement).unwrap();
    assert_eq!(store.placements("c1").unwrap(), [placement]);
    store.clear_placement("c1", "b").unwrap();
    assert!(store.placements("c1").unwrap().is_empty());
    assert!(store.delete_host("gpu-01").unwrap());
    assert!(!store.delete_host("gpu-01").unwrap());
    assert!(store.hosts().unwrap().is_empty());
}

fn deployment(name: &str) -> DeploymentRecord {
    DeploymentRecord {
        name: name.into(),
        recipe_yaml: "name: web".into(),
        source_name: "web.yaml".into(),
        replicas: 2,
        state: DeploymentState::Pending,
        message: "deployed".into(),
        created_ms: 1,
        stopping: false,
        generation: 1,
        seq: 0,
    }
}

fn a_live_deployment_name_is_taken_an_ended_one_is_replaced(backend: &dyn Backend) {
    let store = backend.open();
    assert_eq!(
        store.insert_deployment(&deployment("web"), false).unwrap(),
        Inserted::Stored
    );
    assert_eq!(
        store.insert_deployment(&deployment("web"), false).unwrap(),
        Inserted::NameTaken
    );
    let mut replica = ReplicaRecord::pending("web", 0, "to be placed");
    replica.ports = BTreeMap::from([("http".into(), 20001)]);
    replica.gpus = vec![1];
    store.put_replica(&replica).unwrap();
    assert_eq!(store.replicas("web").unwrap(), vec![replica]);
    assert!(store.set_deployment_replicas("web", 3).unwrap());
    assert!(store.request_stop("web").unwrap());
    assert!(!store.request_stop("web").unwrap(), "asked once");
    let stored = store.deployment("web").unwrap().unwrap();
    assert_eq!((stored.replicas, stored.stopping), (3, true));
    // Replaced while live: a new generation, the replicas kept.
    store.insert_deployment(&deployment("web"), true).unwrap();
    assert_eq!(store.deployment("web").unwrap().unwrap().generation, 2);
    assert_eq!(store.replicas("web").unwrap().len(), 1);
    store
        .set_deployment_state("web", DeploymentState::Cancelled, "stopped")
        .unwrap();
    assert!(store.live_deployments().unwrap().is_empty());
    assert_eq!(
        store.insert_deployment(&deployment("web"), false).unwrap(),
        Inserted::Stored
    );
    assert!(
        store.replicas("web").unwrap().is_empty(),
        "the ended one's replicas went with it"
    );
    assert_eq!(store.live_deployments().unwrap().len(), 1);
    store.insert_deployment(&deployment("api"), false).unwrap();
    let listed = store.list_deployments(None, 1).unwrap();
    assert_eq!(listed[0].name, "api");
    let older = store.list_deployments(Some(listed[0].seq), 10).unwrap();
    assert_eq!(
        older.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["web"]
    );
}

fn every_change_of_replica_state_or_reason_is_one_transition(backend: &dyn Backend) {
    let store = backend.open();
    store.insert_deployment(&deployment("web"), false).unwrap();
    let mut replica = ReplicaRecord::pending("web", 1, "to be placed");
    store.put_replica(&replica).unwrap();
    store.put_replica(&replica).unwrap();
    replica.state = ReplicaState::Running;
    replica.host = "h1".into();
    replica.reason = "healthy".into();
    store.put_replica(&replica).unwrap();
    let transitions = store.deployment_transitions("web", 10).unwrap();
    let messages: Vec<&str> = transitions.iter().map(|t| t.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "deployed",
            "replica 1: PENDING: to be placed",
            "replica 1 on `h1`: RUNNING: healthy"
        ]
    );
    assert_eq!(transitions[1].replica, Some(1));
    store.delete_replica("web", 1).unwrap();
    assert!(store.replicas("web").unwrap().is_empty());
}

/// Runs per campaign of the transition-rate measurement.
const RATE_RUNS: u32 = 2_000;

/// The store's side of the dispatch rate (docs/benchmarks.md): every run of
/// a campaign of `RATE_RUNS` taken through pending → dispatched → running →
/// succeeded, as the scheduler does, by one thread and by four (each its
/// own quarter); transitions per second on each backend. Ignored: a
/// measurement, run on demand with `-- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: cargo test -p berth-orchestrator --lib transition_rate -- --ignored --nocapture"]
fn transition_rate_on_sqlite_and_postgres() {
    let sqlite = Sqlite::new();
    let mut stores: Vec<(&str, Box<dyn Store>)> = vec![("sqlite", sqlite.open())];
    let postgres = Postgres::start();
    if let Some(postgres) = &postgres {
        stores.push(("postgres", postgres.open()));
        // As an orchestrator runs on it: leading, every write fenced.
        let leading = PostgresStore::open(&postgres.0.url(), 4).unwrap();
        let lease = std::time::Duration::from_secs(600);
        assert!(leading.try_lead("bench", lease).unwrap().is_some());
        stores.push(("postgres, leading (writes fenced)", Box::new(leading)));
    }
    for (index, (name, store)) in stores.into_iter().enumerate() {
        for threads in [1_u32, 4] {
            let campaign_id = format!("rate-{index}-{threads}");
            let runs: Vec<Run> = (0..RATE_RUNS)
                .map(|i| run_of(&campaign_id, &format!("{campaign_id}/{i}"), i))
                .collect();
            let inserted = std::time::Instant::now();
            store
                .insert_campaign(&campaign(&campaign_id), "m", "", &runs)
                .unwrap();
            let insert_s = inserted.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            std::thread::scope(|scope| {
                for share in runs.chunks((RATE_RUNS / threads) as usize) {
                    let store = store.as_ref();
                    scope.spawn(move || {
                        for run in share {
                            dispatch_and_succeed(store, &run.id);
                        }
                    });
                }
            });
            let seconds = started.elapsed().as_secs_f64();
            let counts = store.run_counts(&campaign_id).unwrap();
            assert_eq!(counts.succeeded, u64::from(RATE_RUNS));
            println!(
                "{name}: {RATE_RUNS} runs inserted in {:.0} ms; {threads} thread(s): {:.0} transitions/s, \
                 {:.0} runs/s (3 transitions each)",
                insert_s * 1000.0,
                f64::from(RATE_RUNS * 3) / seconds,
                f64::from(RATE_RUNS) / seconds
            );
        }
    }
}

/// A run's transitions on the dispatch path, with what the scheduler writes.
fn dispatch_and_succeed(store: &dyn Store, id: &str) {
    let dispatch = RunUpdate {
        host: Some("local".into()),
        add_attempt: true,
        started_now: true,
        ..Default::default()
    };
    let done = RunUpdate {
        exit_code: Some(0),
        result_json: Some("{\"x\":1}".into()),
        duration_ms: Some(3),
        finished_now: true,
        logs_tail: Some("{\"x\":1}\n".into()),
        ..Default::default()
    };
    assert!(moved(store, id, Pending, RunState::Dispatched, &dispatch));
    assert!(moved(
        store,
        id,
        RunState::Dispatched,
        Running,
        &RunUpdate::default()
    ));
    assert!(moved(store, id, Running, Succeeded, &done));
}
