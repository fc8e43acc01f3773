//! Dynamic batching: requests are cut into pieces and queued; each session
//! of a model runs on its own OS thread (inference is CPU-bound and must not
//! hold an async worker), takes queued pieces up to `max_batch_size` texts and
//! embeds them in one run.
//!
//! How a session fills a batch: it takes the first piece, then more only
//! while no other session is idle (an idle session should run them at once,
//! in parallel), and, when the queue is empty and every other session is busy,
//! waits up to `max_wait` for more to arrive. A request larger than a share of
//! the sessions is cut into one piece per session, so a single big request
//! uses every core.
//!
//! The queue is bounded by texts: a request that does not fit is refused at
//! once (RESOURCE_EXHAUSTED / 429) rather than growing memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::Error;
use crate::config::BatchingConfig;
use crate::metrics::ModelMetrics;
use crate::model::{Pooled, Session};

/// The queue and sessions of one model.
pub struct Batcher {
    shared: Arc<Shared>,
}

/// Adds sessions to a batcher from another thread (sessions after the first
/// load while the service already serves).
pub struct SessionAdder(Arc<Shared>);

struct Shared {
    model: String,
    config: BatchingConfig,
    metrics: ModelMetrics,
    sessions: AtomicUsize,
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    pieces: VecDeque<Piece>,
    texts: usize,
    idle: usize,
    closed: bool,
}

struct Piece {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Pooled>, Error>>,
}

impl Batcher {
    /// A batcher running `first`; more sessions join with [`Self::adder`].
    pub fn start(
        model: &str,
        first: Session,
        config: BatchingConfig,
        metrics: ModelMetrics,
    ) -> Self {
        let shared = Arc::new(Shared {
            model: model.to_string(),
            config,
            metrics,
            sessions: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        Shared::add(&shared, first);
        Self { shared }
    }

    pub fn adder(&self) -> SessionAdder {
        SessionAdder(self.shared.clone())
    }

    /// Embeds `texts` (not normalised), in order, once sessions are free.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Pooled>, Error> {
        let count = texts.len();
        let sessions = self.shared.sessions.load(Ordering::Relaxed);
        let piece_size = count
            .div_ceil(sessions.max(1))
            .clamp(1, self.shared.config.max_batch_size);
        let mut replies = Vec::with_capacity(count.div_ceil(piece_size));
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(Error::ShuttingDown);
            }
            if queue.texts + count > self.shared.config.max_queued_texts {
                self.shared.metrics.rejected.inc();
                return Err(Error::QueueFull {
                    model: self.shared.model.clone(),
                    capacity: self.shared.config.max_queued_texts,
                });
            }
            let mut texts = texts.into_iter();
            loop {
                let piece: Vec<String> = texts.by_ref().take(piece_size).collect();
                if piece.is_empty() {
                    break;
                }
                let (reply, receiver) = oneshot::channel();
                queue.texts += piece.len();
                queue.pieces.push_back(Piece {
                    texts: piece,
                    reply,
                });
                replies.push(receiver);
                self.shared.wake.notify_one();
            }
            self.shared.metrics.queued.set(queue.texts as i64);
        }
        // Dropping this future (a client gone) drops the receivers; sessions
        // skip pieces nobody waits for.
        let mut out = Vec::with_capacity(count);
        for receiver in replies {
            out.extend(receiver.await.map_err(|_| Error::ShuttingDown)??);
        }
        Ok(out)
    }
}

impl Drop for Batcher {
    /// Lets the session threads finish what is queued, then end.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl SessionAdder {
    pub fn add(&self, session: Session) {
        Shared::add(&self.0, session);
    }
}

impl Shared {
    /// Runs `session` on a thread of its own.
    fn add(shared: &Arc<Self>, session: Session) {
        let index = shared.sessions.fetch_add(1, Ordering::Relaxed);
        let runner = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("embed-{index}"))
            .spawn(move || runner.run(session));
        if let Err(error) = spawned {
            shared.sessions.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(%error, model = %shared.model, "cannot start a session thread");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every
        // change is one statement), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session thread: take a batch, run it, answer, until closed and drained.
    fn run(&self, mut session: Session) {
        while let Some(batch) = self.next_batch() {
            let batch: Vec<Piece> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
            if batch.is_empty() {
                continue;
            }
            let texts: Vec<&str> = batch
                .iter()
                .flat_map(|p| p.texts.iter().map(String::as_str))
                .collect();
            let started = Instant::now();
            let result = session.embed(&texts);
            self.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batch_texts.observe(texts.len() as f64);
            match result {
                Ok(vectors) => {
                    self.metrics.texts.inc_by(vectors.len() as u64);
                    self.metrics
                        .tokens
                        .inc_by(vectors.iter().map(|v| u64::from(v.tokens)).sum());
                    let mut vectors = vectors.into_iter();
                    for piece in batch {
                        let mine = vectors.by_ref().take(piece.texts.len()).collect();
                        let _ = piece.reply.send(Ok(mine));
                    }
                }
                Err(error) => {
                    tracing::error!(model = %self.model, %error, "embedding batch failed");
                    for piece in batch {
                        let _ = piece.reply.send(Err(Error::Inference(error.to_string())));
                    }
                }
            }
        }
    }

    /// Waits for queued pieces and takes a batch of them; None once closed
    /// and empty.
    fn next_batch(&self) -> Option<Vec<Piece>> {
        let max = self.config.max_batch_size;
        let mut queue = self.lock();
        while queue.pieces.is_empty() {
            if queue.closed {
                return None;
            }
            queue.idle += 1;
            queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            queue.idle -= 1;
        }
        let mut batch = Vec::new();
        let mut count = 0;
        let deadline = Instant::now() + self.config.max_wait;
        loop {
            while let Some(front) = queue.pieces.front() {
                let first = batch.is_empty();
                if !first && (count + front.texts.len() > max || queue.idle > 0) {
                    break;
                }
                let piece = queue.pieces.pop_front()?;
                count += piece.texts.len();
                queue.texts -= piece.texts.len();
                batch.push(piece);
            }
            let now = Instant::now();
            if count >= max || !queue.pieces.is_empty() || queue.idle > 0 || now >= deadline {
                break;
            }
            queue = self
                .wake
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !queue.pieces.is_empty() {
            // A notification may have woken this thread rather than an idle
            // one; pass it on so that what is left is not stranded.
            self.wake.notify_all();
        }
        self.metrics.queued.set(queue.texts as i64);
        Some(batch)
    }
}
