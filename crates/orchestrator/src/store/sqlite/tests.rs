//! The store on a file: transitions, counts, power series, and stores from
//! before each column gaining it on open.

use berth_proto::orchestrator::v1::RunPowerSample;

use super::*;
use crate::store::PowerSeries;
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
fn moved(store: &SqliteStore, id: &str, from: RunState, to: RunState, update: &RunUpdate) -> bool {
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
