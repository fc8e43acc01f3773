//! From the file as serde reads it (`raw.rs`) to the checked config: each
//! `model_list` entry a deployment, the router settings merged from
//! `router_settings` and `litellm_settings`, every key the proxy ignores
//! named. Errors are messages; the caller adds the file's name.

use std::collections::HashSet;
use std::time::Duration;

use super::env::resolve;
use super::raw::{
    RawCacheParams, RawEntry, RawGeneral, RawLiteLlmSettings, RawRoot, RawRouterSettings,
    collect_unknown, section,
};
use super::types::{BudgetLimit, CacheSettings, DeploymentConfig, LiteLlmConfig, Secret};
use crate::settings::{ProviderKind, RouterSettings, Strategy};

/// The config `root` describes; `env` resolves `os.environ/VAR` where the
/// file's own `environment_variables` do not.
pub(super) fn config(
    root: RawRoot,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LiteLlmConfig, String> {
    let mut unsupported = Vec::new();
    collect_unknown("", &root.other, &mut unsupported);

    let file_env = root.environment_variables.unwrap_or_default();
    let lookup = |name: &str| file_env.get(name).cloned().or_else(|| env(name));
    let mut warnings = Vec::new();

    let general: RawGeneral = section(root.general_settings, "general_settings")?;
    collect_unknown("general_settings", &general.other, &mut unsupported);
    let master_key = match general.master_key {
        Some(value) => Some(Secret::new(resolve(&value, &lookup).map_err(|var| {
            format!("general_settings.master_key: environment variable {var} is not set")
        })?)),
        None => None,
    };

    let mut settings: RawLiteLlmSettings = section(root.litellm_settings, "litellm_settings")?;
    collect_unknown("litellm_settings", &settings.other, &mut unsupported);
    let cache = cache(
        settings.cache,
        settings.cache_params.take(),
        &lookup,
        &mut unsupported,
        &mut warnings,
    )?;
    let routing: RawRouterSettings = section(root.router_settings, "router_settings")?;
    collect_unknown("router_settings", &routing.other, &mut unsupported);

    let deployments = deployments(root.model_list, &lookup, &mut unsupported, &mut warnings)?;
    let drop_params = settings.drop_params.unwrap_or(false);
    let router = router(routing, settings, &deployments, &mut unsupported)?;
    Ok(LiteLlmConfig {
        deployments,
        router,
        master_key,
        drop_params,
        cache,
        unsupported,
        warnings,
    })
}

/// Every `model_list` entry, in order; no `model_info.id` twice.
fn deployments(
    model_list: Vec<RawEntry>,
    lookup: &dyn Fn(&str) -> Option<String>,
    unsupported: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<DeploymentConfig>, String> {
    let mut deployments = Vec::with_capacity(model_list.len());
    for (index, entry) in model_list.into_iter().enumerate() {
        let deployment = deployment(index, entry, lookup, unsupported, warnings)
            .map_err(|e| format!("model_list[{index}]: {e}"))?;
        deployments.push(deployment);
    }
    let mut ids = HashSet::new();
    if let Some(dup) = deployments.iter().find(|d| !ids.insert(d.id.as_str())) {
        return Err(format!("model_info.id `{}` is used twice", dup.id));
    }
    Ok(deployments)
}

/// The router's settings: `router_settings` wins over `litellm_settings`
/// where both may say it, as in LiteLLM; fallbacks name only models of
/// `deployments`.
fn router(
    routing: RawRouterSettings,
    settings: RawLiteLlmSettings,
    deployments: &[DeploymentConfig],
    unsupported: &mut Vec<String>,
) -> Result<RouterSettings, String> {
    let mut router = RouterSettings::default();
    if let Some(name) = &routing.routing_strategy {
        match Strategy::from_litellm(name) {
            Some(strategy) => router.strategy = strategy,
            None => unsupported.push(format!(
                "router_settings.routing_strategy={name} (using simple-shuffle; supported: simple-shuffle, least-busy, latency-based-routing or lowest-latency, usage-based-routing(-v2), cost-based-routing)"
            )),
        }
    }
    if let Some(n) = routing.num_retries.or(settings.num_retries) {
        router.num_retries = n;
    }
    if let Some(t) = routing.timeout.or(settings.request_timeout) {
        router.timeout = seconds(t).map_err(|e| format!("router_settings.timeout: {e}"))?;
    }
    if let Some(t) = routing.retry_after {
        router.retry_after = seconds(t).map_err(|e| format!("router_settings.retry_after: {e}"))?;
    }
    if let Some(n) = routing.allowed_fails.or(settings.allowed_fails) {
        router.allowed_fails = n;
    }
    if let Some(t) = routing.cooldown_time.or(settings.cooldown_time) {
        router.cooldown_time =
            seconds(t).map_err(|e| format!("router_settings.cooldown_time: {e}"))?;
    }
    let names: HashSet<&str> = deployments.iter().map(|d| d.model_name.as_str()).collect();
    for rule in routing.fallbacks.or(settings.fallbacks).unwrap_or_default() {
        for (from, to) in rule {
            if let Some(missing) = std::iter::once(&from)
                .chain(&to)
                .find(|m| !names.contains(m.as_str()))
            {
                return Err(format!(
                    "fallbacks: `{missing}` is not a model_name of model_list"
                ));
            }
            router.fallbacks.push((from, to));
        }
    }
    Ok(router)
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
    let custom_provider = params
        .custom_llm_provider
        .map(|p| required("custom_llm_provider", &p))
        .transpose()?;
    let (provider, upstream_model, default_base) =
        ProviderKind::from_litellm(&model, custom_provider.as_deref())?;
    let api_base = match (params.api_base, params.base_url) {
        (Some(base), _) => required("api_base", &base)?,
        (None, Some(base)) => required("base_url", &base)?,
        (None, None) => default_base
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
            Ok(key) => Some(Secret::new(key)),
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
    let cost = |field: &str, params: Option<f64>, info: Option<f64>| {
        let value = params.or(info).unwrap_or(0.0);
        if value.is_finite() && value >= 0.0 {
            return Ok(value);
        }
        let section = if params.is_some() {
            "litellm_params"
        } else {
            "model_info"
        };
        Err(format!(
            "{section}.{field} must be a number of USD, 0 or more, got {value}"
        ))
    };
    let input_cost_per_token = cost(
        "input_cost_per_token",
        params.input_cost_per_token,
        info.input_cost_per_token,
    )?;
    let output_cost_per_token = cost(
        "output_cost_per_token",
        params.output_cost_per_token,
        info.output_cost_per_token,
    )?;
    let budget = match (params.max_budget, params.budget_duration) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err("litellm_params.budget_duration needs litellm_params.max_budget".into());
        }
        (Some(max_usd), period) => {
            if !(max_usd.is_finite() && max_usd > 0.0) {
                return Err(format!(
                    "litellm_params.max_budget must be a number of USD above 0, got {max_usd}"
                ));
            }
            let period = period
                .map(|text| budget_duration(&text))
                .transpose()
                .map_err(|e| format!("litellm_params.budget_duration: {e}"))?;
            Some(BudgetLimit { max_usd, period })
        }
    };
    let responses_api = serves_responses(
        provider,
        &base_url,
        info.supported_endpoints.as_deref(),
        params.use_chat_completions_api,
    );
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
        input_cost_per_token,
        output_cost_per_token,
        drop_params: params.additional_drop_params.unwrap_or_default(),
        budget,
        responses_api,
    })
}

/// OpenAI's own API, the one base URL known to serve `/v1/responses`
/// without being told.
const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Whether a deployment serves OpenAI's Responses API itself, so that
/// `/v1/responses` is passed through to it, as LiteLLM decides between its
/// native Responses call and its chat-completions bridge:
/// - `litellm_params.use_chat_completions_api: true` says no (LiteLLM's
///   switch to the bridge);
/// - else `model_info.supported_endpoints`, when given, says (it lists
///   `/v1/responses`, as LiteLLM reads it);
/// - else only OpenAI itself (an OpenAI-compatible deployment at
///   `https://api.openai.com/v1`). LiteLLM also assumes it of `openai/`
///   deployments with another `api_base`, but in berth those are any
///   OpenAI-compatible server (llama.cpp, vLLM, LM Studio), most of which
///   have no `/v1/responses`.
///
/// Only OpenAI-compatible deployments can: Anthropic's and Ollama's are
/// always translated.
fn serves_responses(
    provider: ProviderKind,
    base_url: &str,
    supported_endpoints: Option<&[String]>,
    use_chat_completions_api: Option<bool>,
) -> bool {
    if provider != ProviderKind::OpenAi || use_chat_completions_api == Some(true) {
        return false;
    }
    match supported_endpoints {
        Some(endpoints) => endpoints.iter().any(|e| e == "/v1/responses"),
        None => base_url == OPENAI_BASE_URL,
    }
}

/// LiteLLM's budget periods: a whole number and a unit, `30s`, `10m`,
/// `1h`, `1d`, `1w`, `1mo` (30 days).
pub(crate) fn budget_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (count, unit) = text.split_at(split);
    let count: u64 = count
        .parse()
        .map_err(|_| format!("`{text}`: expected a whole number and a unit, e.g. `1d`"))?;
    let unit_seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "mo" => 30 * 86_400,
        _ => {
            return Err(format!("`{text}`: the unit must be s, m, h, d, w or mo"));
        }
    };
    match count.checked_mul(unit_seconds) {
        Some(seconds) if seconds > 0 && seconds <= MAX_BUDGET_PERIOD_SECONDS => {
            Ok(Duration::from_secs(seconds))
        }
        _ => Err(format!(
            "`{text}` must be above 0 and at most {} days",
            MAX_BUDGET_PERIOD_SECONDS / 86_400
        )),
    }
}

/// Longest budget period: ten years.
const MAX_BUDGET_PERIOD_SECONDS: u64 = 3650 * 86_400;

/// The base URL OpenAI paths are appended to. LiteLLM's `api_base` for
/// Ollama is the server root; its OpenAI-compatible API lives under `/v1`.
fn base_url(provider: ProviderKind, api_base: &str) -> String {
    let base = api_base.trim_end_matches('/');
    match provider {
        ProviderKind::Ollama if !base.ends_with("/v1") => format!("{base}/v1"),
        _ => base.to_string(),
    }
}

/// `litellm_settings.cache` and `cache_params`: the in-memory cache stands
/// for LiteLLM's `local` one; another type (redis, s3, …) is warned about
/// and served from memory as well, each proxy keeping its own.
fn cache(
    on: Option<bool>,
    params: Option<RawCacheParams>,
    lookup: &dyn Fn(&str) -> Option<String>,
    unsupported: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Option<CacheSettings>, String> {
    let params = params.unwrap_or_default();
    collect_unknown("litellm_settings.cache_params", &params.other, unsupported);
    if on != Some(true) {
        return Ok(None);
    }
    let kind = params
        .kind
        .map(|kind| resolve(&kind, lookup))
        .transpose()
        .map_err(|var| {
            format!("litellm_settings.cache_params.type: environment variable {var} is not set")
        })?;
    if let Some(kind) = kind.as_deref().filter(|k| *k != "local") {
        warnings.push(format!(
            "litellm_settings.cache_params.type `{kind}` is not supported: answers are cached in this proxy's memory (type local)"
        ));
    }
    let ttl = params
        .ttl
        .map(seconds)
        .transpose()
        .map_err(|e| format!("litellm_settings.cache_params.ttl: {e}"))?;
    Ok(Some(CacheSettings { ttl }))
}

fn seconds(value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{value} is not a number of seconds"))
}
