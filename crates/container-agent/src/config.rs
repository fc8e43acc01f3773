//! The agent's config: `[server]`, `[agent]`, `[engines]`, `[libvirt]` and `[slurm]`.

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
    pub slurm: SlurmConfig,
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
    /// Path of the NVML library the agent loads at start to find the host's
    /// NVIDIA GPUs; empty: the driver's `libnvidia-ml.so.1`. Without NVML
    /// the agent reports no GPUs (and says why in its log).
    pub nvml_library: String,
    /// GPUs this host reports instead of the ones NVML finds: for GPUs NVML
    /// cannot see (other vendors) and for test hosts without a GPU. When
    /// non-empty, NVML is not consulted. Indexes and UUIDs must be unique.
    pub declared_gpus: Vec<DeclaredGpu>,
}

/// A GPU declared in `agent.declared_gpus`, reported as is by `Info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredGpu {
    /// Index as the driver numbers it.
    pub index: u32,
    /// Driver UUID, e.g. `GPU-5a3c…`; must not be empty.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// The power sampler's device that reads this GPU (what a campaign
    /// measuring it asks for); empty: `nvml:<index>`. Test hosts name a
    /// replay device here, other vendors' GPUs their own source's.
    #[serde(default)]
    pub power_device: String,
}

/// A config value that serde accepts but the agent cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{field} = {value}: {reason}")]
pub struct InvalidField {
    /// Dotted path of the field, e.g. `agent.declared_gpus[1].uuid`.
    pub field: String,
    /// The value as written in TOML.
    pub value: String,
    pub reason: String,
}

impl AgentConfig {
    /// Checks what serde cannot: declared GPUs have a UUID, and no index or
    /// UUID is declared twice.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let field = |slot: usize, name: &str| format!("agent.declared_gpus[{slot}].{name}");
        for (slot, gpu) in self.declared_gpus.iter().enumerate() {
            if gpu.uuid.trim().is_empty() {
                return Err(InvalidField {
                    field: field(slot, "uuid"),
                    value: format!("{:?}", gpu.uuid),
                    reason: "must not be empty".into(),
                });
            }
            let earlier = &self.declared_gpus[..slot];
            if let Some(first) = earlier.iter().position(|g| g.index == gpu.index) {
                return Err(InvalidField {
                    field: field(slot, "index"),
                    value: gpu.index.to_string(),
                    reason: format!("already declared by agent.declared_gpus[{first}]"),
                });
            }
            if let Some(first) = earlier.iter().position(|g| g.uuid == gpu.uuid) {
                return Err(InvalidField {
                    field: field(slot, "uuid"),
                    value: format!("{:?}", gpu.uuid),
                    reason: format!("already declared by agent.declared_gpus[{first}]"),
                });
            }
        }
        Ok(())
    }
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
            nvml_library: String::new(),
            declared_gpus: Vec::new(),
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
    /// A static `berth-exec-shim` binary on this host; empty: off. When set,
    /// every container the agent creates gets it bind-mounted with a socket
    /// directory of its own (under `state_dir`), the agent starts it at each
    /// container start, and execs go to it (a fork in the container) rather
    /// than through the engine's exec API (~40 ms each on Docker 20.10).
    pub exec_shim: PathBuf,
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
            exec_shim: PathBuf::new(),
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
    /// `<domain type>`: `auto` (`test` on libvirt's test driver; else `kvm`
    /// when libvirt's domain capabilities offer KVM and a local /dev/kvm is
    /// not kvm_pvm, which boots only PVM guest kernels; else `qemu`), or any
    /// type libvirt knows, e.g. `qemu` (emulation, TCG) or `kvm` to force it.
    pub domain_type: String,
    /// How often the agent checks its domains for changes made outside it
    /// (a guest powering off, `virsh`), to report them as events.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a keyed exec in a VM runs on with no agent attached (the
    /// agent died or restarted) before the guest's shim kills it: a new
    /// agent within this time re-attaches and takes its output and exit.
    #[serde(with = "humantime_serde")]
    pub exec_detach_grace: Duration,
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
            exec_detach_grace: Duration::from_secs(600),
        }
    }
}

/// The slurm runtime: workloads are SLURM batch jobs submitted through
/// slurmrestd's REST API (OpenAPI v0.0.38); execs are job steps started
/// with the cluster's `srun`, so the agent runs where both reach the
/// cluster (a login node).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// slurmrestd: `http://host:port` or `unix:///path/to/slurmrestd.sock`;
    /// `off` (the default) leaves the runtime off.
    pub rest_url: String,
    /// The user jobs are submitted as (`X-SLURM-USER-NAME`); empty: the
    /// user the agent runs as.
    pub user: String,
    /// The user's JWT (`scontrol token`), sent as `X-SLURM-USER-TOKEN`.
    pub token: String,
    /// A file holding the JWT instead of `token`, read at each request so a
    /// renewed token is used without a restart.
    pub token_file: PathBuf,
    /// Partition of a job whose spec names none; empty: the cluster's default.
    pub default_partition: String,
    /// Where jobs write their stdout and stderr (`<job name>.out`/`.err`),
    /// which `Logs` reads: a directory the compute nodes and the agent share.
    pub output_dir: PathBuf,
    /// The `srun` that starts exec steps.
    pub srun: PathBuf,
    /// slurm.conf for `srun` (`SLURM_CONF`); empty: srun's own default.
    pub slurm_conf: PathBuf,
    /// What the nodes run a workload's `image` with (`apptainer`,
    /// `singularity`, `podman`); `off`: images are refused.
    pub container_runtime: crate::runtime::slurm::container::ContainerRuntime,
    /// How long StartWorkload waits for a released job to leave PENDING
    /// before it answers with the job still pending (and its reason).
    #[serde(with = "humantime_serde")]
    pub start_wait: Duration,
    /// How often job states are read for events (a job ending, timing out).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest wait for one slurmrestd answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            rest_url: "off".to_string(),
            user: String::new(),
            token: String::new(),
            token_file: PathBuf::new(),
            default_partition: String::new(),
            output_dir: berth_server::config::data_dir().join("agent").join("slurm"),
            srun: PathBuf::from("srun"),
            slurm_conf: PathBuf::new(),
            container_runtime: Default::default(),
            start_wait: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                // Specs and execs are small, and ImportImage streams its
                // tar in chunks of up to this: prost builds a whole request
                // before it is checked, so this bounds its memory.
                max_message_bytes: 1 << 20,
                ..ServerConfig::with_defaults(&default_socket(), "127.0.0.1:9701")
            },
            agent: AgentConfig::default(),
            engines: EnginesConfig::default(),
            libvirt: LibvirtConfig::default(),
            slurm: SlurmConfig::default(),
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
pub(crate) mod tests {
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
    fn slurm_settings_come_from_file_and_env() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "[slurm]\nrest_url = \"http://login1:6820\"\nuser = \"alice\"\nstart_wait = \"5s\"\n",
        )
        .unwrap();
        let env = vec![(
            "BERTH_SLURM__DEFAULT_PARTITION".to_string(),
            "gpu".to_string(),
        )];
        let config: Config =
            berth_server::config::load_from_env(Some(file.path()), &[], env).unwrap();
        assert_eq!(config.slurm.rest_url, "http://login1:6820");
        assert_eq!(config.slurm.user, "alice");
        assert_eq!(config.slurm.default_partition, "gpu");
        assert_eq!(config.slurm.start_wait, Duration::from_secs(5));
        assert_eq!(Config::default().slurm.rest_url, "off");
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

    pub(crate) fn gpu(index: u32, uuid: &str) -> DeclaredGpu {
        DeclaredGpu {
            index,
            uuid: uuid.into(),
            name: "Test GPU".into(),
            memory_bytes: 80 << 30,
            power_device: String::new(),
        }
    }

    #[test]
    fn gpu_settings_come_from_file_env_and_flags() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "[agent]\nnvml_library = \"/opt/nvidia/libnvidia-ml.so.1\"\n\n\
             [[agent.declared_gpus]]\nindex = 0\nuuid = \"GPU-a\"\nname = \"Test GPU\"\nmemory_bytes = 85899345920\n",
        )
        .unwrap();
        let config: Config =
            berth_server::config::load_from_env(Some(file.path()), &[], vec![]).unwrap();
        assert_eq!(config.agent.nvml_library, "/opt/nvidia/libnvidia-ml.so.1");
        assert_eq!(config.agent.declared_gpus, vec![gpu(0, "GPU-a")]);
        config.agent.validate().unwrap();

        let two = r#"[{index = 0, uuid = "GPU-a", name = "Test GPU", memory_bytes = 85899345920},
                      {index = 1, uuid = "GPU-b", name = "Test GPU", memory_bytes = 85899345920}]"#;
        let env = vec![("BERTH_AGENT__DECLARED_GPUS".to_string(), two.to_string())];
        let config: Config = berth_server::config::load_from_env(None, &[], env).unwrap();
        assert_eq!(
            config.agent.declared_gpus,
            vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")]
        );
        let flag = vec![("agent.declared_gpus".to_string(), two.to_string())];
        let config: Config = berth_server::config::load_from_env(None, &flag, vec![]).unwrap();
        assert_eq!(config.agent.declared_gpus.len(), 2);

        let defaults = Config::default().agent;
        assert!(defaults.nvml_library.is_empty() && defaults.declared_gpus.is_empty());

        let typo = vec![(
            "BERTH_AGENT__DECLARED_GPUS".to_string(),
            r#"[{index = 0, uuid = "GPU-a", name = "x", memory = "80GiB"}]"#.to_string(),
        )];
        let error = berth_server::config::load_from_env::<Config>(None, &[], typo)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`memory`"), "{error}");
    }

    #[test]
    fn declared_gpus_are_validated() {
        let with = |gpus: Vec<DeclaredGpu>| AgentConfig {
            declared_gpus: gpus,
            ..AgentConfig::default()
        };
        let error = |gpus| with(gpus).validate().unwrap_err().to_string();
        with(vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")])
            .validate()
            .unwrap();
        assert_eq!(
            error(vec![gpu(0, "GPU-a"), gpu(1, "GPU-a")]),
            "agent.declared_gpus[1].uuid = \"GPU-a\": already declared by agent.declared_gpus[0]"
        );
        assert_eq!(
            error(vec![gpu(0, "GPU-a"), gpu(1, "GPU-b"), gpu(0, "GPU-c")]),
            "agent.declared_gpus[2].index = 0: already declared by agent.declared_gpus[0]"
        );
        assert_eq!(
            error(vec![gpu(0, "GPU-a"), gpu(1, "")]),
            "agent.declared_gpus[1].uuid = \"\": must not be empty"
        );
    }
}
