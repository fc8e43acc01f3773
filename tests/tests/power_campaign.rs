//! A campaign that measures energy per run: orchestrator → agent (process
//! runs) and the host's power sampler serving the replay source (CI has no
//! GPU, so the readings come from a recorded trace and say so).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_server::client::AuthChannel;
use berth_tests::campaign::{results_of, submit, wait_campaign, wait_succeeded};
use berth_tests::{
    Process, bin, free_port, register_measured_host, repo_root, start_agent, start_agent_with,
    start_llm_inference_sampler, start_replay_sampler, wait_for,
};

/// Every stored sample of a run, `page_size` at a time, checking each page's bound.
async fn stored_series(
    client: &mut OrchestratorClient<AuthChannel>,
    run_id: &str,
    device: &str,
    page_size: u32,
) -> Vec<RunPowerSample> {
    let mut samples = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_run_power_series(GetRunPowerSeriesRequest {
                run_id: run_id.into(),
                device: device.into(),
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.samples.len() <= berth_server::paging::page_size(page_size),
            "page too long"
        );
        samples.extend(page.samples);
        if page.next_page_token.is_empty() {
            return samples;
        }
        page_token = page.next_page_token;
    }
}

fn elapsed_seconds(sample: &RunPowerSample) -> f64 {
    let elapsed = sample
        .elapsed
        .as_ref()
        .expect("sample has its elapsed time");
    elapsed.seconds as f64 + f64::from(elapsed.nanos) / 1e9
}

/// Joules the device's energy counter rose over the samples.
fn counter_rise(samples: &[&RunPowerSample]) -> f64 {
    let counter = |s: &&RunPowerSample| s.energy_j.expect("counter sample");
    samples.last().map(counter).unwrap_or_default()
        - samples.first().map(counter).unwrap_or_default()
}

/// Joules from integrating the samples' power with the trapezoid rule.
fn integrated_power(samples: &[&RunPowerSample]) -> f64 {
    samples
        .windows(2)
        .filter_map(|pair| {
            let (a, b) = (pair[0], pair[1]);
            let watts = (a.power_w? + b.power_w?) / 2.0;
            Some(watts * (elapsed_seconds(b) - elapsed_seconds(a)))
        })
        .sum()
}

/// An orchestrator keeping its state in `dir`, its port, and a client once it answers.
async fn start_orchestrator(dir: &Path) -> (Process, u16, OrchestratorClient<AuthChannel>) {
    let port = free_port();
    let store = format!("store.path={}", dir.join("state.db").display());
    let listen = format!("127.0.0.1:{port}");
    let orchestrator = Process::spawn(
        "berth-orchestrator",
        &["--listen", &listen, "--http-listen", "", "--set", &store],
        &[],
    );
    let client = OrchestratorClient::new(wait_for(&format!("http://{listen}")).await);
    (orchestrator, port, client)
}

/// A host whose agent runs processes and whose power sampler replays
/// `trace`, registered with a fresh orchestrator.
struct MeasuringHost {
    _dir: tempfile::TempDir,
    _sampler: Process,
    _agent: Process,
    _orchestrator: Process,
    port: u16,
    client: OrchestratorClient<AuthChannel>,
}

impl MeasuringHost {
    async fn start(trace: impl FnOnce(&Path) -> std::path::PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trace = trace(dir.path());
        let (sampler, sampler_port) = start_replay_sampler(dir.path(), &trace).await;
        let socket = dir.path().join("agent.sock");
        let agent = start_agent(&socket);
        let (orchestrator, port, mut client) = start_orchestrator(dir.path()).await;
        register_measured_host(&mut client, "local", &socket, sampler_port).await;
        Self {
            _dir: dir,
            _sampler: sampler,
            _agent: agent,
            _orchestrator: orchestrator,
            port,
            client,
        }
    }

    /// One whose sampler replays examples/power/llm-inference.csv.
    async fn replaying_llm_inference() -> Self {
        Self::start(|_| repo_root().join("examples/power/llm-inference.csv")).await
    }

    /// Submits `manifest`, waits for its `runs` to succeed; the campaign id
    /// and its runs.
    async fn run_to_end(&mut self, manifest: String, runs: u64) -> (String, Vec<Run>) {
        let campaign = submit(&mut self.client, &manifest).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        wait_succeeded(&mut self.client, &campaign.id, runs, deadline).await;
        let runs = self
            .client
            .list_runs(ListRunsRequest {
                campaign_id: campaign.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .runs;
        (campaign.id, runs)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_measured_run_records_its_energy_and_results_aggregate_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_sampler, sampler_port) = start_llm_inference_sampler(dir.path()).await;

    let socket = dir.path().join("agent.sock");
    let _agent = start_agent(&socket);
    let (_orchestrator, port, mut client) = start_orchestrator(dir.path()).await;

    // A host without a power sampler cannot take a campaign that measures power.
    client
        .register_host(RegisterHostRequest {
            name: "no-sampler".into(),
            address: format!("unix://{}", socket.display()),
            ..Default::default()
        })
        .await
        .unwrap();
    let manifest = "name: energy\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: short}, {name: long}]\ncycles: 2\n\
                    run: {command: [sh, -c, 'sleep 0.2; echo ''{\"ok\": 1}''']}\npower: {enabled: true, rate_hz: 200, work_metric: ok}\n";
    let campaign = submit(&mut client, manifest).await;
    let now = wait_campaign(
        &mut client,
        &campaign.id,
        Duration::from_secs(30),
        "waiting for a power sampler",
        |c| c.status_message.contains("has no power sampler"),
    )
    .await;
    assert_eq!(now.state, CampaignState::Pending as i32);

    register_measured_host(&mut client, "no-sampler", &socket, sampler_port).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_succeeded(&mut client, &campaign.id, 4, deadline).await;
    let runs = client
        .list_runs(ListRunsRequest {
            campaign_id: campaign.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    for run in &runs {
        assert!(!run.energy.is_empty(), "{} has no energy", run.id);
        // The run's figures derived by the orchestrator: its energy over all
        // devices, and that over the work its result counts (`ok`: 1).
        let total: f64 = run.energy.iter().filter_map(|e| e.energy_j).sum();
        assert_eq!(run.energy_j, Some(total), "{run:?}");
        assert_eq!(run.joules_per_unit, Some(total), "{run:?}");
        for energy in &run.energy {
            assert!(energy.replay, "replayed readings must say so: {energy:?}");
            let joules = energy.energy_j.expect("every device gave readings");
            assert!(
                joules > 0.0 && energy.mean_w > 0.0 && energy.samples > 5,
                "{energy:?}"
            );
            // 0.2 s of a trace drawing tens of watts: joules ≈ mean power × time.
            let implied_seconds = joules / energy.mean_w;
            assert!(
                (0.1..2.0).contains(&implied_seconds),
                "energy and power disagree: {energy:?}"
            );
        }
    }
    for run in &runs {
        assert!(
            run.power_samples > 0 && !run.power_series_truncated,
            "{} stored no full power series: {run:?}",
            run.id
        );
        let series = stored_series(&mut client, &run.id, "", 7).await;
        assert_eq!(series.len() as u64, run.power_samples, "{}", run.id);
        assert_eq!(
            stored_series(&mut client, &run.id, "", 0).await,
            series,
            "pages of 7 and of the default size disagree"
        );
        for energy in &run.energy {
            let of_device: Vec<&RunPowerSample> = series
                .iter()
                .filter(|s| s.device == energy.device)
                .collect();
            let filtered = stored_series(&mut client, &run.id, &energy.device, 50).await;
            assert_eq!(filtered.len(), of_device.len(), "{}", energy.device);
            assert!(
                of_device
                    .windows(2)
                    .all(|pair| elapsed_seconds(pair[0]) <= elapsed_seconds(pair[1])),
                "{}: samples out of time order",
                energy.device
            );
            // The summary was computed from these very samples: its own
            // method over the stored series gives the same joules.
            assert_eq!(of_device.len() as u64, energy.samples, "{}", run.id);
            let same_method = match energy.method.as_str() {
                "counter" => counter_rise(&of_device),
                _ => integrated_power(&of_device),
            };
            let joules = energy.energy_j.expect("every device gave readings");
            assert!(
                (same_method - joules).abs() <= 1e-6 * joules,
                "{}: {same_method} J from the series vs {joules} J recorded",
                run.id,
            );
            // Power integrated over ~40 readings of a varying load follows
            // the counter only roughly (each reading stands for its interval).
            let integrated = integrated_power(&of_device);
            assert!(
                (integrated - joules).abs() <= 0.15 * joules,
                "{}: {integrated} J integrated vs {joules} J recorded",
                run.id,
            );
        }
    }
    // `berth series` prints the whole series, a line per sample.
    let printed = std::process::Command::new(bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{port}"),
            "series",
            &runs[0].id,
        ])
        .output()
        .expect("run berth series");
    let csv = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{csv}{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    assert_eq!(
        csv.lines().count() as u64,
        runs[0].power_samples + 1,
        "a header and a line per sample:\n{csv}"
    );

    let unknown = client
        .get_run_power_series(GetRunPowerSeriesRequest {
            run_id: format!("{}/nope/b/1", campaign.id),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    let results = results_of(&mut client, &campaign.id).await;
    let campaign = results.campaign.as_ref().expect("the campaign");
    assert_eq!(campaign.work_metric, "ok", "stored at submit");
    for row in &results.results {
        let per_unit = row
            .metrics
            .iter()
            .find(|m| m.name == "joules_per_ok")
            .expect("joules_per_ok aggregated");
        assert_eq!(per_unit.n, 2, "{row:?}");
        let energy = row
            .metrics
            .iter()
            .find(|m| m.name == "energy_j")
            .expect("energy_j aggregated");
        assert_eq!(energy.n, 2, "{row:?}");
        assert_eq!(row.runs_without_energy, 0, "{row:?}");
        assert!(
            row.metrics.iter().any(|m| m.name == "mean_power_w"),
            "{row:?}"
        );
    }
}

fn interval(run: &Run) -> (SystemTime, SystemTime) {
    let start = run.started_at.and_then(|t| SystemTime::try_from(t).ok());
    let end = run.finished_at.and_then(|t| SystemTime::try_from(t).ok());
    (
        start.expect("a finished run has its start"),
        end.expect("a finished run has its end"),
    )
}

fn overlap(a: &Run, b: &Run) -> bool {
    let ((a_start, a_end), (b_start, b_end)) = (interval(a), interval(b));
    a_start < b_end && b_start < a_end
}

/// The host declares two GPUs (CI has none: `agent.declared_gpus` stands in
/// for NVML). Host processes see every GPU, so a run that measures power
/// there must have the host to itself among GPU users, while runs that do
/// not measure share the GPUs with each other.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_measures_power_has_its_gpus_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (_sampler, sampler_port) = start_llm_inference_sampler(dir.path()).await;
    let socket = dir.path().join("agent.sock");
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        "[[agent.declared_gpus]]\nindex = 0\nuuid = \"GPU-test-0\"\nname = \"declared test GPU\"\nmemory_bytes = 85899345920\n\n\
         [[agent.declared_gpus]]\nindex = 1\nuuid = \"GPU-test-1\"\nname = \"declared test GPU\"\nmemory_bytes = 85899345920\n",
    )
    .unwrap();
    let _agent = start_agent_with(&socket, &["--config", agent_config.to_str().unwrap()]);
    wait_for(&format!("unix://{}", socket.display())).await;
    let (_orchestrator, _, mut client) = start_orchestrator(dir.path()).await;
    let host = register_measured_host(&mut client, "gpu-host", &socket, sampler_port).await;
    assert_eq!(host.gpu_count, 2, "{host:?}");
    assert_eq!(
        host.gpus
            .iter()
            .map(|g| g.uuid.as_str())
            .collect::<Vec<_>>(),
        ["GPU-test-0", "GPU-test-1"]
    );

    let campaign = |name: &str, power: bool| {
        format!(
            "name: {name}\nbackends: [{{name: b, runtime: process}}]\nconfigs: [{{name: c}}]\ncycles: 4\n\
             run: {{command: [sh, -c, 'sleep 0.3; echo {{\"ok\": 1}}']}}\npower: {{enabled: {power}, rate_hz: 50}}\n"
        )
    };
    let mut ids = Vec::new();
    for (name, power) in [
        ("sharing-1", false),
        ("measuring", true),
        ("sharing-2", false),
    ] {
        let submitted = submit(&mut client, &campaign(name, power)).await;
        ids.push(submitted.id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut runs = Vec::new();
    for id in &ids {
        wait_succeeded(&mut client, id, 4, deadline).await;
        let listed = client
            .list_runs(ListRunsRequest {
                campaign_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .runs;
        runs.push(listed);
    }
    let (sharing_1, measuring, sharing_2) = (&runs[0], &runs[1], &runs[2]);
    for measured in measuring {
        assert!(!measured.energy.is_empty(), "{} has no energy", measured.id);
        for other in sharing_1.iter().chain(sharing_2) {
            assert!(
                !overlap(measured, other),
                "{} used the GPUs while {} measured their power: {:?} vs {:?}",
                other.id,
                measured.id,
                interval(other),
                interval(measured)
            );
        }
    }
    assert!(
        sharing_1
            .iter()
            .any(|a| sharing_2.iter().any(|b| overlap(a, b))),
        "runs that do not measure power share the GPUs (they ran one after another)"
    );
}

/// With `power.idle_baseline` each run's energy above the baseline is
/// recorded per device, derived for the run (`energy_net_j`, net joules per
/// unit of work), aggregated beside the gross figures, and exported by
/// `berth results --runs`; the protocol's gap spaces the runs and its rise
/// time gives each device a steady-state figure.
#[tokio::test(flavor = "multi_thread")]
async fn net_energy_above_the_idle_baseline_is_recorded_aggregated_and_exported() {
    let mut host = MeasuringHost::replaying_llm_inference().await;
    let manifest = "name: net-energy\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: one}]\ncycles: 2\n\
                    run: {command: [sh, -c, 'sleep 0.2; echo ''{\"ok\": 2}''']}\n\
                    power: {enabled: true, rate_hz: 200, work_metric: ok, idle_baseline: 200ms,\n\
                    protocol: {gap: {min: 400ms, max: 400ms}, rise_time: 50ms}}\n";
    let (campaign_id, runs) = host.run_to_end(manifest.into(), 2).await;
    // The protocol's gap: the second run starts 400 ms (and its idle
    // baseline) after the first ended.
    let (first, second) = (interval(&runs[0]), interval(&runs[1]));
    let (earlier, later) = if first.0 < second.0 {
        (first, second)
    } else {
        (second, first)
    };
    let pause = later.0.duration_since(earlier.1).unwrap_or_default();
    assert!(pause >= Duration::from_millis(400), "{pause:?}");
    for run in &runs {
        for energy in &run.energy {
            let steady = energy
                .steady_mean_w
                .expect("steady-state power past the rise time");
            assert!(
                steady > 0.0 && energy.energy_steady_j.unwrap() > 0.0,
                "{energy:?}"
            );
        }
        let per_device: Vec<f64> = run
            .energy
            .iter()
            .map(|e| e.energy_net_j.expect("a net figure per device"))
            .collect();
        let net = run.energy_net_j.expect("the run's net energy");
        assert!(
            (net - per_device.iter().sum::<f64>()).abs() < 1e-9,
            "{run:?}"
        );
        assert!(net < run.energy_j.unwrap(), "net below gross: {run:?}");
        assert_eq!(run.joules_per_unit_net, Some(net / 2.0), "{run:?}");
    }
    let results = results_of(&mut host.client, &campaign_id).await;
    let row = &results.results[0];
    for name in [
        "energy_j",
        "energy_net_j",
        "joules_per_ok",
        "net_joules_per_ok",
    ] {
        let metric = row.metrics.iter().find(|m| m.name == name);
        assert_eq!(metric.map(|m| m.n), Some(2), "{name} in {row:?}");
    }
    let exported = std::process::Command::new(bin("berth"))
        .args([
            "--orchestrator",
            &format!("http://127.0.0.1:{}", host.port),
            "results",
            &campaign_id,
            "--runs",
            "--format",
            "json",
        ])
        .output()
        .expect("run berth results --runs");
    let text = String::from_utf8_lossy(&exported.stdout);
    assert!(exported.status.success(), "{text}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("JSON rows");
    assert_eq!(rows.len(), 2, "{text}");
    for row in &rows {
        let net = row["energy_net_j"].as_f64().expect("energy_net_j exported");
        let per_unit = row["net_joules_per_ok"]
            .as_f64()
            .expect("net_joules_per_ok exported");
        assert!((per_unit - net / 2.0).abs() < 1e-9, "{row}");
    }
}

/// `power.protocol.thermal_gate`: a run waits until its device is cool
/// enough; when `max_wait` passes first it runs anyway, flagged `hot_start`.
#[tokio::test(flavor = "multi_thread")]
async fn the_thermal_gate_waits_for_a_cool_device_or_flags_a_hot_start() {
    // `hot` stays at 80 °C; `cycling` is at 80 °C for 2 s, then 40 °C for 2 s.
    let mut host = MeasuringHost::start(|dir| {
        let trace = dir.join("temperatures.csv");
        std::fs::write(
            &trace,
            "time_s,device,power_w,energy_j,temperature_c\n\
             0.0,hot,100,0,80\n4.0,hot,100,400,80\n\
             0.0,cycling,100,0,80\n2.0,cycling,100,200,40\n4.0,cycling,100,400,40\n",
        )
        .unwrap();
        trace
    })
    .await;
    let campaign = |device: &str, max_wait: &str| {
        format!(
            "name: gate-{device}\nbackends: [{{name: b, runtime: process}}]\nconfigs: [{{name: one}}]\ncycles: 2\n\
             run: {{command: [sh, -c, 'echo {{\"ok\": 1}}']}}\n\
             power: {{enabled: true, rate_hz: 50, devices: ['replay:{device}'],\n\
             protocol: {{thermal_gate: {{below_c: 50, max_wait: {max_wait}}}}}}}\n"
        )
    };
    let flags = |runs: &[Run]| -> Vec<Vec<String>> {
        runs.iter()
            .map(|run| run.energy[0].quality_flags.clone())
            .collect()
    };
    let started = Instant::now();
    let (_, hot) = host.run_to_end(campaign("hot", "1s"), 2).await;
    let took = started.elapsed();
    let hot = flags(&hot);
    assert!(
        hot.iter()
            .all(|flags| flags.iter().any(|f| f == "hot_start")),
        "{hot:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "each run waited 1 s: {took:?}"
    );
    let (_, cooled) = host.run_to_end(campaign("cycling", "10s"), 2).await;
    let cooled = flags(&cooled);
    assert!(
        cooled
            .iter()
            .all(|flags| flags.iter().all(|f| f != "hot_start")),
        "the gate waited for the cool phase: {cooled:?}"
    );
}

/// Every run records what its host reported of the settings that decide an
/// energy figure (kernel, CPU policy, GPUs, what it runs from); where hosts
/// differ (here their GPUs: CI has none, `agent.declared_gpus` stands in for
/// NVML and the test says so), the results flag it and `berth results`
/// prints it, and the per-run export carries the provenance columns.
#[tokio::test(flavor = "multi_thread")]
async fn each_run_records_its_provenance_and_differences_between_hosts_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let (_orchestrator, port, mut client) = start_orchestrator(dir.path()).await;
    let mut agents = Vec::new();
    for (host, gpu) in [("host-a", "declared GPU A"), ("host-b", "declared GPU B")] {
        let socket = dir.path().join(format!("{host}.sock"));
        let config = dir.path().join(format!("{host}.toml"));
        std::fs::write(
            &config,
            format!(
                "[[agent.declared_gpus]]\nindex = 0\nuuid = \"GPU-{host}\"\nname = \"{gpu}\"\nmemory_bytes = 1073741824\n"
            ),
        )
        .unwrap();
        agents.push(start_agent_with(
            &socket,
            &["--config", config.to_str().unwrap()],
        ));
        wait_for(&format!("unix://{}", socket.display())).await;
        client
            .register_host(RegisterHostRequest {
                name: host.into(),
                address: format!("unix://{}", socket.display()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let manifest = "name: provenance\n\
                    backends:\n  - {name: a, runtime: process, placement: {host: host-a}}\n  \
                    - {name: b, runtime: process, placement: {host: host-b}}\n\
                    configs: [{name: c}]\ncycles: 2\nrun: {command: [sh, -c, 'echo {\"ok\": 1}']}\n";
    let campaign = submit(&mut client, manifest).await;
    wait_succeeded(
        &mut client,
        &campaign.id,
        4,
        Instant::now() + Duration::from_secs(60),
    )
    .await;
    let runs = client
        .list_runs(ListRunsRequest {
            campaign_id: campaign.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for run in &runs {
        let provenance = run.provenance.as_ref().expect("provenance with every run");
        assert_eq!(provenance.kernel, kernel.trim(), "{run:?}");
        // A process backend is the host environment itself: no image.
        assert_eq!(provenance.image, "", "{provenance:?}");
        assert!(!provenance.berth_version.is_empty() && !provenance.cpu_model.is_empty());
        let expected = if run.host == "host-a" {
            "declared GPU A"
        } else {
            "declared GPU B"
        };
        assert_eq!(provenance.gpus.len(), 1, "{provenance:?}");
        assert_eq!(provenance.gpus[0].name, expected);
        assert!(
            provenance
                .unknown
                .iter()
                .any(|why| why.contains("agent.declared_gpus")),
            "declared GPUs say their settings are unknown: {:?}",
            provenance.unknown
        );
    }
    let results = results_of(&mut client, &campaign.id).await;
    assert_eq!(
        results.provenance_differences,
        ["gpus[0].name: declared GPU A on host-a (2 runs), declared GPU B on host-b (2 runs)"]
    );
    let berth = |args: &[&str]| {
        let output = std::process::Command::new(bin("berth"))
            .args(["--orchestrator", &format!("http://127.0.0.1:{port}")])
            .args(args)
            .output()
            .expect("run berth");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{text}");
        text
    };
    let table = berth(&["results", &campaign.id]);
    assert!(
        table.contains("provenance differs between runs")
            && table.contains("gpus[0].name: declared GPU A on host-a"),
        "{table}"
    );
    let exported = berth(&["results", &campaign.id, "--runs", "--format", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&exported).expect("JSON rows");
    assert_eq!(rows.len(), 4, "{exported}");
    for row in &rows {
        assert_eq!(row["provenance.kernel"], kernel.trim(), "{row}");
        assert!(
            row["gpu0.name"]
                .as_str()
                .unwrap()
                .starts_with("declared GPU"),
            "{row}"
        );
    }
}

/// `power.idle_baseline_every`: the idle baseline is measured on the host
/// by the first run only and subtracted from the next ones (each says the
/// idle power it subtracted and how old it was), so they do not wait for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_s_idle_baseline_is_measured_once_and_reused_within_its_period() {
    let mut host = MeasuringHost::replaying_llm_inference().await;
    let manifest = "name: host-baseline\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: one}]\ncycles: 3\n\
                    run: {command: [sh, -c, 'sleep 0.2; echo ''{\"ok\": 1}''']}\n\
                    power: {enabled: true, rate_hz: 200, idle_baseline: 600ms, idle_baseline_every: 1h}\n";
    let (_, mut runs) = host.run_to_end(manifest.into(), 3).await;
    runs.sort_by_key(|run| run.cycle);
    let waited = |run: &Run| {
        let (start, end) = interval(run);
        let wall = end.duration_since(start).unwrap_or_default();
        let duration = run.duration.map_or(Duration::ZERO, |d| {
            Duration::new(d.seconds as u64, d.nanos as u32)
        });
        wall.saturating_sub(duration)
    };
    let first = &runs[0];
    assert!(
        waited(first) >= Duration::from_millis(600),
        "{:?}",
        waited(first)
    );
    for later in &runs[1..] {
        assert!(
            waited(later) < Duration::from_millis(600),
            "run {} waited {:?}: its baseline should have been the host's",
            later.cycle,
            waited(later)
        );
    }
    for (run, fresh) in runs.iter().zip([true, false, false]) {
        assert!(!run.energy.is_empty(), "{run:?}");
        for (device, first_device) in run.energy.iter().zip(&first.energy) {
            assert_eq!(
                device.idle_baseline_w, first_device.idle_baseline_w,
                "{device:?}"
            );
            let age = device.idle_baseline_age_s.expect("the baseline's age");
            assert_eq!(age == 0.0, fresh, "{device:?}");
            let (gross, net) = (device.energy_j.unwrap(), device.energy_net_j.unwrap());
            assert!(net < gross, "{device:?}");
        }
        assert!(run.energy_net_j.is_some(), "{run:?}");
    }
}
