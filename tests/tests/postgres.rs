//! The orchestrator on PostgreSQL, end to end through the real binaries: a
//! campaign run with its state in a real PostgreSQL 15 (started by the test,
//! see berth_tests::postgres), the orchestrator killed with SIGKILL mid-run
//! and started again on the same database, and the campaign finished with
//! every run recorded once; two orchestrators on one database, the follower
//! serving reads and WatchCampaign from the store during the leader's
//! campaign and refusing writes naming the leader, the CLI given both
//! addresses going to the leader, the leader killed mid-run and the
//! follower taking over; a database it cannot use refused at start with
//! the setting named and the password hidden; and a SQLite store's state
//! copied into PostgreSQL (`berth-orchestrator store copy`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::error::has_reason;
use berth_tests::campaign::{
    Client, NOT_LEADER, a_run_in_flight, assert_each_recorded_once, get_campaign, hosts_of, leads,
    results_of, runs_of, slow_campaign, submit, wait_ended,
};
use berth_tests::postgres::require_postgres;
use berth_tests::{
    Process, bin, free_port, register_local_agent, register_measured_host, start_agent,
    start_llm_inference_sampler, wait_for,
};

/// How long the campaign may take to get where it is awaited.
const LIMIT: Duration = Duration::from_secs(90);

fn start_orchestrator(dir: &Path, port: u16, url: &str) -> Process {
    berth_tests::start_orchestrator(dir, port, &[&format!("store.url={url}")])
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}

/// An agent listening on a socket in a new directory: the directory, the
/// socket, the agent.
fn agent_in_tempdir() -> (tempfile::TempDir, PathBuf, Process) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = start_agent(&socket);
    (dir, socket, agent)
}

/// The agent on `socket` registered, the campaign of 12 runs (the runs of
/// `n=4` take 1.5 s, the others 0.2 s; each appends its id to the log in
/// `dir` when it finishes) submitted, and waited on until 3 runs succeeded
/// and a run of `n=4` is running: the campaign, that run, the log.
async fn a_campaign_in_flight(
    client: &mut Client,
    socket: &Path,
    dir: &Path,
) -> (Campaign, Run, PathBuf) {
    register_local_agent(client, socket).await;
    let log = dir.join("finished.log");
    let campaign = submit(client, &slow_campaign("on-postgres", &log, 0.2, 1.5)).await;
    let in_flight = a_run_in_flight(client, &campaign.id, 3, "n=4", LIMIT).await;
    (campaign, in_flight, log)
}

/// An agent and an orchestrator on the database at `url`, with the
/// campaign of [`a_campaign_in_flight`] in flight.
struct InFlight {
    _dir: tempfile::TempDir,
    _agent: Process,
    orchestrator: Process,
    port: u16,
    client: Client,
    campaign: Campaign,
    in_flight: Run,
    log: PathBuf,
}

async fn in_flight_on(url: &str) -> InFlight {
    let (dir, socket, agent) = agent_in_tempdir();
    let port = free_port();
    let orchestrator = start_orchestrator(dir.path(), port, url);
    let mut client = connect(port).await;
    let (campaign, in_flight, log) = a_campaign_in_flight(&mut client, &socket, dir.path()).await;
    InFlight {
        _dir: dir,
        _agent: agent,
        orchestrator,
        port,
        client,
        campaign,
        in_flight,
        log,
    }
}

/// Two orchestrators on the database at `url`: the first (in `dir`) up
/// before the second starts, so that it leads.
struct LeaderAndFollower {
    leader: Process,
    leader_port: u16,
    leader_client: Client,
    _follower: Process,
    _follower_dir: tempfile::TempDir,
    follower_port: u16,
    follower_client: Client,
}

async fn leader_and_follower(dir: &Path, url: &str) -> LeaderAndFollower {
    let (leader_port, follower_port) = (free_port(), free_port());
    let leader = start_orchestrator(dir, leader_port, url);
    let leader_client = connect(leader_port).await;
    let follower_dir = tempfile::tempdir().unwrap();
    let follower = start_orchestrator(follower_dir.path(), follower_port, url);
    let follower_client = connect(follower_port).await;
    LeaderAndFollower {
        leader,
        leader_port,
        leader_client,
        _follower: follower,
        _follower_dir: follower_dir,
        follower_port,
        follower_client,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_an_orchestrator_on_postgres_mid_campaign_loses_and_repeats_nothing() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let InFlight {
        _dir,
        _agent,
        orchestrator,
        port,
        client: _,
        campaign,
        in_flight,
        log,
    } = in_flight_on(&postgres.url()).await;
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
    assert_each_recorded_once(&runs, 12);
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
    let (dir, socket, _agent) = agent_in_tempdir();
    let LeaderAndFollower {
        leader,
        leader_port,
        leader_client: mut client,
        _follower,
        _follower_dir,
        follower_port,
        follower_client: mut follower,
    } = leader_and_follower(dir.path(), &postgres.url()).await;
    let (campaign, in_flight, log) = a_campaign_in_flight(&mut client, &socket, dir.path()).await;
    assert!(
        !leads(&mut follower).await,
        "the second orchestrator follows"
    );
    leader.kill();
    let killed_at = Instant::now();

    let deadline = killed_at + LIMIT;
    while !leads(&mut follower).await {
        assert!(Instant::now() < deadline, "the follower never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed_at.elapsed();
    eprintln!("failover: the follower took writes {failover:?} after the leader's kill -9");
    assert!(
        failover < Duration::from_secs(6),
        "took over in {failover:?}"
    );
    assert_every_run_recorded_once(&mut follower, &campaign.id, &in_flight, &log).await;

    // The old leader started again follows: it serves reads and sends
    // writes to the new leader.
    let _old_leader = start_orchestrator(dir.path(), leader_port, &postgres.url());
    let mut old_leader = connect(leader_port).await;
    assert_eq!(
        get_campaign(&mut old_leader, &campaign.id).await.state,
        CampaignState::Succeeded as i32
    );
    let refused = refused_as_follower(&mut old_leader).await;
    assert!(
        refused.contains(&format!("127.0.0.1:{follower_port}")),
        "{refused}"
    );
}

/// A write sent to a follower: refused UNAVAILABLE as not the leader; its
/// message, which names the leader.
async fn refused_as_follower(client: &mut Client) -> String {
    let status = client
        .cancel_campaign(CancelCampaignRequest { id: "c0".into() })
        .await
        .expect_err("a follower refuses writes");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(has_reason(&status, NOT_LEADER), "{status:?}");
    status.message().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_serves_reads_and_watches_from_the_store_and_refuses_writes_naming_the_leader() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let (dir, socket, _agent) = agent_in_tempdir();
    let orchestrators = leader_and_follower(dir.path(), &postgres.url()).await;
    let (leader_port, mut leader) = (
        orchestrators.leader_port,
        orchestrators.leader_client.clone(),
    );
    let mut follower = orchestrators.follower_client.clone();

    // Writes: refused, naming the leader; nothing done.
    let refused = refused_as_follower(&mut follower).await;
    assert!(
        refused.contains("not the leader") && refused.contains(&format!("127.0.0.1:{leader_port}")),
        "{refused}"
    );
    let registered = follower
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address: format!("unix://{}", socket.display()),
            ..Default::default()
        })
        .await
        .expect_err("a follower refuses RegisterHost");
    assert_eq!(
        registered.code(),
        tonic::Code::Unavailable,
        "{registered:?}"
    );

    register_local_agent(&mut leader, &socket).await;
    let log = dir.path().join("finished.log");
    let campaign = submit(&mut leader, &slow_campaign("on-postgres", &log, 0.2, 1.5)).await;
    let watch_started = Instant::now();
    let mut watch = follower
        .watch_campaign(WatchCampaignRequest {
            id: campaign.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    // Reads during the run, from the follower.
    let in_flight = a_run_in_flight(&mut follower, &campaign.id, 3, "n=4", LIMIT).await;
    assert_eq!(in_flight.campaign_id, campaign.id);
    let listed = follower
        .list_campaigns(ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .campaigns;
    assert!(
        listed
            .iter()
            .any(|c| c.id == campaign.id && c.state == CampaignState::Running as i32),
        "{listed:?}"
    );
    let hosts = hosts_of(&mut follower).await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert!(
        hosts[0]
            .status_message
            .contains("the leader contacts the hosts"),
        "{hosts:?}"
    );

    // The watch on the follower streams the campaign's progress to its end.
    let mut succeeded_seen = Vec::new();
    let mut last = None;
    while let Some(event) = tokio::time::timeout(LIMIT, watch.message())
        .await
        .expect("an event within the limit")
        .unwrap()
    {
        let campaign = event.campaign.unwrap();
        succeeded_seen.push(campaign.runs.unwrap_or_default().succeeded);
        last = Some(campaign);
    }
    let last = last.unwrap();
    eprintln!(
        "the follower's watch: {} events over {:?}",
        succeeded_seen.len(),
        watch_started.elapsed()
    );
    assert_eq!(last.state, CampaignState::Succeeded as i32, "{last:?}");
    assert!(
        succeeded_seen.windows(2).all(|w| w[0] <= w[1]) && succeeded_seen.len() >= 4,
        "progress streamed: {succeeded_seen:?}"
    );
    assert_eq!(succeeded_seen.last(), Some(&12));
    assert_every_run_recorded_once(&mut follower, &campaign.id, &in_flight, &log).await;
    let results = results_of(&mut follower, &campaign.id).await;
    assert_eq!(
        results.campaign.unwrap().state,
        CampaignState::Succeeded as i32
    );

    // A deployment of the leader's, watched on the follower to its end.
    deploy_crashing(&mut leader).await;
    let mut watch = follower
        .watch_deployment(WatchDeploymentRequest {
            name: "crashing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = tokio::time::timeout(LIMIT, watch.message())
        .await
        .expect("an event within the limit")
        .unwrap()
    {
        last = event.deployment;
    }
    let last = last.unwrap();
    assert_eq!(last.state, DeploymentState::Failed as i32, "{last:?}");
    let listed = follower
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deployments;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let stopped = follower
        .stop_deployment(StopDeploymentRequest {
            name: "crashing".into(),
        })
        .await
        .expect_err("a follower refuses StopDeployment");
    assert!(has_reason(&stopped, NOT_LEADER), "{stopped:?}");
}

/// A deployment whose one replica exits at once, restarted once, then
/// failed.
const CRASHING_RECIPE: &str = "name: crashing\nruntime: process\ncommand: [sh, -c, 'exit 3']\n\
                               restart:\n  max_restarts: 1\n  backoff: 100ms\n";

/// Deploys `crashing` ([`CRASHING_RECIPE`]).
async fn deploy_crashing(client: &mut Client) {
    client
        .deploy(DeployRequest {
            recipe_yaml: CRASHING_RECIPE.into(),
            source_name: "crashing.yaml".into(),
            ..Default::default()
        })
        .await
        .expect("Deploy");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_given_a_follower_then_the_leader_submits_and_watches_a_campaign_to_its_end() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let (dir, socket, _agent) = agent_in_tempdir();
    let orchestrators = leader_and_follower(dir.path(), &postgres.url()).await;
    let (leader_port, follower_port) = (orchestrators.leader_port, orchestrators.follower_port);
    let (mut leader, mut follower) = (
        orchestrators.leader_client.clone(),
        orchestrators.follower_client.clone(),
    );
    assert!(!leads(&mut follower).await);
    register_local_agent(&mut leader, &socket).await;
    let manifest = dir.path().join("campaign.yaml");
    let log = dir.path().join("finished.log");
    std::fs::write(&manifest, slow_campaign("on-postgres", &log, 0.2, 1.5)).unwrap();

    let both = format!("http://127.0.0.1:{follower_port},http://127.0.0.1:{leader_port}");
    let output = Command::new(bin("berth"))
        .args(["--orchestrator", &both, "submit", "--watch"])
        .arg(&manifest)
        .stdin(Stdio::null())
        .output()
        .expect("run berth submit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let id = stdout.lines().next().unwrap().trim();
    let done = get_campaign(&mut follower, id).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    assert_eq!(done.runs.unwrap().succeeded, 12);
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
    let mut on = in_flight_on(&postgres.url()).await;
    // A fast shutdown ends every session; back within the leader lease.
    postgres.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.start_server().unwrap();
    assert_every_run_recorded_once(&mut on.client, &on.campaign.id, &on.in_flight, &on.log).await;
}

/// What an orchestrator shows of campaign `id` and of the rest of its
/// state: the campaign, its runs, each run's power series, the hosts (as
/// registered: their status is the heartbeats'), and deployment `name`.
async fn shown_state(
    client: &mut Client,
    id: &str,
    deployment: &str,
) -> (
    Campaign,
    Vec<Run>,
    Vec<Vec<RunPowerSample>>,
    Vec<(String, String, String)>,
    Deployment,
) {
    let campaign = get_campaign(client, id).await;
    let runs = runs_of(client, id).await;
    let mut series = Vec::new();
    for run in &runs {
        let page = client
            .get_run_power_series(GetRunPowerSeriesRequest {
                run_id: run.id.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.next_page_token.is_empty(), "a series of one page");
        series.push(page.samples);
    }
    let hosts = hosts_of(client)
        .await
        .into_iter()
        .map(|h| (h.name, h.address, h.power_sampler))
        .collect();
    let deployment = client
        .get_deployment(GetDeploymentRequest {
            name: deployment.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (campaign, runs, series, hosts, deployment)
}

/// `berth-orchestrator store copy --from <sqlite> --to <url>`: its exit
/// status, stdout and stderr.
fn store_copy(from: &Path, to: &str) -> (bool, String, String) {
    let output = Command::new(bin("berth-orchestrator"))
        .args(["store", "copy", "--from"])
        .arg(from)
        .args(["--to", to])
        .stdin(Stdio::null())
        .output()
        .expect("run berth-orchestrator store copy");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn store_copy_moves_a_sqlite_state_into_an_empty_database_and_refuses_a_full_one() {
    let Some(postgres) = require_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_sampler, sampler_port) = start_llm_inference_sampler(dir.path()).await;
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let sqlite_port = free_port();
    let on_sqlite = berth_tests::start_orchestrator(dir.path(), sqlite_port, &[]);
    let mut client = connect(sqlite_port).await;
    register_measured_host(&mut client, "local", &socket, sampler_port).await;
    let campaign = submit(
        &mut client,
        "name: measured\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: short}, {name: long}]\n\
         cycles: 2\nrun: {command: [sh, -c, 'sleep 0.2; echo ''{\"ok\": 1}''']}\n\
         power: {enabled: true, rate_hz: 200, work_metric: ok}\n",
    )
    .await;
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    deploy_crashing(&mut client).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let (.., deployment) = shown_state(&mut client, &campaign.id, "crashing").await;
        if deployment.state == DeploymentState::Failed as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never failed: {deployment:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = shown_state(&mut client, &campaign.id, "crashing").await;
    assert!(before.2.iter().all(|series| !series.is_empty()));
    let samples: usize = before.2.iter().map(Vec::len).sum();
    on_sqlite.terminate();

    let state = dir.path().join("state.db");
    let (copied, stdout, stderr) = store_copy(&state, &postgres.url());
    assert!(copied, "{stdout}\n{stderr}");
    eprintln!("{stdout}");
    for table in [
        "campaigns: 1 rows".to_string(),
        "runs: 4 rows".to_string(),
        format!("run_power_samples: {samples} rows"),
        "hosts: 1 rows".to_string(),
        "deployments: 1 rows".to_string(),
        "replicas: 1 rows".to_string(),
    ] {
        assert!(stdout.contains(&table), "{table}: {stdout}");
    }
    let (again, _, refused) = store_copy(&state, &postgres.url());
    assert!(
        !again
            && refused.contains("--to postgres://berth:***@127.0.0.1:")
            && refused.contains("already holds 1 rows of table campaigns"),
        "{refused}"
    );

    let pg_dir = tempfile::tempdir().unwrap();
    let pg_port = free_port();
    let _on_postgres = start_orchestrator(pg_dir.path(), pg_port, &postgres.url());
    let mut client = connect(pg_port).await;
    let after = shown_state(&mut client, &campaign.id, "crashing").await;
    assert_eq!(before.0, after.0, "the campaign");
    assert_eq!(before.1, after.1, "its runs");
    assert_eq!(before.2, after.2, "their power series");
    assert_eq!(before.3, after.3, "the hosts");
    assert_eq!(before.4, after.4, "the deployment");
    // Numbers go on after the copied ones.
    let next = submit(
        &mut client,
        &slow_campaign("on-postgres", &dir.path().join("next.log"), 0.2, 1.5),
    )
    .await;
    let listed = client
        .list_campaigns(ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .campaigns;
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [next.id.as_str(), campaign.id.as_str()],
        "newest first"
    );
}
