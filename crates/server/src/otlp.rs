//! OTLP's protobuf encoding, written straight from what a span records:
//! each attribute is encoded as it is recorded, each span as it ends, and
//! an export request is the spans' bytes behind a resource and a scope.
//! Building the SDK's span objects and converting them to the protocol's
//! message types cost more CPU per request than the proxy's own work could
//! afford (issue #20); here a span is one buffer, never decoded again.
//!
//! Field numbers are those of opentelemetry-proto's `trace.proto` and
//! `common.proto` (v1); the tests decode what is written with that crate's
//! types.

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

impl SpanKind {
    /// The value of a span's `otel.kind` field.
    pub fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "internal" => Self::Internal,
            "server" => Self::Server,
            "client" => Self::Client,
            "producer" => Self::Producer,
            "consumer" => Self::Consumer,
            _ => return None,
        })
    }
}

/// An attribute's value, as `AnyValue` holds it.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    StrArray(&'a [&'a str]),
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    // 7 bits per byte; 0 takes one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// The encoded length of a length-delimited field (of a one-byte tag)
/// holding `len` bytes.
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

/// A length-delimited field's header.
fn len_header(out: &mut Vec<u8>, field: u32, len: usize) {
    tag(out, field, LEN);
    varint(out, len as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    len_header(out, field, bytes.len());
    out.extend_from_slice(bytes);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, value: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    tag(out, field, VARINT);
    varint(out, value);
}

/// The encoded length of `AnyValue` holding `value`.
fn any_value_len(value: Value<'_>) -> usize {
    match value {
        Value::Str(s) => len_field(s.len()),
        Value::Bool(_) => 2,
        Value::Int(i) => 1 + varint_len(i as u64),
        Value::Double(_) => 9,
        Value::StrArray(items) => {
            // ArrayValue { repeated AnyValue values = 1 }
            let array: usize = items
                .iter()
                .map(|item| len_field(any_value_len(Value::Str(item))))
                .sum();
            len_field(array)
        }
    }
}

fn any_value(out: &mut Vec<u8>, value: Value<'_>) {
    match value {
        Value::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Value::Bool(b) => varint_field(out, 2, u64::from(b)),
        Value::Int(i) => varint_field(out, 3, i as u64),
        Value::Double(d) => fixed64_field(out, 4, d.to_bits()),
        Value::StrArray(items) => {
            let array: usize = items
                .iter()
                .map(|item| len_field(any_value_len(Value::Str(item))))
                .sum();
            len_header(out, 5, array);
            for item in items {
                len_header(out, 1, any_value_len(Value::Str(item)));
                any_value(out, Value::Str(item));
            }
        }
    }
}

/// Appends a `KeyValue` as field `field` of the message being written
/// (a span's, an event's or a link's attributes).
pub fn attribute(out: &mut Vec<u8>, field: u32, key: &str, value: Value<'_>) {
    let value_len = any_value_len(value);
    let key_value = len_field(key.len()) + 1 + varint_len(value_len as u64);
    len_header(out, field, key_value + value_len);
    bytes_field(out, 1, key.as_bytes());
    len_header(out, 2, value_len);
    any_value(out, value);
}

/// `Span.attributes`.
pub const SPAN_ATTRIBUTES: u32 = 9;
/// `Span.Event.attributes`.
pub const EVENT_ATTRIBUTES: u32 = 3;

/// Appends a `Span.Event` (field 11 of a span): its time, name and the
/// attributes already encoded as [`EVENT_ATTRIBUTES`].
pub fn event(out: &mut Vec<u8>, time_unix_nano: u64, name: &str, attributes: &[u8]) {
    let len = 9 + len_field(name.len()) + attributes.len();
    len_header(out, 11, len);
    fixed64_field(out, 1, time_unix_nano);
    bytes_field(out, 2, name.as_bytes());
    out.extend_from_slice(attributes);
}

/// Appends a `Span.Link` (field 13 of a span) to another trace's span.
pub fn link(out: &mut Vec<u8>, trace_id: [u8; 16], span_id: [u8; 8], trace_state: &str) {
    let state = if trace_state.is_empty() {
        0
    } else {
        len_field(trace_state.len())
    };
    len_header(out, 13, 18 + 10 + state);
    bytes_field(out, 1, &trace_id);
    bytes_field(out, 2, &span_id);
    if !trace_state.is_empty() {
        bytes_field(out, 3, trace_state.as_bytes());
    }
}

/// A span's fixed parts; its attributes, events and links come encoded.
#[derive(Debug)]
pub struct SpanHeader<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub trace_state: &'a str,
    pub parent_span_id: Option<[u8; 8]>,
    pub name: &'a str,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// `Status`: set to error, with its message when one was given.
    pub error: Option<&'a str>,
    /// Whether the parent is in another process (`SpanFlags`' bits 8 and 9).
    pub remote_parent: bool,
    /// Attributes, events and links left out (the span's limits).
    pub dropped: [u32; 3],
}

/// The encoded length of a `Span` message with this header and
/// `recorded` bytes of attributes, events and links.
fn span_len(header: &SpanHeader<'_>, recorded: usize) -> usize {
    let mut len = recorded
        + len_field(16)
        + len_field(8)
        + len_field(header.name.len())
        + 1
        + varint_len(header.kind as u64)
        // start and end (fixed64), flags (field 16: a two-byte tag, fixed32)
        + 2 * 9
        + 6;
    if !header.trace_state.is_empty() {
        len += len_field(header.trace_state.len());
    }
    if header.parent_span_id.is_some() {
        len += len_field(8);
    }
    for dropped in header.dropped {
        if dropped > 0 {
            len += 1 + varint_len(u64::from(dropped));
        }
    }
    if let Some(message) = header.error {
        len += len_field(status_len(message));
    }
    len
}

/// The encoded length of an error `Status` with `message`.
fn status_len(message: &str) -> usize {
    let message_len = if message.is_empty() {
        0
    } else {
        len_field(message.len())
    };
    message_len + 2
}

/// Appends a whole span, as the `spans` field of a `ScopeSpans` being
/// written: what it recorded (attributes, events and links, already
/// encoded), then its header's fields (protobuf fields may come in any
/// order). Spans queued for export are one such buffer, which
/// [`export_request`] wraps as it is: ending a span copies what it recorded
/// once, into the queue.
pub fn push_span(spans: &mut Vec<u8>, header: &SpanHeader<'_>, recorded: &[u8]) {
    let len = span_len(header, recorded.len());
    spans.reserve(len_field(len));
    len_header(spans, 2, len);
    let start = spans.len();
    spans.extend_from_slice(recorded);
    bytes_field(spans, 1, &header.trace_id);
    bytes_field(spans, 2, &header.span_id);
    if !header.trace_state.is_empty() {
        bytes_field(spans, 3, header.trace_state.as_bytes());
    }
    if let Some(parent) = header.parent_span_id {
        bytes_field(spans, 4, &parent);
    }
    bytes_field(spans, 5, header.name.as_bytes());
    varint_field(spans, 6, header.kind as u64);
    fixed64_field(spans, 7, header.start_unix_nano);
    fixed64_field(spans, 8, header.end_unix_nano);
    // dropped_attributes_count, dropped_events_count, dropped_links_count
    for (field, dropped) in [10, 12, 14].into_iter().zip(header.dropped) {
        if dropped > 0 {
            varint_field(spans, field, u64::from(dropped));
        }
    }
    if let Some(message) = header.error {
        // Status { string message = 2; StatusCode code = 3 (ERROR = 2) }
        len_header(spans, 15, status_len(message));
        if !message.is_empty() {
            bytes_field(spans, 2, message.as_bytes());
        }
        varint_field(spans, 3, 2);
    }
    // SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE (0x100), and IS_REMOTE (0x200).
    let flags: u32 = 0x100 | if header.remote_parent { 0x200 } else { 0 };
    tag(spans, 16, FIXED32);
    spans.extend_from_slice(&flags.to_le_bytes());
    debug_assert_eq!(
        spans.len() - start,
        len,
        "span_len disagrees with push_span"
    );
}

/// Attributes encoded once for many spans: those of an upstream
/// deployment, which every try on it carries. Only plain attributes: an
/// `otel.*` field (name, kind, status) is not interpreted here.
#[derive(Debug, Clone, Default)]
pub struct EncodedAttributes {
    bytes: Vec<u8>,
    count: u32,
}

impl EncodedAttributes {
    pub fn new(attributes: &[(&str, Value<'_>)]) -> Self {
        let mut bytes = Vec::new();
        for &(key, value) in attributes {
            debug_assert!(!key.starts_with("otel."), "{key} is not a plain attribute");
            attribute(&mut bytes, SPAN_ATTRIBUTES, key, value);
        }
        Self {
            bytes,
            count: u32::try_from(attributes.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }
}

/// Where the `count`th span of `spans` (as [`push_span`] wrote them)
/// ends, or None when there are fewer.
pub fn scope_spans_end(spans: &[u8], count: usize) -> Option<usize> {
    let mut at = 0;
    for _ in 0..count {
        // The tag (one byte, field 2) and the length, a varint.
        at += 1;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = *spans.get(at)?;
            at += 1;
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte < 0x80 {
                break;
            }
        }
        at = at.checked_add(len).filter(|&end| end <= spans.len())?;
    }
    Some(at)
}

/// An `ExportTraceServiceRequest` of `spans` (as [`push_span`] wrote
/// them), from the service named `service`.
pub fn export_request(service: &str, spans: &[u8]) -> Vec<u8> {
    // Resource { repeated KeyValue attributes = 1 }
    let mut resource = Vec::with_capacity(32 + service.len());
    attribute(&mut resource, 1, "service.name", Value::Str(service));
    // InstrumentationScope { string name = 1 }
    let scope = len_field(service.len());
    // ScopeSpans { scope = 1; repeated Span spans = 2 }
    let scope_spans = len_field(scope) + spans.len();
    // ResourceSpans { resource = 1; repeated ScopeSpans scope_spans = 2 }
    let resource_spans = len_field(resource.len()) + len_field(scope_spans);
    let mut out = Vec::with_capacity(len_field(resource_spans));
    len_header(&mut out, 1, resource_spans);
    bytes_field(&mut out, 1, &resource);
    len_header(&mut out, 2, scope_spans);
    len_header(&mut out, 1, scope);
    bytes_field(&mut out, 1, service.as_bytes());
    out.extend_from_slice(spans);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message as _;

    #[test]
    fn varint_lengths_match_what_is_written() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Queued spans of any sizes are found where they end, and a
        /// buffer cut short never reads past its end.
        #[test]
        fn scope_spans_end_where_they_were_pushed(
            spans in proptest::collection::vec(
                (proptest::collection::vec(0u8..=255, 0..300), "[a-z ]{0,200}"),
                0..20,
            ),
            cut in 0usize..8000,
        ) {
            let mut queued = Vec::new();
            let mut ends = vec![0];
            for (recorded, name) in &spans {
                let header = SpanHeader {
                    trace_id: [1; 16],
                    span_id: [2; 8],
                    trace_state: "",
                    parent_span_id: None,
                    name,
                    kind: SpanKind::Internal,
                    start_unix_nano: 0,
                    end_unix_nano: 0,
                    error: (name.len() % 2 == 1).then_some(name.as_str()),
                    remote_parent: false,
                    dropped: [0, u32::try_from(recorded.len()).unwrap(), 0],
                };
                push_span(&mut queued, &header, recorded);
                ends.push(queued.len());
            }
            for (count, end) in ends.iter().enumerate() {
                proptest::prop_assert_eq!(scope_spans_end(&queued, count), Some(*end));
            }
            proptest::prop_assert_eq!(scope_spans_end(&queued, spans.len() + 1), None);
            let short = &queued[..cut.min(queued.len())];
            for (count, &end) in ends.iter().enumerate() {
                let found = scope_spans_end(short, count);
                proptest::prop_assert!(found.is_none_or(|found| found <= short.len() && found == end));
            }
        }
    }

    #[test]
    fn spans_decode_as_opentelemetry_proto_reads_them() {
        let mut recorded = Vec::new();
        attribute(
            &mut recorded,
            SPAN_ATTRIBUTES,
            "gen_ai.request.model",
            Value::Str("smollm2"),
        );
        attribute(
            &mut recorded,
            SPAN_ATTRIBUTES,
            "berth.llm.cache_hit",
            Value::Bool(true),
        );
        attribute(
            &mut recorded,
            SPAN_ATTRIBUTES,
            "gen_ai.usage.input_tokens",
            Value::Int(-3),
        );
        attribute(&mut recorded, SPAN_ATTRIBUTES, "ratio", Value::Double(0.25));
        let long = "x".repeat(200);
        let reasons = ["stop", long.as_str()];
        attribute(
            &mut recorded,
            SPAN_ATTRIBUTES,
            "reasons",
            Value::StrArray(&reasons),
        );
        let mut event_attributes = Vec::new();
        attribute(
            &mut event_attributes,
            EVENT_ATTRIBUTES,
            "level",
            Value::Str("WARN"),
        );
        event(&mut recorded, 7, "upstream slow", &event_attributes);
        link(&mut recorded, [9; 16], [8; 8], "a=b");
        let header = SpanHeader {
            trace_id: [1; 16],
            span_id: [2; 8],
            trace_state: "vendor=abc",
            parent_span_id: Some([3; 8]),
            name: "chat smollm2",
            kind: SpanKind::Client,
            start_unix_nano: 1_000,
            end_unix_nano: 2_000,
            error: Some("boom"),
            remote_parent: true,
            dropped: [1, 2, 3],
        };
        let mut spans = Vec::new();
        push_span(&mut spans, &header, &recorded);
        let first_end = spans.len();
        push_span(
            &mut spans,
            &SpanHeader {
                error: None,
                parent_span_id: None,
                dropped: [0; 3],
                ..header
            },
            &[],
        );
        assert_eq!(scope_spans_end(&spans, 0), Some(0));
        assert_eq!(scope_spans_end(&spans, 1), Some(first_end));
        assert_eq!(scope_spans_end(&spans, 2), Some(spans.len()));
        assert_eq!(scope_spans_end(&spans, 3), None);
        assert_eq!(scope_spans_end(&spans[..spans.len() - 1], 2), None);
        let request =
            ExportTraceServiceRequest::decode(&export_request("berth-llm-proxy", &spans)[..])
                .unwrap();

        let resource_spans = &request.resource_spans[0];
        let service = &resource_spans.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        assert_eq!(
            service.value.as_ref().unwrap().value,
            Some(Any::StringValue("berth-llm-proxy".into()))
        );
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "berth-llm-proxy");
        let [first, second] = &scope_spans.spans[..] else {
            panic!("{scope_spans:?}")
        };
        assert_eq!(
            (first.trace_id.as_slice(), first.span_id.as_slice()),
            (&[1; 16][..], &[2; 8][..])
        );
        assert_eq!(first.parent_span_id, vec![3; 8]);
        assert_eq!(first.trace_state, "vendor=abc");
        assert_eq!(first.name, "chat smollm2");
        assert_eq!(first.kind, SpanKind::Client as i32);
        assert_eq!(
            (first.start_time_unix_nano, first.end_time_unix_nano),
            (1_000, 2_000)
        );
        assert_eq!(first.flags, 0x300);
        assert_eq!(
            (
                first.dropped_attributes_count,
                first.dropped_events_count,
                first.dropped_links_count
            ),
            (1, 2, 3)
        );
        let values: Vec<_> = first
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert_eq!(
            values[0],
            ("gen_ai.request.model", Any::StringValue("smollm2".into()))
        );
        assert_eq!(values[1], ("berth.llm.cache_hit", Any::BoolValue(true)));
        assert_eq!(values[2], ("gen_ai.usage.input_tokens", Any::IntValue(-3)));
        assert_eq!(values[3], ("ratio", Any::DoubleValue(0.25)));
        let Any::ArrayValue(array) = &values[4].1 else {
            panic!("{values:?}")
        };
        let items: Vec<_> = array
            .values
            .iter()
            .map(|v| v.value.clone().unwrap())
            .collect();
        assert_eq!(
            items,
            reasons
                .iter()
                .map(|r| Any::StringValue(r.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(first.events[0].name, "upstream slow");
        assert_eq!(first.events[0].time_unix_nano, 7);
        assert_eq!(first.events[0].attributes[0].key, "level");
        assert_eq!(first.links[0].trace_id, vec![9; 16]);
        assert_eq!(first.links[0].trace_state, "a=b");
        let status = first.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "boom"));
        assert!(
            second.status.is_none()
                && second.parent_span_id.is_empty()
                && second.attributes.is_empty()
        );
        assert_eq!(second.flags, 0x300);
    }
}
