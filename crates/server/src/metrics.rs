//! Prometheus metrics: the registry each service adds its own metrics to,
//! the per-call gRPC metrics every service gets, and the `/metrics` handler.
//! Metric names are constants here and in each service's `metrics` module.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub const GRPC_REQUESTS: &str = "berth_grpc_requests";
pub const GRPC_REQUEST_SECONDS: &str = "berth_grpc_request_seconds";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodStatusLabels {
    pub method: String,
    pub code: String,
}

/// Per-call gRPC metrics shared by every service.
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    requests: Family<MethodStatusLabels, Counter>,
    seconds: Family<MethodLabels, Histogram>,
}

impl GrpcMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<MethodStatusLabels, Counter>::default();
        let seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 10))
        });
        registry.register(
            GRPC_REQUESTS,
            "gRPC calls by method and status code",
            requests.clone(),
        );
        registry.register(
            GRPC_REQUEST_SECONDS,
            "Time to the response headers of gRPC calls",
            seconds.clone(),
        );
        Self { requests, seconds }
    }
}

/// Tower layer recording [`GrpcMetrics`] for each call.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer(pub GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map(|code| tonic::Code::from_bytes(code.as_bytes()))
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Internal,
            };
            metrics
                .seconds
                .get_or_create(&MethodLabels {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            metrics
                .requests
                .get_or_create(&MethodStatusLabels {
                    method,
                    code: format!("{code:?}"),
                })
                .inc();
            result
        })
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// The `/metrics` route for an axum router.
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    )
}
