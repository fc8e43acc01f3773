fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-agent",
        "berth agent: runs workloads on this host for the orchestrator",
        |config| async move { Ok(berth_container_agent::start(config).await?) },
    )
}
