//! Deployments end to end through the real binaries: an orchestrator, an
//! agent on a unix socket, and replicas that are real host processes
//! (Python's http.server) answering on the endpoints the orchestrator
//! reports. Killed replicas come back, a killed orchestrator adopts the
//! replicas that still run, scaling adds and removes real processes, a stop
//! leaves nothing behind, and bad recipes are refused with their reason.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::AuthChannel;
use berth_tests::{Process, free_port, register_local_agent, start_agent, wait_for};

type Client = OrchestratorClient<AuthChannel>;

/// An orchestrator that reconciles its deployments every 200 ms.
fn start_orchestrator(dir: &Path, port: u16) -> Process {
    start_orchestrator_with(dir, port, &[])
}

fn start_orchestrator_with(dir: &Path, port: u16, settings: &[&str]) -> Process {
    let mut all = vec!["deployments.reconcile_interval=200ms"];
    all.extend_from_slice(settings);
    berth_tests::start_orchestrator(dir, port, &all)
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}

/// A recipe of `replicas` Python web servers, each writing its pid to
/// `<dir>/pid-<replica>` before it serves, with a 200 ms HTTP health check.
fn web_recipe(name: &str, dir: &Path, replicas: u32) -> String {
    format!(
        r#"name: {name}
runtime: process
command:
  - sh
  - -c
  - echo $$ > {dir}/pid-{{{{replica}}}} && exec python3 -m http.server {{{{port.http}}}} --bind 127.0.0.1 --directory {dir}
ports:
  - name: http
    protocol: http
health:
  check: http
  port: http
  path: /
  interval: 200ms
  timeout: 1s
  retries: 2
  start_period: 10s
replicas: {replicas}
restart:
  backoff: 100ms
  max_backoff: 1s
stop_grace: 2s
"#,
        dir = dir.display()
    )
}

async fn deploy(client: &mut Client, recipe: &str) -> Result<Deployment, tonic::Status> {
    client
        .deploy(DeployRequest {
            recipe_yaml: recipe.to_string(),
            source_name: "web.yaml".into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get(client: &mut Client, name: &str) -> Deployment {
    client
        .get_deployment(GetDeploymentRequest { name: name.into() })
        .await
        .expect("GetDeployment")
        .into_inner()
}

async fn wait_until(
    client: &mut Client,
    name: &str,
    what: &str,
    done: impl Fn(&Deployment) -> bool,
) -> Deployment {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let deployment = get(client, name).await;
        if done(&deployment) {
            return deployment;
        }
        assert!(
            Instant::now() < deadline,
            "deployment never became {what}: {deployment:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// StopDeployment, then the deployment as it is once Cancelled.
async fn stop(client: &mut Client, name: &str) -> Deployment {
    client
        .stop_deployment(StopDeploymentRequest { name: name.into() })
        .await
        .expect("StopDeployment");
    wait_until(client, name, "cancelled", |d| {
        state(d) == DeploymentState::Cancelled
    })
    .await
}

fn state(deployment: &Deployment) -> DeploymentState {
    DeploymentState::try_from(deployment.state).unwrap_or_default()
}

fn all_running(deployment: &Deployment, replicas: usize) -> bool {
    state(deployment) == DeploymentState::Running
        && deployment.replica_status.len() == replicas
        && deployment.ready_replicas as usize == replicas
}

/// GET `path` on the endpoint: the status line.
async fn http_get_path(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("{address}: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// GET / on the endpoint: the status line.
async fn http_get(address: &str) -> String {
    http_get_path(address, "/").await
}

fn pid_of(dir: &Path, replica: u32) -> i32 {
    let text = std::fs::read_to_string(dir.join(format!("pid-{replica}"))).unwrap_or_default();
    text.trim().parse().unwrap_or(0)
}

fn alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists() && {
        // A zombie is dead for this purpose.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        !status.contains("State:\tZ")
    }
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the replica");
}

/// Processes serving from `dir`: the replicas the test started, however
/// they were started.
fn servers_of(dir: &Path) -> usize {
    let needle = format!("--directory\0{}", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
        .count()
}

fn workload_ids(deployment: &Deployment) -> Vec<String> {
    deployment
        .replica_status
        .iter()
        .map(|r| r.workload_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_is_kept_running_adopted_scaled_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;

    // Deployed: both replicas run, healthy, each on its own port.
    let started = Instant::now();
    deploy(&mut client, &web_recipe("web", &www, 2))
        .await
        .expect("Deploy");
    let running = wait_until(&mut client, "web", "running", |d| all_running(d, 2)).await;
    eprintln!("deploy to 2 replicas running: {:?}", started.elapsed());
    let mut addresses = Vec::new();
    for replica in &running.replica_status {
        let endpoint = &replica.endpoints[0];
        assert_eq!(
            (endpoint.name.as_str(), endpoint.protocol.as_str()),
            ("http", "http")
        );
        assert_eq!(replica.host, "local");
        assert!(
            http_get(&endpoint.address).await.contains(" 200 "),
            "{endpoint:?}"
        );
        addresses.push(endpoint.address.clone());
    }
    assert_ne!(addresses[0], addresses[1], "each replica has its own port");
    assert_eq!(servers_of(&www), 2);

    // kill -9 of a replica: restarted on its port, the restart counted.
    let first = pid_of(&www, 0);
    kill9(first);
    let killed = Instant::now();
    let restarted = wait_until(&mut client, "web", "restarted", |d| {
        all_running(d, 2) && d.replica_status[0].restarts == 1
    })
    .await;
    eprintln!("kill -9 to running again: {:?}", killed.elapsed());
    assert_ne!(pid_of(&www, 0), first, "a new process serves replica 0");
    assert!(alive(pid_of(&www, 0)));
    assert_eq!(
        restarted.replica_status[0].endpoints[0].address,
        addresses[0]
    );
    assert!(http_get(&addresses[0]).await.contains(" 200 "));
    assert_eq!(servers_of(&www), 2);

    // kill -9 of the orchestrator: the replicas keep running and the new
    // orchestrator adopts them (same workloads, same processes, no copy).
    let before = workload_ids(&restarted);
    let pids = [pid_of(&www, 0), pid_of(&www, 1)];
    orchestrator.kill();
    let orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    let adopted = wait_until(&mut client, "web", "running after the restart", |d| {
        all_running(d, 2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let adopted_later = get(&mut client, "web").await;
    assert_eq!(workload_ids(&adopted), before);
    assert_eq!(workload_ids(&adopted_later), before);
    assert_eq!(
        [pid_of(&www, 0), pid_of(&www, 1)],
        pids,
        "the same processes"
    );
    assert!(pids.iter().all(|pid| alive(*pid)));
    assert_eq!(servers_of(&www), 2, "no second copy");

    // Logs: the replicas' lines, each with its replica.
    let _ = http_get(&addresses[1]).await;
    let mut logs = client
        .logs(DeploymentLogsRequest {
            name: "web".into(),
            tail: 50,
            ..Default::default()
        })
        .await
        .expect("Logs")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = logs.message().await.expect("a log line") {
        lines.push(line);
    }
    assert!(
        lines.iter().any(|l| l.replica == 1
            && l.host == "local"
            && l.line.contains("\"GET / HTTP/1.0\" 200")),
        "{lines:#?}"
    );

    // Scaled 2 → 3 → 1: processes come and go with the replicas.
    client
        .scale_deployment(ScaleDeploymentRequest {
            name: "web".into(),
            replicas: 3,
        })
        .await
        .expect("scale to 3");
    wait_until(&mut client, "web", "3 running", |d| all_running(d, 3)).await;
    assert_eq!(servers_of(&www), 3);
    let third = pid_of(&www, 2);
    client
        .scale_deployment(ScaleDeploymentRequest {
            name: "web".into(),
            replicas: 1,
        })
        .await
        .expect("scale to 1");
    wait_until(&mut client, "web", "1 running", |d| all_running(d, 1)).await;
    assert!(
        !alive(third) && !alive(pids[1]),
        "scaled-down replicas stopped"
    );
    assert_eq!(servers_of(&www), 1);

    // A name in use is refused while the deployment lives.
    let taken = deploy(&mut client, &web_recipe("web", &www, 1))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");

    // Stopped: every replica removed, nothing left running.
    let last = pid_of(&www, 0);
    let stopped = stop(&mut client, "web").await;
    assert!(
        stopped
            .replica_status
            .iter()
            .all(|r| r.state == ReplicaState::Stopped as i32),
        "{stopped:#?}"
    );
    assert!(!alive(last));
    assert_eq!(servers_of(&www), 0, "nothing left behind");
    drop(orchestrator);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_recipes_are_refused_and_a_replica_that_cannot_run_fails_only_its_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;

    let refused = [
        (
            "name: x\nruntime: process\ncommand: [x]\nhealth:\n  check: http\n  port: web\n",
            tonic::Code::InvalidArgument,
            "web.yaml:6:",
        ),
        (
            "name: x\nruntime: chroot\ncommand: [x]\n",
            tonic::Code::InvalidArgument,
            "web.yaml:2:",
        ),
        (
            "name: x\nruntime: process\ncommand: [x]\nplacement:\n  gpus: 4\n",
            tonic::Code::FailedPrecondition,
            "host `local`",
        ),
        (
            "name: x\nruntime: process\ncommand: [x]\nreplicas: 100000\n",
            tonic::Code::InvalidArgument,
            "deployments.max_replicas",
        ),
    ];
    for (recipe, code, needle) in refused {
        let status = deploy(&mut client, recipe).await.unwrap_err();
        assert_eq!(status.code(), code, "{recipe}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{recipe}: {}",
            status.message()
        );
    }
    let listed = client
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.deployments.is_empty(), "nothing stored: {listed:?}");

    // One that serves, and one that exits at once, deployed with the CLI:
    // the second fails after its restart cap with the reason (and `berth
    // deploy --watch` exits non-zero), the first runs on.
    let berth = |args: &[&str]| {
        let orchestrator = format!("http://127.0.0.1:{port}");
        let output = std::process::Command::new(berth_tests::bin("berth"))
            .args(["--orchestrator", &orchestrator])
            .args(args)
            .output()
            .expect("run berth");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let good_file = dir.path().join("good.yaml");
    std::fs::write(&good_file, web_recipe("good", &www, 1)).unwrap();
    let (ok, stdout, stderr) = berth(&["deploy", good_file.to_str().unwrap(), "--watch"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("good running") && stdout.contains("http=http://127.0.0.1:"),
        "{stdout}"
    );
    let crashing_file = dir.path().join("crashing.yaml");
    std::fs::write(
        &crashing_file,
        "name: crashing\nruntime: process\ncommand: [sh, -c, 'echo no model here >&2; exit 3']\nrestart:\n  max_restarts: 2\n  backoff: 100ms\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = berth(&["deploy", crashing_file.to_str().unwrap(), "--watch"]);
    assert!(!ok, "a deployment that fails makes --watch fail: {stdout}");
    assert!(
        stderr.contains("deployment crashing ended failed"),
        "{stderr}"
    );
    let failed = wait_until(&mut client, "crashing", "failed", |d| {
        state(d) == DeploymentState::Failed
    })
    .await;
    assert!(
        failed.status_message.contains("exited with code 3")
            && failed.status_message.contains("gave up after 2 restarts"),
        "{}",
        failed.status_message
    );
    assert_eq!(failed.replica_status[0].restarts, 2);
    let good = wait_until(&mut client, "good", "running", |d| all_running(d, 1)).await;
    assert!(
        http_get(&good.replica_status[0].endpoints[0].address)
            .await
            .contains(" 200 ")
    );
    let ended = client
        .scale_deployment(ScaleDeploymentRequest {
            name: "crashing".into(),
            replicas: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    // A port another program holds: the replica cannot bind it, and the
    // deployment fails with what the replica said.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let clash = format!(
        "name: clash\nruntime: process\ncommand: [python3, -m, http.server, '{{{{port.http}}}}', --bind, 127.0.0.1]\n\
         ports: [{{name: http, port: {taken}}}]\nrestart: {{max_restarts: 1, backoff: 100ms}}\n"
    );
    deploy(&mut client, &clash).await.expect("Deploy clash");
    let clashed = wait_until(&mut client, "clash", "failed", |d| {
        state(d) == DeploymentState::Failed
    })
    .await;
    assert!(
        clashed.status_message.contains("exited with code 1")
            && clashed.status_message.contains("Address already in use"),
        "{}",
        clashed.status_message
    );
    drop(holder);

    let (ok, stdout, _) = berth(&["deployments"]);
    assert!(
        ok && stdout.contains("crashing") && stdout.contains("failed"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = berth(&["stop", "good"]);
    assert!(ok, "{stdout}{stderr}");
    wait_until(&mut client, "good", "cancelled", |d| {
        state(d) == DeploymentState::Cancelled
    })
    .await;
    assert_eq!(servers_of(&www), 0);
}

/// Container replicas on the Docker Engine (podman with
/// `BERTH_TEST_ENGINE=podman`): busybox's httpd in the test's own image,
/// each replica's container port published on a host port berth chose, a
/// killed container started again, the stop removing every container.
#[tokio::test(flavor = "multi_thread")]
async fn container_replicas_are_published_restarted_and_removed() {
    let Some(agent) = berth_tests::agent::Agent::start("deploy").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &agent.dir.path().join("agent.sock")).await;
    let recipe = format!(
        r#"name: httpd
runtime: {runtime}
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
  start_period: 10s
replicas: 2
restart:
  backoff: 100ms
stop_grace: 1s
"#,
        runtime = if agent.engine.runtime == berth_proto::common::v1::Runtime::Podman {
            "podman"
        } else {
            "docker"
        },
        image = agent.image,
    );
    let started = Instant::now();
    deploy(&mut client, &recipe).await.expect("Deploy");
    let running = wait_until(&mut client, "httpd", "running", |d| all_running(d, 2)).await;
    eprintln!("deploy to 2 containers running: {:?}", started.elapsed());
    for replica in &running.replica_status {
        let address = &replica.endpoints[0].address;
        assert!(
            http_get_path(address, "/passwd").await.contains(" 200 "),
            "{address}"
        );
    }

    // The engine kills a container: the replica is started again.
    let killed = &running.replica_status[1].workload_id;
    agent.engine_post(&format!("/containers/{killed}/kill"), "");
    let restarted = wait_until(&mut client, "httpd", "restarted", |d| {
        all_running(d, 2) && d.replica_status[1].restarts >= 1
    })
    .await;
    assert_eq!(
        &restarted.replica_status[1].workload_id, killed,
        "the same container"
    );
    let address = &restarted.replica_status[1].endpoints[0].address;
    assert!(http_get_path(address, "/passwd").await.contains(" 200 "));

    stop(&mut client, "httpd").await;
    for replica in &running.replica_status {
        let (status, _) = agent.engine_get(&format!("/containers/{}/json", replica.workload_id));
        assert_eq!(status, 404, "container {} removed", replica.workload_id);
    }
    agent.cleanup().await;
}

/// Two agents (`agent_args` before the usual ones), registered as hosts `a`
/// and `b` with an orchestrator that gives a silent host 1 s
/// (`deployments.host_lost_grace`): the agents, the orchestrator, a client.
async fn two_hosts(dir: &Path, agent_args: &[&str]) -> (Vec<Option<Process>>, Process, Client) {
    let sockets = [dir.join("a.sock"), dir.join("b.sock")];
    let agents = sockets
        .iter()
        .map(|s| Some(berth_tests::start_agent_with(s, agent_args)))
        .collect();
    let port = free_port();
    let orchestrator = start_orchestrator_with(dir, port, &["deployments.host_lost_grace=1s"]);
    let mut client = connect(port).await;
    for (name, socket) in ["a", "b"].iter().zip(&sockets) {
        let address = format!("unix://{}", socket.display());
        wait_for(&address).await;
        client
            .register_host(RegisterHostRequest {
                name: (*name).into(),
                address,
                ..Default::default()
            })
            .await
            .expect("RegisterHost");
    }
    (agents, orchestrator, client)
}

/// Two hosts (two agents): the one holding a replica is killed (kill -9 of
/// its agent, its processes with it); after `deployments.host_lost_grace`
/// the replica runs on the other host, counted as a restart, and the
/// deployment is Running again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_moves_off_a_lost_host() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let (mut agents, _orchestrator, mut client) = two_hosts(dir.path(), &[]).await;
    deploy(&mut client, &web_recipe("moving", &www, 1))
        .await
        .expect("Deploy");
    let placed = wait_until(&mut client, "moving", "running", |d| all_running(d, 1)).await;
    let first_host = placed.replica_status[0].host.clone();
    let (lost, other) = if first_host == "a" {
        (0, "b")
    } else {
        (1, "a")
    };
    let pid = pid_of(&www, 0);
    agents[lost].take().unwrap().kill();
    // The agent's processes die with their host here, as on a real host loss.
    if alive(pid) {
        kill9(pid);
    }
    let lost_at = Instant::now();
    let moved = wait_until(&mut client, "moving", "moved", |d| {
        all_running(d, 1) && d.replica_status[0].host == other
    })
    .await;
    eprintln!("host lost to running elsewhere: {:?}", lost_at.elapsed());
    assert!(
        lost_at.elapsed() >= Duration::from_secs(1),
        "not before the grace period"
    );
    assert_eq!(moved.replica_status[0].restarts, 1);
    let address = &moved.replica_status[0].endpoints[0].address;
    assert!(http_get(address).await.contains(" 200 "));
    assert_eq!(servers_of(&www), 1);
    stop(&mut client, "moving").await;
    assert_eq!(servers_of(&www), 0);
}

/// A campaign whose backend names a deployment: its runs execute next to
/// the deployment's replica and reach it through `{{endpoint.http}}` and
/// `BERTH_ENDPOINT_HTTP`; every run is recorded once. A campaign naming a
/// deployment that does not exist, or a port it lacks, is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_measures_a_deployment_through_its_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    deploy(&mut client, &web_recipe("served", &www, 1))
        .await
        .expect("Deploy");
    let running = wait_until(&mut client, "served", "running", |d| all_running(d, 1)).await;
    let endpoint = running.replica_status[0].endpoints[0].address.clone();

    let manifest = |deployment: &str, port: &str| {
        format!(
            r#"name: against-a-deployment
backends:
  - name: served
    deployment: {deployment}
configs:
  - {{name: a}}
  - {{name: b}}
cycles: 2
run:
  command:
    - python3
    - -c
    - |
      import json, os, time, urllib.request
      started = time.monotonic()
      answer = urllib.request.urlopen("http://{{{{endpoint.{port}}}}}/")
      print(json.dumps({{"status": answer.status, "endpoint": os.environ["BERTH_ENDPOINT_HTTP"], "latency_s": time.monotonic() - started}}))
"#
        )
    };
    let missing = berth_tests::campaign::refused_at_submit(
        &mut client,
        &manifest("nowhere", "http"),
        "a deployment that does not exist",
    )
    .await;
    assert!(
        missing
            .iter()
            .all(|s| s.code() == tonic::Code::NotFound && s.message().contains("`nowhere`")),
        "{missing:?}"
    );
    let no_port = berth_tests::campaign::refused_at_submit(
        &mut client,
        &manifest("served", "grpc"),
        "a port it lacks",
    )
    .await;
    assert!(
        no_port
            .iter()
            .all(|s| s.message().contains("has no port `grpc`")),
        "{no_port:?}"
    );

    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest("served", "http"),
            ..Default::default()
        })
        .await
        .expect("SubmitCampaign")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    berth_tests::campaign::wait_succeeded(&mut client, &campaign.id, 4, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut client, &campaign.id).await;
    assert_eq!(runs.len(), 4);
    for run in &runs {
        assert_eq!(run.host, "local");
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(result["status"], 200, "{run:?}");
        assert_eq!(result["endpoint"], endpoint.as_str(), "{run:?}");
    }
    // The deployment served them and runs on after the campaign.
    let after = get(&mut client, "served").await;
    assert!(all_running(&after, 1), "{after:?}");
    assert_eq!(servers_of(&www), 1);
}

/// Seed 000's stack from the recipes in examples/deployments/seed-000 as
/// they are: the embedding service (gRPC health check), llama.cpp with
/// SmolLM2 and berth-llm-proxy in front of both, as host processes of an
/// agent started from the repository root with the binaries on its PATH.
/// Each is called through the endpoint the orchestrator reports, and the
/// example campaign measures the model through the gateway deployment.
#[tokio::test(flavor = "multi_thread")]
async fn seed_000_stack_runs_from_its_recipes() {
    use berth_tests::{Part, require};
    let Some((python, gguf)) = require(Part::LlmPeers, berth_tests::llm::llama_cpp()) else {
        return;
    };
    let cache = berth_tests::model_cache();
    let model_files = [
        "all-minilm-l6-v2/model.onnx",
        "onnxruntime/libonnxruntime.so",
    ];
    let found = match model_files.iter().find(|f| !cache.join(f).exists()) {
        None => Ok(()),
        Some(missing) => Err(format!("{} is missing", cache.join(missing).display())),
    };
    let Some(()) = require(Part::Model, found) else {
        return;
    };
    let root = berth_tests::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let bin_dir = berth_tests::bin("berth-embedding")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let listen = format!("unix://{}", socket.display());
    let agent = std::process::Command::new(berth_tests::bin("berth-agent"))
        .args(["--listen", &listen, "--http-listen", ""])
        .current_dir(&root)
        .env("PATH", path)
        .env("LLM_VENV_PYTHON", &python)
        .env("SMOLLM2_GGUF", &gguf)
        .env("BERTH_MODEL_CACHE", &cache)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start berth-agent");
    let _agent = Process {
        child: agent,
        name: "berth-agent".into(),
    };
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    let started = Instant::now();
    for (name, file) in [
        ("embedding", "embedding.yaml"),
        ("smollm2", "smollm2.yaml"),
        ("llm-proxy", "llm-proxy.yaml"),
    ] {
        let path = root.join("examples/deployments/seed-000").join(file);
        let recipe = std::fs::read_to_string(&path).unwrap();
        client
            .deploy(DeployRequest {
                recipe_yaml: recipe,
                source_name: path.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{file}: {s:?}"));
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let d = get(&mut client, name).await;
            if all_running(&d, 1) {
                break;
            }
            assert!(
                state(&d) != DeploymentState::Failed && Instant::now() < deadline,
                "{d:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "seed 000's stack deployed and healthy in {:?}",
        started.elapsed()
    );
    let gateway = get(&mut client, "llm-proxy").await;
    let address = &gateway.replica_status[0]
        .endpoints
        .iter()
        .find(|e| e.name == "http")
        .unwrap()
        .address;
    let post = |path: &str, body: &str| {
        let output = std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "120",
                "-H",
                "Authorization: Bearer sk-local",
            ])
            .args(["-H", "Content-Type: application/json", "-d", body])
            .arg(format!("http://{address}{path}"))
            .output()
            .expect("curl");
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&output.stdout)))
    };
    let embedded = post(
        "/v1/embeddings",
        r#"{"model":"all-MiniLM-L6-v2","input":["a cat"]}"#,
    );
    assert_eq!(
        embedded["data"][0]["embedding"].as_array().map(Vec::len),
        Some(384),
        "{embedded}"
    );
    let chat = post(
        "/v1/chat/completions",
        r#"{"model":"smollm2","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );

    let manifest =
        std::fs::read_to_string(root.join("examples/campaigns/against-a-deployment.yaml")).unwrap();
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest,
            source_name: "against-a-deployment.yaml".into(),
            ..Default::default()
        })
        .await
        .expect("SubmitCampaign")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(300);
    // 2 configurations x (1 warmup + 3 cycles).
    berth_tests::campaign::wait_succeeded(&mut client, &campaign.id, 8, deadline).await;
    let results = client
        .get_results(GetResultsRequest { id: campaign.id })
        .await
        .unwrap()
        .into_inner();
    for row in &results.results {
        let tps = row
            .metrics
            .iter()
            .find(|m| m.name == "tokens_per_s")
            .expect("tokens_per_s");
        assert!(tps.n == 3 && tps.mean > 0.0, "{row:?}");
    }
    for name in ["llm-proxy", "smollm2", "embedding"] {
        stop(&mut client, name).await;
    }
}

/// Deploy with `update`: the replicas are replaced one at a time from the
/// new recipe, each old process stopped only once its successor is
/// healthy, so that as many replicas as asked answer all along; an update
/// whose successor never comes up is given up and the running generation
/// stays.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_replaces_replicas_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("v1"), dir.path().join("v2"));
    for (www, marker) in [(&old, "v1"), (&new, "v2")] {
        std::fs::create_dir(www).unwrap();
        std::fs::write(www.join("version"), marker).unwrap();
    }
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    deploy(&mut client, &web_recipe("rolling", &old, 2))
        .await
        .expect("Deploy");
    wait_until(&mut client, "rolling", "running", |d| all_running(d, 2)).await;

    let update = |recipe: String| DeployRequest {
        recipe_yaml: recipe,
        source_name: "web-v2.yaml".into(),
        update: true,
        ..Default::default()
    };
    client
        .deploy(update(web_recipe("rolling", &new, 2)))
        .await
        .expect("Deploy update");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut least_serving = usize::MAX;
    let updated = loop {
        let d = get(&mut client, "rolling").await;
        least_serving = least_serving.min(servers_of(&old) + servers_of(&new));
        if d.generation == 2
            && all_running(&d, 2)
            && d.replica_status.iter().all(|r| r.generation == 2)
        {
            break d;
        }
        assert!(Instant::now() < deadline, "never updated: {d:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        least_serving >= 2,
        "a replica was stopped before its successor was healthy"
    );
    assert_eq!((servers_of(&old), servers_of(&new)), (0, 2));
    for replica in &updated.replica_status {
        assert_eq!(
            replica.restarts, 0,
            "an update is not a restart: {replica:?}"
        );
        let address = &replica.endpoints[0].address;
        assert!(http_get_path(address, "/version").await.contains(" 200 "));
    }

    // A successor that exits at once: given up after the restart cap, the
    // replicas of generation 2 serve on.
    let broken = web_recipe("rolling", &new, 2)
        .replace("exec python3", "exit 4; exec python3")
        .replace("max_backoff: 1s", "max_backoff: 1s\n  max_restarts: 1");
    client
        .deploy(update(broken))
        .await
        .expect("Deploy a broken update");
    let given_up = wait_until(&mut client, "rolling", "update given up", |d| {
        d.status_message.contains("was given up")
    })
    .await;
    assert_eq!(given_up.generation, 3);
    assert!(
        given_up.replica_status.iter().all(|r| r.generation == 2),
        "{given_up:#?}"
    );
    assert!(all_running(&given_up, 2), "{given_up:#?}");
    assert_eq!(servers_of(&new), 2);

    stop(&mut client, "rolling").await;
    assert_eq!(servers_of(&old) + servers_of(&new), 0);
}

/// Seed 000's embedding service as containers, from
/// examples/deployments/seed-000/containers/embedding.yaml with this
/// machine's model cache mounted: two replicas of the image
/// scripts/deploy/build-images.sh builds (scripts/test.sh builds the images
/// once per run), each answering /v1/embeddings on the host port berth
/// published for it.
#[tokio::test(flavor = "multi_thread")]
async fn the_embedding_service_runs_as_container_replicas() {
    use berth_tests::compose::{build_images_command, ensure_images, run};
    use berth_tests::{Part, require};
    let Some(agent) = berth_tests::agent::Agent::start("deploy-embedding").await else {
        return;
    };
    let cache = berth_tests::model_cache();
    let found = if cache.join("all-minilm-l6-v2/model.onnx").exists() {
        Ok(())
    } else {
        Err(format!("no model under {}", cache.display()))
    };
    let Some(()) = require(Part::Model, found) else {
        return;
    };
    if agent.engine.runtime == berth_proto::common::v1::Runtime::Podman {
        // The podman run of this file covers the engine; the images are docker's.
        return;
    }
    ensure_images(
        "docker",
        |image| {
            run(std::process::Command::new("docker").args(["image", "inspect", image]))
                .status
                .success()
        },
        build_images_command,
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &agent.dir.path().join("agent.sock")).await;
    let file =
        berth_tests::repo_root().join("examples/deployments/seed-000/containers/embedding.yaml");
    let recipe = std::fs::read_to_string(&file)
        .unwrap()
        .replace("/root/.cache/berth/models", &cache.display().to_string())
        // What this machine lets a container have (a sandbox may cap it).
        .replace(
            "nofile: 65536",
            &format!("nofile: {}", berth_tests::compose::nofile_limit()),
        );
    deploy(&mut client, &recipe).await.expect("Deploy");
    let name = "embedding-container";
    let running = wait_until(&mut client, name, "running", |d| all_running(d, 2)).await;
    for replica in &running.replica_status {
        let address = &replica
            .endpoints
            .iter()
            .find(|e| e.name == "http")
            .unwrap()
            .address;
        let output = std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "30",
                "-H",
                "Content-Type: application/json",
            ])
            .args(["-d", r#"{"model":"all-MiniLM-L6-v2","input":["a cat"]}"#])
            .arg(format!("http://{address}/v1/embeddings"))
            .output()
            .expect("curl");
        let answer: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "{address}: {e}: {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            });
        assert_eq!(
            answer["data"][0]["embedding"].as_array().map(Vec::len),
            Some(384),
            "{answer}"
        );
    }
    stop(&mut client, name).await;
    for replica in &running.replica_status {
        let (status, _) = agent.engine_get(&format!("/containers/{}/json", replica.workload_id));
        assert_eq!(status, 404, "container {} removed", replica.workload_id);
    }
}

/// A recipe whose image no host has, with `import:` naming the archive on
/// the orchestrator's machine: the replicas' host imports it first (the
/// deployment and replica Building, streamed to watchers), then runs it.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_archive_is_imported_to_the_host_before_its_replicas_start() {
    use berth_proto::agent::v1::RemoveImageRequest;
    let Some(mut agent) = berth_tests::agent::Agent::start("deploy-import").await else {
        return;
    };
    let Some(archive) = berth_tests::busybox_rootfs(&berth_tests::target_tmpdir().join("images"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &agent.dir.path().join("agent.sock")).await;
    let image = format!("berth-test-import-{}:1", std::process::id());
    let runtime = if agent.engine.runtime == berth_proto::common::v1::Runtime::Podman {
        "podman"
    } else {
        "docker"
    };
    let recipe = format!(
        "name: imported\nruntime: {runtime}\nimage: {image}\nimport:\n  archive: {}\n  rootfs: true\n  command: [/bin/sh]\n\
         command: [httpd, -f, -p, '{{{{port.http}}}}', -h, /etc]\nports: [{{name: http, port: 8080, protocol: http}}]\n\
         health: {{check: http, port: http, path: /passwd, interval: 200ms, start_period: 10s}}\nstop_grace: 1s\n",
        archive.display()
    );
    let refused = deploy(
        &mut client,
        &recipe.replace(&archive.display().to_string(), "/nonexistent/image.tar"),
    )
    .await
    .unwrap_err();
    assert!(
        refused.message().contains("/nonexistent/image.tar"),
        "{refused:?}"
    );
    deploy(&mut client, &recipe).await.expect("Deploy");
    let running = wait_until(&mut client, "imported", "running", |d| all_running(d, 1)).await;
    // Every transition is stored with its reason: the import among them.
    let history: Vec<&str> = running.history.iter().map(|t| t.message.as_str()).collect();
    assert!(
        history.iter().any(|m| m.starts_with("BUILDING: importing")),
        "{history:#?}"
    );
    assert!(
        history
            .iter()
            .any(|m| m.starts_with("replica 0 on `local`: BUILDING: importing")),
        "{history:#?}"
    );
    let address = &running.replica_status[0].endpoints[0].address;
    assert!(http_get_path(address, "/passwd").await.contains(" 200 "));
    stop(&mut client, "imported").await;
    let removed = agent
        .client
        .remove_image(RemoveImageRequest {
            image: image.clone(),
            runtime: agent.engine.runtime as i32,
        })
        .await;
    assert!(removed.is_ok(), "{removed:?}");
    agent.cleanup().await;
}

/// GPUs every agent of the GPU tests declares (CI has no GPU): two, each
/// read by a replay device of the power sampler (`power_device`).
const TWO_DECLARED_GPUS: &str = r#"agent.declared_gpus=[{index = 0, uuid = "GPU-test-0", name = "Declared GPU", memory_bytes = 85899345920, power_device = "replay:gpu0"}, {index = 1, uuid = "GPU-test-1", name = "Declared GPU", memory_bytes = 85899345920, power_device = "replay:gpu1"}]"#;

/// A replay trace of the two declared GPUs drawing a steady 100 W (gpu0)
/// and 300 W (gpu1), with their energy counters.
fn two_gpu_trace(dir: &Path) -> std::path::PathBuf {
    let mut csv = String::from(
        "# SYNTHETIC: two steady GPUs for the deployment GPU test\ntime_s,device,power_w,energy_j\n",
    );
    for step in 0..=40 {
        let t = f64::from(step) * 0.05;
        for (device, watts) in [("gpu0", 100.0), ("gpu1", 300.0)] {
            csv.push_str(&format!(
                "{t:.2},{device},{watts},{:.3}\n",
                1000.0 + watts * t
            ));
        }
    }
    let path = dir.join("two-gpus.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

/// The environment of a live process, as NAME=value strings.
fn environ(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// A replica that asks for a GPU holds one: its process sees only it, a
/// campaign measuring the deployment measures exactly that GPU's power
/// device, and a campaign that measures power on the host's GPUs waits
/// (saying why) until the deployment lets its GPU go.
#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_replica_holds_its_gpu_and_campaigns_measure_it() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let (_sampler, sampler_port) =
        berth_tests::start_replay_sampler(dir.path(), &two_gpu_trace(dir.path())).await;
    let socket = dir.path().join("agent.sock");
    let _agent = berth_tests::start_agent_with(&socket, &["--set", TWO_DECLARED_GPUS]);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    let address = format!("unix://{}", socket.display());
    wait_for(&address).await;
    client
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address,
            power_sampler: format!("http://127.0.0.1:{sampler_port}"),
            ..Default::default()
        })
        .await
        .expect("RegisterHost");

    let recipe = web_recipe("gpu-web", &www, 1) + "gpus: {count: 1}\n";
    deploy(&mut client, &recipe).await.expect("Deploy");
    let running = wait_until(&mut client, "gpu-web", "running", |d| all_running(d, 1)).await;
    let held = running.replica_status[0].gpus.clone();
    assert_eq!(held.len(), 1, "{running:?}");
    let gpu = held[0];
    let env = environ(pid_of(&www, 0));
    assert!(
        env.contains(&format!("CUDA_VISIBLE_DEVICES=GPU-test-{gpu}"))
            && env.contains(&format!("BERTH_GPUS={gpu}")),
        "the replica's process is told its GPU: {env:?}"
    );

    let against = r#"name: gpu-energy
backends:
  - name: served
    deployment: gpu-web
configs: [{name: a}]
cycles: 2
run:
  command: [python3, -c, "import time, urllib.request; urllib.request.urlopen('http://{{endpoint.http}}/'); time.sleep(0.3); print('{\"ok\": 1}')"]
power: {enabled: true, rate_hz: 100}
"#;
    let campaign = berth_tests::campaign::submit(&mut client, against).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    berth_tests::campaign::wait_succeeded(&mut client, &campaign.id, 2, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut client, &campaign.id).await;
    let expected_watts = if gpu == 0 { 100.0 } else { 300.0 };
    for run in &runs {
        let devices: Vec<&str> = run.energy.iter().map(|e| e.device.as_str()).collect();
        assert_eq!(devices, [format!("replay:gpu{gpu}")], "{run:?}");
        // The counter moves in 50 ms steps of the trace: within 15%.
        let mean = run.energy[0].mean_w;
        assert!(
            (mean - expected_watts).abs() < expected_watts * 0.15,
            "{run:?}"
        );
    }

    // A host process measuring power uses every GPU of the host: it waits
    // for the one the deployment holds.
    let elsewhere = "name: host-energy\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: a}]\n\
                     run: {command: [sh, -c, 'sleep 0.2; echo ''{\"ok\": 1}''']}\npower: {enabled: true, rate_hz: 100}\n";
    let waiting = berth_tests::campaign::submit(&mut client, elsewhere).await;
    let said = berth_tests::campaign::wait_campaign(
        &mut client,
        &waiting.id,
        Duration::from_secs(30),
        "waiting for the deployment's GPU",
        |c| c.status_message.contains("serves deployment `gpu-web`"),
    )
    .await;
    eprintln!("{}", said.status_message);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = berth_tests::campaign::get_campaign(&mut client, &waiting.id).await;
    let counts = still.runs.unwrap_or_default();
    assert_eq!(
        counts.running + counts.succeeded,
        0,
        "it must not run beside the replica: {still:?}"
    );
    stop(&mut client, "gpu-web").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    berth_tests::campaign::wait_succeeded(&mut client, &waiting.id, 1, deadline).await;
}

/// A replica that owns a GPU is never run twice: while its host is only
/// silent it stays Lost there (the copy may still hold the GPU), and it is
/// placed elsewhere once the host is deregistered.
#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_replica_moves_only_once_its_host_is_deregistered() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let (mut agents, _orchestrator, mut client) =
        two_hosts(dir.path(), &["--set", TWO_DECLARED_GPUS]).await;
    let recipe = web_recipe("gpu-moving", &www, 1) + "gpus: {count: 1}\n";
    deploy(&mut client, &recipe).await.expect("Deploy");
    let placed = wait_until(&mut client, "gpu-moving", "running", |d| all_running(d, 1)).await;
    let first_host = placed.replica_status[0].host.clone();
    let (lost, lost_name, other) = if first_host == "a" {
        (0, "a", "b")
    } else {
        (1, "b", "a")
    };
    let pid = pid_of(&www, 0);
    agents[lost].take().unwrap().kill();
    if alive(pid) {
        kill9(pid);
    }
    let silent = wait_until(&mut client, "gpu-moving", "kept on its silent host", |d| {
        d.replica_status[0]
            .reason
            .contains("moves only once its host is deregistered")
    })
    .await;
    // Well past the grace period, it is still not placed anywhere else.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = get(&mut client, "gpu-moving").await;
    assert_eq!(kept.replica_status[0].host, lost_name, "{kept:?}");
    assert_eq!(servers_of(&www), 0, "no second copy: {silent:?}");
    assert!(
        kept.replica_status[0].reason.contains("deregistered"),
        "the reason says what moves it: {kept:?}"
    );
    client
        .deregister_host(DeregisterHostRequest {
            name: lost_name.into(),
        })
        .await
        .expect("DeregisterHost");
    let moved = wait_until(&mut client, "gpu-moving", "moved", |d| {
        all_running(d, 1) && d.replica_status[0].host == other
    })
    .await;
    assert_eq!(moved.replica_status[0].gpus.len(), 1, "{moved:?}");
    assert_eq!(servers_of(&www), 1);
    stop(&mut client, "gpu-moving").await;
    assert_eq!(servers_of(&www), 0);
}

/// `berth logs --follow` prints the replicas' lines as they come, each
/// with its replica and host.
#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_prints_lines_as_they_come() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    let recipe = "name: ticker\nruntime: process\n\
                  command: [sh, -c, 'i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done']\n\
                  replicas: 2\nstop_grace: 1s\n";
    deploy(&mut client, recipe).await.expect("Deploy");
    wait_until(&mut client, "ticker", "running", |d| all_running(d, 2)).await;
    let mut follower = std::process::Command::new(berth_tests::bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{port}"),
            "logs",
            "ticker",
            "--follow",
            "--tail",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("berth logs --follow");
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let (at, line) = lines_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line in 10 s; so far: {seen:?}"));
        seen.push((at - started, line));
    }
    let _ = follower.kill();
    let _ = follower.wait();
    for replica in 0..2 {
        let prefix = format!("[{replica}@local] tick-");
        let ticks: Vec<u64> = seen
            .iter()
            .filter_map(|(_, line)| line.strip_prefix(&prefix)?.parse().ok())
            .collect();
        assert!(ticks.len() >= 3, "replica {replica}: {seen:?}");
        assert!(ticks.windows(2).all(|w| w[1] > w[0]), "in order: {seen:?}");
    }
    // Followed, not read at once: the lines came over more than a second.
    assert!(
        seen.last().unwrap().0 - seen[0].0 > Duration::from_secs(1),
        "{seen:?}"
    );
    stop(&mut client, "ticker").await;
}

/// Seed 000's model server as a container: llama.cpp with SmolLM2 from the
/// image scripts/images/llama-cpp-image.sh builds (no registry), deployed
/// from examples/deployments/seed-000/containers/smollm2.yaml as it is,
/// answering a chat completion on the endpoint berth reports, under the
/// recipe's memory limit; stopped, its container is gone.
#[tokio::test(flavor = "multi_thread")]
async fn llama_cpp_serves_smollm2_as_a_container_replica() {
    use berth_tests::{Part, require};
    let Some(agent) = berth_tests::agent::Agent::start("deploy-llama").await else {
        return;
    };
    if agent.engine.runtime == berth_proto::common::v1::Runtime::Podman {
        // The image is docker's; the podman run of this file covers the engine.
        return;
    }
    let Some(_) = require(Part::LlmPeers, berth_tests::llm::llama_cpp()) else {
        return;
    };
    let built = std::process::Command::new(
        berth_tests::repo_root().join("scripts/images/llama-cpp-image.sh"),
    )
    .arg("--quiet")
    .output()
    .expect("scripts/images/llama-cpp-image.sh");
    assert!(
        built.status.success(),
        "the llama.cpp image: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &agent.dir.path().join("agent.sock")).await;
    let file =
        berth_tests::repo_root().join("examples/deployments/seed-000/containers/smollm2.yaml");
    deploy(&mut client, &std::fs::read_to_string(&file).unwrap())
        .await
        .expect("Deploy");
    let name = "smollm2-container";
    let deadline = Instant::now() + Duration::from_secs(150);
    let running = loop {
        let deployment = get(&mut client, name).await;
        if all_running(&deployment, 1) {
            break deployment;
        }
        assert!(Instant::now() < deadline, "never running: {deployment:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let replica = &running.replica_status[0];
    let (_, inspected) = agent.engine_get(&format!("/containers/{}/json", replica.workload_id));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        inspected["HostConfig"]["Memory"],
        1u64 << 30,
        "the recipe's memory limit: {inspected}"
    );
    let address = &replica.endpoints[0].address;
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "-H",
            "Content-Type: application/json",
        ])
        .args([
            "-d",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}"#,
        ])
        .arg(format!("http://{address}/v1/chat/completions"))
        .output()
        .expect("curl");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{address}: {e}: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.is_empty(), "{answer}");
    assert!(
        answer["usage"]["completion_tokens"].as_u64() > Some(0),
        "{answer}"
    );
    stop(&mut client, name).await;
    let (status, _) = agent.engine_get(&format!("/containers/{}/json", replica.workload_id));
    assert_eq!(status, 404, "container {} removed", replica.workload_id);
}
