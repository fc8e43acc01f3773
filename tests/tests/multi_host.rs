//! Campaigns across three "hosts" made of network namespaces on this
//! machine: each has its own sshd (inside the namespace, on 10.77.X.2 behind
//! a veth pair) and its own berth-agent on a unix socket that the
//! orchestrator reaches only through `ssh://root@10.77.X.2/…/agent.sock`, so
//! taking the veth down cuts that host off. The agents share the Docker
//! Engine with distinct `engines.owner`s; the backends are busybox
//! containers (imported through the agents, no registry).
//!
//! Three crashes, each in its own test: kill -9 of the orchestrator, a host
//! cut off mid-run, a backend container killed mid-run. In each the campaign
//! succeeds, every (config, cycle, backend) is recorded exactly once, and the
//! events say what happened. And a deployment of three replicas, one per
//! host, whose replica on a host cut off comes up on another, the copy left
//! on the cut host removed once it answers again.
//!
//! Needs root, `ip netns`, /usr/sbin/sshd and docker: a missing one skips
//! the test (or fails it on CI) through berth_tests::parts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{ImportImageChunk, ImportImageMetadata, import_image_chunk};
use berth_proto::common::v1::Runtime;
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::AuthChannel;
use berth_tests::campaign::{Client, ended, wait_campaign_or};
use berth_tests::{Part, Process, busybox_rootfs, free_port, require_part, wait_for};
/// A campaign's event messages, as `collect_events` gathers them.
type Events = Arc<Mutex<Vec<String>>>;

const HOSTS: usize = 3;
/// Runs per backend: 2 configs × 4 cycles.
const CONFIGS: [&str; 2] = ["n=1", "n=2"];
const CYCLES: u32 = 4;

/// Whether this machine can make the hosts: root, `ip netns`, sshd and the
/// Docker Engine (the test skips, or fails on CI, naming what is missing).
fn parts_present() -> bool {
    [Part::Netns, Part::Sshd, Part::Docker]
        .into_iter()
        .all(|part| require_part(part).is_some())
}

/// Runs a command that must succeed (setup), naming it when it does not.
fn sh(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a command whose failure does not matter (cleanup).
fn quiet(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn keygen(path: &Path) {
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

/// Namespaces left by a test process that died without its Drop
/// (SIGKILL): removing one removes its veth pair too.
fn remove_stale_namespaces() {
    for line in quiet("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("berth-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            quiet("ip", &["netns", "del", name]);
        }
    }
}

/// One fake host: a namespace, its veth pair, its sshd and its agent.
struct FakeHost {
    name: String,
    namespace: String,
    /// The root namespace's end of the veth pair: down = host cut off.
    veth: String,
    address: String,
    socket: PathBuf,
    owner: String,
    sshd: Option<std::process::Child>,
    agent: Option<Process>,
}

/// Three hosts, the client key and known_hosts, the image, and whatever
/// the test started; all of it removed on drop, even after a failure.
struct Cluster {
    test: String,
    dir: tempfile::TempDir,
    hosts: Vec<FakeHost>,
    image: String,
    client_key: PathBuf,
    known_hosts: PathBuf,
    orchestrator: Option<Process>,
    port: u16,
}

impl Cluster {
    /// `slot` keeps the tests of this file (which run at once) apart:
    /// host N of slot S is 10.77.(10·S + N).2.
    async fn start(test: &str, slot: u8) -> Option<Self> {
        if !parts_present() {
            return None;
        }
        let tar = busybox_rootfs(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("images"))?;
        remove_stale_namespaces();
        std::fs::create_dir_all("/run/sshd").expect("privilege separation dir /run/sshd");

        let pid = std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let client_key = dir.path().join("client_key");
        keygen(&client_key);
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(dir.path().join("client_key.pub"), &authorized).unwrap();
        let mut cluster = Self {
            test: test.into(),
            image: format!("berth-multi-{pid}-{slot}:bb"),
            known_hosts: dir.path().join("known_hosts"),
            client_key,
            dir,
            hosts: Vec::new(),
            orchestrator: None,
            port: free_port(),
        };
        let mut known = String::new();
        for n in 1..=HOSTS {
            let subnet = format!("10.77.{}", u32::from(slot) * 10 + n as u32);
            let home = cluster.dir.path().join(format!("h{n}"));
            std::fs::create_dir_all(&home).unwrap();
            // Registered before anything exists, so that Drop removes it
            // whatever step fails.
            cluster.hosts.push(FakeHost {
                name: format!("h{n}"),
                namespace: format!("berth-{pid}-{slot}-h{n}"),
                // Interface names fit IFNAMSIZ (15) whatever the pid.
                veth: format!("bv{}s{slot}h{n}", pid % 1_000_000),
                address: format!("{subnet}.2"),
                socket: home.join("agent.sock"),
                owner: format!("berth-mh-{pid}-{slot}-h{n}"),
                sshd: None,
                agent: None,
            });
            let host = cluster.hosts.last_mut().unwrap();
            let peer = format!("bp{}s{slot}h{n}", pid % 1_000_000);
            let ns = host.namespace.clone();
            sh("ip", &["netns", "add", &ns]);
            sh(
                "ip",
                &[
                    "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
                ],
            );
            sh("ip", &["link", "set", &peer, "netns", &ns]);
            sh(
                "ip",
                &["addr", "add", &format!("{subnet}.1/24"), "dev", &host.veth],
            );
            sh("ip", &["link", "set", &host.veth, "up"]);
            let in_ns = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &ns, "ip"];
                all.extend_from_slice(args);
                sh("ip", &all);
            };
            in_ns(&["addr", "add", &format!("{subnet}.2/24"), "dev", &peer]);
            in_ns(&["link", "set", &peer, "up"]);
            in_ns(&["link", "set", "lo", "up"]);

            let host_key = home.join("host_key");
            keygen(&host_key);
            let config = home.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "ListenAddress {address}\nPort 22\nHostKey {key}\nAuthorizedKeysFile {authorized}\n\
                     UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\nPermitRootLogin yes\nAllowStreamLocalForwarding yes\n\
                     StreamLocalBindUnlink yes\nPidFile {pid_file}\n",
                    address = host.address,
                    key = host_key.display(),
                    authorized = authorized.display(),
                    pid_file = home.join("sshd.pid").display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(home.join("sshd.log")).unwrap();
            // `ip netns exec` execs sshd: the child is sshd itself.
            host.sshd = Some(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "/usr/sbin/sshd", "-D", "-e", "-f"])
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start sshd in the namespace"),
            );
            let host_pub = std::fs::read_to_string(home.join("host_key.pub")).unwrap();
            known.push_str(&format!("{} {host_pub}", host.address));

            let state = home.join("state").display().to_string();
            host.agent = Some(Process::spawn(
                "berth-agent",
                &[
                    "--listen",
                    &format!("unix://{}", host.socket.display()),
                    "--http-listen",
                    "",
                ],
                &[
                    ("BERTH_ENGINES__DOCKER", "/var/run/docker.sock"),
                    ("BERTH_ENGINES__PODMAN", "off"),
                    ("BERTH_ENGINES__OWNER", &host.owner),
                    ("BERTH_ENGINES__LEFTOVERS", "sweep"),
                    ("BERTH_ENGINES__STATE_DIR", &state),
                ],
            ));
        }
        std::fs::write(&cluster.known_hosts, known).unwrap();
        for host in &cluster.hosts {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect((host.address.as_str(), 22)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "sshd of {} never listened on {}:22",
                    host.name,
                    host.address
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // The image, through this host's agent (they share the engine;
            // each records what it imported).
            let channel = wait_for(&format!("unix://{}", host.socket.display())).await;
            import(ContainerAgentClient::new(channel), &tar, &cluster.image).await;
        }
        Some(cluster)
    }

    fn start_orchestrator(&mut self) {
        let state = self.dir.path().join("orchestrator");
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.port),
            "--http-listen".into(),
            String::new(),
            "--set".into(),
            format!("store.path={}", state.join("state.db").display()),
            "--set".into(),
            format!("ssh.known_hosts={}", self.known_hosts.display()),
            "--set".into(),
            format!("ssh.identity={}", self.client_key.display()),
            "--set".into(),
            format!("ssh.tunnel_dir={}", state.join("tunnels").display()),
            "--set".into(),
            "ssh.connect_timeout=3s".into(),
            "--set".into(),
            "scheduler.heartbeat_interval=250ms".into(),
            "--set".into(),
            "scheduler.connect_timeout=2s".into(),
            "--set".into(),
            "scheduler.max_placement_backoff=1s".into(),
            "--set".into(),
            "deployments.reconcile_interval=250ms".into(),
            "--set".into(),
            "deployments.host_lost_grace=2s".into(),
            "--set".into(),
            "deployments.agent_timeout=2s".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.orchestrator = Some(Process::spawn("berth-orchestrator", &args, &[]));
    }

    async fn client(&self) -> Client {
        OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{}", self.port)).await)
    }

    /// Registers every host and waits until each is ready through its
    /// tunnel: on a loaded machine the first connection can miss the
    /// connect timeout, and the heartbeats then retry it.
    async fn register_hosts(&self, client: &mut Client) {
        for host in &self.hosts {
            client
                .register_host(RegisterHostRequest {
                    name: host.name.clone(),
                    address: format!("ssh://root@{}{}", host.address, host.socket.display()),
                    ..Default::default()
                })
                .await
                .expect("RegisterHost");
        }
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let listed = client
                .list_hosts(ListHostsRequest::default())
                .await
                .expect("ListHosts")
                .into_inner();
            let not_ready: Vec<_> = listed
                .hosts
                .iter()
                .filter(|h| h.status != HostStatus::Ready as i32)
                .map(|h| format!("{}: {}", h.name, h.status_message))
                .collect();
            if not_ready.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hosts not ready through ssh: {not_ready:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The campaign: one busybox backend per host (pinned by name when
    /// `pinned`), 2 configs × 4 cycles of ~0.6 s runs each. The last thing a
    /// run does is append its id to finished.log (a bind mount), so a run
    /// that ran to completion twice shows.
    fn manifest(&self, pinned: &[bool; HOSTS]) -> String {
        let log_dir = self.dir.path().join("log");
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut backends = String::new();
        for (n, pin) in pinned.iter().enumerate() {
            let placement = if *pin {
                format!("\n    placement: {{host: h{}}}", n + 1)
            } else {
                String::new()
            };
            backends.push_str(&format!(
                "  - name: b{}\n    runtime: docker\n    image: {}\n    command: [sleep, '3600']\n    \
                 mounts: [{{source: {}, target: /log}}]{placement}\n",
                n + 1,
                self.image,
                log_dir.display()
            ));
        }
        format!(
            "name: {test}\nbackends:\n{backends}grid: {{params: {{n: [1, 2]}}}}\ncycles: {CYCLES}\n\
             run:\n  command:\n    - sh\n    - -c\n    - |\n      sleep 0.6\n      echo '{{\"n\": {{{{n}}}}, \"tokens\": 10}}'\n      \
             echo {{{{run_id}}}} >> /log/finished.log\n",
            test = self.test.replace('_', "-"),
        )
    }

    /// Starts the orchestrator, registers the hosts and submits the campaign
    /// (see `manifest`); its events are collected as they come.
    async fn launch(&mut self, pinned: &[bool; HOSTS]) -> (Client, Campaign, Events) {
        self.start_orchestrator();
        let mut client = self.client().await;
        self.register_hosts(&mut client).await;
        let campaign = submit(&mut client, self.manifest(pinned)).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        collect_events(&mut client, &campaign.id, Arc::clone(&events)).await;
        (client, campaign, events)
    }

    fn finished_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/finished.log")).unwrap_or_default()
    }

    fn host(&self, name: &str) -> &FakeHost {
        self.hosts.iter().find(|h| h.name == name).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(orchestrator) = self.orchestrator.take() {
            orchestrator.kill();
        }
        for host in &mut self.hosts {
            if let Some(agent) = host.agent.take() {
                agent.kill();
            }
            if let Some(mut sshd) = host.sshd.take() {
                let _ = sshd.kill();
                let _ = sshd.wait();
            }
            // sshd's per-connection children live in the namespace too.
            for pid in quiet("ip", &["netns", "pids", &host.namespace]).split_whitespace() {
                quiet("kill", &["-9", pid]);
            }
            let filter = format!("label=berth.owner={}", host.owner);
            for id in quiet("docker", &["ps", "-aq", "--filter", &filter]).split_whitespace() {
                quiet("docker", &["rm", "-f", id]);
            }
            quiet("ip", &["netns", "del", &host.namespace]);
            quiet("ip", &["link", "del", &host.veth]);
        }
        quiet("docker", &["rmi", "-f", &self.image]);
        // Stale tunnels of a killed orchestrator (their pid files).
        let tunnels = self.dir.path().join("orchestrator/tunnels");
        for entry in std::fs::read_dir(tunnels).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = std::fs::read_to_string(&path)
            {
                quiet("kill", &["-9", pid.trim()]);
            }
        }
    }
}

async fn import(mut agent: ContainerAgentClient<AuthChannel>, tar: &Path, reference: &str) {
    let data = std::fs::read(tar).unwrap();
    let mut chunks = vec![ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Metadata(ImportImageMetadata {
            reference: reference.into(),
            runtime: Runtime::Docker as i32,
            saved_archive: false,
            command: vec!["/bin/sh".into()],
        })),
    }];
    chunks.extend(data.chunks(256 * 1024).map(|c| ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Data(c.to_vec())),
    }));
    agent
        .import_image(tokio_stream::iter(chunks))
        .await
        .expect("import busybox through the agent");
}

/// Every event message of the campaign, collected in the background until
/// the stream ends (campaign over or orchestrator gone).
async fn collect_events(client: &mut Client, id: &str, into: Events) {
    let mut stream = client
        .watch_campaign(WatchCampaignRequest { id: id.into() })
        .await
        .expect("WatchCampaign")
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            into.lock().unwrap().push(event.message);
        }
    });
}

async fn submit(client: &mut Client, manifest: String) -> Campaign {
    client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest,
            source_name: "multi.yaml".into(),
            validate_only: false,
        })
        .await
        .expect("SubmitCampaign")
        .into_inner()
}

async fn runs(client: &mut Client, id: &str) -> Vec<Run> {
    client
        .list_runs(ListRunsRequest {
            campaign_id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListRuns")
        .into_inner()
        .runs
}

/// Polls ListRuns until `done` says so.
async fn wait_runs(client: &mut Client, id: &str, what: &str, done: impl Fn(&[Run]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = runs(client, id).await;
        if done(&now) {
            return;
        }
        if Instant::now() > deadline {
            let campaign = client
                .get_campaign(GetCampaignRequest { id: id.into() })
                .await
                .expect("GetCampaign")
                .into_inner();
            panic!("never {what}: {campaign:?}\n{now:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ended(client: &mut Client, id: &str, events: &Mutex<Vec<String>>) -> Campaign {
    wait_campaign_or(client, id, Duration::from_secs(90), "ended", ended, || {
        format!("\nevents:\n{}", events.lock().unwrap().join("\n"))
    })
    .await
}

fn running_on<'a>(runs: &'a [Run], backend: &str) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.backend == backend && r.state == RunState::Running as i32)
}

fn succeeded(runs: &[Run], backend: &str) -> usize {
    runs.iter()
        .filter(|r| r.backend == backend && r.state == RunState::Succeeded as i32)
        .count()
}

/// What every scenario must end with: the campaign succeeded, each
/// (config, cycle, backend) recorded once as succeeded with its result,
/// results per (config, backend) over all cycles, and every recorded run
/// ran to completion on some host, at most `extra` of them twice.
async fn assert_complete(
    cluster: &Cluster,
    client: &mut Client,
    id: &str,
    events: &Mutex<Vec<String>>,
    extra: usize,
) -> Vec<Run> {
    let done = wait_ended(client, id, events).await;
    let all_events = events.lock().unwrap().join("\n");
    assert_eq!(
        done.state,
        CampaignState::Succeeded as i32,
        "{done:?}\nevents:\n{all_events}"
    );
    let total = CONFIGS.len() * HOSTS * CYCLES as usize;
    let counts = done.runs.unwrap_or_default();
    assert_eq!(
        (counts.succeeded, counts.total),
        (total as u64, total as u64),
        "{counts:?}\nruns not succeeded: {:#?}\nevents:\n{all_events}",
        runs(client, id)
            .await
            .into_iter()
            .filter(|r| r.state != RunState::Succeeded as i32)
            .collect::<Vec<_>>()
    );
    let runs = runs(client, id).await;
    let mut recorded: BTreeMap<(String, u32, String), usize> = BTreeMap::new();
    for run in &runs {
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        assert!(run.result_json.contains("\"tokens\": 10"), "{run:?}");
        *recorded
            .entry((run.config.clone(), run.cycle, run.backend.clone()))
            .or_default() += 1;
    }
    assert_eq!(recorded.len(), total, "{recorded:?}");
    assert!(
        recorded.values().all(|n| *n == 1),
        "every (config, cycle, backend) recorded exactly once: {recorded:?}"
    );
    let results = client
        .get_results(GetResultsRequest { id: id.into() })
        .await
        .expect("GetResults")
        .into_inner();
    assert_eq!(results.results.len(), CONFIGS.len() * HOSTS, "{results:?}");
    for row in &results.results {
        assert!(CONFIGS.contains(&row.config.as_str()), "{row:?}");
        assert_eq!(
            (row.succeeded, row.failed),
            (u64::from(CYCLES), 0),
            "{row:?}"
        );
    }
    let finished = cluster.finished_log();
    for run in &runs {
        assert!(
            finished.lines().any(|l| l == run.id),
            "{} never finished on a host:\n{finished}",
            run.id
        );
    }
    assert!(
        finished.lines().count() <= total + extra,
        "runs completed more than once:\n{finished}"
    );
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_kill_9_of_the_orchestrator_mid_campaign() {
    let test = "multi_host_kill_9_of_the_orchestrator_mid_campaign";
    let Some(mut cluster) = Cluster::start(test, 1).await else {
        return;
    };
    let (mut client, campaign, events) = cluster.launch(&[true; HOSTS]).await;
    wait_runs(&mut client, &campaign.id, "a third done", |runs| {
        let done: usize = (1..=HOSTS).map(|n| succeeded(runs, &format!("b{n}"))).sum();
        done >= 8 && runs.iter().any(|r| r.state == RunState::Running as i32)
    })
    .await;
    let before = runs(&mut client, &campaign.id).await;
    cluster.orchestrator.take().unwrap().kill();
    events
        .lock()
        .unwrap()
        .push("-- orchestrator killed --".into());

    cluster.start_orchestrator();
    let mut client = cluster.client().await;
    collect_events(&mut client, &campaign.id, Arc::clone(&events)).await;
    // The runs in flight are adopted (or retried if they were lost): none
    // runs twice to completion.
    let runs = assert_complete(&cluster, &mut client, &campaign.id, &events, 0).await;
    // Each backend stayed on its host.
    for run in &runs {
        assert_eq!(run.host, run.backend.replace('b', "h"), "{run:?}");
    }
    // After the restart the campaign is running again and the runs that were
    // in flight say what became of them.
    let all = events.lock().unwrap().join("\n");
    let after = all.split("-- orchestrator killed --").nth(1).unwrap_or("");
    assert!(
        after.contains("succeeded"),
        "events after restart:\n{after}"
    );
    for run in before
        .iter()
        .filter(|r| r.state == RunState::Running as i32)
    {
        assert!(
            all.contains(&run.id),
            "no event about {} that was in flight:\n{all}",
            run.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_one_host_cut_off_mid_run() {
    let test = "multi_host_one_host_cut_off_mid_run";
    let Some(mut cluster) = Cluster::start(test, 2).await else {
        return;
    };
    // b1 may go anywhere (it lands on h1, the first of the least loaded);
    // b2 and b3 are pinned to h2 and h3.
    let (mut client, campaign, events) = cluster.launch(&[false, true, true]).await;
    wait_runs(&mut client, &campaign.id, "b1 running a run", |runs| {
        succeeded(runs, "b1") >= 2 && running_on(runs, "b1").is_some()
    })
    .await;
    // b1's host: the one of its run in flight (or of its last run, should
    // that run have ended since).
    let before = runs(&mut client, &campaign.id).await;
    let lost_host = running_on(&before, "b1")
        .or_else(|| {
            before
                .iter()
                .rfind(|r| r.backend == "b1" && !r.host.is_empty())
        })
        .map(|r| r.host.clone())
        .expect("b1 ran somewhere");
    let cut = cluster.host(&lost_host);
    events
        .lock()
        .unwrap()
        .push(format!("-- {lost_host} cut off --"));
    sh("ip", &["link", "set", &cut.veth, "down"]);

    let runs = assert_complete(&cluster, &mut client, &campaign.id, &events, 1).await;
    // b1 was placed again, on a host that is still there, and its runs
    // after the cut ran there.
    let b1_hosts: Vec<&str> = runs
        .iter()
        .filter(|r| r.backend == "b1")
        .map(|r| r.host.as_str())
        .collect();
    assert!(
        b1_hosts.iter().any(|h| *h != lost_host),
        "b1 never re-placed off {lost_host}: {b1_hosts:?}"
    );
    let hosts = client
        .list_hosts(ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    let lost = hosts.iter().find(|h| h.name == lost_host).unwrap();
    assert_eq!(lost.status, HostStatus::Unreachable as i32, "{lost:?}");
    assert!(lost.status_message.contains(&cut.address), "{lost:?}");
    // The events say the host was lost, by name.
    let all = events.lock().unwrap().join("\n");
    let after = all
        .split(&format!("-- {lost_host} cut off --"))
        .nth(1)
        .unwrap_or("");
    assert!(
        after.lines().any(|l| l.contains(&format!("`{lost_host}`"))
            && (l.contains("unreachable") || l.contains("lost"))),
        "no event says host `{lost_host}` was lost:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_backend_container_killed_mid_run() {
    let test = "multi_host_backend_container_killed_mid_run";
    let Some(mut cluster) = Cluster::start(test, 3).await else {
        return;
    };
    let (mut client, campaign, events) = cluster.launch(&[true; HOSTS]).await;
    wait_runs(&mut client, &campaign.id, "b2 running a run", |runs| {
        succeeded(runs, "b2") >= 2 && running_on(runs, "b2").is_some()
    })
    .await;
    let owner = &cluster.host("h2").owner;
    // The backend's container: this agent's, named after the campaign and
    // the backend.
    let listed = quiet(
        "docker",
        &[
            "ps",
            "--filter",
            &format!("label=berth.owner={owner}"),
            "--format",
            "{{.ID}} {{.Label \"berth.name\"}}",
        ],
    );
    let prefix = format!("berth-{}-b2", campaign.id);
    let container = listed
        .lines()
        .find_map(|l| {
            let (id, name) = l.split_once(' ')?;
            name.starts_with(&prefix).then(|| id.to_string())
        })
        .unwrap_or_else(|| panic!("no running container of backend b2 (owner {owner}):\n{listed}"));
    let interrupted = running_on(&runs(&mut client, &campaign.id).await, "b2")
        .map(|r| r.id.clone())
        .unwrap_or_default();
    events
        .lock()
        .unwrap()
        .push("-- backend b2 killed --".into());
    sh("docker", &["kill", &container]);

    let runs = assert_complete(&cluster, &mut client, &campaign.id, &events, 0).await;
    for run in &runs {
        assert_eq!(run.host, run.backend.replace('b', "h"), "{run:?}");
    }
    // The run that was in flight (if it had not ended before the kill) was
    // retried, and the events say the backend went and came back.
    let all = events.lock().unwrap().join("\n");
    let after = all.split("-- backend b2 killed --").nth(1).unwrap_or("");
    if let Some(run) = runs.iter().find(|r| r.id == interrupted)
        && run.attempts > 1
    {
        assert!(
            after.contains(&format!("run {interrupted} interrupted")),
            "{after}"
        );
    }
    assert!(
        after
            .lines()
            .any(|l| l.contains("`b2`") && (l.contains("restarted") || l.contains("lost"))),
        "no event says backend `b2` died and was restarted:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_deployment_moves_off_a_host_cut_off() {
    let test = "multi_host_deployment_moves_off_a_host_cut_off";
    let Some(mut cluster) = Cluster::start(test, 4).await else {
        return;
    };
    cluster.start_orchestrator();
    let mut client = cluster.client().await;
    cluster.register_hosts(&mut client).await;
    let recipe = format!(
        "name: spread\nruntime: docker\nimage: {}\ncommand: [sleep, '3600']\nreplicas: 3\n\
         health: {{check: exec, command: ['true'], interval: 500ms, timeout: 5s}}\n\
         restart: {{backoff: 200ms, max_backoff: 2s}}\nstop_grace: 1s\n",
        cluster.image
    );
    client
        .deploy(DeployRequest {
            recipe_yaml: recipe,
            source_name: "spread.yaml".into(),
            ..Default::default()
        })
        .await
        .expect("Deploy");
    let placed = wait_deployment(&mut client, "running", all_running).await;
    let mut hosts: Vec<&str> = placed
        .replica_status
        .iter()
        .map(|r| r.host.as_str())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["h1", "h2", "h3"], "spread: one replica per host");
    let on_h1 = placed
        .replica_status
        .iter()
        .find(|r| r.host == "h1")
        .unwrap()
        .clone();

    sh("ip", &["link", "set", &cluster.host("h1").veth, "down"]);
    let cut_at = Instant::now();
    let index = on_h1.index;
    let moved = wait_deployment(&mut client, "moved off h1", |d| {
        all_running(d)
            && d.replica_status.iter().all(|r| r.host != "h1")
            && d.replica_status[index as usize].restarts == 1
    })
    .await;
    eprintln!(
        "host cut off to its replica running elsewhere: {:?}",
        cut_at.elapsed()
    );
    assert_ne!(
        moved.replica_status[index as usize].workload_id,
        on_h1.workload_id
    );

    // h1 answers again: the copy it kept (the engine is this machine's) is
    // removed by the reconciler's sweep, the moved replica stays where it is.
    sh("ip", &["link", "set", &cluster.host("h1").veth, "up"]);
    let engine_has = |id: &str| {
        let output = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                "/var/run/docker.sock",
            ])
            .arg(format!("http://engine/v1.41/containers/{id}/json"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&output.stdout) == "200"
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while engine_has(&on_h1.workload_id) {
        assert!(
            Instant::now() < deadline,
            "the copy on h1 was never removed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = wait_deployment(&mut client, "running", |_| true).await;
    assert!(all_running(&after), "{after:#?}");
    assert_eq!(
        after.replica_status[index as usize].workload_id,
        moved.replica_status[index as usize].workload_id
    );

    client
        .stop_deployment(StopDeploymentRequest {
            name: "spread".into(),
        })
        .await
        .expect("StopDeployment");
    let stopped = wait_deployment(&mut client, "cancelled", |d| {
        d.state == DeploymentState::Cancelled as i32
    })
    .await;
    for replica in &stopped.replica_status {
        assert!(
            !engine_has(&replica.workload_id),
            "{} left behind",
            replica.workload_id
        );
    }
}

fn all_running(d: &Deployment) -> bool {
    d.state == DeploymentState::Running as i32
        && d.ready_replicas == 3
        && d.replica_status.len() == 3
}

/// Polls the deployment `spread` until `done`, at most 90 s.
async fn wait_deployment(
    client: &mut Client,
    what: &str,
    done: impl Fn(&Deployment) -> bool,
) -> Deployment {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = client
            .get_deployment(GetDeploymentRequest {
                name: "spread".into(),
            })
            .await
            .expect("GetDeployment")
            .into_inner();
        if done(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "never {what}: {d:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
