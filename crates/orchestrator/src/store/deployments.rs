//! What the orchestrator keeps of deployments: the desired state (the
//! recipe and its replica count) and the actual state of every replica
//! (host, workload, ports, state and why), so that after a restart the
//! reconciler adopts the replicas that still run instead of starting more.

use std::collections::BTreeMap;

use berth_proto::orchestrator::v1::{DeploymentState, ReplicaState};

use super::StoreResult;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    pub name: String,
    /// The recipe as written; parsed again when the reconciler starts.
    pub recipe_yaml: String,
    pub source_name: String,
    /// Replicas asked for (the recipe's, or the last ScaleDeployment's).
    pub replicas: u32,
    pub state: DeploymentState,
    pub message: String,
    pub created_ms: i64,
    /// StopDeployment was called: its replicas are being removed.
    pub stopping: bool,
    /// The recipe's version: 1 when deployed, one more at each update.
    pub generation: u32,
    /// Order of creation, the cursor of ListDeployments.
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub deployment: String,
    pub index: u32,
    /// Empty while pending.
    pub host: String,
    /// The agent's workload id; empty while pending.
    pub workload_id: String,
    pub state: ReplicaState,
    /// Port name → the port it answers on, on its host.
    pub ports: BTreeMap<String, u16>,
    /// Restarts since it was first placed.
    pub restarts: u32,
    /// Restarts in a row, the count the restart cap applies to.
    pub in_a_row: u32,
    pub reason: String,
    pub since_ms: i64,
    /// The deployment generation whose recipe its workload was made from.
    pub generation: u32,
    /// Indexes of its host's GPUs given to it at placement; empty when the
    /// recipe asks for none.
    pub gpus: Vec<u32>,
    /// Where its endpoints answer when that is not its host's address: a
    /// VM's own address on its network, learnt once the guest has one.
    pub address: String,
}

impl ReplicaRecord {
    pub fn pending(deployment: &str, index: u32, reason: &str) -> Self {
        Self {
            deployment: deployment.to_string(),
            index,
            host: String::new(),
            workload_id: String::new(),
            state: ReplicaState::Pending,
            ports: BTreeMap::new(),
            restarts: 0,
            in_a_row: 0,
            reason: reason.to_string(),
            since_ms: 0,
            generation: 0,
            gpus: Vec::new(),
            address: String::new(),
        }
    }
}

/// A stored transition: of the deployment (`replica: None`) or of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentTransition {
    pub time_ms: i64,
    pub replica: Option<u32>,
    pub message: String,
}

/// Whether a deployment was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Stored,
    /// A deployment of that name is live; nothing was written.
    NameTaken,
}

pub fn deployment_is_terminal(state: DeploymentState) -> bool {
    matches!(
        state,
        DeploymentState::Completed | DeploymentState::Failed | DeploymentState::Cancelled
    )
}

pub trait DeploymentStore: Send + Sync {
    /// Stores a new deployment; one of the same name that has ended is
    /// replaced (with its replicas and transitions), a live one only when
    /// `replace_live`: then its recipe and replica count are the new ones,
    /// its generation one more, and its replicas are kept for the
    /// reconciler to replace one at a time.
    fn insert_deployment(
        &self,
        record: &DeploymentRecord,
        replace_live: bool,
    ) -> StoreResult<Inserted>;
    fn deployment(&self, name: &str) -> StoreResult<Option<DeploymentRecord>>;
    /// Newest first, those created before the cursor `before`.
    fn list_deployments(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentRecord>>;
    /// Deployments that have not ended, to reconcile after a restart.
    fn live_deployments(&self) -> StoreResult<Vec<DeploymentRecord>>;
    /// Sets the deployment's state and message, with the transition when
    /// the state changes; false when there is no such deployment.
    fn set_deployment_state(
        &self,
        name: &str,
        state: DeploymentState,
        message: &str,
    ) -> StoreResult<bool>;
    fn set_deployment_replicas(&self, name: &str, replicas: u32) -> StoreResult<bool>;
    /// Marks a live deployment to be stopped (kept across a restart until
    /// its replicas are removed); false when there is none.
    fn request_stop(&self, name: &str) -> StoreResult<bool>;
    /// The deployment's replicas, by index.
    fn replicas(&self, deployment: &str) -> StoreResult<Vec<ReplicaRecord>>;
    /// Writes a replica, and its transition (its reason) when its state or
    /// reason changed, in one transaction.
    fn put_replica(&self, replica: &ReplicaRecord) -> StoreResult<()>;
    fn delete_replica(&self, deployment: &str, index: u32) -> StoreResult<()>;
    /// The newest `limit` transitions, oldest first.
    fn deployment_transitions(
        &self,
        deployment: &str,
        limit: usize,
    ) -> StoreResult<Vec<DeploymentTransition>>;
}
