//! The files a VM needs on the agent's host: a copy-on-write overlay per
//! base image (qemu-img) and a cloud-init NoCloud seed. Everything the agent
//! makes for one VM lives in one directory of its own under
//! `libvirt.disk_dir`, removed with the VM; base images, volumes and seeds
//! given by the user are only read.

use std::path::{Path, PathBuf};

use berth_proto::common::v1::VmSpec;
use tokio::process::Command;

use super::domain_xml::{DiskFormat, DiskSource, DomainDisk};
use super::vm_spec::volume_source;
use crate::error::AgentError;

/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Programs that write an ISO 9660 image, with the arguments that make
/// them behave like `genisoimage`.
const ISO_TOOLS: [(&str, &[&str]); 3] = [
    ("genisoimage", &[]),
    ("mkisofs", &[]),
    ("xorriso", &["-as", "mkisofs"]),
];

/// The disks of a VM, ready for its domain XML.
#[derive(Debug)]
pub struct PreparedDisks {
    pub disks: Vec<DomainDisk>,
    /// The directory of what the agent made; `None` when it made nothing.
    pub files_dir: Option<PathBuf>,
}

/// Checks every file the spec names, then makes the overlays and the seed.
/// On failure nothing made here is left behind.
pub async fn prepare(
    name: &str,
    vm: &VmSpec,
    disk_dir: &Path,
) -> Result<PreparedDisks, AgentError> {
    let seed_tool = if vm.cloud_init_user_data.is_empty() {
        None
    } else {
        Some(find_iso_tool().ok_or_else(|| AgentError::Unsupported {
            field: "spec.vm.cloud_init_user_data",
            reason: "making a NoCloud seed needs genisoimage, mkisofs or xorriso on the agent's host (Debian: apt-get install genisoimage); or give a seed image of your own in vm.cloud_init_seed".to_string(),
        })?)
    };
    let mut plan = Vec::with_capacity(vm.disks.len());
    for (index, disk) in vm.disks.iter().enumerate() {
        if disk.base_image.is_empty() {
            plan.push(Planned::Existing(existing_volume(index, &disk.volume)?));
        } else {
            let base = PathBuf::from(&disk.base_image);
            let field = format!("spec.vm.disks[{index}].base_image");
            match image_format(&base) {
                Err(_) => {
                    return Err(AgentError::FileNotFound {
                        field,
                        path: disk.base_image.clone(),
                    });
                }
                Ok(DiskFormat::Raw) => {
                    return Err(AgentError::InvalidArgument {
                        field: "spec.vm.disks.base_image",
                        reason: format!(
                            "disks[{index}].base_image = `{}` is not a qcow2 image (give a raw image as a volume)",
                            disk.base_image
                        ),
                    });
                }
                Ok(DiskFormat::Qcow2) => plan.push(Planned::Overlay {
                    base,
                    size_bytes: disk.size_bytes,
                }),
            }
        }
    }
    let user_seed = (!vm.cloud_init_seed.is_empty())
        .then(|| {
            let path = PathBuf::from(&vm.cloud_init_seed);
            if path.is_file() {
                Ok(path)
            } else {
                Err(AgentError::FileNotFound {
                    field: "spec.vm.cloud_init_seed".to_string(),
                    path: vm.cloud_init_seed.clone(),
                })
            }
        })
        .transpose()?;

    let makes_files =
        seed_tool.is_some() || plan.iter().any(|p| matches!(p, Planned::Overlay { .. }));
    let files_dir = makes_files.then(|| {
        disk_dir.join(format!(
            "{name}.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
    });
    if let Some(dir) = &files_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            AgentError::Internal(format!(
                "cannot create {} for the VM's disks: {e}",
                dir.display()
            ))
        })?;
    }
    let made = make_files(name, vm, plan, user_seed, seed_tool, files_dir.as_deref()).await;
    match made {
        Ok(disks) => Ok(PreparedDisks { disks, files_dir }),
        Err(error) => {
            if let Some(dir) = &files_dir {
                remove_files_dir(dir, disk_dir);
            }
            Err(error)
        }
    }
}

enum Planned {
    Overlay { base: PathBuf, size_bytes: u64 },
    Existing(DiskSource),
}

async fn make_files(
    name: &str,
    vm: &VmSpec,
    plan: Vec<Planned>,
    user_seed: Option<PathBuf>,
    seed_tool: Option<(&'static str, &'static [&'static str])>,
    files_dir: Option<&Path>,
) -> Result<Vec<DomainDisk>, AgentError> {
    let mut disks = Vec::with_capacity(plan.len() + 1);
    for (index, planned) in plan.into_iter().enumerate() {
        let source = match (planned, files_dir) {
            (Planned::Overlay { base, size_bytes }, Some(dir)) => {
                let overlay = dir.join(format!("disk{index}.qcow2"));
                create_overlay(index, &base, &overlay, size_bytes).await?;
                DiskSource::File {
                    path: overlay,
                    format: DiskFormat::Qcow2,
                }
            }
            (Planned::Existing(source), _) => source,
            (Planned::Overlay { .. }, None) => {
                return Err(AgentError::Internal(
                    "no directory for the VM's overlays".into(),
                ));
            }
        };
        disks.push(DomainDisk {
            source,
            read_only: false,
        });
    }
    let seed = match (user_seed, seed_tool, files_dir) {
        (Some(path), _, _) => Some(path),
        (None, Some(tool), Some(dir)) => {
            Some(make_seed(name, &vm.cloud_init_user_data, tool, dir).await?)
        }
        _ => None,
    };
    if let Some(path) = seed {
        let format = image_format(&path).unwrap_or(DiskFormat::Raw);
        disks.push(DomainDisk {
            source: DiskSource::File { path, format },
            read_only: true,
        });
    }
    Ok(disks)
}

/// A volume given as a path must exist; a block device is attached as one.
fn existing_volume(index: usize, volume: &str) -> Result<DiskSource, AgentError> {
    let source = volume_source(volume).map_err(|reason| AgentError::InvalidArgument {
        field: "spec.vm.disks.volume",
        reason: format!("disks[{index}].volume = `{volume}`: {reason}"),
    })?;
    let DiskSource::File { path, .. } = source else {
        return Ok(source); // a pool volume: libvirt checks it at start
    };
    let metadata = std::fs::metadata(&path).map_err(|_| AgentError::FileNotFound {
        field: format!("spec.vm.disks[{index}].volume"),
        path: volume.to_string(),
    })?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&metadata.file_type()) {
        return Ok(DiskSource::Block { path });
    }
    let format = image_format(&path).map_err(|e| AgentError::InvalidArgument {
        field: "spec.vm.disks.volume",
        reason: format!("disks[{index}].volume = `{volume}` cannot be read: {e}"),
    })?;
    Ok(DiskSource::File { path, format })
}

/// qcow2 or raw, from the image's first bytes.
fn image_format(path: &Path) -> std::io::Result<DiskFormat> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let read = file.read(&mut magic)?;
    Ok(if read == magic.len() && &magic == QCOW2_MAGIC {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

async fn create_overlay(
    index: usize,
    base: &Path,
    overlay: &Path,
    size_bytes: u64,
) -> Result<(), AgentError> {
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay);
    if size_bytes > 0 {
        command.arg(size_bytes.to_string());
    }
    let output = command
        .output()
        .await
        .map_err(|e| AgentError::Unsupported {
            field: "spec.vm.disks.base_image",
            reason: format!(
                "cannot run qemu-img to make the overlay (Debian: apt-get install qemu-utils): {e}"
            ),
        })?;
    if !output.status.success() {
        return Err(AgentError::InvalidArgument {
            field: "spec.vm.disks.base_image",
            reason: format!(
                "disks[{index}]: qemu-img could not make an overlay on `{}`: {}",
                base.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn find_iso_tool() -> Option<(&'static str, &'static [&'static str])> {
    let path = std::env::var_os("PATH")?;
    ISO_TOOLS
        .into_iter()
        .find(|(tool, _)| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// A NoCloud seed: an ISO 9660 image labelled `cidata` with `user-data` and
/// `meta-data` at its root.
async fn make_seed(
    name: &str,
    user_data: &str,
    (tool, tool_args): (&'static str, &'static [&'static str]),
    dir: &Path,
) -> Result<PathBuf, AgentError> {
    let contents = dir.join("seed");
    let seed = dir.join("seed.iso");
    let write = |file: &str, text: &str| {
        std::fs::write(contents.join(file), text)
            .map_err(|e| AgentError::Internal(format!("cannot write the cloud-init {file}: {e}")))
    };
    std::fs::create_dir_all(&contents)
        .map_err(|e| AgentError::Internal(format!("cannot create {}: {e}", contents.display())))?;
    write("user-data", user_data)?;
    write(
        "meta-data",
        &format!("instance-id: {name}\nlocal-hostname: {name}\n"),
    )?;
    let output = Command::new(tool)
        .args(tool_args)
        .args(["-quiet", "-output"])
        .arg(&seed)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(contents.join("user-data"))
        .arg(contents.join("meta-data"))
        .output()
        .await
        .map_err(|e| AgentError::Internal(format!("cannot run {tool}: {e}")))?;
    // The seed image holds the data now; its sources are not needed.
    let _ = std::fs::remove_dir_all(&contents);
    if !output.status.success() {
        return Err(AgentError::Internal(format!(
            "{tool} could not make the cloud-init seed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(seed)
}

/// Removes a VM's own files. Only a directory under `disk_dir` is removed:
/// the path comes from a domain's metadata, which anyone with access to
/// libvirt can edit.
pub fn remove_files_dir(dir: &Path, disk_dir: &Path) {
    let inside = dir.starts_with(disk_dir)
        && dir != disk_dir
        && !dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !inside {
        tracing::warn!(dir = %dir.display(), disk_dir = %disk_dir.display(), "not removing a VM files directory outside libvirt.disk_dir");
        return;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "could not remove a VM's files"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::common::v1::VmDisk;

    fn base_image(dir: &Path) -> PathBuf {
        let base = dir.join("base.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap();
        assert!(status.success());
        base
    }

    fn vm(disks: Vec<VmDisk>) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn overlays_are_made_on_the_base_and_removed_without_it() {
        if berth_tests::require_part(berth_tests::Part::QemuImg).is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = base_image(tmp.path());
        let disk_dir = tmp.path().join("disks");
        let spec = vm(vec![VmDisk {
            base_image: base.display().to_string(),
            size_bytes: 128 << 20,
            ..Default::default()
        }]);
        let prepared = prepare("vm1", &spec, &disk_dir).await.unwrap();
        let files_dir = prepared.files_dir.clone().unwrap();
        let DiskSource::File { path, format } = &prepared.disks[0].source else {
            panic!("{:?}", prepared.disks);
        };
        assert_eq!(*format, DiskFormat::Qcow2);
        assert!(path.starts_with(&files_dir));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(path)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["backing-filename"], base.display().to_string());
        assert_eq!(info["virtual-size"], 128 << 20);
        remove_files_dir(&files_dir, &disk_dir);
        assert!(!files_dir.exists());
        assert!(base.exists(), "the base image stays");
    }

    #[tokio::test]
    async fn a_raw_base_or_a_missing_file_fails_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let disk_dir = tmp.path().join("disks");
        let raw = tmp.path().join("raw.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let missing = vm(vec![VmDisk {
            base_image: "/nonexistent/base.qcow2".into(),
            ..Default::default()
        }]);
        match prepare("vm1", &missing, &disk_dir).await {
            Err(AgentError::FileNotFound { field, path }) => {
                assert_eq!(field, "spec.vm.disks[0].base_image");
                assert_eq!(path, "/nonexistent/base.qcow2");
            }
            other => panic!("{other:?}"),
        }
        let raw_base = vm(vec![VmDisk {
            base_image: raw.display().to_string(),
            ..Default::default()
        }]);
        let error = prepare("vm1", &raw_base, &disk_dir).await.unwrap_err();
        assert!(error.to_string().contains("not a qcow2 image"), "{error}");
        let missing_seed = VmSpec {
            cloud_init_seed: "/nonexistent/seed.iso".into(),
            ..vm(vec![VmDisk {
                volume: raw.display().to_string(),
                ..Default::default()
            }])
        };
        assert!(matches!(
            prepare("vm1", &missing_seed, &disk_dir).await,
            Err(AgentError::FileNotFound { .. })
        ));
        assert!(!disk_dir.exists() || std::fs::read_dir(&disk_dir).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn volumes_are_used_as_they_are() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("data.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let spec = vm(vec![
            VmDisk {
                volume: raw.display().to_string(),
                ..Default::default()
            },
            VmDisk {
                volume: "default/data.qcow2".into(),
                ..Default::default()
            },
        ]);
        let prepared = prepare("vm1", &spec, tmp.path()).await.unwrap();
        assert_eq!(prepared.files_dir, None, "nothing made, nothing to remove");
        assert_eq!(
            prepared.disks[0].source,
            DiskSource::File {
                path: raw,
                format: DiskFormat::Raw
            }
        );
        assert_eq!(
            prepared.disks[1].source,
            DiskSource::PoolVolume {
                pool: "default".into(),
                volume: "data.qcow2".into()
            }
        );
    }

    #[tokio::test]
    async fn a_cloud_init_seed_is_an_iso_labelled_cidata() {
        if berth_tests::require_part(berth_tests::Part::IsoImage).is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("root.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let spec = VmSpec {
            cloud_init_user_data: "#cloud-config\nhostname: vm1\n".into(),
            ..vm(vec![VmDisk {
                volume: raw.display().to_string(),
                ..Default::default()
            }])
        };
        let prepared = prepare("vm1", &spec, tmp.path()).await.unwrap();
        let seed = &prepared.disks[1];
        assert!(seed.read_only);
        let DiskSource::File { path, .. } = &seed.source else {
            panic!("{seed:?}")
        };
        let image = std::fs::read(path).unwrap();
        // The ISO 9660 primary volume descriptor at 32 KiB holds the label.
        assert_eq!(&image[0x8001..0x8006], b"CD001");
        assert_eq!(&image[0x8028..0x802e], b"cidata");
        let text = String::from_utf8_lossy(&image);
        assert!(text.contains("hostname: vm1") && text.contains("instance-id: vm1"));
    }

    #[test]
    fn only_directories_under_disk_dir_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let disk_dir = tmp.path().join("disks");
        remove_files_dir(&outside, &disk_dir);
        remove_files_dir(&disk_dir.join("../outside"), &disk_dir);
        assert!(outside.exists());
    }
}
