//! The pooled HTTP client every upstream call goes through: keep-alive
//! connections reused across requests (a new TCP+TLS handshake per request
//! would cost more than everything else the proxy does), TCP_NODELAY so
//! small SSE chunks are not held back, rustls for HTTPS upstreams.
//!
//! Each of the HTTP port's own threads (`server.http_threads`) has a pool
//! of its own. A pooled connection is served by a task on the runtime that
//! opened it, so with one pool for all, a request handled on one of those
//! threads could go out on a connection another thread serves, which then
//! had to be woken to write it and to read the answer. The shared runtime's
//! workers (gRPC calls, and HTTP with `server.http_threads = 0`) share one
//! pool: a request moves between them anyway.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::providers::UpstreamRequest;

/// Idle connections kept per upstream by the shared pool: far more than the
/// proxy keeps busy at 10,000 requests/s (~0.5 ms each, ~10 in a burst),
/// while after an overload of 2,000 in flight 256 of them held ~10 MB for
/// the idle timeout (tests/overload.rs).
const IDLE_PER_UPSTREAM: usize = 32;

/// The same for each serving thread's pool: with 32 each, two threads
/// ended an overload ~1.5 MB higher than the shared pool; with 16, ~0.7 MB
/// (tests/overload.rs, debug build), and two threads of 16 held 10,000
/// requests/s in 4 of 5 repeats, as often as the shared runtime, once the
/// threads took turns to accept (docs/benchmarks.md).
const IDLE_PER_UPSTREAM_PER_THREAD: usize = 16;

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

thread_local! {
    /// This thread's pool of each client, by the client's id.
    static POOLS: RefCell<Vec<(u64, Pool)>> = const { RefCell::new(Vec::new()) };
}

/// Tells clients apart in [`POOLS`].
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The timer makes the idle timeout close idle connections when it
/// expires; without one they would linger until the next checkout.
fn new_pool(
    connector: &HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    max_idle: usize,
) -> Pool {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .build(connector.clone())
}

#[derive(Debug, Clone)]
pub struct UpstreamClient {
    id: u64,
    /// The pool of the shared runtime's workers.
    shared: Pool,
    connector: HttpsConnector<HttpConnector>,
    pool_idle_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration, pool_idle_timeout: Duration) -> std::io::Result<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(30)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shared: new_pool(&connector, pool_idle_timeout, IDLE_PER_UPSTREAM),
            connector,
            pool_idle_timeout,
        })
    }

    /// The pool of the thread's runtime: the thread's own on a
    /// single-threaded one (made on its first request), else the shared one.
    fn pool(&self) -> Pool {
        let own_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
        if !own_thread {
            return self.shared.clone();
        }
        POOLS.with_borrow_mut(|pools| {
            if let Some((_, pool)) = pools.iter().find(|(id, _)| *id == self.id) {
                return pool.clone();
            }
            let pool = new_pool(
                &self.connector,
                self.pool_idle_timeout,
                IDLE_PER_UPSTREAM_PER_THREAD,
            );
            pools.push((self.id, pool.clone()));
            pool
        })
    }

    /// Sends a request; the future resolves at the response headers.
    /// Dropping it (or the response body later) closes the connection,
    /// which is how a client's disconnect reaches the upstream.
    pub async fn send(&self, request: UpstreamRequest) -> Result<http::Response<Incoming>, String> {
        let mut upstream = http::Request::post(request.uri)
            .body(Full::new(request.body))
            .map_err(|e| e.to_string())?;
        // The request's own headers (a key, the trace context) become the
        // upstream request's map: no second map is filled and dropped.
        *upstream.headers_mut() = request.headers;
        upstream
            .headers_mut()
            .entry(CONTENT_TYPE)
            .or_insert(http::HeaderValue::from_static("application/json"));
        self.pool().request(upstream).await.map_err(|e| {
            // hyper-util's error says only "client error (Connect)"; the cause says why.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            message
        })
    }
}
