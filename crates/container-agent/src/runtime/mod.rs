//! How the agent runs workloads. Each runtime (process, docker, podman,
//! libvirt, slurm) implements [`WorkloadRuntime`]; the gRPC service routes
//! each call to the runtime that owns the workload.

pub mod container;
pub mod libvirt;
pub mod process;
pub mod slurm;
#[cfg(test)]
mod spec_fuzz;

use std::time::Duration;

use berth_proto::agent::v1::{
    ExecAccounting, ExecOutput, Image, ImportImageMetadata, LogLine, Workload, WorkloadStats,
};
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use tokio::sync::mpsc;

use crate::error::AgentError;
use crate::process_group::HostCommand;

/// An exec: a command line plus its timeout.
#[derive(Debug, Clone)]
pub struct ExecCommand {
    pub command: HostCommand,
    pub timeout: Option<Duration>,
    /// The caller's exec key. The agent's keyed-exec table serves attaches
    /// while the agent lives; a runtime whose execs can outlive the agent
    /// (libvirt's guest shim) also gives it to what runs the command, so a
    /// restarted agent can find the exec again ([`WorkloadRuntime::reattach`]).
    pub key: Option<String>,
}

#[tonic::async_trait]
pub trait WorkloadRuntime: Send + Sync {
    fn kind(&self) -> Runtime;
    /// Checks that the spec can be honoured, naming the first field that cannot.
    fn validate(&self, spec: &WorkloadSpec) -> Result<(), AgentError>;
    async fn create(&self, name: &str, spec: WorkloadSpec) -> Result<Workload, AgentError>;
    async fn start(&self, id: &str) -> Result<Workload, AgentError>;
    async fn stop(&self, id: &str, timeout: Duration) -> Result<Workload, AgentError>;
    async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError>;
    /// `None` when the workload is not this runtime's.
    async fn inspect(&self, id: &str) -> Result<Option<Workload>, AgentError>;
    async fn list(&self) -> Result<Vec<Workload>, AgentError>;
    /// Runs a command in a running workload; dropping the receiver kills it.
    async fn exec(
        &self,
        id: &str,
        exec: ExecCommand,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<mpsc::Receiver<ExecOutput>, AgentError>;
    /// The exec started with `key` by an earlier agent process, when this
    /// runtime can still reach it: its output from the start (what is kept
    /// of it), then the rest live, then its exit. `None`: no such exec here.
    async fn reattach(
        &self,
        _key: &str,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<mpsc::Receiver<ExecOutput>>, AgentError> {
        Ok(None)
    }
    /// What the cluster's own accounting recorded of the keyed exec `key`
    /// once it ended, waited for up to `wait`; `None` when this runtime
    /// has no exec of that key.
    async fn exec_accounting(
        &self,
        _key: &str,
        _wait: Duration,
    ) -> Result<Option<ExecAccounting>, AgentError> {
        Ok(None)
    }
    /// Whether this runtime's execs have a cluster's accounting record.
    fn keeps_exec_accounting(&self) -> bool {
        false
    }
    /// The kept log lines (the last `tail`, 0 for all), then new ones while
    /// `follow` is set.
    async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<mpsc::Receiver<LogLine>, AgentError>;
    /// Resource usage: one sample, or one per `interval` until the receiver
    /// is dropped.
    async fn stats(
        &self,
        _id: &str,
        _interval: Option<Duration>,
    ) -> Result<mpsc::Receiver<WorkloadStats>, AgentError> {
        Err(self.no_images_or_stats("Stats"))
    }
    /// Imports an image from a tar stream (rootfs or `docker save` archive).
    async fn import_image(
        &self,
        _metadata: ImportImageMetadata,
        _data: mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
    ) -> Result<Image, AgentError> {
        Err(self.no_images_or_stats("ImportImage"))
    }
    /// The images this agent imported.
    async fn list_images(&self) -> Result<Vec<Image>, AgentError> {
        Err(self.no_images_or_stats("ListImages"))
    }
    /// Removes an image this agent imported.
    async fn remove_image(&self, _image: &str) -> Result<(), AgentError> {
        Err(self.no_images_or_stats("RemoveImage"))
    }
    /// The id (digest) of the image the workload runs from, where the
    /// runtime has images.
    async fn image_id(&self, _id: &str) -> Result<Option<String>, AgentError> {
        Ok(None)
    }
    /// Why this runtime, though offered, fails now because a service it
    /// depends on does not answer (the slurm runtime's slurmrestd); `None`
    /// while it works. Info lists it among the unavailable runtimes
    /// meanwhile, for the orchestrator to report the host degraded.
    fn failing(&self) -> Option<String> {
        None
    }
    /// Why a runtime without images or resource accounting refuses a call.
    fn no_images_or_stats(&self, rpc: &str) -> AgentError {
        AgentError::Unimplemented(format!(
            "{rpc}: the {} runtime has no images or resource stats; use RUNTIME_DOCKER or RUNTIME_PODMAN",
            self.kind().as_str_name()
        ))
    }
}

/// Workload names: what docker allows, so a name means the same on every runtime.
pub fn validate_name(name: &str) -> Result<(), AgentError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 128 || !valid_chars || !starts_ok {
        return Err(AgentError::InvalidArgument {
            field: "name",
            reason: format!(
                "`{name}` is not a valid workload name (1-128 of letters, digits, '-', '_', '.', starting with a letter or digit)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::validate_name("bench-1.a_b").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(129)] {
            assert!(super::validate_name(bad).is_err(), "{bad}");
        }
    }
}
