//! Without model files the service still starts: it reports
//! berth.embedding.v1.Embedding NOT_SERVING (the server itself SERVING) and
//! answers UNAVAILABLE naming the missing file; a model the config lists by
//! name must load, or the start fails naming it.

mod common;

use berth_embedding::SERVICE_NAME;
use berth_embedding::config::ModelSpec;
use berth_proto::embedding::v1::{EmbedRequest, ListModelsRequest};
use common::{config, grpc, http};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread")]
async fn missing_default_model_leaves_the_service_up_but_not_serving() {
    let cache = tempfile::tempdir().unwrap();
    let mut config = config();
    config.models.cache_dir = cache.path().to_str().unwrap().into();
    let running = berth_embedding::start(config).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(running.grpc_uri())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let status = |service: &str| {
        let mut health = health.clone();
        let service = service.to_string();
        async move {
            health
                .check(HealthCheckRequest { service })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    // serve() marks every service SERVING as it starts; the mark is undone
    // right after, so allow it a moment.
    let mut embedding = status(SERVICE_NAME).await;
    for _ in 0..50 {
        if embedding == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        embedding = status(SERVICE_NAME).await;
    }
    assert_eq!(embedding, ServingStatus::NotServing as i32);
    assert_eq!(status("").await, ServingStatus::Serving as i32);

    let mut client = grpc(&running).await;
    let error = client
        .embed(EmbedRequest {
            texts: vec!["a".into()],
            ..EmbedRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(error.message().contains("is missing"), "{error:?}");
    assert!(
        error.message().contains("setup-embedding-model.sh"),
        "{error:?}"
    );

    let models = client
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(!models[0].available);
    assert!(models[0].unavailable_reason.contains("is missing"));

    let (status, body) = http(&running, "GET", "/health", b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"unavailable\""), "{body}");
    let (status, body) = http(&running, "POST", "/embed", b"[\"a\"]").await;
    assert_eq!(status, 503, "{body}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_model_that_is_missing_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config();
    config.models.cache_dir = dir.path().to_str().unwrap().into();
    config.models.list = vec![ModelSpec {
        name: "mine".into(),
        dir: dir.path().join("mine").to_str().unwrap().into(),
        ..ModelSpec::default()
    }];
    let error = berth_embedding::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("is missing"), "{error}");
    assert!(error.contains(dir.path().to_str().unwrap()), "{error}");
}
