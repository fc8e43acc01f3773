//! Following a deployment through the orchestrator's API, for the tests of
//! deployments on runtimes that need a part of their own (VMs, SLURM).

use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::{
    DeployRequest, Deployment, DeploymentState, GetDeploymentRequest, ReplicaState,
};

use crate::campaign::Client;

/// Deploys `recipe`, read from the file `source` (which errors name).
pub async fn deploy(client: &mut Client, recipe: String, source: &std::path::Path) {
    client
        .deploy(DeployRequest {
            recipe_yaml: recipe,
            source_name: source.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("Deploy");
}

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
