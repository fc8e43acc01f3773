//! The proxy's Prometheus metrics (names are the `pub const`s).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub const REQUESTS: &str = "berth_llm_requests";
pub const TOKENS: &str = "berth_llm_tokens";
pub const SPEND: &str = "berth_llm_spend_usd";
pub const REQUEST_SECONDS: &str = "berth_llm_request_seconds";
pub const UPSTREAM_FAILURES: &str = "berth_llm_upstream_failures";
pub const IN_FLIGHT: &str = "berth_llm_requests_in_flight";
pub const OVERHEAD_SECONDS: &str = "berth_llm_overhead_seconds";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub deployment: String,
}

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub spend: Family<ModelLabels, Counter<f64>>,
    pub seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub upstream_failures: Family<DeploymentLabels, Counter>,
    pub in_flight: Gauge,
    pub overhead: Histogram,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            tokens: Family::default(),
            spend: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 10))
            }),
            upstream_failures: Family::default(),
            in_flight: Gauge::default(),
            // 10 µs to 82 ms: the proxy's own time is tens of microseconds.
            overhead: Histogram::new(exponential_buckets(1e-5, 2.0, 14)),
        };
        registry.register(
            REQUESTS,
            "LLM requests by model and outcome",
            metrics.requests.clone(),
        );
        registry.register(
            TOKENS,
            "Tokens by model and kind (prompt, completion)",
            metrics.tokens.clone(),
        );
        registry.register(
            SPEND,
            "Cost in USD by model, from the configured per-token costs",
            metrics.spend.clone(),
        );
        registry.register(
            REQUEST_SECONDS,
            "Time from request to the end of the response",
            metrics.seconds.clone(),
        );
        registry.register(
            UPSTREAM_FAILURES,
            "Failed upstream attempts (errors, timeouts, broken streams) by deployment",
            metrics.upstream_failures.clone(),
        );
        registry.register(
            IN_FLIGHT,
            "Requests admitted and not yet ended (streams count until their last byte or abandonment)",
            metrics.in_flight.clone(),
        );
        registry.register(
            OVERHEAD_SECONDS,
            "Time each HTTP request spent in the proxy itself, upstream waits excluded (also the x-berth-overhead-us header)",
            metrics.overhead.clone(),
        );
        metrics
    }
}
