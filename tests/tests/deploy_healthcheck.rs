//! `<service> healthcheck`, the entry point of the images' health checks: it reads the same
//! config as the server (file from BERTH_CONFIG or --config, BERTH_* env, --listen), dials the
//! service's own gRPC address (TCP, a wildcard dialled on loopback, or the unix socket) and exits
//! 0 when grpc.health.v1 says SERVING, 1 with one line naming the problem otherwise.

use std::process::{Command, Output};

use berth_tests::{Process, bin, free_port, wait_for};

fn healthcheck(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin(binary))
        .arg("healthcheck")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("BERTH_CONFIG")
        .output()
        .expect("run healthcheck")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_passes_on_a_serving_service_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    // TCP, bound on the wildcard address, told by env like the images do.
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let http = format!("127.0.0.1:{}", free_port());
    let env = [
        ("BERTH_SERVER__LISTEN", listen.as_str()),
        ("BERTH_SERVER__HTTP_LISTEN", http.as_str()),
    ];
    let _proxy = Process::spawn("berth-llm-proxy", &[], &env);
    wait_for(&format!("http://127.0.0.1:{port}")).await;
    let output = healthcheck("berth-llm-proxy", &[], &env);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    // A named service too, and an unknown one is a failure that says so.
    let output = healthcheck(
        "berth-llm-proxy",
        &["--service", "berth.llmproxy.v1.LlmProxy"],
        &env,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let output = healthcheck("berth-llm-proxy", &["--service", "nope.Nope"], &env);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("NotFound"), "{}", stderr(&output));

    // The agent on its unix socket, from a config file given by BERTH_CONFIG.
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"unix://{}\"\nhttp_listen = \"\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let config_env = [("BERTH_CONFIG", config.to_str().unwrap())];
    let _agent = Process::spawn("berth-agent", &[], &config_env);
    wait_for(&format!("unix://{}", socket.display())).await;
    let output = Command::new(bin("berth-agent"))
        .arg("healthcheck")
        .envs(config_env)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    // --config after the subcommand works as well.
    let output = healthcheck("berth-agent", &["--config", config.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn healthcheck_fails_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listening.
    let port = free_port();
    let output = healthcheck(
        "berth-orchestrator",
        &["--listen", &format!("127.0.0.1:{port}"), "--timeout", "2s"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with("berth-orchestrator: unhealthy:")
            && message.contains(&port.to_string())
            && message.lines().count() == 1,
        "{message}"
    );
    // A socket that is not there.
    let socket = dir.path().join("none.sock");
    let output = healthcheck(
        "berth-agent",
        &["--listen", &format!("unix://{}", socket.display())],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("none.sock"), "{}", stderr(&output));
    // A missing config file.
    let output = healthcheck(
        "berth-power-sampler",
        &["--config", "/nonexistent/x.toml"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("config file /nonexistent/x.toml"),
        "{}",
        stderr(&output)
    );
    // Port 0 has nothing to dial.
    let output = healthcheck("berth-embedding", &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("port 0"), "{}", stderr(&output));
}
