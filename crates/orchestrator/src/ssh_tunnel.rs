//! Agents on remote hosts reached through SSH: the agent listens on a unix
//! socket there, and the system `ssh` forwards a local unix socket to it.
//! SSH is the authentication; host keys are checked against known_hosts and
//! an unknown or changed key is refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// `ssh://user@host[:port]/path/to/agent.sock`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub socket: String,
}

impl SshTarget {
    pub fn parse(address: &str) -> Result<Self, String> {
        let rest = address
            .strip_prefix("ssh://")
            .ok_or("expected ssh://user@host[:port]/path/agent.sock")?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or("missing the agent's socket path after the host")?;
        let (user, host_port) = authority
            .split_once('@')
            .ok_or("missing `user@` before the host")?;
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .map_err(|_| format!("`{port}` is not a port"))?,
            ),
            None => (host_port, 22),
        };
        if user.is_empty() || host.is_empty() || path.is_empty() {
            return Err("expected ssh://user@host[:port]/path/agent.sock".into());
        }
        Ok(Self {
            user: user.into(),
            host: host.into(),
            port,
            socket: format!("/{path}"),
        })
    }
}

/// How the orchestrator runs `ssh`: the `[ssh]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// The ssh client program.
    pub program: PathBuf,
    /// known_hosts file the hosts' keys are checked against; empty: ssh's default.
    pub known_hosts: PathBuf,
    /// Private key to log in with; empty: ssh's default identities.
    pub identity: PathBuf,
    /// Where the local ends of tunnels are made.
    pub tunnel_dir: PathBuf,
    /// Longest wait for a tunnel to come up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            program: PathBuf::from("ssh"),
            known_hosts: PathBuf::new(),
            identity: PathBuf::new(),
            tunnel_dir: berth_server::config::data_dir()
                .join("orchestrator")
                .join("tunnels"),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A running `ssh -L local.sock:remote.sock`; killed when dropped.
pub struct SshTunnel {
    local: PathBuf,
    child: Child,
}

impl std::fmt::Debug for SshTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTunnel")
            .field("local", &self.local)
            .finish()
    }
}

impl SshTunnel {
    /// Starts the tunnel and waits until its local socket exists. Errors
    /// carry ssh's own message ("Host key verification failed.", …).
    pub async fn open(name: &str, target: &SshTarget, config: &SshConfig) -> Result<Self, String> {
        std::fs::create_dir_all(&config.tunnel_dir)
            .map_err(|e| format!("{}: {e}", config.tunnel_dir.display()))?;
        let local = config.tunnel_dir.join(format!("{name}.sock"));
        let pid_file = config.tunnel_dir.join(format!("{name}.pid"));
        let log_file = config.tunnel_dir.join(format!("{name}.log"));
        kill_stale(&pid_file, &local);
        let _ = std::fs::remove_file(&local);
        // ssh's messages go to a file, not a pipe: an ssh that outlives a
        // crashed orchestrator must not hold its parent's streams open.
        let log =
            std::fs::File::create(&log_file).map_err(|e| format!("{}: {e}", log_file.display()))?;
        let mut command = Command::new(&config.program);
        command
            .args([
                "-N",
                "-T",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .args([
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=2",
                "-o",
                "StreamLocalBindUnlink=yes",
            ])
            .arg("-o")
            .arg(format!(
                "ConnectTimeout={}",
                config.connect_timeout.as_secs().max(1)
            ))
            .arg("-p")
            .arg(target.port.to_string())
            .arg("-L")
            .arg(format!("{}:{}", local.display(), target.socket));
        if !config.known_hosts.as_os_str().is_empty() {
            command.arg("-o").arg(format!(
                "UserKnownHostsFile={}",
                config.known_hosts.display()
            ));
        }
        if !config.identity.as_os_str().is_empty() {
            command
                .arg("-i")
                .arg(&config.identity)
                .args(["-o", "IdentitiesOnly=yes"]);
        }
        command
            .arg(format!("{}@{}", target.user, target.host))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", config.program.display()))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&pid_file, pid.to_string());
        }
        let deadline = Instant::now() + config.connect_timeout;
        loop {
            if local.exists() {
                return Ok(Self { local, child });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(&log_file).unwrap_or_default();
                let said = said
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                return Err(format!(
                    "ssh to {}@{}:{} failed ({status}): {}",
                    target.user,
                    target.host,
                    target.port,
                    said.trim()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ssh to {}:{}: no tunnel after {:?}",
                    target.host, target.port, config.connect_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn local_socket(&self) -> &Path {
        &self.local
    }

    /// False once ssh has exited (connection lost): the tunnel must be made again.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for SshTunnel {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.local);
    }
}

/// An ssh left by an orchestrator that was killed still forwards the same
/// socket: end it before making a new tunnel.
fn kill_stale(pid_file: &Path, local: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*local.to_string_lossy());
    if ours {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = std::fs::remove_file(pid_file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ssh_addresses() {
        let target = SshTarget::parse("ssh://berth@gpu-01:2222/run/berth/agent.sock").unwrap();
        assert_eq!(
            target,
            SshTarget {
                user: "berth".into(),
                host: "gpu-01".into(),
                port: 2222,
                socket: "/run/berth/agent.sock".into()
            }
        );
        assert_eq!(
            SshTarget::parse("ssh://root@10.0.0.2/a.sock").unwrap().port,
            22
        );
        for bad in [
            "ssh://gpu-01/a.sock",
            "ssh://u@h:x/a.sock",
            "ssh://u@h",
            "http://u@h/a",
        ] {
            assert!(SshTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_failing_ssh_reports_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = SshConfig {
            program: PathBuf::from("sh"),
            tunnel_dir: dir.path().to_path_buf(),
            connect_timeout: Duration::from_secs(5),
            ..SshConfig::default()
        };
        // `sh -N …` fails at once with sh's complaint, standing in for ssh's.
        let target = SshTarget::parse("ssh://u@h/a.sock").unwrap();
        let error = SshTunnel::open("h", &target, &config).await.unwrap_err();
        assert!(error.contains("ssh to u@h:22 failed"), "{error}");
    }
}
