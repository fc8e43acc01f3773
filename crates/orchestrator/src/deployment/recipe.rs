//! Deployment recipes (YAML): a long-lived workload, how many replicas of
//! it to keep, where, how to tell it is healthy and what to do when it is
//! not. Parsed within the manifest limits and validated before anything is
//! stored; every error is `file:line:column` and names the field.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use crate::manifest::{
    self, Backend, ByteSize, GpuRequest, ManifestError, ManifestLimits, Mount, PathStep, Resources,
    RuntimeName, Slurm, Source, Vm,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Deployment name, unique among live deployments.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub runtime: RuntimeName,
    /// Container image (container runtimes).
    #[serde(default)]
    pub image: String,
    /// An image archive on the orchestrator's machine, imported as `image`
    /// into each host's engine that lacks it before a replica starts there
    /// (state Building): hosts need no registry.
    #[serde(default)]
    pub import: Option<ImageImport>,
    /// The long-running command; `{{port.<name>}}` and `{{replica}}` are
    /// replaced. A VM has none: its guest starts what it serves (cloud-init).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub gpus: Option<GpuRequest>,
    /// `nofile: 65536` (soft and hard) or `nofile: {soft: 1024, hard: 65536}`.
    #[serde(default)]
    pub ulimits: BTreeMap<String, Ulimit>,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub restart: Restart,
    /// Time a replica gets to stop before it is killed.
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// The VM of a `runtime: libvirt` replica, as a campaign backend's.
    #[serde(default)]
    pub vm: Option<Vm>,
    /// The batch job of a `runtime: slurm` replica (partition, account,
    /// time limit, …), as a campaign backend's: a replica is a job kept
    /// running, submitted again when it ends (its time limit included).
    #[serde(default)]
    pub slurm: Option<Slurm>,
}

fn one() -> u32 {
    1
}

fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    /// Absolute path of the tar on the orchestrator's machine.
    pub archive: String,
    /// A rootfs tar (as `docker import` takes) rather than a `docker save`
    /// archive.
    #[serde(default)]
    pub rootfs: bool,
    /// A rootfs image's default command.
    #[serde(default)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    /// The port the workload listens on: for a container, inside it; for a
    /// host process, on the host, and 0 (or left out) has one allocated per
    /// replica from `deployments.port_range`.
    #[serde(default)]
    pub port: u16,
    /// Containers: the host port published for `port`; 0 has one allocated
    /// per replica. Host processes bind host ports themselves: leave it out.
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Ulimit {
    Both(i64),
    Pair { soft: i64, hard: i64 },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A GET of `path` on `port` answers 2xx or 3xx.
    Http,
    /// gRPC's standard health service answers SERVING on `port`.
    Grpc,
    /// A TCP connection to `port` is accepted.
    Tcp,
    /// `command`, exec'd in the replica by its agent, exits 0.
    Exec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub check: CheckKind,
    /// The name of one of the recipe's ports (http, grpc, tcp).
    #[serde(default)]
    pub port: String,
    /// HTTP path (http), default `/`.
    #[serde(default)]
    pub path: String,
    /// gRPC service name (grpc); empty: the server as a whole.
    #[serde(default)]
    pub service: String,
    /// Command (exec).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed checks in a row after which a running replica is restarted.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// After a start, failed checks do not count for this long (the replica
    /// is starting, not unhealthy).
    #[serde(default, with = "humantime_serde")]
    pub start_period: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_retries() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Replicas on as many hosts as fit (fewest replicas first).
    #[default]
    Spread,
    /// Replicas on as few hosts as fit (most replicas first).
    Pack,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only these hosts, by name; empty: any.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Labels a host must have.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub strategy: Spread,
    /// Fewest GPUs a host must have.
    #[serde(default)]
    pub gpus: u32,
    /// Least memory a host must have, e.g. `16GiB`.
    #[serde(default)]
    pub memory: Option<ByteSize>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit: the service is meant to run until stopped.
    #[default]
    Always,
    /// Only a failed exit (or an unhealthy replica); success completes it.
    OnFailure,
    /// Never: an exit completes (or fails) the replica.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Restarts in a row (without `reset_after` of healthy running between
    /// them) after which the replica, and so the deployment, fails.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// First wait before a restart; doubled at each restart in a row.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Running healthy this long clears the restarts in a row.
    #[serde(default = "default_reset_after", with = "humantime_serde")]
    pub reset_after: Duration,
}

fn default_max_restarts() -> u32 {
    10
}

fn default_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

fn default_reset_after() -> Duration {
    Duration::from_secs(60)
}

impl Default for Restart {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::default(),
            max_restarts: default_max_restarts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            reset_after: default_reset_after(),
        }
    }
}

impl Restart {
    /// The wait before the `in_a_row`-th restart in a row (from 1).
    pub fn backoff_before(&self, in_a_row: u32) -> Duration {
        let doublings = in_a_row.saturating_sub(1).min(20);
        self.backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

impl Recipe {
    /// The recipe's workload as a campaign backend, for what both share:
    /// resource checks, host fit and the agent's workload spec.
    pub fn backend(&self) -> Backend {
        Backend {
            name: self.name.clone(),
            runtime: self.runtime,
            deployment: String::new(),
            image: self.image.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            placement: manifest::Placement {
                labels: self.placement.labels.clone(),
                host: String::new(),
                gpus: self.placement.gpus,
                memory: self.placement.memory,
            },
            resources: self.resources.clone(),
            gpus: self.gpus.clone(),
            mounts: self.mounts.clone(),
            vm: self.vm.clone(),
            slurm: self.slurm.clone(),
        }
    }

    /// Whether its replicas hold GPUs (and so must never run twice).
    pub fn owns_gpus(&self) -> bool {
        self.gpus.is_some()
    }

    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name == name)
    }
}

/// Limits on a recipe besides those of its text (the manifest's).
#[derive(Debug, Clone, Copy)]
pub struct RecipeLimits {
    pub max_replicas: u32,
}

/// Parses and validates a recipe.
pub fn parse(
    source_name: &str,
    text: &str,
    limits: &ManifestLimits,
    recipe_limits: RecipeLimits,
) -> Result<Recipe, ManifestError> {
    let source = Source {
        name: source_name,
        text,
    };
    let recipe: Recipe = manifest::parse_document(source, limits)?;
    validate(source, &recipe, recipe_limits)?;
    Ok(recipe)
}

/// What serde cannot check: names, counts, ports and health check against
/// the runtime, placeholders.
fn validate(
    source: Source<'_>,
    recipe: &Recipe,
    limits: RecipeLimits,
) -> Result<(), ManifestError> {
    let at = |path: &[&str], message: String| source.at(path, message);
    manifest::check_identifier(&recipe.name).map_err(|e| at(&["name"], format!("name: {e}")))?;
    if recipe.replicas > limits.max_replicas {
        return Err(at(
            &["replicas"],
            format!(
                "replicas: {} is more than deployments.max_replicas ({})",
                recipe.replicas, limits.max_replicas
            ),
        ));
    }
    match recipe.runtime {
        RuntimeName::Process if recipe.command.is_empty() => {
            return Err(at(
                &["runtime"],
                "command: a process deployment needs the command that serves".into(),
            ));
        }
        RuntimeName::Docker | RuntimeName::Podman if recipe.image.is_empty() => {
            return Err(at(
                &["runtime"],
                "image: a container deployment needs an image".into(),
            ));
        }
        RuntimeName::Libvirt if !recipe.command.is_empty() => {
            return Err(at(
                &["command"],
                "command: a VM's guest starts what it serves itself: give it as a script in vm.cloud_init (user-data starting with `#!`)".into(),
            ));
        }
        RuntimeName::Slurm if recipe.command.is_empty() => {
            return Err(at(
                &["runtime"],
                "command: a SLURM deployment needs the command its job serves with".into(),
            ));
        }
        RuntimeName::Slurm if recipe.backend().array().is_some() => {
            return Err(at(
                &["slurm", "array"],
                "slurm.array: a replica is one job kept running, not an array of runs".into(),
            ));
        }
        RuntimeName::Slurm if !recipe.ulimits.is_empty() => {
            return Err(at(
                &["ulimits"],
                "ulimits: a SLURM job has the limits its cluster sets".into(),
            ));
        }
        _ => {}
    }
    manifest::check_vm(&recipe.backend(), "recipe").map_err(|(path, message)| at(path, message))?;
    manifest::check_slurm(&recipe.backend(), "recipe")
        .map_err(|(path, message)| at(path, message))?;
    if recipe.runtime == RuntimeName::Libvirt {
        let for_containers: [(&str, bool); 4] = [
            ("env", !recipe.env.is_empty()),
            ("working_dir", !recipe.working_dir.is_empty()),
            ("ulimits", !recipe.ulimits.is_empty()),
            ("resources", recipe.resources != Resources::default()),
        ];
        if let Some((key, _)) = for_containers.into_iter().find(|(_, given)| *given) {
            return Err(at(
                &[key],
                format!(
                    "{key}: a VM is sized by vm.vcpus and vm.memory and configured by vm.cloud_init"
                ),
            ));
        }
    }
    if let Some(import) = &recipe.import {
        let at = |message: String| source.at(&["import", "archive"], message);
        if !matches!(recipe.runtime, RuntimeName::Docker | RuntimeName::Podman) {
            return Err(at(
                "import: only a container runtime (docker, podman) imports an image".into(),
            ));
        }
        let path = std::path::Path::new(&import.archive);
        if !path.is_absolute() {
            return Err(at(format!(
                "import.archive: `{}` must be an absolute path (on the orchestrator's machine)",
                import.archive
            )));
        }
        if !path.is_file() {
            return Err(at(format!(
                "import.archive: `{}` is not a file on the orchestrator's machine",
                import.archive
            )));
        }
    }
    let mut workload = recipe.backend();
    if recipe.runtime == RuntimeName::Process {
        // A host process is told its GPUs (CUDA_VISIBLE_DEVICES); the
        // agent is not asked for them.
        workload.gpus = None;
    }
    manifest::check_backend_resources(&workload, "recipe")
        .map_err(|(path, message)| at(path, message))?;
    check_ports(source, recipe)?;
    for (name, limit) in &recipe.ulimits {
        if !matches!(
            name.as_str(),
            "nofile" | "nproc" | "memlock" | "core" | "stack"
        ) {
            return Err(at(
                &["ulimits", name],
                format!("ulimits.{name}: not one of nofile, nproc, memlock, core, stack"),
            ));
        }
        if let Ulimit::Pair { soft, hard } = limit
            && soft > hard
        {
            return Err(at(
                &["ulimits", name],
                format!("ulimits.{name}: soft {soft} is above hard {hard}"),
            ));
        }
    }
    if let Some(health) = &recipe.health {
        check_health(source, recipe, health)?;
    }
    let restart = &recipe.restart;
    if restart.backoff.is_zero() || restart.max_backoff < restart.backoff {
        return Err(at(
            &["restart", "backoff"],
            "restart.backoff: must be above 0 and at most restart.max_backoff".into(),
        ));
    }
    check_placeholders(source, recipe)
}

fn check_ports(source: Source<'_>, recipe: &Recipe) -> Result<(), ManifestError> {
    let mut names = BTreeSet::new();
    for (index, port) in recipe.ports.iter().enumerate() {
        // At the port's key, or at the port when the key is left out.
        let at = |key: &str, message: String| {
            let path = [
                PathStep::Key("ports"),
                PathStep::Index(index),
                PathStep::Key(key),
            ];
            source.at_path(&path, message)
        };
        if port.name.is_empty()
            || port.name.len() > 32
            || !port
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(at(
                "name",
                format!(
                    "ports.name: `{}` must be 1 to 32 lower-case letters, digits or _",
                    port.name
                ),
            ));
        }
        if !names.insert(port.name.as_str()) {
            return Err(at(
                "name",
                format!("ports: duplicate port name `{}`", port.name),
            ));
        }
        match recipe.runtime {
            runtime if runtime.binds_its_ports() && port.host_port != 0 => {
                return Err(at(
                    "host_port",
                    format!(
                        "ports[{}].host_port: a host process or SLURM job binds its port itself; give it as `port`",
                        port.name
                    ),
                ));
            }
            RuntimeName::Docker | RuntimeName::Podman if port.port == 0 => {
                return Err(at(
                    "port",
                    format!(
                        "ports[{}].port: a container port must be given (the port the image listens on)",
                        port.name
                    ),
                ));
            }
            RuntimeName::Libvirt if port.port == 0 || port.host_port != 0 => {
                return Err(at(
                    if port.port == 0 { "port" } else { "host_port" },
                    format!(
                        "ports[{}]: a VM answers on its own address: give the guest's `port`, and no host_port",
                        port.name
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_health(
    source: Source<'_>,
    recipe: &Recipe,
    health: &HealthCheck,
) -> Result<(), ManifestError> {
    let at = |key: &str, message: String| source.at(&["health", key], message);
    if health.interval.is_zero() || health.timeout.is_zero() {
        return Err(at(
            "interval",
            "health: interval and timeout must be above 0".into(),
        ));
    }
    if health.retries == 0 {
        return Err(at("retries", "health.retries: must be at least 1".into()));
    }
    match health.check {
        CheckKind::Exec if health.command.is_empty() => Err(at(
            "command",
            "health.command: an exec check needs a command".into(),
        )),
        CheckKind::Http | CheckKind::Grpc | CheckKind::Tcp => {
            if recipe.port(&health.port).is_none() {
                let known: Vec<&str> = recipe.ports.iter().map(|p| p.name.as_str()).collect();
                return Err(at(
                    "port",
                    format!(
                        "health.port: `{}` is not one of the recipe's ports ({})",
                        health.port,
                        if known.is_empty() {
                            "it has none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            if health.check == CheckKind::Http
                && !health.path.is_empty()
                && !health.path.starts_with('/')
            {
                return Err(at(
                    "path",
                    format!("health.path: `{}` must start with /", health.path),
                ));
            }
            Ok(())
        }
        CheckKind::Exec => Ok(()),
    }
}

/// `{{port.<name>}}` of a declared port and `{{replica}}` are the only
/// placeholders a recipe's command and env may hold.
fn check_placeholders(source: Source<'_>, recipe: &Recipe) -> Result<(), ManifestError> {
    // Each template with where it is: the command's argument, the env's key.
    let command = recipe
        .command
        .iter()
        .enumerate()
        .map(|(index, arg)| ("command", PathStep::Index(index), arg));
    let env = recipe
        .env
        .iter()
        .map(|(name, value)| ("env", PathStep::Key(name), value));
    for (key, step, template) in command.chain(env) {
        let at = |message: String| source.at_path(&[PathStep::Key(key), step], message);
        let Some(names) = manifest::placeholder_names(template) else {
            return Err(at(format!("{key}: unclosed `{{{{` in `{template}`")));
        };
        for name in names {
            let known = name == "replica"
                || name
                    .strip_prefix("port.")
                    .is_some_and(|port| recipe.port(port).is_some());
            if !known {
                return Err(at(format!(
                    "{key}: unknown placeholder `{{{{{name}}}}}` in `{template}` (a recipe has {{{{replica}}}} and {{{{port.<name>}}}} of its ports)"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RecipeLimits = RecipeLimits { max_replicas: 100 };

    fn parse_text(text: &str) -> Result<Recipe, ManifestError> {
        parse("recipe.yaml", text, &ManifestLimits::default(), LIMITS)
    }

    #[test]
    fn a_full_recipe_parses_with_its_defaults() {
        let recipe = parse_text(
            "name: web\nruntime: process\ncommand: [python3, -m, http.server, '{{port.http}}']\nports:\n  - name: http\n    protocol: http\nhealth:\n  check: http\n  port: http\n  interval: 1s\nreplicas: 3\nrestart:\n  policy: on-failure\n",
        )
        .unwrap();
        assert_eq!(recipe.replicas, 3);
        assert_eq!(recipe.ports[0].protocol, Protocol::Http);
        assert_eq!(recipe.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(recipe.restart.max_restarts, 10);
        assert_eq!(recipe.health.unwrap().retries, 3);
        assert_eq!(recipe.stop_grace, Duration::from_secs(10));
    }

    #[test]
    fn a_slurm_recipe_is_a_job_with_its_settings() {
        let recipe = parse_text(
            "name: web\nruntime: slurm\ncommand: [httpd, -f, -p, '{{port.http}}']\nports:\n  - name: http\nresources: {cpus: 1, memory: 256MiB}\nslurm:\n  partition: debug\n  time_limit: 1h\n",
        )
        .unwrap();
        let job = recipe.backend().slurm.expect("the job's settings");
        assert_eq!(job.partition, "debug");
        assert_eq!(job.time_limit, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn errors_name_the_field_and_its_line() {
        let cases = [
            (
                "name: web\nruntime: process\ncommand: [x]\nhealth:\n  check: http\n  port: web\n",
                6,
                "health.port: `web` is not one of the recipe's ports (it has none)",
            ),
            (
                "name: web\nruntime: docker\nports:\n  - name: http\n",
                2,
                "image: a container deployment needs an image",
            ),
            (
                "name: web\nruntime: process\ncommand: ['{{port.grpc}}']\nports:\n  - name: http\n",
                3,
                "unknown placeholder `{{port.grpc}}`",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nreplicas: 101\n",
                4,
                "replicas: 101 is more than deployments.max_replicas (100)",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nports:\n  - name: http\n    host_port: 80\n",
                6,
                "a host process or SLURM job binds its port itself",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nrestart:\n  policy: sometimes\n",
                5,
                "unknown variant `sometimes`",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nports:\n  - name: a\n  - name: a\n",
                6,
                "duplicate port name `a`",
            ),
            (
                "name: web\nruntime: slurm\n",
                2,
                "command: a SLURM deployment needs the command its job serves with",
            ),
            (
                "name: web\nruntime: slurm\ncommand: [x]\nports:\n  - name: http\n    host_port: 80\n",
                6,
                "a host process or SLURM job binds its port itself",
            ),
            (
                "name: web\nruntime: slurm\ncommand: [x]\nulimits: {nofile: 10}\n",
                4,
                "ulimits: a SLURM job has the limits its cluster sets",
            ),
            (
                "name: web\nruntime: slurm\ncommand: [x]\ngpus: {count: 1}\n",
                4,
                "recipe.gpus: SLURM gives a job its GPUs: ask with slurm.gres",
            ),
            (
                "name: web\nruntime: slurm\ncommand: [x]\nslurm:\n  array: {runs: 4}\n",
                5,
                "slurm.array: a replica is one job kept running",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nslurm: {partition: debug}\n",
                4,
                "recipe.slurm: only a `runtime: slurm` backend is a SLURM job",
            ),
            (
                "name: web\nruntime: slurm\ncommand: [x]\nslurm:\n  time_limit: 0s\n",
                5,
                "recipe.slurm.time_limit: must be positive",
            ),
        ];
        for (text, line, message) in cases {
            let error = parse_text(text).unwrap_err();
            assert!(
                error.message.contains(message),
                "{text}: {} lacks {message}",
                error.message
            );
            assert_eq!(error.line, line, "{text}: {error}");
        }
    }

    const VM: &str = "name: vm-web\nruntime: libvirt\nvm:\n  memory: 256MiB\n  disks: [{image: /var/lib/berth/base.qcow2}]\n  cloud_init: |\n    #!/bin/sh\n    httpd -p 8080\n";

    #[test]
    fn a_vm_recipe_parses_and_its_workload_is_its_vm() {
        let recipe = parse_text(&format!("{VM}ports:\n  - name: http\n    port: 8080\n")).unwrap();
        let vm = recipe.vm.as_ref().unwrap();
        assert_eq!(vm.memory.0, 256 << 20);
        assert!(vm.cloud_init.starts_with("#!/bin/sh"));
        assert_eq!(recipe.backend().vm.as_ref(), Some(vm));
    }

    #[test]
    fn a_vm_recipe_refuses_what_a_vm_cannot_take() {
        let cases = [
            (
                "name: vm-web\nruntime: libvirt\n".to_string(),
                2,
                "runtime: libvirt needs a `vm:` section",
            ),
            (
                format!("{VM}command: [httpd]\n"),
                9,
                "command: a VM's guest starts what it serves itself",
            ),
            (
                format!("{VM}ports:\n  - name: http\n"),
                10,
                "ports[http]: a VM answers on its own address",
            ),
            (
                format!("{VM}ports:\n  - name: http\n    port: 80\n    host_port: 8080\n"),
                12,
                "give the guest's `port`, and no host_port",
            ),
            (
                format!("{VM}env: {{A: b}}\n"),
                9,
                "env: a VM is sized by vm.vcpus and vm.memory",
            ),
            (
                format!("{VM}image: busybox\n"),
                9,
                "recipe.image: a VM boots its disks",
            ),
            (
                "name: web\nruntime: process\ncommand: [x]\nvm:\n  memory: 1GiB\n  disks: []\n"
                    .to_string(),
                4,
                "recipe.vm: only a `runtime: libvirt` backend runs a VM",
            ),
        ];
        for (text, line, message) in cases {
            let error = parse_text(&text).unwrap_err();
            assert!(
                error.message.contains(message),
                "{text}: {} lacks {message}",
                error.message
            );
            assert_eq!(error.line, line, "{text}: {error}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let restart = Restart {
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(3),
            ..Restart::default()
        };
        let waits: Vec<u128> = (1..=5)
            .map(|n| restart.backoff_before(n).as_millis())
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 3000, 3000]);
        assert_eq!(restart.backoff_before(u32::MAX), Duration::from_secs(3));
    }
}
