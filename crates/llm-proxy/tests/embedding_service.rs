//! berth's embedding service as a provider: the real berth-embedding, with
//! all-MiniLM-L6-v2, started in-process behind the proxy, configured by the
//! example config's model_list entry. Skips, saying why, when the model or
//! ONNX Runtime is not installed (scripts/setup-embedding-model.sh).

mod common;

use berth_llm_proxy::litellm_config::LiteLlmConfig;
use berth_llm_proxy::{Config, start_with};
use common::*;
use serde_json::json;

/// The embedding service's config on free ports, if its model is installed.
fn embedding_config() -> Option<berth_embedding::Config> {
    let mut config = berth_embedding::Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.http_listen = "127.0.0.1:0".into();
    config.models.sessions = 1;
    let found = match config.models.first_missing_file() {
        None => Ok(config),
        Some(path) => Err(format!("{} is missing", path.display())),
    };
    berth_tests::require(berth_tests::Part::Model, found)
}

#[tokio::test]
async fn embeddings_through_the_proxy_from_berth_embedding() {
    let Some(config) = embedding_config() else {
        return;
    };
    let embedding = berth_embedding::start(config).await.unwrap();
    let embedding_addr = embedding.http_addr.unwrap();

    // The example config as a user runs it, pointed at this test's port.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/llm-proxy/smollm2-litellm_config.yaml");
    let yaml = std::fs::read_to_string(&example)
        .unwrap()
        .replace("127.0.0.1:8891", &embedding_addr.to_string());
    let litellm = LiteLlmConfig::parse("smollm2-litellm_config.yaml", &yaml, &|var| {
        (var == "LITELLM_MASTER_KEY").then(|| "sk-local".to_string())
    })
    .unwrap();
    let mut proxy_config = Config::default();
    proxy_config.server.listen = "127.0.0.1:0".into();
    proxy_config.server.http_listen = "127.0.0.1:0".into();
    let proxy = start_with(proxy_config, litellm).await.unwrap();

    let answer = send(
        "POST",
        &format!("{}/v1/embeddings", base(&proxy)),
        Some("sk-local"),
        json!({"model": "all-MiniLM-L6-v2", "input": ["a cat", "a dog"]}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let answer = answer.json();
    let vectors: Vec<Vec<f32>> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| serde_json::from_value(item["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), 2);
    assert!(vectors.iter().all(|v| v.len() == 384), "{answer}");
    // Real sentence embeddings: unit length, and two pets close but not equal.
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((dot(&vectors[0], &vectors[0]) - 1.0).abs() < 1e-3);
    let similarity = dot(&vectors[0], &vectors[1]);
    assert!((0.3..0.99).contains(&similarity), "{similarity}");

    // The usage the embedding service reported is the proxy's record too.
    let tokens = metric(
        &proxy,
        "berth_llm_tokens_total{model=\"all-MiniLM-L6-v2\",kind=\"prompt\"}",
    )
    .await;
    assert_eq!(
        tokens,
        ["berth_llm_tokens_total{model=\"all-MiniLM-L6-v2\",kind=\"prompt\"} 8"]
    );
    proxy.stop().await.unwrap();
    embedding.stop().await.unwrap();
}
