//! Runs as the tasks of SLURM job arrays (a slurm backend with
//! `slurm.array`): the backend's workload is an array made for the next
//! runs in the campaign's order, a task each under the exec key of the
//! attempt it will be, and the runs are then executed as any others: each
//! exec follows its task by that key, whether the cluster has run it yet
//! or not. A run the array does not hold (the array was used up, or a run
//! came back pending) has a new array made for it and those after it.

use std::collections::HashSet;

use berth_proto::common::v1::{SlurmArrayTask, WorkloadSpec};
use berth_proto::orchestrator::v1::{Run, RunState};

use super::run::{exec_key, run_command};
use super::{CampaignRun, Scheduler};
use crate::manifest::{Backend, SlurmArray};
use crate::store::StoreError;

/// Pending runs read from the store per page while an array is filled.
const PAGE: usize = 256;

impl Scheduler {
    /// The tasks of an array made for `first` and the backend's pending runs
    /// after it, in order: as many as `array.runs`, or one cycle's.
    pub(super) fn array_tasks(
        &self,
        ctx: &CampaignRun,
        backend: &Backend,
        array: &SlurmArray,
        first: &Run,
    ) -> Result<Vec<SlurmArrayTask>, StoreError> {
        let wanted = array
            .runs
            .map_or(ctx.plan.configs.len().max(1), |runs| runs as usize);
        let mut runs = Vec::with_capacity(wanted);
        let mut after = first.sequence.checked_sub(1);
        while runs.len() < wanted {
            let page = self
                .store
                .runs(&ctx.id, Some(RunState::Pending), after, PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.sequence);
            let last_page = page.len() < PAGE;
            runs.extend(
                page.into_iter()
                    .filter(|run| run.backend == backend.name && run.sequence >= first.sequence)
                    .take(wanted - runs.len()),
            );
            if last_page {
                break;
            }
        }
        let working_dir = &ctx.plan.manifest.run.working_dir;
        Ok(runs
            .iter()
            .map(|run| {
                let (command, env) = run_command(ctx, run, &Default::default());
                SlurmArrayTask {
                    exec_key: next_key(run),
                    command,
                    env,
                    working_dir: working_dir.clone(),
                }
            })
            .collect())
    }
}

/// The exec key the run's next attempt will have: its task's in an array
/// made now.
pub(super) fn next_key(run: &Run) -> String {
    exec_key(&run.id, run.attempts + 1)
}

/// The exec keys of an array workload's tasks; empty for any other.
pub(super) fn task_keys(spec: Option<&WorkloadSpec>) -> HashSet<String> {
    spec.and_then(|spec| spec.slurm.as_ref())
        .map(|slurm| {
            slurm
                .array_tasks
                .iter()
                .map(|task| task.exec_key.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// An array's workload name: the backend's, with the first run's sequence
/// and attempt, so that an array made while the one before is still being
/// cancelled never meets it, and a create tried again finds its own.
pub(super) fn array_workload_name(backend_name: &str, first: &Run) -> String {
    crate::manifest::workload_name(&format!(
        "{backend_name}-s{}-a{}",
        first.sequence,
        first.attempts + 1
    ))
}
