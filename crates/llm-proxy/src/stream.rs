//! A streamed upstream response passed to the client chunk by chunk, as it
//! arrives: nothing is buffered, the proxy only reads along for the usage.
//! Where the usage was asked for by the proxy and not the client, each chunk
//! is passed on without it; a stream in another dialect (Anthropic's events)
//! is translated. Either way line by line, each upstream chunk becoming the
//! complete lines it ends.
//! The body owns the request's accounting, so however the stream ends (the
//! upstream finishes, breaks, stalls, or the client goes away and the body
//! is dropped) the request is settled exactly once, and dropping it drops
//! the upstream response, which closes that connection.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::cache::{Cached, Key, ResponseCache};
use crate::error::ProxyError;
use crate::gateway::Settle;
use crate::gen_ai::StreamedAnswer;
use crate::providers::{AnthropicEvents, Endpoint};
use crate::sse::{self, Lines, StripUsage};
use crate::usage::{Outcome, Usage};

/// What happens to a stream's chunks on their way to the client.
#[derive(Debug)]
pub enum Relay {
    /// OpenAI's events as the client asked for them: passed on untouched.
    Untouched,
    /// OpenAI's events with usage the client did not ask for.
    StripUsage(StripUsage),
    /// Anthropic's events, translated to OpenAI's.
    Translate(AnthropicEvents),
}

/// A stream as the client gets it: from an upstream, or from the cache.
#[derive(Debug)]
pub enum StreamBody {
    Live(PassThrough),
    /// A recorded stream, sent in one piece (None once sent).
    Cached(Option<Bytes>),
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Live(live) => Pin::new(live).poll_frame(cx),
            Self::Cached(recorded) => Poll::Ready(recorded.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Live(live) => live.is_end_stream(),
            Self::Cached(recorded) => recorded.is_none(),
        }
    }
}

/// Records a stream as the client gets it, for the response cache; stored
/// only when it ends well and complete (`[DONE]`, or for the Responses API
/// its `response.completed` event), dropped when it outgrows the cache's
/// largest entry.
#[derive(Debug)]
pub(crate) struct Recorder {
    cache: Arc<ResponseCache>,
    key: Key,
    endpoint: Endpoint,
    recorded: BytesMut,
}

impl Recorder {
    pub(crate) fn new(cache: Arc<ResponseCache>, key: Key, endpoint: Endpoint) -> Self {
        Self {
            cache,
            key,
            endpoint,
            recorded: BytesMut::new(),
        }
    }

    /// Whether the recording is a whole answer: a stream cut short (an
    /// upstream that ended its connection early) is not one.
    fn complete(&self) -> bool {
        match self.endpoint {
            // Its events end with the response in its final state, and no
            // `[DONE]`; a failed or incomplete one ends otherwise.
            Endpoint::Responses => {
                let completed: &[u8] = b"\"response.completed\"";
                self.recorded
                    .windows(completed.len())
                    .any(|window| window == completed)
            }
            _ => self.recorded.ends_with(b"data: [DONE]\n\n"),
        }
    }

    /// Keeps `data`; false once the stream is too large to store.
    fn push(&mut self, data: &[u8]) -> bool {
        if self.recorded.len() + data.len() > self.cache.max_entry_bytes() {
            return false;
        }
        self.recorded.extend_from_slice(data);
        true
    }

    fn store(self, usage: Option<Usage>) {
        if self.complete() {
            let body = self.recorded.freeze();
            self.cache.insert(self.key, Cached { body, usage });
        }
    }
}

#[derive(Debug)]
pub struct PassThrough {
    inner: Incoming,
    /// Splits the chunks of an untouched or translated stream into lines.
    lines: Lines,
    relay: Relay,
    usage: Option<Usage>,
    /// Longest silence allowed between chunks.
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// `None` once the request is settled.
    settle: Option<Settle>,
    /// Set when the answer is to be cached.
    recorder: Option<Recorder>,
    /// Reads the chunks for the request's GenAI span; None when untraced.
    answer: Option<StreamedAnswer>,
    /// Splits the client's lines of a rewritten stream for `answer` (an
    /// untouched one is split by `lines` already).
    answer_lines: Lines,
}

impl PassThrough {
    pub(crate) fn new(
        inner: Incoming,
        idle: Duration,
        relay: Relay,
        settle: Settle,
        recorder: Option<Recorder>,
    ) -> Self {
        let answer = settle.span().streamed_answer();
        Self {
            inner,
            lines: Lines::default(),
            relay,
            usage: None,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            settle: Some(settle),
            recorder,
            answer,
            answer_lines: Lines::default(),
        }
    }

    /// The request's accounting, to settle it now, with what the stream
    /// said of itself recorded on its span first.
    fn take_settle(&mut self) -> Option<Settle> {
        let settle = self.settle.take()?;
        if let Some(answer) = self.answer.take() {
            settle.span().streamed(answer);
        }
        Some(settle)
    }

    fn record(&mut self, data: &[u8]) {
        if self.recorder.as_mut().is_some_and(|r| !r.push(data)) {
            self.recorder = None;
        }
    }

    /// Ends the stream with an error event the client can read.
    fn fail(&mut self, error: &ProxyError) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        tracing::warn!(%error, "upstream stream failed");
        let event = sse::error_event(&error.to_json());
        if let Some(settle) = self.take_settle() {
            settle.fail(self.usage, error);
        }
        Poll::Ready(Some(Ok(Frame::data(event))))
    }
}

impl Body for PassThrough {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(settle) = &mut this.settle else {
            return Poll::Ready(None);
        };
        // Loops only while rewritten chunks complete no line.
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    settle.first_chunk();
                    this.deadline.as_mut().reset(Instant::now() + this.idle);
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let mut out = BytesMut::new();
                    match &mut this.relay {
                        Relay::Untouched => {
                            let usage = &mut this.usage;
                            let answer = &mut this.answer;
                            this.lines.push(data, |line| {
                                let Some(payload) = sse::data(line) else {
                                    return;
                                };
                                if let Some(found) = sse::usage(payload) {
                                    *usage = Some(found);
                                }
                                if let Some(answer) = answer {
                                    answer.chunk(payload);
                                }
                            });
                            this.record(data);
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Relay::StripUsage(strip) => {
                            strip.push(data, &mut out);
                            this.usage = strip.usage();
                        }
                        Relay::Translate(events) => {
                            this.lines.push(data, |line| events.line(line, &mut out));
                            this.usage = events.usage();
                        }
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if let Some(answer) = &mut this.answer {
                        this.answer_lines.push(&out, |line| {
                            if let Some(payload) = sse::data(line) {
                                answer.chunk(payload);
                            }
                        });
                    }
                    this.record(&out);
                    Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
                }
                Poll::Ready(Some(Err(error))) => {
                    let deployment = settle.deployment_id().to_string();
                    this.fail(&ProxyError::Unreachable {
                        deployment,
                        reason: format!("stream broken: {error}"),
                    })
                }
                Poll::Ready(None) => {
                    if let Some(settle) = this.take_settle() {
                        settle.finish(this.usage, Outcome::Ok);
                    }
                    if let Some(recorder) = this.recorder.take() {
                        recorder.store(this.usage);
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        let deployment = settle.deployment_id().to_string();
                        return this.fail(&ProxyError::Timeout {
                            deployment,
                            timeout: this.idle,
                        });
                    }
                    Poll::Pending
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.settle.is_none()
    }
}

impl Drop for PassThrough {
    fn drop(&mut self) {
        if let Some(settle) = self.take_settle() {
            settle.finish(self.usage, Outcome::Abandoned);
        }
    }
}
