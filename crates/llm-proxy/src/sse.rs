//! Server-sent events as OpenAI streams them: `data: {json}` lines, blank
//! lines between events, `data: [DONE]` at the end. The proxy forwards the
//! bytes untouched; this only reads along (for usage, and for gRPC chunks).

use serde::Deserialize;

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
}
