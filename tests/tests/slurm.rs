//! A campaign whose backend is a SLURM job, end to end through the real
//! binaries: orchestrator → agent (slurm runtime) → slurmrestd → a real
//! single-node SLURM 22.05 (tests/src/slurm.rs). The backend is one
//! allocation; each run is a job step started in it with srun, so the
//! orchestrator drives it exactly as it drives a long-running container.
//! kill -9 of the agent or of the orchestrator mid-run leaves the job and
//! the run's step running; they are adopted, and nothing runs twice.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::campaign::Client;
use berth_tests::slurm::{self, Cluster};
use berth_tests::{Process, free_port, start_agent_with, start_orchestrator, wait_for};

struct SlurmHost {
    cluster: Cluster,
    dir: tempfile::TempDir,
    client: Client,
    agent: Process,
    orchestrator: Process,
    orchestrator_port: u16,
}

/// An agent whose slurm runtime reaches `cluster` as root; a start answers
/// after `start_wait` with the job still pending.
fn start_slurm_agent(dir: &Path, cluster: &Cluster, token: &str, start_wait: &str) -> Process {
    let settings = [
        format!("slurm.start_wait={start_wait}"),
        format!("slurm.rest_url={}", cluster.rest_url),
        "slurm.user=root".to_string(),
        format!("slurm.token={token}"),
        format!("slurm.output_dir={}", dir.join("jobs").display()),
        format!("slurm.slurm_conf={}", cluster.conf().display()),
        "slurm.poll_interval=500ms".to_string(),
        "engines.docker=off".to_string(),
        "engines.podman=off".to_string(),
        "libvirt.uri=off".to_string(),
    ];
    let args: Vec<&str> = settings
        .iter()
        .flat_map(|s| ["--set", s.as_str()])
        .collect();
    start_agent_with(&dir.join("agent.sock"), &args)
}

/// The agent's own default.
const START_WAIT: &str = "30s";

/// Deployments looked at every 200 ms (campaigns are not concerned).
const ORCHESTRATOR_SETTINGS: &[&str] = &["deployments.reconcile_interval=200ms"];

impl SlurmHost {
    async fn start() -> Option<Self> {
        Self::start_with(START_WAIT).await
    }

    async fn start_with(start_wait: &str) -> Option<Self> {
        Some(Self::start_on(slurm::cluster()?, start_wait, String::new()).await)
    }

    /// A host reaching `cluster`, its power sampler `power_sampler` (empty:
    /// none).
    async fn start_on(cluster: Cluster, start_wait: &str, power_sampler: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = cluster.token("root", Duration::from_secs(3600));
        let agent = start_slurm_agent(dir.path(), &cluster, &token, start_wait);
        let port = free_port();
        let orchestrator = start_orchestrator(dir.path(), port, ORCHESTRATOR_SETTINGS);
        let mut client = connect(port).await;
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        wait_for(&address).await;
        client
            .register_host(RegisterHostRequest {
                name: "login1".into(),
                address,
                power_sampler,
                ..Default::default()
            })
            .await
            .expect("RegisterHost");
        Self {
            cluster,
            dir,
            client,
            agent,
            orchestrator,
            orchestrator_port: port,
        }
    }

    /// kill -9 of the orchestrator, then one started again on the same
    /// store and port.
    async fn kill_and_restart_orchestrator(&mut self) {
        self.orchestrator.child.kill().expect("kill -9");
        let _ = self.orchestrator.child.wait();
        self.orchestrator = start_orchestrator(
            self.dir.path(),
            self.orchestrator_port,
            ORCHESTRATOR_SETTINGS,
        );
        self.client = connect(self.orchestrator_port).await;
    }

    /// Submits [`manifest`]'s campaign, its runs logging to [`Self::run_log`].
    async fn submit(&mut self, name: &str, values: &str, cycles: u32, sleep: &str) -> Campaign {
        let manifest = manifest(name, values, cycles, sleep, &self.run_log());
        berth_tests::campaign::submit(&mut self.client, &manifest).await
    }

    /// As [`Self::submit`], its runs the tasks of job arrays (`array:` the
    /// backend's `slurm.array` settings, in YAML flow style).
    async fn submit_arrays(
        &mut self,
        name: &str,
        (values, cycles, sleep): (&str, u32, &str),
        array: &str,
    ) -> Campaign {
        let manifest = manifest(name, values, cycles, sleep, &self.run_log()).replace(
            "      time_limit: 10m\n",
            &format!("      time_limit: 10m\n      array: {array}\n"),
        );
        berth_tests::campaign::submit(&mut self.client, &manifest).await
    }

    /// Where each run appends its id when it finishes (the steps run on
    /// this machine).
    fn run_log(&self) -> std::path::PathBuf {
        self.dir.path().join("finished.log")
    }

    /// Asserts each of `runs` finished on the cluster exactly once.
    fn assert_each_run_ran_once(&self, runs: &[Run]) {
        let finished = std::fs::read_to_string(self.run_log()).unwrap_or_default();
        let mut lines: Vec<&str> = finished.lines().collect();
        lines.sort_unstable();
        let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(lines, ids, "every run ran on the cluster exactly once");
    }

    /// kill -9 of the agent, then the same agent started again.
    async fn kill_and_restart_agent(&mut self) {
        self.agent.child.kill().expect("kill -9");
        let _ = self.agent.child.wait();
        let socket = self.dir.path().join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let token = self.cluster.token("root", Duration::from_secs(3600));
        self.agent = start_slurm_agent(self.dir.path(), &self.cluster, &token, START_WAIT);
        wait_for(&format!("unix://{}", socket.display())).await;
    }
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}

/// A campaign of `values` × `cycles` runs in one SLURM allocation; each run
/// sleeps `sleep` seconds, appends its id to `run_log` and prints the job
/// and step it ran in.
fn manifest(name: &str, values: &str, cycles: u32, sleep: &str, run_log: &Path) -> String {
    format!(
        r#"name: {name}
backends:
  - name: cluster
    runtime: slurm
    env:
      FROM_BACKEND: b
    resources:
      cpus: 1
      memory: 200MiB
    slurm:
      partition: {partition}
      time_limit: 10m
grid:
  params:
    n: [{values}]
cycles: {cycles}
run:
  command: [sh, -c, 'sleep {sleep}; echo {{{{run_id}}}} >> {run_log}; echo "{{\"n\": {{{{n}}}}, \"job\": \"$SLURM_JOB_ID\", \"step\": \"$SLURM_STEP_ID\", \"array\": \"$SLURM_ARRAY_JOB_ID\", \"task\": \"$SLURM_ARRAY_TASK_ID\", \"env\": \"$FROM_BACKEND\"}}"']
  timeout: 60s
"#,
        partition = slurm::PARTITION,
        run_log = run_log.display(),
    )
}

/// Every run recorded once and succeeded, each a step of one and the same
/// job; that job's id.
fn assert_runs_were_steps_of_one_job(runs: &[Run], expected: usize) -> String {
    assert_eq!(runs.len(), expected);
    let ids: BTreeSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), expected, "every run recorded once");
    let mut jobs = BTreeSet::new();
    let mut steps = BTreeSet::new();
    for run in runs {
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(
            result["env"], "b",
            "the backend's env reaches the step: {run:?}"
        );
        jobs.insert(result["job"].as_str().unwrap().to_string());
        steps.insert(result["step"].as_str().unwrap().to_string());
    }
    assert_eq!(jobs.len(), 1, "one allocation for every run: {jobs:?}");
    assert!(
        steps.len() >= expected,
        "a step per run (retries included): {steps:?}"
    );
    jobs.into_iter().next().unwrap()
}

/// Waits until SLURM has no job left running or pending (the campaign's
/// allocation cancelled when it ended).
async fn assert_allocation_released(cluster: &Cluster, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.job_state(job).is_empty() {
        assert!(
            Instant::now() < deadline,
            "job {job} still {} after the campaign ended",
            cluster.job_state(job)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_of_20_runs_runs_as_steps_of_one_slurm_job() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let campaign = host.submit("on-slurm", "1, 2, 3, 4, 5", 4, "0").await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 20, deadline).await;
    eprintln!(
        "20 runs as SLURM steps, allocation included: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 20);
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:?}");
    // This cluster keeps no accounting: each run's record says so.
    for run in &runs {
        let cluster = run.cluster_accounting.as_ref().expect("asked of every run");
        assert_eq!(cluster.consumed_energy_j, None, "{run:?}");
        assert!(
            cluster.note.contains("accounting storage is disabled"),
            "{run:?}"
        );
    }
    host.assert_each_run_ran_once(&runs);
    assert_allocation_released(&host.cluster, &job).await;
    assert_eq!(
        host.cluster.jobs(),
        vec![job],
        "one job submitted for the whole campaign"
    );
}

/// The power the fake energy counter of [`slurm::cluster_with_energy`]
/// draws: what both SLURM's energy plugin and berth's power sampler read.
const FAKE_WATTS: f64 = 50.0;
/// How long each run of the energy test lasts.
const ENERGY_RUN_S: f64 = 4.0;

/// A campaign measuring power on a cluster that records energy itself
/// (slurmdbd on MariaDB, SLURM's acct_gather_energy/rapl plugin): each
/// run's own energy, from berth's power sampler, is kept beside the
/// ConsumedEnergy `sacct` reports for its step, with their difference, in
/// ListRuns and GetResults (the export's columns: crates/cli's unit
/// tests). The two agree within what berth's window adds (srun's start)
/// and SLURM's whole joules. The energy both read is a
/// fake counter (this machine has no RAPL: tests/src/slurm.rs), drawing
/// [`FAKE_WATTS`], so each figure is known: watts × the run's time.
#[tokio::test(flavor = "multi_thread")]
async fn each_runs_energy_is_kept_beside_the_energy_slurm_accounted() {
    let Some(cluster) = slurm::cluster_with_energy(FAKE_WATTS) else {
        return;
    };
    let sampler_dir = tempfile::tempdir().unwrap();
    let powercap = cluster.powercap_root().expect("a fake powercap tree");
    let (_sampler, sampler_port) =
        berth_tests::start_powercap_sampler(sampler_dir.path(), powercap).await;
    let mut host = SlurmHost::start_on(
        cluster,
        START_WAIT,
        format!("http://127.0.0.1:{sampler_port}"),
    )
    .await;
    let manifest = manifest(
        "energy",
        "1, 2, 3",
        1,
        &ENERGY_RUN_S.to_string(),
        &host.run_log(),
    )
    .replace("run:\n", "power: {enabled: true, rate_hz: 20}\nrun:\n");
    let campaign = berth_tests::campaign::submit(&mut host.client, &manifest).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 3, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 3);
    let expected = FAKE_WATTS * ENERGY_RUN_S;
    for run in &runs {
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        let step = format!("{job}.{}", result["step"].as_str().unwrap());
        let slurm_j = slurm_energy(run, &step);
        let berth_j = run.energy_j.expect("berth's own energy");
        eprintln!(
            "run {}: berth {berth_j:.1} J, SLURM {slurm_j:.0} J (step {step}), difference {:+.1} J",
            run.id,
            berth_j - slurm_j
        );
        // What sacct itself says, not only what berth stored.
        assert_eq!(
            host.cluster.consumed_energy(&step).map(|j| j as f64),
            Some(slurm_j)
        );
        for (who, joules) in [("berth", berth_j), ("SLURM", slurm_j)] {
            assert!(
                (0.75 * expected..=1.5 * expected).contains(&joules),
                "{who} measured {joules} J for {ENERGY_RUN_S} s at {FAKE_WATTS} W"
            );
        }
        assert_eq!(run.energy_vs_cluster_j, Some(berth_j - slurm_j), "{run:?}");
        assert!(
            (berth_j - slurm_j).abs() <= 0.15 * expected,
            "berth {berth_j} J and SLURM {slurm_j} J measured different things"
        );
    }
    let results = berth_tests::campaign::results_of(&mut host.client, &campaign.id).await;
    let metrics: Vec<&str> = results.results[0]
        .metrics
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    for name in ["energy_j", "cluster_energy_j", "energy_vs_cluster_j"] {
        assert!(metrics.contains(&name), "{name} among {metrics:?}");
    }
    // Runs as array tasks (one at a time: SLURM counts the node's energy
    // for each job on it) have the cluster's figure alone: berth does not
    // measure power per task.
    let sleep = ENERGY_RUN_S.to_string();
    let campaign = host
        .submit_arrays("energy-arrays", ("1, 2", 1, &sleep), "{parallel: 1}")
        .await;
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 2, deadline).await;
    for run in &berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await {
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        let task = format!(
            "{}_{}",
            result["array"].as_str().unwrap(),
            result["task"].as_str().unwrap()
        );
        let slurm_j = slurm_energy(run, &task);
        eprintln!("run {}: SLURM {slurm_j:.0} J (array task {task})", run.id);
        assert!(
            (0.75 * expected..=1.5 * expected).contains(&slurm_j),
            "SLURM counted {slurm_j} J for {ENERGY_RUN_S} s at {FAKE_WATTS} W"
        );
        assert_eq!((run.energy_j, run.energy_vs_cluster_j), (None, None));
    }
}

/// The energy SLURM counted for `run`, whose cluster record must name
/// `accounting_id` (its step or array task).
fn slurm_energy(run: &Run, accounting_id: &str) -> f64 {
    let cluster = run
        .cluster_accounting
        .as_ref()
        .expect("the cluster's record");
    assert_eq!(cluster.accounting_id, accounting_id, "{run:?}");
    cluster
        .consumed_energy_j
        .unwrap_or_else(|| panic!("SLURM counted no energy: {}", cluster.note))
}

/// A campaign whose runs are the tasks of job arrays, one array a cycle
/// (5 runs, two at once): 20 runs in 4 arrays, every run recorded once in
/// one attempt and run once on the cluster, each in a task of its own, the
/// runs of a cycle in one array; the arrays are gone when it ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_of_20_runs_runs_as_job_arrays_a_cycle_each() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let started = Instant::now();
    let campaign = host
        .submit_arrays("arrays", ("1, 2, 3, 4, 5", 4, "0"), "{parallel: 2}")
        .await;
    let deadline = started + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 20, deadline).await;
    eprintln!(
        "20 runs as the tasks of job arrays: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    assert_eq!(runs.len(), 20);
    let mut arrays: std::collections::BTreeMap<String, BTreeSet<u32>> = Default::default();
    let mut tasks = BTreeSet::new();
    for run in &runs {
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        assert_eq!(run.attempts, 1, "{run:?}");
        let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
        assert_eq!(
            result["env"], "b",
            "the backend's env reaches the task: {run:?}"
        );
        assert_eq!(result["step"], "", "a task, not a step: {run:?}");
        let array = result["array"].as_str().unwrap().to_string();
        assert!(!array.is_empty(), "ran as an array task: {run:?}");
        arrays.entry(array.clone()).or_default().insert(run.cycle);
        tasks.insert((array, result["task"].as_str().unwrap().to_string()));
    }
    assert_eq!(tasks.len(), 20, "a task per run: {tasks:?}");
    assert_eq!(arrays.len(), 4, "an array per cycle: {arrays:?}");
    assert!(
        arrays.values().all(|cycles| cycles.len() == 1),
        "each array holds one cycle's runs: {arrays:?}"
    );
    host.assert_each_run_ran_once(&runs);
    for array in arrays.keys() {
        assert_allocation_released(&host.cluster, array).await;
    }
}

/// An allocation that has to wait for the cluster's resources (another
/// job holds the node's CPUs): its start answers with the job PENDING, the
/// campaign says what it waits for in SLURM's words, and its runs wait for
/// it instead of failing at their exec; once the other job ends every run
/// succeeds at its first attempt.
#[tokio::test(flavor = "multi_thread")]
async fn runs_wait_for_an_allocation_pending_for_resources_with_the_reason_shown() {
    let Some(mut host) = SlurmHost::start_with("1s").await else {
        return;
    };
    let cpus = slurm::NODE_CPUS.to_string();
    let blocker = host
        .cluster
        .client(
            "sbatch",
            &[
                "--parsable",
                "-p",
                slurm::PARTITION,
                "-c",
                &cpus,
                "--mem=100",
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 12",
            ],
        )
        .expect("sbatch of a job holding every CPU");
    let running = Instant::now() + Duration::from_secs(30);
    while host.cluster.job_state(&blocker) != "RUNNING" {
        assert!(Instant::now() < running, "the blocking job never ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let campaign = host.submit("queued", "1, 2", 2, "0").await;
    let shown = Instant::now() + Duration::from_secs(30);
    loop {
        let now = host
            .client
            .get_campaign(GetCampaignRequest {
                id: campaign.id.clone(),
            })
            .await
            .expect("GetCampaign")
            .into_inner();
        if now
            .status_message
            .contains("waits to run: PENDING (Resources)")
        {
            assert!(
                now.status_message
                    .contains("backend `cluster` on host `login1`"),
                "{}",
                now.status_message
            );
            break;
        }
        assert!(
            Instant::now() < shown,
            "the campaign never said its allocation waits: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 4, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 4);
    assert!(
        runs.iter().all(|r| r.attempts == 1),
        "no run was charged for the wait: {runs:?}"
    );
    host.assert_each_run_ran_once(&runs);
    assert_allocation_released(&host.cluster, &job).await;
}

/// kill -9 of the agent while a run executes: the allocation and the run's
/// step keep running, the restarted agent finds the job by its id and the
/// step by the run's key (the orchestrator attaches again), and nothing is
/// submitted or run twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_allocation_outlives_a_killed_agent_and_is_adopted() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let campaign = host.submit("agent-killed", "1, 2", 3, "1").await;
    in_flight(&mut host.client, &campaign.id).await;
    let before = host.cluster.jobs();
    assert_eq!(before.len(), 1, "{before:?}");
    host.kill_and_restart_agent().await;
    assert_eq!(
        host.cluster.job_state(&before[0]),
        "RUNNING",
        "the allocation outlived the agent"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 6, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 6);
    // The run in flight was attached again by its key, not run again.
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:?}");
    host.assert_each_run_ran_once(&runs);
    assert_eq!(job, before[0], "the same allocation, adopted");
    assert_eq!(host.cluster.jobs(), before, "nothing submitted twice");
    assert_allocation_released(&host.cluster, &job).await;
}

/// kill -9 of the orchestrator while a run executes in the allocation: the
/// job and the run's step keep running; the orchestrator started again on
/// the same store adopts the job by its recorded id and the run by its key
/// (recording its exit itself), and nothing is submitted or run twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_allocation_outlives_a_killed_orchestrator_and_is_adopted() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let campaign = host.submit("orchestrator-killed", "1, 2", 3, "1.5").await;
    let in_flight = in_flight(&mut host.client, &campaign.id).await;
    let before = host.cluster.jobs();
    assert_eq!(before.len(), 1, "{before:?}");
    host.kill_and_restart_orchestrator().await;
    let killed_at = std::time::SystemTime::now();
    assert_eq!(
        host.cluster.job_state(&before[0]),
        "RUNNING",
        "the allocation outlived the orchestrator"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 6, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 6);
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:?}");
    let adopted = runs.iter().find(|r| r.id == in_flight.id).unwrap();
    let recorded_at = std::time::SystemTime::try_from(adopted.finished_at.unwrap()).unwrap();
    assert!(
        recorded_at > killed_at,
        "the new orchestrator recorded the run in flight at the kill: {adopted:?}"
    );
    host.assert_each_run_ran_once(&runs);
    assert_eq!(job, before[0], "the same allocation, adopted");
    assert_eq!(host.cluster.jobs(), before, "nothing submitted twice");
    assert_allocation_released(&host.cluster, &job).await;
}

/// kill -9 of the agent and of the orchestrator while a run of a job
/// array is in flight: the array's tasks run on, the new agent follows a
/// task by its key from the files it writes, the new orchestrator adopts
/// the array by its recorded placement and the run in flight by its key;
/// every run is recorded once in one attempt and run once, in one array per
/// cycle and no more.
#[tokio::test(flavor = "multi_thread")]
async fn job_arrays_outlive_a_killed_agent_and_orchestrator() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let campaign = host
        .submit_arrays("arrays-killed", ("1, 2, 3", 2, "1.5"), "{parallel: 1}")
        .await;
    in_flight(&mut host.client, &campaign.id).await;
    host.kill_and_restart_agent().await;
    host.kill_and_restart_orchestrator().await;
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 6, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    assert!(runs.iter().all(|r| r.attempts == 1), "{runs:?}");
    host.assert_each_run_ran_once(&runs);
    let arrays: BTreeSet<String> = runs
        .iter()
        .map(|run| {
            let result: serde_json::Value = serde_json::from_str(&run.result_json).unwrap();
            result["array"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(arrays.len(), 2, "an array per cycle: {arrays:?}");
    let submitted: BTreeSet<String> = host
        .cluster
        .jobs()
        .iter()
        .map(|id| id.split('_').next().unwrap_or(id).to_string())
        .collect();
    assert_eq!(submitted, arrays, "no array submitted twice");
}

/// A deployment whose replica is a SLURM job kept running: the job serves
/// HTTP on a port berth allocated, the replica's endpoint is the address of
/// the node the job landed on (slurmrestd's NodeAddr), its health check
/// passes there; `scancel` of the job has the replica submitted again as a
/// new job (a restart counted), and stopping the deployment cancels it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_replica_is_a_slurm_job_kept_running_on_its_node() {
    use berth_tests::deployment::{cancelled, running_replica, wait_deployment};
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let site = host.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "served by a SLURM job\n").unwrap();
    // The example recipe as it is, but for the directory it serves and
    // quicker health checks and restarts.
    let example = berth_tests::repo_root().join("examples/deployments/slurm/web.yaml");
    let recipe = std::fs::read_to_string(&example)
        .unwrap()
        .replace("/shared/www", &site.display().to_string())
        .replace("name: web-on-slurm", "name: web")
        .replace("interval: 2s", "interval: 200ms")
        .replace("backoff: 1s", "backoff: 100ms")
        .replace("max_backoff: 30s", "max_backoff: 1s");
    assert!(recipe.contains(&format!("partition: {}", slurm::PARTITION)));
    let started = Instant::now();
    berth_tests::deployment::deploy(&mut host.client, recipe, &example).await;
    let limit = Duration::from_secs(90);
    let deployment =
        wait_deployment(&mut host.client, "web", limit, "running", running_replica).await;
    eprintln!(
        "a SLURM replica Running (submitted, started, checked) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let endpoint = &deployment.replica_status[0].endpoints[0];
    assert_eq!(
        endpoint.host, "127.0.0.1",
        "the endpoint is the node's NodeAddr: {endpoint:?}"
    );
    let (status, body) = berth_tests::http_get(&endpoint.address, "/index.html", None).await;
    assert_eq!((status, body.as_str()), (200, "served by a SLURM job\n"));
    let job_file = site.join("job-0");
    let first_job = std::fs::read_to_string(&job_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(host.cluster.job_state(&first_job), "RUNNING");

    host.cluster
        .client("scancel", &[first_job.as_str()])
        .expect("scancel");
    let cancelled_at = Instant::now();
    let deployment = wait_deployment(&mut host.client, "web", limit, "running again", |d| {
        running_replica(d) && d.replica_status[0].restarts >= 1
    })
    .await;
    eprintln!(
        "submitted again and serving {:.1} s after scancel",
        cancelled_at.elapsed().as_secs_f64()
    );
    let replica = &deployment.replica_status[0];
    assert_eq!(replica.restarts, 1, "{replica:?}");
    let second_job = std::fs::read_to_string(&job_file)
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(second_job, first_job, "a new job serves");
    let (status, _) =
        berth_tests::http_get(&replica.endpoints[0].address, "/index.html", None).await;
    assert_eq!(status, 200);

    host.client
        .stop_deployment(StopDeploymentRequest { name: "web".into() })
        .await
        .expect("StopDeployment");
    wait_deployment(&mut host.client, "web", limit, "cancelled", cancelled).await;
    assert_allocation_released(&host.cluster, &second_job).await;
    let mut jobs = host.cluster.jobs();
    jobs.sort_by_key(|id| id.parse::<u64>().unwrap_or(0));
    assert_eq!(
        jobs,
        vec![first_job, second_job],
        "one job per start of the replica, nothing else submitted"
    );
}

/// The first run of a campaign of [`manifest`] (`n=1` of its first
/// cycle) while it runs.
async fn in_flight(client: &mut Client, id: &str) -> Run {
    berth_tests::campaign::a_run_in_flight(client, id, 0, "n=1", Duration::from_secs(60)).await
}

/// Polls the host until `done` holds (`what` names it for the panic).
async fn wait_host(client: &mut Client, what: &str, done: impl Fn(&Host) -> bool) -> Host {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = berth_tests::campaign::hosts_of(client).await;
        assert_eq!(hosts.len(), 1, "{hosts:?}");
        let host = hosts.into_iter().next().unwrap();
        if done(&host) {
            return host;
        }
        assert!(
            Instant::now() < deadline,
            "the host never became {what}: {host:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// slurmrestd killed mid-campaign: the run in flight finishes (its step
/// needs only slurmctld), the host is reported degraded naming slurmrestd's
/// URL and the campaign waits for it; once slurmrestd is back the host is
/// ready again and the campaign goes on in the same allocation, every run
/// run once. The run whose exec met the outage is charged that attempt.
#[tokio::test(flavor = "multi_thread")]
async fn runs_wait_while_slurmrestd_is_down_and_the_host_is_degraded() {
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let campaign = host.submit("rest-down", "1, 2", 3, "1").await;
    in_flight(&mut host.client, &campaign.id).await;
    let before = host.cluster.jobs();
    assert_eq!(before.len(), 1, "{before:?}");
    host.cluster.stop_rest();

    let url = host.cluster.rest_url.clone();
    let degraded = wait_host(&mut host.client, "degraded", |h| {
        h.status_message.starts_with("degraded: RUNTIME_SLURM: ")
    })
    .await;
    assert_eq!(degraded.status, HostStatus::Ready as i32, "{degraded:?}");
    assert!(
        degraded
            .status_message
            .contains(&format!("slurmrestd at {url} is unavailable")),
        "{degraded:?}"
    );
    let waiting = berth_tests::campaign::wait_campaign(
        &mut host.client,
        &campaign.id,
        Duration::from_secs(30),
        "waiting for slurmrestd with nothing in flight",
        |c| {
            c.status_message.contains(&url)
                && c.runs
                    .as_ref()
                    .is_some_and(|r| r.running + r.dispatched == 0)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = berth_tests::campaign::get_campaign(&mut host.client, &campaign.id).await;
    assert_eq!(
        still.runs, waiting.runs,
        "no run goes on while slurmrestd is down: {still:?}"
    );
    assert_eq!(still.state, CampaignState::Running as i32, "{still:?}");

    host.cluster.start_rest().expect("slurmrestd started again");
    wait_host(&mut host.client, "ready again", |h| {
        h.status == HostStatus::Ready as i32 && h.status_message.is_empty()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(180);
    berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, 6, deadline).await;
    let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
    let job = assert_runs_were_steps_of_one_job(&runs, 6);
    assert!(runs.iter().all(|r| r.attempts <= 2), "{runs:?}");
    host.assert_each_run_ran_once(&runs);
    assert_eq!(
        job, before[0],
        "the same allocation, kept through the outage"
    );
    assert_eq!(host.cluster.jobs(), before, "nothing submitted twice");
    assert_allocation_released(&host.cluster, &job).await;
}

/// The middle of `samples` (sorted here).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Waits until job `id` holds no resources any more (cancelled, ended), so
/// that the next job measured does not wait for them.
async fn wait_job_released(cluster: &Cluster, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(
        cluster.job_state(id).as_str(),
        "PENDING" | "RUNNING" | "COMPLETING"
    ) {
        assert!(Instant::now() < deadline, "job {id} never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// docs/benchmarks.md, "SLURM runtime": the time from asking to a running
/// job, through berth's agent (CreateWorkload submits it held,
/// StartWorkload releases it and answers once it runs) and through plain
/// `sbatch` of the same job (squeue polled every 10 ms until it leaves
/// PENDING), alternated on the same cluster; then a sweep of 1,000 short runs
/// through the orchestrator as steps of one allocation and as job arrays,
/// and the same tasks as one plain `sbatch --array` (`BENCH_SLURM_SWEEPS`
/// picks some: `steps,cycle,all,sbatch`). Run with
/// `cargo test --release -p berth-tests --test slurm -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: prints its figures"]
async fn bench_submission_through_berth_vs_sbatch_and_sweep_throughput() {
    const JOBS: usize = 15;
    let Some(mut host) = SlurmHost::start().await else {
        return;
    };
    let socket = host.dir.path().join("agent.sock");
    let mut agent = berth_proto::agent::v1::container_agent_client::ContainerAgentClient::new(
        wait_for(&format!("unix://{}", socket.display())).await,
    );
    let spec = berth_proto::common::v1::WorkloadSpec {
        runtime: berth_proto::common::v1::Runtime::Slurm as i32,
        command: vec!["sleep".into(), "600".into()],
        resources: Some(berth_proto::common::v1::Resources {
            cpu_limit: 1.0,
            memory_limit_bytes: 100 << 20,
            ..Default::default()
        }),
        slurm: Some(berth_proto::common::v1::SlurmSpec {
            partition: slurm::PARTITION.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Asked to submitted (the answer with the job id), and to running.
    let (mut berth_submitted, mut sbatch_submitted) = (Vec::new(), Vec::new());
    let (mut through_berth, mut through_sbatch) = (Vec::new(), Vec::new());
    for i in 0..JOBS {
        let asked = Instant::now();
        let created = agent
            .create_workload(berth_proto::agent::v1::CreateWorkloadRequest {
                name: format!("bench-{i}"),
                spec: Some(spec.clone()),
            })
            .await
            .expect("CreateWorkload")
            .into_inner();
        berth_submitted.push(asked.elapsed());
        let started = agent
            .start_workload(berth_proto::agent::v1::WorkloadRef {
                id: created.id.clone(),
            })
            .await
            .expect("StartWorkload")
            .into_inner();
        through_berth.push(asked.elapsed());
        assert_eq!(
            started.state,
            berth_proto::agent::v1::WorkloadState::Running as i32,
            "{started:?}"
        );
        agent
            .remove_workload(berth_proto::agent::v1::RemoveWorkloadRequest {
                id: created.id.clone(),
                force: true,
            })
            .await
            .expect("RemoveWorkload");
        wait_job_released(&host.cluster, created.id.trim_start_matches("slurm-")).await;

        let asked = Instant::now();
        let job = host
            .cluster
            .client(
                "sbatch",
                &[
                    "--parsable",
                    &format!("--partition={}", slurm::PARTITION),
                    "--cpus-per-task=1",
                    "--mem=100M",
                    "--output=/dev/null",
                    "--wrap=sleep 600",
                ],
            )
            .expect("sbatch");
        sbatch_submitted.push(asked.elapsed());
        while host.cluster.job_state(&job) == "PENDING" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        through_sbatch.push(asked.elapsed());
        host.cluster.client("scancel", &[&job]).expect("scancel");
        wait_job_released(&host.cluster, &job).await;
    }
    let ms = |samples: &mut Vec<Duration>| median(samples).as_secs_f64() * 1e3;
    eprintln!(
        "medians of {JOBS}: submitted: berth CreateWorkload (held) {:.0} ms, sbatch {:.0} ms; \
         running: berth CreateWorkload + StartWorkload {:.0} ms, sbatch + squeue {:.0} ms",
        ms(&mut berth_submitted),
        ms(&mut sbatch_submitted),
        ms(&mut through_berth),
        ms(&mut through_sbatch)
    );

    // 100 configurations × 10 cycles, each run printing a line: as steps
    // of one allocation, as job arrays (a cycle's 100 runs each, and all
    // 1,000 in one), and the same 1,000 tasks as one plain `sbatch --array`.
    const CONFIGS: u32 = 100;
    const CYCLES: u32 = 10;
    let values: Vec<String> = (1..=CONFIGS).map(|n| n.to_string()).collect();
    let values = values.join(", ");
    // BENCH_SLURM_SWEEPS picks some of them: steps,cycle,all,sbatch.
    let sweeps =
        std::env::var("BENCH_SLURM_SWEEPS").unwrap_or_else(|_| "steps,cycle,all,sbatch".into());
    let wanted = |sweep: &str| sweeps.split(',').any(|s| s.trim() == sweep);
    for (sweep, way, array) in [
        ("steps", "steps of one allocation", None),
        ("cycle", "job arrays of a cycle (100 runs) each", Some("{}")),
        ("all", "one job array of 1,000 runs", Some("{runs: 1000}")),
    ] {
        if !wanted(sweep) {
            continue;
        }
        let submitted = Instant::now();
        let name = format!("sweep-{sweep}");
        let campaign = match array {
            None => host.submit(&name, &values, CYCLES, "0").await,
            Some(array) => {
                host.submit_arrays(&name, (&values, CYCLES, "0"), array)
                    .await
            }
        };
        let runs = u64::from(CONFIGS * CYCLES);
        let deadline = submitted + Duration::from_secs(1800);
        berth_tests::campaign::wait_succeeded(&mut host.client, &campaign.id, runs, deadline).await;
        let wall = submitted.elapsed();
        let done = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
        host.assert_each_run_ran_once(&done);
        let _ = std::fs::remove_file(host.run_log());
        eprintln!(
            "sweep of {runs} runs as {way}: {:.1} s from submit to the last run recorded, {:.1} runs/s",
            wall.as_secs_f64(),
            runs as f64 / wall.as_secs_f64(),
        );
    }
    if !wanted("sbatch") {
        return;
    }
    let tasks = CONFIGS * CYCLES;
    let submitted = Instant::now();
    let array = host
        .cluster
        .client(
            "sbatch",
            &[
                "--parsable",
                &format!("--partition={}", slurm::PARTITION),
                &format!("--array=0-{}", tasks - 1),
                "--cpus-per-task=1",
                "--mem=200M",
                "--output=/dev/null",
                "--wrap=echo $SLURM_ARRAY_TASK_ID",
            ],
        )
        .expect("sbatch --array");
    // squeue lists the array's tasks that are pending or running, a line each.
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !host.cluster.job_state(&array).is_empty() {
        assert!(Instant::now() < deadline, "array {array} never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = submitted.elapsed();
    let completed = host
        .cluster
        .client("squeue", &["-h", "-t", "CD", "-j", &array, "-o", "%i"])
        .unwrap_or_default();
    assert_eq!(
        completed.lines().count(),
        tasks as usize,
        "every task completed"
    );
    eprintln!(
        "plain sbatch --array=0-{} of the same tasks: {:.1} s from submit to the last task's end, {:.1} tasks/s",
        tasks - 1,
        wall.as_secs_f64(),
        f64::from(tasks) / wall.as_secs_f64(),
    );
}
