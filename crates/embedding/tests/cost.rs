//! A request's cost estimated before it is queued (`cost.rs`), with the real
//! all-MiniLM-L6-v2 model (skipped, saying why, when the setup script has not
//! run): the bounds and counts against the tokens the model reads, and a
//! request over `server.request_cpu_budget` refused at once, whichever step
//! decides, while one within it is served.

mod common;

use std::time::{Duration, Instant};

use berth_embedding::config::DEFAULT_MODEL;
use berth_embedding::cost::{self, Bounds};
use berth_embedding::model::{self, ModelFiles};
use berth_proto::embedding::v1::EmbedRequest;
use berth_server::RunningService;
use common::{grpc, http, with_model};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/reference_vectors.json"
);

const MAX_TOKENS: usize = 256;

/// The fixture's texts (empty, whitespace, 300 words, CJK, accents,
/// emoji…) and texts made to tell the bounds apart from the count.
fn texts() -> Vec<String> {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let mut texts: Vec<String> = fixture["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["text"].as_str().unwrap().to_string())
        .collect();
    texts.extend([
        // One word of many pieces, then past the longest word WordPiece reads.
        "abcdefghij".repeat(9),
        "abcdefghij".repeat(11),
        // Punctuation: a token each, no word between.
        "a,".repeat(300),
        // Spaces and newlines: no tokens.
        format!("a{}", " ".repeat(10_000)),
        "\n".repeat(1000),
        // Longer than the tokenizer is given.
        "the quick brown fox jumps over the lazy dog ".repeat(2000),
        "한국어 문장입니다 ".repeat(100),
        "\u{0301}\u{200b}\u{0}x".repeat(50),
    ]);
    texts
}

#[test]
fn bounds_and_counts_hold_against_what_the_model_reads() {
    let Some(config) = with_model() else {
        return;
    };
    model::load_runtime(&config.models.ort_library()).unwrap();
    let files = ModelFiles::read(&config.models.sources()[0]).unwrap();
    let (mut session, _) = files.session(1).unwrap();
    let tokenizer = session.tokenizer().clone();
    for text in texts() {
        let read = u64::from(session.embed(&[text.as_str()]).unwrap()[0].tokens);
        let bounds = Bounds::of(&text, MAX_TOKENS);
        let counted = cost::count_tokens(&tokenizer, &text, MAX_TOKENS);
        let shown: String = text.chars().take(40).collect();
        assert!(
            bounds.low <= read && read <= bounds.high,
            "{shown:?}: {bounds:?}, the model read {read}"
        );
        // Exact, but for a long text without max_tokens tokens in what is
        // tokenized, which counts as its upper bound.
        assert!(
            counted == read || counted == bounds.high,
            "{shown:?}: counted {counted}, the model read {read}, {bounds:?}"
        );
    }
}

/// The measured tokens per second of the default model, from /metrics.
async fn tokens_per_second(running: &RunningService) -> f64 {
    let (_, metrics) = http(running, "GET", "/metrics", b"").await;
    let prefix = format!(
        "{}{{model=\"{DEFAULT_MODEL}\"}} ",
        berth_embedding::metrics::TOKENS_PER_SECOND
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
        .parse()
        .unwrap()
}

fn request(texts: Vec<String>) -> EmbedRequest {
    EmbedRequest {
        texts,
        ..EmbedRequest::default()
    }
}

/// Asserts a refusal naming the budget, answered in well under a second.
fn assert_refused(answer: Result<tonic::Response<impl Sized>, tonic::Status>, took: Duration) {
    let status = answer.err().expect("refused");
    println!("refused in {took:?}: {}", status.message());
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("server.request_cpu_budget"),
        "{status:?}"
    );
    assert_eq!(
        berth_server::error_reason(&status),
        Some(berth_server::error::reasons::REQUEST_BUDGET_EXCEEDED)
    );
    assert!(took < Duration::from_millis(500), "refused after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_the_cpu_budget_is_refused_before_it_is_queued() {
    let Some(mut config) = with_model() else {
        return;
    };
    let budget = Duration::from_millis(200);
    config.server.request_cpu_budget = budget;
    let running = berth_embedding::start(config).await.unwrap();
    let mut client = grpc(&running).await;
    let rate = tokens_per_second(&running).await;
    assert!(rate > 0.0);
    // Tokens a request may hold.
    let allowance = cost::allowance(budget, rate) as usize;
    println!("{rate:.0} tokens/s measured at load: {allowance} tokens in {budget:?}");

    // Decided by the words alone: 2048 texts of 190 words or more.
    let prose = "the quick brown fox jumps over the lazy dog ".repeat(22);
    let started = Instant::now();
    let answer = client.embed(request(vec![prose; 2048])).await;
    assert_refused(answer, started.elapsed());

    // Decided by counting: a word of 90 letters is at least one token and
    // at most 92, and WordPiece makes ~30 of it; the words alone fit in
    // half the allowance.
    let word = "abcdefghij".repeat(9);
    let texts = vec![word; (allowance / 6).max(1)];
    assert_eq!(
        cost::judge_by_bounds(
            &texts
                .iter()
                .map(|t| Bounds::of(t, MAX_TOKENS))
                .collect::<Vec<_>>(),
            allowance as u64
        ),
        cost::Verdict::Undecided
    );
    let started = Instant::now();
    let answer = client.embed(request(texts)).await;
    assert_refused(answer, started.elapsed());
    // The same over HTTP: 429, naming the budget.
    let body = serde_json::to_vec(&vec!["abcdefghij".repeat(9); (allowance / 6).max(1)]).unwrap();
    let (status, answer) = http(&running, "POST", "/embed", &body).await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("server.request_cpu_budget"), "{answer}");

    // Accepted by counting: spaces make its upper bound ten times the
    // allowance, but it reads three tokens a text.
    let sparse = format!("a{}", " ".repeat(97));
    let texts = vec![sparse; (allowance / 10).max(1)];
    let answer = client.embed(request(texts)).await.unwrap().into_inner();
    assert_eq!(answer.embeddings.len(), (allowance / 10).max(1));

    // And a small request, as ever.
    let answer = client
        .embed(request(vec!["a cat".into()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.embeddings.len(), 1);
    running.stop().await.unwrap();
}
