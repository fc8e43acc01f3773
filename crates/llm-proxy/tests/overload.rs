//! Bounded under overload (issue #24): the real binary takes 2,000 client
//! connections at once, each with a request, and once they have closed its
//! RSS comes back near where it was idle. Without the proxy's trimming
//! (src/memory.rs) it stayed at the peak (docs/benchmarks.md): freed memory
//! stayed in glibc's per-thread arenas.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const CONNECTIONS: usize = 2_000;
/// The goal for the RSS after an overload.
const RSS_AFTER_LIMIT_KB: u64 = 30 * 1024;

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One client connection with one request answered on it, kept open.
async fn open_and_ask(addr: std::net::SocketAddr, body: Bytes) -> impl Sized {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let request = http::Request::post("/v1/chat/completions")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    (sender, AbortOnDrop(driver))
}

/// The binary, killed however the test ends.
struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_returns_near_idle_after_2000_connections() {
    let (upstream, _) = fake_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("config.yaml");
    std::fs::write(
        &litellm,
        format!("model_list:\n  - model_name: chat\n    litellm_params: {{model: openai/ok, api_base: http://{upstream}/v1}}\n"),
    )
    .unwrap();
    let http = free_port();
    let child = Command::new(
        std::env::var_os("BERTH_LLM_PROXY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_berth-llm-proxy").into()),
    )
    .args([
        "--listen",
        &free_port().to_string(),
        "--http-listen",
        &http.to_string(),
    ])
    .args([
        "--set",
        &format!("proxy.litellm_config={}", litellm.display()),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("starting berth-llm-proxy");
    let pid = child.id();
    let child = KillOnDrop(child);
    let url = format!("http://{http}/v1/chat/completions");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Listening once a connection is taken (the port is bound before serving).
    while tokio::net::TcpStream::connect(http).await.is_err() {
        assert!(Instant::now() < deadline, "berth-llm-proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle after some ordinary traffic.
    for _ in 0..200 {
        assert_eq!(
            send("POST", &url, None, chat("chat", false)).await.status,
            200
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kb(pid);

    let body = Bytes::from(chat("chat", false));
    let open = join_all((0..CONNECTIONS).map(|_| open_and_ask(http, body.clone()))).await;
    let peak = rss_kb(pid);
    drop(open);
    // The server sees each close at once; the allocator gives memory back
    // on its own schedule.
    let mut after = rss_kb(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss_kb(pid);
        if after < RSS_AFTER_LIMIT_KB {
            break;
        }
    }
    eprintln!(
        "RSS idle {} KB, with {CONNECTIONS} connections {} KB, after they closed {} KB",
        idle, peak, after
    );
    drop(child);
    assert!(
        after < RSS_AFTER_LIMIT_KB,
        "RSS {after} KB after the connections closed (idle {idle} KB, peak {peak} KB)"
    );
}
