//! Issue 15, end to end: hostile campaign manifests sent to a running
//! orchestrator over gRPC (the 10 × 10 grid and 200 KB of nested
//! brackets, a billion-laughs alias bomb, a 10 MB manifest) are each refused
//! in well under a second with the limit named, the orchestrator's memory
//! stays where it was, and a good manifest is accepted afterwards. A
//! manifest within every limit that still costs more CPU time than the
//! request budget is stopped and refused near that budget, and one more
//! costly request than `server.max_costly_requests` is refused at once.

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
    status_kib(pid, "VmRSS")
}

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("orchestrator status")
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
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
        // Past manifest.max_bytes (1 MiB) but within what the gRPC layer
        // reads (the limit and 64 KiB for the request's other fields).
        (
            "1 MiB + 32 KiB",
            format!(
                "{GOOD}description: '{}'\n",
                "x".repeat((1 << 20) + (32 << 10))
            ),
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

/// The CPU budget the orchestrator is started with for the budget test: the
/// costly manifest takes several times longer (seconds in a debug build).
const CPU_BUDGET: Duration = Duration::from_millis(300);
/// Most the costly manifest's work may add to the orchestrator's RSS while
/// it runs: what the configurations and runs built before the budget was
/// spent (~80 MiB in a debug build, docs/benchmarks.md).
const COSTLY_PEAK_BOUND_KIB: u64 = 256 << 10;

/// Within every `[manifest]` limit at its default, and costly: 5 parameters
/// of 10 values (100 000 configurations, the limit) × 10 cycles (1 000 000
/// runs, the limit), each configuration and run built before it is stored.
fn costly_manifest() -> String {
    let params: String = (0..5)
        .map(|p| format!("    p{p}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"))
        .collect();
    format!(
        "name: costly\ncycles: 10\nbackends: [{{name: l, runtime: process}}]\ngrid:\n  params:\n{params}run: {{command: [echo]}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_costly_manifest_within_the_limits_is_stopped_at_its_cpu_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let store = format!("store.path={}", dir.path().join("state.db").display());
    let budget = format!("{}ms", CPU_BUDGET.as_millis());
    let orchestrator = Process::spawn(
        "berth-orchestrator",
        &["--listen", &listen, "--http-listen", "", "--set", &store],
        &[
            ("BERTH_SERVER__REQUEST_CPU_BUDGET", budget.as_str()),
            ("BERTH_SERVER__MAX_COSTLY_REQUESTS", "1"),
        ],
    );
    let pid = orchestrator.child.id();
    let mut client = OrchestratorClient::new(wait_for(&format!("http://{listen}")).await);
    let submit = |manifest: String| SubmitCampaignRequest {
        manifest_yaml: manifest,
        source_name: "costly.yaml".into(),
        validate_only: false,
    };
    client
        .submit_campaign(SubmitCampaignRequest {
            validate_only: true,
            ..submit(GOOD.into())
        })
        .await
        .expect("a good manifest validates");
    let baseline = vm_rss_kib(pid);

    // Writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    let start = Instant::now();
    let costly = tokio::spawn({
        let mut client = client.clone();
        async move { client.submit_campaign(submit(costly_manifest())).await }
    });
    // A second costly request while the first is worked on is refused at
    // once: server.max_costly_requests is 1.
    tokio::time::sleep(CPU_BUDGET / 3).await;
    let busy_start = Instant::now();
    let busy = client
        .submit_campaign(submit(costly_manifest()))
        .await
        .expect_err("a second costly request at once");
    let busy_took = busy_start.elapsed();
    let status = costly
        .await
        .expect("the call")
        .expect_err("a manifest costlier than its budget");
    let elapsed = start.elapsed();
    let peak = status_kib(pid, "VmHWM").saturating_sub(baseline);
    let after = vm_rss_kib(pid) as i64 - baseline as i64;
    println!(
        "costly manifest ({} bytes, budget {budget}): {:?} in {:.1} ms, orchestrator RSS {baseline} KiB, peak +{peak} KiB, after {after:+} KiB: {}",
        costly_manifest().len(),
        status.code(),
        elapsed.as_secs_f64() * 1e3,
        status.message()
    );
    println!(
        "second costly manifest at once: {:?} in {:.1} ms: {}",
        busy.code(),
        busy_took.as_secs_f64() * 1e3,
        busy.message()
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("server.request_cpu_budget"),
        "{status:?}"
    );
    assert_eq!(
        berth_server::error_reason(&status),
        Some(berth_server::error::reasons::REQUEST_BUDGET_EXCEEDED)
    );
    assert!(
        elapsed < CPU_BUDGET + Duration::from_secs(1),
        "refused after {elapsed:?}"
    );
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    assert!(
        busy.message().contains("server.max_costly_requests"),
        "{busy:?}"
    );
    assert!(
        busy_took < Duration::from_millis(200),
        "busy after {busy_took:?}"
    );
    // What the expansion built before it was stopped: bounded by the
    // limits (and the budget), and given back once it is refused.
    assert!(peak < COSTLY_PEAK_BOUND_KIB, "peak RSS grew by {peak} KiB");
    assert!(
        after < RSS_GROWTH_BOUND_KIB as i64,
        "RSS stayed {after} KiB above where it was"
    );

    let campaign = client
        .submit_campaign(submit(GOOD.into()))
        .await
        .expect("a good manifest is accepted afterwards")
        .into_inner();
    assert_eq!(campaign.name, "good");
}
