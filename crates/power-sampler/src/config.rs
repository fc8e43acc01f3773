//! The power sampler's config: the shared `[server]` section and `[sampler]`.
//! Every field can be set by a `BERTH_SAMPLER__<FIELD>` environment variable,
//! e.g. `BERTH_SAMPLER__POWERCAP_ROOT=/tmp/fake-powercap` or
//! `BERTH_SAMPLER__REPLAY_TRACES='["examples/power/llm-inference.csv"]'`.

use std::path::PathBuf;
use std::time::Duration;

use berth_server::ServerConfig;
use berth_server::cli::HasServerConfig;
use serde::{Deserialize, Serialize};

use crate::error::StartError;

/// No source is polled faster than this, whatever the config says: beyond it
/// the readings are noise from the reading itself (an NVML call takes tens of
/// microseconds, RAPL updates about every millisecond).
pub const HARD_MAX_RATE_HZ: f64 = 10_000.0;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub sampler: SamplerConfig,
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}

/// How the sources are found and sampled, and the bounds on what is kept.
///
/// Memory is bounded by `(max_sessions + max_stopped_sessions) ×
/// max_series_samples` stored samples (120 bytes each: 384 MB with the
/// defaults, though a session rarely fills its series) plus `stream_buffer`
/// ticks per source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Look for NVIDIA GPUs through NVML.
    pub nvml: bool,
    /// Path of the NVML library; empty: the driver's `libnvidia-ml.so.1`.
    pub nvml_library: String,
    /// Root of the powercap tree holding the RAPL zones; empty disables RAPL.
    pub powercap_root: PathBuf,
    /// Recorded traces (CSV) served as replay devices, for CI and demos.
    pub replay_traces: Vec<PathBuf>,
    /// Rate of a session that asks for 0 Hz.
    pub default_rate_hz: f64,
    /// Lowest rate a session may ask for.
    pub min_rate_hz: f64,
    /// Highest rate a session may ask for (at most 10 kHz).
    pub max_rate_hz: f64,
    /// Open sessions at once; one more is refused with RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
    /// Stopped sessions kept for GetSeries and ExportSeries; the oldest goes first.
    pub max_stopped_sessions: usize,
    /// Samples stored per session over all its devices; the summary keeps
    /// counting after that, the stored series does not.
    pub max_series_samples: usize,
    /// Ticks buffered per source for live streams (the ring a slow reader
    /// falls behind on and skips).
    pub stream_buffer: usize,
    /// Longest idle baseline a session may ask for.
    #[serde(with = "humantime_serde")]
    pub max_idle_baseline: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            nvml: true,
            nvml_library: String::new(),
            powercap_root: PathBuf::from("/sys/class/powercap"),
            replay_traces: Vec::new(),
            default_rate_hz: 100.0,
            min_rate_hz: 1.0,
            max_rate_hz: 1_000.0,
            max_sessions: 8,
            max_stopped_sessions: 8,
            max_series_samples: 200_000,
            stream_buffer: 1_024,
            max_idle_baseline: Duration::from_secs(30),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                // Requests are a session id and a few device names: a
                // larger one is refused before it is decoded.
                max_message_bytes: 64 << 10,
                ..ServerConfig::with_defaults("127.0.0.1:7702", "127.0.0.1:9702")
            },
            sampler: SamplerConfig::default(),
        }
    }
}

impl SamplerConfig {
    /// Checks what serde cannot: ranges and their order.
    pub fn validate(&self) -> Result<(), StartError> {
        let invalid =
            |field: &str, why: String| StartError::Config(format!("sampler.{field}: {why}"));
        let rates = [
            ("min_rate_hz", self.min_rate_hz),
            ("default_rate_hz", self.default_rate_hz),
            ("max_rate_hz", self.max_rate_hz),
        ];
        for (field, rate) in rates {
            if !(rate.is_finite() && rate > 0.0 && rate <= HARD_MAX_RATE_HZ) {
                return Err(invalid(
                    field,
                    format!("{rate} Hz is not in (0, {HARD_MAX_RATE_HZ}] Hz"),
                ));
            }
        }
        if !(self.min_rate_hz <= self.default_rate_hz && self.default_rate_hz <= self.max_rate_hz) {
            return Err(invalid(
                "default_rate_hz",
                format!(
                    "{} Hz must lie between min_rate_hz ({}) and max_rate_hz ({})",
                    self.default_rate_hz, self.min_rate_hz, self.max_rate_hz
                ),
            ));
        }
        let counts = [
            ("max_sessions", self.max_sessions),
            ("max_series_samples", self.max_series_samples),
            ("stream_buffer", self.stream_buffer),
        ];
        for (field, count) in counts {
            if count == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampler_field_is_set_by_env() {
        let env = [
            ("BERTH_SAMPLER__POWERCAP_ROOT", "/tmp/fake"),
            ("BERTH_SAMPLER__REPLAY_TRACES", r#"["a.csv", "b.csv"]"#),
            ("BERTH_SAMPLER__NVML", "false"),
            ("BERTH_SAMPLER__NVML_LIBRARY", "/opt/libnvidia-ml.so.1"),
            ("BERTH_SAMPLER__DEFAULT_RATE_HZ", "50.0"),
            ("BERTH_SAMPLER__MIN_RATE_HZ", "2.0"),
            ("BERTH_SAMPLER__MAX_RATE_HZ", "500.0"),
            ("BERTH_SAMPLER__MAX_SESSIONS", "3"),
            ("BERTH_SAMPLER__MAX_STOPPED_SESSIONS", "4"),
            ("BERTH_SAMPLER__MAX_SERIES_SAMPLES", "5"),
            ("BERTH_SAMPLER__STREAM_BUFFER", "6"),
            ("BERTH_SAMPLER__MAX_IDLE_BASELINE", "7s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config: Config = berth_server::config::load_from_env(None, &[], env).unwrap();
        let expected = SamplerConfig {
            nvml: false,
            nvml_library: "/opt/libnvidia-ml.so.1".into(),
            powercap_root: "/tmp/fake".into(),
            replay_traces: vec!["a.csv".into(), "b.csv".into()],
            default_rate_hz: 50.0,
            min_rate_hz: 2.0,
            max_rate_hz: 500.0,
            max_sessions: 3,
            max_stopped_sessions: 4,
            max_series_samples: 5,
            stream_buffer: 6,
            max_idle_baseline: Duration::from_secs(7),
        };
        assert_eq!(config.sampler, expected);
        // The default differs from the env in every field, so none was missed.
        let defaults = serde_json::to_value(SamplerConfig::default()).unwrap();
        let set = serde_json::to_value(&expected).unwrap();
        for (field, value) in defaults.as_object().unwrap() {
            assert_ne!(Some(value), set.get(field), "{field} not overridden");
        }
    }

    #[test]
    fn the_example_config_and_its_trace_load() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let file = root.join("examples/power/replay.toml");
        let config: Config = berth_server::config::load_from_env(Some(&file), &[], vec![]).unwrap();
        config.sampler.validate().unwrap();
        assert!(!config.sampler.replay_traces.is_empty());
        for trace in &config.sampler.replay_traces {
            crate::source::ReplaySource::open(&root.join(trace)).unwrap();
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut config = SamplerConfig {
            max_rate_hz: 20_000.0,
            ..SamplerConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("sampler.max_rate_hz")
        );
        config.max_rate_hz = 50.0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("default_rate_hz")
        );
        config.max_rate_hz = 1000.0;
        config.max_sessions = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_sessions")
        );
        assert!(SamplerConfig::default().validate().is_ok());
    }
}
