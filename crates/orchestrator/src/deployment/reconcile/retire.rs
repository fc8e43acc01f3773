//! Removing replicas: one retired, all of them at a stop, and the sweep of
//! workloads no replica records.

use super::*;

impl Deployments {
    /// Removes a replica's workload and records it Stopped.
    pub(super) async fn retire(
        &self,
        recipe: &Recipe,
        replica: &ReplicaRecord,
        why: &str,
    ) -> Result<bool, OrchestratorError> {
        let removed = self.remove_replica(recipe, replica).await;
        let mut next = replica.clone();
        let done = match removed {
            Ok(()) => {
                self.release_held(replica);
                next.state = ReplicaState::Stopped;
                next.reason = format!("removed: {why}");
                true
            }
            Err(reason) => {
                next.reason = format!("not removed yet ({why}): {reason}");
                false
            }
        };
        next.since_ms = now_ms();
        self.store.put_replica(&next)?;
        self.publish(&recipe.name, Some(replica.index), next.reason);
        Ok(done)
    }

    /// Stops every replica; the deployment is Cancelled once all are
    /// removed (a host that does not answer is tried again next pass, and
    /// given up when it is deregistered).
    pub(super) async fn stop_all(
        &self,
        recipe: &Recipe,
        replicas: &[ReplicaRecord],
    ) -> Result<Pass, OrchestratorError> {
        let mut left = 0;
        let registered: Vec<String> = self
            .hosts
            .views()
            .into_iter()
            .map(|v| v.record.name)
            .collect();
        // All at once: each may take its stop grace period. A replica whose
        // host was deregistered is given up with its host.
        let retiring = replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Stopped)
            .filter(|r| r.host.is_empty() || registered.contains(&r.host))
            .map(|replica| self.retire(recipe, replica, "the deployment was stopped"));
        for retired in futures::future::join_all(retiring).await {
            left += usize::from(!retired?);
        }
        if left > 0 {
            self.set_state(
                &recipe.name,
                DeploymentState::Starting,
                &format!("stopping: {left} replica(s) not removed yet"),
            )?;
            return Ok(Pass::Again(self.config.reconcile_interval));
        }
        self.set_state(
            &recipe.name,
            DeploymentState::Cancelled,
            "stopped: every replica removed",
        )?;
        Ok(Pass::Ended)
    }

    /// Removes the deployment's workloads that no replica records (nor is
    /// an update's successor), on every host that answers.
    pub(super) async fn sweep(
        &self,
        recipe: &Recipe,
        replicas: &[ReplicaRecord],
        successors: &[&str],
    ) {
        let known: Vec<&str> = replicas
            .iter()
            .map(|r| r.workload_id.as_str())
            .chain(successors.iter().copied())
            .collect();
        for view in self.hosts.views() {
            if view.status != HostStatus::Ready {
                continue;
            }
            let Ok(mut client) = self.hosts.client(&view.record.name).await else {
                continue;
            };
            let mut page_token = String::new();
            loop {
                let listed = self
                    .bounded(client.list_workloads(ListWorkloadsRequest {
                        page_size: 1000,
                        page_token: page_token.clone(),
                    }))
                    .await;
                let Ok(page) = listed else {
                    break;
                };
                let page = page.into_inner();
                for workload in page.workloads {
                    let ours = workload
                        .spec
                        .as_ref()
                        .and_then(|s| s.labels.get(DEPLOYMENT_LABEL))
                        .is_some_and(|d| *d == recipe.name);
                    if ours && !known.contains(&workload.id.as_str()) {
                        tracing::warn!(deployment = %recipe.name, host = %view.record.name, workload = %workload.id, "removing a workload no replica records");
                        let removal = RemoveWorkloadRequest {
                            id: workload.id,
                            force: true,
                        };
                        let _ = self.bounded(client.remove_workload(removal)).await;
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
    }
}
