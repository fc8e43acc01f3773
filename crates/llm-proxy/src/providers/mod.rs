//! Upstream providers: which API a deployment speaks, and how a client's
//! OpenAI-style request becomes a request to it. The proxy is an OpenAI
//! gateway, so OpenAI-compatible upstreams get the body almost as sent.

mod anthropic;
mod ollama;
mod openai;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Uri};
use serde_json::{Map, Value};

pub use anthropic::Events as AnthropicEvents;
pub(crate) use anthropic::{image_url, stop_reason};

use crate::error::ProxyError;
use crate::litellm_config::DeploymentConfig as Deployment;
use crate::settings::ProviderKind;
use crate::sse::StripUsage;
use crate::stream::Relay;

/// The OpenAI operations the proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI's Responses API, passed through to a deployment that serves
    /// it (`DeploymentConfig::responses_api`).
    Responses,
}

impl Endpoint {
    /// Path below an OpenAI base URL (one that ends in `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
        }
    }
}

/// A request ready to send upstream.
#[derive(Debug)]
pub struct UpstreamRequest {
    pub uri: Uri,
    /// The provider's own headers (its API key among them, marked sensitive).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub dialect: Dialect,
}

/// The shape of an upstream's answers, and so what turns them into OpenAI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Already OpenAI's. `strip_usage`: the stream carries usage the proxy
    /// asked for and the client did not, to be taken out on the way back.
    OpenAi { strip_usage: bool },
    /// Anthropic's messages; `include_usage` is the client's
    /// `stream_options.include_usage`, which Anthropic has no notion of.
    Anthropic { include_usage: bool },
}

impl Dialect {
    /// A whole (non-streamed) answer in OpenAI's shape.
    pub fn whole(self, body: Bytes) -> Result<Bytes, String> {
        match self {
            Self::OpenAi { .. } => Ok(body),
            Self::Anthropic { .. } => anthropic::whole(&body),
        }
    }

    /// What a stream of this dialect goes through on its way to the client.
    pub fn relay(self) -> Relay {
        match self {
            Self::OpenAi { strip_usage: false } => Relay::Untouched,
            Self::OpenAi { strip_usage: true } => Relay::StripUsage(StripUsage::default()),
            Self::Anthropic { include_usage } => {
                Relay::Translate(AnthropicEvents::new(include_usage))
            }
        }
    }
}

/// Refuses the first parameter neither in `supported` nor dropped by the
/// deployment: for providers that would otherwise lose it silently, as
/// LiteLLM does unless `drop_params` is set.
fn refuse_unsupported(
    provider: &'static str,
    supported: &[&str],
    deployment: &Deployment,
    body: &Map<String, Value>,
) -> Result<(), ProxyError> {
    match body.keys().find(|k| {
        !supported.contains(&k.as_str()) && !deployment.drop_params.iter().any(|d| d == *k)
    }) {
        Some(param) => Err(ProxyError::UnsupportedParam {
            provider,
            param: param.clone(),
        }),
        None => Ok(()),
    }
}

/// The deployment's API key as the value of a header (`Bearer <key>` or the
/// key alone, as its provider wants it), marked sensitive so that it is
/// never logged.
fn api_key_header(deployment: &Deployment, value: String) -> Result<HeaderValue, ProxyError> {
    let mut value = HeaderValue::try_from(value).map_err(|_| {
        ProxyError::InvalidRequest(format!(
            "deployment {}: the api_key is not a valid header value",
            deployment.id
        ))
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The request to send: `body` serialised as JSON.
fn upstream_request(
    uri: Uri,
    headers: HeaderMap,
    body: &impl serde::Serialize,
    dialect: Dialect,
) -> Result<UpstreamRequest, ProxyError> {
    let body = serde_json::to_vec(body)
        .map_err(|e| ProxyError::InvalidRequest(e.to_string()))?
        .into();
    Ok(UpstreamRequest {
        uri,
        headers,
        body,
        dialect,
    })
}

/// Turns the client's request body into the request for `deployment`.
pub fn prepare(
    deployment: &Deployment,
    endpoint: Endpoint,
    body: &Map<String, Value>,
    drop_params: bool,
) -> Result<UpstreamRequest, ProxyError> {
    match deployment.provider {
        ProviderKind::OpenAi => openai::prepare(deployment, endpoint, body, &|_| true),
        // Ollama ignores parameters it does not know: refused unless dropped,
        // then the OpenAI-compatible request with only those it honours.
        ProviderKind::Ollama => {
            if !drop_params {
                refuse_unsupported("ollama", ollama::SUPPORTED, deployment, body)?;
            }
            openai::prepare(deployment, endpoint, body, &|key| {
                ollama::SUPPORTED.contains(&key)
            })
        }
        ProviderKind::Anthropic => anthropic::prepare(deployment, endpoint, body, drop_params),
    }
}
