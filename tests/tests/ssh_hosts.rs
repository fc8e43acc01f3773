//! Agents reached over SSH: a real sshd (Debian's openssh-server) on
//! 127.0.0.1 forwards to an agent's unix socket. Host keys are checked
//! against known_hosts; a mismatch leaves the host unreachable, saying why.
//! Also the other bad host input: a TCP agent's wrong token, and a
//! placement naming a host that is not registered.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::campaign::{
    assert_no_campaigns, hosts_of, refused_at_submit, submit, wait_succeeded,
};
use berth_tests::{Part, Process, free_port, register_local_agent, require_part, wait_for};

const SSHD: &str = "/usr/sbin/sshd";

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
}

fn current_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

struct Sshd {
    _process: std::process::Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self._process.kill();
        let _ = self._process.wait();
    }
}

fn start_sshd(dir: &Path, authorized: &Path) -> Sshd {
    let port = free_port();
    let host_key = dir.join("host_key");
    keygen(&host_key);
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n\
             AllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\nPidFile {}\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").expect("privilege separation dir /run/sshd");
    // sshd's log goes to a file: its per-connection processes must not hold the test's output open.
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let process = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sshd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        _process: process,
        port,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_runs_on_an_agent_behind_ssh_and_a_wrong_host_key_is_refused() {
    // sshd needs root for /run/sshd and its privilege separation.
    if require_part(Part::Root).is_none() || require_part(Part::Sshd).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let client_key = dir.path().join("client_key");
    keygen(&client_key);
    let authorized = dir.path().join("authorized_keys");
    std::fs::copy(dir.path().join("client_key.pub"), &authorized).unwrap();
    let sshd = start_sshd(dir.path(), &authorized);
    let host_pub = std::fs::read_to_string(dir.path().join("host_key.pub")).unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {host_pub}", sshd.port),
    )
    .unwrap();
    let other = dir.path().join("other_key");
    keygen(&other);
    let wrong_known_hosts = dir.path().join("wrong_known_hosts");
    let other_pub = std::fs::read_to_string(dir.path().join("other_key.pub")).unwrap();
    std::fs::write(
        &wrong_known_hosts,
        format!("[127.0.0.1]:{} {other_pub}", sshd.port),
    )
    .unwrap();

    let socket = dir.path().join("agent.sock");
    let _agent = Process::spawn(
        "berth-agent",
        &[
            "--listen",
            &format!("unix://{}", socket.display()),
            "--http-listen",
            "",
        ],
        &[],
    );
    let address = format!(
        "ssh://{}@127.0.0.1:{}{}",
        current_user(),
        sshd.port,
        socket.display()
    );

    for (known, should_work) in [(&known_hosts, true), (&wrong_known_hosts, false)] {
        let state = dir.path().join(format!("state-{should_work}"));
        let port = free_port();
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--http-listen".into(),
            String::new(),
            "--set".into(),
            format!("store.path={}", state.join("state.db").display()),
            "--set".into(),
            format!("ssh.known_hosts={}", known.display()),
            "--set".into(),
            format!("ssh.identity={}", client_key.display()),
            "--set".into(),
            format!("ssh.tunnel_dir={}", state.join("tunnels").display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let orchestrator = Process::spawn("berth-orchestrator", &args, &[]);
        let mut client =
            OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
        let host = client
            .register_host(RegisterHostRequest {
                name: "remote".into(),
                address: address.clone(),
                ..Default::default()
            })
            .await
            .expect("RegisterHost")
            .into_inner();
        if !should_work {
            assert_eq!(host.status, HostStatus::Unreachable as i32, "{host:?}");
            assert!(
                host.status_message.contains("Host key verification failed"),
                "{}",
                host.status_message
            );
            assert_eq!(orchestrator.terminate(), Some(0));
            continue;
        }
        assert_eq!(host.status, HostStatus::Ready as i32, "{host:?}");
        assert!(
            host.cpus > 0,
            "capabilities come through the tunnel: {host:?}"
        );
        let manifest = "name: ssh\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: a}, {name: c}]\ncycles: 2\n\
                        run: {command: [sh, -c, 'echo {\"ok\": 1}']}\n";
        let campaign = submit(&mut client, manifest).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        wait_succeeded(&mut client, &campaign.id, 4, deadline).await;
        // A clean stop closes the tunnel (its ssh is killed with it).
        assert_eq!(orchestrator.terminate(), Some(0));
    }
}

fn start_orchestrator(dir: &Path, port: u16) -> Process {
    let store = format!("store.path={}", dir.join("state.db").display());
    Process::spawn(
        "berth-orchestrator",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "",
            "--set",
            &store,
            "--set",
            "scheduler.heartbeat_interval=200ms",
        ],
        &[],
    )
}

/// A TCP agent with a token, registered with the wrong one: the host is
/// recorded but unreachable, and RegisterHost's answer and ListHosts say
/// that its agent refused the token, naming the host. The right token fixes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_agent_token_is_named_in_the_host_status() {
    let dir = tempfile::tempdir().unwrap();
    let agent_port = free_port();
    let agent_address = format!("http://127.0.0.1:{agent_port}");
    let _agent = Process::spawn(
        "berth-agent",
        &[
            "--listen",
            &format!("127.0.0.1:{agent_port}"),
            "--http-listen",
            "",
        ],
        &[("BERTH_AGENT__TOKEN", "the-right-token")],
    );
    wait_for(&agent_address).await;
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    let register = |token: &str| RegisterHostRequest {
        name: "tcp-01".into(),
        address: agent_address.clone(),
        token: token.into(),
        ..Default::default()
    };
    let host = client
        .register_host(register("a-wrong-token"))
        .await
        .expect("a host with a wrong token is still registered")
        .into_inner();
    assert_eq!(host.status, HostStatus::Unreachable as i32, "{host:?}");
    for message in [
        host.status_message.clone(),
        hosts_of(&mut client)
            .await
            .into_iter()
            .find(|h| h.name == "tcp-01")
            .expect("listed")
            .status_message,
    ] {
        assert!(
            message.contains("host `tcp-01` refused the token")
                && message.contains("Unauthenticated")
                && message.contains(&agent_address),
            "{message}"
        );
        assert!(
            !message.contains("a-wrong-token") && !message.contains("the-right-token"),
            "tokens are never shown: {message}"
        );
    }
    let host = client
        .register_host(register("the-right-token"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(host.status, HostStatus::Ready as i32, "{host:?}");
}

/// `placement.host` naming no registered host is refused at submit with
/// FAILED_PRECONDITION naming the backend and the host; nothing is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_placement_host_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = Process::spawn(
        "berth-agent",
        &[
            "--listen",
            &format!("unix://{}", socket.display()),
            "--http-listen",
            "",
        ],
        &[],
    );
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    register_local_agent(&mut client, &socket).await;
    let manifest = "name: t\nbackends:\n  - name: ok\n    runtime: process\n  - name: lost\n    runtime: process\n    \
                    placement: {host: nosuch}\nconfigs: [{name: a}]\nrun: {command: [true]}\n";
    for status in refused_at_submit(&mut client, manifest, "no host is named nosuch").await {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("backend `lost`") && status.message().contains("`nosuch`"),
            "{}",
            status.message()
        );
    }
    assert_no_campaigns(&mut client, "nothing recorded or started").await;
}
