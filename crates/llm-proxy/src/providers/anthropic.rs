//! Anthropic's messages API (<https://docs.anthropic.com/en/api/messages>),
//! translated both ways. An OpenAI chat request becomes a `/v1/messages`
//! request: system messages hoisted into `system`, `max_tokens` always set
//! (Anthropic requires it), `stop` as `stop_sequences`, tools and tool calls
//! as `tool_use`/`tool_result` blocks. The answer becomes
//! OpenAI's: a whole message a `chat.completion`, a stream of
//! `message_start`/`content_block_delta`/`message_delta`/`message_stop`
//! events a stream of `chat.completion.chunk`s ending in `[DONE]`, with
//! Anthropic's token counts as OpenAI's usage.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Dialect, Endpoint, UpstreamRequest, api_key_header, upstream_request};
use crate::error::ProxyError;
use crate::litellm_config::DeploymentConfig as Deployment;
use crate::sse;
use crate::usage::Usage;

/// The API version the translation is written against.
const VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; LiteLLM sends this when the client does not.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// OpenAI parameters that have an Anthropic equivalent. Others are refused
/// unless `drop_params` is set: silently losing one would change the answer.
const SUPPORTED: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "stream_options",
    "user",
    "n",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

pub(super) fn prepare(
    deployment: &Deployment,
    endpoint: Endpoint,
    body: &Map<String, Value>,
    drop_params: bool,
) -> Result<UpstreamRequest, ProxyError> {
    let invalid = |message: String| {
        ProxyError::InvalidRequest(format!("deployment {}: {message}", deployment.id))
    };
    if endpoint != Endpoint::ChatCompletions {
        return Err(invalid(format!(
            "anthropic serves chat completions only, not /{}",
            endpoint.path()
        )));
    }
    if !drop_params {
        super::refuse_unsupported("anthropic", SUPPORTED, deployment, body)?;
    }
    if body
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n != 1)
    {
        return Err(invalid(
            "anthropic answers with one choice: `n` must be 1".into(),
        ));
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`messages` must be an array".into()))?;
    let (system, turns) = conversation(messages).map_err(&invalid)?;

    let mut out = Map::new();
    out.insert("model".into(), deployment.upstream_model.clone().into());
    out.insert("messages".into(), turns.into());
    if !system.is_empty() {
        out.insert("system".into(), system.into());
    }
    let set = |key: &str| body.get(key).filter(|v| !v.is_null());
    let max_tokens = set("max_completion_tokens")
        .or_else(|| set("max_tokens"))
        .cloned()
        .unwrap_or(DEFAULT_MAX_TOKENS.into());
    out.insert("max_tokens".into(), max_tokens);
    // top_k is not OpenAI's, but vLLM, llama.cpp and /v1/messages clients send it.
    for key in ["temperature", "top_p", "top_k", "stream"] {
        if let Some(value) = set(key) {
            out.insert(key.into(), value.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(stop)) => {
            out.insert("stop_sequences".into(), json!([stop]));
        }
        Some(stops @ Value::Array(_)) => {
            out.insert("stop_sequences".into(), stops.clone());
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools = tools.iter().map(tool).collect::<Result<Vec<_>, _>>();
        out.insert("tools".into(), tools.map_err(&invalid)?.into());
    }
    if let Some(choice) = tool_choice(body).map_err(&invalid)? {
        out.insert("tool_choice".into(), choice);
    }
    if let Some(user) = body.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        == Some(&Value::Bool(true));

    let base = deployment.base_url.trim_end_matches('/');
    let url = if base.ends_with("/v1/messages") {
        base.to_string()
    } else {
        format!("{}/v1/messages", base.trim_end_matches("/v1"))
    };
    let uri = url
        .parse()
        .map_err(|e| invalid(format!("bad api_base: {e}")))?;
    let mut headers = http::HeaderMap::new();
    headers.insert("anthropic-version", HeaderValue::from_static(VERSION));
    if let Some(key) = &deployment.api_key {
        let value = api_key_header(deployment, key.expose().to_string())?;
        headers.insert("x-api-key", value);
    }
    upstream_request(uri, headers, &out, Dialect::Anthropic { include_usage })
}

/// OpenAI's messages as Anthropic's `system` blocks and conversation turns.
fn conversation(messages: &[Value]) -> Result<(Vec<Value>, Vec<Value>), String> {
    let mut system = Vec::new();
    let mut turns = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let content = message.get("content").unwrap_or(&Value::Null);
        let at = |e: String| format!("messages[{index}]: {e}");
        match message.get("role").and_then(Value::as_str).unwrap_or("") {
            "system" | "developer" => system.extend(text_blocks(content).map_err(at)?),
            "user" => {
                turns.push(json!({"role": "user", "content": content_blocks(content).map_err(at)?}))
            }
            "assistant" => turns.push(assistant_turn(message).map_err(at)?),
            // A tool's answer is a user turn holding a tool_result block.
            "tool" => turns.push(json!({"role": "user", "content": [{
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id").cloned().unwrap_or_default(),
                "content": content_blocks(content).map_err(at)?,
            }]})),
            other => {
                return Err(at(format!(
                    "role `{other}` has no anthropic translation (user, assistant, system, tool)"
                )));
            }
        }
    }
    Ok((system, turns))
}

/// An assistant message: its text, then its tool calls as tool_use blocks.
fn assistant_turn(message: &Value) -> Result<Value, String> {
    let Some(calls) = message.get("tool_calls").and_then(Value::as_array) else {
        let content = message.get("content").unwrap_or(&Value::Null);
        return Ok(json!({"role": "assistant", "content": content_blocks(content)?}));
    };
    let mut blocks = match message.get("content") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) if text.is_empty() => Vec::new(),
        Some(Value::String(text)) => vec![json!({"type": "text", "text": text})],
        Some(parts) => text_blocks(parts)?,
    };
    for call in calls {
        // OpenAI sends the arguments as a JSON string; Anthropic wants the object.
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(arguments)
            .map_err(|e| format!("tool call arguments are not JSON: {e}"))?;
        blocks.push(json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or_default(),
            "name": call.pointer("/function/name").cloned().unwrap_or_default(),
            "input": input,
        }));
    }
    Ok(json!({"role": "assistant", "content": blocks}))
}

/// An OpenAI function tool as an Anthropic tool.
fn tool(tool: &Value) -> Result<Value, String> {
    let function = tool
        .get("function")
        .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"))
        .ok_or("only tools of type `function` have an anthropic translation")?;
    let schema = function
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    let mut out = json!({
        "name": function.get("name").cloned().unwrap_or_default(),
        "input_schema": schema,
    });
    if let Some(description) = function.get("description") {
        out["description"] = description.clone();
    }
    Ok(out)
}

/// `tool_choice` and `parallel_tool_calls` as Anthropic's `tool_choice`.
fn tool_choice(body: &Map<String, Value>) -> Result<Option<Value>, String> {
    let mut choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(mode)) => Some(match mode.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => {
                return Err(format!(
                    "tool_choice `{other}` has no anthropic translation"
                ));
            }
        }),
        Some(named) => {
            let name = named
                .pointer("/function/name")
                .ok_or("tool_choice needs function.name")?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = true.into();
    }
    Ok(choice)
}

/// A system message's content as text blocks.
fn text_blocks(content: &Value) -> Result<Vec<Value>, String> {
    match content {
        Value::String(text) => Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(
                    json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}),
                ),
                other => Err(format!(
                    "a system message may hold text only, not {other:?}"
                )),
            })
            .collect(),
        _ => Err("`content` must be a string or an array of parts".into()),
    }
}

/// A user or assistant message's content: a string stays one, parts become
/// Anthropic's text and image blocks.
fn content_blocks(content: &Value) -> Result<Value, String> {
    let parts = match content {
        Value::String(_) => return Ok(content.clone()),
        Value::Array(parts) => parts,
        _ => return Err("`content` must be a string or an array of parts".into()),
    };
    parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                Ok(json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}))
            }
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .ok_or("an image_url part needs image_url.url")?;
                Ok(json!({"type": "image", "source": image_source(url)}))
            }
            other => Err(format!(
                "content parts of type {other:?} have no anthropic translation"
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Anthropic's `usage`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
}

impl AnthropicUsage {
    /// Cached prompt tokens are prompt tokens too, as OpenAI counts them.
    fn prompt_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }
}

fn openai_usage(prompt_tokens: u64, completion_tokens: u64) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
    }
}

/// Anthropic's stop reasons and OpenAI's finish reasons, one table for both
/// directions (upstream answers and `/v1/messages` answers).
const STOP_REASONS: &[(&str, &str)] = &[
    ("end_turn", "stop"),
    ("max_tokens", "length"),
    ("tool_use", "tool_calls"),
    ("refusal", "content_filter"),
];

fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    let stop_reason = stop_reason?;
    // stop_sequence, pause_turn and any newer reason end the turn as well.
    Some(
        STOP_REASONS
            .iter()
            .find(|(anthropic, _)| *anthropic == stop_reason)
            .map_or("stop", |(_, openai)| openai),
    )
}

/// OpenAI's finish reason as Anthropic's stop reason.
pub(crate) fn stop_reason(finish_reason: &str) -> &'static str {
    STOP_REASONS
        .iter()
        .find(|(_, openai)| *openai == finish_reason)
        .map_or("end_turn", |(anthropic, _)| anthropic)
}

/// An image's URL (OpenAI's `image_url.url`) as Anthropic's `source`:
/// `data:<media type>;base64,<data>` inline, else a URL Anthropic fetches.
fn image_source(url: &str) -> Value {
    match url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    {
        Some((media_type, data)) => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        None => json!({"type": "url", "url": url}),
    }
}

/// An Anthropic image `source` as OpenAI's `image_url.url`: the inverse of
/// [`image_source`].
pub(crate) fn image_url(source: &Value) -> Option<String> {
    match source.get("type")?.as_str()? {
        "base64" => Some(format!(
            "data:{};base64,{}",
            source.get("media_type")?.as_str()?,
            source.get("data")?.as_str()?
        )),
        "url" => Some(source.get("url")?.as_str()?.to_string()),
        _ => None,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole Anthropic message as an OpenAI `chat.completion`.
pub(super) fn whole(body: &[u8]) -> Result<Bytes, String> {
    #[derive(Deserialize)]
    struct Message {
        id: String,
        model: String,
        content: Vec<Block>,
        stop_reason: Option<String>,
        #[serde(default)]
        usage: AnthropicUsage,
    }
    #[derive(Deserialize)]
    struct Block {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: String,
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Value,
    }
    let message: Message =
        serde_json::from_slice(body).map_err(|e| format!("not an anthropic message: {e}"))?;
    let text: String = message
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .map(|b| b.text.as_str())
        .collect();
    let tool_calls: Vec<Value> = message
        .content
        .iter()
        .filter(|b| b.kind == "tool_use")
        .map(|b| {
            let function = json!({"name": b.name, "arguments": b.input.to_string()});
            json!({"id": b.id, "type": "function", "function": function})
        })
        .collect();
    let mut reply = json!({"role": "assistant", "content": text});
    if !tool_calls.is_empty() {
        // OpenAI's content is null when the answer is only tool calls.
        if text.is_empty() {
            reply["content"] = Value::Null;
        }
        reply["tool_calls"] = tool_calls.into();
    }
    let usage = openai_usage(message.usage.prompt_tokens(), message.usage.output_tokens);
    let completion = json!({
        "id": message.id,
        "object": "chat.completion",
        "created": now(),
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(message.stop_reason.as_deref()),
        }],
        "usage": usage,
    });
    Ok(completion.to_string().into())
}

/// Translates an Anthropic event stream, line by line, into OpenAI chunks.
#[derive(Debug)]
pub struct Events {
    include_usage: bool,
    /// OpenAI's index of the tool call being streamed, and how many began.
    tool_call: Option<usize>,
    tool_calls: usize,
    id: String,
    model: String,
    created: u64,
    usage: Option<Usage>,
}

/// The events a stream carries; `event:` lines only repeat the `type`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartedMessage,
    },
    ContentBlockStart {
        content_block: StartedBlock,
    },
    ContentBlockDelta {
        delta: BlockDelta,
    },
    MessageDelta {
        delta: MessageDelta,
        #[serde(default)]
        usage: AnthropicUsage,
    },
    MessageStop,
    Error {
        error: Value,
    },
    /// ping, content_block_stop, and events added after this was written.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartedMessage {
    id: String,
    model: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct StartedBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
}

/// A `text_delta` carries text, an `input_json_delta` a piece of a tool
/// call's arguments; others (thinking) have neither and are left out.
#[derive(Deserialize)]
struct BlockDelta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
}

#[derive(Deserialize)]
struct MessageDelta {
    stop_reason: Option<String>,
}

impl Events {
    pub(crate) fn new(include_usage: bool) -> Self {
        Self {
            include_usage,
            tool_call: None,
            tool_calls: 0,
            id: String::new(),
            model: String::new(),
            created: now(),
            usage: None,
        }
    }

    /// Usage so far: the prompt from `message_start`, completion tokens
    /// from the latest `message_delta`.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Translates one line of the upstream's stream, appending what the
    /// client gets (zero or more SSE events) to `out`.
    pub fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        let Some(payload) = sse::data(line) else {
            return;
        };
        let event = match serde_json::from_slice::<Event>(payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "skipping an anthropic stream event that does not parse");
                return;
            }
        };
        match event {
            Event::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.usage = Some(openai_usage(
                    message.usage.prompt_tokens(),
                    message.usage.output_tokens,
                ));
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            Event::ContentBlockStart { content_block } => {
                self.tool_call = None;
                if content_block.kind == "tool_use" {
                    let index = self.tool_calls;
                    self.tool_calls += 1;
                    self.tool_call = Some(index);
                    let function = json!({"name": content_block.name, "arguments": ""});
                    let call = json!({"index": index, "id": content_block.id, "type": "function", "function": function});
                    self.chunk(out, json!({"tool_calls": [call]}), None);
                }
            }
            Event::ContentBlockDelta { delta } => {
                if let Some(text) = delta.text {
                    self.chunk(out, json!({"content": text}), None);
                } else if let (Some(arguments), Some(index)) = (delta.partial_json, self.tool_call)
                {
                    let call = json!({"index": index, "function": {"arguments": arguments}});
                    self.chunk(out, json!({"tool_calls": [call]}), None);
                }
            }
            Event::MessageDelta { delta, usage } => {
                let prompt = self.usage.map_or(0, |u| u.prompt_tokens);
                self.usage = Some(openai_usage(prompt, usage.output_tokens));
                self.chunk(out, json!({}), finish_reason(delta.stop_reason.as_deref()));
            }
            Event::MessageStop => {
                if self.include_usage {
                    let chunk = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": self.usage.unwrap_or_default(),
                    });
                    put_event(out, &chunk);
                }
                out.put_slice(b"data: [DONE]\n\n");
            }
            Event::Error { error } => {
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("anthropic stream error");
                let kind = error
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                out.put(sse::error_event(&json!({"error": {"message": message, "type": kind, "param": null, "code": null}})));
            }
            Event::Other => {}
        }
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish_reason: Option<&str>) {
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        put_event(out, &chunk);
    }
}

fn put_event(out: &mut BytesMut, payload: &Value) {
    out.put_slice(b"data: ");
    // Writing JSON into a BytesMut cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), payload);
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ProviderKind;

    fn deployment(base_url: &str) -> Deployment {
        let mut config = crate::router::tests::deployment("claude", "c");
        config.provider = ProviderKind::Anthropic;
        config.base_url = base_url.into();
        config
    }

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn messages_url_from_api_base() {
        let request = json!({"model": "claude", "messages": []});
        for base in [
            "https://api.anthropic.com",
            "https://api.anthropic.com/",
            "https://api.anthropic.com/v1",
            "https://api.anthropic.com/v1/messages",
        ] {
            let prepared = prepare(
                &deployment(base),
                Endpoint::ChatCompletions,
                &body(request.clone()),
                false,
            )
            .unwrap();
            assert_eq!(
                prepared.uri, "https://api.anthropic.com/v1/messages",
                "{base}"
            );
        }
    }

    #[test]
    fn images_and_user_become_anthropic_blocks() {
        let request = json!({"model": "claude", "user": "u1", "max_tokens": null, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]}]});
        let prepared = prepare(
            &deployment("http://fake"),
            Endpoint::ChatCompletions,
            &body(request),
            false,
        )
        .unwrap();
        let sent: Value = serde_json::from_slice(&prepared.body).unwrap();
        assert_eq!(sent["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(sent["metadata"], json!({"user_id": "u1"}));
        assert_eq!(
            sent["messages"][0]["content"],
            json!([
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ])
        );
        let function =
            json!({"model": "claude", "messages": [{"role": "function", "content": "x"}]});
        assert!(
            prepare(
                &deployment("http://fake"),
                Endpoint::ChatCompletions,
                &body(function),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn error_events_become_openai_errors() {
        let mut events = Events::new(false);
        let mut out = BytesMut::new();
        events.line(b"event: error", &mut out);
        events.line(
            br#"data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &mut out,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        let payload: Value =
            serde_json::from_str(text.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(payload["error"]["message"], "Overloaded");
        assert_eq!(payload["error"]["type"], "overloaded_error");
    }
}
