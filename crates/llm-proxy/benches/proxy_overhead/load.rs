//! An open-loop load generator: requests leave on a fixed schedule whether or
//! not earlier ones have been answered. A closed loop (send, wait, send) slows
//! down with a slow proxy and so hides its queueing; this one does not. Each
//! request is timed from the moment it was sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A request that takes longer counts as an error.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests in flight beyond this are not sent and count as errors: a proxy
/// that falls this far behind has failed the rate, and the generator should
/// not open thousands of sockets finding out by how much.
const MAX_IN_FLIGHT: usize = 2000;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long the generator keeps an idle connection: under the 10 s after
/// which berth's HTTP serving closes one (`server.http_header_timeout`), as
/// well-behaved clients do (httpx keeps one 5 s), so that a request is
/// never sent on a connection the proxy is closing while the other
/// subjects are measured.
const POOL_IDLE: Duration = Duration::from_secs(5);

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build(connector)
}

/// What is sent: one POST, again and again.
#[derive(Clone)]
pub struct Target {
    pub uri: Uri,
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
}

impl Target {
    fn request(&self) -> http::Request<Full<Bytes>> {
        let mut request = http::Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()))
            .expect("a valid request");
        if let Some(value) = &self.authorization {
            request.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        request
    }
}

/// The header berth puts on every answer: its own time, upstream excluded.
const OVERHEAD_HEADER: &str = "x-berth-overhead-us";

/// One run at one rate.
#[derive(Debug, Clone)]
pub struct Run {
    /// Latencies of the successful requests, in µs, sorted.
    latencies_us: Vec<u64>,
    /// The overhead headers of the answers that had one, in µs, sorted.
    overheads_us: Vec<u64>,
    pub errors: usize,
    pub first_error: Option<String>,
    /// From the first send to the last answer.
    elapsed: Duration,
    scheduled: Duration,
}

impl Run {
    pub fn percentile_us(&self, q: f64) -> Option<u64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let rank = (q * (self.latencies_us.len() - 1) as f64).round() as usize;
        Some(self.latencies_us[rank])
    }

    /// The proxy's own time by its overhead header, at quantile `q`.
    pub fn overhead_percentile_us(&self, q: f64) -> Option<u64> {
        if self.overheads_us.is_empty() {
            return None;
        }
        let rank = (q * (self.overheads_us.len() - 1) as f64).round() as usize;
        Some(self.overheads_us[rank])
    }

    pub fn answered(&self) -> usize {
        self.latencies_us.len()
    }

    /// Answers per second over the whole run, draining included.
    pub fn achieved(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Every request answered, and the answers kept pace with the schedule:
    /// a target that falls behind shows it as a run that ends late.
    pub fn sustained(&self) -> bool {
        self.errors == 0 && self.elapsed.as_secs_f64() <= self.scheduled.as_secs_f64() * 1.05 + 0.05
    }
}

/// Sends `rate` requests per second for `duration` and waits for the answers.
pub async fn run(client: &HttpClient, target: &Target, rate: u32, duration: Duration) -> Run {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    type Answer = Result<(Duration, Option<u64>), String>;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answer>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut errors = 0;
    let mut first_error = None;
    let start = Instant::now();
    for i in 0..total {
        // Timers tick in milliseconds: requests that came due meanwhile
        // leave together, and the schedule never drifts.
        let due = start + interval.mul_f64(i as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            errors += 1;
            first_error.get_or_insert_with(|| format!("more than {MAX_IN_FLIGHT} in flight"));
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, request, tx, in_flight) = (
            client.clone(),
            target.request(),
            tx.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            let sent = Instant::now();
            let answer = tokio::time::timeout(TIMEOUT, async {
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let overhead = response
                    .headers()
                    .get(OVERHEAD_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok((sent.elapsed(), overhead))
                } else {
                    Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body.to_bytes())
                    ))
                }
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {TIMEOUT:?}")));
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(answer);
        });
    }
    drop(tx);
    let mut latencies_us = Vec::with_capacity(total);
    let mut overheads_us = Vec::new();
    while let Some(answer) = rx.recv().await {
        match answer {
            Ok((latency, overhead)) => {
                latencies_us.push(latency.as_micros() as u64);
                overheads_us.extend(overhead);
            }
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    latencies_us.sort_unstable();
    overheads_us.sort_unstable();
    Run {
        latencies_us,
        overheads_us,
        errors,
        first_error,
        elapsed: start.elapsed(),
        scheduled: interval.mul_f64(total as f64),
    }
}
