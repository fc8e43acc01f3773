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
        if let Some(lease) = self.gpu_leases.try_lease(&placed.host, &placed.gpus, mode) {
            return Some(lease);
        }
        self.publish(
            &ctx.id,
            format!(
                "run {} waits for GPU(s) {} of host `{}`: {}",
                run.id,
                index_list(&placed.gpus),
                placed.host,
                match mode {
                    GpuUse::Exclusive => "it measures power, and another run uses them",
                    GpuUse::Shared => "a run that measures power has them to itself",
                }
            ),
        );
        self.wait_for_lease(ctx, &placed.host, &placed.gpus, mode)
            .await
    }

    /// The GPU lease of a run found in flight after a restart, from its
    /// backend's recorded placement and what its host reports.
    pub(super) async fn lease_adopted_gpus(
        &self,
        ctx: &CampaignRun,
        run: &Run,
    ) -> Option<GpuLease> {
        let backend = ctx.plan.backend(&run.backend)?;
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
        self.wait_for_lease(ctx, &run.host, &gpus, gpu_use(ctx))
            .await
    }

    /// The lease once it is free; None when the campaign is cancelled first.
    async fn wait_for_lease(
        &self,
        ctx: &CampaignRun,
        host: &str,
        gpus: &[u32],
        mode: GpuUse,
    ) -> Option<GpuLease> {
        tokio::select! {
            lease = self.gpu_leases.lease(host, gpus, mode) => Some(lease),
            () = ctx.token.cancelled() => None,
        }
    }
}

/// How the campaign's runs use their GPUs.
fn gpu_use(ctx: &CampaignRun) -> GpuUse {
    if ctx.plan.manifest.power.enabled {
        GpuUse::Exclusive
    } else {
        GpuUse::Shared
    }
}
