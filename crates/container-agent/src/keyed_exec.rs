//! Keyed execs: an exec started with a key outlives the call that started
//! it, so a caller that died mid-run (an orchestrator killed with -9) can
//! come back, attach, and take the result instead of running the command a
//! second time. The runtimes know nothing of keys: this table holds each
//! keyed exec's output receiver (dropping it is what kills the command),
//! keeps a bounded tail of the output and the exit status, and serves every
//! attacher from that record.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus, exec_output};
use berth_server::CancellationToken;
use tokio::sync::{mpsc, watch};

use crate::error::AgentError;
use crate::process_group::EXEC_BUFFER;

/// Longest exec key accepted.
pub const MAX_EXEC_KEY_BYTES: usize = 512;
/// Exit code reported for a cancelled exec: 128 + SIGKILL, as for a timeout.
const KILLED: i32 = 137;

/// Bounds of the table; see the `agent.*keyed_exec*` config fields.
#[derive(Debug, Clone, Copy)]
pub struct KeyedExecLimits {
    pub max_entries: usize,
    pub tail_bytes: usize,
    pub retention: Duration,
}

pub struct KeyedExecs {
    table: Mutex<HashMap<String, Arc<KeyedExec>>>,
    limits: KeyedExecLimits,
}

struct KeyedExec {
    record: Mutex<Record>,
    /// Signalled after every change of the record; attachers wait on it.
    changed: watch::Sender<()>,
    cancel: CancellationToken,
    started: Instant,
}

#[derive(Default)]
struct Record {
    /// Output chunks kept, each with the offset of its first byte in the
    /// exec's whole output, so an attacher knows what it missed.
    kept: VecDeque<(u64, ExecOutput)>,
    kept_bytes: usize,
    /// Offset of the first byte still kept; everything before is dropped.
    kept_from: u64,
    /// Offset just past the last byte received.
    end: u64,
    /// None while running, and for an exec whose runtime stream ended
    /// without a status (attachers then see the stream end without one).
    exit: Option<ExitStatus>,
    ended: Option<Instant>,
}

/// What an attacher at some offset has not been sent yet.
struct Unseen {
    dropped_bytes: u64,
    chunks: Vec<ExecOutput>,
    next_offset: u64,
    exit: Option<ExitStatus>,
    ended: bool,
}

impl KeyedExecs {
    pub fn new(limits: KeyedExecLimits) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Registers `key`, then starts the exec with `spawn` (the runtime's
    /// exec) and returns an attached stream. A key already known is refused
    /// before `spawn` runs, so a command never runs twice for one key.
    pub async fn start<F>(
        &self,
        key: String,
        spawn: F,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError>
    where
        F: Future<Output = Result<mpsc::Receiver<ExecOutput>, AgentError>>,
    {
        validate_key(&key)?;
        let reservation = self.reserve(key)?;
        let output = spawn.await?;
        let exec = reservation.confirm();
        Arc::clone(&exec).pump(output, self.limits.tail_bytes);
        Ok(exec.attach())
    }

    /// The exec's kept output, then the rest live, then its exit status.
    pub fn attach(&self, key: &str) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
        Ok(self.find(key)?.attach())
    }

    /// Kills the exec; one that already ended stays as it was.
    pub fn cancel(&self, key: &str) -> Result<(), AgentError> {
        self.find(key)?.cancel.cancel();
        Ok(())
    }

    fn find(&self, key: &str) -> Result<Arc<KeyedExec>, AgentError> {
        let mut table = self.lock();
        self.forget_expired(&mut table);
        table
            .get(key)
            .cloned()
            .ok_or_else(|| AgentError::ExecNotFound(key.to_string()))
    }

    fn reserve(&self, key: String) -> Result<Reservation<'_>, AgentError> {
        let mut table = self.lock();
        self.forget_expired(&mut table);
        if table.contains_key(&key) {
            return Err(AgentError::ExecKeyTaken(key));
        }
        if table.len() >= self.limits.max_entries {
            let oldest_ended = table
                .iter()
                .filter_map(|(key, exec)| Some((exec.lock().ended?, key.clone())))
                .min();
            match oldest_ended {
                Some((_, oldest)) => table.remove(&oldest),
                None => return Err(AgentError::TooManyKeyedExecs(table.len())),
            };
        }
        let exec = Arc::new(KeyedExec {
            record: Mutex::new(Record::default()),
            changed: watch::channel(()).0,
            cancel: CancellationToken::new(),
            started: Instant::now(),
        });
        table.insert(key.clone(), Arc::clone(&exec));
        Ok(Reservation {
            table: self,
            key,
            exec: Some(exec),
        })
    }

    fn forget_expired(&self, table: &mut HashMap<String, Arc<KeyedExec>>) {
        let retention = self.limits.retention;
        table.retain(|_, exec| {
            exec.lock()
                .ended
                .is_none_or(|ended| ended.elapsed() < retention)
        });
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<KeyedExec>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A key taken for an exec that is being started; dropped unconfirmed (the
/// runtime refused, or the call went away meanwhile) it frees the key.
struct Reservation<'a> {
    table: &'a KeyedExecs,
    key: String,
    exec: Option<Arc<KeyedExec>>,
}

impl Reservation<'_> {
    fn confirm(mut self) -> Arc<KeyedExec> {
        self.exec.take().expect("a reservation is confirmed once")
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(exec) = self.exec.take() {
            self.table.lock().remove(&self.key);
            exec.finish(None);
        }
    }
}

impl KeyedExec {
    fn lock(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drains the runtime's output into the record until the exec ends or
    /// is cancelled; no caller's stream holds it up.
    fn pump(self: Arc<Self>, mut output: mpsc::Receiver<ExecOutput>, tail_bytes: usize) {
        tokio::spawn(async move {
            let exit = loop {
                let message = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break Some(ExitStatus {
                        exit_code: KILLED,
                        reason: ExitReason::Cancelled as i32,
                        duration: prost_types::Duration::try_from(self.started.elapsed()).ok(),
                    }),
                    message = output.recv() => message,
                };
                match message {
                    Some(ExecOutput {
                        output: Some(exec_output::Output::Exit(exit)),
                    }) => break Some(exit),
                    Some(chunk) => {
                        self.lock().push(chunk, tail_bytes);
                        self.changed.send_replace(());
                    }
                    None => break None,
                }
            };
            // For a cancel, the runtime kills the command once its receiver is gone.
            drop(output);
            self.finish(exit);
        });
    }

    fn finish(&self, exit: Option<ExitStatus>) {
        {
            let mut record = self.lock();
            record.exit = exit;
            record.ended = Some(Instant::now());
        }
        self.changed.send_replace(());
    }

    fn attach(self: Arc<Self>) -> mpsc::Receiver<ExecOutput> {
        let (tx, rx) = mpsc::channel(EXEC_BUFFER);
        // Subscribed before the first look at the record: no change is missed.
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let mut offset = 0;
            loop {
                let unseen = self.lock().unseen(offset);
                offset = unseen.next_offset;
                let dropped = (unseen.dropped_bytes > 0).then_some(ExecOutput {
                    output: Some(exec_output::Output::DroppedBytes(unseen.dropped_bytes)),
                });
                let exit = unseen.exit.map(|exit| ExecOutput {
                    output: Some(exec_output::Output::Exit(exit)),
                });
                for output in dropped.into_iter().chain(unseen.chunks).chain(exit) {
                    if tx.send(output).await.is_err() {
                        return;
                    }
                }
                if unseen.ended {
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}

impl Record {
    fn push(&mut self, chunk: ExecOutput, tail_bytes: usize) {
        let len = output_len(&chunk);
        self.kept.push_back((self.end, chunk));
        self.end += len as u64;
        self.kept_bytes += len;
        while self.kept_bytes > tail_bytes {
            let Some((offset, oldest)) = self.kept.pop_front() else {
                break;
            };
            let len = output_len(&oldest);
            self.kept_bytes -= len;
            self.kept_from = offset + len as u64;
        }
    }

    fn unseen(&self, offset: u64) -> Unseen {
        Unseen {
            dropped_bytes: self.kept_from.saturating_sub(offset),
            chunks: self
                .kept
                .iter()
                .filter(|(start, _)| *start >= offset)
                .map(|(_, chunk)| chunk.clone())
                .collect(),
            next_offset: self.end,
            exit: self.exit,
            ended: self.ended.is_some(),
        }
    }
}

fn output_len(output: &ExecOutput) -> usize {
    match &output.output {
        Some(exec_output::Output::Stdout(data) | exec_output::Output::Stderr(data)) => data.len(),
        _ => 0,
    }
}

pub fn validate_key(key: &str) -> Result<(), AgentError> {
    if key.is_empty() {
        return Err(AgentError::InvalidArgument {
            field: "exec_key",
            reason: "must name a keyed exec".into(),
        });
    }
    if key.len() > MAX_EXEC_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(AgentError::InvalidArgument {
            field: "exec_key",
            reason: format!(
                "must be at most {MAX_EXEC_KEY_BYTES} bytes without control characters"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> KeyedExecLimits {
        KeyedExecLimits {
            max_entries: 4,
            tail_bytes: 1024,
            retention: Duration::from_secs(60),
        }
    }

    fn stdout(data: &[u8]) -> ExecOutput {
        ExecOutput {
            output: Some(exec_output::Output::Stdout(data.to_vec())),
        }
    }

    fn exit(code: i32) -> ExecOutput {
        ExecOutput {
            output: Some(exec_output::Output::Exit(ExitStatus {
                exit_code: code,
                reason: ExitReason::Exited as i32,
                duration: None,
            })),
        }
    }

    /// A stand-in for a runtime's exec: the test plays the command.
    fn fake_exec() -> (
        mpsc::Sender<ExecOutput>,
        impl Future<Output = Result<mpsc::Receiver<ExecOutput>, AgentError>>,
    ) {
        let (tx, rx) = mpsc::channel(EXEC_BUFFER);
        (tx, async move { Ok(rx) })
    }

    async fn collect(mut rx: mpsc::Receiver<ExecOutput>) -> Vec<exec_output::Output> {
        let mut all = Vec::new();
        while let Some(message) = rx.recv().await {
            all.extend(message.output);
        }
        all
    }

    #[tokio::test]
    async fn dropping_the_callers_stream_leaves_the_exec_running_and_attachable() {
        let execs = KeyedExecs::new(limits());
        let (command, spawn) = fake_exec();
        let first = execs.start("c/r/1".into(), spawn).await.unwrap();
        command.send(stdout(b"before ")).await.unwrap();
        drop(first);
        command.send(stdout(b"after")).await.unwrap();
        assert!(!command.is_closed(), "a keyed exec outlives its caller");
        command.send(exit(0)).await.unwrap();
        let replay = collect(execs.attach("c/r/1").unwrap()).await;
        assert_eq!(
            replay,
            [
                exec_output::Output::Stdout(b"before ".to_vec()),
                exec_output::Output::Stdout(b"after".to_vec()),
                exit(0).output.unwrap(),
            ]
        );
    }

    #[tokio::test]
    async fn a_key_in_use_never_runs_the_command_again() {
        let execs = KeyedExecs::new(limits());
        let (_command, spawn) = fake_exec();
        let _running = execs.start("k".into(), spawn).await.unwrap();
        let spawned = std::sync::atomic::AtomicBool::new(false);
        let again = execs
            .start("k".into(), async {
                spawned.store(true, std::sync::atomic::Ordering::SeqCst);
                fake_exec().1.await
            })
            .await;
        assert!(matches!(again, Err(AgentError::ExecKeyTaken(_))));
        assert!(!spawned.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(
            execs.attach("other"),
            Err(AgentError::ExecNotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_refused_start_frees_the_key() {
        let execs = KeyedExecs::new(limits());
        let refused = execs
            .start("k".into(), async {
                Err(AgentError::WorkloadNotFound("w".into()))
            })
            .await;
        assert!(matches!(refused, Err(AgentError::WorkloadNotFound(_))));
        assert!(execs.attach("k").is_err());
        let (_command, spawn) = fake_exec();
        assert!(execs.start("k".into(), spawn).await.is_ok());
    }

    #[tokio::test]
    async fn replay_is_bounded_and_says_what_it_dropped() {
        let execs = KeyedExecs::new(limits());
        let (command, spawn) = fake_exec();
        drop(execs.start("k".into(), spawn).await.unwrap());
        for _ in 0..3 {
            command.send(stdout(&[b'x'; 600])).await.unwrap();
        }
        command.send(exit(0)).await.unwrap();
        let replay = collect(execs.attach("k").unwrap()).await;
        assert_eq!(replay[0], exec_output::Output::DroppedBytes(1200));
        assert_eq!(replay.len(), 3, "one kept chunk and the exit: {replay:?}");
    }

    #[tokio::test]
    async fn cancel_kills_and_reports_cancelled() {
        let execs = KeyedExecs::new(limits());
        let (command, spawn) = fake_exec();
        let stream = execs.start("k".into(), spawn).await.unwrap();
        execs.cancel("k").unwrap();
        tokio::time::timeout(Duration::from_secs(5), command.closed())
            .await
            .expect("the runtime's receiver is dropped, which kills the command");
        match collect(stream).await.pop() {
            Some(exec_output::Output::Exit(exit)) => {
                assert_eq!(exit.reason(), ExitReason::Cancelled);
            }
            other => panic!("no exit: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_table_is_bounded_and_forgets_after_retention() {
        let execs = KeyedExecs::new(KeyedExecLimits {
            max_entries: 1,
            retention: Duration::ZERO,
            ..limits()
        });
        let (command, spawn) = fake_exec();
        let stream = execs.start("a".into(), spawn).await.unwrap();
        let (_other, spawn) = fake_exec();
        assert!(matches!(
            execs.start("b".into(), spawn).await,
            Err(AgentError::TooManyKeyedExecs(1))
        ));
        command.send(exit(0)).await.unwrap();
        collect(stream).await;
        assert!(matches!(
            execs.attach("a"),
            Err(AgentError::ExecNotFound(_))
        ));
        let (_other, spawn) = fake_exec();
        assert!(execs.start("b".into(), spawn).await.is_ok());
    }

    #[test]
    fn keys_are_bounded() {
        assert!(validate_key("camp/run/1").is_ok());
        assert!(validate_key(&"k".repeat(MAX_EXEC_KEY_BYTES + 1)).is_err());
        assert!(validate_key("a\nb").is_err());
    }
}
