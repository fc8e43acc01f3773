//! The OpenTelemetry GenAI semantic conventions on the proxy's requests:
//! one span per request the gateway serves (`{gen_ai.operation.name}
//! {gen_ai.request.model}`, kind client: the proxy is the GenAI client of
//! its upstreams), a child of the request's HTTP or gRPC span and so of
//! the caller's trace, lasting to the end of the answer (a stream's last
//! byte). Each upstream attempt sends its trace context in `traceparent`,
//! and the span takes the provider and address of the last deployment
//! tried. The metrics of the conventions are in `crate::metrics`.
//!
//! With no exporter the span is disabled (see
//! `berth_server::trace_context::REQUEST_SPAN_TARGET`) and every method
//! here returns at once: nothing is formatted, parsed or looked up for it.

use berth_server::trace_context::{self, REQUEST_SPAN_TARGET};
use serde::Deserialize;
use tracing::Span;
use tracing::field::Empty;

use crate::litellm_config::DeploymentConfig;
use crate::providers::{Endpoint, UpstreamRequest};
use crate::settings::ProviderKind;
use crate::usage::Usage;

/// `gen_ai.operation.name` of an endpoint (Anthropic's Messages and
/// OpenAI's Responses APIs are served as chat completions).
pub fn operation_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    }
}

/// `gen_ai.provider.name` of a deployment: the API it speaks (an
/// OpenAI-compatible server such as llama.cpp's is `openai`).
pub fn provider_name(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::OpenAi => "openai",
        ProviderKind::Ollama => "ollama",
        ProviderKind::Anthropic => "anthropic",
    }
}

/// The span of one GenAI operation; it ends when dropped.
#[derive(Debug)]
pub struct OperationSpan(Span);

impl OperationSpan {
    /// A child of the current span (the request's).
    pub fn start(operation: &'static str, model: &str) -> Self {
        Self(tracing::info_span!(
            target: REQUEST_SPAN_TARGET,
            "gen_ai",
            otel.name = %format_args!("{operation} {model}"),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = operation,
            gen_ai.request.model = model,
            gen_ai.provider.name = Empty,
            // The attribute's name before `gen_ai.provider.name`, which
            // many backends still read.
            gen_ai.system = Empty,
            gen_ai.response.model = Empty,
            gen_ai.response.id = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            server.address = Empty,
            server.port = Empty,
            "error.type" = Empty,
            berth.llm.deployment = Empty,
            berth.llm.cache_hit = Empty,
        ))
    }

    /// Whether nothing is recorded (no exporter): callers skip work that
    /// only the span would use.
    pub fn is_disabled(&self) -> bool {
        self.0.is_disabled()
    }

    /// An attempt on `deployment`: the span names its provider and address,
    /// and `request` carries the span's trace context to the upstream.
    pub fn attempt(&self, deployment: &DeploymentConfig, request: &mut UpstreamRequest) {
        if self.is_disabled() {
            return;
        }
        let provider = provider_name(deployment.provider);
        self.0.record("gen_ai.provider.name", provider);
        self.0.record("gen_ai.system", provider);
        self.0
            .record("berth.llm.deployment", deployment.id.as_str());
        if let Some(host) = request.uri.host() {
            self.0.record("server.address", host);
        }
        let port = request.uri.port_u16().or(match request.uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        if let Some(port) = port {
            self.0.record("server.port", port);
        }
        trace_context::inject_http(&self.0, &mut request.headers);
    }

    /// A whole answer's usage, and on the span its model, id and finish
    /// reasons (read only while the span is recorded).
    pub fn whole_answer(&self, body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
        }
        #[derive(Deserialize)]
        struct Choice {
            finish_reason: Option<String>,
        }
        #[derive(Deserialize)]
        struct Described {
            usage: Option<Usage>,
            model: Option<String>,
            id: Option<String>,
            #[serde(default)]
            choices: Vec<Choice>,
        }
        if self.is_disabled() {
            return serde_json::from_slice::<WithUsage>(body).ok()?.usage;
        }
        let described = serde_json::from_slice::<Described>(body).ok()?;
        if let Some(model) = &described.model {
            self.0.record("gen_ai.response.model", model.as_str());
        }
        if let Some(id) = &described.id {
            self.0.record("gen_ai.response.id", id.as_str());
        }
        let reasons: Vec<String> = described
            .choices
            .into_iter()
            .filter_map(|choice| choice.finish_reason)
            .collect();
        if !reasons.is_empty() {
            trace_context::set_string_array(&self.0, "gen_ai.response.finish_reasons", reasons);
        }
        described.usage
    }

    /// The request's usage, once known.
    pub fn usage(&self, usage: &Usage, operation: &'static str) {
        self.0
            .record("gen_ai.usage.input_tokens", usage.prompt_tokens);
        // Embeddings have no output tokens.
        if operation != "embeddings" {
            self.0
                .record("gen_ai.usage.output_tokens", usage.completion_tokens);
        }
    }

    /// Answered from the response cache: no upstream was asked.
    pub fn cache_hit(&self) {
        self.0.record("berth.llm.cache_hit", true);
    }

    /// The operation failed; `error_type` is low-cardinality (a
    /// `ProxyError::reason`).
    pub fn failed(&self, error_type: &'static str) {
        self.0.record("error.type", error_type);
        self.0.record("otel.status_code", "error");
    }
}
