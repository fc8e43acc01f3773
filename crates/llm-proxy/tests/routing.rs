//! Retries, fallbacks, cooldowns and timeouts against fake upstreams that
//! fail, stall and break mid-stream; the proxy keeps serving throughout.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

fn entry(name: &str, upstream: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "  - model_name: {name}\n    litellm_params: {{model: openai/{upstream}, api_base: http://{addr}/v1{extra}}}\n"
    )
}

#[tokio::test]
async fn retries_with_backoff_until_the_upstream_recovers() {
    let (addr, seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}router_settings: {{num_retries: 2, retry_after: 0.01}}\n",
        entry("m", "flaky", addr, "")
    );
    let proxy = proxy(&yaml).await;
    let answer = send(
        "POST",
        &format!("{}/v1/chat/completions", base(&proxy)),
        None,
        chat("m", false),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);
    let failures = metric(&proxy, "berth_llm_upstream_failures_total{").await;
    assert_eq!(
        failures,
        ["berth_llm_upstream_failures_total{deployment=\"m#0\"} 2"]
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn falls_back_to_another_model_group() {
    let (addr, seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{num_retries: 1, fallbacks: [{{primary: [backup]}}]}}\n",
        entry("primary", "fail", addr, ""),
        entry("backup", "ok", addr, "")
    );
    let proxy = proxy(&yaml).await;
    let answer = send(
        "POST",
        &format!("{}/v1/chat/completions", base(&proxy)),
        None,
        chat("primary", false),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["model"], "ok");
    // Two tries on primary (1 + num_retries), one on backup.
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn failing_deployment_cools_down_and_traffic_moves_away() {
    let (bad_addr, bad) = fake_upstream().await;
    let (good_addr, good) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{num_retries: 1, allowed_fails: 0, cooldown_time: 30}}\n",
        entry("m", "fail", bad_addr, ""),
        entry("m", "ok", good_addr, "")
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    for _ in 0..20 {
        assert_eq!(send("POST", &url, None, chat("m", false)).await.status, 200);
    }
    // The failing one was tried at most once before its cooldown.
    assert!(bad.hits.load(Ordering::SeqCst) <= 1);
    assert_eq!(good.hits.load(Ordering::SeqCst), 20);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn every_deployment_cooling_down_is_429_with_retry_after() {
    let (addr, _) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}router_settings: {{num_retries: 0, allowed_fails: 0, cooldown_time: 3}}\n",
        entry("m", "fail", addr, "")
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    let first = send("POST", &url, None, chat("m", false)).await;
    assert_eq!(first.status, 500);
    assert_eq!(first.json()["error"]["message"], "upstream exploded");
    let second = send("POST", &url, None, chat("m", false)).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.headers["retry-after"], "3");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn stalled_upstream_times_out_and_the_proxy_keeps_serving() {
    let (addr, _) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}{}router_settings: {{num_retries: 0}}\n",
        entry("stuck", "stall", addr, ", timeout: 0.2"),
        entry("fine", "ok", addr, "")
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));
    let started = Instant::now();
    let answer = send("POST", &url, None, chat("stuck", false)).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["error"]["code"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        send("POST", &url, None, chat("fine", false)).await.status,
        200
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn broken_and_stalled_streams_end_with_an_error_event() {
    let (addr, seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n{}{}{}router_settings: {{num_retries: 0}}\n",
        entry("dropping", "drop", addr, ""),
        entry("silent", "stall-stream", addr, ", stream_timeout: 0.2"),
        entry("fine", "ok", addr, "")
    );
    let proxy = proxy(&yaml).await;
    let url = format!("{}/v1/chat/completions", base(&proxy));

    let broken = send("POST", &url, None, chat("dropping", true)).await;
    let text = String::from_utf8_lossy(&broken.body);
    assert!(
        text.starts_with("data: ") && text.contains("one "),
        "{text}"
    );
    assert!(
        text.contains("\"error\"") && text.contains("stream broken"),
        "{text}"
    );

    let started = Instant::now();
    let stalled = send("POST", &url, None, chat("silent", true)).await;
    let text = String::from_utf8_lossy(&stalled.body);
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The proxy let go of the stalled upstream stream.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(seen.stream_dropped.load(Ordering::SeqCst));

    let fine = send("POST", &url, None, chat("fine", true)).await;
    assert!(String::from_utf8_lossy(&fine.body).ends_with("data: [DONE]\n\n"));
    let failed = metric(&proxy, "berth_llm_requests_total{").await;
    assert!(
        failed
            .iter()
            .any(|l| l.contains("dropping") && l.contains("failed") && l.ends_with(" 1")),
        "{failed:?}"
    );
    proxy.stop().await.unwrap();
}
