//! A container's log from the engine: the last lines, then new ones while
//! following, each with the engine's timestamp.

use std::sync::Arc;

use berth_proto::agent::v1::{LogLine, LogStream};
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::engine::Engine;
use crate::error::AgentError;

/// Longest log line passed on; longer lines are cut (a log is for people).
const MAX_LOG_LINE: usize = 16 * 1024;
const LOG_BUFFER: usize = 256;

pub async fn stream(
    engine: &Arc<Engine>,
    id: &str,
    tail: usize,
    follow: bool,
) -> Result<mpsc::Receiver<LogLine>, AgentError> {
    let docker = engine.client().await?;
    let tail = if tail == 0 {
        "all".to_string()
    } else {
        tail.to_string()
    };
    let options = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .follow(follow)
        .timestamps(true)
        .tail(&tail)
        .build();
    let mut frames = docker.logs(id, Some(options));
    let (tx, rx) = mpsc::channel(LOG_BUFFER);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = frames.next() => frame,
                () = tx.closed() => return,
            };
            let (stream, message) = match frame {
                Some(Ok(LogOutput::StdOut { message })) => (LogStream::Stdout, message),
                Some(Ok(LogOutput::StdErr { message })) => (LogStream::Stderr, message),
                Some(Ok(_)) => continue,
                Some(Err(error)) => {
                    tracing::debug!(%error, "log stream ended");
                    return;
                }
                None => return,
            };
            for line in String::from_utf8_lossy(&message).lines() {
                if tx.send(parse_line(line, stream)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// `2026-11-23T05:02:31.903598565Z text` (the engine's timestamps=true form).
fn parse_line(line: &str, stream: LogStream) -> LogLine {
    let (time, text) = line
        .split_once(' ')
        .and_then(|(time, text)| Some((time.parse::<prost_types::Timestamp>().ok()?, text)))
        .map_or((None, line), |(time, text)| (Some(time), text));
    let mut end = text.len().min(MAX_LOG_LINE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    LogLine {
        time,
        stream: stream as i32,
        line: text[..end].trim_end_matches('\r').to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_split_off() {
        let line = parse_line(
            "2026-11-23T05:02:31.903598565Z hello world",
            LogStream::Stdout,
        );
        assert_eq!(line.line, "hello world");
        assert_eq!(line.time.unwrap().nanos, 903_598_565);
        assert_eq!(
            parse_line("no time here", LogStream::Stderr).line,
            "no time here"
        );
    }
}
