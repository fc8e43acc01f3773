//! The internal chat-completions answer as a Responses answer: a whole
//! `chat.completion` as a `response` object with `message` and
//! `function_call` output items, a stream of chunks as the Responses
//! events (`response.created`, `response.output_item.added`,
//! `response.output_text.delta`/`.done`,
//! `response.function_call_arguments.delta`/`.done`,
//! `response.output_item.done`, `response.completed`). Either way the
//! conversation, answer included, is stored for `previous_response_id`.

use std::sync::Arc;

use bytes::BytesMut;
use serde_json::{Map, Value, json};

use super::store::ResponseStore;
use crate::chat::{Completion, Event, FunctionDelta, Translate, answer_id};
use crate::sse::put_named;
use crate::usage::Usage;

/// What a response echoes of its request, and where its conversation goes.
#[derive(Debug)]
pub struct Context {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    /// The request's settings as the response object repeats them.
    pub echo: Map<String, Value>,
    /// The chat messages so far, stored with the answer unless `store: false`.
    pub conversation: Option<Vec<Value>>,
    pub store: Arc<ResponseStore>,
}

impl Context {
    /// The `response` object with these output items.
    fn response(
        &self,
        status: &str,
        output: &[Value],
        usage: Option<Usage>,
        finish: Option<&str>,
    ) -> Value {
        let mut response = self.echo.clone();
        let incomplete = (finish == Some("length")).then(|| json!({"reason": "max_output_tokens"}));
        let status = if incomplete.is_some() && status == "completed" {
            "incomplete"
        } else {
            status
        };
        let fields = [
            ("id", json!(self.id)),
            ("object", json!("response")),
            ("created_at", json!(self.created_at)),
            ("status", json!(status)),
            ("model", json!(self.model)),
            ("output", json!(output)),
            ("error", Value::Null),
            ("incomplete_details", incomplete.unwrap_or(Value::Null)),
            (
                "usage",
                usage.map_or(Value::Null, |u| {
                    json!({
                        "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                        "total_tokens": u.total(), "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0},
                    })
                }),
            ),
        ];
        for (key, value) in fields {
            response.insert(key.into(), value);
        }
        Value::Object(response)
    }

    /// Stores the conversation with `answer` (a chat assistant message).
    fn remember(&mut self, answer: Value) {
        if let Some(mut conversation) = self.conversation.take() {
            conversation.push(answer);
            self.store.insert(self.id.clone(), Arc::new(conversation));
        }
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status})
}

/// The assistant's chat message for the stored conversation.
fn assistant(text: &str, calls: &[(String, String, String)]) -> Value {
    // Empty text rather than null beside tool calls: both are OpenAI's,
    // and llama.cpp's server takes only a string.
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = calls
            .iter()
            .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
            .collect();
    }
    message
}

/// A whole answer as a `response` object.
pub fn whole(completion: &Completion, mut context: Context) -> Value {
    let (message, finish) = completion.first();
    let text = message.content.clone().unwrap_or_default();
    let mut output = Vec::new();
    if !text.is_empty() || message.tool_calls.is_empty() {
        output.push(message_item(&answer_id("msg_", ""), &text, "completed"));
    }
    let calls: Vec<(String, String, String)> = message
        .tool_calls
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.function.name.clone(),
                c.function.arguments.clone(),
            )
        })
        .collect();
    for (call_id, name, arguments) in &calls {
        output.push(call_item(
            &answer_id("fc_", ""),
            call_id,
            name,
            arguments,
            "completed",
        ));
    }
    context.remember(assistant(&text, &calls));
    context.response("completed", &output, completion.usage, finish)
}

/// The output item being streamed.
#[derive(Debug)]
enum Open {
    None,
    Text {
        id: String,
        text: String,
    },
    /// A tool call, by its index in the chat stream.
    Call {
        index: usize,
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Chat chunks to the Responses stream events.
#[derive(Debug)]
pub struct Events {
    context: Context,
    sequence: u64,
    started: bool,
    ended: bool,
    open: Open,
    output: Vec<Value>,
    text: String,
    calls: Vec<(String, String, String)>,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl Events {
    pub fn new(context: Context) -> Self {
        Self {
            context,
            sequence: 0,
            started: false,
            ended: false,
            open: Open::None,
            output: Vec::new(),
            text: String::new(),
            calls: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    fn put(&mut self, out: &mut BytesMut, kind: &str, mut payload: Value) {
        payload["type"] = kind.into();
        payload["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        put_named(out, kind, &payload);
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self.context.response("in_progress", &[], None, None);
        self.put(out, "response.created", json!({"response": response}));
        let response = self.context.response("in_progress", &[], None, None);
        self.put(out, "response.in_progress", json!({"response": response}));
    }

    /// Ends the item being streamed with its `.done` events.
    fn close(&mut self, out: &mut BytesMut) {
        let index = self.output.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Text { id, text } => {
                self.put(out, "response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.put(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                let item = message_item(&id, &text, "completed");
                self.put(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.text.push_str(&text);
                self.output.push(item);
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                self.put(out, "response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}));
                let item = call_item(&id, &call_id, &name, &arguments, "completed");
                self.put(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.calls.push((call_id, name, arguments));
                self.output.push(item);
            }
        }
    }

    fn text_delta(&mut self, delta: String, out: &mut BytesMut) {
        if !matches!(self.open, Open::Text { .. }) {
            self.close(out);
            let id = answer_id("msg_", "");
            let index = self.output.len();
            let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
            self.put(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            self.put(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
            self.open = Open::Text {
                id,
                text: String::new(),
            };
        }
        let index = self.output.len();
        if let Open::Text { id, text } = &mut self.open {
            text.push_str(&delta);
            let payload = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []});
            self.put(out, "response.output_text.delta", payload);
        }
    }

    fn call_delta(
        &mut self,
        index: usize,
        call_id: Option<String>,
        function: FunctionDelta,
        out: &mut BytesMut,
    ) {
        if !matches!(self.open, Open::Call { index: open, .. } if open == index) {
            self.close(out);
            let id = answer_id("fc_", "");
            let call_id = call_id.unwrap_or_else(|| answer_id("call_", ""));
            let name = function.name.clone().unwrap_or_default();
            let item = call_item(&id, &call_id, &name, "", "in_progress");
            let output_index = self.output.len();
            self.put(
                out,
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            );
            self.open = Open::Call {
                index,
                id,
                call_id,
                name,
                arguments: String::new(),
            };
        }
        let output_index = self.output.len();
        if let (Open::Call { id, arguments, .. }, Some(delta)) =
            (&mut self.open, function.arguments.filter(|a| !a.is_empty()))
        {
            arguments.push_str(&delta);
            let payload = json!({"item_id": id, "output_index": output_index, "delta": delta});
            self.put(out, "response.function_call_arguments.delta", payload);
        }
    }
}

impl Translate for Events {
    fn event(&mut self, event: Event, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        match event {
            Event::Chunk(chunk) => {
                self.start(out);
                self.usage = chunk.usage.or(self.usage);
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        self.text_delta(text, out);
                    }
                    for call in choice.delta.tool_calls {
                        let function = call.function.unwrap_or(FunctionDelta {
                            name: None,
                            arguments: None,
                        });
                        self.call_delta(call.index, call.id, function, out);
                    }
                    if choice.finish_reason.is_some() {
                        self.finish = choice.finish_reason;
                    }
                }
            }
            Event::Done => self.end(out),
            Event::Error(error) => {
                self.ended = true;
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream stream failed")
                    .to_string();
                self.put(
                    out,
                    "error",
                    json!({"code": error.get("code"), "message": message, "param": null}),
                );
            }
        }
    }

    fn end(&mut self, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.start(out);
        if self.output.is_empty() && matches!(self.open, Open::None) {
            // An answer with no text at all still has its (empty) message.
            self.text_delta(String::new(), out);
        }
        self.close(out);
        self.context.remember(assistant(&self.text, &self.calls));
        let response = self.context.response(
            "completed",
            &self.output,
            self.usage,
            self.finish.as_deref(),
        );
        self.put(out, "response.completed", json!({"response": response}));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn context(store: &Arc<ResponseStore>) -> Context {
        Context {
            id: "resp_1".into(),
            model: "m".into(),
            created_at: 1,
            echo: Map::new(),
            conversation: Some(vec![json!({"role": "user", "content": "hi"})]),
            store: store.clone(),
        }
    }

    #[test]
    fn whole_answer_is_stored() {
        let store = Arc::new(ResponseStore::new(8, 1 << 20, Duration::from_secs(60)));
        let completion = Completion::parse(br#"{"id":"x","choices":[{"message":{"content":"Hello"},"finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#).unwrap();
        let response = whole(&completion, context(&store));
        assert_eq!(response["status"], "incomplete");
        assert_eq!(response["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(response["usage"]["total_tokens"], 3);
        let history = store.get("resp_1").unwrap();
        assert_eq!(history[1], json!({"role": "assistant", "content": "Hello"}));
    }

    #[test]
    fn a_stream_of_text_and_a_call() {
        let store = Arc::new(ResponseStore::new(8, 1 << 20, Duration::from_secs(60)));
        let mut events = Events::new(context(&store));
        let mut out = BytesMut::new();
        for line in [
            "data: {\"choices\":[{\"delta\":{\"content\":\"He\"}}]}",
            "data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}]}",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":4}}",
            "data: [DONE]",
        ] {
            events.event(Event::parse(line.as_bytes()).unwrap(), &mut out);
        }
        let events: Vec<Value> = String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let numbers: Vec<u64> = events
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, (0..15).collect::<Vec<_>>());
        let completed = &events[14]["response"];
        assert_eq!(completed["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(completed["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(completed["usage"]["output_tokens"], 4);
        assert_eq!(store.get("resp_1").unwrap()[1]["tool_calls"][0]["id"], "c1");
    }
}
