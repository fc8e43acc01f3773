//! A `WorkloadSpec` checked field by field and turned into the engine's
//! container config. Every error names the field it is about.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use berth_proto::common::v1::{RestartPolicy, WorkloadSpec};
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, PortBinding, ResourcesUlimits,
    RestartPolicy as EngineRestart, RestartPolicyNameEnum,
};

use super::engine::{Dialect, EngineVersions};
use super::inspect::{LABEL_NAME, LABEL_OWNER, LABEL_SPEC, encode_spec};
use crate::error::AgentError;

/// The kernel refuses memory limits below this (docker's own minimum).
const MIN_MEMORY_BYTES: u64 = 6 << 20;
const ULIMITS: [&str; 15] = [
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Checks what needs no engine: everything but the image's existence and the
/// GPUs (see [`Dialect::gpus`]).
pub fn validate(spec: &WorkloadSpec) -> Result<(), AgentError> {
    if spec.image.trim().is_empty() {
        return Err(invalid("spec.image", "a container needs an image"));
    }
    if spec.vm.is_some() {
        return Err(invalid("spec.vm", "VM settings need the libvirt runtime"));
    }
    check_env(spec)?;
    if !spec.working_dir.is_empty() && !spec.working_dir.starts_with('/') {
        return Err(invalid("spec.working_dir", "must be an absolute path"));
    }
    check_mounts(spec)?;
    check_ports(spec)?;
    check_resources(spec)?;
    check_ulimits(spec)?;
    check_health_check(spec)?;
    check_labels(spec)?;
    RestartPolicy::try_from(spec.restart_policy)
        .map(|_| ())
        .map_err(|_| {
            invalid(
                "spec.restart_policy",
                format!("{} is not a restart policy", spec.restart_policy),
            )
        })
}

fn check_env(spec: &WorkloadSpec) -> Result<(), AgentError> {
    for env in &spec.env {
        if env.name.is_empty() || env.name.contains('=') || env.name.contains('\0') {
            return Err(invalid(
                "spec.env",
                format!("`{}` is not a variable name", env.name),
            ));
        }
    }
    Ok(())
}

/// A mount's target is absolute; a volume is a plain name, a bind source an
/// absolute path that exists here.
fn check_mounts(spec: &WorkloadSpec) -> Result<(), AgentError> {
    for (i, mount) in spec.mounts.iter().enumerate() {
        if !mount.target.starts_with('/') {
            return Err(invalid(
                "spec.mounts",
                format!(
                    "mount {i}: target `{}` must be an absolute path",
                    mount.target
                ),
            ));
        }
        if mount.volume {
            let ok = mount
                .source
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
                && mount
                    .source
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(invalid(
                    "spec.mounts",
                    format!("mount {i}: `{}` is not a volume name", mount.source),
                ));
            }
        } else if !Path::new(&mount.source).is_absolute() {
            return Err(invalid(
                "spec.mounts",
                format!(
                    "mount {i}: bind source `{}` must be an absolute host path",
                    mount.source
                ),
            ));
        } else if !Path::new(&mount.source).exists() {
            return Err(invalid(
                "spec.mounts",
                format!(
                    "mount {i}: bind source `{}` does not exist on this host",
                    mount.source
                ),
            ));
        }
    }
    Ok(())
}

fn check_ports(spec: &WorkloadSpec) -> Result<(), AgentError> {
    for (i, port) in spec.ports.iter().enumerate() {
        if port.container_port == 0 || port.container_port > 65535 {
            return Err(invalid(
                "spec.ports",
                format!(
                    "port {i}: container_port {} is not in 1-65535",
                    port.container_port
                ),
            ));
        }
        if port.host_port > 65535 {
            return Err(invalid(
                "spec.ports",
                format!("port {i}: host_port {} is not in 0-65535", port.host_port),
            ));
        }
        if !matches!(port.protocol.as_str(), "" | "tcp" | "udp" | "sctp") {
            return Err(invalid(
                "spec.ports",
                format!(
                    "port {i}: protocol `{}` is not tcp, udp or sctp",
                    port.protocol
                ),
            ));
        }
        if !port.host_ip.is_empty() && port.host_ip.parse::<IpAddr>().is_err() {
            return Err(invalid(
                "spec.ports",
                format!("port {i}: host_ip `{}` is not an IP address", port.host_ip),
            ));
        }
    }
    Ok(())
}

fn check_resources(spec: &WorkloadSpec) -> Result<(), AgentError> {
    if let Some(r) = &spec.resources {
        for (field, cores) in [
            ("spec.resources.cpu_limit", r.cpu_limit),
            ("spec.resources.cpu_reservation", r.cpu_reservation),
        ] {
            if !(0.0..=4096.0).contains(&cores) {
                return Err(invalid(field, format!("{cores} cores is not in 0-4096")));
            }
        }
        if r.memory_limit_bytes != 0 && r.memory_limit_bytes < MIN_MEMORY_BYTES {
            return Err(invalid(
                "spec.resources.memory_limit_bytes",
                format!("{} bytes is below the 6 MiB minimum", r.memory_limit_bytes),
            ));
        }
        if r.memory_limit_bytes > i64::MAX as u64 || r.memory_reservation_bytes > i64::MAX as u64 {
            return Err(invalid(
                "spec.resources",
                "memory sizes must fit in 63 bits",
            ));
        }
        if r.memory_limit_bytes != 0 && r.memory_reservation_bytes > r.memory_limit_bytes {
            return Err(invalid(
                "spec.resources.memory_reservation_bytes",
                "must not exceed memory_limit_bytes",
            ));
        }
    }
    Ok(())
}

fn check_ulimits(spec: &WorkloadSpec) -> Result<(), AgentError> {
    for ulimit in &spec.ulimits {
        if !ULIMITS.contains(&ulimit.name.as_str()) {
            return Err(invalid(
                "spec.ulimits",
                format!(
                    "`{}` is not a ulimit (one of {})",
                    ulimit.name,
                    ULIMITS.join(", ")
                ),
            ));
        }
        if ulimit.soft < -1
            || ulimit.hard < -1
            || (ulimit.hard != -1 && (ulimit.soft == -1 || ulimit.soft > ulimit.hard))
        {
            return Err(invalid(
                "spec.ulimits",
                format!(
                    "{}: soft {} and hard {} must satisfy -1 <= soft <= hard (-1 = unlimited)",
                    ulimit.name, ulimit.soft, ulimit.hard
                ),
            ));
        }
    }
    Ok(())
}

fn check_health_check(spec: &WorkloadSpec) -> Result<(), AgentError> {
    if let Some(check) = &spec.health_check {
        if check.command.is_empty() || check.command[0].is_empty() {
            return Err(invalid("spec.health_check.command", "must name a program"));
        }
        for (field, value) in [
            ("spec.health_check.interval", &check.interval),
            ("spec.health_check.timeout", &check.timeout),
            ("spec.health_check.start_period", &check.start_period),
        ] {
            if value.as_ref().is_some_and(|d| d.seconds < 0 || d.nanos < 0) {
                return Err(invalid(field, "must not be negative"));
            }
        }
    }
    Ok(())
}

/// Only the labels the agent reads back to know its own containers are
/// reserved; other `berth.` labels (the orchestrator's campaign and
/// backend) are the caller's.
fn check_labels(spec: &WorkloadSpec) -> Result<(), AgentError> {
    if let Some(key) = spec
        .labels
        .keys()
        .find(|k| [LABEL_OWNER, LABEL_NAME, LABEL_SPEC].contains(&k.as_str()))
    {
        return Err(invalid(
            "spec.labels",
            format!("`{key}` is set by the agent itself, to know its own containers"),
        ));
    }
    Ok(())
}

/// The engine's container config for a validated spec.
pub fn container_config(
    name: &str,
    spec: &WorkloadSpec,
    owner: &str,
    dialect: &dyn Dialect,
    versions: EngineVersions,
) -> Result<ContainerCreateBody, AgentError> {
    validate(spec)?;
    let mut host = HostConfig {
        mounts: Some(
            spec.mounts
                .iter()
                .map(|m| Mount {
                    target: Some(m.target.clone()),
                    source: Some(m.source.clone()),
                    typ: Some(if m.volume {
                        MountType::VOLUME
                    } else {
                        MountType::BIND
                    }),
                    read_only: Some(m.read_only),
                    ..Default::default()
                })
                .collect(),
        ),
        ulimits: Some(
            spec.ulimits
                .iter()
                .map(|u| ResourcesUlimits {
                    name: Some(u.name.clone()),
                    soft: Some(u.soft),
                    hard: Some(u.hard),
                })
                .collect(),
        ),
        restart_policy: Some(EngineRestart {
            name: Some(
                match RestartPolicy::try_from(spec.restart_policy).unwrap_or_default() {
                    RestartPolicy::Unspecified | RestartPolicy::No => RestartPolicyNameEnum::NO,
                    RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
                    RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
                    RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
                },
            ),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    if let Some(r) = &spec.resources {
        if r.cpu_limit > 0.0 {
            host.nano_cpus = Some((r.cpu_limit * 1e9) as i64);
        }
        if r.cpu_reservation > 0.0 {
            // A reservation becomes a relative weight: 1024 shares per core.
            host.cpu_shares = Some(((r.cpu_reservation * 1024.0) as i64).max(2));
        }
        if r.memory_limit_bytes > 0 {
            host.memory = Some(r.memory_limit_bytes as i64);
            // No swap on top: a limit is a limit, and the OOM killer enforces it.
            host.memory_swap = Some(r.memory_limit_bytes as i64);
        }
        if r.memory_reservation_bytes > 0 {
            host.memory_reservation = Some(r.memory_reservation_bytes as i64);
        }
    }
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &spec.ports {
        let protocol = if port.protocol.is_empty() {
            "tcp"
        } else {
            &port.protocol
        };
        let key = format!("{}/{protocol}", port.container_port);
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: (!port.host_ip.is_empty()).then(|| port.host_ip.clone()),
                host_port: Some(if port.host_port == 0 {
                    String::new()
                } else {
                    port.host_port.to_string()
                }),
            });
    }
    host.port_bindings = Some(bindings);
    if let Some(gpus) = spec.gpus.as_ref().filter(|g| **g != Default::default()) {
        dialect.gpus(gpus, versions, &mut host)?;
    }
    let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
    labels.insert(LABEL_OWNER.into(), owner.into());
    labels.insert(LABEL_NAME.into(), name.into());
    labels.insert(LABEL_SPEC.into(), encode_spec(spec));
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(
            spec.env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
        ),
        working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
        exposed_ports: Some(exposed),
        labels: Some(labels),
        host_config: Some(host),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::engine::DockerDialect;
    use berth_proto::common::v1::{Mount as SpecMount, PortMapping, Resources, Runtime, Ulimit};

    fn base() -> WorkloadSpec {
        WorkloadSpec {
            runtime: Runtime::Docker as i32,
            image: "busybox:berth".into(),
            command: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }
    }

    fn field_of(spec: &WorkloadSpec) -> &'static str {
        match validate(spec) {
            Err(AgentError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = base();
        spec.image.clear();
        assert_eq!(field_of(&spec), "spec.image");
        let mut spec = base();
        spec.ports = vec![PortMapping {
            container_port: 70000,
            ..Default::default()
        }];
        assert_eq!(field_of(&spec), "spec.ports");
        let mut spec = base();
        spec.mounts = vec![SpecMount {
            source: "relative".into(),
            target: "/data".into(),
            ..Default::default()
        }];
        assert_eq!(field_of(&spec), "spec.mounts");
        let mut spec = base();
        spec.resources = Some(Resources {
            memory_limit_bytes: 1024,
            ..Default::default()
        });
        assert_eq!(field_of(&spec), "spec.resources.memory_limit_bytes");
        let mut spec = base();
        spec.resources = Some(Resources {
            cpu_limit: -1.0,
            ..Default::default()
        });
        assert_eq!(field_of(&spec), "spec.resources.cpu_limit");
        let mut spec = base();
        spec.ulimits = vec![Ulimit {
            name: "nofile".into(),
            soft: 10,
            hard: 5,
        }];
        assert_eq!(field_of(&spec), "spec.ulimits");
        let mut spec = base();
        spec.labels.insert("berth.owner".into(), "me".into());
        assert_eq!(field_of(&spec), "spec.labels");
        let mut spec = base();
        spec.labels.insert("berth.campaign".into(), "c1".into());
        assert!(validate(&spec).is_ok());
    }

    #[test]
    fn spec_maps_to_engine_config() {
        let mut spec = base();
        spec.resources = Some(Resources {
            cpu_limit: 1.5,
            memory_limit_bytes: 64 << 20,
            memory_reservation_bytes: 32 << 20,
            cpu_reservation: 0.5,
        });
        spec.ports = vec![PortMapping {
            container_port: 80,
            host_port: 8080,
            ..Default::default()
        }];
        spec.mounts = vec![SpecMount {
            source: "cache".into(),
            target: "/cache".into(),
            read_only: true,
            volume: true,
        }];
        spec.ulimits = vec![Ulimit {
            name: "nofile".into(),
            soft: 1024,
            hard: 2048,
        }];
        spec.restart_policy = RestartPolicy::Always as i32;
        let versions = EngineVersions {
            api: (1, 41),
            engine: (20, 10),
        };
        let config = container_config("w", &spec, "me", &DockerDialect, versions).unwrap();
        let host = config.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.memory_reservation, Some(32 << 20));
        assert_eq!(host.cpu_shares, Some(512));
        assert_eq!(
            host.port_bindings.unwrap()["80/tcp"].as_ref().unwrap()[0]
                .host_port
                .as_deref(),
            Some("8080")
        );
        let mount = &host.mounts.unwrap()[0];
        assert_eq!(
            (mount.typ, mount.read_only),
            (Some(MountType::VOLUME), Some(true))
        );
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::ALWAYS)
        );
        let labels = config.labels.unwrap();
        assert_eq!(labels[LABEL_OWNER], "me");
        assert_eq!(labels[LABEL_NAME], "w");
        assert!(labels.contains_key(LABEL_SPEC));
    }
}
