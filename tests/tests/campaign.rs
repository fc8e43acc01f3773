//! Campaigns end to end through the real binaries: orchestrator → agent →
//! host processes → results, including the quickstart, bad manifests, an
//! unreachable agent, a kill -9 of the orchestrator mid-campaign (its run in
//! flight adopted) and an agent restarted mid-run (its run retried).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::AuthChannel;
use berth_server::error_reason;
use berth_tests::campaign::{
    Client, a_run_in_flight, assert_each_recorded_once, assert_no_campaigns, refused_at_submit,
    slow_campaign, wait_campaign, wait_ended,
};
use berth_tests::{Process, bin, free_port, register_local_agent, start_agent, wait_for};

fn start_orchestrator(dir: &Path, port: u16) -> Process {
    berth_tests::start_orchestrator(dir, port, &[])
}

async fn connect(port: u16) -> Client {
    OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await)
}

/// How long a campaign of these tests may take to get where it is awaited.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn quickstart_runs_twice_and_prints_a_row_per_config() {
    let dir = tempfile::tempdir().unwrap();
    for attempt in 1..=2 {
        let output = Command::new(bin("berth"))
            .args(["quickstart", "--data-dir", dir.path().to_str().unwrap()])
            .output()
            .expect("run berth quickstart");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "attempt {attempt} failed:\n{stdout}\n{stderr}"
        );
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("tool=") && l.contains(" ± "))
            .collect();
        assert_eq!(
            rows.len(),
            6,
            "attempt {attempt}: expected one row per config:\n{stdout}"
        );
        for row in rows {
            let columns: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(columns[2], "3", "3 measured cycles per config: {row}");
        }
        assert!(
            stdout.contains("[ 24/24]"),
            "progress shown as runs finish:\n{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_manifests_are_rejected_with_location_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    let cases = [
        ("name: t\nbackends: [\n", "bad.yaml:3:"),
        (
            "name: t\nbackends: [{name: b, runtime: process, colour: red}]\nconfigs: [{name: a}]\nrun: {command: [true]}\n",
            "unknown field `colour`",
        ),
        (
            "name: t\nbackends: [{name: b, runtime: process}]\ngrid: {params: {}}\nrun: {command: [true]}\n",
            "empty grid",
        ),
        (
            "name: t\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: a}]\nrun: {command: [true]}\ncycles: 0\n",
            "bad.yaml:5:1: cycles",
        ),
        (
            "name: t\nbackends: [{name: b, runtime: process}]\nconfigs:\n  - name: a\n  - name: a\nrun: {command: [true]}\n",
            "bad.yaml:5:",
        ),
    ];
    for (manifest, expected) in cases {
        let request = SubmitCampaignRequest {
            manifest_yaml: manifest.into(),
            source_name: "bad.yaml".into(),
            validate_only: false,
        };
        let status = client.submit_campaign(request).await.expect_err(manifest);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{manifest}");
        assert!(
            status.message().contains(expected),
            "{:?} lacks {expected:?}",
            status.message()
        );
    }
    assert_no_campaigns(&mut client, "a rejected manifest must record nothing").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_agent_leaves_campaign_pending_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    let socket = dir.path().join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let host = client
        .register_host(RegisterHostRequest {
            name: "gpu-01".into(),
            address: address.clone(),
            ..Default::default()
        })
        .await
        .expect("an unreachable host is still registered")
        .into_inner();
    assert_eq!(host.status, HostStatus::Unreachable as i32, "{host:?}");

    let manifest = "name: t\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: a}, {name: c}]\nrun: {command: [sh, -c, 'echo {\"v\": 1}']}\n";
    let campaign = submit(&mut client, manifest.into()).await;
    let waiting = wait_campaign(
        &mut client,
        &campaign.id,
        LIMIT,
        "waiting for gpu-01",
        |c| c.status_message.contains("gpu-01"),
    )
    .await;
    assert_eq!(waiting.state, CampaignState::Pending as i32);
    assert!(
        waiting.status_message.contains(&address),
        "status names the address: {}",
        waiting.status_message
    );
    // The orchestrator keeps serving meanwhile.
    client
        .list_hosts(ListHostsRequest::default())
        .await
        .expect("still serving");

    let _agent = start_agent(&socket);
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    assert_eq!(done.runs.unwrap().succeeded, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_orchestrator_mid_campaign_loses_and_repeats_nothing() {
    let (local, mut client) = start_local(&[]).await;
    let log = local.dir.path().join("finished.log");
    let campaign = submit(&mut client, slow_campaign("crash", &log, 0.2, 1.5)).await;
    // A long run, so that it is still running when the old orchestrator dies.
    let in_flight = a_run_in_flight(&mut client, &campaign.id, 3, "n=4", LIMIT).await;
    local.orchestrator.kill();
    let killed_at = std::time::SystemTime::now();

    let orchestrator = start_orchestrator(local.dir.path(), local.port);
    let mut client = connect(local.port).await;
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    let counts = done.runs.unwrap();
    assert_eq!((counts.succeeded, counts.total), (12, 12), "{counts:?}");

    let runs = all_runs(&mut client, &campaign.id).await;
    assert_each_recorded_once(&runs, 12);
    let adopted = runs.iter().find(|r| r.id == in_flight.id).unwrap();
    assert_eq!(
        adopted.attempts, 1,
        "the run in flight at the kill was adopted, not run again: {adopted:?}"
    );
    let recorded_at = std::time::SystemTime::try_from(adopted.finished_at.unwrap()).unwrap();
    assert!(
        recorded_at > killed_at,
        "the new orchestrator recorded the adopted run: {adopted:?}"
    );
    let finished = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = finished.lines().collect();
    lines.sort_unstable();
    let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(lines, ids, "every run finished on the host exactly once");
    let results = client
        .get_results(GetResultsRequest { id: campaign.id })
        .await
        .unwrap()
        .into_inner();
    assert!(
        results.results.iter().all(|r| r.succeeded == 3),
        "{results:?}"
    );
    drop(orchestrator);
}

/// Runs the slow campaign and restarts its agent while a run is in flight;
/// returns the ended campaign, its runs and the id of the run that was in flight.
async fn restart_the_agent_mid_run(settings: &[&str]) -> (Campaign, Vec<Run>, String) {
    let (local, mut client) = start_local(settings).await;
    let log = local.dir.path().join("finished.log");
    let campaign = submit(&mut client, slow_campaign("agent-restart", &log, 0.2, 1.0)).await;
    let in_flight = a_run_in_flight(&mut client, &campaign.id, 2, "n=4", LIMIT).await;
    // The new agent knows nothing of the old one's execs or environments.
    local.agent.kill();
    let _ = std::fs::remove_file(&local.socket);
    let _agent = start_agent(&local.socket);

    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    let runs = all_runs(&mut client, &campaign.id).await;
    (done, runs, in_flight.id)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restarted_mid_run_has_the_run_retried_and_recorded_once() {
    let (done, runs, in_flight) = restart_the_agent_mid_run(&[]).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    assert_each_recorded_once(&runs, 12);
    let retried = runs.iter().find(|r| r.id == in_flight).unwrap();
    assert!(
        retried.attempts >= 2,
        "the run whose exec died with the agent ran again: {retried:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_interrupted_past_the_attempt_cap_fails_and_says_why() {
    let (done, runs, in_flight) =
        restart_the_agent_mid_run(&["scheduler.max_run_attempts=1"]).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    assert_eq!(done.status_message, "1 of 12 runs failed", "{done:?}");
    let capped = runs.iter().find(|r| r.id == in_flight).unwrap();
    assert_eq!(capped.state, RunState::Failed as i32, "{capped:?}");
    assert!(
        capped.error.contains("scheduler.max_run_attempts"),
        "{capped:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_campaign_kills_its_run_in_flight_on_the_agent() {
    let (local, mut client) = start_local(&[]).await;
    let log = local.dir.path().join("finished.log");
    let campaign = submit(&mut client, slow_campaign("cancel", &log, 1.5, 1.5)).await;
    let in_flight = a_run_in_flight(&mut client, &campaign.id, 0, "n=1", LIMIT).await;
    client
        .cancel_campaign(CancelCampaignRequest {
            id: campaign.id.clone(),
        })
        .await
        .unwrap();
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Cancelled as i32, "{done:?}");
    // Its exec is keyed, so only CancelExec can have stopped it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let finished = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !finished.lines().any(|l| l == in_flight.id),
        "the cancelled run ran to its end:\n{finished}"
    );
    let runs = all_runs(&mut client, &campaign.id).await;
    let cancelled = runs.iter().find(|r| r.id == in_flight.id).unwrap();
    assert_eq!(cancelled.state, RunState::Cancelled as i32, "{cancelled:?}");
}

/// A local agent and an orchestrator that keeps its state in `dir`; both
/// killed when dropped.
struct Local {
    dir: tempfile::TempDir,
    socket: PathBuf,
    port: u16,
    agent: Process,
    orchestrator: Process,
}

/// Starts a local agent and an orchestrator (with `settings`), and registers
/// the agent with it.
async fn start_local(settings: &[&str]) -> (Local, Client) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = start_agent(&socket);
    let port = free_port();
    let orchestrator = berth_tests::start_orchestrator(dir.path(), port, settings);
    let mut client = connect(port).await;
    register_local_agent(&mut client, &socket).await;
    let local = Local {
        dir,
        socket,
        port,
        agent,
        orchestrator,
    };
    (local, client)
}

async fn submit(client: &mut Client, manifest_yaml: String) -> Campaign {
    client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The workloads an agent holds for one campaign. The agent also lists what
/// the shared engines hold under its owner for others (docker containers,
/// libvirt domains of other tests, or left by a run that was killed), so a
/// test looks at its own only.
async fn campaign_workloads(
    agent: &mut berth_proto::agent::v1::container_agent_client::ContainerAgentClient<AuthChannel>,
    campaign_id: &str,
) -> Vec<berth_proto::agent::v1::Workload> {
    let workloads = agent
        .list_workloads(berth_proto::agent::v1::ListWorkloadsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workloads;
    workloads
        .into_iter()
        .filter(|w| {
            w.spec
                .as_ref()
                .and_then(|spec| spec.labels.get("berth.campaign"))
                .map(String::as_str)
                == Some(campaign_id)
        })
        .collect()
}

async fn all_runs(client: &mut Client, campaign_id: &str) -> Vec<Run> {
    client
        .list_runs(ListRunsRequest {
            campaign_id: campaign_id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
}

/// Watches a campaign that waits for a host, registers the local agent at
/// `socket`, and follows the campaign to its end: every event, and the
/// campaign as it ended.
async fn events_once_a_host_comes(
    client: &mut Client,
    campaign_id: &str,
    socket: &Path,
) -> (Vec<CampaignEvent>, Campaign) {
    let mut events = client
        .watch_campaign(WatchCampaignRequest {
            id: campaign_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    register_local_agent(client, socket).await;
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), events.message())
        .await
        .expect("campaign events")
        .unwrap()
    {
        seen.push(event);
    }
    let done = seen
        .iter()
        .rev()
        .find_map(|event| event.campaign.clone())
        .expect("the campaign in its events");
    (seen, done)
}

#[tokio::test(flavor = "multi_thread")]
async fn stable_warmup_converges_or_stops_at_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    // `settles` reports 10, 20, then 100 for good; `drifts` keeps climbing.
    let manifest = r#"name: stable-warmup
backends: [{name: b, runtime: process}]
grid: {params: {shape: [settles, drifts]}}
cycles: 2
warmup: {cv_below: 0.05, last: 3, metric: v, max_runs: 6}
run:
  command:
    - sh
    - -c
    - |
      if [ "$BERTH_WARMUP" = 1 ] && [ {{shape}} = drifts ]; then v={{cycle}}
      elif [ "$BERTH_WARMUP" = 1 ] && [ {{cycle}} -le 2 ]; then v=$(({{cycle}} * 10))
      else v=100; fi
      echo "{\"v\": $v}"
"#;
    // No host yet: the campaign waits, so the watch sees every event.
    let campaign = submit(&mut client, manifest.into()).await;
    assert_eq!(
        campaign.runs.unwrap().total,
        16,
        "6 + 6 warmup runs planned, 4 measured"
    );
    let (events, done) = events_once_a_host_comes(&mut client, &campaign.id, &socket).await;
    let mut warmup_ends = BTreeMap::new();
    for event in events {
        if let Some(end) = event.warmup_ended {
            assert!(
                event.message.starts_with("warmup of shape="),
                "{}",
                event.message
            );
            warmup_ends.insert(end.config.clone(), (end, event.message));
        }
    }
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");

    let (settled, message) = &warmup_ends["shape=settles"];
    assert!(settled.converged && settled.runs == 5, "{settled:?}");
    assert_eq!(settled.cv, Some(0.0));
    assert!(message.contains("converged after 5 runs"), "{message}");
    let (drifted, message) = &warmup_ends["shape=drifts"];
    assert!(!drifted.converged && drifted.runs == 6, "{drifted:?}");
    assert!(message.contains("cap of 6 runs"), "{message}");

    let runs = all_runs(&mut client, &campaign.id).await;
    let warmups = |config: &str| {
        runs.iter()
            .filter(|r| r.warmup && r.config == config)
            .count()
    };
    assert_eq!((warmups("shape=settles"), warmups("shape=drifts")), (5, 6));
    assert_eq!(
        done.runs.unwrap().total,
        15,
        "the unneeded warmup run is gone"
    );
    let results = client
        .get_results(GetResultsRequest { id: campaign.id })
        .await
        .unwrap()
        .into_inner();
    for row in &results.results {
        let v = row.metrics.iter().find(|m| m.name == "v").unwrap();
        assert_eq!(
            (row.succeeded, v.mean),
            (2, 100.0),
            "warmups excluded: {row:?}"
        );
    }
}

/// `cycles: {min, max, until}`: a configuration whose metric is quiet stops
/// at `min` cycles, a noisy one runs to `max`; the events and the results
/// say which, and the unneeded runs are gone from the campaign.
#[tokio::test(flavor = "multi_thread")]
async fn cycles_stop_once_the_answer_is_known_or_at_their_cap() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let port = free_port();
    let _orchestrator = start_orchestrator(dir.path(), port);
    let mut client = connect(port).await;
    // `quiet` reports 100 every cycle; `noisy` 10 and 1000 in turn.
    let manifest = r#"name: until-known
backends: [{name: b, runtime: process}]
grid: {params: {shape: [quiet, noisy]}}
cycles: {min: 3, max: 8, until: {metric: v, ci_below: 2%}}
run:
  command:
    - sh
    - -c
    - |
      if [ {{shape}} = quiet ]; then v=100; else v=$(( {{cycle}} % 2 ? 10 : 1000 )); fi
      echo "{\"v\": $v}"
"#;
    // No host yet: the campaign waits, so the watch sees every event.
    let campaign = submit(&mut client, manifest.into()).await;
    assert_eq!(campaign.runs.unwrap().total, 16, "2 × cycles.max planned");
    let (events, done) = events_once_a_host_comes(&mut client, &campaign.id, &socket).await;
    let ends: BTreeMap<String, _> = events
        .into_iter()
        .filter_map(|event| Some((event.cycles_ended?, event.message)))
        .map(|(end, message)| (end.config.clone(), (end, message)))
        .collect();
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    let (quiet, message) = &ends["shape=quiet"];
    assert!(quiet.known && quiet.runs == 3, "{quiet:?}");
    assert_eq!(quiet.ci_relative, Some(0.0));
    assert!(message.contains("stopped after 3 runs"), "{message}");
    let (noisy, message) = &ends["shape=noisy"];
    assert!(!noisy.known && noisy.runs == 8, "{noisy:?}");
    assert!(noisy.ci_relative.unwrap() > 0.02, "{noisy:?}");
    assert!(message.contains("reached cycles.max (8 runs)"), "{message}");
    assert_eq!(done.runs.unwrap().total, 11, "the 5 unneeded runs are gone");

    let results = client
        .get_results(GetResultsRequest { id: campaign.id })
        .await
        .unwrap()
        .into_inner();
    let ended: BTreeMap<&str, (bool, u32, u64)> = results
        .results
        .iter()
        .map(|row| {
            let end = row.cycles_ended.as_ref().expect("cycles_ended in results");
            (row.config.as_str(), (end.known, end.runs, row.succeeded))
        })
        .collect();
    assert_eq!(ended["shape=quiet"], (true, 3, 3));
    assert_eq!(ended["shape=noisy"], (false, 8, 8));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_no_host_can_place_is_refused_at_submit() {
    let (_local, mut client) = start_local(&[]).await;
    let manifest = "name: t
backends:
  - name: fits
    runtime: process
  - name: huge
    runtime: process
    placement: {gpus: 1000, memory: 1000TiB}
configs: [{name: a}]
run: {command: [true]}
";
    for status in refused_at_submit(&mut client, manifest, "no host has 1000 GPUs").await {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        // The reason travels with the status, for callers to match on.
        assert_eq!(error_reason(&status), Some("unplaceable"), "{status:?}");
        assert!(
            status.message().contains("backend `huge`")
                && status.message().contains("host `local` has")
                && status.message().contains("needs 1000"),
            "{}",
            status.message()
        );
    }
    assert_no_campaigns(&mut client, "nothing recorded or started").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_keep_their_logs_tail_and_export_as_parquet() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let (local, mut client) = start_local(&[]).await;
    // 20 KB of noise, then the lines that must survive in the 4 KiB tail
    // (after a pause: stdout and stderr are separate pipes, read as they come).
    let manifest = r#"name: logs
backends: [{name: b, runtime: process}]
grid: {params: {n: [1, 2]}}
cycles: 2
warmup: {runs: 1}
run:
  command:
    - sh
    - -c
    - |
      i=0; while [ $i -lt 400 ]; do echo "noise line $i ................................"; i=$((i + 1)); done
      sleep 0.3
      echo "stderr of {{run_id}}" >&2
      echo '{"n": {{n}}, "tokens": 100}'
"#;
    let campaign = submit(&mut client, manifest.into()).await;
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    let runs = all_runs(&mut client, &campaign.id).await;
    assert_eq!(runs.len(), 6);
    for run in &runs {
        assert!(run.logs_tail.len() <= 4096, "{}", run.logs_tail.len());
        assert!(run.logs_tail.len() > 3000, "{}", run.logs_tail.len());
        assert!(
            run.logs_tail.contains(&format!("stderr of {}", run.id)),
            "{}",
            run.logs_tail
        );
        // stdout and stderr are separate pipes: their order is not fixed.
        assert!(
            run.logs_tail.contains("\"tokens\": 100}\n"),
            "{}",
            run.logs_tail
        );
        assert!(
            !run.logs_tail.contains("noise line 1 "),
            "only the tail is kept"
        );
    }

    let file = local.dir.path().join("runs.parquet");
    let exported = Command::new(bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{}", local.port),
            "results",
            &campaign.id,
            "--runs",
            "--format",
            "parquet",
            "--output",
            file.to_str().unwrap(),
        ])
        .output()
        .expect("run berth results");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let reader = SerializedFileReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 6);
    let rows: Vec<BTreeMap<String, Field>> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| row.unwrap().into_columns().into_iter().collect())
        .collect();
    for (row, run) in rows.iter().zip(&runs) {
        assert_eq!(row["run_id"], Field::Str(run.id.clone()));
        assert_eq!(row["warmup"], Field::Bool(run.warmup));
        assert_eq!(row["state"], Field::Str("succeeded".into()));
        assert_eq!(row["exit_code"], Field::Long(0));
        assert_eq!(row["param.n"], Field::Str(run.params["n"].clone()));
        assert_eq!(row["result.tokens"], Field::Double(100.0));
        assert!(
            matches!(row["duration_s"], Field::Double(s) if s >= 0.0),
            "{row:?}"
        );
        assert!(
            matches!(row["started_at"], Field::TimestampMillis(_)),
            "{row:?}"
        );
        assert_eq!(row["energy_j"], Field::Null, "power was not measured");
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r["warmup"] == Field::Bool(true))
            .count(),
        2
    );

    let refused = Command::new(bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{}", local.port),
            "results",
            &campaign.id,
            "--runs",
            "--format",
            "parquet",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--output"));
}

/// The backend (a host process here) is stopped behind the orchestrator's
/// back during the gap between two cycles: its agent's events say so, and
/// it is started again before the next run, which runs at its first
/// attempt instead of finding the backend dead.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_goes_down_between_runs_is_started_again_before_the_next() {
    use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
    use berth_proto::agent::v1::{StopWorkloadRequest, WorkloadRef, WorkloadState};

    let (local, mut client) = start_local(&[]).await;
    let manifest = r#"name: watched
backends: [{name: b, runtime: process, command: [sleep, "600"]}]
configs: [{name: c}]
cycles: 2
gaps: {between_cycles: 4s}
run: {command: [echo, '{"n": 1}']}
"#;
    let campaign = submit(&mut client, manifest.into()).await;
    let mut events = client
        .watch_campaign(WatchCampaignRequest {
            id: campaign.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_message = async || {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("campaign events")
            .unwrap()
            .expect("the campaign goes on");
        event.message
    };
    wait_campaign(&mut client, &campaign.id, LIMIT, "cycle 1 done", |c| {
        c.runs.is_some_and(|r| r.succeeded == 1)
    })
    .await;
    // Now in the 4 s gap before cycle 2.
    let mut agent =
        ContainerAgentClient::new(wait_for(&format!("unix://{}", local.socket.display())).await);
    let workloads = campaign_workloads(&mut agent, &campaign.id).await;
    let backend = workloads
        .iter()
        .find(|w| w.spec.as_ref().unwrap().labels.get("berth.backend") == Some(&"b".into()))
        .unwrap_or_else(|| panic!("no backend workload among {workloads:?}"))
        .clone();
    agent
        .stop_workload(StopWorkloadRequest {
            id: backend.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let stopped_at = Instant::now();
    loop {
        let message = next_message().await;
        assert!(
            !message.contains("/2 dispatched"),
            "dispatched first: {message}"
        );
        if message.contains("stopped") && message.contains("starting it again") {
            assert!(message.contains("backend `b` on host `local`"), "{message}");
            break;
        }
    }
    let inspect = |mut agent: ContainerAgentClient<AuthChannel>, id: String| async move {
        agent
            .inspect_workload(WorkloadRef { id })
            .await
            .unwrap()
            .into_inner()
    };
    loop {
        let now = inspect(agent.clone(), backend.id.clone()).await;
        if now.state == WorkloadState::Running as i32 {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(3),
            "not started again during the gap: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    let runs = all_runs(&mut client, &campaign.id).await;
    assert_each_recorded_once(&runs, 2);
    for run in &runs {
        assert_eq!(run.attempts, 1, "no run found the backend down: {run:?}");
    }
}

/// A manifest written to `dir` for `berth submit`.
fn manifest_file(dir: &Path, manifest: &str) -> PathBuf {
    let path = dir.join("campaign.yaml");
    std::fs::write(&path, manifest).unwrap();
    path
}

/// Every measured run fails: the campaign ends FAILED with no results, not
/// SUCCEEDED, and `berth submit --watch` exits non-zero saying why. A
/// campaign where only some configurations failed ends SUCCEEDED, its
/// outcome naming the configurations without a result.
#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_whose_measured_runs_all_failed_ends_failed_and_the_cli_says_why() {
    let (local, mut client) = start_local(&[]).await;
    let manifest = r#"name: all-fail
backends: [{name: b, runtime: process}]
grid: {params: {n: [1, 2]}}
cycles: 2
warmup: {runs: 1}
run: {command: [sh, -c, 'echo "boom at {{n}}" >&2; exit 3']}
"#;
    let submitted = Command::new(bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{}", local.port),
            "submit",
            "--watch",
            manifest_file(local.dir.path(), manifest).to_str().unwrap(),
        ])
        .output()
        .expect("run berth submit --watch");
    let stdout = String::from_utf8_lossy(&submitted.stdout);
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert!(!submitted.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("ended failed (no results): no measured run succeeded; 6 of 6 runs failed")
            && stderr.contains("first failure: run ")
            && stderr.contains("exit code 3: boom at"),
        "{stderr}"
    );
    let id = stdout.lines().next().unwrap().trim().to_string();
    let done = wait_ended(&mut client, &id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Failed as i32, "{done:?}");
    assert_eq!(done.outcome, CampaignOutcome::NoResults as i32, "{done:?}");

    // `n=2` fails, `n=1` gives its results: a success with a hole in it.
    let partly = r#"name: partly
backends: [{name: b, runtime: process}]
grid: {params: {n: [1, 2]}}
cycles: 2
warmup: {runs: 1}
run:
  command:
    - sh
    - -c
    - |
      [ {{n}} = 1 ] && echo '{"v": 1}' && exit 0
      exit 3
"#;
    let campaign = submit(&mut client, partly.into()).await;
    let done = wait_ended(&mut client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Succeeded as i32, "{done:?}");
    assert_eq!(
        done.outcome,
        CampaignOutcome::MissingResults as i32,
        "{done:?}"
    );
    assert_eq!(
        done.status_message,
        "1 of 2 configurations have no succeeded measured run (`n=2` on `b`); 3 of 6 runs failed"
    );
}

/// The runs of `campaign`, every one failed, each naming `what`.
async fn assert_every_run_failed_naming(client: &mut Client, campaign: &Campaign, what: &str) {
    let done = wait_ended(client, &campaign.id, LIMIT).await;
    assert_eq!(done.state, CampaignState::Failed as i32, "{done:?}");
    assert_eq!(done.outcome, CampaignOutcome::NoResults as i32, "{done:?}");
    assert!(done.status_message.contains(what), "{done:?}");
    let runs = all_runs(client, &campaign.id).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in &runs {
        assert_eq!(run.state, RunState::Failed as i32, "{run:?}");
        assert_eq!(run.attempts, 0, "never dispatched: {run:?}");
        assert!(
            run.error.contains(what) && run.error.contains("scheduler.max_create_attempts"),
            "{run:?}"
        );
    }
}

/// A backend whose command cannot start is refused by its agent at every
/// try: after `scheduler.max_create_attempts` its runs fail with the agent's
/// reason instead of waiting for a host forever, and nothing is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_can_never_start_fails_its_runs_with_the_agents_reason() {
    use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;

    let (local, mut client) = start_local(&[]).await;
    let manifest = r#"name: cannot-start
backends: [{name: b, runtime: process, command: [/nonexistent/berth-no-such-command]}]
configs: [{name: c}]
cycles: 2
run: {command: [echo, '{"n": 1}']}
"#;
    let campaign = submit(&mut client, manifest.into()).await;
    assert_every_run_failed_naming(&mut client, &campaign, "berth-no-such-command").await;
    let mut agent =
        ContainerAgentClient::new(wait_for(&format!("unix://{}", local.socket.display())).await);
    let workloads = campaign_workloads(&mut agent, &campaign.id).await;
    assert!(
        workloads.is_empty(),
        "a backend that did not start is removed: {workloads:?}"
    );
}

/// The same through docker, with an image the engine does not have (nothing
/// is pulled): the runs fail naming the image.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_whose_image_does_not_exist_fails_its_runs_naming_the_image() {
    let Some(()) = berth_tests::require_part(berth_tests::Part::Docker) else {
        return;
    };
    let (_local, mut client) = start_local(&[]).await;
    let manifest = r#"name: no-image
backends: [{name: b, runtime: docker, image: "berth-no-such-image:none", command: [sleep, "600"]}]
configs: [{name: c}]
cycles: 2
run: {command: [echo, '{"n": 1}']}
"#;
    let campaign = submit(&mut client, manifest.into()).await;
    assert_every_run_failed_naming(&mut client, &campaign, "berth-no-such-image:none").await;
}
