//! Logs and traces. Traces go to an OTLP collector only when an endpoint is
//! configured; otherwise no exporter exists and spans cost nothing beyond the
//! log filter.
//!
//! The log filter (`RUST_LOG`) applies to the log lines only: spans at INFO
//! and above are exported whatever it is, so a quiet log does not cut a
//! trace short. Spans are encoded as they record ([`crate::span_layer`]);
//! export runs on a thread of its own from a bounded queue
//! ([`crate::span_export`]: 2048 spans by default, `OTEL_BSP_*` to tune):
//! when the collector is slow or gone, spans past the bound are dropped and
//! counted on `/metrics`, and no request waits for it.

use std::sync::Arc;
use std::time::Duration;

use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, ServerConfig};
use crate::span_export::{ExportConfig, GrpcExporter, SpanCounts, SpanExport};
use crate::span_layer::{Sampler, SpanLayer};

/// Flushes and stops trace export when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    export: Option<Arc<SpanExport>>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(export) = self.export.take() {
            let _ = export.shutdown(Duration::from_secs(5));
        }
    }
}

/// The log filter when `RUST_LOG` is unset: INFO, without the per-call
/// spans of [`crate::trace_context::ServerSpan`], which are INFO for the
/// exporter's sake; in the log they would only prefix each line of a call
/// (a `RUST_LOG` that enables INFO for them shows them); with no exporter
/// either, a span no layer wants is never built, so serving a call costs
/// what it did untraced.
const DEFAULT_LOG_FILTER: &str = "info,berth_server::trace_context=warn";

/// Installs the global subscriber: `RUST_LOG` filter (default
/// [`DEFAULT_LOG_FILTER`]), text or JSON lines on stderr, and an OTLP layer
/// when `otlp_endpoint` is set.
pub fn init(service: &'static str, config: &ServerConfig) -> Result<TelemetryGuard, String> {
    let export = if config.otlp_endpoint.is_empty() {
        None
    } else {
        let settings = ExportConfig::from_env().map_err(|e| e.to_string())?;
        let exporter = GrpcExporter::new(service, &config.otlp_endpoint, settings.timeout)
            .map_err(|e| format!("server.otlp_endpoint = \"{}\": {e}", config.otlp_endpoint))?;
        let export = SpanExport::start(exporter, &settings, SpanCounts::global().clone())
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        Some(Arc::new(export))
    };
    subscriber(config, export.clone())?
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { export })
}

/// The subscriber [`init`] installs, spans going to `export` when there is
/// one (benchmarks build it with an exporter of their own).
pub fn subscriber(
    config: &ServerConfig,
    export: Option<Arc<SpanExport>>,
) -> Result<impl tracing::Subscriber + Send + Sync + 'static, String> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let spans = match export {
        None => None,
        Some(export) => {
            let sampler = Sampler::ratio(config.trace_sample_ratio)?;
            Some(SpanLayer::new(export, sampler).with_filter(exported_filter()))
        }
    };
    Ok(tracing_subscriber::registry().with(fmt).with(spans))
}

/// What the exporter takes: spans at INFO and above, and as their events
/// only warnings and errors (a failed call's reason). INFO events stay the
/// log's alone: taking them too would turn on every `info!` in the code for
/// every call, even with `RUST_LOG=error`.
pub(crate) fn exported_filter() -> FilterFn<fn(&tracing::Metadata<'_>) -> bool> {
    let exported: fn(&tracing::Metadata<'_>) -> bool = |metadata| {
        let most_verbose = if metadata.is_span() {
            Level::INFO
        } else {
            Level::WARN
        };
        *metadata.level() <= most_verbose
    };
    FilterFn::new(exported).with_max_level_hint(tracing::level_filters::LevelFilter::INFO)
}
