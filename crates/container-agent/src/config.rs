//! The agent's config: `[server]`, `[agent]` and `[engines]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_server::ServerConfig;
use berth_server::cli::HasServerConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub agent: AgentConfig,
    pub engines: EnginesConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Bearer token callers must present. Required when `server.listen` is
    /// TCP: the agent can start root workloads, so only a unix socket (mode
    /// 0600) may go without one.
    pub token: String,
    /// Labels this host advertises for placement, e.g. `{ gpu = "h100" }`.
    pub labels: BTreeMap<String, String>,
    /// Execs running at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_execs: usize,
    /// Log lines kept per workload for `Logs`.
    pub log_lines_per_workload: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            labels: BTreeMap::new(),
            max_concurrent_execs: 256,
            log_lines_per_workload: 2000,
        }
    }
}

/// What the agent does with containers it created in an earlier life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leftovers {
    /// Take them back: list them, resume their health loops.
    Adopt,
    /// Remove them (force), e.g. for a host that must start clean.
    Sweep,
}

/// The container engines (docker, podman) the agent drives through their
/// Docker-compatible API sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnginesConfig {
    /// Docker socket: a path or `unix://` URL; `auto` tries `$DOCKER_HOST`
    /// then `/var/run/docker.sock`; `off` disables the docker runtime.
    pub docker: String,
    /// podman's Docker-compatible socket (`podman system service`): a path or
    /// `unix://` URL; `auto` tries `$CONTAINER_HOST`,
    /// `$XDG_RUNTIME_DIR/podman/podman.sock`, then `/run/podman/podman.sock`;
    /// `off` disables the podman runtime.
    pub podman: String,
    /// Value of the `berth.owner` label on every container this agent creates.
    /// Agents sharing an engine must use different owners: each one adopts or
    /// sweeps only its own containers.
    pub owner: String,
    /// At start: adopt or sweep this owner's containers left from before.
    pub leftovers: Leftovers,
    /// Upper bound of the backoff between health-check restarts of one workload.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// Largest image ImportImage accepts, in bytes.
    pub max_image_bytes: u64,
    /// Where the agent records the images it imported.
    pub state_dir: PathBuf,
}

impl Default for EnginesConfig {
    fn default() -> Self {
        Self {
            docker: "auto".to_string(),
            podman: "auto".to_string(),
            owner: "berth-agent".to_string(),
            leftovers: Leftovers::Adopt,
            restart_backoff_max: Duration::from_secs(60),
            max_image_bytes: 16 << 30,
            state_dir: berth_server::config::data_dir().join("agent"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults(&default_socket(), "127.0.0.1:9701"),
            agent: AgentConfig::default(),
            engines: EnginesConfig::default(),
        }
    }
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}

/// `$XDG_RUNTIME_DIR/berth/agent.sock` for a user, `/run/berth/agent.sock` otherwise.
fn default_socket() -> String {
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(dir) if !dir.is_empty() => format!("unix://{dir}/berth/agent.sock"),
        _ => "unix:///run/berth/agent.sock".to_string(),
    }
}
