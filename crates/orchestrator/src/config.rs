//! The orchestrator's config: `[server]`, `[store]`, `[scheduler]`, `[auth]`,
//! `[ssh]`, `[manifest]` (the limits on one campaign manifest, and on the
//! text of a deployment recipe) and `[deployments]`.

use std::path::PathBuf;
use std::time::Duration;

use berth_server::ServerConfig;
use berth_server::cli::HasServerConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub scheduler: SchedulerConfig,
    pub auth: AuthConfig,
    pub ssh: crate::ssh_tunnel::SshConfig,
    pub manifest: crate::manifest::ManifestLimits,
    pub deployments: crate::deployment::DeploymentsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite file holding all of the orchestrator's state (when `url` is empty).
    pub path: PathBuf,
    /// A PostgreSQL database to hold the state instead
    /// (`postgres://user:password@host:5432/database`); empty: the SQLite
    /// file at `path`.
    pub url: String,
    /// Connections to the PostgreSQL database at most (each on a thread of
    /// its own); calls past them wait for one.
    pub max_connections: usize,
    /// With `url`: orchestrators sharing the database elect one leader by a
    /// lease in it; one that has not renewed it for this long is taken over
    /// from (it renews every third of it).
    #[serde(with = "humantime_serde")]
    pub leader_lease: Duration,
    /// With `url`: the address clients reach this orchestrator at, shown by
    /// the followers as the leader's (`orchestrator-b:7700`); empty:
    /// `server.listen`, which says little behind NAT or in a container.
    pub advertise: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Time between heartbeats to each host's agent.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Longest wait for an agent connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait between two tries to place a backend on a host.
    #[serde(with = "humantime_serde")]
    pub max_placement_backoff: Duration,
    /// Campaigns running at once; more wait, pending.
    pub max_running_campaigns: usize,
    /// Dispatches of one run, interrupted ones included (host or backend
    /// lost, orchestrator restarted without its exec); past it the run
    /// fails, so a run cannot bounce between hosts forever.
    pub max_run_attempts: u32,
    /// Tries to create and start a backend's workload that hosts' agents
    /// answered with a refusal (an image that is not there, a spec the
    /// engine rejects, a command that cannot start); past it the backend's
    /// runs fail with the agent's reason instead of waiting for a host
    /// forever. A host that does not answer is waited for and not counted.
    pub max_create_attempts: u32,
    /// Power samples stored with one run (all its devices together); a
    /// longer series keeps its first ones and is marked truncated.
    pub max_power_samples_per_run: usize,
    /// How long a run whose exec stream broke keeps trying to attach again
    /// while its agent does not answer (an agent restarting: its VM execs
    /// live on in the guest) before its host counts as lost.
    #[serde(with = "humantime_serde")]
    pub reattach_grace: Duration,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer token the orchestrator's callers must present; empty: none.
    pub token: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: berth_server::config::data_dir()
                .join("orchestrator")
                .join("state.db"),
            url: String::new(),
            max_connections: 4,
            leader_lease: Duration::from_secs(3),
            advertise: String::new(),
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_placement_backoff: Duration::from_secs(10),
            max_running_campaigns: 64,
            max_run_attempts: 10,
            max_create_attempts: 5,
            max_power_samples_per_run: 100_000,
            reattach_grace: Duration::from_secs(10),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults("127.0.0.1:7700", "127.0.0.1:9700"),
            store: StoreConfig::default(),
            scheduler: SchedulerConfig::default(),
            auth: AuthConfig::default(),
            ssh: crate::ssh_tunnel::SshConfig::default(),
            manifest: crate::manifest::ManifestLimits::default(),
            deployments: crate::deployment::DeploymentsConfig::default(),
        }
    }
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}
