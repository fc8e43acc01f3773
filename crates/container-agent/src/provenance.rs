//! What decides an energy figure measured on this host (issue #22): the
//! CPU's frequency policy, the kernel, the GPUs' power limits, clocks,
//! persistence and ECC modes, their temperature when a run starts, and what
//! the workload runs from. The orchestrator asks once per run and stores
//! the answer with it, so runs measured under different settings are never
//! compared without saying so.

use std::path::Path;
use std::sync::OnceLock;

use berth_proto::agent::v1::{GpuProvenance, Provenance};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use crate::config::{AgentConfig, DeclaredGpu};
use crate::host_info;

const CPUFREQ: &str = "/sys/devices/system/cpu/cpu0/cpufreq";

/// Reads provenance; NVML is loaded once, on first use (it may take
/// hundreds of milliseconds), and kept.
pub struct ProvenanceProbe {
    kernel: String,
    cpu_model: String,
    nvml_library: String,
    declared_gpus: Vec<DeclaredGpu>,
    nvml: OnceLock<Result<Nvml, String>>,
}

impl ProvenanceProbe {
    pub fn new(config: &AgentConfig) -> Self {
        Self {
            kernel: host_info::kernel_release().unwrap_or_default(),
            cpu_model: cpu_model().unwrap_or_default(),
            nvml_library: config.nvml_library.clone(),
            declared_gpus: config.declared_gpus.clone(),
            nvml: OnceLock::new(),
        }
    }

    /// The provenance of a run of a workload with this spec, now. Blocking
    /// (NVML, sysfs): call it off the async runtime.
    pub fn describe(&self, spec: &WorkloadSpec) -> Provenance {
        let mut provenance = Provenance {
            berth_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: self.kernel.clone(),
            cpu_model: self.cpu_model.clone(),
            runtime: spec.runtime,
            image: image_of(spec),
            ..Default::default()
        };
        let cpufreq = Path::new(CPUFREQ);
        if cpufreq.is_dir() {
            provenance.cpu_governor = read_trimmed(&cpufreq.join("scaling_governor"));
            provenance.cpu_scaling_driver = read_trimmed(&cpufreq.join("scaling_driver"));
            provenance.cpu_min_khz = read_trimmed(&cpufreq.join("scaling_min_freq")).parse().ok();
            provenance.cpu_max_khz = read_trimmed(&cpufreq.join("scaling_max_freq")).parse().ok();
            provenance.cpu_energy_preference =
                read_trimmed(&cpufreq.join("energy_performance_preference"));
        } else {
            provenance.unknown.push(format!(
                "cpu frequency policy: {CPUFREQ} does not exist (no cpufreq, e.g. in a VM)"
            ));
        }
        self.describe_gpus(spec, &mut provenance);
        provenance
    }

    fn describe_gpus(&self, spec: &WorkloadSpec, provenance: &mut Provenance) {
        if !self.declared_gpus.is_empty() {
            provenance.gpus = self
                .declared_gpus
                .iter()
                .filter(|gpu| given(spec, gpu.index, &gpu.uuid))
                .map(|gpu| GpuProvenance {
                    index: gpu.index,
                    uuid: gpu.uuid.clone(),
                    name: gpu.name.clone(),
                    ..Default::default()
                })
                .collect();
            provenance
                .unknown
                .push("gpu settings: agent.declared_gpus is set, so NVML is not consulted".into());
            return;
        }
        let nvml = match self
            .nvml
            .get_or_init(|| host_info::open_nvml(&self.nvml_library))
        {
            Ok(nvml) => nvml,
            Err(reason) => {
                provenance.unknown.push(format!("gpus: {reason}"));
                return;
            }
        };
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let nvml_version = nvml.sys_nvml_version().unwrap_or_default();
        let cuda_driver_version = nvml
            .sys_cuda_driver_version()
            .map(|v| {
                format!(
                    "{}.{}",
                    nvml_wrapper::cuda_driver_version_major(v),
                    nvml_wrapper::cuda_driver_version_minor(v)
                )
            })
            .unwrap_or_default();
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                provenance
                    .unknown
                    .push(format!("gpus: NVML could not count them: {error}"));
                return;
            }
        };
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(error) => {
                    provenance
                        .unknown
                        .push(format!("gpu {index}: NVML could not open it: {error}"));
                    continue;
                }
            };
            let uuid = device.uuid().unwrap_or_default();
            if !given(spec, index, &uuid) {
                continue;
            }
            let mut unread = Vec::new();
            let mut read = |what: &str, error: NvmlError| {
                // NotSupported is the GPU's answer (e.g. no ECC on a
                // consumer board), not a failure worth a line per run.
                if !matches!(error, NvmlError::NotSupported) {
                    unread.push(format!("{what}: {error}"));
                }
            };
            let gpu = GpuProvenance {
                index,
                uuid,
                name: device.name().unwrap_or_default(),
                vbios_version: device.vbios_version().unwrap_or_default(),
                driver_version: driver_version.clone(),
                nvml_version: nvml_version.clone(),
                cuda_driver_version: cuda_driver_version.clone(),
                power_limit_w: device
                    .enforced_power_limit()
                    .map_err(|e| read("power limit", e))
                    .ok()
                    .map(milliwatts_to_watts),
                default_power_limit_w: device
                    .power_management_limit_default()
                    .map_err(|e| read("default power limit", e))
                    .ok()
                    .map(milliwatts_to_watts),
                persistence_mode: device
                    .is_in_persistent_mode()
                    .map_err(|e| read("persistence mode", e))
                    .ok(),
                applications_graphics_clock_mhz: device
                    .applications_clock(Clock::Graphics)
                    .map_err(|e| read("applications graphics clock", e))
                    .ok(),
                applications_memory_clock_mhz: device
                    .applications_clock(Clock::Memory)
                    .map_err(|e| read("applications memory clock", e))
                    .ok(),
                ecc_enabled: device
                    .is_ecc_enabled()
                    .map_err(|e| read("ecc mode", e))
                    .ok()
                    .map(|ecc| ecc.currently_enabled),
                temperature_c: device
                    .temperature(TemperatureSensor::Gpu)
                    .map_err(|e| read("temperature", e))
                    .ok()
                    .map(f64::from),
                performance_state: device
                    .performance_state()
                    .map_err(|e| read("performance state", e))
                    .ok()
                    .map(|state| state.as_c())
                    .filter(|&state| state <= 15),
            };
            provenance
                .unknown
                .extend(unread.into_iter().map(|what| format!("gpu {index} {what}")));
            provenance.gpus.push(gpu);
        }
    }
}

/// Whether the workload was given this GPU: the ones its spec names by
/// index or UUID, or all of the host's when it names none.
fn given(spec: &WorkloadSpec, index: u32, uuid: &str) -> bool {
    let Some(request) = &spec.gpus else {
        return true;
    };
    request.device_ids.is_empty()
        || request
            .device_ids
            .iter()
            .any(|id| id == uuid || id.parse::<u32>() == Ok(index))
}

/// What the workload runs from: a container image, a VM's first disk, a
/// host process's program.
fn image_of(spec: &WorkloadSpec) -> String {
    match spec.runtime() {
        Runtime::Libvirt => spec
            .vm
            .as_ref()
            .and_then(|vm| vm.disks.first())
            .map(|disk| {
                if disk.base_image.is_empty() {
                    disk.volume.clone()
                } else {
                    disk.base_image.clone()
                }
            })
            .unwrap_or_default(),
        Runtime::Process => spec.command.first().cloned().unwrap_or_default(),
        _ => spec.image.clone(),
    }
}

fn milliwatts_to_watts(milliwatts: u32) -> f64 {
    f64::from(milliwatts) / 1000.0
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
}

#[cfg(test)]
mod tests {
    use berth_proto::common::v1::{GpuRequest, VmDisk, VmSpec};

    use super::*;

    fn declared(index: u32, name: &str) -> DeclaredGpu {
        DeclaredGpu {
            index,
            uuid: format!("GPU-{index}"),
            name: name.into(),
            memory_bytes: 0,
            power_device: String::new(),
        }
    }

    #[test]
    fn this_host_is_described() {
        let probe = ProvenanceProbe::new(&AgentConfig {
            nvml_library: "/nonexistent/libnvidia-ml.so.1".into(),
            ..AgentConfig::default()
        });
        let spec = WorkloadSpec {
            runtime: Runtime::Docker as i32,
            image: "bench:1".into(),
            ..Default::default()
        };
        let provenance = probe.describe(&spec);
        assert_eq!(provenance.berth_version, env!("CARGO_PKG_VERSION"));
        assert!(!provenance.kernel.is_empty());
        assert!(!provenance.cpu_model.is_empty(), "{provenance:?}");
        assert_eq!(provenance.image, "bench:1");
        assert!(provenance.gpus.is_empty());
        assert!(
            provenance
                .unknown
                .iter()
                .any(|why| why.starts_with("gpus: ") && why.contains("/nonexistent")),
            "{:?}",
            provenance.unknown
        );
        if Path::new(CPUFREQ).is_dir() {
            assert!(!provenance.cpu_governor.is_empty());
        }
    }

    #[test]
    fn only_the_gpus_given_to_the_workload_are_described() {
        let probe = ProvenanceProbe::new(&AgentConfig {
            declared_gpus: vec![declared(0, "A"), declared(1, "B"), declared(2, "C")],
            ..AgentConfig::default()
        });
        let mut spec = WorkloadSpec::default();
        let names = |probe: &ProvenanceProbe, spec: &WorkloadSpec| -> Vec<String> {
            probe
                .describe(spec)
                .gpus
                .into_iter()
                .map(|g| g.name)
                .collect()
        };
        assert_eq!(names(&probe, &spec), ["A", "B", "C"]);
        spec.gpus = Some(GpuRequest {
            device_ids: vec!["2".into(), "GPU-0".into()],
            ..Default::default()
        });
        assert_eq!(names(&probe, &spec), ["A", "C"]);
    }

    #[test]
    fn the_image_is_what_the_runtime_runs_from() {
        let vm = WorkloadSpec {
            runtime: Runtime::Libvirt as i32,
            vm: Some(VmSpec {
                disks: vec![VmDisk {
                    base_image: "/images/guest.qcow2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(image_of(&vm), "/images/guest.qcow2");
        let process = WorkloadSpec {
            runtime: Runtime::Process as i32,
            command: vec!["/usr/bin/python3".into(), "bench.py".into()],
            ..Default::default()
        };
        assert_eq!(image_of(&process), "/usr/bin/python3");
    }
}
