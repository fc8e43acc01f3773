//! Where readings come from: NVML (GPUs), RAPL (CPU package and DRAM through
//! powercap) and replayed traces, all behind [`Source`]. Each source is read
//! on its own thread by the sampler. What a source produces (devices,
//! readings, errors) is plain data in [`crate::reading`], which the rest of
//! the crate uses without depending on the sources themselves.

mod nvml;
mod rapl;
mod replay;

use std::collections::BTreeMap;

pub use nvml::NvmlSource;
pub use rapl::RaplSource;
pub use replay::ReplaySource;

use crate::clock::Clock;
use crate::config::SamplerConfig;
use crate::reading::{DeviceInfo, Reading, SourceError, SourceKind};

/// A set of devices read together, at one instant, on one thread.
pub trait Source: Send {
    fn kind(&self) -> SourceKind;
    /// Names the source in metrics and logs, e.g. `rapl`, `replay:demo`.
    fn name(&self) -> &str;
    fn devices(&self) -> &[DeviceInfo];
    /// Reads every device once, appending one reading per device that could
    /// be read to `out` and why to `failures` for each that could not.
    fn read(&mut self, clock: &Clock, out: &mut Vec<Reading>, failures: &mut Vec<SourceError>);
}

/// The sources this host has, and why each missing one is missing.
pub struct Discovered {
    pub sources: Vec<Box<dyn Source>>,
    /// Keyed by [`SourceKind::prefix`].
    pub unavailable: BTreeMap<String, String>,
}

/// Opens every configured source. NVML and RAPL that cannot be opened are
/// reported unavailable (a host without a GPU still measures its CPU); a
/// configured replay trace that cannot be read is an error, since someone
/// asked for it by name.
pub fn discover(config: &SamplerConfig) -> Result<Discovered, SourceError> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    let mut unavailable = BTreeMap::new();
    // A source turned off in the config is still listed, so that asking for
    // its devices says why there are none; only a failure is worth a warning.
    let mut failed = |kind: SourceKind, error: SourceError| {
        tracing::warn!(source = kind.prefix(), %error, "source unavailable");
        unavailable.insert(kind.prefix().to_string(), error.to_string());
    };
    if config.nvml {
        match NvmlSource::open(&config.nvml_library) {
            Ok(source) => sources.push(Box::new(source)),
            Err(error) => failed(SourceKind::Nvml, error),
        }
    }
    if !config.powercap_root.as_os_str().is_empty() {
        match RaplSource::open(&config.powercap_root) {
            Ok(source) => sources.push(Box::new(source)),
            Err(error) => failed(SourceKind::Rapl, error),
        }
    }
    let turned_off = [
        (
            !config.nvml,
            SourceKind::Nvml,
            "turned off: sampler.nvml = false",
        ),
        (
            config.powercap_root.as_os_str().is_empty(),
            SourceKind::Rapl,
            "turned off: sampler.powercap_root is empty",
        ),
    ];
    for (off, kind, why) in turned_off {
        if off {
            unavailable.insert(kind.prefix().to_string(), why.to_string());
        }
    }
    for path in &config.replay_traces {
        sources.push(Box::new(ReplaySource::open(path)?));
    }
    Ok(Discovered {
        sources,
        unavailable,
    })
}
