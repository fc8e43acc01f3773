//! Energy per run: a session on the host's power sampler opened before the
//! exec and closed after it. Runs that measure power on a host take turns, so
//! each has the host's devices to itself. A stopped session's samples are
//! read back (up to a bound) to be stored with the run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::{RunEnergy, RunPowerSample};
use berth_proto::power::v1::power_sampler_client::PowerSamplerClient;
use berth_proto::power::v1::{
    DeviceEnergy, GetSeriesRequest, Sample, StartSessionRequest, StopSessionRequest,
    StreamSamplesRequest,
};
use berth_server::client::AuthChannel;
use tokio::sync::OwnedMutexGuard;

use crate::hosts::describe_status;
use crate::manifest::Power;
use crate::protocol::ThermalGate;
use crate::store::PowerSeries;

type Client = PowerSamplerClient<AuthChannel>;

/// Samples asked for per GetSeries call (the most the sampler gives).
const SERIES_PAGE_SIZE: u32 = 10_000;

pub struct PowerMeter {
    clients: Mutex<HashMap<String, Client>>,
    host_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    baselines: Baselines,
    connect_timeout: Duration,
    max_samples_per_run: usize,
}

/// A host's idle power per device, kept for `power.idle_baseline_every`.
#[derive(Debug, Clone)]
struct HostBaseline {
    measured: Instant,
    watts: HashMap<String, f64>,
}

/// Whose baseline: the host, the devices asked for (sorted; empty for all)
/// and how long it was measured.
type BaselineKey = (String, Vec<String>, Duration);

/// The kept baselines, bounded by the hosts × device sets × durations that
/// manifests name.
type Baselines = Arc<Mutex<HashMap<BaselineKey, HostBaseline>>>;

/// Where a run's idle baseline comes from.
enum Baseline {
    /// The sampler measures it before the run (as `power.idle_baseline`
    /// asks, or not at all); kept under the key for later runs with
    /// `power.idle_baseline_every`.
    Measured(Option<BaselineKey>),
    /// The host's, measured earlier: subtracted from this run's energy.
    Reused(HostBaseline),
}

/// An open power session; closed (without a result) if dropped unstopped.
pub struct PowerSession {
    id: String,
    client: Client,
    stopped: bool,
    max_samples: usize,
    /// `power.protocol.rise_time`: left out of the steady-state figures.
    rise_time: Option<Duration>,
    /// Why the thermal gate let the run start hot, if it did.
    hot_start: Option<String>,
    baseline: Baseline,
    baselines: Baselines,
    _turn: OwnedMutexGuard<()>,
}

/// What a stopped session measured.
pub struct PowerRecord {
    pub energy: Vec<RunEnergy>,
    pub series: PowerSeries,
}

impl PowerMeter {
    pub fn new(connect_timeout: Duration, max_samples_per_run: usize) -> Self {
        Self {
            clients: Mutex::default(),
            host_turns: Mutex::default(),
            baselines: Baselines::default(),
            connect_timeout,
            max_samples_per_run,
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
        backend_devices: &[String],
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
        // The manifest's devices; else the backend's; else all.
        let devices = if power.devices.is_empty() {
            backend_devices.to_vec()
        } else {
            power.devices.clone()
        };
        let hot_start = match power.protocol.as_ref().and_then(|p| p.thermal_gate) {
            Some(gate) => wait_until_cool(&mut client, run_id, &devices, gate).await?,
            None => None,
        };
        let baseline = self.baseline_for(host, &devices, power);
        let idle_baseline = match baseline {
            Baseline::Reused(_) => None,
            Baseline::Measured(_) => power.idle_baseline,
        };
        let request = StartSessionRequest {
            run_id: run_id.to_string(),
            devices,
            rate_hz: power.rate_hz,
            idle_baseline: idle_baseline.and_then(|d| prost_types::Duration::try_from(d).ok()),
        };
        match client.start_session(request).await {
            Ok(session) => Ok(PowerSession {
                id: session.into_inner().id,
                client,
                stopped: false,
                max_samples: self.max_samples_per_run,
                rise_time: power.protocol.as_ref().and_then(|p| p.rise_time),
                hot_start,
                baseline,
                baselines: Arc::clone(&self.baselines),
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

impl PowerMeter {
    /// With `power.idle_baseline_every`, the host's kept baseline while it
    /// is younger than that; else one to measure (and keep).
    fn baseline_for(&self, host: &str, devices: &[String], power: &Power) -> Baseline {
        let (Some(duration), Some(every)) = (power.idle_baseline, power.idle_baseline_every) else {
            return Baseline::Measured(None);
        };
        let mut devices = devices.to_vec();
        devices.sort();
        let key = (host.to_string(), devices, duration);
        let kept = self
            .baselines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .filter(|kept| kept.measured.elapsed() < every)
            .cloned();
        match kept {
            Some(kept) => Baseline::Reused(kept),
            None => Baseline::Measured(Some(key)),
        }
    }
}

/// The thermal gate: a short session on the run's devices whose samples
/// are read until every device reporting a temperature is at or under
/// `below_c`; `Some(why)` when `max_wait` passed first (the run starts
/// anyway, flagged `hot_start`).
async fn wait_until_cool(
    client: &mut Client,
    run_id: &str,
    devices: &[String],
    gate: ThermalGate,
) -> Result<Option<String>, String> {
    let session = client
        .start_session(StartSessionRequest {
            run_id: format!("{run_id}/thermal-gate"),
            devices: devices.to_vec(),
            rate_hz: GATE_RATE_HZ,
            idle_baseline: None,
        })
        .await
        .map_err(|status| format!("thermal gate: {}", describe_status(&status)))?
        .into_inner();
    let started = std::time::Instant::now();
    let read = read_until_cool(client, &session.id, gate);
    let outcome = match tokio::time::timeout(gate.max_wait, read).await {
        Ok(Ok(())) => Ok(None),
        Ok(Err(reason)) => Err(format!("thermal gate: {reason}")),
        Err(_) => Ok(Some(format!(
            "still above {} °C after {:?}",
            gate.below_c, gate.max_wait
        ))),
    };
    let _ = client
        .stop_session(StopSessionRequest { id: session.id })
        .await;
    match &outcome {
        Ok(Some(why)) => tracing::warn!(run = run_id, why, "thermal gate: the run starts hot"),
        Ok(None) => {
            tracing::debug!(run = run_id, waited = ?started.elapsed(), "thermal gate passed")
        }
        Err(_) => {}
    }
    outcome
}

/// Samples the gate reads per second (temperatures change slowly; the
/// sampler reads them at most every 100 ms).
const GATE_RATE_HZ: f64 = 20.0;

async fn read_until_cool(
    client: &mut Client,
    session_id: &str,
    gate: ThermalGate,
) -> Result<(), String> {
    let mut stream = client
        .stream_samples(StreamSamplesRequest {
            session_id: session_id.to_string(),
        })
        .await
        .map_err(|status| describe_status(&status))?
        .into_inner();
    let mut latest: HashMap<String, f64> = HashMap::new();
    loop {
        match stream.message().await {
            Ok(Some(sample)) => {
                if let Some(celsius) = sample.temperature_c {
                    latest.insert(sample.device, celsius);
                }
                if !latest.is_empty() && latest.values().all(|c| *c <= gate.below_c) {
                    return Ok(());
                }
            }
            Ok(None) => return Err("the power sampler ended the stream".into()),
            Err(status) => return Err(describe_status(&status)),
        }
    }
}

impl PowerSession {
    /// Closes the session and gives the energy per device and its first
    /// `max_samples` samples.
    pub async fn stop(mut self) -> Result<PowerRecord, String> {
        self.stopped = true;
        let summary = self
            .client
            .stop_session(StopSessionRequest {
                id: self.id.clone(),
            })
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        let series = self.series().await?;
        let mut devices = summary.devices;
        let baseline_age_s = match &self.baseline {
            Baseline::Measured(key) => {
                if let Some(key) = key {
                    self.keep_baseline(key.clone(), &devices);
                }
                0.0
            }
            Baseline::Reused(kept) => {
                for device in &mut devices {
                    subtract_baseline(device, kept);
                }
                kept.measured.elapsed().as_secs_f64()
            }
        };
        let mut energy: Vec<RunEnergy> = devices
            .into_iter()
            .map(|device| run_energy(device, baseline_age_s))
            .collect();
        crate::quality::assess(&mut energy, &series, self.rise_time);
        if self.hot_start.is_some() {
            for device in &mut energy {
                device
                    .quality_flags
                    .push(crate::quality::HOT_START.to_string());
            }
        }
        Ok(PowerRecord { energy, series })
    }

    /// The idle power the sampler measured before this run, kept as the
    /// host's for the runs of the next `idle_baseline_every`.
    fn keep_baseline(&self, key: BaselineKey, devices: &[DeviceEnergy]) {
        let watts: HashMap<String, f64> = devices
            .iter()
            .filter_map(|d| Some((d.device.clone(), d.idle_baseline_w?)))
            .collect();
        if watts.is_empty() {
            return;
        }
        let measured = Instant::now();
        self.baselines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, HostBaseline { measured, watts });
    }

    /// Pages through the stopped session's samples until `max_samples`.
    async fn series(&mut self) -> Result<PowerSeries, String> {
        let mut series = PowerSeries::default();
        let mut page_token = String::new();
        loop {
            let page = self
                .client
                .get_series(GetSeriesRequest {
                    session_id: self.id.clone(),
                    device: String::new(),
                    page_size: SERIES_PAGE_SIZE,
                    page_token,
                })
                .await
                .map_err(|status| describe_status(&status))?
                .into_inner();
            let more_pages = !page.next_page_token.is_empty();
            if keep_page(&mut series, page.samples, more_pages, self.max_samples) {
                return Ok(series);
            }
            page_token = page.next_page_token;
        }
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

/// A kept baseline subtracted as the sampler subtracts its own: idle power
/// over the device's span.
fn subtract_baseline(device: &mut DeviceEnergy, kept: &HostBaseline) {
    let Some(&watts) = kept.watts.get(&device.device) else {
        return;
    };
    let span_s = device.span.map_or(0.0, |span| {
        span.seconds as f64 + f64::from(span.nanos) * 1e-9
    });
    device.idle_baseline_w = Some(watts);
    device.energy_net_j = device
        .energy_counter_j
        .or(device.energy_integrated_j)
        .map(|energy| energy - watts * span_s);
}

/// The run's figures for one device. A device that gave no reading has no
/// energy: absent, never 0 J, so that no sum or mean takes it for one.
fn run_energy(device: DeviceEnergy, baseline_age_s: f64) -> RunEnergy {
    let (energy_j, method) = match (device.energy_counter_j, device.energy_integrated_j) {
        (Some(counter), _) => (Some(counter), "counter"),
        (None, Some(integrated)) => (Some(integrated), "integrated"),
        (None, None) => (None, "none"),
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
        idle_baseline_age_s: device.idle_baseline_w.map(|_| baseline_age_s),
        idle_baseline_w: device.idle_baseline_w,
        // Judged from the stored samples (`quality::assess`).
        ..Default::default()
    }
}

/// Adds a page of samples to `series` up to `max_samples`; true when the
/// series is complete (no more pages, or full, marked truncated if samples
/// were left out).
fn keep_page(
    series: &mut PowerSeries,
    page: Vec<Sample>,
    more_pages: bool,
    max_samples: usize,
) -> bool {
    let room = max_samples.saturating_sub(series.samples.len());
    let page_overflows = page.len() > room;
    series
        .samples
        .extend(page.into_iter().take(room).map(run_power_sample));
    let full = series.samples.len() >= max_samples;
    if !more_pages || full {
        series.truncated = page_overflows || (full && more_pages);
        return true;
    }
    false
}

fn run_power_sample(sample: Sample) -> RunPowerSample {
    RunPowerSample {
        device: sample.device,
        time: sample.time,
        elapsed: sample.elapsed,
        power_w: sample.power_w,
        energy_j: sample.energy_j,
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
        let energy = run_energy(both, 0.0);
        assert_eq!(
            (energy.energy_j, energy.method.as_str()),
            (Some(10.0), "counter")
        );
        let integrated = DeviceEnergy {
            energy_integrated_j: Some(3.0),
            ..Default::default()
        };
        assert_eq!(run_energy(integrated, 0.0).method, "integrated");
    }

    #[test]
    fn a_device_without_readings_has_no_energy_rather_than_zero() {
        let silent = DeviceEnergy {
            device: "nvml:1".into(),
            samples: 0,
            ..Default::default()
        };
        let energy = run_energy(silent, 0.0);
        assert_eq!((energy.energy_j, energy.method.as_str()), (None, "none"));
    }

    #[test]
    fn a_kept_baseline_is_subtracted_over_the_device_s_span() {
        let kept = HostBaseline {
            measured: Instant::now(),
            watts: HashMap::from([("nvml:0".to_string(), 50.0)]),
        };
        let mut measured = DeviceEnergy {
            device: "nvml:0".into(),
            energy_counter_j: Some(300.0),
            span: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        subtract_baseline(&mut measured, &kept);
        let energy = run_energy(measured, 30.0);
        assert_eq!(
            (
                energy.energy_net_j,
                energy.idle_baseline_w,
                energy.idle_baseline_age_s
            ),
            (Some(175.0), Some(50.0), Some(30.0))
        );
        // A device the kept baseline does not know keeps no net figure.
        let mut other = DeviceEnergy {
            device: "rapl:package-0".into(),
            energy_counter_j: Some(10.0),
            ..Default::default()
        };
        subtract_baseline(&mut other, &kept);
        assert_eq!((other.energy_net_j, other.idle_baseline_w), (None, None));
    }

    fn samples(count: usize) -> Vec<Sample> {
        (0..count)
            .map(|i| Sample {
                device: format!("d{i}"),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn series_stops_at_the_bound_and_says_it_was_cut() {
        let mut series = PowerSeries::default();
        assert!(!keep_page(&mut series, samples(3), true, 5));
        assert!(keep_page(&mut series, samples(3), true, 5));
        assert_eq!((series.samples.len(), series.truncated), (5, true));

        // Exactly full on the last page: nothing was left out.
        let mut series = PowerSeries::default();
        assert!(!keep_page(&mut series, samples(3), true, 5));
        assert!(keep_page(&mut series, samples(2), false, 5));
        assert_eq!((series.samples.len(), series.truncated), (5, false));

        // Full, but the sampler has another page.
        let mut series = PowerSeries::default();
        assert!(keep_page(&mut series, samples(5), true, 5));
        assert!(series.truncated);
    }
}
