//! Exec dispatch latency into a running container: the agent's gRPC Exec
//! against the `docker exec` CLI, same container, same trivial command, one
//! run, and against the engine floor: the bare Docker API calls any client
//! must make (create exec, attached start, inspect for the exit code), from
//! this process over bollard. Agent and floor alternate call by call, so
//! outside load hits both alike. Needs the Docker Engine and
//! `apt-get download` (busybox image).
//!
//!   cargo bench -p berth-container-agent --bench exec_latency [-- ROUNDS]

use std::process::Command;
use std::time::{Duration, Instant};

use berth_container_agent::Config;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::{Runtime, WorkloadSpec};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!(
        "{name:<28} n={:<4} p50={:>8.2} ms  p99={:>8.2} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    if !std::path::Path::new("/var/run/docker.sock").exists() {
        println!("skipped: no Docker Engine at /var/run/docker.sock");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/images/busybox-rootfs.sh"
    );
    let built = Command::new("bash")
        .arg(script)
        .arg(dir.path().join("cache"))
        .output()?;
    let tar = String::from_utf8(built.stdout)?.trim().to_string();
    let mut config = Config::default();
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    config.server.listen = socket.clone();
    config.server.http_listen = String::new();
    config.engines.docker = "/var/run/docker.sock".into();
    config.engines.podman = "off".into();
    config.engines.owner = format!("bench-{}", std::process::id());
    config.engines.state_dir = dir.path().join("state");
    let _agent = berth_container_agent::start(config).await?;
    let channel = berth_server::client::connect(&socket, "", Duration::from_secs(5)).await?;
    let mut client = ContainerAgentClient::new(channel);

    let image = format!("berth-bench-{}:bb", std::process::id());
    let mut chunks = vec![ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Metadata(ImportImageMetadata {
            reference: image.clone(),
            runtime: Runtime::Docker as i32,
            saved_archive: false,
            command: vec!["/bin/sh".into()],
        })),
    }];
    chunks.extend(
        std::fs::read(&tar)?
            .chunks(256 << 10)
            .map(|c| ImportImageChunk {
                chunk: Some(import_image_chunk::Chunk::Data(c.to_vec())),
            }),
    );
    client.import_image(tokio_stream::iter(chunks)).await?;
    let spec = WorkloadSpec {
        runtime: Runtime::Docker as i32,
        image: image.clone(),
        command: vec!["sleep".into(), "100000".into()],
        ..Default::default()
    };
    let name = format!("bench-exec-{}", std::process::id());
    let workload = client
        .create_workload(CreateWorkloadRequest {
            name,
            spec: Some(spec),
        })
        .await?
        .into_inner();
    client
        .start_workload(WorkloadRef {
            id: workload.id.clone(),
        })
        .await?;

    let exec = |client: &mut ContainerAgentClient<_>| {
        let request = ExecRequest {
            workload_id: workload.id.clone(),
            command: vec!["true".into()],
            ..Default::default()
        };
        let mut client = client.clone();
        async move {
            let started = Instant::now();
            let mut stream = client.exec(request).await?.into_inner();
            while let Some(message) = stream.message().await? {
                if let Some(exec_output::Output::Exit(exit)) = message.output {
                    assert_eq!(exit.exit_code, 0);
                }
            }
            Ok::<_, tonic::Status>(started.elapsed())
        }
    };
    let docker = bollard::Docker::connect_with_unix(
        "/var/run/docker.sock",
        30,
        bollard::API_DEFAULT_VERSION,
    )?
    .negotiate_version()
    .await?;
    let engine_floor = || {
        let docker = docker.clone();
        let container = workload.id.clone();
        async move {
            let started = Instant::now();
            let created = docker
                .create_exec(
                    &container,
                    bollard::exec::CreateExecOptions {
                        cmd: Some(vec!["true"]),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await?;
            if let bollard::exec::StartExecResults::Attached { mut output, .. } =
                docker.start_exec(&created.id, None).await?
            {
                while futures::StreamExt::next(&mut output).await.is_some() {}
            }
            let inspect = docker.inspect_exec(&created.id).await?;
            assert_eq!(inspect.exit_code, Some(0));
            Ok::<_, bollard::errors::Error>(started.elapsed())
        }
    };
    for _ in 0..20 {
        exec(&mut client).await?; // warm-up
        engine_floor().await?;
    }
    let mut agent = Vec::with_capacity(rounds);
    let mut floor = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        agent.push(exec(&mut client).await?);
        floor.push(engine_floor().await?);
    }
    let cli_rounds = rounds.min(100);
    let mut cli = Vec::with_capacity(cli_rounds);
    for _ in 0..cli_rounds {
        let started = Instant::now();
        let status = Command::new("docker")
            .args(["exec", &workload.id, "true"])
            .status()?;
        assert!(status.success());
        cli.push(started.elapsed());
    }
    println!(
        "exec of `true` into a running busybox container, {}",
        Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let (agent_p50, agent_p99) = summary("berth agent gRPC Exec", agent);
    let (floor_p50, floor_p99) = summary("engine floor (bare API)", floor);
    let (cli_p50, cli_p99) = summary("docker exec CLI", cli);
    println!(
        "ratio (CLI / agent): p50 {:.1}x, p99 {:.1}x",
        cli_p50.as_secs_f64() / agent_p50.as_secs_f64(),
        cli_p99.as_secs_f64() / agent_p99.as_secs_f64()
    );
    println!(
        "agent over the engine floor: p50 {:+.2} ms, p99 {:+.2} ms",
        (agent_p50.as_secs_f64() - floor_p50.as_secs_f64()) * 1e3,
        (agent_p99.as_secs_f64() - floor_p99.as_secs_f64()) * 1e3
    );

    client
        .remove_workload(RemoveWorkloadRequest {
            id: workload.id,
            force: true,
        })
        .await?;
    client
        .remove_image(RemoveImageRequest {
            image,
            runtime: Runtime::Docker as i32,
        })
        .await?;
    Ok(())
}
