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
        let agent = Process::spawn(
            "berth-agent",
            &["--listen", &agent_listen, "--http-listen", ""],
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

/// The orchestrator's domain metrics, each as the exposition names it with
/// its label names: a rename or a new label is a deliberate change here.
const ORCHESTRATOR_METRICS: &[(&str, &[&str])] = &[
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
    (
        "berth_orchestrator_run_energy_joules_bucket",
        &["le", "replayed"],
    ),
    ("berth_orchestrator_run_energy_joules_count", &["replayed"]),
    ("berth_orchestrator_run_energy_joules_sum", &["replayed"]),
];

/// A scraped sample: its name, labels and value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
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

    let (status, text) = berth_tests::http_get(&http, "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    let samples = parse_exposition(&text);
    let expected: BTreeMap<&str, BTreeSet<&str>> = ORCHESTRATOR_METRICS
        .iter()
        .map(|(name, labels)| (*name, labels.iter().copied().collect()))
        .collect();
    let mut seen = BTreeSet::new();
    for sample in samples
        .iter()
        .filter(|s| s.name.starts_with("berth_orchestrator_"))
    {
        let labels: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
        assert_eq!(
            expected.get(sample.name.as_str()),
            Some(&labels),
            "{} with labels {labels:?} is not in the list",
            sample.name
        );
        seen.insert(sample.name.as_str());
    }
    let missing: Vec<&&str> = expected.keys().filter(|n| !seen.contains(**n)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");

    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
            .value
    };
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
    stack.stop();
}

/// The alerting rules and the Grafana dashboard name only metrics the
/// orchestrator exports (the list above, checked against a scrape), so a
/// rename cannot silently empty an alert or a panel.
#[test]
fn monitoring_rules_and_dashboard_name_only_exported_metrics() {
    let listed: BTreeSet<&str> = ORCHESTRATOR_METRICS.iter().map(|(name, _)| *name).collect();
    for file in [
        "deploy/monitoring/rules.yml",
        "deploy/monitoring/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let named: BTreeSet<&str> = text
            .match_indices("berth_orchestrator_")
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(!named.is_empty(), "{file} names no orchestrator metric");
        let unknown: Vec<&&str> = named.iter().filter(|n| !listed.contains(**n)).collect();
        assert!(unknown.is_empty(), "{file} names unexported {unknown:?}");
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
