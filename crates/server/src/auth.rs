//! Bearer tokens on gRPC calls: the server-side check and the client-side
//! header. Tokens come from config or env, never from logs.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{ErrorCode, ServiceError, into_status};

/// Why a call's bearer token, or a client's, was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing `authorization: Bearer <token>` metadata")]
    MissingToken,
    #[error("invalid bearer token")]
    InvalidToken,
    #[error("token holds characters not allowed in a header")]
    UnsendableToken,
}

impl ServiceError for AuthError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::MissingToken | Self::InvalidToken => ErrorCode::Unauthenticated,
            Self::UnsendableToken => ErrorCode::BadRequest,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::UnsendableToken => "unsendable_token",
        }
    }
}

/// Server interceptor: requires `authorization: Bearer <token>` when a token
/// is configured, and lets every call through when none is.
#[derive(Clone)]
pub struct RequireBearer {
    expected: Option<String>,
}

impl std::fmt::Debug for RequireBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireBearer")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl RequireBearer {
    pub fn new(token: &str) -> Self {
        Self {
            expected: (!token.is_empty()).then(|| format!("Bearer {token}")),
        }
    }
}

impl RequireBearer {
    /// Checks an `authorization` header's value (empty when absent): the
    /// one check for gRPC calls and for a service's HTTP routes that show
    /// what its gRPC API guards.
    pub fn check(&self, authorization: &[u8]) -> Result<(), AuthError> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        if constant_time_eq(authorization, expected.as_bytes()) {
            Ok(())
        } else if authorization.is_empty() {
            Err(AuthError::MissingToken)
        } else {
            Err(AuthError::InvalidToken)
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        self.check(given).map_err(into_status)?;
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client interceptor adding the bearer token, if any, to every call.
#[derive(Clone, Default)]
pub struct AttachBearer {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for AttachBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachBearer")
            .field("enabled", &self.header.is_some())
            .finish()
    }
}

impl AttachBearer {
    /// Fails when the token holds characters a header cannot carry.
    pub fn new(token: &str) -> Result<Self, Status> {
        if token.is_empty() {
            return Ok(Self::default());
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| into_status(AuthError::UnsendableToken))?;
        Ok(Self {
            header: Some(header),
        })
    }
}

impl Interceptor for AttachBearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_token() {
        let mut check = RequireBearer::new("s3cret");
        let mut attach = AttachBearer::new("s3cret").unwrap();
        assert!(check.call(attach.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = AttachBearer::new("nope").unwrap();
        let error = check
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
        assert_eq!(crate::error::error_reason(&error), Some("invalid_token"));
        assert!(
            check
                .call(Request::new(()))
                .unwrap_err()
                .message()
                .contains("missing")
        );
        assert!(RequireBearer::new("").call(Request::new(())).is_ok());
    }
}
