//! NVIDIA GPUs through NVML. The library is loaded at run time, so a host
//! without the driver gets a clear "unavailable" instead of a link error.
//!
//! Per GPU: the total energy counter (Volta and newer; millijoules since the
//! driver loaded, the figure to trust), the instantaneous power field where
//! the driver has it (since Ampere `nvmlDeviceGetPowerUsage` is a 1 s average,
//! which is then reported as the averaged power), utilisation, memory,
//! temperature and SM clock.

use std::ffi::OsStr;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock as NvmlClock, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::NVML_FI_DEV_POWER_INSTANT;

use super::Source;
use crate::clock::Clock;
use crate::reading::{DeviceInfo, Reading, SourceError, SourceKind};

/// Utilisation, memory, temperature and clock change slowly and cost an NVML
/// call each: they are read at most this often, and left unset in between,
/// so that sampling power at 1 kHz does not pay for them.
const SLOW_FIELDS_PERIOD: Duration = Duration::from_millis(100);

pub struct NvmlSource {
    nvml: Nvml,
    devices: Vec<DeviceInfo>,
    gpus: Vec<Gpu>,
}

/// What one GPU was found to support when the source opened.
struct Gpu {
    index: u32,
    has_energy: bool,
    has_instant_power: bool,
    has_power: bool,
    slow_fields_read_at: Option<Duration>,
}

fn nvml_error(context: impl Into<String>) -> impl FnOnce(NvmlError) -> SourceError {
    let context = context.into();
    move |source| SourceError::Nvml { context, source }
}

impl NvmlSource {
    /// Loads NVML from `library` (empty: the driver's `libnvidia-ml.so.1`)
    /// and probes every GPU.
    pub fn open(library: &str) -> Result<Self, SourceError> {
        let nvml = if library.is_empty() {
            Nvml::init()
        } else {
            Nvml::builder().lib_path(OsStr::new(library)).init()
        }
        .map_err(nvml_error(if library.is_empty() {
            "loading libnvidia-ml.so.1".to_string()
        } else {
            format!("loading {library} (sampler.nvml_library)")
        }))?;
        let count = nvml.device_count().map_err(nvml_error("counting GPUs"))?;
        if count == 0 {
            return Err(SourceError::Missing("NVML found no GPU".into()));
        }
        let mut devices = Vec::new();
        let mut gpus = Vec::new();
        for index in 0..count {
            let device = nvml
                .device_by_index(index)
                .map_err(nvml_error(format!("GPU {index}")))?;
            let has_instant_power = instant_power(&device).is_some();
            let gpu = Gpu {
                index,
                has_energy: device.total_energy_consumption().is_ok(),
                has_instant_power,
                has_power: has_instant_power || device.power_usage().is_ok(),
                slow_fields_read_at: None,
            };
            devices.push(DeviceInfo {
                id: format!("nvml:{index}"),
                name: device
                    .name()
                    .unwrap_or_else(|_| format!("NVIDIA GPU {index}")),
                kind: SourceKind::Nvml,
                has_energy_counter: gpu.has_energy,
                has_power: gpu.has_power,
                counter_range_j: None,
            });
            gpus.push(gpu);
        }
        Ok(Self {
            nvml,
            devices,
            gpus,
        })
    }
}

/// The instantaneous power field, in watts, when the driver has it.
fn instant_power(device: &nvml_wrapper::Device<'_>) -> Option<f64> {
    let values = device
        .field_values_for(&[FieldId(NVML_FI_DEV_POWER_INSTANT)])
        .ok()?;
    match values.into_iter().next()? {
        Ok(FieldValueSample {
            value: Ok(value), ..
        }) => {
            let milliwatts = match value {
                SampleValue::F64(v) => v,
                SampleValue::U32(v) => f64::from(v),
                SampleValue::U64(v) => v as f64,
                SampleValue::I64(v) => v as f64,
            };
            Some(milliwatts / 1000.0)
        }
        _ => None,
    }
}

impl Source for NvmlSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Nvml
    }

    fn name(&self) -> &str {
        "nvml"
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn read(&mut self, clock: &Clock, out: &mut Vec<Reading>, failures: &mut Vec<SourceError>) {
        for (slot, gpu) in self.gpus.iter_mut().enumerate() {
            let device = match self.nvml.device_by_index(gpu.index) {
                Ok(device) => device,
                Err(error) => {
                    failures.push(nvml_error(format!("GPU {}", gpu.index))(error));
                    continue;
                }
            };
            let at = clock.now();
            let energy = gpu.has_energy.then(|| device.total_energy_consumption());
            let average = gpu.has_power.then(|| device.power_usage());
            let instant = if gpu.has_instant_power {
                instant_power(&device)
            } else {
                None
            };
            // A GPU that stops answering both energy and power has fallen off
            // the bus or lost its driver: report it rather than a blank reading.
            let energy_j = match energy {
                Some(Ok(millijoules)) => Some(millijoules as f64 / 1000.0),
                _ => None,
            };
            let average_w = match average {
                Some(Ok(milliwatts)) => Some(f64::from(milliwatts) / 1000.0),
                _ => None,
            };
            if energy_j.is_none() && average_w.is_none() && instant.is_none() {
                let error = match (energy, average) {
                    (Some(Err(error)), _) | (_, Some(Err(error))) => error,
                    _ => NvmlError::NotSupported,
                };
                failures.push(nvml_error(format!("reading GPU {}", gpu.index))(error));
                continue;
            }
            let mut reading = Reading {
                device: slot as u16,
                at,
                energy_j,
                // The instantaneous field is the power; the 1 s average is
                // kept beside it. Without the field, the reading is all there is.
                power_w: instant.or(average_w),
                power_avg_w: instant.and(average_w),
                ..Reading::default()
            };
            let due = gpu
                .slow_fields_read_at
                .is_none_or(|last| at.saturating_sub(last) >= SLOW_FIELDS_PERIOD);
            if due {
                gpu.slow_fields_read_at = Some(at);
                reading.utilization_pct = device.utilization_rates().ok().map(|u| u.gpu as f32);
                reading.memory_used_bytes = device.memory_info().ok().map(|m| m.used);
                reading.temperature_c = device
                    .temperature(TemperatureSensor::Gpu)
                    .ok()
                    .map(|t| t as f32);
                reading.sm_clock_mhz = device.clock_info(NvmlClock::SM).ok();
            }
            out.push(reading);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let error = NvmlSource::open("/nonexistent/libnvidia-ml.so.1")
            .err()
            .expect("no NVML library at that path");
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent/libnvidia-ml.so.1")
                && message.contains("sampler.nvml_library"),
            "{message}"
        );
    }
}
