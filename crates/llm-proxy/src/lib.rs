//! berth LLM proxy: an OpenAI-compatible gateway configured like LiteLLM.
//!
//! Not built yet (issue #7): every RPC answers UNIMPLEMENTED.

use berth_proto::llmproxy::v1::llm_proxy_server::{LlmProxy, LlmProxyServer};
use berth_proto::llmproxy::v1::*;
use berth_server::cli::HasServerConfig;
use berth_server::error::unimplemented;
use berth_server::{GrpcStream, RunningService, ServeError, ServerConfig, ServiceHost};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults("127.0.0.1:7704", "127.0.0.1:4000"),
        }
    }
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}

pub async fn start(config: Config) -> Result<RunningService, ServeError> {
    let mut host = ServiceHost::bind(config.server).await?;
    host.add_service(LlmProxyServer::new(LlmProxyService));
    Ok(host.spawn(None))
}

const NOT_YET: &str = "routing to upstreams arrives with issue #7";

#[derive(Debug)]
pub struct LlmProxyService;

#[tonic::async_trait]
impl LlmProxy for LlmProxyService {
    async fn chat_completion(
        &self,
        _: Request<ChatCompletionRequest>,
    ) -> Result<Response<ChatCompletionResponse>, Status> {
        Err(unimplemented("ChatCompletion", NOT_YET))
    }
    type ChatCompletionStreamStream = GrpcStream<ChatCompletionChunk>;
    async fn chat_completion_stream(
        &self,
        _: Request<ChatCompletionRequest>,
    ) -> Result<Response<Self::ChatCompletionStreamStream>, Status> {
        Err(unimplemented("ChatCompletionStream", NOT_YET))
    }
    async fn completion(
        &self,
        _: Request<CompletionRequest>,
    ) -> Result<Response<CompletionResponse>, Status> {
        Err(unimplemented("Completion", NOT_YET))
    }
    async fn embeddings(
        &self,
        _: Request<EmbeddingsRequest>,
    ) -> Result<Response<EmbeddingsResponse>, Status> {
        Err(unimplemented("Embeddings", NOT_YET))
    }
    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(unimplemented("ListModels", NOT_YET))
    }
    async fn create_key(
        &self,
        _: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        Err(unimplemented("CreateKey", NOT_YET))
    }
    async fn list_keys(
        &self,
        _: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        Err(unimplemented("ListKeys", NOT_YET))
    }
    async fn delete_key(
        &self,
        _: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        Err(unimplemented("DeleteKey", NOT_YET))
    }
}
