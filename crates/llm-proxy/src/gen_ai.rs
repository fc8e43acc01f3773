//! The OpenTelemetry GenAI semantic conventions on the proxy's requests:
//! one span per request the gateway serves (`{gen_ai.operation.name}
//! {gen_ai.request.model}`, kind client: the proxy is the GenAI client of
//! its upstreams), a child of the request's HTTP or gRPC span and so of
//! the caller's trace, lasting to the end of the answer (a stream's last
//! byte). Each try on an upstream deployment (retries and fallbacks) is a
//! child span of it that sends its trace context in `traceparent`, and the
//! request's span takes the provider and address of the last deployment
//! tried. The metrics of the conventions are in `crate::metrics`.
//!
//! Both are direct spans (`berth_server::direct_span`), not `tracing`
//! spans: nothing runs inside them, so they need no registry slot or layer
//! callbacks, and an array attribute (the finish reasons) is one of their
//! attributes like any other. What is known only later (the deployment tried, the answer's model and
//! usage, an error) is set several attributes in one go.
//!
//! With no exporter the span is disabled and every method here returns at
//! once: nothing is formatted, parsed or looked up for it. The same holds
//! for a span the sampler left out (`trace_sample_ratio` below 1): only the
//! trace context still goes to the upstream.

use std::borrow::Cow;
use std::collections::BTreeMap;

use berth_server::ServiceError as _;
use berth_server::direct_span::DirectSpan;
use berth_server::otlp::{EncodedAttributes, SpanKind, Value};
use http::Uri;
use serde::Deserialize;

use crate::error::ProxyError;
use crate::litellm_config::DeploymentConfig;
use crate::providers::{Endpoint, UpstreamRequest};
use crate::settings::ProviderKind;
use crate::usage::Usage;

/// `gen_ai.operation.name` of an endpoint (Anthropic's Messages API, and
/// OpenAI's Responses API whether passed through or translated, are chats).
pub fn operation_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => "chat",
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

/// What the spans of every try on one deployment say of it, encoded once
/// when the deployment is configured rather than at each try.
#[derive(Debug)]
pub struct DeploymentSpans {
    /// The name of a try's span.
    attempt_name: String,
    /// A try's span's attributes: provider, upstream model, deployment,
    /// and the upstream's address and port.
    tried: EncodedAttributes,
    /// What the request's span says of the last deployment tried.
    last_tried: EncodedAttributes,
}

impl DeploymentSpans {
    pub fn new(deployment: &DeploymentConfig) -> Self {
        let provider = (
            "gen_ai.provider.name",
            Value::Str(provider_name(deployment.provider)),
        );
        let deployment_id = ("berth.llm.deployment", Value::Str(&deployment.id));
        // Every try goes to the base URL's host (`crate::providers`).
        let base = deployment.base_url.parse::<Uri>().ok();
        let host = base.as_ref().and_then(Uri::host);
        let port = base.as_ref().and_then(|base| {
            base.port_u16().or(match base.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            })
        });
        let server = [
            host.map(|host| ("server.address", Value::Str(host))),
            port.map(|port| ("server.port", Value::Int(i64::from(port)))),
        ];
        let last_tried: Vec<_> = [
            provider,
            // The attribute's name before `gen_ai.provider.name`, which
            // many backends still read.
            ("gen_ai.system", provider.1),
            deployment_id,
        ]
        .into_iter()
        .chain(server.into_iter().flatten())
        .collect();
        let tried: Vec<_> = [
            provider,
            (
                "gen_ai.request.model",
                Value::Str(&deployment.upstream_model),
            ),
            deployment_id,
        ]
        .into_iter()
        .chain(server.into_iter().flatten())
        .collect();
        Self {
            attempt_name: format!("attempt {}", deployment.id),
            tried: EncodedAttributes::new(&tried),
            last_tried: EncodedAttributes::new(&last_tried),
        }
    }
}

/// The span of one GenAI operation; it ends when dropped.
#[derive(Debug)]
pub struct OperationSpan {
    span: DirectSpan,
}

impl OperationSpan {
    /// A child of the current span (the request's).
    pub fn start(operation: &'static str, model: &str) -> Self {
        let span = DirectSpan::in_current(
            || format!("{operation} {model}"),
            SpanKind::Client,
            &[
                ("gen_ai.operation.name", Value::Str(operation)),
                ("gen_ai.request.model", Value::Str(model)),
            ],
        );
        Self { span }
    }

    /// Whether nothing is recorded (no exporter, or the trace is not
    /// sampled): callers skip work that only the span would use.
    pub fn is_disabled(&self) -> bool {
        !self.span.is_sampled()
    }

    /// The `number`th try (from 1, fallbacks included) of the request, on
    /// the deployment that `deployment` describes: a child span of this one, which
    /// this one names the provider and address of too (the last tried),
    /// and `request` carries the attempt's trace context to the upstream.
    pub fn attempt(
        &self,
        number: u32,
        deployment: &DeploymentSpans,
        request: &mut UpstreamRequest,
    ) -> AttemptSpan {
        if self.is_disabled() {
            // Not sampled: the upstream still joins the trace (its
            // `traceparent` says not sampled), with no span per try.
            self.span.inject_http(&mut request.headers);
            return AttemptSpan(DirectSpan::none());
        }
        self.span.set_encoded_attributes(&deployment.last_tried);
        let attempt = self.span.child(
            || deployment.attempt_name.clone(),
            SpanKind::Client,
            &[("berth.llm.attempt", Value::Int(i64::from(number)))],
        );
        attempt.set_encoded_attributes(&deployment.tried);
        attempt.inject_http(&mut request.headers);
        AttemptSpan(attempt)
    }

    /// A whole answer's usage, and on the span its model, id and finish
    /// reasons (read only while the span is recorded).
    pub fn whole_answer(&self, body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
        }
        // Borrowed from the body: nothing is copied for the span but what
        // JSON escapes make different.
        #[derive(Deserialize)]
        struct Choice<'a> {
            #[serde(borrow)]
            finish_reason: Option<Cow<'a, str>>,
        }
        #[derive(Deserialize)]
        struct Described<'a> {
            usage: Option<Usage>,
            #[serde(borrow)]
            model: Option<Cow<'a, str>>,
            #[serde(borrow)]
            id: Option<Cow<'a, str>>,
            #[serde(default, borrow)]
            choices: Vec<Choice<'a>>,
        }
        if self.is_disabled() {
            return serde_json::from_slice::<WithUsage>(body).ok()?.usage;
        }
        let described = serde_json::from_slice::<Described<'_>>(body).ok()?;
        let reasons: Vec<&str> = described
            .choices
            .iter()
            .filter_map(|choice| choice.finish_reason.as_deref())
            .collect();
        self.answered(
            described.model.as_deref(),
            described.id.as_deref(),
            &reasons,
        );
        described.usage
    }

    /// A reader of a streamed answer's chunks for the span; None while
    /// the span is not recorded, so an untraced stream parses nothing more.
    pub fn streamed_answer(&self) -> Option<StreamedAnswer> {
        (!self.is_disabled()).then(StreamedAnswer::default)
    }

    /// What a streamed answer said of itself, however far it got: as
    /// [`whole_answer`](Self::whole_answer) records for a whole one (the
    /// usage comes with the request's, from the stream's usage chunk).
    pub fn streamed(&self, answer: StreamedAnswer) {
        let reasons: Vec<&str> = answer.finish_reasons.values().map(String::as_str).collect();
        self.answered(answer.model.as_deref(), answer.id.as_deref(), &reasons);
    }

    /// What an answer said of itself, whole or streamed.
    fn answered(&self, model: Option<&str>, id: Option<&str>, finish_reasons: &[&str]) {
        let mut said = Vec::with_capacity(3);
        if let Some(model) = model {
            said.push(("gen_ai.response.model", Value::Str(model)));
        }
        if let Some(id) = id {
            said.push(("gen_ai.response.id", Value::Str(id)));
        }
        if !finish_reasons.is_empty() {
            said.push((
                "gen_ai.response.finish_reasons",
                Value::StrArray(finish_reasons),
            ));
        }
        self.span.set_attributes(&said);
    }

    /// The request's usage, once known.
    pub fn usage(&self, usage: &Usage, operation: &'static str) {
        if self.is_disabled() {
            return;
        }
        let tokens = |count: u64| Value::Int(i64::try_from(count).unwrap_or(i64::MAX));
        let input = ("gen_ai.usage.input_tokens", tokens(usage.prompt_tokens));
        let output = (
            "gen_ai.usage.output_tokens",
            tokens(usage.completion_tokens),
        );
        // Embeddings have no output tokens.
        let counted: &[_] = if operation == "embeddings" {
            &[input]
        } else {
            &[input, output]
        };
        self.span.set_attributes(counted);
    }

    /// Answered from the response cache: no upstream was asked.
    pub fn cache_hit(&self) {
        self.span
            .set_attributes(&[("berth.llm.cache_hit", Value::Bool(true))]);
    }

    /// The operation failed; `error_type` is low-cardinality (a
    /// `ProxyError::reason`).
    pub fn failed(&self, error_type: &'static str) {
        self.span.set_attributes(&failure(error_type));
    }
}

/// The span of one try on one upstream deployment, from sending the
/// request to the whole answer (a stream: to its response headers; the
/// stream's own end is the request span's); it ends when dropped.
#[derive(Debug)]
pub struct AttemptSpan(DirectSpan);

impl AttemptSpan {
    /// The try failed (the request may go on elsewhere): the error's
    /// `reason` as `error.type`, and an upstream's refusal's status.
    pub fn failed(&self, error: &ProxyError) {
        if !self.0.is_sampled() {
            return;
        }
        let mut failed = failure(error.reason()).to_vec();
        if let ProxyError::Upstream { status, .. } = error {
            let status = Value::Int(i64::from(status.as_u16()));
            failed.push(("http.response.status_code", status));
        }
        self.0.set_attributes(&failed);
    }
}

/// A span's attributes for a failure whose `error.type` is `error_type`.
fn failure(error_type: &str) -> [(&'static str, Value<'_>); 2] {
    [
        ("error.type", Value::Str(error_type)),
        ("otel.status_code", Value::Str("error")),
    ]
}

/// Reads along a streamed chat or text completion (OpenAI's chunks) what
/// the span says of a whole answer: the model and id the chunks carry and
/// each choice's finish reason, which only its last chunk has.
#[derive(Debug, Default)]
pub struct StreamedAnswer {
    model: Option<String>,
    id: Option<String>,
    /// By choice index, so that `n` choices give their reasons in order.
    finish_reasons: BTreeMap<u64, String>,
}

impl StreamedAnswer {
    /// One event's `data:` payload; anything but a chunk (`[DONE]`, an
    /// error event) is passed over.
    pub fn chunk(&mut self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Choice {
            #[serde(default)]
            index: u64,
            finish_reason: Option<String>,
        }
        #[derive(Deserialize)]
        struct Chunk {
            model: Option<String>,
            id: Option<String>,
            #[serde(default)]
            choices: Vec<Choice>,
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(payload) else {
            return;
        };
        if self.model.is_none() {
            self.model = chunk.model;
        }
        if self.id.is_none() {
            self.id = chunk.id;
        }
        for choice in chunk.choices {
            if let Some(reason) = choice.finish_reason {
                self.finish_reasons.insert(choice.index, reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_gives_its_model_id_and_each_choice_s_last_reason() {
        let mut answer = StreamedAnswer::default();
        for payload in [
            r#"{"id":"c1","model":"smollm2-q8","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#,
            r#"{"id":"c1","model":"smollm2-q8","choices":[{"index":1,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"id":"c1","model":"smollm2-q8","choices":[{"index":1,"delta":{},"finish_reason":"length"}]}"#,
            r#"{"id":"c1","model":"smollm2-q8","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"id":"c1","model":"smollm2-q8","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            "[DONE]",
        ] {
            answer.chunk(payload.as_bytes());
        }
        assert_eq!(answer.model.as_deref(), Some("smollm2-q8"));
        assert_eq!(answer.id.as_deref(), Some("c1"));
        let reasons: Vec<&str> = answer.finish_reasons.values().map(String::as_str).collect();
        assert_eq!(reasons, ["stop", "length"]);
    }
}
