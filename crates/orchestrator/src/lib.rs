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
pub mod role;
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

/// Opens the store and serves in the background. The leader (the one
/// orchestrator on SQLite, the lease's holder on PostgreSQL) resumes
/// unfinished campaigns at once; a follower serves the read APIs from the
/// store and leads once it takes the lease over (`role`).
pub async fn start(config: Config) -> Result<RunningService, StartError> {
    let OpenedStore {
        store,
        leader_lease,
    } = open_store(&config.store)?;
    let holder = leader_name(&config);
    let leads_now = match &leader_lease {
        Some(lease) => lease
            .try_lead(&holder, config.store.leader_lease)?
            .is_some(),
        None => true,
    };
    let config = Arc::new(config);
    let mut host = ServiceHost::bind(config.server.clone()).await?;
    let shutdown = host.shutdown_token();
    // On the leader these are the parts it runs; on a follower they stay
    // idle, and /metrics and report pages read through them.
    let parts = Arc::new(role::Parts::assemble(&store, &config, &shutdown)?);
    metrics::register(
        host.registry_mut(),
        Arc::clone(&store),
        Arc::clone(&parts.hosts),
    );
    let role = role::Role::new(leader_lease.clone());
    match leader_lease {
        Some(lease) if leads_now => {
            tracing::info!("leading: this orchestrator holds the leader lease");
            lease.keep_leading(config.store.leader_lease, shutdown.clone());
        }
        Some(_) => role.lead_when_elected(
            holder,
            Arc::clone(&parts),
            Arc::clone(&store),
            Arc::clone(&config),
            shutdown.clone(),
        ),
        None => {}
    }
    if leads_now {
        role.lead(Arc::clone(&parts), store.as_ref(), &config, &shutdown)?;
    }
    // One budget for SubmitCampaign, Deploy and report pages: the bound on
    // costly work at once holds across them.
    let budget = berth_server::budget::RequestBudget::from_config(&config.server);
    let report_pages = Arc::new(report::ReportPages {
        store: Arc::clone(&store),
        scheduler: Arc::clone(&parts.scheduler),
        hosts: Arc::clone(&parts.hosts),
        auth: RequireBearer::new(&config.auth.token),
        budget: budget.clone(),
    });
    let service = service::OrchestratorService {
        store,
        role,
        config: Arc::clone(&config),
        shutdown,
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

/// How this orchestrator is named in the leader lease: the address it is
/// reached at and its process, so that a restarted one is not taken for
/// the old.
fn leader_name(config: &Config) -> String {
    let address = if config.store.advertise.is_empty() {
        &config.server.listen
    } else {
        &config.store.advertise
    };
    format!(
        "{} (pid {}, {})",
        address,
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
