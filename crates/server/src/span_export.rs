//! The span processor between the tracing layer and the OTLP exporter: a
//! bounded queue that ending a span never waits on, drained by a thread of
//! its own that exports in batches. The SDK's `BatchSpanProcessor` works the
//! same way but keeps its count of dropped spans to itself; this one counts
//! what it drops, exports and fails to export, for every service's
//! `/metrics`.
//!
//! Ending a span costs a short uncontended lock and a push: the export
//! thread is woken only when a batch is full (or a flush or shutdown asks
//! for it), and otherwise wakes on its schedule. Waking it for every span,
//! as a channel does, cost a futex call and a context switch per span
//! (issue #20).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::metrics::{TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORT_FAILED, TRACE_SPANS_EXPORTED};

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
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
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
    /// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds).
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
        let delay_ms = number(
            "OTEL_BSP_SCHEDULE_DELAY",
            usize::try_from(defaults.scheduled_delay.as_millis()).unwrap_or(usize::MAX),
        )?;
        Ok(Self {
            max_queue_size,
            max_export_batch_size,
            scheduled_delay: Duration::from_millis(u64::try_from(delay_ms).unwrap_or(u64::MAX)),
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

/// What the export thread is asked besides exporting on its schedule.
#[derive(Debug)]
enum Control {
    Flush(SyncSender<OTelSdkResult>),
    Shutdown(SyncSender<OTelSdkResult>),
    Resource(Resource),
}

/// What the processor and its export thread share.
#[derive(Debug)]
struct Queue {
    /// Spans ended and not yet taken by the export thread.
    spans: Mutex<VecDeque<SpanData>>,
    max_queue_size: usize,
    batch_size: usize,
    /// Set once the export thread stops taking spans.
    stopped: AtomicBool,
    counts: SpanCounts,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<SpanData>> {
        // A panic while holding it leaves a queue of whole spans: go on.
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Up to a batch of the oldest spans, when there are at least `least`.
    fn take(&self, least: usize) -> Option<Vec<SpanData>> {
        let mut spans = self.lock();
        if spans.is_empty() || spans.len() < least {
            return None;
        }
        let n = spans.len().min(self.batch_size);
        Some(spans.drain(..n).collect())
    }
}

/// A batching span processor with a bounded queue and counted drops.
#[derive(Debug)]
pub struct BoundedBatchProcessor {
    queue: Arc<Queue>,
    /// None once dropped, so that the export thread sees it gone.
    control: Mutex<Option<Sender<Control>>>,
    /// The export thread, to wake.
    thread: Thread,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl BoundedBatchProcessor {
    /// Starts the export thread. Each export call is bounded by the
    /// exporter's own timeout (OTLP: `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s);
    /// while one hangs, the queue fills and spans past it are dropped.
    pub fn new<E>(exporter: E, config: ExportConfig, counts: SpanCounts) -> std::io::Result<Self>
    where
        E: SpanExporter + 'static,
    {
        let max_queue_size = config.max_queue_size.max(1);
        let queue = Arc::new(Queue {
            spans: Mutex::new(VecDeque::new()),
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

    /// Sends a control message, wakes the export thread and waits for its
    /// answer.
    fn ask(
        &self,
        message: impl FnOnce(SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.send(message(reply))?;
        answer.recv_timeout(timeout).map_err(|error| match error {
            RecvTimeoutError::Timeout => OTelSdkError::Timeout(timeout),
            RecvTimeoutError::Disconnected => OTelSdkError::AlreadyShutdown,
        })?
    }

    fn send(&self, message: Control) -> OTelSdkResult {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or(OTelSdkError::AlreadyShutdown)?
            .send(message)
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        self.thread.unpark();
        Ok(())
    }
}

impl Drop for BoundedBatchProcessor {
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

impl SpanProcessor for BoundedBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let queue = &*self.queue;
        let queued = {
            let mut spans = queue.lock();
            if spans.len() >= queue.max_queue_size || queue.stopped.load(Ordering::Relaxed) {
                None
            } else {
                spans.push_back(span);
                Some(spans.len())
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

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Control::Shutdown, timeout)?;
        // The worker answered and returns: joining cannot hang.
        let worker = self
            .worker
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("span export lock poisoned".into()))?
            .take();
        if let Some(worker) = worker {
            worker
                .join()
                .map_err(|_| OTelSdkError::InternalFailure("span export thread panicked".into()))?;
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.send(Control::Resource(resource.clone()));
    }
}

struct Worker<E> {
    exporter: E,
    receiver: Receiver<Control>,
    queue: Arc<Queue>,
    delay: Duration,
}

impl<E: SpanExporter> Worker<E> {
    fn run(mut self) {
        // The exporter's own instrumentation (tonic, h2) must not feed spans back in.
        let _suppressed = Context::enter_telemetry_suppressed_scope();
        let mut due = Instant::now() + self.delay;
        loop {
            loop {
                match self.receiver.try_recv() {
                    Ok(Control::Flush(reply)) => {
                        let _ = reply.send(self.export_all());
                    }
                    Ok(Control::Resource(resource)) => self.exporter.set_resource(&resource),
                    Ok(Control::Shutdown(reply)) => {
                        let result = self.stop();
                        let _ = reply.send(result);
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                    // The processor is gone without a shutdown.
                    Err(TryRecvError::Disconnected) => {
                        let _ = self.stop();
                        return;
                    }
                }
            }
            if Instant::now() >= due {
                let _ = self.export_all();
                due = Instant::now() + self.delay;
            } else {
                // Full batches only; the rest waits for its delay.
                while let Some(batch) = self.queue.take(self.queue.batch_size) {
                    let _ = self.export(batch);
                }
            }
            // Woken early by a full batch or a control message.
            std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
        }
    }

    /// Exports what is queued, a batch at a time; the first failure.
    fn export_all(&self) -> OTelSdkResult {
        let mut result = Ok(());
        while let Some(batch) = self.queue.take(1) {
            let exported = self.export(batch);
            if result.is_ok() {
                result = exported;
            }
        }
        result
    }

    /// Exports what is queued and stops taking spans: those ended later
    /// are dropped.
    fn stop(&self) -> OTelSdkResult {
        self.queue.stopped.store(true, Ordering::Relaxed);
        let result = self.export_all();
        let _ = self.exporter.shutdown();
        result
    }

    fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = futures_executor::block_on(self.exporter.export(batch));
        match &result {
            Ok(()) => {
                self.queue.counts.exported.inc_by(spans);
            }
            Err(error) => {
                self.queue.counts.failed.inc_by(spans);
                tracing::warn!(spans, %error, "span export failed");
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// An exporter whose exports hang until the test lets them go, as a
    /// collector that accepted the connection and never answers.
    #[derive(Debug)]
    struct Stalled {
        release: Mutex<Receiver<()>>,
    }

    impl SpanExporter for Stalled {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            let _ = self.release.lock().unwrap().recv();
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Unreachable;

    impl SpanExporter for Unreachable {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Err(OTelSdkError::InternalFailure("connection refused".into()))
        }
    }

    fn provider(processor: BoundedBatchProcessor) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build()
    }

    fn end_spans(provider: &SdkTracerProvider, count: usize) {
        let tracer = provider.tracer("test");
        for _ in 0..count {
            tracer.start("request").end();
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
        };
        let exporter = Stalled {
            release: Mutex::new(released),
        };
        let provider =
            provider(BoundedBatchProcessor::new(exporter, config, counts.clone()).unwrap());

        let spans = 1000;
        let started = Instant::now();
        end_spans(&provider, spans);
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
        provider.shutdown().unwrap();
        assert_eq!(
            counts.dropped.get() + counts.exported.get(),
            spans as u64,
            "every span counted once"
        );
        assert!(counts.exported.get() > 0);
        assert_eq!(counts.failed.get(), 0);
    }

    #[test]
    fn failed_exports_count_their_spans() {
        let counts = SpanCounts::default();
        let processor =
            BoundedBatchProcessor::new(Unreachable, ExportConfig::default(), counts.clone())
                .unwrap();
        let provider = provider(processor);
        end_spans(&provider, 3);
        provider.force_flush().unwrap_err();
        assert_eq!(counts.failed.get(), 3);
        assert_eq!(counts.dropped.get() + counts.exported.get(), 0);
        let _ = provider.shutdown();
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
        ]))
        .unwrap();
        assert_eq!(
            tuned,
            ExportConfig {
                max_queue_size: 8,
                max_export_batch_size: 8,
                scheduled_delay: Duration::from_millis(100),
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
