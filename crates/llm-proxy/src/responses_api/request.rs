//! A Responses request as the proxy's internal chat-completions body:
//! `instructions` as a system message, the stored conversation of
//! `previous_response_id` and then the `input` items as chat messages
//! (message items with their text and image parts, `function_call` items as
//! an assistant's `tool_calls`, `function_call_output` items as `tool`
//! messages), function tools and `tool_choice` as chat's. Every refusal
//! names the field.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ProxyError;
use crate::fields::{invalid as field, typed};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    pub model: String,
    input: Option<Value>,
    pub instructions: Option<String>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<Value>,
    pub max_output_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    stream: Option<bool>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub parallel_tool_calls: Option<bool>,
    user: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    /// Checked (plain text only) and otherwise the chat default.
    #[serde(rename = "text")]
    _text: Option<TextConfig>,
    /// The response cache's per-request settings, as on the chat endpoint.
    cache: Option<Value>,
    /// Accepted and left out: chat-completions upstreams have no use for them.
    #[serde(rename = "reasoning")]
    _reasoning: Option<Value>,
    #[serde(rename = "truncation")]
    _truncation: Option<Value>,
    #[serde(rename = "include")]
    _include: Option<Value>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Tool {
    Function {
        name: String,
        description: Option<String>,
        parameters: Option<Value>,
        strict: Option<bool>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextConfig {
    #[serde(rename = "format")]
    _format: Option<TextFormat>,
    #[serde(rename = "verbosity")]
    _verbosity: Option<Value>,
}

/// Only plain text: structured output has no translation yet.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum TextFormat {
    Text {},
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Item {
    Message {
        role: Role,
        content: Value,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: Value,
    },
    /// A previous answer's reasoning, handed back: chat upstreams take none.
    Reasoning {},
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    Assistant,
    System,
    Developer,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    InputText { text: String },
    OutputText { text: String },
    Refusal { refusal: String },
    InputImage { image_url: String },
}

impl Request {
    pub fn parse(body: Value) -> Result<Self, ProxyError> {
        if !body.is_object() {
            return Err(field("(body)", "must be a JSON object"));
        }
        typed("", body)
    }

    /// The chat messages of `input` after `history`: `history` extended.
    pub fn conversation(&mut self, history: &[Value]) -> Result<Vec<Value>, ProxyError> {
        let mut messages = history.to_vec();
        let mut calls: HashSet<String> = history
            .iter()
            .filter_map(|m| m.get("tool_calls")?.as_array())
            .flatten()
            .filter_map(|c| Some(c.get("id")?.as_str()?.to_string()))
            .collect();
        match self.input.take() {
            None => {}
            Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
            Some(Value::Array(items)) => {
                for (index, item) in items.into_iter().enumerate() {
                    item_messages(index, item, &mut calls, &mut messages)?;
                }
            }
            Some(_) => return Err(field("input", "must be a string or an array of items")),
        }
        Ok(messages)
    }

    /// The chat-completions body: the system message, then `conversation`.
    pub fn chat_body(&mut self, conversation: &[Value]) -> Map<String, Value> {
        let mut messages = Vec::with_capacity(conversation.len() + 1);
        if let Some(instructions) = &self.instructions {
            messages.push(json!({"role": "system", "content": instructions}));
        }
        messages.extend_from_slice(conversation);
        let mut chat = Map::new();
        chat.insert("model".into(), self.model.clone().into());
        chat.insert("messages".into(), messages.into());
        let optional = [
            ("max_tokens", self.max_output_tokens.map(Value::from)),
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            (
                "parallel_tool_calls",
                self.parallel_tool_calls.map(Value::from),
            ),
            ("user", self.user.take().map(Value::from)),
            ("cache", self.cache.take()),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                chat.insert(key.into(), value);
            }
        }
        if self.stream() {
            chat.insert("stream".into(), true.into());
            // response.completed carries the usage: ask for it.
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if let Some(tools) = self.tools.as_ref().filter(|t| !t.is_empty()) {
            chat.insert("tools".into(), tools.iter().map(Tool::to_chat).collect());
        }
        if let Some(choice) = self.tool_choice.clone() {
            chat.insert("tool_choice".into(), tool_choice(choice));
        }
        chat
    }

    pub fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// The request's tools as a Responses answer echoes them.
    pub fn tools_json(&self) -> Value {
        self.tools.iter().flatten().map(Tool::to_json).collect()
    }

    pub fn tool_choice_json(&self) -> Value {
        self.tool_choice.clone().unwrap_or_else(|| "auto".into())
    }
}

impl Tool {
    fn to_chat(&self) -> Value {
        let Self::Function {
            name,
            description,
            parameters,
            strict,
        } = self;
        let mut function = json!({"name": name,
            "parameters": parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
        if let Some(description) = description {
            function["description"] = description.clone().into();
        }
        if let Some(strict) = strict {
            function["strict"] = (*strict).into();
        }
        json!({"type": "function", "function": function})
    }

    fn to_json(&self) -> Value {
        let Self::Function {
            name,
            description,
            parameters,
            strict,
        } = self;
        json!({"type": "function", "name": name, "description": description,
            "parameters": parameters, "strict": strict.unwrap_or(false)})
    }
}

/// `"auto"`, `"none"`, `"required"` are chat's too; `{type: function, name}`
/// becomes chat's nested form.
fn tool_choice(choice: Value) -> Value {
    match choice.get("name") {
        Some(name) if choice.get("type") == Some(&json!("function")) => {
            json!({"type": "function", "function": {"name": name}})
        }
        _ => choice,
    }
}

/// The chat messages one input item adds.
fn item_messages(
    index: usize,
    mut item: Value,
    calls: &mut HashSet<String>,
    out: &mut Vec<Value>,
) -> Result<(), ProxyError> {
    let at = format!("input[{index}]");
    // An item with a role and no type is a message (the easy input form).
    if let Some(object) = item
        .as_object_mut()
        .filter(|o| !o.contains_key("type") && o.contains_key("role"))
    {
        object.insert("type".into(), "message".into());
    }
    match typed(&at, item)? {
        Item::Message { role, content } => {
            let at = format!("{at}.content");
            // An assistant's earlier answer as one string, as chat servers
            // (llama.cpp's among them) take an assistant's content.
            let content = match (role, content) {
                (Role::Assistant, parts @ Value::Array(_)) => text_of_parts(&at, parts)?.into(),
                (_, content) => content_of(&at, content)?,
            };
            let role = match role {
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::System => "system",
                Role::Developer => "developer",
            };
            out.push(json!({"role": role, "content": content}));
        }
        Item::FunctionCall {
            call_id,
            name,
            arguments,
        } => {
            calls.insert(call_id.clone());
            let call = json!({"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}});
            // Calls that follow an assistant message are that message's.
            match out.last_mut() {
                Some(last) if last["role"] == "assistant" => {
                    match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => last["tool_calls"] = json!([call]),
                    }
                }
                _ => out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
            }
        }
        Item::FunctionCallOutput { call_id, output } => {
            if !calls.contains(&call_id) {
                return Err(field(
                    format!("{at}.call_id"),
                    format!("no function_call with call_id `{call_id}` comes before it"),
                ));
            }
            let output = match output {
                Value::String(text) => text,
                parts => text_of_parts(&format!("{at}.output"), parts)?,
            };
            out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        Item::Reasoning {} => {}
    }
    Ok(())
}

/// A message item's content as chat's: a string stays one, parts become
/// chat's text and image parts.
fn content_of(at: &str, content: Value) -> Result<Value, ProxyError> {
    let parts = match content {
        Value::String(_) => return Ok(content),
        Value::Array(parts) => parts,
        _ => return Err(field(at, "must be a string or an array of content parts")),
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        out.push(match typed(&format!("{at}[{i}]"), part)? {
            Part::InputText { text }
            | Part::OutputText { text }
            | Part::Refusal { refusal: text } => {
                json!({"type": "text", "text": text})
            }
            Part::InputImage { image_url } => {
                json!({"type": "image_url", "image_url": {"url": image_url}})
            }
        });
    }
    Ok(out.into())
}

/// A function call's output given as parts: their text, joined.
fn text_of_parts(at: &str, parts: Value) -> Result<String, ProxyError> {
    let Value::Array(parts) = parts else {
        return Err(field(at, "must be a string or an array of text parts"));
    };
    let mut text = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        match typed(&format!("{at}[{i}]"), part)? {
            Part::InputText { text: piece }
            | Part::OutputText { text: piece }
            | Part::Refusal { refusal: piece } => text.push_str(&piece),
            _ => {
                return Err(field(
                    format!("{at}[{i}].type"),
                    "only text parts are allowed here",
                ));
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(body: Value, history: &[Value]) -> Result<Map<String, Value>, ProxyError> {
        let mut request = Request::parse(body)?;
        let conversation = request.conversation(history)?;
        Ok(request.chat_body(&conversation))
    }

    #[test]
    fn items_become_chat_messages() {
        let chat = chat_of(json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 32, "stream": true,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}, {"type": "input_image", "image_url": "https://x/y.png"}]},
            ],
        }), &[]).unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({
                "model": "m", "max_tokens": 32, "stream": true, "stream_options": {"include_usage": true},
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "Checking.",
                     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                ],
            })
        );
    }

    #[test]
    fn a_call_from_the_stored_history_may_be_answered() {
        let history = [
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
        ];
        let chat = chat_of(json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "call_9", "output": "42"}]}), &history).unwrap();
        assert_eq!(chat["messages"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({"input": "x"}), "(body)", "missing field `model`"),
            (json!({"model": "m", "input": 3}), "input", "must be"),
            (
                json!({"model": "m", "input": [{"type": "web_search_call"}]}),
                "input[0].type",
                "unknown variant `web_search_call`",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}),
                "input[0].call_id",
                "no function_call",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "input[0].content[0].type",
                "unknown variant",
            ),
            (
                json!({"model": "m", "input": [{"role": "tool", "content": "x"}]}),
                "input[0]",
                "unknown variant `tool`",
            ),
            (
                json!({"model": "m", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
                "unknown variant",
            ),
            (
                json!({"model": "m", "text": {"format": {"type": "json_schema"}}}),
                "text.format.type",
                "unknown variant",
            ),
            (
                json!({"model": "m", "temperature": "hot"}),
                "temperature",
                "invalid type",
            ),
            (
                json!({"model": "m", "bogus": 1}),
                "bogus",
                "unknown field `bogus`",
            ),
        ];
        let wrong: Vec<String> = cases
            .into_iter()
            .filter_map(
                |(body, want_field, want_message)| match chat_of(body.clone(), &[]) {
                    Err(ProxyError::InvalidField { field, message })
                        if field == want_field && message.contains(want_message) =>
                    {
                        None
                    }
                    other => Some(format!("{body}: {other:?}")),
                },
            )
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
