//! A campaign from launch to its end: its task (one worker per backend),
//! relaunch after a restart, cancel and resume by request, its snapshot,
//! the running state, settling a stable warmup, and the verdict on how it
//! ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_proto::orchestrator::v1::{Campaign, CampaignOutcome, CampaignState, RunState};
use berth_server::CancellationToken;
use berth_server::trace_context::SpanContext;

use super::{CampaignRun, Scheduler};
use crate::error::OrchestratorError;
use crate::manifest::{self, WarmupPolicy};
use crate::results;
use crate::store::{RunPair, campaign_is_terminal};
use crate::{cycles, warmup};

impl Scheduler {
    /// After a restart: relaunches every unfinished campaign. Its runs that
    /// were in flight are reconciled with their agents by the backend
    /// workers (see `reconcile_in_flight`) before anything new is dispatched.
    pub fn resume_unfinished(self: &Arc<Self>) -> Result<usize, OrchestratorError> {
        let campaigns = self.store.unfinished_campaigns()?;
        for campaign in &campaigns {
            tracing::info!(campaign = %campaign.id, "resuming campaign");
            self.launch(campaign.id.clone());
        }
        Ok(campaigns.len())
    }

    /// Starts the campaign's task unless it is already running.
    pub fn launch(self: &Arc<Self>, id: String) {
        let token = {
            let mut running = self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if running.contains_key(&id) {
                return;
            }
            let token = self.shutdown.child_token();
            running.insert(id.clone(), token.clone());
            token
        };
        let launched_by = traced_caller();
        let scheduler = Arc::clone(self);
        tokio::spawn(async move {
            let result = scheduler
                .clone()
                .run_campaign(&id, token, launched_by)
                .await;
            if let Err(error) = result {
                tracing::error!(campaign = %id, %error, "campaign task failed");
                let _ = scheduler.store.set_campaign_state(
                    &id,
                    CampaignState::Failed,
                    &error.to_string(),
                );
                scheduler.publish(&id, format!("campaign failed: {error}"));
            }
            scheduler
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Cancels a campaign: pending runs are cancelled, running ones killed.
    pub fn cancel(&self, id: &str) -> Result<Campaign, OrchestratorError> {
        let state = self.campaign_state(id)?;
        if campaign_is_terminal(state) {
            return Err(OrchestratorError::WrongState {
                id: id.to_string(),
                state: berth_report::campaign_state(state as i32),
                reason: "it has already ended",
            });
        }
        self.store
            .set_campaign_state(id, CampaignState::Cancelled, "cancelled by request")?;
        self.store
            .transition_all(id, &[RunState::Pending], RunState::Cancelled)?;
        if let Some(token) = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
        {
            token.cancel();
        }
        self.publish(id, "campaign cancelled".into());
        self.snapshot(id)
    }

    /// Resumes a failed or cancelled campaign: its unfinished runs run again.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<Campaign, OrchestratorError> {
        let state = self.campaign_state(id)?;
        if !matches!(state, CampaignState::Failed | CampaignState::Cancelled) {
            return Err(OrchestratorError::WrongState {
                id: id.to_string(),
                state: berth_report::campaign_state(state as i32),
                reason: "only a failed or cancelled campaign can be resumed",
            });
        }
        self.store.transition_all(
            id,
            &[RunState::Cancelled, RunState::Failed],
            RunState::Pending,
        )?;
        self.store
            .set_campaign_state(id, CampaignState::Pending, "resumed")?;
        self.launch(id.to_string());
        self.publish(id, "campaign resumed".into());
        self.snapshot(id)
    }

    /// The campaign with its run counts.
    pub fn snapshot(&self, id: &str) -> Result<Campaign, OrchestratorError> {
        let mut campaign = self.campaign(id)?;
        campaign.runs = Some(self.store.run_counts(id)?);
        Ok(campaign)
    }

    /// The campaign as stored, without its run counts.
    pub(super) fn campaign(&self, id: &str) -> Result<Campaign, OrchestratorError> {
        self.store
            .campaign(id)?
            .ok_or_else(|| OrchestratorError::CampaignNotFound(id.to_string()))
    }

    fn campaign_state(&self, id: &str) -> Result<CampaignState, OrchestratorError> {
        Ok(CampaignState::try_from(self.campaign(id)?.state).unwrap_or_default())
    }

    async fn run_campaign(
        self: Arc<Self>,
        id: &str,
        token: CancellationToken,
        launched_by: Option<SpanContext>,
    ) -> Result<(), OrchestratorError> {
        let _slot = tokio::select! {
            slot = self.campaign_slots.clone().acquire_owned() => slot.ok(),
            () = token.cancelled() => return Ok(()),
        };
        let campaign = self.campaign(id)?;
        let plan =
            manifest::plan_within("manifest", &campaign.manifest_yaml, &self.manifest_limits)?;
        let ctx = Arc::new(CampaignRun {
            id: id.to_string(),
            plan,
            token,
            stopped_by_policy: AtomicBool::new(false),
            launched_by,
        });
        let workers: Vec<_> = ctx
            .plan
            .manifest
            .backends
            .iter()
            .map(|backend| {
                tokio::spawn(
                    Arc::clone(&self).backend_worker(Arc::clone(&ctx), backend.name.clone()),
                )
            })
            .collect();
        for worker in workers {
            if let Ok(Err(error)) = worker.await {
                return Err(error);
            }
        }
        if self.shutdown.is_cancelled() {
            // Stopping the orchestrator is not the campaign's end: a restart resumes it.
            return Ok(());
        }
        let stopped_by_policy = ctx.stopped_by_policy.load(Ordering::SeqCst);
        if stopped_by_policy {
            self.store
                .transition_all(id, &[RunState::Pending], RunState::Cancelled)?;
        }
        // A user's cancel recorded the campaign's end itself.
        if stopped_by_policy || !ctx.token.is_cancelled() {
            self.finish(id, stopped_by_policy)?;
        }
        self.publish(id, "campaign ended".into());
        Ok(())
    }

    /// Records how an ended campaign came out, judged by its measured runs:
    /// FAILED when the failure policy stopped it or when no measured run
    /// succeeded (a campaign that measured nothing has no result to call a
    /// success), SUCCEEDED otherwise; the outcome and message say which
    /// (config, backend) pairs have no result.
    fn finish(&self, id: &str, stopped_by_policy: bool) -> Result<(), OrchestratorError> {
        let counts = self.store.run_counts(id)?;
        let first_failure = self
            .store
            .runs(id, Some(RunState::Failed), None, 1)?
            .into_iter()
            .next();
        let verdict = results::judge(
            &self.store.measured_runs(id)?,
            &counts,
            first_failure.as_ref(),
        );
        let (state, message) = if stopped_by_policy {
            (
                CampaignState::Failed,
                format!(
                    "stopped after a failed run (failure.on_failure = stop); {}",
                    verdict.message
                ),
            )
        } else if verdict.outcome == CampaignOutcome::NoResults {
            (CampaignState::Failed, verdict.message)
        } else {
            (CampaignState::Succeeded, verdict.message)
        };
        self.store
            .finish_campaign(id, state, verdict.outcome, &message)?;
        Ok(())
    }

    /// Records the campaign running once a backend is placed (and clears a
    /// status message that said what it waited for).
    pub(super) fn mark_running(&self, id: &str) -> Result<(), OrchestratorError> {
        let campaign = self.campaign(id)?;
        if campaign.state == CampaignState::Pending as i32 || !campaign.status_message.is_empty() {
            self.store
                .set_campaign_state(id, CampaignState::Running, "")?;
            self.publish(id, "campaign running".into());
        }
        Ok(())
    }

    /// Under a stable warmup, ends the warmup of (config, backend) once its
    /// recorded runs say so: drops its warmup runs still pending and
    /// publishes why. True when it ended.
    pub(super) fn settle_warmup(
        &self,
        ctx: &CampaignRun,
        config: &str,
        backend: &str,
    ) -> Result<bool, OrchestratorError> {
        let WarmupPolicy::UntilStable(policy) = &ctx.plan.warmup else {
            return Ok(false);
        };
        let pair = RunPair {
            campaign_id: &ctx.id,
            config,
            backend,
            warmup: true,
        };
        let runs = self.store.runs_of_pair(pair)?;
        let Some(end) = warmup::verdict(policy, &runs) else {
            return Ok(false);
        };
        let dropped = self.store.drop_pending_runs(pair)?;
        tracing::info!(campaign = %ctx.id, config, backend, ?end, dropped, "warmup ended");
        self.publish_warmup_ended(
            &ctx.id,
            end.to_proto(config, backend),
            end.describe(policy, config, backend),
        );
        Ok(true)
    }

    /// Under `cycles.until`, ends the measured cycles of (config, backend)
    /// once its recorded runs say the answer is known (or the cap is
    /// reached): drops its measured runs still pending and publishes why.
    /// True when they ended.
    pub(super) fn settle_cycles(
        &self,
        ctx: &CampaignRun,
        config: &str,
        backend: &str,
    ) -> Result<bool, OrchestratorError> {
        let Some(rule) = ctx.plan.manifest.cycles.until() else {
            return Ok(false);
        };
        let pair = RunPair {
            campaign_id: &ctx.id,
            config,
            backend,
            warmup: false,
        };
        let runs = self.store.runs_of_pair(pair)?;
        let work_metric = ctx.plan.manifest.power.work_metric();
        let Some(end) = cycles::verdict(rule, &runs, work_metric) else {
            return Ok(false);
        };
        let dropped = self.store.drop_pending_runs(pair)?;
        tracing::info!(campaign = %ctx.id, config, backend, ?end, dropped, "cycles ended");
        self.publish_cycles_ended(
            &ctx.id,
            end.to_proto(rule, config, backend),
            end.describe(rule, config, backend),
        );
        Ok(true)
    }
}

/// The span of the call being served, when it is traced: the caller's
/// context (the CLI's `traceparent`) is its parent.
fn traced_caller() -> Option<SpanContext> {
    berth_server::trace_context::context(&tracing::Span::current()).filter(|caller| caller.sampled)
}
