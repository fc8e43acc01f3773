//! What can go wrong talking to SLURM, each naming the URL, user, field or
//! version at fault; mapped to a gRPC code once, through [`AgentError`].

use berth_server::ErrorCode;

/// The slurmrestd OpenAPI version this runtime speaks.
pub const API_VERSION: &str = "v0.0.38";

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// slurmrestd does not answer (or answers something that is not HTTP).
    #[error("slurmrestd at {url} is unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    /// The token's own `exp` is past: no request is sent with it.
    #[error(
        "the JWT for SLURM user `{user}` (slurm.token/slurm.token_file) expired {ago_s} s ago; renew it with `scontrol token username={user}`"
    )]
    TokenExpired { user: String, ago_s: u64 },
    /// No token configured, or one that is not a JWT.
    #[error("slurm.token/slurm.token_file: {0}")]
    BadToken(String),
    /// slurmrestd or slurmctld refused the token (wrong key, revoked, other user).
    #[error(
        "slurmrestd at {url} refused the JWT for SLURM user `{user}` (slurm.token/slurm.token_file): {detail}"
    )]
    TokenRejected {
        url: String,
        user: String,
        detail: String,
    },
    /// slurmrestd serves no API version this agent speaks.
    #[error(
        "slurmrestd at {url} does not serve OpenAPI {API_VERSION}, the only version this agent speaks (SLURM 21.08–23.02 with `-s openapi/{API_VERSION}`); it serves: {served}"
    )]
    UnsupportedVersion { url: String, served: String },
    /// SLURM refused a request because of what the spec asks.
    #[error("{field}: SLURM refused {value}: {message}")]
    Refused {
        field: &'static str,
        value: String,
        message: String,
    },
    /// SLURM failed a request for a reason of its own.
    #[error("slurmrestd at {url}: {action} failed: {message}")]
    Failed {
        url: String,
        action: String,
        message: String,
    },
}

impl SlurmError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable { .. } => ErrorCode::Unavailable,
            Self::TokenExpired { .. } | Self::BadToken(_) => ErrorCode::Unauthenticated,
            Self::TokenRejected { .. } => ErrorCode::PermissionDenied,
            Self::UnsupportedVersion { .. } => ErrorCode::FailedPrecondition,
            Self::Refused { .. } => ErrorCode::BadRequest,
            Self::Failed { .. } => ErrorCode::Internal,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "slurm_unavailable",
            Self::TokenExpired { .. } => "slurm_token_expired",
            Self::BadToken(_) => "slurm_bad_token",
            Self::TokenRejected { .. } => "slurm_token_rejected",
            Self::UnsupportedVersion { .. } => "slurm_unsupported_version",
            Self::Refused { .. } => "slurm_refused",
            Self::Failed { .. } => "slurm_failed",
        }
    }
}
