//! Issue 15, end to end: hostile campaign manifests sent to a running
//! orchestrator over gRPC (the 10 × 10 grid and 200 KB of nested
//! brackets, a billion-laughs alias bomb, a 10 MB manifest) are each refused
//! in well under a second with the limit named, the orchestrator's memory
//! stays where it was, and a good manifest is accepted afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::SubmitCampaignRequest;
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_tests::{Process, free_port, wait_for};
use tonic::Code;

/// Longest a refusal may take. The figure asked for is 100 ms; a debug
/// build's unoptimized YAML parser walks an alias bomb several times slower
/// (each figure is printed).
const REFUSAL_BOUND: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(1)
} else {
    Duration::from_millis(100)
};
const RSS_GROWTH_BOUND_KIB: u64 = 50 * 1024;

const GOOD: &str = "name: good
backends: [{name: local, runtime: process}]
grid: {params: {size: [1, 2]}}
run: {command: [echo, '{{size}}']}
";

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("orchestrator status")
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// (name, manifest, expected code, what the message must name).
fn hostile_manifests() -> Vec<(&'static str, String, Code, &'static str)> {
    let grid: String = (0..10)
        .map(|p| format!("    p{p}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"))
        .collect();
    let grid = format!(
        "name: g\nbackends: [{{name: l, runtime: process}}]\ngrid:\n  params:\n{grid}run: {{command: [echo]}}\n"
    );
    let nested = format!(
        "name: n\nn: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut laughs = String::from("    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (name, previous) in "bcdefghi".chars().zip("abcdefgh".chars()) {
        let aliases = vec![format!("*{previous}"); 9].join(", ");
        laughs.push_str(&format!("    {name}: &{name} [{aliases}]\n"));
    }
    let laughs = format!(
        "name: l\nbackends: [{{name: l, runtime: process}}]\nrun: {{command: [echo]}}\ngrid:\n  params:\n{laughs}"
    );
    let huge = format!("{GOOD}description: '{}'\n", "x".repeat(10 << 20));
    vec![
        (
            "grid of 10 × 10",
            grid,
            Code::InvalidArgument,
            "manifest.max_configurations",
        ),
        (
            "200 KB of nested brackets",
            nested,
            Code::InvalidArgument,
            "manifest.max_depth",
        ),
        (
            "billion laughs",
            laughs,
            Code::InvalidArgument,
            "manifest.max_nodes",
        ),
        // Past the gRPC layer's request limit, refused before it is read.
        (
            "10 MB",
            huge,
            Code::OutOfRange,
            "decoded message length too large",
        ),
        // Past manifest.max_bytes but within what the gRPC layer reads.
        (
            "2 MB",
            format!("{GOOD}description: '{}'\n", "x".repeat(2 << 20)),
            Code::InvalidArgument,
            "manifest.max_bytes",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_manifests_refused_fast_leaving_memory_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = format!(
        "store.path={}",
        Path::new(dir.path()).join("state.db").display()
    );
    let orchestrator = Process::spawn(
        "berth-orchestrator",
        &["--listen", &listen, "--http-listen", "", "--set", &store],
        &[],
    );
    let pid = orchestrator.child.id();
    let mut client = OrchestratorClient::new(wait_for(&format!("http://{listen}")).await);
    let submit = |manifest: String, validate_only: bool| SubmitCampaignRequest {
        manifest_yaml: manifest,
        source_name: "hostile.yaml".into(),
        validate_only,
    };
    // Once, so that what the first call allocates is in the baseline.
    client
        .submit_campaign(submit(GOOD.into(), true))
        .await
        .expect("a good manifest validates");
    let baseline = vm_rss_kib(pid);

    for (name, manifest, code, limit) in hostile_manifests() {
        let bytes = manifest.len();
        let start = Instant::now();
        let status = client
            .submit_campaign(submit(manifest, false))
            .await
            .expect_err(name);
        let elapsed = start.elapsed();
        println!(
            "{name} ({bytes} bytes): {:?} in {:.1} ms, orchestrator RSS {:+} KiB: {}",
            status.code(),
            elapsed.as_secs_f64() * 1e3,
            vm_rss_kib(pid) as i64 - baseline as i64,
            status.message()
        );
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(limit), "{name}: {status:?}");
        assert!(elapsed < REFUSAL_BOUND, "{name} took {elapsed:?}");
    }

    let growth = vm_rss_kib(pid).saturating_sub(baseline);
    println!("orchestrator RSS growth: {growth} KiB");
    assert!(growth < RSS_GROWTH_BOUND_KIB, "RSS grew by {growth} KiB");
    let campaign = client
        .submit_campaign(submit(GOOD.into(), false))
        .await
        .expect("a good manifest is accepted afterwards")
        .into_inner();
    assert_eq!(campaign.name, "good");
}
