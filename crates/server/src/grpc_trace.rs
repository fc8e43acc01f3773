//! The log level of a failed gRPC call, by whose fault it is. tower-http's
//! `TraceLayer::new_for_grpc` logs every status but OK at ERROR, so a
//! client sending hostile or merely wrong input (a message over the size
//! limit, one that does not decode, an unknown id) filled the service's log
//! with errors. Here a call refused for its input logs at DEBUG, one
//! refused for load, time or credentials at WARN, and only what is the
//! service's own failure (INTERNAL other than an undecodable request,
//! UNKNOWN, DATA_LOSS, a broken response body) at ERROR.

use std::fmt;
use std::time::Duration;

use http::HeaderMap;
use tonic::Code;
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse, SharedClassifier};
use tower_http::trace::{OnFailure, TraceLayer};
use tracing::{Level, Span};

/// The trace layer of every berth gRPC server: one span per call, the
/// caller's child when the call carries its trace context.
pub fn layer() -> TraceLayer<SharedClassifier<GrpcClassifier>, crate::trace_context::ServerSpan> {
    TraceLayer::new(SharedClassifier::new(GrpcClassifier))
        .make_span_with(crate::trace_context::ServerSpan)
}

/// A failed call: its status, or the error that ended its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcFailure {
    Status { code: Code, message: String },
    Error(String),
}

impl GrpcFailure {
    /// How loudly it is logged.
    pub fn level(&self) -> Level {
        match self {
            // A request that does not decode is INTERNAL by gRPC's status
            // table, though the client sent it (prost's message).
            Self::Status {
                code: Code::Internal,
                message,
            } if message.starts_with("failed to decode Protobuf message") => Level::DEBUG,
            Self::Status { code, .. } => match code {
                Code::Cancelled
                | Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::OutOfRange => Level::DEBUG,
                Code::DeadlineExceeded
                | Code::PermissionDenied
                | Code::ResourceExhausted
                | Code::Unimplemented
                | Code::Unavailable
                | Code::Unauthenticated => Level::WARN,
                Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Level::ERROR,
            },
            Self::Error(_) => Level::ERROR,
        }
    }
}

impl fmt::Display for GrpcFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status { code, message } => write!(f, "{code:?}: {message}"),
            Self::Error(error) => write!(f, "error: {error}"),
        }
    }
}

/// Classifies a response by its `grpc-status`, in its headers (a
/// trailers-only response, as tonic sends a refusal) or its trailers.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClassifier;

fn status_of(headers: &HeaderMap) -> Option<Result<(), GrpcFailure>> {
    let status = tonic::Status::from_header_map(headers)?;
    Some(match status.code() {
        Code::Ok => Ok(()),
        code => Err(GrpcFailure::Status {
            code,
            message: status.message().to_string(),
        }),
    })
}

impl ClassifyResponse for GrpcClassifier {
    type FailureClass = GrpcFailure;
    type ClassifyEos = Self;

    fn classify_response<B>(
        self,
        response: &http::Response<B>,
    ) -> ClassifiedResponse<GrpcFailure, Self> {
        match status_of(response.headers()) {
            Some(result) => ClassifiedResponse::Ready(result),
            None => ClassifiedResponse::RequiresEos(self),
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailure {
        GrpcFailure::Error(error.to_string())
    }
}

impl ClassifyEos for GrpcClassifier {
    type FailureClass = GrpcFailure;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), GrpcFailure> {
        trailers.and_then(status_of).unwrap_or(Ok(()))
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailure {
        GrpcFailure::Error(error.to_string())
    }
}

/// Logs a failed call at [`GrpcFailure::level`], in the call's span.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogByFault;

impl OnFailure<GrpcFailure> for LogByFault {
    fn on_failure(&mut self, failure: GrpcFailure, latency: Duration, span: &Span) {
        let _entered = span.enter();
        match failure.level() {
            Level::ERROR => tracing::error!(%failure, ?latency, "call failed"),
            Level::WARN => tracing::warn!(%failure, ?latency, "call refused"),
            _ => tracing::debug!(%failure, ?latency, "call refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(headers: &[(&'static str, &str)]) -> Result<(), GrpcFailure> {
        let mut response = http::Response::new(());
        for (name, value) in headers {
            response.headers_mut().insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        match GrpcClassifier.classify_response(&response) {
            ClassifiedResponse::Ready(result) => result,
            ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(Some(response.headers())),
        }
    }

    fn level(code: &str, message: &str) -> Level {
        classify(&[("grpc-status", code), ("grpc-message", message)])
            .unwrap_err()
            .level()
    }

    #[test]
    fn refused_input_is_not_an_error_of_the_service() {
        // The refusals of the hostile-input suite: too large (tonic), not
        // decodable (prost, percent-encoded as tonic sends it), bad fields.
        assert_eq!(
            level(
                "11",
                "Error, decoded message length too large: found 65537 bytes, the limit is: 65536 bytes"
            ),
            Level::DEBUG
        );
        assert_eq!(
            level(
                "13",
                "failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded"
            ),
            Level::DEBUG
        );
        assert_eq!(level("3", "bad"), Level::DEBUG);
        assert_eq!(level("5", "no such run"), Level::DEBUG);
        assert_eq!(level("8", "too many sessions"), Level::WARN);
        assert_eq!(level("16", "no key"), Level::WARN);
        assert_eq!(level("13", "the store is gone"), Level::ERROR);
        assert_eq!(level("2", "?"), Level::ERROR);
        assert_eq!(classify(&[("grpc-status", "0")]), Ok(()));
        // No status in the headers: it is in the trailers, or there is none.
        assert_eq!(
            GrpcClassifier.classify_eos(None),
            Ok(()),
            "a stream ended without trailers"
        );
        assert_eq!(
            ClassifyResponse::classify_error(GrpcClassifier, &"reset").level(),
            Level::ERROR
        );
    }

    /// Log lines written while a test runs (on this thread).
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// gRPC messages as raw bytes, to send what no generated client would.
    #[derive(Debug, Clone, Copy, Default)]
    struct Raw;

    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: Vec<u8>,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl tonic::codec::Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }

    /// The server's own log, at DEBUG: hostile requests refused by the
    /// server are no ERROR lines.
    #[tokio::test]
    async fn a_served_refusal_logs_no_error() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // A current-thread runtime: the server's tasks log on this thread.
        let _default = tracing::subscriber::set_default(subscriber);
        let host = crate::ServiceHost::bind(crate::ServerConfig::default())
            .await
            .unwrap();
        let running = host.spawn(None);
        let channel = tonic::transport::Channel::from_shared(running.grpc_uri())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let check = "/grpc.health.v1.Health/Check";
        let call = |message: Vec<u8>, method: &'static str| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            async move {
                grpc.ready().await.unwrap();
                let path = http::uri::PathAndQuery::from_static(method);
                match grpc.unary(tonic::Request::new(message), path, Raw).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                }
            }
        };
        // Invalid UTF-8 in `service`; over tonic's default 4 MiB; no such method.
        assert_eq!(call(vec![0x0a, 2, 0xff, 0xfe], check).await, Code::Internal);
        let mut oversized = vec![0x0a, 0x81, 0x80, 0x80, 0x02];
        oversized.resize(oversized.len() + (4 << 20) + 1, b'x');
        assert_eq!(call(oversized, check).await, Code::OutOfRange);
        assert_eq!(
            call(Vec::new(), "/no.Such/Method").await,
            Code::Unimplemented
        );
        assert_eq!(call(Vec::new(), check).await, Code::Ok);
        running.stop().await.unwrap();
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains(" ERROR "), "{log}");
        assert_eq!(log.matches("call refused").count(), 3, "{log}");
        assert!(
            log.contains(" WARN ") && log.contains("Unimplemented"),
            "{log}"
        );
    }
}
