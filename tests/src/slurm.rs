//! A real single-node SLURM cluster for the tests, from Debian's packages
//! (22.05): munged with its key and socket in a temporary directory,
//! slurmctld and slurmd on free ports, and slurmrestd (OpenAPI v0.0.38, JWT
//! auth) as `nobody`, since it refuses to run as root. A cluster from
//! [`cluster_with_energy`] also keeps job accounting (slurmdbd on a MariaDB
//! of its own) and has SLURM's RAPL energy plugin read a fake counter.
//! Everything is torn down on drop: the cluster's jobs are cancelled first,
//! then its daemons and whatever still runs with its config are killed.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
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
/// What a cluster with accounting and energy needs besides those.
const ACCOUNTING_PROGRAMS: [(&str, &str); 4] = [
    ("slurmdbd", "slurmdbd"),
    ("sacct", "slurm-client"),
    ("mariadb-install-db", "mariadb-server"),
    ("unshare", "util-linux"),
];
/// MariaDB's server: its name, then the older one it still answers to.
const DB_SERVERS: [&str; 2] = ["mariadbd", "mysqld"];
/// slurmrestd refuses to run as root.
const AS_NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
    "--",
];

/// A running cluster. Its config is `conf`; `rest_url` is slurmrestd's.
pub struct Cluster {
    /// Declared before `dir`, so that its writer stops before the files it
    /// writes are removed.
    energy: Option<FakeRapl>,
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

/// A cluster with job accounting (`sacct`) whose node draws a constant
/// `watts`, as SLURM's acct_gather_energy/rapl and berth's power sampler
/// (reading [`Cluster::powercap_root`]) both see it through a fake RAPL
/// counter; None when its parts are not installed here, as [`cluster`].
pub fn cluster_with_energy(watts: f64) -> Option<Cluster> {
    require(Part::SlurmAccounting, accounting_installed())?;
    Some(Cluster::start_with(Some(watts)).unwrap_or_else(|e| {
        panic!("starting a test SLURM cluster with accounting and energy: {e}")
    }))
}

/// Whether the programs and the JWT plugin are here, as root (slurmd runs
/// jobs as their users).
pub fn installed() -> Result<(), String> {
    crate::parts::probe(Part::Root)?;
    for (program, package) in PROGRAMS {
        if !is_installed(program) {
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

/// [`installed`], and what accounting and the fake energy counter need:
/// slurmdbd, sacct, MariaDB, and a /dev/cpu to mount the fake over.
pub fn accounting_installed() -> Result<(), String> {
    installed()?;
    for (program, package) in ACCOUNTING_PROGRAMS {
        if !is_installed(program) {
            return Err(format!("{program} is missing (Debian package {package})"));
        }
    }
    db_server()?;
    if !Path::new("/dev/cpu").is_dir() {
        return Err("/dev/cpu is missing (the fake RAPL counter is mounted over it)".into());
    }
    Ok(())
}

/// Whether `program` is on PATH or in /usr/sbin, where the daemons are
/// and which a user's PATH may lack.
fn is_installed(program: &str) -> bool {
    on_path(program).is_ok() || Path::new("/usr/sbin").join(program).exists()
}

/// MariaDB's server program.
fn db_server() -> Result<&'static str, String> {
    DB_SERVERS
        .into_iter()
        .find(|program| is_installed(program))
        .ok_or_else(|| "mariadbd is missing (Debian package mariadb-server)".to_string())
}

impl Cluster {
    /// A plain cluster: no accounting, no energy plugin.
    pub fn start() -> Result<Self, String> {
        Self::start_with(None)
    }

    /// With `watts`, the cluster of [`cluster_with_energy`].
    fn start_with(watts: Option<f64>) -> Result<Self, String> {
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
        // (MariaDB's port, slurmdbd's) for a cluster with accounting.
        let accounting = watts.map(|_| (crate::free_port(), crate::free_port()));
        // slurmdbd's client authenticates with AccountingStoragePass's munge
        // socket, not AuthInfo's. The energy plugin polls the node every
        // second (AcctGatherNodeFreq) and each step's tasks as often.
        let accounting_conf = match accounting {
            Some((_, dbd_port)) => format!(
                "AccountingStorageType=accounting_storage/slurmdbd\n\
                 AccountingStorageHost=127.0.0.1\n\
                 AccountingStoragePort={dbd_port}\n\
                 AccountingStoragePass={d}/munge.sock\n\
                 JobAcctGatherType=jobacct_gather/linux\n\
                 JobAcctGatherFrequency=task=1,energy=1\n\
                 AcctGatherEnergyType=acct_gather_energy/rapl\n\
                 AcctGatherNodeFreq=1\n"
            ),
            None => String::new(),
        };
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
             {accounting_conf}\
             NodeName={NODE} NodeHostname={hostname} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN\n\
             PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("slurm.conf: {e}"))?;
        set_mode(&conf, 0o644)?;
        let energy = watts
            .map(|watts| FakeRapl::start(&root, watts))
            .transpose()?;
        let mut cluster = Self {
            energy,
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
            &[],
        )?;
        cluster.wait("munged's socket", |_| Ok(path("munge.sock").exists()))?;
        if let Some((db_port, dbd_port)) = accounting {
            cluster.start_accounting(db_port, dbd_port)?;
        }
        cluster.spawn("slurmctld", &["-D", "-i"], &[])?;
        // With the fake RAPL counter, slurmd (and the slurmstepds it forks)
        // runs in a mount namespace of its own where the fake's `cpu`
        // directory is /dev/cpu: the host's /dev/cpu is left alone, and the
        // mount goes with the last process in there.
        let cpu = path("cpu").display().to_string();
        let in_fake_dev_cpu = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "mount --bind \"$0\" /dev/cpu && exec \"$@\"",
            &cpu,
        ];
        let wrapper: &[&str] = if cluster.energy.is_some() {
            &in_fake_dev_cpu
        } else {
            &[]
        };
        cluster.spawn("slurmd", &["-D", "-N", NODE], wrapper)?;
        cluster.wait("the node to be idle", |cluster| {
            Ok(cluster.client("sinfo", &["-h", "-n", NODE, "-o", "%T"])? == "idle")
        })?;
        cluster.start_rest()?;
        Ok(cluster)
    }

    /// Starts MariaDB on `db_port` (a throwaway database: no grant tables,
    /// so root needs no password) and slurmdbd on `dbd_port`, storing into
    /// it, and waits until both listen. slurmctld registers the cluster in
    /// slurmdbd itself when it first connects.
    fn start_accounting(&mut self, db_port: u16, dbd_port: u16) -> Result<(), String> {
        let root = self.dir.path().to_path_buf();
        let d = root.display();
        let datadir = format!("--datadir={d}/db");
        let install = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &datadir,
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("mariadb-install-db: {e}"))?;
        if !install.status.success() {
            return Err(format!(
                "mariadb-install-db failed ({}): {}{}",
                install.status,
                String::from_utf8_lossy(&install.stdout),
                String::from_utf8_lossy(&install.stderr)
            ));
        }
        // --no-defaults first: no /etc/mysql config, no system socket.
        self.spawn(
            db_server()?,
            &[
                "--no-defaults",
                &datadir,
                "--user=root",
                "--bind-address=127.0.0.1",
                &format!("--port={db_port}"),
                &format!("--socket={d}/mariadb.sock"),
                &format!("--pid-file={d}/mariadbd.pid"),
                &format!("--log-error={d}/log/mariadbd.log"),
                "--skip-grant-tables",
                "--skip-name-resolve",
            ],
            &[],
        )?;
        self.wait("MariaDB to listen", |_| {
            Ok(TcpStream::connect(("127.0.0.1", db_port)).is_ok())
        })?;
        // slurmdbd reads slurmdbd.conf beside SLURM_CONF, and refuses it
        // unless only its user may read it (it could hold the DB password).
        // DbdHost must be this host's name or `localhost`.
        let dbd_conf = root.join("slurmdbd.conf");
        std::fs::write(
            &dbd_conf,
            format!(
                "AuthType=auth/munge\n\
                 AuthInfo=socket={d}/munge.sock\n\
                 DbdHost=localhost\n\
                 DbdAddr=127.0.0.1\n\
                 DbdPort={dbd_port}\n\
                 SlurmUser=root\n\
                 PidFile={d}/slurmdbd.pid\n\
                 LogFile={d}/log/slurmdbd.log\n\
                 StorageType=accounting_storage/mysql\n\
                 StorageHost=127.0.0.1\n\
                 StoragePort={db_port}\n\
                 StorageUser=root\n\
                 StorageLoc=slurm_acct_db\n"
            ),
        )
        .map_err(|e| format!("slurmdbd.conf: {e}"))?;
        set_mode(&dbd_conf, 0o600)?;
        self.spawn("slurmdbd", &["-D"], &[])?;
        self.wait("slurmdbd to listen", |_| {
            Ok(TcpStream::connect(("127.0.0.1", dbd_port)).is_ok())
        })
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
            &AS_NOBODY,
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

    /// The fake powercap tree (laid out as /sys/class/powercap: zone
    /// `intel-rapl:0`, `package-0`) of a [`cluster_with_energy`], for
    /// berth's power sampler: the same counter SLURM's energy plugin reads.
    pub fn powercap_root(&self) -> Option<&Path> {
        self.energy.as_ref().map(|fake| fake.powercap.as_path())
    }

    /// The constant power the fake RAPL counter of a
    /// [`cluster_with_energy`] reports.
    pub fn fake_watts(&self) -> Option<f64> {
        self.energy.as_ref().map(|fake| fake.watts)
    }

    /// The energy, in joules, that accounting recorded for a job or a step
    /// (`12`, `12.0`, `12.batch`): sacct's ConsumedEnergyRaw. None while
    /// slurmdbd has no value for it, which may be a second or two after
    /// the step ended, and on a cluster without accounting.
    pub fn consumed_energy(&self, job_or_step: &str) -> Option<u64> {
        let job = job_or_step.split('.').next()?;
        let table = self
            .client(
                "sacct",
                &["-n", "-P", "-j", job, "-o", "JobID,ConsumedEnergyRaw"],
            )
            .ok()?;
        table.lines().find_map(|line| {
            let (id, joules) = line.split_once('|')?;
            if id == job_or_step {
                joules.trim().parse().ok()
            } else {
                None
            }
        })
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

    /// Starts `program args…` as a daemon of the cluster, logging into
    /// `log/<program>.out`; through `wrapper` (a command line that ends by
    /// running the program and arguments it is given) when not empty.
    fn spawn(
        &mut self,
        program: &'static str,
        args: &[&str],
        wrapper: &[&str],
    ) -> Result<(), String> {
        // Appended to: a daemon started again (slurmrestd) keeps the first
        // one's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log").join(format!("{program}.out")))
            .map_err(|e| format!("{program}'s log: {e}"))?;
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
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

/// A fake of a RAPL package energy counter, for machines without one (this
/// one has neither /dev/cpu/*/msr nor /sys/class/powercap): a node drawing
/// a constant `watts` since the fake started, its counter written every
/// [`FAKE_RAPL_PERIOD`] into two views of it in the cluster's directory:
/// - `cpu/<n>/msr`, regular files laid out as the msr driver's devices (the
///   file offset is the register), which slurmd sees as /dev/cpu (see
///   [`Cluster::start_with`]). SLURM 22.05's acct_gather_energy/rapl finds
///   the packages in /proc/cpuinfo and reads package 0's registers from its
///   first CPU, 0: the energy unit at 0x606 (it must not be 0, read when
///   slurmd starts), the package's 32-bit counter at 0x611, which it
///   unwraps, and DRAM's at 0x619 (0 here). The other CPUs' files have the
///   unit and no energy, so a second package would add nothing.
/// - `powercap/intel-rapl:0` (`package-0`), for berth's power sampler: the
///   same counter in µJ, written in place at a fixed width as
///   berth_power_sampler's own fake writes it.
struct FakeRapl {
    watts: f64,
    powercap: PathBuf,
    /// Dropped to stop the writer.
    stop: Option<mpsc::Sender<()>>,
    writer: Option<JoinHandle<()>>,
}

/// How often the fake counter is written.
const FAKE_RAPL_PERIOD: Duration = Duration::from_millis(50);
/// MSR_RAPL_POWER_UNIT as Intel CPUs have it: energy in 2^-14 J (bits
/// 12:8), power in 1/8 W (bits 3:0), time in 1/1024 s (bits 19:16).
const FAKE_POWER_UNIT: u64 = 0xA_0E03;
const ENERGY_UNITS_PER_JOULE: f64 = 16384.0;
const MSR_RAPL_POWER_UNIT: u64 = 0x606;
const MSR_PKG_ENERGY_STATUS: u64 = 0x611;
/// The msr files' length: past MSR_DRAM_ENERGY_STATUS (0x619), which then
/// reads as 0.
const MSR_FILE_LEN: u64 = 0x1000;
/// What the kernel reports as the range of a package counter of 32 bits in
/// 2^-14 J; energy_uj wraps past it.
const MAX_ENERGY_RANGE_UJ: u64 = 262_143_999_938;

impl FakeRapl {
    /// Writes both views under `root` with the counter at 0, and starts the
    /// writer.
    fn start(root: &Path, watts: f64) -> Result<Self, String> {
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        let cpus = std::fs::read_dir("/dev/cpu").map_err(|e| io(Path::new("/dev/cpu"), e))?;
        let mut counter = None;
        for cpu in cpus.flatten() {
            let name = cpu.file_name();
            let Some(n) = name.to_str().filter(|n| n.parse::<u32>().is_ok()) else {
                continue;
            };
            let dir = root.join("cpu").join(n);
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let path = dir.join("msr");
            let msr = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            msr.set_len(MSR_FILE_LEN)
                .and_then(|()| {
                    msr.write_all_at(&FAKE_POWER_UNIT.to_le_bytes(), MSR_RAPL_POWER_UNIT)
                })
                .map_err(|e| io(&path, e))?;
            if n == "0" {
                counter = Some(msr);
            }
        }
        let msr = counter.ok_or("/dev/cpu has no CPU 0")?;
        let powercap = root.join("powercap");
        let zone = powercap.join("intel-rapl:0");
        std::fs::create_dir_all(&zone).map_err(|e| io(&zone, e))?;
        for (file, text) in [
            ("name", "package-0\n".to_string()),
            ("max_energy_range_uj", format!("{MAX_ENERGY_RANGE_UJ}\n")),
        ] {
            std::fs::write(zone.join(file), text).map_err(|e| io(&zone.join(file), e))?;
        }
        let path = zone.join("energy_uj");
        let energy_uj = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let write = move |joules: f64| -> std::io::Result<()> {
            let units = (joules * ENERGY_UNITS_PER_JOULE) as u64 % (1 << 32);
            msr.write_all_at(&units.to_le_bytes(), MSR_PKG_ENERGY_STATUS)?;
            let uj = (joules * 1e6) as u64 % (MAX_ENERGY_RANGE_UJ + 1);
            energy_uj.write_all_at(format!("{uj:020}\n").as_bytes(), 0)
        };
        write(0.0).map_err(|e| format!("the fake RAPL counter: {e}"))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let started = Instant::now();
        let writer = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FAKE_RAPL_PERIOD)
            {
                write(watts * started.elapsed().as_secs_f64())
                    .unwrap_or_else(|e| panic!("writing the fake RAPL counter: {e}"));
            }
        });
        Ok(Self {
            watts,
            powercap,
            stop: Some(stop),
            writer: Some(writer),
        })
    }
}

impl Drop for FakeRapl {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// SLURM's RAPL plugin reads the fake counter: a step of `srun sleep 4`
    /// on a node drawing 50 W is accounted about 200 J (0 or no value: the
    /// plugin read nothing), and the powercap view of the same counter
    /// advances at 50 W.
    #[test]
    fn sacct_reports_the_fake_rapl_counter_s_energy_for_a_step() {
        const WATTS: f64 = 50.0;
        let starting = Instant::now();
        let Some(cluster) = cluster_with_energy(WATTS) else {
            return;
        };
        println!(
            "cluster with accounting started in {:.1} s",
            starting.elapsed().as_secs_f64()
        );
        assert_eq!(cluster.fake_watts(), Some(WATTS));
        let counter = cluster
            .powercap_root()
            .expect("a powercap tree")
            .join("intel-rapl:0/energy_uj");
        let read_uj = || -> u64 {
            let text = std::fs::read_to_string(&counter).expect("energy_uj");
            text.trim().parse().expect("energy_uj is a number")
        };
        let (uj_before, since) = (read_uj(), Instant::now());
        let output = cluster.dir().join("job-%j.out");
        let id = cluster
            .client(
                "sbatch",
                &[
                    "--parsable",
                    &format!("--output={}", output.display()),
                    "--wrap",
                    "srun sleep 4",
                ],
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let state = cluster
                .client("squeue", &["-h", "-t", "all", "-j", &id, "-o", "%T"])
                .unwrap_or_default();
            if !["", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"].contains(&state.as_str()) {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {state}\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let (uj_after, elapsed) = (read_uj(), since.elapsed().as_secs_f64());
        assert_eq!(state, "COMPLETED", "{}", cluster.logs());

        let step = format!("{id}.0");
        let deadline = Instant::now() + Duration::from_secs(15);
        let joules = loop {
            if let Some(joules) = cluster.consumed_energy(&step) {
                break joules;
            }
            assert!(
                Instant::now() < deadline,
                "sacct has no energy for step {step}: {:?}\n{}",
                cluster.client(
                    "sacct",
                    &[
                        "-P",
                        "-j",
                        &id,
                        "-o",
                        "JobID,State,Elapsed,ConsumedEnergyRaw"
                    ]
                ),
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let job = cluster.consumed_energy(&id);
        let powercap_joules = (uj_after - uj_before) as f64 / 1e6;
        println!(
            "step {step}: {joules} J from sacct (job: {job:?} J); powercap: {powercap_joules:.1} J in {elapsed:.2} s ({:.2} W)",
            powercap_joules / elapsed
        );
        assert!(
            (150..=260).contains(&joules),
            "step {step} accounted {joules} J, not about {WATTS} W × 4 s"
        );
        assert!(
            (powercap_joules - WATTS * elapsed).abs() <= WATTS * 0.2,
            "the powercap counter advanced {powercap_joules} J in {elapsed} s, not at {WATTS} W"
        );
    }
}
