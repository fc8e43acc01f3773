//! A campaign whose backend is a SLURM job, end to end through the real
//! binaries: orchestrator → agent (slurm runtime) → slurmrestd → a real
//! single-node SLURM 22.05 (tests/src/slurm.rs). The backend is one
//! allocation; each run is a job step started in it with srun, so the
//! orchestrator drives it exactly as it drives a long-running container.

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
    _orchestrator: Process,
}

/// An agent whose slurm runtime reaches `cluster` as root.
fn start_slurm_agent(dir: &Path, cluster: &Cluster, token: &str) -> Process {
    let settings = [
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

impl SlurmHost {
    async fn start() -> Option<Self> {
        let cluster = slurm::cluster()?;
        let dir = tempfile::tempdir().unwrap();
        let token = cluster.token("root", Duration::from_secs(3600));
        let agent = start_slurm_agent(dir.path(), &cluster, &token);
        let port = free_port();
        let orchestrator = start_orchestrator(dir.path(), port, &[]);
        let mut client =
            OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        wait_for(&address).await;
        client
            .register_host(RegisterHostRequest {
                name: "login1".into(),
                address,
                ..Default::default()
            })
            .await
            .expect("RegisterHost");
        Some(Self {
            cluster,
            dir,
            client,
            agent,
            _orchestrator: orchestrator,
        })
    }

    /// kill -9 of the agent, then the same agent started again.
    async fn kill_and_restart_agent(&mut self) {
        self.agent.child.kill().expect("kill -9");
        let _ = self.agent.child.wait();
        let socket = self.dir.path().join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let token = self.cluster.token("root", Duration::from_secs(3600));
        self.agent = start_slurm_agent(self.dir.path(), &self.cluster, &token);
        wait_for(&format!("unix://{}", socket.display())).await;
    }
}

/// A campaign of `runs_per_cycle` × `cycles` runs in one SLURM allocation;
/// each run prints the job and step it ran in.
fn manifest(name: &str, values: &str, cycles: u32, sleep: &str) -> String {
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
  command: [sh, -c, 'sleep {sleep}; echo "{{\"n\": {{{{n}}}}, \"job\": \"$SLURM_JOB_ID\", \"step\": \"$SLURM_STEP_ID\", \"env\": \"$FROM_BACKEND\"}}"']
  timeout: 60s
"#,
        partition = slurm::PARTITION,
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
    let campaign = berth_tests::campaign::submit(
        &mut host.client,
        &manifest("on-slurm", "1, 2, 3, 4, 5", 4, "0"),
    )
    .await;
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
    assert_allocation_released(&host.cluster, &job).await;
    assert_eq!(
        host.cluster.jobs(),
        vec![job],
        "one job submitted for the whole campaign"
    );
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
    let campaign =
        berth_tests::campaign::submit(&mut host.client, &manifest("agent-killed", "1, 2", 3, "1"))
            .await;
    // Wait for a run in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = berth_tests::campaign::runs_of(&mut host.client, &campaign.id).await;
        if runs.iter().any(|r| r.state == RunState::Running as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "no run started: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    assert_eq!(job, before[0], "the same allocation, adopted");
    assert_eq!(host.cluster.jobs(), before, "nothing submitted twice");
    assert_allocation_released(&host.cluster, &job).await;
}
