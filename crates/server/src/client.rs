//! Connecting to a berth service by address: `unix:///path` or
//! `http://host:port`, with an optional bearer token.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::auth::AttachBearer;

/// A channel that adds the bearer token to every call.
pub type AuthChannel = InterceptedService<Channel, AttachBearer>;

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
    Ok(InterceptedService::new(channel, bearer))
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
