//! Connecting to a berth service by address: `unix:///path` or
//! `http://host:port`, with an optional bearer token. Every call sent on
//! such a channel carries the caller's trace context (W3C `traceparent`,
//! `tracestate`), so the service's span of it joins the caller's trace.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::auth::AttachBearer;

/// A channel that adds the bearer token and the trace context to every call.
pub type AuthChannel = InterceptedService<Channel, OutgoingCall>;

/// What berth's clients add to each call: the bearer token, if any, and
/// the current span's trace context, if it is traced.
#[derive(Debug, Clone, Default)]
pub struct OutgoingCall {
    bearer: AttachBearer,
}

impl Interceptor for OutgoingCall {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = self.bearer.call(request)?;
        // The interceptor runs inside the caller's poll of the call, so the
        // current span is the caller's.
        crate::trace_context::inject(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("address `{address}` is not valid: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("cannot connect to {address}: {reason}")]
    Unreachable { address: String, reason: String },
}

/// Connects now, so that an unreachable address fails here with its reason.
pub async fn connect(
    address: &str,
    token: &str,
    timeout: Duration,
) -> Result<AuthChannel, ConnectError> {
    let channel = if let Some(path) = address.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is unused by the connector; tonic needs a syntactically valid one.
        Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
    } else if address.starts_with("http://") || address.starts_with("https://") {
        Endpoint::from_shared(address.to_string())
            .map_err(|e| ConnectError::BadAddress {
                address: address.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(timeout)
            .connect()
            .await
    } else {
        return Err(ConnectError::BadAddress {
            address: address.to_string(),
            reason: "expected unix:///path or http://host:port".to_string(),
        });
    }
    .map_err(|e| ConnectError::Unreachable {
        address: address.to_string(),
        reason: error_chain(&e),
    })?;
    let bearer = AttachBearer::new(token).map_err(|e| ConnectError::BadAddress {
        address: address.to_string(),
        reason: e.message().to_string(),
    })?;
    Ok(InterceptedService::new(channel, OutgoingCall { bearer }))
}

/// The error and its causes on one line ("transport error: connection refused").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
