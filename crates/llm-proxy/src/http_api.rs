//! The OpenAI-compatible HTTP API, with LiteLLM's paths: each operation is
//! served with and without the `/v1` prefix (clients of a LiteLLM proxy use
//! both), and virtual keys are managed at LiteLLM's `/key/*` paths.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_server::budget::{self, RequestBudget};
use berth_server::json_budget;
use berth_server::trace_context;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Caller};
use crate::chat::Translated;
use crate::error::ProxyError;
use crate::gateway::{Call, Gateway, Reply, UpstreamClock};
use crate::keys::{KeySpec, VirtualKey};
use crate::messages_api;
use crate::providers::Endpoint;
use crate::responses_api::{self, Prepared, ResponseStore};
use crate::stream::StreamBody;

#[derive(Debug)]
pub struct HttpApi {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Auth>,
    pub max_body_bytes: usize,
    /// Most memory a body's JSON may take parsed (see `json_budget`).
    pub max_json_bytes: usize,
    /// Large bodies are parsed within it (`server.request_cpu_budget`,
    /// `server.max_costly_requests`).
    pub budget: RequestBudget,
    /// `/v1/responses` conversations kept for `previous_response_id`.
    pub responses: Arc<ResponseStore>,
}

/// The header that tells the time an answer spent in the proxy itself, in
/// microseconds: from the request's arrival to the answer's headers, less
/// the time spent waiting on upstreams.
pub const OVERHEAD_HEADER: &str = "x-berth-overhead-us";
/// The header that marks an answer served from the response cache.
pub const CACHE_HEADER: &str = "x-berth-cache";
/// The header that names the API a `/v1/responses` request was sent
/// upstream in: `responses` (passed through) or `chat.completions`
/// (translated).
pub const UPSTREAM_API_HEADER: &str = "x-berth-upstream-api";

/// Bodies from this size on are parsed within the request budget, off the
/// async workers. A smaller one parses in well under a millisecond, less
/// than handing it to another thread would cost, and nothing is refused
/// for being one of many small requests at once.
const COSTLY_BODY_BYTES: usize = 64 << 10;

type Shared = State<Arc<HttpApi>>;

pub fn router(api: Arc<HttpApi>) -> Router {
    let mut router = Router::new();
    for prefix in ["", "/v1"] {
        router = router
            .route(
                &format!("{prefix}/chat/completions"),
                post(chat_completions),
            )
            .route(&format!("{prefix}/completions"), post(completions))
            .route(&format!("{prefix}/embeddings"), post(embeddings))
            .route(&format!("{prefix}/messages"), post(messages))
            .route(&format!("{prefix}/responses"), post(responses))
            .route(&format!("{prefix}/models"), get(models));
    }
    router
        .route("/key/generate", post(generate_key))
        .route("/key/list", get(list_keys))
        .route("/key/delete", post(delete_keys))
        .route("/health/liveliness", get(|| async { Json("I'm alive!") }))
        // The body limit is applied by `read_body`, which answers 413 with an
        // OpenAI-style error rather than axum's plain-text one.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(api.clone(), overhead))
        // Outermost: the request's span covers all the proxy does for it.
        .layer(middleware::from_fn(trace_context::traced_http))
        .with_state(api)
}

/// Times every request: the overhead header on every answer (errors and
/// unknown paths included) and the overhead histogram.
async fn overhead(State(api): Shared, mut request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let clock = Arc::new(UpstreamClock::default());
    request.extensions_mut().insert(clock.clone());
    let mut response = next.run(request).await;
    let own = arrived.elapsed().saturating_sub(clock.total());
    api.gateway.metrics().overhead.observe(own.as_secs_f64());
    let micros = u64::try_from(own.as_micros()).unwrap_or(u64::MAX);
    response
        .headers_mut()
        .insert(OVERHEAD_HEADER, HeaderValue::from(micros));
    response
}

type Clock = Extension<Arc<UpstreamClock>>;

async fn chat_completions(
    State(api): Shared,
    clock: Clock,
    headers: HeaderMap,
    body: Body,
) -> Response {
    api.openai(Endpoint::ChatCompletions, &headers, body, &clock)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn completions(State(api): Shared, clock: Clock, headers: HeaderMap, body: Body) -> Response {
    api.openai(Endpoint::Completions, &headers, body, &clock)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn embeddings(State(api): Shared, clock: Clock, headers: HeaderMap, body: Body) -> Response {
    api.openai(Endpoint::Embeddings, &headers, body, &clock)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn messages(State(api): Shared, clock: Clock, headers: HeaderMap, body: Body) -> Response {
    api.messages(&headers, body, &clock)
        .await
        .unwrap_or_else(ProxyError::into_anthropic_http)
}

async fn responses(State(api): Shared, clock: Clock, headers: HeaderMap, body: Body) -> Response {
    api.responses(&headers, body, &clock)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn models(State(api): Shared, headers: HeaderMap) -> Response {
    let caller = match api.caller(&headers) {
        Ok(caller) => caller,
        Err(error) => return error.into_http(),
    };
    let data: Vec<_> = api
        .gateway
        .router()
        .models()
        .filter(|(name, _)| caller.may_use(name))
        .map(|(name, _)| json!({"id": name, "object": "model", "created": 0, "owned_by": "berth"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn generate_key(State(api): Shared, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        api.caller(&headers)?.require_master()?;
        let bytes = read_body(body, api.max_body_bytes, &headers).await?;
        let spec: KeySpec = if bytes.is_empty() {
            KeySpec::default()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?
        };
        let (key, secret) = api.auth.keys().create(spec)?;
        api.gateway.warn_of_unpriced_models(&key);
        let mut info = key_info(&key);
        info["key"] = json!(secret);
        Ok(Json(info).into_response())
    };
    result.await.unwrap_or_else(ProxyError::into_http)
}

async fn list_keys(State(api): Shared, headers: HeaderMap) -> Response {
    match api.caller(&headers).and_then(|c| c.require_master()) {
        Ok(()) => {
            let keys: Vec<_> = api.auth.keys().list().iter().map(|k| key_info(k)).collect();
            Json(json!({"keys": keys})).into_response()
        }
        Err(error) => error.into_http(),
    }
}

async fn delete_keys(State(api): Shared, headers: HeaderMap, body: Body) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Delete {
        /// Key ids (`key_id` from `/key/generate`).
        keys: Vec<String>,
    }
    let result = async {
        api.caller(&headers)?.require_master()?;
        let bytes = read_body(body, api.max_body_bytes, &headers).await?;
        let delete: Delete =
            serde_json::from_slice(&bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
        let mut deleted = Vec::new();
        for id in delete.keys {
            if api.auth.keys().delete(&id)? {
                deleted.push(id);
            }
        }
        Ok(Json(json!({"deleted_keys": deleted})).into_response())
    };
    result.await.unwrap_or_else(ProxyError::into_http)
}

/// A key as listed: everything but the secret.
pub fn key_info(key: &VirtualKey) -> serde_json::Value {
    let spent = key.spent();
    let mut info = serde_json::to_value(&key.spec).unwrap_or_default();
    info["key_id"] = json!(key.id);
    info["spend"] = json!(spent.spend);
    info["prompt_tokens"] = json!(spent.prompt_tokens);
    info["completion_tokens"] = json!(spent.completion_tokens);
    info["created_at"] = json!(key.created_at);
    info
}

impl HttpApi {
    /// The caller by `Authorization: Bearer`, or by `x-api-key` as
    /// Anthropic's clients send their key.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        let x_api_key;
        let authorization = match headers.get(AUTHORIZATION) {
            Some(value) => value.to_str().ok(),
            None => {
                x_api_key = headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(|key| format!("Bearer {key}"));
                x_api_key.as_deref()
            }
        };
        self.auth.caller(authorization)
    }

    /// Authenticates, reads the body within the size limits, and parses it
    /// with `parse` (within the request budget when it is large).
    async fn parse<T: Send + 'static>(
        &self,
        headers: &HeaderMap,
        body: Body,
        parse: impl FnOnce(&[u8]) -> Result<T, ProxyError> + Send + 'static,
    ) -> Result<(Caller, T), ProxyError> {
        // Authenticate before reading the body: a stranger's megabytes are not read.
        let caller = self.caller(headers)?;
        let bytes = read_body(body, self.max_body_bytes, headers).await?;
        let estimate = json_budget::parsed_size(&bytes);
        if estimate > self.max_json_bytes {
            return Err(ProxyError::JsonTooLarge {
                estimate,
                limit: self.max_json_bytes,
            });
        }
        let parsed = if bytes.len() < COSTLY_BODY_BYTES {
            parse(&bytes)?
        } else {
            self.budget
                .run(move || {
                    let parsed = parse(&bytes)?;
                    // One JSON parse is not cut short: bounded by the body
                    // and JSON limits, it is measured once it ends.
                    budget::check()?;
                    Ok::<_, ProxyError>(parsed)
                })
                .await?
        };
        Ok((caller, parsed))
    }

    async fn openai(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Body,
        clock: &UpstreamClock,
    ) -> Result<Response, ProxyError> {
        let (caller, call) = self
            .parse(headers, body, move |bytes| Call::parse(endpoint, bytes))
            .await?;
        let reply = self.forward(call, &caller, headers, clock).await?;
        answer(reply, AsOpenAi)
    }

    async fn messages(
        &self,
        headers: &HeaderMap,
        body: Body,
        clock: &UpstreamClock,
    ) -> Result<Response, ProxyError> {
        let (caller, call) = self.parse(headers, body, messages_api::call).await?;
        let model = call.model.clone();
        let reply = self.forward(call, &caller, headers, clock).await?;
        answer(reply, AsMessages(model))
    }

    async fn responses(
        &self,
        headers: &HeaderMap,
        body: Body,
        clock: &UpstreamClock,
    ) -> Result<Response, ProxyError> {
        let store = self.responses.clone();
        let gateway = self.gateway.clone();
        let (caller, prepared) = self
            .parse(headers, body, move |bytes| {
                responses_api::prepare(bytes, &store, |model| {
                    gateway.router().serves_responses(model)
                })
            })
            .await?;
        let upstream_api = HeaderValue::from_static(prepared.upstream_api());
        let mut response = match prepared {
            Prepared::PassThrough(call) => {
                let reply = self.forward(call, &caller, headers, clock).await?;
                answer(reply, AsOpenAi)
            }
            Prepared::Translated { call, context } => {
                let reply = self.forward(call, &caller, headers, clock).await?;
                answer(reply, AsResponses(context))
            }
        }?;
        response
            .headers_mut()
            .insert(UPSTREAM_API_HEADER, upstream_api);
        Ok(response)
    }

    /// Forwards a call, with the cache settings of its `Cache-Control` header.
    async fn forward(
        &self,
        mut call: Call,
        caller: &Caller,
        headers: &HeaderMap,
        clock: &UpstreamClock,
    ) -> Result<Reply, ProxyError> {
        call.cache = call.cache.with_headers(headers);
        self.gateway.forward(call, caller.key(), clock).await
    }
}

/// How a chat reply goes out in one API's shape; one of the two is called.
trait Render {
    fn whole(self, body: Bytes) -> Result<Bytes, ProxyError>;
    fn stream(self, body: StreamBody) -> Body;
}

/// OpenAI's own endpoints, and Responses passed through: as the upstream
/// answered.
struct AsOpenAi;

impl Render for AsOpenAi {
    fn whole(self, body: Bytes) -> Result<Bytes, ProxyError> {
        Ok(body)
    }

    fn stream(self, body: StreamBody) -> Body {
        Body::new(body)
    }
}

/// `/v1/messages`, for the model the client named.
struct AsMessages(String);

impl Render for AsMessages {
    fn whole(self, body: Bytes) -> Result<Bytes, ProxyError> {
        messages_api::whole(&body, &self.0)
    }

    fn stream(self, body: StreamBody) -> Body {
        Body::new(Translated::new(body, messages_api::Events::new(self.0)))
    }
}

/// `/v1/responses`.
struct AsResponses(responses_api::Context);

impl Render for AsResponses {
    fn whole(self, body: Bytes) -> Result<Bytes, ProxyError> {
        responses_api::whole(&body, self.0)
    }

    fn stream(self, body: StreamBody) -> Body {
        Body::new(Translated::new(body, responses_api::Events::new(self.0)))
    }
}

/// The HTTP answer to a reply, marked when it came from the cache.
fn answer(reply: Reply, render: impl Render) -> Result<Response, ProxyError> {
    let cached = reply.cached();
    let mut response = match reply {
        Reply::Whole { body, .. } => (
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            render.whole(body)?,
        )
            .into_response(),
        Reply::Stream(body) => (
            StatusCode::OK,
            [
                (CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            render.stream(body),
        )
            .into_response(),
    };
    if cached {
        response
            .headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    }
    Ok(response)
}

/// Reads a request body of at most `limit` bytes; a larger one is 413.
async fn read_body(body: Body, limit: usize, headers: &HeaderMap) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(error) => Err(ProxyError::InvalidRequest(format!(
            "reading the request body: {error}"
        ))),
    }
}
