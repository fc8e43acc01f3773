//! berth power sampler: energy per run from NVML, RAPL or a replayed trace.
//!
//! Not built yet (issue #5): every RPC answers UNIMPLEMENTED.

use berth_proto::power::v1::power_sampler_server::{PowerSampler, PowerSamplerServer};
use berth_proto::power::v1::*;
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
            server: ServerConfig::with_defaults("127.0.0.1:7702", "127.0.0.1:9702"),
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
    host.add_service(PowerSamplerServer::new(PowerSamplerService));
    Ok(host.spawn(None))
}

const NOT_YET: &str = "the NVML/RAPL/replay sources arrive with issue #5";

#[derive(Debug)]
pub struct PowerSamplerService;

#[tonic::async_trait]
impl PowerSampler for PowerSamplerService {
    async fn list_devices(
        &self,
        _: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        Err(unimplemented("ListDevices", NOT_YET))
    }
    async fn start_session(
        &self,
        _: Request<StartSessionRequest>,
    ) -> Result<Response<Session>, Status> {
        Err(unimplemented("StartSession", NOT_YET))
    }
    async fn stop_session(
        &self,
        _: Request<StopSessionRequest>,
    ) -> Result<Response<SessionSummary>, Status> {
        Err(unimplemented("StopSession", NOT_YET))
    }
    type StreamSamplesStream = GrpcStream<Sample>;
    async fn stream_samples(
        &self,
        _: Request<StreamSamplesRequest>,
    ) -> Result<Response<Self::StreamSamplesStream>, Status> {
        Err(unimplemented("StreamSamples", NOT_YET))
    }
    async fn get_series(
        &self,
        _: Request<GetSeriesRequest>,
    ) -> Result<Response<GetSeriesResponse>, Status> {
        Err(unimplemented("GetSeries", NOT_YET))
    }
    type ExportSeriesStream = GrpcStream<ExportChunk>;
    async fn export_series(
        &self,
        _: Request<ExportSeriesRequest>,
    ) -> Result<Response<Self::ExportSeriesStream>, Status> {
        Err(unimplemented("ExportSeries", NOT_YET))
    }
}
