//! A job's logs: its stdout and stderr files (on storage the nodes and the
//! agent share), read as lines, the last `tail` of each, then followed
//! while the job lives.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{LogLine, LogStream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};

/// Most of a file read back for its last lines.
const MAX_TAIL_BYTES: u64 = 1 << 20;
/// Longest line kept; longer ones are cut (a log is for people).
const MAX_LINE_BYTES: usize = 16 * 1024;
/// How often a followed file is looked at for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
const LOG_BUFFER: usize = 256;

/// Streams `files` (stdout, stderr); with `follow`, until `finished` says
/// the job ended (and the files are read to their end) or the receiver goes.
pub fn stream(
    files: [(PathBuf, LogStream); 2],
    tail: usize,
    follow: bool,
    finished: watch::Receiver<bool>,
) -> mpsc::Receiver<LogLine> {
    let (tx, rx) = mpsc::channel(LOG_BUFFER);
    for (path, stream) in files {
        let tx = tx.clone();
        let mut finished = finished.clone();
        tokio::spawn(async move {
            let mut reader = Reader {
                path,
                stream,
                offset: 0,
                partial: Vec::new(),
            };
            let lines = reader.tail(tail).await;
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let done = *finished.borrow_and_update();
                for line in reader.more().await {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(FOLLOW_EVERY) => {}
                    _ = finished.changed() => {}
                    () = tx.closed() => return,
                }
            }
        });
    }
    rx
}

struct Reader {
    path: PathBuf,
    stream: LogStream,
    offset: u64,
    partial: Vec<u8>,
}

impl Reader {
    /// The last `tail` complete lines (0: all within [`MAX_TAIL_BYTES`]).
    async fn tail(&mut self, tail: usize) -> Vec<LogLine> {
        let length = tokio::fs::metadata(&self.path).await.map_or(0, |m| m.len());
        self.offset = length.saturating_sub(MAX_TAIL_BYTES);
        let mut lines = self.more().await;
        if tail > 0 && lines.len() > tail {
            lines.drain(..lines.len() - tail);
        }
        lines
    }

    /// The complete lines written since the last read.
    async fn more(&mut self) -> Vec<LogLine> {
        let Ok(mut file) = tokio::fs::File::open(&self.path).await else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).await.is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        let Ok(read) = (&mut file)
            .take(MAX_TAIL_BYTES)
            .read_to_end(&mut bytes)
            .await
        else {
            return Vec::new();
        };
        self.offset += read as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(last_newline) = self.partial.iter().rposition(|b| *b == b'\n') else {
            if self.partial.len() > MAX_LINE_BYTES {
                let line = std::mem::take(&mut self.partial);
                return vec![self.line(&line)];
            }
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        // Without its final newline, so no empty line follows the last one.
        complete[..complete.len() - 1]
            .split(|b| *b == b'\n')
            .map(|line| self.line(line))
            .collect()
    }

    fn line(&self, bytes: &[u8]) -> LogLine {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LINE_BYTES)]);
        LogLine {
            time: Some(SystemTime::now().into()),
            stream: self.stream as i32,
            line: text.trim_end_matches('\r').to_string(),
        }
    }
}
