//! Following a deployment through the orchestrator's API, for the tests of
//! deployments on runtimes that need a part of their own (VMs, SLURM).

use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::{
    Deployment, DeploymentState, GetDeploymentRequest, ReplicaState,
};

use crate::campaign::Client;

/// GetDeployment until `done` holds (asserting it does within `limit`,
/// saying `what` it waited for): the deployment then.
pub async fn wait_deployment(
    client: &mut Client,
    name: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Deployment) -> bool,
) -> Deployment {
    let deadline = Instant::now() + limit;
    loop {
        let deployment = client
            .get_deployment(GetDeploymentRequest { name: name.into() })
            .await
            .expect("GetDeployment")
            .into_inner();
        if done(&deployment) {
            return deployment;
        }
        assert!(
            Instant::now() < deadline,
            "deployment `{name}` never became {what}: {deployment:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The deployment runs and its first replica is Running.
pub fn running_replica(deployment: &Deployment) -> bool {
    DeploymentState::try_from(deployment.state) == Ok(DeploymentState::Running)
        && deployment
            .replica_status
            .first()
            .is_some_and(|r| r.state == ReplicaState::Running as i32)
}

pub fn cancelled(deployment: &Deployment) -> bool {
    DeploymentState::try_from(deployment.state) == Ok(DeploymentState::Cancelled)
}
