//! The core both APIs share: admit a request for a key, pick a deployment,
//! send, retry with backoff on another deployment when the failure is the
//! upstream's, fall back to other model groups, and settle the request's
//! usage once it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::cache::{Cached, Policy, ResponseCache};
use crate::error::ProxyError;
use crate::gen_ai::OperationSpan;
use crate::keys::VirtualKey;
use crate::litellm_config::DeploymentConfig;
use crate::metrics::ProxyMetrics;
use crate::providers::{self, Dialect, Endpoint};
use crate::router::{Deployment, InFlight, Router};
use crate::stream::{PassThrough, Recorder, StreamBody};
use crate::upstream::UpstreamClient;
use crate::usage::{Meter, Outcome, Usage};

/// One client request, parsed just enough to route it.
#[derive(Debug)]
pub struct Call {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// The client's JSON body, forwarded with the model name replaced.
    pub body: Map<String, Value>,
    /// What the response cache may do for this call.
    pub cache: Policy,
}

impl Call {
    /// Parses a client's JSON body.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Self, ProxyError> {
        let body =
            serde_json::from_slice(bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
        Self::from_body(endpoint, body)
    }

    /// Reads `model` and `stream` from a request body, and takes out its
    /// `cache` settings.
    pub fn from_body(endpoint: Endpoint, mut body: Map<String, Value>) -> Result<Self, ProxyError> {
        let cache = Policy::take(&mut body)?;
        let model = match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => {
                return Err(ProxyError::InvalidRequest(
                    "`model` is required and must be a string".into(),
                ));
            }
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => {
                return Err(ProxyError::InvalidRequest(
                    "`stream` must be a boolean".into(),
                ));
            }
        };
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ProxyError::InvalidRequest(
                "embeddings cannot be streamed".into(),
            ));
        }
        Ok(Self {
            endpoint,
            model,
            stream,
            body,
            cache,
        })
    }
}

/// Time a request spent waiting on upstreams, added up over its attempts,
/// so that the edge can tell the proxy's own time from the upstream's.
#[derive(Debug, Default)]
pub struct UpstreamClock(AtomicU64);

impl UpstreamClock {
    fn add(&self, waited: Duration) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The answer to a call.
#[derive(Debug)]
pub enum Reply {
    /// A whole JSON response, as the upstream sent it (`cached`: or as the
    /// cache kept it).
    Whole {
        body: Bytes,
        usage: Option<Usage>,
        cached: bool,
    },
    /// An SSE stream, passed through as it arrives, or the cache's recording.
    Stream(StreamBody),
}

impl Reply {
    /// Whether the answer came from the response cache.
    pub fn cached(&self) -> bool {
        matches!(
            self,
            Self::Whole { cached: true, .. } | Self::Stream(StreamBody::Cached(_))
        )
    }
}

/// Largest non-streamed upstream response read; embeddings of big batches
/// are the largest legitimate ones.
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// Largest upstream error body kept to pass on.
const MAX_ERROR_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub struct Gateway {
    router: Arc<Router>,
    client: UpstreamClient,
    drop_params: bool,
    metrics: Arc<ProxyMetrics>,
    cache: Option<Arc<ResponseCache>>,
}

/// What a request still owes once its response is on its way: the
/// deployment's in-flight count and token window, and the usage record.
#[derive(Debug)]
pub(crate) struct Settle {
    in_flight: InFlight,
    meter: Meter,
    router: Arc<Router>,
}

impl Settle {
    pub(crate) fn deployment_id(&self) -> &str {
        &self.in_flight.deployment().config.id
    }

    /// The request's GenAI span.
    pub(crate) fn span(&self) -> &OperationSpan {
        self.meter.span()
    }

    pub(crate) fn finish(self, usage: Option<Usage>, outcome: Outcome) {
        self.settle(usage, outcome, None);
    }

    /// Ends a stream that broke with `error`.
    pub(crate) fn fail(self, usage: Option<Usage>, error: &ProxyError) {
        self.settle(usage, Outcome::Failed, Some(error));
    }

    /// A streamed answer's first chunk arrived.
    pub(crate) fn first_chunk(&mut self) {
        self.meter.first_chunk();
    }

    fn settle(mut self, usage: Option<Usage>, outcome: Outcome, error: Option<&ProxyError>) {
        let cost = usage
            .as_ref()
            .map(|usage| usage.cost(&self.in_flight.deployment().config));
        self.in_flight.charge(cost);
        let deployment = self.in_flight.deployment();
        if let Some(usage) = &usage {
            deployment.record_tokens(usage.total());
        }
        if outcome == Outcome::Failed {
            self.meter.attempt_failed(&deployment.config);
            deployment.record_failure(self.router.settings());
        }
        match error {
            Some(error) => self.meter.fail(Some(&deployment.config), usage, error),
            None => self.meter.finish(Some(&deployment.config), usage, outcome),
        }
    }
}

/// A successful attempt, before it is settled.
enum Answer {
    /// Already in OpenAI's shape.
    Whole(Bytes),
    Stream(Incoming, Duration, Dialect),
}

impl Gateway {
    pub fn new(
        router: Router,
        client: UpstreamClient,
        drop_params: bool,
        metrics: Arc<ProxyMetrics>,
        cache: Option<Arc<ResponseCache>>,
    ) -> Self {
        Self {
            router: Arc::new(router),
            client,
            drop_params,
            metrics,
            cache,
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Warns, naming the key and the models, when the key has a budget that
    /// some model it may use never spends from: requests to a model with no
    /// `input_cost_per_token`/`output_cost_per_token` cost nothing.
    pub fn warn_of_unpriced_models(&self, key: &VirtualKey) {
        if !key.spec.max_budget.is_some_and(|budget| budget > 0.0) {
            return;
        }
        let unpriced: Vec<&str> = self
            .router
            .unpriced_models()
            .filter(|model| key.allows(model))
            .collect();
        if !unpriced.is_empty() {
            tracing::warn!(
                key = %key.id,
                alias = %key.spec.key_alias,
                models = %unpriced.join(", "),
                "virtual key has a max_budget, but these models have no input_cost_per_token/output_cost_per_token: their requests spend nothing from it"
            );
        }
    }

    /// Serves a call for `key` (None: the master key, or no auth configured).
    /// The time spent waiting on upstreams is added to `clock`.
    pub async fn forward(
        &self,
        call: Call,
        key: Option<&Arc<VirtualKey>>,
        clock: &UpstreamClock,
    ) -> Result<Reply, ProxyError> {
        if !self.router.has_model(&call.model) {
            return Err(ProxyError::UnknownModel(call.model));
        }
        let lease = key.map(|k| k.admit(&call.model)).transpose()?;
        let mut meter = Meter::new(
            self.metrics.clone(),
            call.endpoint,
            call.model.clone(),
            lease,
        );
        // Looked up after the key's checks: a hit still counts against its
        // request limits, and spends nothing.
        let cache = self
            .cache
            .as_ref()
            .map(|cache| (cache, ResponseCache::key(call.endpoint, &call.body)));
        if let Some(hit) = cache
            .filter(|_| !call.cache.no_cache)
            .and_then(|(cache, key)| cache.get(&key))
        {
            meter.finish(None, None, Outcome::CacheHit);
            return Ok(if call.stream {
                Reply::Stream(StreamBody::Cached(Some(hit.body)))
            } else {
                Reply::Whole {
                    body: hit.body,
                    usage: hit.usage,
                    cached: true,
                }
            });
        }
        let store = cache.filter(|_| !call.cache.no_store);
        let settings = self.router.settings();
        let mut last_error = None;
        // The prompt's size, measured once for the budget's worst case.
        let mut prompt_bytes = None;
        // Tries sent upstream, fallbacks included: each one's span says which.
        let mut tries = 0;
        for group in self.router.groups_for(&call.model) {
            // A passed-through Responses request can only go where the
            // Responses API is served: a fallback that lacks it is passed over.
            if call.endpoint == Endpoint::Responses && !self.router.serves_responses(group) {
                tracing::debug!(%group, "fallback not tried: it does not serve the Responses API");
                continue;
            }
            let mut tried: Vec<Arc<Deployment>> = Vec::new();
            // A retry after an upstream's failure backs off; one after a
            // deployment the budget cannot afford goes on at once.
            let mut backoff = false;
            for attempt in 0..=settings.num_retries {
                if backoff {
                    tokio::time::sleep(settings.backoff(attempt)).await;
                }
                let deployment = match self.router.pick(group, &tried) {
                    Ok(deployment) => deployment,
                    Err(error) => {
                        last_error = Some(error);
                        break;
                    }
                };
                tried.push(deployment.clone());
                // Measured at most once, and only for a budget.
                let mut worst_seen = None;
                let mut worst = || {
                    *worst_seen.get_or_insert_with(|| {
                        worst_cost(&call, &deployment.config, &mut prompt_bytes)
                    })
                };
                if let Err(error) = meter.reserve(&deployment.config, &mut worst) {
                    tracing::debug!(deployment = %deployment.config.id, %error, "not sent: the key's budget");
                    last_error = Some(error);
                    backoff = false;
                    continue;
                }
                let in_flight = match deployment.start(&mut worst) {
                    Ok(in_flight) => in_flight,
                    Err(error) => {
                        tracing::debug!(deployment = %deployment.config.id, %error, "not sent: the deployment's budget");
                        last_error = Some(error);
                        backoff = false;
                        continue;
                    }
                };
                backoff = true;
                meter.attempting(&deployment.config);
                tries += 1;
                match self
                    .attempt(&deployment, &call, meter.span(), tries, clock)
                    .await
                {
                    Ok(answer) => {
                        let settle = Settle {
                            in_flight,
                            meter,
                            router: self.router.clone(),
                        };
                        return Ok(match answer {
                            Answer::Whole(body) => {
                                let usage = settle.meter.span().whole_answer(&body);
                                settle.finish(usage, Outcome::Ok);
                                if let Some((cache, key)) = store {
                                    let cached = Cached {
                                        body: body.clone(),
                                        usage,
                                    };
                                    cache.insert(key, cached);
                                }
                                Reply::Whole {
                                    body,
                                    usage,
                                    cached: false,
                                }
                            }
                            Answer::Stream(body, idle, dialect) => {
                                let recorder = store.map(|(cache, key)| {
                                    Recorder::new(cache.clone(), key, call.endpoint)
                                });
                                let relay = dialect.relay();
                                let live = PassThrough::new(body, idle, relay, settle, recorder);
                                Reply::Stream(StreamBody::Live(live))
                            }
                        });
                    }
                    Err(error) if is_retryable(&error) => {
                        tracing::debug!(deployment = %deployment.config.id, %error, attempt, "attempt failed");
                        meter.attempt_failed(&deployment.config);
                        deployment.record_failure(settings);
                        last_error = Some(error);
                    }
                    Err(error) => {
                        meter.fail(Some(&deployment.config), None, &error);
                        return Err(error);
                    }
                }
            }
        }
        let error = last_error.unwrap_or(ProxyError::UnknownModel(call.model));
        meter.fail(None, None, &error);
        Err(error)
    }

    /// One try on one deployment, bounded by its timeout: for a stream, up
    /// to the response headers, then between chunks.
    async fn attempt(
        &self,
        deployment: &Deployment,
        call: &Call,
        span: &OperationSpan,
        number: u32,
        clock: &UpstreamClock,
    ) -> Result<Answer, ProxyError> {
        let config = &deployment.config;
        let mut request = providers::prepare(config, call.endpoint, &call.body, self.drop_params)?;
        let attempt = span.attempt(number, &deployment.spans, &mut request);
        let dialect = request.dialect;
        let timeout = if call.stream {
            config.stream_timeout.or(config.timeout)
        } else {
            config.timeout
        }
        .unwrap_or(self.router.settings().timeout);
        let started = Instant::now();
        let work = async {
            let response =
                self.client
                    .send(request)
                    .await
                    .map_err(|reason| ProxyError::Unreachable {
                        deployment: config.id.clone(),
                        reason,
                    })?;
            deployment.record_latency(started.elapsed());
            let status = response.status();
            if !status.is_success() {
                let body = read(response.into_body(), MAX_ERROR_BYTES)
                    .await
                    .unwrap_or_default();
                return Err(ProxyError::Upstream {
                    deployment: config.id.clone(),
                    status,
                    message: error_message(&body),
                    body,
                });
            }
            if call.stream {
                return Ok(Answer::Stream(response.into_body(), timeout, dialect));
            }
            let body = read(response.into_body(), MAX_RESPONSE_BYTES)
                .await
                .map_err(|reason| ProxyError::Unreachable {
                    deployment: config.id.clone(),
                    reason,
                })?;
            dialect
                .whole(body)
                .map(Answer::Whole)
                .map_err(|reason| ProxyError::BadAnswer {
                    deployment: config.id.clone(),
                    reason,
                })
        };
        let answer = tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::Timeout {
                    deployment: config.id.clone(),
                    timeout,
                })
            });
        // Up to the headers for a stream, the whole body otherwise (with an
        // Anthropic answer's translation, which is not worth timing apart).
        clock.add(started.elapsed());
        if let Err(error) = &answer {
            attempt.failed(error);
        }
        answer
    }
}

/// The most `call` can cost on `deployment`: each byte of its body a prompt
/// token (tokenizers take at least a byte a token; an image given by URL is
/// the exception, counted by its URL's bytes) and `max_tokens` (or
/// `max_completion_tokens`, or the Responses API's `max_output_tokens`) tokens of answer at the deployment's prices.
/// None, unbounded, when the answer has a price and no limit.
fn worst_cost(
    call: &Call,
    deployment: &DeploymentConfig,
    prompt_bytes: &mut Option<usize>,
) -> Option<f64> {
    let input = deployment.input_cost_per_token;
    let output = deployment.output_cost_per_token;
    let prompt = if input > 0.0 {
        *prompt_bytes.get_or_insert_with(|| {
            serde_json::to_vec(&call.body).map_or(usize::MAX, |body| body.len())
        }) as f64
            * input
    } else {
        0.0
    };
    if output <= 0.0 || call.endpoint == Endpoint::Embeddings {
        return Some(prompt);
    }
    let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|field| call.body.get(*field)?.as_u64())
        .min()?;
    Some(prompt + max_tokens as f64 * output)
}

/// Failures another try may not have: the upstream's, not the request's.
fn is_retryable(error: &ProxyError) -> bool {
    match error {
        ProxyError::Unreachable { .. } | ProxyError::Timeout { .. } => true,
        ProxyError::Upstream { status, .. } => {
            status.is_server_error()
                || *status == StatusCode::TOO_MANY_REQUESTS
                || *status == StatusCode::REQUEST_TIMEOUT
        }
        _ => false,
    }
}

async fn read(body: Incoming, limit: usize) -> Result<Bytes, String> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}

/// `error.message` of an OpenAI-style error body, else the body as text.
fn error_message(body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))?
            .as_str()
    });
    match message {
        Some(message) => message.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_parsing_errors() {
        assert!(matches!(
            Call::parse(Endpoint::ChatCompletions, b"{not json"),
            Err(ProxyError::MalformedJson(_))
        ));
        assert!(matches!(
            Call::parse(Endpoint::ChatCompletions, b"{}"),
            Err(ProxyError::InvalidRequest(_))
        ));
        assert!(matches!(
            Call::parse(Endpoint::Embeddings, br#"{"model":"m","stream":true}"#),
            Err(ProxyError::InvalidRequest(_))
        ));
        let call = Call::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"m","stream":true,"messages":[]}"#,
        )
        .unwrap();
        assert!(call.stream);
        assert_eq!(call.model, "m");
    }

    #[test]
    fn upstream_error_messages() {
        assert_eq!(error_message(br#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(error_message(br#"{"error":"plain"}"#), "plain");
        assert_eq!(
            error_message(b"Internal Server Error"),
            "Internal Server Error"
        );
    }
}
