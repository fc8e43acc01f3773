//! The agent's config: `[server]` plus `[agent]`.

use std::collections::BTreeMap;

use berth_server::ServerConfig;
use berth_server::cli::HasServerConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub agent: AgentConfig,
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

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults(&default_socket(), "127.0.0.1:9701"),
            agent: AgentConfig::default(),
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
