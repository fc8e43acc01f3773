//! Helpers for berth's end-to-end tests: the gate for the real parts a test
//! needs, the built binaries, processes that die with the test, and a
//! reflection client that asks what grpcurl asks.

pub mod agent;
pub mod campaign;
pub mod compose;
pub mod deployment;
pub mod fuzz;
pub mod llm;
pub mod parts;
pub mod postgres;
pub mod slurm;
pub mod vm;
pub use parts::{Part, require, require_part};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{Host, HostStatus, RegisterHostRequest};
use berth_server::client::{AuthChannel, connect};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A binary of the workspace, built by `cargo build --workspace --bins`
/// (the README's test command does it first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The target directory's `tmp/`, which cargo names `CARGO_TARGET_TMPDIR`
/// when it builds a test (that variable is not set for this library):
/// caches that outlive a test run, such as the busybox rootfs.
pub fn target_tmpdir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/tmp
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("tmp"))
        .expect("target dir")
}

/// A TCP port free right now on 127.0.0.1.
///
/// Never the same twice in one test process: the kernel may hand a port
/// just let go of out again, and two servers of one test (a service's gRPC
/// and HTTP listeners) would then race for it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return port;
        }
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(bin(name))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
                    eprintln!("{} ended by signal {signal} after SIGTERM", self.name);
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An orchestrator on 127.0.0.1:`port` with its store in `dir`, heartbeats
/// every 200 ms, and extra `--set` settings.
pub fn start_orchestrator(dir: &Path, port: u16, settings: &[&str]) -> Process {
    let store = format!("store.path={}", dir.join("state.db").display());
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--set",
        &store,
        "--set",
        "scheduler.heartbeat_interval=200ms",
    ];
    // No HTTP port unless a setting asks for one (the flag would win over it).
    if !settings
        .iter()
        .any(|s| s.starts_with("server.http_listen="))
    {
        args.extend(["--http-listen", ""]);
    }
    for setting in settings {
        args.extend(["--set", setting]);
    }
    Process::spawn("berth-orchestrator", &args, &[])
}

/// GET `path` from the HTTP server at `addr` (HOST:PORT), with an
/// `authorization` header when given: the status and the body.
pub async fn http_get(addr: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    let authorization = authorization
        .map(|value| format!("authorization: {value}\r\n"))
        .unwrap_or_default();
    // HTTP/1.0: the server closes after the answer and sends no chunks.
    let request = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n{authorization}\r\n");
    http_exchange(addr, &request).await
}

/// Sends `request` (an HTTP/1.0 request, whole) to the HTTP server at
/// `addr` (HOST:PORT) and reads the answer to its end: the status and the
/// body.
pub async fn http_exchange(addr: &str, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, body.to_string())
}

/// An agent on the unix socket `socket`, with no HTTP port.
pub fn start_agent(socket: &Path) -> Process {
    start_agent_with(socket, &[])
}

/// An agent on the unix socket `socket`, with `args` (e.g. `--set …`)
/// before the usual ones.
pub fn start_agent_with(socket: &Path, args: &[&str]) -> Process {
    let listen = format!("unix://{}", socket.display());
    let mut all = args.to_vec();
    all.extend(["--listen", &listen, "--http-listen", ""]);
    Process::spawn("berth-agent", &all, &[])
}

/// A power sampler (as [`start_replay_sampler`]) replaying
/// examples/power/llm-inference.csv.
pub async fn start_llm_inference_sampler(dir: &Path) -> (Process, u16) {
    start_replay_sampler(dir, &repo_root().join("examples/power/llm-inference.csv")).await
}

/// A power sampler serving only the replay source, from `trace` (CI has no
/// GPU: its readings say they are replayed); its port once it answers.
pub async fn start_replay_sampler(dir: &Path, trace: &Path) -> (Process, u16) {
    start_sampler(
        dir,
        &format!(
            "powercap_root = \"\"\nreplay_traces = [\"{}\"]\n",
            trace.display()
        ),
    )
    .await
}

/// A power sampler reading only the RAPL zones of the powercap tree at
/// `root` (a fake one where the machine has no RAPL); its port once it
/// answers.
pub async fn start_powercap_sampler(dir: &Path, root: &Path) -> (Process, u16) {
    start_sampler(dir, &format!("powercap_root = \"{}\"\n", root.display())).await
}

/// A power sampler without NVML, its `[sampler]` section's other settings
/// `sources`.
async fn start_sampler(dir: &Path, sources: &str) -> (Process, u16) {
    let port = free_port();
    let config = dir.join("power.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"\"\n\n[sampler]\nnvml = false\n{sources}"
        ),
    )
    .unwrap();
    let sampler = Process::spawn(
        "berth-power-sampler",
        &["--config", config.to_str().unwrap()],
        &[],
    );
    wait_for(&format!("http://127.0.0.1:{port}")).await;
    (sampler, port)
}

/// Connects to `address` (http://… or unix://…), retrying until it answers.
pub async fn wait_for(address: &str) -> AuthChannel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect(address, "", Duration::from_secs(1)).await {
            Ok(channel) => return channel,
            Err(error) if Instant::now() > deadline => panic!("{address} never answered: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Registers the agent listening on `socket` as host `local`, once it
/// answers (so registration does not race its start), and checks the
/// orchestrator finds it ready.
pub async fn register_local_agent(client: &mut OrchestratorClient<AuthChannel>, socket: &Path) {
    let address = format!("unix://{}", socket.display());
    wait_for(&address).await;
    let host = client
        .register_host(RegisterHostRequest {
            name: "local".into(),
            address,
            ..Default::default()
        })
        .await
        .expect("RegisterHost")
        .into_inner();
    assert_eq!(host.status, HostStatus::Ready as i32, "{host:?}");
}

/// Registers the agent listening on `socket` as host `name`, its power
/// measured by the sampler on `sampler_port`; the host as registered.
pub async fn register_measured_host(
    client: &mut OrchestratorClient<AuthChannel>,
    name: &str,
    socket: &Path,
    sampler_port: u16,
) -> Host {
    client
        .register_host(RegisterHostRequest {
            name: name.into(),
            address: format!("unix://{}", socket.display()),
            power_sampler: format!("http://127.0.0.1:{sampler_port}"),
            ..Default::default()
        })
        .await
        .expect("RegisterHost")
        .into_inner()
}

/// grpc.health.v1 Check for `service` ("" for the server as a whole).
pub async fn health(channel: AuthChannel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check");
    ServingStatus::try_from(response.into_inner().status).expect("known status")
}

/// The services a server lists through reflection, asked over v1 or v1alpha
/// (grpcurl tries v1 and falls back; Python's grpcio speaks only v1alpha).
pub async fn reflection_list(channel: AuthChannel, v1alpha: bool) -> Vec<String> {
    // The two versions' messages are the same but for their module.
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut responses = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect(concat!("reflection ", stringify!($version)))
                .into_inner();
            match responses
                .message()
                .await
                .expect("reflection answer")
                .and_then(|r| r.message_response)
            {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("unexpected reflection answer: {other:?}"),
            }
        }};
    }
    if v1alpha {
        list_services!(v1alpha)
    } else {
        list_services!(v1)
    }
}

/// The file descriptor (encoded) that describes `symbol`, as `grpcurl describe` asks.
pub async fn reflection_describe(channel: AuthChannel, symbol: &str) -> Vec<Vec<u8>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    match responses
        .message()
        .await
        .expect("reflection answer")
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto,
        other => panic!("describe {symbol}: unexpected answer {other:?}"),
    }
}

/// The embedding model cache that `scripts/setup-embedding-model.sh` fills
/// (README's test command runs it first): `$BERTH_MODEL_CACHE`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/berth/models`.
pub fn model_cache() -> PathBuf {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from_env("BERTH_MODEL_CACHE").unwrap_or_else(|| {
        from_env("XDG_CACHE_HOME")
            .or_else(|| from_env("HOME").map(|home| home.join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/root/.cache"))
            .join("berth")
            .join("models")
    })
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The busybox rootfs tar of scripts/images/busybox-rootfs.sh, made once in
/// `cache`; None when it cannot be made (the test skips, or fails on CI).
pub fn busybox_rootfs(cache: &Path) -> Option<PathBuf> {
    let script = repo_root().join("scripts/images/busybox-rootfs.sh");
    let found = Command::new("bash")
        .arg(&script)
        .arg(cache)
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))
        .and_then(|output| {
            if output.status.success() {
                Ok(PathBuf::from(
                    String::from_utf8_lossy(&output.stdout).trim(),
                ))
            } else {
                Err(format!(
                    "could not build the busybox rootfs: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        });
    require(Part::Busybox, found)
}
