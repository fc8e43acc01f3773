//! `berth deploy`, `deployments`, `deployment`, `scale`, `stop` and `logs`:
//! recipes kept running, their replicas, endpoints and logs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use berth_proto::orchestrator::v1::*;

use crate::{CliError, Client};

/// `berth deploy`: sends the recipe, prints the deployment and, with
/// `--watch`, its transitions until every replica runs (exit 0) or it
/// ends (non-zero unless it completed).
pub async fn deploy(
    client: &mut Client,
    file: &Path,
    watch: bool,
    update: bool,
) -> Result<(), CliError> {
    let recipe_yaml = std::fs::read_to_string(file).map_err(|source| CliError::File {
        path: file.to_path_buf(),
        source,
    })?;
    let deployment = client
        .deploy(DeployRequest {
            recipe_yaml,
            source_name: file.display().to_string(),
            update,
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("{} {}", deployment.name, state_name(deployment.state));
    if watch {
        return watch_until_running(client, &deployment.name).await;
    }
    Ok(())
}

async fn watch_until_running(client: &mut Client, name: &str) -> Result<(), CliError> {
    let mut events = client
        .watch_deployment(WatchDeploymentRequest { name: name.into() })
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        let Some(deployment) = event.deployment else {
            continue;
        };
        println!("{}  {}", state_name(deployment.state), event.message);
        let _ = std::io::stdout().flush();
        match DeploymentState::try_from(deployment.state).unwrap_or_default() {
            DeploymentState::Running => {
                print!("{}", describe(&deployment));
                return Ok(());
            }
            DeploymentState::Completed => return Ok(()),
            DeploymentState::Failed | DeploymentState::Cancelled => {
                return Err(CliError::DeploymentEnded {
                    name: deployment.name,
                    state: state_name(deployment.state),
                    message: deployment.status_message,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

pub async fn list(client: &mut Client) -> Result<(), CliError> {
    let listed = client
        .list_deployments(ListDeploymentsRequest::default())
        .await?
        .into_inner();
    let mut out = format!(
        "{:<24} {:<10} {:<8} {:>8}  {}\n",
        "NAME", "STATE", "RUNTIME", "READY", "MESSAGE"
    );
    for d in &listed.deployments {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<8} {:>8}  {}",
            d.name,
            state_name(d.state),
            d.runtime,
            format!("{}/{}", d.ready_replicas, d.replicas),
            d.status_message
        );
    }
    print!("{out}");
    Ok(())
}

pub async fn show(client: &mut Client, name: String) -> Result<(), CliError> {
    let deployment = client
        .get_deployment(GetDeploymentRequest { name })
        .await?
        .into_inner();
    print!("{}", describe(&deployment));
    Ok(())
}

pub async fn scale(client: &mut Client, name: String, replicas: u32) -> Result<(), CliError> {
    let deployment = client
        .scale_deployment(ScaleDeploymentRequest { name, replicas })
        .await?
        .into_inner();
    println!(
        "{} {} ({} replicas asked)",
        deployment.name,
        state_name(deployment.state),
        deployment.replicas
    );
    Ok(())
}

pub async fn stop(client: &mut Client, name: String) -> Result<(), CliError> {
    let deployment = client
        .stop_deployment(StopDeploymentRequest { name })
        .await?
        .into_inner();
    println!("{} stopping", deployment.name);
    Ok(())
}

pub async fn logs(
    client: &mut Client,
    name: String,
    replica: Option<u32>,
    follow: bool,
    tail: u32,
) -> Result<(), CliError> {
    let mut lines = client
        .logs(DeploymentLogsRequest {
            name,
            follow,
            tail,
            replica,
        })
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    while let Some(line) = lines.message().await? {
        let _ = writeln!(stdout, "[{}@{}] {}", line.replica, line.host, line.line);
    }
    Ok(())
}

/// A deployment with a line per replica: state, host, endpoints, restarts
/// and why it is in its state.
pub fn describe(d: &Deployment) -> String {
    let mut out = format!(
        "{} {} ({} runtime), {}/{} replicas ready: {}\n",
        d.name,
        state_name(d.state),
        d.runtime,
        d.ready_replicas,
        d.replicas,
        d.status_message
    );
    let _ = writeln!(
        out,
        "{:>4} {:<11} {:<12} {:>8} {:<5} {:<28} REASON",
        "#", "STATE", "HOST", "RESTARTS", "GPUS", "ENDPOINTS"
    );
    for r in &d.replica_status {
        let endpoints: Vec<String> = r
            .endpoints
            .iter()
            .map(|e| format!("{}={}://{}", e.name, e.protocol, e.address))
            .collect();
        let gpus = if r.gpus.is_empty() {
            "-".to_string()
        } else {
            r.gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            out,
            "{:>4} {:<11} {:<12} {:>8} {:<5} {:<28} {}",
            r.index,
            replica_state_name(r.state),
            r.host,
            r.restarts,
            gpus,
            endpoints.join(","),
            r.reason
        );
    }
    if !d.history.is_empty() {
        out.push_str("last transitions:\n");
        for transition in &d.history {
            let _ = writeln!(out, "  {}", transition.message);
        }
    }
    out
}

pub fn state_name(state: i32) -> String {
    DeploymentState::try_from(state).map_or_else(
        |_| format!("state-{state}"),
        |s| {
            s.as_str_name()
                .trim_start_matches("DEPLOYMENT_STATE_")
                .to_lowercase()
        },
    )
}

fn replica_state_name(state: i32) -> String {
    ReplicaState::try_from(state).map_or_else(
        |_| format!("state-{state}"),
        |s| {
            s.as_str_name()
                .trim_start_matches("REPLICA_STATE_")
                .to_lowercase()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_line_shows_its_endpoints_and_reason() {
        let deployment = Deployment {
            name: "web".into(),
            state: DeploymentState::Running as i32,
            replicas: 1,
            ready_replicas: 1,
            runtime: "process".into(),
            status_message: "1 of 1 replicas running".into(),
            replica_status: vec![Replica {
                index: 0,
                host: "gpu-01".into(),
                state: ReplicaState::Running as i32,
                restarts: 2,
                gpus: vec![0, 3],
                reason: "running and healthy".into(),
                endpoints: vec![Endpoint {
                    name: "http".into(),
                    protocol: "http".into(),
                    address: "10.0.0.2:20001".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = describe(&deployment);
        assert!(text.starts_with("web running (process runtime), 1/1 replicas ready"));
        let line = text.lines().nth(2).unwrap();
        assert!(
            line.contains("running") && line.contains("gpu-01"),
            "{line}"
        );
        assert!(line.contains("http=http://10.0.0.2:20001"), "{line}");
        assert!(line.contains(" 0,3 "), "its GPUs: {line}");
        assert!(line.ends_with("running and healthy"), "{line}");
    }
}
