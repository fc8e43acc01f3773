//! Each of the five service binaries, started with its default config on
//! free ports, answers grpc.health.v1 with SERVING, lists its service through
//! server reflection (v1 and v1alpha, as grpcurl and grpcio ask), describes
//! it, stops cleanly on SIGTERM, and refuses bad config with a clear error.

use std::process::{Command, Stdio};

use berth_tests::{
    Process, bin, free_port, health, reflection_describe, reflection_list, wait_for,
};
use tonic_health::pb::health_check_response::ServingStatus;

struct Case {
    binary: &'static str,
    service: &'static str,
}

const CASES: [Case; 5] = [
    Case {
        binary: "berth-orchestrator",
        service: "berth.orchestrator.v1.Orchestrator",
    },
    Case {
        binary: "berth-agent",
        service: "berth.agent.v1.ContainerAgent",
    },
    Case {
        binary: "berth-power-sampler",
        service: "berth.power.v1.PowerSampler",
    },
    Case {
        binary: "berth-embedding",
        service: "berth.embedding.v1.Embedding",
    },
    Case {
        binary: "berth-llm-proxy",
        service: "berth.llmproxy.v1.LlmProxy",
    },
];

#[tokio::test(flavor = "multi_thread")]
async fn every_binary_serves_health_and_reflection_and_stops_on_sigterm() {
    for case in CASES {
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap();
        let (listen, address) = if case.binary == "berth-agent" {
            let socket = data.path().join("agent.sock");
            (
                format!("unix://{}", socket.display()),
                format!("unix://{}", socket.display()),
            )
        } else {
            let port = free_port();
            (
                format!("127.0.0.1:{port}"),
                format!("http://127.0.0.1:{port}"),
            )
        };
        let http = format!("127.0.0.1:{}", free_port());
        // The default config otherwise; XDG dirs keep state and models in the temp dir.
        let process = Process::spawn(
            case.binary,
            &["--listen", &listen, "--http-listen", &http],
            &[
                ("XDG_DATA_HOME", data_dir),
                ("XDG_CACHE_HOME", data_dir),
                ("XDG_RUNTIME_DIR", data_dir),
            ],
        );
        let channel = wait_for(&address).await;
        assert_eq!(
            health(channel.clone(), "").await,
            ServingStatus::Serving,
            "{}",
            case.binary
        );
        // The embedding service is NOT_SERVING without its model files (which
        // the temp cache dir lacks): a real per-service status.
        let expected = if case.binary == "berth-embedding" {
            None
        } else {
            Some(ServingStatus::Serving)
        };
        let status = health(channel.clone(), case.service).await;
        if let Some(expected) = expected {
            assert_eq!(status, expected, "{}", case.binary);
        }
        for v1alpha in [false, true] {
            let services = reflection_list(channel.clone(), v1alpha).await;
            assert!(
                services.iter().any(|s| s == case.service),
                "{}: {services:?}",
                case.binary
            );
            assert!(
                services.iter().any(|s| s == "grpc.health.v1.Health"),
                "{}: {services:?}",
                case.binary
            );
            assert!(
                !services
                    .iter()
                    .any(|s| s.starts_with("berth.") && s != case.service),
                "{} advertises another service's contract: {services:?}",
                case.binary
            );
        }
        let files = reflection_describe(channel.clone(), case.service).await;
        assert!(
            !files.is_empty(),
            "{}: describe returned no descriptor",
            case.binary
        );
        let metrics = fetch(&http, "/metrics").await;
        assert!(
            metrics.contains("berth_grpc_requests"),
            "{}: /metrics lacks gRPC metrics:\n{metrics}",
            case.binary
        );
        // The client stays connected: shutdown drains it rather than waiting
        // out the grace period.
        let stopping = std::time::Instant::now();
        assert_eq!(
            process.terminate(),
            Some(0),
            "{} did not exit 0 on SIGTERM",
            case.binary
        );
        assert!(
            stopping.elapsed() < std::time::Duration::from_secs(5),
            "{} took {:?} to stop",
            case.binary,
            stopping.elapsed()
        );
        drop(channel);
    }
}

/// A plain HTTP/1.1 GET, enough for /metrics.
async fn fetch(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("HTTP port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

fn run_to_exit(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(bin(binary))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn unknown_config_field_bad_value_and_missing_file_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nlistne = \"x\"\n",
    )
    .unwrap();
    let (code, stderr) = run_to_exit(
        "berth-orchestrator",
        &["--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("listne"), "{stderr}");

    let (code, stderr) = run_to_exit(
        "berth-power-sampler",
        &["--listen", "127.0.0.1:0"],
        &[("BERTH_SERVER__MAX_CONCURRENT_REQUESTS", "lots")],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("max_concurrent_requests") && stderr.contains("lots"),
        "{stderr}"
    );

    let (code, stderr) = run_to_exit(
        "berth-llm-proxy",
        &["--config", "/nonexistent/proxy.toml"],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/proxy.toml"), "{stderr}");

    let (code, stderr) = run_to_exit("berth-embedding", &["--listen", "localhost:x"], &[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("server.listen") && stderr.contains("localhost:x"),
        "{stderr}"
    );
}

#[test]
fn port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(
        "berth-llm-proxy",
        &["--listen", &addr, "--http-listen", ""],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&addr) && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn agent_refuses_an_engine_socket_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    let (code, stderr) = run_to_exit(
        "berth-agent",
        &[
            "--listen",
            &socket,
            "--http-listen",
            "",
            "--set",
            "engines.docker=/nonexistent/docker.sock",
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("engines.docker") && stderr.contains("/nonexistent/docker.sock"),
        "{stderr}"
    );
}

#[test]
fn agent_refuses_tcp_without_token() {
    let port = free_port().to_string();
    let (code, stderr) = run_to_exit(
        "berth-agent",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "",
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("agent.token"), "{stderr}");
}
