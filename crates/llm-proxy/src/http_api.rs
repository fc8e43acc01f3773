//! The OpenAI-compatible HTTP API, with LiteLLM's paths: each operation is
//! served with and without the `/v1` prefix (clients of a LiteLLM proxy use
//! both), and virtual keys are managed at LiteLLM's `/key/*` paths.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_server::budget::{self, RequestBudget};
use berth_server::json_budget;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Caller};
use crate::error::ProxyError;
use crate::gateway::{Call, Gateway, Reply};
use crate::keys::{KeySpec, VirtualKey};
use crate::providers::Endpoint;

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
}

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
        .with_state(api)
}

async fn chat_completions(State(api): Shared, headers: HeaderMap, body: Body) -> Response {
    api.openai(Endpoint::ChatCompletions, &headers, body)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn completions(State(api): Shared, headers: HeaderMap, body: Body) -> Response {
    api.openai(Endpoint::Completions, &headers, body)
        .await
        .unwrap_or_else(ProxyError::into_http)
}

async fn embeddings(State(api): Shared, headers: HeaderMap, body: Body) -> Response {
    api.openai(Endpoint::Embeddings, &headers, body)
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
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        self.auth
            .caller(headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()))
    }

    async fn openai(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, ProxyError> {
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
        let call = if bytes.len() < COSTLY_BODY_BYTES {
            Call::parse(endpoint, &bytes)?
        } else {
            self.budget
                .run(move || {
                    let call = Call::parse(endpoint, &bytes)?;
                    // One JSON parse is not cut short: bounded by the body
                    // and JSON limits, it is measured once it ends.
                    budget::check()?;
                    Ok::<_, ProxyError>(call)
                })
                .await?
        };
        match self.gateway.forward(call, caller.key()).await? {
            Reply::Whole { body, .. } => Ok((
                [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                body,
            )
                .into_response()),
            Reply::Stream(stream) => Ok((
                StatusCode::OK,
                [
                    (CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
                    (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                ],
                Body::new(stream),
            )
                .into_response()),
        }
    }
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
