//! The file as LiteLLM writes it. Each struct keeps the keys it does not
//! know in `other`, so they can be reported by name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

#[derive(Deserialize)]
pub(super) struct RawRoot {
    #[serde(default)]
    pub(super) model_list: Vec<RawEntry>,
    pub(super) router_settings: Option<Value>,
    pub(super) litellm_settings: Option<Value>,
    pub(super) general_settings: Option<Value>,
    pub(super) environment_variables: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
pub(super) struct RawEntry {
    pub(super) model_name: String,
    pub(super) litellm_params: RawParams,
    pub(super) model_info: Option<RawModelInfo>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
pub(super) struct RawParams {
    pub(super) model: String,
    pub(super) api_base: Option<String>,
    /// LiteLLM's other spelling of `api_base`.
    pub(super) base_url: Option<String>,
    pub(super) api_key: Option<String>,
    pub(super) custom_llm_provider: Option<String>,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) weight: Option<f64>,
    pub(super) timeout: Option<f64>,
    pub(super) stream_timeout: Option<f64>,
    pub(super) input_cost_per_token: Option<f64>,
    pub(super) output_cost_per_token: Option<f64>,
    pub(super) additional_drop_params: Option<Vec<String>>,
    /// The deployment's own budget in USD, per `budget_duration` (LiteLLM's
    /// model budgets).
    pub(super) max_budget: Option<f64>,
    pub(super) budget_duration: Option<String>,
    /// LiteLLM's switch that sends `/v1/responses` as chat completions.
    pub(super) use_chat_completions_api: Option<bool>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawModelInfo {
    pub(super) id: Option<String>,
    pub(super) input_cost_per_token: Option<f64>,
    pub(super) output_cost_per_token: Option<f64>,
    /// The OpenAI paths the deployment serves (`/v1/responses` among them
    /// or not), as LiteLLM's model_info says it.
    pub(super) supported_endpoints: Option<Vec<String>>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

type Fallbacks = Vec<BTreeMap<String, Vec<String>>>;

#[derive(Deserialize, Default)]
pub(super) struct RawRouterSettings {
    pub(super) routing_strategy: Option<String>,
    pub(super) num_retries: Option<u32>,
    pub(super) timeout: Option<f64>,
    pub(super) retry_after: Option<f64>,
    pub(super) allowed_fails: Option<u32>,
    pub(super) cooldown_time: Option<f64>,
    pub(super) fallbacks: Option<Fallbacks>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawLiteLlmSettings {
    pub(super) drop_params: Option<bool>,
    pub(super) num_retries: Option<u32>,
    pub(super) request_timeout: Option<f64>,
    pub(super) allowed_fails: Option<u32>,
    pub(super) cooldown_time: Option<f64>,
    pub(super) fallbacks: Option<Fallbacks>,
    pub(super) cache: Option<bool>,
    pub(super) cache_params: Option<RawCacheParams>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

/// `litellm_settings.cache_params`.
#[derive(Deserialize, Default)]
pub(super) struct RawCacheParams {
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) ttl: Option<f64>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawGeneral {
    pub(super) master_key: Option<String>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, Value>,
}

/// A settings section; absent or null is its defaults.
pub(super) fn section<T: DeserializeOwned + Default>(
    value: Option<Value>,
    name: &str,
) -> Result<T, String> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(value) => serde_yaml::from_value(value).map_err(|e| format!("{name}: {e}")),
    }
}

/// Adds the keys of `other` to `out`, by their dotted path under `prefix`.
pub(super) fn collect_unknown(
    prefix: &str,
    other: &BTreeMap<String, Value>,
    out: &mut Vec<String>,
) {
    out.extend(other.keys().map(|key| {
        if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        }
    }));
}
