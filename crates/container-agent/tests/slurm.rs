//! The slurm runtime through the agent's gRPC API, against a real
//! single-node SLURM 22.05 each test starts (tests/src/slurm.rs): a job
//! workload runs, runs are exec'd into it as steps (output, exit code, env,
//! working dir, cancel, timeout), a job past its time limit is TIMEOUT with
//! SLURM's reason, and what SLURM or its REST daemon refuses (an unknown
//! partition, a bad or expired JWT, slurmrestd down) is a clear error.

use std::time::{Duration, Instant};

use berth_container_agent::Config;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::{EnvVar, Resources, Runtime, SlurmSpec, WorkloadSpec};
use berth_server::RunningService;
use berth_server::client::AuthChannel;
use berth_tests::agent::collect_exec;
use berth_tests::slurm::{self, Cluster};
use tonic::Code;

type Client = ContainerAgentClient<AuthChannel>;

struct Agent {
    client: Client,
    dir: tempfile::TempDir,
    service: RunningService,
}

impl Agent {
    /// An agent whose slurm runtime talks to `cluster` as root with a fresh
    /// token, `tune`d.
    async fn start(cluster: &Cluster, tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = format!("unix://{}", dir.path().join("agent.sock").display());
        let mut config = Config::default();
        config.server.listen = socket.clone();
        config.server.http_listen = String::new();
        config.engines.docker = "off".into();
        config.engines.podman = "off".into();
        config.engines.state_dir = dir.path().join("state");
        config.libvirt.uri = "off".into();
        config.slurm.rest_url = cluster.rest_url.clone();
        config.slurm.user = "root".into();
        config.slurm.token = cluster.token("root", Duration::from_secs(3600));
        config.slurm.output_dir = cluster.dir().join("jobs");
        config.slurm.slurm_conf = cluster.conf().to_path_buf();
        config.slurm.poll_interval = Duration::from_millis(200);
        tune(&mut config);
        let service = berth_container_agent::start(config).await.unwrap();
        let channel = berth_server::client::connect(&socket, "", Duration::from_secs(5))
            .await
            .unwrap();
        let mut client = ContainerAgentClient::new(channel);
        let info = client.info(InfoRequest {}).await.unwrap().into_inner();
        assert!(
            info.runtimes.contains(&(Runtime::Slurm as i32)),
            "{:?}",
            info.unavailable_runtimes
        );
        Self {
            client,
            dir,
            service,
        }
    }

    async fn create(&mut self, name: &str, spec: WorkloadSpec) -> Result<Workload, tonic::Status> {
        self.client
            .create_workload(CreateWorkloadRequest {
                name: name.into(),
                spec: Some(spec),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn start_workload(&mut self, id: &str) -> Workload {
        self.client
            .start_workload(WorkloadRef { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn inspect(&mut self, id: &str) -> Workload {
        self.client
            .inspect_workload(WorkloadRef { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn exec(
        &mut self,
        id: &str,
        command: &[&str],
        env: &[(&str, &str)],
        working_dir: &str,
        timeout: Option<Duration>,
    ) -> (String, String, ExitStatus) {
        let stream = self
            .client
            .exec(ExecRequest {
                workload_id: id.into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                env: env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
                working_dir: working_dir.into(),
                timeout: timeout.map(|t| t.try_into().unwrap()),
                exec_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let (out, err, exit) = collect_exec(stream).await.unwrap();
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            exit,
        )
    }

    /// The workload's logs as they are, stdout and stderr, a line each.
    async fn logs(&mut self, id: &str) -> String {
        let mut stream = self
            .client
            .logs(LogsRequest {
                workload_id: id.into(),
                follow: false,
                tail: 0,
                since: None,
            })
            .await
            .unwrap()
            .into_inner();
        let mut lines = Vec::new();
        while let Some(line) = stream.message().await.unwrap() {
            lines.push(line.line);
        }
        lines.join("\n")
    }

    /// Polls the workload until `done` holds, at most `limit`.
    async fn wait(
        &mut self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Workload) -> bool,
    ) -> Workload {
        let deadline = Instant::now() + limit;
        loop {
            let workload = self.inspect(id).await;
            if done(&workload) {
                return workload;
            }
            assert!(
                Instant::now() < deadline,
                "workload {id} still {:?} ({}) after {limit:?}",
                workload.state(),
                workload.state_reason
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An allocation: a job without a command, holding its node for runs.
fn allocation(time_limit: Option<Duration>) -> WorkloadSpec {
    WorkloadSpec {
        runtime: Runtime::Slurm as i32,
        env: vec![EnvVar {
            name: "FROM_WORKLOAD".into(),
            value: "w".into(),
        }],
        resources: Some(Resources {
            cpu_limit: 1.0,
            memory_limit_bytes: 200 << 20,
            ..Default::default()
        }),
        slurm: Some(SlurmSpec {
            partition: slurm::PARTITION.into(),
            time_limit: time_limit.map(|t| t.try_into().unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits until job `id` runs no exec step (a cancelled or timed-out one
/// goes once SLURM has ended it).
async fn wait_no_exec_steps(cluster: &Cluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let steps = cluster
            .client("squeue", &["-h", "-s", "-j", id, "-o", "%j"])
            .unwrap();
        if !steps.contains("berth-exec") {
            return;
        }
        assert!(Instant::now() < deadline, "steps left in job {id}: {steps}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn job_id(workload: &Workload) -> String {
    workload.id.strip_prefix("slurm-").unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_and_runs_are_steps_in_it() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let mut agent = Agent::start(&cluster, |_| {}).await;
    let created = agent.create("alloc", allocation(None)).await.unwrap();
    assert_eq!(created.state(), WorkloadState::Created);
    assert_eq!(created.state_reason, "PENDING (JobHeldUser)");
    let id = job_id(&created);
    assert_eq!(cluster.job_state(&id), "PENDING");

    let started = std::time::Instant::now();
    let running = agent.start_workload("alloc").await;
    assert_eq!(
        running.state(),
        WorkloadState::Running,
        "{}",
        running.state_reason
    );
    eprintln!("job {id}: released to RUNNING in {:?}", started.elapsed());
    assert_eq!(cluster.job_state(&id), "RUNNING");
    // A second create under the name of a live job is refused.
    let taken = agent.create("alloc", allocation(None)).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    // Output, exit code, the workload's and the exec's env, working dir.
    let work = agent.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let workdir = work.display().to_string();
    let started = std::time::Instant::now();
    let (out, err, exit) = agent
        .exec(
            "alloc",
            &[
                "sh",
                "-c",
                "echo \"$FROM_WORKLOAD $FROM_EXEC $(pwd) $SLURM_JOB_ID\"; echo oops >&2; exit 3",
            ],
            &[("FROM_EXEC", "e")],
            &workdir,
            None,
        )
        .await;
    eprintln!("one exec step: {:?}", started.elapsed());
    assert_eq!(out, format!("w e {workdir} {id}\n"));
    assert!(err.contains("oops"), "{err}");
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.reason, ExitReason::Exited as i32);

    // Ten steps one after another: what a backend's runs cost.
    let started = std::time::Instant::now();
    for n in 0..10 {
        let (out, _, exit) = agent
            .exec(&created.id, &["echo", &n.to_string()], &[], "", None)
            .await;
        assert_eq!((out, exit.exit_code), (format!("{n}\n"), 0));
    }
    eprintln!("10 exec steps: {:?}", started.elapsed());

    // A timeout kills the step, and SLURM forgets it.
    let (_, _, exit) = agent
        .exec(
            "alloc",
            &["sleep", "60"],
            &[],
            "",
            Some(Duration::from_millis(1500)),
        )
        .await;
    assert_eq!(exit.reason, ExitReason::TimedOut as i32);
    wait_no_exec_steps(&cluster, &id).await;

    // Cancel: the call dropped while the step runs.
    let marker = agent.dir.path().join("cancelled-step-ran-on");
    let call = agent.client.exec(ExecRequest {
        workload_id: "alloc".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 3; touch {}", marker.display()),
        ],
        ..Default::default()
    });
    let _ = tokio::time::timeout(Duration::from_millis(1000), call).await;
    wait_no_exec_steps(&cluster, &id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "the cancelled step ran on");

    // Stop cancels the job; remove forgets it.
    let stopped = agent
        .client
        .stop_workload(StopWorkloadRequest {
            id: "alloc".into(),
            timeout: Some(Duration::from_secs(5).try_into().unwrap()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stopped.state(),
        WorkloadState::Stopped,
        "{}",
        stopped.state_reason
    );
    assert!(
        stopped.state_reason.starts_with("CANCELLED"),
        "{}",
        stopped.state_reason
    );
    assert_eq!(cluster.job_state(&id), "");
    let refused = agent
        .client
        .exec(ExecRequest {
            workload_id: "alloc".into(),
            command: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    agent
        .client
        .remove_workload(RemoveWorkloadRequest {
            id: "alloc".into(),
            force: false,
        })
        .await
        .unwrap();
    let gone = agent
        .client
        .inspect_workload(WorkloadRef {
            id: created.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

/// A keyed exec (a campaign run) is a step that outlives the agent: a new
/// agent attaches to it by its key and gets its whole output and exit, and
/// cancels another one started by the agent before it.
/// A workload with an image, on an agent whose `slurm.container_runtime`
/// is podman (real, the site's runtime here; Apptainer is not packaged for
/// Debian 12): a job's batch command and each step of an allocation run in
/// the image (a busybox rootfs, which has no /etc/debian_version) with the
/// job's environment and a bind of a node directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_and_its_steps_run_in_the_image_with_the_site_s_container_runtime() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let Some(()) = berth_tests::require_part(berth_tests::Part::Podman) else {
        return;
    };
    let Some(rootfs) = berth_tests::busybox_rootfs(&berth_tests::target_tmpdir().join("images"))
    else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let podman_env = podman_store(store.path());
    let image = format!("localhost/berth-slurm-image:{}", std::process::id());
    let imported = std::process::Command::new("podman")
        .args(["import", &rootfs.display().to_string(), &image])
        .envs(podman_env.iter().map(|v| (&v.name, &v.value)))
        .output()
        .unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let shared = store.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("note"), "from the node").unwrap();

    let mut agent = Agent::start(&cluster, |config| {
        config.slurm.container_runtime =
            berth_container_agent::runtime::slurm::container::ContainerRuntime::Podman;
    })
    .await;
    let in_image =
        "test ! -e /etc/debian_version && echo \"in the image: $FROM_WORKLOAD $(cat /data/note)\"";
    let mut spec = allocation(None);
    spec.image = image;
    spec.mounts = vec![berth_proto::common::v1::Mount {
        source: shared.display().to_string(),
        target: "/data".into(),
        read_only: true,
        volume: false,
    }];
    spec.env.extend(podman_env);

    let mut batch = spec.clone();
    batch.command = vec!["sh".into(), "-c".into(), in_image.into()];
    let job = agent.create("in-image-batch", batch).await.unwrap();
    agent.start_workload(&job.id).await;
    let ended = agent
        .wait(&job.id, Duration::from_secs(60), |w| {
            w.state() == WorkloadState::Exited
        })
        .await;
    let logs = agent.logs(&job.id).await;
    assert_eq!(ended.exit_code, Some(0), "{ended:?}: {logs}");
    assert!(logs.contains("in the image: w from the node"), "{logs}");

    let allocation = agent.create("in-image", spec).await.unwrap();
    let started = agent.start_workload(&allocation.id).await;
    assert_eq!(started.state(), WorkloadState::Running, "{started:?}");
    let (out, err, exit) = agent
        .exec(&allocation.id, &["sh", "-c", in_image], &[], "", None)
        .await;
    assert_eq!(exit.exit_code, 0, "{out} {err}");
    assert_eq!(out.trim(), "in the image: w from the node", "{err}");
    for id in [job.id, allocation.id] {
        agent
            .client
            .remove_workload(RemoveWorkloadRequest { id, force: true })
            .await
            .unwrap();
    }
}

/// podman's settings and storage for the test, in `dir`: the settings a
/// sandbox without systemd needs (scripts/images/podman-service.sh), vfs
/// storage of its own. As env for podman and for the jobs that run it.
fn podman_store(dir: &std::path::Path) -> Vec<EnvVar> {
    let hard = std::process::Command::new("sh")
        .args(["-c", "ulimit -Hu"])
        .output()
        .unwrap();
    let nproc = String::from_utf8_lossy(&hard.stdout)
        .trim()
        .parse::<u64>()
        .unwrap_or(u64::MAX)
        .min(32_768);
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc={nproc}:{nproc}\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
        ),
    )
    .unwrap();
    let storage = dir.join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/root\"\nrunroot = \"{0}/run\"\n",
            dir.display()
        ),
    )
    .unwrap();
    [
        ("CONTAINERS_CONF", conf),
        ("CONTAINERS_STORAGE_CONF", storage),
    ]
    .into_iter()
    .map(|(name, path)| EnvVar {
        name: name.into(),
        value: path.display().to_string(),
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_step_outlives_the_agent_and_is_attached_again() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let mut agent = Agent::start(&cluster, |_| {}).await;
    let created = agent.create("keyed", allocation(None)).await.unwrap();
    agent.start_workload(&created.id).await;
    let keyed = |key: &str, script: &str| ExecRequest {
        workload_id: "keyed".into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        exec_key: key.into(),
        ..Default::default()
    };
    let mut first = agent
        .client
        .exec(keyed(
            "camp/run-1/1",
            "echo before; sleep 3; echo after; exit 5",
        ))
        .await
        .unwrap()
        .into_inner();
    // Its first output, before the agent goes.
    let mut head = Vec::new();
    while !head.ends_with(b"before\n") {
        match first.message().await.unwrap().unwrap().output {
            Some(exec_output::Output::Stdout(bytes)) => head.extend(bytes),
            Some(exec_output::Output::Stderr(_)) => {}
            other => panic!("{other:?} before the first output"),
        }
    }
    let marker = agent.dir.path().join("cancelled-by-the-new-agent");
    // Long enough to outlast the restart and the attach before its cancel.
    let writes_at = Instant::now() + Duration::from_secs(12);
    agent
        .client
        .exec(keyed(
            "camp/run-2/1",
            &format!("sleep 10; touch {}", marker.display()),
        ))
        .await
        .unwrap();
    drop(first);
    agent.service.stop().await.unwrap();

    let mut agent = Agent::start(&cluster, |_| {}).await;
    let attached = agent
        .client
        .attach_exec(AttachExecRequest {
            exec_key: "camp/run-1/1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (out, _, exit) = collect_exec(attached).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "before\nafter\n");
    assert_eq!(exit.exit_code, 5);
    agent
        .client
        .cancel_exec(CancelExecRequest {
            exec_key: "camp/run-2/1".into(),
        })
        .await
        .unwrap();
    let id = job_id(&created);
    wait_no_exec_steps(&cluster, &id).await;
    assert!(
        Instant::now() < writes_at,
        "the cancel came too late to tell"
    );
    tokio::time::sleep(writes_at.saturating_duration_since(Instant::now())).await;
    assert!(!marker.exists(), "the cancelled step ran on");
    // A keyed step past its timeout is killed and cancelled in SLURM.
    let mut timed = keyed("camp/run-3/1", "sleep 60");
    timed.timeout = Some(Duration::from_millis(1500).try_into().unwrap());
    let stream = agent.client.exec(timed).await.unwrap().into_inner();
    let (_, _, exit) = collect_exec(stream).await.unwrap();
    assert_eq!(exit.reason, ExitReason::TimedOut as i32);
    wait_no_exec_steps(&cluster, &id).await;
    let unknown = agent
        .client
        .attach_exec(AttachExecRequest {
            exec_key: "camp/never/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert_accounting_is_asked_by_key(&mut agent.client).await;
}

/// DescribeExecAccounting of the keyed steps of workload `keyed` on a
/// cluster without accounting: no figure, sacct's reason; an unknown key,
/// an empty one and a wait too long are named.
async fn assert_accounting_is_asked_by_key(client: &mut Client) {
    let ask = |key: &str, wait: Duration| DescribeExecAccountingRequest {
        workload_id: "keyed".into(),
        exec_key: key.into(),
        wait: wait.try_into().ok(),
    };
    let record = client
        .describe_exec_accounting(ask("camp/run-1/1", Duration::from_secs(1)))
        .await
        .unwrap()
        .into_inner();
    eprintln!("without slurmdbd: {record:?}");
    assert_eq!(record.consumed_energy_j, None, "{record:?}");
    assert!(
        record.note.contains("accounting storage is disabled"),
        "{record:?}"
    );
    for (key, wait, code, named) in [
        (
            "camp/never/1",
            Duration::ZERO,
            Code::NotFound,
            "camp/never/1",
        ),
        ("", Duration::ZERO, Code::InvalidArgument, "exec_key"),
        (
            "camp/run-1/1",
            Duration::from_secs(61),
            Code::InvalidArgument,
            "wait",
        ),
    ] {
        let refused = client
            .describe_exec_accounting(ask(key, wait))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(named), "{refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_time_limit_is_timeout_with_the_reason() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let mut agent = Agent::start(&cluster, |_| {}).await;
    let mut spec = allocation(Some(Duration::from_secs(60)));
    spec.command = vec!["sh".into(), "-c".into(), "echo started; sleep 600".into()];
    let created = agent.create("short", spec).await.unwrap();
    agent.start_workload(&created.id).await;
    let mut events = agent
        .client
        .events(EventsRequest {
            workload_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // SLURM checks time limits every 30 s and gives KillWait (2 s here).
    let ended = agent
        .wait(&created.id, Duration::from_secs(150), |w| {
            w.state() == WorkloadState::Exited
        })
        .await;
    assert_eq!(ended.state_reason, "TIMEOUT (TimeLimit)");
    assert_eq!(ended.exit_code, Some(128 + 15), "SIGTERM at the limit");
    // Started came first (SLURM started the job), then Died at the limit.
    let died = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.message().await.unwrap().expect("an event");
            if event.kind() != EventKind::Started {
                return event;
            }
        }
    })
    .await
    .expect("an event for the timeout");
    assert_eq!(died.kind(), EventKind::Died);
    assert!(
        died.message.contains("TIMEOUT (TimeLimit)"),
        "{}",
        died.message
    );
    // The job's stdout is its log.
    let mut logs = agent
        .client
        .logs(LogsRequest {
            workload_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Stdout and stderr are read side by side, so only each stream's own
    // order is known: the workload's line on one, slurmstepd's on the other.
    let mut lines = Vec::new();
    while let Some(line) = logs.message().await.unwrap() {
        lines.push((line.stream(), line.line));
    }
    let stdout: Vec<_> = lines
        .iter()
        .filter(|(stream, _)| *stream == LogStream::Stdout)
        .collect();
    assert_eq!(
        stdout.first().map(|l| l.1.as_str()),
        Some("started"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(
            |(stream, line)| *stream == LogStream::Stderr && line.contains("DUE TO TIME LIMIT")
        ),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_partition_is_refused_at_create_by_name() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let mut agent = Agent::start(&cluster, |_| {}).await;
    let mut spec = allocation(None);
    spec.slurm.as_mut().unwrap().partition = "nosuchpart".into();
    let refused = agent.create("lost", spec).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("spec.slurm.partition")
            && refused.message().contains("`nosuchpart`")
            && refused.message().contains("Invalid partition name"),
        "{}",
        refused.message()
    );
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
    let mut too_big = allocation(None);
    too_big.resources.as_mut().unwrap().memory_limit_bytes = (slurm::NODE_MEMORY_MB + 1) << 20;
    let refused = agent.create("huge", too_big).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("spec.resources.memory_limit_bytes")
            && refused.message().contains("4001 MiB")
            && refused.message().contains("4000 MiB"),
        "{}",
        refused.message()
    );
    eprintln!("memory above the node's: {}", refused.message());
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_expired_token_and_a_dead_slurmrestd_are_named() {
    let Some(mut cluster) = slurm::cluster() else {
        return;
    };
    // A token SLURM never signed (its signature is wrong).
    let real = cluster.token("root", Duration::from_secs(3600));
    let (head, _) = real.rsplit_once('.').unwrap();
    let forged = format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let mut agent = Agent::start(&cluster, |c| c.slurm.token = forged).await;
    let refused = agent.create("a", allocation(None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("refused the JWT") && refused.message().contains("`root`"),
        "{}",
        refused.message()
    );

    // A token that expired: said before anything is sent.
    let expiring = cluster.token("root", Duration::from_secs(1));
    let mut agent = Agent::start(&cluster, |c| c.slurm.token = expiring).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = agent.create("b", allocation(None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );

    // slurmrestd gone: UNAVAILABLE naming its URL.
    let mut agent = Agent::start(&cluster, |_| {}).await;
    cluster.stop_rest();
    let refused = agent.create("c", allocation(None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains(&cluster.rest_url),
        "{}",
        refused.message()
    );
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}
