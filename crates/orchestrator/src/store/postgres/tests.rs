//! What only the PostgreSQL store does: its URL and credentials, its schema
//! version, its connections on threads of their own, and a server that goes
//! away and comes back. Everything both stores do is tested on both by the
//! shared suite (`store::suite`).

use std::time::{Duration, Instant};

use super::*;
use crate::store::suite::{Backend, Postgres, campaign, run};
use crate::store::{RunUpdate, StoreError};
use berth_proto::orchestrator::v1::RunState;

/// A password no message may show.
const SECRET: &str = "not-the-password-1f2e";

#[test]
fn a_database_of_a_newer_schema_is_refused_naming_the_setting_and_both_versions() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let store = PostgresStore::open(&backend.0.url(), 1).unwrap();
    let newer = schema::SUPPORTED + 41;
    store
        .pool
        .call(move |db| {
            db.execute("UPDATE schema_version SET version = $1", &[&newer])?;
            Ok(())
        })
        .unwrap();
    let error = PostgresStore::open(&backend.0.url(), 1)
        .err()
        .expect("a newer schema refused")
        .to_string();
    for expected in [
        "store.url".to_string(),
        format!("version {newer}"),
        format!("the {} this orchestrator knows", schema::SUPPORTED),
        "berth:***@127.0.0.1".to_string(),
    ] {
        assert!(error.contains(&expected), "{error:?} lacks {expected:?}");
    }
    assert!(!error.contains(berth_tests::postgres::PASSWORD), "{error}");
}

#[test]
fn wrong_credentials_a_closed_port_and_a_bad_url_are_named_without_the_password() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let wrong_password = PostgresStore::open(&backend.0.url_with_password(SECRET), 1)
        .err()
        .expect("a wrong password refused")
        .to_string();
    assert!(
        wrong_password.starts_with("store.url postgres://berth:***@127.0.0.1:")
            && wrong_password.contains("password authentication failed"),
        "{wrong_password}"
    );
    let closed = format!(
        "postgres://berth:{SECRET}@127.0.0.1:{}/postgres",
        berth_tests::free_port()
    );
    let refused = PostgresStore::open(&closed, 1)
        .err()
        .expect("nothing listening")
        .to_string();
    assert!(
        refused.contains("store.url") && refused.to_lowercase().contains("refused"),
        "{refused}"
    );
    let not_postgres = PostgresStore::open(&format!("mysql://root:{SECRET}@db/x"), 1)
        .err()
        .expect("another scheme refused")
        .to_string();
    assert!(not_postgres.contains("not a postgres://"), "{not_postgres}");
    for error in [wrong_password, refused, not_postgres] {
        assert!(!error.contains(SECRET), "the password shown: {error}");
    }
}

/// A store on `backend` holding campaign `c1` with its run `r1`, pending.
fn with_campaign_c1(backend: &Postgres) -> Box<dyn Store> {
    let store = backend.open();
    store
        .insert_campaign(&campaign("c1"), "m", "", &[run("r1", 0)])
        .unwrap();
    store
}

/// The trait is called from async code: a call on a current-thread runtime
/// must not start a runtime of its own there (tokio would panic).
#[tokio::test(flavor = "current_thread")]
async fn calls_from_a_current_thread_runtime_block_only_briefly() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let store = with_campaign_c1(&backend);
    assert_eq!(store.run_counts("c1").unwrap().pending, 1);
}

#[test]
fn orchestrators_opening_one_new_database_at_once_migrate_it_once() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let url = backend.0.url();
    std::thread::scope(|scope| {
        let openers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| PostgresStore::open(&url, 1).map(drop)))
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
    });
    let store = PostgresStore::open(&url, 1).unwrap();
    let versions = store
        .pool
        .call(|db| {
            Ok(db
                .query_one("SELECT COUNT(*) FROM schema_version", &[])?
                .get::<_, i64>(0))
        })
        .unwrap();
    assert_eq!(versions, 1);
}

#[test]
fn a_database_gone_is_named_and_one_back_is_reconnected() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let store = with_campaign_c1(&backend);
    backend.0.stop().unwrap();
    let gone = store.campaign("c1").expect_err("no server").to_string();
    assert!(
        gone.starts_with("store.url postgres://berth:***@127.0.0.1:"),
        "{gone}"
    );
    backend.0.start_server().unwrap();
    // Every connection finds its own closed and connects again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while answered < 8 {
        match store.campaign("c1") {
            Ok(found) => {
                assert_eq!(found.unwrap().id, "c1");
                answered += 1;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "never reconnected: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_lease_taken_over_refuses_every_write_of_the_old_term() {
    let Some(backend) = Postgres::start() else {
        return;
    };
    let ttl = Duration::from_millis(500);
    let old = PostgresStore::open(&backend.0.url(), 2).unwrap();
    let new = PostgresStore::open(&backend.0.url(), 2).unwrap();
    assert_eq!(old.try_lead("old", ttl).unwrap(), Some(1));
    assert_eq!(new.try_lead("new", ttl).unwrap(), None, "held, not expired");
    old.insert_campaign(&campaign("c1"), "m", "", &[run("r1", 0), run("r2", 1)])
        .unwrap();
    assert!(old.renew_lead(ttl).unwrap());
    // The old leader goes silent (cut off) past its lease.
    std::thread::sleep(ttl + Duration::from_millis(200));
    assert_eq!(new.try_lead("new", ttl).unwrap(), Some(2));
    assert_eq!(
        new.lease_holder().unwrap(),
        Some(LeaseHolder {
            holder: "new".into(),
            term: 2
        })
    );

    // Back, the old leader's writes are refused, whichever kind...
    let refused = old
        .transition_run(
            "r1",
            &[RunState::Pending],
            RunState::Running,
            &RunUpdate::default(),
        )
        .expect_err("a stale term's transition");
    assert!(
        matches!(refused, StoreError::Fenced { term: 1, .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("term 1"), "{refused}");
    let stale_writes = [
        old.set_campaign_message("c1", "stale").err(),
        old.transition_all("c1", &[RunState::Pending], RunState::Cancelled)
            .err(),
        old.insert_campaign(&campaign("c2"), "m", "", &[]).err(),
        old.set_placement(
            "c1",
            &crate::store::Placement {
                backend: "b".into(),
                host: "h".into(),
                workload_id: "w".into(),
                gpus: vec![],
            },
        )
        .err(),
    ];
    for refused in stale_writes {
        assert!(
            matches!(refused, Some(StoreError::Fenced { .. })),
            "{refused:?}"
        );
    }
    assert!(!old.renew_lead(ttl).unwrap(), "it learns it lost the lease");
    // ...its reads still answer, and nothing it tried was written.
    let stored = old.campaign("c1").unwrap().unwrap();
    assert_eq!(stored.status_message, "");
    assert_eq!(old.run_counts("c1").unwrap().pending, 2);
    assert_eq!(old.campaign("c2").unwrap(), None);

    // The new leader writes; given up, the lease is taken at once.
    assert!(
        new.transition_run(
            "r1",
            &[RunState::Pending],
            RunState::Running,
            &RunUpdate::default()
        )
        .unwrap()
        .is_some()
    );
    new.resign().unwrap();
    assert_eq!(old.try_lead("old again", ttl).unwrap(), Some(3));
}
