//! The gRPC API: the same operations as the HTTP API over the same gateway.
//! Requests become the OpenAI JSON body the gateway forwards; the upstream's
//! JSON answer (or SSE events, for the stream) becomes the proto reply.

use std::collections::VecDeque;
use std::sync::Arc;

use berth_proto::llmproxy::v1 as pb;
use berth_proto::llmproxy::v1::llm_proxy_server::LlmProxy;
use berth_server::GrpcStream;
#[cfg(test)]
use berth_server::error::error_reason;
use berth_server::error::into_status;
use berth_server::json_budget;
use http_body_util::BodyStream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Caller};
use crate::error::ProxyError;
use crate::gateway::{Call, Gateway, Reply, UpstreamClock};
use crate::keys::{KeySpec, VirtualKey};
use crate::providers::Endpoint;
use crate::sse::{self, Lines};
use crate::stream::StreamBody;
use crate::usage::Usage;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Most messages one chat request may carry: each becomes a JSON object
/// (~700 bytes) before it is forwarded, so 500 000 empty ones, 1 MiB of
/// protobuf, would take ~370 MB.
const MAX_CHAT_MESSAGES: usize = 10_000;
/// Most memory `extra_json` may take parsed (estimated before parsing): it
/// holds the few parameters the messages lack.
const MAX_EXTRA_JSON_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct LlmProxyService {
    gateway: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl LlmProxyService {
    pub fn new(gateway: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Self { gateway, auth }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.auth.caller(header).map_err(status)
    }

    /// Forwards a body; `Whole` replies are parsed as `T`.
    async fn whole<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        endpoint: Endpoint,
        body: Map<String, Value>,
    ) -> Result<T, Status> {
        let call = Call::from_body(endpoint, body).map_err(status)?;
        match self
            .gateway
            .forward(call, caller.key(), &UpstreamClock::default())
            .await
            .map_err(status)?
        {
            Reply::Whole { body, .. } => parse_upstream(&body),
            Reply::Stream(_) => Err(status(ProxyError::ReplyMismatch(
                "a stream answered a request that asked for none",
            ))),
        }
    }
}

/// The one place a proxy error becomes a status; limits carry `retry-after`.
fn status(error: ProxyError) -> Status {
    let retry_after = error.retry_after();
    let mut status = into_status(error);
    if let Some(wait) = retry_after {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        status.metadata_mut().insert("retry-after", secs.into());
    }
    status
}

fn parse_upstream<T: DeserializeOwned>(body: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(body).map_err(|e| status(ProxyError::UnreadableAnswer(e.to_string())))
}

/// Optional fields as JSON, then `extra_json` for keys not already set.
fn body_of(
    fields: Vec<(&str, Option<Value>)>,
    extra_json: &str,
) -> Result<Map<String, Value>, Status> {
    let mut body: Map<String, Value> = fields
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect();
    if !extra_json.trim().is_empty() {
        let estimate = json_budget::parsed_size(extra_json.as_bytes());
        if estimate > MAX_EXTRA_JSON_BYTES {
            return Err(status(ProxyError::ExtraJsonTooLarge {
                estimate,
                limit: MAX_EXTRA_JSON_BYTES,
            }));
        }
        let extra: Map<String, Value> = serde_json::from_str(extra_json).map_err(|e| {
            status(ProxyError::InvalidRequest(format!(
                "extra_json is not a JSON object: {e}"
            )))
        })?;
        for (key, value) in extra {
            body.entry(key).or_insert(value);
        }
    }
    Ok(body)
}

fn non_empty<T: Into<Value>>(value: T, empty: bool) -> Option<Value> {
    (!empty).then(|| value.into())
}

fn chat_body(
    request: pb::ChatCompletionRequest,
    stream: bool,
) -> Result<Map<String, Value>, Status> {
    if request.messages.len() > MAX_CHAT_MESSAGES {
        return Err(status(ProxyError::InvalidRequest(format!(
            "messages: {} of them; at most {MAX_CHAT_MESSAGES}",
            request.messages.len()
        ))));
    }
    let messages: Vec<Value> = request
        .messages
        .into_iter()
        .map(|m| {
            let mut message = json!({"role": m.role, "content": m.content});
            if !m.name.is_empty() {
                message["name"] = m.name.into();
            }
            message
        })
        .collect();
    body_of(
        vec![
            ("model", Some(request.model.into())),
            ("messages", Some(messages.into())),
            ("stream", stream.then_some(true.into())),
            ("temperature", request.temperature.map(Value::from)),
            ("top_p", request.top_p.map(Value::from)),
            ("max_tokens", request.max_tokens.map(Value::from)),
            ("seed", request.seed.map(Value::from)),
            (
                "stop",
                non_empty(request.stop.clone(), request.stop.is_empty()),
            ),
            (
                "user",
                non_empty(request.user.clone(), request.user.is_empty()),
            ),
        ],
        &request.extra_json,
    )
}

fn usage_pb(usage: Option<Usage>) -> Option<pb::Usage> {
    let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    usage.map(|u| pb::Usage {
        prompt_tokens: narrow(u.prompt_tokens),
        completion_tokens: narrow(u.completion_tokens),
        total_tokens: narrow(u.total()),
    })
}

fn timestamp(unix_seconds: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_seconds).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

// OpenAI's response shapes, read leniently: upstreams differ in what they fill in.

#[derive(Deserialize)]
struct ChatJson {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    created: u64,
    #[serde(default)]
    choices: Vec<ChatChoiceJson>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChatChoiceJson {
    #[serde(default)]
    index: u32,
    #[serde(default, alias = "delta")]
    message: MessageJson,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct MessageJson {
    role: Option<String>,
    content: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct CompletionJson {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<CompletionChoiceJson>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChoiceJson {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    text: String,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct EmbeddingsJson {
    #[serde(default)]
    model: String,
    #[serde(default)]
    data: Vec<EmbeddingJson>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingJson {
    #[serde(default)]
    index: u32,
    embedding: Vec<f32>,
}

/// The proto chunks of one SSE event: one per choice, or one carrying only
/// the usage; an error event ends the stream with its status.
fn chunks_of(payload: &[u8]) -> Vec<Result<pb::ChatCompletionChunk, Status>> {
    if payload == b"[DONE]" {
        return Vec::new();
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(e) => {
            return vec![Err(status(ProxyError::UnreadableStream {
                what: "event",
                reason: e.to_string(),
            }))];
        }
    };
    if let Some(error) = value.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the upstream stream failed");
        let timeout = error.get("code").and_then(Value::as_str) == Some("timeout");
        return vec![Err(status(ProxyError::StreamFailed {
            message: message.to_string(),
            timeout,
        }))];
    }
    let chunk: ChatJson = match serde_json::from_value(value) {
        Ok(chunk) => chunk,
        Err(e) => {
            return vec![Err(status(ProxyError::UnreadableStream {
                what: "chunk",
                reason: e.to_string(),
            }))];
        }
    };
    let usage = usage_pb(chunk.usage);
    if chunk.choices.is_empty() {
        return usage
            .map(|usage| pb::ChatCompletionChunk {
                id: chunk.id,
                model: chunk.model,
                usage: Some(usage),
                ..Default::default()
            })
            .into_iter()
            .map(Ok)
            .collect();
    }
    chunk
        .choices
        .into_iter()
        .map(|choice| {
            Ok(pb::ChatCompletionChunk {
                id: chunk.id.clone(),
                model: chunk.model.clone(),
                index: choice.index,
                delta_content: choice.message.content.unwrap_or_default(),
                delta_role: choice.message.role.unwrap_or_default(),
                finish_reason: choice.finish_reason.unwrap_or_default(),
                usage,
            })
        })
        .collect()
}

/// The SSE body as proto chunks; dropping the stream (the client cancelled)
/// drops the body, which cancels the upstream request.
fn chunk_stream(body: StreamBody) -> GrpcStream<pb::ChatCompletionChunk> {
    struct State {
        body: BodyStream<StreamBody>,
        lines: Lines,
        ready: VecDeque<Result<pb::ChatCompletionChunk, Status>>,
    }
    let state = State {
        body: BodyStream::new(body),
        lines: Lines::default(),
        ready: VecDeque::new(),
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.ready.pop_front() {
                if item.is_err() {
                    state.ready.clear();
                }
                return Some((item, state));
            }
            let frame = match state.body.next().await? {
                Ok(frame) => frame,
                Err(never) => match never {},
            };
            if let Ok(data) = frame.into_data() {
                let State { lines, ready, .. } = &mut state;
                lines.push(&data, |line| {
                    if let Some(payload) = sse::data(line) {
                        ready.extend(chunks_of(payload));
                    }
                });
            }
        }
    });
    Box::pin(stream)
}

fn key_pb(key: &VirtualKey) -> pb::VirtualKey {
    let spent = key.spent();
    let narrow = |n: Option<u64>| n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    pb::VirtualKey {
        id: key.id.clone(),
        alias: key.spec.key_alias.clone(),
        models: key.spec.models.clone(),
        rpm_limit: narrow(key.spec.rpm_limit),
        tpm_limit: key.spec.tpm_limit.unwrap_or(0),
        max_parallel_requests: narrow(key.spec.max_parallel_requests),
        max_budget: key.spec.max_budget.unwrap_or(0.0),
        spend: spent.spend,
        created_at: Some(timestamp(key.created_at)),
        prompt_tokens: spent.prompt_tokens,
        completion_tokens: spent.completion_tokens,
    }
}

#[tonic::async_trait]
impl LlmProxy for LlmProxyService {
    async fn chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<Response<pb::ChatCompletionResponse>, Status> {
        let caller = self.caller(&request)?;
        let body = chat_body(request.into_inner(), false)?;
        let answer: ChatJson = self.whole(&caller, Endpoint::ChatCompletions, body).await?;
        Ok(Response::new(pb::ChatCompletionResponse {
            id: answer.id,
            model: answer.model,
            created: Some(timestamp(answer.created)),
            choices: answer
                .choices
                .into_iter()
                .map(|c| pb::ChatChoice {
                    index: c.index,
                    message: Some(pb::ChatMessage {
                        role: c.message.role.unwrap_or_default(),
                        content: c.message.content.unwrap_or_default(),
                        name: c.message.name.unwrap_or_default(),
                    }),
                    finish_reason: c.finish_reason.unwrap_or_default(),
                })
                .collect(),
            usage: usage_pb(answer.usage),
        }))
    }

    type ChatCompletionStreamStream = GrpcStream<pb::ChatCompletionChunk>;

    async fn chat_completion_stream(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<Response<Self::ChatCompletionStreamStream>, Status> {
        let caller = self.caller(&request)?;
        let call = Call::from_body(
            Endpoint::ChatCompletions,
            chat_body(request.into_inner(), true)?,
        )
        .map_err(status)?;
        match self
            .gateway
            .forward(call, caller.key(), &UpstreamClock::default())
            .await
            .map_err(status)?
        {
            Reply::Stream(body) => Ok(Response::new(chunk_stream(body))),
            Reply::Whole { .. } => Err(status(ProxyError::ReplyMismatch(
                "a whole answer to a streamed request",
            ))),
        }
    }

    async fn completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<Response<pb::CompletionResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let body = body_of(
            vec![
                ("model", Some(r.model.into())),
                ("prompt", Some(r.prompt.into())),
                ("temperature", r.temperature.map(Value::from)),
                ("max_tokens", r.max_tokens.map(Value::from)),
                ("stop", non_empty(r.stop.clone(), r.stop.is_empty())),
            ],
            &r.extra_json,
        )?;
        let answer: CompletionJson = self.whole(&caller, Endpoint::Completions, body).await?;
        Ok(Response::new(pb::CompletionResponse {
            id: answer.id,
            model: answer.model,
            choices: answer
                .choices
                .into_iter()
                .map(|c| pb::CompletionChoice {
                    index: c.index,
                    text: c.text,
                    finish_reason: c.finish_reason.unwrap_or_default(),
                })
                .collect(),
            usage: usage_pb(answer.usage),
        }))
    }

    async fn embeddings(
        &self,
        request: Request<pb::EmbeddingsRequest>,
    ) -> Result<Response<pb::EmbeddingsResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let body = body_of(
            vec![
                ("model", Some(r.model.into())),
                ("input", Some(r.input.into())),
            ],
            "",
        )?;
        let answer: EmbeddingsJson = self.whole(&caller, Endpoint::Embeddings, body).await?;
        Ok(Response::new(pb::EmbeddingsResponse {
            model: answer.model,
            data: answer
                .data
                .into_iter()
                .map(|e| pb::EmbeddingVector {
                    index: e.index,
                    embedding: e.embedding,
                })
                .collect(),
            usage: usage_pb(answer.usage),
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let caller = self.caller(&request)?;
        let models = self
            .gateway
            .router()
            .models()
            .filter(|(name, _)| caller.may_use(name))
            .map(|(name, n)| pb::ModelEntry {
                id: name.to_string(),
                deployments: u32::try_from(n).unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.caller(&request)?.require_master().map_err(status)?;
        let r = request.into_inner();
        let positive = |n: u64| (n > 0).then_some(n);
        let spec = KeySpec {
            key_alias: r.alias,
            models: r.models,
            rpm_limit: positive(r.rpm_limit.into()),
            tpm_limit: positive(r.tpm_limit),
            max_parallel_requests: positive(r.max_parallel_requests.into()),
            max_budget: (r.max_budget > 0.0).then_some(r.max_budget),
            // Not in the gRPC API's messages: HTTP's `/key/generate` only.
            ..KeySpec::default()
        };
        let (key, secret) = self.auth.keys().create(spec).map_err(status)?;
        self.gateway.warn_of_unpriced_models(&key);
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_pb(&key)),
            secret,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.caller(&request)?.require_master().map_err(status)?;
        let r = request.into_inner();
        let start: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse().map_err(|_| {
                status(ProxyError::InvalidRequest(
                    "page_token is not one this server gave".into(),
                ))
            })?
        };
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let all = self.auth.keys().list();
        let keys: Vec<_> = all
            .iter()
            .skip(start)
            .take(size)
            .map(|k| key_pb(k))
            .collect();
        let next = start + keys.len();
        let next_page_token = if next < all.len() {
            next.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListKeysResponse {
            keys,
            next_page_token,
        }))
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        self.caller(&request)?.require_master().map_err(status)?;
        let id = request.into_inner().id;
        if self.auth.keys().delete(&id).map_err(status)? {
            Ok(Response::new(pb::DeleteKeyResponse {}))
        } else {
            Err(status(ProxyError::UnknownKey(id)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_events_become_chunks_or_statuses() {
        let chunk = br#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}"#;
        let chunks = chunks_of(chunk);
        let first = chunks[0].as_ref().unwrap();
        assert_eq!(
            (first.delta_role.as_str(), first.delta_content.as_str()),
            ("assistant", "Hi")
        );
        let usage = chunks_of(br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
        assert_eq!(usage[0].as_ref().unwrap().usage.unwrap().total_tokens, 3);
        assert!(chunks_of(b"[DONE]").is_empty());
        let error = chunks_of(br#"{"error":{"message":"late","code":"timeout"}}"#);
        let error = error[0].as_ref().unwrap_err();
        assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(error.message(), "late");
        assert_eq!(error_reason(error), Some("upstream_stream_failed"));
        let failed = chunks_of(br#"{"error":{"message":"boom"}}"#);
        assert_eq!(
            failed[0].as_ref().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        let garbled = chunks_of(b"{not json");
        let garbled = garbled[0].as_ref().unwrap_err();
        assert_eq!(garbled.code(), tonic::Code::Internal);
        assert!(
            garbled
                .message()
                .starts_with("unreadable stream event from the upstream: ")
        );
    }

    #[test]
    fn every_status_carries_its_reason() {
        let too_big = status(ProxyError::ExtraJsonTooLarge {
            estimate: 9,
            limit: 4,
        });
        assert_eq!(too_big.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            too_big.message(),
            "extra_json would take about 9 bytes parsed; at most 4"
        );
        assert_eq!(error_reason(&too_big), Some("extra_json_too_large"));
        let not_object = body_of(vec![], "[1]").unwrap_err();
        assert_eq!(not_object.code(), tonic::Code::InvalidArgument);
        assert_eq!(error_reason(&not_object), Some("invalid_request"));
        let limited = status(ProxyError::RateLimited {
            what: "rpm".into(),
            retry_after: std::time::Duration::from_millis(1500),
        });
        assert_eq!(error_reason(&limited), Some("rate_limited"));
        assert_eq!(limited.metadata().get("retry-after").unwrap(), "2");
    }

    #[test]
    fn extra_json_adds_but_does_not_override() {
        let body = body_of(
            vec![("model", Some("m".into())), ("stop", None)],
            r#"{"model":"x","seed":7}"#,
        )
        .unwrap();
        assert_eq!(Value::Object(body), json!({"model": "m", "seed": 7}));
        assert!(body_of(vec![], "[1]").is_err());
    }
}
