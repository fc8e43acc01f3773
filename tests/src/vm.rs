//! A real VM for the tests: a libvirt daemon with a qemu driver and its
//! `default` network, the static exec shim, and the boot disk
//! scripts/vm/build-test-image.sh makes from what is installed here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The URI of a libvirt daemon with a qemu driver that can boot a VM here,
/// or why there is none.
pub fn hypervisor() -> Result<String, String> {
    crate::parts::on_path("qemu-system-x86_64")
        .map_err(|e| format!("{e} (Debian: qemu-system-x86)"))?;
    let uri = match std::env::var("BERTH_TEST_LIBVIRT_URI") {
        Ok(uri) => uri,
        Err(_)
            if Path::new("/run/libvirt/libvirt-sock").exists()
                || Path::new("/run/libvirt/virtqemud-sock").exists() =>
        {
            "qemu:///system".to_string()
        }
        Err(_) => {
            return Err("no libvirt daemon: no /run/libvirt/libvirt-sock or virtqemud-sock (scripts/setup/libvirtd.sh starts one), and BERTH_TEST_LIBVIRT_URI is not set".into());
        }
    };
    // The guest asks libvirt's NAT network for its address.
    let info = Command::new("virsh")
        .args(["-c", &uri, "net-info", "default"])
        .output()
        .map_err(|e| format!("cannot run virsh: {e} (Debian: libvirt-clients)"))?;
    let active = String::from_utf8_lossy(&info.stdout)
        .lines()
        .any(|line| line.starts_with("Active:") && line.ends_with("yes"));
    if !active {
        return Err(format!(
            "libvirt's `default` network is not active on {uri} (scripts/setup/libvirtd.sh starts it; it needs dnsmasq-base)"
        ));
    }
    Ok(uri)
}

/// A temporary directory for an agent's VMs: qemu runs as libvirt-qemu and
/// must reach the overlays and the console logs made in it.
pub fn vm_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("a directory libvirt-qemu can enter");
    dir
}

/// The exec shim as a static binary (the guest, and a container without a
/// C library, run it), built into a target directory of its own under
/// `target_tmpdir` (the calling test crate's `CARGO_TARGET_TMPDIR`).
pub fn static_exec_shim(target_tmpdir: &Path) -> Result<PathBuf, String> {
    let root = crate::repo_root();
    let target = target_tmpdir.join("exec-shim");
    let triple = "x86_64-unknown-linux-gnu";
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "-p",
            "berth-exec-shim",
            "--target",
            triple,
        ])
        .arg("--target-dir")
        .arg(&target)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the static exec shim failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(target.join(triple).join("release/berth-exec-shim"))
}

/// The test VM's disk, built by scripts/vm/build-test-image.sh in `dir` from
/// what is installed here (Debian's kernel, busybox, syslinux) and the static
/// exec shim: its /init prints `berth-guest-up …` on the serial console,
/// then serves execs on the virtio-serial port `dev.berth.shim`.
pub fn boot_image(dir: &Path, target_tmpdir: &Path) -> Result<PathBuf, String> {
    let shim = static_exec_shim(target_tmpdir)?;
    build_image(dir, &["--shim".as_ref(), shim.as_os_str()])
}

/// The test VM's disk without the exec shim and with Debian's qemu guest
/// agent (qemu-guest-agent) serving its virtio-serial port instead: an
/// image the agent reaches only through the guest agent.
pub fn guest_agent_image(dir: &Path) -> Result<PathBuf, String> {
    build_image(dir, &["--guest-agent".as_ref()])
}

fn build_image(dir: &Path, args: &[&std::ffi::OsStr]) -> Result<PathBuf, String> {
    let script = crate::repo_root().join("scripts/vm/build-test-image.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(dir.join("base.qcow2"))
}

/// The system libvirtd stopped until [`StoppedLibvirtd::start`] or the drop
/// starts it again (as scripts/setup/libvirtd.sh does): for tests of an
/// agent whose daemon goes away mid-run. Running VMs stay up (qemu does not
/// need libvirtd), and libvirtd takes them back when it starts. Other users
/// of the daemon on this host see it gone meanwhile.
pub struct StoppedLibvirtd {
    systemd: bool,
    started: bool,
}

/// The units that would start libvirtd again on the next connection.
const LIBVIRTD_UNITS: [&str; 4] = [
    "libvirtd.service",
    "libvirtd.socket",
    "libvirtd-ro.socket",
    "libvirtd-admin.socket",
];

fn libvirtd_pid() -> Option<String> {
    let found = Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .output()
        .ok()?;
    let pid = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (!pid.is_empty()).then_some(pid)
}

fn libvirtd_answers() -> bool {
    Command::new("virsh")
        .args(["-c", "qemu:///system", "-q", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Waits up to 10 s for `done`.
fn wait_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    done()
}

pub fn stop_libvirtd() -> Result<StoppedLibvirtd, String> {
    let systemd = std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd");
    if systemd {
        let stopped = Command::new("systemctl")
            .arg("stop")
            .args(LIBVIRTD_UNITS)
            .status()
            .map_err(|e| format!("systemctl: {e}"))?;
        if !stopped.success() {
            return Err(format!("systemctl stop libvirtd: {stopped}"));
        }
    } else {
        let pid = libvirtd_pid().ok_or("no libvirtd process to stop")?;
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if !killed.success() {
            return Err(format!("kill -TERM {pid}: {killed}"));
        }
    }
    let stopped = StoppedLibvirtd {
        systemd,
        started: false,
    };
    if !wait_until(|| libvirtd_pid().is_none()) {
        return Err("libvirtd did not exit within 10 s of SIGTERM".into());
    }
    Ok(stopped)
}

impl StoppedLibvirtd {
    /// Starts libvirtd again and waits until it answers.
    pub fn start(mut self) -> Result<(), String> {
        self.started = true;
        start_libvirtd(self.systemd)
    }
}

fn start_libvirtd(systemd: bool) -> Result<(), String> {
    let status = if systemd {
        Command::new("systemctl")
            .arg("start")
            .args(LIBVIRTD_UNITS.iter().rev())
            .status()
    } else {
        Command::new("libvirtd").arg("-d").status()
    }
    .map_err(|e| format!("starting libvirtd: {e}"))?;
    if !status.success() {
        return Err(format!("starting libvirtd: {status}"));
    }
    if wait_until(libvirtd_answers) {
        Ok(())
    } else {
        Err("libvirtd did not answer within 10 s of its start".into())
    }
}

impl Drop for StoppedLibvirtd {
    fn drop(&mut self) {
        if !self.started
            && let Err(error) = start_libvirtd(self.systemd)
        {
            eprintln!("could not start libvirtd again: {error}");
        }
    }
}
