//! A VM's resource use from libvirt's bulk statistics
//! (`virDomainListGetStats`: CPU time, the memory balloon and the qemu
//! process's RSS, block and interface counters), as WorkloadStats.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use berth_proto::agent::v1::WorkloadStats;

use super::ffi::stats_group;

/// The statistics groups a sample asks for.
pub const GROUPS: u32 =
    stats_group::CPU_TOTAL | stats_group::BALLOON | stats_group::INTERFACE | stats_group::BLOCK;
/// What a single sample measures CPU use over: libvirt reports only the
/// CPU time used so far, so a rate needs two readings.
pub const SINGLE_SAMPLE_WINDOW: Duration = Duration::from_millis(200);

/// One reading of a domain's counters.
#[derive(Debug, Clone)]
pub struct Reading {
    at: Instant,
    values: HashMap<String, u64>,
}

impl Reading {
    pub fn new(values: HashMap<String, u64>) -> Self {
        Self {
            at: Instant::now(),
            values,
        }
    }

    fn get(&self, name: &str) -> Option<u64> {
        self.values.get(name).copied()
    }

    /// `<group>.<i>.<counter>` summed over the group's `<group>.count`
    /// devices; absent when libvirt reports no such device.
    fn sum(&self, group: &str, counter: &str) -> Option<u64> {
        let count = self.get(&format!("{group}.count")).filter(|n| *n > 0)?;
        Some(
            (0..count)
                .filter_map(|index| self.get(&format!("{group}.{index}.{counter}")))
                .sum(),
        )
    }
}

/// The sample `now` makes with the reading before it.
pub fn sample(before: &Reading, now: &Reading) -> WorkloadStats {
    let elapsed = now.at.saturating_duration_since(before.at).as_secs_f64();
    let cpu_ns = now
        .get("cpu.time")
        .unwrap_or(0)
        .saturating_sub(before.get("cpu.time").unwrap_or(0));
    let kib = |name: &str| now.get(name).unwrap_or(0) * 1024;
    WorkloadStats {
        time: Some(SystemTime::now().into()),
        cpu_cores: if elapsed > 0.0 {
            cpu_ns as f64 / 1e9 / elapsed
        } else {
            0.0
        },
        // The host memory the VM takes (its qemu process's resident set):
        // what it costs the host whatever the guest does inside.
        memory_bytes: kib("balloon.rss"),
        // What the guest has now: its balloon's size.
        memory_limit_bytes: kib("balloon.current"),
        block_read_bytes: now.sum("block", "rd.bytes"),
        block_write_bytes: now.sum("block", "wr.bytes"),
        network_rx_bytes: now.sum("net", "rx.bytes"),
        network_tx_bytes: now.sum("net", "tx.bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_become_a_sample() {
        let values = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<HashMap<_, _>>()
        };
        let before = Reading::new(values(&[("cpu.time", 1_000_000_000)]));
        let mut now = Reading::new(values(&[
            ("cpu.time", 1_500_000_000),
            ("balloon.rss", 1000),
            ("balloon.current", 262_144),
            ("block.count", 2),
            ("block.0.rd.bytes", 10),
            ("block.1.rd.bytes", 5),
            ("block.0.wr.bytes", 7),
            ("net.count", 0),
        ]));
        now.at = before.at + Duration::from_secs(1);
        let stats = sample(&before, &now);
        assert!((stats.cpu_cores - 0.5).abs() < 1e-9, "{}", stats.cpu_cores);
        assert_eq!(stats.memory_bytes, 1000 * 1024);
        assert_eq!(stats.memory_limit_bytes, 256 << 20);
        assert_eq!(stats.block_read_bytes, Some(15));
        assert_eq!(stats.block_write_bytes, Some(7));
        assert_eq!(stats.network_rx_bytes, None, "a VM without a NIC");
    }
}
