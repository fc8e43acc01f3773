//! The GPUs a run leases from those its backend uses: to itself when the
//! campaign measures power, shared otherwise, so that no run uses a GPU
//! while a measuring run reads its energy.

use berth_proto::orchestrator::v1::Run;

use super::{CampaignRun, Placed, Scheduler, index_list};
use crate::gpu_leases::{self, GpuLease, GpuUse};

impl Scheduler {
    /// The run's lease on its backend's GPUs. None when the campaign was
    /// cancelled while it waited.
    pub(super) async fn lease_gpus(
        &self,
        ctx: &CampaignRun,
        run: &Run,
        placed: &Placed,
    ) -> Option<GpuLease> {
        let mode = gpu_use(ctx);
        let measured = measured_deployment(ctx, run);
        if let Some(lease) = self
            .gpu_leases
            .try_lease(&placed.host, &placed.gpus, mode, measured)
        {
            return Some(lease);
        }
        let held = self
            .gpu_leases
            .held_by_others(&placed.host, &placed.gpus, measured);
        let why = match (mode, held.first()) {
            (GpuUse::Exclusive, Some((index, deployment))) => format!(
                "it measures power, and GPU {index} serves deployment `{deployment}` \
                 (whose load would be in its energy) until that lets it go"
            ),
            (GpuUse::Exclusive, None) => "it measures power, and another run uses them".into(),
            (GpuUse::Shared, _) => "a run that measures power has them to itself".into(),
        };
        let message = format!(
            "run {} waits for GPU(s) {} of host `{}`: {why}",
            run.id,
            index_list(&placed.gpus),
            placed.host,
        );
        // Said in the campaign's status too: a wait on a deployment can be
        // long, and a watcher may come later.
        let _ = self.store.set_campaign_message(&ctx.id, &message);
        self.publish(&ctx.id, message);
        let lease = self
            .wait_for_lease(ctx, &placed.host, &placed.gpus, mode, measured)
            .await;
        if lease.is_some() {
            let _ = self.store.set_campaign_message(&ctx.id, "");
        }
        lease
    }

    /// The GPU lease of a run found in flight after a restart, from its
    /// backend's recorded placement and what its host reports.
    pub(super) async fn lease_adopted_gpus(
        &self,
        ctx: &CampaignRun,
        run: &Run,
    ) -> Option<GpuLease> {
        let backend = ctx.plan.backend(&run.backend)?;
        let measured = measured_deployment(ctx, run);
        if let Some(deployment) = measured {
            // Its runs lease the GPUs of the replica they measure.
            let gpus = match self.deployments.serving(deployment) {
                Ok(Some(serving)) if serving.host == run.host => serving.gpus,
                _ => Vec::new(),
            };
            return self
                .wait_for_lease(ctx, &run.host, &gpus, gpu_use(ctx), measured)
                .await;
        }
        let assigned = self
            .store
            .placements(&ctx.id)
            .ok()?
            .into_iter()
            .find(|p| p.backend == run.backend && p.host == run.host)
            .map(|p| p.gpus)
            .unwrap_or_default();
        let mut host_gpus = self.hosts.gpus(&run.host);
        if host_gpus.is_empty() {
            // Right after a restart the host may not have been asked yet.
            host_gpus = self.hosts.probe(&run.host).await.ok()?.gpus;
        }
        let gpus = gpu_leases::used_by(backend, &host_gpus, &assigned);
        self.wait_for_lease(ctx, &run.host, &gpus, gpu_use(ctx), None)
            .await
    }

    /// The lease once it is free; None when the campaign is cancelled first.
    async fn wait_for_lease(
        &self,
        ctx: &CampaignRun,
        host: &str,
        gpus: &[u32],
        mode: GpuUse,
        measured: Option<&str>,
    ) -> Option<GpuLease> {
        tokio::select! {
            lease = self.gpu_leases.lease(host, gpus, mode, measured) => Some(lease),
            () = ctx.token.cancelled() => None,
        }
    }
}

/// The deployment the run's backend measures, if it measures one.
fn measured_deployment<'a>(ctx: &'a CampaignRun, run: &Run) -> Option<&'a str> {
    ctx.plan
        .backend(&run.backend)
        .map(|backend| backend.deployment.as_str())
        .filter(|name| !name.is_empty())
}

/// How the campaign's runs use their GPUs.
fn gpu_use(ctx: &CampaignRun) -> GpuUse {
    if ctx.plan.manifest.power.enabled {
        GpuUse::Exclusive
    } else {
        GpuUse::Shared
    }
}
