//! Every device of every source under its id, and the sources the host
//! lacks: what turns the device ids of a request into samplers to subscribe
//! to, or into an error that says what is wrong with the id.

use std::collections::{BTreeMap, HashSet};

use crate::error::{PowerError, StartError};
use crate::reading::DeviceInfo;
use crate::source::Source;

#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub info: DeviceInfo,
    /// The sampler that reads it (the source's position), and its index there.
    pub sampler: usize,
    pub index: u16,
}

#[derive(Debug)]
pub struct DeviceRegistry {
    entries: Vec<DeviceEntry>,
    unavailable: BTreeMap<String, String>,
}

impl DeviceRegistry {
    pub fn new(
        sources: &[Box<dyn Source>],
        unavailable: BTreeMap<String, String>,
    ) -> Result<Self, StartError> {
        let mut entries: Vec<DeviceEntry> = Vec::new();
        for (sampler, source) in sources.iter().enumerate() {
            for (index, info) in source.devices().iter().enumerate() {
                if entries.iter().any(|e| e.info.id == info.id) {
                    return Err(StartError::DuplicateReplayDevice(info.id.clone()));
                }
                entries.push(DeviceEntry {
                    info: info.clone(),
                    sampler,
                    index: index as u16,
                });
            }
        }
        Ok(Self {
            entries,
            unavailable,
        })
    }

    pub fn entries(&self) -> &[DeviceEntry] {
        &self.entries
    }

    pub fn get(&self, index: usize) -> &DeviceEntry {
        &self.entries[index]
    }

    /// Sources that are missing, keyed by their device id prefix.
    pub fn unavailable(&self) -> &BTreeMap<String, String> {
        &self.unavailable
    }

    /// The entries for device ids; no ids means every device.
    pub fn resolve(&self, ids: &[String]) -> Result<Vec<usize>, PowerError> {
        if ids.is_empty() {
            if self.entries.is_empty() {
                return Err(PowerError::NoDevices(self.describe_unavailable()));
            }
            return Ok((0..self.entries.len()).collect());
        }
        let mut seen = HashSet::new();
        ids.iter()
            .map(|id| {
                if !seen.insert(id.as_str()) {
                    return Err(PowerError::DuplicateDevice(id.clone()));
                }
                self.find(id)
            })
            .collect()
    }

    fn find(&self, id: &str) -> Result<usize, PowerError> {
        if let Some(index) = self.entries.iter().position(|e| e.info.id == id) {
            return Ok(index);
        }
        let prefix = id.split(':').next().unwrap_or_default();
        if let Some((source_name, reason)) = self.unavailable.get_key_value(prefix) {
            return Err(PowerError::SourceUnavailable {
                device: id.to_string(),
                source_name: match source_name.as_str() {
                    "nvml" => "NVML",
                    "rapl" => "RAPL",
                    _ => "its source",
                },
                reason: reason.clone(),
            });
        }
        let known: Vec<&str> = self.entries.iter().map(|e| e.info.id.as_str()).collect();
        Err(PowerError::UnknownDevice {
            device: id.to_string(),
            known: if known.is_empty() {
                "no device".to_string()
            } else {
                known.join(", ")
            },
        })
    }

    fn describe_unavailable(&self) -> String {
        if self.unavailable.is_empty() {
            return "no source is configured".to_string();
        }
        self.unavailable
            .iter()
            .map(|(source, reason)| format!("{source}: {reason}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use berth_server::{ErrorCode, ServiceError};

    use super::*;
    use crate::source::ReplaySource;

    fn registry() -> DeviceRegistry {
        let trace = "time_s,device,power_w\n0,gpu0,1\n0,gpu1,2\n";
        let source = ReplaySource::parse(Path::new("t.csv"), trace).unwrap();
        let unavailable = BTreeMap::from([(
            "nvml".to_string(),
            "libnvidia-ml.so.1: not found".to_string(),
        )]);
        DeviceRegistry::new(&[Box::new(source) as Box<dyn Source>], unavailable).unwrap()
    }

    #[test]
    fn ids_resolve_or_say_why_not() {
        let registry = registry();
        assert_eq!(registry.resolve(&[]).unwrap(), [0, 1]);
        assert_eq!(registry.resolve(&["replay:gpu1".into()]).unwrap(), [1]);

        let unavailable = registry.resolve(&["nvml:0".into()]).unwrap_err();
        assert_eq!(unavailable.error_code(), ErrorCode::Unavailable);
        let message = unavailable.to_string();
        assert!(
            message.contains("nvml:0") && message.contains("libnvidia-ml.so.1"),
            "{message}"
        );

        let unknown = registry.resolve(&["replay:gpu7".into()]).unwrap_err();
        assert_eq!(unknown.error_code(), ErrorCode::NotFound);
        assert!(
            unknown
                .to_string()
                .contains("`replay:gpu7` not found; this host has: replay:gpu0, replay:gpu1")
        );

        let twice = registry
            .resolve(&["replay:gpu0".into(), "replay:gpu0".into()])
            .unwrap_err();
        assert_eq!(twice.error_code(), ErrorCode::BadRequest);
    }

    #[test]
    fn two_traces_may_not_define_the_same_device() {
        let trace = "time_s,device\n0,gpu0\n";
        let sources: Vec<Box<dyn Source>> = vec![
            Box::new(ReplaySource::parse(Path::new("a.csv"), trace).unwrap()),
            Box::new(ReplaySource::parse(Path::new("b.csv"), trace).unwrap()),
        ];
        let error = DeviceRegistry::new(&sources, BTreeMap::new()).unwrap_err();
        assert!(error.to_string().contains("replay:gpu0"));
    }

    #[test]
    fn no_device_at_all_says_what_is_missing() {
        let registry =
            DeviceRegistry::new(&[], BTreeMap::from([("rapl".into(), "no zone".into())])).unwrap();
        let error = registry.resolve(&[]).unwrap_err();
        assert_eq!(error.error_code(), ErrorCode::FailedPrecondition);
        assert!(error.to_string().contains("rapl: no zone"));
    }
}
