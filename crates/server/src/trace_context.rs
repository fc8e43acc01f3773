//! W3C trace context (`traceparent`, `tracestate`) across gRPC and HTTP
//! hops, so that one campaign run is one trace from the orchestrator down
//! to the agent's exec and the power sampler's session, and an LLM request
//! one trace from its client through the proxy to the upstream. Servers
//! read it from the call's metadata or the request's headers and make the
//! call's span its child ([`ServerSpan`] for gRPC, [`traced_http`] for the
//! HTTP APIs); berth's clients write the current span's context into every
//! call they send ([`inject`], from [`crate::client`]; [`inject_http`] for
//! the LLM proxy's upstream requests). A malformed header is ignored: the
//! call's span starts a trace of its own and nothing of the header is
//! passed on.

use http::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tower_http::trace::MakeSpan;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans made for each served request (gRPC calls, HTTP
/// requests, the LLM proxy's GenAI operations): the default log filter
/// (`crate::telemetry`) keeps it out of the log, where these spans would
/// only prefix each line, so with no exporter they are never built and a
/// request costs what it did untraced. They are exported whatever the log
/// filter says.
pub const REQUEST_SPAN_TARGET: &str = module_path!();

/// The remote parent named by `headers`, when they name a valid one.
pub fn extract(headers: &HeaderMap) -> Option<Context> {
    let mut traceparents = headers.get_all("traceparent").iter();
    let (Some(traceparent), None) = (traceparents.next(), traceparents.next()) else {
        // None, or several (which the W3C spec makes invalid).
        return None;
    };
    if !well_formed(traceparent.as_bytes()) {
        return None;
    }
    // From an empty context, not the current one: a header that does not
    // parse must leave no parent at all.
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// `traceparent` as the W3C spec writes it: `vv-<32 hex>-<16 hex>-ff`,
/// lowercase, version `ff` forbidden, version `00` with nothing after the
/// flags. The propagator's own parser reads ids of any length (a short
/// trace id is taken zero-padded), so the lengths are checked here.
fn well_formed(value: &[u8]) -> bool {
    let hex = |part: &[u8], len: usize| {
        part.len() == len && part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let mut parts = value.splitn(5, |b| *b == b'-');
    let (Some(version), Some(trace_id), Some(span_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest = parts.next();
    hex(version, 2)
        && version != b"ff"
        && !(version == b"00" && rest.is_some())
        && hex(trace_id, 32)
        && hex(span_id, 16)
        && hex(flags, 2)
}

/// Makes `span` a child of the remote parent `headers` name, when they name
/// a valid one; otherwise it stays the root of a trace of its own.
pub fn set_parent(span: &Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    if let Some(parent) = extract(headers) {
        // Fails only when no OpenTelemetry layer is installed (nothing is
        // exported, so there is no trace to join) or the span is filtered
        // out: either way there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s trace context into `metadata`; nothing when the span is
/// not traced (no exporter configured, or filtered out).
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    inject_into(
        span,
        &mut NonEmpty(|key: &str, value: String| {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value),
            ) {
                metadata.insert(key, value);
            }
        }),
    );
}

/// Writes `span`'s trace context into the headers of an HTTP request;
/// nothing when the span is not traced.
pub fn inject_http(span: &Span, headers: &mut HeaderMap) {
    inject_into(
        span,
        &mut NonEmpty(|key: &str, value: String| {
            if let (Ok(key), Ok(value)) = (
                http::HeaderName::from_bytes(key.as_bytes()),
                http::HeaderValue::try_from(value),
            ) {
                headers.insert(key, value);
            }
        }),
    );
}

fn inject_into(span: &Span, injector: &mut dyn Injector) {
    // A disabled span (no exporter) has no context: skip the lookup.
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, injector);
    }
}

/// Whether `span` is exported: traced (an exporter is configured and the
/// span is not filtered out) and sampled. A span that is not can skip the
/// work only its attributes would use. It starts the span's OpenTelemetry
/// span, as its first child or [`inject`] would.
pub fn is_sampled(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// Sets a string-array attribute on `span`'s exported span (a `tracing`
/// field holds one value only), e.g. `gen_ai.response.finish_reasons`.
pub fn set_string_array(span: &Span, key: &'static str, values: Vec<String>) {
    if span.is_disabled() {
        return;
    }
    let values = values.into_iter().map(Into::into).collect();
    span.set_attribute(
        key,
        opentelemetry::Value::Array(opentelemetry::Array::String(values)),
    );
}

/// Serves an HTTP request in a span of its own, at INFO (see
/// [`REQUEST_SPAN_TARGET`]), named by its method as the HTTP semantic
/// conventions name a span without a route, a child of the caller's span
/// when the request carries a valid `traceparent`. For an axum router:
/// `.layer(axum::middleware::from_fn(traced_http))`. A streamed answer's
/// span ends at its headers; what the stream does after is the spans'
/// made inside it (the LLM proxy's GenAI span lasts to the stream's end).
pub async fn traced_http(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let method = request.method();
    let span = tracing::info_span!(
        target: REQUEST_SPAN_TARGET,
        "http",
        otel.name = method.as_str(),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method.as_str(),
        url.path = request.uri().path(),
        http.response.status_code = Empty,
    );
    set_parent(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    // Server spans are errors for 5xx only: a 4xx is the client's.
    if status.is_server_error() {
        span.record("otel.status_code", "error");
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

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// An injector writing through `F` what is worth sending: the propagator
/// writes only its own two keys, and an empty `tracestate` says nothing.
/// `F` drops a value that is no valid header rather than send it broken.
struct NonEmpty<F>(F);

impl<F: FnMut(&str, String)> Injector for NonEmpty<F> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            (self.0)(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};

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
        let cx = extract(&headers(&[
            ("traceparent", VALID),
            ("tracestate", "vendor=abc"),
        ]))
        .expect("a valid traceparent");
        let parent = cx.span().span_context().clone();
        assert_eq!(
            parent.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            parent.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(parent.is_remote() && parent.is_sampled());
        assert_eq!(parent.trace_state().get("vendor"), Some("abc"));
        // A tracestate that does not parse is dropped, the parent kept.
        let cx = extract(&headers(&[
            ("traceparent", VALID),
            ("tracestate", "no pairs"),
        ]))
        .expect("a valid traceparent");
        assert_eq!(cx.span().span_context().trace_state().header(), "");
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

    /// A served call with a malformed `traceparent` gets a span of its own
    /// trace, and what the server sends on from inside it carries that
    /// trace, not the header's text.
    #[test]
    fn a_malformed_traceparent_is_not_propagated() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
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
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::Sampler;
        use tracing_subscriber::layer::SubscriberExt;
        assert!(!is_sampled(&tracing::info_span!("untraced")));
        for (sampler, sampled) in [(Sampler::AlwaysOn, true), (Sampler::AlwaysOff, false)] {
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_sampler(sampler)
                .build();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
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
        use opentelemetry::trace::TracerProvider as _;
        use tower::ServiceExt as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _default = tracing::subscriber::set_default(subscriber);
        // The handler answers with the traceparent it would send upstream.
        let router = axum::Router::new()
            .route(
                "/call",
                axum::routing::post(|| async {
                    let mut upstream = HeaderMap::new();
                    inject_http(&Span::current(), &mut upstream);
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
}
