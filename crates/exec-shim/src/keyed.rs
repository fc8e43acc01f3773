//! Keyed execs on a serial port: they outlive the agent's connection, so
//! an agent killed mid-exec (or restarted) finds the command still running
//! or its result kept, and attaches instead of running it again.
//!
//! Each keyed exec's output goes into a bounded tail ([`MAX_KEPT_BYTES`]),
//! not to the port: the connection attached to it (at most one, the port
//! takes one at a time) is sent the kept output from its start, then the
//! rest live, then the exit. With no connection attached the command runs
//! on for its `detach_grace`, then is killed. A [`protocol::CANCEL`] from
//! the attached agent kills it at once. At most [`MAX_KEPT_EXECS`] are kept;
//! the oldest ended one is forgotten for a new one, and with none ended a
//! new one is refused.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::journal::Journal;
use crate::protocol::{self, ACCEPTED, EXIT, Request, STDERR, STDOUT};
use crate::{Duplex, MAX_PAYLOAD, Watched, send_to};

/// Output bytes kept per keyed exec; older output is dropped, and an
/// attacher told how much.
pub(crate) const MAX_KEPT_BYTES: usize = 1 << 20;
/// Keyed execs kept at once, running or ended.
pub(crate) const MAX_KEPT_EXECS: usize = 8;

#[derive(Default)]
pub(crate) struct Kept(VecDeque<Arc<KeptExec>>);

impl Kept {
    pub(crate) fn find(&self, key: &str) -> Option<Arc<KeptExec>> {
        self.0.iter().find(|exec| exec.key == key).cloned()
    }

    /// The exec kept under `key`, or a new one running `request`.
    pub(crate) fn run(
        &mut self,
        key: String,
        request: Request,
        timeout: Option<Duration>,
        detach_grace: Duration,
        journal: &Journal,
    ) -> Arc<KeptExec> {
        if let Some(exec) = self.find(&key) {
            return exec;
        }
        if self.0.len() >= MAX_KEPT_EXECS {
            match self.0.iter().position(|exec| exec.lock().exit.is_some()) {
                Some(oldest_ended) => drop(self.0.remove(oldest_ended)),
                // Refused, and not kept: the key stays free.
                None => {
                    return KeptExec::ended(
                        key,
                        protocol::CANNOT_RUN,
                        format!(
                            "berth-exec-shim: {MAX_KEPT_EXECS} keyed execs are running; none has ended\n"
                        ),
                    );
                }
            }
        }
        let exec = KeptExec::start(key, request, timeout, detach_grace, journal.clone());
        self.0.push_back(Arc::clone(&exec));
        exec
    }
}

pub(crate) struct KeptExec {
    key: String,
    /// None for a command that never started.
    group: Option<Pid>,
    output: Mutex<Output>,
    /// Signalled on every change of `output`, and when an attached
    /// connection goes away.
    changed: Condvar,
}

#[derive(Default)]
struct Output {
    /// Chunks kept (tag, bytes), each with the offset of its first byte in
    /// the whole output.
    chunks: VecDeque<(u64, u8, Vec<u8>)>,
    kept_bytes: usize,
    /// Offset of the first byte still kept.
    kept_from: u64,
    /// Offset just past the last byte.
    end: u64,
    exit: Option<i32>,
    /// Since when no connection is attached; None while one is.
    detached_since: Option<Instant>,
}

impl Output {
    fn push(&mut self, tag: u8, data: Vec<u8>) {
        let len = data.len();
        self.chunks.push_back((self.end, tag, data));
        self.end += len as u64;
        self.kept_bytes += len;
        while self.kept_bytes > MAX_KEPT_BYTES {
            let Some((offset, _, oldest)) = self.chunks.pop_front() else {
                break;
            };
            self.kept_bytes -= oldest.len();
            self.kept_from = offset + oldest.len() as u64;
        }
    }
}

impl KeptExec {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Output)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// An exec that ended before it started, with why on stderr.
    fn ended(key: String, code: i32, why: String) -> Arc<Self> {
        let exec = Arc::new(Self {
            key,
            group: None,
            output: Mutex::default(),
            changed: Condvar::new(),
        });
        exec.update(|output| {
            output.push(STDERR, why.into_bytes());
            output.exit = Some(code);
        });
        exec
    }

    fn start(
        key: String,
        request: Request,
        timeout: Option<Duration>,
        detach_grace: Duration,
        journal: Journal,
    ) -> Arc<Self> {
        let started = Instant::now();
        journal.started(Some(&key), &request.argv);
        let (mut child, group) = match crate::spawn(&request) {
            Ok(spawned) => spawned,
            Err((code, why)) => {
                journal.ended(Some(&key), code, started.elapsed());
                return Self::ended(key, code, why);
            }
        };
        let exec = Arc::new(Self {
            key,
            group: Some(group),
            output: Mutex::default(),
            changed: Condvar::new(),
        });
        let pumps = [
            child.stdout.take().map(|out| exec.pump(out, STDOUT)),
            child.stderr.take().map(|err| exec.pump(err, STDERR)),
        ];
        let waited = Arc::clone(&exec);
        std::thread::spawn(move || {
            let code = match child.wait() {
                Ok(status) => crate::exit_code(status),
                Err(_) => protocol::CANNOT_RUN,
            };
            // Nothing the command started is left behind.
            let _ = killpg(group, Signal::SIGKILL);
            for pump in pumps.into_iter().flatten() {
                let _ = pump.join();
            }
            journal.ended(Some(&waited.key), code, started.elapsed());
            waited.update(|output| output.exit = Some(code));
        });
        let timed = Arc::clone(&exec);
        std::thread::spawn(move || timed.kill_when_due(started, timeout, detach_grace));
        exec
    }

    fn pump(
        self: &Arc<Self>,
        mut pipe: impl Read + Send + 'static,
        tag: u8,
    ) -> std::thread::JoinHandle<()> {
        let exec = Arc::clone(self);
        std::thread::spawn(move || {
            let mut buffer = vec![0; MAX_PAYLOAD];
            loop {
                match pipe.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => exec.update(|output| output.push(tag, buffer[..n].to_vec())),
                }
            }
        })
    }

    /// Kills the command at its timeout, or once no connection was
    /// attached for `detach_grace`; returns when it ended.
    fn kill_when_due(&self, started: Instant, timeout: Option<Duration>, detach_grace: Duration) {
        let mut output = self.lock();
        loop {
            if output.exit.is_some() {
                return;
            }
            let timed_out = timeout.map(|t| (started + t, "ran past its timeout"));
            let abandoned = output.detached_since.map(|since| {
                (
                    since + detach_grace,
                    "no agent attached within its detach grace",
                )
            });
            let due = [timed_out, abandoned].into_iter().flatten().min();
            let now = Instant::now();
            output = match due {
                Some((at, why)) if at <= now => {
                    output.push(
                        STDERR,
                        format!("berth-exec-shim: killed: it {why}\n").into_bytes(),
                    );
                    drop(output);
                    self.changed.notify_all();
                    self.kill();
                    return;
                }
                Some((at, _)) => {
                    self.changed
                        .wait_timeout(output, at - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(output)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    fn kill(&self) {
        if let Some(group) = self.group {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Attaches the connection on `port` to `exec`: an [`ACCEPTED`] frame, the
/// kept output (after a note of what was dropped), the rest live, then the
/// exit frame. Returns when the exit was sent and the agent went on (or
/// went away), or when the agent went away first, leaving the command
/// running, or cancelled it; how the connection ended.
pub(crate) fn serve(port: &File, exec: &Arc<KeptExec>) -> io::Result<Watched> {
    send_to(port, ACCEPTED, &[])?;
    exec.update(|output| output.detached_since = None);
    let finished = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (mut connection, finished, gone, exec) = (
            port.duplicate()?,
            Arc::clone(&finished),
            Arc::clone(&gone),
            Arc::clone(exec),
        );
        std::thread::spawn(move || {
            let watched = connection.watch(&finished);
            if watched == Watched::Cancelled {
                exec.kill();
            }
            if watched != Watched::Finished {
                gone.store(true, Ordering::SeqCst);
                exec.update(|_| {});
            }
            watched
        })
    };
    let streamed = stream(port, exec, &gone, &finished);
    if !matches!(streamed, Ok(true)) {
        // Nothing more is sent: on a serial port it would reach the
        // agent's next connection. The command runs on, for its grace.
        exec.update(|output| output.detached_since = Some(Instant::now()));
    }
    let watched = watcher.join().unwrap_or(Watched::HungUp);
    streamed.map(|_| watched)
}

/// Sends `exec`'s output and exit over `port` until `gone`; true once the
/// exit frame is sent. `finished` is set before the exit frame goes, so
/// that the agent closing right after it is no hang-up mid-command.
fn stream(
    port: &File,
    exec: &KeptExec,
    gone: &AtomicBool,
    finished: &AtomicBool,
) -> io::Result<bool> {
    let mut next = 0;
    loop {
        let (dropped, chunks, exit) = {
            let mut output = exec.lock();
            while output.end == next && output.exit.is_none() && !gone.load(Ordering::SeqCst) {
                output = exec
                    .changed
                    .wait(output)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if gone.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let chunks: Vec<(u8, Vec<u8>)> = output
                .chunks
                .iter()
                .filter(|(offset, _, _)| *offset >= next)
                .map(|(_, tag, data)| (*tag, data.clone()))
                .collect();
            let dropped = output.kept_from.saturating_sub(next);
            next = output.end;
            (dropped, chunks, output.exit)
        };
        if dropped > 0 {
            let note = format!(
                "berth-exec-shim: {dropped} bytes of output dropped (the shim keeps the last {MAX_KEPT_BYTES})\n"
            );
            send_to(port, STDERR, note.as_bytes())?;
        }
        for (tag, data) in chunks {
            send_to(port, tag, &data)?;
        }
        if let Some(code) = exit {
            finished.store(true, Ordering::SeqCst);
            send_to(port, EXIT, &code.to_be_bytes())?;
            return Ok(true);
        }
    }
}
