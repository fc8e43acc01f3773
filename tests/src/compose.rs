//! What the compose.yaml tests share, with docker-compose
//! (tests/deploy_compose.rs) or podman-compose (tests/deploy_podman.rs): the
//! services and their host ports, the images built once, the checks every
//! TCP service answers (health and reflection), a campaign through the
//! agent's socket volume, and what a project leaves behind.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{
    Campaign, CampaignState, RegisterHostRequest, SubmitCampaignRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::campaign::wait_ended;
use crate::{health, reflection_list, repo_root, wait_for};

/// compose.yaml's services.
pub const SERVICES: [&str; 5] = [
    "orchestrator",
    "agent",
    "power-sampler",
    "embedding",
    "llm-proxy",
];

/// The variables compose.yaml takes its host ports from.
pub const PORT_VARS: [&str; 9] = [
    "BERTH_PORT_ORCHESTRATOR",
    "BERTH_PORT_ORCHESTRATOR_HTTP",
    "BERTH_PORT_AGENT_HTTP",
    "BERTH_PORT_POWER",
    "BERTH_PORT_POWER_HTTP",
    "BERTH_PORT_EMBEDDING",
    "BERTH_PORT_EMBEDDING_HTTP",
    "BERTH_PORT_LLM_PROXY",
    "BERTH_PORT_LLM_PROXY_HTTP",
];

/// The services with a TCP gRPC port: its variable and the service's name.
pub const GRPC_PORTS: [(&str, &str); 4] = [
    (
        "BERTH_PORT_ORCHESTRATOR",
        "berth.orchestrator.v1.Orchestrator",
    ),
    ("BERTH_PORT_POWER", "berth.power.v1.PowerSampler"),
    ("BERTH_PORT_EMBEDDING", "berth.embedding.v1.Embedding"),
    ("BERTH_PORT_LLM_PROXY", "berth.llmproxy.v1.LlmProxy"),
];

/// The agent's socket as the orchestrator's container sees it, in the
/// shared `berth-run` volume.
pub const AGENT_SOCKET: &str = "unix:///run/berth/agent.sock";

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

/// stdout then stderr, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A free host port for each of [`PORT_VARS`], and the same as the
/// project's environment.
pub fn free_ports() -> (BTreeMap<&'static str, u16>, BTreeMap<String, String>) {
    let mut ports = BTreeMap::new();
    let mut env = BTreeMap::new();
    for var in PORT_VARS {
        let port = crate::free_port();
        ports.insert(var, port);
        env.insert(var.to_string(), port.to_string());
    }
    (ports, env)
}

/// seed 000's nofile (65536), or this machine's hard limit where that is lower: the engine
/// cannot raise a container's limit above its own ("error setting rlimit type 7").
pub fn nofile_limit() -> String {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(65536);
    hard.min(65536).to_string()
}

/// Both tests of a file may want the images at once: one builds, the other waits.
static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the images with `build` (scripts/deploy/build-images.sh) unless
/// `exists` finds every `localhost/berth-<svc>:latest`: scripts/test.sh
/// builds them from this checkout once per run, before the tests, so a run
/// never rebuilds them per test.
pub fn ensure_images(engine: &str, exists: impl Fn(&str) -> bool, build: impl FnOnce() -> Command) {
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = SERVICES
        .iter()
        .copied()
        .filter(|svc| !exists(&format!("localhost/berth-{svc}:latest")))
        .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!(
        "building {engine} images (missing: {missing:?}) with scripts/deploy/build-images.sh"
    );
    let started = Instant::now();
    let status = build()
        .current_dir(repo_root())
        .status()
        .expect("run build-images.sh");
    assert!(status.success(), "build-images.sh failed ({engine})");
    eprintln!("{engine} images built in {:.0?}", started.elapsed());
}

/// The command running scripts/deploy/build-images.sh.
pub fn build_images_command() -> Command {
    Command::new(repo_root().join("scripts/deploy/build-images.sh"))
}

/// Each TCP service, from the host, the way grpcurl reaches it: serving,
/// and listing itself through reflection v1 (and v1alpha with `v1alpha_too`).
pub async fn assert_grpc_services_answer(ports: &BTreeMap<&'static str, u16>, v1alpha_too: bool) {
    let versions: &[bool] = if v1alpha_too {
        &[false, true]
    } else {
        &[false]
    };
    for (var, service) in GRPC_PORTS {
        let address = format!("http://127.0.0.1:{}", ports[var]);
        let channel = wait_for(&address).await;
        assert_eq!(
            health(channel.clone(), service).await,
            ServingStatus::Serving
        );
        for &v1alpha in versions {
            let listed = reflection_list(channel.clone(), v1alpha).await;
            assert!(listed.iter().any(|s| s == service), "{address}: {listed:?}");
        }
    }
}

/// Registers the agent's socket as host `host` with the orchestrator at
/// `orchestrator_port`, submits `manifest` and waits until it has ended.
/// Returns the client and the ended campaign.
pub async fn campaign_through_agent(
    orchestrator_port: u16,
    host: &str,
    manifest: &str,
    source_name: &str,
    limit: Duration,
) -> (crate::campaign::Client, Campaign) {
    let channel = wait_for(&format!("http://127.0.0.1:{orchestrator_port}")).await;
    let mut client = OrchestratorClient::new(channel);
    client
        .register_host(RegisterHostRequest {
            name: host.into(),
            address: AGENT_SOCKET.into(),
            ..Default::default()
        })
        .await
        .expect("RegisterHost");
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest.into(),
            source_name: source_name.into(),
            validate_only: false,
        })
        .await
        .expect("SubmitCampaign")
        .into_inner();
    let finished = wait_ended(&mut client, &campaign.id, limit).await;
    (client, finished)
}

/// The campaign ended succeeded (else its status message says why not).
pub fn assert_succeeded(finished: &Campaign) {
    assert_eq!(
        CampaignState::try_from(finished.state).unwrap(),
        CampaignState::Succeeded,
        "{}",
        finished.status_message
    );
}

/// What a project left: one line per container, volume, network (or pod)
/// that `list` (the engine's CLI) finds with `label`; each of `kinds` is a
/// listing command ending in `--filter`.
pub fn leftovers(list: impl Fn() -> Command, label: &str, kinds: &[&[&str]]) -> Vec<String> {
    let mut left = Vec::new();
    for kind in kinds {
        let mut args = kind.to_vec();
        args.push(label);
        let output = run(list().args(&args));
        left.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| format!("{} {l}", kind[0])),
        );
    }
    left
}
