//! `/v1/responses` passed through to a deployment that serves the Responses
//! API itself (`model_info.supported_endpoints` lists `/v1/responses`),
//! against the recording fake upstream of tests/common: the upstream gets
//! the request as the client wrote it (`previous_response_id` included, for
//! its own store), its answer and its events come back as they are, and the
//! proxy still meters, prices, caches and times it. An upstream's refusal
//! reaches the client in OpenAI's error shape and is never cached. The
//! official client against a real upstream (LiteLLM's proxy) is in
//! tests/real_llm.rs.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use serde_json::{Value, json};

fn config(addr: std::net::SocketAddr) -> String {
    let entry = |name: &str, upstream: &str, endpoints: &str| {
        format!(
            "  - model_name: {name}\n    litellm_params: {{model: openai/{upstream}, api_base: http://{addr}/v1, input_cost_per_token: 0.001, output_cost_per_token: 0.002}}\n    model_info: {{supported_endpoints: [{endpoints}]}}\n"
        )
    };
    let both = "/v1/chat/completions, /v1/responses";
    format!(
        "model_list:\n{}{}{}",
        entry("native", "ok", both),
        entry("native-broken", "bad", both),
        entry("chat-only", "ok", "/v1/chat/completions"),
    )
}

fn upstream_api(answer: &Answer) -> &str {
    answer.headers["x-berth-upstream-api"].to_str().unwrap()
}

#[tokio::test]
async fn passed_through_whole_and_streamed_metered_and_cached() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy_with(&config(addr), |c| c.proxy.cache = true).await;
    let url = format!("{}/v1/responses", base(&proxy));

    // An id only the upstream knows: translated, this would be a 404.
    let request = json!({"model": "native", "input": "hi", "max_output_tokens": 16,
                         "previous_response_id": "resp_upstream_only", "reasoning": {"effort": "low"}});
    let answer = send("POST", &url, None, request.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(upstream_api(&answer), "responses");
    assert!(answer.headers.contains_key("x-berth-overhead-us"));
    let response = answer.json();
    assert_eq!(response["id"], "resp_fake_1", "the upstream's own answer");
    assert_eq!(response["previous_response_id"], "resp_upstream_only");
    assert_eq!(response["output"][0]["content"][0]["text"], "echo: hi");
    let sent = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["model"], "ok", "the deployment's model name");
    assert_eq!(sent["input"], "hi");
    assert_eq!(sent["reasoning"], json!({"effort": "low"}));
    assert!(sent.get("messages").is_none() && sent.get("stream_options").is_none());
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);

    // Usage read from the Responses shape: tokens and spend are metered.
    let completion = metric(
        &proxy,
        "berth_llm_tokens_total{model=\"native\",kind=\"completion\"}",
    )
    .await;
    assert_eq!(completion.len(), 1, "{completion:?}");
    assert!(completion[0].ends_with(" 5"), "{completion:?}");
    let spend = metric(&proxy, "berth_llm_spend_usd_total{model=\"native\"}").await;
    assert_eq!(spend.len(), 1, "{spend:?}");

    // The same request again: from the cache, the upstream not asked.
    let again = send("POST", &url, None, request.to_string()).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["x-berth-cache"], "hit");
    assert_eq!(again.json(), response);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);

    // Streamed: the upstream's events, relayed as they come.
    let mut streamed = request.clone();
    streamed["stream"] = true.into();
    let answer = send("POST", &url, None, streamed.to_string()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    assert_eq!(upstream_api(&answer), "responses");
    let text = String::from_utf8_lossy(&answer.body).to_string();
    assert!(text.starts_with("event: response.created\n"), "{text}");
    let types: Vec<Value> = events(&answer.body)
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            "response.created",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.completed"
        ]
    );
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);
    let completion = metric(
        &proxy,
        "berth_llm_tokens_total{model=\"native\",kind=\"completion\"}",
    )
    .await;
    assert!(
        completion[0].ends_with(" 10"),
        "the stream's usage counted: {completion:?}"
    );
    // A complete stream is cached as well, and served as a stream.
    let again = send("POST", &url, None, streamed.to_string()).await;
    assert_eq!(again.headers["x-berth-cache"], "hit");
    assert_eq!(again.body, answer.body);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);

    // A model whose deployment lacks the API: translated, as before.
    let mut translated = request.clone();
    translated["model"] = "chat-only".into();
    translated
        .as_object_mut()
        .unwrap()
        .remove("previous_response_id");
    let answer = send("POST", &url, None, translated.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(upstream_api(&answer), "chat.completions");
    let sent = seen.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "hi"}]));
    assert!(answer.json()["id"].as_str().unwrap().starts_with("resp_"));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_upstream_refusal_is_an_openai_error_and_never_cached() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy_with(&config(addr), |c| c.proxy.cache = true).await;
    let url = format!("{}/v1/responses", base(&proxy));
    let request = json!({"model": "native-broken", "input": "hi"}).to_string();
    for tries in 1..=2 {
        let answer = send("POST", &url, None, request.clone()).await;
        assert_eq!(answer.status, 400, "{:?}", answer.body);
        assert!(!answer.headers.contains_key("x-berth-cache"));
        let error = &answer.json()["error"];
        assert_eq!(error["message"], "upstream says no", "{error}");
        assert_eq!(error["type"], "server_error", "the upstream's own error");
        assert_eq!(seen.hits.load(Ordering::SeqCst), tries, "asked again");
    }
    // Refused before anything is sent: a body that is no request.
    let answer = send("POST", &url, None, r#"{"model":"native","stream":1}"#).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"]["type"], "invalid_request_error");
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);
    let failed = metric(
        &proxy,
        "berth_llm_requests_total{model=\"native-broken\",outcome=\"failed\"}",
    )
    .await;
    assert_eq!(
        failed,
        ["berth_llm_requests_total{model=\"native-broken\",outcome=\"failed\"} 2"]
    );
    proxy.stop().await.unwrap();
}
