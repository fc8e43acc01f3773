//! Every way the embedding service can fail, each with its [`ErrorCode`], so
//! that gRPC (`into_status`) and HTTP (`http_api`) give it the same meaning.

use std::path::PathBuf;
use std::time::Duration;

use berth_server::error::reasons;
use berth_server::{ErrorCode, ServeError, ServiceError};
use humantime_serde::re::humantime::format_duration;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("no texts to embed: send at least one")]
    EmptyBatch,
    #[error("{count} texts in one request; the limit is {max} (limits.max_texts)")]
    TooManyTexts { count: usize, max: usize },
    #[error(
        "text {index} is {bytes} bytes; the limit is {max} bytes per text (limits.max_text_bytes)"
    )]
    TextTooLong {
        index: usize,
        bytes: usize,
        max: usize,
    },
    #[error("unknown model `{name}`; this service has: {known}")]
    UnknownModel { name: String, known: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(
        "model `{model}` is not available: {reason}; run scripts/setup-embedding-model.sh or set [models] in the config"
    )]
    Unavailable { model: String, reason: String },
    #[error(
        "the queue of model `{model}` is full ({capacity} texts waiting, batching.max_queued_texts): retry later"
    )]
    QueueFull { model: String, capacity: usize },
    /// Refused before it is queued: its tokens, estimated as `cost.rs`
    /// does, would take a session longer than the request CPU budget at
    /// the rate the model's sessions are measured at.
    #[error(
        "the request would take at least {:.2} s to embed ({tokens} tokens or more, at the {tokens_per_second:.0} tokens/s a session is measured at); the budget is {} (server.request_cpu_budget, env BERTH_SERVER__REQUEST_CPU_BUDGET): send fewer or shorter texts per request",
        estimate.as_secs_f64(),
        format_duration(*budget)
    )]
    RequestTooCostly {
        tokens: u64,
        tokens_per_second: f64,
        estimate: Duration,
        budget: Duration,
    },
    #[error("the embedding service is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Inference(String),

    // Start-up errors: a model or library that was asked for and cannot be used.
    #[error("{what} {path}: {reason}")]
    Load {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl ServiceError for EmbeddingError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::EmptyBatch
            | Self::TooManyTexts { .. }
            | Self::TextTooLong { .. }
            | Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::UnknownModel { .. } => ErrorCode::NotFound,
            Self::Unavailable { .. } | Self::ShuttingDown => ErrorCode::Unavailable,
            Self::QueueFull { .. } | Self::RequestTooCostly { .. } => ErrorCode::ResourceExhausted,
            Self::Inference(_) | Self::Load { .. } | Self::Config(_) | Self::Serve(_) => {
                ErrorCode::Internal
            }
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::EmptyBatch => "empty_batch",
            Self::TooManyTexts { .. } => "too_many_texts",
            Self::TextTooLong { .. } => "text_too_long",
            Self::UnknownModel { .. } => "unknown_model",
            Self::BadRequest(_) => "bad_request",
            Self::Unavailable { .. } => "model_unavailable",
            Self::QueueFull { .. } => "queue_full",
            Self::RequestTooCostly { .. } => reasons::REQUEST_BUDGET_EXCEEDED,
            Self::ShuttingDown => "shutting_down",
            Self::Inference(_) => "inference_failed",
            Self::Load { .. } => "load_failed",
            Self::Config(_) => "invalid_config",
            Self::Serve(_) => "serve_failed",
        }
    }
}

impl From<EmbeddingError> for tonic::Status {
    fn from(error: EmbeddingError) -> Self {
        berth_server::error::into_status(error)
    }
}
