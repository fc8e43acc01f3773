//! LiteLLM's `os.environ/VAR` values.

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
