//! Fuzz target `workload_spec` (seeds in `tests/fuzz_corpus/workload_spec/`,
//! encoded `WorkloadSpec` messages): specs made of arbitrary field values,
//! and of arbitrary bytes decoded as one, go through what CreateWorkload
//! does with them before any engine is asked: the size limits, each
//! runtime's validation, the container config and a VM's metadata. None
//! panics, each case ends in time, every refusal names a field of the spec,
//! and what a VM keeps of its spec reads back the same.

use berth_proto::common::v1::{
    EnvVar, GpuRequest, HealthCheck, Mount, PortMapping, Resources, Runtime, SlurmArrayTask,
    SlurmSpec, Ulimit, VmDisk, VmSpec, WorkloadSpec,
};
use berth_tests::fuzz;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;

use super::WorkloadRuntime;
use super::container::spec::{container_config, validate as container_validate};
use super::container::{DockerDialect, EngineVersions, PodmanDialect};
use super::libvirt::domain_xml::BerthMetadata;
use super::libvirt::vm_spec;
use super::process::ProcessRuntime;
use super::slurm;
use crate::error::AgentError;
use crate::events::EventBus;
use crate::spec_limits::{self, MAX_STRING_BYTES};

/// Pieces of a protobuf message: field keys of WorkloadSpec, lengths at
/// the edges, varints that do not end.
const TOKENS: &[&[u8]] = &[
    &[0x08, 0x01],
    &[0x08, 0x02],
    &[0x08, 0x04],
    &[0x12, 0x00],
    &[0x1a, 0x01, b'/'],
    &[0x22, 0x00],
    &[0x22, 0x04, 0x0a, 0x02, b'A', b'='],
    &[0x32, 0x00],
    &[0x3a, 0x02, 0x08, 0x00],
    &[0x42, 0x09, 0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f],
    &[0x4a, 0x00],
    &[0x52, 0x02, 0x08, 0xff],
    &[0x5a, 0x02, 0x12, 0x00],
    &[0x60, 0x05],
    &[0x6a, 0x00],
    &[0x6a, 0x04, 0x0a, 0x01, b' ', 0x12, 0x00],
    &[0x72, 0x00],
    &[0x72, 0x02, 0x1a, 0x00],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80],
    &[0x00],
    b"\xc3\x28",
];

/// Strings as callers get them wrong: empty, paths and names, NUL and
/// control characters, markup, padding, any Unicode, and over the limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/._=:-]{0,12}",
        2 => Just(String::new()),
        1 => Just("/".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just(" padded\t".to_string()),
        1 => Just("<&'\"]]>\u{1}\u{7f}\r\n".to_string()),
        1 => Just("berth.owner".to_string()),
        1 => any::<String>(),
        1 => Just("x".repeat(MAX_STRING_BYTES + 1)),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        any::<f64>()
    ]
}

fn resources() -> impl Strategy<Value = Resources> {
    (number(), any::<u64>(), any::<u64>(), number()).prop_map(
        |(cpu, memory, reserved, cpu_reserved)| Resources {
            cpu_limit: cpu,
            memory_limit_bytes: memory,
            memory_reservation_bytes: reserved,
            cpu_reservation: cpu_reserved,
        },
    )
}

fn vm() -> impl Strategy<Value = VmSpec> {
    (
        any::<u32>(),
        any::<u64>(),
        vec(
            (text(), text(), any::<u64>()).prop_map(|(base_image, volume, size_bytes)| VmDisk {
                base_image,
                volume,
                size_bytes,
            }),
            0..4,
        ),
        (text(), text(), text(), text()),
        vec(text(), 0..3),
    )
        .prop_map(
            |(vcpus, memory_bytes, disks, (network, bridge, user_data, seed), pci)| VmSpec {
                vcpus,
                memory_bytes,
                disks,
                network,
                bridge,
                cloud_init_user_data: user_data,
                pci_passthrough: pci,
                cloud_init_seed: seed,
            },
        )
}

/// Specs of arbitrary field values, each field present or not, an array's
/// tasks among them.
fn slurm() -> impl Strategy<Value = SlurmSpec> {
    let task = (
        text(),
        vec(text(), 0..3),
        vec(
            (text(), text()).prop_map(|(name, value)| EnvVar { name, value }),
            0..2,
        ),
        text(),
    )
        .prop_map(|(exec_key, command, env, working_dir)| SlurmArrayTask {
            exec_key,
            command,
            env,
            working_dir,
        });
    (
        (text(), text(), text()),
        (duration(), any::<u32>(), text(), text()),
        (vec(task, 0..3), any::<u32>()),
    )
        .prop_map(
            |(
                (partition, account, qos),
                (time_limit, nodes, constraints, gres),
                (array_tasks, array_parallelism),
            )| SlurmSpec {
                partition,
                account,
                qos,
                time_limit,
                nodes,
                constraints,
                gres,
                array_tasks,
                array_parallelism,
            },
        )
}

fn spec() -> impl Strategy<Value = WorkloadSpec> {
    let env = vec(
        (text(), text()).prop_map(|(name, value)| EnvVar { name, value }),
        0..4,
    );
    let mounts = vec(
        (text(), text(), any::<bool>(), any::<bool>()).prop_map(
            |(source, target, read_only, volume)| Mount {
                source,
                target,
                read_only,
                volume,
            },
        ),
        0..3,
    );
    let ports = vec(
        (any::<u32>(), any::<u32>(), text(), text()).prop_map(
            |(container_port, host_port, protocol, host_ip)| PortMapping {
                container_port,
                host_port,
                protocol,
                host_ip,
            },
        ),
        0..3,
    );
    let ulimits = vec(
        (text(), any::<i64>(), any::<i64>()).prop_map(|(name, soft, hard)| Ulimit {
            name,
            soft,
            hard,
        }),
        0..3,
    );
    let gpus = (any::<i32>(), vec(text(), 0..3), vec(text(), 0..3), text()).prop_map(
        |(count, device_ids, cdi_devices, driver)| GpuRequest {
            count,
            device_ids,
            cdi_devices,
            driver,
        },
    );
    let health = (
        vec(text(), 0..3),
        duration(),
        duration(),
        any::<u32>(),
        duration(),
    )
        .prop_map(
            |(command, interval, timeout, retries, start_period)| HealthCheck {
                command,
                interval,
                timeout,
                retries,
                start_period,
            },
        );
    (
        (0..6i32, text(), vec(text(), 0..4), env, text()),
        (mounts, ports, proptest::option::of(resources()), ulimits),
        (
            proptest::option::of(gpus),
            proptest::option::of(health),
            -1..6i32,
            btree_map(text(), text(), 0..4),
            proptest::option::of(vm()),
            proptest::option::of(slurm()),
        ),
    )
        .prop_map(
            |(
                (runtime, image, command, env, working_dir),
                (mounts, ports, resources, ulimits),
                (gpus, health_check, restart_policy, labels, vm, slurm),
            )| WorkloadSpec {
                runtime,
                image,
                command,
                env,
                working_dir,
                mounts,
                ports,
                resources,
                ulimits,
                gpus,
                health_check,
                restart_policy,
                labels: labels.into_iter().collect(),
                vm,
                slurm,
            },
        )
}

/// VM specs that pass the libvirt runtime's checks, with arbitrary labels:
/// what the VM's metadata keeps of them must read back the same.
fn vm_spec() -> impl Strategy<Value = WorkloadSpec> {
    (btree_map(text(), text(), 0..4), "/[a-z]{1,8}\\.qcow2").prop_map(|(labels, image)| {
        WorkloadSpec {
            runtime: Runtime::Libvirt as i32,
            labels: labels.into_iter().collect(),
            vm: Some(VmSpec {
                vcpus: 1,
                memory_bytes: 64 << 20,
                disks: vec![VmDisk {
                    base_image: image,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    })
}

/// A refusal names the field of the spec it is about.
fn names_a_field(result: Result<(), AgentError>) -> Result<bool, TestCaseError> {
    match result {
        Ok(()) => Ok(true),
        Err(AgentError::InvalidArgument { field, .. } | AgentError::Unsupported { field, .. }) => {
            prop_assert!(field.starts_with("spec."), "field `{field}`");
            Ok(false)
        }
        Err(AgentError::FileNotFound { field, .. }) => {
            prop_assert!(field.starts_with("spec."), "field `{field}`");
            Ok(false)
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "a spec refused without naming a field: {other}"
        ))),
    }
}

/// What CreateWorkload checks of `spec`, on every runtime.
fn check(spec: &WorkloadSpec) -> Result<(), TestCaseError> {
    fuzz::timed("workload spec", || {
        if !names_a_field(spec_limits::check_spec(spec))? {
            return Ok(());
        }
        let process = ProcessRuntime::new(EventBus::default(), 16);
        names_a_field(process.validate(spec))?;
        if names_a_field(container_validate(spec))? {
            let versions = EngineVersions {
                api: (1, 41),
                engine: (20, 10),
            };
            names_a_field(container_config("w", spec, "me", &DockerDialect, versions).map(drop))?;
            names_a_field(container_config("w", spec, "me", &PodmanDialect, versions).map(drop))?;
        }
        let container = slurm::container::ContainerRuntime::Podman;
        if names_a_field(slurm::job::validate(spec, container))? {
            let submission = slurm::job::Submission {
                name: "w",
                owner: "me",
                default_partition: "",
                output_dir: std::path::Path::new("/jobs"),
                exec_root: std::path::Path::new("/jobs/.berth/exec"),
                container,
            };
            let body = slurm::job::submit_body(spec, &submission);
            prop_assert!(
                body["job"]["hold"].as_bool() == Some(true),
                "a job is submitted held"
            );
        }
        if names_a_field(vm_spec::validate(spec).map(drop))? {
            let metadata = BerthMetadata {
                owner: "me".into(),
                labels: spec.labels.clone().into_iter().collect(),
                spec: Some(spec.clone()),
                ..Default::default()
            };
            let read_back = BerthMetadata::parse(&metadata.to_xml());
            prop_assert_eq!(
                read_back,
                Some(metadata),
                "a VM's metadata read back differently"
            );
        }
        Ok(())
    })?
}

proptest! {
    #![proptest_config(fuzz::config())]

    #[test]
    fn specs_of_arbitrary_field_values(spec in spec()) {
        check(&spec)?;
    }

    #[test]
    fn vm_specs_with_arbitrary_labels(spec in vm_spec()) {
        check(&spec)?;
    }

    #[test]
    fn specs_decoded_from_arbitrary_bytes(
        input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "workload_spec"), TOKENS),
    ) {
        if let Ok(spec) = fuzz::timed("decoding a spec", || WorkloadSpec::decode(input.as_slice()))? {
            check(&spec)?;
        }
    }
}
