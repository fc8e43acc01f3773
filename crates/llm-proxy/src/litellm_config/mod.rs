//! LiteLLM's proxy `config.yaml`, read so that a file written for LiteLLM
//! works unchanged: `model_list`, `router_settings`, `litellm_settings`,
//! `general_settings.master_key` and `environment_variables`.
//!
//! Every key the proxy does not act on is collected by its dotted path in
//! [`LiteLlmConfig::unsupported`], so start-up can say which parts of a
//! LiteLLM file it ignores instead of ignoring them silently.
//!
//! `mod.rs` reads the text within [`LiteLlmLimits`]; `raw.rs` is the file as
//! serde reads it, `validate.rs` turns it into the types of `types.rs`, and
//! `env.rs` resolves `os.environ/VAR`.

mod env;
mod raw;
mod types;
mod validate;

use std::io::Read;
use std::path::Path;

use berth_server::yaml_prescan;

use raw::RawRoot;
pub use types::{
    BudgetLimit, CacheSettings, DeploymentConfig, LiteLlmConfig, LiteLlmConfigError, LiteLlmLimits,
    MAX_CONFIG_BYTES, Secret,
};
pub(crate) use validate::budget_duration;

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
        validate::config(root, env).map_err(invalid)
    }
}

fn too_large(origin: &str, limits: &LiteLlmLimits) -> LiteLlmConfigError {
    LiteLlmConfigError::TooLarge {
        path: origin.to_string(),
        limit: limits.max_bytes,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::settings::{ProviderKind, Strategy};

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
router_settings: {routing_strategy: round-robin, redis_host: localhost}
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
                "router_settings.routing_strategy=round-robin (using simple-shuffle; supported: simple-shuffle, least-busy, latency-based-routing or lowest-latency, usage-based-routing(-v2), cost-based-routing)",
            ]
        );
    }

    /// LiteLLM's rule, but for `openai/` deployments at another base URL
    /// (any OpenAI-compatible server in berth): see `serves_responses`.
    #[test]
    fn which_deployments_serve_the_responses_api() {
        let config = parse(
            r#"
model_list:
  - model_name: openai
    litellm_params: {model: openai/gpt-4o}
  - model_name: openai-as-chat
    litellm_params: {model: openai/gpt-4o, use_chat_completions_api: true}
  - model_name: llama-cpp
    litellm_params: {model: openai/smollm2, api_base: http://127.0.0.1:8081/v1}
  - model_name: said-so
    litellm_params: {model: hosted_vllm/m, api_base: http://10.0.0.2:8000/v1}
    model_info: {supported_endpoints: ["/v1/chat/completions", "/v1/responses"]}
  - model_name: openai-said-chat-only
    litellm_params: {model: openai/gpt-4o}
    model_info: {supported_endpoints: ["/v1/chat/completions"]}
  - model_name: anthropic
    litellm_params: {model: anthropic/claude-x}
    model_info: {supported_endpoints: ["/v1/responses"]}
"#,
            &[],
        )
        .unwrap();
        assert!(config.unsupported.is_empty(), "{:?}", config.unsupported);
        let serving: Vec<&str> = config
            .deployments
            .iter()
            .filter(|d| d.responses_api)
            .map(|d| d.model_name.as_str())
            .collect();
        assert_eq!(serving, ["openai", "said-so"]);
    }

    #[test]
    fn litellm_cache_settings() {
        let parse = |settings: &str| {
            LiteLlmConfig::parse(
                "c.yaml",
                &format!("litellm_settings: {settings}\n"),
                &|_| None,
            )
        };
        let on =
            parse("{cache: true, cache_params: {type: local, ttl: 30, namespace: x}}").unwrap();
        assert_eq!(
            on.cache,
            Some(CacheSettings {
                ttl: Some(std::time::Duration::from_secs(30))
            })
        );
        assert_eq!(on.unsupported, ["litellm_settings.cache_params.namespace"]);
        assert!(on.warnings.is_empty());
        let redis = parse("{cache: true, cache_params: {type: redis}}").unwrap();
        assert_eq!(redis.cache, Some(CacheSettings { ttl: None }));
        assert!(
            redis.warnings[0].contains("`redis` is not supported"),
            "{:?}",
            redis.warnings
        );
        assert_eq!(parse("{cache_params: {ttl: 30}}").unwrap().cache, None);
        let bad = parse("{cache: true, cache_params: {ttl: -1}}").unwrap_err();
        assert!(bad.to_string().contains("cache_params.ttl"), "{bad}");
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
    fn a_deployment_budget_is_read_and_bad_ones_are_named() {
        let entry = |params: &str| {
            parse(
                &format!(
                    "model_list:\n  - model_name: a\n    litellm_params: {{model: openai/x, {params}}}\n"
                ),
                &[],
            )
        };
        let daily = entry("max_budget: 10, budget_duration: 1d").unwrap();
        assert_eq!(
            daily.deployments[0].budget,
            Some(BudgetLimit {
                max_usd: 10.0,
                period: Some(Duration::from_secs(86_400))
            })
        );
        assert!(daily.unsupported.is_empty(), "{:?}", daily.unsupported);
        let monthly = entry("max_budget: 0.5, budget_duration: 2mo").unwrap();
        assert_eq!(
            monthly.deployments[0].budget.unwrap().period,
            Some(Duration::from_secs(60 * 86_400))
        );
        assert_eq!(
            entry("max_budget: 3").unwrap().deployments[0]
                .budget
                .unwrap()
                .period,
            None
        );
        for (params, expected) in [
            (
                "budget_duration: 1d",
                "model_list[0]: litellm_params.budget_duration needs litellm_params.max_budget",
            ),
            (
                "max_budget: -1",
                "model_list[0]: litellm_params.max_budget must be a number of USD above 0, got -1",
            ),
            (
                "max_budget: 1, budget_duration: 3 days",
                "litellm_params.budget_duration: `3 days`: the unit must be s, m, h, d, w or mo",
            ),
            (
                "max_budget: 1, budget_duration: 0d",
                "litellm_params.budget_duration: `0d` must be above 0",
            ),
            (
                "max_budget: 1, budget_duration: d",
                "`d`: expected a whole number and a unit",
            ),
        ] {
            let error = entry(params).unwrap_err().to_string();
            assert!(error.contains(expected), "{params}: {error}");
        }
    }

    /// Every string field read of `litellm_params` and `cache_params` goes
    /// through the environment, as LiteLLM's `get_secret` loops do;
    /// `model_info` does not.
    #[test]
    fn os_environ_in_every_string_litellm_resolves() {
        let config = parse(
            r#"
model_list:
  - model_name: m
    litellm_params:
      model: os.environ/MODEL
      custom_llm_provider: os.environ/PROVIDER
      base_url: os.environ/BASE
      api_key: os.environ/KEY
    model_info: {id: os.environ/NOT_RESOLVED}
litellm_settings: {cache: true, cache_params: {type: os.environ/CACHE_TYPE}}
general_settings: {master_key: os.environ/MASTER}
"#,
            &[
                ("MODEL", "smollm2"),
                ("PROVIDER", "hosted_vllm"),
                ("BASE", "http://10.0.0.3:8000/v1"),
                ("KEY", "sk-up"),
                ("CACHE_TYPE", "redis"),
                ("MASTER", "sk-m"),
            ],
        )
        .unwrap();
        let d = &config.deployments[0];
        assert_eq!(
            (d.provider, d.upstream_model.as_str(), d.base_url.as_str()),
            (ProviderKind::OpenAi, "smollm2", "http://10.0.0.3:8000/v1")
        );
        assert_eq!(d.api_key.as_ref().map(Secret::expose), Some("sk-up"));
        assert_eq!(d.id, "os.environ/NOT_RESOLVED");
        assert_eq!(config.master_key, Some(Secret::new("sk-m")));
        assert!(
            config.warnings.iter().any(|w| w.contains("type `redis`")),
            "{:?}",
            config.warnings
        );
        for (yaml, field) in [
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, api_base: os.environ/NOPE}\n",
                "model_list[0]: litellm_params.api_base: environment variable NOPE is not set",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: x, custom_llm_provider: os.environ/NOPE}\n",
                "model_list[0]: litellm_params.custom_llm_provider: environment variable NOPE is not set",
            ),
            (
                "litellm_settings: {cache: true, cache_params: {type: os.environ/NOPE}}\n",
                "litellm_settings.cache_params.type: environment variable NOPE is not set",
            ),
            (
                "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x, input_cost_per_token: -1}\n",
                "litellm_params.input_cost_per_token must be a number of USD, 0 or more, got -1",
            ),
        ] {
            let error = parse(yaml, &[]).unwrap_err().to_string();
            assert!(error.contains(field), "{error}");
        }
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
    use std::collections::HashSet;

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
