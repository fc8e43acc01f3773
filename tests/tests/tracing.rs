//! Observability end to end with the real binaries: an OTLP/gRPC trace
//! receiver started here collects what the orchestrator, the agent and the
//! power sampler export during a measured campaign (host-process backend,
//! replayed power readings), and each run must be one trace across the
//! three processes with its parent links intact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::RegisterHostRequest;
use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_tests::campaign::{Client, runs_of, submit, wait_succeeded};
use berth_tests::{Process, free_port, repo_root, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        string_attribute(&self.span.attributes, key)
    }
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

/// The OTLP collector's TraceService, keeping every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                kept.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a free port; the endpoint the services export to.
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }
}

/// The three services, exporting their traces to `endpoint` (empty: none),
/// the orchestrator with `settings` too; its client, and the processes.
struct Stack {
    client: Client,
    /// The orchestrator's gRPC address, `http://host:port`.
    address: String,
    /// The agent's HTTP port (its `/metrics`).
    agent_http: String,
    processes: Vec<Process>,
}

impl Stack {
    async fn start(dir: &Path, endpoint: &str, settings: &[&str]) -> Self {
        // Spans leave in batches every 100 ms, not the default 5 s, so the
        // test need not wait; SIGTERM flushes the rest.
        let env = [
            ("BERTH_SERVER__OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ];
        let sampler_port = free_port();
        let sampler_config = dir.join("power.toml");
        std::fs::write(
            &sampler_config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{sampler_port}\"\nhttp_listen = \"\"\n\n[sampler]\nnvml = false\npowercap_root = \"\"\nreplay_traces = [\"{}\"]\n",
                repo_root().join("examples/power/llm-inference.csv").display()
            ),
        )
        .unwrap();
        let sampler = Process::spawn(
            "berth-power-sampler",
            &["--config", sampler_config.to_str().unwrap()],
            &env,
        );
        let socket = dir.join("agent.sock");
        let agent_listen = format!("unix://{}", socket.display());
        let agent_http = format!("127.0.0.1:{}", free_port());
        let agent = Process::spawn(
            "berth-agent",
            &["--listen", &agent_listen, "--http-listen", &agent_http],
            &env,
        );
        let listen = format!("127.0.0.1:{}", free_port());
        let store = format!("store.path={}", dir.join("state.db").display());
        let mut args = vec!["--listen", &listen, "--set", &store];
        if !settings
            .iter()
            .any(|s| s.starts_with("server.http_listen="))
        {
            args.extend(["--http-listen", ""]);
        }
        for setting in settings {
            args.extend(["--set", setting]);
        }
        let orchestrator = Process::spawn("berth-orchestrator", &args, &env);
        let mut client = OrchestratorClient::new(wait_for(&format!("http://{listen}")).await);
        wait_for(&format!("http://127.0.0.1:{sampler_port}")).await;
        wait_for(&agent_listen).await;
        client
            .register_host(RegisterHostRequest {
                name: "local".into(),
                address: agent_listen,
                power_sampler: format!("http://127.0.0.1:{sampler_port}"),
                ..Default::default()
            })
            .await
            .expect("RegisterHost");
        Self {
            client,
            address: format!("http://{listen}"),
            agent_http,
            processes: vec![orchestrator, agent, sampler],
        }
    }

    /// SIGTERM to each, which flushes what its exporter still holds.
    fn stop(self) {
        for process in self.processes {
            let name = process.name.clone();
            assert_eq!(process.terminate(), Some(0), "{name} did not stop cleanly");
        }
    }
}

/// Two configs × two cycles of a short command, power measured: 4 runs.
const MEASURED: &str = "name: traced\nbackends: [{name: b, runtime: process}]\nconfigs: [{name: short}, {name: long}]\ncycles: 2\n\
                        run: {command: [sh, -c, 'sleep 0.1; echo ''{\"ok\": 1}''']}\npower: {enabled: true, rate_hz: 200, work_metric: ok}\n";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_run_is_one_trace_across_orchestrator_agent_and_power_sampler() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut stack = Stack::start(dir.path(), &endpoint, &[]).await;
    let campaign = submit(&mut stack.client, MEASURED).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_succeeded(&mut stack.client, &campaign.id, 4, deadline).await;
    let runs: BTreeSet<String> = runs_of(&mut stack.client, &campaign.id)
        .await
        .into_iter()
        .map(|run| run.id)
        .collect();
    assert_eq!(runs.len(), 4);
    stack.stop();

    // The run spans, one per run, as the orchestrator exported them.
    let run_spans = |spans: &[Received]| -> BTreeMap<String, Received> {
        spans
            .iter()
            .filter(|r| r.service == "berth-orchestrator" && r.span.name == "run")
            .filter_map(|r| Some((r.attribute("berth.run.id")?, r.clone())))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while run_spans(&receiver.spans()).len() < runs.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = receiver.spans();
    let by_run = run_spans(&spans);
    assert_eq!(
        by_run.keys().cloned().collect::<BTreeSet<_>>(),
        runs,
        "a run span per run"
    );

    let mut traces = BTreeSet::new();
    for (run_id, root) in &by_run {
        assert!(
            root.span.parent_span_id.is_empty(),
            "{run_id}: the run span is the root of its trace"
        );
        assert_eq!(
            root.attribute("berth.campaign.id"),
            Some(campaign.id.clone())
        );
        assert_eq!(
            root.attribute("berth.campaign.name").as_deref(),
            Some("traced")
        );
        assert_eq!(root.attribute("berth.backend").as_deref(), Some("b"));
        assert_eq!(root.attribute("berth.host").as_deref(), Some("local"));
        assert_eq!(root.attribute("berth.run.attempt").as_deref(), Some("1"));
        assert!(root.attribute("berth.config").is_some());
        let trace_id = root.span.trace_id.clone();
        assert!(traces.insert(trace_id.clone()), "{run_id} shares a trace");
        let trace: Vec<&Received> = spans
            .iter()
            .filter(|r| r.span.trace_id == trace_id)
            .collect();
        // Parent links intact: every span but the root has its parent in
        // the trace, whichever process sent it.
        let ids: BTreeMap<Vec<u8>, &Received> =
            trace.iter().map(|r| (r.span.span_id.clone(), *r)).collect();
        for received in &trace {
            if received.span.span_id == root.span.span_id {
                continue;
            }
            assert!(
                ids.contains_key(&received.span.parent_span_id),
                "{run_id}: span {} ({}) has parent {} outside its trace",
                received.span.name,
                received.service,
                hex(&received.span.parent_span_id)
            );
        }
        // The calls the run made, served in the other processes, are
        // children of the run span.
        let child_of_root = |service: &str, method: &str| {
            trace.iter().any(|r| {
                r.service == service
                    && r.span.parent_span_id == root.span.span_id
                    && r.attribute("rpc.method").as_deref() == Some(method)
            })
        };
        let services: BTreeSet<&str> = trace.iter().map(|r| r.service.as_str()).collect();
        assert!(
            child_of_root("berth-agent", "Exec"),
            "{run_id}: no agent Exec span under the run; trace's services: {services:?}"
        );
        for method in ["StartSession", "StopSession"] {
            assert!(
                child_of_root("berth-power-sampler", method),
                "{run_id}: no power sampler {method} span under the run; trace's services: {services:?}"
            );
        }
        assert!(
            trace.iter().any(
                |r| r.span.name == "store result" && r.span.parent_span_id == root.span.span_id
            ),
            "{run_id}: the stored result is in the run's trace"
        );
    }
}

/// `berth submit` with OpenTelemetry's `OTEL_EXPORTER_OTLP_ENDPOINT`: the
/// CLI's span `berth submit` is the parent of the orchestrator's
/// SubmitCampaign, and each run's trace (a root of its own) links to that
/// call, so a slow run leads back to the command that asked for it.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_s_submit_is_traced_and_each_run_links_to_it() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut stack = Stack::start(dir.path(), &endpoint, &[]).await;
    let manifest = dir.path().join("traced.yaml");
    std::fs::write(&manifest, MEASURED).unwrap();
    let submitted = std::process::Command::new(berth_tests::bin("berth"))
        .args(["--orchestrator", &stack.address, "submit", "--watch"])
        .arg(&manifest)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .expect("run berth submit");
    assert!(
        submitted.status.success(),
        "{}{}",
        String::from_utf8_lossy(&submitted.stdout),
        String::from_utf8_lossy(&submitted.stderr)
    );
    let campaigns = stack
        .client
        .list_campaigns(berth_proto::orchestrator::v1::ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .campaigns;
    let campaign = &campaigns[0];
    let runs = runs_of(&mut stack.client, &campaign.id).await;
    assert_eq!(runs.len(), 4);
    stack.stop();

    let deadline = Instant::now() + Duration::from_secs(15);
    let (cli, submit_call, run_spans) = loop {
        let spans = receiver.spans();
        let cli = spans
            .iter()
            .find(|r| r.service == "berth-cli" && r.span.name == "berth submit")
            .cloned();
        let submit_call = spans
            .iter()
            .find(|r| {
                r.service == "berth-orchestrator"
                    && r.attribute("rpc.method").as_deref() == Some("SubmitCampaign")
            })
            .cloned();
        let run_spans: Vec<Received> = spans
            .iter()
            .filter(|r| r.service == "berth-orchestrator" && r.span.name == "run")
            .cloned()
            .collect();
        if let (Some(cli), Some(submit_call)) = (&cli, &submit_call)
            && run_spans.len() >= runs.len()
        {
            break (cli.clone(), submit_call.clone(), run_spans);
        }
        assert!(
            Instant::now() < deadline,
            "after 15 s: CLI span {cli:?}, SubmitCampaign span {submit_call:?}, {} run spans",
            run_spans.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (&submit_call.span.trace_id, &submit_call.span.parent_span_id),
        (&cli.span.trace_id, &cli.span.span_id),
        "the orchestrator's SubmitCampaign is the CLI span's child"
    );
    for run in &run_spans {
        assert_ne!(
            run.span.trace_id, cli.span.trace_id,
            "a run is a trace of its own"
        );
        assert!(
            run.span.links.iter().any(|link| {
                link.trace_id == submit_call.span.trace_id
                    && link.span_id == submit_call.span.span_id
            }),
            "run {:?} does not link to the SubmitCampaign call: {:?}",
            run.attribute("berth.run.id"),
            run.span.links
        );
    }
}

/// Metrics as the exposition names them, each with its label names.
type MetricList = &'static [(&'static str, &'static [&'static str])];

/// The orchestrator's domain metrics, each as the exposition names it with
/// its label names: a rename or a new label is a deliberate change here.
const ORCHESTRATOR_METRICS: MetricList = &[
    ("berth_orchestrator_campaigns", &["state"]),
    ("berth_orchestrator_run_transitions_total", &["state"]),
    ("berth_orchestrator_run_attempts_total", &["outcome"]),
    (
        "berth_orchestrator_run_duration_seconds_bucket",
        &["le", "outcome"],
    ),
    (
        "berth_orchestrator_run_duration_seconds_count",
        &["outcome"],
    ),
    ("berth_orchestrator_run_duration_seconds_sum", &["outcome"]),
    ("berth_orchestrator_dispatch_seconds_bucket", &["le"]),
    ("berth_orchestrator_dispatch_seconds_count", &[]),
    ("berth_orchestrator_dispatch_seconds_sum", &[]),
    ("berth_orchestrator_hosts", &["status"]),
    ("berth_orchestrator_heartbeat_seconds_bucket", &["le"]),
    ("berth_orchestrator_heartbeat_seconds_count", &[]),
    ("berth_orchestrator_heartbeat_seconds_sum", &[]),
    ("berth_orchestrator_deployments", &["state"]),
    ("berth_orchestrator_replicas", &["state"]),
    ("berth_orchestrator_replica_restarts", &[]),
    // Only while a campaign has pending runs (checked with one queued).
    ("berth_orchestrator_queue_depth", &["backend"]),
    (
        "berth_orchestrator_run_energy_joules_bucket",
        &["le", "replayed"],
    ),
    ("berth_orchestrator_run_energy_joules_count", &["replayed"]),
    ("berth_orchestrator_run_energy_joules_sum", &["replayed"]),
];

/// The agent's domain metrics, as [`ORCHESTRATOR_METRICS`] lists the
/// orchestrator's.
const AGENT_METRICS: MetricList = &[
    ("berth_agent_workloads", &["runtime", "state"]),
    ("berth_agent_execs_in_flight", &[]),
    ("berth_agent_exec_start_seconds_bucket", &["le", "runtime"]),
    ("berth_agent_exec_start_seconds_count", &["runtime"]),
    ("berth_agent_exec_start_seconds_sum", &["runtime"]),
    ("berth_agent_restarts_total", &["reason"]),
    ("berth_agent_image_imports_total", &["runtime", "outcome"]),
];

/// Every service's counts of what became of its ended spans
/// (crates/server/src/span_export.rs).
const TRACE_EXPORT_METRICS: MetricList = &[
    ("berth_trace_spans_dropped_total", &[]),
    ("berth_trace_spans_exported_total", &[]),
    ("berth_trace_spans_export_failed_total", &[]),
];

/// The llm-proxy's metrics of the OpenTelemetry GenAI conventions, under
/// the names OpenTelemetry's Prometheus exporter gives them.
const GEN_AI_METRICS: MetricList = &[
    (
        "gen_ai_client_token_usage_bucket",
        &[
            "le",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_token_type",
        ],
    ),
    (
        "gen_ai_client_token_usage_count",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_token_type",
        ],
    ),
    (
        "gen_ai_client_token_usage_sum",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_token_type",
        ],
    ),
    (
        "gen_ai_client_operation_duration_seconds_bucket",
        &[
            "le",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "error_type",
        ],
    ),
    (
        "gen_ai_client_operation_duration_seconds_count",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "error_type",
        ],
    ),
    (
        "gen_ai_client_operation_duration_seconds_sum",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "error_type",
        ],
    ),
    (
        "gen_ai_server_time_to_first_token_seconds_bucket",
        &[
            "le",
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
        ],
    ),
    (
        "gen_ai_server_time_to_first_token_seconds_count",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
        ],
    ),
    (
        "gen_ai_server_time_to_first_token_seconds_sum",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
        ],
    ),
];

/// A scraped sample: its name, labels and value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A service's `/metrics`, as scraped.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    async fn of(http: &str) -> Self {
        let (status, text) = berth_tests::http_get(http, "/metrics", None).await;
        assert_eq!(status, 200, "{text}");
        let samples = parse_exposition(&text);
        Self { text, samples }
    }

    /// The names of the samples named `prefix…`, each checked to be in
    /// `list` with exactly its label names.
    fn listed(&self, prefix: &str, list: MetricList) -> BTreeSet<String> {
        let expected: BTreeMap<&str, BTreeSet<&str>> = list
            .iter()
            .map(|(name, labels)| (*name, labels.iter().copied().collect()))
            .collect();
        let mut seen = BTreeSet::new();
        for sample in self.samples.iter().filter(|s| s.name.starts_with(prefix)) {
            let labels: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            assert_eq!(
                expected.get(sample.name.as_str()),
                Some(&labels),
                "{} with labels {labels:?} is not in the list",
                sample.name
            );
            seen.insert(sample.name.clone());
        }
        seen
    }

    /// The value of the first sample `name` with (at least) `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
            .value
    }
}

fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key.to_string(), value.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("value of {line}")),
            }
        })
        .collect()
}

/// With the OTLP endpoint pointing at a port nobody listens on, a campaign
/// runs as it would untraced; after it, the orchestrator's `/metrics` holds
/// exactly the domain metrics of the list, with the campaign counted.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_collector_costs_nothing_and_metrics_count_the_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let setting = format!("server.http_listen={http}");
    let mut stack = Stack::start(dir.path(), &unreachable, &[&setting]).await;
    let started = Instant::now();
    let campaign = submit(&mut stack.client, MEASURED).await;
    // 4 runs of 0.1 s each; the exporter's retries must not hold them up.
    wait_succeeded(
        &mut stack.client,
        &campaign.id,
        4,
        started + Duration::from_secs(60),
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "the campaign took {took:?}");

    let scrape = Scrape::of(&http).await;
    let seen = scrape.listed("berth_orchestrator_", ORCHESTRATOR_METRICS);
    let missing: Vec<&&str> = ORCHESTRATOR_METRICS
        .iter()
        .map(|(name, _)| name)
        .filter(|n| !seen.contains(**n) && **n != "berth_orchestrator_queue_depth")
        .collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\n{}",
        scrape.text
    );
    let value = |name: &str, labels: &[(&str, &str)]| scrape.value(name, labels);
    let runs = 4.0;
    assert_eq!(
        value(
            "berth_orchestrator_run_transitions_total",
            &[("state", "succeeded")]
        ),
        runs
    );
    assert_eq!(
        value(
            "berth_orchestrator_run_transitions_total",
            &[("state", "dispatched")]
        ),
        runs
    );
    assert_eq!(
        value(
            "berth_orchestrator_run_attempts_total",
            &[("outcome", "succeeded")]
        ),
        runs
    );
    assert_eq!(
        value(
            "berth_orchestrator_run_duration_seconds_count",
            &[("outcome", "succeeded")]
        ),
        runs
    );
    assert_eq!(
        value("berth_orchestrator_dispatch_seconds_count", &[]),
        runs
    );
    assert_eq!(
        value(
            "berth_orchestrator_run_energy_joules_count",
            &[("replayed", "true")]
        ),
        runs
    );
    assert!(
        value(
            "berth_orchestrator_run_energy_joules_sum",
            &[("replayed", "true")]
        ) > 0.0
    );
    assert_eq!(
        value("berth_orchestrator_hosts", &[("status", "ready")]),
        1.0
    );
    assert_eq!(
        value("berth_orchestrator_hosts", &[("status", "unreachable")]),
        0.0
    );
    assert!(value("berth_orchestrator_heartbeat_seconds_count", &[]) >= 1.0);
    // The campaign ended: no unfinished ones.
    assert_eq!(
        value("berth_orchestrator_campaigns", &[("state", "running")]),
        0.0
    );
    assert_eq!(
        value("berth_orchestrator_replicas", &[("state", "running")]),
        0.0
    );

    // The spans of the campaign went to no collector: counted as failed
    // exports (every 100 ms here), none exported, none dropped (the queue
    // holds them all).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = Scrape::of(&http).await;
        assert_eq!(
            scrape.listed("berth_trace_", TRACE_EXPORT_METRICS).len(),
            TRACE_EXPORT_METRICS.len(),
            "{}",
            scrape.text
        );
        assert_eq!(scrape.value("berth_trace_spans_exported_total", &[]), 0.0);
        assert_eq!(scrape.value("berth_trace_spans_dropped_total", &[]), 0.0);
        if scrape.value("berth_trace_spans_export_failed_total", &[]) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed export counted\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The agent's: each run's exec timed, none left running.
    let agent = Scrape::of(&stack.agent_http).await;
    agent.listed("berth_agent_", AGENT_METRICS);
    agent.listed("berth_trace_", TRACE_EXPORT_METRICS);
    assert!(
        agent.value(
            "berth_agent_exec_start_seconds_count",
            &[("runtime", "process")]
        ) >= runs
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let in_flight = Scrape::of(&stack.agent_http)
            .await
            .value("berth_agent_execs_in_flight", &[]);
        if in_flight == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{in_flight} execs still in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A campaign with runs waiting: its backend's queue is exported.
    let queued = submit(
        &mut stack.client,
        "name: queued\nbackends: [{name: queued, runtime: process}]\nconfigs: [{name: c}]\ncycles: 20\n\
         run: {command: [sleep, '5']}\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = Scrape::of(&http).await;
        scrape.listed("berth_orchestrator_", ORCHESTRATOR_METRICS);
        let depth = scrape
            .samples
            .iter()
            .find(|s| {
                s.name == "berth_orchestrator_queue_depth"
                    && s.labels.get("backend").map(String::as_str) == Some("queued")
            })
            .map(|s| s.value);
        // 20 pending, then 19 once the first is dispatched.
        if matches!(depth, Some(d) if (19.0..=20.0).contains(&d)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue depth of `queued`: {depth:?}\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack
        .client
        .cancel_campaign(berth_proto::orchestrator::v1::CancelCampaignRequest { id: queued.id })
        .await
        .unwrap();
    stack.stop();
}

/// The alerting rules and the Grafana dashboard name only metrics the
/// services export (the lists above, checked against scrapes), so a rename
/// cannot silently empty an alert or a panel. A metric name is told from a
/// label name by its prefix (`gen_ai_client_…`, not `gen_ai_request_model`).
#[test]
fn monitoring_rules_and_dashboard_name_only_exported_metrics() {
    let lists: [(&str, MetricList); 5] = [
        ("berth_orchestrator_", ORCHESTRATOR_METRICS),
        ("berth_agent_", AGENT_METRICS),
        ("berth_trace_", TRACE_EXPORT_METRICS),
        ("gen_ai_client_", GEN_AI_METRICS),
        ("gen_ai_server_", GEN_AI_METRICS),
    ];
    for file in [
        "deploy/monitoring/rules.yml",
        "deploy/monitoring/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        for (prefix, list) in lists {
            let listed: BTreeSet<&str> = list.iter().map(|(name, _)| *name).collect();
            let named: BTreeSet<&str> = text
                .match_indices(prefix)
                .map(|(at, _)| {
                    let rest = &text[at..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    &rest[..end]
                })
                .collect();
            assert!(!named.is_empty(), "{file} names no {prefix}* metric");
            let unknown: Vec<&&str> = named.iter().filter(|n| !listed.contains(**n)).collect();
            assert!(unknown.is_empty(), "{file} names unexported {unknown:?}");
        }
    }
}

/// The real `promtool` (Debian's prometheus) accepts the monitoring
/// profile's rules (linted) and scrape config.
#[test]
fn promtool_accepts_the_monitoring_rules_and_config() {
    if berth_tests::parts::require_part(berth_tests::Part::Prometheus).is_none() {
        return;
    }
    let dir = repo_root().join("deploy/monitoring");
    for args in [
        ["check", "rules", "--lint=all", "rules.yml"].as_slice(),
        ["check", "config", "prometheus.yml"].as_slice(),
    ] {
        let checked = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            checked.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

/// A real HTTP/1 server between the llm-proxy and its upstream: it records
/// the `traceparent` of each request it is sent, and relays the request to
/// the upstream, one per connection (both answers say `connection: close`,
/// so the proxy's pool reuses none).
struct RecordingRelay {
    port: u16,
    traceparents: Arc<Mutex<Vec<String>>>,
}

impl RecordingRelay {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&traceparents);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    if let Err(error) = relay_one(client, upstream, &kept).await {
                        eprintln!("relay: {error}");
                    }
                });
            }
        });
        Self { port, traceparents }
    }

    fn traceparents(&self) -> Vec<String> {
        self.traceparents.lock().unwrap().clone()
    }
}

/// Relays one request (head and `content-length` body) and its answer.
async fn relay_one(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    traceparents: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        let read = client.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        received.extend_from_slice(&chunk[..read]);
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        assert!(received.len() < 1 << 20, "a request head over 1 MiB");
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let mut content_length = 0;
    let mut lines = Vec::new();
    for line in head.split("\r\n").filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().unwrap(),
            "traceparent" => traceparents.lock().unwrap().push(value.trim().to_string()),
            "connection" => continue,
            _ => {}
        }
        lines.push(line);
    }
    while received.len() < head_end + content_length {
        let read = client.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        received.extend_from_slice(&chunk[..read]);
    }
    let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let request = format!("{}\r\nconnection: close\r\n\r\n", lines.join("\r\n"));
    upstream.write_all(request.as_bytes()).await?;
    upstream.write_all(&received[head_end..]).await?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer).await?;
    let status_line_end = answer
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(answer.len(), |at| at + 2);
    client.write_all(&answer[..status_line_end]).await?;
    client.write_all(b"connection: close\r\n").await?;
    client.write_all(&answer[status_line_end..]).await?;
    client.shutdown().await
}

/// POSTs `body` as JSON to `addr` with `headers`; the status and the body.
async fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    // HTTP/1.0: the server closes after the answer and sends no chunks.
    let request = format!(
        "POST {path} HTTP/1.0\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    berth_tests::http_exchange(addr, &request).await
}

/// Until `GET path` on `addr` answers 200, within `limit`.
async fn wait_for_http(addr: &str, path: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && berth_tests::http_get(addr, path, None).await.0 == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} did not answer within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Until the receiver holds a span `matching`, within 15 s.
async fn span_where(receiver: &Receiver, matching: impl Fn(&Received) -> bool) -> Received {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(found) = receiver.spans().into_iter().find(&matching) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no such span among {:#?}",
            receiver
                .spans()
                .iter()
                .map(|r| (&r.service, &r.span.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A string-array attribute's values.
fn string_array(received: &Received, key: &str) -> Vec<String> {
    let value = received
        .span
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref());
    match value {
        Some(any_value::Value::ArrayValue(array)) => array
            .values
            .iter()
            .filter_map(|v| match v.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        other => panic!("{key} is {other:?}, not an array of strings"),
    }
}

/// The caller's trace and span, as a client sends them in `traceparent`.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The W3C trace-context test id with span `span`: `00-<trace>-<span>-01`.
fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

fn span_kind(received: &Received) -> opentelemetry_proto::tonic::trace::v1::span::SpanKind {
    opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(received.span.kind).unwrap()
}

/// A chat completion through the real berth-llm-proxy to llama.cpp's server
/// with SmolLM2, a recording relay between them: the proxy's spans reach
/// the OTLP receiver, its HTTP span the child of the caller's
/// `traceparent`, its GenAI span (`chat smollm2`) carrying the GenAI
/// conventions' attributes; the upstream receives a `traceparent` of the
/// same trace, the GenAI span's try its parent. A streamed completion with
/// a malformed `traceparent` starts a trace of its own, its span describing
/// the streamed answer, and the GenAI metrics (time to first token
/// included) are exported as listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_chat_completion_is_one_trace_from_the_caller_to_the_upstream() {
    let Some((python, gguf)) =
        berth_tests::require(berth_tests::Part::LlmPeers, berth_tests::llm::llama_cpp())
    else {
        return;
    };
    let (receiver, endpoint) = Receiver::start().await;
    let llama_port = free_port();
    let llama = Process {
        child: std::process::Command::new(python)
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1"])
            .args(["--n_ctx", "2048", "--model_alias", "smollm2"])
            .arg("--model")
            .arg(gguf)
            .args(["--port", &llama_port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting llama_cpp.server"),
        name: "llama_cpp.server".into(),
    };
    let relay = RecordingRelay::start(llama_port).await;
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        format!(
            "model_list:\n\
             \x20 - model_name: smollm2\n    litellm_params: {{model: openai/smollm2, api_base: http://127.0.0.1:{}/v1, timeout: 120}}\n\
             \x20 - model_name: gone\n    litellm_params: {{model: openai/gone, api_base: http://127.0.0.1:{}/v1}}\n",
            relay.port,
            free_port()
        ),
    )
    .unwrap();
    let (proxy, http) = start_traced_proxy(dir.path(), &litellm, &endpoint).await;
    wait_for_http(
        &format!("127.0.0.1:{llama_port}"),
        "/v1/models",
        Duration::from_secs(120),
    )
    .await;

    let caller = traceparent(CALLER_TRACE, CALLER_SPAN);
    let (status, answer) = http_post(
        &http,
        "/v1/chat/completions",
        &[("traceparent", &caller), ("tracestate", "caller=1")],
        r#"{"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // A forged parent (all-zero span id): ignored, a trace of its own.
    let forged = traceparent(CALLER_TRACE, "0000000000000000");
    let (status, answer) = http_post(
        &http,
        "/v1/chat/completions",
        &[("traceparent", &forged)],
        r#"{"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("data: [DONE]"), "{answer}");
    // An upstream nobody listens on: the failure is typed on span and metric.
    let (status, answer) = http_post(
        &http,
        "/v1/chat/completions",
        &[("traceparent", &caller)],
        r#"{"model": "gone", "messages": [{"role": "user", "content": "Hello?"}]}"#,
    )
    .await;
    assert!(status >= 500, "{status} {answer}");

    let scrape = Scrape::of(&http).await;
    let seen = scrape.listed("gen_ai_", GEN_AI_METRICS);
    assert_eq!(
        seen.len(),
        GEN_AI_METRICS.len(),
        "not all exported: {seen:?}\n{}",
        scrape.text
    );
    let chat = [
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "openai"),
        ("gen_ai_request_model", "smollm2"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = chat.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(
        scrape.value(
            "gen_ai_client_operation_duration_seconds_count",
            &with(("error_type", ""))
        ),
        2.0
    );
    assert!(
        scrape.value(
            "gen_ai_client_token_usage_sum",
            &with(("gen_ai_token_type", "input"))
        ) > 0.0
    );
    assert!(
        scrape.value(
            "gen_ai_client_token_usage_sum",
            &with(("gen_ai_token_type", "output"))
        ) > 0.0
    );
    assert_eq!(
        scrape.value("gen_ai_server_time_to_first_token_seconds_count", &chat),
        1.0
    );
    let failed = scrape
        .samples
        .iter()
        .find(|s| {
            s.name == "gen_ai_client_operation_duration_seconds_count"
                && s.labels.get("gen_ai_request_model").map(String::as_str) == Some("gone")
        })
        .unwrap_or_else(|| panic!("no failed operation in\n{}", scrape.text));
    let error_type = failed.labels["error_type"].clone();
    assert!(
        error_type.starts_with("upstream_") || error_type == "no_deployment",
        "{error_type}"
    );
    assert_eq!(failed.value, 1.0);
    assert_eq!(proxy.terminate(), Some(0), "the proxy did not stop cleanly");

    let trace = (0..CALLER_TRACE.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&CALLER_TRACE[at..at + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let is_proxy_span =
        |r: &Received, name: &str| r.service == "berth-llm-proxy" && r.span.name == name;
    let gen_ai = span_where(&receiver, |r| {
        is_proxy_span(r, "chat smollm2") && r.span.trace_id == trace
    })
    .await;
    let http_span = span_where(&receiver, |r| {
        is_proxy_span(r, "POST") && r.span.span_id == gen_ai.span.parent_span_id
    })
    .await;
    assert_eq!(http_span.span.trace_id, trace);
    assert_eq!(hex(&http_span.span.parent_span_id), CALLER_SPAN);
    assert_eq!(span_kind(&http_span).as_str_name(), "SPAN_KIND_SERVER");
    assert_eq!(
        http_span.attribute("url.path").as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(
        http_span.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(span_kind(&gen_ai).as_str_name(), "SPAN_KIND_CLIENT");
    for (key, expected) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "smollm2"),
        ("gen_ai.provider.name", "openai"),
        ("gen_ai.system", "openai"),
        ("server.address", "127.0.0.1"),
    ] {
        assert_eq!(gen_ai.attribute(key).as_deref(), Some(expected), "{key}");
    }
    assert_eq!(
        gen_ai.attribute("server.port"),
        Some(relay.port.to_string())
    );
    assert!(gen_ai.attribute("gen_ai.response.model").is_some());
    assert!(gen_ai.attribute("error.type").is_none());
    for key in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        let tokens: u64 = gen_ai.attribute(key).unwrap().parse().unwrap();
        assert!(tokens > 0, "{key} = {tokens}");
    }
    let reasons = string_array(&gen_ai, "gen_ai.response.finish_reasons");
    assert!(
        reasons == ["length"] || reasons == ["stop"],
        "finish reasons {reasons:?}"
    );

    // The upstream received the trace, the GenAI span's one try its
    // parent; the streamed request with the forged parent another trace.
    let received = relay.traceparents();
    assert_eq!(received.len(), 2, "{received:?}");
    let try_of = |gen_ai: &Received| {
        let tries: Vec<Received> = receiver
            .spans()
            .into_iter()
            .filter(|r| r.span.parent_span_id == gen_ai.span.span_id)
            .collect();
        assert_eq!(tries.len(), 1, "{tries:#?}");
        assert_eq!(
            tries[0].attribute("berth.llm.attempt").as_deref(),
            Some("1")
        );
        tries[0].clone()
    };
    assert_eq!(
        received[0],
        traceparent(CALLER_TRACE, &hex(&try_of(&gen_ai).span.span_id))
    );
    assert!(
        !received[1].contains(CALLER_TRACE) && received[1].starts_with("00-"),
        "{received:?}"
    );
    let failed = span_where(&receiver, |r| {
        is_proxy_span(r, "chat gone") && r.span.trace_id == trace
    })
    .await;
    assert_eq!(failed.attribute("error.type"), Some(error_type));
    assert_eq!(
        failed.span.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    let streamed = span_where(&receiver, |r| {
        is_proxy_span(r, "chat smollm2") && r.span.trace_id != trace
    })
    .await;
    let streamed_http = receiver
        .spans()
        .into_iter()
        .find(|r| r.span.span_id == streamed.span.parent_span_id)
        .expect("the streamed request's HTTP span");
    assert!(
        streamed_http.span.parent_span_id.is_empty(),
        "the forged parent was taken"
    );
    assert_eq!(
        received[1],
        traceparent(
            &hex(&streamed.span.trace_id),
            &hex(&try_of(&streamed).span.span_id)
        )
    );
    // The stream described as a whole answer is.
    assert!(streamed.attribute("gen_ai.response.model").is_some());
    let reasons = string_array(&streamed, "gen_ai.response.finish_reasons");
    assert!(
        reasons == ["length"] || reasons == ["stop"],
        "finish reasons {reasons:?}"
    );
    drop(llama);
}

/// An upstream that answers each request with the next of its scripted
/// HTTP/1 answers (then closes the connection), keeping the `traceparent`
/// each request came with.
struct ScriptedUpstream {
    port: u16,
    traceparents: Arc<Mutex<Vec<String>>>,
}

impl ScriptedUpstream {
    async fn start(answers: Vec<String>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&traceparents);
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut received = Vec::new();
                let mut chunk = [0u8; 16 << 10];
                // The head, then as much body as it announces.
                let (head_end, length) = loop {
                    let read = client.read(&mut chunk).await.unwrap();
                    assert!(read > 0, "the proxy closed before its request's end");
                    received.extend_from_slice(&chunk[..read]);
                    if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&received[..at]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if let Some(parent) =
                            head.lines().find_map(|l| l.strip_prefix("traceparent:"))
                        {
                            kept.lock().unwrap().push(parent.trim().to_string());
                        }
                        break (at + 4, length);
                    }
                };
                while received.len() < head_end + length {
                    let read = client.read(&mut chunk).await.unwrap();
                    assert!(read > 0, "the proxy closed before its request's end");
                    received.extend_from_slice(&chunk[..read]);
                }
                client.write_all(answer.as_bytes()).await.unwrap();
                client.shutdown().await.unwrap();
            }
        });
        Self { port, traceparents }
    }

    fn traceparents(&self) -> Vec<String> {
        self.traceparents.lock().unwrap().clone()
    }
}

/// An SSE answer of OpenAI's shape: `events` as `data:` events, then
/// `[DONE]`; its body ends with the connection.
fn sse_answer(events: &[&str]) -> String {
    let mut answer = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
    );
    for event in events {
        answer.push_str(&format!("data: {event}\n\n"));
    }
    answer.push_str("data: [DONE]\n\n");
    answer
}

/// A streamed chat completion through the real berth-llm-proxy to a
/// scripted upstream that refuses the first try (503) and streams the
/// second: the request's GenAI span carries what the stream said (the
/// model, id and finish reasons of its chunks, the usage of its usage
/// chunk — one the proxy asked for and the client did not get), and each
/// try is a child span of it with the deployment, model, try number and
/// outcome, whose `traceparent` the upstream received. A second stream,
/// with the usage the client asked for passed untouched, is described the
/// same.
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_chat_completion_s_span_describes_the_answer_and_each_try() {
    let (receiver, endpoint) = Receiver::start().await;
    let chunk = |delta: &str, reason: &str| {
        format!(
            r#"{{"id":"chatcmpl-7","object":"chat.completion.chunk","model":"tiny-q8","choices":[{{"index":0,"delta":{delta},"finish_reason":{reason}}}]}}"#
        )
    };
    let usage = r#"{"id":"chatcmpl-7","object":"chat.completion.chunk","model":"tiny-q8","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}"#;
    let (first, second, last) = (
        chunk(r#"{"role":"assistant","content":"Hi"}"#, "null"),
        chunk(r#"{"content":"!"}"#, "null"),
        chunk("{}", r#""length""#),
    );
    let stream = sse_answer(&[&first, &second, &last, usage]);
    let error = r#"{"error": {"message": "loading"}}"#;
    let refused = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{error}",
        error.len()
    );
    let upstream = ScriptedUpstream::start(vec![refused, stream.clone(), stream]).await;
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        format!(
            "model_list:\n\
             \x20 - model_name: tiny\n    litellm_params: {{model: openai/tiny-upstream, api_base: http://127.0.0.1:{}/v1}}\n    model_info: {{id: tiny-a}}\n",
            upstream.port
        ),
    )
    .unwrap();
    let (proxy, http) = start_traced_proxy(dir.path(), &litellm, &endpoint).await;

    let caller = traceparent(CALLER_TRACE, CALLER_SPAN);
    let (status, answer) = http_post(
        &http,
        "/v1/chat/completions",
        &[("traceparent", &caller)],
        r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "stream": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("data: [DONE]"), "{answer}");
    assert!(
        !answer.contains("usage"),
        "usage the client did not ask for: {answer}"
    );
    let (status, answer) = http_post(
        &http,
        "/v1/chat/completions",
        &[],
        r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "stream": true, "stream_options": {"include_usage": true}}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"usage\""), "{answer}");
    assert_eq!(proxy.terminate(), Some(0), "the proxy did not stop cleanly");

    let trace = (0..CALLER_TRACE.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&CALLER_TRACE[at..at + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let is_proxy_span =
        |r: &Received, name: &str| r.service == "berth-llm-proxy" && r.span.name == name;
    let described = |gen_ai: &Received| {
        for (key, expected) in [
            ("gen_ai.response.model", "tiny-q8"),
            ("gen_ai.response.id", "chatcmpl-7"),
            ("gen_ai.usage.input_tokens", "11"),
            ("gen_ai.usage.output_tokens", "2"),
            ("berth.llm.deployment", "tiny-a"),
        ] {
            assert_eq!(gen_ai.attribute(key).as_deref(), Some(expected), "{key}");
        }
        assert_eq!(
            string_array(gen_ai, "gen_ai.response.finish_reasons"),
            ["length"]
        );
        assert!(gen_ai.attribute("error.type").is_none());
    };
    let gen_ai = span_where(&receiver, |r| {
        is_proxy_span(r, "chat tiny") && r.span.trace_id == trace
    })
    .await;
    described(&gen_ai);
    let untouched = span_where(&receiver, |r| {
        is_proxy_span(r, "chat tiny") && r.span.trace_id != trace
    })
    .await;
    described(&untouched);

    // The retried request's tries, in order, each the GenAI span's child.
    let mut tries: Vec<Received> = receiver
        .spans()
        .into_iter()
        .filter(|r| {
            is_proxy_span(r, "attempt tiny-a") && r.span.parent_span_id == gen_ai.span.span_id
        })
        .collect();
    tries.sort_by_key(|r| r.attribute("berth.llm.attempt"));
    assert_eq!(tries.len(), 2, "{tries:#?}");
    for (at, attempt) in tries.iter().enumerate() {
        assert_eq!(span_kind(attempt).as_str_name(), "SPAN_KIND_CLIENT");
        assert_eq!(
            attempt.attribute("berth.llm.attempt"),
            Some((at + 1).to_string())
        );
        for (key, expected) in [
            ("berth.llm.deployment", "tiny-a"),
            ("gen_ai.request.model", "tiny-upstream"),
            ("gen_ai.provider.name", "openai"),
            ("server.address", "127.0.0.1"),
        ] {
            assert_eq!(attempt.attribute(key).as_deref(), Some(expected), "{key}");
        }
        assert_eq!(
            attempt.attribute("server.port"),
            Some(upstream.port.to_string())
        );
    }
    let error = opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32;
    assert_eq!(
        tries[0].attribute("error.type").as_deref(),
        Some("upstream_error")
    );
    assert_eq!(
        tries[0].attribute("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(tries[0].span.status.as_ref().map(|s| s.code), Some(error));
    assert!(tries[1].attribute("error.type").is_none());
    assert_ne!(tries[1].span.status.as_ref().map(|s| s.code), Some(error));
    // Each try sent its own span as the upstream's parent.
    let received = upstream.traceparents();
    assert_eq!(received.len(), 3, "{received:?}");
    for (sent, attempt) in received.iter().zip(&tries) {
        assert_eq!(
            *sent,
            traceparent(CALLER_TRACE, &hex(&attempt.span.span_id))
        );
    }
}

/// The embedding service's HTTP API joins the caller's trace too (with or
/// without its model: the span is the request's, whatever it answers), and
/// its `/metrics` counts the spans the collector took.
#[tokio::test(flavor = "multi_thread")]
async fn an_embedding_request_joins_the_callers_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let embedding = Process::spawn(
        "berth-embedding",
        &["--listen", &listen, "--http-listen", &http],
        &[
            ("BERTH_SERVER__OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("XDG_DATA_HOME", dir.path().to_str().unwrap()),
        ],
    );
    // The HTTP listener is bound just after the gRPC one: wait for it.
    wait_for_http(&http, "/metrics", Duration::from_secs(30)).await;
    let caller = traceparent(CALLER_TRACE, CALLER_SPAN);
    let (status, answer) = http_post(
        &http,
        "/v1/embeddings",
        &[("traceparent", &caller)],
        r#"{"input": "a cat"}"#,
    )
    .await;
    // 200 with the model, 503 without it: traced either way.
    assert!(status == 200 || status == 503, "{status} {answer}");
    // Every 100 ms a batch leaves: the collector's acceptance is counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = Scrape::of(&http).await;
        scrape.listed("berth_trace_", TRACE_EXPORT_METRICS);
        if scrape.value("berth_trace_spans_exported_total", &[]) > 0.0 {
            assert_eq!(scrape.value("berth_trace_spans_dropped_total", &[]), 0.0);
            assert_eq!(
                scrape.value("berth_trace_spans_export_failed_total", &[]),
                0.0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exported span counted\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(embedding.terminate(), Some(0));
    let span = span_where(&receiver, |r| {
        r.service == "berth-embedding" && r.span.name == "POST"
    })
    .await;
    assert_eq!(hex(&span.span.trace_id), CALLER_TRACE);
    assert_eq!(hex(&span.span.parent_span_id), CALLER_SPAN);
    assert_eq!(
        span.attribute("url.path").as_deref(),
        Some("/v1/embeddings")
    );
    assert_eq!(
        span.attribute("http.response.status_code"),
        Some(status.to_string())
    );
}

/// The agent's domain metrics on a real engine (docker, or podman with
/// `BERTH_TEST_ENGINE=podman`): the test image's import counted, a workload
/// with restart policy `always` killed and started again by the engine
/// counted as a restart (`exited`), and the workload in the gauge by
/// runtime and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_count_imports_restarts_and_workloads() {
    use berth_proto::agent::v1::EventKind;
    use berth_proto::common::v1::{RestartPolicy, Runtime};
    let http = format!("127.0.0.1:{}", free_port());
    let settings = vec![("BERTH_SERVER__HTTP_LISTEN", http.clone())];
    let Some(mut agent) = berth_tests::agent::Agent::start_with("metrics", settings).await else {
        return;
    };
    let runtime = match agent.engine.runtime {
        Runtime::Podman => "podman",
        _ => "docker",
    };
    let mut spec = agent.spec(&["sleep", "1000"]);
    spec.restart_policy = RestartPolicy::Always as i32;
    let id = agent.run("backend", spec).await.id;
    let mut events = agent.events(&id).await;
    let (_, details) = agent.engine_get(&format!("/containers/{id}/json"));
    let pid: i32 = berth_tests::agent::json_field(&details, "Pid")
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    berth_tests::agent::Agent::wait_event(&mut events, Duration::from_secs(10), |e| {
        e.kind() == EventKind::Died
    })
    .await;
    berth_tests::agent::Agent::wait_event(&mut events, Duration::from_secs(20), |e| {
        matches!(e.kind(), EventKind::Started | EventKind::Restarted)
    })
    .await;
    // The census counts a second after a burst of events.
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = Scrape::of(&http).await;
        scrape.listed("berth_agent_", AGENT_METRICS);
        let counted = |name: &str, labels: &[(&str, &str)]| {
            scrape.samples.iter().any(|s| {
                s.name == name
                    && s.value >= 1.0
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
        };
        if counted("berth_agent_restarts_total", &[("reason", "exited")])
            && counted(
                "berth_agent_workloads",
                &[("runtime", runtime), ("state", "running")],
            )
        {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "no restart or running workload counted:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // One restart, not one per event of it.
    let restarts: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.name == "berth_agent_restarts_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(restarts, 1.0, "{}", scrape.text);
    assert_eq!(
        scrape.value(
            "berth_agent_image_imports_total",
            &[("runtime", runtime), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(scrape.value("berth_agent_execs_in_flight", &[]), 0.0);
    agent.cleanup().await;
}

/// berth-llm-proxy serving `litellm`'s models and exporting its spans to
/// `endpoint` every 100 ms, once it answers: the process and its HTTP address.
async fn start_traced_proxy(dir: &Path, litellm: &Path, endpoint: &str) -> (Process, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let proxy = Process::spawn(
        "berth-llm-proxy",
        &[
            "--listen",
            &listen,
            "--http-listen",
            &http,
            "--set",
            &format!("proxy.litellm_config={}", litellm.display()),
        ],
        &[
            ("BERTH_SERVER__OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("XDG_DATA_HOME", dir.to_str().unwrap()),
        ],
    );
    wait_for(&format!("http://{listen}")).await;
    (proxy, http)
}
