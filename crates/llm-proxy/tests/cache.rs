//! The response cache in front of the recording fake upstream of
//! tests/common: a hit is proven by the upstream seeing one request for two
//! answers, on every API (chat whole and streamed, `/v1/messages`,
//! `/v1/responses`); opt-outs, failed answers and expiry by it seeing more.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::json;

fn config(addr: std::net::SocketAddr, cache: &str) -> String {
    let entry = |name: &str, upstream: &str| {
        format!(
            "  - model_name: {name}\n    litellm_params: {{model: openai/{upstream}, api_base: http://{addr}/v1}}\n"
        )
    };
    format!(
        "model_list:\n{}{}{}litellm_settings: {cache}\n",
        entry("chat", "ok"),
        entry("broken", "bad"),
        entry("cut", "drop")
    )
}

fn hit(answer: &Answer) -> bool {
    answer
        .headers
        .get("x-berth-cache")
        .is_some_and(|v| v == "hit")
}

#[tokio::test]
async fn second_answer_comes_from_the_cache_on_every_api() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(
        addr,
        "{cache: true, cache_params: {type: local, ttl: 60}}",
    ))
    .await;
    let hits = || seen.hits.load(Ordering::SeqCst);
    let url = |path: &str| format!("{}{path}", base(&proxy));

    for stream in [false, true] {
        let before = hits();
        let first = send(
            "POST",
            &url("/v1/chat/completions"),
            None,
            chat("chat", stream),
        )
        .await;
        // The same request with its keys in another order is the same request.
        let reordered = json!({"messages": [{"content": "hi", "role": "user"}], "stream": stream, "model": "chat"});
        let second = send(
            "POST",
            &url("/v1/chat/completions"),
            None,
            reordered.to_string(),
        )
        .await;
        assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200));
        assert_eq!(
            hits() - before,
            1,
            "stream: {stream}: the upstream saw one request"
        );
        assert!(!hit(&first) && hit(&second));
        assert_eq!(first.body, second.body, "stream: {stream}");
        assert_eq!(
            second.headers["content-type"],
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            }
        );
    }

    let message =
        json!({"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hey"}]});
    let response = json!({"model": "chat", "input": "hey there"});
    for (path, body) in [
        ("/v1/messages", message.clone()),
        ("/v1/responses", response.clone()),
    ] {
        for stream in [false, true] {
            let mut body = body.clone();
            body["stream"] = stream.into();
            let before = hits();
            let first = send("POST", &url(path), None, body.to_string()).await;
            let second = send("POST", &url(path), None, body.to_string()).await;
            assert_eq!(
                (first.status.as_u16(), second.status.as_u16()),
                (200, 200),
                "{path}"
            );
            assert_eq!(hits() - before, 1, "{path} stream: {stream}");
            assert!(!hit(&first) && hit(&second), "{path} stream: {stream}");
            let text = String::from_utf8_lossy(&second.body);
            assert!(
                text.contains("echo: hey") || text.contains("one two") || text.contains("\"one \""),
                "{path}: {text}"
            );
        }
    }

    let cached = metric(
        &proxy,
        "berth_llm_requests_total{model=\"chat\",outcome=\"cache_hit\"}",
    )
    .await;
    assert_eq!(
        cached,
        ["berth_llm_requests_total{model=\"chat\",outcome=\"cache_hit\"} 6"]
    );
    assert!(
        seen.last_body
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .get("cache")
            .is_none()
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn opt_outs_failures_and_expiry_reach_the_upstream() {
    let (addr, seen) = fake_upstream().await;
    let proxy = proxy(&config(addr, "{cache: true, cache_params: {ttl: 0.3}}")).await;
    let hits = || seen.hits.load(Ordering::SeqCst);
    let url = format!("{}/v1/chat/completions", base(&proxy));
    let ask = |body: String, cache_control: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut request = http::Request::post(&url).header("content-type", "application/json");
            if let Some(value) = cache_control {
                request = request.header("cache-control", value);
            }
            let response = client()
                .request(
                    request
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap(),
                )
                .await
                .unwrap();
            (
                response.status(),
                response.headers().get("x-berth-cache").is_some(),
            )
        }
    };
    let with_cache = |content: &str, cache: serde_json::Value| {
        json!({"model": "chat", "messages": [{"role": "user", "content": content}], "cache": cache})
            .to_string()
    };

    // no-store: answered, never kept.
    for _ in 0..2 {
        assert_eq!(
            ask(with_cache("a", json!({"no-store": true})), None).await,
            (http::StatusCode::OK, false)
        );
    }
    assert_eq!(hits(), 2);
    for _ in 0..2 {
        assert!(
            !ask(chat("chat", false).replace("hi", "b"), Some("no-store"))
                .await
                .1
        );
    }
    assert_eq!(hits(), 4);
    // no-cache: not read, but kept for the next.
    ask(chat("chat", false).replace("hi", "c"), None).await;
    assert!(
        !ask(chat("chat", false).replace("hi", "c"), Some("no-cache"))
            .await
            .1
    );
    assert!(ask(chat("chat", false).replace("hi", "c"), None).await.1);
    assert_eq!(hits(), 6);
    // A bad cache setting is refused by name before anything is sent.
    let answer = send(
        "POST",
        &url,
        None,
        with_cache("d", json!({"forever": true})),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"]["param"], "cache");

    // Failed answers are not kept: an upstream error, a stream cut short.
    for model in ["broken", "cut"] {
        let before = hits();
        for _ in 0..2 {
            send("POST", &url, None, chat(model, model == "cut")).await;
        }
        assert_eq!(hits() - before, 2, "{model}");
    }

    // Expired after cache_params.ttl.
    let before = hits();
    send("POST", &url, None, chat("chat", false)).await;
    assert!(hit(&send("POST", &url, None, chat("chat", false)).await));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!hit(&send("POST", &url, None, chat("chat", false)).await));
    assert_eq!(hits() - before, 2);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn off_unless_configured_and_bounded_by_size() {
    let (addr, seen) = fake_upstream().await;
    let url = |proxy: &berth_server::RunningService| format!("{}/v1/chat/completions", base(proxy));
    let off = proxy(&config(addr, "{}")).await;
    for _ in 0..2 {
        assert!(!hit(
            &send("POST", &url(&off), None, chat("chat", false)).await
        ));
    }
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);
    off.stop().await.unwrap();

    // proxy.cache turns it on too; an answer larger than a 16th of
    // cache_max_bytes is not kept.
    let tiny = proxy_with(&config(addr, "{}"), |c| {
        c.proxy.cache = true;
        c.proxy.cache_max_bytes = 16 * 64;
    })
    .await;
    for _ in 0..2 {
        assert!(!hit(
            &send("POST", &url(&tiny), None, chat("chat", false)).await
        ));
    }
    assert_eq!(seen.hits.load(Ordering::SeqCst), 4);
    tiny.stop().await.unwrap();
}
