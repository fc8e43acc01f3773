//! `berth hosts`: list, register and remove the orchestrator's hosts.

use berth_proto::orchestrator::v1::*;

use crate::{CliError, Client, output};

/// `berth hosts`: every registered host.
pub async fn list(client: &mut Client) -> Result<(), CliError> {
    let hosts = client
        .list_hosts(ListHostsRequest::default())
        .await?
        .into_inner();
    print!("{}", output::hosts(&hosts.hosts));
    Ok(())
}

/// `berth hosts add`: registers the host and prints it; `labels` are
/// KEY=VALUE, the agent's token is read from `agent_token_env`.
pub async fn add(
    client: &mut Client,
    name: String,
    address: String,
    labels: &[String],
    power_sampler: Option<String>,
    agent_token_env: Option<String>,
) -> Result<(), CliError> {
    let labels = labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::Usage(format!("--label {l}: expected KEY=VALUE")))
        })
        .collect::<Result<_, _>>()?;
    let token = agent_token_env
        .map(|var| std::env::var(var).unwrap_or_default())
        .unwrap_or_default();
    let request = RegisterHostRequest {
        name,
        address,
        token,
        labels,
        power_sampler: power_sampler.unwrap_or_default(),
    };
    let host = client.register_host(request).await?.into_inner();
    print!("{}", output::hosts(&[host]));
    Ok(())
}

/// `berth hosts remove`: forgets the host.
pub async fn remove(client: &mut Client, name: String) -> Result<(), CliError> {
    client
        .deregister_host(DeregisterHostRequest { name })
        .await?;
    Ok(())
}
