//! What this host is: name, CPUs, memory, OS.

use berth_proto::agent::v1::HostInfo;

pub fn probe() -> HostInfo {
    HostInfo {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: mem_total_bytes().unwrap_or(0),
        os: format!(
            "{} {}",
            std::env::consts::OS,
            kernel_release().unwrap_or_default()
        ),
        ..Default::default()
    }
}

fn mem_total_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn kernel_release() -> Option<String> {
    Some(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()?
            .trim()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn probes_this_host() {
        let info = super::probe();
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > 0);
        assert!(!info.hostname.is_empty());
    }
}
