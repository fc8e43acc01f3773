//! The one gate for the real parts a test needs (an engine, sshd, libvirt,
//! the model, the LLM peers, …).
//!
//! A test asks for its part with [`require`] (or [`require_part`] for the
//! parts this module can probe itself). When the part is there the test goes
//! on. When it is missing:
//! - on a developer's machine the test skips: it says on the terminal which
//!   part is missing, why and how to get it (written past libtest's capture,
//!   which would swallow it for a passing test), and appends a line to the
//!   skip ledger that `scripts/test.sh` prints at the end;
//! - under `CI=true` or `BERTH_REQUIRE_PEERS=1` the test fails instead, so a
//!   green run means every part ran. `BERTH_ALLOW_MISSING=part,part` names
//!   parts a run knowingly goes without (still skipped and ledgered, never
//!   silent); docs/operations.md lists the ones CI uses and why.

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A real thing a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Running as root (network namespaces, /etc/cdi, sshd host keys).
    Root,
    /// The Docker Engine's socket, answering.
    Docker,
    /// podman's Docker-compatible API service.
    Podman,
    /// The busybox rootfs the test images are made of.
    Busybox,
    /// Debian's docker-compose.
    DockerCompose,
    /// podman-compose.
    PodmanCompose,
    /// OpenSSH's sshd.
    Sshd,
    /// `ip netns` with the right to make namespaces.
    Netns,
    /// libvirt.so.0 and its test driver.
    Libvirt,
    /// qemu-img.
    QemuImg,
    /// genisoimage (or mkisofs/xorriso) for cloud-init seeds.
    IsoImage,
    /// A real VM booted by libvirtd's qemu driver.
    Vm,
    /// systemd-analyze, to verify unit files.
    Systemd,
    /// all-MiniLM-L6-v2 as ONNX and ONNX Runtime's library.
    Model,
    /// llama.cpp's server with SmolLM2 and the LiteLLM proxy.
    LlmPeers,
    /// The official `openai` Python client.
    OpenAiClient,
    /// The official `anthropic` Python client.
    AnthropicClient,
    /// The real grpcurl (Go).
    Grpcurl,
    /// Writing CDI specs into /etc/cdi.
    Cdi,
    /// An engine that records an OOM kill in the container's state.
    OomKill,
    /// Headless Chromium, to open `berth report`'s HTML as a browser does.
    Chromium,
    /// Prometheus's `promtool`, to check the monitoring profile's rules and config.
    Prometheus,
    /// PostgreSQL 15's server binaries (initdb, pg_ctl), for the orchestrator's
    /// PostgreSQL store.
    Postgres,
    /// SLURM 22.05 (slurmctld, slurmd, slurmrestd with JWT, munge), started by tests/src/slurm.rs.
    Slurm,
    /// [`Part::Slurm`] with job accounting: slurmdbd on a MariaDB of the
    /// test's own, and SLURM's RAPL energy plugin reading a fake counter
    /// (tests/src/slurm.rs, `cluster_with_energy`).
    SlurmAccounting,
}

impl Part {
    /// The name used in messages, the ledger and `BERTH_ALLOW_MISSING`.
    pub fn name(self) -> &'static str {
        match self {
            Part::Root => "root",
            Part::Docker => "docker",
            Part::Podman => "podman",
            Part::Busybox => "busybox",
            Part::DockerCompose => "docker-compose",
            Part::PodmanCompose => "podman-compose",
            Part::Sshd => "sshd",
            Part::Netns => "netns",
            Part::Libvirt => "libvirt",
            Part::QemuImg => "qemu-img",
            Part::IsoImage => "genisoimage",
            Part::Vm => "vm",
            Part::Systemd => "systemd",
            Part::Model => "model",
            Part::LlmPeers => "llm-peers",
            Part::OpenAiClient => "openai-client",
            Part::AnthropicClient => "anthropic-client",
            Part::Grpcurl => "grpcurl",
            Part::Cdi => "cdi",
            Part::OomKill => "oom-kill",
            Part::Chromium => "chromium",
            Part::Prometheus => "prometheus",
            Part::Postgres => "postgresql",
            Part::Slurm => "slurm",
            Part::SlurmAccounting => "slurm-accounting",
        }
    }

    /// How to get the part (scripts/test.sh does all of these as root).
    pub fn how_to_get(self) -> &'static str {
        match self {
            Part::Root => "run the tests as root",
            Part::Docker => "apt-get install docker.io and start the engine",
            Part::Podman => {
                "apt-get install podman runc catatonit fuse-overlayfs; scripts/test.sh starts its API service"
            }
            Part::Busybox => "apt-get install busybox-static",
            Part::DockerCompose => "apt-get install docker-compose",
            Part::PodmanCompose => "apt-get install podman-compose",
            Part::Sshd => "apt-get install openssh-server",
            Part::Netns => "apt-get install iproute2 and run as root",
            Part::Libvirt => "apt-get install libvirt-dev",
            Part::QemuImg => "apt-get install qemu-utils",
            Part::IsoImage => "apt-get install genisoimage",
            Part::Vm => {
                "scripts/setup/debian-packages.sh (qemu-system-x86 at qemu-utils' version, libvirt-daemon-system, \
                 linux-image-amd64, syslinux, mtools, cpio, busybox-static), then scripts/setup/libvirtd.sh"
            }
            Part::Systemd => "apt-get install systemd",
            Part::Model => "scripts/setup-embedding-model.sh",
            Part::LlmPeers | Part::OpenAiClient | Part::AnthropicClient | Part::Grpcurl => {
                "scripts/llm/setup-peers.sh"
            }
            Part::Cdi => "run the tests as root (CDI specs live in /etc/cdi)",
            Part::Chromium => "apt-get install chromium (scripts/setup/debian-packages.sh)",
            Part::Prometheus => "apt-get install prometheus (scripts/setup/debian-packages.sh)",
            Part::Slurm => {
                "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge slurmrestd \
                 slurm-wlm-jwt-plugin (scripts/setup/debian-packages.sh), and run the tests as root"
            }
            Part::SlurmAccounting => {
                "what slurm needs, and apt-get install --no-install-recommends slurmdbd mariadb-server \
                 (scripts/setup/debian-packages.sh); /dev/cpu must exist (the cpuid module)"
            }
            Part::Postgres => "apt-get install postgresql-15 (scripts/setup/debian-packages.sh)",
            Part::OomKill => {
                "for podman, its service started by scripts/images/podman-service.sh (conmon run in the \
                 bundle directory, where podman 4.3.1 looks for conmon 2.1.6's OOM marker)"
            }
        }
    }
}

impl Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `found` when the part is there; otherwise the test skips (None) or, when
/// parts are required, fails naming the part, why it is missing and how to
/// get it.
pub fn require<T, E: Display>(part: Part, found: Result<T, E>) -> Option<T> {
    match found {
        Ok(value) => Some(value),
        Err(why) => {
            skip(part, &why.to_string());
            None
        }
    }
}

/// [`require`] for the parts this module can look for itself.
pub fn require_part(part: Part) -> Option<()> {
    require(part, probe(part))
}

/// Whether `part` is there, for the parts that need no test-specific setting
/// to find.
pub fn probe(part: Part) -> Result<(), String> {
    match part {
        Part::Root => {
            if nix::unistd::Uid::effective().is_root() {
                Ok(())
            } else {
                Err("not running as root".into())
            }
        }
        Part::Docker => {
            let socket = Path::new("/var/run/docker.sock");
            if !socket.exists() {
                return Err(format!("no engine socket at {}", socket.display()));
            }
            succeeds("docker", &["version"]).map_err(|e| format!("the engine does not answer: {e}"))
        }
        Part::DockerCompose => on_path("docker-compose").map(drop),
        Part::PodmanCompose => on_path("podman-compose").map(drop),
        Part::Sshd => {
            let sshd = Path::new("/usr/sbin/sshd");
            if sshd.exists() {
                Ok(())
            } else {
                Err(format!("{} is missing", sshd.display()))
            }
        }
        Part::Netns => {
            probe(Part::Root)?;
            succeeds("ip", &["netns", "list"])
        }
        Part::QemuImg => on_path("qemu-img").map(drop),
        Part::IsoImage => ["genisoimage", "mkisofs", "xorriso"]
            .into_iter()
            .find_map(|program| on_path(program).ok())
            .map(drop)
            .ok_or_else(|| "none of genisoimage, mkisofs or xorriso is on PATH".to_string()),
        Part::Systemd => on_path("systemd-analyze").map(drop),
        Part::Podman => on_path("podman").map(drop),
        Part::Busybox => on_path("busybox").map(drop),
        Part::Chromium => on_path("chromium").map(drop),
        Part::Prometheus => on_path("promtool").map(drop),
        other => Err(format!(
            "{other} has no probe of its own: the test must look for it"
        )),
    }
}

/// Where `program` is on PATH.
pub fn on_path(program: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or_else(|| format!("{program} is not on PATH"))
}

/// Runs `program args…`, Ok when it exits 0.
fn succeeds(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

/// Skips the running test for want of `part` (or fails it when parts are
/// required). The caller returns right after.
pub fn skip(part: Part, why: &str) {
    let test = current_test();
    let message = format!(
        "SKIPPED {test}: needs {part}: {why} (to get it: {})",
        part.how_to_get()
    );
    if is_required(part) {
        panic!(
            "{message}; CI=true or BERTH_REQUIRE_PEERS=1 makes a missing part a failure \
             (BERTH_ALLOW_MISSING={part} would let this run go without it)"
        );
    }
    // Past libtest's capture: a passing test's eprintln! is never shown.
    let _ = writeln!(std::io::stderr().lock(), "{message}");
    let ledger = skip_ledger();
    let line = format!("{test}\t{part}\t{}\n", why.replace(['\t', '\n'], " "));
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ledger)
        .and_then(|mut file| file.write_all(line.as_bytes()));
}

/// Whether a missing `part` fails the run rather than skipping the test.
fn is_required(part: Part) -> bool {
    let set = |name: &str, values: &[&str]| {
        std::env::var(name).is_ok_and(|v| values.contains(&v.trim().to_ascii_lowercase().as_str()))
    };
    let required = set("CI", &["true", "1", "yes"]) || set("BERTH_REQUIRE_PEERS", &["1", "true"]);
    let allowed = std::env::var("BERTH_ALLOW_MISSING").is_ok_and(|list| {
        list.split(',')
            .any(|name| name.trim().eq_ignore_ascii_case(part.name()))
    });
    required && !allowed
}

/// The skip ledger: `$BERTH_SKIP_LEDGER`, else `target/berth-skips.tsv`
/// beside the test binary's profile directory. One line per skip:
/// test, part, why (tab-separated).
pub fn skip_ledger() -> PathBuf {
    if let Some(path) = std::env::var_os("BERTH_SKIP_LEDGER").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test binary> → target/berth-skips.tsv
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("berth-skips.tsv")))
        .unwrap_or_else(|| std::env::temp_dir().join("berth-skips.tsv"))
}

/// The running test's name: libtest names each test's thread after it.
fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => stem,
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("?");
    format!("{binary}::{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_part_passes_its_value_through() {
        assert_eq!(require::<_, String>(Part::Model, Ok(7)), Some(7));
    }

    #[test]
    fn every_part_says_how_to_get_it() {
        for part in [Part::Docker, Part::Vm, Part::Model, Part::Grpcurl] {
            assert!(!part.how_to_get().is_empty());
            assert!(!part.name().contains(' '));
        }
    }
}
