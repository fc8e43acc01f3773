//! The gRPC face: `berth.embedding.v1.Embedding`.

use std::sync::Arc;

use berth_proto::embedding::v1::embedding_server::Embedding;
use berth_proto::embedding::v1::{
    EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, ModelInfo, Vector,
};
use berth_server::{CancellationToken, GrpcStream};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::service::{Embedded, Embedder};

pub struct GrpcApi {
    embedder: Arc<Embedder>,
    stream_window: usize,
    shutdown: CancellationToken,
}

impl GrpcApi {
    pub fn new(embedder: Arc<Embedder>, stream_window: usize, shutdown: CancellationToken) -> Self {
        Self {
            embedder,
            stream_window,
            shutdown,
        }
    }
}

async fn embed(embedder: &Embedder, request: EmbedRequest) -> Result<EmbedResponse, Status> {
    let Embedded {
        model,
        vectors,
        dimension,
        tokens,
    } = embedder
        .embed(&request.model, request.texts, !request.skip_normalize)
        .await?;
    Ok(EmbedResponse {
        model,
        embeddings: vectors
            .into_iter()
            .map(|values| Vector { values })
            .collect(),
        dimension: u32::try_from(dimension).unwrap_or(u32::MAX),
        prompt_tokens: tokens,
    })
}

#[tonic::async_trait]
impl Embedding for GrpcApi {
    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        embed(&self.embedder, request.into_inner())
            .await
            .map(Response::new)
    }

    type EmbedStreamStream = GrpcStream<EmbedResponse>;

    /// Reads at most `stream_window` requests ahead of the responses the
    /// client has taken (`buffered` pulls the next request only when a slot
    /// frees), answers in order, and ends at the first error or on shutdown.
    async fn embed_stream(
        &self,
        request: Request<Streaming<EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let embedder = self.embedder.clone();
        let responses = request
            .into_inner()
            .map(move |message| {
                let embedder = embedder.clone();
                async move { embed(&embedder, message?).await }
            })
            .buffered(self.stream_window)
            .take_until(self.shutdown.clone().cancelled_owned())
            .scan(false, |failed, result| {
                // Stop after the first error: its status ends the call.
                let item = (!*failed).then(|| {
                    *failed = result.is_err();
                    result
                });
                futures::future::ready(item)
            });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .embedder
            .models()
            .into_iter()
            .map(|m| ModelInfo {
                name: m.name,
                dimension: u32::try_from(m.dimension).unwrap_or(u32::MAX),
                max_tokens: u32::try_from(m.max_tokens).unwrap_or(u32::MAX),
                default: m.default,
                available: m.unavailable.is_none(),
                unavailable_reason: m.unavailable.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}
