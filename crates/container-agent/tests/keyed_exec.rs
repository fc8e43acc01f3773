//! Keyed execs through the agent's gRPC API, on the process runtime: an exec
//! outlives its caller, is attached again with its whole output, refuses a
//! second start under the same key, and is killed by CancelExec.

use std::time::Duration;

use berth_container_agent::Config;
use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use berth_server::client::AuthChannel;

type Client = ContainerAgentClient<AuthChannel>;

async fn agent(dir: &tempfile::TempDir) -> (berth_server::RunningService, Client) {
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut config = Config::default();
    config.server.listen = socket.clone();
    config.server.http_listen = String::new();
    config.engines.docker = "off".into();
    config.engines.podman = "off".into();
    config.engines.state_dir = dir.path().join("state");
    let service = berth_container_agent::start(config).await.unwrap();
    let channel = berth_server::client::connect(&socket, "", Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = ContainerAgentClient::new(channel);
    let spec = WorkloadSpec {
        runtime: Runtime::Process as i32,
        ..Default::default()
    };
    client
        .create_workload(CreateWorkloadRequest {
            name: "env".into(),
            spec: Some(spec),
        })
        .await
        .unwrap();
    client
        .start_workload(WorkloadRef { id: "env".into() })
        .await
        .unwrap();
    (service, client)
}

fn keyed(key: &str, script: &str) -> ExecRequest {
    ExecRequest {
        workload_id: "env".into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        exec_key: key.into(),
        ..Default::default()
    }
}

/// All of a stream: stdout, and the exit status it ended with.
async fn drain(mut stream: tonic::Streaming<ExecOutput>) -> (String, Option<ExitStatus>) {
    let mut out = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        match message.output.unwrap() {
            exec_output::Output::Stdout(data) => out.extend(data),
            exec_output::Output::Exit(exit) => {
                return (String::from_utf8(out).unwrap(), Some(exit));
            }
            _ => {}
        }
    }
    (String::from_utf8(out).unwrap(), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_exec_outlives_its_caller_and_is_attached_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client) = agent(&dir).await;
    let marker = dir.path().join("finished");
    let script = format!(
        "echo first; sleep 0.5; echo second; touch {}",
        marker.display()
    );
    let mut stream = client
        .exec(keyed("c1/r1/attempt-1", &script))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        first.output,
        Some(exec_output::Output::Stdout(b"first\n".to_vec()))
    );
    drop(stream);

    let again = client
        .exec(keyed("c1/r1/attempt-1", &script))
        .await
        .expect_err("one key runs once");
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");

    let attached = client
        .attach_exec(AttachExecRequest {
            exec_key: "c1/r1/attempt-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (out, exit) = drain(attached).await;
    assert_eq!(
        out, "first\nsecond\n",
        "the whole output, replayed then live"
    );
    assert_eq!(exit.unwrap().reason(), ExitReason::Exited);
    assert!(marker.exists(), "the command ran to its end");

    // Ended, it is still kept for a late attacher.
    let late = client
        .attach_exec(AttachExecRequest {
            exec_key: "c1/r1/attempt-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drain(late).await.0, "first\nsecond\n");

    let unknown = client
        .attach_exec(AttachExecRequest {
            exec_key: "never".into(),
        })
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_exec_kills_a_keyed_exec() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client) = agent(&dir).await;
    let marker = dir.path().join("leaked");
    let script = format!("echo started; sleep 2; touch {}", marker.display());
    let mut stream = client
        .exec(keyed("slow", &script))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("started");
    client
        .cancel_exec(CancelExecRequest {
            exec_key: "slow".into(),
        })
        .await
        .unwrap();
    let (_, exit) = drain(stream).await;
    assert_eq!(exit.unwrap().reason(), ExitReason::Cancelled);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "the cancelled command ran on");

    let too_long = client
        .exec(keyed(&"k".repeat(600), "true"))
        .await
        .expect_err("keys are bounded");
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);
}

/// A host process keeps no accounting of its execs: DescribeExecAccounting
/// is UNIMPLEMENTED saying which runtime does, never an empty record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_exec_has_no_cluster_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, mut client) = agent(&dir).await;
    drain(
        client
            .exec(keyed("c1/r1/1", "true"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let refused = client
        .describe_exec_accounting(DescribeExecAccountingRequest {
            workload_id: "env".into(),
            exec_key: "c1/r1/1".into(),
            wait: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    assert!(refused.message().contains("RUNTIME_SLURM"), "{refused:?}");
}
