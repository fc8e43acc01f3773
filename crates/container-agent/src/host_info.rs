//! What this host is: name, CPUs, memory, OS, GPUs.
//!
//! GPUs come from `agent.declared_gpus` when that is set, else from NVML,
//! which is loaded at run time: a host without the NVIDIA driver reports no
//! GPUs, says why in the log, and runs the agent all the same.

use std::ffi::OsStr;

use berth_proto::agent::v1::{Gpu, HostInfo};
use nvml_wrapper::Nvml;

use crate::config::AgentConfig;

/// The host's facts, GPUs included. NVML discovery may take hundreds of
/// milliseconds: call this once, at start, off the async runtime.
pub fn probe(config: &AgentConfig) -> HostInfo {
    HostInfo {
        gpus: gpus(config),
        ..probe_without_gpus()
    }
}

/// The host's facts that cost nothing to read: everything but the GPUs.
pub fn probe_without_gpus() -> HostInfo {
    HostInfo {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: memory_bytes(),
        os: format!(
            "{} {}",
            std::env::consts::OS,
            kernel_release().unwrap_or_default()
        ),
        ..Default::default()
    }
}

/// Physical memory in bytes; 0 when unknown.
pub fn memory_bytes() -> u64 {
    mem_total_bytes().unwrap_or(0)
}

/// The GPUs this host reports: the declared ones when there are any (NVML is
/// then not consulted), else the ones NVML finds.
pub fn gpus(config: &AgentConfig) -> Vec<Gpu> {
    if !config.declared_gpus.is_empty() {
        tracing::info!(
            gpus = config.declared_gpus.len(),
            "reporting the GPUs in agent.declared_gpus; NVML not consulted"
        );
        return config
            .declared_gpus
            .iter()
            .map(|gpu| Gpu {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                name: gpu.name.clone(),
                memory_bytes: gpu.memory_bytes,
                power_device: if gpu.power_device.is_empty() {
                    nvml_power_device(gpu.index)
                } else {
                    gpu.power_device.clone()
                },
            })
            .collect();
    }
    discover(&config.nvml_library)
}

/// NVML loaded from `library` (empty: the driver's `libnvidia-ml.so.1`), or
/// why it cannot be.
pub(crate) fn open_nvml(library: &str) -> Result<Nvml, String> {
    if cfg!(target_feature = "crt-static") {
        // The agent image's static-pie build: a static glibc binary cannot
        // dlopen NVML reliably (docs/operations.md, "Images"), and a crash
        // here would stop the agent.
        return Err(format!(
            "this agent is a static binary, which does not load NVML{}",
            if library.is_empty() {
                String::new()
            } else {
                format!(" (agent.nvml_library = {library:?} ignored)")
            }
        ));
    }
    if library.is_empty() {
        Nvml::init().map_err(|error| format!("NVML (libnvidia-ml.so.1) unavailable: {error}"))
    } else {
        Nvml::builder()
            .lib_path(OsStr::new(library))
            .init()
            .map_err(|error| {
                format!("agent.nvml_library = {library:?} could not be loaded: {error}")
            })
    }
}

/// NVIDIA GPUs through NVML loaded from `library`. Never fails: a host
/// without NVML has no GPUs.
fn discover(library: &str) -> Vec<Gpu> {
    let nvml = match open_nvml(library) {
        Ok(nvml) => nvml,
        Err(reason) => {
            // The usual case on hosts without an NVIDIA driver.
            tracing::info!(
                "no NVIDIA GPUs reported: {reason}; set agent.declared_gpus for GPUs NVML cannot see"
            );
            return Vec::new();
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(error) => {
            tracing::warn!("no GPUs reported: NVML could not count the GPUs: {error}");
            return Vec::new();
        }
    };
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(device) => device,
            Err(error) => {
                tracing::warn!("GPU {index} not reported: NVML could not open it: {error}");
                continue;
            }
        };
        let uuid = match device.uuid() {
            Ok(uuid) => uuid,
            Err(error) => {
                tracing::warn!("GPU {index} not reported: NVML has no UUID for it: {error}");
                continue;
            }
        };
        let name = device
            .name()
            .unwrap_or_else(|_| format!("NVIDIA GPU {index}"));
        let memory_bytes = match device.memory_info() {
            Ok(memory) => memory.total,
            Err(error) => {
                tracing::warn!("GPU {index} ({uuid}) reported with 0 bytes of memory: {error}");
                0
            }
        };
        gpus.push(Gpu {
            index,
            uuid,
            name,
            memory_bytes,
            power_device: nvml_power_device(index),
        });
    }
    tracing::info!(
        gpus = gpus.len(),
        "found the host's NVIDIA GPUs through NVML"
    );
    gpus
}

/// The power sampler's id of the NVML device with this index: both number
/// GPUs as the driver does.
fn nvml_power_device(index: u32) -> String {
    format!("nvml:{index}")
}

fn mem_total_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn kernel_release() -> Option<String> {
    Some(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()?
            .trim()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeclaredGpu;

    #[test]
    fn probes_this_host() {
        let info = probe(&AgentConfig::default());
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > 0);
        assert!(!info.hostname.is_empty());
    }

    #[test]
    fn declared_gpus_replace_discovery() {
        let config = AgentConfig {
            // Would fail to load, and is not even tried.
            nvml_library: "/nonexistent/libnvidia-ml.so.1".into(),
            declared_gpus: vec![
                DeclaredGpu {
                    index: 0,
                    uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
                    name: "Test GPU".into(),
                    memory_bytes: 80 << 30,
                    power_device: String::new(),
                },
                DeclaredGpu {
                    index: 1,
                    uuid: "GPU-11111111-1111-1111-1111-111111111111".into(),
                    name: "Other GPU".into(),
                    memory_bytes: 24 << 30,
                    power_device: "replay:gpu1".into(),
                },
            ],
            ..AgentConfig::default()
        };
        let info = probe(&config);
        assert_eq!(
            info.gpus,
            vec![
                Gpu {
                    index: 0,
                    uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
                    name: "Test GPU".into(),
                    memory_bytes: 80 << 30,
                    power_device: "nvml:0".into(),
                },
                Gpu {
                    index: 1,
                    uuid: "GPU-11111111-1111-1111-1111-111111111111".into(),
                    name: "Other GPU".into(),
                    memory_bytes: 24 << 30,
                    power_device: "replay:gpu1".into(),
                },
            ]
        );
        assert!(info.memory_bytes > 0);
    }

    #[test]
    fn an_nvml_library_that_is_not_there_gives_no_gpus() {
        let config = AgentConfig {
            nvml_library: "/nonexistent/libnvidia-ml.so.1".into(),
            ..AgentConfig::default()
        };
        assert!(gpus(&config).is_empty());
        // Not a library at all.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a shared object").unwrap();
        let config = AgentConfig {
            nvml_library: file.path().display().to_string(),
            ..AgentConfig::default()
        };
        assert!(gpus(&config).is_empty());
    }
}
