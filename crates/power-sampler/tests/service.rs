//! The power sampler served in-process on 127.0.0.1:0 and driven through its
//! generated gRPC client: a replayed trace, a fake RAPL tree (with a counter
//! wrap), NVML made absent on purpose, and the bad inputs.

use std::net::SocketAddr;
use std::time::Duration;

use berth_power_sampler::fake_powercap::{FakePowercap, FakeZone};
use berth_power_sampler::{Config, SamplerConfig};
use berth_proto::power::v1::power_sampler_client::PowerSamplerClient;
use berth_proto::power::v1::{
    DeviceEnergy, ExportFormat, ExportSeriesRequest, GetSeriesRequest, ListDevicesRequest, Sample,
    SessionSummary, SourceKind, StartSessionRequest, StopSessionRequest, StreamSamplesRequest,
};
use berth_server::{RunningService, ServerConfig, error_reason};
use parquet::file::reader::{FileReader, SerializedFileReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// The replayed trace: gpu0 at a constant power with its energy counter,
/// gpu1 at another constant power with no counter; a row every millisecond.
const GPU0_W: f64 = 250.0;
const GPU1_W: f64 = 100.0;
const ROW_PERIOD_S: f64 = 0.001;
const RAPL_RANGE_UJ: u64 = 262_143_328_850;
const RAPL_START_UJ: u64 = 5_000_000;
const MISSING_NVML: &str = "/nonexistent/libnvidia-ml.so.1";

struct Harness {
    running: RunningService,
    client: PowerSamplerClient<Channel>,
    tree: FakePowercap,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

fn trace() -> String {
    let mut text = String::from("time_s,device,power_w,energy_j\n");
    for row in 0..=10_000 {
        let t = f64::from(row) * ROW_PERIOD_S;
        text.push_str(&format!("{t},gpu0,{GPU0_W},{}\n", GPU0_W * t));
        text.push_str(&format!("{t},gpu1,{GPU1_W},\n"));
    }
    text
}

async fn harness(max_sessions: usize) -> Harness {
    harness_with_trace(max_sessions, "constant", &trace()).await
}

/// gpu0's power rises from RAMP_START_W by RAMP_W_PER_S, a row every
/// RAMP_ROW_S, with its exact integral as the counter, for 200 s (the trace
/// plays from the service's start, parsing included: it must not loop
/// during a test, even a slow one).
const RAMP_START_W: f64 = 100.0;
const RAMP_W_PER_S: f64 = 1000.0;
const RAMP_ROW_S: f64 = 0.01;

fn ramp_power(t: f64) -> f64 {
    RAMP_START_W + RAMP_W_PER_S * t
}

/// The ramp's energy from trace time `from` to `to`, integrated by hand.
fn ramp_energy(from: f64, to: f64) -> f64 {
    RAMP_START_W * (to - from) + RAMP_W_PER_S * (to * to - from * from) / 2.0
}

/// The trace time of a ramp reading (to the row).
fn ramp_time(power_w: f64) -> f64 {
    (power_w - RAMP_START_W) / RAMP_W_PER_S
}

fn ramp_trace() -> String {
    let mut text = String::from("time_s,device,power_w,energy_j\n");
    for row in 0..=20_000 {
        let t = f64::from(row) * RAMP_ROW_S;
        text.push_str(&format!(
            "{t},gpu0,{},{}\n",
            ramp_power(t),
            ramp_energy(0.0, t)
        ));
    }
    text
}

/// A service whose replay source `name` plays `trace`.
async fn harness_with_trace(max_sessions: usize, name: &str, trace: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join(format!("{name}.csv"));
    std::fs::write(&trace_path, trace).unwrap();
    let powercap = dir.path().join("powercap");
    std::fs::create_dir(&powercap).unwrap();
    let tree = FakePowercap::create(
        &powercap,
        &[
            FakeZone {
                dir: "intel-rapl:0",
                name: "package-0",
                energy_uj: RAPL_START_UJ,
                max_energy_range_uj: RAPL_RANGE_UJ,
            },
            FakeZone {
                dir: "intel-rapl:0:2",
                name: "dram",
                energy_uj: 1,
                max_energy_range_uj: RAPL_RANGE_UJ,
            },
        ],
    )
    .unwrap();
    let config = Config {
        server: ServerConfig::with_defaults("127.0.0.1:0", "127.0.0.1:0"),
        sampler: SamplerConfig {
            nvml_library: MISSING_NVML.into(),
            powercap_root: powercap,
            replay_traces: vec![trace_path],
            max_sessions,
            ..SamplerConfig::default()
        },
    };
    let running = berth_power_sampler::start(config).await.unwrap();
    let http = running.http_addr.unwrap();
    let client = PowerSamplerClient::connect(running.grpc_uri())
        .await
        .unwrap();
    Harness {
        running,
        client,
        tree,
        http,
        _dir: dir,
    }
}

fn start(devices: &[&str], rate_hz: f64) -> StartSessionRequest {
    StartSessionRequest {
        run_id: "run-1".into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        rate_hz,
        idle_baseline: None,
    }
}

async fn stop(client: &mut PowerSamplerClient<Channel>, id: &str) -> SessionSummary {
    client
        .stop_session(StopSessionRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

fn device<'a>(summary: &'a SessionSummary, id: &str) -> &'a DeviceEnergy {
    summary.devices.iter().find(|d| d.device == id).unwrap()
}

fn seconds(duration: Option<prost_types::Duration>) -> f64 {
    let d = duration.unwrap();
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} vs {expected} (±{tolerance})"
    );
}

/// The next sample of a live stream, within a generous time.
async fn next_sample(stream: &mut Streaming<Sample>) -> Option<Sample> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a sample within 10 s")
        .unwrap()
}

/// The value of a metric line from the service's /metrics endpoint.
async fn metric(http: SocketAddr, line_start: &str) -> Option<f64> {
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls a metric until it has `expected`, for up to 10 s.
async fn wait_for_metric(http: SocketAddr, line_start: &str, expected: f64) {
    for _ in 0..200 {
        if metric(http, line_start).await == Some(expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{line_start} never reached {expected}: {:?}",
        metric(http, line_start).await
    );
}

#[tokio::test]
async fn health_devices_and_what_is_missing() {
    let mut h = harness(16).await;
    let channel = Channel::from_shared(h.running.grpc_uri())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "berth.power.v1.PowerSampler".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let devices = h
        .client
        .list_devices(ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = devices.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "rapl:package-0",
            "rapl:package-0/dram",
            "replay:gpu0",
            "replay:gpu1"
        ]
    );
    let gpu0 = &devices.devices[2];
    assert_eq!(gpu0.source, SourceKind::Replay as i32);
    assert!(gpu0.has_energy_counter && gpu0.has_power);
    assert!(!devices.devices[3].has_energy_counter);
    assert!(
        devices.unavailable["nvml"].contains(MISSING_NVML),
        "{:?}",
        devices.unavailable
    );

    // NVML is absent: its devices are UNAVAILABLE, alone or with others,
    // and the other sources keep working (the sessions below).
    for asked in [vec!["nvml:0"], vec!["replay:gpu0", "nvml:0"]] {
        let status = h
            .client
            .start_session(start(&asked, 100.0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("nvml:0") && status.message().contains(MISSING_NVML));
    }
    let session = h
        .client
        .start_session(start(&["replay:gpu0"], 100.0))
        .await
        .unwrap()
        .into_inner();
    assert!(session.replay);
    stop(&mut h.client, &session.id).await;
    h.running.stop().await.unwrap();
}

#[tokio::test]
async fn replay_session_summary_series_and_exports() {
    let mut h = harness(16).await;
    let session = h
        .client
        .start_session(start(&["replay:gpu0", "replay:gpu1"], 200.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.devices, ["replay:gpu0", "replay:gpu1"]);
    assert_eq!(session.rate_hz, 200.0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let summary = stop(&mut h.client, &session.id).await;
    assert!(!summary.series_truncated);

    let gpu0 = device(&summary, "replay:gpu0");
    let span = seconds(gpu0.span);
    assert!(gpu0.replay && gpu0.samples >= 2, "{gpu0:?}");
    // Constant power: the trapezoid is exact; the counter moves in 1 ms rows,
    // so it may be off by a row at each end.
    assert_close(
        gpu0.energy_integrated_j.unwrap(),
        GPU0_W * span,
        1e-9,
        "integrated",
    );
    let counter_tolerance = 2.0 * GPU0_W * ROW_PERIOD_S;
    assert_close(
        gpu0.energy_counter_j.unwrap(),
        GPU0_W * span,
        counter_tolerance,
        "counter",
    );
    assert_close(gpu0.peak_w, GPU0_W, 0.0, "peak");
    assert!(gpu0.coverage > 0.0 && gpu0.coverage <= 1.0);
    assert!(span <= seconds(summary.duration));

    let gpu1 = device(&summary, "replay:gpu1");
    assert_eq!(gpu1.energy_counter_j, None);
    assert_close(gpu1.mean_w, GPU1_W, 1e-9, "gpu1 mean");
    // Its readings never change.
    assert_eq!(gpu1.distinct_readings, 1);

    // The stored series, in pages of 7, is what the summary counted.
    let mut samples = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = h
            .client
            .get_series(GetSeriesRequest {
                session_id: session.id.clone(),
                device: "replay:gpu0".into(),
                page_size: 7,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.samples.len() <= 7);
        samples.extend(page.samples);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(samples.len() as u64, gpu0.samples);
    assert!(
        samples
            .iter()
            .all(|s| s.device == "replay:gpu0" && s.replay)
    );
    let elapsed: Vec<f64> = samples.iter().map(|s| seconds(s.elapsed)).collect();
    assert!(elapsed.windows(2).all(|w| w[0] < w[1]), "monotonic");
    assert_close(elapsed[elapsed.len() - 1] - elapsed[0], span, 1e-9, "span");
    // The rate achieved, counted here: the samples stored and the time from
    // the first to the last. The schedule never runs ahead of the 200 Hz
    // asked (a late first read can make it look a period faster).
    let counted_rate = (samples.len() - 1) as f64 / (elapsed[elapsed.len() - 1] - elapsed[0]);
    assert_close(gpu0.achieved_rate_hz, counted_rate, 1e-6, "rate");
    assert!(
        counted_rate <= 200.0 * (1.0 + 1.0 / (samples.len() as f64 - 2.0).max(1.0)) + 1e-9,
        "{counted_rate} Hz from a 200 Hz schedule"
    );
    let changes = samples
        .windows(2)
        .filter(|w| w[0].energy_j != w[1].energy_j)
        .count();
    assert_eq!(gpu0.distinct_readings, 1 + changes as u64);
    let first = samples[0].energy_j.unwrap();
    let last = samples[samples.len() - 1].energy_j.unwrap();
    assert_close(
        gpu0.energy_counter_j.unwrap(),
        last - first,
        1e-9,
        "counter vs series",
    );

    // Exports hold every sample of both devices.
    let total = (gpu0.samples + gpu1.samples) as usize;
    let csv = export(&mut h.client, &session.id, ExportFormat::Csv).await;
    let text = String::from_utf8(csv).unwrap();
    assert_eq!(text.lines().count(), total + 1);
    assert!(
        text.starts_with(r#""device","time","elapsed_s","power_w""#),
        "{text}"
    );
    let parquet = export(&mut h.client, &session.id, ExportFormat::Parquet).await;
    let reader = SerializedFileReader::new(bytes::Bytes::from(parquet)).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows() as usize, total);
    h.running.stop().await.unwrap();
}

async fn export(
    client: &mut PowerSamplerClient<Channel>,
    id: &str,
    format: ExportFormat,
) -> Vec<u8> {
    let mut stream = client
        .export_series(ExportSeriesRequest {
            session_id: id.into(),
            format: format as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        file.extend(chunk.data);
    }
    file
}

#[tokio::test]
async fn idle_baseline_is_measured_first_and_subtracted() {
    // gpu0 on a rising ramp: the baseline, measured first, is lower than
    // any power of the window after it, so the net energy is positive and
    // known from the trace alone.
    let mut h = harness_with_trace(16, "ramp", &ramp_trace()).await;
    let mut request = start(&["replay:gpu0"], 100.0);
    request.idle_baseline = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let asked = std::time::Instant::now();
    let session = h.client.start_session(request).await.unwrap().into_inner();
    // The baseline began after the call was made and ended before it
    // returned.
    let call = asked.elapsed().as_secs_f64();
    assert_eq!(seconds(session.idle_baseline), 0.2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let summary = stop(&mut h.client, &session.id).await;
    let gpu0 = device(&summary, "replay:gpu0");
    let series = h
        .client
        .get_series(GetSeriesRequest {
            session_id: session.id.clone(),
            device: "replay:gpu0".into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .samples;
    assert_eq!(series.len() as u64, gpu0.samples);
    // Where in the trace the window was, read from the powers it saw.
    let first = ramp_time(series[0].power_w.unwrap());
    let last = ramp_time(series[series.len() - 1].power_w.unwrap());
    let window = last - first;
    assert!(window > 0.1, "{window}");
    let energy = ramp_energy(first, last);
    assert_close(gpu0.energy_counter_j.unwrap(), energy, 1e-6, "counter");
    // The baseline lay in the trace between (first sample - call - one
    // sampling period) and the first sample: its mean power between the
    // ramp's powers there, a row either way.
    let row = RAMP_W_PER_S * RAMP_ROW_S;
    let baseline_w = gpu0.idle_baseline_w.unwrap();
    let (lowest, highest) = (
        ramp_power(first - call - 0.01) - row,
        ramp_power(first) + row,
    );
    assert!(
        (lowest..=highest).contains(&baseline_w),
        "baseline {baseline_w} W outside {lowest}..{highest} W"
    );
    let net = gpu0.energy_net_j.unwrap();
    let (least, most) = (energy - highest * window, energy - lowest * window);
    assert!(
        least > 0.0 && (least..=most).contains(&net),
        "net {net} J outside {least}..{most} J (window {window} s, energy {energy} J)"
    );
    h.running.stop().await.unwrap();
}

#[tokio::test]
async fn rapl_session_counts_across_a_counter_wrap() {
    let mut h = harness(16).await;
    let session = h
        .client
        .start_session(start(&["rapl:package-0"], 200.0))
        .await
        .unwrap()
        .into_inner();
    assert!(!session.replay);
    let mut live = h
        .client
        .stream_samples(StreamSamplesRequest {
            session_id: session.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Wait until the sampler has seen each value before writing the next.
    let near_top = RAPL_RANGE_UJ - 1_000_000;
    let wrapped = 2_000_000;
    for energy_uj in [RAPL_START_UJ, near_top, wrapped] {
        if energy_uj != RAPL_START_UJ {
            h.tree.set_energy("intel-rapl:0", energy_uj).unwrap();
        }
        let expected = energy_uj as f64 / 1e6;
        loop {
            let sample = next_sample(&mut live).await.expect("the session is open");
            assert_eq!(sample.device, "rapl:package-0");
            assert!(!sample.replay);
            if sample.energy_j == Some(expected) {
                break;
            }
        }
    }
    let summary = stop(&mut h.client, &session.id).await;
    // The stream ends with the session.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async {
            while live.message().await.unwrap().is_some() {}
        })
        .await
        .is_ok()
    );

    let package = device(&summary, "rapl:package-0");
    let expected_uj = (near_top - RAPL_START_UJ) + (wrapped + RAPL_RANGE_UJ - near_top);
    assert_close(
        package.energy_counter_j.unwrap(),
        expected_uj as f64 / 1e6,
        1e-6,
        "counter",
    );
    assert_eq!(
        package.energy_integrated_j, None,
        "RAPL power is derived from the counter"
    );
    assert!(package.peak_w > 0.0);
    // Three values were written, and the sampler saw each.
    assert_eq!(package.distinct_readings, 3);
    h.running.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_costs_nothing_afterwards() {
    let mut h = harness(16).await;
    let session = h
        .client
        .start_session(start(&["replay:gpu0"], 100.0))
        .await
        .unwrap()
        .into_inner();
    let mut live = h
        .client
        .stream_samples(StreamSamplesRequest {
            session_id: session.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(next_sample(&mut live).await.is_some());
    wait_for_metric(h.http, "berth_power_live_streams ", 1.0).await;
    drop(live);
    wait_for_metric(h.http, "berth_power_live_streams ", 0.0).await;

    // With its last session stopped, a source sleeps.
    wait_for_metric(
        h.http,
        "berth_power_sampler_rate_hz{source=\"replay:constant\"}",
        100.0,
    )
    .await;
    stop(&mut h.client, &session.id).await;
    wait_for_metric(
        h.http,
        "berth_power_sampler_rate_hz{source=\"replay:constant\"}",
        0.0,
    )
    .await;
    h.running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_naming_the_value() {
    let mut h = harness(2).await;
    let c = &mut h.client;

    let status = c
        .start_session(start(&["replay:nope"], 0.0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("replay:nope") && status.message().contains("replay:gpu0"));

    for rate in [1e6, -5.0, 0.5] {
        let status = c
            .start_session(start(&["replay:gpu0"], rate))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{rate}");
        assert!(
            status.message().contains(&format!("rate_hz = {rate}")),
            "{}",
            status.message()
        );
    }

    let mut long_baseline = start(&["replay:gpu0"], 0.0);
    long_baseline.idle_baseline = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    let status = c.start_session(long_baseline).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("idle_baseline"));

    let status = c
        .stop_session(StopSessionRequest {
            id: "no-such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("no-such"));
    // The reason travels over the real connection, for callers to match on.
    assert_eq!(error_reason(&status), Some("unknown_session"));

    // Two open sessions is the limit here; a third is refused.
    let a = c
        .start_session(start(&["replay:gpu0"], 0.0))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .start_session(start(&["rapl:package-0"], 0.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.rate_hz, SamplerConfig::default().default_rate_hz);
    let status = c.start_session(start(&[], 0.0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("limit is 2"));
    assert_eq!(error_reason(&status), Some("too_many_sessions"));

    let status = c
        .get_series(GetSeriesRequest {
            session_id: a.id.clone(),
            ..GetSeriesRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "an open session has no stored series yet"
    );

    stop(c, &a.id).await;
    let status = c
        .stop_session(StopSessionRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&a.id) && status.message().contains("already stopped"));

    let status = c
        .stream_samples(StreamSamplesRequest {
            session_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    let bad_pages = [
        (10_001, String::new(), "page_size = 10001"),
        (10, "zz".to_string(), "page_token `zz`"),
    ];
    for (page_size, page_token, expected) in bad_pages {
        let status = c
            .get_series(GetSeriesRequest {
                session_id: a.id.clone(),
                device: String::new(),
                page_size,
                page_token,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(expected), "{}", status.message());
    }
    let status = c
        .get_series(GetSeriesRequest {
            session_id: a.id.clone(),
            device: "rapl:package-0".into(),
            ..GetSeriesRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let status = c
        .export_series(ExportSeriesRequest {
            session_id: a.id.clone(),
            format: ExportFormat::Unspecified as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // With one stopped, there is room again.
    let c2 = c.start_session(start(&[], 0.0)).await.unwrap().into_inner();
    assert_eq!(c2.devices.len(), 4, "no devices asked: all of them");
    stop(c, &b.id).await;
    stop(c, &c2.id).await;
    h.running.stop().await.unwrap();
}
