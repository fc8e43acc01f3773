use berth_server::error::reasons;
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
    /// An exec (or a health check) in a workload that is not running: its
    /// reason is [`reasons::WORKLOAD_NOT_RUNNING`], which the orchestrator
    /// reads as "the backend is lost".
    #[error("workload `{name}` is {state}: exec needs a running workload")]
    NotRunning { name: String, state: &'static str },
    #[error("runtime {0} is not available on this agent: {1}")]
    RuntimeUnavailable(&'static str, String),
    #[error("command `{command}` could not be started: {reason}")]
    SpawnFailed { command: String, reason: String },
    #[error("{0} execs are already running on this agent (agent.max_concurrent_execs)")]
    TooManyExecs(usize),
    /// A VM's exec port serves one exec at a time; this many already wait.
    #[error(
        "VM `{name}` runs one exec at a time and {waiting} more already wait for it; try again when one ends"
    )]
    ExecQueueFull { name: String, waiting: usize },
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
    /// A subscriber to the events stream fell behind and missed some.
    #[error("subscriber too slow: {0} events dropped")]
    EventsDropped(u64),
    /// The slurm runtime's errors, with their own codes.
    #[error(transparent)]
    Slurm(#[from] crate::runtime::slurm::SlurmError),
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
            Self::WrongState { .. } | Self::NotRunning { .. } => ErrorCode::FailedPrecondition,
            Self::RuntimeUnavailable(..) => ErrorCode::Unavailable,
            Self::SpawnFailed { .. } => ErrorCode::FailedPrecondition,
            Self::TooManyExecs(_) | Self::ExecQueueFull { .. } => ErrorCode::ResourceExhausted,
            Self::ExecKeyTaken(_) => ErrorCode::AlreadyExists,
            Self::ExecNotFound(_) => ErrorCode::NotFound,
            Self::TooManyKeyedExecs(_) => ErrorCode::ResourceExhausted,
            Self::ImageNotFound(_) => ErrorCode::NotFound,
            Self::EngineUnavailable { .. } => ErrorCode::Unavailable,
            Self::Unsupported { .. } => ErrorCode::FailedPrecondition,
            Self::Engine { .. } => ErrorCode::Internal,
            Self::FileNotFound { .. } => ErrorCode::NotFound,
            Self::NotOwned(_) => ErrorCode::PermissionDenied,
            Self::EventsDropped(_) => ErrorCode::DataLoss,
            Self::Slurm(error) => error.code(),
            Self::Unimplemented(_) => ErrorCode::Unimplemented,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::WorkloadNotFound(_) => "workload_not_found",
            Self::NameTaken(_) => "name_taken",
            Self::WrongState { .. } => "wrong_state",
            Self::NotRunning { .. } => reasons::WORKLOAD_NOT_RUNNING,
            Self::RuntimeUnavailable(..) => "runtime_unavailable",
            Self::SpawnFailed { .. } => "spawn_failed",
            Self::TooManyExecs(_) => "too_many_execs",
            Self::ExecQueueFull { .. } => "exec_queue_full",
            Self::ExecKeyTaken(_) => "exec_key_taken",
            Self::ExecNotFound(_) => "exec_not_found",
            Self::TooManyKeyedExecs(_) => "too_many_keyed_execs",
            Self::ImageNotFound(_) => "image_not_found",
            Self::EngineUnavailable { .. } => "engine_unavailable",
            Self::Unsupported { .. } => "unsupported",
            Self::Engine { .. } => "engine_refused",
            Self::FileNotFound { .. } => "file_not_found",
            Self::NotOwned(_) => "not_owned",
            Self::EventsDropped(_) => "events_dropped",
            Self::Slurm(error) => error.reason(),
            Self::Unimplemented(_) => "unimplemented",
            Self::Internal(_) => "internal",
        }
    }
}

/// A list request's `page_token` that no earlier page of this agent gave.
impl From<berth_server::paging::BadPageToken> for AgentError {
    fn from(error: berth_server::paging::BadPageToken) -> Self {
        Self::InvalidArgument {
            field: "page_token",
            reason: error.to_string(),
        }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(error: AgentError) -> Self {
        berth_server::error::into_status(error)
    }
}

#[cfg(test)]
mod tests {
    use berth_server::error::{error_reason, has_reason};

    use super::*;

    #[test]
    fn an_exec_in_a_stopped_workload_says_so_in_its_reason() {
        let error = AgentError::NotRunning {
            name: "web".into(),
            state: "exited",
        };
        assert_eq!(
            error.to_string(),
            "workload `web` is exited: exec needs a running workload"
        );
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(has_reason(&status, reasons::WORKLOAD_NOT_RUNNING));
        let other = tonic::Status::from(AgentError::WrongState {
            name: "web".into(),
            state: "running",
            reason: "stop it first or remove with force",
        });
        assert_eq!(other.code(), tonic::Code::FailedPrecondition);
        assert_eq!(error_reason(&other), Some("wrong_state"));
        let lagged = tonic::Status::from(AgentError::EventsDropped(3));
        assert_eq!(lagged.code(), tonic::Code::DataLoss);
        assert_eq!(lagged.message(), "subscriber too slow: 3 events dropped");
    }
}
