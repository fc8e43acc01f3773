//! The agent's config: `[server]`, `[agent]`, `[engines]` and `[libvirt]`.

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
    pub libvirt: LibvirtConfig,
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
    /// How long a keyed exec's record (output tail, exit status) stays
    /// attachable after the exec ends: long enough for an orchestrator that
    /// died mid-run to come back and adopt the run.
    #[serde(with = "humantime_serde")]
    pub keyed_exec_retention: Duration,
    /// Keyed execs remembered at once, running or ended; when full, the
    /// oldest ended one is forgotten, and with none ended a new keyed exec is
    /// refused with RESOURCE_EXHAUSTED.
    pub max_keyed_execs: usize,
    /// Output bytes (stdout and stderr together) kept per keyed exec for
    /// AttachExec; older output is dropped and the attacher told how much.
    pub keyed_exec_tail_bytes: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            labels: BTreeMap::new(),
            max_concurrent_execs: 256,
            log_lines_per_workload: 2000,
            keyed_exec_retention: Duration::from_secs(15 * 60),
            max_keyed_execs: 512,
            keyed_exec_tail_bytes: 512 * 1024,
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
    /// Value of the `berth.owner` label on every container this agent creates,
    /// and the owner in the berth metadata of every libvirt domain it defines.
    /// Agents sharing an engine or a hypervisor must use different owners:
    /// each one manages only its own containers and VMs.
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

/// The libvirt runtime: VMs on a hypervisor reached through libvirt, which
/// the agent loads at run time (`libvirt.so.0`); without it the runtime is
/// reported unavailable, with the loader's reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Connection URI: `qemu:///system`, `qemu:///session`,
    /// `qemu+ssh://user@host/system`, `test:///path/node.xml`. `auto` uses
    /// `$LIBVIRT_DEFAULT_URI`, else `qemu:///system` when a system libvirt
    /// daemon's socket exists, else leaves the runtime off; `off` disables
    /// it. A daemon that does not answer is not fatal: calls report
    /// UNAVAILABLE and the next one connects again. Overlays and seeds are
    /// made on the agent's host, so a remote URI suits only volume disks.
    pub uri: String,
    /// Where the agent makes VM overlays and cloud-init seeds, one directory
    /// per VM, removed with it. Must be readable by the hypervisor.
    pub disk_dir: PathBuf,
    /// `<domain type>`: `auto` (`test` on libvirt's test driver, else `kvm`),
    /// or any type libvirt knows, e.g. `qemu` (emulation, for hosts without
    /// KVM).
    pub domain_type: String,
    /// How often the agent checks its domains for changes made outside it
    /// (a guest powering off, `virsh`), to report them as events.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uri: "auto".to_string(),
            disk_dir: berth_server::config::data_dir()
                .join("agent")
                .join("libvirt"),
            domain_type: "auto".to_string(),
            poll_interval: Duration::from_secs(2),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults(&default_socket(), "127.0.0.1:9701"),
            agent: AgentConfig::default(),
            engines: EnginesConfig::default(),
            libvirt: LibvirtConfig::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_settings_come_from_file_and_env() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "[libvirt]\nuri = \"qemu:///session\"\npoll_interval = \"5s\"\n",
        )
        .unwrap();
        let env = vec![(
            "BERTH_LIBVIRT__DISK_DIR".to_string(),
            "/srv/vm-disks".to_string(),
        )];
        let config: Config =
            berth_server::config::load_from_env(Some(file.path()), &[], env).unwrap();
        assert_eq!(config.libvirt.uri, "qemu:///session");
        assert_eq!(config.libvirt.poll_interval, Duration::from_secs(5));
        assert_eq!(config.libvirt.disk_dir, PathBuf::from("/srv/vm-disks"));
        assert_eq!(config.libvirt.domain_type, "auto");
        assert_eq!(Config::default().libvirt.uri, "auto");

        std::fs::write(file.path(), "[libvirt]\nurl = \"qemu:///system\"\n").unwrap();
        let error = berth_server::config::load_from_env::<Config>(Some(file.path()), &[], vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("url"), "{error}");
    }

    #[test]
    fn keyed_exec_retention_comes_from_env() {
        let env = vec![(
            "BERTH_AGENT__KEYED_EXEC_RETENTION".to_string(),
            "90s".to_string(),
        )];
        let config: Config = berth_server::config::load_from_env(None, &[], env).unwrap();
        assert_eq!(config.agent.keyed_exec_retention, Duration::from_secs(90));
        assert_eq!(config.agent.max_keyed_execs, 512);
    }
}
