//! Between the span layer ([`crate::span_layer`]) and the OTLP collector:
//! a bounded queue of encoded spans that ending a span never waits on,
//! drained by a thread of its own that sends them in batches over OTLP/gRPC.
//! What it drops, exports and fails to export is counted for every
//! service's `/metrics`.
//!
//! Ending a span costs a short uncontended lock and a copy: the export
//! thread is woken only when a batch is full (or a flush or shutdown asks
//! for it), and otherwise wakes on its schedule. Waking it for every span,
//! as a channel does, cost a futex call and a context switch per span
//! (issue #20).
//!
//! Queued spans are one buffer, already the `spans` of an OTLP
//! `ScopeSpans`, copied in as each span ends; two such buffers take turns
//! between the queue and the export thread. So a span's own memory is
//! freed by the thread that allocated it: glibc's malloc frees a block
//! under the lock of the arena it came from, and the export thread freeing
//! every span fought the requests' threads for their arenas' locks: 15 %
//! of a traced request's time in process went to futex calls, and ratio
//! 1.0 cost 2.7-3.3 µs per request after this against 4.1-4.3 before
//! (issue #20, `benches/request_spans.rs` of the llm-proxy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::metrics::{TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORT_FAILED, TRACE_SPANS_EXPORTED};
use crate::otlp::{self, SpanHeader};

/// How the queue is bounded and drained; OpenTelemetry's defaults and
/// variables, as the SDK's batch processor reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Spans waiting for export; one more is dropped.
    pub max_queue_size: usize,
    /// Spans per export call.
    pub max_export_batch_size: usize,
    /// The longest a span waits for a batch to fill before it is exported.
    pub scheduled_delay: Duration,
    /// The longest one export may take; while one hangs, the queue fills
    /// and spans past it are dropped.
    pub timeout: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// An `OTEL_BSP_*` variable that is not a positive whole number.
#[derive(Debug, thiserror::Error)]
#[error("{name} = {value:?}: expected a whole number above 0")]
pub struct BadExportSetting {
    name: &'static str,
    value: String,
}

impl ExportConfig {
    /// The defaults, each overridden by its variable when set:
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and
    /// `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_EXPORTER_OTLP_TIMEOUT`
    /// (milliseconds).
    pub fn from_env() -> Result<Self, BadExportSetting> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, BadExportSetting> {
        let number = |name: &'static str, default: usize| match var(name) {
            None => Ok(default),
            Some(value) => match value.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(BadExportSetting { name, value }),
            },
        };
        let defaults = Self::default();
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size)?;
        // A batch larger than the queue could never fill; the SDK caps it the same way.
        let max_export_batch_size = number(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size,
        )?
        .min(max_queue_size);
        let millis = |name: &'static str, default: Duration| {
            let default = usize::try_from(default.as_millis()).unwrap_or(usize::MAX);
            number(name, default)
                .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
        };
        Ok(Self {
            max_queue_size,
            max_export_batch_size,
            scheduled_delay: millis("OTEL_BSP_SCHEDULE_DELAY", defaults.scheduled_delay)?,
            timeout: millis("OTEL_EXPORTER_OTLP_TIMEOUT", defaults.timeout)?,
        })
    }
}

/// What became of the spans that ended: every span is counted once, as
/// dropped (the queue was full, or export had stopped), exported, or failed
/// (its batch's export returned an error: collector unreachable, timed
/// out).
#[derive(Debug, Clone, Default)]
pub struct SpanCounts {
    pub dropped: Counter,
    pub exported: Counter,
    pub failed: Counter,
}

impl SpanCounts {
    /// The process's counts: one exporter per process, while a process may
    /// host several services (tests, the quickstart), each registering
    /// these same counters.
    pub fn global() -> &'static SpanCounts {
        static COUNTS: LazyLock<SpanCounts> = LazyLock::new(SpanCounts::default);
        &COUNTS
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            TRACE_SPANS_DROPPED,
            "Spans dropped before export: the export queue was full (collector slow or gone) or export had stopped",
            self.dropped.clone(),
        );
        registry.register(
            TRACE_SPANS_EXPORTED,
            "Spans the OTLP collector accepted",
            self.exported.clone(),
        );
        registry.register(
            TRACE_SPANS_EXPORT_FAILED,
            "Spans in exports that failed (collector unreachable, export timed out)",
            self.failed.clone(),
        );
    }
}

/// An export that failed: the collector was unreachable or refused the
/// batch, or took longer than the timeout.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {}", .0.code(), .0.message())]
    Grpc(tonic::Status),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("span export has stopped")]
    Stopped,
}

/// Spans taken from the queue for one export.
#[derive(Debug, Default)]
pub struct Batch {
    /// As [`otlp::push_span`] writes them.
    spans: Vec<u8>,
    count: usize,
}

impl Batch {
    /// The spans, encoded as the `spans` field of an OTLP `ScopeSpans`.
    pub fn encoded(&self) -> &[u8] {
        &self.spans
    }

    /// How many spans it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Where batches of encoded spans go: OTLP/gRPC ([`GrpcExporter`]), or a
/// test's stand-in.
pub trait Exporter: Send + 'static {
    /// Sends one batch.
    fn export(&mut self, batch: &Batch) -> Result<(), ExportError>;
}

/// The OTLP/gRPC exporter: each batch is one `TraceService/Export` call to
/// the collector, on a runtime of the export thread's own.
pub struct GrpcExporter {
    service: &'static str,
    runtime: tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
    timeout: Duration,
}

impl GrpcExporter {
    /// Connects lazily (at the first export) to `endpoint`, e.g.
    /// `http://collector:4317`; an endpoint that is no URI is an error now.
    pub fn new(service: &'static str, endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|error| error.to_string())?
            .timeout(timeout);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        let channel = {
            let _entered = runtime.enter();
            endpoint.connect_lazy()
        };
        Ok(Self {
            service,
            runtime,
            channel,
            timeout,
        })
    }
}

impl Exporter for GrpcExporter {
    fn export(&mut self, batch: &Batch) -> Result<(), ExportError> {
        const PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
        let request = bytes::Bytes::from(otlp::export_request(self.service, batch.encoded()));
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async {
            grpc.ready().await.map_err(|error| {
                ExportError::Grpc(tonic::Status::unavailable(error.to_string()))
            })?;
            let path = http::uri::PathAndQuery::from_static(PATH);
            grpc.unary(tonic::Request::new(request), path, EncodedCodec)
                .await
                .map_err(ExportError::Grpc)
        };
        // The timer is made inside the runtime, whose timer it is.
        let timeout = self.timeout;
        match self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
        {
            Ok(answer) => answer.map(|_| ()),
            Err(_) => Err(ExportError::TimedOut(self.timeout)),
        }
    }
}

/// A gRPC codec for a request already encoded, whose answer is not read
/// (an `ExportTraceServiceResponse` only reports partial success).
#[derive(Debug, Clone, Copy, Default)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = bytes::Bytes;
    type Decode = ();
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        Self
    }

    fn decoder(&mut self) -> Self::Decoder {
        Self
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        let len = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, len);
        Ok(Some(()))
    }
}

/// What the export thread is asked besides exporting on its schedule.
#[derive(Debug)]
enum Control {
    Flush(SyncSender<Result<(), ExportError>>),
    Shutdown(SyncSender<Result<(), ExportError>>),
}

/// What the span layer and the export thread share.
#[derive(Debug)]
struct Queue {
    pending: Mutex<Pending>,
    max_queue_size: usize,
    batch_size: usize,
    /// Set once the export thread stops taking spans.
    stopped: AtomicBool,
    counts: SpanCounts,
}

#[derive(Debug, Default)]
struct Pending {
    /// Spans ended and not yet taken by the export thread.
    queued: Batch,
    /// An exported batch's buffer, emptied, to queue spans into next.
    spare: Option<Vec<u8>>,
}

/// A buffer that grew past this (spans far larger than a request's) is
/// let go after its export rather than kept for the next batch.
const MOST_KEPT_BYTES: usize = 4 << 20;

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding it leaves whole spans queued: each is
        // written once room for all of it is reserved, by appends that
        // cannot fail.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Up to a batch of the oldest spans, when there are at least `least`.
    fn take(&self, least: usize) -> Option<Batch> {
        let mut pending = self.lock();
        let count = pending.queued.count;
        if count == 0 || count < least {
            return None;
        }
        let mut next = pending.spare.take().unwrap_or_default();
        let end = (count > self.batch_size)
            .then(|| otlp::scope_spans_end(&pending.queued.spans, self.batch_size))
            .flatten();
        let Some(end) = end else {
            let next = Batch {
                spans: next,
                count: 0,
            };
            return Some(std::mem::replace(&mut pending.queued, next));
        };
        // More than a batch: the rest stays queued.
        next.extend_from_slice(&pending.queued.spans[end..]);
        let mut spans = std::mem::replace(&mut pending.queued.spans, next);
        spans.truncate(end);
        pending.queued.count = count - self.batch_size;
        Some(Batch {
            spans,
            count: self.batch_size,
        })
    }

    /// Keeps an exported batch's buffer for spans to come.
    fn recycle(&self, mut batch: Batch) {
        if batch.spans.capacity() > MOST_KEPT_BYTES {
            return;
        }
        batch.spans.clear();
        let mut pending = self.lock();
        if pending.spare.is_none() {
            pending.spare = Some(batch.spans);
        }
    }
}

/// The bounded queue and its export thread.
#[derive(Debug)]
pub struct SpanExport {
    queue: Arc<Queue>,
    /// None once shut down, so that the export thread sees it gone.
    control: Mutex<Option<Sender<Control>>>,
    /// The export thread, to wake.
    thread: Thread,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl SpanExport {
    /// Starts the export thread, sending batches to `exporter`.
    pub fn start<E: Exporter>(
        exporter: E,
        config: &ExportConfig,
        counts: SpanCounts,
    ) -> std::io::Result<Self> {
        let max_queue_size = config.max_queue_size.max(1);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            max_queue_size,
            batch_size: config.max_export_batch_size.clamp(1, max_queue_size),
            stopped: AtomicBool::new(false),
            counts,
        });
        let (control, receiver) = std::sync::mpsc::channel();
        let worker = Worker {
            exporter,
            receiver,
            queue: queue.clone(),
            delay: config.scheduled_delay,
            backoff: Backoff::default(),
        };
        let handle = std::thread::Builder::new()
            .name("berth-span-export".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            queue,
            control: Mutex::new(Some(control)),
            thread: handle.thread().clone(),
            worker: Mutex::new(Some(handle)),
        })
    }

    /// Queues an ended span (its header, and the attributes, events and
    /// links it recorded, encoded), or drops and counts it when the queue
    /// is full.
    pub fn push(&self, header: &SpanHeader<'_>, recorded: &[u8]) {
        let queue = &*self.queue;
        let queued = {
            let mut pending = queue.lock();
            let queued = &mut pending.queued;
            if queued.count >= queue.max_queue_size || queue.stopped.load(Ordering::Relaxed) {
                None
            } else {
                otlp::push_span(&mut queued.spans, header, recorded);
                queued.count += 1;
                Some(queued.count)
            }
        };
        match queued {
            // A batch is full: the export thread need not wait out its delay.
            Some(len) if len == queue.batch_size => self.thread.unpark(),
            Some(_) => {}
            None => {
                queue.counts.dropped.inc();
            }
        }
    }

    /// Exports what is queued now; the first failure.
    pub fn flush(&self) -> Result<(), ExportError> {
        self.ask(Control::Flush, Duration::from_secs(5))
    }

    /// Exports what is queued and stops the export thread: spans ended
    /// later are dropped.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ExportError> {
        self.ask(Control::Shutdown, timeout)?;
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The worker answered and returns: joining cannot hang.
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(worker) = worker {
            let _ = worker.join();
        }
        Ok(())
    }

    /// Sends a control message, wakes the export thread and waits for its
    /// answer.
    fn ask(
        &self,
        message: impl FnOnce(SyncSender<Result<(), ExportError>>) -> Control,
        timeout: Duration,
    ) -> Result<(), ExportError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or(ExportError::Stopped)?
            .send(message(reply))
            .map_err(|_| ExportError::Stopped)?;
        self.thread.unpark();
        answer.recv_timeout(timeout).map_err(|error| match error {
            RecvTimeoutError::Timeout => ExportError::TimedOut(timeout),
            RecvTimeoutError::Disconnected => ExportError::Stopped,
        })?
    }
}

impl Drop for SpanExport {
    fn drop(&mut self) {
        // Dropped without a shutdown: the export thread exports what is
        // queued and stops now rather than at its next scheduled wake.
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.thread.unpark();
    }
}

struct Worker<E> {
    exporter: E,
    receiver: Receiver<Control>,
    queue: Arc<Queue>,
    delay: Duration,
    backoff: Backoff,
}

/// After a failed export the next one waits, doubling from
/// [`Backoff::FIRST`] up to [`Backoff::MOST`] while exports keep failing:
/// each try at a collector that refuses or does not answer costs a
/// connection attempt and a logged warning (about 0.2 ms of CPU), for
/// nothing, and with a small batch it was tried hundreds of times a second.
/// Spans meanwhile stay queued, within the queue's bound.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MOST: Duration = Duration::from_secs(5);

    /// An export failed at `now`: how long the next waits.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(8))
            .min(Self::MOST);
        self.failures += 1;
        self.until = Some(now + wait);
        wait
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }

    fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

impl<E: Exporter> Worker<E> {
    fn run(mut self) {
        let mut due = Instant::now() + self.delay;
        loop {
            loop {
                match self.receiver.try_recv() {
                    Ok(Control::Flush(reply)) => {
                        let _ = reply.send(self.export_all());
                    }
                    Ok(Control::Shutdown(reply)) => {
                        let result = self.stop();
                        let _ = reply.send(result);
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                    // Dropped without a shutdown.
                    Err(TryRecvError::Disconnected) => {
                        let _ = self.stop();
                        return;
                    }
                }
            }
            let now = Instant::now();
            if self.backoff.waiting(now) {
                // Queued spans wait for the back-off's end; the scheduled
                // export after it tries again.
                if now >= due {
                    due = now + self.delay;
                }
            } else if now >= due {
                let _ = self.export_all();
                due = Instant::now() + self.delay;
            } else {
                // Full batches only; the rest waits for its delay.
                while let Some(batch) = self.queue.take(self.queue.batch_size) {
                    if self.export(batch).is_err() {
                        break;
                    }
                }
            }
            // Woken early by a full batch or a control message.
            std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
        }
    }

    /// Exports what is queued, a batch at a time, until one fails: the
    /// batches after it are counted as failed without another try (the
    /// collector has just refused one). The first failure.
    fn export_all(&mut self) -> Result<(), ExportError> {
        let mut result = Ok(());
        while let Some(batch) = self.queue.take(1) {
            if result.is_ok() {
                result = self.export(batch);
            } else {
                self.queue.counts.failed.inc_by(batch.len() as u64);
                self.queue.recycle(batch);
            }
        }
        result
    }

    /// Exports what is queued and stops taking spans.
    fn stop(&mut self) -> Result<(), ExportError> {
        self.queue.stopped.store(true, Ordering::Relaxed);
        self.export_all()
    }

    fn export(&mut self, batch: Batch) -> Result<(), ExportError> {
        let spans = batch.len() as u64;
        let result = self.exporter.export(&batch);
        self.queue.recycle(batch);
        match &result {
            Ok(()) => {
                self.queue.counts.exported.inc_by(spans);
                self.backoff.succeeded();
            }
            Err(error) => {
                self.queue.counts.failed.inc_by(spans);
                let retry_in = self.backoff.failed(Instant::now());
                tracing::warn!(spans, %error, ?retry_in, "span export failed");
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::SpanKind;

    /// Queues a span that recorded `recorded` (the rest of every test
    /// span is alike).
    fn push(export: &SpanExport, recorded: &[u8]) {
        let header = SpanHeader {
            trace_id: [1; 16],
            span_id: [2; 8],
            trace_state: "",
            parent_span_id: None,
            name: "t",
            kind: SpanKind::Internal,
            start_unix_nano: 0,
            end_unix_nano: 0,
            error: None,
            remote_parent: false,
            dropped: [0; 3],
        };
        export.push(&header, recorded);
    }

    /// An exporter whose exports hang until the test lets them go, as a
    /// collector that accepted the connection and never answers.
    struct Stalled {
        release: Receiver<()>,
    }

    impl Exporter for Stalled {
        fn export(&mut self, _batch: &Batch) -> Result<(), ExportError> {
            let _ = self.release.recv();
            Ok(())
        }
    }

    /// Refuses every export, counting the tries.
    #[derive(Default)]
    struct Unreachable(Arc<std::sync::atomic::AtomicUsize>);

    impl Exporter for Unreachable {
        fn export(&mut self, _batch: &Batch) -> Result<(), ExportError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(ExportError::Grpc(tonic::Status::unavailable(
                "connection refused",
            )))
        }
    }

    #[test]
    fn a_stalled_collector_drops_and_counts_spans_without_blocking() {
        let (release, released) = std::sync::mpsc::channel();
        let counts = SpanCounts::default();
        let config = ExportConfig {
            max_queue_size: 4,
            max_export_batch_size: 2,
            scheduled_delay: Duration::from_millis(10),
            ..ExportConfig::default()
        };
        let exporter = Stalled { release: released };
        let export = SpanExport::start(exporter, &config, counts.clone()).unwrap();

        let spans = 1000;
        let started = Instant::now();
        for _ in 0..spans {
            push(&export, &[0; 16]);
        }
        let took = started.elapsed();
        // One export holds at most a batch, and the queue the rest: all
        // others are dropped, and ending them never waited for the exporter.
        assert!(took < Duration::from_secs(1), "ending spans took {took:?}");
        let dropped = counts.dropped.get();
        assert!(dropped >= (spans - 2 - 4) as u64, "dropped {dropped}");
        assert_eq!(counts.exported.get(), 0);

        for _ in 0..spans {
            let _ = release.send(());
        }
        export.shutdown(Duration::from_secs(5)).unwrap();
        assert_eq!(
            counts.dropped.get() + counts.exported.get(),
            spans as u64,
            "every span counted once"
        );
        assert!(counts.exported.get() > 0);
        assert_eq!(counts.failed.get(), 0);
    }

    /// Each batch's spans, split where `otlp::scope_spans_end` says.
    struct Recorder(Arc<Mutex<Vec<Vec<Vec<u8>>>>>);

    impl Exporter for Recorder {
        fn export(&mut self, batch: &Batch) -> Result<(), ExportError> {
            let encoded = batch.encoded();
            let spans = (0..batch.len())
                .map(|i| {
                    let start = otlp::scope_spans_end(encoded, i).unwrap();
                    let end = otlp::scope_spans_end(encoded, i + 1).unwrap();
                    // The tag and a one-byte length before each.
                    encoded[start + 2..end].to_vec()
                })
                .collect();
            self.0.lock().unwrap().push(spans);
            Ok(())
        }
    }

    /// A backlog longer than a batch leaves in batches of at most
    /// `max_export_batch_size`, oldest first, each span once; the queue's
    /// buffers go round (a burst later queues as well as the first).
    #[test]
    fn a_backlog_leaves_in_batches_oldest_first() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let counts = SpanCounts::default();
        let config = ExportConfig {
            max_queue_size: 100,
            max_export_batch_size: 4,
            scheduled_delay: Duration::from_secs(3600),
            ..ExportConfig::default()
        };
        let export = SpanExport::start(Recorder(batches.clone()), &config, counts.clone()).unwrap();
        for burst in 0..3u8 {
            for i in 0..10 {
                push(&export, &[burst * 10 + i; 3]);
            }
            export.flush().unwrap();
        }
        export.shutdown(Duration::from_secs(5)).unwrap();
        let batches = batches.lock().unwrap();
        assert!(batches.iter().all(|batch| (1..=4).contains(&batch.len())));
        let spans: Vec<u8> = batches.iter().flatten().map(|span| span[0]).collect();
        assert_eq!(spans, (0..30).collect::<Vec<u8>>());
        assert_eq!(counts.exported.get(), 30);
        assert_eq!(counts.dropped.get(), 0);
    }

    /// A collector that refuses: after the first failed export the next
    /// waits (a second here), however many full batches come meanwhile;
    /// every span is still counted once.
    #[test]
    fn failed_exports_back_off() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counts = SpanCounts::default();
        let config = ExportConfig {
            max_queue_size: 1000,
            max_export_batch_size: 2,
            scheduled_delay: Duration::from_millis(10),
            ..ExportConfig::default()
        };
        let export =
            SpanExport::start(Unreachable(calls.clone()), &config, counts.clone()).unwrap();
        for _ in 0..200 {
            push(&export, &[0; 16]);
            std::thread::sleep(Duration::from_millis(2));
        }
        // 100 full batches in about 0.4 s: one try, a second if the
        // machine is slow (without the back-off: about 100). Five would
        // take 12 s of back-off.
        let tried = calls.load(Ordering::SeqCst);
        assert!((1..5).contains(&tried), "{tried} exports tried");
        let _ = export.shutdown(Duration::from_secs(5));
        assert_eq!(counts.failed.get() + counts.dropped.get(), 200);
        assert_eq!(counts.exported.get(), 0);
        assert!(calls.load(Ordering::SeqCst) <= 5);
    }

    #[test]
    fn failed_exports_count_their_spans() {
        let counts = SpanCounts::default();
        let export = SpanExport::start(
            Unreachable::default(),
            &ExportConfig::default(),
            counts.clone(),
        )
        .unwrap();
        for _ in 0..3 {
            push(&export, &[0; 16]);
        }
        export.flush().unwrap_err();
        assert_eq!(counts.failed.get(), 3);
        assert_eq!(counts.dropped.get() + counts.exported.get(), 0);
        let _ = export.shutdown(Duration::from_secs(5));
        // Stopped: what ends later is dropped, and counted.
        push(&export, &[0; 16]);
        assert_eq!(counts.dropped.get(), 1);
    }

    #[test]
    fn the_batch_variables_are_positive_numbers() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            ExportConfig::from_vars(vars(&[])).unwrap(),
            ExportConfig::default()
        );
        let tuned = ExportConfig::from_vars(vars(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "8"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]))
        .unwrap();
        assert_eq!(
            tuned,
            ExportConfig {
                max_queue_size: 8,
                max_export_batch_size: 8,
                scheduled_delay: Duration::from_millis(100),
                timeout: Duration::from_millis(2500),
            }
        );
        for bad in ["0", "-1", "lots"] {
            let error = ExportConfig::from_vars(move |name: &str| {
                (name == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| bad.to_string())
            })
            .unwrap_err();
            assert!(
                error.to_string().contains("OTEL_BSP_MAX_QUEUE_SIZE"),
                "{error}"
            );
        }
    }
}
