//! A run's transitions in the store and the campaign events that publish
//! them. Every transition is written before it is acted on; the event then
//! carries the run and the campaign's counts as that write returned them.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use berth_proto::agent::v1::Provenance;
use berth_proto::orchestrator::v1::{
    Campaign, CampaignEvent, CyclesEnded, Run, RunState, WarmupEnded,
};

use super::{CampaignRun, Interrupted, Scheduler};
use crate::error::OrchestratorError;
use crate::manifest::OnFailure;
use crate::store::RunUpdate;

impl Scheduler {
    /// Moves the run `from` → `to` with `update` and publishes the run as
    /// written, with `message` (built only when someone watches). `None`
    /// when the run was in none of `from`: nothing was written, nothing is
    /// published.
    pub(super) fn record(
        &self,
        run_id: &str,
        from: &[RunState],
        to: RunState,
        update: &RunUpdate,
        message: impl FnOnce(&Run) -> String,
    ) -> Result<Option<Run>, OrchestratorError> {
        let Some(written) = self.store.transition_run(run_id, from, to, update)? else {
            return Ok(None);
        };
        crate::metrics::metrics().run_recorded(to, update);
        let campaign_id = &written.run.campaign_id;
        if self.events.is_watched(campaign_id) {
            let message = message(&written.run);
            let campaign = self.campaign(campaign_id).map(|campaign| Campaign {
                runs: Some(written.counts),
                ..campaign
            });
            self.send_event(
                campaign_id,
                campaign,
                Some(written.run.clone()),
                CampaignEvent::default(),
                message,
            );
        }
        Ok(Some(written.run))
    }

    /// Records a dispatched run running (its exec is open on the agent),
    /// with its host's provenance when it was asked, and publishes `message`.
    pub(super) fn start_running(
        &self,
        run: &Run,
        provenance: Option<Provenance>,
        message: String,
    ) -> Result<(), OrchestratorError> {
        self.record(
            &run.id,
            &[RunState::Dispatched],
            RunState::Running,
            &RunUpdate {
                provenance,
                ..Default::default()
            },
            |_| message,
        )?;
        Ok(())
    }

    /// Puts an interrupted run back to pending, unless it has been
    /// dispatched `scheduler.max_run_attempts` times already: then it fails
    /// (per the failure policy) so that it cannot bounce between hosts
    /// forever. The interruption is returned either way, for the worker to
    /// deal with the host or backend.
    pub(super) fn requeue(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        from: RunState,
        why: Interrupted,
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        let reason = why.reason();
        if attempt >= self.config.max_run_attempts {
            let error = format!(
                "interrupted after {attempt} dispatches, the most scheduler.max_run_attempts allows: {reason}"
            );
            self.give_up(ctx, run, from, failure(-1, error))?;
            return Ok(Some(why));
        }
        let update = RunUpdate {
            error: Some(format!("interrupted: {reason}")),
            ..Default::default()
        };
        self.record(&run.id, &[from], RunState::Pending, &update, |run| {
            format!("run {} interrupted ({reason}); it will run again", run.id)
        })?;
        Ok(Some(why))
    }

    /// A stop that is not the campaign's end (orchestrator shutdown) leaves
    /// the run for the restart; a cancel records it cancelled.
    pub(super) fn interrupted(
        &self,
        run: &Run,
        from: &[RunState],
    ) -> Result<Option<Interrupted>, OrchestratorError> {
        if !self.shutdown.is_cancelled() {
            let update = RunUpdate {
                finished_now: true,
                error: Some("cancelled".into()),
                ..Default::default()
            };
            self.record(&run.id, from, RunState::Cancelled, &update, |run| {
                format!("run {} cancelled", run.id)
            })?;
        }
        Ok(None)
    }

    /// Records a failed attempt (`update` says how it ended, with its
    /// error): pending again while retries remain, else failed.
    pub(super) fn fail(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        attempt: u32,
        from: RunState,
        update: RunUpdate,
    ) -> Result<(), OrchestratorError> {
        let retries = ctx.plan.manifest.failure.retries;
        if attempt > retries {
            return self.give_up(ctx, run, from, update);
        }
        let error = update.error.as_deref().unwrap_or_default();
        self.record(&run.id, &[from], RunState::Pending, &update, |run| {
            format!(
                "run {} failed ({error}); retry {attempt} of {retries}",
                run.id
            )
        })?;
        Ok(())
    }

    /// The backend's workload was refused `tries` times, the most
    /// `scheduler.max_create_attempts` allows: its pending runs fail with the
    /// agent's reason (until the failure policy stops the campaign, which
    /// then cancels the rest).
    pub(super) fn fail_unstartable(
        &self,
        ctx: &CampaignRun,
        backend: &str,
        tries: u32,
        reason: &str,
    ) -> Result<(), OrchestratorError> {
        tracing::warn!(campaign = %ctx.id, backend, tries, reason, "backend cannot be started; its runs fail");
        let error = format!(
            "backend `{backend}` could not be started ({tries} tries refused, the most scheduler.max_create_attempts allows): {reason}"
        );
        while !ctx.token.is_cancelled() {
            let Some(run) = self.store.next_pending_run(&ctx.id, backend)? else {
                break;
            };
            let update = RunUpdate {
                error: Some(error.clone()),
                ..Default::default()
            };
            self.give_up(ctx, &run, RunState::Pending, update)?;
        }
        Ok(())
    }

    /// Records the run failed for good; `failure.on_failure: stop` then
    /// stops the campaign.
    pub(super) fn give_up(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        from: RunState,
        update: RunUpdate,
    ) -> Result<(), OrchestratorError> {
        let update = RunUpdate {
            finished_now: true,
            ..update
        };
        let error = update.error.as_deref().unwrap_or_default();
        self.record(&run.id, &[from], RunState::Failed, &update, |run| {
            format!("run {} failed: {error}", run.id)
        })?;
        if ctx.plan.manifest.failure.on_failure == OnFailure::Stop {
            ctx.stopped_by_policy.store(true, Ordering::SeqCst);
            ctx.token.cancel();
        }
        Ok(())
    }

    /// Publishes a campaign event without a run: the campaign as it is now.
    pub(super) fn publish(&self, id: &str, message: String) {
        if self.events.is_watched(id) {
            self.send_event(
                id,
                self.snapshot(id),
                None,
                CampaignEvent::default(),
                message,
            );
        }
    }

    /// Publishes the end of a (config, backend)'s stable warmup.
    pub(super) fn publish_warmup_ended(&self, id: &str, ended: WarmupEnded, message: String) {
        let detail = CampaignEvent {
            warmup_ended: Some(ended),
            ..Default::default()
        };
        if self.events.is_watched(id) {
            self.send_event(id, self.snapshot(id), None, detail, message);
        }
    }

    /// Publishes the end of a (config, backend)'s cycles under `cycles.until`.
    pub(super) fn publish_cycles_ended(&self, id: &str, ended: CyclesEnded, message: String) {
        let detail = CampaignEvent {
            cycles_ended: Some(ended),
            ..Default::default()
        };
        if self.events.is_watched(id) {
            self.send_event(id, self.snapshot(id), None, detail, message);
        }
    }

    /// Publishes `detail` (what ended, if anything) with the campaign, the
    /// run and the message.
    fn send_event(
        &self,
        id: &str,
        campaign: Result<Campaign, OrchestratorError>,
        run: Option<Run>,
        detail: CampaignEvent,
        message: String,
    ) {
        match campaign {
            Ok(campaign) => self.events.publish(
                id,
                CampaignEvent {
                    time: Some(SystemTime::now().into()),
                    run: run.map(|run| crate::results::with_derived(run, &campaign.work_metric)),
                    campaign: Some(campaign),
                    message,
                    ..detail
                },
            ),
            Err(error) => tracing::warn!(campaign = id, %error, "cannot publish campaign event"),
        }
    }
}

/// How an attempt that never produced an exit status failed.
pub(super) fn failure(exit_code: i32, error: String) -> RunUpdate {
    RunUpdate {
        exit_code: Some(exit_code),
        error: Some(error),
        ..Default::default()
    }
}
