//! compose.yaml for real, with Debian's docker-compose (1.29.x) against the local Docker Engine:
//! the images built by scripts/deploy/build-images.sh (nothing pulled), `up -d`, every health
//! check healthy, each service driven over gRPC (health + reflection, as grpcurl would), the
//! agent registered with the orchestrator through the shared socket volume, a small campaign run
//! inside the agent container, and `down -v` leaving no container, volume or network behind.
//! Then bad input: a missing config file, a port in use, a missing secret and a missing engine
//! socket each end with a message naming the problem, not a silent restart loop.
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
use berth_proto::orchestrator::v1::{Campaign, GetCampaignRequest, GetResultsRequest};
use berth_proto::power::v1::ListDevicesRequest;
use berth_proto::power::v1::power_sampler_client::PowerSamplerClient;
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
    let prometheus_image = "localhost/berth-prometheus:latest";
    if !run(Command::new("docker").args(["image", "inspect", prometheus_image]))
        .status
        .success()
    {
        // scripts/test.sh builds it with the others; a test run alone builds it here.
        let status = build_images_command()
            .args(["--monitoring", "--profile", "debug", "--no-cargo"])
            .current_dir(repo_root())
            .status()
            .expect("run build-images.sh --monitoring");
        assert!(status.success(), "build-images.sh --monitoring failed");
    }
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
