//! Server-sent events as OpenAI streams them: `data: {json}` lines, blank
//! lines between events, `data: [DONE]` at the end. The proxy forwards the
//! bytes untouched where it can; this reads along (for usage, and for gRPC
//! chunks), and takes out the usage a client did not ask for.

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::usage::Usage;

/// Longest line kept while reading along; longer ones are skipped (still
/// forwarded): no single chunk of a sane stream comes near it.
const MAX_LINE: usize = 4 << 20;

/// Splits a byte stream into lines across chunk boundaries.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
    skipping: bool,
}

impl Lines {
    pub fn push(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&chunk[..end], &chunk[end + 1..]);
            if self.skipping {
                self.skipping = false;
            } else if self.partial.is_empty() {
                on_line(trim_cr(head));
            } else {
                self.partial.extend_from_slice(head);
                on_line(trim_cr(&self.partial));
                self.partial.clear();
            }
            chunk = rest;
        }
        if !self.skipping && !chunk.is_empty() {
            if self.partial.len() + chunk.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            } else {
                self.partial.extend_from_slice(chunk);
            }
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The payload of a `data:` line.
pub fn data(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// The usage in an event's payload, when it carries one (the last chunk,
/// with `stream_options.include_usage`).
pub fn usage(payload: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
    }
    // Cheap test first: almost no chunk carries usage.
    if !payload.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<WithUsage>(payload).ok()?.usage
}

/// Takes out of an OpenAI stream the usage the proxy asked for on a client's
/// behalf (see `providers::openai`), keeping it for the accounting: the
/// usage-only chunk (empty `choices`) goes, with the blank line that ends its
/// event, and other chunks lose their `usage` field. Complete lines are
/// passed on as each upstream chunk arrives; only an unfinished last line
/// waits for the next.
#[derive(Debug, Default)]
pub struct StripUsage {
    /// The unfinished last line of the chunks so far.
    partial: Vec<u8>,
    /// The current line outgrew `MAX_LINE` and is passed on as it comes: no
    /// usage chunk is that long.
    passing: bool,
    /// The event being read had its data dropped: its blank line goes too.
    dropping_event: bool,
    usage: Option<Usage>,
}

impl StripUsage {
    /// The last usage seen.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Writes what the client gets of one upstream chunk to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut BytesMut) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&chunk[..end], &chunk[end + 1..]);
            if self.passing {
                out.extend_from_slice(head);
                out.extend_from_slice(b"\n");
                self.passing = false;
            } else if self.partial.is_empty() {
                self.line(head, out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, out);
                line.clear();
                self.partial = line;
            }
            chunk = rest;
        }
        if self.passing {
            out.extend_from_slice(chunk);
        } else if self.partial.len() + chunk.len() > MAX_LINE {
            out.extend_from_slice(&self.partial);
            out.extend_from_slice(chunk);
            self.partial.clear();
            self.passing = true;
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }

    /// One whole line, without its `\n`.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        let text = trim_cr(line);
        if text.is_empty() && std::mem::take(&mut self.dropping_event) {
            return;
        }
        let Some(mut chunk) = data(text).and_then(chunk_with_usage) else {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\n");
            return;
        };
        let usage = chunk.remove("usage");
        if let Some(found) = usage.and_then(|u| serde_json::from_value::<Usage>(u).ok()) {
            self.usage = Some(found);
            let no_choices = chunk
                .get("choices")
                .is_none_or(|c| c.as_array().is_some_and(Vec::is_empty));
            if no_choices {
                self.dropping_event = true;
                return;
            }
        }
        out.extend_from_slice(b"data: ");
        // Writing to memory cannot fail, and the map was JSON a moment ago.
        let _ = serde_json::to_writer(BytesMutWriter(out), &chunk);
        out.extend_from_slice(b"\n");
    }
}

/// A chunk's JSON object, when it has a `usage` field (even `null`).
fn chunk_with_usage(payload: &[u8]) -> Option<Map<String, Value>> {
    if !payload.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<Map<String, Value>>(payload)
        .ok()
        .filter(|chunk| chunk.contains_key("usage"))
}

struct BytesMutWriter<'a>(&'a mut BytesMut);

impl std::io::Write for BytesMutWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An SSE event carrying an OpenAI-style error, for failures mid-stream:
/// the official clients raise it as an API error.
pub fn error_event(error: &serde_json::Value) -> bytes::Bytes {
    format!("data: {error}\n\n").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_chunks_and_usage() {
        let mut lines = Lines::default();
        let mut seen = Vec::new();
        let stream = b"data: {\"choices\":[]}\r\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";
        for piece in stream.chunks(5) {
            lines.push(piece, |line| seen.push(line.to_vec()));
        }
        let payloads: Vec<&[u8]> = seen.iter().filter_map(|l| data(l)).collect();
        assert_eq!(payloads.len(), 3);
        assert_eq!(payloads[2], b"[DONE]");
        assert_eq!(usage(payloads[0]), None);
        let found = usage(payloads[1]).unwrap();
        assert_eq!((found.prompt_tokens, found.completion_tokens), (3, 4));
    }

    /// What a client that did not ask for usage receives of `stream`, cut
    /// into pieces of `piece` bytes, and the usage kept back.
    fn stripped(stream: &[u8], piece: usize) -> (String, Option<Usage>) {
        let mut strip = StripUsage::default();
        let mut out = BytesMut::new();
        for chunk in stream.chunks(piece) {
            strip.push(chunk, &mut out);
        }
        (String::from_utf8(out.to_vec()).unwrap(), strip.usage())
    }

    #[test]
    fn usage_taken_out_and_kept() {
        // As OpenAI sends it with include_usage: `usage: null` on every
        // chunk, then a chunk with the usage and no choices.
        let stream = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\r\n\r\n",
            "data: [DONE]\n\n",
        );
        for piece in [1, 7, stream.len()] {
            let (text, usage) = stripped(stream.as_bytes(), piece);
            let (first, rest) = text.split_once("\n\n").unwrap();
            assert_eq!(
                serde_json::from_slice::<Value>(data(first.as_bytes()).unwrap()).unwrap(),
                serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
                "pieces of {piece}"
            );
            assert_eq!(rest, "data: [DONE]\n\n", "pieces of {piece}");
            let usage = usage.unwrap();
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 4));
        }
    }

    #[test]
    fn usage_on_a_last_chunk_with_choices_keeps_the_chunk() {
        // llama.cpp's own server puts the usage on the chunk that finishes.
        let stream = b"data: {\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let (text, usage) = stripped(stream, 5);
        assert_eq!(
            text,
            "data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n"
        );
        assert_eq!(usage.unwrap().total(), 3);
    }

    #[test]
    fn chunks_without_usage_pass_byte_for_byte() {
        let stream = b": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\r\n\r\ndata: [DONE]\n\n";
        let (text, usage) = stripped(stream, 3);
        assert_eq!(text.as_bytes(), stream);
        assert_eq!(usage, None);
        // A line longer than any usage chunk is passed on as it comes.
        let long = format!("data: {}\n\n", "x".repeat(MAX_LINE + 10));
        let (text, _) = stripped(long.as_bytes(), 1 << 16);
        assert_eq!(text, long);
    }
}
