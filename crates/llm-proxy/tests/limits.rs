//! Limits that hold: a key's budget, and its budget for one model, across
//! fallbacks, retries and requests in flight; spend that survives `kill -9` of the real binary; usage- and
//! cost-based routing, each upstream a real HTTP server that counts what
//! reaches it.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::future::join_all;
use serde_json::json;

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

async fn spend(base: &str, id: &str) -> f64 {
    let listed = send(
        "GET",
        &format!("{base}/key/list"),
        Some("sk-master"),
        Bytes::new(),
    )
    .await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    listed.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id)
        .unwrap_or_else(|| panic!("no key {id}"))["spend"]
        .as_f64()
        .unwrap()
}

fn ask(model: &str, max_tokens: u64, stream: bool) -> String {
    json!({"model": model, "stream": stream, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

/// `cheap` fails at its upstream and falls back to `dear`, whose answers
/// (the fake's 5 completion tokens at $0.02) cost $0.10: twice what the
/// key may spend. Without the budget's check before each attempt, the
/// fallback reaches `dear` and spends it, as the master key's request shows.
#[tokio::test]
async fn a_fallback_the_budget_cannot_afford_is_not_sent() {
    let (failing, failing_seen) = fake_upstream().await;
    let (dear, dear_seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n\
         \x20 - model_name: cheap\n    litellm_params: {{model: openai/fail, api_base: http://{failing}/v1, output_cost_per_token: 0.0001}}\n\
         \x20 - model_name: dear\n    litellm_params: {{model: openai/ok, api_base: http://{dear}/v1, output_cost_per_token: 0.02}}\n\
         router_settings: {{num_retries: 1, retry_after: 0, fallbacks: [{{cheap: [dear]}}]}}\n\
         general_settings: {{master_key: sk-master}}\n"
    );
    let proxy = proxy(&yaml).await;
    let base = base(&proxy);
    let url = format!("{base}/v1/chat/completions");
    let (secret, id) = create_key(&base, json!({"max_budget": 0.05})).await;

    // At most 100 tokens of `dear`'s answer: up to $2, more than the $0.05 left.
    let refused = send("POST", &url, Some(&secret), ask("cheap", 100, false)).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "budget_exceeded", "{error}");
    assert_eq!(error["param"], "max_tokens", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("dear#1") && message.contains("$2.000000"),
        "{message}"
    );
    assert_eq!(
        failing_seen.hits.load(Ordering::SeqCst),
        2,
        "cheap: first try and one retry"
    );
    assert_eq!(
        dear_seen.hits.load(Ordering::SeqCst),
        0,
        "the fallback was sent"
    );
    assert_eq!(spend(&base, &id).await, 0.0);

    // Unbounded (no max_tokens) and under the budget: sent, as it may be
    // the only request of the key in flight.
    let unbounded = json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]});
    let served = send("POST", &url, Some(&secret), unbounded.to_string()).await;
    assert_eq!(served.status, 200, "{:?}", served.body);
    assert_eq!(dear_seen.hits.load(Ordering::SeqCst), 1);
    assert!((spend(&base, &id).await - 0.1).abs() < 1e-9);
    // Now spent: nothing more is sent anywhere.
    let before = failing_seen.hits.load(Ordering::SeqCst);
    let refused = send("POST", &url, Some(&secret), ask("cheap", 1, false)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(failing_seen.hits.load(Ordering::SeqCst), before);

    // The master key has no budget: the same request falls back and spends.
    let master = send("POST", &url, Some("sk-master"), ask("cheap", 100, false)).await;
    assert_eq!(master.status, 200, "{:?}", master.body);
    assert_eq!(dear_seen.hits.load(Ordering::SeqCst), 2);
    proxy.stop().await.unwrap();
}

/// A deployment's own budget (`litellm_params.max_budget` per
/// `budget_duration`, LiteLLM's model budgets), whoever's key asks: the
/// fake's answers cost $0.10 at `dear`, whose budget is $0.25 a day. Two
/// answers fit; a third whose worst case does not fit goes to the other
/// deployment of the group; once both budgets are spent, nothing is sent
/// and the client is told which budget and when to retry.
#[tokio::test]
async fn a_deployment_s_own_budget_is_never_passed() {
    let (dear, dear_seen) = fake_upstream().await;
    let (spare, spare_seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n\
         \x20 - model_name: m\n    litellm_params: {{model: openai/ok, api_base: http://{dear}/v1, output_cost_per_token: 0.02, max_budget: 0.25, budget_duration: 1d}}\n    model_info: {{id: dear}}\n\
         \x20 - model_name: m\n    litellm_params: {{model: openai/ok, api_base: http://{spare}/v1, output_cost_per_token: 0.02, max_budget: 0.1}}\n    model_info: {{id: spare}}\n\
         router_settings: {{routing_strategy: least-busy, num_retries: 1, retry_after: 0}}\n\
         general_settings: {{master_key: sk-master}}\n"
    );
    let proxy = proxy(&yaml).await;
    let base = base(&proxy);
    let url = format!("{base}/v1/chat/completions");
    // Worst case 5 tokens × $0.02 = $0.10, as the fake answers.
    let mut served = 0;
    for _ in 0..3 {
        let answer = send("POST", &url, Some("sk-master"), ask("m", 5, false)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        served += 1;
    }
    let (at_dear, at_spare) = (
        dear_seen.hits.load(Ordering::SeqCst),
        spare_seen.hits.load(Ordering::SeqCst),
    );
    assert_eq!((served, at_dear + at_spare), (3, 3));
    assert!(
        at_dear <= 2 && at_spare <= 1,
        "dear {at_dear}, spare {at_spare}"
    );
    // $0.05 left at dear (if it took two), nothing at spare: a fourth
    // request, worst case $0.10, fits nowhere.
    let refused = send("POST", &url, Some("sk-master"), ask("m", 5, false)).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "budget_exceeded", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("max_budget"), "{message}");
    assert_eq!(
        dear_seen.hits.load(Ordering::SeqCst) + spare_seen.hits.load(Ordering::SeqCst),
        3,
        "nothing more was sent"
    );
    proxy.stop().await.unwrap();
}

/// A key's budget for one model (LiteLLM's `model_max_budget`) holds
/// across fallbacks and requests in flight: `first` always fails and falls
/// back to `second`, whose answers cost $0.10; the key may spend $0.25 on
/// `second` (and has no budget of its own). Ten streams at once: two
/// reserve their worst case on `second` and are sent, the others are not,
/// and the model's budget is never passed; a third request later fits
/// nowhere either, and nothing more reaches `second`'s upstream.
#[tokio::test]
async fn a_key_s_model_budget_holds_across_fallbacks() {
    let (first, first_seen) = fake_upstream().await;
    let (second, second_seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n\
         \x20 - model_name: first\n    litellm_params: {{model: openai/fail, api_base: http://{first}/v1, output_cost_per_token: 0.02}}\n\
         \x20 - model_name: second\n    litellm_params: {{model: openai/ok, api_base: http://{second}/v1, output_cost_per_token: 0.02}}\n\
         router_settings: {{num_retries: 0, allowed_fails: 1000, fallbacks: [{{first: [second]}}]}}\n\
         general_settings: {{master_key: sk-master}}\n"
    );
    let proxy = proxy(&yaml).await;
    let base = base(&proxy);
    let url = format!("{base}/v1/chat/completions");
    let (secret, id) = create_key(
        &base,
        json!({"model_max_budget": {"second": {"budget_limit": "0.25", "time_period": "1d"}}}),
    )
    .await;

    let answers =
        join_all((0..10).map(|_| send("POST", &url, Some(&secret), ask("first", 5, true)))).await;
    let served = answers.iter().filter(|a| a.status == 200).count();
    for refused in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.status, 429, "{:?}", refused.body);
        let error = refused.json()["error"].clone();
        assert_eq!(error["type"], "budget_exceeded", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("model_max_budget for `second`"),
            "{error}"
        );
    }
    assert_eq!(served, 2, "{answers:?}");
    assert_eq!(second_seen.hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        first_seen.hits.load(Ordering::SeqCst),
        10,
        "every request tried `first`"
    );
    let spent = spend(&base, &id).await;
    assert!((spent - 0.2).abs() < 1e-9, "{spent}");
    // $0.05 left on `second`: a request asking for it directly is refused
    // too, before anything is sent, and told when to retry.
    let refused = send("POST", &url, Some(&secret), ask("second", 5, false)).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(second_seen.hits.load(Ordering::SeqCst), 2);
    // The master key has no model budget: the same request is served.
    let served = send("POST", &url, Some("sk-master"), ask("second", 5, false)).await;
    assert_eq!(served.status, 200, "{:?}", served.body);
    proxy.stop().await.unwrap();
}

/// Ten streams at once, each able to cost $0.10, on a key with $0.35: three
/// reserve their worst case and are sent, the others are told to retry,
/// and the key never spends past its budget.
#[tokio::test]
async fn requests_in_flight_cannot_spend_past_the_budget_together() {
    let (dear, dear_seen) = fake_upstream().await;
    let yaml = format!(
        "model_list:\n\
         \x20 - model_name: dear\n    litellm_params: {{model: openai/ok, api_base: http://{dear}/v1, output_cost_per_token: 0.02}}\n\
         general_settings: {{master_key: sk-master}}\n"
    );
    let proxy = proxy(&yaml).await;
    let base = base(&proxy);
    let url = format!("{base}/v1/chat/completions");
    let (secret, id) = create_key(&base, json!({"max_budget": 0.35})).await;

    // Streams take 100 ms upstream: all ten are in flight together.
    let answers =
        join_all((0..10).map(|_| send("POST", &url, Some(&secret), ask("dear", 5, true)))).await;
    let served = answers.iter().filter(|a| a.status == 200).count();
    for refused in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.status, 429, "{:?}", refused.body);
        let error = refused.json()["error"].clone();
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("reserved by its requests in flight"),
            "{error}"
        );
    }
    assert_eq!(served, 3, "{answers:?}");
    assert_eq!(dear_seen.hits.load(Ordering::SeqCst), served);
    let spent = spend(&base, &id).await;
    assert!((spent - 0.3).abs() < 1e-9, "{spent}");
    // What is left ($0.05) affords no more of these.
    let refused = send("POST", &url, Some(&secret), ask("dear", 5, false)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(dear_seen.hits.load(Ordering::SeqCst), served);
    proxy.stop().await.unwrap();
}

/// Two deployments of one model, each its own upstream: cost-based routing
/// sends everything to the cheaper one; usage-based routing sends each
/// request to the one with fewer tokens used this minute, so sequential
/// requests alternate.
#[tokio::test]
async fn usage_and_cost_based_routing_end_to_end() {
    for (strategy, expected) in [
        ("cost-based-routing", (0, 10)),
        ("usage-based-routing-v2", (5, 5)),
    ] {
        let (a, a_seen) = fake_upstream().await;
        let (b, b_seen) = fake_upstream().await;
        let yaml = format!(
            "model_list:\n\
             \x20 - model_name: m\n    litellm_params: {{model: openai/ok, api_base: http://{a}/v1, input_cost_per_token: 0.00001, output_cost_per_token: 0.00003}}\n\
             \x20 - model_name: m\n    litellm_params: {{model: openai/ok, api_base: http://{b}/v1}}\n    model_info: {{input_cost_per_token: 0.000001, output_cost_per_token: 0.00002}}\n\
             router_settings: {{routing_strategy: {strategy}}}\n"
        );
        let proxy = proxy(&yaml).await;
        let url = format!("{}/v1/chat/completions", base(&proxy));
        for _ in 0..10 {
            let answer = send("POST", &url, None, chat("m", false)).await;
            assert_eq!(answer.status, 200, "{:?}", answer.body);
        }
        let hits = (
            a_seen.hits.load(Ordering::SeqCst),
            b_seen.hits.load(Ordering::SeqCst),
        );
        assert_eq!(hits, expected, "{strategy}");
        proxy.stop().await.unwrap();
    }
}

/// The real binary, started on free ports with `--set` overrides; killed
/// (SIGKILL) when dropped, a failed test's too.
struct Binary {
    child: Child,
    http: SocketAddr,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_binary(sets: &[String]) -> Binary {
    let http = free_port();
    let grpc = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_berth-llm-proxy"));
    command
        .args([
            "--listen",
            &grpc.to_string(),
            "--http-listen",
            &http.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for set in sets {
        command.args(["--set", set]);
    }
    let child = command.spawn().expect("starting berth-llm-proxy");
    let mut binary = Binary { child, http };
    let deadline = Instant::now() + Duration::from_secs(30);
    // Listening once a connection is taken (the port is bound before serving).
    while tokio::net::TcpStream::connect(http).await.is_err() {
        if let Some(status) = binary.child.try_wait().unwrap() {
            panic!("berth-llm-proxy exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "berth-llm-proxy did not start within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    binary
}

/// Spend recorded before an answer ends survives `kill -9`: the key store
/// is rewritten only every hour here, so what comes back after the restart
/// is the spend journal's.
#[tokio::test]
async fn spend_survives_kill_9_of_the_binary() {
    let (addr, _) = fake_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("config.yaml");
    std::fs::write(
        &litellm,
        format!(
            "model_list:\n  - model_name: chat\n    litellm_params: {{model: openai/ok, api_base: http://{addr}/v1, input_cost_per_token: 0.001, output_cost_per_token: 0.002}}\n\
             general_settings: {{master_key: sk-master}}\n"
        ),
    )
    .unwrap();
    let sets = [
        format!("proxy.litellm_config={}", litellm.display()),
        format!("proxy.keys_path={}", dir.path().join("keys.json").display()),
        "proxy.keys_flush_interval=1h".to_string(),
    ];
    let proxy = start_binary(&sets).await;
    let base = format!("http://{}", proxy.http);
    let (secret, id) = create_key(&base, json!({"key_alias": "durable"})).await;
    let url = format!("{base}/v1/chat/completions");
    // 3 × $0.001 + 5 × $0.002 = $0.013 a request, streams and not.
    for stream in [false, true, false, true, false] {
        let answer = send("POST", &url, Some(&secret), chat("chat", stream)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert!((spend(&base, &id).await - 0.065).abs() < 1e-9);
    drop(proxy); // SIGKILL

    let restarted = start_binary(&sets).await;
    let base = format!("http://{}", restarted.http);
    let spent = spend(&base, &id).await;
    assert!((spent - 0.065).abs() < 1e-9, "spend after kill -9: {spent}");
    // And it goes on from there.
    let url = format!("{base}/v1/chat/completions");
    assert_eq!(
        send("POST", &url, Some(&secret), chat("chat", false))
            .await
            .status,
        200
    );
    assert!((spend(&base, &id).await - 0.078).abs() < 1e-9);
    drop(restarted);
}
