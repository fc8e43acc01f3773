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
    let script = crate::repo_root().join("scripts/vm/build-test-image.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .arg("--shim")
        .arg(&shim)
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
