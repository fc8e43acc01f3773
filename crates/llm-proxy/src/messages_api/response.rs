//! The internal chat-completions answer as an Anthropic Messages answer:
//! a whole `chat.completion` as a `message`, a stream of chunks as
//! Anthropic's events (`message_start`, then per content block
//! `content_block_start`/`content_block_delta`/`content_block_stop`, then
//! `message_delta` with the stop reason and output tokens, `message_stop`).

use bytes::BytesMut;
use serde_json::{Value, json};

use crate::chat::{Completion, Event, Translate, answer_id};
use crate::providers::stop_reason;
use crate::sse::put_named;
use crate::usage::Usage;

fn usage_json(usage: Option<Usage>) -> Value {
    let usage = usage.unwrap_or_default();
    json!({"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens})
}

/// A tool call's arguments as the `input` object Anthropic's clients expect;
/// arguments that are not JSON (a small model's) are kept as a string.
fn input_of(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()))
}

/// A whole answer as a Messages `message`; `model` is the name the client asked for.
pub fn whole(completion: &Completion, model: &str) -> Value {
    let (message, finish) = completion.first();
    let mut content = Vec::new();
    if let Some(text) = message.content.as_deref().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in &message.tool_calls {
        content.push(
            json!({"type": "tool_use", "id": call.id, "name": call.function.name,
            "input": input_of(&call.function.arguments)}),
        );
    }
    json!({
        "id": answer_id("msg_", &completion.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish.unwrap_or("stop")),
        "stop_sequence": null,
        "usage": usage_json(completion.usage),
    })
}

/// The content block open in a stream.
#[derive(Debug, PartialEq, Eq)]
enum Open {
    None,
    Text,
    /// A tool call, by its index in the chat stream.
    Tool(usize),
}

/// Chat chunks to Anthropic's stream events.
#[derive(Debug)]
pub struct Events {
    model: String,
    started: bool,
    stopped: bool,
    /// Index of the next content block.
    blocks: usize,
    open: Open,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl Events {
    pub fn new(model: String) -> Self {
        Self {
            model,
            started: false,
            stopped: false,
            blocks: 0,
            open: Open::None,
            finish: None,
            usage: None,
        }
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({"id": answer_id("msg_", ""), "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage_json(None)});
        put_named(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
    }

    fn close(&mut self, out: &mut BytesMut) {
        if self.open != Open::None {
            let index = self.blocks - 1;
            put_named(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
            self.open = Open::None;
        }
    }

    /// Opens `block` unless it is the one open; returns its index.
    fn open(&mut self, block: Open, first: Value, out: &mut BytesMut) -> usize {
        if self.open != block {
            self.close(out);
            put_named(
                out,
                "content_block_start",
                &json!({"type": "content_block_start",
                "index": self.blocks, "content_block": first}),
            );
            self.blocks += 1;
            self.open = block;
        }
        self.blocks - 1
    }

    fn delta(out: &mut BytesMut, index: usize, delta: Value) {
        put_named(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }
}

impl Translate for Events {
    fn event(&mut self, event: Event, out: &mut BytesMut) {
        if self.stopped {
            return;
        }
        match event {
            Event::Chunk(chunk) => {
                self.start(out);
                self.usage = chunk.usage.or(self.usage);
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        let index = self.open(Open::Text, json!({"type": "text", "text": ""}), out);
                        Self::delta(out, index, json!({"type": "text_delta", "text": text}));
                    }
                    for call in choice.delta.tool_calls {
                        let function = call.function.unwrap_or(crate::chat::FunctionDelta {
                            name: None,
                            arguments: None,
                        });
                        let first = json!({"type": "tool_use", "id": call.id.unwrap_or_default(),
                            "name": function.name.unwrap_or_default(), "input": {}});
                        let index = self.open(Open::Tool(call.index), first, out);
                        if let Some(arguments) = function.arguments.filter(|a| !a.is_empty()) {
                            Self::delta(
                                out,
                                index,
                                json!({"type": "input_json_delta", "partial_json": arguments}),
                            );
                        }
                    }
                    if choice.finish_reason.is_some() {
                        self.finish = choice.finish_reason;
                    }
                }
            }
            Event::Done => self.end(out),
            Event::Error(error) => {
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream stream failed");
                put_named(
                    out,
                    "error",
                    &json!({"type": "error", "error": {"type": "api_error", "message": message}}),
                );
                self.stopped = true;
            }
        }
    }

    fn end(&mut self, out: &mut BytesMut) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.start(out);
        self.close(out);
        let stop = stop_reason(self.finish.as_deref().unwrap_or("stop"));
        let output_tokens = self.usage.map_or(0, |u| u.completion_tokens);
        put_named(
            out,
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": output_tokens}}),
        );
        put_named(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(stream: &str) -> Vec<Value> {
        let mut events = Events::new("m".into());
        let mut out = BytesMut::new();
        for line in stream.lines() {
            if let Some(event) = Event::parse(line.as_bytes()) {
                events.event(event, &mut out);
            }
        }
        events.end(&mut out);
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn whole_answers_with_tool_calls() {
        let completion = Completion::parse(br#"{"id":"chatcmpl-9","choices":[{"message":{"content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#).unwrap();
        let message = whole(&completion, "claude");
        assert_eq!(message["id"], "msg_9");
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(
            message["content"],
            json!([{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
        );
        assert_eq!(
            message["usage"],
            json!({"input_tokens": 4, "output_tokens": 2})
        );
    }

    #[test]
    fn a_stream_of_text_then_a_tool_call() {
        let events = events_of(concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        ));
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(events[4]["content_block"]["name"], "f");
        assert_eq!(events[4]["index"], 1);
        assert_eq!(events[7]["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[7]["usage"]["output_tokens"], 7);
    }

    #[test]
    fn a_mid_stream_error_ends_with_an_error_event() {
        let events = events_of(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"error\":{\"message\":\"boom\"}}\n\n",
        );
        let last = events.last().unwrap();
        assert_eq!(last["type"], "error");
        assert_eq!(last["error"]["message"], "boom");
    }
}
