//! What the orchestrator's benches share: settings from the environment,
//! the release binaries, processes that die with the bench, machine
//! readings (RSS, load) and medians, the busybox image.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_berth-orchestrator");

/// A child process killed with SIGKILL when dropped.
pub struct Proc(Child);

impl Proc {
    pub fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn wanted(section: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|only| only.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

pub fn agent_binary() -> PathBuf {
    sibling_binary("berth-agent", "berth-container-agent")
}

/// A binary built next to the orchestrator's (`package` builds it).
pub fn sibling_binary(name: &str, package: &str) -> PathBuf {
    let path = Path::new(ORCHESTRATOR).with_file_name(name);
    if !path.exists() {
        eprintln!(
            "{} is not built: run `cargo build --release -p {package}` first",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// (VmRSS, VmHWM) of a process, in MB.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The busybox rootfs tar of scripts/images/busybox-rootfs.sh, or why not.
pub fn busybox_tar() -> Result<PathBuf, String> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/images/busybox-rootfs.sh");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("images");
    let output = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "could not build the busybox rootfs: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}
