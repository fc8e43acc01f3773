//! The LiteLLM config of seed 000 (examples/llm-proxy/seed-000-litellm_config.yaml,
//! copied unchanged) loads and serves; a broken file fails start-up with its line.

mod common;

use std::path::Path;

use berth_llm_proxy::litellm_config::{LiteLlmConfig, Secret};
use berth_llm_proxy::settings::ProviderKind;
use berth_llm_proxy::{Config, start};
use bytes::Bytes;
use common::*;

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/llm-proxy")
        .join(name)
}

#[tokio::test]
async fn seed_000_config_loads_unchanged() {
    let text = std::fs::read_to_string(example("seed-000-litellm_config.yaml")).unwrap();
    let env = |name: &str| (name == "LITELLM_MASTER_KEY").then(|| "sk-seed".to_string());
    let config = LiteLlmConfig::parse("seed-000", &text, &env).unwrap();

    let summary: Vec<_> = config
        .deployments
        .iter()
        .map(|d| {
            (
                d.model_name.as_str(),
                d.provider,
                d.upstream_model.as_str(),
                d.base_url.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "granite-code",
                ProviderKind::Ollama,
                "granite-code:8b",
                "http://localhost:11434/v1"
            ),
            (
                "granite-instruct",
                ProviderKind::Ollama,
                "granite3.1-dense:8b",
                "http://localhost:11434/v1"
            ),
            (
                "claude-3-sonnet",
                ProviderKind::Anthropic,
                "claude-3-sonnet-20240229",
                "https://api.anthropic.com"
            ),
        ]
    );
    assert_eq!(config.master_key, Some(Secret::new("sk-seed")));
    assert!(config.drop_params);
    // The one key berth does not act on is named, not silently dropped.
    assert_eq!(config.unsupported, ["litellm_settings.set_verbose"]);
    // ANTHROPIC_API_KEY is unset here: a warning, as LiteLLM would only fail on use.
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("ANTHROPIC_API_KEY"));

    // And the proxy serves it: the models are listed behind the master key.
    let proxy = proxy_with_config(config).await;
    let models = send(
        "GET",
        &format!("{}/v1/models", base(&proxy)),
        Some("sk-seed"),
        Bytes::new(),
    )
    .await;
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"].as_array().unwrap().len(), 3);
    proxy.stop().await.unwrap();
}

async fn proxy_with_config(litellm: LiteLlmConfig) -> berth_server::RunningService {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.http_listen = "127.0.0.1:0".into();
    berth_llm_proxy::start_with(config, litellm).await.unwrap()
}

#[tokio::test]
async fn malformed_file_fails_start_up_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "model_list:\n  - model_name: a\n   litellm_params: {model: openai/x}\n",
    )
    .unwrap();
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.http_listen = "127.0.0.1:0".into();
    config.proxy.litellm_config = path.display().to_string();
    let error = start(config).await.unwrap_err().to_string();
    assert!(
        error.contains("broken.yaml")
            && error.contains("missing field `litellm_params` at line 2 column 5"),
        "{error}"
    );
}
