//! Agents reached over SSH: a real sshd (Debian's openssh-server) on
//! 127.0.0.1 forwards to an agent's unix socket. Host keys are checked
//! against known_hosts; a mismatch leaves the host unreachable, saying why.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::{Process, free_port, wait_for};

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

fn skip_reason() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} is missing (apt-get install openssh-server; .ci/run does)"
        ));
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("sshd needs root for /run/sshd and its privilege separation".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_runs_on_an_agent_behind_ssh_and_a_wrong_host_key_is_refused() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping: {reason}");
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
        let campaign = client
            .submit_campaign(SubmitCampaignRequest {
                manifest_yaml: manifest.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = client
                .get_campaign(GetCampaignRequest {
                    id: campaign.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if now.state == CampaignState::Succeeded as i32 {
                assert_eq!(now.runs.unwrap().succeeded, 4);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "campaign over ssh never finished: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A clean stop closes the tunnel (its ssh is killed with it).
        assert_eq!(orchestrator.terminate(), Some(0));
    }
}
