//! An OTLP/gRPC trace sink for the tracing benchmarks (docs/benchmarks.md,
//! issue 20): it accepts every export, counts the spans, and prints the
//! total each second it changed, so that a bench's services pay for the
//! whole export (convert, encode, send) while nothing is kept.
//!
//!     cargo run --release -p berth-tests --example otlp_sink -- 127.0.0.1:14317

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Default, Clone)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:14317".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let sink = Sink::default();
        let count = sink.0.clone();
        tokio::spawn(async move {
            let mut printed = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = count.load(Ordering::Relaxed);
                if now != printed {
                    println!("spans received: {now}");
                    printed = now;
                }
            }
        });
        eprintln!("otlp_sink: listening on {listen}");
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await?;
        Ok(())
    })
}
