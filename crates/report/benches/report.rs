//! How long `berth report` takes to write the HTML of a big campaign, and
//! how big the file is: 10,000 runs (100 configurations × 100 cycles on two
//! hosts, measured power) and the power series the report plots (one run per
//! configuration up to its limit), each ten minutes at 100 Hz. The data is
//! made here, so the figure is the rendering alone; fetching is the
//! orchestrator's paging (ListRuns, GetRunPowerSeries), measured elsewhere.
//!
//!     cargo bench -p berth-report --bench report

use std::time::Instant;

use berth_proto::orchestrator::v1::{
    Campaign, CampaignState, Run, RunEnergy, RunPowerSample, RunState,
};
use berth_report::{MAX_SERIES, ReportData, render, series_runs};
use prost_types::{Duration, Timestamp};

const CONFIGS: u32 = 100;
const CYCLES: u32 = 100;
const SERIES_SECONDS: u32 = 600;
const RATE_HZ: u32 = 100;

/// A deterministic wobble in [0, 1), so that values differ run to run.
fn wobble(i: u32) -> f64 {
    f64::from(i.wrapping_mul(2_654_435_761) % 1000) / 1000.0
}

fn runs() -> Vec<Run> {
    let mut runs = Vec::new();
    let start = 1_700_000_000i64;
    for cycle in 1..=CYCLES {
        for config in 0..CONFIGS {
            let sequence = (cycle - 1) * CONFIGS + config;
            let seconds = 2.0 + f64::from(config) / 50.0 + wobble(sequence) * 0.2;
            let tokens = 256.0;
            let energy = seconds * (150.0 + f64::from(config));
            let begin = start + i64::from(sequence) * 3 / 2;
            runs.push(Run {
                id: format!("big/c{config}/b/{cycle}"),
                campaign_id: "big".into(),
                config: format!("c{config}"),
                backend: "b".into(),
                cycle,
                state: RunState::Succeeded as i32,
                host: format!("gpu-{:02}", sequence % 2),
                attempts: 1,
                exit_code: Some(0),
                result_json: format!(
                    r#"{{"tokens": {tokens}, "latency_ms": {}, "model": "m"}}"#,
                    seconds * 1000.0 / tokens
                ),
                duration: Some(Duration {
                    seconds: seconds.trunc() as i64,
                    nanos: (seconds.fract() * 1e9) as i32,
                }),
                started_at: Some(Timestamp {
                    seconds: begin,
                    nanos: 0,
                }),
                finished_at: Some(Timestamp {
                    seconds: begin + seconds.ceil() as i64,
                    nanos: 0,
                }),
                sequence,
                energy: vec![RunEnergy {
                    device: "nvml:0".into(),
                    energy_j: Some(energy),
                    method: "counter".into(),
                    mean_w: energy / seconds,
                    peak_w: energy / seconds * 1.2,
                    samples: (seconds * f64::from(RATE_HZ)) as u64,
                    coverage: 0.99,
                    replay: false,
                    energy_net_j: Some(energy * 0.7),
                    ..Default::default()
                }],
                power_samples: u64::from(SERIES_SECONDS * RATE_HZ),
                energy_j: Some(energy),
                joules_per_unit: Some(energy / tokens),
                ..Default::default()
            });
        }
    }
    runs
}

fn series(run: &Run) -> (String, Vec<RunPowerSample>) {
    let samples = (0..SERIES_SECONDS * RATE_HZ)
        .map(|i| {
            let t = f64::from(i) / f64::from(RATE_HZ);
            RunPowerSample {
                device: "nvml:0".into(),
                time: None,
                elapsed: Some(Duration {
                    seconds: t.trunc() as i64,
                    nanos: (t.fract() * 1e9) as i32,
                }),
                power_w: Some(200.0 + 80.0 * (t / 7.0).sin() + 20.0 * wobble(i)),
                energy_j: Some(1e6 + 200.0 * t),
            }
        })
        .collect();
    (run.id.clone(), samples)
}

fn main() {
    let runs = runs();
    let series = series_runs(&runs).into_iter().map(series).collect();
    let campaign = Campaign {
        id: "big".into(),
        name: "big".into(),
        state: CampaignState::Succeeded as i32,
        work_metric: "tokens".into(),
        manifest_yaml: "name: big\n".into(),
        ..Default::default()
    };
    let data = ReportData::new(campaign, Vec::new(), runs, series);
    let mut best = f64::INFINITY;
    let mut size = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let html = render(&data);
        best = best.min(started.elapsed().as_secs_f64());
        size = html.len();
    }
    println!(
        "report of {} runs, {} series of {} samples: best of 5 {:.3} s, {:.2} MB",
        data.runs.len(),
        MAX_SERIES.min(data.series.len()),
        SERIES_SECONDS * RATE_HZ,
        best,
        size as f64 / 1e6
    );
}
