//! A campaign that measures energy per run: orchestrator → agent (process
//! runs) and the host's power sampler serving the replay source (CI has no
//! GPU, so the readings come from a recorded trace and say so).

use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::{Process, free_port, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn every_measured_run_records_its_energy_and_results_aggregate_it() {
    let dir = tempfile::tempdir().unwrap();
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/power/llm-inference.csv");
    let sampler_port = free_port();
    let sampler_config = dir.path().join("power.toml");
    std::fs::write(
        &sampler_config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{sampler_port}\"\nhttp_listen = \"\"\n\n[sampler]\nnvml = false\npowercap_root = \"\"\nreplay_traces = [\"{}\"]\n",
            trace.display()
        ),
    )
    .unwrap();
    let _sampler = Process::spawn(
        "berth-power-sampler",
        &["--config", sampler_config.to_str().unwrap()],
        &[],
    );
    wait_for(&format!("http://127.0.0.1:{sampler_port}")).await;

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
    let port = free_port();
    let store = format!("store.path={}", dir.path().join("state.db").display());
    let _orchestrator = Process::spawn(
        "berth-orchestrator",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "",
            "--set",
            &store,
        ],
        &[],
    );
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);

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
                    run: {command: [sh, -c, 'sleep 0.2; echo {\"ok\": 1}']}\npower: {enabled: true, rate_hz: 200}\n";
    let campaign = client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = client
            .get_campaign(GetCampaignRequest {
                id: campaign.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if now.status_message.contains("has no power sampler") {
            assert_eq!(now.state, CampaignState::Pending as i32);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "campaign never said why it waits: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    client
        .register_host(RegisterHostRequest {
            name: "no-sampler".into(),
            address: format!("unix://{}", socket.display()),
            power_sampler: format!("http://127.0.0.1:{sampler_port}"),
            ..Default::default()
        })
        .await
        .unwrap();
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
            assert_eq!(now.runs.unwrap().succeeded, 4, "{now:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "campaign never finished: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        for energy in &run.energy {
            assert!(energy.replay, "replayed readings must say so: {energy:?}");
            assert!(
                energy.energy_j > 0.0 && energy.mean_w > 0.0 && energy.samples > 5,
                "{energy:?}"
            );
            // 0.2 s of a trace drawing tens of watts: joules ≈ mean power × time.
            let implied_seconds = energy.energy_j / energy.mean_w;
            assert!(
                (0.1..2.0).contains(&implied_seconds),
                "energy and power disagree: {energy:?}"
            );
        }
    }
    let results = client
        .get_results(GetResultsRequest { id: campaign.id })
        .await
        .unwrap()
        .into_inner();
    for row in &results.results {
        let energy = row
            .metrics
            .iter()
            .find(|m| m.name == "energy_j")
            .expect("energy_j aggregated");
        assert_eq!(energy.n, 2, "{row:?}");
        assert!(
            row.metrics.iter().any(|m| m.name == "mean_power_w"),
            "{row:?}"
        );
    }
}
