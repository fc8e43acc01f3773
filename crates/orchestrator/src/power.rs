//! Energy per run: a session on the host's power sampler opened before the
//! exec and closed after it. Runs that measure power on a host take turns, so
//! each has the host's devices to itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::orchestrator::v1::RunEnergy;
use berth_proto::power::v1::power_sampler_client::PowerSamplerClient;
use berth_proto::power::v1::{DeviceEnergy, StartSessionRequest, StopSessionRequest};
use berth_server::client::AuthChannel;
use tokio::sync::OwnedMutexGuard;

use crate::hosts::describe_status;
use crate::manifest::Power;

type Client = PowerSamplerClient<AuthChannel>;

pub struct PowerMeter {
    clients: Mutex<HashMap<String, Client>>,
    host_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connect_timeout: Duration,
}

/// An open power session; closed (without a result) if dropped unstopped.
pub struct PowerSession {
    id: String,
    client: Client,
    stopped: bool,
    _turn: OwnedMutexGuard<()>,
}

impl PowerMeter {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            clients: Mutex::default(),
            host_turns: Mutex::default(),
            connect_timeout,
        }
    }

    async fn client(&self, address: &str) -> Result<Client, String> {
        let cached = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(address)
            .cloned();
        if let Some(client) = cached {
            return Ok(client);
        }
        let channel = berth_server::client::connect(address, "", self.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let client = PowerSamplerClient::new(channel);
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Waits for the host's turn, then opens a session for `run_id`.
    pub async fn start(
        &self,
        host: &str,
        address: &str,
        run_id: &str,
        power: &Power,
    ) -> Result<PowerSession, String> {
        let host_turn = Arc::clone(
            self.host_turns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(host.to_string())
                .or_default(),
        );
        let turn = host_turn.lock_owned().await;
        let mut client = match self.client(address).await {
            Ok(client) => client,
            Err(reason) => return Err(reason),
        };
        let request = StartSessionRequest {
            run_id: run_id.to_string(),
            devices: power.devices.clone(),
            rate_hz: power.rate_hz,
            idle_baseline: power
                .idle_baseline
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        };
        match client.start_session(request).await {
            Ok(session) => Ok(PowerSession {
                id: session.into_inner().id,
                client,
                stopped: false,
                _turn: turn,
            }),
            Err(status) => {
                self.clients
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(address);
                Err(describe_status(&status))
            }
        }
    }
}

impl PowerSession {
    /// Closes the session and gives the energy per device.
    pub async fn stop(mut self) -> Result<Vec<RunEnergy>, String> {
        self.stopped = true;
        let summary = self
            .client
            .stop_session(StopSessionRequest {
                id: self.id.clone(),
            })
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        Ok(summary.devices.into_iter().map(run_energy).collect())
    }
}

impl Drop for PowerSession {
    fn drop(&mut self) {
        if !self.stopped {
            // The run was interrupted: free the sampler's session, keep nothing.
            let mut client = self.client.clone();
            let id = std::mem::take(&mut self.id);
            tokio::spawn(async move {
                let _ = client.stop_session(StopSessionRequest { id }).await;
            });
        }
    }
}

fn run_energy(device: DeviceEnergy) -> RunEnergy {
    let (energy_j, method) = match (device.energy_counter_j, device.energy_integrated_j) {
        (Some(counter), _) => (counter, "counter"),
        (None, Some(integrated)) => (integrated, "integrated"),
        (None, None) => (0.0, "none"),
    };
    RunEnergy {
        device: device.device,
        energy_j,
        method: method.to_string(),
        mean_w: device.mean_w,
        peak_w: device.peak_w,
        samples: device.samples,
        coverage: device.coverage,
        replay: device.replay,
        energy_net_j: device.energy_net_j,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_energy_is_preferred() {
        let both = DeviceEnergy {
            device: "nvml:0".into(),
            energy_counter_j: Some(10.0),
            energy_integrated_j: Some(9.5),
            ..Default::default()
        };
        let energy = run_energy(both);
        assert_eq!((energy.energy_j, energy.method.as_str()), (10.0, "counter"));
        let integrated = DeviceEnergy {
            energy_integrated_j: Some(3.0),
            ..Default::default()
        };
        assert_eq!(run_energy(integrated).method, "integrated");
    }
}
