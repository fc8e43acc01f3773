//! berth embedding service: sentence embeddings over gRPC and HTTP.
//!
//! Not built yet (issue #6): every RPC answers UNIMPLEMENTED.

use berth_proto::embedding::v1::embedding_server::{Embedding, EmbeddingServer};
use berth_proto::embedding::v1::*;
use berth_server::cli::HasServerConfig;
use berth_server::error::unimplemented;
use berth_server::{GrpcStream, RunningService, ServeError, ServerConfig, ServiceHost};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_defaults("127.0.0.1:7703", "127.0.0.1:8891"),
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
    host.add_service(EmbeddingServer::new(EmbeddingService));
    Ok(host.spawn(None))
}

const NOT_YET: &str = "the fastembed models arrive with issue #6";

#[derive(Debug)]
pub struct EmbeddingService;

#[tonic::async_trait]
impl Embedding for EmbeddingService {
    async fn embed(&self, _: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        Err(unimplemented("Embed", NOT_YET))
    }
    type EmbedStreamStream = GrpcStream<EmbedResponse>;
    async fn embed_stream(
        &self,
        _: Request<Streaming<EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        Err(unimplemented("EmbedStream", NOT_YET))
    }
    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(unimplemented("ListModels", NOT_YET))
    }
}
