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
pub mod provenance;
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
    #[error("{}", store_error_named(.0))]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    State(#[from] error::OrchestratorError),
}

/// Opens the store, resumes unfinished campaigns and serves in the background.
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    let OpenedStore {
        store,
        leader_lease: leader,
    } = open_store(&config.store)?;
    if let Some(leader) = &leader {
        // A follower listens only once it leads: until then callers go to
        // the leader.
        leader
            .wait_to_lead(&leader_name(&config), config.store.leader_lease)
            .await;
    }
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    let hosts = Arc::new(hosts::HostRegistry::load(
        Arc::clone(&store),
        config.scheduler.connect_timeout,
        config.ssh.clone(),
    )?);
    metrics::register(host.registry_mut(), Arc::clone(&store), Arc::clone(&hosts));
    let events = Arc::new(events::CampaignEvents::default());
    let shutdown = host.shutdown_token();
    if let Some(leader) = leader {
        leader.keep_leading(config.store.leader_lease, shutdown.clone());
    }
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

/// The store the orchestrator keeps its state in.
pub struct OpenedStore {
    pub store: Arc<dyn store::Store>,
    /// The PostgreSQL store again, for its leader lease; None on SQLite.
    pub leader_lease: Option<Arc<store::postgres::PostgresStore>>,
}

/// The PostgreSQL store when `store.url` is set, else the SQLite file at
/// `store.path`.
pub fn open_store(config: &config::StoreConfig) -> Result<OpenedStore, store::StoreError> {
    if config.url.is_empty() {
        return Ok(OpenedStore {
            store: Arc::new(store::sqlite::SqliteStore::open(&config.path)?),
            leader_lease: None,
        });
    }
    let postgres = Arc::new(store::postgres::PostgresStore::open(
        &config.url,
        config.max_connections,
    )?);
    Ok(OpenedStore {
        store: Arc::clone(&postgres) as Arc<dyn store::Store>,
        leader_lease: Some(postgres),
    })
}

/// How this orchestrator is named in the leader lease: its listen address
/// and its process, so that a restarted one is not taken for the old.
fn leader_name(config: &Config) -> String {
    format!(
        "{} (pid {}, {})",
        config.server.listen,
        std::process::id(),
        uuid::Uuid::new_v4()
    )
}

/// A store error at start, naming the setting of the store (the
/// PostgreSQL store's errors name `store.url` themselves).
fn store_error_named(error: &store::StoreError) -> String {
    if error.names_its_setting() {
        error.to_string()
    } else {
        format!("store.path: {error}")
    }
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
