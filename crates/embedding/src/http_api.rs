//! The HTTP face, served beside `/metrics`:
//! - `POST /embed` and `GET /health` with the JSON of the FastAPI +
//!   sentence-transformers service berth replaces (seed 000), so its clients
//!   keep working: the body is a JSON list of texts, the answer
//!   `{"embeddings": [[...], ...]}` (L2-normalised, as all-MiniLM-L6-v2's
//!   sentence-transformers pipeline returns them). `{"texts": [...], "model": "..."}`
//!   is accepted too. Errors are FastAPI-shaped: `{"detail": "..."}`.
//! - `POST /v1/embeddings`: OpenAI's embeddings API (float or base64 vectors,
//!   usage tokens); errors as OpenAI's `{"error": {...}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use berth_server::ServiceError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::EmbeddingError;
use crate::service::Embedder;

/// The routes, with request bodies limited to `max_body_bytes`.
pub fn router(embedder: Arc<Embedder>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/embed", post(embed))
        .route("/health", get(health))
        .route("/v1/embeddings", post(openai_embeddings))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        // Each request in a span of its own, the caller's child when it
        // sends `traceparent`.
        .layer(axum::middleware::from_fn(
            berth_server::trace_context::traced_http,
        ))
        .with_state(embedder)
}

/// `POST /embed` as an object, beside the seed's bare list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedObject {
    texts: Vec<String>,
    #[serde(default)]
    model: String,
}

async fn embed(State(embedder): State<Arc<Embedder>>, body: Bytes) -> Response {
    let result = async {
        let invalid =
            |e: serde_json::Error| EmbeddingError::BadRequest(format!("invalid body: {e}"));
        let (texts, model) = match parse_json::<Value>(&body)? {
            list @ Value::Array(_) => (
                serde_json::from_value(list).map_err(invalid)?,
                String::new(),
            ),
            object @ Value::Object(_) => {
                let EmbedObject { texts, model } =
                    serde_json::from_value(object).map_err(invalid)?;
                (texts, model)
            }
            _ => {
                return Err(EmbeddingError::BadRequest(
                    "the body must be a JSON list of texts, or {\"texts\": [...]}".into(),
                ));
            }
        };
        embedder.embed(&model, texts, true).await
    };
    match result.await {
        Ok(embedded) => Json(SeedEmbeddings {
            embeddings: embedded.vectors,
        })
        .into_response(),
        Err(error) => fastapi_error(&error),
    }
}

async fn health(State(embedder): State<Arc<Embedder>>) -> Response {
    let model = embedder.default_model();
    match embedder.unavailable() {
        None => Json(json!({ "status": "healthy", "model": model })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "model": model, "detail": reason })),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct OpenAiRequest {
    input: Value,
    #[serde(default)]
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    // Accepted and ignored, as OpenAI's API has it.
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

async fn openai_embeddings(State(embedder): State<Arc<Embedder>>, body: Bytes) -> Response {
    let result = async {
        let request = parse_json::<OpenAiRequest>(&body)?;
        let base64 = match request.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(EmbeddingError::BadRequest(format!(
                    "encoding_format `{other}` is not supported: use `float` or `base64`"
                )));
            }
        };
        let texts = match request.input {
            Value::String(text) => vec![text],
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            _ => {
                return Err(EmbeddingError::BadRequest(
                    "input must be a string or a list of strings (token arrays are not supported)"
                        .into(),
                ));
            }
        };
        let embedded = embedder.embed(&request.model, texts, true).await?;
        if let Some(asked) = request.dimensions.filter(|&d| d != embedded.dimension) {
            return Err(EmbeddingError::BadRequest(format!(
                "dimensions = {asked}: model `{}` gives {} dimensions and cannot shorten them",
                embedded.model, embedded.dimension
            )));
        }
        let data = embedded
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| OpenAiEmbedding {
                object: "embedding",
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    OpenAiVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    OpenAiVector::Float(vector)
                },
            })
            .collect();
        Ok(OpenAiResponse {
            object: "list",
            data,
            model: embedded.model,
            usage: OpenAiUsage {
                prompt_tokens: embedded.tokens,
                total_tokens: embedded.tokens,
            },
        })
    };
    match result.await {
        Ok(body) => Json(body).into_response(),
        Err(error) => {
            let status = error.error_code().http_status();
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                404 => "model_not_found",
                429 => "rate_limit_exceeded",
                503 => "service_unavailable",
                _ => "server_error",
            };
            let body = json!({ "error": {
                "message": error.to_string(), "type": kind, "param": null, "code": kind,
            }});
            (status, Json(body)).into_response()
        }
    }
}

// Typed answers rather than `json!`: a `Value` holds numbers as f64, which
// would print every f32 with 17 digits.
#[derive(Serialize)]
struct SeedEmbeddings {
    embeddings: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct OpenAiResponse {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: String,
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    index: usize,
    embedding: OpenAiVector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OpenAiVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// Parses a JSON body, telling invalid UTF-8 apart from invalid JSON.
/// Most memory a body's JSON may take parsed, estimated before parsing:
/// twice the default body limit (limits.max_http_body_bytes), which texts
/// fill at about their size, while small objects take ~100 times theirs.
const MAX_PARSED_JSON_BYTES: usize = 32 << 20;

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, EmbeddingError> {
    let estimate = berth_server::json_budget::parsed_size(body);
    if estimate > MAX_PARSED_JSON_BYTES {
        return Err(EmbeddingError::BadRequest(format!(
            "the request's JSON would take about {estimate} bytes of memory parsed; at most {MAX_PARSED_JSON_BYTES}"
        )));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        EmbeddingError::BadRequest(format!("the request body is not valid UTF-8: {e}"))
    })?;
    serde_json::from_str(text)
        .map_err(|e| EmbeddingError::BadRequest(format!("invalid JSON body: {e}")))
}

fn fastapi_error(error: &EmbeddingError) -> Response {
    (
        error.error_code().http_status(),
        Json(json!({ "detail": error.to_string() })),
    )
        .into_response()
}
