//! berth LLM proxy: an OpenAI-compatible gateway configured like LiteLLM.
//!
//! It reads a LiteLLM `config.yaml` (model_list, router_settings, master
//! key), serves the OpenAI API over HTTP (SSE streams passed through as they
//! arrive) and the same operations over gRPC, routes each request to one of
//! the deployments of its model with retries, fallbacks and cooldowns, and
//! enforces virtual keys' limits. Anthropic's Messages API
//! (`messages_api`) and OpenAI's Responses API (`responses_api`) are served
//! for every model through the same chat-completions path (`chat`), with an
//! optional response cache (`cache`) in front of the upstreams.

pub mod auth;
pub mod cache;
pub mod chat;
pub mod error;
pub mod fields;
pub mod gateway;
pub mod gen_ai;
pub mod grpc_api;
pub mod http_api;
mod journal;
pub mod keys;
pub mod limits;
pub mod litellm_config;
mod memory;
pub mod messages_api;
pub mod metrics;
pub mod providers;
pub mod responses_api;
pub mod router;
pub mod settings;
pub mod sse;
pub mod stream;
pub mod upstream;
pub mod usage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::llmproxy::v1::llm_proxy_server::LlmProxyServer;
use berth_server::budget::RequestBudget;
use berth_server::cli::HasServerConfig;
use berth_server::{RunningService, ServeError, ServerConfig, ServiceHost};
use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::error::ProxyError;
use crate::gateway::Gateway;
use crate::keys::KeyStore;
use crate::litellm_config::{LiteLlmConfig, LiteLlmConfigError, LiteLlmLimits};
use crate::router::Router;
use crate::upstream::UpstreamClient;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub proxy: ProxyConfig,
}

/// The `[proxy]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// LiteLLM `config.yaml` with the model_list; empty: no models.
    pub litellm_config: String,
    /// JSON file of virtual keys (hashed); empty: keys live in memory only.
    pub keys_path: String,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_request_bytes: usize,
    /// Most memory a request's JSON may take parsed, estimated before it is
    /// parsed (small objects take ~100 times their text); more gets 413.
    pub max_request_json_bytes: usize,
    /// `[proxy.litellm_limits]`: size, nesting and nodes of the LiteLLM config.
    pub litellm_limits: LiteLlmLimits,
    /// Longest wait for a TCP connection to an upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an idle upstream connection is kept for reuse.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// How often spend is written to the key store.
    #[serde(with = "humantime_serde")]
    pub keys_flush_interval: Duration,
    /// Most `/v1/responses` conversations kept for `previous_response_id`
    /// (the oldest goes first); 0 keeps none.
    pub responses_store_max_entries: usize,
    /// Most bytes (as JSON) of those conversations; one takes at most a
    /// 16th of it, a longer one cannot be continued.
    pub responses_store_max_bytes: usize,
    /// How long a stored response can be continued.
    #[serde(with = "humantime_serde")]
    pub responses_store_ttl: Duration,
    /// The response cache (see `cache`); LiteLLM's `litellm_settings.cache:
    /// true` turns it on as well.
    pub cache: bool,
    /// Most bytes of answers the cache keeps (the oldest go first); one
    /// answer takes at most a 16th of it.
    pub cache_max_bytes: usize,
    /// How long a cached answer is served; LiteLLM's `cache_params.ttl`
    /// overrides it.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            litellm_config: String::new(),
            keys_path: String::new(),
            max_request_bytes: 8 << 20,
            max_request_json_bytes: 32 << 20,
            litellm_limits: LiteLlmLimits::default(),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            keys_flush_interval: Duration::from_secs(5),
            responses_store_max_entries: 10_000,
            responses_store_max_bytes: 64 << 20,
            responses_store_ttl: Duration::from_secs(3600),
            cache: false,
            cache_max_bytes: 64 << 20,
            cache_ttl: Duration::from_secs(600),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                // A prompt of 250k tokens fits. prost builds a whole request
                // before it is checked, at up to 36 bytes per byte received
                // (empty messages), so this bounds its memory. The HTTP API
                // takes larger bodies: proxy.max_request_bytes.
                max_message_bytes: 1 << 20,
                http_threads: default_http_threads(),
                ..ServerConfig::with_defaults("127.0.0.1:7704", "127.0.0.1:4000")
            },
            proxy: ProxyConfig::default(),
        }
    }
}

/// Most serving threads by default: at the ~60 µs of CPU a request took on
/// the test machine, a thread's core answers ~16,000 requests/s; on a GPU
/// host the other CPUs are the inference server's, and each thread keeps
/// upstream connections of its own.
const MOST_DEFAULT_HTTP_THREADS: usize = 4;

/// The OpenAI/Anthropic API on a thread per CPU, up to
/// [`MOST_DEFAULT_HTTP_THREADS`]: each request read, sent upstream and
/// answered on one thread took ~15 % less CPU and added less latency than
/// on the shared runtime (docs/benchmarks.md, issue #24).
fn default_http_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MOST_DEFAULT_HTTP_THREADS)
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    LiteLlmConfig(#[from] LiteLlmConfigError),
    #[error("proxy.keys_path: {0}")]
    Keys(#[source] ProxyError),
    #[error("TLS roots for HTTPS upstreams: {0}")]
    Tls(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Loads the LiteLLM config named by `proxy.litellm_config` and serves.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    let litellm = if config.proxy.litellm_config.is_empty() {
        tracing::warn!("proxy.litellm_config is not set: no models to serve");
        LiteLlmConfig::parse("(none)", "{}", &|_| None)?
    } else {
        LiteLlmConfig::load_within(
            config.proxy.litellm_config.as_ref(),
            &config.proxy.litellm_limits,
        )?
    };
    start_with(config, litellm).await
}

/// Serves an already loaded LiteLLM config (tests build theirs in memory).
pub async fn start_with(
    config: Config,
    litellm: LiteLlmConfig,
) -> Result<RunningService, StartError> {
    if !litellm.unsupported.is_empty() {
        tracing::warn!(
            keys = %litellm.unsupported.join(", "),
            "LiteLLM config keys not supported by berth-llm-proxy are ignored"
        );
    }
    for warning in &litellm.warnings {
        tracing::warn!("{warning}");
    }
    let keys_path =
        (!config.proxy.keys_path.is_empty()).then(|| PathBuf::from(&config.proxy.keys_path));
    let keys = Arc::new(KeyStore::open(keys_path).map_err(StartError::Keys)?);
    if litellm.master_key.is_none() {
        tracing::warn!(
            "no general_settings.master_key: the proxy is open to anyone who can reach it, and has no virtual keys"
        );
    }
    let auth = Arc::new(Auth::new(litellm.master_key.as_ref(), keys.clone()));
    let client = UpstreamClient::new(config.proxy.connect_timeout, config.proxy.pool_idle_timeout)
        .map_err(StartError::Tls)?;

    let max_message_bytes = config.server.max_message_bytes;
    let budget = RequestBudget::from_config(&config.server);
    let mut host = ServiceHost::bind(config.server).await?;
    let metrics = Arc::new(metrics::ProxyMetrics::register(host.registry_mut()));
    let router = Router::new(litellm.deployments, litellm.router);
    for (model, deployments) in router.models() {
        tracing::info!(%model, deployments, "serving model");
    }
    let cache = (config.proxy.cache || litellm.cache.is_some()).then(|| {
        let ttl = litellm
            .cache
            .and_then(|c| c.ttl)
            .unwrap_or(config.proxy.cache_ttl);
        tracing::info!(
            max_bytes = config.proxy.cache_max_bytes,
            ?ttl,
            "response cache on"
        );
        Arc::new(cache::ResponseCache::new(config.proxy.cache_max_bytes, ttl))
    });
    let gateway = Arc::new(Gateway::new(
        router,
        client,
        litellm.drop_params,
        metrics,
        cache,
    ));
    for key in keys.list() {
        gateway.warn_of_unpriced_models(&key);
    }
    host.add_service(
        LlmProxyServer::new(grpc_api::LlmProxyService::new(
            gateway.clone(),
            auth.clone(),
        ))
        .max_decoding_message_size(max_message_bytes),
    );
    let http = http_api::router(Arc::new(http_api::HttpApi {
        gateway,
        auth,
        max_body_bytes: config.proxy.max_request_bytes,
        max_json_bytes: config.proxy.max_request_json_bytes,
        budget,
        responses: Arc::new(responses_api::ResponseStore::new(
            config.proxy.responses_store_max_entries,
            config.proxy.responses_store_max_bytes,
            config.proxy.responses_store_ttl,
        )),
    }));
    spawn_key_flusher(
        keys,
        config.proxy.keys_flush_interval,
        host.shutdown_token(),
    );
    memory::spawn_trimmer(host.shutdown_token());
    Ok(host.spawn(Some(http)))
}

/// Writes spend to the key store now and then, and once more at shutdown.
fn spawn_key_flusher(
    keys: Arc<KeyStore>,
    every: Duration,
    shutdown: berth_server::CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = shutdown.cancelled() => true,
            };
            if let Err(error) = keys.flush() {
                tracing::error!(%error, "writing the key store");
            }
            if stopping {
                break;
            }
        }
    });
}
