use berth_server::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("workload `{0}` not found on this agent")]
    WorkloadNotFound(String),
    #[error("a workload named `{0}` already exists")]
    NameTaken(String),
    #[error("workload `{name}` is {state}: {reason}")]
    WrongState {
        name: String,
        state: &'static str,
        reason: &'static str,
    },
    #[error("runtime {0} is not available on this agent: {1}")]
    RuntimeUnavailable(&'static str, String),
    #[error("command `{command}` could not be started: {reason}")]
    SpawnFailed { command: String, reason: String },
    #[error("{0} execs are already running on this agent (agent.max_concurrent_execs)")]
    TooManyExecs(usize),
    #[error("an exec with key `{0}` is already known to this agent; attach to it instead")]
    ExecKeyTaken(String),
    #[error(
        "no exec with key `{0}` on this agent (never started, forgotten after agent.keyed_exec_retention, or the agent restarted)"
    )]
    ExecNotFound(String),
    #[error("{0} keyed execs are running on this agent and none has ended (agent.max_keyed_execs)")]
    TooManyKeyedExecs(usize),
    #[error("image `{0}` not found on this host (nothing is pulled: import it with ImportImage)")]
    ImageNotFound(String),
    /// The engine's socket does not answer; calls succeed again once it returns.
    #[error("{engine} engine at {socket} is unavailable: {reason}")]
    EngineUnavailable {
        engine: &'static str,
        socket: String,
        reason: String,
    },
    /// The host or engine cannot provide what a valid spec asks for (e.g. GPUs).
    #[error("{field}: {reason}")]
    Unsupported { field: &'static str, reason: String },
    #[error("{engine} engine refused {action}: {message}")]
    Engine {
        engine: &'static str,
        action: &'static str,
        message: String,
    },
    /// A file a spec names (a VM's base image, volume or seed) is not there.
    #[error("{field}: `{path}` does not exist on this host")]
    FileNotFound { field: String, path: String },
    /// The workload exists on the host but belongs to no one or someone else
    /// (e.g. a libvirt domain without this agent's metadata).
    #[error("{0}")]
    NotOwned(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError for AgentError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument { .. } => ErrorCode::BadRequest,
            Self::WorkloadNotFound(_) => ErrorCode::NotFound,
            Self::NameTaken(_) => ErrorCode::AlreadyExists,
            Self::WrongState { .. } => ErrorCode::FailedPrecondition,
            Self::RuntimeUnavailable(..) => ErrorCode::Unavailable,
            Self::SpawnFailed { .. } => ErrorCode::FailedPrecondition,
            Self::TooManyExecs(_) => ErrorCode::ResourceExhausted,
            Self::ExecKeyTaken(_) => ErrorCode::AlreadyExists,
            Self::ExecNotFound(_) => ErrorCode::NotFound,
            Self::TooManyKeyedExecs(_) => ErrorCode::ResourceExhausted,
            Self::ImageNotFound(_) => ErrorCode::NotFound,
            Self::EngineUnavailable { .. } => ErrorCode::Unavailable,
            Self::Unsupported { .. } => ErrorCode::FailedPrecondition,
            Self::Engine { .. } => ErrorCode::Internal,
            Self::FileNotFound { .. } => ErrorCode::NotFound,
            Self::NotOwned(_) => ErrorCode::PermissionDenied,
            Self::Unimplemented(_) => ErrorCode::Unimplemented,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(error: AgentError) -> Self {
        berth_server::error::into_status(error)
    }
}
