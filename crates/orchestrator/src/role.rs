//! Whether this orchestrator leads or follows. Orchestrators sharing one
//! PostgreSQL database all serve the read APIs from the store; only the one
//! holding the leader lease (store/postgres/lease.rs) runs the parts that
//! act: the scheduler, the deployments' reconcilers and the hosts'
//! heartbeats, and only it takes writes. A follower answers a write with
//! UNAVAILABLE naming the leader, so that a client that knows several
//! addresses goes there; when it takes the lease over it starts those parts
//! as after a restart. On SQLite the one orchestrator leads from the start.

use std::sync::{Arc, OnceLock};

use berth_server::{CancellationToken, ErrorCode, ServiceError};

use crate::config::Config;
use crate::deployment::Deployments;
use crate::error::OrchestratorError;
use crate::events::CampaignEvents;
use crate::hosts::HostRegistry;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::store::postgres::{LeaseHolder, PostgresStore};

/// The reason (`berth-error-code`) of a write refused by a follower: a
/// client that knows other addresses tries the next.
pub const NOT_LEADER: &str = "not_leader";

/// A write sent to a follower.
#[derive(Debug, thiserror::Error)]
#[error("this orchestrator is not the leader: {}; send writes there", describe_leader(.leader))]
pub struct NotLeader {
    /// The lease's holder as the database has it; why not when it could
    /// not be read.
    pub leader: Result<Option<LeaseHolder>, String>,
}

fn describe_leader(leader: &Result<Option<LeaseHolder>, String>) -> String {
    match leader {
        Ok(Some(lease)) => format!(
            "the leader is {} (term {}, from store.url's leader lease)",
            lease.holder, lease.term
        ),
        Ok(None) => "no orchestrator leads yet".to_string(),
        Err(error) => format!("the leader lease could not be read ({error})"),
    }
}

impl ServiceError for NotLeader {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }

    fn reason(&self) -> &'static str {
        NOT_LEADER
    }
}

impl From<NotLeader> for tonic::Status {
    fn from(error: NotLeader) -> Self {
        // At WARN: a client that keeps writing here has this orchestrator
        // first in its list while another leads, which its operator fixes.
        tracing::warn!(%error, "a write refused on a follower");
        berth_server::error::into_status(error)
    }
}

/// The parts that act on hosts and campaigns. Assembling them starts
/// nothing: a follower assembles them to read through them (a campaign's
/// snapshot, a deployment with its endpoints), the leader starts them.
pub struct Parts {
    pub hosts: Arc<HostRegistry>,
    pub events: Arc<CampaignEvents>,
    pub deployments: Arc<Deployments>,
    pub scheduler: Arc<Scheduler>,
}

impl Parts {
    /// The parts over the hosts as stored now.
    pub fn assemble(
        store: &Arc<dyn Store>,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Result<Self, OrchestratorError> {
        let hosts = Arc::new(HostRegistry::load(
            Arc::clone(store),
            config.scheduler.connect_timeout,
            config.ssh.clone(),
        )?);
        let events = Arc::new(CampaignEvents::default());
        let deployments = Deployments::new(
            Arc::clone(store),
            Arc::clone(&hosts),
            config.deployments.clone(),
            config.manifest.clone(),
            shutdown.clone(),
        );
        let scheduler = Scheduler::new(
            Arc::clone(store),
            Arc::clone(&hosts),
            Arc::clone(&events),
            config.scheduler.clone(),
            config.manifest.clone(),
            Arc::clone(&deployments),
            shutdown.clone(),
        );
        Ok(Self {
            hosts,
            events,
            deployments,
            scheduler,
        })
    }

    /// Starts what a leader runs: heartbeats, the live deployments'
    /// reconcilers, and every unfinished campaign where it was.
    fn start(
        &self,
        store: &dyn Store,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Result<(), OrchestratorError> {
        self.hosts
            .spawn_heartbeats(config.scheduler.heartbeat_interval, shutdown.clone());
        self.deployments.resume()?;
        crate::service::store_missing_results_layouts(store, &config.manifest)?;
        self.scheduler.resume_unfinished()?;
        Ok(())
    }
}

/// Leading (with the started parts) or following.
pub struct Role {
    leading: OnceLock<Arc<Parts>>,
    /// The PostgreSQL store's lease, to name the leader; None on SQLite.
    lease: Option<Arc<PostgresStore>>,
}

impl Role {
    pub fn new(lease: Option<Arc<PostgresStore>>) -> Arc<Self> {
        Arc::new(Self {
            leading: OnceLock::new(),
            lease,
        })
    }

    /// Starts `parts` and serves writes with them from then on.
    pub fn lead(
        &self,
        parts: Arc<Parts>,
        store: &dyn Store,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Result<(), OrchestratorError> {
        parts.start(store, config, shutdown)?;
        // A leader never follows again (it stops when its lease is lost),
        // so this is set once.
        let _ = self.leading.set(parts);
        Ok(())
    }

    /// The started parts while leading; None while following.
    pub fn started(&self) -> Option<&Arc<Parts>> {
        self.leading.get()
    }

    /// The started parts, or who to send a write to instead (read from
    /// the lease row).
    pub fn leading(&self) -> Result<&Arc<Parts>, NotLeader> {
        self.started().ok_or_else(|| NotLeader {
            leader: match &self.lease {
                Some(lease) => lease.lease_holder().map_err(|error| error.to_string()),
                None => Ok(None),
            },
        })
    }

    /// On a follower: waits (in the background) until this orchestrator
    /// holds the lease as `holder`, then keeps it and leads with `parts`
    /// (those `/metrics` and the report pages read through), their hosts
    /// read anew from the store. A leader that cannot start stops the
    /// orchestrator rather than hold the lease idle.
    pub fn lead_when_elected(
        self: &Arc<Self>,
        holder: String,
        parts: Arc<Parts>,
        store: Arc<dyn Store>,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) {
        let Some(lease) = self.lease.clone() else {
            return;
        };
        let role = Arc::clone(self);
        tokio::spawn(async move {
            let ttl = config.store.leader_lease;
            tokio::select! {
                _term = lease.wait_to_lead(&holder, ttl) => {}
                () = shutdown.cancelled() => return,
            }
            lease.keep_leading(ttl, shutdown.clone());
            let led = parts
                .hosts
                .reload()
                .and_then(|()| role.lead(parts, store.as_ref(), &config, &shutdown));
            if let Err(error) = led {
                tracing::error!(%error, "elected leader but could not start leading: stopping");
                shutdown.cancel();
            }
        });
    }
}
