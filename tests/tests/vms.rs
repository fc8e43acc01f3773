//! Campaigns and deployments in libvirt VMs, end to end. A campaign whose
//! backend is a libvirt VM: the orchestrator
//! places the backend (`runtime: libvirt` with its `vm:` section) on an
//! agent with a real libvirt daemon, the agent boots the test image
//! (scripts/vm/build-test-image.sh: Debian's kernel, busybox, the static
//! exec shim; TCG where /dev/kvm cannot boot it), and every run is exec'd
//! into the guest through the shim and recorded once. The VM is gone when
//! the campaign ends. A VM destroyed under a run is booted again and the
//! run retried; a run whose agent and orchestrator are killed (-9) and
//! started again completes in the attempt that was running. A deployment
//! whose replica is a VM serves from its guest (started by the recipe's
//! cloud-init script) on the guest's own address.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{RegisterHostRequest, Run, RunState, StopDeploymentRequest};
use berth_server::client::AuthChannel;
use berth_tests::deployment::{cancelled, running_replica, wait_deployment};
use berth_tests::{
    Part, Process, free_port, require, start_agent_with, start_orchestrator, wait_for,
};

/// An orchestrator with one host whose agent drives the real libvirtd, and
/// the test image to boot; `None` (after a loud skip) without a hypervisor.
struct VmHost {
    dir: tempfile::TempDir,
    uri: String,
    base: PathBuf,
    port: u16,
    client: OrchestratorClient<AuthChannel>,
    agent: Process,
    orchestrator: Process,
}

/// The host's agent, on the socket in `dir` and the real libvirtd at `uri`:
/// started again on the same socket and disks, it is the same agent to the
/// orchestrator and owns the same domains.
fn start_vm_agent(dir: &Path, uri: &str) -> Process {
    start_agent_with(
        &dir.join("agent.sock"),
        &[
            "--set",
            &format!("libvirt.uri={uri}"),
            "--set",
            &format!("libvirt.disk_dir={}", dir.join("disks").display()),
        ],
    )
}

impl VmHost {
    async fn start() -> Option<Self> {
        let uri = require(Part::Vm, berth_tests::vm::hypervisor())?;
        let dir = berth_tests::vm::vm_dir();
        let image_dir = dir.path().join("image");
        let target_tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let base = require(
            Part::Vm,
            berth_tests::vm::boot_image(&image_dir, target_tmpdir),
        )?;
        let socket = dir.path().join("agent.sock");
        let agent = start_vm_agent(dir.path(), &uri);
        let port = free_port();
        let orchestrator = start_orchestrator(dir.path(), port, &[]);
        let mut client =
            OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
        let address = format!("unix://{}", socket.display());
        wait_for(&address).await;
        client
            .register_host(RegisterHostRequest {
                name: "local".into(),
                address,
                ..Default::default()
            })
            .await
            .expect("RegisterHost");
        Some(Self {
            dir,
            uri,
            base,
            port,
            client,
            agent,
            orchestrator,
        })
    }

    /// kill -9 of the agent, and first of the orchestrator when
    /// `orchestrator_too` (then it records nothing of the agent's death);
    /// each started again on the same socket, store and port.
    async fn kill_and_restart(&mut self, orchestrator_too: bool) {
        let dir = self.dir.path();
        if orchestrator_too {
            self.orchestrator.child.kill().expect("kill -9");
            let _ = self.orchestrator.child.wait();
        }
        self.agent.child.kill().expect("kill -9");
        let _ = self.agent.child.wait();
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        self.agent = start_vm_agent(dir, &self.uri);
        wait_for(&format!("unix://{}", socket.display())).await;
        if orchestrator_too {
            self.orchestrator = start_orchestrator(dir, self.port, &[]);
            self.client =
                OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{}", self.port)).await);
        }
    }

    /// The console logs of the host's VMs, for a failure's message.
    fn consoles(&self) -> String {
        let disks = self.dir.path().join("disks");
        std::fs::read_dir(&disks)
            .into_iter()
            .flatten()
            .flatten()
            .map(|vm| {
                let log = std::fs::read_to_string(vm.path().join("console.log"));
                format!("{}:\n{}", vm.path().display(), log.unwrap_or_default())
            })
            .collect()
    }

    /// The names of the domains libvirtd has that hold `text`.
    fn domains_with(&self, text: &str) -> Vec<String> {
        let listed = std::process::Command::new("virsh")
            .args(["-c", &self.uri, "list", "--all", "--name"])
            .output()
            .expect("virsh list");
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|name| name.contains(text))
            .map(str::to_string)
            .collect()
    }

    /// Waits for the campaign's VM to be removed once it ended.
    async fn assert_vm_removed(&self, campaign_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = self.domains_with(campaign_id);
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "the VM was left: {left:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A one-backend campaign in a VM of the test image.
    fn manifest(&self, name: &str, grid: &str, cycles: u32, command: &str) -> String {
        format!(
            r#"name: {name}
backends:
  - name: vm
    runtime: libvirt
    vm:
      vcpus: 1
      memory: 256MiB
      disks: [{{image: {base}}}]
grid:
  params:
    {grid}
cycles: {cycles}
run:
  command: [sh, -c, '{command}']
"#,
            base = self.base.display()
        )
    }
}

/// Every run of the campaign recorded once, and succeeded.
fn assert_each_succeeded_once(runs: &[Run], expected: usize) {
    assert_eq!(runs.len(), expected);
    let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), expected, "every run recorded once");
    for run in runs {
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_runs_in_a_libvirt_vm() {
    let Some(mut host) = VmHost::start().await else {
        return;
    };
    // The guest's /init is the test image's: reading it proves where the
    // run ran (the host has no such file).
    let manifest = host.manifest(
        "in-a-vm",
        "n: [1, 2, 3]",
        4,
        r#"echo "{\"n\": {{n}}, \"guest\": \"$(hostname)\", \"marker\": $(grep -c berth-guest-up /init)}""#,
    );
    let client = &mut host.client;
    let campaign = berth_tests::campaign::submit(client, &manifest).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    berth_tests::campaign::wait_succeeded(client, &campaign.id, 12, deadline).await;
    eprintln!(
        "12 runs in a VM, boot included: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let runs = berth_tests::campaign::runs_of(client, &campaign.id).await;
    assert_each_succeeded_once(&runs, 12);
    let retried = runs.iter().filter(|r| r.attempts > 1).count();
    eprintln!("runs retried while the guest booted: {retried}");
    for run in &runs {
        // A run dispatched before the guest's shim serves is answered
        // UNAVAILABLE by the agent and retried, never recorded twice.
        assert!(run.attempts <= 3, "{run:?}");
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(result["guest"], "berth-guest", "ran in the guest: {run:?}");
        assert_eq!(result["marker"], 1, "{run:?}");
    }
    // The campaign over, its VM is removed: no domain of it is left.
    host.assert_vm_removed(&campaign.id).await;
}

/// `virsh destroy` of the backend's VM while a run executes in it: the
/// backend is booted again and the interrupted run retried, every run
/// recorded once.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_destroyed_mid_run_is_booted_again_and_the_run_retried() {
    let Some(mut host) = VmHost::start().await else {
        return;
    };
    // Each run is long enough to be caught in flight; its result says which
    // boot of the guest ran it (the guest's uptime restarts with a boot).
    let manifest = host.manifest(
        "vm-destroyed",
        "n: [1, 2]",
        2,
        r#"sleep 3; echo "{\"n\": {{n}}, \"guest\": \"$(hostname)\"}""#,
    );
    let campaign = berth_tests::campaign::submit(&mut host.client, &manifest).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let in_flight = loop {
        let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
        if let Some(run) = runs.iter().find(|r| r.state == RunState::Running as i32) {
            break run.id.clone();
        }
        assert!(Instant::now() < deadline, "no run started: {runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let domains = host.domains_with(&campaign.id);
    assert_eq!(domains.len(), 1, "{domains:?}");
    let destroyed = std::process::Command::new("virsh")
        .args(["-c", &host.uri, "destroy", &domains[0]])
        .output()
        .expect("virsh destroy");
    assert!(
        destroyed.status.success(),
        "{}",
        String::from_utf8_lossy(&destroyed.stderr)
    );
    let destroyed_at = Instant::now();
    eprintln!("destroyed {} while run {in_flight} ran", domains[0]);

    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 4, deadline).await;
    eprintln!(
        "all 4 runs done {:.1} s after the VM was destroyed",
        destroyed_at.elapsed().as_secs_f64()
    );
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    assert_each_succeeded_once(&runs, 4);
    let retried = runs.iter().find(|r| r.id == in_flight).unwrap();
    assert!(
        retried.attempts >= 2,
        "the interrupted run was retried: {retried:?}"
    );
    for run in &runs {
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(result["guest"], "berth-guest", "ran in the guest: {run:?}");
    }
    host.assert_vm_removed(&campaign.id).await;
}

/// kill -9 of the orchestrator and the agent while a run executes in the
/// VM, both started again: the VM and the run's command run on (the
/// guest's shim keeps a keyed exec running without its agent), the new
/// orchestrator attaches to the run by its key, the new agent finds it in
/// the VM's shim and attaches, and the run completes in the attempt that
/// was running (adopted, not run again), every run recorded once.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_in_a_vm_survives_kill_9_of_its_agent_and_orchestrator() {
    a_run_in_a_vm_survives_kill_9(true).await;
}

/// kill -9 of the agent alone while a run executes in its VM: the
/// orchestrator, its exec stream broken, attaches again once the restarted
/// agent answers (`scheduler.reattach_grace`), and the run ends in the
/// attempt that was running.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_in_a_vm_survives_kill_9_of_its_agent() {
    a_run_in_a_vm_survives_kill_9(false).await;
}

async fn a_run_in_a_vm_survives_kill_9(orchestrator_too: bool) {
    let Some(mut host) = VmHost::start().await else {
        return;
    };
    let manifest = host.manifest(
        "vm-agent-killed",
        "n: [1, 2, 3]",
        1,
        r#"sleep 4; echo "{\"n\": {{n}}, \"guest\": \"$(hostname)\"}""#,
    );
    let campaign = berth_tests::campaign::submit(&mut host.client, &manifest).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    // A run dispatched while the guest boots is refused and dispatched
    // again: its attempt running at the kill is the one that must end it.
    let (in_flight, attempt) = loop {
        let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
        if let Some(run) = runs.iter().find(|r| r.state == RunState::Running as i32) {
            break (run.id.clone(), run.attempts);
        }
        assert!(Instant::now() < deadline, "no run started: {runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Mid-run: its command has started in the guest.
    tokio::time::sleep(Duration::from_secs(1)).await;
    host.kill_and_restart(orchestrator_too).await;
    let restarted_at = Instant::now();
    eprintln!(
        "killed the agent (the orchestrator too: {orchestrator_too}) while run {in_flight} ran"
    );

    // Why the run was interrupted, should it be: its error while pending again.
    let mut interrupted = Vec::new();
    let runs = loop {
        let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
        if let Some(run) = runs.iter().find(|r| r.id == in_flight)
            && run.attempts > attempt
            && !interrupted.contains(&run.error)
        {
            interrupted.push(run.error.clone());
            // The guest's side: its console, with the shim's journal.
            interrupted.push(host.consoles());
        }
        if runs.iter().all(|r| r.state == RunState::Succeeded as i32) && runs.len() == 3 {
            break runs;
        }
        assert!(Instant::now() < deadline, "the runs did not end: {runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "all 3 runs done {:.1} s after the restart",
        restarted_at.elapsed().as_secs_f64()
    );
    assert_each_succeeded_once(&runs, 3);
    let adopted = runs.iter().find(|r| r.id == in_flight).unwrap();
    assert_eq!(
        adopted.attempts, attempt,
        "the run in flight was attached again, not run again: {adopted:?}; interrupted: {interrupted:?}"
    );
    for run in &runs {
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(result["guest"], "berth-guest", "ran in the guest: {run:?}");
    }
    host.assert_vm_removed(&campaign.id).await;
}

/// GET / on `address`: the whole answer.
async fn http_get(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("{address}: {e}"));
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A replica that is a VM: its guest starts the service from the recipe's
/// cloud-init script, the replica is Running once its HTTP check passes on
/// the guest's own address (its endpoint), `virsh destroy` has it booted
/// again (a restart counted) and serving, and a stop removes the domain.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_replica_serves_from_its_guest_and_is_booted_again_when_destroyed() {
    let Some(mut host) = VmHost::start().await else {
        return;
    };
    // The example recipe as it is, but for its image and a name of this run
    // (a domain left by an earlier run that failed cannot be taken for it).
    let name = format!("vm-web-{}", std::process::id());
    let example = berth_tests::repo_root().join("examples/deployments/vm/web.yaml");
    let recipe = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "/var/lib/berth/images/base.qcow2",
            &host.base.display().to_string(),
        )
        .replace("name: vm-web", &format!("name: {name}"));
    let started = Instant::now();
    berth_tests::deployment::deploy(&mut host.client, recipe, &example).await;
    let limit = Duration::from_secs(300);
    let deployment =
        wait_deployment(&mut host.client, &name, limit, "running", running_replica).await;
    eprintln!(
        "a VM replica Running (booted, address leased, checked) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let endpoint = &deployment.replica_status[0].endpoints[0];
    assert!(
        !endpoint.host.starts_with("127."),
        "the endpoint is the guest's own address: {endpoint:?}"
    );
    let answer = http_get(&endpoint.address).await;
    assert!(answer.contains("served by berth-guest"), "{answer}");

    let domains = host.domains_with(&name);
    assert_eq!(domains.len(), 1, "{domains:?}");
    let destroyed = std::process::Command::new("virsh")
        .args(["-c", &host.uri, "destroy", &domains[0]])
        .output()
        .expect("virsh destroy");
    assert!(destroyed.status.success(), "{destroyed:?}");
    let destroyed_at = Instant::now();
    let deployment = wait_deployment(&mut host.client, &name, limit, "running again", |d| {
        running_replica(d) && d.replica_status[0].restarts >= 1
    })
    .await;
    eprintln!(
        "booted again and serving {:.1} s after virsh destroy",
        destroyed_at.elapsed().as_secs_f64()
    );
    let replica = &deployment.replica_status[0];
    assert_eq!(replica.restarts, 1, "{replica:?}");
    let answer = http_get(&replica.endpoints[0].address).await;
    assert!(answer.contains("served by berth-guest"), "{answer}");

    host.client
        .stop_deployment(StopDeploymentRequest { name: name.clone() })
        .await
        .expect("StopDeployment");
    wait_deployment(
        &mut host.client,
        &name,
        Duration::from_secs(60),
        "cancelled",
        cancelled,
    )
    .await;
    host.assert_vm_removed(&name).await;
}
