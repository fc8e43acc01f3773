//! Deployments (issue 17), measured through the real release binaries
//! (`berth-orchestrator`, `berth-agent` on a unix socket):
//!
//! 1. deploy: Deploy → every replica Running (GetDeployment polled every
//!    20 ms) for 1 and 50 process replicas (busybox httpd, TCP health check
//!    every 200 ms) and for 10 docker replicas (busybox imported through the
//!    agent, httpd in the container, HTTP health check every 200 ms); next
//!    to the docker figure the peer, `docker-compose up -d` of 10 services
//!    of the same image running the same httpd, timed until all 10 answer
//!    HTTP on their published ports.
//! 2. restart: one process replica (TCP health check every 1 s, reconcile
//!    interval 1 s) killed with SIGKILL, timed until GetDeployment shows it
//!    Running again with its restart counted and its port answers; with the
//!    recipe's default restart backoff (500 ms) and with 100 ms. The kills
//!    are spread over one reconcile interval after the pass that saw the
//!    replica Running (100 ms + k/BENCH_REPEATS s).
//! 3. RSS: the orchestrator's VmRSS before a deploy and with 1,000 process
//!    replicas (`sleep`, no ports, no health check) Running.
//!
//! `cargo build --release -p berth-container-agent -p berth-orchestrator`
//! first (the agent binary is looked up next to the orchestrator's), then
//! `cargo bench -p berth-orchestrator --bench deployment_bench`.
//! Settings: BENCH_ONLY (deploy,restart,rss), BENCH_REPEATS (3),
//! BENCH_RSS_REPLICAS (1000), BENCH_RSS_DEPLOYMENTS (1: the replicas are
//! split evenly among that many deployments), BENCH_RSS_RECONCILE (the
//! orchestrator's reconcile interval in the RSS part, 5s: the default).
//! The docker parts are skipped, loudly, without /var/run/docker.sock.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{ImportImageChunk, ImportImageMetadata, import_image_chunk};
use berth_proto::common::v1::Runtime;
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::{AuthChannel, connect};

type Client = OrchestratorClient<AuthChannel>;
type Agent = ContainerAgentClient<AuthChannel>;

const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Host ports of replicas: below the kernel's ephemeral range and apart from
/// the default range (20000-29999) that other orchestrators on the machine
/// (tests running meanwhile) allocate from.
const PORT_RANGE: [&str; 4] = [
    "--set",
    "deployments.port_range_start=30000",
    "--set",
    "deployments.port_range_end=32700",
];

/// An orchestrator on `port` with its store in `dir`, and `settings`
/// (`section.key=value`) besides the replicas' port range.
fn spawn_orchestrator(dir: &Path, port: u16, settings: &[String]) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let store = format!("store.path={}", dir.join("state.db").display());
    let mut args = vec!["--listen", &listen, "--http-listen", "", "--set", &store];
    args.extend(PORT_RANGE);
    for setting in settings {
        args.extend(["--set", setting.as_str()]);
    }
    Proc::spawn(Path::new(ORCHESTRATOR), &args, &[])
}

/// A berth-agent on `socket`; `docker` is the engine socket or "off".
fn spawn_agent(dir: &Path, socket: &Path, docker: &str, owner: &str) -> Proc {
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
        ],
    )
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The values as "a, b, c" ms.
fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pids of processes whose command line contains `needle` (NUL between
/// arguments): the replicas this bench started, however they were started.
fn processes_with(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// Kills what a failed run left of this bench's replicas (found by `needle`).
fn kill_leftovers(needle: &str, what: &str) {
    let left = processes_with(needle);
    if !left.is_empty() {
        println!("  {} {what} process(es) left behind: killed", left.len());
        for pid in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn register(client: &mut Client, socket: &Path) {
    let host = client
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address: format!("unix://{}", socket.display()),
            ..Default::default()
        })
        .await
        .expect("RegisterHost")
        .into_inner();
    assert_eq!(host.status, HostStatus::Ready as i32, "{host:?}");
}

async fn deploy(client: &mut Client, name: &str, recipe: String) -> Result<(), String> {
    client
        .deploy(DeployRequest {
            recipe_yaml: recipe,
            source_name: format!("{name}.yaml"),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|s| format!("Deploy {name}: {:?}: {}", s.code(), s.message()))
}

async fn get(client: &mut Client, name: &str) -> Option<Deployment> {
    client
        .get_deployment(GetDeploymentRequest { name: name.into() })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

fn state(deployment: &Deployment) -> DeploymentState {
    DeploymentState::try_from(deployment.state).unwrap_or_default()
}

fn replica_state(replica: &Replica) -> ReplicaState {
    ReplicaState::try_from(replica.state).unwrap_or_default()
}

fn all_running(deployment: &Deployment, replicas: usize) -> bool {
    state(deployment) == DeploymentState::Running
        && deployment.replica_status.len() == replicas
        && deployment.ready_replicas as usize == replicas
}

/// "N Running, M Starting, ..." of a deployment's replicas, and its message.
fn summary(deployment: &Deployment) -> String {
    let mut counts: Vec<(ReplicaState, usize)> = Vec::new();
    for replica in &deployment.replica_status {
        let state = replica_state(replica);
        match counts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str_name()))
        .collect();
    format!(
        "{} [{}]: {}",
        state(deployment).as_str_name(),
        counts.join(", "),
        deployment.status_message
    )
}

/// Polls GetDeployment every `poll` until `done`; None (and why, printed)
/// when the deployment ended otherwise or `limit` passed.
async fn wait_until(
    client: &mut Client,
    name: &str,
    (poll, limit): (Duration, Duration),
    what: &str,
    done: impl Fn(&Deployment) -> bool,
) -> Option<Deployment> {
    let started = Instant::now();
    loop {
        let deployment = get(client, name).await;
        if let Some(deployment) = &deployment {
            if done(deployment) {
                return deployment.clone().into();
            }
            let ended = matches!(
                state(deployment),
                DeploymentState::Failed | DeploymentState::Cancelled | DeploymentState::Completed
            );
            if ended || started.elapsed() > limit {
                println!(
                    "  {name} never became {what} ({:.1} s): {}",
                    started.elapsed().as_secs_f64(),
                    summary(deployment)
                );
                return None;
            }
        } else if started.elapsed() > limit {
            println!("  {name}: GetDeployment kept failing");
            return None;
        }
        tokio::time::sleep(poll).await;
    }
}

/// StopDeployment, then until Cancelled: the time it took, or None.
async fn stop(client: &mut Client, name: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    if let Err(status) = client
        .stop_deployment(StopDeploymentRequest { name: name.into() })
        .await
    {
        println!("  StopDeployment {name}: {status:?}");
        return None;
    }
    let poll = (Duration::from_millis(50), limit);
    wait_until(client, name, poll, "cancelled", |d| {
        state(d) == DeploymentState::Cancelled
    })
    .await
    .map(|_| started.elapsed())
}

/// GET `path` on `address` (HTTP/1.0): the status line, or None.
async fn http_status(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        let line = text.lines().next()?.to_string();
        line.starts_with("HTTP/").then_some(line)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

async fn answers_200(address: &str, path: &str) -> bool {
    http_status(address, path)
        .await
        .is_some_and(|line| line.contains(" 200 "))
}

/// Polls every 20 ms until every address answers 200 on `path`: the time
/// from `since`, or None after `limit`.
async fn until_all_answer(
    addresses: &[String],
    path: &str,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut waiting: Vec<&String> = addresses.iter().collect();
    loop {
        let mut still = Vec::new();
        for address in waiting {
            if !answers_200(address, path).await {
                still.push(address);
            }
        }
        if still.is_empty() {
            return Some(since.elapsed());
        }
        if since.elapsed() > limit {
            println!(
                "  {} of {} endpoints never answered 200 on {path}: {still:?}",
                still.len(),
                addresses.len()
            );
            return None;
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoints(deployment: &Deployment) -> Vec<String> {
    deployment
        .replica_status
        .iter()
        .filter_map(|r| r.endpoints.first().map(|e| e.address.clone()))
        .collect()
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

/// `n` busybox httpd host processes serving `www`, TCP health check every 200 ms.
fn process_recipe(name: &str, www: &Path, n: usize) -> String {
    format!(
        r#"name: {name}
runtime: process
command: [busybox, httpd, -f, -p, "127.0.0.1:{{{{port.http}}}}", -h, "{www}"]
ports:
  - name: http
    protocol: http
health:
  check: tcp
  port: http
  interval: 200ms
  timeout: 1s
  start_period: 30s
replicas: {n}
stop_grace: 2s
"#,
        www = www.display()
    )
}

/// `n` containers of `image` running busybox httpd on 8080, published on a
/// port berth picks; HTTP health check every 200 ms (a TCP check would pass
/// on docker's userland proxy before httpd listens).
fn docker_recipe(name: &str, image: &str, n: usize) -> String {
    format!(
        r#"name: {name}
runtime: docker
image: {image}
command: [httpd, -f, -p, "{{{{port.http}}}}", -h, /etc]
ports:
  - name: http
    port: 8080
    protocol: http
health:
  check: http
  port: http
  path: /passwd
  interval: 200ms
  timeout: 1s
  start_period: 60s
replicas: {n}
stop_grace: 1s
"#
    )
}

/// Deploy → all Running, then until every endpoint answers 200 on `path`,
/// then stopped: (to Running, to answering, stop) or None.
async fn timed_deploy(
    client: &mut Client,
    name: &str,
    recipe: String,
    n: usize,
    path: &str,
) -> Option<(Duration, Duration, Duration)> {
    let limit = Duration::from_secs(300);
    let started = Instant::now();
    if let Err(e) = deploy(client, name, recipe).await {
        println!("  {e}");
        return None;
    }
    let poll = (Duration::from_millis(20), limit);
    let running = wait_until(client, name, poll, "running", |d| all_running(d, n)).await;
    let to_running = started.elapsed();
    let answered = match &running {
        Some(d) => until_all_answer(&endpoints(d), path, started, limit).await,
        None => None,
    };
    let stopped = stop(client, name, limit).await;
    running.as_ref()?;
    Some((to_running, answered?, stopped?))
}

/// `docker-compose up -d` of `n` services running httpd from `image`, until
/// all answer 200 on /passwd, then `down`: (up returned, all answer, down).
async fn compose_up(
    dir: &Path,
    project: &str,
    image: &str,
    n: usize,
) -> Result<(Duration, Duration, Duration), String> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut file = String::from("version: \"3\"\nservices:\n");
    for (i, port) in ports.iter().enumerate() {
        file.push_str(&format!(
            "  s{i}:\n    image: {image}\n    command: [httpd, -f, -p, \"8080\", -h, /etc]\n    \
             ports: [\"127.0.0.1:{port}:8080\"]\n"
        ));
    }
    let compose_file = dir.join(format!("{project}.yml"));
    std::fs::write(&compose_file, file).map_err(|e| e.to_string())?;
    let compose = move |args: &'static [&'static str]| {
        let file = compose_file.clone();
        let project = project.to_string();
        tokio::task::spawn_blocking(move || {
            Command::new("docker-compose")
                .arg("-p")
                .arg(&project)
                .arg("-f")
                .arg(&file)
                .args(args)
                .stdin(Stdio::null())
                .output()
        })
    };
    let started = Instant::now();
    let up = compose(&["up", "-d"]).await.expect("join");
    let up_returned = started.elapsed();
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let answered = match &up {
        Ok(output) if output.status.success() => {
            until_all_answer(&addresses, "/passwd", started, Duration::from_secs(300)).await
        }
        _ => None,
    };
    let down_started = Instant::now();
    let down = compose(&["down", "-t", "1"]).await.expect("join");
    let down_took = down_started.elapsed();
    let failed = |what: &str, output: &std::io::Result<std::process::Output>| match output {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "docker-compose {what}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("docker-compose {what}: {e}")),
    };
    if let Some(why) = failed("up", &up).or_else(|| failed("down", &down)) {
        return Err(why);
    }
    let answered = answered.ok_or("the services never all answered")?;
    Ok((up_returned, answered, down_took))
}

async fn bench_deploy(repeats: usize) {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "berth\n").unwrap();
    let docker_here = Path::new(DOCKER_SOCKET).exists();
    let owner = format!("bench{}", std::process::id());
    let socket = dir.path().join("agent.sock");
    let _agent_process = spawn_agent(
        dir.path(),
        &socket,
        if docker_here { DOCKER_SOCKET } else { "off" },
        &owner,
    );
    let mut agent =
        ContainerAgentClient::new(wait_for(&format!("unix://{}", socket.display())).await);
    let port = free_port();
    let orchestrator = spawn_orchestrator(
        dir.path(),
        port,
        &["deployments.reconcile_interval=200ms".to_string()],
    );
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    register(&mut client, &socket).await;

    let image = format!("berth-bench-{owner}:bb");
    let docker = if docker_here {
        match busybox_tar() {
            Ok(tar) => import_busybox(&mut agent, &tar, &image)
                .await
                .map_err(|e| format!("importing busybox through the agent: {e}")),
            Err(e) => Err(e),
        }
    } else {
        Err(format!("no docker socket at {DOCKER_SOCKET}"))
    };
    if let Err(reason) = &docker {
        println!("!!!!! deploy docker and docker-compose: SKIPPED ({reason}) !!!!!");
    }

    // [1 process, 50 processes, 10 docker, compose]: (to Running, to answering).
    let mut rows: [Vec<(f64, f64)>; 4] = Default::default();
    let mut stops: [Vec<f64>; 3] = Default::default();
    let mut compose_up_returned = Vec::new();
    let mut compose_down = Vec::new();
    for repeat in 1..=repeats {
        for (row, n) in [(0, 1), (1, 50)] {
            let name = format!("proc{n}-r{repeat}");
            let recipe = process_recipe(&name, &www, n);
            if let Some((running, answered, stopped)) =
                timed_deploy(&mut client, &name, recipe, n, "/").await
            {
                println!(
                    "deploy {repeat}: {n:>2} process replica(s): Deploy → all Running {:.0} ms, \
                     → all answer HTTP {:.0} ms; stop → Cancelled {:.0} ms",
                    ms(running),
                    ms(answered),
                    ms(stopped)
                );
                rows[row].push((ms(running), ms(answered)));
                stops[row].push(ms(stopped));
            }
            kill_leftovers(&www.display().to_string(), "httpd replica");
        }
        if docker.is_err() {
            continue;
        }
        // Berth first in odd repeats, compose first in even ones.
        for berth in [repeat % 2 == 1, repeat % 2 == 0] {
            if berth {
                let name = format!("docker10-r{repeat}");
                let recipe = docker_recipe(&name, &image, 10);
                if let Some((running, answered, stopped)) =
                    timed_deploy(&mut client, &name, recipe, 10, "/passwd").await
                {
                    println!(
                        "deploy {repeat}: 10 docker replicas: Deploy → all Running {:.0} ms, \
                         → all answer HTTP {:.0} ms; stop → Cancelled {:.0} ms",
                        ms(running),
                        ms(answered),
                        ms(stopped)
                    );
                    rows[2].push((ms(running), ms(answered)));
                    stops[2].push(ms(stopped));
                }
            } else {
                let project = format!("berthbench{}r{repeat}", std::process::id());
                match compose_up(dir.path(), &project, &image, 10).await {
                    Ok((up, answered, down)) => {
                        println!(
                            "deploy {repeat}: docker-compose 10 services: `up -d` returned {:.0} ms, \
                             → all answer HTTP {:.0} ms; `down -t 1` {:.0} ms",
                            ms(up),
                            ms(answered),
                            ms(down)
                        );
                        rows[3].push((ms(answered), ms(answered)));
                        compose_up_returned.push(ms(up));
                        compose_down.push(ms(down));
                    }
                    Err(why) => println!("deploy {repeat}: docker-compose: {why}"),
                }
            }
        }
    }
    let (rss, hwm) = rss_mb(orchestrator.pid());
    drop(orchestrator);
    if docker.is_ok() {
        let _ = Command::new("docker")
            .args(["rmi", &image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    let med = |values: &[(f64, f64)], second: bool| {
        let mut v: Vec<f64> = values
            .iter()
            .map(|(a, b)| if second { *b } else { *a })
            .collect();
        median(&mut v)
    };
    println!(
        "deploy, medians of {repeats} (GetDeployment polled every 20 ms, reconcile_interval 200ms, health interval 200ms):"
    );
    for (row, label) in [(0, " 1 process replica "), (1, "50 process replicas")] {
        let all: Vec<f64> = rows[row].iter().map(|r| r.0).collect();
        println!(
            "  {label}: Deploy → all Running {:.0} ms (each: {}), → all answer HTTP {:.0} ms; stop {:.0} ms",
            med(&rows[row], false),
            list(&all),
            med(&rows[row], true),
            median(&mut stops[row].clone())
        );
    }
    if docker.is_ok() {
        let berth_all: Vec<f64> = rows[2].iter().map(|r| r.0).collect();
        let compose_all: Vec<f64> = rows[3].iter().map(|r| r.0).collect();
        let (berth, compose) = (med(&rows[2], false), med(&rows[3], false));
        println!(
            "  10 docker replicas: Deploy → all Running {berth:.0} ms (each: {}), → all answer HTTP {:.0} ms; stop {:.0} ms",
            list(&berth_all),
            med(&rows[2], true),
            median(&mut stops[2].clone())
        );
        println!(
            "  docker-compose, 10 services: up -d → all answer HTTP {compose:.0} ms (each: {}); `up -d` returned {:.0} ms; down {:.0} ms",
            list(&compose_all),
            median(&mut compose_up_returned),
            median(&mut compose_down)
        );
        println!(
            "  ratio berth Deploy → all Running / docker-compose up → all answer: {:.2} \
             (berth → all answer / compose: {:.2})",
            berth / compose,
            med(&rows[2], true) / compose
        );
    }
    println!("  orchestrator after the deploy part: VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB");
}

/// One replica that writes its pid to `pid_file`, TCP health check every 1 s.
fn restart_recipe(name: &str, pid_file: &Path, www: &Path, backoff: Option<&str>) -> String {
    let restart = backoff.map_or(String::new(), |b| format!("restart:\n  backoff: {b}\n"));
    format!(
        r#"name: {name}
runtime: process
command:
  - sh
  - -c
  - 'echo $$ > {pid}; exec busybox httpd -f -p 127.0.0.1:{{{{port.http}}}} -h {www}'
ports:
  - name: http
    protocol: http
health:
  check: tcp
  port: http
  interval: 1s
  timeout: 500ms
  start_period: 30s
replicas: 1
{restart}stop_grace: 2s
"#,
        pid = pid_file.display(),
        www = www.display()
    )
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// kill -9 of the replica → (detected: no longer Running, Running again
/// with the restart counted, its port answers), or None.
async fn one_restart(
    client: &mut Client,
    dir: &Path,
    www: &Path,
    name: &str,
    (backoff, pause): (Option<&str>, Duration),
) -> Option<(Duration, Duration, Duration)> {
    let pid_file = dir.join(format!("{name}.pid"));
    let limit = Duration::from_secs(60);
    let poll = (Duration::from_millis(20), limit);
    if let Err(e) = deploy(client, name, restart_recipe(name, &pid_file, www, backoff)).await {
        println!("  {e}");
        return None;
    }
    let running = wait_until(client, name, poll, "running", |d| all_running(d, 1)).await;
    let address = running
        .as_ref()
        .and_then(|d| endpoints(d).first().cloned())
        .unwrap_or_default();
    let before = running
        .as_ref()
        .and_then(|d| d.replica_status.first())
        .map_or(0, |r| r.restarts);
    let pid = read_pid(&pid_file);
    if running.is_none() || pid <= 0 || !answers_200(&address, "/").await {
        println!(
            "  {name}: not running, no pid in {} or no answer",
            pid_file.display()
        );
        stop(client, name, limit).await;
        return None;
    }
    // The kill lands `pause` after the pass that saw the replica Running.
    tokio::time::sleep(pause).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the replica");
    let killed = Instant::now();
    let mut detected = None;
    let mut back = None;
    let answered = loop {
        if killed.elapsed() > limit {
            let now = get(client, name).await;
            println!(
                "  {name}: not back within {limit:?}: {}",
                now.as_ref().map_or("?".into(), summary)
            );
            break None;
        }
        let look = if back.is_none() {
            get(client, name).await
        } else {
            None
        };
        if let Some(replica) = look.as_ref().and_then(|d| d.replica_status.first()) {
            if detected.is_none() && replica_state(replica) != ReplicaState::Running {
                detected = Some(killed.elapsed());
            }
            if replica_state(replica) == ReplicaState::Running && replica.restarts == before + 1 {
                back = Some(killed.elapsed());
                detected.get_or_insert(killed.elapsed());
            }
        }
        if back.is_some() && answers_200(&address, "/").await {
            break Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_pid = read_pid(&pid_file);
    if answered.is_some() && new_pid == pid {
        println!("  {name}: the pid file still names the killed process {pid}");
    }
    stop(client, name, limit).await;
    Some((detected?, back?, answered?))
}

async fn bench_restart(repeats: usize) {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "berth\n").unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = spawn_agent(dir.path(), &socket, "off", "restart");
    wait_for(&format!("unix://{}", socket.display())).await;
    let port = free_port();
    let _orchestrator = spawn_orchestrator(
        dir.path(),
        port,
        &["deployments.reconcile_interval=1s".to_string()],
    );
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    register(&mut client, &socket).await;
    for (label, backoff) in [
        ("restart.backoff 500ms (the default)", None),
        ("restart.backoff 100ms", Some("100ms")),
    ] {
        let (mut detected, mut back, mut answered) = (Vec::new(), Vec::new(), Vec::new());
        for repeat in 1..=repeats {
            let name = format!(
                "restart-{}-r{repeat}",
                if backoff.is_some() { "b100" } else { "b500" }
            );
            // Kills spread over one reconcile interval (1 s): the time to
            // the next pass, which sees the replica down, varies with it.
            let pause = Duration::from_millis(100 + (repeat as u64 - 1) * 1000 / repeats as u64);
            match one_restart(&mut client, dir.path(), &www, &name, (backoff, pause)).await {
                Some((d, b, a)) => {
                    println!(
                        "restart {repeat}, {label}, killed {} ms after the replica was seen Running: kill -9 → seen down {:.0} ms, → Running again (restarts +1) {:.0} ms, \
                         → port answers {:.0} ms",
                        pause.as_millis(),
                        ms(d),
                        ms(b),
                        ms(a)
                    );
                    detected.push(ms(d));
                    back.push(ms(b));
                    answered.push(ms(a));
                }
                None => println!("restart {repeat}, {label}: no figure"),
            }
            kill_leftovers(&www.display().to_string(), "httpd replica");
        }
        let each = list(&answered);
        let total = median(&mut answered);
        println!(
            "restart, {label}, health interval 1s, reconcile_interval 1s, median of {}: seen down {:.0} ms, \
             Running again {:.0} ms, port answers {total:.0} ms (each: {each}) (goal <2000 ms: {})",
            back.len(),
            median(&mut detected),
            median(&mut back),
            met(total < 2000.0)
        );
    }
}

/// `per` `sleep` replicas (no ports, no health check) in a deployment.
fn sleep_recipe(name: &str, marker: &str, per: usize) -> String {
    format!(
        "name: {name}\nruntime: process\ncommand: [sleep, \"{marker}\"]\nreplicas: {per}\nstop_grace: 1s\n"
    )
}

async fn bench_rss() {
    let replicas: usize = setting("BENCH_RSS_REPLICAS", 1000);
    let deployments: usize = setting("BENCH_RSS_DEPLOYMENTS", 1).clamp(1, replicas.max(1));
    let reconcile: String = setting("BENCH_RSS_RECONCILE", "5s".to_string());
    let interval = humantime::parse_duration(&reconcile).expect("BENCH_RSS_RECONCILE");
    let per = replicas.div_ceil(deployments);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = spawn_agent(dir.path(), &socket, "off", "rss");
    wait_for(&format!("unix://{}", socket.display())).await;
    let port = free_port();
    let orchestrator = spawn_orchestrator(
        dir.path(),
        port,
        &[
            format!("deployments.reconcile_interval={reconcile}"),
            format!("deployments.max_replicas={}", per.max(1000)),
        ],
    );
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    register(&mut client, &socket).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, _) = rss_mb(orchestrator.pid());
    let (agent_before, _) = rss_mb(agent.pid());
    // A sleep of its own length, to find this bench's processes by.
    let marker = format!("{}", 800_000 + std::process::id());
    let needle = format!("sleep\0{marker}");
    let started = Instant::now();
    let names: Vec<String> = (0..deployments).map(|i| format!("rss-{i}")).collect();
    let mut asked = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let n = per.min(replicas - i * per);
        if let Err(e) = deploy(&mut client, name, sleep_recipe(name, &marker, n)).await {
            println!("  {e}");
        } else {
            asked.push((name.clone(), n));
        }
    }
    let limit = Duration::from_secs(900);
    let mut running_all = true;
    for (name, n) in &asked {
        let poll = (
            Duration::from_millis(500),
            limit.saturating_sub(started.elapsed()),
        );
        let n = *n;
        running_all &= wait_until(&mut client, name, poll, "running", |d| all_running(d, n))
            .await
            .is_some();
    }
    let to_running = started.elapsed();
    let mut running = 0;
    for (name, _) in &asked {
        if let Some(d) = get(&mut client, name).await {
            running += d
                .replica_status
                .iter()
                .filter(|r| replica_state(r) == ReplicaState::Running)
                .count();
        }
    }
    let processes = processes_with(&needle).len();
    // A few reconcile passes over every replica while they are tracked.
    tokio::time::sleep(interval * 3).await;
    let (rss, hwm) = rss_mb(orchestrator.pid());
    let (agent_rss, _) = rss_mb(agent.pid());
    println!(
        "rss: {replicas} replicas asked for in {deployments} deployment(s) (`sleep`, no ports, no health check, \
         reconcile_interval {reconcile}): {running} Running ({processes} sleep processes) after {:.1} s{}",
        to_running.as_secs_f64(),
        if running_all {
            ""
        } else {
            " (NOT all Running)"
        }
    );
    println!(
        "rss: orchestrator VmRSS before the deploy {before:.1} MB; with {running} replicas Running, after 3 more \
         reconcile intervals: VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB (goal <100 MB: {}); agent VmRSS {agent_before:.1} → {agent_rss:.1} MB",
        met(hwm < 100.0)
    );
    let stopping = Instant::now();
    let mut stopped_all = true;
    for (name, _) in &asked {
        stopped_all &= stop(&mut client, name, limit).await.is_some();
    }
    let left = processes_with(&needle).len();
    println!(
        "rss: stop → all Cancelled {:.1} s{}; sleep processes left: {left}",
        stopping.elapsed().as_secs_f64(),
        if stopped_all {
            ""
        } else {
            " (NOT all Cancelled)"
        }
    );
    drop(orchestrator);
    kill_leftovers(&needle, "sleep replica");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let repeats: usize = setting("BENCH_REPEATS", 3).max(1);
    println!(
        "deployment bench: {cores} cores, load average {} at start, {repeats} repeats",
        load_average()
    );
    runtime.block_on(async {
        if wanted("deploy") {
            bench_deploy(repeats).await;
            println!("load average {}", load_average());
        }
        if wanted("restart") {
            bench_restart(repeats).await;
            println!("load average {}", load_average());
        }
        if wanted("rss") {
            bench_rss().await;
        }
    });
    println!("load average {} at the end", load_average());
}
