//! The service with the real all-MiniLM-L6-v2 model (skipped, saying why,
//! when the setup script has not run): vectors equal to sentence-transformers',
//! the seed's HTTP shapes, OpenAI's, EmbedStream, limits and a full queue.

mod common;

use berth_proto::embedding::v1::{EmbedRequest, ListModelsRequest};
use common::{cosine, grpc, http, with_model};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/reference_vectors.json"
);

/// (text, vector) pairs made by sentence-transformers itself.
fn reference() -> Vec<(String, Vec<f32>)> {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    fixture["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let text = item["text"].as_str().unwrap().to_string();
            let vector = serde_json::from_value(item["vector"].clone()).unwrap();
            (text, vector)
        })
        .collect()
}

fn request(texts: &[&str]) -> EmbedRequest {
    EmbedRequest {
        texts: texts.iter().map(|t| t.to_string()).collect(),
        ..EmbedRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vectors_match_sentence_transformers_batched_one_by_one_and_over_http() {
    let Some(mut config) = with_model() else {
        return;
    };
    config.models.sessions = 2;
    let running = berth_embedding::start(config).await.unwrap();
    let reference = reference();
    let texts: Vec<String> = reference.iter().map(|(t, _)| t.clone()).collect();

    let mut client = grpc(&running).await;
    let batched = client
        .embed(EmbedRequest {
            texts: texts.clone(),
            ..EmbedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batched.model, "all-MiniLM-L6-v2");
    assert_eq!(batched.dimension, 384);
    assert_eq!(batched.embeddings.len(), reference.len());

    // One request per text, all at once (that such requests share batches
    // is asserted in requests_that_arrive_together_share_a_batch).
    let singles = futures::future::join_all(texts.iter().map(|text| {
        let mut client = client.clone();
        async move {
            client
                .embed(request(&[text]))
                .await
                .unwrap()
                .into_inner()
                .embeddings
                .remove(0)
                .values
        }
    }))
    .await;

    let (status, body) = http(
        &running,
        "POST",
        "/embed",
        &serde_json::to_vec(&texts).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seed: Value = serde_json::from_str(&body).unwrap();
    let over_http: Vec<Vec<f32>> = serde_json::from_value(seed["embeddings"].clone()).unwrap();

    for (i, (text, expected)) in reference.iter().enumerate() {
        for (how, got) in [
            ("batched", &batched.embeddings[i].values),
            ("alone", &singles[i]),
            ("HTTP", &over_http[i]),
        ] {
            let similarity = cosine(got, expected);
            assert!(
                similarity >= 0.99999,
                "{how}: text {i} {text:?}: cosine {similarity}"
            );
        }
    }
    // The long text is truncated at 256 tokens, as sentence-transformers does.
    assert!(batched.prompt_tokens <= 256 * reference.len() as u64);
    running.stop().await.unwrap();
}

/// The batch-size histogram on /metrics: (runs, texts) so far.
async fn batch_sizes(running: &berth_server::RunningService) -> (u64, f64) {
    let (status, text) = http(running, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let value = |suffix: &str| {
        let prefix = format!("berth_embedding_batch_texts{suffix}{{model=\"all-MiniLM-L6-v2\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    (value("_count") as u64, value("_sum"))
}

async fn queued_texts(running: &berth_server::RunningService) -> f64 {
    let (_, text) = http(running, "GET", "/metrics", b"").await;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("berth_embedding_queued_texts{model=\"all-MiniLM-L6-v2\"} ")
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_arrive_together_share_a_batch() {
    let Some(mut config) = with_model() else {
        return;
    };
    // One session, so that what arrives while it works waits for it.
    config.models.sessions = 1;
    let max_batch = config.batching.max_batch_size;
    let running = berth_embedding::start(config).await.unwrap();
    let client = grpc(&running).await;
    let before = batch_sizes(&running).await;

    // Keep the session busy: 512 texts, run max_batch_size at a time.
    let big: Vec<String> = (0..512)
        .map(|i| format!("sentence number {i:04} of a request that keeps the session busy"))
        .collect();
    let big_runs = big.len().div_ceil(max_batch) as u64;
    let busy = {
        let mut client = client.clone();
        let texts = big.clone();
        tokio::spawn(async move {
            client
                .embed(EmbedRequest {
                    texts,
                    ..EmbedRequest::default()
                })
                .await
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while queued_texts(&running).await == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the big request never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // 16 requests of one text each, at once, while the session works.
    let singles = futures::future::join_all((0..16).map(|i| {
        let mut client = client.clone();
        async move { client.embed(request(&[&format!("single {i}")])).await }
    }))
    .await;
    for single in singles {
        assert_eq!(single.unwrap().into_inner().embeddings.len(), 1);
    }
    assert_eq!(
        busy.await.unwrap().unwrap().into_inner().embeddings.len(),
        512
    );

    let after = batch_sizes(&running).await;
    let (runs, texts) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(texts, 512.0 + 16.0);
    // Run alone, the 16 would take 16 runs; queued together they share one
    // (two if the session took the first before the others had arrived).
    assert!(
        runs <= big_runs + 2,
        "{runs} runs for {big_runs} pieces of the big request and 16 single texts"
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_names_the_limit() {
    let Some(mut config) = with_model() else {
        return;
    };
    config.limits.max_texts = 3;
    config.limits.max_text_bytes = 10;
    let running = berth_embedding::start(config).await.unwrap();
    let mut client = grpc(&running).await;

    let empty = client.embed(request(&[])).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert!(empty.message().contains("no texts"), "{empty:?}");

    let many = client
        .embed(request(&["a", "b", "c", "d"]))
        .await
        .unwrap_err();
    assert_eq!(many.code(), tonic::Code::InvalidArgument);
    assert!(
        many.message().contains("limit is 3") && many.message().contains("limits.max_texts"),
        "{many:?}"
    );

    let long = client
        .embed(request(&["ok", "much too long"]))
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(
        long.message().contains("text 1 is 13 bytes")
            && long.message().contains("limits.max_text_bytes"),
        "{long:?}"
    );

    let mut unknown = request(&["a"]);
    unknown.model = "gpt-9".into();
    let unknown = client.embed(unknown).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().contains("gpt-9") && unknown.message().contains("all-MiniLM-L6-v2"),
        "{unknown:?}"
    );

    // Names match without regard to case; skip_normalize gives the raw mean.
    let mut raw = request(&["a cat"]);
    raw.model = "ALL-minilm-L6-V2".into();
    raw.skip_normalize = true;
    let raw = client.embed(raw).await.unwrap().into_inner();
    let norm: f32 = raw.embeddings[0]
        .values
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "norm {norm}");

    for (body, reason) in [
        (&b"[\"caf\xe9\"]"[..], "not valid UTF-8"),
        (b"[\"a\",", "invalid JSON"),
        (b"{\"text\": []}", "unknown field `text`"),
        (b"42", "JSON list of texts"),
        (b"[]", "no texts"),
    ] {
        let (status, body) = http(&running, "POST", "/embed", body).await;
        assert_eq!(status, 400, "{body}");
        let detail: Value = serde_json::from_str(&body).unwrap();
        assert!(
            detail["detail"].as_str().unwrap().contains(reason),
            "{body}"
        );
    }
    let (status, body) = http(&running, "POST", "/v1/embeddings", b"{\"input\": [1, 2]}").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("token arrays are not supported"), "{body}");
    let (status, body) = http(
        &running,
        "POST",
        "/v1/embeddings",
        b"{\"input\": \"a\", \"model\": \"x\"}",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_health_openai_list_models_and_stream() {
    let Some(config) = with_model() else { return };
    let running = berth_embedding::start(config).await.unwrap();

    let (status, body) = http(&running, "GET", "/health", b"").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        health,
        serde_json::json!({"status": "healthy", "model": "all-MiniLM-L6-v2"})
    );

    let body = br#"{"input": ["a cat", "a dog"], "model": "all-MiniLM-L6-v2"}"#;
    let (status, floats) = http(&running, "POST", "/v1/embeddings", body).await;
    assert_eq!(status, 200, "{floats}");
    let floats: Value = serde_json::from_str(&floats).unwrap();
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["data"][1]["index"], 1);
    assert_eq!(floats["data"][1]["object"], "embedding");
    assert_eq!(floats["usage"]["prompt_tokens"], 8);
    let dog: Vec<f32> = serde_json::from_value(floats["data"][1]["embedding"].clone()).unwrap();
    assert_eq!(dog.len(), 384);

    let body = br#"{"input": "a dog", "model": "all-MiniLM-L6-v2", "encoding_format": "base64"}"#;
    let (status, encoded) = http(&running, "POST", "/v1/embeddings", body).await;
    assert_eq!(status, 200, "{encoded}");
    let encoded: Value = serde_json::from_str(&encoded).unwrap();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(cosine(&decoded, &dog) > 0.999999);

    let mut client = grpc(&running).await;
    let models = client
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(
        (
            models[0].name.as_str(),
            models[0].dimension,
            models[0].max_tokens,
            models[0].default,
            models[0].available
        ),
        ("all-MiniLM-L6-v2", 384, 256, true, true)
    );

    // A stream of 20 requests is answered in order, one response each.
    let requests: Vec<EmbedRequest> = (0..20)
        .map(|i| request(&[&format!("text number {i}"), "a dog"]))
        .collect();
    let mut responses = client
        .embed_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(response) = responses.message().await.unwrap() {
        assert_eq!(response.embeddings.len(), 2);
        assert!(cosine(&response.embeddings[1].values, &dog) > 0.99999);
        let alone = client
            .embed(request(&[&format!("text number {count}")]))
            .await
            .unwrap()
            .into_inner();
        assert!(cosine(&response.embeddings[0].values, &alone.embeddings[0].values) > 0.99999);
        count += 1;
    }
    assert_eq!(count, 20);

    // A bad request ends the stream with its status.
    let mixed = vec![
        request(&["fine"]),
        request(&[]),
        request(&["never answered"]),
    ];
    let mut responses = client
        .embed_stream(tokio_stream::iter(mixed))
        .await
        .unwrap()
        .into_inner();
    assert!(responses.message().await.unwrap().is_some());
    let error = responses.message().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_resource_exhausted_and_429() {
    let Some(mut config) = with_model() else {
        return;
    };
    config.limits.max_texts = 8;
    config.batching.max_queued_texts = 8;
    config.batching.max_batch_size = 8;
    let running = berth_embedding::start(config).await.unwrap();
    let client = grpc(&running).await;
    let long = "a sentence long enough to take the session a little while to read. ".repeat(8);
    let texts: Vec<String> = vec![long; 8];
    let results = futures::future::join_all((0..12).map(|_| {
        let mut client = client.clone();
        let texts = texts.clone();
        async move {
            client
                .embed(EmbedRequest {
                    texts,
                    ..EmbedRequest::default()
                })
                .await
        }
    }))
    .await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !refused.is_empty(),
        "12 requests of 8 texts fit a queue of 8"
    );
    assert!(results.iter().any(|r| r.is_ok()));
    for status in refused {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("batching.max_queued_texts"),
            "{status:?}"
        );
    }

    let body = serde_json::to_vec(&texts).unwrap();
    let statuses =
        futures::future::join_all((0..12).map(|_| http(&running, "POST", "/embed", &body))).await;
    assert!(
        statuses.iter().any(|(status, _)| *status == 429),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|(status, _)| *status == 429 || *status == 200)
    );
    running.stop().await.unwrap();
}
