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

/// Splits a byte stream into lines across chunk boundaries. It holds at most
/// `max_line` bytes of an unfinished line: a longer line is skipped.
#[derive(Debug)]
pub struct Lines {
    partial: Vec<u8>,
    skipping: bool,
    max_line: usize,
}

impl Default for Lines {
    fn default() -> Self {
        Self {
            partial: Vec::new(),
            skipping: false,
            max_line: MAX_LINE,
        }
    }
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
            if self.partial.len() + chunk.len() > self.max_line {
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

/// The usage in an event's payload, when it carries one: a chat stream's
/// last chunk (with `stream_options.include_usage`), or the Responses
/// API's `response.completed` event (in its `response`).
pub fn usage(payload: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
        response: Option<Response>,
    }
    #[derive(Deserialize)]
    struct Response {
        usage: Option<Usage>,
    }
    // Cheap test first: almost no chunk carries usage.
    if !payload.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    let event = serde_json::from_slice::<WithUsage>(payload).ok()?;
    event.usage.or_else(|| event.response?.usage)
}

/// Takes out of an OpenAI stream the usage the proxy asked for on a client's
/// behalf (see `providers::openai`), keeping it for the accounting: the
/// usage-only chunk (empty `choices`) goes, with the blank line that ends its
/// event, and other chunks lose their `usage` field. Complete lines are
/// passed on as each upstream chunk arrives; only an unfinished last line
/// waits for the next.
#[derive(Debug)]
pub struct StripUsage {
    /// The unfinished last line of the chunks so far.
    partial: Vec<u8>,
    /// The current line outgrew `max_line` and is passed on as it comes: no
    /// usage chunk is that long.
    passing: bool,
    /// The event being read had its data dropped: its blank line goes too.
    dropping_event: bool,
    usage: Option<Usage>,
    max_line: usize,
}

impl Default for StripUsage {
    fn default() -> Self {
        Self {
            partial: Vec::new(),
            passing: false,
            dropping_event: false,
            usage: None,
            max_line: MAX_LINE,
        }
    }
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
        } else if self.partial.len() + chunk.len() > self.max_line {
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

/// Appends one event with an `event:` line, as the Anthropic and Responses
/// APIs send them (their clients dispatch on it), to `out`.
pub fn put_named(out: &mut BytesMut, event: &str, payload: &serde_json::Value) {
    use bytes::BufMut;
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_slice(b"\ndata: ");
    // Writing JSON into a BytesMut cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), payload);
    out.put_slice(b"\n\n");
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

    #[test]
    fn usage_of_a_responses_stream_is_in_its_completed_event() {
        let created = br#"{"type":"response.created","response":{"id":"resp_1","usage":null}}"#;
        let delta = br#"{"type":"response.output_text.delta","delta":"hi"}"#;
        let completed = br#"{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":9,"output_tokens":2,"total_tokens":11}}}"#;
        assert_eq!(usage(created), None);
        assert_eq!(usage(delta), None);
        let found = usage(completed).unwrap();
        assert_eq!((found.prompt_tokens, found.completion_tokens), (9, 2));
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

    /// Found by the `sse` fuzz target: token counts an upstream sends are
    /// added up without overflowing, whichever dialect carries them.
    #[test]
    fn absurd_token_counts_in_a_stream_saturate() {
        let stream = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":7}}\n\n";
        let (_, usage) = stripped(stream, 4);
        assert_eq!(usage.unwrap().total(), u64::MAX);
        let mut translate = crate::providers::AnthropicEvents::new(true);
        let mut out = BytesMut::new();
        translate.line(b"data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":18446744073709551615,\"cache_read_input_tokens\":1,\"output_tokens\":1}}}", &mut out);
        assert_eq!(translate.usage().unwrap().total(), u64::MAX);
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

/// Fuzz target `sse` (seeds in `tests/fuzz_corpus/sse/`): what an upstream
/// sends, cut into arbitrary chunks, read along, stripped of usage and
/// translated from Anthropic's events.
#[cfg(test)]
mod fuzz {
    use berth_tests::fuzz;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;
    use crate::chat::Translate;
    use crate::providers::AnthropicEvents;

    /// Pieces of OpenAI's and Anthropic's streams worth splicing in.
    const TOKENS: &[&[u8]] = &[
        b"data: ",
        b"data:",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\r",
        b": keep-alive\n",
        b"[DONE]",
        b"\"usage\"",
        b"\"usage\":null",
        b"\"choices\":[]",
        b"{\"choices\":[],\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":7}}",
        b"\"prompt_tokens\":18446744073709551615",
        b"\"input_tokens\":18446744073709551615",
        b"\"output_tokens\":18446744073709551615",
        b"\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":7}}\n\n",
        b"\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":18446744073709551615,\"cache_read_input_tokens\":1}}}\n",
        b"{\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}",
        b"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}",
        b"{\"type\":\"message_stop\"}",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b"\\u00e9",
        b"\xff\xfe",
    ];

    /// `input` cut at `cuts` (positions modulo its length, in any order).
    fn chunked<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        at.push(0);
        at.push(input.len());
        at.sort_unstable();
        at.windows(2).map(|w| &input[w[0]..w[1]]).collect()
    }

    /// The lines `Lines` reads from `chunks`, checking it never holds more
    /// than `max_line` bytes.
    fn lines_of(chunks: &[&[u8]], max_line: usize) -> Result<Vec<Vec<u8>>, TestCaseError> {
        let mut lines = Lines {
            max_line,
            ..Lines::default()
        };
        let mut seen = Vec::new();
        for chunk in chunks {
            lines.push(chunk, |line| seen.push(line.to_vec()));
            prop_assert!(lines.partial.len() <= max_line);
        }
        Ok(seen)
    }

    /// What `StripUsage` passes on of `chunks` and the usage it kept,
    /// checking it never holds more than `max_line` bytes.
    fn stripped_of(
        chunks: &[&[u8]],
        max_line: usize,
    ) -> Result<(Vec<u8>, Option<Usage>), TestCaseError> {
        let mut strip = StripUsage {
            max_line,
            ..StripUsage::default()
        };
        let mut out = BytesMut::new();
        for chunk in chunks {
            strip.push(chunk, &mut out);
            prop_assert!(strip.partial.len() <= max_line);
        }
        Ok((out.to_vec(), strip.usage()))
    }

    /// Every usage read is one the accounting can add up.
    fn check_usage(usage: Option<Usage>) -> Result<(), TestCaseError> {
        if let Some(usage) = usage {
            let total = usage.total();
            prop_assert!(total >= usage.prompt_tokens && total >= usage.completion_tokens);
        }
        Ok(())
    }

    /// A stream of well-formed lines: SSE fields, JSON payloads and blank
    /// lines, none longer than the limit.
    fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            Just(String::new()),
            Just(": keep-alive".to_string()),
            Just("data: [DONE]".to_string()),
            "[a-z ]{0,40}".prop_map(|text| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}")),
            (any::<u64>(), any::<u64>()).prop_map(|(p, c)| format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}"
            )),
            "[ -~]{0,80}",
        ];
        (vec((line, any::<bool>()), 0..24)).prop_map(|lines| {
            lines
                .into_iter()
                .flat_map(|(line, crlf)| {
                    let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
                    [line.into_bytes(), end.to_vec()].concat()
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Any bytes in any chunks: no panic, at most the line limit held,
        /// and what is passed on is at most twice what came (re-encoded
        /// JSON), whatever the limit.
        #[test]
        fn arbitrary_bytes_in_arbitrary_chunks(
            input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "sse"), TOKENS),
            cuts in vec(any::<usize>(), 0..16),
            max_line in prop_oneof![0..300usize, Just(MAX_LINE)],
        ) {
            fuzz::timed("sse", || {
                let chunks = chunked(&input, &cuts);
                for line in lines_of(&chunks, max_line)? {
                    check_usage(data(&line).and_then(usage))?;
                }
                let (out, kept) = stripped_of(&chunks, max_line)?;
                prop_assert!(out.len() <= 2 * input.len() + 16, "{} bytes out of {}", out.len(), input.len());
                check_usage(kept)?;
                let mut translate = AnthropicEvents::new(true);
                let mut translated = BytesMut::new();
                for line in lines_of(&chunks, max_line)? {
                    translate.line(&line, &mut translated);
                }
                // The same stream re-framed as /v1/messages and /v1/responses
                // events: no panic, and each ends once.
                let store = std::sync::Arc::new(crate::responses_api::ResponseStore::new(1, 1 << 20, std::time::Duration::from_secs(1)));
                let context = crate::responses_api::Context {
                    id: "resp_f".into(), model: "m".into(), created_at: 0, echo: Map::new(),
                    conversation: Some(Vec::new()), store,
                };
                let mut messages = crate::messages_api::Events::new("m".into());
                let mut responses = crate::responses_api::Events::new(context);
                let mut reframed = BytesMut::new();
                for line in lines_of(&chunks, max_line)? {
                    if let Some(event) = crate::chat::Event::parse(&line) {
                        messages.event(event, &mut reframed);
                    }
                    if let Some(event) = crate::chat::Event::parse(&line) {
                        responses.event(event, &mut reframed);
                    }
                }
                messages.end(&mut reframed);
                responses.end(&mut reframed);
                let text = String::from_utf8_lossy(&reframed);
                prop_assert!(text.matches("event: message_stop").count() <= 1);
                prop_assert!(text.matches("event: response.completed").count() <= 1);
                check_usage(translate.usage())
            })??;
        }

        /// Well-formed streams read and strip the same however they are cut.
        #[test]
        fn valid_streams_are_read_the_same_however_cut(
            input in valid_stream(),
            cuts in vec(any::<usize>(), 0..16),
        ) {
            fuzz::timed("sse", || {
                let whole = [input.as_slice()];
                let chunks = chunked(&input, &cuts);
                prop_assert_eq!(lines_of(&chunks, MAX_LINE)?, lines_of(&whole, MAX_LINE)?);
                let (out, kept) = stripped_of(&chunks, MAX_LINE)?;
                check_usage(kept)?;
                prop_assert_eq!((out, kept), stripped_of(&whole, MAX_LINE)?);
                Ok(())
            })??;
        }
    }
}
