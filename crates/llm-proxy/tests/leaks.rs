//! Nothing outlives its request: after rounds of abandoned streams, requests
//! abandoned before their answer, finished streams and many whole requests,
//! the in-flight gauge is back at 0 and the process's live tasks, open file
//! descriptors (connections) and RSS are where they were after the first
//! round, within small bounds.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use http_body_util::BodyExt;

/// What the process holds once a round has settled.
#[derive(Debug, Clone, Copy)]
struct Held {
    tasks: usize,
    fds: usize,
    rss_kb: u64,
}

/// What the process holds; its live tasks are those of every runtime of
/// the proxy (the test's and the HTTP port's threads'), from `/metrics`.
async fn held(proxy: &berth_server::RunningService) -> Held {
    let tasks = metric(proxy, "berth_runtime_alive_tasks ").await;
    let tasks = tasks
        .first()
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no berth_runtime_alive_tasks on /metrics: {tasks:?}"));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    Held {
        tasks,
        fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
        rss_kb,
    }
}

async fn in_flight(proxy: &berth_server::RunningService) -> String {
    metric(proxy, "berth_llm_requests_in_flight ")
        .await
        .join(",")
}

/// One round of traffic; each kind runs with some concurrency.
async fn round(url: &str) {
    // Streams abandoned after their first chunk, the upstream still open.
    for _ in 0..10 {
        join_all((0..20).map(|_| async {
            let response = start("POST", url, None, chat("slow", true)).await;
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
        }))
        .await;
    }
    // Requests abandoned before any answer.
    join_all((0..20).map(|_| async {
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            send("POST", url, None, chat("stall", false)),
        )
        .await;
    }))
    .await;
    // Streams read to their end, and many whole requests.
    let streams = join_all((0..30).map(|_| send("POST", url, None, chat("ok", true))));
    let wholes = async {
        for _ in 0..10 {
            for answer in
                join_all((0..50).map(|_| send("POST", url, None, chat("ok", false)))).await
            {
                assert_eq!(answer.status, 200, "{:?}", answer.body);
            }
        }
    };
    let (streams, ()) = tokio::join!(streams, wholes);
    assert!(streams.iter().all(|a| a.status == 200));
}

/// Waits until no request is in flight and connections have wound down.
async fn settle(proxy: &berth_server::RunningService) -> Held {
    for _ in 0..100 {
        if in_flight(proxy).await == "berth_llm_requests_in_flight 0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_flight(proxy).await, "berth_llm_requests_in_flight 0");
    // Longer than the pool's idle timeout below: idle upstream connections close.
    tokio::time::sleep(Duration::from_millis(700)).await;
    held(proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_and_many_requests_leave_nothing_behind() {
    let (addr, _) = fake_upstream().await;
    let mut yaml = String::from("model_list:\n");
    for (name, upstream) in [("slow", "stall-stream"), ("stall", "stall"), ("ok", "ok")] {
        yaml.push_str(&format!(
            "  - model_name: {name}\n    litellm_params: {{model: openai/{upstream}, api_base: http://{addr}/v1}}\n"
        ));
    }
    let proxy = proxy_with(&yaml, |c| {
        c.proxy.pool_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let url = format!("{}/v1/chat/completions", base(&proxy));

    round(&url).await;
    let first = settle(&proxy).await;
    for _ in 0..3 {
        round(&url).await;
    }
    let last = settle(&proxy).await;
    assert!(last.tasks <= first.tasks + 2, "tasks: {first:?} → {last:?}");
    assert!(
        last.fds <= first.fds + 4,
        "file descriptors: {first:?} → {last:?}"
    );
    assert!(
        last.rss_kb <= first.rss_kb + 16 * 1024,
        "RSS grew by more than 16 MB: {first:?} → {last:?}"
    );
    eprintln!("after the first round: {first:?}; after four: {last:?}");
    // Every abandoned request is counted, those abandoned before any answer too.
    let requests = metric(&proxy, "berth_llm_requests_total{").await;
    for (model, count) in [("slow", 800), ("stall", 80)] {
        let line =
            format!("berth_llm_requests_total{{model=\"{model}\",outcome=\"abandoned\"}} {count}");
        assert!(requests.contains(&line), "{requests:?}");
    }
    proxy.stop().await.unwrap();
}
