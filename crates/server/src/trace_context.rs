//! W3C trace context (`traceparent`, `tracestate`) across gRPC and HTTP
//! hops, so that one campaign run is one trace from the orchestrator down
//! to the agent's exec and the power sampler's session, and an LLM request
//! one trace from its client through the proxy to the upstream. Servers
//! read it from the call's metadata or the request's headers and make the
//! call's span its child ([`ServerSpan`] for gRPC, [`traced_http`] for the
//! HTTP APIs); berth's clients write the current span's context into every
//! call they send ([`inject`], from [`crate::client`]; the LLM proxy's
//! upstream requests take their try's, [`DirectSpan::inject_http`]). A
//! malformed header is ignored: the call's span starts a trace of its own
//! and nothing of the header is passed on.

use std::sync::Arc;

use http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tower_http::trace::MakeSpan;
use tracing::Span;

use crate::direct_span::DirectSpan;
use crate::otlp::Value;
use crate::span_layer::with_recording;

/// A span's place in its trace, as `traceparent` and `tracestate` carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// The `tracestate` the trace arrived with, passed on unchanged.
    pub trace_state: Option<Arc<str>>,
}

impl SpanContext {
    /// The `traceparent` header naming this span (version 00).
    pub fn traceparent(&self) -> String {
        fn hex(out: &mut Vec<u8>, bytes: &[u8]) {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            for byte in bytes {
                out.push(DIGITS[usize::from(byte >> 4)]);
                out.push(DIGITS[usize::from(byte & 0xf)]);
            }
        }
        let mut header = Vec::with_capacity(55);
        header.extend_from_slice(b"00-");
        hex(&mut header, &self.trace_id);
        header.push(b'-');
        hex(&mut header, &self.span_id);
        header.extend_from_slice(if self.sampled { b"-01" } else { b"-00" });
        // Only ASCII was written.
        String::from_utf8(header).unwrap_or_default()
    }
}

/// The remote parent named by `headers`, when they name a valid one; its
/// `tracestate` too when that is well formed.
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let mut traceparents = headers.get_all("traceparent").iter();
    let (Some(traceparent), None) = (traceparents.next(), traceparents.next()) else {
        // None, or several (which the W3C spec makes invalid).
        return None;
    };
    let mut context = parse_traceparent(traceparent.as_bytes())?;
    let mut states = headers.get_all("tracestate").iter();
    if let (Some(state), None) = (states.next(), states.next())
        && let Ok(state) = state.to_str()
        && well_formed_tracestate(state)
    {
        context.trace_state = Some(state.trim().into());
    }
    Some(context)
}

/// `traceparent` as the W3C spec writes it: `vv-<32 hex>-<16 hex>-ff`,
/// lowercase, version `ff` forbidden, version `00` with nothing after the
/// flags, neither id all zeros.
fn parse_traceparent(value: &[u8]) -> Option<SpanContext> {
    fn hex<const N: usize>(part: &[u8]) -> Option<[u8; N]> {
        if part.len() != 2 * N {
            return None;
        }
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut out = [0; N];
        for (byte, pair) in out.iter_mut().zip(part.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(out)
    }
    let mut parts = value.splitn(5, |b| *b == b'-');
    let (Some(version), Some(trace_id), Some(span_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let rest = parts.next();
    let [version] = hex::<1>(version)?;
    if version == 0xff || (version == 0 && rest.is_some()) {
        return None;
    }
    let trace_id = hex::<16>(trace_id)?;
    let span_id = hex::<8>(span_id)?;
    let [flags] = hex::<1>(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        trace_state: None,
    })
}

/// `tracestate` as the W3C spec bounds it: at most 32 `key=value` members
/// separated by commas, keys of lowercase letters, digits and `_-*/@`,
/// values of printable ASCII but `,` and `=`, the whole at most 512 bytes.
/// One that is not is dropped; the parent is kept.
fn well_formed_tracestate(state: &str) -> bool {
    let member = |member: &str| {
        let Some((key, value)) = member.trim().split_once('=') else {
            return false;
        };
        let key_ok = (1..=256).contains(&key.len())
            && key
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/' | b'@'));
        let value_ok = (1..=256).contains(&value.len())
            && value
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
            && !value.ends_with(' ');
        key_ok && value_ok
    };
    let members: Vec<&str> = state.split(',').filter(|m| !m.trim().is_empty()).collect();
    !members.is_empty()
        && members.len() <= 32
        && state.len() <= 512
        && members.into_iter().all(member)
}

/// Makes `span` a child of the remote parent `headers` name, when they name
/// a valid one; otherwise it stays the root of a trace of its own. Called
/// before the span has children or sends its context anywhere.
pub fn set_parent(span: &Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    if let Some(parent) = extract(headers) {
        // Nothing to do when the span is not traced: no trace to join.
        with_recording(span, |recording| recording.set_remote_parent(parent));
    }
}

/// `span`'s trace context; None when it is not traced (no exporter, or
/// filtered out).
pub fn context(span: &Span) -> Option<SpanContext> {
    if span.is_disabled() {
        return None;
    }
    with_recording(span, |recording| recording.context.clone())
}

/// Writes `span`'s trace context into `metadata`; nothing when the span is
/// not traced.
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    if let Some(context) = context(span) {
        if let Ok(value) = MetadataValue::try_from(context.traceparent()) {
            metadata.insert(MetadataKey::from_static("traceparent"), value);
        }
        if let Some(state) = context.trace_state.as_deref()
            && let Ok(value) = MetadataValue::try_from(state)
        {
            metadata.insert(MetadataKey::from_static("tracestate"), value);
        }
    }
}

/// Writes `span`'s trace context into the headers of an HTTP request;
/// nothing when the span is not traced.
pub fn inject_http(span: &Span, headers: &mut HeaderMap) {
    if let Some(context) = context(span) {
        write_http(&context, headers);
    }
}

/// Writes `context` as `traceparent` (and `tracestate`) headers.
pub(crate) fn write_http(context: &SpanContext, headers: &mut HeaderMap) {
    if let Ok(value) = http::HeaderValue::try_from(context.traceparent()) {
        headers.insert(http::header::HeaderName::from_static("traceparent"), value);
    }
    if let Some(state) = context.trace_state.as_deref()
        && let Ok(value) = http::HeaderValue::try_from(state)
    {
        headers.insert(http::header::HeaderName::from_static("tracestate"), value);
    }
}

/// Whether `span` is exported: traced (an exporter is configured and the
/// span is not filtered out) and sampled. A span that is not can skip the
/// work only its attributes would use.
pub fn is_sampled(span: &Span) -> bool {
    context(span).is_some_and(|context| context.sampled)
}

/// Links `span` to a span of another trace (a campaign's runs to the call
/// that submitted it).
pub fn add_link(span: &Span, to: &SpanContext) {
    if span.is_disabled() {
        return;
    }
    with_recording(span, |recording| recording.add_link(to));
}

/// Serves an HTTP request in a span of its own ([`DirectSpan::server`]),
/// named by its method as the HTTP semantic conventions name a span
/// without a route, a child of the caller's span when the request carries
/// a valid `traceparent`, and the parent of the direct spans its handler
/// begins. For an axum router:
/// `.layer(axum::middleware::from_fn(traced_http))`. A streamed answer's
/// span ends at its headers; what the stream does after is the spans'
/// made inside it (the LLM proxy's GenAI span lasts to the stream's end).
pub async fn traced_http(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method();
    let span = DirectSpan::server(
        || method.as_str().to_owned(),
        &[
            ("http.request.method", Value::Str(method.as_str())),
            ("url.path", Value::Str(request.uri().path())),
        ],
        || extract(request.headers()),
    );
    let response = span.serve(next.run(request)).await;
    let status = response.status();
    span.set_attributes(&[(
        "http.response.status_code",
        Value::Int(i64::from(status.as_u16())),
    )]);
    // Server spans are errors for 5xx only: a 4xx is the client's.
    if status.is_server_error() {
        span.set_attributes(&[("otel.status_code", Value::Str("error"))]);
    }
    response
}

/// The span of a served gRPC call, at INFO (tower-http's default is DEBUG,
/// which the usual log filter turns off, and with it the exported span):
/// named by its method, a child of the caller's span when the call carries
/// a valid `traceparent`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSpan;

impl<B> MakeSpan<B> for ServerSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        let span = tracing::info_span!(
            "grpc",
            otel.name = path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
        );
        set_parent(&span, request.headers());
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::SpanKind;
    use crate::span_layer::testing::traced;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_valid_traceparent_and_tracestate_are_the_parent() {
        let parent = extract(&headers(&[
            ("traceparent", VALID),
            ("tracestate", "vendor=abc"),
        ]))
        .expect("a valid traceparent");
        assert_eq!(
            parent.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            parent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(parent.sampled);
        assert_eq!(parent.trace_state.as_deref(), Some("vendor=abc"));
        // Written back as it was read.
        assert_eq!(parent.traceparent(), VALID);
        // A tracestate that does not parse is dropped, the parent kept.
        for malformed in ["no pairs", "Upper=x", "a=b=c", "a=", &"k=v,".repeat(33)] {
            let parent = extract(&headers(&[
                ("traceparent", VALID),
                ("tracestate", malformed),
            ]))
            .expect("a valid traceparent");
            assert_eq!(parent.trace_state, None, "{malformed:?}");
        }
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        for malformed in [
            "",
            "garbage",
            // Short trace id; all-zero trace id; all-zero span id.
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is forbidden; not hex; flags too long.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0100",
            // Uppercase; version 00 with more after the flags.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(
                extract(&headers(&[
                    ("traceparent", malformed),
                    ("tracestate", "a=b")
                ]))
                .is_none(),
                "{malformed:?} was taken as a parent"
            );
        }
        assert!(extract(&HeaderMap::new()).is_none());
        // Two parents: neither is taken.
        let mut two = headers(&[("traceparent", VALID)]);
        two.append("traceparent", VALID.parse().unwrap());
        assert!(extract(&two).is_none());
        // A later version may add fields after the flags.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(extract(&headers(&[("traceparent", future)])).is_some());
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Any header text: parsed or refused, never a panic, and what is
        /// taken is written back as it was read (version 00).
        #[test]
        fn any_traceparent_is_parsed_or_refused(
            text in "0[0-9a-f]-[0-9a-f]{32}-[0-9a-f]{16}-0[01]|[0-9a-f-]{0,70}|\\PC{0,80}"
        ) {
            if let Some(context) = parse_traceparent(text.as_bytes()) {
                proptest::prop_assert!(context.trace_id != [0; 16] && context.span_id != [0; 8]);
                if text.starts_with("00-") && (text.ends_with("-00") || text.ends_with("-01")) {
                    proptest::prop_assert_eq!(context.traceparent(), text.clone());
                }
            }
            let _ = well_formed_tracestate(&text);
        }

        #[test]
        fn written_contexts_read_back(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) {
            let context = SpanContext { trace_id, span_id, sampled, trace_state: None };
            let read = parse_traceparent(context.traceparent().as_bytes());
            if trace_id == [0; 16] || span_id == [0; 8] {
                proptest::prop_assert!(read.is_none());
            } else {
                proptest::prop_assert_eq!(read, Some(context));
            }
        }
    }

    /// A served call with a malformed `traceparent` gets a span of its own
    /// trace, and what the server sends on from inside it carries that
    /// trace, not the header's text.
    #[test]
    fn a_malformed_traceparent_is_not_propagated() {
        let (subscriber, _spans) = traced(1.0);
        tracing::subscriber::with_default(subscriber, || {
            let forged = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
            let request = http::Request::builder()
                .header("traceparent", forged)
                .header("tracestate", "x=y")
                .uri("/berth.test.v1.Test/Call")
                .body(())
                .unwrap();
            let span = ServerSpan.make_span(&request);
            let mut sent = MetadataMap::new();
            inject(&span, &mut sent);
            let traceparent = sent
                .get("traceparent")
                .expect("the served span is traced")
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                !traceparent.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{traceparent}"
            );
            assert!(sent.get("tracestate").is_none(), "{sent:?}");

            // A valid one is joined: the same trace, this span its child.
            let request = http::Request::builder()
                .header("traceparent", VALID)
                .uri("/berth.test.v1.Test/Call")
                .body(())
                .unwrap();
            let span = ServerSpan.make_span(&request);
            let mut sent = MetadataMap::new();
            inject(&span, &mut sent);
            let traceparent = sent.get("traceparent").unwrap().to_str().unwrap();
            assert!(
                traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                    && !traceparent.contains("00f067aa0ba902b7"),
                "{traceparent}"
            );
        });
    }

    /// A span is sampled when exported: not with no layer, nor when the
    /// sampler leaves its trace out.
    #[test]
    fn a_span_is_sampled_only_when_exported() {
        assert!(!is_sampled(&tracing::info_span!("untraced")));
        for (ratio, sampled) in [(1.0, true), (0.0, false)] {
            let (subscriber, _spans) = traced(ratio);
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!("call");
                assert_eq!(is_sampled(&span), sampled);
                // Not sampled, its context still goes on (flags 00).
                let mut sent = HeaderMap::new();
                inject_http(&span, &mut sent);
                let traceparent = sent.get("traceparent").unwrap().to_str().unwrap();
                assert!(traceparent.ends_with(if sampled { "-01" } else { "-00" }));
            });
        }
    }

    /// An HTTP request's span joins the `traceparent` it carries; what the
    /// handler sends on (an upstream request's headers) carries that trace;
    /// a malformed one starts a trace of its own, and no request fails for it.
    #[tokio::test]
    async fn an_http_request_joins_its_traceparent() {
        use tower::ServiceExt as _;
        let (subscriber, _spans) = traced(1.0);
        let _default = tracing::subscriber::set_default(subscriber);
        // The handler answers with the traceparent it would send upstream.
        let router = axum::Router::new()
            .route(
                "/call",
                axum::routing::post(|| async {
                    let mut upstream = HeaderMap::new();
                    DirectSpan::in_current(String::new, SpanKind::Client, &[])
                        .inject_http(&mut upstream);
                    upstream
                        .get("traceparent")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()
                }),
            )
            .layer(axum::middleware::from_fn(traced_http));
        let sent = |traceparent: &'static str| {
            let router = router.clone();
            async move {
                let request = http::Request::post("/call")
                    .header("traceparent", traceparent)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let response = router.oneshot(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let body = axum::body::to_bytes(response.into_body(), 1024)
                    .await
                    .unwrap();
                String::from_utf8(body.to_vec()).unwrap()
            }
        };
        let joined = sent(VALID).await;
        assert!(
            joined.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !joined.contains("00f067aa0ba902b7"),
            "{joined}"
        );
        let own = sent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").await;
        assert!(
            own.starts_with("00-") && !own.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{own}"
        );
    }

    /// An HTTP request's span is a server span named by its method, with
    /// its path and status, the remote caller's child, and the parent of
    /// the spans its handler begins; a 5xx makes it an error, a 4xx not.
    #[tokio::test]
    async fn an_http_request_s_span_describes_it_and_parents_its_handler_s_spans() {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ExportedKind;
        use tower::ServiceExt as _;

        use crate::span_layer::testing::{attribute, named};
        let (subscriber, exports) = traced(1.0);
        let _default = tracing::subscriber::set_default(subscriber);
        let router = axum::Router::new()
            .route(
                "/ok",
                axum::routing::post(|| async {
                    // Begun across an await, as a handler's are.
                    tokio::task::yield_now().await;
                    let _operation =
                        DirectSpan::in_current(|| "handled".into(), SpanKind::Client, &[]);
                    tokio::task::yield_now().await;
                }),
            )
            .route(
                "/broken",
                axum::routing::get(|| async { http::StatusCode::BAD_GATEWAY }),
            )
            .route(
                "/refused",
                axum::routing::get(|| async { http::StatusCode::FORBIDDEN }),
            )
            .layer(axum::middleware::from_fn(traced_http));
        for (method, path, traceparent) in [
            ("POST", "/ok", Some(VALID)),
            ("GET", "/broken", None),
            ("GET", "/refused", None),
        ] {
            let mut request = http::Request::builder().method(method).uri(path);
            if let Some(traceparent) = traceparent {
                request = request.header("traceparent", traceparent);
            }
            let request = request.body(axum::body::Body::empty()).unwrap();
            router.clone().oneshot(request).await.unwrap();
        }
        let spans = exports.spans();
        let path = |path: &str| {
            spans
                .iter()
                .find(|span| attribute(span, "url.path") == Some(Any::StringValue(path.into())))
                .unwrap_or_else(|| panic!("no span of {path} in {spans:?}"))
        };
        let served = path("/ok");
        assert_eq!(served.name, "POST");
        assert_eq!(served.kind, ExportedKind::Server as i32);
        assert_eq!(
            attribute(served, "http.request.method"),
            Some(Any::StringValue("POST".into()))
        );
        assert_eq!(
            attribute(served, "http.response.status_code"),
            Some(Any::IntValue(200))
        );
        assert_eq!(
            served.parent_span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(served.flags, 0x300, "the parent is remote");
        let handled = named(&spans, "handled");
        assert_eq!(handled.trace_id, served.trace_id);
        assert_eq!(handled.parent_span_id, served.span_id);
        assert_eq!(handled.flags & 0x200, 0, "its parent is local");
        let broken = path("/broken");
        assert_eq!(broken.name, "GET");
        assert!(broken.parent_span_id.is_empty());
        assert_eq!(broken.status.as_ref().map(|s| s.code), Some(2));
        let refused = path("/refused");
        assert!(refused.status.as_ref().is_none_or(|s| s.code != 2));
        assert_eq!(spans.len(), 4, "{spans:?}");
    }
}
