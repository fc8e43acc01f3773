//! The embedding service's Prometheus metrics, by model.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub const TEXTS: &str = "berth_embedding_texts";
pub const TOKENS: &str = "berth_embedding_tokens";
pub const BATCH_TEXTS: &str = "berth_embedding_batch_texts";
pub const BATCH_SECONDS: &str = "berth_embedding_batch_seconds";
pub const QUEUED_TEXTS: &str = "berth_embedding_queued_texts";
pub const REJECTED: &str = "berth_embedding_rejected";
pub const TOKENS_PER_SECOND: &str = "berth_embedding_tokens_per_second";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    texts: Family<ModelLabels, Counter>,
    tokens: Family<ModelLabels, Counter>,
    batch_texts: Family<ModelLabels, Histogram>,
    batch_seconds: Family<ModelLabels, Histogram>,
    queued: Family<ModelLabels, Gauge>,
    rejected: Family<ModelLabels, Counter>,
    tokens_per_second: Family<ModelLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            texts: Family::default(),
            tokens: Family::default(),
            queued: Family::default(),
            rejected: Family::default(),
            tokens_per_second: Family::default(),
            batch_texts: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            }),
            batch_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
        };
        registry.register(TEXTS, "Texts embedded", metrics.texts.clone());
        registry.register(
            TOKENS,
            "Tokens read, after truncation",
            metrics.tokens.clone(),
        );
        registry.register(
            BATCH_TEXTS,
            "Texts per session run (dynamic batching)",
            metrics.batch_texts.clone(),
        );
        registry.register(
            BATCH_SECONDS,
            "Time of one session run",
            metrics.batch_seconds.clone(),
        );
        registry.register(
            QUEUED_TEXTS,
            "Texts waiting for a session",
            metrics.queued.clone(),
        );
        registry.register(
            REJECTED,
            "Requests refused because the queue was full",
            metrics.rejected.clone(),
        );
        registry.register(
            TOKENS_PER_SECOND,
            "Tokens one session reads per second, as measured; requests are refused on estimates made with it (server.request_cpu_budget)",
            metrics.tokens_per_second.clone(),
        );
        metrics
    }

    /// The metrics of one model.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        ModelMetrics {
            texts: self.texts.get_or_create(&labels).clone(),
            tokens: self.tokens.get_or_create(&labels).clone(),
            batch_texts: self.batch_texts.get_or_create(&labels).clone(),
            batch_seconds: self.batch_seconds.get_or_create(&labels).clone(),
            queued: self.queued.get_or_create(&labels).clone(),
            rejected: self.rejected.get_or_create(&labels).clone(),
            tokens_per_second: self.tokens_per_second.get_or_create(&labels).clone(),
        }
    }
}

/// Handles on one model's series, cheap to update from the session threads.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    pub texts: Counter,
    pub tokens: Counter,
    pub batch_texts: Histogram,
    pub batch_seconds: Histogram,
    pub queued: Gauge,
    pub rejected: Counter,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
}
