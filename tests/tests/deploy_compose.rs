//! compose.yaml for real, with Debian's docker-compose (1.29.x) against the local Docker Engine:
//! the images built by scripts/deploy/build-images.sh (nothing pulled), `up -d`, every health
//! check healthy, each service driven over gRPC (health + reflection, as grpcurl would), the
//! agent registered with the orchestrator through the shared socket volume, a small campaign run
//! inside the agent container, and `down -v` leaving no container, volume or network behind.
//! Then bad input: a missing config file, a port in use, a missing secret and a missing engine
//! socket each end with a message naming the problem, not a silent restart loop. The optional
//! profiles: `monitoring` (Prometheus scraping every service) and `postgres` (PostgreSQL 15 with
//! two orchestrators on its database: one leads, the other reads and takes over when it dies).
//!
//! Needs docker and docker-compose (berth_tests::parts: a missing one skips the test, or fails it
//! on CI). Images: scripts/test.sh builds them once per run; a test run alone builds them with
//! the script only when `localhost/berth-<svc>:latest` is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use berth_proto::agent::v1::InfoRequest;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::embedding::v1::EmbedRequest;
use berth_proto::embedding::v1::embedding_client::EmbeddingClient;
use berth_proto::llmproxy::v1::ListModelsRequest as ProxyListModelsRequest;
use berth_proto::llmproxy::v1::llm_proxy_client::LlmProxyClient;
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{
    Campaign, CampaignState, CancelCampaignRequest, GetCampaignRequest, GetResultsRequest, Run,
    RunState,
};
use berth_proto::power::v1::ListDevicesRequest;
use berth_proto::power::v1::power_sampler_client::PowerSamplerClient;
use berth_server::error::has_reason;
use berth_tests::campaign::{
    Client, NOT_LEADER, get_campaign, hosts_of, leads, results_of, runs_of, submit, wait_ended,
};
use berth_tests::compose::{
    SERVICES, assert_grpc_services_answer, assert_succeeded, build_images_command,
    campaign_through_agent, ensure_images as ensure_images_with, free_ports, leftovers,
    nofile_limit, run, text,
};
use berth_tests::{Part, health, repo_root, require, wait_for};
use tonic_health::pb::health_check_response::ServingStatus;

/// The campaign [`CAMPAIGN`] run through the project's agent, succeeded:
/// the client and the ended campaign.
async fn compose_campaign(project: &Project) -> (berth_tests::campaign::Client, Campaign) {
    let (client, finished) = campaign_through_agent(
        project.port("BERTH_PORT_ORCHESTRATOR"),
        "compose-agent",
        CAMPAIGN,
        "compose.yaml",
        Duration::from_secs(120),
    )
    .await;
    assert_succeeded(&finished);
    (client, finished)
}

/// Whether docker and docker-compose answer (else the test skips, or fails on CI).
fn docker_present() -> bool {
    [
        (Part::Docker, "docker"),
        (Part::DockerCompose, "docker-compose"),
    ]
    .into_iter()
    .all(|(part, tool)| require(part, tool_answers(Command::new(tool).arg("version"))).is_some())
}

/// Ok when the tool runs and exits 0; else what it said.
fn tool_answers(command: &mut Command) -> Result<(), String> {
    match command.output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!("{command:?} failed: {}", text(&output))),
        Err(e) => Err(format!("{command:?}: {e}")),
    }
}

fn ensure_images() {
    ensure_images_with(
        "docker",
        |image| {
            run(Command::new("docker").args(["image", "inspect", image]))
                .status
                .success()
        },
        build_images_command,
    );
}

/// One compose project with its own name and host ports, taken down (with its volumes) on drop.
struct Project {
    name: String,
    env: BTreeMap<String, String>,
    extra_files: Vec<PathBuf>,
    /// A profile given to every command: `ps` and `down` see the profile's services only then.
    profile: Option<&'static str>,
    ports: BTreeMap<&'static str, u16>,
}

impl Project {
    fn new(tag: &str) -> Self {
        let name = format!("berthtest{tag}{}", std::process::id());
        // The real model and ONNX Runtime: the embedding image names its library
        // explicitly, so a cache without them stops the service (as it should).
        let models = berth_tests::model_cache();
        let (ports, mut env) = free_ports();
        let engine_gid = std::fs::metadata("/var/run/docker.sock")
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m).to_string())
            .unwrap_or_else(|_| "10001".into());
        let nofile = nofile_limit();
        for (key, value) in [
            ("BERTH_NOFILE", nofile.as_str()),
            ("BERTH_PUBLISH_IP", "127.0.0.1"),
            ("BERTH_HEALTH_INTERVAL", "1s"),
            ("BERTH_ENGINE_GID", engine_gid.as_str()),
            ("LITELLM_MASTER_KEY", "sk-compose-test"),
            ("COMPOSE_DOCKER_CLI_BUILD", "0"),
            ("BERTH_MODEL_CACHE", models.to_str().unwrap()),
        ] {
            env.insert(key.to_string(), value.to_string());
        }
        let project = Self {
            name,
            env,
            extra_files: Vec::new(),
            profile: None,
            ports,
        };
        // Whatever an earlier, killed run left under this name.
        project.compose(&["down", "-v", "--remove-orphans"]);
        project
    }

    fn compose(&self, args: &[&str]) -> Output {
        let mut command = Command::new("docker-compose");
        command
            .current_dir(repo_root())
            .args(["-p", &self.name, "-f", "compose.yaml"]);
        for file in &self.extra_files {
            command.arg("-f").arg(file);
        }
        if let Some(profile) = self.profile {
            command.args(["--profile", profile]);
        }
        run(command.args(args).envs(&self.env))
    }

    fn container(&self, service: &str) -> String {
        let output = self.compose(&["ps", "-q", service]);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        let id = self.container(service);
        if id.is_empty() {
            return String::new();
        }
        let output = run(Command::new("docker").args(["inspect", "-f", format, &id]));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn port(&self, var: &str) -> u16 {
        self.ports[var]
    }

    /// Leftovers of this project: containers, volumes, networks.
    fn leftovers(&self) -> Vec<String> {
        leftovers(
            || Command::new("docker"),
            &format!("label=com.docker.compose.project={}", self.name),
            &[
                &["ps", "-aq", "--filter"],
                &["volume", "ls", "-q", "--filter"],
                &["network", "ls", "-q", "--filter"],
            ],
        )
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        self.compose(&["down", "-v", "--remove-orphans"]);
    }
}

async fn wait_healthy(project: &Project, services: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let states: Vec<(String, String)> = services
            .iter()
            .map(|svc| {
                (
                    svc.to_string(),
                    project.inspect(svc, "{{.State.Status}}/{{.State.Health.Status}}"),
                )
            })
            .collect();
        if states.iter().all(|(_, s)| s == "running/healthy") {
            return;
        }
        if Instant::now() > deadline {
            let logs = project.compose(&["logs", "--no-color", "--tail", "20"]);
            panic!(
                "not all healthy after {limit:?}: {states:?}\n{}",
                text(&logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The busybox-compatible campaign of deploy/campaigns (the quickstart needs GNU coreutils).
const CAMPAIGN: &str = include_str!("../../deploy/campaigns/agent-container.yaml");

#[tokio::test(flavor = "multi_thread")]
async fn docker_compose_stack_runs_a_campaign_and_leaves_nothing_behind() {
    if !docker_present() {
        return;
    }
    ensure_images();
    let project = Project::new("up");

    let started = Instant::now();
    let up = project.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up failed:\n{}",
        text(&up)
    );
    wait_healthy(&project, &SERVICES, Duration::from_secs(120)).await;
    eprintln!("compose up → all 5 healthy in {:.1?}", started.elapsed());

    // Each TCP service, from the host, the way grpcurl reaches it.
    assert_grpc_services_answer(&project.ports, true).await;

    // One real call per service beyond health, through its published port.
    let power = wait_for(&format!(
        "http://127.0.0.1:{}",
        project.port("BERTH_PORT_POWER")
    ))
    .await;
    let devices = PowerSamplerClient::new(power)
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("power ListDevices")
        .into_inner();
    assert!(
        !devices.devices.is_empty() || !devices.unavailable.is_empty(),
        "the sampler neither lists devices nor says what it lacks: {devices:?}"
    );
    let embedding = wait_for(&format!(
        "http://127.0.0.1:{}",
        project.port("BERTH_PORT_EMBEDDING")
    ))
    .await;
    let embedded = EmbeddingClient::new(embedding)
        .embed(EmbedRequest {
            texts: vec!["berth in a container".into(), String::new()],
            ..Default::default()
        })
        .await
        .expect("embedding Embed (model and ONNX Runtime from the mounted cache)")
        .into_inner();
    assert_eq!((embedded.embeddings.len(), embedded.dimension), (2, 384));
    let proxy = wait_for(&format!(
        "http://127.0.0.1:{}",
        project.port("BERTH_PORT_LLM_PROXY")
    ))
    .await;
    let mut list_models = tonic::Request::new(ProxyListModelsRequest::default());
    list_models.metadata_mut().insert(
        "authorization",
        "Bearer sk-compose-test".parse().expect("header value"),
    );
    let models = LlmProxyClient::new(proxy)
        .list_models(list_models)
        .await
        .expect("llm-proxy ListModels with the master key")
        .into_inner();
    assert!(
        models.models.iter().any(|m| m.id == "granite-code"),
        "deploy/config/litellm_config.yaml's models: {models:?}"
    );

    // The agent has no TCP port: its socket lies in the berth-run volume (root may dial it).
    let mountpoint = run(Command::new("docker").args([
        "volume",
        "inspect",
        "-f",
        "{{.Mountpoint}}",
        &format!("{}_berth-run", project.name),
    ]));
    let socket =
        PathBuf::from(String::from_utf8_lossy(&mountpoint.stdout).trim()).join("agent.sock");
    let agent = wait_for(&format!("unix://{}", socket.display())).await;
    assert_eq!(
        health(agent.clone(), "berth.agent.v1.ContainerAgent").await,
        ServingStatus::Serving
    );
    let info = ContainerAgentClient::new(agent)
        .info(InfoRequest::default())
        .await
        .expect("agent Info")
        .into_inner();
    eprintln!(
        "agent in its container: {} {}",
        info.hostname, info.agent_version
    );

    // The campaign: the orchestrator (uid 10001) dials the agent's 0600 socket (uid 10001)
    // through the shared volume; the runs are busybox commands inside the agent container.
    let (mut client, finished) = compose_campaign(&project).await;
    let counts = finished.runs.unwrap_or_default();
    assert_eq!((counts.succeeded, counts.failed), (8, 0), "{counts:?}");
    let results = client
        .get_results(GetResultsRequest {
            id: finished.id.clone(),
        })
        .await
        .expect("GetResults")
        .into_inner();
    assert_eq!(results.results.len(), 4);
    for row in &results.results {
        assert_eq!(row.succeeded, 2, "{row:?}");
        assert!(
            row.metrics
                .iter()
                .any(|m| m.name == "mib_per_s" && m.mean > 0.0),
            "{row:?}"
        );
    }

    // SIGTERM drains and exits 0 (not a restart), state survives a restart of the container.
    let stop = project.compose(&["stop", "orchestrator"]);
    assert!(stop.status.success(), "{}", text(&stop));
    assert_eq!(project.inspect("orchestrator", "{{.State.ExitCode}}"), "0");
    let start = project.compose(&["start", "orchestrator"]);
    assert!(start.status.success(), "{}", text(&start));
    wait_healthy(&project, &["orchestrator"], Duration::from_secs(60)).await;
    let channel = wait_for(&format!(
        "http://127.0.0.1:{}",
        project.port("BERTH_PORT_ORCHESTRATOR")
    ))
    .await;
    let again = OrchestratorClient::new(channel)
        .get_campaign(GetCampaignRequest {
            id: finished.id.clone(),
        })
        .await
        .expect("GetCampaign after restart")
        .into_inner();
    assert_eq!(
        again.state, finished.state,
        "state kept in the named volume"
    );

    let down = project.compose(&["down", "-v"]);
    assert!(down.status.success(), "{}", text(&down));
    let left = project.leftovers();
    assert!(left.is_empty(), "down -v left: {left:?}");
}

/// Waits until a service's container has given up: exited, restart count at the policy's max.
async fn wait_given_up(project: &Project, service: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let state = project.inspect(
            service,
            "{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}",
        );
        if state == "exited 5 1" {
            return text(&project.compose(&["logs", "--no-color", service]));
        }
        assert!(
            Instant::now() < deadline,
            "{service} did not stop after 5 restarts: {state}\n{}",
            text(&project.compose(&["logs", "--no-color", service]))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_compose_bad_input_names_the_problem_and_stops_retrying() {
    if !docker_present() {
        return;
    }
    ensure_images();
    let mut project = Project::new("bad");
    let dir = tempfile::tempdir().unwrap();
    let override_file = dir.path().join("bad.yaml");
    std::fs::write(
        &override_file,
        "services:\n\
         \x20 power-sampler:\n\
         \x20   environment:\n\
         \x20     BERTH_CONFIG: /etc/berth/missing.toml\n\
         \x20 llm-proxy:\n\
         \x20   environment:\n\
         \x20     BERTH_SERVER__HTTP_LISTEN: 0.0.0.0:7704\n\
         \x20 embedding:\n\
         \x20   environment:\n\
         \x20     BERTH_SERVER__REQUEST_TIMEOUT: soon\n",
    )
    .unwrap();
    project.extra_files.push(override_file);

    let up = project.compose(&["up", "-d", "power-sampler", "llm-proxy", "embedding"]);
    assert!(up.status.success(), "{}", text(&up));
    let logs = wait_given_up(&project, "power-sampler").await;
    assert!(
        logs.contains("config file /etc/berth/missing.toml"),
        "missing config file not named:\n{logs}"
    );
    let logs = wait_given_up(&project, "llm-proxy").await;
    assert!(
        logs.contains("0.0.0.0:7704") && logs.contains("server.http_listen"),
        "port in use not named:\n{logs}"
    );
    let logs = wait_given_up(&project, "embedding").await;
    assert!(
        logs.contains("request_timeout") && logs.contains("soon"),
        "bad value not named:\n{logs}"
    );
    let ps = text(&project.compose(&["ps"]));
    assert!(ps.contains("Exit 1"), "compose ps shows the failure:\n{ps}");
    project.compose(&["down", "-v"]);

    // A missing secret: the llm-proxy names the variable.
    project.extra_files.clear();
    project.env.remove("LITELLM_MASTER_KEY");
    let up = project.compose(&["up", "-d", "llm-proxy"]);
    assert!(up.status.success(), "{}", text(&up));
    let logs = wait_given_up(&project, "llm-proxy").await;
    assert!(logs.contains("LITELLM_MASTER_KEY"), "{logs}");
    project.compose(&["down", "-v"]);

    // The engine socket not there: `up` refuses, naming the path.
    project.env.insert(
        "BERTH_ENGINE_SOCKET".into(),
        "/nonexistent/engine.sock".into(),
    );
    let up = project.compose(&["up", "-d", "agent"]);
    let out = text(&up);
    assert!(
        !up.status.success(),
        "up must fail without the engine socket:\n{out}"
    );
    assert!(out.contains("/nonexistent/engine.sock"), "{out}");
    assert!(
        !Path::new("/nonexistent/engine.sock").exists(),
        "docker must not create the missing socket path"
    );
    project.compose(&["down", "-v"]);
    let left = project.leftovers();
    assert!(left.is_empty(), "down -v left: {left:?}");
}

/// Builds `image` with build-images.sh's `flag` unless it is there: scripts/test.sh builds it
/// with the others; a test run alone builds it here.
fn ensure_profile_image(image: &str, flag: &str) {
    if run(Command::new("docker").args(["image", "inspect", image]))
        .status
        .success()
    {
        return;
    }
    let status = build_images_command()
        .args([flag, "--profile", "debug", "--no-cargo"])
        .current_dir(repo_root())
        .status()
        .unwrap_or_else(|e| panic!("run build-images.sh {flag}: {e}"));
    assert!(status.success(), "build-images.sh {flag} failed");
}

/// Prometheus's HTTP API at `port`: the JSON of `path` (a query or the targets).
async fn prometheus(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = berth_tests::http_get(&format!("127.0.0.1:{port}"), path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The monitoring profile (deploy/compose.monitoring.yaml) for real: the real Prometheus (Debian's,
/// in localhost/berth-prometheus) scrapes every service of the stack; its HTTP API reports each
/// berth target up, and after a campaign the orchestrator's run metrics are there.
#[tokio::test(flavor = "multi_thread")]
async fn docker_compose_monitoring_profile_scrapes_every_service() {
    if !docker_present() {
        return;
    }
    ensure_images();
    ensure_profile_image("localhost/berth-prometheus:latest", "--monitoring");
    let mut project = Project::new("mon");
    project
        .extra_files
        .push(repo_root().join("deploy/compose.monitoring.yaml"));
    let prometheus_port = berth_tests::free_port();
    project
        .env
        .insert("BERTH_PORT_PROMETHEUS".into(), prometheus_port.to_string());
    let up = project.compose(&["--profile", "monitoring", "up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up failed:\n{}",
        text(&up)
    );
    let mut services = SERVICES.to_vec();
    services.push("prometheus");
    wait_healthy(&project, &services, Duration::from_secs(120)).await;

    // Every berth job up: the first scrape comes within one interval (15 s).
    let jobs = [
        "berth-orchestrator",
        "berth-agent",
        "berth-power-sampler",
        "berth-embedding",
        "berth-llm-proxy",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = prometheus(prometheus_port, "/api/v1/targets").await;
        let health: BTreeMap<String, String> = targets["data"]["activeTargets"]
            .as_array()
            .expect("activeTargets")
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_string(),
                    format!(
                        "{} {}",
                        t["health"].as_str().unwrap_or_default(),
                        t["lastError"].as_str().unwrap_or_default()
                    ),
                )
            })
            .collect();
        if jobs
            .iter()
            .all(|job| health.get(*job).map(|h| h.trim()) == Some("up"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every berth target is up after 60 s: {health:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let (_client, _) = compose_campaign(&project).await;
    // The runs' transitions, as Prometheus scraped them after the campaign.
    let query = "/api/v1/query?query=sum(berth_orchestrator_run_transitions_total%7Bstate%3D%22succeeded%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = prometheus(prometheus_port, query).await;
        let succeeded = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        if succeeded == Some(8.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has not scraped the campaign's 8 succeeded runs after 60 s: {answer}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The rules file is loaded: its groups are listed.
    let rules = prometheus(prometheus_port, "/api/v1/rules").await;
    assert!(
        !rules["data"]["groups"]
            .as_array()
            .expect("groups")
            .is_empty(),
        "{rules}"
    );

    let down = project.compose(&["--profile", "monitoring", "down", "-v"]);
    assert!(down.status.success(), "{}", text(&down));
    let left = project.leftovers();
    assert!(left.is_empty(), "down -v left: {left:?}");
}

/// The postgres profile's orchestrators: the service and the variable of its gRPC port.
const ORCHESTRATORS: [(&str, &str); 2] = [
    ("orchestrator", "BERTH_PORT_ORCHESTRATOR"),
    ("orchestrator-b", "BERTH_PORT_ORCHESTRATOR_B"),
];

/// The index in [`ORCHESTRATORS`] of the one that leads, once exactly one does (a lease left by
/// an orchestrator that restarted while starting takes up to a lease to expire).
async fn the_leader(clients: &mut [Client; 2]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut leading = Vec::new();
        for (i, client) in clients.iter_mut().enumerate() {
            if leads(client).await {
                leading.push(i);
            }
        }
        if let [one] = leading[..] {
            return one;
        }
        assert!(leading.len() < 2, "both orchestrators lead on one database");
        assert!(
            Instant::now() < deadline,
            "no orchestrator leads after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every (config, cycle) of the campaign recorded once, succeeded at its first attempt.
fn assert_each_run_once(runs: &[Run], expected: usize) {
    let mut seen: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for run in runs {
        *seen.entry((run.config.clone(), run.cycle)).or_default() += 1;
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        assert_eq!(run.attempts, 1, "{run:?}");
    }
    assert_eq!(seen.len(), expected, "{seen:?}");
    assert!(
        seen.values().all(|n| *n == 1),
        "recorded more than once: {seen:?}"
    );
}

/// The runs as a reader compares them: id, state, attempts, result.
fn run_rows(runs: &[Run]) -> Vec<(String, i32, u32, String)> {
    let mut rows: Vec<_> = runs
        .iter()
        .map(|r| (r.id.clone(), r.state, r.attempts, r.result_json.clone()))
        .collect();
    rows.sort();
    rows
}

/// The postgres profile (deploy/compose.postgres.yaml) for real: Debian's PostgreSQL 15 in
/// localhost/berth-postgres and two orchestrators on its database. One leads and runs a campaign
/// through the agent; the other serves the same campaign, runs and results from the database
/// and refuses writes; `docker kill` of the leader and the other takes writes within 5 s, then
/// runs a campaign of its own through the same agent; the killed one started again follows.
#[tokio::test(flavor = "multi_thread")]
async fn docker_compose_postgres_profile_two_orchestrators_one_database() {
    if !docker_present() {
        return;
    }
    let postgres_image = "localhost/berth-postgres:latest";
    let image_there = run(Command::new("docker").args(["image", "inspect", postgres_image]))
        .status
        .success();
    // The image is made of this machine's postgresql-15: without it, skip (or fail on CI).
    let server = Path::new("/usr/lib/postgresql/15/bin/postgres");
    if !image_there
        && require(
            Part::Postgres,
            if server.is_file() {
                Ok(())
            } else {
                Err(format!(
                    "{} is missing, and so is {postgres_image}",
                    server.display()
                ))
            },
        )
        .is_none()
    {
        return;
    }
    ensure_images();
    ensure_profile_image(postgres_image, "--postgres");
    let mut project = Project::new("pg");
    project
        .extra_files
        .push(repo_root().join("deploy/compose.postgres.yaml"));
    project.profile = Some("postgres");
    project.env.insert(
        "BERTH_POSTGRES_PASSWORD".into(),
        format!("compose-test-{}", std::process::id()),
    );
    for var in [
        "BERTH_PORT_ORCHESTRATOR_B",
        "BERTH_PORT_ORCHESTRATOR_B_HTTP",
    ] {
        let port = berth_tests::free_port();
        project.ports.insert(var, port);
        project.env.insert(var.into(), port.to_string());
    }

    let started = Instant::now();
    let up = project.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up failed:\n{}",
        text(&up)
    );
    let mut services = SERVICES.to_vec();
    services.extend(["postgres", "orchestrator-b"]);
    wait_healthy(&project, &services, Duration::from_secs(180)).await;
    eprintln!(
        "compose up (postgres profile) → all 7 healthy in {:.1?}",
        started.elapsed()
    );

    let mut clients = [
        connect(project.port(ORCHESTRATORS[0].1)).await,
        connect(project.port(ORCHESTRATORS[1].1)).await,
    ];
    let leader = the_leader(&mut clients).await;
    let follower = 1 - leader;
    let (leader_service, leader_port_var) = ORCHESTRATORS[leader];
    let follower_service = ORCHESTRATORS[follower].0;
    eprintln!("{leader_service} leads, {follower_service} follows");

    // A campaign through the leader, every run recorded once.
    let (mut leader_client, finished) = campaign_through_agent(
        project.port(leader_port_var),
        "compose-agent",
        CAMPAIGN,
        "compose.postgres.yaml",
        Duration::from_secs(120),
    )
    .await;
    assert_succeeded(&finished);
    let counts = finished.runs.unwrap_or_default();
    assert_eq!((counts.succeeded, counts.failed), (8, 0), "{counts:?}");
    let runs = runs_of(&mut leader_client, &finished.id).await;
    assert_each_run_once(&runs, 8);
    let results = results_of(&mut leader_client, &finished.id).await;
    assert_eq!(results.results.len(), 4, "{results:?}");

    // The follower reads the same from the database, and refuses a write.
    let follower_client = &mut clients[follower];
    let seen = get_campaign(follower_client, &finished.id).await;
    assert_eq!(
        (seen.state, seen.runs),
        (finished.state, finished.runs),
        "the follower's GetCampaign"
    );
    assert_eq!(
        run_rows(&runs_of(follower_client, &finished.id).await),
        run_rows(&runs),
        "the follower's ListRuns"
    );
    assert_eq!(
        results_of(follower_client, &finished.id).await,
        results,
        "the follower's GetResults"
    );
    assert!(
        hosts_of(follower_client)
            .await
            .iter()
            .any(|h| h.name == "compose-agent"),
        "the follower lists the stored host"
    );
    let refused = follower_client
        .cancel_campaign(CancelCampaignRequest {
            id: finished.id.clone(),
        })
        .await
        .expect_err("a follower refuses writes");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(has_reason(&refused, NOT_LEADER), "{refused:?}");
    // Named by its store.advertise, so the operator knows which container leads.
    assert!(
        refused
            .message()
            .contains(&format!("the leader is {leader_service}:7700 (pid")),
        "{refused:?}"
    );

    // The leader killed (SIGKILL: no lease given up): the follower takes writes within 5 s.
    let leader_container = project.container(leader_service);
    let kill = run(Command::new("docker").args(["kill", &leader_container]));
    assert!(kill.status.success(), "{}", text(&kill));
    let killed_at = Instant::now();
    while !leads(follower_client).await {
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "{follower_service} never took over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed_at.elapsed();
    eprintln!(
        "failover: {follower_service} took writes {failover:.1?} after docker kill of {leader_service}"
    );
    assert!(
        failover < Duration::from_secs(5),
        "took over in {failover:?}"
    );

    // The new leader schedules: a campaign through the same agent (the host is stored).
    let second = submit(follower_client, CAMPAIGN).await;
    let second = wait_ended(follower_client, &second.id, Duration::from_secs(120)).await;
    assert_succeeded(&second);
    assert_each_run_once(&runs_of(follower_client, &second.id).await, 8);
    assert_eq!(
        get_campaign(follower_client, &finished.id).await.state,
        CampaignState::Succeeded as i32,
        "the first campaign as it was"
    );

    // The killed one, started again, follows.
    let start = project.compose(&["start", leader_service]);
    assert!(start.status.success(), "{}", text(&start));
    wait_healthy(&project, &[leader_service], Duration::from_secs(60)).await;
    let mut old_leader = connect(project.port(leader_port_var)).await;
    assert!(
        !leads(&mut old_leader).await,
        "the old leader follows after its restart"
    );
    assert_eq!(
        get_campaign(&mut old_leader, &second.id).await.state,
        CampaignState::Succeeded as i32
    );

    let down = project.compose(&["down", "-v"]);
    assert!(down.status.success(), "{}", text(&down));
    let left = project.leftovers();
    assert!(left.is_empty(), "down -v left: {left:?}");
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}
