//! The gRPC server every berth service runs: reflection (v1 and v1alpha),
//! grpc.health.v1, tower layers (trace, metrics, concurrency limit, timeout),
//! an HTTP port for `/metrics` and the service's own routes, and graceful
//! shutdown that drains in-flight calls for up to `shutdown_grace`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::config::ServerConfig;
use crate::listen::{GrpcListener, ListenAddr, ListenError};
use crate::metrics::{GrpcMetrics, GrpcMetricsLayer};
use crate::unix_authority::AnyAuthority;

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server on {addr}: {source}")]
    Transport {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("HTTP server on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A service's listeners, health reporter, metrics registry and shutdown
/// token, bound and ready to serve the gRPC services added to it.
pub struct ServiceHost {
    config: ServerConfig,
    grpc: GrpcListener,
    http: Option<TcpListener>,
    health: HealthReporter,
    registry: Registry,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    shutdown: CancellationToken,
}

impl ServiceHost {
    /// Binds the gRPC and HTTP listeners; a port in use fails here, naming it.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        let grpc_addr = ListenAddr::parse("server.listen", &config.listen)?;
        let grpc = GrpcListener::bind("server.listen", &grpc_addr).await?;
        let http = if config.http_listen.is_empty() {
            None
        } else {
            let addr = match ListenAddr::parse("server.http_listen", &config.http_listen)? {
                ListenAddr::Tcp(addr) => addr,
                ListenAddr::Unix(_) => {
                    return Err(ListenError::BadAddress {
                        field: "server.http_listen".into(),
                        value: config.http_listen.clone(),
                        reason: "the HTTP port must be HOST:PORT".into(),
                    }
                    .into());
                }
            };
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ListenError::Bind {
                    field: "server.http_listen".into(),
                    addr: addr.to_string(),
                    source,
                })?;
            Some(listener)
        };
        let (health, _) = tonic_health::server::health_reporter();
        Ok(Self {
            config,
            grpc,
            http,
            health,
            registry: Registry::default(),
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn grpc_addr(&self) -> ListenAddr {
        self.grpc.local_addr()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The health reporter; a service turns its status to NOT_SERVING when
    /// what it depends on goes away.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Cancelled on shutdown: long streams watch it to end themselves.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Adds a gRPC service; it is advertised by reflection and reported
    /// SERVING by health once `serve` starts, unless the service says otherwise.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves until the shutdown token is cancelled, then drains in-flight
    /// calls for at most `shutdown_grace`. `http_routes` are served on the
    /// HTTP port beside `/metrics`.
    pub async fn serve(mut self, http_routes: Option<axum::Router>) -> Result<(), ServeError> {
        let grpc_metrics = GrpcMetrics::register(&mut self.registry);
        let tasks = crate::metrics::RuntimeTasks::register(&mut self.registry);
        crate::span_export::SpanCounts::global().register(&mut self.registry);
        let registry = Arc::new(self.registry);
        let grpc_addr = self.grpc.local_addr();

        let mut routes = self.routes;
        routes.add_service(reflection(&self.service_names).build_v1()?);
        routes.add_service(reflection(&self.service_names).build_v1alpha()?);
        routes.add_service(tonic_health::pb::health_server::HealthServer::new(
            HealthService::from_health_reporter(self.health.clone()),
        ));
        set_all(&self.health, &self.service_names, ServingStatus::Serving).await;

        let http_task = match self.http {
            Some(listener) => {
                let addr = listener.local_addr().map_err(|source| ListenError::Bind {
                    field: "server.http_listen".into(),
                    addr: self.config.http_listen.clone(),
                    source,
                })?;
                let mut router = crate::metrics::router(registry.clone());
                if let Some(extra) = http_routes {
                    router = router.merge(extra);
                }
                let token = self.shutdown.clone();
                let serving = crate::http::HttpServing {
                    threads: self.config.http_threads,
                    tasks,
                    ..crate::http::HttpServing::new(self.config.http_header_timeout)
                };
                tracing::info!(%addr, "serving HTTP");
                Some(tokio::spawn(async move {
                    crate::http::serve(listener, router, serving, token)
                        .await
                        .map_err(|source| ServeError::Http { addr, source })
                }))
            }
            None => None,
        };

        let mut server = tonic::transport::Server::builder()
            .timeout(self.config.request_timeout)
            .layer(
                tower::ServiceBuilder::new()
                    // Failed calls logged by whose fault they are, not all at ERROR.
                    .layer(crate::grpc_trace::layer().on_failure(crate::grpc_trace::LogByFault))
                    .layer(GrpcMetricsLayer(grpc_metrics))
                    .layer(GlobalConcurrencyLimitLayer::new(
                        self.config.max_concurrent_requests.max(1),
                    )),
            );
        let router = server.add_routes(routes.routes());
        tracing::info!(addr = %grpc_addr, services = ?self.service_names, "serving gRPC");

        let token = self.shutdown.clone();
        let health = self.health.clone();
        let names = self.service_names.clone();
        let stop = async move {
            token.cancelled().await;
            set_all(&health, &names, ServingStatus::NotServing).await;
            tracing::info!("shutting down: draining in-flight calls");
        };
        let serving = async {
            match self.grpc {
                GrpcListener::Tcp(listener) => {
                    let incoming = TcpListenerStream::new(listener);
                    router.serve_with_incoming_shutdown(incoming, stop).await
                }
                GrpcListener::Unix { listener, path } => {
                    // Clients send the socket's path as :authority, which h2
                    // refuses: see unix_authority.
                    let incoming = UnixListenerStream::new(listener)
                        .map(|accepted| accepted.map(AnyAuthority::new));
                    let result = router.serve_with_incoming_shutdown(incoming, stop).await;
                    let _ = std::fs::remove_file(&path);
                    result
                }
            }
        };
        let grace = self.config.shutdown_grace;
        let token = self.shutdown.clone();
        let drain_deadline = async move {
            token.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            result = serving => result.map_err(|source| ServeError::Transport { addr: grpc_addr.to_string(), source }),
            () = drain_deadline => {
                tracing::warn!(?grace, "in-flight calls did not finish within the shutdown grace; closing them");
                Ok(())
            }
        };
        if let Some(task) = http_task {
            self.shutdown.cancel();
            if let Ok(Err(error)) = task.await {
                return Err(error);
            }
        }
        result
    }
}

/// Reflection advertising only this service's own services, health and
/// reflection, though the descriptor set holds every berth package.
fn reflection(service_names: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(HEALTH_SERVICE);
    for name in service_names.iter().chain(REFLECTION_SERVICES.iter()) {
        builder = builder.with_service_name(*name);
    }
    builder
}

async fn set_all(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// A service serving in the background (for binaries, tests and the
/// quickstart, which run services in-process).
#[derive(Debug)]
pub struct RunningService {
    pub grpc_addr: ListenAddr,
    pub http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningService {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the service stops (after its shutdown token is cancelled).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await.unwrap_or(Ok(()))
    }

    /// Asks the service to stop and waits for it to drain.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// The gRPC endpoint URI a tonic client connects to (TCP only).
    pub fn grpc_uri(&self) -> String {
        match &self.grpc_addr {
            ListenAddr::Tcp(addr) => format!("http://{addr}"),
            ListenAddr::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

impl ServiceHost {
    /// Serves in a background task.
    pub fn spawn(self, http_routes: Option<axum::Router>) -> RunningService {
        let grpc_addr = self.grpc_addr();
        let http_addr = self.http_addr();
        let shutdown = self.shutdown_token();
        let task = tokio::spawn(self.serve(http_routes));
        RunningService {
            grpc_addr,
            http_addr,
            shutdown,
            task,
        }
    }
}
