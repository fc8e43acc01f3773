//! One small error code type that every service error maps to, so that a
//! failure gets the same meaning over gRPC and over HTTP, and the one
//! mapping from a service error to a `tonic::Status` ([`into_status`]).
//!
//! Every error status carries a machine-readable reason in its
//! [`ERROR_CODE_KEY`] (`berth-error-code`) metadata entry, as Quickwit sends
//! its typed errors: a stable snake_case name such as
//! `workload_not_running`. A caller reads it with [`error_reason`] and
//! matches on it, never on the message text, which is for people and may
//! change. Reasons that one service matches on in another's answers are
//! named in [`reasons`], the contract between them.

use http::StatusCode;
use tonic::metadata::MetadataValue;

/// What kind of failure an error is, independent of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unauthenticated,
    PermissionDenied,
    Unavailable,
    Timeout,
    Cancelled,
    Unimplemented,
    /// Something sent was lost (a subscriber too slow for its event stream).
    DataLoss,
    Internal,
}

impl ErrorCode {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::BadRequest => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::PermissionDenied => tonic::Code::PermissionDenied,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::Cancelled => tonic::Code::Cancelled,
            Self::Unimplemented => tonic::Code::Unimplemented,
            Self::DataLoss => tonic::Code::DataLoss,
            Self::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists => StatusCode::CONFLICT,
            Self::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // 499: nginx's "client closed request", the usual choice.
            Self::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::DataLoss | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code's snake_case name, e.g. `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Unimplemented => "unimplemented",
            Self::DataLoss => "data_loss",
            Self::Internal => "internal",
        }
    }
}

/// The metadata key of the machine-readable reason every error status
/// carries (see [`ServiceError::reason`]).
pub const ERROR_CODE_KEY: &str = "berth-error-code";

/// The reasons one service matches on in another's statuses: the contract
/// between them, so both sides name them from here.
pub mod reasons {
    /// The container-agent cannot exec in a workload that is not running
    /// (it stopped or died): for the orchestrator, the backend is lost.
    pub const WORKLOAD_NOT_RUNNING: &str = "workload_not_running";
    /// A request's costly work used its CPU time budget and was stopped
    /// (`berth_server::budget`): the same request will be refused again.
    pub const REQUEST_BUDGET_EXCEEDED: &str = "request_budget_exceeded";
    /// As many costly requests as a service works on at once were running:
    /// the same request may be served later.
    pub const TOO_MANY_COSTLY_REQUESTS: &str = "too_many_costly_requests";
}

/// Implemented by each crate's error enum; the one place where a service
/// error becomes a `tonic::Status` is [`into_status`].
pub trait ServiceError: std::error::Error {
    /// The kind of failure: the gRPC code and HTTP status.
    fn error_code(&self) -> ErrorCode;

    /// The stable, machine-readable name of this failure (snake_case, e.g.
    /// `campaign_not_found`), sent in the [`ERROR_CODE_KEY`] metadata entry.
    /// Callers match on it; renaming one breaks them, so treat it as API.
    fn reason(&self) -> &'static str;
}

/// Longest status message sent. Messages quote what was refused, which a
/// hostile request makes as long as the message limit allows; a status
/// travels as a header, and clients refuse header blocks over 16 KiB or
/// so, which would hide the answer behind a protocol error.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4 << 10;

/// Maps a service error to a gRPC status carrying its message (cut at
/// [`MAX_STATUS_MESSAGE_BYTES`]) and its reason (in [`ERROR_CODE_KEY`]).
pub fn into_status<E: ServiceError>(error: E) -> tonic::Status {
    let code = error.error_code();
    let reason = error.reason();
    if code == ErrorCode::Internal {
        tracing::error!(error = %error, "internal error");
    }
    let mut message = error.to_string();
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let cut = (0..=MAX_STATUS_MESSAGE_BYTES)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        let dropped = message.len() - cut;
        message.truncate(cut);
        message.push_str(&format!("… ({dropped} more bytes)"));
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(ERROR_CODE_KEY, MetadataValue::from_static(reason));
    tonic::Status::with_metadata(code.grpc_code(), message, metadata)
}

/// The machine-readable reason of an error status (its [`ERROR_CODE_KEY`]
/// entry), `None` when the status was not made by [`into_status`] (e.g. a
/// transport error, or a server that predates reasons).
pub fn error_reason(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(ERROR_CODE_KEY)?.to_str().ok()
}

/// Whether `status` carries the machine-readable `reason`.
pub fn has_reason(status: &tonic::Status, reason: &str) -> bool {
    error_reason(status) == Some(reason)
}

/// An RPC that a later piece of work will fill in.
#[derive(Debug, thiserror::Error)]
#[error("{rpc} is not implemented yet: {why}")]
pub struct NotYetImplemented {
    pub rpc: String,
    pub why: String,
}

impl ServiceError for NotYetImplemented {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::Unimplemented
    }

    fn reason(&self) -> &'static str {
        "not_yet_implemented"
    }
}

/// The answer of an RPC that a later piece of work will fill in.
pub fn unimplemented(rpc: &str, why: &str) -> tonic::Status {
    into_status(NotYetImplemented {
        rpc: rpc.to_string(),
        why: why.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("workload `x` not found")]
    struct Missing;

    impl ServiceError for Missing {
        fn error_code(&self) -> ErrorCode {
            ErrorCode::NotFound
        }

        fn reason(&self) -> &'static str {
            "workload_not_found"
        }
    }

    #[test]
    fn status_keeps_code_and_message() {
        let status = into_status(Missing);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "workload `x` not found");
        assert_eq!(ErrorCode::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorCode::ResourceExhausted.http_status().as_u16(), 429);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("`{0}` is not a valid name")]
    struct Quoting(String);

    impl ServiceError for Quoting {
        fn error_code(&self) -> ErrorCode {
            ErrorCode::BadRequest
        }

        fn reason(&self) -> &'static str {
            "invalid_name"
        }
    }

    #[test]
    fn a_message_quoting_a_huge_input_is_cut() {
        let status = into_status(Quoting("é".repeat(1 << 20)));
        let message = status.message();
        assert!(
            message.len() < MAX_STATUS_MESSAGE_BYTES + 64,
            "{}",
            message.len()
        );
        assert!(message.starts_with("`éé") && message.ends_with(" more bytes)"));
        assert_eq!(
            into_status(Quoting("x".into())).message(),
            "`x` is not a valid name"
        );
    }

    /// What a client sees: the status as the server's response headers
    /// (or trailers) carry it, read back the way a tonic client reads it.
    fn over_the_wire(status: tonic::Status) -> tonic::Status {
        let response = status.into_http::<()>();
        tonic::Status::from_header_map(response.headers()).expect("a grpc-status header")
    }

    #[test]
    fn the_reason_travels_with_the_status() {
        let sent = into_status(Missing);
        assert_eq!(error_reason(&sent), Some("workload_not_found"));
        let received = over_the_wire(sent);
        assert_eq!(received.code(), tonic::Code::NotFound);
        assert_eq!(received.message(), "workload `x` not found");
        assert_eq!(error_reason(&received), Some("workload_not_found"));
        assert!(has_reason(&received, "workload_not_found"));
        assert!(!has_reason(&received, "invalid_name"));
    }

    #[test]
    fn the_reason_survives_a_cut_message_and_trailers() {
        let sent = into_status(Quoting("\n".repeat(1 << 16)));
        let mut trailers = http::HeaderMap::new();
        sent.add_header(&mut trailers).unwrap();
        let received = tonic::Status::from_header_map(&trailers).unwrap();
        assert_eq!(received.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_reason(&received), Some("invalid_name"));
    }

    #[test]
    fn statuses_made_elsewhere_have_no_reason() {
        assert_eq!(error_reason(&tonic::Status::unavailable("down")), None);
        let stub = over_the_wire(unimplemented("Deploy", "later"));
        assert_eq!(stub.code(), tonic::Code::Unimplemented);
        assert_eq!(stub.message(), "Deploy is not implemented yet: later");
        assert_eq!(error_reason(&stub), Some("not_yet_implemented"));
    }

    #[test]
    fn code_names_are_snake_case() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::DataLoss,
            ErrorCode::Timeout,
        ] {
            let name = code.as_str();
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(ErrorCode::DataLoss.grpc_code(), tonic::Code::DataLoss);
    }
}
