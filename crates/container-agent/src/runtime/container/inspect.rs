//! Engine JSON about containers, read leniently (states as plain strings, so
//! podman's `stopped` does not fail a listing), and turned into `Workload`s.

use std::collections::HashMap;

use berth_proto::agent::v1::{Health, Workload, WorkloadState};
use berth_proto::common::v1::WorkloadSpec;
use prost::Message;
use serde::Deserialize;

/// Labels berth puts on every container it creates.
pub const LABEL_OWNER: &str = "berth.owner";
pub const LABEL_NAME: &str = "berth.name";
/// The spec the container was made from (hex-encoded protobuf), so that an
/// agent restarted later can adopt the container with its health check.
pub const LABEL_SPEC: &str = "berth.spec";

/// `GET /containers/json` item.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    pub id: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
}

/// `GET /containers/{id}/json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerDetails {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub created: String,
    pub state: ContainerState,
    #[serde(default)]
    pub restart_count: u32,
    /// The id of the image it was created from ("sha256:…").
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub network_settings: NetworkSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub exit_code: i64,
    #[serde(default, rename = "OOMKilled")]
    pub oom_killed: bool,
    #[serde(default)]
    pub started_at: String,
    #[serde(default)]
    pub health: Option<EngineHealth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EngineHealth {
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub labels: Option<HashMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    #[serde(default)]
    pub ports: Option<HashMap<String, Option<Vec<HostBinding>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HostBinding {
    #[serde(default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: String,
}

impl ContainerDetails {
    pub fn labels(&self) -> &HashMap<String, String> {
        static EMPTY: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
        self.config
            .labels
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(HashMap::new))
    }

    pub fn spec(&self) -> Option<WorkloadSpec> {
        decode_spec(self.labels().get(LABEL_SPEC)?)
    }

    pub fn workload_name(&self) -> String {
        self.labels()
            .get(LABEL_NAME)
            .cloned()
            .unwrap_or_else(|| self.name.trim_start_matches('/').to_string())
    }

    pub fn running(&self) -> bool {
        state(&self.state.status) == WorkloadState::Running
    }

    /// The workload as the agent reports it. `health` is the agent's own
    /// verdict when it runs a health check; otherwise the engine's (an image
    /// may carry its own HEALTHCHECK).
    pub fn workload(&self, health: Option<Health>, agent_restarts: u32, host: &str) -> Workload {
        let state = state(&self.state.status);
        let exited = matches!(state, WorkloadState::Exited | WorkloadState::Stopped);
        Workload {
            id: self.id.clone(),
            name: self.workload_name(),
            spec: self.spec(),
            state: state as i32,
            health: health.unwrap_or_else(|| engine_health(self.state.health.as_ref())) as i32,
            created_at: timestamp(&self.created),
            started_at: timestamp(&self.state.started_at),
            exit_code: exited.then(|| i32::try_from(self.state.exit_code).unwrap_or(-1)),
            oom_killed: self.state.oom_killed,
            restart_count: self.restart_count + agent_restarts,
            endpoints: self.endpoints(host),
            ..Default::default()
        }
    }

    fn endpoints(&self, host: &str) -> Vec<String> {
        let mut endpoints: Vec<String> = self
            .network_settings
            .ports
            .iter()
            .flatten()
            .filter_map(|(_, bindings)| bindings.as_ref())
            .flat_map(|bindings| {
                // Docker 20.10 gives the IPv4 and IPv6 wildcard binds of one
                // container port different random host ports; both reach the
                // same service, so the port is listed once, by its IPv4 bind.
                let has_ipv4_wildcard = bindings
                    .iter()
                    .any(|b| matches!(b.host_ip.as_str(), "" | "0.0.0.0"));
                bindings
                    .iter()
                    .filter(move |b| !(has_ipv4_wildcard && b.host_ip == "::"))
            })
            .filter(|b| !b.host_port.is_empty())
            .map(|b| {
                // A wildcard bind is reachable at the host's name.
                let ip = match b.host_ip.as_str() {
                    "" | "0.0.0.0" | "::" => host,
                    ip => ip,
                };
                format!("{ip}:{}", b.host_port)
            })
            .collect();
        endpoints.sort();
        endpoints.dedup();
        endpoints
    }
}

/// Engine state names, docker's and podman's, as workload states.
pub fn state(status: &str) -> WorkloadState {
    match status {
        "created" | "configured" | "initialized" => WorkloadState::Created,
        "running" | "stopping" | "paused" => WorkloadState::Running,
        "restarting" => WorkloadState::Restarting,
        "removing" => WorkloadState::Removing,
        // podman says `stopped` where docker says `exited`.
        "stopped" => WorkloadState::Stopped,
        "exited" | "dead" => WorkloadState::Exited,
        _ => WorkloadState::Unspecified,
    }
}

/// Health names as engines spell them.
pub fn health(status: &str) -> Health {
    match status.trim() {
        "starting" => Health::Starting,
        "healthy" => Health::Healthy,
        "unhealthy" => Health::Unhealthy,
        _ => Health::None,
    }
}

fn engine_health(engine: Option<&EngineHealth>) -> Health {
    engine.map_or(Health::None, |h| health(&h.status))
}

/// RFC 3339 from the engine; the zero time (`0001-01-01…`) means never.
fn timestamp(text: &str) -> Option<prost_types::Timestamp> {
    text.parse::<prost_types::Timestamp>()
        .ok()
        .filter(|t| t.seconds > 0)
}

pub fn encode_spec(spec: &WorkloadSpec) -> String {
    spec.encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn decode_spec(hex: &str) -> Option<WorkloadSpec> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    WorkloadSpec::decode(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::common::v1::Runtime;

    /// Recorded from podman 4.3.1's compat API (`/v1.41/containers/{id}/json`), trimmed.
    const PODMAN_INSPECT: &str = r#"{"Id":"b124aa89d9e6","Created":"2026-11-23T05:02:29.746529905Z","Path":"sleep","Args":["100"],
      "State":{"Status":"exited","Running":false,"Paused":false,"Restarting":false,"OOMKilled":false,"Dead":false,"Pid":0,"ExitCode":137,"Error":"",
      "StartedAt":"2026-11-23T05:02:31.903598565Z","FinishedAt":"2026-11-23T05:02:32.929056694Z","Health":{"Status":"","FailingStreak":0,"Log":null}},
      "Name":"t3","RestartCount":0,"Config":{"Labels":{"berth.owner":"o1"}},"NetworkSettings":{"Ports":{}}}"#;

    /// Recorded from Docker Engine 20.10 (`/v1.41/containers/{id}/json`), trimmed.
    const DOCKER_INSPECT: &str = r#"{"Id":"4f1c","Created":"2026-11-23T05:10:00.1Z","Name":"/bench",
      "State":{"Status":"running","Running":true,"OOMKilled":false,"Pid":4242,"ExitCode":0,"StartedAt":"2026-11-23T05:10:01.2Z","FinishedAt":"0001-01-01T00:00:00Z",
      "Health":{"Status":"healthy","FailingStreak":0,"Log":[]}},
      "RestartCount":2,"Config":{"Labels":{"berth.owner":"o1","berth.name":"bench"}},
      "NetworkSettings":{"Ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"},{"HostIp":"::","HostPort":"8080"}],"81/tcp":null}}}"#;

    #[test]
    fn podman_inspect_reads() {
        let details: ContainerDetails = serde_json::from_str(PODMAN_INSPECT).unwrap();
        let workload = details.workload(None, 1, "h");
        assert_eq!(workload.name, "t3");
        assert_eq!(workload.state, WorkloadState::Exited as i32);
        assert_eq!(workload.exit_code, Some(137));
        assert_eq!(workload.health, Health::None as i32);
        assert_eq!(workload.restart_count, 1);
        assert_eq!(details.labels()[LABEL_OWNER], "o1");
    }

    #[test]
    fn podman_stopped_state_is_not_an_error() {
        let json = PODMAN_INSPECT.replace(r#""Status":"exited""#, r#""Status":"stopped""#);
        let details: ContainerDetails = serde_json::from_str(&json).unwrap();
        assert_eq!(
            details.workload(None, 0, "h").state,
            WorkloadState::Stopped as i32
        );
        let list = r#"[{"Id":"a","Names":["/x"],"State":"stopped","Labels":{"berth.owner":"o"}}]"#;
        let summaries: Vec<ContainerSummary> = serde_json::from_str(list).unwrap();
        assert_eq!(state(&summaries[0].state), WorkloadState::Stopped);
    }

    #[test]
    fn docker_inspect_reads() {
        let details: ContainerDetails = serde_json::from_str(DOCKER_INSPECT).unwrap();
        let workload = details.workload(None, 0, "gpu-1");
        assert_eq!(workload.name, "bench");
        assert_eq!(workload.state, WorkloadState::Running as i32);
        assert_eq!(workload.exit_code, None);
        assert_eq!(workload.health, Health::Healthy as i32);
        assert_eq!(workload.restart_count, 2);
        assert_eq!(workload.endpoints, vec!["gpu-1:8080"]);
        assert!(workload.started_at.is_some());
        // The agent's own verdict wins over the engine's.
        assert_eq!(
            details.workload(Some(Health::Unhealthy), 0, "h").health,
            Health::Unhealthy as i32
        );
    }

    #[test]
    fn one_endpoint_per_port_when_ipv4_and_ipv6_binds_differ() {
        // As Docker 20.10 reports a `host_port: 0` mapping with IPv6 enabled.
        let json = DOCKER_INSPECT.replace(
            r#"{"HostIp":"::","HostPort":"8080"}"#,
            r#"{"HostIp":"::","HostPort":"32775"}"#,
        );
        let details: ContainerDetails = serde_json::from_str(&json).unwrap();
        assert_eq!(details.workload(None, 0, "vm").endpoints, vec!["vm:8080"]);
        let ipv6_only = DOCKER_INSPECT.replace(r#"{"HostIp":"0.0.0.0","HostPort":"8080"},"#, "");
        let details: ContainerDetails = serde_json::from_str(&ipv6_only).unwrap();
        assert_eq!(details.workload(None, 0, "vm").endpoints, vec!["vm:8080"]);
    }

    #[test]
    fn spec_round_trips_through_a_label() {
        let spec = WorkloadSpec {
            runtime: Runtime::Docker as i32,
            image: "busybox:berth".into(),
            command: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        };
        assert_eq!(decode_spec(&encode_spec(&spec)), Some(spec));
        assert_eq!(decode_spec("zz"), None);
    }
}
