//! What a source produces, as plain data: the devices it reads
//! ([`DeviceInfo`], [`SourceKind`]), one [`Reading`] of one device, and why a
//! source could not be opened or read ([`SourceError`]). The sources, the
//! energy figures, the recorder and the errors all use these; this module
//! uses none of them.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Index of the device in its source's `Source::devices`.
    pub device: u16,
    /// When it was read, on the service's [`crate::clock::Clock`].
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
