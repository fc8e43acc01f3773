//! The HTTP port's server: axum's router on hyper's HTTP/1 connections, as
//! `axum::serve` runs it, plus a deadline for each request's headers
//! (`server.http_header_timeout`). `axum::serve` sets none (hyper's own
//! needs a timer it is not given), so a client sending its headers a byte
//! at a time (slowloris) held a connection, and a task, for as long as it
//! liked. hyper arms the same deadline while a kept-alive connection waits
//! for its next request, so it is the idle timeout too.
//!
//! Connections are capped: past the cap no more are accepted until one
//! closes (the kernel's backlog holds the next ones), so a flood of
//! connections cannot grow the service's memory and file descriptors
//! without bound.
//!
//! Connections are served on the service's shared runtime, or
//! (`server.http_threads`) on threads of their own, each a single-threaded
//! runtime that accepts connections and serves them to the end, like an
//! nginx worker: on the shared runtime a request read by one worker was
//! answered by the other, which had to be woken for it (a futex call and a
//! context switch per request, measured on the LLM proxy, issue #24).
//! Those threads take turns to accept, so that a client's connections are
//! spread over them ([`Balance`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics::RuntimeTasks;

/// Most bytes a connection buffers while reading a request's head (and
/// each read of its body): hyper's default grows to ~400 KiB, so 2,000
/// clients sending large headers slowly could pin ~800 MiB. A head larger
/// than this gets 431. hyper's smallest is 8 KiB, where every buffer
/// starts.
pub const MAX_BUF_BYTES: usize = 64 << 10;

/// Connections open at once by default: far more than the services' clients
/// use (a proxy's clients keep a pool each); at the ~25 KiB an idle
/// connection was measured to cost (docs/benchmarks.md), ~100 MiB at most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How the HTTP port is served.
#[derive(Debug, Clone)]
pub struct HttpServing {
    /// `server.http_header_timeout`.
    pub header_timeout: Duration,
    /// Connections open at once, over all threads.
    pub max_connections: usize,
    /// `server.http_threads`: 0 serves on the caller's runtime; more start
    /// that many threads, each with a runtime of its own.
    pub threads: usize,
    /// Where those threads' runtimes are counted on `/metrics`.
    pub tasks: RuntimeTasks,
}

impl HttpServing {
    /// On the caller's runtime, at most [`DEFAULT_MAX_CONNECTIONS`] at once.
    pub fn new(header_timeout: Duration) -> Self {
        Self {
            header_timeout,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            threads: 0,
            tasks: RuntimeTasks::default(),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// the open connections finish their requests and close.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    serving: HttpServing,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(serving.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(serving.header_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    if serving.threads == 0 {
        return accept_until_shutdown(listener, router, builder, slots, None, shutdown).await;
    }
    // Every thread waits on the same listening socket; the kernel hands
    // each new connection to one of those accepting.
    let listener = listener.into_std()?;
    let balance = Arc::new(Balance::new(serving.threads));
    let mut finished = Vec::with_capacity(serving.threads);
    for index in 0..serving.threads {
        let turn = Turn {
            balance: balance.clone(),
            thread: index,
        };
        let started = spawn_serving_thread(
            turn, &listener, &router, &builder, &slots, &serving, &shutdown,
        );
        match started {
            Ok(wait) => finished.push(wait),
            Err(error) => {
                // The threads started stop, and the port is not served at all.
                shutdown.cancel();
                return Err(error);
            }
        }
    }
    let mut outcome = Ok(());
    for wait in finished {
        let result = wait
            .await
            .unwrap_or_else(|_| Err(io::Error::other("an HTTP serving thread panicked")));
        if let Err(error) = result {
            // One thread failing stops the others: the port is served whole or not at all.
            shutdown.cancel();
            outcome = outcome.and(Err(error));
        }
    }
    outcome
}

/// Starts the serving thread `turn` names: a runtime of its own that
/// accepts from `listener` until shutdown; the receiver gets its outcome.
fn spawn_serving_thread(
    turn: Turn,
    listener: &std::net::TcpListener,
    router: &axum::Router,
    builder: &hyper::server::conn::http1::Builder,
    slots: &Arc<Semaphore>,
    serving: &HttpServing,
    shutdown: &CancellationToken,
) -> io::Result<tokio::sync::oneshot::Receiver<io::Result<()>>> {
    let listener = listener.try_clone()?;
    let (router, builder, slots, shutdown, tasks) = (
        router.clone(),
        builder.clone(),
        slots.clone(),
        shutdown.clone(),
        serving.tasks.clone(),
    );
    let (done, wait) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("http-{}", turn.thread))
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    tasks.count(runtime.handle().clone());
                    runtime.block_on(async {
                        let listener = TcpListener::from_std(listener)?;
                        accept_until_shutdown(
                            listener,
                            router,
                            builder,
                            slots,
                            Some(turn),
                            shutdown,
                        )
                        .await
                    })
                });
            let _ = done.send(result);
        })?;
    Ok(wait)
}

/// Open connections per serving thread. A thread accepts only while it
/// serves no more of them than the least loaded thread: every thread
/// waiting on the socket is woken by a new connection and an idle one wins
/// the race, so without turns the few connections of a client that keeps
/// them open could all land on one thread and leave the others idle.
/// Connections are counted, not requests: a busy one and an idle one
/// weigh the same.
struct Balance {
    open: Vec<AtomicUsize>,
    /// Each thread's: woken when its turn may have come or gone.
    changed: Vec<Notify>,
}

impl Balance {
    fn new(threads: usize) -> Self {
        Self {
            open: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            changed: (0..threads).map(|_| Notify::new()).collect(),
        }
    }

    fn least(&self) -> usize {
        let counts = self.open.iter().map(|n| n.load(Ordering::Relaxed));
        counts.min().unwrap_or(0)
    }

    /// Counts a connection `thread` opened or closed, and wakes only the
    /// threads whose turn that may change: waking another thread costs a
    /// system call, so a client opening a connection per request would
    /// otherwise pay a few for each.
    fn add(&self, thread: usize, opened: bool) {
        let least = self.least();
        if opened {
            self.open[thread].fetch_add(1, Ordering::Relaxed);
            // The last thread at the least took one: the others' turn came.
            if self.least() > least {
                self.changed.iter().for_each(Notify::notify_waiters);
            }
        } else {
            self.open[thread].fetch_sub(1, Ordering::Relaxed);
            self.changed[thread].notify_waiters();
            // It fell below the others: their turn is gone, this one's next.
            if self.least() < least {
                self.changed.iter().for_each(Notify::notify_waiters);
            }
        }
    }
}

/// One serving thread's place in the [`Balance`].
struct Turn {
    balance: Arc<Balance>,
    thread: usize,
}

impl Turn {
    fn may_accept(&self) -> bool {
        self.balance.open[self.thread].load(Ordering::Relaxed) <= self.balance.least()
    }

    /// Returns once this thread may accept, or false at shutdown.
    async fn wait(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = self.until(true) => true,
            () = shutdown.cancelled() => false,
        }
    }

    /// Returns once whether this thread may accept is `may`.
    async fn until(&self, may: bool) {
        loop {
            // Armed before the check, so that a change in between is not missed.
            let changed = self.balance.changed[self.thread].notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.may_accept() == may {
                return;
            }
            changed.await;
        }
    }

    /// Counts a connection this thread accepted until the guard is dropped.
    fn opened(&self) -> OpenConnection {
        self.balance.add(self.thread, true);
        OpenConnection {
            balance: self.balance.clone(),
            thread: self.thread,
        }
    }
}

struct OpenConnection {
    balance: Arc<Balance>,
    thread: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.balance.add(self.thread, false);
    }
}

/// Accepts and serves connections until `shutdown` is cancelled, then waits
/// for those it accepted to finish their requests and close. A serving
/// thread accepts on its `turn` only.
async fn accept_until_shutdown(
    listener: TcpListener,
    router: axum::Router,
    builder: hyper::server::conn::http1::Builder,
    slots: Arc<Semaphore>,
    turn: Option<Turn>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // Each connection holds a receiver; all are gone once every one closed.
    let (closed_tx, closed_rx) = watch::channel(());
    loop {
        if let Some(turn) = &turn
            && !turn.wait(&shutdown).await
        {
            break;
        }
        // A slot first: at the cap, nothing more is accepted.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let turn_lost = async {
            match &turn {
                Some(turn) => turn.until(false).await,
                None => std::future::pending().await,
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    wait_after_accept_error(&error).await;
                    continue;
                }
            },
            // Another thread closed one: it accepts next. (accept is cancel-safe.)
            () = turn_lost => continue,
            () = shutdown.cancelled() => break,
        };
        let counted = turn.as_ref().map(Turn::opened);
        let service = router
            .clone()
            .map_request(|request: http::Request<Incoming>| request.map(axum::body::Body::new));
        let service = TowerToHyperService::new(service);
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        let closed_rx = closed_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_connection_end(result),
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    log_connection_end(connection.await);
                }
            }
            drop((closed_rx, slot, counted));
        });
    }
    drop(closed_rx);
    closed_tx.closed().await;
    Ok(())
}

fn log_connection_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        // A header timeout, a client gone away, a malformed request: the
        // client got its answer (408, 400, 431) where it could have one.
        tracing::debug!(%error, "HTTP connection ended");
    }
}

/// As `axum::serve` does: a connection that failed before it was accepted
/// is the client's problem; anything else (out of file descriptors) gets a
/// pause, so the loop does not spin.
async fn wait_after_accept_error(error: &io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting an HTTP connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn started(header_timeout: Duration) -> (std::net::SocketAddr, CancellationToken) {
        let (addr, shutdown, _) = started_with(HttpServing::new(header_timeout)).await;
        (addr, shutdown)
    }

    async fn started_with(
        serving: HttpServing,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "hi" }))
            .route(
                "/thread",
                axum::routing::get(|| async {
                    std::thread::current().name().unwrap_or("").to_string()
                }),
            )
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "slow"
                }),
            );
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(serve(listener, router, serving, shutdown.clone()));
        (addr, shutdown, serving)
    }

    async fn get_path(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    fn alive_tasks(registry: &prometheus_client::registry::Registry) -> usize {
        let text = crate::metrics::render(registry);
        text.lines()
            .find_map(|line| line.strip_prefix(crate::metrics::RUNTIME_ALIVE_TASKS))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no alive tasks in:\n{text}"))
    }

    #[tokio::test]
    async fn threads_of_their_own_serve_every_connection_and_drain_at_shutdown() {
        let mut registry = prometheus_client::registry::Registry::default();
        let tasks = RuntimeTasks::register(&mut registry);
        let (addr, shutdown, serving) = started_with(HttpServing {
            threads: 2,
            tasks,
            ..HttpServing::new(Duration::from_secs(10))
        })
        .await;
        let mut threads = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let answer = get_path(addr, "/thread").await;
            let name = answer.rsplit("\r\n\r\n").next().unwrap().to_string();
            assert!(name.starts_with("http-"), "served on {name:?}: {answer}");
            threads.insert(name);
        }
        assert!(
            threads.iter().all(|t| t == "http-0" || t == "http-1"),
            "{threads:?}"
        );
        // A request in flight at shutdown is answered before serving ends;
        // its connection's task, on a serving thread, is counted on /metrics.
        // The last connections' tasks end a moment after their clients read
        // the answer: idle is counted once they have.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = alive_tasks(&registry);
        let slow = tokio::spawn(get_path(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            alive_tasks(&registry) >= idle + 2,
            "the serving threads' tasks are not counted: {idle} idle"
        );
        shutdown.cancel();
        assert!(slow.await.unwrap().ends_with("slow"));
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is still served after shutdown"
        );
    }

    #[tokio::test]
    async fn threads_take_turns_to_accept_a_clients_connections() {
        let (addr, shutdown, _) = started_with(HttpServing {
            threads: 3,
            ..HttpServing::new(Duration::from_secs(10))
        })
        .await;
        // Nine connections kept open, one after the other: three on each thread.
        let mut held = Vec::new();
        for _ in 0..9 {
            held.push(held_on_thread(addr).await);
        }
        let count = |held: &[(TcpStream, String)]| {
            let mut per_thread = std::collections::BTreeMap::<String, usize>::new();
            for (_, thread) in held {
                *per_thread.entry(thread.clone()).or_default() += 1;
            }
            per_thread
        };
        let even: std::collections::BTreeMap<String, usize> =
            (0..3).map(|i| (format!("http-{i}"), 3)).collect();
        assert_eq!(count(&held), even);
        // http-1's connections close: the next three are its.
        held.retain(|(_, thread)| thread != "http-1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..3 {
            let (stream, thread) = held_on_thread(addr).await;
            assert_eq!(thread, "http-1");
            held.push((stream, thread));
        }
        assert_eq!(count(&held), even);
        shutdown.cancel();
    }

    #[test]
    fn a_connection_opened_or_closed_wakes_only_the_threads_whose_turn_changed() {
        let balance = Balance::new(2);
        // Which threads a change wakes, each having waited for it.
        let woken = |change: &dyn Fn()| -> Vec<bool> {
            let mut waits: Vec<_> = balance
                .changed
                .iter()
                .map(|n| Box::pin(n.notified()))
                .collect();
            waits.iter_mut().for_each(|w| {
                w.as_mut().enable();
            });
            change();
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            waits
                .iter_mut()
                .map(|w| w.as_mut().poll(&mut context).is_ready())
                .collect()
        };
        // [1, 0]: thread 1 was already the least.
        assert_eq!(woken(&|| balance.add(0, true)), [false, false]);
        // [1, 1]: thread 0's turn came.
        assert_eq!(woken(&|| balance.add(1, true)), [true, true]);
        // [2, 1], then [1, 1]: only the closing thread may have its turn back.
        assert_eq!(woken(&|| balance.add(0, true)), [false, false]);
        assert_eq!(woken(&|| balance.add(0, false)), [true, false]);
        // [0, 1]: thread 1's turn went.
        assert_eq!(woken(&|| balance.add(0, false)), [true, true]);
    }

    /// A connection kept open, and the thread its first request was served on.
    async fn held_on_thread(addr: std::net::SocketAddr) -> (TcpStream, String) {
        let (stream, answer) = held(addr, "/thread").await;
        let thread = answer.rsplit("\r\n\r\n").next().unwrap().to_string();
        (stream, thread)
    }

    /// A kept-alive connection that was asked for `path` once (so the
    /// server has surely accepted it), and the first read of its answer.
    async fn held(addr: std::net::SocketAddr, path: &str) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = [0; 256];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        (stream, answer)
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        get_path(addr, "/").await
    }

    #[tokio::test]
    async fn headers_sent_too_slowly_are_cut_off_while_others_are_served() {
        let timeout = Duration::from_millis(500);
        let (addr, shutdown) = started(timeout).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let request = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ";
        let mut cut_off = false;
        for byte in request.iter().chain(std::iter::repeat(&b'a')).take(100) {
            if slow.write_all(&[*byte]).await.is_err() {
                cut_off = true;
                break;
            }
            assert!(get(addr).await.ends_with("hi"), "others are served");
            let mut answer = [0; 64];
            let read =
                tokio::time::timeout(Duration::from_millis(50), slow.read(&mut answer)).await;
            if let Ok(read) = read {
                let n = read.unwrap_or(0);
                let answer = String::from_utf8_lossy(&answer[..n]);
                assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
                cut_off = true;
                break;
            }
        }
        assert!(cut_off, "the slow client was never cut off");
        let waited = started.elapsed();
        assert!(
            waited >= timeout && waited < timeout * 4 + Duration::from_secs(1),
            "cut off after {waited:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_close_after_the_header_timeout() {
        let timeout = Duration::from_millis(300);
        let (addr, shutdown) = started(timeout).await;
        let (mut stream, answer) = held(addr, "/").await;
        assert!(answer.starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        let mut rest = [0; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        assert!(
            idle.elapsed() >= timeout,
            "closed after {:?}",
            idle.elapsed()
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_request_head_past_the_buffer_cap_is_refused() {
        let (addr, shutdown) = started(Duration::from_secs(30)).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // Twice the cap (hyper checks it when a read leaves the head
        // unfinished, so a head just past it may still fit a read), and
        // well under hyper's own default of ~400 KiB.
        let head = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(2 * MAX_BUF_BYTES)
        );
        // The server may stop reading (and close) before all is written.
        let _ = stream.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        // A head just under the cap is served.
        let fits = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_BUF_BYTES - 1024)
        );
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(fits.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("hi"), "{answer}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_one_to_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_secs(30);
        let serving = HttpServing {
            max_connections: 2,
            ..HttpServing::new(timeout)
        };
        tokio::spawn(serve(listener, router, serving, shutdown.clone()));
        let held: Vec<TcpStream> = held_connections(addr, 2).await;
        // Held connections are accepted; a third waits in the backlog.
        let third = tokio::spawn(get(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !third.is_finished(),
            "a third connection was served past the cap"
        );
        drop(held);
        let answer = tokio::time::timeout(Duration::from_secs(5), third).await;
        assert!(answer.unwrap().unwrap().ends_with("hi"));
        shutdown.cancel();
    }

    async fn held_connections(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut streams = Vec::new();
        for _ in 0..n {
            let (stream, answer) = held(addr, "/").await;
            assert!(answer.starts_with("HTTP/1.1 200"));
            streams.push(stream);
        }
        streams
    }
}
