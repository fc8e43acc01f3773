use berth_server::{ErrorCode, ServiceError};

use crate::manifest::ManifestError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("campaign `{0}` not found")]
    CampaignNotFound(String),
    #[error("run `{0}` not found")]
    RunNotFound(String),
    #[error("host `{0}` is not registered")]
    HostNotFound(String),
    #[error("campaign `{id}` is {state}: {reason}")]
    WrongState {
        id: String,
        state: &'static str,
        reason: &'static str,
    },
    #[error("backend `{backend}` cannot be placed on any registered host: {reasons}")]
    Unplaceable { backend: String, reasons: String },
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError for OrchestratorError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::Manifest(_) | Self::InvalidArgument { .. } => ErrorCode::BadRequest,
            Self::CampaignNotFound(_) | Self::RunNotFound(_) | Self::HostNotFound(_) => {
                ErrorCode::NotFound
            }
            Self::WrongState { .. } | Self::Unplaceable { .. } => ErrorCode::FailedPrecondition,
            Self::Unimplemented(_) => ErrorCode::Unimplemented,
            Self::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<OrchestratorError> for tonic::Status {
    fn from(error: OrchestratorError) -> Self {
        berth_server::error::into_status(error)
    }
}
