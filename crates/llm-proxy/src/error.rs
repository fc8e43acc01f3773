//! The proxy's one error type. It becomes a `tonic::Status` through
//! `berth_server::error::into_status` and an OpenAI-style JSON error body in
//! [`ProxyError::into_http`], so both APIs fail the same way.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use berth_server::budget::BudgetError;
use berth_server::{ErrorCode, ServiceError};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not parse the JSON body of your request: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// A field of a Messages or Responses request that cannot be served as
    /// it is; `field` is its path (`input[2].call_id`), given to the client.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error(
        "previous response `{0}` not found: it expired, was evicted, or was made with store: false"
    )]
    UnknownPreviousResponse(String),
    #[error("request body larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error(
        "the request's JSON would take about {estimate} bytes of memory parsed; the limit is {limit} (proxy.max_request_json_bytes)"
    )]
    JsonTooLarge { estimate: usize, limit: usize },
    #[error("the model `{0}` does not exist or you do not have access to it")]
    UnknownModel(String),
    #[error("no virtual key `{0}`")]
    UnknownKey(String),
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this endpoint needs the master key")]
    NotMasterKey,
    #[error("this key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("rate limit reached: {what}; retry after {}s", retry_after.as_secs().max(1))]
    RateLimited { what: String, retry_after: Duration },
    #[error("budget exceeded: spent ${spend:.6} of ${max_budget:.6}")]
    BudgetExceeded { spend: f64, max_budget: f64 },
    /// The most a request can cost on a deployment (its prompt and
    /// `max_tokens` at that deployment's prices) is more than is left of
    /// the key's budget, so it is not sent there.
    #[error(
        "budget exceeded: this request may cost up to ${worst:.6} on {deployment}, more than the ${left:.6} left of the key's max_budget; ask for fewer max_tokens"
    )]
    BudgetTooSmall {
        deployment: String,
        worst: f64,
        left: f64,
    },
    /// A deployment's own budget (`litellm_params.max_budget`) cannot take
    /// the request: spent, or smaller than what the request may cost.
    #[error("deployment {deployment}: its max_budget {why}")]
    DeploymentBudget {
        deployment: String,
        why: String,
        retry_after: Option<Duration>,
    },
    /// A key's budget for one model (its `model_max_budget`) cannot take
    /// an attempt on that model: spent, or smaller than what the request
    /// may cost.
    #[error("the key's model_max_budget for `{model}` {why}")]
    ModelBudget {
        model: String,
        why: String,
        retry_after: Option<Duration>,
    },
    #[error(
        "no deployment of `{model}` is available (cooling down after failures, at their rpm/tpm, or their max_budget spent)"
    )]
    NoDeployment {
        model: String,
        retry_after: Duration,
    },
    #[error(
        "{provider} does not support the parameter `{param}`; set litellm_settings.drop_params: true to drop it"
    )]
    UnsupportedParam {
        provider: &'static str,
        param: String,
    },
    /// An upstream answered with an error that retrying will not fix (a 4xx),
    /// or the last retry failed with one; its body is passed to the client.
    #[error("upstream {deployment} answered {status}: {message}")]
    Upstream {
        deployment: String,
        status: StatusCode,
        message: String,
        body: Bytes,
    },
    #[error("upstream {deployment} unreachable: {reason}")]
    Unreachable { deployment: String, reason: String },
    /// An upstream answered 2xx with something that is not its API's answer.
    #[error("upstream {deployment} answered with something unreadable: {reason}")]
    BadAnswer { deployment: String, reason: String },
    #[error("upstream {deployment} did not answer within {timeout:?}")]
    Timeout {
        deployment: String,
        timeout: Duration,
    },
    #[error("key store: {0}")]
    Store(String),
    /// `extra_json` (gRPC API) would take too much memory parsed.
    #[error("extra_json would take about {estimate} bytes parsed; at most {limit}")]
    ExtraJsonTooLarge { estimate: usize, limit: usize },
    /// An upstream's 2xx body is not the answer the gRPC API expects.
    #[error("cannot read the upstream's answer: {0}")]
    UnreadableAnswer(String),
    /// A streamed answer's SSE event or chunk is not one the gRPC API reads.
    #[error("unreadable stream {what} from the upstream: {reason}")]
    UnreadableStream { what: &'static str, reason: String },
    /// An upstream ended a streamed answer with an error event.
    #[error("{message}")]
    StreamFailed { message: String, timeout: bool },
    /// The gateway answered whole where a stream was asked for, or the reverse.
    #[error("{0}")]
    ReplyMismatch(&'static str),
    /// Parsing a large body took more than its CPU budget, or too many
    /// large bodies were being parsed at once.
    #[error(transparent)]
    RequestBudget(#[from] BudgetError),
}

impl ServiceError for ProxyError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::MalformedJson(_)
            | Self::InvalidRequest(_)
            | Self::InvalidField { .. }
            | Self::UnsupportedParam { .. } => ErrorCode::BadRequest,
            // gRPC has no "too large"; the HTTP edge answers 413 (see http_status).
            Self::BodyTooLarge { .. } => ErrorCode::BadRequest,
            Self::JsonTooLarge { .. } => ErrorCode::ResourceExhausted,
            Self::UnknownModel(_) | Self::UnknownKey(_) | Self::UnknownPreviousResponse(_) => {
                ErrorCode::NotFound
            }
            Self::MissingKey | Self::InvalidKey => ErrorCode::Unauthenticated,
            Self::NotMasterKey | Self::ModelNotAllowed(_) => ErrorCode::PermissionDenied,
            Self::RateLimited { .. }
            | Self::BudgetExceeded { .. }
            | Self::BudgetTooSmall { .. }
            | Self::NoDeployment { .. }
            | Self::DeploymentBudget { .. }
            | Self::ModelBudget { .. } => ErrorCode::ResourceExhausted,
            Self::Upstream { status, .. } => code_of_status(*status),
            Self::Unreachable { .. } | Self::BadAnswer { .. } => ErrorCode::Unavailable,
            Self::Timeout { .. } => ErrorCode::Timeout,
            Self::ExtraJsonTooLarge { .. } => ErrorCode::ResourceExhausted,
            Self::StreamFailed { timeout: true, .. } => ErrorCode::Timeout,
            Self::StreamFailed { timeout: false, .. } => ErrorCode::Unavailable,
            Self::Store(_)
            | Self::UnreadableAnswer(_)
            | Self::UnreadableStream { .. }
            | Self::ReplyMismatch(_) => ErrorCode::Internal,
            Self::RequestBudget(error) => error.error_code(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownPreviousResponse(_) => "previous_response_not_found",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::JsonTooLarge { .. } => "json_too_large",
            Self::UnknownModel(_) => "unknown_model",
            Self::UnknownKey(_) => "unknown_key",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::NotMasterKey => "not_master_key",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::BudgetExceeded { .. } => "budget_exceeded",
            Self::BudgetTooSmall { .. } => "budget_too_small",
            Self::NoDeployment { .. } => "no_deployment",
            Self::DeploymentBudget { .. } => "deployment_budget_exceeded",
            Self::ModelBudget { .. } => "model_budget_exceeded",
            Self::UnsupportedParam { .. } => "unsupported_param",
            Self::Upstream { .. } => "upstream_error",
            Self::Unreachable { .. } => "upstream_unreachable",
            Self::BadAnswer { .. } => "upstream_bad_answer",
            Self::Timeout { .. } => "upstream_timeout",
            Self::Store(_) => "key_store",
            Self::ExtraJsonTooLarge { .. } => "extra_json_too_large",
            Self::UnreadableAnswer(_) => "upstream_unreadable_answer",
            Self::RequestBudget(error) => error.reason(),
            Self::UnreadableStream { .. } => "upstream_unreadable_stream",
            Self::StreamFailed { .. } => "upstream_stream_failed",
            Self::ReplyMismatch(_) => "reply_mismatch",
        }
    }
}

/// The error code closest to an upstream's HTTP status.
fn code_of_status(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        400 | 413 | 422 => ErrorCode::BadRequest,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        408 | 504 => ErrorCode::Timeout,
        429 => ErrorCode::ResourceExhausted,
        501 => ErrorCode::Unimplemented,
        502 | 503 => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

impl ProxyError {
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } | Self::JsonTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // 502: the gateway got no usable answer (LiteLLM says 500 here).
            Self::Unreachable { .. } | Self::BadAnswer { .. } => StatusCode::BAD_GATEWAY,
            Self::Upstream { status, .. } => *status,
            other => other.error_code().http_status(),
        }
    }

    /// How long a client should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::NoDeployment { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::DeploymentBudget { retry_after, .. } | Self::ModelBudget { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// OpenAI's `error.type` for this error.
    fn openai_type(&self) -> &'static str {
        match self {
            Self::MissingKey | Self::InvalidKey => "authentication_error",
            Self::NotMasterKey | Self::ModelNotAllowed(_) => "permission_error",
            Self::RateLimited { .. } | Self::NoDeployment { .. } => "rate_limit_error",
            Self::BudgetExceeded { .. }
            | Self::BudgetTooSmall { .. }
            | Self::DeploymentBudget { .. }
            | Self::ModelBudget { .. } => "budget_exceeded",
            Self::Unreachable { .. }
            | Self::BadAnswer { .. }
            | Self::Timeout { .. }
            | Self::Store(_)
            | Self::UnreadableAnswer(_)
            | Self::UnreadableStream { .. }
            | Self::StreamFailed { .. }
            | Self::ReplyMismatch(_) => "api_error",
            Self::Upstream { status, .. } if status.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code` for this error, where OpenAI has one.
    fn openai_code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel(_) => Some("model_not_found"),
            Self::InvalidKey | Self::MissingKey => Some("invalid_api_key"),
            Self::RateLimited { .. } | Self::NoDeployment { .. } => Some("rate_limit_exceeded"),
            Self::Timeout { .. } => Some("timeout"),
            Self::UnknownPreviousResponse(_) => Some("previous_response_not_found"),
            _ => None,
        }
    }

    /// The OpenAI-style error object `{"error": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.openai_type(),
                "param": match self {
                    Self::UnknownModel(_) | Self::ModelNotAllowed(_) => Some("model"),
                    Self::InvalidField { field, .. } => Some(field.as_str()),
                    Self::UnknownPreviousResponse(_) => Some("previous_response_id"),
                    Self::BudgetTooSmall { .. } => Some("max_tokens"),
                    _ => None,
                },
                "code": self.openai_code(),
            }
        })
    }

    /// The HTTP response of this error. An upstream's own error body is
    /// passed through when it is already an OpenAI-style error object.
    pub fn into_http(self) -> Response {
        let body = match &self {
            Self::Upstream { body, .. } if is_openai_error(body) => body.clone(),
            _ => Bytes::from(self.to_json().to_string()),
        };
        self.respond(body)
    }

    /// The HTTP response of this error in Anthropic's shape
    /// (`{"type":"error","error":{"type","message"}}`), for `/v1/messages`:
    /// Anthropic's clients read the error's type from there.
    pub fn into_anthropic_http(self) -> Response {
        let status = self.http_status();
        let kind = match status.as_u16() {
            400 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 | 403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        let body = serde_json::json!({
            "type": "error",
            "error": {"type": kind, "message": self.to_string()},
        });
        self.respond(Bytes::from(body.to_string()))
    }

    fn respond(self, body: Bytes) -> Response {
        let status = self.http_status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(wait) = self.retry_after() {
            // Whole seconds, rounded up: "Retry-After: 0" would invite a retry storm.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(serde_json::Value::is_object))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_openai() {
        assert_eq!(ProxyError::MalformedJson("x".into()).http_status(), 400);
        assert_eq!(ProxyError::UnknownModel("m".into()).http_status(), 404);
        assert_eq!(ProxyError::MissingKey.http_status(), 401);
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.http_status(), 413);
        let limited = ProxyError::RateLimited {
            what: "rpm".into(),
            retry_after: Duration::from_millis(1500),
        };
        let response = limited.into_http();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn upstream_error_body_passes_through() {
        let body = Bytes::from_static(
            br#"{"error":{"message":"context too long","type":"invalid_request_error"}}"#,
        );
        let error = ProxyError::Upstream {
            deployment: "d".into(),
            status: StatusCode::BAD_REQUEST,
            message: "context too long".into(),
            body,
        };
        assert_eq!(error.error_code(), ErrorCode::BadRequest);
        let response = error.into_http();
        assert_eq!(response.status(), 400);
    }
}
