//! The `tracing` layer that exports spans over OTLP: each span the layer's
//! filter lets through records, in an extension of its own, its trace
//! context and its attributes already encoded ([`crate::otlp`]), and when it
//! closes, sampled, it goes to the export queue ([`crate::span_export`]) as
//! one buffer. Its parent is the nearest traced span above it, or the
//! remote caller that [`crate::trace_context::set_parent`] names.
//!
//! It does what `tracing-opentelemetry` with the SDK did for berth at a
//! fraction of the CPU per span (issue #20): no SDK span object, no
//! attribute converted twice, nothing done at a span's enter or exit.
//!
//! Fields named as `tracing-opentelemetry` names them set what is not an
//! attribute: `otel.name` (the span's name; otherwise the `tracing` span's
//! name), `otel.kind` (`server`, `client`, …), `otel.status_code`
//! (`error`) and `otel.status_description`. Warnings and errors inside a
//! sampled span are its events (an error also sets its status).

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Span, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::otlp::{self, EncodedAttributes, SpanHeader, SpanKind, Value};
use crate::span_export::SpanExport;
use crate::trace_context::SpanContext;

/// Parent-based ratio sampling: a span with a parent (local or remote)
/// takes its parent's decision; a trace started here is kept when its
/// trace id falls below `ratio` of the id space (OpenTelemetry's
/// `TraceIdRatioBased`, so every service that sees the id decides alike).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// Kept when the trace id's low 63 bits are below this.
    bound: u64,
}

impl Sampler {
    /// `ratio` from 0.0 (none) to 1.0 (every trace).
    pub fn ratio(ratio: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(format!(
                "server.trace_sample_ratio = {ratio}: expected a share from 0.0 to 1.0"
            ));
        }
        // 1.0 gives 2^63: above every id's low 63 bits.
        Ok(Self {
            bound: (ratio * (1u64 << 63) as f64) as u64,
        })
    }

    fn samples(self, trace_id: [u8; 16]) -> bool {
        let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default());
        (low >> 1) < self.bound
    }
}

/// The most attributes, events and links one span keeps (OpenTelemetry's
/// default span limits): a span that lives long (a run's, an exec's) and
/// logs warning after warning grows no further; what is left out is
/// counted in the span's `dropped_*_count`.
const MOST_PER_SPAN: u32 = 128;

/// Kept within [`MOST_PER_SPAN`], and what was not.
#[derive(Debug, Default, Clone, Copy)]
struct Kept {
    kept: u32,
    dropped: u32,
}

impl Kept {
    /// Whether one more is kept; counts it either way.
    fn admit(&mut self) -> bool {
        if self.kept < MOST_PER_SPAN {
            self.kept += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Whether `count` more are kept, all of them; counts them either way.
    fn admit_all(&mut self, count: u32) -> bool {
        if self.kept.saturating_add(count) <= MOST_PER_SPAN {
            self.kept += count;
            true
        } else {
            self.dropped = self.dropped.saturating_add(count);
            false
        }
    }
}

/// What a traced span holds until it closes.
#[derive(Debug)]
pub(crate) struct Recording {
    pub(crate) context: SpanContext,
    parent_span_id: Option<[u8; 8]>,
    remote_parent: bool,
    /// `otel.name`, when given.
    name: Option<String>,
    kind: SpanKind,
    start_unix_nano: u64,
    /// Attributes, events and links, as fields of the OTLP `Span`.
    recorded: Vec<u8>,
    error: bool,
    status_message: Option<String>,
    attributes: Kept,
    events: Kept,
    links: Kept,
}

impl Recording {
    /// A span's recording as it begins: a child of `parent`, or the root of
    /// a trace of its own that `sampler` keeps or not.
    pub(crate) fn begin(parent: Option<SpanContext>, sampler: Sampler) -> Self {
        let span_id = new_span_id();
        let (context, parent_span_id) = match parent {
            Some(parent) => {
                let parent_span_id = Some(parent.span_id);
                (SpanContext { span_id, ..parent }, parent_span_id)
            }
            None => {
                let trace_id = new_trace_id();
                let context = SpanContext {
                    trace_id,
                    span_id,
                    sampled: sampler.samples(trace_id),
                    trace_state: None,
                };
                (context, None)
            }
        };
        let mut recording = Self {
            context,
            parent_span_id,
            remote_parent: false,
            name: None,
            kind: SpanKind::Internal,
            start_unix_nano: now_unix_nano(),
            recorded: Vec::new(),
            error: false,
            status_message: None,
            attributes: Kept::default(),
            events: Kept::default(),
            links: Kept::default(),
        };
        if recording.records() {
            recording.recorded.reserve(256);
        }
        recording
    }

    /// The span as it ends, queued for export (named `name` unless it was
    /// given `otel.name`) when it is sampled.
    pub(crate) fn finish(self, name: &str, export: &SpanExport) {
        if !self.context.sampled {
            return;
        }
        let header = SpanHeader {
            trace_id: self.context.trace_id,
            span_id: self.context.span_id,
            trace_state: self.context.trace_state.as_deref().unwrap_or_default(),
            parent_span_id: self.parent_span_id,
            name: self.name.as_deref().unwrap_or(name),
            kind: self.kind,
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: now_unix_nano(),
            error: self
                .error
                .then(|| self.status_message.as_deref().unwrap_or_default()),
            remote_parent: self.remote_parent,
            dropped: [
                self.attributes.dropped,
                self.events.dropped,
                self.links.dropped,
            ],
        };
        export.push(&header, &self.recorded);
    }

    /// Whether what the span records is kept: it is sampled, or it is a
    /// root, whose decision a remote parent may still change.
    fn records(&self) -> bool {
        self.context.sampled || self.parent_span_id.is_none()
    }

    /// Makes the span the child of a caller in another process, taking
    /// its trace and its sampling decision.
    pub(crate) fn set_remote_parent(&mut self, parent: SpanContext) {
        self.parent_span_id = Some(parent.span_id);
        self.context = SpanContext {
            span_id: self.context.span_id,
            ..parent
        };
        self.remote_parent = true;
    }

    /// Marks the parent the span began with as a caller in another
    /// process.
    pub(crate) fn mark_parent_remote(&mut self) {
        self.remote_parent = true;
    }

    pub(crate) fn add_link(&mut self, to: &SpanContext) {
        if self.records() && self.links.admit() {
            let state = to.trace_state.as_deref().unwrap_or_default();
            otlp::link(&mut self.recorded, to.trace_id, to.span_id, state);
        }
    }

    /// Attributes encoded beforehand, all kept or (past the span's limit)
    /// all dropped.
    pub(crate) fn set_encoded(&mut self, attributes: &EncodedAttributes) {
        if self.records() && self.attributes.admit_all(attributes.count()) {
            self.recorded.extend_from_slice(attributes.bytes());
        }
    }

    /// An attribute set after the span began, as a field of the span
    /// would set it.
    pub(crate) fn set(&mut self, key: &str, value: Value<'_>) {
        if self.records() {
            self.field(key, value);
        }
    }

    /// The name and kind of a span with no `tracing` span behind it.
    pub(crate) fn set_name(&mut self, name: String, kind: SpanKind) {
        self.name = Some(name);
        self.kind = kind;
    }

    fn field(&mut self, name: &str, value: Value<'_>) {
        match (name, value) {
            ("otel.name", Value::Str(text)) => self.name = Some(text.to_owned()),
            ("otel.kind", Value::Str(text)) => {
                self.kind = SpanKind::parse(text).unwrap_or(self.kind);
            }
            ("otel.status_code", Value::Str(text)) => {
                self.error = text.eq_ignore_ascii_case("error");
            }
            ("otel.status_description" | "otel.status_message", Value::Str(text)) => {
                self.status_message = Some(text.to_owned());
            }
            _ => {
                if self.attributes.admit() {
                    otlp::attribute(&mut self.recorded, otlp::SPAN_ATTRIBUTES, name, value);
                }
            }
        }
    }
}

/// Passes each field's value on as an OTLP value.
trait OnValue {
    fn value(&mut self, field: &Field, value: Value<'_>);

    /// A value formatted (`%` or `?`), which may be kept as it is.
    fn text(&mut self, field: &Field, text: String) {
        self.value(field, Value::Str(&text));
    }
}

/// `tracing`'s visitor over [`OnValue`]: a value shown with `%` or `?` is
/// formatted once, into the string it is exported as.
struct Fields<'a, T>(&'a mut T);

impl<T: OnValue> Visit for Fields<'_, T> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.text(field, format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.value(field, Value::Str(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.value(field, Value::Int(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(value) => self.0.value(field, Value::Int(value)),
            Err(_) => self.0.value(field, Value::Str(&value.to_string())),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.value(field, Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.value(field, Value::Double(value));
    }
}

impl OnValue for Recording {
    fn value(&mut self, field: &Field, value: Value<'_>) {
        self.field(field.name(), value);
    }

    fn text(&mut self, field: &Field, text: String) {
        match field.name() {
            "otel.name" => self.name = Some(text),
            name => self.field(name, Value::Str(&text)),
        }
    }
}

/// An event's message (its name in OTLP) and other fields.
#[derive(Default)]
struct EventFields {
    message: Option<String>,
    attributes: Vec<u8>,
}

impl OnValue for EventFields {
    fn text(&mut self, field: &Field, text: String) {
        match field.name() {
            "message" => self.message = Some(text),
            _ => self.value(field, Value::Str(&text)),
        }
    }

    fn value(&mut self, field: &Field, value: Value<'_>) {
        match (field.name(), value) {
            ("message", Value::Str(text)) => self.message = Some(text.to_owned()),
            (name, value) => {
                otlp::attribute(&mut self.attributes, otlp::EVENT_ATTRIBUTES, name, value)
            }
        }
    }
}

/// The layer; see the module's documentation.
#[derive(Debug)]
pub struct SpanLayer {
    export: Arc<SpanExport>,
    sampler: Sampler,
}

impl SpanLayer {
    pub fn new(export: Arc<SpanExport>, sampler: Sampler) -> Self {
        Self { export, sampler }
    }

    pub(crate) fn export(&self) -> &Arc<SpanExport> {
        &self.export
    }

    pub(crate) fn sampler(&self) -> Sampler {
        self.sampler
    }
}

fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

impl<S> Layer<S> for SpanLayer
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = if let Some(parent) = attrs.parent() {
            ctx.span(parent)
        } else if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            None
        };
        let parent = parent.and_then(|parent| {
            parent
                .extensions()
                .get::<Recording>()
                .map(|r| r.context.clone())
        });
        let mut recording = Recording::begin(parent, self.sampler);
        if recording.records() {
            attrs.record(&mut Fields(&mut recording));
        }
        span.extensions_mut().insert(recording);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(recording) = extensions.get_mut::<Recording>()
            && recording.records()
        {
            values.record(&mut Fields(recording));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(recording) = extensions.get_mut::<Recording>() else {
            return;
        };
        if !recording.records() || !recording.events.admit() {
            return;
        }
        let mut fields = EventFields::default();
        event.record(&mut Fields(&mut fields));
        let level = *event.metadata().level();
        otlp::attribute(
            &mut fields.attributes,
            otlp::EVENT_ATTRIBUTES,
            "level",
            Value::Str(level.as_str()),
        );
        let name = fields
            .message
            .unwrap_or_else(|| event.metadata().name().to_owned());
        otlp::event(
            &mut recording.recorded,
            now_unix_nano(),
            &name,
            &fields.attributes,
        );
        if level == Level::ERROR {
            recording.error = true;
            recording.status_message.get_or_insert(name);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(recording) = span.extensions_mut().remove::<Recording>() else {
            return;
        };
        recording.finish(span.name(), &self.export);
    }
}

/// Runs `f` on `span`'s recording; None when the span is not traced (no
/// exporter, or the layer's filter left it out).
pub(crate) fn with_recording<R>(span: &Span, f: impl FnOnce(&mut Recording) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let span = registry.span(id)?;
        let mut extensions = span.extensions_mut();
        extensions.get_mut::<Recording>().map(f)
    })
    .flatten()
}

/// A subscriber exporting to memory, for tests here and in
/// [`crate::trace_context`].
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::trace::v1::ScopeSpans;
    use opentelemetry_proto::tonic::trace::v1::Span as Exported;
    use prost::Message as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::{Sampler, SpanLayer};
    use crate::span_export::{Batch, ExportConfig, ExportError, Exporter, SpanCounts, SpanExport};

    /// Each batch as it was exported.
    struct Memory(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Exporter for Memory {
        fn export(&mut self, batch: &Batch) -> Result<(), ExportError> {
            self.0.lock().unwrap().push(batch.encoded().to_vec());
            Ok(())
        }
    }

    /// The value of `span`'s attribute `key`.
    pub(crate) fn attribute(span: &Exported, key: &str) -> Option<Any> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    /// The span of `spans` named `name`.
    pub(crate) fn named<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no {name} in {spans:?}"))
    }

    /// The spans a [`traced`] subscriber exported.
    pub(crate) struct Exports {
        export: Arc<SpanExport>,
        spans: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Exports {
        /// Every span ended so far, decoded as a collector reads it.
        pub(crate) fn spans(&self) -> Vec<Exported> {
            self.export.flush().unwrap();
            let batches = self.spans.lock().unwrap();
            // A batch is the `spans` of a `ScopeSpans`, and decodes as one.
            batches
                .iter()
                .flat_map(|batch| ScopeSpans::decode(&batch[..]).unwrap().spans)
                .collect()
        }
    }

    /// A registry with the span layer at `ratio`, as `telemetry::init`
    /// builds it (the same filter), exporting to memory.
    pub(crate) fn traced(ratio: f64) -> (impl tracing::Subscriber + Send + Sync, Exports) {
        use tracing_subscriber::Layer as _;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let export = Arc::new(
            SpanExport::start(
                Memory(spans.clone()),
                &ExportConfig::default(),
                SpanCounts::default(),
            )
            .unwrap(),
        );
        let layer = SpanLayer::new(export.clone(), Sampler::ratio(ratio).unwrap())
            .with_filter(crate::telemetry::exported_filter());
        (
            tracing_subscriber::registry().with(layer),
            Exports { export, spans },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::{attribute, named, traced};
    use crate::direct_span::DirectSpan;
    use crate::trace_context::{self, SpanContext};
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;

    #[test]
    fn spans_carry_their_names_kinds_attributes_and_parents() {
        let (subscriber, exports) = traced(1.0);
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!(
                "http",
                otel.name = "POST",
                otel.kind = "server",
                url.path = "/v1/chat/completions",
                http.response.status_code = tracing::field::Empty,
            );
            let _entered = request.enter();
            let operation = tracing::info_span!(
                "gen_ai",
                otel.name = %format_args!("chat {}", "smollm2"),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                berth.llm.cache_hit = false,
                ratio = 0.5,
            );
            operation.record("gen_ai.usage.input_tokens", 12u64);
            operation.record("otel.status_code", "error");
            operation.in_scope(|| tracing::warn!(attempt = 2, "upstream slow"));
            // Below the exporter's level: neither a span nor an event.
            operation.in_scope(|| {
                let _debug = tracing::debug_span!("detail").entered();
                tracing::info!("not an event");
            });
            drop(operation);
            request.record("http.response.status_code", 200);
        });
        let spans = exports.spans();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let request = named(&spans, "POST");
        let operation = named(&spans, "chat smollm2");
        assert_eq!((request.kind, operation.kind), (2, 3));
        assert_eq!(operation.trace_id, request.trace_id);
        assert_eq!(operation.parent_span_id, request.span_id);
        assert!(request.parent_span_id.is_empty());
        assert!(request.start_time_unix_nano <= operation.start_time_unix_nano);
        assert!(operation.end_time_unix_nano <= request.end_time_unix_nano);
        assert_eq!(
            attribute(request, "url.path"),
            Some(Any::StringValue("/v1/chat/completions".into()))
        );
        assert_eq!(
            attribute(request, "http.response.status_code"),
            Some(Any::IntValue(200))
        );
        assert_eq!(
            attribute(operation, "gen_ai.usage.input_tokens"),
            Some(Any::IntValue(12))
        );
        assert_eq!(
            attribute(operation, "berth.llm.cache_hit"),
            Some(Any::BoolValue(false))
        );
        assert_eq!(attribute(operation, "ratio"), Some(Any::DoubleValue(0.5)));
        // What sets the span's name, kind and status is no attribute.
        assert!(
            operation
                .attributes
                .iter()
                .all(|kv| !kv.key.starts_with("otel.")),
            "{operation:?}"
        );
        assert_eq!(operation.status.as_ref().map(|s| s.code), Some(2));
        assert!(request.status.is_none());
        let [event] = &operation.events[..] else {
            panic!("{operation:?}")
        };
        assert_eq!(event.name, "upstream slow");
        assert!(event.attributes.iter().any(|kv| kv.key == "attempt"));
        assert!(event.attributes.iter().any(|kv| kv.key == "level"));
    }

    #[test]
    fn a_remote_parent_s_trace_and_decision_are_taken() {
        let (subscriber, exports) = traced(0.0);
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", caller.parse().unwrap());
            headers.insert("tracestate", "vendor=abc".parse().unwrap());
            // Ratio 0 would keep no trace of its own: the caller's is kept.
            let served = tracing::info_span!("served", berth.kept = true);
            trace_context::set_parent(&served, &headers);
            let context = trace_context::context(&served).unwrap();
            assert!(context.sampled);
            assert_eq!(context.trace_state.as_deref(), Some("vendor=abc"));
            let child = tracing::info_span!(parent: &served, "child");
            let mut sent = http::HeaderMap::new();
            trace_context::inject_http(&child, &mut sent);
            assert!(
                sent["traceparent"]
                    .to_str()
                    .unwrap()
                    .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            );
            assert_eq!(sent["tracestate"], "vendor=abc");
            // A trace of its own at ratio 0: not sampled, not exported,
            // and its context still goes on (flags 00).
            let own = tracing::info_span!("own");
            assert!(!trace_context::is_sampled(&own));
        });
        let spans = exports.spans();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let served = named(&spans, "served");
        assert_eq!(
            served.parent_span_id,
            vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(served.trace_state, "vendor=abc");
        assert_eq!(served.flags, 0x300, "the parent is remote");
        assert_eq!(attribute(served, "berth.kept"), Some(Any::BoolValue(true)));
        assert_eq!(named(&spans, "child").flags, 0x100, "the parent is local");
    }

    /// A span of another trace, to link to.
    fn another_trace() -> SpanContext {
        SpanContext {
            trace_id: [7; 16],
            span_id: [3; 8],
            sampled: true,
            trace_state: None,
        }
    }

    /// A span that warns on and on keeps its first events and counts the
    /// rest; its attributes and links are bounded alike.
    #[test]
    fn a_long_span_keeps_at_most_its_limits() {
        let (subscriber, exports) = traced(1.0);
        let other = another_trace();
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!("exec");
            let tries =
                run.in_scope(|| DirectSpan::in_current(|| "tries".into(), SpanKind::Internal, &[]));
            for round in 0..300 {
                run.in_scope(|| tracing::warn!(round, "still waiting"));
                trace_context::add_link(&run, &other);
                tries.set_attributes(&[("tried", Value::StrArray(&["a"]))]);
            }
        });
        let spans = exports.spans();
        let run = named(&spans, "exec");
        assert_eq!((run.events.len(), run.dropped_events_count), (128, 172));
        assert_eq!((run.links.len(), run.dropped_links_count), (128, 172));
        let tries = named(&spans, "tries");
        assert_eq!(
            (tries.attributes.len(), tries.dropped_attributes_count),
            (128, 172)
        );
        assert_eq!(run.events[0].name, "still waiting");
    }

    #[test]
    fn a_link_names_the_other_trace() {
        let (subscriber, exports) = traced(1.0);
        let submitted = another_trace();
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!(parent: None, "run");
            trace_context::add_link(&run, &submitted);
        });
        let spans = exports.spans();
        let run = named(&spans, "run");
        assert_eq!(run.links[0].trace_id, vec![7; 16]);
        assert_eq!(run.links[0].span_id, vec![3; 8]);
    }

    #[test]
    fn the_sample_ratio_is_a_share() {
        for bad in [-0.1, 1.5, f64::NAN] {
            let error = Sampler::ratio(bad).unwrap_err();
            assert!(error.contains("server.trace_sample_ratio"), "{error}");
        }
        let ids: Vec<[u8; 16]> = (0..4000).map(|_| new_trace_id()).collect();
        let kept = |ratio| {
            let sampler = Sampler::ratio(ratio).unwrap();
            ids.iter().filter(|id| sampler.samples(**id)).count()
        };
        assert_eq!(kept(1.0), ids.len());
        assert_eq!(kept(0.0), 0);
        let tenth = kept(0.1);
        assert!((250..=550).contains(&tenth), "{tenth} of 4000 kept at 0.1");
        // The decision is the trace id's: the same id, the same answer.
        let sampler = Sampler::ratio(0.5).unwrap();
        assert!(
            ids.iter()
                .all(|id| sampler.samples(*id) == sampler.samples(*id))
        );
        assert!(
            sampler.samples(
                [0xff; 8]
                    .into_iter()
                    .chain([0; 8])
                    .collect::<Vec<_>>()
                    .try_into()
                    .unwrap()
            )
        );
        assert!(!sampler.samples([0xff; 16]));
    }
}
