//! The orchestrator's figures from DESIGN.md's Performance table, measured
//! through the real release binaries (`berth-orchestrator`, `berth-agent`):
//!
//! 1. dispatch: a campaign of trivial runs (`echo {"x":1}`), submit → all
//!    succeeded, on the process runtime and on docker (busybox imported
//!    through the agent), with 1 and 4 backends on one agent; next to it the
//!    agent's bare exec round trip, which bounds one backend's rate.
//! 2. resume: a campaign of 10,000 recorded runs (most finished, the rest
//!    pending), the orchestrator killed with SIGKILL, then timed from spawn
//!    to gRPC health SERVING and to the campaign's first run event.
//! 3. RSS: the orchestrator with 100 hosts registered, each a real
//!    `berth-agent` process on its own unix socket (no engines), after
//!    several heartbeat rounds.
//!
//! 4. protocol: what measuring costs a run beyond what the manifest asks:
//!    the same trivial runs with no power measurement, with a power session
//!    per run (a replay sampler: its own process, as on a host), and with
//!    `power.protocol` (a fixed 20 ms gap and a rise time) on top; the
//!    per-run time in the steady state, minus the configured gap.
//!
//! No external peer: the targets are DESIGN.md's (≥500 runs/s scheduled,
//! resume < 1 s, RSS < 50 MB) and issue 22's (< 5 ms per measured run).
//!
//! `cargo build --release -p berth-container-agent -p berth-power-sampler`
//! first (their binaries are looked up next to the orchestrator's), then
//! `cargo bench -p berth-orchestrator --bench orchestrator_bench`.
//! Settings: BENCH_ONLY (dispatch,resume,rss,protocol), BENCH_RUNS (process runs per
//! campaign, 2000), BENCH_DOCKER_RUNS (200), BENCH_RESUME_RUNS (10000),
//! BENCH_RESUME_FINISHED (fraction finished before the kill, 0.9),
//! BENCH_HOSTS (100), BENCH_HEARTBEAT (1s), BENCH_REPEATS (3), BENCH_STORES (where
//! dispatch and resume keep the state, each in turn: sqlite, postgres; sqlite).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use support::*;

use berth_orchestrator::store::Store;
use berth_orchestrator::store::postgres::PostgresStore;
use berth_orchestrator::store::sqlite::SqliteStore;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{
    CreateWorkloadRequest, ExecRequest, ImportImageChunk, ImportImageMetadata,
    RemoveWorkloadRequest, WorkloadRef, import_image_chunk,
};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::{AuthChannel, connect};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

type Client = OrchestratorClient<AuthChannel>;
type Agent = ContainerAgentClient<AuthChannel>;

const TRIVIAL_RUN: &str = r#"run: {command: [echo, '{"x":1}']}"#;

fn spawn_orchestrator(dir: &Path, port: u16, heartbeat: &str) -> Proc {
    let store = format!("store.path={}", dir.join("state.db").display());
    spawn_orchestrator_on(&store, port, heartbeat)
}

/// An orchestrator keeping its state where `store` (a `--set`) says.
fn spawn_orchestrator_on(store: &str, port: u16, heartbeat: &str) -> Proc {
    let heartbeat = format!("scheduler.heartbeat_interval={heartbeat}");
    Proc::spawn(
        Path::new(ORCHESTRATOR),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "",
            "--set",
            store,
            "--set",
            &heartbeat,
        ],
        &[],
    )
}

/// A berth-agent on `socket`; `docker` is the engine socket or "off".
fn spawn_agent(dir: &Path, socket: &Path, docker: &str, owner: &str) -> Proc {
    spawn_agent_with_shim(dir, socket, docker, owner, "")
}

/// An agent whose containers run execs through the static exec shim at `exec_shim`.
fn spawn_agent_with_shim(
    dir: &Path,
    socket: &Path,
    docker: &str,
    owner: &str,
    exec_shim: &str,
) -> Proc {
    let state = dir.join(format!("state-{owner}")).display().to_string();
    Proc::spawn(
        &agent_binary(),
        &[
            "--listen",
            &format!("unix://{}", socket.display()),
            "--http-listen",
            "",
        ],
        &[
            ("BERTH_ENGINES__DOCKER", docker),
            ("BERTH_ENGINES__PODMAN", "off"),
            ("BERTH_ENGINES__OWNER", owner),
            ("BERTH_ENGINES__LEFTOVERS", "sweep"),
            ("BERTH_ENGINES__STATE_DIR", &state),
            ("BERTH_ENGINES__EXEC_SHIM", exec_shim),
        ],
    )
}

/// The static exec shim: $BENCH_EXEC_SHIM, or where the documented build puts it.
fn exec_shim_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("BENCH_EXEC_SHIM").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/release/berth-exec-shim")
        },
        PathBuf::from,
    );
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "no static exec shim at {} (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
             -p berth-exec-shim --target x86_64-unknown-linux-gnu)",
            path.display()
        ))
    }
}

/// Where the dispatch and resume benches keep the orchestrator's state:
/// `BENCH_STORES` lists them (`sqlite`, `postgres`), each measured in turn.
enum StateStore {
    Sqlite(PathBuf),
    /// A local PostgreSQL 15 cluster (Debian's; `fsync=off` as SQLite's
    /// `synchronous=NORMAL` skips the sync per commit), started for the bench.
    Postgres(berth_tests::postgres::Postgres),
}

impl StateStore {
    fn all(dir: &Path) -> Vec<Self> {
        let listed: String = setting("BENCH_STORES", "sqlite".to_string());
        listed
            .split(',')
            .map(|name| match name.trim() {
                "sqlite" => Self::Sqlite(dir.join("state.db")),
                "postgres" => Self::Postgres(
                    berth_tests::postgres::Postgres::start()
                        .unwrap_or_else(|e| panic!("BENCH_STORES=postgres: {e}")),
                ),
                other => panic!("BENCH_STORES: `{other}` is neither sqlite nor postgres"),
            })
            .collect()
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The orchestrator's `--set` for this store.
    fn setting(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("store.path={}", path.display()),
            Self::Postgres(cluster) => format!("store.url={}", cluster.url()),
        }
    }

    fn open(&self) -> Box<dyn Store> {
        match self {
            Self::Sqlite(path) => Box::new(SqliteStore::open(path).expect("the SQLite store")),
            Self::Postgres(cluster) => {
                Box::new(PostgresStore::open(&cluster.url(), 1).expect("the PostgreSQL store"))
            }
        }
    }
}

async fn wait_for(address: &str) -> AuthChannel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect(address, "", Duration::from_secs(1)).await {
            Ok(channel) => return channel,
            Err(error) if Instant::now() > deadline => panic!("{address} never answered: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

fn seconds(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) * 1e-9
}

/// A manifest of `backends` backends of one runtime, `per_backend` trivial runs each.
fn manifest(name: &str, backends: usize, per_backend: usize, backend: &str) -> String {
    let list: Vec<String> = (1..=backends)
        .map(|i| format!("  - {{name: b{i}, {backend}}}"))
        .collect();
    format!(
        "name: {name}\nbackends:\n{}\nconfigs: [{{name: a}}]\ncycles: {per_backend}\n{TRIVIAL_RUN}\n",
        list.join("\n")
    )
}

async fn register(client: &mut Client, name: &str, socket: &Path) {
    let host = client
        .register_host(RegisterHostRequest {
            name: name.into(),
            address: format!("unix://{}", socket.display()),
            ..Default::default()
        })
        .await
        .expect("RegisterHost")
        .into_inner();
    assert_eq!(host.status, HostStatus::Ready as i32, "{host:?}");
}

fn ended(campaign: &Campaign) -> bool {
    matches!(
        CampaignState::try_from(campaign.state).unwrap_or_default(),
        CampaignState::Succeeded | CampaignState::Failed | CampaignState::Cancelled
    )
}

async fn all_runs(client: &mut Client, id: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_runs(ListRunsRequest {
                campaign_id: id.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListRuns")
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return runs;
        }
        page_token = page.next_page_token;
    }
}

/// One dispatch figure: submit → every run succeeded.
struct Dispatch {
    runs: usize,
    rate: f64,
    /// Submit → first run started (placement: create + start the backend).
    placement_ms: f64,
    /// First run started → last run finished.
    steady_rate: f64,
    /// Median orchestrator-side run duration (exec round trip as it sees it).
    run_ms: f64,
    /// Median time between one run's end and the next run's start in a backend.
    gap_ms: f64,
}

/// None (and why, printed) when the campaign has not ended within 180 s.
/// `watched`: a WatchCampaign stream (what `berth watch` opens) reads every
/// event meanwhile, each of which carries the campaign's run counts.
async fn dispatch_campaign(
    client: &mut Client,
    manifest_yaml: String,
    watched: bool,
) -> Option<Dispatch> {
    let submitted_wall = SystemTime::now();
    let submitted = Instant::now();
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml,
            ..Default::default()
        })
        .await
        .expect("SubmitCampaign")
        .into_inner();
    let watch = watched.then(|| {
        let mut client = client.clone();
        let id = campaign.id.clone();
        tokio::spawn(async move {
            let mut events = client
                .watch_campaign(WatchCampaignRequest { id })
                .await
                .expect("WatchCampaign")
                .into_inner();
            let mut seen = 0usize;
            while let Ok(Some(_)) = events.message().await {
                seen += 1;
            }
            seen
        })
    });
    let done = loop {
        let campaign = client
            .get_campaign(GetCampaignRequest {
                id: campaign.id.clone(),
            })
            .await
            .expect("GetCampaign")
            .into_inner();
        if ended(&campaign) {
            break campaign;
        }
        if submitted.elapsed() > Duration::from_secs(180) {
            println!(
                "campaign {} has not ended after 180 s ({:?}): {}",
                campaign.id, campaign.runs, campaign.status_message
            );
            let _ = client
                .cancel_campaign(CancelCampaignRequest { id: campaign.id })
                .await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = submitted.elapsed().as_secs_f64();
    if let Some(watch) = watch {
        let seen = tokio::time::timeout(Duration::from_secs(10), watch).await;
        println!(
            "  watcher read {} events",
            seen.map_or("(still reading after 10 s)".into(), |n| n
                .expect("watcher")
                .to_string())
        );
    }
    let counts = done.runs.unwrap_or_default();
    assert_eq!(
        (done.state, counts.succeeded),
        (CampaignState::Succeeded as i32, counts.total),
        "{}",
        done.status_message
    );
    let mut runs = all_runs(client, &campaign.id).await;
    let start = runs
        .iter()
        .filter_map(|r| r.started_at.as_ref().map(seconds))
        .fold(f64::INFINITY, f64::min);
    let end = runs
        .iter()
        .filter_map(|r| r.finished_at.as_ref().map(seconds))
        .fold(0.0, f64::max);
    let submit_s = submitted_wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut durations: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.duration.as_ref())
        .map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) * 1e-6)
        .collect();
    runs.sort_by_key(|r| (r.backend.clone(), r.sequence));
    let mut gaps: Vec<f64> = runs
        .windows(2)
        .filter(|w| w[0].backend == w[1].backend)
        .filter_map(|w| {
            Some((seconds(w[1].started_at.as_ref()?) - seconds(w[0].finished_at.as_ref()?)) * 1e3)
        })
        .collect();
    Some(Dispatch {
        runs: runs.len(),
        rate: runs.len() as f64 / elapsed,
        placement_ms: (start - submit_s) * 1e3,
        steady_rate: runs.len() as f64 / (end - start),
        run_ms: median(&mut durations),
        gap_ms: median(&mut gaps),
    })
}

/// The agent's bare exec round trip (Exec of the trivial command to the end
/// of its stream), sequential, into a workload of `spec`; median ms.
async fn exec_round_trip(agent: &mut Agent, spec: WorkloadSpec, count: usize) -> f64 {
    let name = format!("bench-exec-{}", std::process::id());
    let workload = agent
        .create_workload(CreateWorkloadRequest {
            name: name.clone(),
            spec: Some(spec),
        })
        .await
        .expect("CreateWorkload")
        .into_inner();
    agent
        .start_workload(WorkloadRef {
            id: workload.id.clone(),
        })
        .await
        .expect("StartWorkload");
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let mut stream = agent
            .exec(ExecRequest {
                exec_key: format!("{name}-{i}"),
                workload_id: workload.id.clone(),
                command: vec!["echo".into(), r#"{"x":1}"#.into()],
                ..Default::default()
            })
            .await
            .expect("Exec")
            .into_inner();
        while stream.message().await.expect("exec output").is_some() {}
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let _ = agent
        .remove_workload(RemoveWorkloadRequest {
            id: workload.id,
            force: true,
        })
        .await;
    median(&mut times)
}

fn print_dispatch(label: &str, backends: usize, d: &Dispatch) {
    println!(
        "dispatch {label:<8} {backends} backend(s): {:>5} runs  {:>7.1} runs/s end to end (target ≥500: {})  \
         steady {:.1} runs/s  placement {:.0} ms  run (exec as the orchestrator sees it) p50 {:.2} ms  \
         gap between runs p50 {:.2} ms",
        d.runs,
        d.rate,
        met(d.rate >= 500.0),
        d.steady_rate,
        d.placement_ms,
        d.run_ms,
        d.gap_ms
    );
}

async fn import_busybox(agent: &mut Agent, tar: &Path, reference: &str) -> Result<(), String> {
    let data = std::fs::read(tar).map_err(|e| e.to_string())?;
    let mut chunks = vec![ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Metadata(ImportImageMetadata {
            reference: reference.into(),
            runtime: Runtime::Docker as i32,
            saved_archive: false,
            command: vec!["/bin/sh".into()],
        })),
    }];
    chunks.extend(data.chunks(256 * 1024).map(|c| ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Data(c.to_vec())),
    }));
    agent
        .import_image(tokio_stream::iter(chunks))
        .await
        .map(drop)
        .map_err(|s| s.message().to_string())
}

async fn bench_dispatch() {
    let runs: usize = setting("BENCH_RUNS", 2000);
    let docker_runs: usize = setting("BENCH_DOCKER_RUNS", 200);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let engine = Path::new("/var/run/docker.sock");
    let docker = if engine.exists() {
        "/var/run/docker.sock"
    } else {
        "off"
    };
    let owner = format!("bench{}", std::process::id());
    let _agent_process = spawn_agent(dir.path(), &socket, docker, &owner);
    let mut agent =
        ContainerAgentClient::new(wait_for(&format!("unix://{}", socket.display())).await);
    let process_spec = WorkloadSpec {
        runtime: Runtime::Process as i32,
        ..Default::default()
    };
    let exec_ms = exec_round_trip(&mut agent, process_spec, 200).await;
    println!(
        "bare agent Exec round trip, process runtime, 200 sequential: p50 {exec_ms:.2} ms → at most {:.0} runs/s per backend",
        1e3 / exec_ms
    );
    // The process rows on every store; the docker rows on the last one's
    // orchestrator (the engine bounds them, not the store).
    let mut orchestrator = None;
    let mut client = None;
    for store in StateStore::all(dir.path()) {
        drop(orchestrator.take());
        let port = free_port();
        orchestrator = Some(spawn_orchestrator_on(&store.setting(), port, "5s"));
        let mut on_store =
            OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
        register(&mut on_store, "local", &socket).await;
        // Warm-up: connections, page cache, the store's statements.
        dispatch_campaign(
            &mut on_store,
            manifest("warm", 1, 50, "runtime: process"),
            false,
        )
        .await;
        for (backends, watched) in [(1, false), (4, false), (1, true)] {
            let d = dispatch_campaign(
                &mut on_store,
                manifest("process", backends, runs / backends, "runtime: process"),
                watched,
            )
            .await;
            if let Some(d) = d {
                let label = if watched { "watched" } else { "process" };
                print_dispatch(&format!("{label} ({})", store.name()), backends, &d);
            }
        }
        client = Some((on_store, store));
    }
    let (Some(orchestrator), Some((mut client, _store))) = (orchestrator, client) else {
        panic!("BENCH_STORES lists no store");
    };

    let ready = if docker_runs == 0 {
        Err("BENCH_DOCKER_RUNS=0".to_string())
    } else if docker == "off" {
        Err("no docker socket at /var/run/docker.sock".to_string())
    } else {
        match busybox_tar() {
            Ok(tar) => import_busybox(&mut agent, &tar, &format!("berth-bench-{owner}:bb"))
                .await
                .map_err(|e| format!("importing busybox through the agent: {e}")),
            Err(e) => Err(e),
        }
    };
    match ready {
        Err(reason) => println!("dispatch docker: SKIPPED ({reason})"),
        Ok(()) => {
            let image = format!("berth-bench-{owner}:bb");
            docker_rows(
                &mut client,
                &mut agent,
                ("docker", "local"),
                &image,
                docker_runs,
            )
            .await;
            match exec_shim_binary() {
                Err(reason) => println!("dispatch docker with the exec shim: SKIPPED ({reason})"),
                Ok(shim) => {
                    let socket = dir.path().join("agent-shim.sock");
                    let _shim_agent = spawn_agent_with_shim(
                        dir.path(),
                        &socket,
                        docker,
                        &format!("{owner}-shim"),
                        &shim.display().to_string(),
                    );
                    let mut shim_agent = ContainerAgentClient::new(
                        wait_for(&format!("unix://{}", socket.display())).await,
                    );
                    register(&mut client, "shim", &socket).await;
                    let label = ("docker+shim", "shim");
                    docker_rows(&mut client, &mut shim_agent, label, &image, runs).await;
                }
            }
        }
    }
    let (rss, hwm) = rss_mb(orchestrator.pid());
    println!("orchestrator after the dispatch campaigns: VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB");
}

/// The bare exec round trip into a busybox container of `agent` (host
/// `host`), then dispatch with 1 and with 4 such backends, `runs` in all.
async fn docker_rows(
    client: &mut Client,
    agent: &mut Agent,
    (label, host): (&str, &str),
    image: &str,
    runs: usize,
) {
    let spec = WorkloadSpec {
        runtime: Runtime::Docker as i32,
        image: image.to_string(),
        command: vec!["sleep".into(), "100000".into()],
        ..Default::default()
    };
    let exec_ms = exec_round_trip(agent, spec, 50).await;
    println!(
        "bare agent Exec round trip, {label} busybox, 50 sequential: p50 {exec_ms:.2} ms → at most {:.0} runs/s per backend",
        1e3 / exec_ms
    );
    let backend = format!(
        "runtime: docker, image: '{image}', command: [sleep, '100000'], placement: {{host: {host}}}"
    );
    for backends in [1, 4] {
        let d = dispatch_campaign(
            client,
            manifest(host, backends, runs / backends, &backend),
            false,
        )
        .await;
        match d {
            Some(d) => print_dispatch(label, backends, &d),
            None => break,
        }
    }
}

async fn health_serving(port: u16) -> bool {
    let Ok(channel) = connect(
        &format!("http://127.0.0.1:{port}"),
        "",
        Duration::from_millis(500),
    )
    .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

fn finished(counts: &RunCounts) -> u64 {
    counts.succeeded + counts.failed + counts.cancelled
}

async fn bench_resume() {
    let dir = tempfile::tempdir().unwrap();
    for store in StateStore::all(dir.path()) {
        resume_on(dir.path(), &store).await;
    }
}

async fn resume_on(dir: &Path, store: &StateStore) {
    let total: usize = setting("BENCH_RESUME_RUNS", 10_000);
    let fraction: f64 = setting("BENCH_RESUME_FINISHED", 0.9);
    let repeats: usize = setting("BENCH_REPEATS", 3);
    let name = store.name();
    let socket = dir.join(format!("agent-{name}.sock"));
    let _agent = spawn_agent(dir, &socket, "off", &format!("resume-{name}"));
    wait_for(&format!("unix://{}", socket.display())).await;
    let port = free_port();
    let mut orchestrator = spawn_orchestrator_on(&store.setting(), port, "5s");
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    register(&mut client, "local", &socket).await;
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest("resume", 4, total / 4, "runtime: process"),
            ..Default::default()
        })
        .await
        .expect("SubmitCampaign")
        .into_inner();
    let id = campaign.id;
    let target = (total as f64 * fraction) as u64;
    let filling = Instant::now();
    loop {
        let counts = client
            .get_campaign(GetCampaignRequest { id: id.clone() })
            .await
            .expect("GetCampaign")
            .into_inner()
            .runs
            .unwrap_or_default();
        if finished(&counts) >= target || filling.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, hwm) = rss_mb(orchestrator.pid());
    println!(
        "resume ({name}): {} runs recorded in {:.1} s; orchestrator VmHWM while running them {hwm:.1} MB",
        total,
        filling.elapsed().as_secs_f64()
    );
    orchestrator.kill9();
    drop(client);

    let (mut serving_ms, mut resumed_ms) = (Vec::new(), Vec::new());
    for repeat in 1..=repeats {
        let before = store
            .open()
            .run_counts(&id)
            .expect("reading the store after the kill");
        let spawned = Instant::now();
        let mut orchestrator = spawn_orchestrator_on(&store.setting(), port, "5s");
        while !health_serving(port).await {
            assert!(spawned.elapsed() < Duration::from_secs(60), "never SERVING");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let serving = spawned.elapsed();
        let mut client =
            OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
        let mut events = client
            .watch_campaign(WatchCampaignRequest { id: id.clone() })
            .await
            .expect("WatchCampaign")
            .into_inner();
        let mut already = false;
        let resumed = loop {
            let event = tokio::time::timeout(Duration::from_secs(60), events.message())
                .await
                .expect("no run event within 60 s of the restart")
                .expect("watch")
                .expect("watch ended");
            let now = spawned.elapsed();
            if event.run.is_some() {
                break now;
            }
            // The snapshot already shows runs ended since the kill: dispatch
            // resumed before this watch began; its time is an upper bound.
            if let Some(counts) = event.campaign.and_then(|c| c.runs)
                && finished(&counts) > finished(&before)
            {
                already = true;
                break now;
            }
        };
        let (rss, _) = rss_mb(orchestrator.pid());
        orchestrator.kill9();
        println!(
            "resume {repeat} ({name}): {} of {} runs finished, {} pending at the kill; spawn → health SERVING {:.0} ms, \
             spawn → first run event {:.0} ms{}; VmRSS {rss:.1} MB",
            finished(&before),
            before.total,
            before.pending,
            serving.as_secs_f64() * 1e3,
            resumed.as_secs_f64() * 1e3,
            if already {
                " (upper bound: runs had ended before the watch began)"
            } else {
                ""
            }
        );
        serving_ms.push(serving.as_secs_f64() * 1e3);
        resumed_ms.push(resumed.as_secs_f64() * 1e3);
    }
    let (serving, resumed) = (median(&mut serving_ms), median(&mut resumed_ms));
    println!(
        "resume ({name}) after kill -9 with {total} recorded runs, median of {repeats}: health SERVING {serving:.0} ms, \
         first run event {resumed:.0} ms (target <1000 ms: {})",
        met(resumed < 1000.0)
    );
}

async fn bench_rss() {
    let hosts: usize = setting("BENCH_HOSTS", 100);
    let heartbeat: String = setting("BENCH_HEARTBEAT", "1s".to_string());
    let beat = humantime::parse_duration(&heartbeat).expect("BENCH_HEARTBEAT");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let orchestrator = spawn_orchestrator(dir.path(), port, &heartbeat);
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    let (idle, _) = rss_mb(orchestrator.pid());
    let sockets: Vec<PathBuf> = (0..hosts)
        .map(|i| dir.path().join(format!("a{i}.sock")))
        .collect();
    let agents: Vec<Proc> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| spawn_agent(dir.path(), s, "off", &format!("rss{i}")))
        .collect();
    for socket in &sockets {
        wait_for(&format!("unix://{}", socket.display())).await;
    }
    for (i, socket) in sockets.iter().enumerate() {
        register(&mut client, &format!("host-{i:03}"), socket).await;
    }
    let (registered, _) = rss_mb(orchestrator.pid());
    let rounds = 10;
    tokio::time::sleep(beat * rounds).await;
    let listed = client
        .list_hosts(ListHostsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListHosts")
        .into_inner()
        .hosts;
    let ready = listed
        .iter()
        .filter(|h| h.status == HostStatus::Ready as i32)
        .count();
    let (rss, hwm) = rss_mb(orchestrator.pid());
    let mut agent_rss: Vec<f64> = agents.iter().map(|a| rss_mb(a.pid()).0).collect();
    println!(
        "rss: orchestrator idle with no hosts {idle:.1} MB; right after registering {hosts} hosts {registered:.1} MB"
    );
    println!(
        "rss with {hosts} hosts registered ({ready} READY; real berth-agent processes, engines off, one unix socket each), \
         after {rounds} heartbeat rounds at {heartbeat}: VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB (target <50 MB: {}); \
         one agent's VmRSS p50 {:.1} MB",
        met(hwm < 50.0),
        median(&mut agent_rss)
    );
}

/// Issue 22's bound: what measuring adds to a run beyond its configured
/// gap, per measured run.
const PROTOCOL_OVERHEAD_TARGET_MS: f64 = 5.0;

async fn bench_protocol() {
    let runs: usize = setting("BENCH_PROTOCOL_RUNS", 300);
    let repeats: usize = setting("BENCH_REPEATS", 3);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = spawn_agent(
        dir.path(),
        &socket,
        "off",
        &format!("bench{}", std::process::id()),
    );
    let sampler_port = free_port();
    let trace =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/power/llm-inference.csv");
    let sampler_config = dir.path().join("power.toml");
    std::fs::write(
        &sampler_config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{sampler_port}\"\nhttp_listen = \"\"\n\n[sampler]\nnvml = false\npowercap_root = \"\"\nreplay_traces = [\"{}\"]\n",
            trace.display()
        ),
    )
    .unwrap();
    let _sampler = Proc::spawn(
        &sibling_binary("berth-power-sampler", "berth-power-sampler"),
        &["--config", sampler_config.to_str().unwrap()],
        &[],
    );
    wait_for(&format!("http://127.0.0.1:{sampler_port}")).await;
    let port = free_port();
    let _orchestrator = spawn_orchestrator(dir.path(), port, "5s");
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    wait_for(&format!("unix://{}", socket.display())).await;
    client
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address: format!("unix://{}", socket.display()),
            power_sampler: format!("http://127.0.0.1:{sampler_port}"),
            ..Default::default()
        })
        .await
        .expect("RegisterHost");
    const GAP_MS: f64 = 20.0;
    let variants = [
        ("no power measurement", "power: {enabled: false}", 0.0),
        (
            "a power session per run",
            "power: {enabled: true, rate_hz: 100}",
            0.0,
        ),
        (
            "a power session + protocol (gap 20 ms, rise_time 10 ms)",
            "power: {enabled: true, rate_hz: 100, protocol: {gap: {min: 20ms, max: 20ms}, rise_time: 10ms}}",
            GAP_MS,
        ),
    ];
    let mut per_run: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    // Where a run's time goes: between one run's end and the next one's
    // start (the gap, what is prepared after it) or from start to end (the
    // power session, the exec).
    let mut between: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for repeat in 0..repeats {
        for (i, (_, power, _)) in variants.iter().enumerate() {
            let manifest = format!(
                "name: protocol-{repeat}-{i}\nbackends: [{{name: b, runtime: process}}]\nconfigs: [{{name: a}}]\n\
                 cycles: {runs}\n{TRIVIAL_RUN}\n{power}\n"
            );
            if let Some(d) = dispatch_campaign(&mut client, manifest, false).await {
                per_run[i].push(1e3 / d.steady_rate);
                between[i].push(d.gap_ms);
            }
        }
    }
    let mut medians: Vec<f64> = per_run.iter_mut().map(|v| median(v)).collect();
    for (i, ((label, _, gap), ms)) in variants.iter().zip(&mut medians).enumerate() {
        println!(
            "protocol: {runs} runs, {label}: {ms:.2} ms per run (median of {repeats}), {gap} ms of it configured; \
             p50 {:.2} ms from a run's end to the next one's start",
            median(&mut between[i])
        );
    }
    let session = medians[1] - medians[0];
    let protocol = medians[2] - GAP_MS - medians[0];
    println!(
        "protocol: measuring adds {session:.2} ms per run (a power session), {protocol:.2} ms with the protocol beyond its gap (target < {PROTOCOL_OVERHEAD_TARGET_MS} ms: {})",
        met(protocol < PROTOCOL_OVERHEAD_TARGET_MS)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "orchestrator bench: {cores} cores, load average {} at start",
        load_average()
    );
    runtime.block_on(async {
        if wanted("dispatch") {
            bench_dispatch().await;
        }
        if wanted("resume") {
            bench_resume().await;
        }
        if wanted("rss") {
            bench_rss().await;
        }
        if wanted("protocol") {
            bench_protocol().await;
        }
    });
    println!("load average {} at the end", load_average());
}
