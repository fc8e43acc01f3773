//! LiteLLM's `os.environ/VAR` values.
//!
//! LiteLLM resolves them (`get_secret`) in `general_settings.master_key`,
//! in every string value of a deployment's `litellm_params` (its loop over
//! them when the proxy loads the config, and again at call time), and in
//! every string value of `litellm_settings.cache_params`; nowhere else
//! (`model_name`, `model_info` and `router_settings` are taken as written),
//! and never in nested values. The proxy does the same for every string
//! field it reads of those (the others are ignored, and named at start-up).

/// LiteLLM's way of saying "read this from the environment".
const ENV_REF: &str = "os.environ/";

/// Resolves `os.environ/VAR`; the error is the name of the unset variable.
pub(super) fn resolve(
    value: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    match value.strip_prefix(ENV_REF) {
        Some(var) => lookup(var).ok_or_else(|| var.to_string()),
        None => Ok(value.to_string()),
    }
}
