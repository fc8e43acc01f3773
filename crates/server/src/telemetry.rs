//! Logs and traces. Traces go to an OTLP collector only when an endpoint is
//! configured; otherwise no exporter exists and spans cost nothing beyond the
//! log filter.
//!
//! The log filter (`RUST_LOG`) applies to the log lines only: spans at INFO
//! and above are exported whatever it is, so a quiet log does not cut a
//! trace short. Export runs on a thread of its own from a bounded queue
//! ([`crate::span_export`]: 2048 spans by default, `OTEL_BSP_*` to tune):
//! when the collector is slow or gone, spans past the bound are dropped and
//! counted on `/metrics`, and no request waits for it.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, ServerConfig};
use crate::span_export::{BoundedBatchProcessor, ExportConfig, SpanCounts};

/// Flushes and stops trace export when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let (otel, provider) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| format!("server.otlp_endpoint = \"{}\": {e}", config.otlp_endpoint))?;
        let export = ExportConfig::from_env().map_err(|e| e.to_string())?;
        let processor = BoundedBatchProcessor::new(exporter, export, SpanCounts::global().clone())
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(config.trace_sample_ratio)?)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            // What the layer adds to every span by default and no reader
            // of berth's traces uses, at a cost per span (issue #20): the
            // source location and target (4 attributes), the thread's id
            // and name (a String), busy/idle times (a clock read at every
            // poll of an instrumented future), and the OpenTelemetry
            // context made current at every poll (no OpenTelemetry
            // instrumentation in berth reads it: parents come from the
            // `tracing` span, trace context from `trace_context`).
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(exported)
                    .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
            );
        (Some(layer), Some(provider))
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { provider })
}

/// What the exporter takes: spans at INFO and above, and as their events
/// only warnings and errors (a failed call's reason). INFO events stay the
/// log's alone: taking them too would turn on every `info!` in the code for
/// every call, even with `RUST_LOG=error`.
fn exported(metadata: &tracing::Metadata<'_>) -> bool {
    let most_verbose = if metadata.is_span() {
        Level::INFO
    } else {
        Level::WARN
    };
    *metadata.level() <= most_verbose
}

/// Parent-based: a call that carries its caller's sampling decision keeps
/// it; a trace started here is kept with probability `ratio`.
fn sampler(ratio: f64) -> Result<Sampler, String> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!(
            "server.trace_sample_ratio = {ratio}: expected a share from 0.0 to 1.0"
        ));
    }
    Ok(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        ratio,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_ratio_is_a_share() {
        assert!(sampler(0.0).is_ok() && sampler(0.01).is_ok() && sampler(1.0).is_ok());
        for bad in [-0.1, 1.5, f64::NAN] {
            let error = sampler(bad).unwrap_err();
            assert!(error.contains("server.trace_sample_ratio"), "{error}");
        }
    }
}
