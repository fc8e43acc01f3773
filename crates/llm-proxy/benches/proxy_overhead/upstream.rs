//! The fake upstream both proxies sit in front of: an OpenAI-compatible
//! `/v1/chat/completions` that answers at once with a fixed completion. It
//! runs on a thread of its own so that it is never what the numbers measure.

use std::net::SocketAddr;

use axum::routing::post;
use axum::serve::ListenerExt;
use bytes::Bytes;
use http::header::CONTENT_TYPE;

/// A whole chat completion, as LiteLLM's `openai` client expects one.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"fake-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;

/// Starts the fake upstream on a free port; it lives as long as the process.
pub fn spawn() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fake upstream");
    listener.set_nonblocking(true).expect("non-blocking socket");
    let addr = listener.local_addr().expect("fake upstream address");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("fake upstream runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)
                .expect("fake upstream listener")
                .tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
            // The body is read (the extractor) so that hyper keeps the
            // connection alive; an unread body would close it.
            let app = axum::Router::new().route(
                "/v1/chat/completions",
                post(|_body: Bytes| async { ([(CONTENT_TYPE, "application/json")], COMPLETION) }),
            );
            axum::serve(listener, app).await.expect("fake upstream");
        });
    });
    addr
}
