//! The sampler's own CPU cost: CPU time per wall second while one session
//! records at 100 Hz and at 1 kHz, on the replay source and on RAPL (a fake
//! powercap tree with a package and a DRAM zone), beside seed 004's Python
//! polling loop (`scripts/power/poll_loop.py`) reading the same counter files
//! at the same rate, in the same run.
//!
//!     cargo bench -p berth-power-sampler --bench sampler_cost
//!
//! `BENCH_SECONDS` sets the length of each measurement (default 10).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_power_sampler::clock::Clock;
use berth_power_sampler::fake_powercap::{FakePowercap, FakeZone};
use berth_power_sampler::metrics::SourceMetrics;
use berth_power_sampler::recorder::{RecordedDevice, Recorder};
use berth_power_sampler::sampler::Sampler;
use berth_power_sampler::source::{RaplSource, ReplaySource, Source};
use nix::sys::resource::{UsageWho, getrusage};

/// CPU and wall time of one measurement, and the readings it took.
struct Cost {
    cpu: Duration,
    wall: Duration,
    ticks: f64,
}

impl Cost {
    fn core_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn achieved_hz(&self) -> f64 {
        self.ticks / self.wall.as_secs_f64()
    }

    fn cpu_us_per_tick(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ticks.max(1.0)
    }
}

fn process_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_micros((t.tv_sec() * 1_000_000 + t.tv_usec()) as u64)
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

/// One session recording every device of `source` at `rate_hz`, as the
/// service runs it: the sampling thread feeds the session's recorder and the
/// live ring. The main thread only sleeps, so the process's CPU time is the
/// sampler's.
fn measure_rust(source: Box<dyn Source>, rate_hz: f64, length: Duration) -> Cost {
    let clock = Clock::start();
    let metrics = SourceMetrics::default();
    let devices: Vec<RecordedDevice> = source
        .devices()
        .iter()
        .enumerate()
        .map(|(index, info)| RecordedDevice {
            sampler: 0,
            index: index as u16,
            integrate: info.has_power,
            counter_range_j: info.counter_range_j,
        })
        .collect();
    let device_count = devices.len() as f64;
    let sampler = Sampler::spawn(0, source, clock, metrics.clone(), 1024).expect("sampler thread");
    let recorder = Arc::new(Recorder::new(
        &devices,
        rate_hz,
        clock.now(),
        false,
        10_000_000,
    ));
    std::thread::sleep(Duration::from_millis(100));

    let (cpu0, wall0) = (process_cpu(), Instant::now());
    sampler.subscribe(rate_hz, recorder.clone());
    std::thread::sleep(length);
    sampler.unsubscribe(&recorder);
    let (cpu, wall) = (process_cpu() - cpu0, wall0.elapsed());
    let recording = recorder.close(clock.now());
    assert!(!recording.series.is_empty(), "the session recorded nothing");
    Cost {
        cpu,
        wall,
        ticks: metrics.samples.get() as f64 / device_count,
    }
}

fn measure_python(root: &Path, rate_hz: f64, length: Duration) -> Cost {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/power/poll_loop.py");
    let output = Command::new("python3")
        .arg(&script)
        .args(["--root", &root.display().to_string()])
        .args(["--rate", &rate_hz.to_string()])
        .args(["--seconds", &length.as_secs_f64().to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    // {"cpu_s": …, "wall_s": …, "devices": …, "samples": …, "achieved_hz": …}
    let field = |name: &str| -> f64 {
        let start = text.find(&format!("\"{name}\": ")).expect(name) + name.len() + 4;
        let rest = &text[start..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end].trim().parse().expect(name)
    };
    Cost {
        cpu: Duration::from_secs_f64(field("cpu_s")),
        wall: Duration::from_secs_f64(field("wall_s")),
        ticks: field("samples") / field("devices"),
    }
}

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let length = Duration::from_secs_f64(seconds);
    let dir = tempfile::tempdir().expect("temp dir");
    let range = 262_143_328_850;
    let tree = FakePowercap::create(
        dir.path(),
        &[
            FakeZone {
                dir: "intel-rapl:0",
                name: "package-0",
                energy_uj: 1_000_000,
                max_energy_range_uj: range,
            },
            FakeZone {
                dir: "intel-rapl:0:2",
                name: "dram",
                energy_uj: 1_000_000,
                max_energy_range_uj: range,
            },
        ],
    )
    .expect("fake powercap tree");
    let trace =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/power/llm-inference.csv");

    println!("sampler CPU cost, {seconds} s per row; % of one core = CPU time / wall time");
    println!(
        "{:>7}  {:<38} {:>9} {:>11} {:>12}",
        "rate", "sampler", "% core", "achieved", "CPU/tick"
    );
    for rate_hz in [100.0, 1000.0] {
        let replay = ReplaySource::open(&trace).expect("the example trace");
        let rapl = RaplSource::open(tree.root()).expect("the fake tree");
        let rows = [
            (
                "berth, replay (1 device)",
                measure_rust(Box::new(replay), rate_hz, length),
            ),
            (
                "berth, RAPL (2 zones)",
                measure_rust(Box::new(rapl), rate_hz, length),
            ),
            (
                "python seed-004 loop, RAPL (2 zones)",
                measure_python(tree.root(), rate_hz, length),
            ),
        ];
        for (name, cost) in &rows {
            println!(
                "{:>5} Hz  {:<38} {:>8.3}% {:>8.1} Hz {:>9.1} µs",
                rate_hz,
                name,
                cost.core_percent(),
                cost.achieved_hz(),
                cost.cpu_us_per_tick()
            );
        }
        let (rapl, python) = (&rows[1].1, &rows[2].1);
        println!(
            "{:>5} Hz  python / berth on RAPL: {:.1}x the CPU per second, {:.1}x the CPU per reading",
            rate_hz,
            python.core_percent() / rapl.core_percent(),
            python.cpu_us_per_tick() / rapl.cpu_us_per_tick()
        );
    }
}
