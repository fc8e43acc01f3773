//! What tracing costs one proxied request, in process and without the
//! noise of sockets and other processes: the spans the proxy makes for a
//! chat completion answered on its first try (the HTTP server span of
//! `traced_http`, the GenAI span, the
//! try's span with its `traceparent` put in the upstream request, the
//! answer's model, id, finish reasons and usage), run through an axum
//! router as the proxy serves them, with tracing off (no exporter, as the
//! proxy runs without one) and on (berth's span layer at ratio 1.0 and
//! 0.01, a discarding exporter behind the export queue: what the export
//! thread then sends over gRPC is `proxy_overhead`'s to measure, end to
//! end). Requests carry no `traceparent`, as `proxy_overhead`'s do not:
//! a sampled caller's would have every span recorded whatever the ratio.
//!
//!     cargo bench -p berth-llm-proxy --bench request_spans
//!
//! `BENCH_ONLY=1.0` (or `off`, `0.01`) runs that way alone, for a profiler.
//! Rounds of each way alternate, and medians are printed: the process's CPU
//! time per request (the export thread's included: on two cores it runs
//! beside the requests or between them, which wall time would tell apart),
//! and the difference to off. `BENCH_EVICT_KB=4096` reads that many
//! bytes, a cache line at a time, before each request, so that each
//! starts with its code and data out of the core's caches, as a request
//! served between socket reads and other processes does (the reading is
//! in every way's figure alike; the differences are what matter).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use berth_llm_proxy::gen_ai::{DeploymentSpans, OperationSpan};
use berth_llm_proxy::litellm_config::{DeploymentConfig, LiteLlmConfig};
use berth_llm_proxy::providers::{Dialect, UpstreamRequest};
use berth_server::ServerConfig;
use berth_server::span_export::{
    Batch, ExportConfig, ExportError, Exporter, SpanCounts, SpanExport,
};
use tower::ServiceExt as _;

/// Requests per round, and rounds of each way.
const REQUESTS: u32 = 20_000;
const ROUNDS: usize = 9;

/// A llama.cpp answer as the proxy receives it.
const ANSWER: &[u8] = br#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"}}],"created":1733400000,"model":"smollm2-q8","system_fingerprint":"b4500","object":"chat.completion","usage":{"completion_tokens":9,"prompt_tokens":12,"total_tokens":21},"id":"chatcmpl-Xq2","timings":{"prompt_n":12,"predicted_n":9}}"#;

/// Encodes the export request as the gRPC exporter does, and sends it
/// nowhere.
struct Discard;

impl Exporter for Discard {
    fn export(&mut self, batch: &Batch) -> Result<(), ExportError> {
        black_box(berth_server::otlp::export_request("bench", batch.encoded()));
        Ok(())
    }
}

fn deployment() -> DeploymentConfig {
    let config = LiteLlmConfig::parse(
        "bench",
        "model_list:\n  - model_name: smollm2\n    litellm_params:\n      model: openai/smollm2-q8\n      api_base: http://127.0.0.1:8081/v1\n",
        &|_| None,
    )
    .expect("the bench's config parses");
    config
        .deployments
        .into_iter()
        .next()
        .expect("one deployment")
}

/// What the proxy does for one whole answer's spans.
fn serve(deployment: &DeploymentSpans) {
    let span = OperationSpan::start("chat", "smollm2");
    let mut upstream = UpstreamRequest {
        uri: "http://127.0.0.1:8081/v1/chat/completions"
            .parse()
            .expect("a URI"),
        headers: HeaderMap::new(),
        body: bytes::Bytes::from_static(b"{}"),
        dialect: Dialect::OpenAi { strip_usage: false },
    };
    let attempt = span.attempt(1, deployment, &mut upstream);
    drop(attempt);
    if let Some(usage) = span.whole_answer(ANSWER) {
        span.usage(&usage, "chat");
    }
    black_box(upstream.headers);
}

/// The process's CPU time so far, every thread's.
fn process_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .expect("the process CPU clock")
}

/// CPU ns per request of `REQUESTS` requests through the router, the
/// export thread's included once it has drained them.
fn round(
    runtime: &tokio::runtime::Runtime,
    router: &axum::Router,
    export: Option<&SpanExport>,
    evicting: &[u8],
) -> f64 {
    let started = process_cpu();
    runtime.block_on(async {
        for _ in 0..REQUESTS {
            evict(evicting);
            let request = Request::post("/v1/chat/completions")
                .body(Body::empty())
                .expect("a request");
            let response = router.clone().oneshot(request).await.expect("infallible");
            assert_eq!(response.status(), StatusCode::OK);
        }
    });
    if let Some(export) = export {
        export.flush().expect("every span exported");
    }
    (process_cpu() - started).as_nanos() as f64 / f64::from(REQUESTS)
}

/// Reads a byte of each cache line of `buffer`.
fn evict(buffer: &[u8]) {
    let mut sum = 0u8;
    for line in buffer.chunks(64) {
        sum = sum.wrapping_add(line[0]);
    }
    black_box(sum);
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let deployment = Arc::new(DeploymentSpans::new(&deployment()));
    let router = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let deployment = deployment.clone();
                async move {
                    serve(&deployment);
                    StatusCode::OK
                }
            }),
        )
        .layer(axum::middleware::from_fn(
            berth_server::trace_context::traced_http,
        ));
    let only = std::env::var("BENCH_ONLY").ok();
    let evict_kb: usize = std::env::var("BENCH_EVICT_KB")
        .ok()
        .map_or(0, |kb| kb.parse().expect("BENCH_EVICT_KB: a number of KiB"));
    let evicting = vec![1u8; evict_kb << 10];
    let ways: Vec<(&str, Option<f64>)> = [
        ("off", None),
        ("ratio 1.0", Some(1.0)),
        ("ratio 0.01", Some(0.01)),
    ]
    .into_iter()
    .filter(|(name, _)| only.as_deref().is_none_or(|only| name.ends_with(only)))
    .collect();
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let counts = SpanCounts::default();
    for round_number in 0..=ROUNDS {
        for (way, (_, ratio)) in ways.iter().enumerate() {
            let config = ServerConfig {
                trace_sample_ratio: ratio.unwrap_or(1.0),
                ..ServerConfig::default()
            };
            let export = ratio.map(|_| {
                // Room for a round's spans: the export thread, on the
                // same cores, may not drain them as fast as they come, and
                // a dropped span would cost less than an exported one.
                let settings = ExportConfig {
                    max_queue_size: 3 * REQUESTS as usize,
                    ..ExportConfig::default()
                };
                Arc::new(
                    SpanExport::start(Discard, &settings, counts.clone())
                        .expect("the export thread starts"),
                )
            });
            let subscriber = berth_server::telemetry::subscriber(&config, export.clone())
                .expect("the subscriber builds");
            let ns = tracing::subscriber::with_default(subscriber, || {
                round(&runtime, &router, export.as_deref(), &evicting)
            });
            if let Some(export) = export {
                export
                    .shutdown(Duration::from_secs(10))
                    .expect("every span exported");
            }
            // The first round warms up.
            if round_number > 0 {
                figures[way].push(ns);
            }
        }
    }
    let off = (ways[0].1.is_none()).then(|| median(figures[0].clone()));
    println!(
        "request spans: {REQUESTS} requests × {ROUNDS} rounds each way, median CPU ns per request"
    );
    for ((name, _), values) in ways.iter().zip(figures) {
        let rounds: Vec<String> = values.iter().map(|ns| format!("{ns:.0}")).collect();
        let median = median(values);
        let versus = off.map_or(String::new(), |off| {
            format!("({:+.0} ns vs off)", median - off)
        });
        println!(
            "{name:>10}: {median:>7.0} ns  {versus}  rounds: {}",
            rounds.join(", ")
        );
    }
    println!(
        "spans exported: {}, dropped: {}",
        counts.exported.get(),
        counts.dropped.get()
    );
}
