//! berth orchestrator: hosts, campaigns and scheduling, with all state in
//! one store so that a restart resumes every campaign where it was; and
//! deployments, kept running by a reconciler per deployment.

pub mod backend_watch;
pub mod config;
pub mod cycles;
pub mod deployment;
pub mod error;
pub mod events;
pub mod gpu_leases;
pub mod hosts;
pub mod manifest;
pub mod metrics;
pub mod placement;
pub mod power;
pub mod protocol;
pub mod quality;
pub mod report;
pub mod results;
pub mod scheduler;
pub mod service;
pub mod ssh_tunnel;
pub mod stats;
pub mod store;
pub mod warmup;

use std::sync::Arc;

use berth_proto::orchestrator::v1::orchestrator_server::OrchestratorServer;
use berth_server::auth::RequireBearer;
use berth_server::{RunningService, ServiceHost};
use tonic::service::interceptor::InterceptedService;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Serve(#[from] berth_server::ServeError),
    #[error("store.path: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    State(#[from] error::OrchestratorError),
}

/// Opens the store, resumes unfinished campaigns and serves in the background.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    let store: Arc<dyn store::Store> =
        Arc::new(store::sqlite::SqliteStore::open(&config.store.path)?);
    let hosts = Arc::new(hosts::HostRegistry::load(
        Arc::clone(&store),
        config.scheduler.connect_timeout,
        config.ssh.clone(),
    )?);
    metrics::register(host.registry_mut(), Arc::clone(&store), Arc::clone(&hosts));
    let events = Arc::new(events::CampaignEvents::default());
    let shutdown = host.shutdown_token();
    hosts.spawn_heartbeats(config.scheduler.heartbeat_interval, shutdown.clone());
    let deployments = deployment::Deployments::new(
        Arc::clone(&store),
        Arc::clone(&hosts),
        config.deployments.clone(),
        config.manifest.clone(),
        shutdown.clone(),
    );
    deployments.resume()?;
    let scheduler = scheduler::Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&hosts),
        Arc::clone(&events),
        config.scheduler.clone(),
        config.manifest.clone(),
        Arc::clone(&deployments),
        shutdown.clone(),
    );
    service::store_missing_results_layouts(store.as_ref(), &config.manifest)?;
    scheduler.resume_unfinished()?;
    // One budget for SubmitCampaign, Deploy and report pages: the bound on
    // costly work at once holds across them.
    let budget = berth_server::budget::RequestBudget::from_config(&config.server);
    let report_pages = Arc::new(report::ReportPages {
        store: Arc::clone(&store),
        scheduler: Arc::clone(&scheduler),
        hosts: Arc::clone(&hosts),
        auth: RequireBearer::new(&config.auth.token),
        budget: budget.clone(),
    });
    let service = service::OrchestratorService {
        deployments,
        store,
        hosts,
        events,
        scheduler,
        shutdown,
        manifest_limits: config.manifest.clone(),
        budget,
    };
    host.add_service(InterceptedService::new(
        OrchestratorServer::new(service)
            .max_decoding_message_size(max_request_bytes(&config.manifest)),
        RequireBearer::new(&config.auth.token),
    ));
    Ok(host.spawn(Some(report::router(report_pages))))
}

/// The largest request the gRPC layer reads: the largest manifest or
/// recipe (`manifest.max_bytes`) and room for the request's other fields,
/// so that a document a little over the limit gets the error naming
/// `manifest.max_bytes`, and anything larger is refused by the transport
/// (`OUT_OF_RANGE`) before prost builds it: a request is decoded whole
/// before it is checked, and decoding 4 MiB of empty map entries (a
/// RegisterHost's labels) takes about a second of a core in a debug build.
fn max_request_bytes(limits: &manifest::ManifestLimits) -> usize {
    /// Room for the request's fields besides the manifest.
    const REQUEST_OVERHEAD: usize = 64 * 1024;
    limits.max_bytes.saturating_add(REQUEST_OVERHEAD)
}
