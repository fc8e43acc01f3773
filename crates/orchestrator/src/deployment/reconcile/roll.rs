//! A rolling update: one replica at a time, the old one removed only once
//! its successor is healthy.

use super::*;

impl Deployments {
    /// One step of an update: while every replica runs, the first one of an
    /// older generation gets a successor from the current recipe, placed
    /// beside it; once the successor is healthy the old workload is removed
    /// and the successor takes the replica's place. A successor that does
    /// not come up is removed and tried again after the backoff, at most
    /// `restart.max_restarts` times; then the replica keeps its generation.
    /// Returns how the update stands, for the deployment's message.
    pub(super) async fn roll(
        &self,
        recipe: &Recipe,
        generation: u32,
        replicas: &mut [ReplicaRecord],
        followed: &mut HashMap<u32, Followed>,
    ) -> Result<Option<String>, OrchestratorError> {
        let outdated = replicas
            .iter()
            .filter(|r| r.generation < generation && !r.workload_id.is_empty())
            .count();
        if outdated == 0 {
            return Ok(None);
        }
        let progress = format!(
            "updating to generation {generation}: {} of {} replaced",
            replicas.len() - outdated,
            replicas.len()
        );
        let settled = replicas
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Running | ReplicaState::Completed));
        let Some(slot) = replicas
            .iter()
            .position(|r| r.generation < generation && r.state == ReplicaState::Running)
            .filter(|_| settled)
        else {
            return Ok(Some(progress));
        };
        let old = replicas[slot].clone();
        let state = followed.entry(old.index).or_default();
        if state.update_failures > recipe.restart.max_restarts {
            return Ok(Some(format!(
                "the update to generation {generation} was given up for replica {} after {} tries; deploy again to retry",
                old.index, state.update_failures
            )));
        }
        if state.waiting() {
            return Ok(Some(progress));
        }
        let (successor, mut successor_state) = match state.successor.take() {
            Some(pair) => *pair,
            None => {
                let mut fresh = old.clone();
                fresh.state = ReplicaState::Pending;
                let mut successor_state = Followed::default();
                // It runs beside the replica it replaces, which counts.
                let peers = Peers::new(replicas, true);
                let placed = self
                    .place(recipe, generation, fresh, &peers, &mut successor_state)
                    .await;
                if placed.state != ReplicaState::Starting {
                    return Ok(Some(self.update_failed(recipe, state, &placed, generation)));
                }
                (placed, successor_state)
            }
        };
        let looked = self.look_at(recipe, successor, &mut successor_state).await;
        match looked.state {
            ReplicaState::Starting => {
                state.successor = Some(Box::new((looked, successor_state)));
                Ok(Some(progress))
            }
            ReplicaState::Running => {
                if let Err(reason) = self.remove_replica(recipe, &old).await {
                    tracing::warn!(deployment = %recipe.name, replica = old.index, reason, "the replaced workload was not removed; the sweep retries");
                }
                self.release_held(&old);
                let mut updated = looked;
                updated.restarts = old.restarts;
                updated.in_a_row = 0;
                updated.reason = format!("updated to generation {generation}, running and healthy");
                self.store.put_replica(&updated)?;
                self.publish(&recipe.name, Some(updated.index), updated.reason.clone());
                state.update_failures = 0;
                replicas[slot] = updated;
                Ok(Some(progress))
            }
            _ => {
                if let Err(reason) = self.remove_replica(recipe, &looked).await {
                    tracing::warn!(deployment = %recipe.name, replica = old.index, reason, "a failed successor was not removed; the sweep retries");
                }
                self.release_held(&looked);
                Ok(Some(self.update_failed(recipe, state, &looked, generation)))
            }
        }
    }

    /// A successor that did not come up: counted, and tried again after the
    /// backoff.
    pub(super) fn update_failed(
        &self,
        recipe: &Recipe,
        state: &mut Followed,
        successor: &ReplicaRecord,
        generation: u32,
    ) -> String {
        state.update_failures += 1;
        let backoff = recipe.restart.backoff_before(state.update_failures);
        state.not_before = Some(Instant::now() + backoff);
        let message = format!(
            "replica {} to generation {generation}: try {} failed: {}",
            successor.index, state.update_failures, successor.reason
        );
        tracing::warn!(deployment = %recipe.name, message, "update step failed");
        message
    }
}
