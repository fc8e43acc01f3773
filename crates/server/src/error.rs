//! One small error code type that every service error maps to, so that a
//! failure gets the same meaning over gRPC and over HTTP.

use http::StatusCode;

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
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Implemented by each crate's error enum; the one place where a service
/// error becomes a `tonic::Status` is [`into_status`].
pub trait ServiceError: std::error::Error {
    fn error_code(&self) -> ErrorCode;
}

/// Longest status message sent. Messages quote what was refused, which a
/// hostile request makes as long as the message limit allows; a status
/// travels as a header, and clients refuse header blocks over 16 KiB or
/// so, which would hide the answer behind a protocol error.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4 << 10;

/// Maps a service error to a gRPC status carrying its message (cut at
/// [`MAX_STATUS_MESSAGE_BYTES`]).
pub fn into_status<E: ServiceError>(error: E) -> tonic::Status {
    let code = error.error_code();
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
    tonic::Status::new(code.grpc_code(), message)
}

/// The answer of an RPC that a later piece of work will fill in.
pub fn unimplemented(rpc: &str, why: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!("{rpc} is not implemented yet: {why}"))
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
}
