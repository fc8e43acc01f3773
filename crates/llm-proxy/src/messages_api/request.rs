//! An Anthropic Messages request as the proxy's internal chat-completions
//! body: `system` as a system message, text and image blocks as OpenAI's
//! parts, `tool_use` blocks as an assistant's `tool_calls`, `tool_result`
//! blocks as `tool` messages, `stop_sequences` as `stop`, tools and
//! `tool_choice` as OpenAI's. Every refusal names the field.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ProxyError;
use crate::fields::{invalid as field, typed};
use crate::providers::image_url;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    model: String,
    max_tokens: u64,
    messages: Vec<Message>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    stream: Option<bool>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<ToolChoice>,
    metadata: Option<Metadata>,
    /// The response cache's per-request settings (see `cache`), as on the
    /// OpenAI endpoints.
    cache: Option<Value>,
    /// Accepted and left out: no upstream of the proxy has a use for them,
    /// and Anthropic's clients send them.
    #[serde(rename = "service_tier")]
    _service_tier: Option<Value>,
    #[serde(rename = "thinking")]
    _thinking: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    content: Value,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: Value,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<Value>,
        #[serde(default)]
        is_error: bool,
    },
    /// A previous answer's reasoning, handed back: no chat-completions
    /// upstream takes it, so it is left out.
    Thinking {},
    RedactedThinking {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tool {
    name: String,
    description: Option<String>,
    input_schema: Value,
    #[serde(rename = "cache_control")]
    _cache_control: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ToolChoice {
    Auto {
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        disable_parallel_tool_use: Option<bool>,
    },
    None {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    user_id: Option<String>,
}

/// The chat-completions body for a Messages request body.
pub fn to_chat(body: Value) -> Result<Map<String, Value>, ProxyError> {
    if !body.is_object() {
        return Err(field("(body)", "must be a JSON object"));
    }
    let request: Request = typed("", body)?;
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system {
        messages.push(json!({"role": "system", "content": text_of("system", system)?}));
    }
    let mut tool_uses = HashSet::new();
    for (index, message) in request.messages.into_iter().enumerate() {
        turn(index, message, &mut tool_uses, &mut messages)?;
    }

    let mut chat = Map::new();
    chat.insert("model".into(), request.model.into());
    chat.insert("messages".into(), messages.into());
    chat.insert("max_tokens".into(), request.max_tokens.into());
    let optional = [
        ("temperature", request.temperature.map(Value::from)),
        ("top_p", request.top_p.map(Value::from)),
        ("top_k", request.top_k.map(Value::from)),
        ("stop", request.stop_sequences.map(Value::from)),
        (
            "user",
            request.metadata.and_then(|m| m.user_id).map(Value::from),
        ),
        ("cache", request.cache),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            chat.insert(key.into(), value);
        }
    }
    if request.stream == Some(true) {
        chat.insert("stream".into(), true.into());
        // message_delta carries the output tokens: ask for them.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = request.tools {
        let tools: Vec<Value> = tools
            .into_iter()
            .map(|tool| {
                let mut function = json!({"name": tool.name, "parameters": tool.input_schema});
                if let Some(description) = tool.description {
                    function["description"] = description.into();
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        chat.insert("tools".into(), tools.into());
    }
    if let Some(choice) = request.tool_choice {
        let (choice, no_parallel) = match choice {
            ToolChoice::Auto {
                disable_parallel_tool_use,
            } => (json!("auto"), disable_parallel_tool_use),
            ToolChoice::Any {
                disable_parallel_tool_use,
            } => (json!("required"), disable_parallel_tool_use),
            ToolChoice::Tool {
                name,
                disable_parallel_tool_use,
            } => (
                json!({"type": "function", "function": {"name": name}}),
                disable_parallel_tool_use,
            ),
            ToolChoice::None {} => (json!("none"), None),
        };
        chat.insert("tool_choice".into(), choice);
        if no_parallel == Some(true) {
            chat.insert("parallel_tool_calls".into(), false.into());
        }
    }
    Ok(chat)
}

/// One turn as chat messages: a user turn's tool results become `tool`
/// messages first (they answer the assistant turn before it), then its
/// other blocks one user message; an assistant turn one assistant message.
fn turn(
    index: usize,
    message: Message,
    tool_uses: &mut HashSet<String>,
    out: &mut Vec<Value>,
) -> Result<(), ProxyError> {
    let at = format!("messages[{index}].content");
    let blocks: Vec<Block> = match message.content {
        // Plain text stays plain: chat's string content is the common form.
        text @ Value::String(_) => {
            let role = if message.role == Role::User {
                "user"
            } else {
                "assistant"
            };
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks
            .into_iter()
            .enumerate()
            .map(|(i, block)| typed(&format!("{at}[{i}]"), block))
            .collect::<Result<_, _>>()?,
        _ => return Err(field(at, "must be a string or an array of content blocks")),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        let here = || format!("{at}[{i}]");
        match (message.role, block) {
            (_, Block::Text { text }) => parts.push(json!({"type": "text", "text": text})),
            (Role::User, Block::Image { source }) => {
                let url = image_url(&source).ok_or_else(|| {
                    field(
                        format!("{}.source", here()),
                        "must be {type: base64, media_type, data} or {type: url, url}",
                    )
                })?;
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            (Role::Assistant, Block::ToolUse { id, name, input }) => {
                tool_uses.insert(id.clone());
                calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}}));
            }
            (
                Role::User,
                Block::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                },
            ) => {
                if !tool_uses.contains(&tool_use_id) {
                    return Err(field(
                        format!("{}.tool_use_id", here()),
                        format!("no tool_use block with id `{tool_use_id}` comes before it"),
                    ));
                }
                let mut text = match content {
                    None | Some(Value::Null) => String::new(),
                    Some(content) => text_of(&format!("{}.content", here()), content)?,
                };
                if is_error {
                    // OpenAI's tool messages have no error flag; say it in words.
                    text.insert_str(0, "error: ");
                }
                out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": text}));
            }
            (_, Block::Thinking {} | Block::RedactedThinking {}) => {}
            (role, _) => {
                let role = if role == Role::User {
                    "user"
                } else {
                    "assistant"
                };
                return Err(field(
                    format!("{}.type", here()),
                    format!("this block type cannot be in a {role} message"),
                ));
            }
        }
    }
    match message.role {
        Role::User if !parts.is_empty() => out.push(json!({"role": "user", "content": parts})),
        Role::User => {}
        Role::Assistant => {
            let text: String = parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("");
            // Empty text rather than null beside tool calls: both are
            // OpenAI's, and llama.cpp's server takes only a string.
            let mut reply = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                reply["tool_calls"] = calls.into();
            }
            out.push(reply);
        }
    }
    Ok(())
}

/// `system`, or a tool result's content: a string, or text blocks joined.
fn text_of(at: &str, value: Value) -> Result<String, ProxyError> {
    match value {
        Value::String(text) => Ok(text),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (i, block) in blocks.into_iter().enumerate() {
                match typed(&format!("{at}[{i}]"), block)? {
                    Block::Text { text: piece } => text.push_str(&piece),
                    _ => {
                        return Err(field(
                            format!("{at}[{i}].type"),
                            "only text blocks are allowed here",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(field(at, "must be a string or an array of text blocks")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: Value) -> (String, String) {
        match to_chat(body) {
            Err(ProxyError::InvalidField { field, message }) => (field, message),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_tool_round_becomes_chat_messages() {
        let chat = to_chat(json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["END"], "temperature": 0.5, "metadata": {"user_id": "u1"},
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
        }))
        .unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({
                "model": "m", "max_tokens": 64, "temperature": 0.5, "stop": ["END"], "user": "u1",
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                    {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
                ],
            })
        );
    }

    #[test]
    fn streams_ask_for_usage_and_images_become_urls() {
        let chat = to_chat(json!({"model": "m", "max_tokens": 8, "stream": true, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
        ]}))
        .unwrap();
        assert_eq!(chat["stream_options"], json!({"include_usage": true}));
        assert_eq!(
            chat["messages"][0]["content"][0]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let base = |messages: Value| json!({"model": "m", "max_tokens": 8, "messages": messages});
        let cases = [
            (
                json!({"model": "m", "messages": []}),
                "",
                "missing field `max_tokens`",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [], "frobnicate": 1}),
                "",
                "unknown field `frobnicate`",
            ),
            (
                json!({"model": "m", "max_tokens": "many", "messages": []}),
                "max_tokens",
                "invalid type",
            ),
            (json!([1]), "(body)", "object"),
            (
                base(json!([{"role": "robot", "content": "x"}])),
                "messages[0].role",
                "unknown variant",
            ),
            (
                base(json!([{"role": "user", "content": 5}])),
                "messages[0].content",
                "must be",
            ),
            (
                base(json!([{"role": "user", "content": [{"type": "video"}]}])),
                "messages[0].content[0]",
                "unknown variant `video`",
            ),
            (
                base(
                    json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}]),
                ),
                "messages[0].content[0].tool_use_id",
                "no tool_use",
            ),
            (
                base(
                    json!([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]),
                ),
                "messages[0].content[0].type",
                "user message",
            ),
            (
                base(
                    json!([{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]),
                ),
                "messages[0].content[0].source",
                "base64",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [], "system": 3}),
                "system",
                "must be",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [], "tool_choice": {"type": "maybe"}}),
                "tool_choice",
                "unknown variant",
            ),
        ];
        for (body, want_field, want_message) in cases {
            let (field, message) = error_of(body.clone());
            assert!(
                field.starts_with(want_field) && message.contains(want_message),
                "{body}: {field}: {message}"
            );
        }
    }
}
