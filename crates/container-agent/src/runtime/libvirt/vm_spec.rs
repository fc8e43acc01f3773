//! A VM workload spec checked before any host is asked: the container
//! fields a VM cannot honour, then the `vm` settings (size, disks, network,
//! cloud-init, PCI passthrough), each refusal naming its field. The XML
//! built from a valid spec is `domain_xml.rs`'s.

use std::path::{Path, PathBuf};

use berth_proto::common::v1::{RestartPolicy, VmSpec, WorkloadSpec};

use super::domain_xml::{DiskFormat, DiskSource, PciAddress};
use crate::error::AgentError;

pub const MAX_VCPUS: u32 = 512;
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
pub const MAX_DISKS: usize = 16;
pub const MAX_PCI_DEVICES: usize = 16;
pub const MAX_USER_DATA_BYTES: usize = 64 << 10;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_BRIDGE_NAME: usize = 15;

fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn cannot_honour(field: &'static str, what: &str, instead: &str) -> AgentError {
    invalid(
        field,
        format!("the libvirt runtime cannot honour {what}: {instead}"),
    )
}

/// Checks what can be checked without the host; returns the VM settings.
/// The checks run in this order, and the first refusal is the answer.
pub fn validate(spec: &WorkloadSpec) -> Result<&VmSpec, AgentError> {
    refuse_container_fields(spec)?;
    check_labels(spec)?;
    let vm = spec.vm.as_ref().ok_or_else(|| {
        invalid(
            "spec.vm",
            "is required for RUNTIME_LIBVIRT (vcpus, memory_bytes, disks)",
        )
    })?;
    check_size(vm)?;
    check_disks(vm)?;
    check_network(vm)?;
    check_cloud_init(vm)?;
    check_pci_passthrough(vm)?;
    Ok(vm)
}

/// The container fields, each refused with what to use instead.
fn refuse_container_fields(spec: &WorkloadSpec) -> Result<(), AgentError> {
    let no_command =
        "a VM boots its disk image; configure what it runs with vm.cloud_init_user_data";
    if !spec.image.is_empty() {
        return Err(cannot_honour(
            "spec.image",
            "a container image",
            "give the VM a disk in vm.disks",
        ));
    }
    if !spec.command.is_empty() {
        return Err(cannot_honour("spec.command", "a command", no_command));
    }
    if !spec.env.is_empty() {
        return Err(cannot_honour(
            "spec.env",
            "environment variables",
            no_command,
        ));
    }
    if !spec.working_dir.is_empty() {
        return Err(cannot_honour(
            "spec.working_dir",
            "a working directory",
            no_command,
        ));
    }
    if !spec.mounts.is_empty() {
        return Err(cannot_honour(
            "spec.mounts",
            "mounts",
            "attach storage as vm.disks",
        ));
    }
    if !spec.ports.is_empty() {
        return Err(cannot_honour(
            "spec.ports",
            "published ports",
            "a VM has its own address on its network (vm.network or vm.bridge)",
        ));
    }
    if spec
        .resources
        .as_ref()
        .is_some_and(|r| *r != Default::default())
    {
        return Err(cannot_honour(
            "spec.resources",
            "CPU or memory limits",
            "size the VM with vm.vcpus and vm.memory_bytes",
        ));
    }
    if !spec.ulimits.is_empty() {
        return Err(cannot_honour("spec.ulimits", "ulimits", no_command));
    }
    if spec.gpus.as_ref().is_some_and(|g| *g != Default::default()) {
        return Err(cannot_honour(
            "spec.gpus",
            "a GPU request",
            "pass GPUs through by PCI address in vm.pci_passthrough",
        ));
    }
    if spec.health_check.is_some() {
        return Err(cannot_honour(
            "spec.health_check",
            "an exec health check",
            "the agent runs no health checks in VMs (exec into them goes through the guest's exec shim)",
        ));
    }
    if !matches!(
        RestartPolicy::try_from(spec.restart_policy).unwrap_or_default(),
        RestartPolicy::Unspecified | RestartPolicy::No
    ) {
        return Err(cannot_honour(
            "spec.restart_policy",
            "a restart policy",
            "the agent does not restart VMs",
        ));
    }
    Ok(())
}

/// Labels travel in the domain's XML metadata, which must read them back.
fn check_labels(spec: &WorkloadSpec) -> Result<(), AgentError> {
    for (key, value) in &spec.labels {
        if !xml_can_carry(key) || !xml_can_carry(value) {
            return Err(invalid(
                "spec.labels",
                format!(
                    "label {key:?} = {value:?} holds a control character that the VM's XML metadata cannot carry"
                ),
            ));
        }
    }
    Ok(())
}

fn check_size(vm: &VmSpec) -> Result<(), AgentError> {
    if !(1..=MAX_VCPUS).contains(&vm.vcpus) {
        return Err(invalid(
            "spec.vm.vcpus",
            format!("is {}; must be 1 to {MAX_VCPUS}", vm.vcpus),
        ));
    }
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&vm.memory_bytes)
        || !vm.memory_bytes.is_multiple_of(1024)
    {
        return Err(invalid(
            "spec.vm.memory_bytes",
            format!(
                "is {}; must be a whole number of KiB from {MIN_MEMORY_BYTES} (32 MiB) to {MAX_MEMORY_BYTES} (16 TiB)",
                vm.memory_bytes
            ),
        ));
    }
    Ok(())
}

/// 1 to MAX_DISKS, each either an overlay on an absolute base image or a
/// volume used as it is.
fn check_disks(vm: &VmSpec) -> Result<(), AgentError> {
    if vm.disks.is_empty() || vm.disks.len() > MAX_DISKS {
        return Err(invalid(
            "spec.vm.disks",
            format!(
                "has {} disks; must have 1 to {MAX_DISKS} (the first one boots)",
                vm.disks.len()
            ),
        ));
    }
    for (index, disk) in vm.disks.iter().enumerate() {
        if !xml_can_carry(&disk.base_image) || !xml_can_carry(&disk.volume) {
            return Err(invalid(
                "spec.vm.disks",
                format!(
                    "disks[{index}] holds a control character that the domain's XML cannot carry"
                ),
            ));
        }
        match (disk.base_image.is_empty(), disk.volume.is_empty()) {
            (false, false) | (true, true) => {
                return Err(invalid(
                    "spec.vm.disks",
                    format!("disks[{index}] must set exactly one of base_image and volume"),
                ));
            }
            (false, true) => {
                if !Path::new(&disk.base_image).is_absolute() {
                    return Err(invalid(
                        "spec.vm.disks.base_image",
                        format!(
                            "disks[{index}].base_image = `{}` must be an absolute path",
                            disk.base_image
                        ),
                    ));
                }
            }
            (true, false) => {
                if disk.size_bytes != 0 {
                    return Err(invalid(
                        "spec.vm.disks.size_bytes",
                        format!(
                            "disks[{index}]: size_bytes applies to a base_image overlay, not to a volume"
                        ),
                    ));
                }
                volume_source(&disk.volume).map_err(|reason| {
                    invalid(
                        "spec.vm.disks.volume",
                        format!("disks[{index}].volume = `{}`: {reason}", disk.volume),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// A bridge, when set, wins over a network, so only it is checked then.
fn check_network(vm: &VmSpec) -> Result<(), AgentError> {
    if !vm.bridge.is_empty() {
        if vm.bridge.len() > MAX_BRIDGE_NAME || !is_plain_name(&vm.bridge) {
            return Err(invalid(
                "spec.vm.bridge",
                format!(
                    "`{}` is not a bridge interface name (1-{MAX_BRIDGE_NAME} of letters, digits, '-', '_', '.')",
                    vm.bridge
                ),
            ));
        }
    } else if !vm.network.is_empty() && !is_plain_name(&vm.network) {
        return Err(invalid(
            "spec.vm.network",
            format!("`{}` is not a libvirt network name", vm.network),
        ));
    }
    Ok(())
}

/// User data the agent turns into a seed, or a seed of the caller's: not both.
fn check_cloud_init(vm: &VmSpec) -> Result<(), AgentError> {
    if vm.cloud_init_user_data.len() > MAX_USER_DATA_BYTES {
        return Err(invalid(
            "spec.vm.cloud_init_user_data",
            format!(
                "is {} bytes; at most {MAX_USER_DATA_BYTES}",
                vm.cloud_init_user_data.len()
            ),
        ));
    }
    if !vm.cloud_init_seed.is_empty() {
        if !vm.cloud_init_user_data.is_empty() {
            return Err(invalid(
                "spec.vm.cloud_init_seed",
                "set either cloud_init_seed (a seed image of your own) or cloud_init_user_data (the agent makes the seed), not both",
            ));
        }
        if !Path::new(&vm.cloud_init_seed).is_absolute() || !xml_can_carry(&vm.cloud_init_seed) {
            return Err(invalid(
                "spec.vm.cloud_init_seed",
                format!("`{}` must be an absolute path", vm.cloud_init_seed),
            ));
        }
    }
    Ok(())
}

fn check_pci_passthrough(vm: &VmSpec) -> Result<(), AgentError> {
    if vm.pci_passthrough.len() > MAX_PCI_DEVICES {
        return Err(invalid(
            "spec.vm.pci_passthrough",
            format!(
                "has {} devices; at most {MAX_PCI_DEVICES}",
                vm.pci_passthrough.len()
            ),
        ));
    }
    let mut addresses = Vec::new();
    for text in &vm.pci_passthrough {
        let address = PciAddress::parse(text).ok_or_else(|| {
            invalid(
                "spec.vm.pci_passthrough",
                format!("`{text}` is not a PCI address like 0000:3b:00.0"),
            )
        })?;
        if addresses.contains(&address) {
            return Err(invalid(
                "spec.vm.pci_passthrough",
                format!("`{text}` is listed twice"),
            ));
        }
        addresses.push(address);
    }
    Ok(())
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A `vm.disks[].volume`: an absolute path on the host, or `pool/volume`
/// in a libvirt storage pool.
pub fn volume_source(volume: &str) -> Result<DiskSource, String> {
    if volume.starts_with('/') {
        return Ok(DiskSource::File {
            path: PathBuf::from(volume),
            format: DiskFormat::Raw,
        });
    }
    match volume.split_once('/') {
        Some((pool, name)) if is_plain_name(pool) && is_plain_name(name) => {
            Ok(DiskSource::PoolVolume {
                pool: pool.to_string(),
                volume: name.to_string(),
            })
        }
        _ => Err("must be an absolute path or `pool/volume`".to_string()),
    }
}

/// Whether XML 1.0 can hold `text` at all: not NUL, the other C0 controls
/// but tab and line breaks, nor U+FFFE and U+FFFF, even as references.
fn xml_can_carry(text: &str) -> bool {
    !text.chars().any(|c| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{fffe}' | '\u{ffff}')
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::runtime::libvirt::domain_xml::BerthMetadata;
    use berth_proto::common::v1::{GpuRequest, Runtime, VmDisk};

    /// One way to break a VM spec.
    type VmChange = fn(&mut VmSpec);

    /// A valid VM spec, for tests to break one field of.
    pub(in crate::runtime::libvirt) fn vm_spec() -> WorkloadSpec {
        WorkloadSpec {
            runtime: Runtime::Libvirt as i32,
            vm: Some(VmSpec {
                vcpus: 2,
                memory_bytes: 512 << 20,
                disks: vec![VmDisk {
                    base_image: "/images/debian.qcow2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field_of(spec: &WorkloadSpec) -> &'static str {
        match validate(spec) {
            Err(AgentError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_vm_spec_is_valid() {
        assert!(validate(&vm_spec()).is_ok());
    }

    /// Found by the `workload_spec` fuzz target: a label holding NUL made
    /// the VM's metadata unreadable (the agent would not know its own VM),
    /// and spaces, tabs and line breaks in labels did not read back.
    #[test]
    fn labels_read_back_from_the_metadata_or_are_refused() {
        let mut spec = vm_spec();
        spec.labels = [(" key\t1\r\n".to_string(), " a\r\nb\t ".to_string())].into();
        assert!(validate(&spec).is_ok());
        let metadata = BerthMetadata {
            owner: "me".into(),
            labels: spec.labels.clone().into_iter().collect(),
            spec: Some(spec.clone()),
            ..Default::default()
        };
        assert_eq!(BerthMetadata::parse(&metadata.to_xml()), Some(metadata));
        spec.labels = [("k".to_string(), "a\0b".to_string())].into();
        let error = validate(&spec).unwrap_err().to_string();
        assert!(error.starts_with("spec.labels: label \"k\""), "{error}");
        spec.labels.clear();
        spec.vm.as_mut().unwrap().disks[0].base_image = "/images/\u{1}.qcow2".into();
        let error = validate(&spec).unwrap_err().to_string();
        assert!(error.starts_with("spec.vm.disks: disks[0]"), "{error}");
    }

    #[test]
    fn bad_sizes_name_their_field() {
        let cases: [(&str, VmChange); 7] = [
            ("spec.vm.vcpus", |vm| vm.vcpus = 0),
            ("spec.vm.vcpus", |vm| vm.vcpus = MAX_VCPUS + 1),
            ("spec.vm.memory_bytes", |vm| vm.memory_bytes = 0),
            ("spec.vm.memory_bytes", |vm| {
                vm.memory_bytes = (512 << 20) + 1
            }),
            ("spec.vm.memory_bytes", |vm| {
                vm.memory_bytes = MAX_MEMORY_BYTES + 1024
            }),
            ("spec.vm.disks", |vm| vm.disks.clear()),
            ("spec.vm.disks.base_image", |vm| {
                vm.disks[0].base_image = "relative.qcow2".into();
            }),
        ];
        for (field, change) in cases {
            let mut spec = vm_spec();
            change(spec.vm.as_mut().unwrap());
            assert_eq!(field_of(&spec), field);
        }
    }

    #[test]
    fn disks_networks_seeds_and_pci_are_checked() {
        let cases: [(&str, VmChange); 8] = [
            ("spec.vm.disks", |vm| vm.disks[0].volume = "/dev/sdb".into()),
            ("spec.vm.disks.size_bytes", |vm| {
                vm.disks[0] = VmDisk {
                    volume: "/dev/sdb".into(),
                    size_bytes: 1 << 30,
                    ..Default::default()
                };
            }),
            ("spec.vm.disks.volume", |vm| {
                vm.disks[0] = VmDisk {
                    volume: "no-pool".into(),
                    ..Default::default()
                };
            }),
            ("spec.vm.bridge", |vm| {
                vm.bridge = "a-bridge-name-too-long".into()
            }),
            ("spec.vm.network", |vm| vm.network = "bad name".into()),
            ("spec.vm.cloud_init_seed", |vm| {
                vm.cloud_init_seed = "/seed.iso".into();
                vm.cloud_init_user_data = "#cloud-config\n".into();
            }),
            ("spec.vm.pci_passthrough", |vm| {
                vm.pci_passthrough = vec!["3b:00".into()]
            }),
            ("spec.vm.pci_passthrough", |vm| {
                vm.pci_passthrough = vec!["3b:00.0".into(), "0000:3b:00.0".into()];
            }),
        ];
        for (field, change) in cases {
            let mut spec = vm_spec();
            change(spec.vm.as_mut().unwrap());
            assert_eq!(field_of(&spec), field);
        }
    }

    #[test]
    fn container_fields_are_refused_with_what_to_use_instead() {
        let mut spec = vm_spec();
        spec.image = "busybox".into();
        assert_eq!(field_of(&spec), "spec.image");
        let mut spec = vm_spec();
        spec.gpus = Some(GpuRequest {
            count: 1,
            ..Default::default()
        });
        let error = validate(&spec).unwrap_err().to_string();
        assert!(error.contains("vm.pci_passthrough"), "{error}");
        let mut spec = vm_spec();
        spec.vm = None;
        assert_eq!(field_of(&spec), "spec.vm");
    }
}
