//! The power sampler's own Prometheus metrics (beside the per-call gRPC ones
//! every service has).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub const SAMPLES: &str = "berth_power_samples";
pub const READ_ERRORS: &str = "berth_power_read_errors";
pub const MISSED_TICKS: &str = "berth_power_missed_ticks";
pub const SAMPLER_RATE_HZ: &str = "berth_power_sampler_rate_hz";
pub const OPEN_SESSIONS: &str = "berth_power_open_sessions";
pub const LIVE_STREAMS: &str = "berth_power_live_streams";
pub const STREAM_SKIPPED_TICKS: &str = "berth_power_stream_skipped_ticks";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Debug, Clone, Default)]
pub struct PowerMetrics {
    samples: Family<SourceLabels, Counter>,
    read_errors: Family<SourceLabels, Counter>,
    missed_ticks: Family<SourceLabels, Counter>,
    rate_hz: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    pub open_sessions: Gauge,
    pub live_streams: Gauge,
    pub stream_skipped_ticks: Counter,
}

/// The metrics of one source, looked up once so that its sampling thread
/// touches only atomics.
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    pub samples: Counter,
    pub read_errors: Counter,
    pub missed_ticks: Counter,
    pub rate_hz: Gauge<f64, AtomicU64>,
}

impl PowerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            SAMPLES,
            "Device readings taken, by source",
            metrics.samples.clone(),
        );
        registry.register(
            READ_ERRORS,
            "Device readings that failed, by source",
            metrics.read_errors.clone(),
        );
        registry.register(
            MISSED_TICKS,
            "Sampling instants skipped because the source fell a whole period behind",
            metrics.missed_ticks.clone(),
        );
        registry.register(
            SAMPLER_RATE_HZ,
            "Current sampling rate by source; 0 while no session needs it",
            metrics.rate_hz.clone(),
        );
        registry.register(
            OPEN_SESSIONS,
            "Open sessions",
            metrics.open_sessions.clone(),
        );
        registry.register(
            LIVE_STREAMS,
            "StreamSamples calls being served",
            metrics.live_streams.clone(),
        );
        registry.register(
            STREAM_SKIPPED_TICKS,
            "Ticks a slow StreamSamples reader fell behind on and skipped",
            metrics.stream_skipped_ticks.clone(),
        );
        metrics
    }

    pub fn source(&self, name: &str) -> SourceMetrics {
        let labels = SourceLabels {
            source: name.to_string(),
        };
        SourceMetrics {
            samples: self.samples.get_or_create(&labels).clone(),
            read_errors: self.read_errors.get_or_create(&labels).clone(),
            missed_ticks: self.missed_ticks.get_or_create(&labels).clone(),
            rate_hz: self.rate_hz.get_or_create(&labels).clone(),
        }
    }
}
