//! The OpenAI HTTP API against a fake upstream of our own: answers, streams,
//! errors with the statuses OpenAI uses, auth, usage, virtual keys, limits.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::json;

fn config(addr: std::net::SocketAddr, master: bool) -> String {
    let master = if master {
        "general_settings:\n  master_key: sk-master\n"
    } else {
        ""
    };
    format!(
        "model_list:\n  - model_name: chat\n    litellm_params: {{model: openai/ok, api_base: http://{addr}/v1, input_cost_per_token: 0.001, output_cost_per_token: 0.002}}\n\
         \x20 - model_name: broken\n    litellm_params: {{model: openai/bad, api_base: http://{addr}/v1}}\n{master}"
    )
}

#[tokio::test]
async fn chat_completion_embeddings_and_models() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(addr, false)).await;
    let base = base(&proxy);

    let answer = send(
        "POST",
        &format!("{base}/v1/chat/completions"),
        None,
        chat("chat", false),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "echo: hi"
    );
    // The upstream got its own model name, the rest of the body as sent.
    let forwarded = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(forwarded["model"], "ok");
    assert_eq!(forwarded["messages"][0]["content"], "hi");

    // Without the /v1 prefix too, as LiteLLM serves it.
    let answer = send(
        "POST",
        &format!("{base}/completions"),
        None,
        json!({"model": "chat", "prompt": "hello"}).to_string(),
    )
    .await;
    assert_eq!(answer.json()["choices"][0]["text"], " world");

    let answer = send(
        "POST",
        &format!("{base}/v1/embeddings"),
        None,
        json!({"model": "chat", "input": ["a", "b"]}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json()["data"][1]["embedding"],
        json!([0.5, -0.25, 1.0])
    );

    let models = send("GET", &format!("{base}/v1/models"), None, Bytes::new())
        .await
        .json();
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["chat", "broken"]);

    // Usage recorded per request, priced by the configured costs: chat and
    // completion 3 + 5 tokens each, embeddings 2 prompt tokens.
    let tokens = metric(&proxy, "berth_llm_tokens_total{").await;
    assert!(
        tokens
            .contains(&"berth_llm_tokens_total{model=\"chat\",kind=\"completion\"} 10".to_string()),
        "{tokens:?}"
    );
    assert!(
        tokens.contains(&"berth_llm_tokens_total{model=\"chat\",kind=\"prompt\"} 8".to_string()),
        "{tokens:?}"
    );
    let spend = metric(&proxy, "berth_llm_spend_usd_total{").await;
    assert!(
        spend
            .iter()
            .any(|l| l.starts_with("berth_llm_spend_usd_total{model=\"chat\"} 0.028")),
        "{spend:?}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn stream_is_passed_through_chunk_by_chunk() {
    let (addr, _) = fake_upstream().await;
    let yaml = format!(
        "{}  - model_name: stalled\n    litellm_params: {{model: openai/stall-stream, api_base: http://{addr}/v1}}\n",
        config(addr, false)
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));

    // This upstream sends one chunk, then nothing until the stream is
    // dropped: the client gets that chunk only if the proxy passes chunks on
    // as they come. (No tight deadline: a loaded machine is no buffering.)
    let response = start("POST", &url, None, chat("stalled", true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk was held back")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("one "));
    drop(body);

    let answer = send("POST", &url, None, chat("chat", true)).await;
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        text.contains("one ") && text.contains("three") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // Usage from the stream's last chunk is recorded once the stream ends.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let tokens = metric(&proxy, "berth_llm_tokens_total{").await;
    assert!(
        tokens
            .iter()
            .any(|l| l.contains("kind=\"prompt\"") && l.ends_with(" 3")),
        "{tokens:?}"
    );
    proxy.stop().await.unwrap();
}

/// Creates a virtual key through the admin API; its secret and id.
async fn create_key(base: &str, spec: serde_json::Value) -> (String, String) {
    let created = send(
        "POST",
        &format!("{base}/key/generate"),
        Some("sk-master"),
        spec.to_string(),
    )
    .await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let created = created.json();
    (
        created["key"].as_str().unwrap().to_string(),
        created["key_id"].as_str().unwrap().to_string(),
    )
}

/// The key as `/key/list` shows it.
async fn listed_key(base: &str, id: &str) -> serde_json::Value {
    let listed = send(
        "GET",
        &format!("{base}/key/list"),
        Some("sk-master"),
        Bytes::new(),
    )
    .await
    .json();
    listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn streamed_usage_is_recorded_whether_or_not_the_client_asks_for_it() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(addr, true)).await;
    let base = base(&proxy);
    let (secret, id) = create_key(&base, json!({"key_alias": "streams"})).await;
    let url = format!("{base}/v1/chat/completions");

    // Not asked for: the proxy asks the upstream for usage, records it, and
    // the client sees a stream without it, as it would from the upstream.
    let answer = send("POST", &url, Some(&secret), chat("chat", true)).await;
    assert_eq!(answer.status, 200);
    let forwarded = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    let chunks = events(&answer.body);
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "{chunks:?}"
    );
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "three");
    assert!(answer.body.ends_with(b"data: [DONE]\n\n"));
    let key = listed_key(&base, &id).await;
    assert_eq!(
        (
            key["prompt_tokens"].as_u64(),
            key["completion_tokens"].as_u64()
        ),
        (Some(3), Some(5)),
        "{key}"
    );
    let tokens = metric(&proxy, "berth_llm_tokens_total{").await;
    assert!(
        tokens
            .contains(&"berth_llm_tokens_total{model=\"chat\",kind=\"completion\"} 5".to_string()),
        "{tokens:?}"
    );

    // Asked for: passed on as the upstream sent it, the usage chunk once.
    let asked = json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
                       "messages": [{"role": "user", "content": "hi"}]});
    let answer = send("POST", &url, Some(&secret), asked.to_string()).await;
    let chunks = events(&answer.body);
    let with_usage: Vec<_> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(with_usage.len(), 1, "{chunks:?}");
    assert_eq!(with_usage[0]["choices"], json!([]));
    assert_eq!(with_usage[0]["usage"]["completion_tokens"], 5);
    assert_eq!(listed_key(&base, &id).await["completion_tokens"], 10);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_is_refused_once_its_spend_passes_its_budget() {
    let (addr, _) = fake_upstream().await;
    // `chat` costs 3 × 0.001 + 5 × 0.002 = $0.013 a request.
    let proxy = proxy(&config(addr, true)).await;
    let base = base(&proxy);
    let (secret, id) = create_key(&base, json!({"key_alias": "tight", "max_budget": 0.03})).await;
    let url = format!("{base}/v1/chat/completions");

    // Streams spend too, though their client asks for no usage: $0.013,
    // then 0.026, 0.039. The third starts under the budget, so is served.
    for stream in [false, true, true] {
        let answer = send("POST", &url, Some(&secret), chat("chat", stream)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let spend = listed_key(&base, &id).await["spend"].as_f64().unwrap();
    assert!((spend - 0.039).abs() < 1e-9, "{spend}");

    for stream in [false, true] {
        let refused = send("POST", &url, Some(&secret), chat("chat", stream)).await;
        assert_eq!(refused.status, 429, "{:?}", refused.body);
        let error = &refused.json()["error"];
        assert_eq!(error["type"], "budget_exceeded");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("budget exceeded"),
            "{error}"
        );
    }
    // Other keys are not held back by this one's budget.
    assert_eq!(
        send("POST", &url, Some("sk-master"), chat("chat", false))
            .await
            .status,
        200
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_openai_errors_with_the_right_status() {
    let (addr, _) = fake_upstream().await;
    let proxy = proxy_with(&config(addr, true), |c| c.proxy.max_request_bytes = 1024).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    let key = Some("sk-master");

    let missing = send("POST", &url, None, chat("chat", false)).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        send("POST", &url, Some("sk-wrong"), chat("chat", false))
            .await
            .status,
        401
    );

    let malformed = send("POST", &url, key, "{\"model\": ").await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["type"], "invalid_request_error");

    let unknown = send("POST", &url, key, chat("nope", false)).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");

    let big = json!({"model": "chat", "messages": [{"role": "user", "content": "x".repeat(2000)}]})
        .to_string();
    let too_large = send("POST", &url, key, big).await;
    assert_eq!(too_large.status, 413);
    assert!(
        too_large.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1024")
    );

    // An upstream's own 4xx comes back as it said it, not retried.
    let rejected = send("POST", &url, key, chat("broken", false)).await;
    assert_eq!(rejected.status, 400);
    assert_eq!(rejected.json()["error"]["message"], "upstream says no");

    let ok = send("POST", &url, key, chat("chat", false)).await;
    assert_eq!(ok.status, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn abandoned_streams_cancel_the_upstream_and_leak_nothing() {
    let (addr, seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n  - model_name: slow\n    litellm_params: {{model: openai/stall-stream, api_base: http://{addr}/v1}}\n"
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    for _ in 0..50 {
        let response = start("POST", &url, None, chat("slow", true)).await;
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body); // the client goes away mid-stream
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.stream_dropped.load(Ordering::SeqCst),
        "the upstream stream was not cancelled"
    );
    let abandoned = metric(&proxy, "berth_llm_requests_total{").await;
    assert!(
        abandoned
            .iter()
            .any(|l| l.contains("outcome=\"abandoned\"") && l.ends_with(" 50")),
        "{abandoned:?}"
    );
    // Nothing stays in flight: the proxy still serves, and least-busy sees 0.
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn virtual_keys_limits_and_admin_api() {
    let (addr, _) = fake_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys_path = dir.path().join("keys.json");
    let proxy = proxy_with(&config(addr, true), |c| {
        c.proxy.keys_path = keys_path.display().to_string()
    })
    .await;
    let base = base(&proxy);

    let spec = json!({"key_alias": "ci", "models": ["chat"], "rpm_limit": 2});
    assert_eq!(
        send(
            "POST",
            &format!("{base}/key/generate"),
            None,
            spec.to_string()
        )
        .await
        .status,
        401
    );
    let created = send(
        "POST",
        &format!("{base}/key/generate"),
        Some("sk-master"),
        spec.to_string(),
    )
    .await
    .json();
    let secret = created["key"].as_str().unwrap().to_string();
    let id = created["key_id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-"));
    assert!(
        !std::fs::read_to_string(&keys_path)
            .unwrap()
            .contains(&secret),
        "secret stored in clear"
    );

    // A virtual key cannot manage keys, sees only its models, may use only them.
    assert_eq!(
        send(
            "GET",
            &format!("{base}/key/list"),
            Some(&secret),
            Bytes::new()
        )
        .await
        .status,
        403
    );
    let models = send(
        "GET",
        &format!("{base}/v1/models"),
        Some(&secret),
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let url = format!("{base}/v1/chat/completions");
    assert_eq!(
        send("POST", &url, Some(&secret), chat("broken", false))
            .await
            .status,
        403
    );

    for _ in 0..2 {
        assert_eq!(
            send("POST", &url, Some(&secret), chat("chat", false))
                .await
                .status,
            200
        );
    }
    let limited = send("POST", &url, Some(&secret), chat("chat", false)).await;
    assert_eq!(limited.status, 429, "{:?}", limited.body);
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The sliding window's one-second slots count a request up to 61 s.
    assert!((1..=61).contains(&retry_after), "{retry_after}");

    let listed = send(
        "GET",
        &format!("{base}/key/list"),
        Some("sk-master"),
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(listed["keys"][0]["key_id"], id.as_str());
    assert_eq!(listed["keys"][0]["prompt_tokens"], 6);
    assert!(listed["keys"][0].get("key").is_none());

    let deleted = send(
        "POST",
        &format!("{base}/key/delete"),
        Some("sk-master"),
        json!({"keys": [id]}).to_string(),
    )
    .await;
    assert_eq!(deleted.json()["deleted_keys"].as_array().unwrap().len(), 1);
    assert_eq!(
        send("POST", &url, Some(&secret), chat("chat", false))
            .await
            .status,
        401
    );
    proxy.stop().await.unwrap();
}
