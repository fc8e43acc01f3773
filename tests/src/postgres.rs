//! A real PostgreSQL 15 for a test: Debian's binaries, a cluster of its own
//! in a temporary directory, on a free port of 127.0.0.1 with its unix
//! socket in that directory, stopped when the [`Postgres`] is dropped.
//!
//! PostgreSQL refuses to run as root: a test running as root starts it as
//! `nobody` (whose uid and gid own the cluster's directory). `initdb` is run
//! once per target directory into a template (`target/tmp/postgres-15-template`)
//! that every test copies, so a test pays for a server start, not for a
//! cluster's creation.
//!
//! The cluster asks for a password (scram-sha-256) from user `berth`, so
//! that a test can also give the wrong one.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::parts::{Part, require};

/// Where Debian's postgresql-15 puts its server binaries.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The superuser of every test cluster, and its password.
pub const USER: &str = "berth";
pub const PASSWORD: &str = "berth-test-password";
/// How long `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT_SECONDS: &str = "60";

/// A running test cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    owner: Option<Owner>,
}

/// The unprivileged user the server runs as when the tests run as root.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// A cluster for the running test, or None when PostgreSQL is missing (the
/// test skips; under CI=true it fails, see [`crate::parts`]).
pub fn require_postgres() -> Option<Postgres> {
    require(Part::Postgres, Postgres::start())
}

impl Postgres {
    /// Creates (from the template) and starts a cluster.
    pub fn start() -> Result<Self, String> {
        let initdb = Path::new(BIN_DIR).join("initdb");
        if !initdb.is_file() {
            return Err(format!("{} is missing", initdb.display()));
        }
        let owner = owner()?;
        let template = template(owner)?;
        let dir = tempfile::Builder::new()
            .prefix("berth-postgres-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        give_to(dir.path(), owner)?;
        run(
            Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(dir.path().join("data")),
            None,
        )?;
        let postgres = Self {
            dir,
            port: crate::free_port(),
            owner,
        };
        postgres.start_server()?;
        Ok(postgres)
    }

    /// The URL of the cluster's `postgres` database, with `berth`'s password.
    pub fn url(&self) -> String {
        self.url_with_password(PASSWORD)
    }

    /// [`Self::url`] with another password.
    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{USER}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (a fast shutdown: sessions are ended), keeping its data.
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Starts the server again on the same port, after [`Self::stop`].
    pub fn start_server(&self) -> Result<(), String> {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.pg_ctl(&["start", "-o", &options, "-l", &log.to_string_lossy()])
            .map_err(|e| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("{e}; server log:\n{log}")
            })
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        run(
            Command::new(Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-w", "-t", PG_CTL_WAIT_SECONDS])
                .args(args),
            self.owner,
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate: the data is thrown away with the directory.
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// `nobody` when running as root, else the current user (None).
fn owner() -> Result<Option<Owner>, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .map_err(|e| format!("looking up user nobody: {e}"))?
        .ok_or("running as root, and there is no user `nobody` to run PostgreSQL as")?;
    Ok(Some(Owner {
        uid: nobody.uid.as_raw(),
        gid: nobody.gid.as_raw(),
    }))
}

/// The initialised cluster every test copies, made on first use.
fn template(owner: Option<Owner>) -> Result<PathBuf, String> {
    let root = crate::target_tmpdir();
    let template = root.join("postgres-15-template");
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    // Made aside and renamed into place, so that tests starting at once
    // never copy a half-made template.
    let staging = tempfile::Builder::new()
        .prefix("postgres-15-template.")
        .tempdir_in(&root)
        .map_err(|e| format!("{}: {e}", root.display()))?;
    give_to(staging.path(), owner)?;
    let password_file = staging.path().join("password");
    std::fs::write(&password_file, PASSWORD).map_err(|e| format!("password file: {e}"))?;
    give_to(&password_file, owner)?;
    let data = staging.path().join("data");
    run(
        Command::new(Path::new(BIN_DIR).join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "--auth=scram-sha-256", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", password_file.display())),
        owner,
    )?;
    match std::fs::rename(&data, &template) {
        Ok(()) => Ok(template),
        // Another test made it first.
        Err(_) if template.join("PG_VERSION").is_file() => Ok(template),
        Err(e) => Err(format!("{}: {e}", template.display())),
    }
}

/// Makes `path` the owner's (PostgreSQL wants its directories to itself).
fn give_to(path: &Path, owner: Option<Owner>) -> Result<(), String> {
    if let Some(owner) = owner {
        std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    if path.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs `command` (as `owner` when given); Ok when it exits 0, else its output.
fn run(command: &mut Command, owner: Option<Owner>) -> Result<(), String> {
    if let Some(owner) = owner {
        command.uid(owner.uid).gid(owner.gid);
    }
    let described = format!("{command:?}");
    let output = command
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{described}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{described} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
