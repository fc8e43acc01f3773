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
pub const RUNTIME_ALIVE_TASKS: &str = "berth_runtime_alive_tasks";
/// Counters of what became of ended spans (crate::span_export); the
/// exposition adds `_total`.
pub const TRACE_SPANS_DROPPED: &str = "berth_trace_spans_dropped";
pub const TRACE_SPANS_EXPORTED: &str = "berth_trace_spans_exported";
pub const TRACE_SPANS_EXPORT_FAILED: &str = "berth_trace_spans_export_failed";

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

/// Tasks alive on the service's tokio runtimes (the shared one and those of
/// the HTTP port's threads), read at each scrape: a request that leaves a
/// task behind (a stream nobody reads, a timer never dropped) shows as a
/// count that does not return to its idle level.
#[derive(Debug, Clone, Default)]
pub struct RuntimeTasks(Arc<std::sync::Mutex<Vec<tokio::runtime::Handle>>>);

impl RuntimeTasks {
    /// Registers the gauge, counting the runtime this is called on, if any.
    pub fn register(registry: &mut Registry) -> Self {
        let tasks = Self::default();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tasks.count(handle);
        }
        registry.register_collector(Box::new(tasks.clone()));
        tasks
    }

    /// Counts the tasks of one more runtime too.
    pub fn count(&self, runtime: tokio::runtime::Handle) {
        self.runtimes().push(runtime);
    }

    fn runtimes(&self) -> std::sync::MutexGuard<'_, Vec<tokio::runtime::Handle>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl prometheus_client::collector::Collector for RuntimeTasks {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let alive: usize = self
            .runtimes()
            .iter()
            .map(|runtime| runtime.metrics().num_alive_tasks())
            .sum();
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(alive).unwrap_or(i64::MAX),
        );
        let metric = encoder.encode_descriptor(
            RUNTIME_ALIVE_TASKS,
            "Tasks alive on the service's tokio runtimes",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn alive_tasks(registry: &Registry) -> i64 {
        let text = render(registry);
        let line = text
            .lines()
            .find(|line| line.starts_with(RUNTIME_ALIVE_TASKS))
            .unwrap_or_else(|| panic!("no {RUNTIME_ALIVE_TASKS} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn the_alive_task_gauge_follows_the_runtime() {
        let mut registry = Registry::default();
        RuntimeTasks::register(&mut registry);
        let idle = alive_tasks(&registry);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move { stopped.await.ok() });
        assert_eq!(alive_tasks(&registry), idle + 1);
        stop.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(alive_tasks(&registry), idle);
    }
}
