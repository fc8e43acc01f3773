//! The proxy's Prometheus metrics (names are the `pub const`s): berth's own,
//! and those of the OpenTelemetry GenAI semantic conventions under the
//! names OpenTelemetry's Prometheus exporter gives them (dots become
//! underscores, the unit `s` a `_seconds` suffix, `{token}` nothing), with
//! the conventions' bucket boundaries, so that dashboards made for them
//! read the proxy as they read any GenAI client.
//!
//! Label values are bounded: models are those of the config (a request for
//! another is refused before it is counted), providers and error types are
//! the proxy's own short lists.

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
/// `gen_ai.client.token.usage`: tokens per operation, by `gen_ai_token_type`
/// (`input`, `output`).
pub const GEN_AI_TOKEN_USAGE: &str = "gen_ai_client_token_usage";
/// `gen_ai.client.operation.duration`: from admission to the answer's last
/// byte, with `error_type` set when it failed.
pub const GEN_AI_OPERATION_DURATION: &str = "gen_ai_client_operation_duration_seconds";
/// `gen_ai.server.time_to_first_token`: from admission to a stream's first
/// chunk from the upstream.
pub const GEN_AI_TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token_seconds";

/// The conventions' advised bucket boundaries.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const TIME_TO_FIRST_TOKEN_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

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

/// The attributes every GenAI metric has. `gen_ai_provider_name` is empty
/// when no deployment was tried.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTokenLabels {
    #[prometheus(flatten)]
    pub operation: GenAiLabels,
    pub gen_ai_token_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiOutcomeLabels {
    #[prometheus(flatten)]
    pub operation: GenAiLabels,
    /// Empty when the operation succeeded (Prometheus reads an empty label
    /// as none).
    pub error_type: &'static str,
}

type Buckets = fn() -> Histogram;

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub spend: Family<ModelLabels, Counter<f64>>,
    pub seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub upstream_failures: Family<DeploymentLabels, Counter>,
    pub in_flight: Gauge,
    pub overhead: Histogram,
    pub gen_ai_tokens: Family<GenAiTokenLabels, Histogram, Buckets>,
    pub gen_ai_duration: Family<GenAiOutcomeLabels, Histogram, Buckets>,
    pub gen_ai_first_token: Family<GenAiLabels, Histogram, Buckets>,
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
            gen_ai_tokens: Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS)),
            gen_ai_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            gen_ai_first_token: Family::new_with_constructor(|| {
                Histogram::new(TIME_TO_FIRST_TOKEN_BUCKETS)
            }),
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
        registry.register(
            GEN_AI_TOKEN_USAGE,
            "Tokens used per GenAI operation, by token type (input, output), as gen_ai.client.token.usage",
            metrics.gen_ai_tokens.clone(),
        );
        registry.register(
            GEN_AI_OPERATION_DURATION,
            "Duration of GenAI operations, to the answer's last byte, as gen_ai.client.operation.duration",
            metrics.gen_ai_duration.clone(),
        );
        registry.register(
            GEN_AI_TIME_TO_FIRST_TOKEN,
            "Time to a streamed answer's first chunk, as gen_ai.server.time_to_first_token",
            metrics.gen_ai_first_token.clone(),
        );
        metrics
    }
}
