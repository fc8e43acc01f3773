//! How much a caller may ask for in one workload spec or exec, checked
//! before any runtime looks at the request: the agent keeps a workload's
//! spec for its whole life (in a container's labels, a VM's metadata) and
//! hands its strings to the kernel and to engines, so each count and string
//! is bounded. gRPC's message size bounds the request as a whole; these
//! bound what it may hold. Each error is INVALID_ARGUMENT naming the field
//! and the limit.

use berth_proto::common::v1::{EnvVar, WorkloadSpec};

use crate::error::AgentError;

/// Arguments of a command line (`spec.command`, a health check, an exec).
pub const MAX_ARGS: usize = 4096;
/// Environment variables of a workload or an exec.
pub const MAX_ENV: usize = 4096;
pub const MAX_MOUNTS: usize = 256;
pub const MAX_PORTS: usize = 4096;
/// Ulimits: there are 15 kinds.
pub const MAX_ULIMITS: usize = 64;
pub const MAX_LABELS: usize = 256;
/// GPUs named in a request, by id or CDI name.
pub const MAX_GPU_DEVICES: usize = 64;
/// Longest string: what the kernel takes as one argument or environment
/// string (MAX_ARG_STRLEN, 32 pages). A VM's disks, PCI devices and
/// cloud-init user data have their own limits, in the libvirt runtime.
pub const MAX_STRING_BYTES: usize = 128 << 10;

fn invalid(field: &'static str, reason: String) -> AgentError {
    AgentError::InvalidArgument { field, reason }
}

fn count(field: &'static str, len: usize, max: usize) -> Result<(), AgentError> {
    if len > max {
        return Err(invalid(field, format!("has {len} entries; at most {max}")));
    }
    Ok(())
}

/// A string at most `max` bytes long; `which` says which one of a repeated
/// field (empty for a single one).
fn length(
    field: &'static str,
    which: impl FnOnce() -> String,
    value: &str,
    max: usize,
) -> Result<(), AgentError> {
    if value.len() > max {
        let which = which();
        let which = if which.is_empty() {
            which
        } else {
            format!("{which}: ")
        };
        return Err(invalid(
            field,
            format!("{which}{} bytes; at most {max}", value.len()),
        ));
    }
    Ok(())
}

fn strings<'a>(
    field: &'static str,
    values: impl ExactSizeIterator<Item = &'a str>,
    max_count: usize,
) -> Result<(), AgentError> {
    count(field, values.len(), max_count)?;
    for (i, value) in values.enumerate() {
        length(field, || format!("entry {i}"), value, MAX_STRING_BYTES)?;
    }
    Ok(())
}

/// A command line: a program, at most [`MAX_ARGS`] strings the kernel can
/// take (no NUL byte).
fn command_line(field: &'static str, argv: &[String]) -> Result<(), AgentError> {
    strings(field, argv.iter().map(String::as_str), MAX_ARGS)?;
    if let Some(i) = argv.iter().position(|arg| arg.contains('\0')) {
        return Err(invalid(field, format!("argument {i} holds a NUL byte")));
    }
    Ok(())
}

/// Environment variables the kernel can take: names without `=` or NUL,
/// values without NUL.
fn environment(field: &'static str, env: &[EnvVar]) -> Result<(), AgentError> {
    count(field, env.len(), MAX_ENV)?;
    for (i, var) in env.iter().enumerate() {
        length(
            field,
            || format!("entry {i} name"),
            &var.name,
            MAX_STRING_BYTES,
        )?;
        length(
            field,
            || format!("entry {i} value"),
            &var.value,
            MAX_STRING_BYTES,
        )?;
        if var.name.is_empty() || var.name.contains(['=', '\0']) || var.value.contains('\0') {
            return Err(invalid(
                field,
                format!(
                    "entry {i}: a name must be non-empty without `=` or NUL, a value without NUL"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the sizes of a spec, and the strings every runtime passes on.
pub fn check_spec(spec: &WorkloadSpec) -> Result<(), AgentError> {
    length("spec.image", String::new, &spec.image, MAX_STRING_BYTES)?;
    command_line("spec.command", &spec.command)?;
    environment("spec.env", &spec.env)?;
    length(
        "spec.working_dir",
        String::new,
        &spec.working_dir,
        MAX_STRING_BYTES,
    )?;
    if spec.working_dir.contains('\0') {
        return Err(invalid("spec.working_dir", "holds a NUL byte".into()));
    }
    count("spec.mounts", spec.mounts.len(), MAX_MOUNTS)?;
    for (i, mount) in spec.mounts.iter().enumerate() {
        length(
            "spec.mounts",
            || format!("mount {i} source"),
            &mount.source,
            MAX_STRING_BYTES,
        )?;
        length(
            "spec.mounts",
            || format!("mount {i} target"),
            &mount.target,
            MAX_STRING_BYTES,
        )?;
    }
    count("spec.ports", spec.ports.len(), MAX_PORTS)?;
    for (i, port) in spec.ports.iter().enumerate() {
        length(
            "spec.ports",
            || format!("port {i} protocol"),
            &port.protocol,
            MAX_STRING_BYTES,
        )?;
        length(
            "spec.ports",
            || format!("port {i} host_ip"),
            &port.host_ip,
            MAX_STRING_BYTES,
        )?;
    }
    count("spec.ulimits", spec.ulimits.len(), MAX_ULIMITS)?;
    for (i, ulimit) in spec.ulimits.iter().enumerate() {
        length(
            "spec.ulimits",
            || format!("ulimit {i} name"),
            &ulimit.name,
            MAX_STRING_BYTES,
        )?;
    }
    if let Some(gpus) = &spec.gpus {
        strings(
            "spec.gpus.device_ids",
            gpus.device_ids.iter().map(String::as_str),
            MAX_GPU_DEVICES,
        )?;
        strings(
            "spec.gpus.cdi_devices",
            gpus.cdi_devices.iter().map(String::as_str),
            MAX_GPU_DEVICES,
        )?;
        length(
            "spec.gpus.driver",
            String::new,
            &gpus.driver,
            MAX_STRING_BYTES,
        )?;
    }
    if let Some(check) = &spec.health_check {
        command_line("spec.health_check.command", &check.command)?;
    }
    count("spec.labels", spec.labels.len(), MAX_LABELS)?;
    for (key, value) in &spec.labels {
        length("spec.labels", || "a key".into(), key, MAX_STRING_BYTES)?;
        length("spec.labels", || "a value".into(), value, MAX_STRING_BYTES)?;
    }
    if let Some(vm) = &spec.vm {
        for (i, disk) in vm.disks.iter().enumerate() {
            length(
                "spec.vm.disks",
                || format!("disk {i} base_image"),
                &disk.base_image,
                MAX_STRING_BYTES,
            )?;
            length(
                "spec.vm.disks",
                || format!("disk {i} volume"),
                &disk.volume,
                MAX_STRING_BYTES,
            )?;
        }
        length(
            "spec.vm.network",
            String::new,
            &vm.network,
            MAX_STRING_BYTES,
        )?;
        length("spec.vm.bridge", String::new, &vm.bridge, MAX_STRING_BYTES)?;
        for (i, address) in vm.pci_passthrough.iter().enumerate() {
            length(
                "spec.vm.pci_passthrough",
                || format!("entry {i}"),
                address,
                MAX_STRING_BYTES,
            )?;
        }
        length(
            "spec.vm.cloud_init_seed",
            String::new,
            &vm.cloud_init_seed,
            MAX_STRING_BYTES,
        )?;
    }
    if let Some(slurm) = &spec.slurm {
        count(
            "spec.slurm.array_tasks",
            slurm.array_tasks.len(),
            crate::runtime::slurm::MAX_ARRAY_TASKS,
        )?;
        for task in &slurm.array_tasks {
            command_line("spec.slurm.array_tasks.command", &task.command)?;
            environment("spec.slurm.array_tasks.env", &task.env)?;
            for (field, text) in [
                ("spec.slurm.array_tasks.exec_key", &task.exec_key),
                ("spec.slurm.array_tasks.working_dir", &task.working_dir),
            ] {
                length(field, String::new, text, MAX_STRING_BYTES)?;
                if text.contains('\0') {
                    return Err(invalid(field, "holds a NUL byte".into()));
                }
            }
        }
    }
    Ok(())
}

/// Checks an exec's command line, environment and working directory.
pub fn check_exec(argv: &[String], env: &[EnvVar], working_dir: &str) -> Result<(), AgentError> {
    if argv.first().is_none_or(String::is_empty) {
        return Err(invalid("command", "must name a program".into()));
    }
    command_line("command", argv)?;
    environment("env", env)?;
    length("working_dir", String::new, working_dir, MAX_STRING_BYTES)?;
    if working_dir.contains('\0') {
        return Err(invalid("working_dir", "holds a NUL byte".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use berth_proto::common::v1::{GpuRequest, Mount};

    use super::*;

    fn reason(result: Result<(), AgentError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn counts_over_the_limits_are_refused_naming_field_and_limit() {
        let spec = |f: fn(&mut WorkloadSpec)| {
            let mut spec = WorkloadSpec::default();
            f(&mut spec);
            spec
        };
        let cases: [(WorkloadSpec, &str); 5] = [
            (
                spec(|s| s.command = vec!["x".into(); MAX_ARGS + 1]),
                "spec.command: has 4097 entries; at most 4096",
            ),
            (
                spec(|s| {
                    s.env = vec![
                        EnvVar {
                            name: "A".into(),
                            value: String::new()
                        };
                        MAX_ENV + 1
                    ]
                }),
                "spec.env: has 4097 entries; at most 4096",
            ),
            (
                spec(|s| s.mounts = vec![Mount::default(); MAX_MOUNTS + 1]),
                "spec.mounts: has 257 entries; at most 256",
            ),
            (
                spec(|s| {
                    s.labels = (0..=MAX_LABELS)
                        .map(|i| (i.to_string(), String::new()))
                        .collect()
                }),
                "spec.labels: has 257 entries; at most 256",
            ),
            (
                spec(|s| {
                    s.gpus = Some(GpuRequest {
                        device_ids: vec![String::new(); MAX_GPU_DEVICES + 1],
                        ..Default::default()
                    })
                }),
                "spec.gpus.device_ids: has 65 entries; at most 64",
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(reason(check_spec(&spec)), expected);
        }
    }

    #[test]
    fn long_strings_and_what_the_kernel_cannot_take_are_refused() {
        let long = "x".repeat(MAX_STRING_BYTES + 1);
        let spec = WorkloadSpec {
            command: vec!["sh".into(), long.clone()],
            ..Default::default()
        };
        assert_eq!(
            reason(check_spec(&spec)),
            "spec.command: entry 1: 131073 bytes; at most 131072"
        );
        let spec = WorkloadSpec {
            labels: [("k".to_string(), long)].into(),
            ..Default::default()
        };
        assert_eq!(
            reason(check_spec(&spec)),
            "spec.labels: a value: 131073 bytes; at most 131072"
        );
        let nul = ["sh".to_string(), "a\0b".into()];
        assert_eq!(
            reason(check_exec(&nul, &[], "")),
            "command: argument 1 holds a NUL byte"
        );
        let bad_name = [EnvVar {
            name: "A=B".into(),
            value: "1".into(),
        }];
        assert!(reason(check_exec(&nul[..1], &bad_name, "")).starts_with("env: entry 0: a name"));
        assert_eq!(
            reason(check_exec(&[], &[], "")),
            "command: must name a program"
        );
        assert!(
            check_exec(
                &nul[..1],
                &[EnvVar {
                    name: "A".into(),
                    value: "=1".into()
                }],
                "/tmp"
            )
            .is_ok()
        );
        assert!(check_spec(&WorkloadSpec::default()).is_ok());
        let task = berth_proto::common::v1::SlurmArrayTask {
            exec_key: "run/attempt-1".into(),
            command: nul.to_vec(),
            ..Default::default()
        };
        let array = WorkloadSpec {
            slurm: Some(berth_proto::common::v1::SlurmSpec {
                array_tasks: vec![task],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            reason(check_spec(&array)),
            "spec.slurm.array_tasks.command: argument 1 holds a NUL byte"
        );
    }
}
