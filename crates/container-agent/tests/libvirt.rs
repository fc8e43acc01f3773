//! The libvirt runtime through the agent's gRPC API, against libvirt's
//! built-in test driver (no daemon, no hypervisor): each test has its own
//! `test:///<dir>/node.xml`, since `test:///default` is shared by every
//! connection of a process. The test driver runs no qemu, but overlays and
//! seeds are made for real with qemu-img and genisoimage.
//!
//! `a_real_vm_boots_and_stops` boots a real VM (Debian's kernel, a busybox
//! initramfs and the static exec shim, scripts/vm/build-test-image.sh) under
//! libvirtd's qemu driver, with KVM where it can boot that kernel and TCG
//! otherwise, execs into it, and says why it skips when this host lacks a
//! part.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_container_agent::Config;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::{GpuRequest, Runtime, VmDisk, VmSpec, WorkloadSpec};
use berth_server::RunningService;
use berth_server::client::AuthChannel;
use tokio_stream::StreamExt;
use tonic::Code;

type Client = ContainerAgentClient<AuthChannel>;

/// A node for the test driver: no domains, or the ones given.
fn node_xml(domains: &str) -> String {
    format!("<node>{domains}</node>")
}

struct Agent {
    client: Client,
    dir: tempfile::TempDir,
    test: String,
    uri: String,
    /// `None` only while a restart replaces it.
    service: Option<RunningService>,
}

/// How long a stopping agent lets its calls drain: short, for restarts.
const DRAIN: Duration = Duration::from_millis(300);

impl Agent {
    /// An agent whose libvirt runtime is on `uri`; `None` (and why) when
    /// libvirt cannot be loaded here.
    async fn start(
        test: &str,
        dir: tempfile::TempDir,
        uri: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Option<Self> {
        let socket = format!("unix://{}", dir.path().join("agent.sock").display());
        let mut config = Config::default();
        config.server.listen = socket.clone();
        config.server.http_listen = String::new();
        config.engines.docker = "off".into();
        config.engines.podman = "off".into();
        config.engines.owner = format!("t-{test}");
        config.engines.state_dir = dir.path().join("state");
        config.libvirt.uri = uri.to_string();
        config.libvirt.disk_dir = dir.path().join("disks");
        config.libvirt.poll_interval = Duration::from_millis(100);
        tune(&mut config);
        let service = berth_container_agent::start(config).await.unwrap();
        let channel = berth_server::client::connect(&socket, "", Duration::from_secs(5))
            .await
            .unwrap();
        let mut client = ContainerAgentClient::new(channel);
        let info = client.info(InfoRequest {}).await.unwrap().into_inner();
        let found = match info.unavailable_runtimes.get("RUNTIME_LIBVIRT") {
            Some(why) => Err(format!("the agent's libvirt runtime is unavailable: {why}")),
            None => Ok(()),
        };
        berth_tests::require(berth_tests::Part::Libvirt, found)?;
        assert!(info.runtimes.contains(&(Runtime::Libvirt as i32)));
        Some(Self {
            client,
            dir,
            test: test.to_string(),
            uri: uri.to_string(),
            service: Some(service),
        })
    }

    /// Stops this agent and starts a new one on the same directory, owner and
    /// libvirt: what a restarted agent finds.
    async fn restart(&mut self) {
        // The old service goes first: the new one binds the same socket.
        if let Some(service) = self.service.take() {
            service.stop().await.unwrap();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        *self = Self::start(&self.test, dir, &self.uri, |c| {
            c.server.shutdown_grace = DRAIN
        })
        .await
        .expect("the restarted agent has libvirt");
    }

    /// An agent on a test-driver node of its own holding `domains`.
    async fn on_test_node(test: &str, domains: &str) -> Option<Self> {
        Self::on_test_node_with(test, domains, |_| {}).await
    }

    async fn on_test_node_with(
        test: &str,
        domains: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        std::fs::write(&node, node_xml(domains)).unwrap();
        Self::start(test, dir, &format!("test://{}", node.display()), tune).await
    }

    fn disk_dir(&self) -> PathBuf {
        self.dir.path().join("disks")
    }

    /// What the agent left in its disk directory.
    fn files_left(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.disk_dir()) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    async fn create(&mut self, name: &str, spec: WorkloadSpec) -> Result<Workload, tonic::Status> {
        self.client
            .create_workload(CreateWorkloadRequest {
                name: name.to_string(),
                spec: Some(spec),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn start_workload(&mut self, id: &str) -> Result<Workload, tonic::Status> {
        self.client
            .start_workload(WorkloadRef { id: id.to_string() })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn inspect(&mut self, id: &str) -> Result<Workload, tonic::Status> {
        self.client
            .inspect_workload(WorkloadRef { id: id.to_string() })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn remove(&mut self, id: &str, force: bool) -> Result<(), tonic::Status> {
        self.client
            .remove_workload(RemoveWorkloadRequest {
                id: id.to_string(),
                force,
            })
            .await
            .map(|_| ())
    }

    async fn stop(&mut self, id: &str, timeout: Duration) -> Result<Workload, tonic::Status> {
        self.client
            .stop_workload(StopWorkloadRequest {
                id: id.to_string(),
                timeout: Some(timeout.try_into().unwrap()),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn names(&mut self) -> Vec<String> {
        let listed = self
            .client
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap()
            .into_inner();
        listed.workloads.into_iter().map(|w| w.name).collect()
    }
}

fn qemu_img() -> bool {
    berth_tests::require_part(berth_tests::Part::QemuImg).is_some()
}

/// The agent, with an empty base image in its directory; `None` (and why)
/// when there is no agent or no qemu-img here.
fn with_base_image(agent: Option<Agent>) -> Option<(Agent, PathBuf)> {
    let agent = agent?;
    if !qemu_img() {
        return None;
    }
    let base = base_image(agent.dir.path());
    Some((agent, base))
}

/// An empty qcow2 image to be a base image.
fn base_image(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    base
}

fn vm_spec(base: &Path) -> WorkloadSpec {
    WorkloadSpec {
        runtime: Runtime::Libvirt as i32,
        labels: [("team".to_string(), "bench".to_string())].into(),
        vm: Some(VmSpec {
            vcpus: 2,
            memory_bytes: 256 << 20,
            disks: vec![VmDisk {
                base_image: base.display().to_string(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn state(workload: &Workload) -> WorkloadState {
    WorkloadState::try_from(workload.state).unwrap()
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "`{}` does not mention `{needle}`",
        status.message()
    );
}

#[tokio::test]
async fn a_vm_is_created_started_stopped_and_removed() {
    let test = "lifecycle";
    let Some((mut agent, base)) = with_base_image(Agent::on_test_node(test, "").await) else {
        return;
    };
    let mut events = agent
        .client
        .events(EventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut spec = vm_spec(&base);
    let with_seed = Command::new("genisoimage")
        .arg("--version")
        .output()
        .is_ok();
    if with_seed {
        spec.vm.as_mut().unwrap().cloud_init_user_data = "#cloud-config\nhostname: vm1\n".into();
    } else {
        eprintln!("{test}: no genisoimage here; the cloud-init seed is not tried");
    }

    let created = agent.create("vm1", spec).await.unwrap();
    assert_eq!(state(&created), WorkloadState::Created);
    assert!(uuid::Uuid::parse_str(&created.id).is_ok(), "{}", created.id);
    let vm = created.spec.as_ref().unwrap().vm.as_ref().unwrap();
    assert_eq!((vm.vcpus, vm.memory_bytes), (2, 256 << 20));
    assert_eq!(created.spec.as_ref().unwrap().labels["team"], "bench");
    assert!(created.created_at.is_some());

    // One directory of the VM's own, with an overlay on the base image.
    let files = agent.files_left();
    assert_eq!(files.len(), 1, "{files:?}");
    let overlay = files[0].join("disk0.qcow2");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], base.display().to_string());
    assert_eq!(files[0].join("seed.iso").exists(), with_seed);

    let started = agent.start_workload("vm1").await.unwrap();
    assert_eq!(state(&started), WorkloadState::Running);
    assert!(started.started_at.is_some(), "the uptime is known");
    assert_eq!(agent.inspect(&created.id).await.unwrap().name, "vm1");
    assert_eq!(agent.names().await, ["vm1"]);

    assert_status(
        agent.remove("vm1", false).await,
        Code::FailedPrecondition,
        "running",
    );
    let stopped = agent.stop("vm1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped);
    assert!(stopped.started_at.is_none());

    agent.remove("vm1", false).await.unwrap();
    assert_status(agent.inspect("vm1").await, Code::NotFound, "vm1");
    assert!(agent.names().await.is_empty());
    assert!(agent.files_left().is_empty(), "overlay and seed removed");
    assert!(base.exists(), "the base image stays");

    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        assert_eq!(event.workload_id, created.id);
        kinds.push(EventKind::try_from(event.kind).unwrap());
    }
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Started,
            EventKind::Stopped,
            EventKind::Removed
        ]
    );
    // The agent's own actions are not reported twice by its poller.
    let extra = tokio::time::timeout(Duration::from_millis(400), events.next()).await;
    assert!(extra.is_err(), "unexpected event {extra:?}");
}

#[tokio::test]
async fn a_vm_can_be_powered_off_and_removed_running_with_force() {
    let test = "force";
    let Some((mut agent, base)) = with_base_image(Agent::on_test_node(test, "").await) else {
        return;
    };
    agent.create("vm2", vm_spec(&base)).await.unwrap();
    agent.start_workload("vm2").await.unwrap();
    // No time for a graceful shutdown: powered off at once.
    let stopped = agent.stop("vm2", Duration::ZERO).await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped);
    agent.start_workload("vm2").await.unwrap();
    agent.remove("vm2", true).await.unwrap();
    assert!(agent.names().await.is_empty());
    assert!(agent.files_left().is_empty());
}

#[tokio::test]
async fn bad_specs_are_refused_naming_the_field_and_leave_nothing() {
    let test = "bad-input";
    let Some((mut agent, base)) = with_base_image(Agent::on_test_node(test, "").await) else {
        return;
    };
    type Change = fn(&mut WorkloadSpec);
    let cases: [(Change, Code, &str); 7] = [
        (
            |s| s.vm.as_mut().unwrap().vcpus = 0,
            Code::InvalidArgument,
            "spec.vm.vcpus",
        ),
        (
            |s| s.vm.as_mut().unwrap().memory_bytes = 1000,
            Code::InvalidArgument,
            "spec.vm.memory_bytes",
        ),
        (|s| s.vm = None, Code::InvalidArgument, "spec.vm"),
        (
            |s| s.vm.as_mut().unwrap().disks[0].base_image = "/nonexistent/base.qcow2".into(),
            Code::NotFound,
            "/nonexistent/base.qcow2",
        ),
        (
            |s| s.command = vec!["sleep".into()],
            Code::InvalidArgument,
            "spec.command",
        ),
        (
            |s| {
                s.gpus = Some(GpuRequest {
                    count: 1,
                    ..Default::default()
                });
            },
            Code::InvalidArgument,
            "vm.pci_passthrough",
        ),
        (
            |s| s.vm.as_mut().unwrap().pci_passthrough = vec!["not-pci".into()],
            Code::InvalidArgument,
            "spec.vm.pci_passthrough",
        ),
    ];
    for (change, code, needle) in cases {
        let mut spec = vm_spec(&base);
        change(&mut spec);
        assert_status(agent.create("bad", spec).await, code, needle);
    }
    assert_status(
        agent.create("bad name", vm_spec(&base)).await,
        Code::InvalidArgument,
        "name",
    );
    assert!(agent.names().await.is_empty());
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());

    agent.create("taken", vm_spec(&base)).await.unwrap();
    assert_status(
        agent.create("taken", vm_spec(&base)).await,
        Code::AlreadyExists,
        "taken",
    );
    assert_eq!(agent.files_left().len(), 1, "only the first VM's files");

    // A VM that is not running has nobody to exec into and no stats; its
    // console log is empty until it first starts.
    assert_status(
        agent
            .client
            .exec(ExecRequest {
                workload_id: "taken".into(),
                command: vec!["true".into()],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "not running",
    );
    assert_status(
        agent
            .client
            .stats(StatsRequest {
                workload_id: "taken".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "not running",
    );
    let mut logs = agent
        .client
        .logs(LogsRequest {
            workload_id: "taken".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(logs.message().await.unwrap().is_none(), "an empty log");
}

#[tokio::test]
async fn a_domain_libvirt_refuses_leaves_no_overlay() {
    let test = "refused";
    // A domain type libvirt does not know makes the define fail after the
    // overlay was made.
    let agent =
        Agent::on_test_node_with(test, "", |c| c.libvirt.domain_type = "no-such-type".into()).await;
    let Some((mut agent, base)) = with_base_image(agent) else {
        return;
    };
    let status = agent.create("vm3", vm_spec(&base)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("libvirt refused"), "{status:?}");
    assert!(agent.names().await.is_empty());
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());
}

/// A domain on the node that berth did not make, and one of another agent.
const FOREIGN_DOMAINS: &str = "
<domain type='test'><name>handmade</name><memory>65536</memory><os><type>hvm</type></os></domain>
<domain type='test'><name>other-agents</name><memory>65536</memory><os><type>hvm</type></os>
  <metadata><b:workload xmlns:b='https://berth.dev/xmlns/libvirt/workload/1'><b:owner>someone-else</b:owner></b:workload></metadata>
</domain>";

#[tokio::test]
async fn domains_of_others_are_neither_listed_nor_touched() {
    let test = "foreign";
    let Some(mut agent) = Agent::on_test_node(test, FOREIGN_DOMAINS).await else {
        return;
    };
    assert!(agent.names().await.is_empty());
    assert_status(
        agent.inspect("handmade").await,
        Code::PermissionDenied,
        "no berth metadata",
    );
    assert_status(
        agent.inspect("other-agents").await,
        Code::PermissionDenied,
        "someone-else",
    );
    assert_status(
        agent.stop("handmade", Duration::ZERO).await,
        Code::PermissionDenied,
        "not this agent's",
    );
    assert_status(
        agent.remove("other-agents", true).await,
        Code::PermissionDenied,
        "not this agent's",
    );
    if qemu_img() {
        let base = base_image(agent.dir.path());
        assert_status(
            agent.create("handmade", vm_spec(&base)).await,
            Code::AlreadyExists,
            "handmade",
        );
        assert!(agent.files_left().is_empty());
    }
}

#[tokio::test]
async fn a_lost_connection_is_unavailable_until_libvirt_answers() {
    let test = "reconnect";
    let dir = tempfile::tempdir().unwrap();
    // No node file yet: the test driver refuses to open.
    let node = dir.path().join("node.xml");
    let uri = format!("test://{}", node.display());
    let Some(mut agent) = Agent::start(test, dir, &uri, |_| {}).await else {
        return;
    };
    let status = agent
        .client
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&uri), "{status:?}");
    std::fs::write(&node, node_xml("")).unwrap();
    assert!(agent.names().await.is_empty(), "the next call connects");
}

#[tokio::test]
async fn an_agent_without_libvirt_uri_reports_the_runtime_off() {
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut config = Config::default();
    config.server.listen = socket.clone();
    config.server.http_listen = String::new();
    config.engines.docker = "off".into();
    config.engines.podman = "off".into();
    config.libvirt.uri = "off".into();
    let _service = berth_container_agent::start(config).await.unwrap();
    let channel = berth_server::client::connect(&socket, "", Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = ContainerAgentClient::new(channel);
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert!(info.unavailable_runtimes["RUNTIME_LIBVIRT"].contains("libvirt.uri"));
    let base = dir.path().join("base.qcow2");
    let status = client
        .create_workload(CreateWorkloadRequest {
            name: "vm".into(),
            spec: Some(vm_spec(&base)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// Real-VM tests take turns: one stops libvirtd, and this host's cores
/// boot one guest at a time.
static REAL_VMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The hypervisor's URI and a directory qemu can reach that holds the test
/// boot image; `None` (and why) when this host lacks a part.
fn real_vm_parts() -> Option<(String, tempfile::TempDir, PathBuf)> {
    let uri = berth_tests::require(berth_tests::Part::Vm, berth_tests::vm::hypervisor())?;
    let dir = berth_tests::vm::vm_dir();
    let base = berth_tests::require(
        berth_tests::Part::Vm,
        berth_tests::vm::boot_image(
            &dir.path().join("image"),
            Path::new(env!("CARGO_TARGET_TMPDIR")),
        ),
    )?;
    Some((uri, dir, base))
}

/// The boot image as a VM of 1 vCPU and 256 MiB on libvirt's `default`
/// network.
fn guest_spec(base: &Path) -> WorkloadSpec {
    let mut spec = vm_spec(base);
    let vm = spec.vm.as_mut().unwrap();
    vm.network = "default".into();
    vm.vcpus = 1;
    spec
}

/// Creates and starts `name`, then waits until its guest serves an exec;
/// the time from the start to that first exec.
async fn boot(client: &mut Client, name: &str, spec: WorkloadSpec) -> Result<Duration, String> {
    client
        .create_workload(CreateWorkloadRequest {
            name: name.to_string(),
            spec: Some(spec),
        })
        .await
        .map_err(|s| format!("create: {s:?}"))?;
    let started_at = std::time::Instant::now();
    client
        .start_workload(WorkloadRef {
            id: name.to_string(),
        })
        .await
        .map_err(|s| format!("start: {s:?}"))?;
    // An exec before the guest's shim serves is refused as UNAVAILABLE.
    let deadline = started_at + Duration::from_secs(180);
    loop {
        match exec_in(client, name, &["true"], &[], "", None).await {
            Ok(_) => return Ok(started_at.elapsed()),
            Err(status)
                if status.code() == Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(format!("the first exec into {name}: {status:?}")),
        }
    }
}

/// The names of every domain libvirt at `uri` has, running or not.
fn domains_on(uri: &str) -> Vec<String> {
    let listed = Command::new("virsh")
        .args(["-c", uri, "list", "--all", "--name"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn virsh(uri: &str, args: &[&str]) {
    let done = Command::new("virsh")
        .args(["-c", uri])
        .args(args)
        .output()
        .unwrap();
    assert!(done.status.success(), "virsh {args:?}: {done:?}");
}

/// A VM that goes away, and libvirtd that does, through a real VM: libvirtd
/// stopped with an exec in flight (the exec finishes: the shim's port is
/// qemu's), calls meanwhile UNAVAILABLE naming libvirtd and its socket, the
/// agent answering and back once libvirtd is; `virsh destroy` mid-exec ends
/// the exec as killed with a note naming the domain and the cause, an exec
/// after it is refused as a backend that is not running (what the
/// orchestrator retries on) saying why; the remove leaves no domain,
/// overlay, seed ISO or console log.
#[tokio::test]
async fn a_vm_or_libvirtd_going_away_is_named_and_nothing_leaks() {
    let _turn = REAL_VMS.lock().await;
    let test = "vm-gone";
    let Some((uri, dir, base)) = real_vm_parts() else {
        return;
    };
    let Some(mut agent) = Agent::start(test, dir, &uri, |_| {}).await else {
        return;
    };
    let name = format!("berth-gone-{}", std::process::id());
    let mut spec = guest_spec(&base);
    // A seed ISO too, to be removed with the rest.
    spec.vm.as_mut().unwrap().cloud_init_user_data = "#cloud-config\n".into();
    boot(&mut agent.client, &name, spec).await.unwrap();
    let files = agent.files_left();
    assert_eq!(files.len(), 1, "{files:?}");
    for made in ["disk0.qcow2", "seed.iso", "console.log"] {
        assert!(files[0].join(made).exists(), "{made} in {files:?}");
    }

    if uri == "qemu:///system" {
        let mut client = agent.client.clone();
        let vm = name.clone();
        let in_flight = tokio::spawn(async move {
            exec_in(
                &mut client,
                &vm,
                &["sh", "-c", "sleep 3; echo survived"],
                &[],
                "",
                None,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopped = berth_tests::vm::stop_libvirtd().unwrap();
        for status in [
            agent.inspect(&name).await.map(drop),
            agent
                .client
                .list_workloads(ListWorkloadsRequest::default())
                .await
                .map(drop),
            exec_in(&mut agent.client, &name, &["true"], &[], "", None)
                .await
                .map(drop),
        ] {
            let status = status.expect_err("libvirtd is gone");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            for needle in ["libvirtd", "/run/libvirt/libvirt-sock"] {
                assert!(status.message().contains(needle), "{status:?}");
            }
        }
        agent.client.info(InfoRequest {}).await.unwrap();
        let (out, _, exit) = in_flight.await.unwrap().unwrap();
        assert_eq!(
            (String::from_utf8_lossy(&out).as_ref(), exit.exit_code),
            ("survived\n", 0)
        );
        stopped.start().unwrap();
        let back = agent.inspect(&name).await.unwrap();
        assert_eq!(state(&back), WorkloadState::Running, "{back:?}");
        let (out, _, _) = exec_in(&mut agent.client, &name, &["hostname"], &[], "", None)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "berth-guest\n");
    } else {
        eprintln!("{test}: libvirt at {uri} is not the system daemon: libvirtd is not stopped");
    }

    let mut client = agent.client.clone();
    let vm = name.clone();
    let exec =
        tokio::spawn(
            async move { exec_in(&mut client, &vm, &["sleep", "60"], &[], "", None).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    virsh(&uri, &["destroy", &name]);
    let (_, err, exit) = tokio::time::timeout(Duration::from_secs(10), exec)
        .await
        .expect("the exec ends with its VM")
        .unwrap()
        .unwrap();
    assert_eq!(
        (exit.exit_code, exit.reason()),
        (137, ExitReason::Signaled),
        "{exit:?}"
    );
    let err = String::from_utf8_lossy(&err);
    for needle in [name.as_str(), "went down while the exec ran", "destroyed"] {
        assert!(err.contains(needle), "`{err}` lacks `{needle}`");
    }
    let refused = exec_in(&mut agent.client, &name, &["true"], &[], "", None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        berth_server::error::has_reason(
            &refused,
            berth_server::error::reasons::WORKLOAD_NOT_RUNNING
        ),
        "{refused:?}"
    );
    for needle in [name.as_str(), "destroyed"] {
        assert!(refused.message().contains(needle), "{refused:?}");
    }

    agent.remove(&name, true).await.unwrap();
    assert!(!domains_on(&uri).contains(&name), "the domain is undefined");
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());
}

/// libvirt's lifecycle events, not polling, tell the agent of a VM that
/// went down outside it: with polling every 60 s, a `virsh destroy` is an
/// event on the agent's stream within ~100 ms of virsh's return, and a
/// `virsh start` one too.
#[tokio::test]
async fn a_destroyed_vm_is_an_event_at_once() {
    let _turn = REAL_VMS.lock().await;
    let test = "vm-events";
    let Some((uri, dir, base)) = real_vm_parts() else {
        return;
    };
    let Some(mut agent) = Agent::start(test, dir, &uri, |c| {
        c.libvirt.poll_interval = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    let name = format!("berth-events-{}", std::process::id());
    let created = agent.create(&name, guest_spec(&base)).await.unwrap();
    agent.start_workload(&name).await.unwrap();
    let mut events = agent
        .client
        .events(EventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut delays = Vec::new();
    for _ in 0..3 {
        // libvirt sends the event once the destroy is done, as virsh returns.
        virsh(&uri, &["destroy", &name]);
        let destroyed_at = std::time::Instant::now();
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event well before the 60 s poll")
            .unwrap()
            .unwrap();
        delays.push(destroyed_at.elapsed());
        assert_eq!(event.workload_id, created.id);
        assert_eq!(event.kind(), EventKind::Stopped, "{event:?}");
        assert!(event.message.contains("outside berth"), "{event:?}");
        // Started again outside berth: an event too.
        virsh(&uri, &["start", &name]);
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("a started event")
            .unwrap()
            .unwrap();
        assert_eq!(event.kind(), EventKind::Started, "{event:?}");
    }
    agent.remove(&name, true).await.unwrap();
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());
    let slowest = *delays.iter().max().unwrap();
    eprintln!(
        "{test}: `virsh destroy` (from its return) to the Stopped event: {}",
        spread(&mut delays)
    );
    assert!(slowest < Duration::from_millis(250), "{delays:?}");
}

/// p50 and p99 of `samples`, in ms.
fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms ({} samples)",
        at(0.5),
        at(0.99),
        samples.len()
    )
}

/// An image without the exec shim, with qemu-ga: execs go through the qemu
/// guest agent (guest-exec, guest-exec-status): output, exit code, env,
/// working directory and a timeout; the dispatch time of `true`.
#[tokio::test]
async fn execs_go_through_the_guest_agent_without_a_shim() {
    let _turn = REAL_VMS.lock().await;
    let test = "guest-agent";
    let Some(uri) = berth_tests::require(berth_tests::Part::Vm, berth_tests::vm::hypervisor())
    else {
        return;
    };
    let dir = berth_tests::vm::vm_dir();
    let Some(base) = berth_tests::require(
        berth_tests::Part::Vm,
        berth_tests::vm::guest_agent_image(&dir.path().join("image")),
    ) else {
        return;
    };
    let Some(mut agent) = Agent::start(test, dir, &uri, |_| {}).await else {
        return;
    };
    let name = format!("berth-qga-{}", std::process::id());
    let first = boot(&mut agent.client, &name, guest_spec(&base))
        .await
        .unwrap();
    let (out, err, exit) = exec_in(
        &mut agent.client,
        &name,
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo \"$GREETING\"; pwd; exit 3",
        ],
        &[("GREETING", "hello from the host")],
        "/tmp",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "out\nhello from the host\n/tmp\n"
    );
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!((exit.exit_code, exit.reason()), (3, ExitReason::Exited));
    let (_, _, exit) = exec_in(
        &mut agent.client,
        &name,
        &["sleep", "30"],
        &[],
        "",
        Some(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    assert_eq!(exit.reason(), ExitReason::TimedOut, "{exit:?}");
    let mut round_trips = Vec::new();
    for _ in 0..50 {
        let at = std::time::Instant::now();
        let (_, _, exit) = exec_in(&mut agent.client, &name, &["true"], &[], "", None)
            .await
            .unwrap();
        assert_eq!(exit.exit_code, 0);
        round_trips.push(at.elapsed());
    }
    agent.remove(&name, true).await.unwrap();
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());
    eprintln!(
        "{test}: start to first exec {:.1} s; exec `true` through the guest agent {}",
        first.as_secs_f64(),
        percentiles(&mut round_trips)
    );
}

/// A separate agent process (the berth-agent binary) on the test's
/// directory and libvirt, killed on drop; its client once it answers.
async fn agent_process(
    dir: &Path,
    uri: &str,
    owner: &str,
    settings: &[(&str, &str)],
) -> (berth_tests::Process, Client) {
    let socket = format!("unix://{}", dir.join("agent.sock").display());
    let http = format!("127.0.0.1:{}", berth_tests::free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .envs([
            ("BERTH_SERVER__LISTEN", socket.as_str()),
            ("BERTH_SERVER__HTTP_LISTEN", &http),
            ("BERTH_ENGINES__DOCKER", "off"),
            ("BERTH_ENGINES__PODMAN", "off"),
            ("BERTH_ENGINES__OWNER", owner),
            (
                "BERTH_ENGINES__STATE_DIR",
                &dir.join("state").display().to_string(),
            ),
            ("BERTH_LIBVIRT__URI", uri),
            (
                "BERTH_LIBVIRT__DISK_DIR",
                &dir.join("disks").display().to_string(),
            ),
            ("RUST_LOG", "warn"),
        ])
        .envs(settings.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let process = berth_tests::Process {
        child,
        name: "berth-agent".into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) =
            berth_server::client::connect(&socket, "", Duration::from_secs(1)).await
        {
            let mut client = ContainerAgentClient::new(channel);
            if client.info(InfoRequest {}).await.is_ok() {
                return (process, client);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the guest shim's journal lines start in a VM's logs.
const JOURNAL: &str = "berth-exec: ";

/// Everything an attach to `key` streams: stdout, stderr and the exit.
async fn attached(client: &mut Client, key: &str) -> (String, String, ExitStatus) {
    let mut stream = client
        .attach_exec(AttachExecRequest {
            exec_key: key.to_string(),
        })
        .await
        .unwrap_or_else(|s| panic!("AttachExec {key}: {s:?}"))
        .into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await.unwrap() {
        match message.output.unwrap() {
            exec_output::Output::Stdout(d) => out.extend(d),
            exec_output::Output::Stderr(d) => err.extend(d),
            exec_output::Output::Exit(exit) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                    exit,
                );
            }
            exec_output::Output::DroppedBytes(n) => panic!("{n} output bytes dropped"),
        }
    }
    panic!("the attach to {key} ended without an exit status")
}

/// A keyed exec into `name`, its first output read (the command started).
async fn keyed_exec(
    client: &mut Client,
    name: &str,
    key: &str,
    script: &str,
) -> (tonic::Streaming<ExecOutput>, exec_output::Output) {
    let mut stream = client
        .exec(ExecRequest {
            workload_id: name.to_string(),
            exec_key: key.to_string(),
            command: ["sh", "-c", script].map(String::from).to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().output.unwrap();
    (stream, first)
}

/// kill -9 of the agent process while a keyed exec runs in the VM: the VM
/// and the command run on (the guest's shim keeps a keyed exec running when
/// the agent's end of its port closes, with its exit and output), and a new
/// agent process on the same state attaches by the key: the whole output
/// once and exit 0, as if nothing happened; a second attach gets the same
/// from the new agent's table. A keyed exec left with no agent for
/// `libvirt.exec_detach_grace` is killed by the shim, saying so. CancelExec
/// of a key an earlier agent started kills it. The VM's Logs hold the
/// shim's journal line for each exec's start and end beside the console.
#[tokio::test]
async fn a_killed_agent_s_keyed_exec_runs_on_and_is_attached_again() {
    let _turn = REAL_VMS.lock().await;
    let test = "agent-kill";
    let Some((uri, dir, base)) = real_vm_parts() else {
        return;
    };
    let owner = format!("t-{test}");
    // Long enough for a restart under emulation; short enough to see it end.
    let grace = [("BERTH_LIBVIRT__EXEC_DETACH_GRACE", "15s")];
    let (first, mut client) = agent_process(dir.path(), &uri, &owner, &grace).await;
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    if let Some(why) = info.unavailable_runtimes.get("RUNTIME_LIBVIRT") {
        berth_tests::require::<(), _>(berth_tests::Part::Libvirt, Err(why.clone()));
        return;
    }
    let name = format!("berth-kill-{}", std::process::id());
    boot(&mut client, &name, guest_spec(&base)).await.unwrap();
    let (mut in_flight, first_output) = keyed_exec(
        &mut client,
        &name,
        "run-1",
        "echo started; sleep 5; echo done; echo note >&2",
    )
    .await;
    assert_eq!(
        first_output,
        exec_output::Output::Stdout(b"started\n".to_vec())
    );
    let killed_at = std::time::Instant::now();
    first.kill();
    assert!(
        in_flight.message().await.is_err(),
        "the stream breaks with its agent"
    );
    let domstate = Command::new("virsh")
        .args(["-c", &uri, "domstate", &name])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&domstate.stdout).trim(), "running");

    let (second, mut client) = agent_process(dir.path(), &uri, &owner, &grace).await;
    let found = client
        .inspect_workload(WorkloadRef { id: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&found), WorkloadState::Running, "{found:?}");
    let (out, err, exit) = attached(&mut client, "run-1").await;
    assert_eq!(
        (out.as_str(), err.as_str(), exit.exit_code),
        ("started\ndone\n", "note\n", 0),
        "the whole output once, and the exit"
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "the command ran to its end, not killed: {:?}",
        killed_at.elapsed()
    );
    // Now in the new agent's table: the same again.
    let again = attached(&mut client, "run-1").await;
    assert_eq!((again.0, again.2.exit_code), (out, 0));
    assert_status(
        client
            .attach_exec(AttachExecRequest {
                exec_key: "never-run".into(),
            })
            .await,
        Code::NotFound,
        "never-run",
    );

    // A keyed exec no agent comes back for within the grace is killed.
    let (_left, _) = keyed_exec(&mut client, &name, "run-2", "echo up; sleep 60; echo late").await;
    second.kill();
    tokio::time::sleep(Duration::from_secs(17)).await;
    let (third, mut client) = agent_process(dir.path(), &uri, &owner, &grace).await;
    let (out, err, exit) = attached(&mut client, "run-2").await;
    assert_eq!((out.as_str(), exit.exit_code), ("up\n", 137), "{err}");
    assert!(
        err.contains("no agent attached within its detach grace"),
        "{err}"
    );

    // CancelExec of a key an earlier agent started kills its command.
    let (_left, _) = keyed_exec(&mut client, &name, "run-3", "echo up; sleep 60").await;
    third.kill();
    let (_fourth, mut client) = agent_process(dir.path(), &uri, &owner, &grace).await;
    client
        .cancel_exec(CancelExecRequest {
            exec_key: "run-3".into(),
        })
        .await
        .unwrap();
    let (_, _, exit) = attached(&mut client, "run-3").await;
    assert_eq!(exit.reason(), ExitReason::Cancelled, "{exit:?}");
    let (out, _, exit) = exec_in(
        &mut client,
        &name,
        &["sh", "-c", "ps -o args | grep -c '[s]leep 60' || true"],
        &[],
        "",
        None,
    )
    .await
    .unwrap();
    assert_eq!(exit.exit_code, 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "0\n",
        "the cancelled and abandoned commands are gone"
    );

    // The shim's journal, in the VM's Logs beside the console. Its lines are
    // written by a thread of their own to a slow emulated console: the last
    // one may come a moment after the exec ended.
    let wanted = [
        "berth-exec: started key=\"run-1\" command=\"sh -c echo started;",
        "berth-exec: ended key=\"run-1\" exit=0 after 5.",
        "berth-exec: ended key=\"run-2\" exit=137",
        "berth-exec: ended key=\"run-3\" exit=137",
        "berth-exec: started key=- command=\"true\"",
        "berth-guest-up",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lines = all_lines(logs(&mut client, &name, 0, false, None).await.unwrap())
            .await
            .unwrap();
        let text: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        let missing: Vec<&&str> = wanted
            .iter()
            .filter(|wanted| !text.iter().any(|line| line.contains(**wanted)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {missing:?} in the VM's logs: {text:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    client
        .remove_workload(RemoveWorkloadRequest {
            id: name.clone(),
            force: true,
        })
        .await
        .unwrap();
    assert!(!domains_on(&uri).contains(&name));
    let disks = std::fs::read_dir(dir.path().join("disks")).map_or(0, |d| d.count());
    assert_eq!(disks, 0, "files left in the disk directory");
}

/// Waits for `marker` in the guest's console log; the log so far when it
/// does not come in time.
async fn console_shows(log: &Path, marker: &str, within: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = std::fs::read(log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.contains(marker)) {
            return Ok(line.trim().to_string());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real VM under libvirtd's qemu driver, booted once for every check that
/// needs a guest: Debian's kernel boots a busybox initramfs from the disk the
/// agent made (an overlay on the test image) on libvirt's `default` network;
/// the guest's /init reports on the serial console, which the agent has
/// libvirt copy into the VM's files directory, asks DHCP for an address and
/// runs the exec shim on the virtio-serial port the agent gave the domain.
/// Checked through the agent's API: an exec before the guest is up is
/// refused saying so; execs (output, exit code, env, cwd, a timeout that
/// kills the command's group); Logs from the console (tail, follow, since);
/// Stats from libvirt; the guest's IP in InspectWorkload; one exec at a time
/// with a bounded queue; a new agent on the same domains finds the VM and
/// execs into it; `virsh destroy` mid-exec ends the exec and the VM is seen
/// stopped; a remove leaves nothing. The domain type is the agent's `auto`:
/// KVM where it can boot this kernel, qemu (TCG) otherwise.
#[tokio::test]
async fn a_real_vm_boots_and_stops() {
    let _turn = REAL_VMS.lock().await;
    let test = "real-vm";
    let Some(uri) = berth_tests::require(berth_tests::Part::Vm, berth_tests::vm::hypervisor())
    else {
        return;
    };
    let dir = berth_tests::vm::vm_dir();
    let image_dir = dir.path().join("image");
    let Some(base) = berth_tests::require(
        berth_tests::Part::Vm,
        berth_tests::vm::boot_image(&image_dir, Path::new(env!("CARGO_TARGET_TMPDIR"))),
    ) else {
        return;
    };
    let Some(mut agent) = Agent::start(test, dir, &uri, |c| c.server.shutdown_grace = DRAIN).await
    else {
        return;
    };
    let mut events = agent
        .client
        .events(EventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut spec = vm_spec(&base);
    let vm = spec.vm.as_mut().unwrap();
    vm.network = "default".into();
    vm.vcpus = 1;
    vm.memory_bytes = 256 << 20;
    let name = format!("berth-test-{}", std::process::id());
    let created = agent.create(&name, spec).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a created event")
        .unwrap()
        .unwrap();
    assert_eq!(event.workload_id, created.id);
    let domain_type = event
        .message
        .split("(type ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or("?")
        .to_string();
    let files = agent.files_left();
    assert_eq!(files.len(), 1, "{files:?}");
    let console = files[0].join("console.log");

    let started_at = std::time::Instant::now();
    let booted = match agent.start_workload(&name).await {
        Ok(started) => {
            assert_eq!(state(&started), WorkloadState::Running);
            // Before the guest is up: no address yet, and why.
            let early = agent.inspect(&name).await.unwrap();
            assert!(
                !early.ip_addresses.is_empty() || !early.ip_addresses_note.is_empty(),
                "{early:?}"
            );
            // An exec before the guest's shim serves is refused saying so
            // (unless the guest booted within the shim's accept wait).
            if let Err(status) = exec_in(&mut agent.client, &name, &["true"], &[], "", None).await {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("has not booted yet"),
                    "{status:?}"
                );
            }
            console_shows(&console, "berth-guest-up", Duration::from_secs(180))
                .await
                .map(|line| (line, started_at.elapsed()))
        }
        Err(status) => Err(format!("start failed: {status:?}")),
    };
    let checks = match &booted {
        Ok(_) => in_the_guest(&mut agent, &name, started_at, &uri).await,
        Err(_) => Err("not booted".to_string()),
    };
    let stopped = agent
        .stop(&name, Duration::from_secs(2))
        .await
        .map(|w| state(&w));
    agent.remove(&name, true).await.unwrap();
    let (line, boot_time) = booted.unwrap_or_else(|log| {
        panic!("the guest did not report (domain type {domain_type}); its console said:\n{log}")
    });
    let checks = checks.unwrap_or_else(|e| panic!("in the VM: {e}"));
    for line in checks {
        eprintln!("{test}: {line}");
    }
    eprintln!(
        "{test}: domain type {domain_type}: start to `{line}` on the console in {:.1} s",
        boot_time.as_secs_f64()
    );
    assert!(line.contains("kernel="), "{line}");
    assert_eq!(stopped.unwrap(), WorkloadState::Stopped);
    assert!(agent.files_left().is_empty(), "{:?}", agent.files_left());
}

/// Every check on the booted VM, in an order that leaves it usable for the
/// next; the figures measured on the way. The last one destroys the domain.
async fn in_the_guest(
    agent: &mut Agent,
    name: &str,
    started_at: std::time::Instant,
    uri: &str,
) -> Result<Vec<String>, String> {
    let mut figures = vec![execs_in_the_guest(&mut agent.client, name, started_at).await?];
    figures.push(logs_of_the_console(&mut agent.client, name).await?);
    figures.push(stats_from_libvirt(&mut agent.client, name).await?);
    figures.push(the_guests_address(&mut agent.client, name).await?);
    one_exec_at_a_time(&agent.client, name).await?;
    agent.restart().await;
    let found = agent.inspect(name).await.map_err(|s| format!("{s:?}"))?;
    assert_eq!(
        state(&found),
        WorkloadState::Running,
        "a new agent finds the VM"
    );
    let (out, _, _) = exec_in(&mut agent.client, name, &["hostname"], &[], "", None)
        .await
        .map_err(|s| format!("exec through a new agent: {s:?}"))?;
    assert_eq!(String::from_utf8_lossy(&out), "berth-guest\n");
    destroyed_mid_exec(&mut agent.client, name, uri).await?;
    Ok(figures)
}

/// p50 and max of `samples`, in ms.
fn spread(samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "p50 {:.1} ms, max {:.1} ms ({} samples)",
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    )
}

/// Output, exit code, environment and working directory of an exec in the
/// guest, then a timeout (the command's group killed, the next exec served);
/// a summary with the boot-to-first-exec time and exec round trips.
async fn execs_in_the_guest(
    client: &mut Client,
    name: &str,
    started_at: std::time::Instant,
) -> Result<String, String> {
    // The shim starts right after the boot line; an exec before it serves is
    // refused as UNAVAILABLE, which the first one waits out.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        match exec_in(client, name, &["true"], &[], "", None).await {
            Ok(done) => break done,
            Err(status)
                if status.code() == Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(format!("the first exec failed: {status:?}")),
        }
    };
    assert_eq!(first.2.exit_code, 0, "{first:?}");
    let first_exec = started_at.elapsed();

    let (out, err, exit) = exec_in(
        client,
        name,
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo \"$GREETING\"; pwd; exit 3",
        ],
        &[("GREETING", "hello from the host")],
        "/tmp",
        None,
    )
    .await
    .map_err(|s| format!("{s:?}"))?;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "out\nhello from the host\n/tmp\n"
    );
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.reason(), ExitReason::Exited);

    let (_, _, exit) = exec_in(
        client,
        name,
        &["sh", "-c", "sleep 77 & sleep 78"],
        &[],
        "",
        Some(Duration::from_secs(1)),
    )
    .await
    .map_err(|s| format!("{s:?}"))?;
    assert_eq!(exit.reason(), ExitReason::TimedOut, "{exit:?}");
    // The timed-out command's whole group is gone, and the shim serves on.
    let mut left = String::new();
    for _ in 0..20 {
        let (out, _, _) = exec_in(client, name, &["ps", "-o", "args"], &[], "", None)
            .await
            .map_err(|s| format!("{s:?}"))?;
        left = String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| l.contains("sleep 7"))
            .collect::<Vec<_>>()
            .join("; ");
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "left running in the guest: {left}");

    let mut round_trips = Vec::new();
    for _ in 0..50 {
        let at = std::time::Instant::now();
        let (_, _, exit) = exec_in(client, name, &["true"], &[], "", None)
            .await
            .map_err(|s| format!("{s:?}"))?;
        assert_eq!(exit.exit_code, 0);
        round_trips.push(at.elapsed());
    }
    Ok(format!(
        "start to first exec {:.1} s; exec `true` round trip {}",
        first_exec.as_secs_f64(),
        spread(&mut round_trips)
    ))
}

async fn exec_in(
    client: &mut Client,
    name: &str,
    command: &[&str],
    env: &[(&str, &str)],
    working_dir: &str,
    timeout: Option<Duration>,
) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), tonic::Status> {
    let mut stream = client
        .exec(ExecRequest {
            workload_id: name.to_string(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| berth_proto::common::v1::EnvVar {
                    name: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            working_dir: working_dir.to_string(),
            timeout: timeout.map(|t| t.try_into().unwrap()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await? {
        match message.output.unwrap() {
            exec_output::Output::Stdout(d) => out.extend(d),
            exec_output::Output::Stderr(d) => err.extend(d),
            exec_output::Output::Exit(exit) => return Ok((out, err, exit)),
            exec_output::Output::DroppedBytes(n) => panic!("{n} output bytes dropped"),
        }
    }
    Err(tonic::Status::internal(
        "the exec stream ended without an exit status",
    ))
}

async fn logs(
    client: &mut Client,
    name: &str,
    tail: u32,
    follow: bool,
    since: Option<std::time::SystemTime>,
) -> Result<tonic::Streaming<LogLine>, String> {
    client
        .logs(LogsRequest {
            workload_id: name.to_string(),
            follow,
            tail,
            since: since.map(Into::into),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("Logs: {s:?}"))
}

/// All the lines of a Logs stream that does not follow.
async fn all_lines(mut stream: tonic::Streaming<LogLine>) -> Result<Vec<LogLine>, String> {
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await.map_err(|s| format!("{s:?}"))? {
        lines.push(line);
    }
    Ok(lines)
}

/// The first line of a following stream that contains `marker`, other than
/// the shim's journal line of the exec that wrote it (which names its
/// command).
async fn line_with(
    stream: &mut tonic::Streaming<LogLine>,
    marker: &str,
) -> Result<LogLine, String> {
    // A loaded machine's emulated serial console is slow.
    let deadline = Duration::from_secs(30);
    // The shim's journal line of the exec names its command (`echo
    // <marker>`), and shares the console with the command's own output, so
    // the two may land on one line: an occurrence of the marker that is not
    // the command's text is the output.
    let echoed = format!("echo {marker}");
    tokio::time::timeout(deadline, async {
        while let Some(line) = stream.message().await.map_err(|s| format!("{s:?}"))? {
            if line.line.matches(marker).count() > line.line.matches(&echoed).count() {
                return Ok(line);
            }
        }
        Err(format!("the log stream ended before `{marker}`"))
    })
    .await
    .map_err(|_| format!("`{marker}` did not come within {deadline:?}"))?
}

/// The console as Logs: the boot line with a time, `tail`, lines the guest
/// writes later while following (and how late they come), `since`.
async fn logs_of_the_console(client: &mut Client, name: &str) -> Result<String, String> {
    let kept = all_lines(logs(client, name, 0, false, None).await?).await?;
    let up = kept
        .iter()
        .find(|l| l.line.starts_with("berth-guest-up"))
        .ok_or_else(|| format!("no boot line in {kept:?}"))?;
    assert!(up.time.is_some());
    assert_eq!(up.stream(), LogStream::Stdout);
    let last = all_lines(logs(client, name, 1, false, None).await?).await?;
    assert_eq!(last.len(), 1, "{last:?}");

    // Written to the console by an exec, read through a follower: the time
    // from the exec's start to the line's arrival.
    let mut follower = logs(client, name, 1, true, None).await?;
    let mut delays = Vec::new();
    for n in 0..10 {
        let marker = format!("berth-follow-{n}");
        let at = std::time::Instant::now();
        let command = format!("echo {marker} >/dev/console");
        exec_in(client, name, &["sh", "-c", &command], &[], "", None)
            .await
            .map_err(|s| format!("{s:?}"))?;
        line_with(&mut follower, &marker).await?;
        delays.push(at.elapsed());
    }

    let since = std::time::SystemTime::now();
    exec_in(
        client,
        name,
        &["sh", "-c", "echo berth-after-since >/dev/console"],
        &[],
        "",
        None,
    )
    .await
    .map_err(|s| format!("{s:?}"))?;
    line_with(&mut follower, "berth-after-since").await?;
    let after = all_lines(logs(client, name, 0, false, Some(since)).await?).await?;
    assert!(
        after.iter().any(|l| l.line == "berth-after-since"),
        "{after:?}"
    );
    assert!(
        after.iter().all(|l| !l.line.starts_with("berth-guest-up")
            && (l.line.starts_with(JOURNAL) || !l.line.contains("berth-follow-"))),
        "lines before `since`: {after:?}"
    );
    Ok(format!(
        "log follow: exec start to the line on a follower {}",
        spread(&mut delays)
    ))
}

async fn stats_once(client: &mut Client, name: &str) -> Result<WorkloadStats, String> {
    let mut stream = client
        .stats(StatsRequest {
            workload_id: name.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("Stats: {s:?}"))?
        .into_inner();
    let sample = stream
        .message()
        .await
        .map_err(|s| format!("{s:?}"))?
        .ok_or("no sample")?;
    assert!(stream.message().await.unwrap().is_none(), "one sample");
    Ok(sample)
}

/// Stats from libvirt: memory, block and network counters, CPU use of a
/// busy guest, a stream of samples; the call's latency.
async fn stats_from_libvirt(client: &mut Client, name: &str) -> Result<String, String> {
    let mut latencies = Vec::new();
    let mut sample = WorkloadStats::default();
    for _ in 0..5 {
        let at = std::time::Instant::now();
        sample = stats_once(client, name).await?;
        latencies.push(at.elapsed());
    }
    assert!(sample.memory_bytes > 0, "{sample:?}");
    assert_eq!(sample.memory_limit_bytes, 256 << 20, "{sample:?}");
    assert!(sample.block_read_bytes.unwrap_or(0) > 0, "{sample:?}");
    assert!(sample.network_tx_bytes.is_some(), "{sample:?}");

    // A busy guest uses about its one vCPU.
    let mut busy_client = client.clone();
    let busy_name = name.to_string();
    let busy = tokio::spawn(async move {
        exec_in(
            &mut busy_client,
            &busy_name,
            &["sh", "-c", "while :; do :; done"],
            &[],
            "",
            Some(Duration::from_secs(3)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let busy_sample = stats_once(client, name).await?;
    let busy = busy.await.unwrap().map_err(|s| format!("{s:?}"))?;
    assert_eq!(busy.2.reason(), ExitReason::TimedOut);
    assert!(busy_sample.cpu_cores > 0.5, "{busy_sample:?}");

    let mut stream = client
        .stats(StatsRequest {
            workload_id: name.to_string(),
            stream: true,
            interval: Some(Duration::from_millis(300).try_into().unwrap()),
        })
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner();
    let mut times = Vec::new();
    for _ in 0..3 {
        let sample = stream
            .message()
            .await
            .map_err(|s| format!("{s:?}"))?
            .ok_or("the stream ended")?;
        times.push(std::time::SystemTime::try_from(sample.time.unwrap()).unwrap());
    }
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    Ok(format!(
        "stats: one sample (a {} ms CPU window) {}; busy guest {:.2} cores; rss {} MiB, read {} KiB",
        200,
        spread(&mut latencies),
        busy_sample.cpu_cores,
        sample.memory_bytes >> 20,
        sample.block_read_bytes.unwrap_or(0) >> 10
    ))
}

/// The guest's DHCP address in InspectWorkload, the one the guest has.
async fn the_guests_address(client: &mut Client, name: &str) -> Result<String, String> {
    let asked = std::time::Instant::now();
    let deadline = asked + Duration::from_secs(60);
    let workload = loop {
        let workload = client
            .inspect_workload(WorkloadRef {
                id: name.to_string(),
            })
            .await
            .map_err(|s| format!("{s:?}"))?
            .into_inner();
        if !workload.ip_addresses.is_empty() {
            break workload;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "no address within 60 s: {}",
                workload.ip_addresses_note
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(workload.ip_addresses_note.is_empty(), "{workload:?}");
    let address = workload.ip_addresses[0].clone();
    let ip = address.split('/').next().unwrap();
    let (out, _, _) = exec_in(
        client,
        name,
        &["ip", "-4", "addr", "show", "eth0"],
        &[],
        "",
        None,
    )
    .await
    .map_err(|s| format!("{s:?}"))?;
    let shown = String::from_utf8_lossy(&out);
    assert!(
        shown.contains(&format!("inet {ip}/")),
        "{address} vs {shown}"
    );
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let at = std::time::Instant::now();
        client
            .inspect_workload(WorkloadRef {
                id: name.to_string(),
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        latencies.push(at.elapsed());
    }
    Ok(format!(
        "guest address {address}; InspectWorkload with it {}",
        spread(&mut latencies)
    ))
}

/// One exec runs; 4 wait behind it (the agent's bound) and all succeed; one
/// more is refused at once.
async fn one_exec_at_a_time(client: &Client, name: &str) -> Result<(), String> {
    let mut running = Vec::new();
    for n in 0..5 {
        let mut client = client.clone();
        let name = name.to_string();
        let command = if n == 0 { "sleep 2" } else { "true" };
        running.push(tokio::spawn(async move {
            exec_in(&mut client, &name, &["sh", "-c", command], &[], "", None).await
        }));
        // In this order into the queue.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = exec_in(&mut client.clone(), name, &["true"], &[], "", None).await;
    assert_status(refused, Code::ResourceExhausted, "one exec at a time");
    for exec in running {
        let (_, _, exit) = exec.await.unwrap().map_err(|s| format!("{s:?}"))?;
        assert_eq!(exit.exit_code, 0);
    }
    Ok(())
}

/// `virsh destroy` while an exec runs: the exec ends (not with success),
/// and the agent sees the VM stopped.
async fn destroyed_mid_exec(client: &mut Client, name: &str, uri: &str) -> Result<(), String> {
    let mut exec_client = client.clone();
    let exec_name = name.to_string();
    let exec = tokio::spawn(async move {
        exec_in(
            &mut exec_client,
            &exec_name,
            &["sleep", "60"],
            &[],
            "",
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let destroyed = Command::new("virsh")
        .args(["-c", uri, "destroy", name])
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    assert!(destroyed.status.success(), "{destroyed:?}");
    let ended = tokio::time::timeout(Duration::from_secs(10), exec)
        .await
        .map_err(|_| "the exec did not end after its VM was destroyed")?
        .unwrap();
    match ended {
        Ok((_, _, exit)) => assert_ne!(exit.exit_code, 0, "{exit:?}"),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    let gone = client
        .inspect_workload(WorkloadRef {
            id: name.to_string(),
        })
        .await
        .map_err(|s| format!("{s:?}"))?
        .into_inner();
    assert_eq!(state(&gone), WorkloadState::Stopped, "{gone:?}");
    Ok(())
}

/// Creates and boots `name` from `base` on `agent`, `within` at most; the
/// time from the start to the first exec, or why there was none.
async fn boot_within(
    agent: &mut Agent,
    name: &str,
    base: &Path,
    within: Duration,
) -> Result<Duration, String> {
    let booted = tokio::time::timeout(within, boot(&mut agent.client, name, guest_spec(base)))
        .await
        .unwrap_or_else(|_| Err(format!("no exec within {within:?}")));
    if booted.is_err() {
        let _ = agent.remove(name, true).await;
    }
    booted
}

/// `rounds` execs of `true` into `name`; their round trips.
async fn exec_round_trips(client: &mut Client, name: &str, rounds: usize) -> Vec<Duration> {
    let mut round_trips = Vec::new();
    for _ in 0..rounds {
        let at = std::time::Instant::now();
        let (_, _, exit) = exec_in(client, name, &["true"], &[], "", None)
            .await
            .unwrap();
        assert_eq!(exit.exit_code, 0);
        round_trips.push(at.elapsed());
    }
    round_trips
}

/// docs/benchmarks.md's VM figures, in one run: boot to first exec of the
/// test VM under TCG and under KVM (forced), exec dispatch of `true` into a
/// VM through the shim and through the qemu guest agent, and `docker exec`
/// into a busybox container. Not part of the suite (it takes minutes):
/// `cargo test -p berth-container-agent --test libvirt benchmark -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a benchmark: run it with --ignored"]
async fn benchmark_vm_boot_and_exec_paths() {
    const ROUNDS: usize = 200;
    let _turn = REAL_VMS.lock().await;
    let test = "bench";
    let Some((uri, dir, shim_image)) = real_vm_parts() else {
        return;
    };
    let qga_image = berth_tests::vm::guest_agent_image(&dir.path().join("qga-image")).unwrap();
    let mut rows = Vec::new();
    let Some(mut agent) = Agent::start(test, dir, &uri, |_| {}).await else {
        return;
    };
    let pid = std::process::id();
    for (what, image, name) in [
        ("shim", &shim_image, format!("berth-bench-shim-{pid}")),
        ("guest agent", &qga_image, format!("berth-bench-qga-{pid}")),
    ] {
        let boot = boot_within(&mut agent, &name, image, Duration::from_secs(300))
            .await
            .unwrap();
        rows.push(format!(
            "TCG (auto), {what} image: start → first exec {:.1} s",
            boot.as_secs_f64()
        ));
        let mut trips = exec_round_trips(&mut agent.client, &name, ROUNDS).await;
        rows.push(format!(
            "exec `true` through the {what}: {}",
            percentiles(&mut trips)
        ));
        agent.remove(&name, true).await.unwrap();
    }

    let kvm_dir = berth_tests::vm::vm_dir();
    let mut kvm = Agent::start("bench-kvm", kvm_dir, &uri, |c| {
        c.libvirt.domain_type = "kvm".into();
    })
    .await
    .unwrap();
    let name = format!("berth-bench-kvm-{pid}");
    match boot_within(&mut kvm, &name, &shim_image, Duration::from_secs(60)).await {
        Ok(boot) => {
            rows.push(format!(
                "KVM (forced), shim image: start → first exec {:.1} s",
                boot.as_secs_f64()
            ));
            kvm.remove(&name, true).await.unwrap();
        }
        Err(why) => rows.push(format!("KVM (forced), shim image: {why}")),
    }

    if let Some(tar) = berth_tests::busybox_rootfs(&berth_tests::target_tmpdir().join("images")) {
        let image = format!("berth-bench-busybox:{pid}");
        let container = format!("berth-bench-{pid}");
        let docker = |args: &[&str]| {
            let done = Command::new("docker").args(args).output().unwrap();
            assert!(done.status.success(), "docker {args:?}: {done:?}");
        };
        docker(&["import", &tar.display().to_string(), &image]);
        docker(&["run", "-d", "--name", &container, &image, "sleep", "100000"]);
        let mut trips = Vec::new();
        for _ in 0..ROUNDS {
            let at = std::time::Instant::now();
            docker(&["exec", &container, "true"]);
            trips.push(at.elapsed());
        }
        rows.push(format!(
            "`docker exec` CLI into busybox: {}",
            percentiles(&mut trips)
        ));
        docker(&["rm", "-f", &container]);
        docker(&["rmi", &image]);
    }
    for row in rows {
        eprintln!("{test}: {row}");
    }
}
