//! A campaign whose backend is a libvirt VM, end to end: the orchestrator
//! places the backend (`runtime: libvirt` with its `vm:` section) on an
//! agent with a real libvirt daemon, the agent boots the test image
//! (scripts/vm/build-test-image.sh: Debian's kernel, busybox, the static
//! exec shim; TCG where /dev/kvm cannot boot it), and every run is exec'd
//! into the guest through the shim and recorded once. The VM is gone when
//! the campaign ends.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{RegisterHostRequest, RunState};
use berth_tests::{Part, free_port, require, start_agent_with, start_orchestrator, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_runs_in_a_libvirt_vm() {
    let Some(uri) = require(Part::Vm, berth_tests::vm::hypervisor()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // qemu runs as libvirt-qemu: it must reach the overlays and the console
    // log in the agent's directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let image_dir = dir.path().join("image");
    let target_tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let Some(base) = require(
        Part::Vm,
        berth_tests::vm::boot_image(&image_dir, target_tmpdir),
    ) else {
        return;
    };
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent_with(
        &socket,
        &[
            "--set",
            &format!("libvirt.uri={uri}"),
            "--set",
            &format!("libvirt.disk_dir={}", dir.path().join("disks").display()),
        ],
    );
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port, &[]);
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
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

    // The guest's /init is the test image's: reading it proves where the
    // run ran (the host has no such file).
    let manifest = format!(
        r#"name: in-a-vm
backends:
  - name: vm
    runtime: libvirt
    vm:
      vcpus: 1
      memory: 256MiB
      disks: [{{image: {base}}}]
grid:
  params:
    n: [1, 2, 3]
cycles: 4
run:
  command: [sh, -c, 'echo "{{\"n\": {{{{n}}}}, \"guest\": \"$(hostname)\", \"marker\": $(grep -c berth-guest-up /init)}}"']
"#,
        base = base.display()
    );
    let campaign = berth_tests::campaign::submit(&mut client, &manifest).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    berth_tests::campaign::wait_succeeded(&mut client, &campaign.id, 12, deadline).await;
    eprintln!(
        "12 runs in a VM, boot included: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let runs = berth_tests::campaign::runs_of(&mut client, &campaign.id).await;
    assert_eq!(runs.len(), 12);
    let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 12, "every run recorded once");
    let retried = runs.iter().filter(|r| r.attempts > 1).count();
    eprintln!("runs retried while the guest booted: {retried}");
    for run in &runs {
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        // A run dispatched before the guest's shim serves is answered
        // UNAVAILABLE by the agent and retried, never recorded twice.
        assert!(run.attempts <= 3, "{run:?}");
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(result["guest"], "berth-guest", "ran in the guest: {run:?}");
        assert_eq!(result["marker"], 1, "{run:?}");
    }
    // The campaign over, its VM is removed: no domain of it is left.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = std::process::Command::new("virsh")
            .args(["-c", &uri, "list", "--all", "--name"])
            .output()
            .expect("virsh list");
        let names = String::from_utf8_lossy(&listed.stdout).to_string();
        if !names.contains(&campaign.id) {
            break;
        }
        assert!(Instant::now() < deadline, "the VM was left: {names}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
