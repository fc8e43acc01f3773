//! A VM's log: what its guest writes to the serial console, which libvirt
//! (virtlogd) copies into [`CONSOLE_LOG`] in the VM's files directory (the
//! file is rewritten at each start of the domain).
//!
//! The file carries no times, so the agent follows it: one task per VM reads
//! what was appended every [`READ_EVERY`], and stamps each new line with the
//! time it read it: within that period of the guest writing it while the
//! agent runs; lines written while the agent was down carry the time the
//! restarted agent first read them. A line is never stamped earlier than it
//! was written, so the `since` filter of Logs never drops a line written after
//! it. The lines read are kept, the last `capacity` of them, for `tail`; new
//! ones go to followers.

use std::collections::{HashMap, VecDeque};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{LogLine, LogStream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{broadcast, mpsc};

/// The console log's name in a VM's files directory.
pub const CONSOLE_LOG: &str = "console.log";
/// How often a VM's console log is read for new lines: the delay a follower
/// sees at most (plus virtlogd's own).
const READ_EVERY: Duration = Duration::from_millis(100);
/// Bytes read at most per read, so one chatty guest cannot hold the task.
const MAX_READ: u64 = 1 << 20;
/// Longest line passed on; longer ones are cut (a log is for people).
const MAX_LINE: usize = 16 * 1024;
/// Lines buffered for one Logs call, and for followers that lag.
const FOLLOW_BUFFER: usize = 256;

/// The journals of the VMs whose consoles the agent follows, by domain UUID.
pub struct Consoles {
    journals: Mutex<HashMap<String, Arc<Journal>>>,
    /// Lines kept per VM (`agent.log_lines_per_workload`).
    capacity: usize,
}

/// One VM's console lines as the agent read them.
pub struct Journal {
    kept: Mutex<VecDeque<LogLine>>,
    /// Sent under the `kept` lock, so a new follower misses nothing between
    /// the kept lines it copied and the first line it receives.
    followers: broadcast::Sender<LogLine>,
    /// Set when the domain starts: virtlogd rewrites the file from its start.
    restarted: AtomicBool,
}

impl Consoles {
    pub fn new(capacity: usize) -> Self {
        Self {
            journals: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// The journal of domain `uuid`, whose console is logged in `files_dir`:
    /// followed from now on if it was not yet.
    pub fn journal(&self, uuid: &str, files_dir: &Path) -> Arc<Journal> {
        let mut journals = self.journals.lock().unwrap_or_else(PoisonError::into_inner);
        journals
            .entry(uuid.to_string())
            .or_insert_with(|| {
                let journal = Arc::new(Journal {
                    kept: Mutex::default(),
                    followers: broadcast::channel(FOLLOW_BUFFER).0,
                    restarted: AtomicBool::new(false),
                });
                tokio::spawn(follow(
                    Arc::downgrade(&journal),
                    files_dir.join(CONSOLE_LOG),
                    self.capacity,
                ));
                journal
            })
            .clone()
    }

    /// Stops following a removed domain's console.
    pub fn remove(&self, uuid: &str) {
        self.journals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uuid);
    }
}

impl Journal {
    /// The domain (re)started: its console log is read again from the
    /// start, even when the new run has already written more than the last.
    pub fn restarted(&self) {
        self.restarted.store(true, Ordering::Relaxed);
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, VecDeque<LogLine>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, lines: Vec<String>, capacity: usize) {
        let time = SystemTime::now();
        let mut kept = self.kept();
        for line in lines {
            let line = LogLine {
                time: Some(time.into()),
                stream: LogStream::Stdout as i32,
                line,
            };
            if kept.len() >= capacity {
                kept.pop_front();
            }
            kept.push_back(line.clone());
            let _ = self.followers.send(line);
        }
    }

    /// The last `tail` kept lines (0: all), then, while `follow`, new ones
    /// until the receiver is dropped.
    pub fn lines(&self, tail: usize, follow: bool) -> mpsc::Receiver<LogLine> {
        let (snapshot, mut new_lines) = {
            let kept = self.kept();
            let skip = if tail == 0 {
                0
            } else {
                kept.len().saturating_sub(tail)
            };
            let snapshot: Vec<LogLine> = kept.iter().skip(skip).cloned().collect();
            (snapshot, self.followers.subscribe())
        };
        let (tx, rx) = mpsc::channel(FOLLOW_BUFFER);
        tokio::spawn(async move {
            for line in snapshot {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let line = tokio::select! {
                    line = new_lines.recv() => line,
                    () = tx.closed() => return,
                };
                match line {
                    Ok(line) => {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a console log follower fell behind");
                    }
                    // The journal went with its domain.
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        rx
    }
}

/// Reads `path` into the journal until the journal is dropped.
async fn follow(journal: Weak<Journal>, path: PathBuf, capacity: usize) {
    let mut tail = Tail::default();
    while let Some(journal) = journal.upgrade() {
        let mut lines = Vec::new();
        if journal.restarted.swap(false, Ordering::Relaxed) {
            lines.extend(tail.rewind());
        }
        match tail.read(&path).await {
            Ok(read) => lines.extend(read),
            // Not there until the domain first starts.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "cannot read a console log");
            }
        }
        journal.push(lines, capacity);
        drop(journal);
        tokio::time::sleep(READ_EVERY).await;
    }
}

/// Where the reading of one console log file is.
#[derive(Debug, Default)]
struct Tail {
    offset: u64,
    /// The start of a line whose newline has not come yet.
    partial: Vec<u8>,
}

impl Tail {
    /// The complete lines appended to `path` since the last read.
    async fn read(&mut self, path: &Path) -> std::io::Result<Vec<String>> {
        let mut file = tokio::fs::File::open(path).await?;
        let length = file.metadata().await?.len();
        let mut lines = Vec::new();
        if length < self.offset {
            // Rewritten: the domain started again outside the agent.
            lines.extend(self.rewind());
        }
        if length == self.offset {
            return Ok(lines);
        }
        file.seek(SeekFrom::Start(self.offset)).await?;
        let mut bytes = Vec::new();
        file.take(MAX_READ).read_to_end(&mut bytes).await?;
        self.offset += bytes.len() as u64;
        lines.extend(self.lines_of(&bytes));
        Ok(lines)
    }

    fn lines_of(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            self.partial.extend_from_slice(piece);
            if piece.ends_with(b"\n") {
                lines.extend(self.take_partial());
            } else if self.partial.len() > MAX_LINE {
                // A line this long is cut here; its rest comes as a line of its own.
                lines.extend(self.take_partial());
            }
        }
        lines
    }

    /// Reads the file from its start again; the last unfinished line of
    /// the earlier run is all there will be of it.
    fn rewind(&mut self) -> Option<String> {
        self.offset = 0;
        self.take_partial()
    }

    fn take_partial(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.partial);
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LINE)]);
        Some(text.trim_end_matches(['\n', '\r']).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_newlines_and_wait_for_theirs() {
        let mut tail = Tail::default();
        assert_eq!(tail.lines_of(b"one\r\ntw"), ["one"]);
        assert_eq!(tail.lines_of(b"o\nthree"), ["two"]);
        assert_eq!(tail.take_partial().as_deref(), Some("three"));
        let long = vec![b'x'; MAX_LINE + 10];
        let lines = tail.lines_of(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }

    #[tokio::test]
    async fn a_log_is_followed_tailed_and_read_again_when_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let consoles = Consoles::new(3);
        let journal = consoles.journal("vm", dir.path());
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        let mut follower = journal.lines(0, true);
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), follower.recv())
                .await
                .expect("a line in time")
                .unwrap()
                .line
        };
        for expected in ["a", "b", "c", "d"] {
            assert_eq!(next().await, expected);
        }
        // Only the last `capacity` lines are kept; `tail` takes the last N.
        let mut tailed = journal.lines(2, false);
        assert_eq!(tailed.recv().await.unwrap().line, "c");
        assert_eq!(tailed.recv().await.unwrap().line, "d");
        assert!(tailed.recv().await.is_none(), "no follow: the stream ends");
        // The domain restarted: virtlogd rewrote the file.
        std::fs::write(&path, "boot\n").unwrap();
        assert_eq!(next().await, "boot");
        // The same journal for the same domain; a removed one stops.
        assert!(Arc::ptr_eq(&journal, &consoles.journal("vm", dir.path())));
        consoles.remove("vm");
        drop(journal);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), follower.recv())
                .await
                .unwrap()
                .is_none()
        );
    }
}
