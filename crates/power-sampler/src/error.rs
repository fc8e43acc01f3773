//! What can go wrong in a call, each mapped once to its gRPC status by
//! [`berth_server::error::into_status`]; and what stops the service starting.

use std::time::Duration;

use berth_server::{ErrorCode, ServeError, ServiceError};

use crate::reading::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("device `{device}` not found; this host has: {known}")]
    UnknownDevice { device: String, known: String },
    #[error(
        "device `{device}` is unavailable: {source_name} cannot be used on this host: {reason}"
    )]
    SourceUnavailable {
        device: String,
        source_name: &'static str,
        reason: String,
    },
    #[error("device `{0}` is listed twice")]
    DuplicateDevice(String),
    #[error("no device is available on this host: {0}")]
    NoDevices(String),
    #[error("rate_hz = {rate} is out of range: allowed {min} to {max} Hz (0 means {default} Hz)")]
    RateOutOfRange {
        rate: f64,
        min: f64,
        max: f64,
        default: f64,
    },
    #[error("idle_baseline = {requested:?} is out of range: allowed 0 to {max:?}")]
    BaselineOutOfRange { requested: String, max: Duration },
    #[error("run_id is {len} bytes long; the limit is {max}")]
    RunIdTooLong { len: usize, max: usize },
    #[error("too many open sessions: the limit is {limit} (sampler.max_sessions); stop one first")]
    TooManySessions { limit: usize },
    #[error("session `{0}` not found (never started, or stopped long enough ago to be forgotten)")]
    UnknownSession(String),
    #[error("session `{0}` is already stopped")]
    AlreadyStopped(String),
    #[error("session `{0}` is still open: stop it first")]
    StillOpen(String),
    #[error("session `{0}` is stopped: it has no live samples; use GetSeries")]
    NotOpen(String),
    #[error("device `{device}` is not part of session `{session}`")]
    DeviceNotInSession { device: String, session: String },
    #[error("page_size = {size} is above the maximum {max}")]
    PageTooLarge { size: u32, max: u32 },
    #[error("page_token `{0}` is not one this service gave out")]
    BadPageToken(String),
    #[error("format = {0} is not EXPORT_FORMAT_CSV (1) or EXPORT_FORMAT_PARQUET (2)")]
    BadFormat(i32),
    #[error("export failed: {0}")]
    Export(String),
}

impl ServiceError for PowerError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::UnknownDevice { .. }
            | Self::UnknownSession(_)
            | Self::DeviceNotInSession { .. } => ErrorCode::NotFound,
            Self::SourceUnavailable { .. } => ErrorCode::Unavailable,
            Self::DuplicateDevice(_)
            | Self::RateOutOfRange { .. }
            | Self::BaselineOutOfRange { .. }
            | Self::RunIdTooLong { .. }
            | Self::PageTooLarge { .. }
            | Self::BadPageToken(_)
            | Self::BadFormat(_) => ErrorCode::BadRequest,
            Self::NoDevices(_)
            | Self::AlreadyStopped(_)
            | Self::StillOpen(_)
            | Self::NotOpen(_) => ErrorCode::FailedPrecondition,
            Self::TooManySessions { .. } => ErrorCode::ResourceExhausted,
            Self::Export(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::UnknownDevice { .. } => "unknown_device",
            Self::SourceUnavailable { .. } => "source_unavailable",
            Self::DuplicateDevice(_) => "duplicate_device",
            Self::NoDevices(_) => "no_devices",
            Self::RateOutOfRange { .. } => "rate_out_of_range",
            Self::BaselineOutOfRange { .. } => "baseline_out_of_range",
            Self::RunIdTooLong { .. } => "run_id_too_long",
            Self::TooManySessions { .. } => "too_many_sessions",
            Self::UnknownSession(_) => "unknown_session",
            Self::AlreadyStopped(_) => "already_stopped",
            Self::StillOpen(_) => "still_open",
            Self::NotOpen(_) => "not_open",
            Self::DeviceNotInSession { .. } => "device_not_in_session",
            Self::PageTooLarge { .. } => "page_too_large",
            Self::BadPageToken(_) => "bad_page_token",
            Self::BadFormat(_) => "bad_format",
            Self::Export(_) => "export_failed",
        }
    }
}

/// Why the service did not start. A missing GPU or RAPL is not one of these:
/// the service serves what the host has.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("replay trace: {0}")]
    Replay(#[from] SourceError),
    #[error("cannot start the sampling thread of {source_name}: {error}")]
    Thread {
        source_name: String,
        error: std::io::Error,
    },
    #[error("device `{0}` is defined by two replay traces")]
    DuplicateReplayDevice(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}
