//! Where readings come from: NVML (GPUs), RAPL (CPU package and DRAM through
//! powercap) and replayed traces, all behind [`Source`]. Each source is read
//! on its own thread by a [`crate::sampler::Sampler`].

mod nvml;
mod rapl;
mod replay;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use nvml::NvmlSource;
pub use rapl::RaplSource;
pub use replay::ReplaySource;

use crate::clock::Clock;
use crate::config::SamplerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Nvml,
    Rapl,
    Replay,
}

impl SourceKind {
    /// The prefix of the device ids of this kind, and its key in the list of
    /// unavailable sources.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::Rapl => "rapl",
            Self::Replay => "replay",
        }
    }
}

/// A device a source reads.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// `<kind prefix>:<name>`, e.g. `nvml:0`, `rapl:package-0/dram`.
    pub id: String,
    pub name: String,
    pub kind: SourceKind,
    pub has_energy_counter: bool,
    /// The device reports power itself (not derived from its counter).
    pub has_power: bool,
    /// The value at which the energy counter wraps back to 0, in joules
    /// (RAPL's `max_energy_range_uj`); `None` for counters that do not wrap.
    pub counter_range_j: Option<f64>,
}

/// One reading of one device. Every field but the time may be missing: a
/// device reports what it has.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// Index of the device in its source's [`Source::devices`].
    pub device: u16,
    /// When it was read, on the service's [`Clock`].
    pub at: Duration,
    pub power_w: Option<f64>,
    pub power_avg_w: Option<f64>,
    /// The device's energy counter, in joules since its origin.
    pub energy_j: Option<f64>,
    pub utilization_pct: Option<f32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_c: Option<f32>,
    pub sm_clock_mhz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("NVML: {context}: {source}")]
    Nvml {
        context: String,
        #[source]
        source: ::nvml_wrapper::error::NvmlError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    /// A replay trace that cannot be read, at `file:line`.
    #[error("{}:{line}: {reason}", path.display())]
    Trace {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{0}")]
    Missing(String),
}

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
