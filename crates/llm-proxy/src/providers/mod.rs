//! Upstream providers: which API a deployment speaks, and how a client's
//! OpenAI-style request becomes a request to it. The proxy is an OpenAI
//! gateway, so OpenAI-compatible upstreams get the body almost as sent.

mod anthropic;
mod ollama;
mod openai;

use bytes::Bytes;
use http::{HeaderMap, Uri};
use serde_json::{Map, Value};

pub use anthropic::Events as AnthropicEvents;

use crate::error::ProxyError;
use crate::litellm_config::DeploymentConfig as Deployment;
use crate::sse::StripUsage;
use crate::stream::Relay;

/// The OpenAI operations the proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// Path below an OpenAI base URL (one that ends in `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }
}

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI itself, vLLM, llama.cpp's server, LM Studio, llamafile, berth's
    /// embedding service: anything serving the OpenAI API under a base URL.
    OpenAi,
    /// Ollama, through the OpenAI-compatible API it serves under `/v1`.
    Ollama,
    /// Anthropic's messages API.
    Anthropic,
}

/// LiteLLM provider prefixes that name an OpenAI-compatible server, with the
/// base URL LiteLLM assumes when `api_base` is not given.
const OPENAI_COMPATIBLE: &[(&str, Option<&str>)] = &[
    ("openai", Some("https://api.openai.com/v1")),
    ("text-completion-openai", Some("https://api.openai.com/v1")),
    ("custom_openai", None),
    ("hosted_vllm", None),
    ("lm_studio", Some("http://localhost:1234/v1")),
    ("llamafile", Some("http://127.0.0.1:8080/v1")),
];

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Ollama => "ollama",
            Self::Anthropic => "anthropic",
        }
    }

    /// Splits LiteLLM's `provider/model` (or a bare model name LiteLLM knows
    /// the provider of) into the provider, the model name the upstream
    /// expects, and the default base URL for it.
    pub fn from_litellm(
        model: &str,
        custom_llm_provider: Option<&str>,
    ) -> Result<(Self, String, Option<&'static str>), String> {
        let (prefix, name) = match custom_llm_provider {
            Some(provider) => (Some(provider), model),
            None => match model.split_once('/') {
                Some((prefix, name)) => (Some(prefix), name),
                None => (None, model),
            },
        };
        match prefix {
            Some(prefix) => {
                if let Some((_, base)) = OPENAI_COMPATIBLE.iter().find(|(p, _)| *p == prefix) {
                    Ok((Self::OpenAi, name.to_string(), *base))
                } else if prefix == "ollama" || prefix == "ollama_chat" {
                    Ok((
                        Self::Ollama,
                        name.to_string(),
                        Some("http://localhost:11434"),
                    ))
                } else if prefix == "anthropic" {
                    Ok((
                        Self::Anthropic,
                        name.to_string(),
                        Some("https://api.anthropic.com"),
                    ))
                } else {
                    Err(format!(
                        "provider `{prefix}` is not supported (supported: {}, ollama, ollama_chat, anthropic)",
                        OPENAI_COMPATIBLE
                            .iter()
                            .map(|(p, _)| *p)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            // The bare names LiteLLM maps to a provider by itself.
            None if name.starts_with("claude") => Ok((
                Self::Anthropic,
                name.to_string(),
                Some("https://api.anthropic.com"),
            )),
            None if [
                "gpt-",
                "o1",
                "o3",
                "o4",
                "chatgpt-",
                "text-embedding-",
                "davinci",
                "babbage",
            ]
            .iter()
            .any(|p| name.starts_with(p)) =>
            {
                Ok((
                    Self::OpenAi,
                    name.to_string(),
                    Some("https://api.openai.com/v1"),
                ))
            }
            None => Err(format!(
                "no provider in `{model}`: write it as `provider/{model}` (e.g. openai/{model}, hosted_vllm/{model}, ollama/{model})"
            )),
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

/// Turns the client's request body into the request for `deployment`.
pub fn prepare(
    deployment: &Deployment,
    endpoint: Endpoint,
    body: &Map<String, Value>,
    drop_params: bool,
) -> Result<UpstreamRequest, ProxyError> {
    match deployment.provider {
        ProviderKind::OpenAi => openai::prepare(deployment, endpoint, body, &|_| true),
        ProviderKind::Ollama => ollama::prepare(deployment, endpoint, body, drop_params),
        ProviderKind::Anthropic => anthropic::prepare(deployment, endpoint, body, drop_params),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litellm_model_strings() {
        let (kind, name, base) =
            ProviderKind::from_litellm("ollama/granite-code:8b", None).unwrap();
        assert_eq!(
            (kind, name.as_str(), base),
            (
                ProviderKind::Ollama,
                "granite-code:8b",
                Some("http://localhost:11434")
            )
        );
        let (kind, name, _) = ProviderKind::from_litellm("claude-3-sonnet-20240229", None).unwrap();
        assert_eq!(
            (kind, name.as_str()),
            (ProviderKind::Anthropic, "claude-3-sonnet-20240229")
        );
        let (kind, name, base) =
            ProviderKind::from_litellm("hosted_vllm/meta-llama/Llama-3-8B", None).unwrap();
        assert_eq!(
            (kind, name.as_str(), base),
            (ProviderKind::OpenAi, "meta-llama/Llama-3-8B", None)
        );
        let (kind, name, _) = ProviderKind::from_litellm("smollm2", Some("openai")).unwrap();
        assert_eq!((kind, name.as_str()), (ProviderKind::OpenAi, "smollm2"));
        let error = ProviderKind::from_litellm("bedrock/titan", None).unwrap_err();
        assert!(error.contains("`bedrock`"), "{error}");
        assert!(
            ProviderKind::from_litellm("mystery", None)
                .unwrap_err()
                .contains("no provider")
        );
    }
}
