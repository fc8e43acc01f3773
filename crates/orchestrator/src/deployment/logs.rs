//! A deployment's logs: every replica's stream from its agent, merged into
//! one bounded stream, each line with its replica and host.

use std::pin::Pin;

use berth_proto::agent::v1::{LogStream, LogsRequest};
use berth_proto::orchestrator::v1::DeploymentLogLine;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Deployments;
use crate::error::OrchestratorError;
use crate::hosts::describe_status;

/// Lines buffered between the replicas' streams and the caller; a slow
/// caller slows the agents' streams rather than growing this.
const LINES_BUFFERED: usize = 256;

pub type LogLines = Pin<Box<dyn Stream<Item = Result<DeploymentLogLine, tonic::Status>> + Send>>;

impl Deployments {
    /// The replicas' logs (of one replica when `only` is given): the last
    /// `tail` lines of each (0: all the agent keeps), then new ones while
    /// `follow`.
    pub async fn logs(
        &self,
        name: &str,
        only: Option<u32>,
        tail: u32,
        follow: bool,
    ) -> Result<LogLines, OrchestratorError> {
        if self.store.deployment(name)?.is_none() {
            return Err(OrchestratorError::DeploymentNotFound(name.to_string()));
        }
        let replicas: Vec<_> = self
            .store
            .replicas(name)?
            .into_iter()
            .filter(|r| only.is_none_or(|index| r.index == index) && !r.workload_id.is_empty())
            .collect();
        if let Some(index) = only
            && replicas.is_empty()
        {
            return Err(OrchestratorError::InvalidArgument {
                field: "replica",
                reason: format!("deployment `{name}` has no placed replica {index}"),
            });
        }
        let (tx, rx) = mpsc::channel(LINES_BUFFERED);
        for replica in replicas {
            let mut client = match self.hosts.client(&replica.host).await {
                Ok(client) => client,
                Err(reason) => {
                    let unreachable = OrchestratorError::ReplicaUnreachable {
                        index: replica.index,
                        host: replica.host.clone(),
                        reason,
                    };
                    let _ = tx.send(Err(unreachable.into())).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let request = LogsRequest {
                    workload_id: replica.workload_id.clone(),
                    follow,
                    tail,
                    since: None,
                };
                let mut lines = match client.logs(request).await {
                    Ok(lines) => lines.into_inner(),
                    Err(status) => {
                        let unreachable = OrchestratorError::ReplicaUnreachable {
                            index: replica.index,
                            host: replica.host.clone(),
                            reason: describe_status(&status),
                        };
                        let _ = tx.send(Err(unreachable.into())).await;
                        return;
                    }
                };
                while let Ok(Some(line)) = lines.message().await {
                    let stream = match LogStream::try_from(line.stream) {
                        Ok(LogStream::Stderr) => "stderr",
                        _ => "stdout",
                    };
                    let merged = DeploymentLogLine {
                        time: line.time,
                        host: replica.host.clone(),
                        replica: replica.index,
                        line: line.line,
                        stream: stream.to_string(),
                    };
                    if tx.send(Ok(merged)).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
