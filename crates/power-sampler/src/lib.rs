//! berth power sampler: energy per run from NVML (GPUs), RAPL (CPU package
//! and DRAM) or a replayed trace, one per host.
//!
//! Each source is read on its own thread ([`sampler`]) while a session needs
//! it; sessions ([`session`], [`recorder`]) keep exact running figures
//! ([`energy`]) and a bounded series that can be paged or exported
//! ([`series`], [`export`]); [`service`] answers gRPC.

pub mod clock;
pub mod config;
pub mod devices;
pub mod energy;
pub mod error;
pub mod export;
/// Test support (the `test-support` feature): a fake powercap tree.
#[cfg(any(test, feature = "test-support"))]
pub mod fake_powercap;
pub mod metrics;
pub mod reading;
pub mod recorder;
pub mod sampler;
pub mod series;
pub mod service;
pub mod session;
pub mod source;

use berth_proto::power::v1::power_sampler_server::PowerSamplerServer;
use berth_server::{RunningService, ServiceHost};

pub use config::{Config, SamplerConfig};
pub use error::{PowerError, StartError};

use crate::metrics::PowerMetrics;
use crate::service::PowerSamplerService;

/// Opens the sources, binds the listeners and serves in the background. A
/// host without a GPU or RAPL still starts and says what it lacks; a bad
/// config or an unreadable replay trace does not.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    let max_message_bytes = config.server.max_message_bytes;
    let mut host = ServiceHost::bind(config.server).await?;
    let metrics = PowerMetrics::register(host.registry_mut());
    let service = PowerSamplerService::new(config.sampler, metrics, host.shutdown_token())?;
    host.add_service(PowerSamplerServer::new(service).max_decoding_message_size(max_message_bytes));
    Ok(host.spawn(None))
}
