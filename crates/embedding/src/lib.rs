//! berth embedding service: sentence embeddings over gRPC and HTTP, the
//! drop-in replacement of seed 000's FastAPI + sentence-transformers service.
//!
//! Models (all-MiniLM-L6-v2 by default) run in ONNX Runtime through
//! fastembed, loaded from the model cache that
//! `scripts/setup-embedding-model.sh` fills. Requests from every API go
//! through one [`service::Embedder`]: limits, an estimate of their cost
//! against the CPU budget ([`cost`]), then the model's
//! [`batcher::Batcher`], which coalesces them into batches on a pool of
//! sessions, one OS thread each.

pub mod batcher;
pub mod config;
pub mod cost;
pub mod error;
pub mod grpc_api;
pub mod http_api;
pub mod metrics;
pub mod model;
pub mod service;

use std::sync::Arc;

use berth_proto::embedding::v1::embedding_server::EmbeddingServer;
use berth_server::{CancellationToken, RunningService, ServiceHost};
use futures::StreamExt;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WatchedStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::{HealthReporter, HealthService};

pub use config::Config;
pub use error::EmbeddingError;

use grpc_api::GrpcApi;
use service::Embedder;

/// The gRPC service name health reports on.
pub const SERVICE_NAME: &str = <EmbeddingServer<GrpcApi> as NamedService>::NAME;

/// Loads the models and serves gRPC and HTTP in the background. A missing
/// optional model leaves the service up but NOT_SERVING; see [`config`].
pub async fn start(config: Config) -> Result<RunningService, EmbeddingError> {
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    let metrics = metrics::Metrics::register(host.registry_mut());
    let embedder = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Embedder::load(&config, &metrics))
            .await
            .map_err(|e| EmbeddingError::Inference(format!("model loading stopped: {e}")))??
    };
    let embedder = Arc::new(embedder);
    // A request over server.max_message_bytes is refused (OUT_OF_RANGE,
    // naming the limit) before it is decoded. Answers are not bounded by
    // it: they are the service's own, at most limits.max_texts vectors.
    host.add_service(
        EmbeddingServer::new(GrpcApi::new(
            embedder.clone(),
            config.limits.stream_window,
            host.shutdown_token(),
        ))
        .max_decoding_message_size(config.server.max_message_bytes),
    );
    let not_serving = embedder.unavailable();
    if not_serving.is_some() {
        hold_not_serving(host.health(), host.shutdown_token()).await;
    }
    let running = host.spawn(Some(http_api::router(
        embedder,
        config.limits.max_http_body_bytes,
    )));
    if let Some(reason) = not_serving {
        tracing::warn!(%reason, "{SERVICE_NAME} is NOT_SERVING");
    }
    Ok(running)
}

/// Keeps the service NOT_SERVING although `ServiceHost::serve` reports every
/// service SERVING as it starts: marks it NOT_SERVING now, and once more
/// right after serve's mark, seen through a health watch taken before serve
/// runs (so that mark cannot be missed). Ends at shutdown.
async fn hold_not_serving(health: HealthReporter, shutdown: CancellationToken) {
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let watch = HealthService::from_health_reporter(health.clone())
        .watch(tonic::Request::new(HealthCheckRequest {
            service: SERVICE_NAME.to_string(),
        }))
        .await;
    let Ok(watch) = watch else { return };
    let mut statuses = watch.into_inner();
    tokio::spawn(async move {
        let serving = async {
            while let Some(Ok(response)) = statuses.next().await {
                if response.status == WatchedStatus::Serving as i32 {
                    return true;
                }
            }
            false
        };
        tokio::select! {
            true = serving => health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await,
            () = shutdown.cancelled() => {}
            else => {}
        }
    });
}
