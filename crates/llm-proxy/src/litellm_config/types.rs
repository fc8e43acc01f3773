//! The config's types as the rest of the proxy uses them, and the limits
//! and errors of reading one.

use std::fmt;
use std::time::Duration;

use berth_server::yaml_prescan::YamlLimits;
use serde::{Deserialize, Serialize};

use crate::settings::{ProviderKind, RouterSettings};

/// Largest config accepted by default ([`LiteLlmLimits::max_bytes`]).
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// `[proxy.litellm_limits]`: what reading one LiteLLM config may cost.
/// The size is checked before the file is read whole, the nesting and node
/// count by a linear pre-scan ([`berth_server::yaml_prescan`]) before
/// serde_yaml sees the text: libyaml's scanner is quadratic in the flow
/// depth (100 000 nested brackets take it minutes). serde_yaml bounds the
/// rest: its recursion limit of 128 and alias expansion (its repetition
/// limit), so time and memory stay linear in `max_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiteLlmLimits {
    /// Largest config, in bytes: a model_list of thousands of deployments
    /// is a few hundred KiB, and a path that names something else (a log,
    /// `/dev/zero`) must not be read whole.
    pub max_bytes: usize,
    /// Deepest nesting of flow collections (`[`, `{`).
    pub max_depth: usize,
    /// Most YAML nodes (scalars, lists, maps, aliases) before aliases
    /// expand: ten thousand deployments of ten keys each.
    pub max_nodes: usize,
}

impl Default for LiteLlmLimits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_CONFIG_BYTES,
            max_depth: 32,
            max_nodes: 200_000,
        }
    }
}

impl LiteLlmLimits {
    pub(super) fn yaml(&self) -> YamlLimits {
        YamlLimits {
            max_depth: self.max_depth,
            max_nodes: self.max_nodes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LiteLlmConfigError {
    #[error("cannot read LiteLLM config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "LiteLLM config {path} is larger than the limit of {limit} bytes (proxy.litellm_limits.max_bytes, env BERTH_PROXY__LITELLM_LIMITS__MAX_BYTES)"
    )]
    TooLarge { path: String, limit: usize },
    /// Past a limit of [`LiteLlmLimits`] at `line:column`, before it was parsed.
    #[error(
        "LiteLLM config {path}:{line}:{column}: {what}; at most {max} (proxy.litellm_limits.{field}, env BERTH_PROXY__LITELLM_LIMITS__{env})",
        env = field.to_ascii_uppercase()
    )]
    Limit {
        path: String,
        line: usize,
        column: usize,
        what: &'static str,
        field: &'static str,
        max: usize,
    },
    /// serde_yaml's message carries the line and column.
    #[error("LiteLLM config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// A secret from the config, kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One `model_list` entry: a deployment serving a model name.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    /// `model_info.id`, else `<model_name>#<index in model_list>`.
    pub id: String,
    /// The name clients ask for (several deployments may share it).
    pub model_name: String,
    pub provider: ProviderKind,
    /// The model name sent upstream (`litellm_params.model` without the provider).
    pub upstream_model: String,
    /// Base URL the endpoint path is appended to, e.g. `http://127.0.0.1:8081/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Requests per minute this deployment may take; the router skips it beyond.
    pub rpm: Option<u64>,
    /// Tokens per minute this deployment may take; the router skips it beyond.
    pub tpm: Option<u64>,
    /// Relative share of traffic under simple-shuffle (`weight`, else rpm, else 1).
    pub weight: f64,
    /// Whole-request timeout (non-streaming).
    pub timeout: Option<Duration>,
    /// Timeout to the first byte of a stream, and between its chunks.
    pub stream_timeout: Option<Duration>,
    pub input_cost_per_token: f64,
    pub output_cost_per_token: f64,
    /// `additional_drop_params`: parameters never sent to this deployment.
    pub drop_params: Vec<String>,
    /// `max_budget` (USD) per `budget_duration` (None: for the process's
    /// life): the router skips the deployment once it is spent.
    pub budget: Option<BudgetLimit>,
    /// The upstream serves OpenAI's Responses API itself: `/v1/responses`
    /// is passed through to it rather than translated to chat completions
    /// (the rule: `validate::serves_responses`).
    pub responses_api: bool,
}

/// A deployment's own budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimit {
    pub max_usd: f64,
    pub period: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct LiteLlmConfig {
    pub deployments: Vec<DeploymentConfig>,
    pub router: RouterSettings,
    pub master_key: Option<Secret>,
    pub drop_params: bool,
    /// `litellm_settings.cache: true`: the response cache is on.
    pub cache: Option<CacheSettings>,
    /// Dotted paths of keys present in the file that the proxy ignores.
    pub unsupported: Vec<String>,
    /// Other things start-up should warn about (e.g. an unset API key variable).
    pub warnings: Vec<String>,
}

/// What of LiteLLM's `litellm_settings.cache_params` the proxy honours.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheSettings {
    /// `cache_params.ttl`, in seconds in the file.
    pub ttl: Option<std::time::Duration>,
}
