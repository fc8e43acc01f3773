//! What only the SQLite store does: a store from before a table or a
//! column gains it on open. Everything both stores do is tested on both by
//! the shared suite (`store::suite`).

use super::*;
use crate::store::suite::{
    Backend, Sqlite, assert_counted_after_changes, campaign, change_three_runs, moved, run, series,
    succeeded_with,
};
use RunState::{Pending, Succeeded};

#[test]
fn a_store_from_before_the_counts_table_is_counted_on_open() {
    let backend = Sqlite::new();
    {
        let store = SqliteStore::open(&backend.path()).unwrap();
        store
            .insert_campaign(
                &campaign("c1"),
                "m",
                "",
                &[run("r1", 0), run("r2", 1), run("r3", 2)],
            )
            .unwrap();
        change_three_runs(&store);
        store
            .db()
            .execute_batch(
                "DROP TRIGGER run_counted; DROP TRIGGER run_recounted; DROP TRIGGER run_uncounted; \
                 DROP TABLE run_state_counts;",
            )
            .unwrap();
    }
    assert_counted_after_changes(backend.open().as_ref());
}

#[test]
fn a_database_from_before_power_series_gains_them_on_open() {
    let backend = Sqlite::new();
    {
        let store = SqliteStore::open(&backend.path()).unwrap();
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
    let store = backend.open();
    assert_eq!(store.run("r1").unwrap().unwrap().power_samples, 0);
    let update = succeeded_with(series(&["gpu0"], 2));
    assert!(moved(store.as_ref(), "r1", Pending, Succeeded, &update));
    assert_eq!(store.power_series("r1", None, None, 10).unwrap().len(), 2);
}

#[test]
fn a_database_from_before_results_layouts_gains_them_on_open() {
    let backend = Sqlite::new();
    {
        let store = SqliteStore::open(&backend.path()).unwrap();
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
    let store = backend.open();
    assert_eq!(
        store.campaigns_without_results_layout().unwrap(),
        [("c1".to_string(), "name: t".to_string())]
    );
    assert_eq!(store.campaign("c1").unwrap().unwrap().work_metric, "");
    assert_eq!(store.results_layout("c1").unwrap().as_deref(), Some(""));
}
