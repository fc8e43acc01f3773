//! The chat-completions answer as the Messages and Responses translations
//! read it: a whole `chat.completion`, or the events of a stream of
//! `chat.completion.chunk`s. Both APIs are served through the proxy's
//! internal chat-completions form, so both read the same shapes.

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use serde::Deserialize;
use serde_json::Value;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::sse::{self, Lines};
use crate::usage::Usage;

/// A whole `chat.completion`.
#[derive(Debug, Deserialize)]
pub struct Completion {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
pub struct Choice {
    pub message: Message,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Message {
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: String,
    pub function: Function,
}

#[derive(Debug, Deserialize)]
pub struct Function {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

impl Completion {
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("not a chat.completion: {e}"))
    }

    /// The first choice (the translations ask for one), or an empty one.
    pub fn first(&self) -> (&Message, Option<&str>) {
        static EMPTY: Message = Message {
            content: None,
            tool_calls: Vec::new(),
        };
        self.choices
            .first()
            .map_or((&EMPTY, None), |c| (&c.message, c.finish_reason.as_deref()))
    }
}

/// One event of a chat-completions stream.
#[derive(Debug)]
pub enum Event {
    Chunk(Chunk),
    Done,
    /// An error event (the upstream's, or the proxy's mid-stream failure):
    /// its `error` object.
    Error(Value),
}

#[derive(Debug, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<Usage>,
    pub error: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Delta {
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A piece of a streamed tool call: the first piece of each has its id and
/// name, later ones pieces of its arguments.
#[derive(Debug, Deserialize)]
pub struct ToolCallDelta {
    #[serde(default)]
    pub index: usize,
    pub id: Option<String>,
    pub function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDelta {
    pub name: Option<String>,
    pub arguments: Option<String>,
}

impl Event {
    /// The event a line of the stream carries; None for other lines
    /// (blank ones, comments, `event:` lines) and unreadable payloads.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let payload = sse::data(line)?;
        if payload.trim_ascii() == b"[DONE]" {
            return Some(Self::Done);
        }
        match serde_json::from_slice::<Chunk>(payload) {
            Ok(Chunk {
                error: Some(error), ..
            }) => Some(Self::Error(error)),
            Ok(chunk) => Some(Self::Chunk(chunk)),
            Err(error) => {
                tracing::warn!(%error, "skipping a stream chunk that does not parse");
                None
            }
        }
    }
}

/// Turns the events of a chat-completions stream into another API's.
pub trait Translate {
    fn event(&mut self, event: Event, out: &mut BytesMut);
    /// The stream ended (after `[DONE]`, or cut short): what must still go out.
    fn end(&mut self, out: &mut BytesMut);
}

/// A chat-completions SSE body re-framed, event by event, into another
/// API's events as its chunks arrive; nothing is held back but an
/// unfinished line.
#[derive(Debug)]
pub struct Translated<B, T> {
    inner: B,
    lines: Lines,
    translate: T,
    ended: bool,
}

impl<B, T> Translated<B, T> {
    pub fn new(inner: B, translate: T) -> Self {
        Self {
            inner,
            lines: Lines::default(),
            translate,
            ended: false,
        }
    }
}

impl<B, T> Body for Translated<B, T>
where
    B: Body<Data = Bytes, Error = Infallible> + Unpin,
    T: Translate + Unpin,
{
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let mut out = BytesMut::new();
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    let translate = &mut this.translate;
                    this.lines.push(data, |line| {
                        if let Some(event) = Event::parse(line) {
                            translate.event(event, &mut out);
                        }
                    });
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.translate.end(&mut out);
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Pending => return Poll::Pending,
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The id of an answer: the upstream's when it gave one, else a fresh one.
pub fn answer_id(prefix: &str, upstream: &str) -> String {
    if upstream.is_empty() {
        format!("{prefix}{:032x}", rand::random::<u128>())
    } else {
        format!("{prefix}{}", upstream.trim_start_matches("chatcmpl-"))
    }
}
