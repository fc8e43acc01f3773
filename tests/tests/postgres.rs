//! The orchestrator on PostgreSQL, end to end through the real binaries: a
//! campaign run with its state in a real PostgreSQL 15 (started by the test,
//! see berth_tests::postgres), the orchestrator killed with SIGKILL mid-run
//! and started again on the same database, and the campaign finished with
//! every run recorded once; two orchestrators on one database, the leader
//! killed mid-run and the follower taking over; and a database it cannot
//! use refused at start with the setting named and the password hidden.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::campaign::{Client, runs_of, submit, wait_ended};
use berth_tests::postgres::require_postgres;
use berth_tests::{Process, bin, free_port, register_local_agent, start_agent, wait_for};

/// How long the campaign may take to get where it is awaited.
const LIMIT: Duration = Duration::from_secs(90);

fn start_orchestrator(dir: &Path, port: u16, url: &str) -> Process {
    berth_tests::start_orchestrator(dir, port, &[&format!("store.url={url}")])
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}

/// 4 configs × 3 cycles; the runs of `n=4` take 1.5 s, the others 0.2 s,
/// and each appends its id to `log` when it finishes.
fn slow_campaign(log: &Path) -> String {
    r#"name: on-postgres
backends: [{name: b, runtime: process}]
grid: {params: {n: [1, 2, 3, 4]}}
cycles: 3
run:
  command:
    - sh
    - -c
    - |
      if [ {{n}} = 4 ]; then sleep 1.5; else sleep 0.2; fi
      echo {{run_id}} >> LOG
      echo '{"n": {{n}}}'
"#
    .replace("LOG", &log.display().to_string())
}

/// Waits until 3 runs succeeded and a run of `n=4` is running; that one.
async fn a_run_in_flight(client: &mut Client, campaign_id: &str) -> Run {
    let deadline = Instant::now() + LIMIT;
    loop {
        let runs = runs_of(client, campaign_id).await;
        let succeeded = runs
            .iter()
            .filter(|r| r.state == RunState::Succeeded as i32)
            .count();
        let running = runs
            .iter()
            .find(|r| r.state == RunState::Running as i32 && r.config == "n=4");
        if let Some(running) = running.filter(|_| succeeded >= 3) {
            return running.clone();
        }
        assert!(Instant::now() < deadline, "no run in flight: {runs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_an_orchestrator_on_postgres_mid_campaign_loses_and_repeats_nothing() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let orchestrator = start_orchestrator(dir.path(), port, &postgres.url());
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    let log = dir.path().join("finished.log");
    let campaign = submit(&mut client, &slow_campaign(&log)).await;
    let in_flight = a_run_in_flight(&mut client, &campaign.id).await;
    orchestrator.kill();

    // On the same database, with no file of its own to resume from.
    let other_dir = tempfile::tempdir().unwrap();
    let _orchestrator = start_orchestrator(other_dir.path(), port, &postgres.url());
    let mut client = connect(port).await;
    assert_every_run_recorded_once(&mut client, &campaign.id, &in_flight, &log).await;
}

/// The campaign succeeded with each of its 12 runs recorded once, the run
/// that was in flight at the kill adopted (not run again), and each run
/// finished once on the host (`log`).
async fn assert_every_run_recorded_once(
    client: &mut Client,
    campaign_id: &str,
    in_flight: &Run,
    log: &Path,
) {
    let done = wait_ended(client, campaign_id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    let counts = done.runs.unwrap();
    assert_eq!((counts.succeeded, counts.total), (12, 12), "{counts:?}");
    let runs = runs_of(client, campaign_id).await;
    let mut per_config_cycle: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for run in &runs {
        *per_config_cycle
            .entry((run.config.clone(), run.cycle))
            .or_default() += 1;
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        assert!(run.result_json.contains("\"n\""), "{run:?}");
    }
    assert_eq!(per_config_cycle.len(), 12, "{per_config_cycle:?}");
    assert!(per_config_cycle.values().all(|n| *n == 1));
    let adopted = runs.iter().find(|r| r.id == in_flight.id).unwrap();
    assert_eq!(
        adopted.attempts, 1,
        "the run in flight at the kill was adopted, not run again: {adopted:?}"
    );
    let finished = std::fs::read_to_string(log).unwrap();
    let mut lines: Vec<&str> = finished.lines().collect();
    lines.sort_unstable();
    let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(lines, ids, "every run finished on the host exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_leader_of_two_orchestrators_the_follower_takes_over_within_seconds() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let (leader_port, follower_port) = (free_port(), free_port());
    let leader = start_orchestrator(dir.path(), leader_port, &postgres.url());
    let mut client = connect(leader_port).await;
    let follower_dir = tempfile::tempdir().unwrap();
    let _follower = start_orchestrator(follower_dir.path(), follower_port, &postgres.url());
    register_local_agent(&mut client, &socket).await;
    let log = dir.path().join("finished.log");
    let campaign = submit(&mut client, &slow_campaign(&log)).await;
    let in_flight = a_run_in_flight(&mut client, &campaign.id).await;
    assert!(
        !answers(follower_port).await,
        "a follower listens only once it leads"
    );
    leader.kill();
    let killed_at = Instant::now();

    let mut client = connect(follower_port).await;
    let failover = killed_at.elapsed();
    eprintln!("failover: the follower answered {failover:?} after the leader's kill -9");
    assert!(
        failover < Duration::from_secs(6),
        "took over in {failover:?}"
    );
    assert_every_run_recorded_once(&mut client, &campaign.id, &in_flight, &log).await;

    // The old leader started again follows: it does not listen.
    let _old_leader = start_orchestrator(dir.path(), leader_port, &postgres.url());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !answers(leader_port).await,
        "the old leader follows the new one"
    );
}

/// Whether an orchestrator answers on `port` now.
async fn answers(port: u16) -> bool {
    berth_server::client::connect(
        &format!("http://127.0.0.1:{port}"),
        "",
        Duration::from_millis(500),
    )
    .await
    .is_ok()
}

/// Starts the orchestrator on `url`; what it printed when it exited (it
/// must exit: the database is not one it can use).
fn refused_start(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("store.url={url}");
    let path = format!("store.path={}", dir.path().join("state.db").display());
    let listen = format!("127.0.0.1:{}", free_port());
    let output = Command::new(bin("berth-orchestrator"))
        .args(["--listen", &listen, "--http-listen", ""])
        .args(["--set", &store, "--set", &path])
        .stdin(Stdio::null())
        .output()
        .expect("run berth-orchestrator");
    assert!(!output.status.success(), "started on {url}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_orchestrator_refuses_a_database_it_cannot_use_naming_store_url() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let secret = "wrong-password-7c1d";
    let wrong_password = refused_start(&postgres.url_with_password(secret));
    assert!(
        wrong_password.contains("store.url postgres://berth:***@127.0.0.1:")
            && wrong_password.contains("password authentication failed"),
        "{wrong_password}"
    );
    let port = postgres.port();
    drop(postgres);
    let gone = refused_start(&format!(
        "postgres://berth:{secret}@127.0.0.1:{port}/postgres"
    ));
    assert!(
        gone.contains("store.url postgres://berth:***@127.0.0.1:"),
        "{gone}"
    );
    for output in [wrong_password, gone] {
        assert!(!output.contains(secret), "the password shown: {output}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_restarted_mid_campaign_the_orchestrator_reconnects_and_continues() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port, &postgres.url());
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    let log = dir.path().join("finished.log");
    let campaign = submit(&mut client, &slow_campaign(&log)).await;
    let in_flight = a_run_in_flight(&mut client, &campaign.id).await;
    // A fast shutdown ends every session; back within the leader lease.
    postgres.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.start_server().unwrap();
    assert_every_run_recorded_once(&mut client, &campaign.id, &in_flight, &log).await;
}
