//! `berth report` and `berth compare` against real campaigns: orchestrator,
//! agent (process runs) and the power sampler's replay source; the report
//! opened in headless Chromium (a part: skipped loudly without it, a
//! failure under CI) as a browser would, offline: no request in its NetLog,
//! no console message, every plot drawn, a 1280×900 screenshot whose pixels
//! show plots (kept in target/report/ with the HTML, for CI's artifacts). The
//! orchestrator's `GET /campaigns/{id}/report` serves the same page.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::*;
use berth_tests::campaign::{Client, submit, wait_campaign, wait_ended, wait_succeeded};
use berth_tests::{
    Part, Process, bin, free_port, http_get, register_measured_host, require_part, start_agent,
    start_llm_inference_sampler, start_orchestrator, wait_for,
};

/// An orchestrator with one agent registered as `local` (with the replay
/// power sampler), its gRPC port and its HTTP address.
struct Stack {
    client: Client,
    port: u16,
    http: String,
    dir: tempfile::TempDir,
    _processes: Vec<Process>,
}

async fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let (sampler, sampler_port) = start_llm_inference_sampler(dir.path()).await;
    let socket = dir.path().join("agent.sock");
    let agent = start_agent(&socket);
    let port = free_port();
    let http = format!("127.0.0.1:{}", free_port());
    let orchestrator =
        start_orchestrator(dir.path(), port, &[&format!("server.http_listen={http}")]);
    let mut client = OrchestratorClient::new(wait_for(&format!("http://127.0.0.1:{port}")).await);
    wait_for(&format!("unix://{}", socket.display())).await;
    register_measured_host(&mut client, "local", &socket, sampler_port).await;
    Stack {
        client,
        port,
        http,
        dir,
        _processes: vec![sampler, agent, orchestrator],
    }
}

/// A campaign of two configurations: `fast` (0.2 s, latency ~10 ms) and
/// `slow` (`slow_sleep` s, latency ~`slow_base` × 100 µs). The latency the
/// runs report is the base times a fixed per-cycle pattern, so two campaigns
/// with the same base measure the same values and a base 20% higher is
/// exactly 20% more; the durations are real. Cycle 2 of `fast` fails its first attempt once
/// (a marker file in `dir`) and is retried; the result also carries a
/// string field, which is no metric.
fn manifest(name: &str, slow_sleep: &str, slow_base: u32, power: bool, dir: &Path) -> String {
    let marker = dir.join(format!("{name}-failed-once"));
    format!(
        r#"name: {name}
backends: [{{name: b, runtime: process}}]
configs:
  - {{name: fast, params: {{sleep: "0.2", base: 100}}}}
  - {{name: slow, params: {{sleep: "{slow_sleep}", base: {slow_base}}}}}
cycles: 5
warmup: {{runs: 1}}
failure: {{retries: 1}}
run:
  command:
    - sh
    - -c
    - |
      if [ "$BERTH_CONFIG" = fast ] && [ "$BERTH_CYCLE" = 2 ] && [ "$BERTH_WARMUP" = 0 ] && [ ! -e {marker} ]; then
        touch {marker}; echo 'flaky once' >&2; exit 3
      fi
      sleep {{{{sleep}}}}
      echo "{{\"tokens\": 50, \"latency_us\": $(( {{{{base}}}} * (100 + BERTH_CYCLE * 7 % 5) )), \"model\": \"smol\"}}"
power: {{enabled: {power}, rate_hz: 100, work_metric: tokens}}
"#,
        marker = marker.display()
    )
}

/// `berth --orchestrator … args…`.
fn berth(port: u16, args: &[&str]) -> Output {
    Command::new(bin("berth"))
        .arg("--orchestrator")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(args)
        .output()
        .expect("running berth")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The page without the time it was generated at, which two reads differ in.
fn without_generated_time(html: &str) -> String {
    const ROW: &str = "<td>report generated</td><td>";
    let start = html.find(ROW).expect("a report generated row") + ROW.len();
    let end = start + html[start..].find("</td>").unwrap();
    format!("{}{}", &html[..start], &html[end..])
}

/// Where the report and its screenshot are kept after the test (CI's artifacts).
fn artifacts() -> PathBuf {
    let dir = berth_tests::target_tmpdir()
        .parent()
        .expect("target dir")
        .join("report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium with the network made unreachable (so that the page
/// could not fetch anything even if it tried), the page's console on stderr,
/// and every request it makes in a NetLog at `net_log`.
fn chromium(args: &[&str], url: &str, net_log: &Path) -> Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",
        ])
        .arg(format!("--log-net-log={}", net_log.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("running chromium")
}

/// The URLs a `file://` page asked for over the network, from Chromium's
/// NetLog: requests whose network isolation key is the page's site (the
/// browser's own background requests have none, or Google's).
fn page_requests(net_log: &Path) -> Vec<String> {
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(net_log).expect("the NetLog")).expect("NetLog JSON");
    let events = log["events"].as_array().expect("NetLog events");
    let mut urls: Vec<String> = events
        .iter()
        .map(|event| &event["params"])
        .filter(|params| {
            params["network_isolation_key"]
                .as_str()
                .is_some_and(|key| key.starts_with("file://"))
        })
        .filter_map(|params| params["url"].as_str())
        .filter(|url| !url.starts_with("file:"))
        .map(String::from)
        .collect();
    urls.dedup();
    urls
}

/// The page's console messages Chromium logged.
fn console_messages(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| line.contains(":CONSOLE"))
        .map(String::from)
        .collect()
}

/// Checks the report as a file: nothing it could fetch.
fn assert_self_contained(html: &str) {
    let lower = html.to_ascii_lowercase();
    for marker in [
        "<script", "<link", "<img", "<iframe", "url(", "@import", " src=",
    ] {
        assert!(!lower.contains(marker), "the report has {marker}");
    }
    let urls = lower.matches("http://").count() + lower.matches("https://").count();
    let namespaces = lower
        .matches("xmlns=\"http://www.w3.org/2000/svg\"")
        .count();
    assert_eq!(urls, namespaces, "only the SVG namespace may be a URL");
}

/// Every plot in the rendered DOM: its SVG, with paths that draw something
/// and, unless it says "no data", axis labels.
fn plots(dom: &str) -> Vec<&str> {
    dom.split("<svg")
        .skip(1)
        .map(|s| s.split("</svg>").next().unwrap_or(""))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn report_of_a_power_campaign_reads_offline_in_chromium() {
    let mut stack = stack().await;
    let id = submit(
        &mut stack.client,
        &manifest("measured", "0.3", 120, true, stack.dir.path()),
    )
    .await
    .id;
    wait_succeeded(
        &mut stack.client,
        &id,
        12,
        Instant::now() + Duration::from_secs(90),
    )
    .await;

    let path = artifacts().join("report.html");
    let output = berth(stack.port, &["report", &id, "-o", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    for wanted in [
        "latency_us per configuration",
        "tokens_per_s per configuration",
        "joules_per_tokens per configuration",
        "Runs over time",
        "Power during",
        "Throughput against energy per unit of work",
        "Measurement quality",
    ] {
        assert!(html.contains(wanted), "the report lacks {wanted:?}");
    }
    // The string field is no metric; the retried run is listed.
    assert!(!html.contains("model per configuration"));
    let retried = format!("<td>{id}/fast/b/2</td><td>succeeded</td><td>2</td>");
    assert!(
        html.contains(&retried),
        "no {retried} in the failed and retried runs"
    );
    assert!(
        !html.contains("class=\"plot no-data\""),
        "every plot has data"
    );
    // The orchestrator's HTTP endpoint serves the same page.
    let (status, served) = http_get(&stack.http, &format!("/campaigns/{id}/report"), None).await;
    assert_eq!(status, 200, "{served}");
    assert!(
        without_generated_time(&served) == without_generated_time(&html),
        "the endpoint's page differs from berth report's:\n{served:.2000}"
    );

    if require_part(Part::Chromium).is_none() {
        return;
    }
    // The detectors first, on a page that does what the report must not.
    let net_log = stack.dir.path().join("net.json");
    let hostile = stack.dir.path().join("hostile.html");
    std::fs::write(
        &hostile,
        "<html><body><script>console.error('boom')</script><img src=\"http://example.invalid/x.png\"></body></html>",
    )
    .unwrap();
    let control = chromium(
        &["--dump-dom"],
        &format!("file://{}", hostile.display()),
        &net_log,
    );
    assert_eq!(
        page_requests(&net_log),
        ["http://example.invalid/x.png"],
        "{}",
        text(&control)
    );
    assert_eq!(console_messages(&control).len(), 1, "{}", text(&control));

    let url = format!("file://{}", path.display());
    let dumped = chromium(&["--dump-dom"], &url, &net_log);
    assert!(dumped.status.success(), "{}", text(&dumped));
    assert_eq!(
        page_requests(&net_log),
        Vec::<String>::new(),
        "network requests"
    );
    assert_eq!(
        console_messages(&dumped),
        Vec::<String>::new(),
        "console messages"
    );
    let dom = String::from_utf8_lossy(&dumped.stdout);
    let plots = plots(&dom);
    // 6 metrics, the timeline, 2 power series (one per config), the Pareto plot.
    assert!(plots.len() >= 10, "{} plots in the DOM", plots.len());
    for plot in &plots {
        assert!(
            plot.contains("<path") && !plot.contains(" d=\"\""),
            "empty path: {plot:.300}"
        );
        assert!(
            plot.contains("class=\"axis-label"),
            "no axis label: {plot:.300}"
        );
    }

    // The screenshot, and an empty page's shot the same way: the pixel
    // checks must tell them apart.
    let shot = artifacts().join("report.png");
    let blank_page = stack.dir.path().join("blank.html");
    std::fs::write(&blank_page, "<!DOCTYPE html><html><body></body></html>").unwrap();
    let blank_shot = stack.dir.path().join("blank.png");
    for (page, png) in [
        (url, &shot),
        (format!("file://{}", blank_page.display()), &blank_shot),
    ] {
        let screenshot = format!("--screenshot={}", png.display());
        let output = chromium(&["--window-size=1280,900", &screenshot], &page, &net_log);
        assert!(output.status.success(), "{}", text(&output));
    }
    let blank = Pixels::of(&blank_shot);
    assert_eq!(blank.not_white(), 0, "the empty page");
    assert_eq!(blank.first_plot_rows(), None, "the empty page");
    let report = Pixels::of(&shot);
    let not_white = report.not_white() as f64 / (1280.0 * 900.0);
    assert!(
        not_white > 0.02,
        "{:.2}% of pixels not white",
        not_white * 100.0
    );
    // The first plot (the first row with a plot's colour, its legend) and
    // the 100 rows below it: its dots, mean, interval, grid and axis.
    let (top, drawn) = report.first_plot_rows().expect("no plot colour on screen");
    assert!(drawn >= 40, "{drawn} of 100 rows drawn below y {top}");
}

/// A screenshot's pixels, as RGB.
struct Pixels {
    width: usize,
    rgb: Vec<[u8; 3]>,
}

impl Pixels {
    /// Decodes a 1280×900 PNG (8-bit RGB or RGBA, as Chromium writes them).
    fn of(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buffer).unwrap();
        assert_eq!(
            (frame.width, frame.height),
            (1280, 900),
            "{}",
            path.display()
        );
        assert_eq!(frame.bit_depth, png::BitDepth::Eight);
        let channels = match frame.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => panic!("{}: {other:?}", path.display()),
        };
        let rgb = buffer[..frame.buffer_size()]
            .chunks_exact(channels)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        Self { width: 1280, rgb }
    }

    fn not_white(&self) -> usize {
        self.rgb.iter().filter(|p| **p != [255, 255, 255]).count()
    }

    /// A plot's colour: saturated, where the page's text and tables are grey.
    fn coloured(p: &[u8; 3]) -> bool {
        p.iter().max().unwrap() - p.iter().min().unwrap() > 60
    }

    /// The first row holding a plot's colour, and how many of the 100 rows
    /// from it are not one colour across.
    fn first_plot_rows(&self) -> Option<(usize, usize)> {
        let rows: Vec<&[[u8; 3]]> = self.rgb.chunks_exact(self.width).collect();
        let top = rows.iter().position(|row| row.iter().any(Self::coloured))?;
        let drawn = rows[top..rows.len().min(top + 100)]
            .iter()
            .filter(|row| row.iter().any(|p| p != &row[0]))
            .count();
        Some((top, drawn))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn report_says_what_is_missing_rather_than_breaking() {
    let mut stack = stack().await;
    // An unknown campaign: a plain message, a failure exit.
    let output = berth(stack.port, &["report", "no-such-campaign"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("no campaign no-such-campaign on this orchestrator"),
        "{}",
        text(&output)
    );
    let (status, body) = http_get(&stack.http, "/campaigns/no-such-campaign/report", None).await;
    assert_eq!(
        (status, body.as_str()),
        (404, "campaign `no-such-campaign` not found\n")
    );

    // A campaign without power data: the power plots and tables say so.
    let id = submit(
        &mut stack.client,
        &manifest("unmeasured", "0.3", 120, false, stack.dir.path()),
    )
    .await
    .id;
    wait_succeeded(
        &mut stack.client,
        &id,
        12,
        Instant::now() + Duration::from_secs(90),
    )
    .await;
    let output = berth(stack.port, &["report", &id]);
    assert!(output.status.success(), "{}", text(&output));
    let html = String::from_utf8_lossy(&output.stdout);
    assert_self_contained(&html);
    assert!(
        html.contains("no data: the campaign&#39;s runs carry no power data"),
        "power"
    );
    assert!(
        html.contains("no data: no configuration has both joules_per_tokens"),
        "pareto"
    );
    assert!(
        html.contains("latency_us per configuration"),
        "metrics still plotted"
    );

    // A running campaign: the report says so and shows what exists.
    let slow = "name: long\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: only}]\ncycles: 3\n\
                run: {command: [sh, -c, 'sleep 60']}\n";
    let running = submit(&mut stack.client, slow).await.id;
    wait_campaign(
        &mut stack.client,
        &running,
        Duration::from_secs(30),
        "running a run",
        |c| c.runs.is_some_and(|r| r.running > 0),
    )
    .await;
    let output = berth(stack.port, &["report", &running]);
    assert!(output.status.success(), "{}", text(&output));
    let html = String::from_utf8_lossy(&output.stdout);
    assert!(html.contains("This campaign is still running"), "no banner");
    let (status, served) =
        http_get(&stack.http, &format!("/campaigns/{running}/report"), None).await;
    assert_eq!(status, 200, "{served}");
    assert!(
        served.contains("This campaign is still running") && served.contains("Runs over time"),
        "the endpoint's page of a running campaign: {served:.2000}"
    );
    assert!(
        html.contains("Runs over time"),
        "the timeline of what exists"
    );
    stack
        .client
        .cancel_campaign(CancelCampaignRequest {
            id: running.clone(),
        })
        .await
        .unwrap();
    wait_ended(&mut stack.client, &running, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn compare_flags_only_the_configuration_made_slower() {
    let mut stack = stack().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let a = submit(
        &mut stack.client,
        &manifest("before", "0.3", 100, false, stack.dir.path()),
    )
    .await
    .id;
    wait_succeeded(&mut stack.client, &a, 12, deadline).await;
    // `slow` 20% slower: its sleep and the latency it reports.
    let b = submit(
        &mut stack.client,
        &manifest("after", "0.36", 120, false, stack.dir.path()),
    )
    .await
    .id;
    wait_succeeded(&mut stack.client, &b, 12, deadline).await;

    let output = berth(stack.port, &["compare", &a, &b]);
    assert!(output.status.success(), "{}", text(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let row = |config: &str, metric: &str| {
        table
            .lines()
            .find(|l| l.starts_with(config) && l.split_whitespace().nth(1) == Some(metric))
            .unwrap_or_else(|| panic!("no {config} {metric} row in\n{table}"))
            .to_string()
    };
    let slow_latency = row("slow", "latency_us");
    assert!(
        slow_latency.contains("1.200 ") && slow_latency.contains("higher (significant)"),
        "{table}"
    );
    assert!(
        row("slow", "duration_s").contains("higher (significant)"),
        "{table}"
    );
    assert!(
        row("fast", "latency_us").contains("no significant change"),
        "{table}"
    );
    // Ranked by the size of the change: the slowed latency comes first.
    let first = table.lines().nth(4).unwrap_or_default();
    assert!(first.starts_with("slow"), "{table}");

    // The same comparison as a section of B's report (kept beside report.html).
    let path = artifacts().join("against.html");
    let output = berth(
        stack.port,
        &["report", &b, "--against", &a, "-o", path.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", text(&output));
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    assert!(
        html.contains("B/A per configuration and metric"),
        "no comparison plot"
    );
    assert!(
        html.contains(r#"<tr class="significant"><td>slow</td><td>latency_us</td>"#),
        "the slowed latency is not marked significant"
    );
    assert!(!html.contains(r#"<tr class="significant"><td>fast</td><td>latency_us</td>"#));

    // The CI gate: only the real regression fails it.
    let gate = |args: &[&str]| {
        let mut all = vec!["compare", a.as_str(), b.as_str()];
        all.extend(args);
        berth(stack.port, &all)
    };
    let failed = gate(&["--fail-on", "latency_us:+5%"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(
        text(&failed).contains("slow latency_us: +20.0%"),
        "{}",
        text(&failed)
    );
    for passes in [
        ["--fail-on", "latency_us:+30%"],
        ["--fail-on", "latency_us:-5%"],
        ["--fail-on", "tokens:+1%"],
    ] {
        let output = gate(&passes);
        assert!(output.status.success(), "{passes:?}: {}", text(&output));
    }
    let reversed = berth(
        stack.port,
        &["compare", &b, &a, "--fail-on", "latency_us:+5%"],
    );
    assert!(
        reversed.status.success(),
        "an improvement is no regression: {}",
        text(&reversed)
    );
    let typo = gate(&["--fail-on", "latncy_ms:+5%"]);
    assert!(
        !typo.status.success()
            && text(&typo).contains("no configuration of both campaigns measured latncy_ms")
    );
}

/// The page shows what the gRPC API guards, so the same token guards it.
#[tokio::test(flavor = "multi_thread")]
async fn report_endpoint_wants_the_api_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = format!("127.0.0.1:{}", free_port());
    let _orchestrator = start_orchestrator(
        dir.path(),
        port,
        &[&format!("server.http_listen={http}"), "auth.token=s3cret"],
    );
    wait_for(&format!("http://127.0.0.1:{port}")).await;
    let path = "/campaigns/unknown/report";
    assert_eq!(http_get(&http, path, None).await.0, 401);
    assert_eq!(http_get(&http, path, Some("Bearer wrong")).await.0, 401);
    assert_eq!(http_get(&http, path, Some("Bearer s3cret")).await.0, 404);
    // /metrics stays open, for scrapers.
    assert_eq!(http_get(&http, "/metrics", None).await.0, 200);
}
