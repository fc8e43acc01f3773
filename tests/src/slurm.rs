//! A real single-node SLURM cluster for the tests, from Debian's packages
//! (22.05): munged with its key and socket in a temporary directory,
//! slurmctld and slurmd on free ports, and slurmrestd (OpenAPI v0.0.38, JWT
//! auth) as `nobody`, since it refuses to run as root. Everything is torn
//! down on drop: the cluster's jobs are cancelled first, then its daemons
//! and whatever still runs with its config are killed.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::parts::{Part, on_path, require};

/// The partition every test cluster has.
pub const PARTITION: &str = "debug";
/// The one node's name, CPUs and memory (MiB), as slurm.conf declares them.
pub const NODE: &str = "berthnode";
pub const NODE_CPUS: u32 = 2;
pub const NODE_MEMORY_MB: u64 = 4000;
/// How long a daemon may take to answer after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The programs a cluster needs, and the package each comes from.
const PROGRAMS: [(&str, &str); 7] = [
    ("munged", "munge"),
    ("slurmctld", "slurmctld"),
    ("slurmd", "slurmd"),
    ("slurmrestd", "slurmrestd"),
    ("srun", "slurm-client"),
    ("scontrol", "slurm-client"),
    ("setpriv", "util-linux"),
];
const JWT_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/slurm-wlm/auth_jwt.so";

/// A running cluster. Its config is `conf`; `rest_url` is slurmrestd's.
pub struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
    rest_port: u16,
    pub rest_url: String,
}

/// A cluster, or None when SLURM is not installed here (the test skips, or
/// fails under CI). A cluster that is installed but does not start fails.
pub fn cluster() -> Option<Cluster> {
    require(Part::Slurm, installed())?;
    Some(Cluster::start().unwrap_or_else(|e| panic!("starting a test SLURM cluster: {e}")))
}

/// Whether the programs and the JWT plugin are here, as root (slurmd runs
/// jobs as their users).
pub fn installed() -> Result<(), String> {
    crate::parts::probe(Part::Root)?;
    for (program, package) in PROGRAMS {
        // The daemons are in /usr/sbin, which a user's PATH may lack.
        if on_path(program).is_err() && !Path::new("/usr/sbin").join(program).exists() {
            return Err(format!("{program} is missing (Debian package {package})"));
        }
    }
    if !Path::new(JWT_PLUGIN).exists() {
        return Err(format!(
            "{JWT_PLUGIN} is missing (Debian package slurm-wlm-jwt-plugin)"
        ));
    }
    Ok(())
}

impl Cluster {
    pub fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        // slurmrestd runs as nobody and reads slurm.conf in here.
        set_mode(dir.path(), 0o755)?;
        let root = dir.path().to_path_buf();
        let path = |name: &str| root.join(name);
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir(path(sub)).map_err(|e| format!("{sub}: {e}"))?;
        }
        write_random(&path("munge.key"), 1024, 0o400)?;
        write_random(&path("jwt.key"), 32, 0o600)?;
        // slurmctld checks SlurmctldHost against the name it runs under.
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| format!("hostname: {e}"))?
            .trim()
            .to_string();
        let (ctld_port, slurmd_port, rest_port) =
            (crate::free_port(), crate::free_port(), crate::free_port());
        let conf = path("slurm.conf");
        let d = root.display();
        // batch_sched_delay=0: a batch job (an array task) is scheduled when
        // it can run, not up to 3 s later, as high-throughput sites set it.
        let text = format!(
            "ClusterName=berthtest\n\
             SlurmctldHost={hostname}(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={slurmd_port}\n\
             SlurmUser=root\n\
             AuthType=auth/munge\n\
             AuthInfo=socket={d}/munge.sock\n\
             CredType=cred/munge\n\
             AuthAltTypes=auth/jwt\n\
             AuthAltParameters=jwt_key={d}/jwt.key\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core_Memory\n\
             DefMemPerCPU=100\n\
             MailProg=/bin/true\n\
             ReturnToService=2\n\
             KillWait=2\n\
             InactiveLimit=0\n\
             MinJobAge=600\n\
             SchedulerParameters=batch_sched_delay=0\n\
             NodeName={NODE} NodeHostname={hostname} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN\n\
             PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("slurm.conf: {e}"))?;
        set_mode(&conf, 0o644)?;
        let mut cluster = Self {
            rest_url: format!("http://127.0.0.1:{rest_port}"),
            rest_port,
            conf,
            daemons: Vec::new(),
            dir,
        };
        cluster.spawn(
            "munged",
            &[
                "-F",
                "--force",
                &format!("--socket={d}/munge.sock"),
                &format!("--key-file={d}/munge.key"),
                &format!("--pid-file={d}/munged.pid"),
                &format!("--seed-file={d}/munge.seed"),
                &format!("--log-file={d}/log/munged.log"),
            ],
            None,
        )?;
        cluster.wait("munged's socket", |_| Ok(path("munge.sock").exists()))?;
        cluster.spawn("slurmctld", &["-D", "-i"], None)?;
        cluster.spawn("slurmd", &["-D", "-N", NODE], None)?;
        cluster.wait("the node to be idle", |cluster| {
            Ok(cluster.client("sinfo", &["-h", "-n", NODE, "-o", "%T"])? == "idle")
        })?;
        cluster.start_rest()?;
        Ok(cluster)
    }

    /// Starts slurmrestd on `rest_url`'s port and waits until it listens:
    /// at start, or again after [`Self::stop_rest`].
    pub fn start_rest(&mut self) -> Result<(), String> {
        let port = self.rest_port;
        self.spawn(
            "slurmrestd",
            &[
                "-s",
                "openapi/v0.0.38",
                "-a",
                "rest_auth/jwt",
                &format!("127.0.0.1:{port}"),
            ],
            Some("nobody"),
        )?;
        self.wait("slurmrestd to listen", |_| {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
    }

    /// slurm.conf, for SLURM's clients (`SLURM_CONF`).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A directory jobs can write to (their output files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A JWT for `user` from `scontrol token`, valid for `lifespan`.
    pub fn token(&self, user: &str, lifespan: Duration) -> String {
        let line = self
            .client(
                "scontrol",
                &[
                    "token",
                    &format!("username={user}"),
                    &format!("lifespan={}", lifespan.as_secs().max(1)),
                ],
            )
            .unwrap_or_else(|e| panic!("scontrol token: {e}"));
        line.strip_prefix("SLURM_JWT=")
            .unwrap_or_else(|| panic!("scontrol token printed `{line}`"))
            .to_string()
    }

    /// Runs a SLURM client (`squeue`, `scontrol`, …) against this cluster:
    /// its stdout, trimmed, or why it failed.
    pub fn client(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let output = Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// The state of job `id` as squeue shows it (`RUNNING`, `PENDING`, …),
    /// empty once slurmctld forgot it.
    pub fn job_state(&self, id: &str) -> String {
        self.client("squeue", &["-h", "-j", id, "-o", "%T"])
            .unwrap_or_default()
    }

    /// The ids of the jobs in the queue (any state slurmctld still keeps).
    pub fn jobs(&self) -> Vec<String> {
        self.client("squeue", &["-h", "-t", "all", "-o", "%i"])
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Stops slurmrestd (kill -9), as a cluster whose REST daemon died.
    pub fn stop_rest(&mut self) {
        if let Some(slot) = self.daemons.iter().position(|(n, _)| *n == "slurmrestd") {
            let (_, mut child) = self.daemons.remove(slot);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(
        &mut self,
        program: &'static str,
        args: &[&str],
        as_user: Option<&str>,
    ) -> Result<(), String> {
        // Appended to: a daemon started again (slurmrestd) keeps the first
        // one's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log").join(format!("{program}.out")))
            .map_err(|e| format!("{program}'s log: {e}"))?;
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = match as_user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={user}"),
                    "--regid=nogroup",
                    "--clear-groups",
                    "--",
                    program,
                ]);
                c
            }
            None => Command::new(program),
        };
        if program == "slurmrestd" {
            // It authenticates each request with its caller's token (the
            // other daemons must not see this: slurmctld would reconfigure).
            command.env("SLURM_JWT", "daemon");
        }
        let child = command
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .env(
                "PATH",
                format!(
                    "/usr/sbin:/usr/bin:/sbin:/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        self.daemons.push((program, child));
        Ok(())
    }

    /// Polls `ready` until it holds; on time out or a dead daemon, the
    /// error carries the daemons' logs.
    fn wait(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&Self) -> Result<bool, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = String::new();
        loop {
            match ready(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = e,
            }
            let dead: Vec<String> = self
                .daemons
                .iter_mut()
                .filter_map(|(name, child)| {
                    child
                        .try_wait()
                        .ok()
                        .flatten()
                        .map(|status| format!("{name} exited ({status})"))
                })
                .collect();
            if !dead.is_empty() || Instant::now() > deadline {
                return Err(format!(
                    "waiting for {what}: {} {last}\n{}",
                    dead.join(", "),
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) else {
            return all;
        };
        for entry in entries.flatten() {
            let mut text = String::new();
            let _ = std::fs::File::open(entry.path()).and_then(|mut f| f.read_to_string(&mut text));
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            all.push_str(&format!("--- {}\n", entry.path().display()));
            for line in tail.into_iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs run under slurmstepd, which outlives slurmd: cancel them while
        // slurmctld can, and wait a little for them to go.
        let _ = self.client("scancel", &["--user=root"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && self
                .client("squeue", &["-h", "-o", "%i"])
                .is_ok_and(|out| !out.is_empty())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_leftovers(&self.conf);
    }
}

/// SIGKILLs every process that still runs with this cluster's config in its
/// environment (a slurmstepd and what it started).
fn kill_leftovers(conf: &Path) {
    let needle = format!("SLURM_CONF={}", conf.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn write_random(path: &Path, bytes: usize, mode: u32) -> Result<(), String> {
    let mut key = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    std::fs::write(path, key).map_err(|e| format!("{}: {e}", path.display()))?;
    set_mode(path, mode)
}
