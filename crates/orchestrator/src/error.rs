use berth_server::budget::BudgetError;
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
    #[error("deployment `{0}` not found")]
    DeploymentNotFound(String),
    #[error("deployment `{0}` exists and is live (StopDeployment it first, or deploy with update)")]
    DeploymentExists(String),
    #[error("deployment `{name}` has ended ({state})")]
    DeploymentEnded { name: String, state: &'static str },
    #[error("deployment `{deployment}` cannot be placed on any registered host: {reasons}")]
    RecipeUnplaceable { deployment: String, reasons: String },
    #[error("replica {index} on host `{host}`: {reason}")]
    ReplicaUnreachable {
        index: u32,
        host: String,
        reason: String,
    },
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A SubmitCampaign or Deploy past its CPU budget, or one too many at once.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

impl ServiceError for OrchestratorError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::Manifest(_) | Self::InvalidArgument { .. } => ErrorCode::BadRequest,
            Self::CampaignNotFound(_)
            | Self::RunNotFound(_)
            | Self::HostNotFound(_)
            | Self::DeploymentNotFound(_) => ErrorCode::NotFound,
            Self::DeploymentExists(_) => ErrorCode::AlreadyExists,
            Self::WrongState { .. }
            | Self::Unplaceable { .. }
            | Self::DeploymentEnded { .. }
            | Self::RecipeUnplaceable { .. } => ErrorCode::FailedPrecondition,
            Self::ReplicaUnreachable { .. } => ErrorCode::Unavailable,
            Self::Unimplemented(_) => ErrorCode::Unimplemented,
            Self::Store(_) => ErrorCode::Internal,
            Self::Budget(error) => error.error_code(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Manifest(_) => "invalid_manifest",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::CampaignNotFound(_) => "campaign_not_found",
            Self::RunNotFound(_) => "run_not_found",
            Self::HostNotFound(_) => "host_not_found",
            Self::WrongState { .. } => "wrong_state",
            Self::Unplaceable { .. } => "unplaceable",
            Self::DeploymentNotFound(_) => "deployment_not_found",
            Self::DeploymentExists(_) => "deployment_exists",
            Self::DeploymentEnded { .. } => "deployment_ended",
            Self::RecipeUnplaceable { .. } => "recipe_unplaceable",
            Self::ReplicaUnreachable { .. } => "replica_unreachable",
            Self::Unimplemented(_) => "unimplemented",
            Self::Store(_) => "store",
            Self::Budget(error) => error.reason(),
        }
    }
}

impl From<OrchestratorError> for tonic::Status {
    fn from(error: OrchestratorError) -> Self {
        berth_server::error::into_status(error)
    }
}
