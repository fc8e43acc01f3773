//! The parts every berth service shares: typed config loaded from TOML,
//! `BERTH_*` env vars and flags; the gRPC server bootstrap (reflection,
//! health, tower layers, graceful shutdown, metrics HTTP endpoint);
//! telemetry; and the error code that maps a service error to gRPC and HTTP.

pub mod auth;
pub mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod direct_span;
pub mod error;
pub mod grpc_trace;
pub mod http;
pub mod json_budget;
pub mod listen;
pub mod metrics;
pub mod otlp;
pub mod paging;
#[cfg(feature = "parquet")]
pub mod parquet_columns;
pub mod serve;
pub mod span_export;
pub mod span_layer;
pub mod telemetry;
pub mod trace_context;
pub mod unix_authority;
pub mod yaml_prescan;

pub use config::{ConfigError, ServerConfig};
pub use error::{ErrorCode, ServiceError, error_reason};
pub use listen::{GrpcListener, ListenAddr, ListenError};
pub use serve::{RunningService, ServeError, ServiceHost};
pub use tokio_util::sync::CancellationToken;

/// The response stream type of a server-streaming RPC.
pub type GrpcStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;
