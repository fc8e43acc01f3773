//! LiteLLM's proxy `config.yaml`, read so that a file written for LiteLLM
//! works unchanged: `model_list`, `router_settings`, `litellm_settings`,
//! `general_settings.master_key` and `environment_variables`.
//!
//! Every key the proxy does not act on is collected by its dotted path in
//! [`LiteLlmConfig::unsupported`], so start-up can say which parts of a
//! LiteLLM file it ignores instead of ignoring them silently.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use berth_server::yaml_prescan::{self, YamlLimits};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::settings::{ProviderKind, RouterSettings, Strategy};

/// LiteLLM's way of saying "read this from the environment".
const ENV_REF: &str = "os.environ/";

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
    fn yaml(&self) -> YamlLimits {
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
}

#[derive(Debug, Clone)]
pub struct LiteLlmConfig {
    pub deployments: Vec<DeploymentConfig>,
    pub router: RouterSettings,
    pub master_key: Option<Secret>,
    pub drop_params: bool,
    /// Dotted paths of keys present in the file that the proxy ignores.
    pub unsupported: Vec<String>,
    /// Other things start-up should warn about (e.g. an unset API key variable).
    pub warnings: Vec<String>,
}

impl LiteLlmConfig {
    /// Reads and checks a config file within the default [`LiteLlmLimits`],
    /// resolving `os.environ/VAR` from the process.
    pub fn load(path: &Path) -> Result<Self, LiteLlmConfigError> {
        Self::load_within(path, &LiteLlmLimits::default())
    }

    /// Reads and checks a config file within `limits`, resolving
    /// `os.environ/VAR` from the process.
    pub fn load_within(path: &Path, limits: &LiteLlmLimits) -> Result<Self, LiteLlmConfigError> {
        let origin = path.display().to_string();
        let read_error = |source| LiteLlmConfigError::Read {
            path: origin.clone(),
            source,
        };
        // One byte past the limit tells a file that is too large.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(limits.max_bytes as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .map_err(read_error)?;
        if bytes.len() > limits.max_bytes {
            return Err(too_large(&origin, limits));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::parse_within(&origin, &text, &|name| std::env::var(name).ok(), limits)
    }

    /// Parses config text within the default [`LiteLlmLimits`]; `origin`
    /// names it in errors, `env` resolves `os.environ/VAR`.
    pub fn parse(
        origin: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, LiteLlmConfigError> {
        Self::parse_within(origin, text, env, &LiteLlmLimits::default())
    }

    /// Parses config text, refusing it past `limits` before serde_yaml
    /// sees it; `origin` names it in errors, `env` resolves `os.environ/VAR`.
    pub fn parse_within(
        origin: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        limits: &LiteLlmLimits,
    ) -> Result<Self, LiteLlmConfigError> {
        let invalid = |message: String| LiteLlmConfigError::Invalid {
            path: origin.to_string(),
            message,
        };
        if text.len() > limits.max_bytes {
            return Err(too_large(origin, limits));
        }
        yaml_prescan::check(text, &limits.yaml()).map_err(|stop| {
            let (what, max) = match stop.past {
                yaml_prescan::Past::Depth => ("YAML nesting deeper than allowed", limits.max_depth),
                yaml_prescan::Past::Nodes => ("more YAML nodes than allowed", limits.max_nodes),
            };
            LiteLlmConfigError::Limit {
                path: origin.to_string(),
                line: stop.line,
                column: stop.column,
                what,
                field: stop.past.field(),
                max,
            }
        })?;
        let root: RawRoot = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut unsupported = Vec::new();
        collect_unknown("", &root.other, &mut unsupported);

        let file_env = root.environment_variables.unwrap_or_default();
        let lookup = |name: &str| file_env.get(name).cloned().or_else(|| env(name));
        let mut warnings = Vec::new();

        let general: RawGeneral =
            section(root.general_settings, "general_settings").map_err(&invalid)?;
        collect_unknown("general_settings", &general.other, &mut unsupported);
        let master_key = match general.master_key {
            Some(value) => Some(Secret(resolve(&value, &lookup).map_err(|var| {
                invalid(format!(
                    "general_settings.master_key: environment variable {var} is not set"
                ))
            })?)),
            None => None,
        };

        let settings: RawLiteLlmSettings =
            section(root.litellm_settings, "litellm_settings").map_err(&invalid)?;
        collect_unknown("litellm_settings", &settings.other, &mut unsupported);
        let routing: RawRouterSettings =
            section(root.router_settings, "router_settings").map_err(&invalid)?;
        collect_unknown("router_settings", &routing.other, &mut unsupported);

        let mut deployments = Vec::with_capacity(root.model_list.len());
        for (index, entry) in root.model_list.into_iter().enumerate() {
            let deployment = deployment(index, entry, &lookup, &mut unsupported, &mut warnings)
                .map_err(|e| invalid(format!("model_list[{index}]: {e}")))?;
            deployments.push(deployment);
        }
        let mut ids = HashSet::new();
        if let Some(dup) = deployments.iter().find(|d| !ids.insert(d.id.as_str())) {
            return Err(invalid(format!("model_info.id `{}` is used twice", dup.id)));
        }

        let mut router = RouterSettings::default();
        if let Some(name) = &routing.routing_strategy {
            match Strategy::from_litellm(name) {
                Some(strategy) => router.strategy = strategy,
                None => unsupported.push(format!(
                    "router_settings.routing_strategy={name} (using simple-shuffle; supported: simple-shuffle, least-busy, latency-based-routing or lowest-latency)"
                )),
            }
        }
        // router_settings wins over litellm_settings where both may say it, as in LiteLLM.
        if let Some(n) = routing.num_retries.or(settings.num_retries) {
            router.num_retries = n;
        }
        if let Some(t) = routing.timeout.or(settings.request_timeout) {
            router.timeout =
                seconds(t).map_err(|e| invalid(format!("router_settings.timeout: {e}")))?;
        }
        if let Some(t) = routing.retry_after {
            router.retry_after =
                seconds(t).map_err(|e| invalid(format!("router_settings.retry_after: {e}")))?;
        }
        if let Some(n) = routing.allowed_fails.or(settings.allowed_fails) {
            router.allowed_fails = n;
        }
        if let Some(t) = routing.cooldown_time.or(settings.cooldown_time) {
            router.cooldown_time =
                seconds(t).map_err(|e| invalid(format!("router_settings.cooldown_time: {e}")))?;
        }
        let names: HashSet<&str> = deployments.iter().map(|d| d.model_name.as_str()).collect();
        for rule in routing.fallbacks.or(settings.fallbacks).unwrap_or_default() {
            for (from, to) in rule {
                if let Some(missing) = std::iter::once(&from)
                    .chain(&to)
                    .find(|m| !names.contains(m.as_str()))
                {
                    return Err(invalid(format!(
                        "fallbacks: `{missing}` is not a model_name of model_list"
                    )));
                }
                router.fallbacks.push((from, to));
            }
        }

        Ok(Self {
            deployments,
            router,
            master_key,
            drop_params: settings.drop_params.unwrap_or(false),
            unsupported,
            warnings,
        })
    }
}

fn too_large(origin: &str, limits: &LiteLlmLimits) -> LiteLlmConfigError {
    LiteLlmConfigError::TooLarge {
        path: origin.to_string(),
        limit: limits.max_bytes,
    }
}

fn deployment(
    index: usize,
    entry: RawEntry,
    lookup: &dyn Fn(&str) -> Option<String>,
    unsupported: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<DeploymentConfig, String> {
    let prefix = format!("model_list[{index}]");
    collect_unknown(&prefix, &entry.other, unsupported);
    let params = entry.litellm_params;
    collect_unknown(
        &format!("{prefix}.litellm_params"),
        &params.other,
        unsupported,
    );
    let info = entry.model_info.unwrap_or_default();
    collect_unknown(&format!("{prefix}.model_info"), &info.other, unsupported);

    if entry.model_name.is_empty() {
        return Err("model_name is empty".into());
    }
    let required = |field: &str, value: &str| {
        resolve(value, lookup)
            .map_err(|var| format!("litellm_params.{field}: environment variable {var} is not set"))
    };
    let model = required("model", &params.model)?;
    let (provider, upstream_model, default_base) =
        ProviderKind::from_litellm(&model, params.custom_llm_provider.as_deref())?;
    let api_base = match params.api_base.or(params.base_url) {
        Some(base) => required("api_base", &base)?,
        None => default_base
            .ok_or_else(|| format!("litellm_params.api_base is required for `{model}`"))?
            .to_string(),
    };
    let base_url = base_url(provider, &api_base);
    base_url
        .parse::<http::Uri>()
        .map_err(|e| format!("litellm_params.api_base `{api_base}`: {e}"))?;
    // An unset key variable is a warning, not an error, as in LiteLLM: the
    // rest of the file can still serve, and this deployment will get 401s.
    let api_key = match params.api_key {
        Some(key) => match resolve(&key, lookup) {
            Ok(key) => Some(Secret(key)),
            Err(var) => {
                warnings.push(format!(
                    "{prefix} ({}): litellm_params.api_key: environment variable {var} is not set; requests go without a key",
                    entry.model_name
                ));
                None
            }
        },
        None => None,
    };
    let optional = |field: &str, value: Option<f64>| {
        value
            .map(seconds)
            .transpose()
            .map_err(|e| format!("litellm_params.{field}: {e}"))
    };
    let timeout = optional("timeout", params.timeout)?;
    let stream_timeout = optional("stream_timeout", params.stream_timeout)?;
    let weight = params
        .weight
        .or(params.rpm.map(|r| r as f64))
        .unwrap_or(1.0);
    if !(weight.is_finite() && weight > 0.0) {
        return Err(format!(
            "litellm_params.weight must be positive, got {weight}"
        ));
    }
    Ok(DeploymentConfig {
        id: info
            .id
            .unwrap_or_else(|| format!("{}#{index}", entry.model_name)),
        model_name: entry.model_name,
        provider,
        upstream_model,
        base_url,
        api_key,
        rpm: params.rpm,
        tpm: params.tpm,
        weight,
        timeout,
        stream_timeout,
        input_cost_per_token: params
            .input_cost_per_token
            .or(info.input_cost_per_token)
            .unwrap_or(0.0),
        output_cost_per_token: params
            .output_cost_per_token
            .or(info.output_cost_per_token)
            .unwrap_or(0.0),
        drop_params: params.additional_drop_params.unwrap_or_default(),
    })
}

/// The base URL OpenAI paths are appended to. LiteLLM's `api_base` for
/// Ollama is the server root; its OpenAI-compatible API lives under `/v1`.
fn base_url(provider: ProviderKind, api_base: &str) -> String {
    let base = api_base.trim_end_matches('/');
    match provider {
        ProviderKind::Ollama if !base.ends_with("/v1") => format!("{base}/v1"),
        _ => base.to_string(),
    }
}

/// Resolves `os.environ/VAR`; the error is the name of the unset variable.
fn resolve(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    match value.strip_prefix(ENV_REF) {
        Some(var) => lookup(var).ok_or_else(|| var.to_string()),
        None => Ok(value.to_string()),
    }
}

fn seconds(value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{value} is not a number of seconds"))
}

fn section<T: DeserializeOwned + Default>(value: Option<Value>, name: &str) -> Result<T, String> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(value) => serde_yaml::from_value(value).map_err(|e| format!("{name}: {e}")),
    }
}

fn collect_unknown(prefix: &str, other: &BTreeMap<String, Value>, out: &mut Vec<String>) {
    out.extend(other.keys().map(|key| {
        if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        }
    }));
}

// The file as LiteLLM writes it. Each struct keeps the keys it does not know
// in `other`, so they can be reported by name.

#[derive(Deserialize)]
struct RawRoot {
    #[serde(default)]
    model_list: Vec<RawEntry>,
    router_settings: Option<Value>,
    litellm_settings: Option<Value>,
    general_settings: Option<Value>,
    environment_variables: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawEntry {
    model_name: String,
    litellm_params: RawParams,
    model_info: Option<RawModelInfo>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawParams {
    model: String,
    api_base: Option<String>,
    /// LiteLLM's other spelling of `api_base`.
    base_url: Option<String>,
    api_key: Option<String>,
    custom_llm_provider: Option<String>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    weight: Option<f64>,
    timeout: Option<f64>,
    stream_timeout: Option<f64>,
    input_cost_per_token: Option<f64>,
    output_cost_per_token: Option<f64>,
    additional_drop_params: Option<Vec<String>>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawModelInfo {
    id: Option<String>,
    input_cost_per_token: Option<f64>,
    output_cost_per_token: Option<f64>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

type Fallbacks = Vec<BTreeMap<String, Vec<String>>>;

#[derive(Deserialize, Default)]
struct RawRouterSettings {
    routing_strategy: Option<String>,
    num_retries: Option<u32>,
    timeout: Option<f64>,
    retry_after: Option<f64>,
    allowed_fails: Option<u32>,
    cooldown_time: Option<f64>,
    fallbacks: Option<Fallbacks>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawLiteLlmSettings {
    drop_params: Option<bool>,
    num_retries: Option<u32>,
    request_timeout: Option<f64>,
    allowed_fails: Option<u32>,
    cooldown_time: Option<f64>,
    fallbacks: Option<Fallbacks>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawGeneral {
    master_key: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<LiteLlmConfig, LiteLlmConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LiteLlmConfig::parse("test.yaml", text, &|name| env.get(name).cloned())
    }

    #[test]
    fn full_config() {
        let config = parse(
            r#"
model_list:
  - model_name: small
    litellm_params:
      model: openai/smollm2
      api_base: http://127.0.0.1:8081/v1/
      api_key: os.environ/SMALL_KEY
      rpm: 600
      tpm: 100000
      timeout: 30
      stream_timeout: 2.5
    model_info:
      id: small-a
  - model_name: small
    litellm_params:
      model: hosted_vllm/smollm2
      api_base: os.environ/VLLM_BASE
      weight: 3
      additional_drop_params: ["logprobs"]
router_settings:
  routing_strategy: least-busy
  num_retries: 4
  allowed_fails: 1
  cooldown_time: 7
  fallbacks: [{"small": ["small"]}]
litellm_settings:
  drop_params: true
  request_timeout: 12
general_settings:
  master_key: sk-master
environment_variables:
  VLLM_BASE: http://10.0.0.2:8000/v1
"#,
            &[("SMALL_KEY", "sk-small")],
        )
        .unwrap();
        assert!(config.unsupported.is_empty(), "{:?}", config.unsupported);
        assert_eq!(config.master_key, Some(Secret::new("sk-master")));
        assert!(config.drop_params);
        let [a, b] = &config.deployments[..] else {
            panic!()
        };
        assert_eq!(a.id, "small-a");
        assert_eq!(a.base_url, "http://127.0.0.1:8081/v1");
        assert_eq!(a.api_key.as_ref().map(Secret::expose), Some("sk-small"));
        assert_eq!((a.rpm, a.tpm, a.weight), (Some(600), Some(100_000), 600.0));
        assert_eq!(a.stream_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(b.id, "small#1");
        assert_eq!(b.base_url, "http://10.0.0.2:8000/v1");
        assert_eq!(b.weight, 3.0);
        assert_eq!(b.drop_params, ["logprobs"]);
        assert_eq!(config.router.strategy, Strategy::LeastBusy);
        assert_eq!(config.router.num_retries, 4);
        assert_eq!(config.router.allowed_fails, 1);
        assert_eq!(config.router.cooldown_time, Duration::from_secs(7));
        assert_eq!(config.router.timeout, Duration::from_secs(12));
        assert_eq!(
            config.router.fallbacks,
            [("small".to_string(), vec!["small".to_string()])]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let config = parse(
            r#"
model_list:
  - model_name: m
    litellm_params: {model: ollama/llama3, max_retries: 3, api_version: "1"}
    model_info: {mode: chat}
    tpm: 5
router_settings: {routing_strategy: usage-based-routing-v2, redis_host: localhost}
litellm_settings: {set_verbose: true, success_callback: ["langfuse"]}
general_settings: {database_url: "postgres://x"}
callbacks: []
"#,
            &[],
        )
        .unwrap();
        assert_eq!(config.deployments[0].base_url, "http://localhost:11434/v1");
        let mut names = config.unsupported;
        names.sort();
        assert_eq!(
            names,
            [
                "callbacks",
                "general_settings.database_url",
                "litellm_settings.set_verbose",
                "litellm_settings.success_callback",
                "model_list[0].litellm_params.api_version",
                "model_list[0].litellm_params.max_retries",
                "model_list[0].model_info.mode",
                "model_list[0].tpm",
                "router_settings.redis_host",
                "router_settings.routing_strategy=usage-based-routing-v2 (using simple-shuffle; supported: simple-shuffle, least-busy, latency-based-routing or lowest-latency)",
            ]
        );
    }

    #[test]
    fn malformed_yaml_has_line_and_column() {
        let error = parse(
            "model_list:\n  - model_name: a\n    litellm_params: {model: \"x}\n",
            &[],
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("test.yaml") && text.contains("line 3 column"),
            "{text}"
        );
        let error = parse(
            "model_list:\n  - model_name: a\n    litellm_params: [1]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("expected struct RawParams at line 3 column 21"),
            "{error}"
        );
        let error = parse(
            "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, rpm: lots}\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("rpm") || error.contains("invalid type"),
            "{error}"
        );
    }

    #[test]
    fn bad_entries_are_errors_naming_them() {
        let missing_base = parse(
            "model_list:\n  - model_name: a\n    litellm_params: {model: hosted_vllm/x}\n",
            &[],
        );
        assert!(
            missing_base
                .unwrap_err()
                .to_string()
                .contains("model_list[0]: litellm_params.api_base is required")
        );
        let no_master = parse("general_settings: {master_key: os.environ/NOPE}\n", &[]);
        assert!(
            no_master
                .unwrap_err()
                .to_string()
                .contains("NOPE is not set")
        );
        let fallback = parse(
            "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x}\nrouter_settings: {fallbacks: [{a: [b]}]}\n",
            &[],
        );
        assert!(
            fallback
                .unwrap_err()
                .to_string()
                .contains("`b` is not a model_name")
        );
        let unset_key = parse(
            "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, api_key: os.environ/K}\n",
            &[],
        )
        .unwrap();
        assert!(
            unset_key.warnings[0].contains("K is not set"),
            "{:?}",
            unset_key.warnings
        );
    }

    #[test]
    fn a_config_over_the_size_limit_is_refused_naming_file_and_limit() {
        let padding = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        let error = parse(&padding, &[]).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "LiteLLM config test.yaml is larger than the limit of {MAX_CONFIG_BYTES} bytes (proxy.litellm_limits.max_bytes, env BERTH_PROXY__LITELLM_LIMITS__MAX_BYTES)"
            )
        );
        // A path that never ends is read only up to the limit.
        let started = std::time::Instant::now();
        let error = LiteLlmConfig::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("/dev/zero") && error.contains(&MAX_CONFIG_BYTES.to_string()),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_deeply_nested_config_is_refused_fast_naming_limit_and_line() {
        // 200 KB of brackets: libyaml's scanner, quadratic in the flow
        // depth, took minutes over it; the pre-scan stops at the 33rd.
        let deep = format!(
            "model_list: []\nrouter_settings:\n  fallbacks: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let started = std::time::Instant::now();
        let error = parse(&deep, &[]).unwrap_err().to_string();
        let took = started.elapsed();
        assert_eq!(
            error,
            "LiteLLM config test.yaml:3:46: YAML nesting deeper than allowed; at most 32 (proxy.litellm_limits.max_depth, env BERTH_PROXY__LITELLM_LIMITS__MAX_DEPTH)"
        );
        assert!(took < Duration::from_millis(100), "refused after {took:?}");
        println!(
            "deep LiteLLM config ({} bytes) refused in {took:?}",
            deep.len()
        );
        // Within a raised limit, serde_yaml's own recursion limit (128) still holds.
        let limits = LiteLlmLimits {
            max_depth: 2000,
            ..LiteLlmLimits::default()
        };
        let deep = format!("x: {}{}\n", "[".repeat(1000), "]".repeat(1000));
        let error = LiteLlmConfig::parse_within("test.yaml", &deep, &|_| None, &limits)
            .unwrap_err()
            .to_string();
        assert!(error.contains("recursion limit exceeded"), "{error}");
        // Too many nodes, before serde_yaml loads them.
        let limits = LiteLlmLimits {
            max_nodes: 1000,
            ..LiteLlmLimits::default()
        };
        let wide = format!("x: [{}]\n", vec!["1"; 2000].join(","));
        let error = LiteLlmConfig::parse_within("test.yaml", &wide, &|_| None, &limits)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("LiteLLM config test.yaml:1:")
                && error.contains("at most 1000 (proxy.litellm_limits.max_nodes"),
            "{error}"
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        // Nine levels of ten aliases each: a billion strings if expanded.
        let mut bomb = String::from("a: &a [\"lol\"]\n");
        for level in 1..10 {
            let previous = (b'a' + level - 1) as char;
            let name = (b'a' + level) as char;
            let refs = vec![format!("*{previous}"); 10].join(",");
            bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        let error = parse(&bomb, &[]).unwrap_err().to_string();
        assert!(error.contains("repetition limit exceeded"), "{error}");
    }
}

/// Fuzz target `litellm_config` (seeds in `tests/fuzz_corpus/litellm_config/`).
#[cfg(test)]
mod fuzz {
    use berth_tests::fuzz;
    use proptest::prelude::*;

    use super::*;

    /// YAML's structure and LiteLLM's keys, worth splicing in.
    const TOKENS: &[&[u8]] = &[
        b"[",
        b"]",
        b"{",
        b"}",
        b"- ",
        b": ",
        b"\n",
        b"\n  ",
        b"\n    ",
        b"\t",
        b"&a ",
        b"*a",
        b"<<: *a",
        b"!!binary ",
        b"!!map ",
        b"? ",
        b"|\n",
        b"---\n",
        b"%YAML 1.2\n",
        b"\"",
        b"'",
        b"~",
        b".nan",
        b"-.inf",
        b"1e999",
        b"-1",
        b"18446744073709551616",
        b"os.environ/",
        b"os.environ/UNSET",
        b"model_list:",
        b"model_name: ",
        b"litellm_params:",
        b"model: openai/x",
        b"api_base: ",
        b"model_info: {id: a}",
        b"weight: ",
        b"timeout: ",
        b"fallbacks: [{a: [b]}]",
        b"router_settings:",
        b"routing_strategy: ",
        b"general_settings:",
        b"environment_variables:",
    ];

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Any text: an error naming the file, or a config whose every
        /// deployment is one the router can use.
        #[test]
        fn any_text_is_refused_by_name_or_makes_a_usable_config(
            input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "litellm_config"), TOKENS),
        ) {
            let text = String::from_utf8_lossy(&input);
            let env = |name: &str| (name != "UNSET").then(|| format!("value-of-{name}"));
            let parsed = fuzz::timed("LiteLlmConfig::parse", || {
                LiteLlmConfig::parse("fuzz.yaml", &text, &env)
            })?;
            match parsed {
                Err(error) => {
                    let message = error.to_string();
                    prop_assert!(message.contains("fuzz.yaml"), "{message}");
                }
                Ok(config) => {
                    let mut ids = HashSet::new();
                    let names: HashSet<&str> =
                        config.deployments.iter().map(|d| d.model_name.as_str()).collect();
                    for deployment in &config.deployments {
                        prop_assert!(!deployment.model_name.is_empty());
                        prop_assert!(ids.insert(deployment.id.as_str()), "id {} twice", deployment.id);
                        prop_assert!(deployment.weight.is_finite() && deployment.weight > 0.0);
                        prop_assert!(deployment.base_url.parse::<http::Uri>().is_ok());
                    }
                    for (from, to) in &config.router.fallbacks {
                        prop_assert!(names.contains(from.as_str()));
                        prop_assert!(to.iter().all(|name| names.contains(name.as_str())));
                    }
                }
            }
        }
    }
}
