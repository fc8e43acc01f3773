//! A backend as the agent's workload spec: what a campaign's backend and a
//! deployment's replica are both created from.

use std::collections::HashMap;

use berth_proto::common::v1::{self as common, EnvVar, WorkloadSpec};

use super::types::{Backend, Resources};
use super::units::GpuCount;

impl Backend {
    /// The workload the agent creates for this backend, with `labels`.
    pub fn workload_spec(&self, labels: HashMap<String, String>) -> WorkloadSpec {
        WorkloadSpec {
            runtime: self.runtime.proto() as i32,
            image: self.image.clone(),
            command: self.command.clone(),
            env: self
                .env
                .iter()
                .map(|(name, value)| EnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            working_dir: self.working_dir.clone(),
            labels,
            mounts: self
                .mounts
                .iter()
                .map(|m| common::Mount {
                    source: m.source.clone(),
                    target: m.target.clone(),
                    read_only: m.read_only,
                    volume: m.volume,
                })
                .collect(),
            resources: (self.resources != Resources::default()).then(|| {
                let r = &self.resources;
                common::Resources {
                    cpu_limit: r.cpus.unwrap_or_default(),
                    memory_limit_bytes: r.memory.map_or(0, |m| m.0),
                    memory_reservation_bytes: r.memory_reservation.map_or(0, |m| m.0),
                    cpu_reservation: r.cpu_reservation.unwrap_or_default(),
                }
            }),
            gpus: self.gpus.as_ref().map(|g| common::GpuRequest {
                count: match g.count {
                    Some(GpuCount::All) => -1,
                    Some(GpuCount::Exactly(n)) => i32::try_from(n).unwrap_or(i32::MAX),
                    None => 0,
                },
                device_ids: g.devices.clone(),
                ..Default::default()
            }),
            vm: self.vm.as_ref().map(|vm| common::VmSpec {
                vcpus: vm.vcpus,
                memory_bytes: vm.memory.0,
                disks: vm
                    .disks
                    .iter()
                    .map(|disk| common::VmDisk {
                        base_image: disk.image.clone(),
                        volume: disk.volume.clone(),
                        size_bytes: disk.size.map_or(0, |size| size.0),
                    })
                    .collect(),
                network: vm.network.clone(),
                bridge: vm.bridge.clone(),
                cloud_init_user_data: vm.cloud_init.clone(),
                pci_passthrough: vm.pci_passthrough.clone(),
                ..Default::default()
            }),
            slurm: self.slurm.as_ref().map(|job| common::SlurmSpec {
                partition: job.partition.clone(),
                account: job.account.clone(),
                qos: job.qos.clone(),
                time_limit: job
                    .time_limit
                    .and_then(|limit| prost_types::Duration::try_from(limit).ok()),
                nodes: job.nodes,
                constraints: job.constraints.clone(),
                gres: job.gres.clone(),
                // The tasks are the runs the array is made for, when it is.
                array_tasks: Vec::new(),
                array_parallelism: job.array.as_ref().map_or(0, |array| array.parallel),
            }),
            ..Default::default()
        }
    }
}

/// `raw` as a workload name the engines take: characters a name cannot hold
/// become `-`, and it is cut at 128 characters.
pub fn workload_name(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect()
}
