//! The agent's own health loop for a container: exec the check every
//! interval, and after `retries` failures in a row call it unhealthy and
//! restart it, waiting longer after each restart that did not help.
//! (podman 4.3 runs no health checks without systemd, so the agent runs them
//! for both engines, the same way.)

use std::time::Duration;

use berth_proto::agent::v1::{EventKind, ExitReason, Health, WorkloadEvent, exec_output};
use berth_proto::common::v1::HealthCheck;
use bollard::query_parameters::RestartContainerOptionsBuilder;
use tokio::task::AbortHandle;

use super::ContainerRuntime;
use crate::error::AgentError;
use crate::process_group::HostCommand;
use crate::runtime::ExecCommand;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Time a restarted container is given to stop before it is killed.
const RESTART_STOP_TIMEOUT_S: i32 = 10;

fn duration(value: Option<prost_types::Duration>, default: Duration) -> Duration {
    value
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

pub fn spawn(
    runtime: ContainerRuntime,
    id: String,
    name: String,
    check: HealthCheck,
) -> AbortHandle {
    tokio::spawn(run(runtime, id, name, check)).abort_handle()
}

async fn run(runtime: ContainerRuntime, id: String, name: String, check: HealthCheck) {
    let interval = duration(check.interval, DEFAULT_INTERVAL);
    let timeout = duration(check.timeout, DEFAULT_TIMEOUT);
    let start_period = duration(check.start_period, Duration::ZERO);
    let retries = if check.retries == 0 {
        DEFAULT_RETRIES
    } else {
        check.retries
    };
    let mut backoff = FIRST_BACKOFF;
    let mut failures = 0;
    tokio::time::sleep(start_period).await;
    loop {
        tokio::time::sleep(interval).await;
        match probe(&runtime, &id, &name, &check.command, timeout).await {
            Ok(true) => {
                failures = 0;
                backoff = FIRST_BACKOFF;
                runtime.set_health(&id, &name, Health::Healthy, "health check passed".into());
            }
            Ok(false) => {
                failures += 1;
                if failures < retries {
                    continue;
                }
                runtime.set_health(
                    &id,
                    &name,
                    Health::Unhealthy,
                    format!(
                        "{failures} health checks failed in a row; restarting (backoff {backoff:?})"
                    ),
                );
                runtime.restart_unhealthy(&id, &name).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(runtime.inner.restart_backoff_max);
                failures = 0;
                runtime.set_health(
                    &id,
                    &name,
                    Health::Starting,
                    "restarted; waiting for health checks".into(),
                );
                tokio::time::sleep(start_period).await;
            }
            // Not running: the engine's events report the death and its
            // restart policy decides; a stopped backend is not unhealthy.
            Err(AgentError::NotRunning { .. } | AgentError::WrongState { .. }) => {}
            Err(error) => tracing::warn!(%error, workload = %name, "health check could not run"),
        }
    }
}

/// Runs the check once; true when it exited 0 within its timeout.
async fn probe(
    runtime: &ContainerRuntime,
    id: &str,
    name: &str,
    command: &[String],
    timeout: Duration,
) -> Result<bool, AgentError> {
    let exec = ExecCommand {
        command: HostCommand {
            argv: command.to_vec(),
            ..Default::default()
        },
        timeout: Some(timeout),
        key: None,
    };
    let mut output = super::exec::start(runtime.engine().clone(), id, name, exec, None).await?;
    while let Some(message) = output.recv().await {
        if let Some(exec_output::Output::Exit(exit)) = message.output {
            return Ok(exit.exit_code == 0 && exit.reason == ExitReason::Exited as i32);
        }
    }
    Ok(false)
}

impl ContainerRuntime {
    /// Records the agent's health verdict; publishes only a change.
    pub(super) fn set_health(&self, id: &str, name: &str, health: Health, message: String) {
        let changed = self
            .owned()
            .get_mut(id)
            .is_some_and(|o| o.health.replace(health) != Some(health));
        if changed {
            self.publish(WorkloadEvent {
                time: Some(std::time::SystemTime::now().into()),
                workload_id: id.to_string(),
                workload_name: name.to_string(),
                kind: EventKind::HealthChanged as i32,
                health: health as i32,
                message,
                ..Default::default()
            });
        }
    }

    async fn restart_unhealthy(&self, id: &str, name: &str) {
        let options = RestartContainerOptionsBuilder::new()
            .t(RESTART_STOP_TIMEOUT_S)
            .build();
        let restarted = match self.engine().client().await {
            Ok(docker) => docker
                .restart_container(id, Some(options))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match restarted {
            Ok(()) => {
                if let Some(owned) = self.owned().get_mut(id) {
                    owned.agent_restarts += 1;
                }
                tracing::info!(workload = %name, "restarted unhealthy workload");
            }
            Err(error) => {
                tracing::warn!(%error, workload = %name, "restarting unhealthy workload failed")
            }
        }
    }
}
