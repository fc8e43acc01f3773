//! Dynamic batching: requests are cut into pieces and queued; each session
//! of a model runs on its own OS thread (inference is CPU-bound and must not
//! hold an async worker), takes queued pieces up to `max_batch_size` texts and
//! embeds them together.
//!
//! How a request is cut: its texts are sorted by length, longest first, and
//! cut into pieces of neighbouring lengths (so that a run pads little, as
//! sentence-transformers sorts its batches) and about the same work (texts ×
//! the piece's longest), at most `max_batch_size` texts each and at least one
//! per session, so a single big request keeps every core busy and its pieces
//! end at about the same time. Sessions take the pieces one by one as they
//! finish, which evens out the rest.
//!
//! How a session fills a batch: it takes the first piece, then more only
//! while no other session is idle (an idle session should run them at once,
//! in parallel), and, when the queue is empty and every other session is busy,
//! waits up to `max_wait` for more to arrive.
//!
//! The queue is bounded by texts: a request that does not fit is refused at
//! once (RESOURCE_EXHAUSTED / 429) rather than growing memory.
//!
//! Each batch's tokens and time go into the model's [`Throughput`], with
//! which requests are estimated before they are queued (`cost.rs`).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::EmbeddingError;
use crate::config::BatchingConfig;
use crate::cost::Throughput;
use crate::metrics::ModelMetrics;
use crate::model::{Pooled, Session};

/// What a session thread runs: the model's [`Session`] (or, in tests, a
/// fake that records the batches it is given).
pub trait Engine: Send + 'static {
    /// Embeds `texts` (in their order) without normalising.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Pooled>, EmbeddingError>;
}

impl Engine for Session {
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Pooled>, EmbeddingError> {
        Session::embed(self, texts)
    }
}

/// The queue and sessions of one model. Dropping it lets the sessions
/// finish what is queued and waits for every thread it started (sessions and
/// their loader) to end: ONNX Runtime's globals are torn down when the
/// process exits, and a thread still building or running a session then
/// crashes it (SIGSEGV) instead of a clean exit.
pub struct Batcher {
    shared: Arc<Shared>,
}

struct Shared {
    model: String,
    config: BatchingConfig,
    metrics: ModelMetrics,
    throughput: Throughput,
    sessions: AtomicUsize,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Every thread started for the model, joined when the batcher drops.
    threads: Mutex<Vec<JoinHandle<()>>>,
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
    reply: oneshot::Sender<Result<Vec<Pooled>, EmbeddingError>>,
}

impl Batcher {
    /// A batcher running `first`, its rate measured from `throughput` on;
    /// more sessions join with [`Self::adder`].
    pub fn start(
        model: &str,
        first: impl Engine,
        config: BatchingConfig,
        metrics: ModelMetrics,
        throughput: Throughput,
    ) -> Self {
        let shared = Arc::new(Shared {
            model: model.to_string(),
            config,
            metrics,
            throughput,
            sessions: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        });
        Shared::add(&shared, first);
        Self { shared }
    }

    /// Builds `count` more sessions with `build`, one after another on a
    /// thread of its own, each serving as soon as it is built (the first
    /// serves meanwhile); stops at the first failure, or once the batcher is
    /// dropped.
    pub fn add_later<E: Engine>(
        &self,
        count: usize,
        mut build: impl FnMut() -> Result<E, EmbeddingError> + Send + 'static,
    ) {
        if count == 0 {
            return;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("embed-load".into())
            .spawn(move || {
                for _ in 0..count {
                    if shared.lock().closed {
                        return;
                    }
                    match build() {
                        Ok(session) => Shared::add(&shared, session),
                        Err(error) => {
                            tracing::error!(model = %shared.model, %error, "cannot load another session; serving with fewer");
                            return;
                        }
                    }
                }
            });
        match spawned {
            Ok(loader) => self.shared.keep(loader),
            Err(error) => {
                tracing::error!(model = %self.shared.model, %error, "cannot start the session loader; serving with one session");
            }
        }
    }

    /// The tokens per second one of its sessions reads, as measured.
    pub fn throughput(&self) -> &Throughput {
        &self.shared.throughput
    }

    /// Embeds `texts` (not normalised), in order, once sessions are free.
    pub async fn embed(&self, mut texts: Vec<String>) -> Result<Vec<Pooled>, EmbeddingError> {
        let count = texts.len();
        let sessions = self.shared.sessions.load(Ordering::Relaxed);
        let mut longest_first: Vec<usize> = (0..count).collect();
        longest_first.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let work: Vec<usize> = longest_first
            .iter()
            .map(|&i| text_work(&texts[i]))
            .collect();
        let pieces = cut_pieces(&work, sessions, self.shared.config.max_batch_size);
        let mut replies = Vec::with_capacity(pieces.len());
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(EmbeddingError::ShuttingDown);
            }
            if queue.texts + count > self.shared.config.max_queued_texts {
                self.shared.metrics.rejected.inc();
                return Err(EmbeddingError::QueueFull {
                    model: self.shared.model.clone(),
                    capacity: self.shared.config.max_queued_texts,
                });
            }
            for range in pieces {
                let indices = &longest_first[range];
                let piece: Vec<String> = indices
                    .iter()
                    .map(|&i| std::mem::take(&mut texts[i]))
                    .collect();
                let (reply, receiver) = oneshot::channel();
                queue.texts += piece.len();
                queue.pieces.push_back(Piece {
                    texts: piece,
                    reply,
                });
                replies.push((indices, receiver));
                self.shared.wake.notify_one();
            }
            self.shared.metrics.queued.set(queue.texts as i64);
        }
        // Dropping this future (a client gone) drops the receivers; sessions
        // skip pieces nobody waits for.
        let mut out = vec![None; count];
        for (indices, receiver) in replies {
            let pooled = receiver.await.map_err(|_| EmbeddingError::ShuttingDown)??;
            for (&i, vector) in indices.iter().zip(pooled) {
                out[i] = Some(vector);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// A text's share of a run's work, in bytes: its length plus what its
/// special tokens ([CLS], [SEP]) cost, so that even an empty text counts.
fn text_work(text: &str) -> usize {
    text.len() + 8
}

/// Cuts texts sorted longest first (`work`: each one's [`text_work`]) into
/// ranges of about equal padded work (texts × the range's first, longest
/// one), at most `max_texts` each and, where there are texts enough, at
/// least `sessions` of them.
fn cut_pieces(work: &[usize], sessions: usize, max_texts: usize) -> Vec<Range<usize>> {
    let count = work.len();
    let max_texts = max_texts.max(1);
    let wanted = sessions
        .max(count.div_ceil(max_texts))
        .clamp(1, count.max(1));
    let target = work.iter().sum::<usize>().div_ceil(wanted);
    let mut pieces = Vec::with_capacity(wanted);
    let mut start = 0;
    while start < count {
        let longest = work[start];
        let mut end = start + 1;
        // Grows while under the target: a piece ends past it by less than a
        // text, so that equal texts split evenly.
        while end < count && end - start < max_texts && (end - start) * longest < target {
            end += 1;
        }
        pieces.push(start..end);
        start = end;
    }
    pieces
}

impl Drop for Batcher {
    /// Lets the session threads finish what is queued, then waits for them
    /// and the loader to end.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        // The loader may start one last session thread while these are
        // joined (it ends at once, on a closed queue): join until none is
        // left.
        loop {
            let threads = std::mem::take(
                &mut *self
                    .shared
                    .threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

impl Shared {
    /// Runs `session` on a thread of its own.
    fn add(shared: &Arc<Self>, session: impl Engine) {
        let index = shared.sessions.fetch_add(1, Ordering::Relaxed);
        let runner = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("embed-{index}"))
            .spawn(move || runner.run(session));
        match spawned {
            Ok(thread) => shared.keep(thread),
            Err(error) => {
                shared.sessions.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(%error, model = %shared.model, "cannot start a session thread");
            }
        }
    }

    fn keep(&self, thread: JoinHandle<()>) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(thread);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every
        // change is one statement), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session thread: take a batch, run it, answer, until closed and drained.
    fn run(&self, mut session: impl Engine) {
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
            let elapsed = started.elapsed();
            self.metrics.batch_seconds.observe(elapsed.as_secs_f64());
            self.metrics.batch_texts.observe(texts.len() as f64);
            match result {
                Ok(vectors) => {
                    let tokens = vectors.iter().map(|v| u64::from(v.tokens)).sum();
                    self.metrics.texts.inc_by(vectors.len() as u64);
                    self.metrics.tokens.inc_by(tokens);
                    self.throughput.record(tokens, elapsed);
                    let mut vectors = vectors.into_iter();
                    for piece in batch {
                        let mine = vectors.by_ref().take(piece.texts.len()).collect();
                        let _ = piece.reply.send(Ok(mine));
                    }
                }
                Err(error) => {
                    tracing::error!(model = %self.model, %error, "embedding batch failed");
                    for piece in batch {
                        let _ = piece
                            .reply
                            .send(Err(EmbeddingError::Inference(error.to_string())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A FAKE engine, not a model: it records the texts of each batch it is
    /// given, says when it has started one, and holds its first batch until
    /// the test lets it go, so the test decides when the session is busy.
    struct FakeEngine {
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        started: mpsc::Sender<()>,
        hold_first: Option<mpsc::Receiver<()>>,
    }

    impl Engine for FakeEngine {
        fn embed(&mut self, texts: &[&str]) -> Result<Vec<Pooled>, EmbeddingError> {
            self.batches
                .lock()
                .unwrap()
                .push(texts.iter().map(|t| t.to_string()).collect());
            let _ = self.started.send(());
            if let Some(gate) = self.hold_first.take() {
                let _ = gate.recv();
            }
            Ok(texts
                .iter()
                .map(|t| Pooled {
                    vector: vec![t.len() as f32],
                    tokens: 1,
                })
                .collect())
        }
    }

    struct Fake {
        batcher: Arc<Batcher>,
        registry: prometheus_client::registry::Registry,
        metrics: ModelMetrics,
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        started: mpsc::Receiver<()>,
        release: mpsc::Sender<()>,
    }

    /// A FAKE session that counts how many of its kind are alive.
    struct Counted(Arc<AtomicUsize>);

    impl Engine for Counted {
        fn embed(&mut self, texts: &[&str]) -> Result<Vec<Pooled>, EmbeddingError> {
            Ok(texts
                .iter()
                .map(|_| Pooled {
                    vector: vec![0.0],
                    tokens: 1,
                })
                .collect())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Once the batcher is dropped nothing of the model runs: the loader,
    /// caught building a session, finished it and built no more, and every
    /// session thread ended, its session dropped (at process exit, ONNX
    /// Runtime's teardown crashes under a thread still in it).
    #[test]
    fn dropping_the_batcher_waits_for_its_loader_and_sessions() {
        let Fake {
            batcher, started, ..
        } = fake(4);
        let alive = Arc::new(AtomicUsize::new(0));
        let building = Arc::new(AtomicUsize::new(0));
        let (began, building_began) = mpsc::channel();
        batcher.add_later(3, {
            let (alive, building) = (alive.clone(), building.clone());
            move || {
                building.fetch_add(1, Ordering::SeqCst);
                let _ = began.send(());
                std::thread::sleep(Duration::from_millis(200));
                alive.fetch_add(1, Ordering::SeqCst);
                building.fetch_sub(1, Ordering::SeqCst);
                Ok(Counted(alive.clone()))
            }
        });
        building_began
            .recv_timeout(Duration::from_secs(5))
            .expect("the loader starts building");
        let batcher = Arc::into_inner(batcher).expect("the test holds the only batcher");
        drop(batcher);
        assert_eq!(building.load(Ordering::SeqCst), 0, "still building");
        assert_eq!(alive.load(Ordering::SeqCst), 0, "a session outlived it");
        assert!(
            building_began.try_recv().is_err(),
            "the loader went on building once closed"
        );
        drop(started);
    }

    /// A batcher with one fake session whose first batch waits for `release`.
    fn fake(max_batch_size: usize) -> Fake {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry).for_model("fake");
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = mpsc::channel();
        let (release, gate) = mpsc::channel();
        let engine = FakeEngine {
            batches: batches.clone(),
            started: started_tx,
            hold_first: Some(gate),
        };
        let config = BatchingConfig {
            max_batch_size,
            ..BatchingConfig::default()
        };
        let throughput = Throughput::new(
            256,
            Duration::from_millis(100),
            metrics.tokens_per_second.clone(),
        );
        let batcher = Arc::new(Batcher::start(
            "fake",
            engine,
            config,
            metrics.clone(),
            throughput,
        ));
        Fake {
            batcher,
            registry,
            metrics,
            batches,
            started,
            release,
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The batch-size histogram as /metrics shows it: (runs, texts).
    fn batch_sizes(fake: &Fake) -> (u64, f64) {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &fake.registry).unwrap();
        let value = |suffix: &str| {
            let prefix = format!("{}{suffix}{{model=\"fake\"}} ", crate::metrics::BATCH_TEXTS);
            text.lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
                .parse::<f64>()
                .unwrap()
        };
        (value("_count") as u64, value("_sum"))
    }

    fn embed(
        fake: &Fake,
        text: String,
    ) -> tokio::task::JoinHandle<Result<Vec<Pooled>, EmbeddingError>> {
        let batcher = fake.batcher.clone();
        tokio::spawn(async move { batcher.embed(vec![text]).await })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_that_arrive_together_share_a_batch() {
        let fake = fake(32);
        // The session takes the first request and is busy with it…
        let first = embed(&fake, "first".into());
        fake.started.recv_timeout(Duration::from_secs(10)).unwrap();
        // …while 16 more arrive, one text each, and wait in the queue.
        let rest: Vec<_> = (0..16).map(|i| embed(&fake, format!("text {i}"))).collect();
        until("16 texts queued", || fake.metrics.queued.get() == 16).await;
        fake.release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap()[0].vector, [5.0]);
        for (i, answer) in rest.into_iter().enumerate() {
            // Each request gets its own text's vector back.
            let answer = answer.await.unwrap().unwrap();
            assert_eq!(answer[0].vector, [format!("text {i}").len() as f32]);
        }
        // Seen from the batch-size metric: 17 texts in 2 runs, not 17.
        assert_eq!(batch_sizes(&fake), (2, 17.0));
        let batches = fake.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert_eq!(batches[0], ["first"]);
        assert_eq!(batches[1].len(), 16, "{batches:?}");
        assert_eq!(fake.metrics.queued.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_holds_at_most_max_batch_size_texts() {
        let fake = fake(4);
        let first = embed(&fake, "first".into());
        fake.started.recv_timeout(Duration::from_secs(10)).unwrap();
        let rest: Vec<_> = (0..10).map(|i| embed(&fake, format!("t{i}"))).collect();
        until("10 texts queued", || fake.metrics.queued.get() == 10).await;
        fake.release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for answer in rest {
            answer.await.unwrap().unwrap();
        }
        let sizes: Vec<usize> = fake.batches.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 4, 4, 2]);
        assert_eq!(batch_sizes(&fake), (4, 11.0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_batch_is_measured() {
        let fake = fake(512);
        let before = fake.batcher.throughput().tokens_per_second();
        fake.release.send(()).unwrap();
        let texts = (0..300).map(|i| format!("t{i}")).collect();
        fake.batcher.embed(texts).await.unwrap();
        // 300 tokens (one a text) in far less than the first measure's
        // 100 ms for 256.
        let after = fake.batcher.throughput().tokens_per_second();
        assert!(after > before, "{before} then {after} tokens/s");
    }

    /// Every text in exactly one piece, in order, none over `max_texts`.
    fn check(work: &[usize], sessions: usize, max_texts: usize) -> Vec<usize> {
        let pieces = cut_pieces(work, sessions, max_texts);
        let mut next = 0;
        for piece in &pieces {
            assert_eq!(piece.start, next, "{pieces:?}");
            assert!(!piece.is_empty() && piece.len() <= max_texts, "{pieces:?}");
            next = piece.end;
        }
        assert_eq!(next, work.len(), "{pieces:?}");
        pieces.iter().map(ExactSizeIterator::len).collect()
    }

    #[test]
    fn texts_of_one_length_are_shared_evenly_among_sessions() {
        assert_eq!(check(&[60; 32], 2, 32), [16, 16]);
        assert_eq!(check(&[60; 256], 2, 32), [32; 8]);
        assert_eq!(check(&[60; 33], 2, 32), [17, 16]);
        assert_eq!(check(&[60; 3], 4, 32), [1, 1, 1]);
        assert_eq!(check(&[60; 1], 2, 32), [1]);
        assert_eq!(check(&[60; 10], 1, 4), [4, 4, 2]);
        assert!(cut_pieces(&[], 2, 32).is_empty());
    }

    #[test]
    fn long_texts_go_in_smaller_pieces_of_about_the_same_work() {
        // 8 texts four times longer than the 24 others.
        let mut work = vec![400; 8];
        work.extend([100; 24]);
        // Half the work is 2,800: 7 long texts pad to it; the 8th long one
        // leads a piece of 7 too (padding 6 short ones), the 18 left take 1,800.
        assert_eq!(check(&work, 2, 32), [7, 7, 18]);
        // With 4 sessions the long texts are shared among more pieces.
        assert_eq!(check(&work, 4, 32), [4, 4, 14, 10]);
    }
}
