//! The anthropic provider against a FAKE Anthropic messages API of our own
//! (Anthropic's real API cannot be reached from here): the OpenAI request
//! arrives translated (headers, system hoisted, max_tokens default), and the
//! answer, whole or streamed, comes back as OpenAI's (and as gRPC chunks),
//! usage included; the official `openai` Python client reads it as it reads
//! OpenAI.

mod common;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::*;
use http::HeaderMap;
use serde_json::{Value, json};

/// The last request the fake saw: its headers and JSON body.
type Seen = Arc<Mutex<Option<(HeaderMap, Value)>>>;

/// A fake `POST /v1/messages`: a whole message, or (stream: true) the event
/// sequence Anthropic documents, cut into pieces that split events and lines.
async fn fake_anthropic() -> (std::net::SocketAddr, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/v1/messages", post(messages))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

async fn messages(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    *seen.lock().unwrap() = Some((headers, body.clone()));
    if body["model"] == "overloaded" {
        return (
            http::StatusCode::from_u16(529).unwrap(),
            Json(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        )
            .into_response();
    }
    let tools = body.get("tools").is_some();
    if body["stream"] != json!(true) && tools {
        return Json(json!({
            "id": "msg_03", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use", "usage": {"input_tokens": 20, "output_tokens": 9},
        }))
        .into_response();
    }
    if body["stream"] != json!(true) {
        return Json(json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
            "stop_reason": "max_tokens", "stop_sequence": null,
            "usage": {"input_tokens": 11, "output_tokens": 2, "cache_read_input_tokens": 1},
        }))
        .into_response();
    }
    let start = [(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_02", "type": "message", "role": "assistant", "model": "claude-test", "content": [], "stop_reason": null, "usage": {"input_tokens": 7, "output_tokens": 1}}}),
    )];
    let text_events = [
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo!"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    ];
    let tool_events = [
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    ];
    let stop_reason = if tools { "tool_use" } else { "end_turn" };
    let end = [
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": 4}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let blocks = if tools {
        &tool_events[..]
    } else {
        &text_events[..]
    };
    let text: String = start
        .iter()
        .chain(blocks)
        .chain(&end)
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    let pieces: Vec<Result<Bytes, std::io::Error>> = text
        .into_bytes()
        .chunks(37)
        .map(|piece| Ok(Bytes::copy_from_slice(piece)))
        .collect();
    (
        [(http::header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(futures::stream::iter(pieces)),
    )
        .into_response()
}

fn config(addr: std::net::SocketAddr) -> String {
    format!(
        "model_list:\n  - model_name: claude\n    litellm_params: {{model: anthropic/claude-test, api_base: http://{addr}, api_key: sk-ant-fake}}\n  - model_name: busy\n    litellm_params: {{model: anthropic/overloaded, api_base: http://{addr}/v1/messages, api_key: sk-ant-fake}}\nrouter_settings: {{num_retries: 0}}\n"
    )
}

#[tokio::test]
async fn whole_messages_are_translated_both_ways() {
    let (addr, seen) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let request = json!({
        "model": "claude",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again"},
        ],
        "stop": "END",
        "temperature": 0.2,
    });
    let answer = send(
        "POST",
        &format!("{}/v1/chat/completions", base(&proxy)),
        None,
        request.to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let completion = answer.json();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello world"
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    assert_eq!(
        completion["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14})
    );

    let (headers, body) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-api-key"], "sk-ant-fake");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert!(headers.get("authorization").is_none());
    assert_eq!(body["model"], "claude-test");
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "Be brief."}])
    );
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["stop_sequences"], json!(["END"]));
    assert_eq!(body["temperature"], 0.2);
    let roles: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);

    let tokens = metric(&proxy, "berth_llm_tokens_total{").await;
    assert!(
        tokens.contains(&"berth_llm_tokens_total{model=\"claude\",kind=\"prompt\"} 12".to_string()),
        "{tokens:?}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn streamed_events_become_openai_chunks() {
    let (addr, seen) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let request = json!({
        "model": "claude",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi"}],
    });
    let answer = send(
        "POST",
        &format!("{}/v1/chat/completions", base(&proxy)),
        None,
        request.to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let payloads: Vec<&str> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .collect();
    assert_eq!(payloads.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_02")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello!");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    );

    let (_, body) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 50);
    assert!(body.get("stream_options").is_none());
    let tokens = metric(&proxy, "berth_llm_tokens_total{").await;
    assert!(
        tokens.contains(
            &"berth_llm_tokens_total{model=\"claude\",kind=\"completion\"} 4".to_string()
        ),
        "{tokens:?}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn anthropic_errors_and_untranslatable_requests() {
    let (addr, _) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    // Anthropic's own error passes through with its status.
    let answer = send("POST", &url, None, chat("busy", false)).await;
    assert_eq!(answer.status, 529, "{:?}", answer.body);
    assert_eq!(answer.json()["error"]["message"], "Overloaded");
    // A parameter with no Anthropic equivalent is refused, by name.
    let logprobs = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}], "logprobs": true});
    let answer = send("POST", &url, None, logprobs.to_string()).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`logprobs`"),
        "{:?}",
        answer.body
    );
    // Anthropic has no embeddings.
    let answer = send(
        "POST",
        &format!("{}/v1/embeddings", base(&proxy)),
        None,
        json!({"model": "claude", "input": ["x"]}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 400);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn tools_and_tool_calls_are_translated_both_ways() {
    let (addr, seen) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let request = json!({
        "model": "claude",
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_0", "content": "21 C"},
            {"role": "user", "content": "And Paris?"},
        ],
    });
    let answer = send("POST", &url, None, request.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let reply = &answer.json()["choices"][0];
    assert_eq!(reply["finish_reason"], "tool_calls");
    assert_eq!(reply["message"]["content"], "Checking.");
    assert_eq!(
        reply["message"]["tool_calls"],
        json!([{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );

    let (_, body) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(body["tools"][0]["name"], "get_weather");
    assert_eq!(
        body["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        body["messages"][1]["content"],
        json!([{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Rome"}}])
    );
    assert_eq!(
        body["messages"][2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "21 C"}]})
    );

    // Streamed: the call's id and name first, then its arguments in pieces.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let answer = send("POST", &url, None, streamed.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let calls: Vec<serde_json::Map<String, Value>> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|payload| *payload != "[DONE]")
        .map(|payload| serde_json::from_str::<Value>(payload).unwrap())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]
                .as_object()
                .cloned()
        })
        .collect();
    assert_eq!(calls[0]["id"], "toolu_2");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls.iter().all(|c| c["index"] == 0));
    let arguments: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Oslo\"}");
    assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_official_openai_client_reads_translated_answers() {
    let python = venv().join("bin/python");
    let found = if python.exists() {
        Ok(())
    } else {
        Err(format!(
            "no venv with the openai client at {}",
            python.display()
        ))
    };
    if berth_tests::require(berth_tests::Part::OpenAiClient, found).is_none() {
        return;
    }
    let (addr, _) = fake_anthropic().await;
    let yaml = format!("{}general_settings: {{master_key: sk-e2e}}\n", config(addr));
    let proxy = proxy(&yaml).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/llm/openai_client_check.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("{}/v1", base(&proxy)))
        .args(["sk-e2e", "claude", "--chat-only"])
        .output()
        .await
        .expect("running the openai client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["chat"]["text"], "Hello world");
    assert_eq!(seen["stream"]["text"], "Hello!");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_streams_from_anthropic_too() {
    use berth_proto::llmproxy::v1 as pb;
    use tokio_stream::StreamExt;

    let (addr, _) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let mut client = pb::llm_proxy_client::LlmProxyClient::connect(proxy.grpc_uri())
        .await
        .unwrap();
    let request = pb::ChatCompletionRequest {
        model: "claude".into(),
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
            name: String::new(),
        }],
        extra_json: r#"{"stream_options":{"include_usage":true}}"#.into(),
        ..Default::default()
    };
    let mut stream = client
        .chat_completion_stream(request)
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut usage) = (String::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.delta_content);
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, "Hello!");
    assert_eq!(usage.unwrap().total_tokens, 11);
    proxy.stop().await.unwrap();
}

/// `/v1/messages` to an Anthropic upstream: in through the chat form and
/// out again, a tool round arrives as Anthropic's blocks and the answer,
/// whole and streamed, comes back as Anthropic's.
#[tokio::test]
async fn messages_api_round_trips_through_an_anthropic_upstream() {
    let (addr, seen) = fake_anthropic().await;
    let proxy = proxy(&config(addr)).await;
    let url = format!("{}/v1/messages", base(&proxy));
    let mut request = json!({
        "model": "claude", "max_tokens": 100, "top_k": 5, "system": "Be brief.",
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "sunny"}]},
        ],
    });
    let answer = send("POST", &url, None, request.to_string()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let message = answer.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["content"],
        json!([
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ])
    );
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 20, "output_tokens": 9})
    );
    let (_, sent) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(
        sent["system"],
        json!([{"type": "text", "text": "Be brief."}])
    );
    assert_eq!(sent["top_k"], 5);
    assert_eq!(sent["max_tokens"], 100);
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        sent["messages"][1]["content"][0]["input"],
        json!({"city": "Paris"})
    );
    assert_eq!(
        sent["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_0", "content": "sunny"})
    );

    request["stream"] = true.into();
    let answer = send("POST", &url, None, request.to_string()).await;
    assert_eq!(answer.status, 200);
    let events: Vec<Value> = String::from_utf8_lossy(&answer.body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let start = events
        .iter()
        .find(|e| e["type"] == "content_block_start")
        .unwrap();
    assert_eq!(start["content_block"]["name"], "get_weather");
    let arguments: String = events
        .iter()
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Oslo\"}");
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 4);
    assert_eq!(events.last().unwrap()["type"], "message_stop");
    proxy.stop().await.unwrap();
}
