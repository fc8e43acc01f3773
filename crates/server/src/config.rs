//! Typed config: defaults, then a TOML file, then `BERTH_*` environment
//! variables, then command-line flags. Unknown fields in the file are errors
//! that name the field; a bad value names the field and the value.
//!
//! Environment variables map to fields by path: `BERTH_SERVER__LISTEN` sets
//! `server.listen`, `BERTH_STORE__PATH` sets `store.path`. Only variables that
//! name a field of the service's config are read, because several berth
//! programs (and scripts) share the `BERTH_` prefix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override config fields.
pub const ENV_PREFIX: &str = "BERTH_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("flag --set {0}: expected KEY=VALUE")]
    BadOverride(String),
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        // figment's own message names the field path, the value and where it
        // came from (file or environment variable); one line per error.
        let lines: Vec<String> = error.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(lines.join("; "))
    }
}

/// The part of every service's config that the shared bootstrap reads:
/// the `[server]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC address: `HOST:PORT` or `unix:///path/to.sock`.
    pub listen: String,
    /// HTTP address for `/metrics` (and the service's own HTTP API, if any);
    /// empty disables it.
    pub http_listen: String,
    /// Longest time a unary call may take before it fails with DEADLINE_EXCEEDED.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Calls served at once over all connections; more wait their turn.
    pub max_concurrent_requests: usize,
    /// How long shutdown waits for in-flight calls to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`; empty: no export.
    pub otlp_endpoint: String,
    /// Share of traces started here that are exported, 0.0 to 1.0; a call
    /// that carries its caller's trace context follows the caller's choice
    /// (parent-based), so a trace is kept or dropped whole.
    pub trace_sample_ratio: f64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Longest time a client may take to send a request's headers on the
    /// HTTP port; a slower one gets 408 and its connection closed.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// Threads that serve the HTTP port, each with a runtime of its own
    /// that reads, handles and answers its connections' requests; 0 serves
    /// it on the service's shared runtime.
    pub http_threads: usize,
    /// CPU time the costly synchronous part of one request (parsing,
    /// validating, expanding what it sent) may take before it is stopped
    /// and refused with RESOURCE_EXHAUSTED / 429 (`budget.rs`).
    #[serde(with = "humantime_serde")]
    pub request_cpu_budget: Duration,
    /// Costly requests worked on at once; one more is refused at once with
    /// RESOURCE_EXHAUSTED / 429, so that what they hold in memory is not
    /// multiplied by the callers' concurrency.
    pub max_costly_requests: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl ServerConfig {
    /// Defaults for a service whose gRPC and HTTP ports are given.
    pub fn with_defaults(listen: &str, http_listen: &str) -> Self {
        Self {
            listen: listen.to_string(),
            http_listen: http_listen.to_string(),
            ..Self::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".to_string(),
            http_listen: String::new(),
            request_timeout: Duration::from_secs(60),
            max_concurrent_requests: 1024,
            shutdown_grace: Duration::from_secs(10),
            otlp_endpoint: String::new(),
            trace_sample_ratio: 1.0,
            log_format: LogFormat::Text,
            max_message_bytes: 16 * 1024 * 1024,
            http_header_timeout: Duration::from_secs(10),
            http_threads: 0,
            request_cpu_budget: Duration::from_secs(10),
            max_costly_requests: 4,
        }
    }
}

/// Loads a config of type `T`: defaults, then `file` (which must exist when
/// given), then environment variables, then `overrides` as `(dotted.key, value)`.
pub fn load<T>(file: Option<&Path>, overrides: &[(String, String)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_from_env(file, overrides, std::env::vars())
}

/// [`load`] with the environment given, so tests need not mutate the process's.
pub fn load_from_env<T>(
    file: Option<&Path>,
    overrides: &[(String, String)],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let defaults = T::default();
    let known = field_paths(&defaults);
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // Parse first so that syntax errors carry line and column.
        toml::from_str::<toml::Value>(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string().trim().replace('\n', " "),
        })?;
        figment = figment.merge(Toml::file_exact(path));
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if known.contains(&key) {
            figment = figment.merge(Serialized::default(&key, parse_scalar(&value)));
        }
    }
    for (key, value) in overrides {
        if !known.contains(key) {
            return Err(ConfigError::Invalid(format!(
                "unknown field `{key}` (from a flag); known fields: {}",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        figment = figment.merge(Serialized::default(key, parse_scalar(value)));
    }
    Ok(figment.extract()?)
}

/// Where berth keeps its data: `$XDG_DATA_HOME/berth`, else
/// `~/.local/share/berth`, else `/var/lib/berth`.
pub fn data_dir() -> PathBuf {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from_env("XDG_DATA_HOME")
        .or_else(|| from_env("HOME").map(|home| home.join(".local").join("share")))
        .map(|dir| dir.join("berth"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/berth"))
}

/// Parses `KEY=VALUE` flags into override pairs.
pub fn parse_overrides(pairs: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| ConfigError::BadOverride(pair.clone()))
        })
        .collect()
}

/// Env and flag values are text; numbers and booleans are given their type so
/// that `BERTH_SERVER__MAX_CONCURRENT_REQUESTS=8` reaches a `usize` field.
fn parse_scalar(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

/// Dotted paths of every leaf field of a config, from its serialised defaults.
fn field_paths<T: Serialize>(value: &T) -> BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, child, out);
                }
            }
            _ => {
                out.insert(prefix.to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Ok(json) = serde_json::to_value(value) {
        walk("", &json, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        server: ServerConfig,
        store: Store,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Store {
        path: String,
        retries: u32,
    }

    impl Default for Store {
        fn default() -> Self {
            Self {
                path: "state.db".into(),
                retries: 3,
            }
        }
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn file_env_and_flags_override_in_order() {
        let file =
            write("[server]\nlisten = \"127.0.0.1:9\"\n[store]\npath = \"a.db\"\nretries = 5\n");
        let env = vec![
            ("BERTH_STORE__PATH".to_string(), "b.db".to_string()),
            (
                "BERTH_SERVER__MAX_CONCURRENT_REQUESTS".to_string(),
                "8".to_string(),
            ),
            (
                "BERTH_MODEL_CACHE".to_string(),
                "/ignored: not a field".to_string(),
            ),
        ];
        let overrides = vec![("store.retries".to_string(), "7".to_string())];
        let config: Example = load_from_env(Some(file.path()), &overrides, env).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:9");
        assert_eq!(config.store.path, "b.db");
        assert_eq!(config.server.max_concurrent_requests, 8);
        assert_eq!(config.store.retries, 7);
    }

    #[test]
    fn unknown_field_in_file_is_named() {
        let file = write("[store]\npaht = \"a.db\"\n");
        let error = load_from_env::<Example>(Some(file.path()), &[], vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("paht"), "{error}");
    }

    #[test]
    fn bad_value_names_field_and_value() {
        let env = vec![("BERTH_STORE__RETRIES".to_string(), "many".to_string())];
        let error = load_from_env::<Example>(None, &[], env)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("retries") && error.contains("many"),
            "{error}"
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let file = write("[store]\npath = \n");
        let error = load_from_env::<Example>(Some(file.path()), &[], vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn missing_file_and_unknown_flag_are_errors() {
        let missing =
            load_from_env::<Example>(Some(Path::new("/nonexistent/berth.toml")), &[], vec![]);
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/berth.toml")
        );
        let flag = load_from_env::<Example>(None, &[("store.nope".into(), "1".into())], vec![]);
        assert!(flag.unwrap_err().to_string().contains("store.nope"));
    }
}
