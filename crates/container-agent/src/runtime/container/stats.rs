//! CPU and memory use of a container from the engine's stats stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::WorkloadStats;
use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::StatsOptionsBuilder;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::engine::{Engine, status_of};
use crate::error::AgentError;

const STATS_BUFFER: usize = 16;

/// One sample (`interval` None) or one per interval until the receiver goes.
/// Engines sample once a second, so shorter intervals get one a second.
pub async fn stream(
    engine: &Arc<Engine>,
    id: &str,
    interval: Option<Duration>,
) -> Result<mpsc::Receiver<WorkloadStats>, AgentError> {
    let docker = engine.client().await?;
    // A single sample is asked without streaming, so that the engine fills
    // in the previous CPU reading and the CPU figure means something.
    let options = StatsOptionsBuilder::new()
        .stream(interval.is_some())
        .build();
    let mut samples = docker.stats(id, Some(options));
    let first = match samples.next().await {
        Some(Ok(sample)) => sample,
        Some(Err(e)) if status_of(&e) == Some(404) => {
            return Err(AgentError::WorkloadNotFound(id.to_string()));
        }
        Some(Err(e)) => return Err(engine.error("stats", e).await),
        None => return Err(AgentError::Internal("engine sent no stats".into())),
    };
    let (tx, rx) = mpsc::channel(STATS_BUFFER);
    tokio::spawn(async move {
        let mut previous = cpu_reading(&first, true);
        if tx
            .send(to_stats(&first, previous, cpu_reading(&first, false)))
            .await
            .is_err()
        {
            return;
        }
        let Some(interval) = interval else { return };
        let mut last_sent = Instant::now();
        loop {
            let sample = tokio::select! {
                sample = samples.next() => sample,
                () = tx.closed() => return,
            };
            let Some(Ok(sample)) = sample else { return };
            if last_sent.elapsed() + Duration::from_millis(100) < interval {
                continue;
            }
            let now = cpu_reading(&sample, false);
            if tx.send(to_stats(&sample, previous, now)).await.is_err() {
                return;
            }
            previous = now;
            last_sent = Instant::now();
        }
    });
    Ok(rx)
}

/// (container CPU ns, system CPU ns, online CPUs), from the sample's current
/// or previous reading.
fn cpu_reading(sample: &ContainerStatsResponse, previous: bool) -> (u64, u64, u32) {
    let cpu = if previous {
        &sample.precpu_stats
    } else {
        &sample.cpu_stats
    };
    cpu.as_ref().map_or((0, 0, 0), |c| {
        (
            c.cpu_usage
                .as_ref()
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            c.system_cpu_usage.unwrap_or(0),
            c.online_cpus.unwrap_or(0),
        )
    })
}

fn to_stats(
    sample: &ContainerStatsResponse,
    before: (u64, u64, u32),
    now: (u64, u64, u32),
) -> WorkloadStats {
    let (cpu_delta, system_delta) = (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    );
    // Cores in use, as `docker stats` computes it (its percentage / 100).
    let cpu_cores = if system_delta > 0 && before.1 > 0 {
        cpu_delta as f64 / system_delta as f64 * f64::from(now.2.max(1))
    } else {
        0.0
    };
    let memory = sample.memory_stats.as_ref();
    // Page cache that can be dropped is not "in use" (as `docker stats` counts).
    let inactive = memory
        .and_then(|m| m.stats.as_ref())
        .and_then(|s| {
            s.get("inactive_file")
                .or_else(|| s.get("total_inactive_file"))
                .copied()
        })
        .unwrap_or(0);
    let usage = memory.and_then(|m| m.usage).unwrap_or(0);
    let limit = memory.and_then(|m| m.limit).unwrap_or(0);
    WorkloadStats {
        time: Some(std::time::SystemTime::now().into()),
        cpu_cores,
        memory_bytes: usage.saturating_sub(inactive),
        // The engine reports the host's memory as the limit of an unlimited container.
        memory_limit_bytes: if limit >= crate::host_info::memory_bytes() {
            0
        } else {
            limit
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from Docker Engine 20.10 (`/v1.41/containers/{id}/stats?stream=false`), trimmed.
    const SAMPLE: &str = r#"{"read":"2026-11-23T05:20:01.5Z","preread":"2026-11-23T05:20:00.5Z",
      "cpu_stats":{"cpu_usage":{"total_usage":3000000000},"system_cpu_usage":200000000000,"online_cpus":2},
      "precpu_stats":{"cpu_usage":{"total_usage":2000000000},"system_cpu_usage":198000000000,"online_cpus":2},
      "memory_stats":{"usage":52428800,"limit":67108864,"stats":{"total_inactive_file":10485760}}}"#;

    #[test]
    fn cpu_and_memory_from_a_sample() {
        let sample: ContainerStatsResponse = serde_json::from_str(SAMPLE).unwrap();
        let stats = to_stats(
            &sample,
            cpu_reading(&sample, true),
            cpu_reading(&sample, false),
        );
        assert!((stats.cpu_cores - 1.0).abs() < 1e-9, "{}", stats.cpu_cores);
        assert_eq!(stats.memory_bytes, 40 << 20);
        assert_eq!(stats.memory_limit_bytes, 64 << 20);
    }
}
