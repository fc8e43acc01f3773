//! Test parts: a fake OpenAI-compatible upstream whose behaviour is chosen
//! by the model name it is asked for, the proxy started in-process, and a
//! small HTTP client.

#![allow(dead_code)] // each test file uses its own part of this module

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use berth_llm_proxy::litellm_config::LiteLlmConfig;
use berth_llm_proxy::{Config, start_with};
use berth_server::RunningService;
use bytes::Bytes;
use futures::StreamExt;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// What the fake upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub hits: AtomicUsize,
    /// Set when a stream the fake was sending is dropped before its end:
    /// the proxy closed the upstream connection.
    pub stream_dropped: AtomicBool,
    pub last_body: std::sync::Mutex<Option<Value>>,
}

/// Model names the fake understands (on `/v1/responses` as well, which
/// answers a Responses API `response` echoing its `input`, or streams its
/// events, ending with `response.completed` and its usage):
/// - `ok`: answers (streams: 3 content chunks 50 ms apart, then, as real
///   servers do only when asked with `stream_options.include_usage`, a chunk
///   with the usage and no choices, and `"usage": null` on the others as
///   OpenAI sends it)
/// - `fail`: 500 with an OpenAI error body
/// - `bad`: 400 with an OpenAI error body
/// - `stall`: no answer for a minute
/// - `stall-stream`: one chunk, then silence until dropped
/// - `drop`: one chunk, then the connection breaks
/// - `flaky`: 503 for the first two hits, then `ok`
pub async fn fake_upstream() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(fake_chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(fake_responses))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "server_error", "code": null}})),
    )
        .into_response()
}

fn usage() -> Value {
    json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
}

async fn behaviour(seen: &Seen, body: &Value) -> Result<(), Response> {
    let hit = seen.hits.fetch_add(1, Ordering::SeqCst);
    *seen.last_body.lock().unwrap() = Some(body.clone());
    match body["model"].as_str().unwrap_or("") {
        "fail" => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upstream exploded",
        )),
        "bad" => Err(error(StatusCode::BAD_REQUEST, "upstream says no")),
        "flaky" if hit < 2 => Err(error(StatusCode::SERVICE_UNAVAILABLE, "warming up")),
        "stall" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Err(error(StatusCode::GATEWAY_TIMEOUT, "too late"))
        }
        _ => Ok(()),
    }
}

/// Sets `stream_dropped` when dropped before `finished`: the stream holding
/// it was abandoned.
struct DropFlag(Arc<Seen>, bool);
impl DropFlag {
    fn finished(mut self) {
        self.1 = true;
    }
}
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.stream_dropped.store(true, Ordering::SeqCst);
        }
    }
}

async fn fake_chat(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Response {
    if let Err(response) = behaviour(&seen, &body).await {
        return response;
    }
    let model = body["model"].as_str().unwrap_or("").to_string();
    let echo = body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if body["stream"] != json!(true) {
        return Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo: {echo}")}, "finish_reason": "stop"}],
            "usage": usage(),
        }))
        .into_response();
    }
    let include_usage = body["stream_options"]["include_usage"] == json!(true);
    let chunk = |content: &str, finish: Value| {
        let mut chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]});
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let first = chunk("one ", Value::Null);
    let rest = vec![chunk("two ", Value::Null), chunk("three", json!("stop"))];
    let usage_chunk = if include_usage {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage()})
        )
    } else {
        String::new()
    };
    let tail = Bytes::from(format!("{usage_chunk}data: [DONE]\n\n"));
    let guard = DropFlag(seen, false);
    let mode = model.clone();
    let stream = async_stream(move |tx| async move {
        let _ = tx.send(Ok(first)).await;
        match mode.as_str() {
            "stall-stream" => std::future::pending::<()>().await,
            "drop" => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("connection reset")))
                    .await;
                guard.finished();
                return;
            }
            _ => {}
        }
        for piece in rest {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Ok(piece)).await;
        }
        let _ = tx.send(Ok(tail)).await;
        guard.finished();
    });
    (
        [(http::header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A body stream fed by a task; the task is dropped with the stream.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(f(tx));
    let abort = task.abort_handle();
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(abort);
    tokio_stream::wrappers::ReceiverStream::new(rx).map(move |item| {
        let _ = &guard;
        item
    })
}

async fn fake_responses(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Response {
    if let Err(response) = behaviour(&seen, &body).await {
        return response;
    }
    let input = body["input"].as_str().unwrap_or("(items)").to_string();
    let response = |status: &str, text: &str, usage: Value| {
        json!({"id": "resp_fake_1", "object": "response", "created_at": 1, "status": status,
               "model": body["model"], "previous_response_id": body["previous_response_id"],
               "output": [{"type": "message", "id": "msg_1", "status": status, "role": "assistant",
                           "content": [{"type": "output_text", "text": text, "annotations": []}]}],
               "usage": usage})
    };
    let usage = json!({"input_tokens": 3, "output_tokens": 5, "total_tokens": 8});
    let text = format!("echo: {input}");
    if body["stream"] != json!(true) {
        return Json(response("completed", &text, usage)).into_response();
    }
    let event = |kind: &str, data: Value| {
        let mut data = data;
        data["type"] = kind.into();
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    };
    let events = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", "", Value::Null)}),
        ),
        event(
            "response.output_text.delta",
            json!({"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "echo: "}),
        ),
        event(
            "response.output_text.delta",
            json!({"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": input}),
        ),
        event(
            "response.completed",
            json!({"response": response("completed", &text, usage)}),
        ),
    ];
    let stream = async_stream(move |tx| async move {
        for piece in events {
            let _ = tx.send(Ok(piece)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (
        [(http::header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn completions(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Response {
    if let Err(response) = behaviour(&seen, &body).await {
        return response;
    }
    Json(
        json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "text": " world", "finish_reason": "stop"}], "usage": usage()}),
    )
    .into_response()
}

async fn embeddings(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Response {
    if let Err(response) = behaviour(&seen, &body).await {
        return response;
    }
    let inputs = body["input"].as_array().cloned().unwrap_or_default();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, _)| json!({"object": "embedding", "index": i, "embedding": [0.5, -0.25, i as f64]}))
        .collect();
    Json(
        json!({"object": "list", "model": body["model"], "data": data,
        "usage": {"prompt_tokens": 2, "total_tokens": 2}}),
    )
    .into_response()
}

/// Starts the proxy on free ports with a LiteLLM config given as text.
pub async fn proxy(yaml: &str) -> RunningService {
    proxy_with(yaml, |_| {}).await
}

pub async fn proxy_with(yaml: &str, tweak: impl FnOnce(&mut Config)) -> RunningService {
    let litellm = LiteLlmConfig::parse("test.yaml", yaml, &|_| None).unwrap();
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.http_listen = "127.0.0.1:0".into();
    tweak(&mut config);
    start_with(config, litellm).await.unwrap()
}

pub fn base(proxy: &RunningService) -> String {
    format!("http://{}", proxy.http_addr.unwrap())
}

type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request's answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(method: &str, url: &str, key: Option<&str>, body: impl Into<Bytes>) -> Answer {
    let response = start(method, url, key, body).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

pub async fn start(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> http::Response<hyper::body::Incoming> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    client()
        .request(request.body(Full::new(body.into())).unwrap())
        .await
        .unwrap()
}

pub fn chat(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// Metric value lines of `/metrics` that start with `prefix`.
pub async fn metric(proxy: &RunningService, prefix: &str) -> Vec<String> {
    let answer = send(
        "GET",
        &format!("{}/metrics", base(proxy)),
        None,
        Bytes::new(),
    )
    .await;
    String::from_utf8_lossy(&answer.body)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The venv scripts/llm/setup-peers.sh creates (the official `openai`
/// client, llama.cpp's server).
pub fn venv() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(path) = std::env::var_os("BERTH_LLM_VENV") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("berth/llm-venv")
}

/// The JSON payloads of an SSE body's `data:` lines (`[DONE]` left out),
/// whether its events are named (`event:` lines, Anthropic's and the
/// Responses API's) or not.
pub fn events(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|payload| *payload != "[DONE]")
        .map(|payload| serde_json::from_str(payload).unwrap())
        .collect()
}
