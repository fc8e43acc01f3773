//! `/v1/messages` and `/v1/responses` against the recording fake upstream of
//! tests/common: what the upstream is sent (the chat-completions
//! translation, the stored conversation of `previous_response_id`), what the
//! client gets back, whole and streamed, errors in each API's own shape, and
//! the overhead header and histogram. The official clients against the real
//! llama.cpp server are in tests/real_llm.rs.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use serde_json::{Value, json};

fn config(addr: std::net::SocketAddr) -> String {
    let entry = |name: &str, upstream: &str| {
        format!(
            "  - model_name: {name}\n    litellm_params: {{model: openai/{upstream}, api_base: http://{addr}/v1}}\n"
        )
    };
    format!(
        "model_list:\n{}{}",
        entry("chat", "ok"),
        entry("broken", "bad")
    )
}

fn overhead_us(answer: &Answer) -> u64 {
    answer.headers["x-berth-overhead-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn messages_whole_and_streamed() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(addr)).await;
    let url = format!("{}/v1/messages", base(&proxy));

    let request = json!({"model": "chat", "max_tokens": 20, "system": "Be brief.",
        "stop_sequences": ["\n\n"], "messages": [{"role": "user", "content": "hi"}]});
    let answer = send("POST", &url, None, request.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let message = answer.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["model"], "chat");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "echo: Be brief."}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 3, "output_tokens": 5})
    );
    overhead_us(&answer);
    let sent = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    );
    assert_eq!(sent["max_tokens"], 20);
    assert_eq!(sent["stop"], json!(["\n\n"]));

    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let answer = send("POST", &url, None, streamed.to_string()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    let text = String::from_utf8_lossy(&answer.body).to_string();
    assert!(text.starts_with("event: message_start\ndata: "), "{text}");
    let events = events(&answer.body);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    assert_eq!(events[6]["usage"]["output_tokens"], 5);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn messages_errors_are_anthropic_shaped() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy_with(
        &format!("{}general_settings: {{master_key: sk-m}}\n", config(addr)),
        |c| {
            c.proxy.max_request_bytes = 4096;
        },
    )
    .await;
    let url = format!("{}/v1/messages", base(&proxy));
    let ok = |messages: Value| {
        json!({"model": "chat", "max_tokens": 8, "messages": messages}).to_string()
    };
    let cases = [
        (
            "{not json".to_string(),
            400,
            "invalid_request_error",
            "JSON",
        ),
        (
            json!({"model": "chat", "messages": []}).to_string(),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            ok(
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]),
            ),
            400,
            "invalid_request_error",
            "messages[0].content[0].tool_use_id",
        ),
        (
            ok(json!([{"role": "user", "content": [{"type": "audio"}]}])),
            400,
            "invalid_request_error",
            "messages[0].content[0].type",
        ),
        (
            ok(json!([{"role": "user", "content": "x".repeat(5000)}])),
            413,
            "request_too_large",
            "4096",
        ),
        (
            json!({"model": "nope", "max_tokens": 8, "messages": []}).to_string(),
            404,
            "not_found_error",
            "nope",
        ),
        (
            json!({"model": "broken", "max_tokens": 8, "messages": []}).to_string(),
            400,
            "invalid_request_error",
            "upstream says no",
        ),
    ];
    for (body, status, kind, names) in cases {
        let answer = send("POST", &url, Some("sk-m"), body.clone()).await;
        let error = answer.json();
        assert_eq!(answer.status, status, "{body}: {error}");
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{body}: {message}");
        overhead_us(&answer);
    }
    // Anthropic's clients send their key as x-api-key.
    let mut request = http::Request::post(&url)
        .header("x-api-key", "sk-wrong")
        .body(http_body_util::Full::new(bytes::Bytes::from(ok(json!([])))))
        .unwrap();
    let answer = client()
        .request(std::mem::take(&mut request))
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(
        seen.hits.load(Ordering::SeqCst),
        1,
        "only the `broken` model reached the upstream"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn responses_whole_streamed_and_continued() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(addr)).await;
    let url = format!("{}/v1/responses", base(&proxy));

    let first = send(
        "POST",
        &url,
        None,
        json!({"model": "chat", "input": "hi", "max_output_tokens": 9}).to_string(),
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let first = first.json();
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"][0]["content"][0]["text"], "echo: hi");
    assert_eq!(first["usage"]["total_tokens"], 8);
    assert_eq!(first["max_output_tokens"], 9);

    // The stored conversation goes upstream before the new input.
    let second = json!({"model": "chat", "previous_response_id": first["id"], "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "again"}]}]});
    let answer = send("POST", &url, None, second.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["previous_response_id"], first["id"]);
    let sent = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "echo: hi"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ])
    );

    let streamed = json!({"model": "chat", "input": "hi", "stream": true, "store": false});
    let answer = send("POST", &url, None, streamed.to_string()).await;
    assert_eq!(answer.status, 200);
    let events = events(&answer.body);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"response.created"));
    assert_eq!(types.last(), Some(&"response.completed"));
    assert!(types.contains(&"response.output_text.done"), "{types:?}");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(deltas, "one two three");
    let completed = &events.last().unwrap()["response"];
    assert_eq!(
        completed["output"][0]["content"][0]["text"],
        "one two three"
    );
    assert_eq!(completed["usage"]["output_tokens"], 5);
    // store: false: nothing to continue.
    let continued = json!({"model": "chat", "previous_response_id": completed["id"], "input": "x"});
    let answer = send("POST", &url, None, continued.to_string()).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"]["param"], "previous_response_id");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn responses_errors_name_the_field() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy_with(&config(addr), |c| c.proxy.max_request_bytes = 4096).await;
    let url = format!("{}/v1/responses", base(&proxy));
    let cases = [
        (json!({"model": "chat", "input": [{"type": "function_call_output", "call_id": "call_7", "output": "x"}]}).to_string(),
            400, Some("input[0].call_id")),
        (json!({"model": "chat", "input": [{"type": "computer_call"}]}).to_string(), 400, Some("input[0].type")),
        (json!({"model": "chat", "input": [{"role": "user", "content": 7}]}).to_string(), 400, Some("input[0].content")),
        (json!({"model": "chat", "tools": [{"type": "file_search"}]}).to_string(), 400, Some("tools[0].type")),
        (json!({"model": "chat", "input": "x".repeat(5000)}).to_string(), 413, None),
        ("[]".to_string(), 400, Some("(body)")),
    ];
    for (body, status, param) in cases {
        let answer = send("POST", &url, None, body.clone()).await;
        let error = answer.json();
        assert_eq!(answer.status, status, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{error}");
            assert!(
                error["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with(param),
                "{error}"
            );
        }
    }
    assert_eq!(seen.hits.load(Ordering::SeqCst), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn overhead_header_and_histogram_on_every_answer() {
    let (addr, _) = fake_upstream().await;
    let proxy = proxy(&config(addr)).await;
    // The fake upstream takes 100 ms to stream its chunks; the header counts
    // only the proxy's own time, to the answer's headers.
    for (method, path, body) in [
        ("POST", "/v1/chat/completions", chat("chat", false)),
        ("POST", "/v1/chat/completions", chat("chat", true)),
        ("POST", "/v1/chat/completions", chat("nope", false)),
        ("GET", "/v1/models", String::new()),
        ("GET", "/no/such/path", String::new()),
    ] {
        let answer = send(method, &format!("{}{path}", base(&proxy)), None, body).await;
        let us = overhead_us(&answer);
        assert!(us < 1_000_000, "{path}: {us} µs");
    }
    let count = metric(&proxy, "berth_llm_overhead_seconds_count").await;
    assert_eq!(count, ["berth_llm_overhead_seconds_count 5"], "{count:?}");
    proxy.stop().await.unwrap();
}
