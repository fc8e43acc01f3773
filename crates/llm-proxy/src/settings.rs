//! The kinds and settings a LiteLLM config names, as plain data: which API a
//! deployment speaks ([`ProviderKind`]), how the router picks among a
//! model's deployments ([`Strategy`]) and its retry, timeout, cooldown and
//! fallback settings ([`RouterSettings`]). `litellm_config` builds them from
//! the YAML; `providers` and `router` act on them. Nothing here depends on
//! another module of the crate, so the config, the providers and the router
//! all depend on this one and not on each other's types.

use std::time::Duration;

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

/// How the router picks a deployment; the names are LiteLLM's
/// `router_settings.routing_strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Random, weighted by `weight` (else `rpm`).
    #[default]
    SimpleShuffle,
    /// Fewest requests in flight.
    LeastBusy,
    /// Lowest recent time to first byte; deployments never measured first.
    LatencyBased,
    /// Fewest tokens used in the last minute, then fewest requests
    /// (LiteLLM's `usage-based-routing` and its `-v2`, which differ only in
    /// where LiteLLM keeps the counts).
    UsageBased,
    /// Lowest `input_cost_per_token + output_cost_per_token`.
    CostBased,
}

impl Strategy {
    /// The strategy a LiteLLM `routing_strategy` names. `lowest-latency` is
    /// what the strategy is called in prose (and in berth's own docs); LiteLLM
    /// spells it `latency-based-routing`, so both are accepted.
    pub fn from_litellm(name: &str) -> Option<Self> {
        match name {
            "simple-shuffle" => Some(Self::SimpleShuffle),
            "least-busy" => Some(Self::LeastBusy),
            "latency-based-routing" | "lowest-latency" => Some(Self::LatencyBased),
            "usage-based-routing" | "usage-based-routing-v2" => Some(Self::UsageBased),
            "cost-based-routing" => Some(Self::CostBased),
            _ => None,
        }
    }
}

/// Retry, timeout, cooldown and fallback settings (LiteLLM's `router_settings`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    pub strategy: Strategy,
    /// Further attempts within a model group after the first one fails.
    pub num_retries: u32,
    /// Whole-request timeout when a deployment sets none.
    pub timeout: Duration,
    /// Least wait before a retry; the wait doubles with each retry.
    pub retry_after: Duration,
    /// Failures within a minute a deployment may have before it cools down.
    pub allowed_fails: u32,
    pub cooldown_time: Duration,
    /// Model groups to try, in order, when a group fails: (from, to...).
    pub fallbacks: Vec<(String, Vec<String>)>,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::SimpleShuffle,
            num_retries: 2,
            timeout: Duration::from_secs(600),
            retry_after: Duration::ZERO,
            allowed_fails: 3,
            cooldown_time: Duration::from_secs(5),
            fallbacks: Vec::new(),
        }
    }
}

/// Smallest wait between retries: an upstream that just failed rarely
/// recovers within microseconds.
const MIN_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl RouterSettings {
    /// Wait before retry number `retry` (1-based): exponential, with jitter
    /// so that clients failing together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self.retry_after.max(MIN_BACKOFF);
        let exp = base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        exp.mul_f64(rand::random_range(0.75..1.25))
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

    #[test]
    fn litellm_names_and_the_lowest_latency_alias() {
        for (name, strategy) in [
            ("simple-shuffle", Strategy::SimpleShuffle),
            ("least-busy", Strategy::LeastBusy),
            ("latency-based-routing", Strategy::LatencyBased),
            ("lowest-latency", Strategy::LatencyBased),
            ("usage-based-routing", Strategy::UsageBased),
            ("usage-based-routing-v2", Strategy::UsageBased),
            ("cost-based-routing", Strategy::CostBased),
        ] {
            assert_eq!(Strategy::from_litellm(name), Some(strategy), "{name}");
        }
        // Not a LiteLLM strategy: reported, not guessed at.
        assert_eq!(Strategy::from_litellm("round-robin"), None);
    }
}
